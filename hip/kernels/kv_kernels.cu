// rocmforge's K/V kernels: one source for nvcc (CUDA) and hipcc (HIP).
// Memory-bound: 16-byte accesses when rows (or blocks) allow, one thread
// block per token (or block pair), consecutive threads on consecutive
// addresses. Host versions with identical results: ../rf_host_kernels.c.
#ifdef __HIPCC__
#include <hip/hip_runtime.h>
#endif
#include <stdint.h>

#include "../rf_convert.h"

struct alignas(16) rf_vec16 {
    uint32_t x, y, z, w;
};

// True when four addresses and a length all allow 16-byte pieces.
__device__ __forceinline__ bool rf_aligned16(const char *a, const char *b, const char *c, const char *d,
                                               int64_t n) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d | (uintptr_t)n) % 16) == 0;
}

// The 16-byte piece u of a two-part copy: part 0 holds pieces [0, m), part 1 the rest.
struct rf_parts {
    char *d0, *d1;
    const char *s0, *s1;
    int64_t m;
    __device__ __forceinline__ rf_vec16 load(int64_t u) const {
        return u < m ? ((const rf_vec16 *)s0)[u] : ((const rf_vec16 *)s1)[u - m];
    }
    // A load of a source read once that no thread of the kernel writes (write_kv's
    // new rows): on CUDA through the read-only path without L1 allocation, 8
    // points of copy bandwidth on the H200 (benchmarks/kv_kernel_designs.py)
    __device__ __forceinline__ rf_vec16 load_once(int64_t u) const {
        const rf_vec16 *p = u < m ? (const rf_vec16 *)s0 + u : (const rf_vec16 *)s1 + (u - m);
#if defined(__CUDA_ARCH__)
        rf_vec16 r;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                     : "l"(p));
        return r;
#else
        return *p;
#endif
    }
    __device__ __forceinline__ void store(int64_t u, rf_vec16 v) const {
        if (u < m) ((rf_vec16 *)d0)[u] = v;
        else ((rf_vec16 *)d1)[u - m] = v;
    }
};

// Copy the pieces [0, total) of p with the block's threads, U loads in flight
// per thread before their stores (the compiler may not move loads past stores
// that could alias them).
template <int U = 4>
__device__ __forceinline__ void rf_copy_pieces(const rf_parts &p, int64_t total) {
    const int64_t step = blockDim.x;
    int64_t u = threadIdx.x;
    for (; u + (U - 1) * step < total; u += U * step) {
        rf_vec16 v[U];
#pragma unroll
        for (int j = 0; j < U; j++) v[j] = p.load(u + j * step);
#pragma unroll
        for (int j = 0; j < U; j++) p.store(u + j * step, v[j]);
    }
    for (; u < total; u += step) p.store(u, p.load(u));
}

// Two copies of n bytes at once (a token's key and value row, or one block):
// the block's threads span both. 16-byte pieces when every address and n
// allow, else bytes.
__device__ __forceinline__ void rf_copy2(char *d0, const char *s0, char *d1, const char *s1, int64_t n) {
    if (rf_aligned16(d0, s0, d1, s1, n)) {
        rf_copy_pieces(rf_parts{d0, d1, s0, s1, n / 16}, 2 * (n / 16));
        return;
    }
    for (int64_t i = threadIdx.x; i < 2 * n; i += blockDim.x) {
        if (i < n) d0[i] = s0[i];
        else d1[i - n] = s1[i - n];
    }
}

// Copy n bytes (one block of a cache, or the used rows of one), four pieces
// in flight per thread; the host gives a block up to 512 threads, so a 32 KiB
// block is one round (95% of copy bandwidth on the H200 against 94% for 256
// threads of eight pieces: benchmarks/kv_kernel_designs.py).
__device__ __forceinline__ void rf_copy(char *dst, const char *src, int64_t n) {
    if (rf_aligned16(dst, src, dst, src, n)) {
        rf_copy_pieces(rf_parts{dst, dst, src, src, n / 16}, n / 16);
        return;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

// Element access inside a group of 8 elements held as 32-bit words (8 words
// of float32, 4 of 16-bit types, 2 of 8-bit types).
template <int DT> struct rf_size { static constexpr int bytes = DT == RF_DT_F32 ? 4 : DT <= RF_DT_BF16 ? 2 : 1; };

template <int DT> __device__ __forceinline__ float rf_unpack(const uint32_t *w, int j) {
    if constexpr (DT == RF_DT_F32) return rf_float(w[j]);
    else if constexpr (DT == RF_DT_F16) return rf_f16_bits_to_f32((uint16_t)(w[j >> 1] >> ((j & 1) * 16)));
    else return rf_bf16_bits_to_f32((uint16_t)(w[j >> 1] >> ((j & 1) * 16)));
}

template <int DT> __device__ __forceinline__ uint32_t rf_encode(float x, float inv_scale) {
    if constexpr (DT == RF_DT_F32) return rf_bits(x);
    else if constexpr (DT == RF_DT_F16) return rf_f32_to_f16_bits(x);
    else if constexpr (DT == RF_DT_BF16) return rf_f32_to_bf16_bits(x);
    else if constexpr (DT == RF_DT_FP8_E4M3) return rf_f32_to_e4m3_bits(x * inv_scale);
    else return (uint8_t)rf_f32_to_i8(x * inv_scale);
}

template <int BYTES> __device__ __forceinline__ void rf_load_words(uint32_t *w, const char *p) {
    if constexpr (BYTES == 8) {
        uint2 v = *(const uint2 *)p;
        w[0] = v.x, w[1] = v.y;
    } else {
        for (int i = 0; i < BYTES / 16; i++) {
            uint4 v = ((const uint4 *)p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    }
}

template <int BYTES> __device__ __forceinline__ void rf_store_words(char *p, const uint32_t *w) {
    if constexpr (BYTES == 8) {
        *(uint2 *)p = make_uint2(w[0], w[1]);
    } else {
        for (int i = 0; i < BYTES / 16; i++)
            ((uint4 *)p)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
}

// Convert a row of n elements from IN to OUT with the block's threads: 8
// elements per thread and step (whole-word loads and stores) when n and the
// addresses allow, else one element at a time. Results equal the host's.
template <int IN, int OUT>
__device__ void rf_convert_row(char *dst, const char *src, int64_t n, float inv_scale) {
    constexpr int ib = 8 * rf_size<IN>::bytes, ob = 8 * rf_size<OUT>::bytes;
    if (n % 8 == 0 && (uintptr_t)src % (ib < 16 ? ib : 16) == 0 && (uintptr_t)dst % (ob < 16 ? ob : 16) == 0) {
        for (int64_t g = threadIdx.x; g < n / 8; g += blockDim.x) {
            uint32_t in[ib / 4], out[ob / 4] = {0};
            rf_load_words<ib>(in, src + g * ib);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                uint32_t bits = rf_encode<OUT>(rf_unpack<IN>(in, j), inv_scale);
                constexpr int per_word = 4 / rf_size<OUT>::bytes, width = 8 * rf_size<OUT>::bytes;
                out[j / per_word] |= per_word == 1 ? bits : bits << ((j % per_word) * width);
            }
            rf_store_words<ob>(dst + g * ob, out);
        }
        return;
    }
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        uint32_t w[2] = {0, 0};
        for (int b = 0; b < rf_size<IN>::bytes; b++) ((unsigned char *)w)[b] = src[i * rf_size<IN>::bytes + b];
        uint32_t bits = rf_encode<OUT>(rf_unpack<IN>(w, 0), inv_scale);
        for (int b = 0; b < rf_size<OUT>::bytes; b++) dst[i * rf_size<OUT>::bytes + b] = (char)(bits >> (8 * b));
    }
}

template <int IN>
__device__ void rf_convert_row_to(int out_dt, char *dst, const char *src, int64_t n, float inv_scale) {
    switch (out_dt) {
    case RF_DT_F32: rf_convert_row<IN, RF_DT_F32>(dst, src, n, inv_scale); break;
    case RF_DT_F16: rf_convert_row<IN, RF_DT_F16>(dst, src, n, inv_scale); break;
    case RF_DT_BF16: rf_convert_row<IN, RF_DT_BF16>(dst, src, n, inv_scale); break;
    case RF_DT_FP8_E4M3: rf_convert_row<IN, RF_DT_FP8_E4M3>(dst, src, n, inv_scale); break;
    default: rf_convert_row<IN, RF_DT_I8>(dst, src, n, inv_scale);
    }
}

__device__ void rf_convert_row_any(int in_dt, int out_dt, char *dst, const char *src, int64_t n, float inv_scale) {
    switch (in_dt) {
    case RF_DT_F32: rf_convert_row_to<RF_DT_F32>(out_dt, dst, src, n, inv_scale); break;
    case RF_DT_F16: rf_convert_row_to<RF_DT_F16>(out_dt, dst, src, n, inv_scale); break;
    default: rf_convert_row_to<RF_DT_BF16>(out_dt, dst, src, n, inv_scale);
    }
}

__device__ __forceinline__ int rf_dt_bytes(int dt) { return dt == RF_DT_F32 ? 4 : dt <= RF_DT_BF16 ? 2 : 1; }

// write_kv: row t of key/value (row elements of in_dt, starting t * k_stride
// and t * v_stride bytes in) goes to row slot_mapping[t] of the caches
// (cache_dt; fp8 and int8 store x * inv_scale).
// -1 skips a padding token. A slot outside [-1, num_slots) writes nothing and
// records the smallest such t in *bad (which starts as all ones), so a wrong
// device-side slot_mapping can never write outside the caches.
// Block (x, y): y tokens per block, x threads per token; grid covers T tokens.
extern "C" __global__ void rf_write_kv(char *key_cache, char *value_cache, const char *key, const char *value,
                                       const int64_t *slot_mapping, int64_t T, int64_t row, int64_t k_stride,
                                       int64_t v_stride, int64_t num_slots, int in_dt, int cache_dt, float inv_k,
                                       float inv_v, unsigned long long *bad) {
    int64_t t = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= T) return;
    int64_t s = slot_mapping[t];
    int64_t in_bytes = row * rf_dt_bytes(in_dt), out_bytes = row * rf_dt_bytes(cache_dt);
    const char *k = key + t * k_stride, *v = value + t * v_stride;
    bool ok = s >= 0 && s < num_slots;
    if (s < -1 || s >= num_slots) {
        if (threadIdx.x == 0) atomicMin(bad, (unsigned long long)t);
    }
    if (in_dt == cache_dt && rf_aligned16(key_cache, value_cache, k, v, in_bytes)) {
        // the common case, one round: this thread's pieces of the row are loaded
        // while the slot is still in flight, and stored once it is known
        int64_t m = in_bytes / 16, u = threadIdx.x, step = blockDim.x;
        rf_parts src{nullptr, nullptr, k, v, m};
        if (4 * step >= 2 * m) {
            rf_vec16 x[4];
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (u + j * step < 2 * m) x[j] = src.load_once(u + j * step);
            if (!ok) return;
            rf_parts dst{key_cache + s * out_bytes, value_cache + s * out_bytes, k, v, m};
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (u + j * step < 2 * m) dst.store(u + j * step, x[j]);
            return;
        }
    }
    if (!ok) return;
    if (in_dt == cache_dt) {
        rf_copy2(key_cache + s * out_bytes, k, value_cache + s * out_bytes, v, in_bytes);
        return;
    }
    rf_convert_row_any(in_dt, cache_dt, key_cache + s * out_bytes, k, row, inv_k);
    rf_convert_row_any(in_dt, cache_dt, value_cache + s * out_bytes, v, row, inv_v);
}

// copy_blocks: grid (num_pairs, num_caches); caches is a device array of
// cache base addresses, pairs holds (src, dst) block ids. A pair naming a
// block outside [0, num_blocks) copies nothing and records the smallest such
// pair index in *bad (which starts as all ones).
extern "C" __global__ void rf_copy_blocks(char *const *caches, const int32_t *pairs, int64_t block_bytes,
                                          int64_t num_blocks, unsigned long long *bad) {
    char *base = caches[blockIdx.y];
    int64_t src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) {
        if (threadIdx.x == 0) atomicMin(bad, (unsigned long long)blockIdx.x);
        return;
    }
    rf_copy(base + dst * block_bytes, base + src * block_bytes, block_bytes);
}

// copy_between: grid (num_pairs, num_caches); block src of src_caches[y] over
// block dst of dst_caches[y], for each (src, dst) of pairs: two caches of one
// geometry, on one GPU or on a GPU and a peer it can reach (ids checked by the caller).
extern "C" __global__ void rf_copy_between(char *const *dst_caches, char *const *src_caches, const int32_t *pairs,
                                           int64_t block_bytes) {
    rf_copy(dst_caches[blockIdx.y] + (int64_t)pairs[2 * blockIdx.x + 1] * block_bytes,
            src_caches[blockIdx.y] + (int64_t)pairs[2 * blockIdx.x] * block_bytes, block_bytes);
}

// gather_kv: grid (num_blocks_in_table); block i copies the rows of table[i]
// that lie below num_tokens into out.
extern "C" __global__ void rf_gather_rows(char *out, const char *cache, const int32_t *table,
                                          int64_t num_tokens, int64_t block_size, int64_t row_bytes) {
    int64_t first = (int64_t)blockIdx.x * block_size;
    int64_t n = num_tokens - first < block_size ? num_tokens - first : block_size;
    if (n <= 0) return;
    rf_copy(out + first * row_bytes, cache + (int64_t)table[blockIdx.x] * block_size * row_bytes,
            n * row_bytes);
}


// Swapping and the host tier, grid (num_ids, num_caches): block ids[x] of
// caches[y] to or from staging, laid out cache by cache (by_block 0:
// [(y * num_ids + x) * block_bytes], the host kernels' swap layout) or block by
// block (by_block 1: [(x * num_caches + y) * block_bytes], the host tier's slots).
__device__ __forceinline__ int64_t rf_staged_at(int64_t num_ids, int64_t by_block) {
    return by_block ? (int64_t)blockIdx.x * gridDim.y + blockIdx.y : (int64_t)blockIdx.y * num_ids + blockIdx.x;
}

extern "C" __global__ void rf_gather_blocks(char *staging, char *const *caches, const int32_t *ids,
                                            int64_t num_ids, int64_t block_bytes, int64_t by_block) {
    rf_copy(staging + rf_staged_at(num_ids, by_block) * block_bytes,
            caches[blockIdx.y] + (int64_t)ids[blockIdx.x] * block_bytes, block_bytes);
}

extern "C" __global__ void rf_scatter_blocks(const char *staging, char *const *caches, const int32_t *ids,
                                             int64_t num_ids, int64_t block_bytes, int64_t by_block) {
    rf_copy(caches[blockIdx.y] + (int64_t)ids[blockIdx.x] * block_bytes,
            staging + rf_staged_at(num_ids, by_block) * block_bytes, block_bytes);
}
