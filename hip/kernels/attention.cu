// Paged attention over rocmforge's cache: one source for nvcc (CUDA) and hipcc
// (HIP). Arguments and semantics: ../rf_attention.h; the host version with
// the same results (up to float rounding): ../rf_host_attention.c.
//
// Split-K (flash-decoding): thread block (query token, kv head, head group,
// split) reads the split's a.part positions of its sequence once, K
// then V, for up to HB query heads sharing the kv head. With one split it
// writes the output; else it writes its unnormalized sum, maximum and
// denominator, and rf_paged_attention_reduce combines the splits.
//
// Threads: RF_ATTN_THREADS per block, in subgroups of L lanes (L a power of
// two, L * 8 >= head_dim); a subgroup reads one key or value row, 8 elements
// per lane; each thread issues the loads of several rows before it uses them,
// and the positions' row offsets are computed once per split (shared memory),
// so the loop's only dependent loads are the K/V rows themselves.
// Shuffles stay inside 32-lane groups, so a 64-wide AMD wavefront works alike.
#ifdef __HIPCC__
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define RF_SHFL_XOR(v, m) __shfl_xor((v), (m), 32)
#else
#include <cuda_fp16.h>
#define RF_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), 32)
#endif
#include <stdint.h>

#include "../rf_attention.h"
#include "../rf_convert.h"

#define RF_ATTN_GROUPS (RF_ATTN_THREADS / 32)

// 8 consecutive elements of a row of type DT, as loaded (one or two 16-byte
// loads, or one 8-byte load), then as floats; fp8 through a table of its 256
// values (in shared memory), float16 by the hardware's exact conversion.
struct rf_raw8 {
    uint4 w[2];
};

template <int DT> __device__ __forceinline__ void rf_fetch8(const char *p, rf_raw8 &r) {
    if constexpr (DT == RF_DT_F32) {
        r.w[0] = ((const uint4 *)p)[0], r.w[1] = ((const uint4 *)p)[1];
    } else if constexpr (DT == RF_DT_F16 || DT == RF_DT_BF16) {
        r.w[0] = *(const uint4 *)p;
    } else {
        uint2 v = *(const uint2 *)p;
        r.w[0].x = v.x, r.w[0].y = v.y;
    }
}

template <int DT> __device__ __forceinline__ void rf_unpack8(const rf_raw8 &r, float *x, const float *fp8) {
    if constexpr (DT == RF_DT_F32) {
        const uint32_t w[8] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w, r.w[1].x, r.w[1].y, r.w[1].z, r.w[1].w};
#pragma unroll
        for (int j = 0; j < 8; j++) x[j] = __uint_as_float(w[j]);
    } else if constexpr (DT == RF_DT_F16 || DT == RF_DT_BF16) {
        const uint32_t w[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint16_t h = (uint16_t)(w[j >> 1] >> ((j & 1) * 16));
            x[j] = DT == RF_DT_F16 ? __half2float(__ushort_as_half(h)) : rf_bf16_bits_to_f32(h);
        }
    } else {
        const uint32_t w[2] = {r.w[0].x, r.w[0].y};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint8_t b = (uint8_t)(w[j >> 2] >> ((j & 3) * 8));
            x[j] = DT == RF_DT_FP8_E4M3 ? fp8[b] : (float)(int8_t)b;
        }
    }
}

__device__ __forceinline__ int rf_attn_bytes(int dt) { return dt == RF_DT_F32 ? 4 : dt <= RF_DT_BF16 ? 2 : 1; }

// Query and output elements (one at a time: they are read once per block).
__device__ __forceinline__ float rf_attn_get(const void *p, int64_t i, int dt) {
    if (dt == RF_DT_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == RF_DT_F16 ? rf_f16_bits_to_f32(h) : rf_bf16_bits_to_f32(h);
}

__device__ __forceinline__ void rf_attn_put(void *p, int64_t i, int dt, float x) {
    if (dt == RF_DT_F32) ((float *)p)[i] = x;
    else ((uint16_t *)p)[i] = dt == RF_DT_F16 ? rf_f32_to_f16_bits(x) : rf_f32_to_bf16_bits(x);
}

// The sequence of query token t, its first query row and its query count.
__device__ __forceinline__ int64_t rf_attn_seq(const rf_attn_args &a, int64_t t, int64_t *first, int64_t *nq) {
    if (!a.query_start) {
        *first = t, *nq = 1;
        return t;
    }
    int64_t lo = 0, hi = a.num_seqs - 1;         // the last s with query_start[s] <= t
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a.query_start[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    *first = a.query_start[lo], *nq = a.query_start[lo + 1] - a.query_start[lo];
    return lo;
}

// What one thread block attends: query token t of sequence s, kv head g,
// query heads [h0, h0 + nh), and positions [begin, end) of the token's
// context (split blockIdx.y), whose table entries start at entry b0.
struct rf_attn_job {
    int64_t t, s, g, h0, begin, end, b0, out_row;
    int nh;
};

// The job of this thread block (NT threads, up to hb query heads), with its
// checks, as rf_attn_check: a failing sequence is reported through *bad and
// gets no result. The split's table entries go to blocks[]. Returns false
// when there is nothing to attend: the block has then written zeros (one
// split) or marked its split empty.
template <int NT>
__device__ bool rf_attn_open(const rf_attn_args &a, int hb, int64_t num_splits, int32_t *blocks, float *part_ml,
                             unsigned long long *bad, rf_attn_job &j) {
    __shared__ int rf_attn_bad, rf_attn_bad_entry;  // bad arguments; a table entry outside the pool
    // Block x: the head group fastest, so that the blocks running at once read
    // every head's share of the same cache rows (one DRAM page, not eight).
    const int64_t D = a.head_dim, Hq = a.num_q_heads, G = Hq / a.num_kv_heads, chunks = (G + hb - 1) / hb;
#ifdef RF_ATTN_QUERY_MAJOR
    const int64_t y = blockIdx.x / a.num_queries;
    j.t = blockIdx.x % a.num_queries;
#else
    const int64_t y = blockIdx.x % (a.num_kv_heads * chunks);
    j.t = blockIdx.x / (a.num_kv_heads * chunks);
#endif
    const int64_t bs = a.block_size, split = blockIdx.y;
    j.g = y / chunks, j.h0 = j.g * G + (y % chunks) * hb;
    j.nh = (int)(G - (y % chunks) * hb < hb ? G - (y % chunks) * hb : hb);
    int64_t first, nq;
    j.s = rf_attn_seq(a, j.t, &first, &nq);
    const int64_t n = a.seq_lens[j.s];
    int64_t len = a.stride;
    const int32_t *table = a.tables + j.s * a.stride;
    if (a.indptr) {
        table = a.tables + a.indptr[j.s];
        len = a.indptr[j.s + 1] - a.indptr[j.s];
    }
    const int64_t ctx = n == 0 ? 0 : n - nq + (j.t - first) + 1;    // positions [0, ctx) are attended
    j.begin = split * a.part, j.end = ctx < j.begin + a.part ? ctx : j.begin + a.part;
    j.b0 = j.begin / bs, j.out_row = (j.t * Hq + j.h0) * D;
    if (threadIdx.x == 0) {
        bool ok = n >= 0 && (n + bs - 1) / bs <= len && (n == 0 || n >= nq) && j.t >= first && j.t < first + nq &&
                  ctx <= num_splits * a.part;
        if (a.indptr) ok = ok && a.indptr[j.s] >= 0 && len >= 0 && a.indptr[j.s + 1] <= a.num_indices;
        rf_attn_bad = !ok, rf_attn_bad_entry = 0;
    }
    __syncthreads();
    if (!rf_attn_bad && j.begin < j.end) {
        for (int64_t b = j.b0 + threadIdx.x; b <= (j.end - 1) / bs; b += NT) {
            const int32_t id = table[b];
            if (id < 0 || id >= a.num_blocks) rf_attn_bad_entry = 1;
            blocks[b - j.b0] = id;
        }
    }
    __syncthreads();
    const bool failed = rf_attn_bad || rf_attn_bad_entry;
    if (failed && threadIdx.x == 0) atomicMin(bad, (unsigned long long)j.s);
    if (!failed && j.begin < j.end) return true;
    if (num_splits == 1) {                      // nothing to attend: zeros, or an empty split
        for (int64_t i = threadIdx.x; i < j.nh * D; i += NT) rf_attn_put(a.out, j.out_row + i, a.q_dt, 0.0f);
    } else if (threadIdx.x < j.nh) {
        const int64_t k = ((j.t * Hq + j.h0 + threadIdx.x) * num_splits + split) * 2;
        part_ml[k] = -INFINITY, part_ml[k + 1] = 0.0f;
    }
    return false;
}

// Sum (or maximum) of v over the 32-lane group, then over the block's groups
// through red (RF_ATTN_GROUPS * HB floats); every thread gets the block's value.
template <int HB, bool MAX> __device__ __forceinline__ void rf_attn_block_reduce(float *v, float *red) {
    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
#pragma unroll
    for (int h = 0; h < HB; h++) {
        for (int o = 16; o > 0; o >>= 1) {
            float w = RF_SHFL_XOR(v[h], o);
            v[h] = MAX ? fmaxf(v[h], w) : v[h] + w;
        }
        if (lane == 0) red[group * HB + h] = v[h];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < HB; h++) {
        v[h] = red[h];
        for (int g = 1; g < RF_ATTN_GROUPS; g++) v[h] = MAX ? fmaxf(v[h], red[g * HB + h]) : v[h] + red[g * HB + h];
    }
    __syncthreads();
}

// Key and value rows each thread loads before it uses them: about
// RF_ATTN_INFLIGHT bytes in flight per thread, half that with 8 heads a block
// (their sums take the registers).
#ifndef RF_ATTN_INFLIGHT
#define RF_ATTN_INFLIGHT 64
#endif
#ifndef RF_ATTN_MIN_BLOCKS
#define RF_ATTN_MIN_BLOCKS 4
#endif
template <int DT, int HB> __host__ __device__ constexpr int rf_attn_unroll() {
    return RF_ATTN_INFLIGHT / 2 / (DT == RF_DT_F32 ? 32 : DT <= RF_DT_BF16 ? 16 : 8) / (HB == 8 ? 2 : 1) > 0
               ? RF_ATTN_INFLIGHT / 2 / (DT == RF_DT_F32 ? 32 : DT <= RF_DT_BF16 ? 16 : 8) / (HB == 8 ? 2 : 1)
               : 1;
}

// Dynamic shared memory: sums [HB][head_dim], red [GROUPS][HB].
//
// One pass (online softmax): each subgroup keeps, for its rows, the running
// maximum m, denominator l and weighted sum of value rows per head, rescaled
// whenever the maximum rises; K and V rows are loaded together, so the loads
// never stop for a softmax between two passes. At the end the subgroups are
// brought to the block's maximum and summed in a fixed order.
template <int DT, int HB>
__device__ void rf_attn_split(const rf_attn_args &a, int L, int64_t num_splits, float *part_acc, float *part_ml,
                              unsigned long long *bad) {
    constexpr int U = rf_attn_unroll<DT, HB>();
    extern __shared__ float rf_attn_smem[];
    float *sums = rf_attn_smem, *red = sums + HB * a.head_dim;
    // (Each kernel instantiates this function once, so these are its own.)
    __shared__ int64_t rows[RF_ATTN_PART];      // byte offset of each position's row in the cache
    __shared__ int32_t blocks[RF_ATTN_PART + 1]; // the split's table entries
    __shared__ float fp8[DT == RF_DT_FP8_E4M3 ? 256 : 1];   // e4m3 values, for fp8 caches
    if constexpr (DT == RF_DT_FP8_E4M3)
        for (int i = threadIdx.x; i < 256; i += RF_ATTN_THREADS) fp8[i] = rf_e4m3_bits_to_f32((uint8_t)i);
    rf_attn_job job;
    if (!rf_attn_open<RF_ATTN_THREADS>(a, HB, num_splits, blocks, part_ml, bad, job)) return;
    const int64_t D = a.head_dim, Hq = a.num_q_heads, g = job.g, h0 = job.h0, t = job.t, bs = a.block_size;
    const int64_t begin = job.begin, end = job.end, b0 = job.b0, out_row = job.out_row;
    const int nh = job.nh;
    const int lane = threadIdx.x % L, sg = threadIdx.x / L, nsg = RF_ATTN_THREADS / L;
    const bool lane_on = lane * 8 < D;
    const int cnt = (int)(end - begin), off0 = (int)(begin - b0 * bs), ibs = (int)bs;
    const int64_t rowb = D * rf_attn_bytes(a.cache_dt), Hkv = a.num_kv_heads;
    for (int i = threadIdx.x; i < cnt; i += RF_ATTN_THREADS)
        rows[i] = ((int64_t)blocks[(off0 + i) / ibs] * bs + (off0 + i) % ibs) * Hkv * rowb;

    float q[HB][8], acc[HB][8], m[HB], l[HB];
#pragma unroll
    for (int h = 0; h < HB; h++) {
        m[h] = -INFINITY, l[h] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            q[h][j] = lane_on && h < nh ? rf_attn_get(a.query, out_row + h * D + lane * 8 + j, a.q_dt) : 0.0f;
            acc[h][j] = 0.0f;
        }
    }
    const float qk_scale = a.scale * a.k_scale;
    const char *kc = (const char *)a.key_cache + (g * D + lane * 8) * rf_attn_bytes(a.cache_dt);
    const char *vc = (const char *)a.value_cache + (g * D + lane * 8) * rf_attn_bytes(a.cache_dt);
    __syncthreads();                            // rows[] is complete
    for (int base = 0; base < cnt; base += nsg * U) {   // uniform: every lane runs the shuffles
        rf_raw8 kraw[U], vraw[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = base + u * nsg + sg;
            if (i < cnt && lane_on) {
                rf_fetch8<DT>(kc + rows[i], kraw[u]);
                rf_fetch8<DT>(vc + rows[i], vraw[u]);
            }
        }
        float sc[U][HB], top[HB];
#pragma unroll
        for (int h = 0; h < HB; h++) top[h] = m[h];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float k[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            const int i = base + u * nsg + sg;
            if (i < cnt && lane_on) rf_unpack8<DT>(kraw[u], k, fp8);
#pragma unroll
            for (int h = 0; h < HB; h++) {
                float d = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; j++) d += q[h][j] * k[j];
                for (int o = L / 2; o > 0; o >>= 1) d += RF_SHFL_XOR(d, o);
                sc[u][h] = i < cnt ? d * qk_scale : -INFINITY;
                top[h] = fmaxf(top[h], sc[u][h]);
            }
        }
#pragma unroll
        for (int h = 0; h < HB; h++) {          // rescale to the new maximum (the first row sets it)
            const float c = top[h] == m[h] ? 1.0f : __expf(m[h] - top[h]);
            m[h] = top[h], l[h] *= c;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[h][j] *= c;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (base + u * nsg + sg >= cnt) break;
            float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (lane_on) rf_unpack8<DT>(vraw[u], v, fp8);
#pragma unroll
            for (int h = 0; h < HB; h++) {
                const float p = __expf(sc[u][h] - m[h]);
                l[h] += p;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[h][j] += p * v[j];
            }
        }
    }

    // The block's maximum per head; each subgroup's share rescaled to it.
    float top[HB], lsum[HB];
#pragma unroll
    for (int h = 0; h < HB; h++) top[h] = m[h];
    rf_attn_block_reduce<HB, true>(top, red);
#pragma unroll
    for (int h = 0; h < HB; h++) {
        const float c = m[h] == -INFINITY ? 0.0f : __expf(m[h] - top[h]);
        lsum[h] = lane == 0 ? l[h] * c : 0.0f;  // l is the same on a subgroup's lanes: count it once
#pragma unroll
        for (int j = 0; j < 8; j++) acc[h][j] *= c;
    }
    rf_attn_block_reduce<HB, false>(lsum, red);
    // Sums: the subgroups of each warp by shuffles, then the warps in order.
    for (int o = L; o < 32; o <<= 1)
#pragma unroll
        for (int h = 0; h < HB; h++)
#pragma unroll
            for (int j = 0; j < 8; j++) acc[h][j] += RF_SHFL_XOR(acc[h][j], o);
    for (int w = 0; w < RF_ATTN_GROUPS; w++) {
        if (threadIdx.x / 32 == w && threadIdx.x % 32 < L && lane_on)
#pragma unroll
            for (int h = 0; h < HB; h++)
                if (h < nh)
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        float *x = &sums[h * D + lane * 8 + j];
                        *x = (w ? *x : 0.0f) + acc[h][j] * a.v_scale;
                    }
        __syncthreads();
    }
#pragma unroll
    for (int h = 0; h < HB; h++)
        if (h < nh)
            for (int64_t d = threadIdx.x; d < D; d += RF_ATTN_THREADS) {
                if (num_splits == 1) {
                    rf_attn_put(a.out, out_row + h * D + d, a.q_dt, sums[h * D + d] / lsum[h]);
                } else {
                    int64_t k = (t * Hq + h0 + h) * num_splits + blockIdx.y;
                    part_acc[k * D + d] = sums[h * D + d];
                    if (d == 0) part_ml[2 * k] = top[h], part_ml[2 * k + 1] = lsum[h];
                }
            }
}

// One kernel per cache dtype (0-4, rf_convert.h) and query heads per block
// (1, 2, 4 or 8), each with its own registers and shared memory:
// rf_paged_attention_<dt>_<hb>. Grid (num_queries * num_kv_heads * ceil(G / hb),
// num_splits), RF_ATTN_THREADS threads, (hb * head_dim + RF_ATTN_GROUPS * hb) * 4
// bytes of dynamic shared memory; L lanes per row.
// *bad (all ones before) receives the smallest failing sequence.
#define RF_ATTN_KERNEL(DT, HB)                                                                                  \
    extern "C" __global__ void __launch_bounds__(RF_ATTN_THREADS, RF_ATTN_MIN_BLOCKS) rf_paged_attention_##DT##_##HB(           \
        rf_attn_args a, int L, int64_t num_splits, float *part_acc, float *part_ml, unsigned long long *bad) { \
        rf_attn_split<DT, HB>(a, L, num_splits, part_acc, part_ml, bad);                                       \
    }
#define RF_ATTN_KERNELS(DT) RF_ATTN_KERNEL(DT, 1) RF_ATTN_KERNEL(DT, 2) RF_ATTN_KERNEL(DT, 4) RF_ATTN_KERNEL(DT, 8)
RF_ATTN_KERNELS(0)
RF_ATTN_KERNELS(1)
RF_ATTN_KERNELS(2)
RF_ATTN_KERNELS(3)
RF_ATTN_KERNELS(4)

// Combine the splits: grid (num_queries, num_q_heads), RF_ATTN_THREADS threads.
extern "C" __global__ void __launch_bounds__(RF_ATTN_THREADS)
rf_paged_attention_reduce(rf_attn_args a, int64_t num_splits, const float *part_acc, const float *part_ml) {
    const int64_t row = (int64_t)blockIdx.x * a.num_q_heads + blockIdx.y, D = a.head_dim;
    const float *ml = part_ml + row * num_splits * 2, *acc = part_acc + row * num_splits * D;
    float m = -INFINITY, l = 0.0f;
    for (int64_t k = 0; k < num_splits; k++)
        if (ml[2 * k + 1] > 0.0f) m = fmaxf(m, ml[2 * k]);
    for (int64_t k = 0; k < num_splits; k++)
        if (ml[2 * k + 1] > 0.0f) l += ml[2 * k + 1] * expf(ml[2 * k] - m);
    for (int64_t d = threadIdx.x; d < D; d += RF_ATTN_THREADS) {
        float o = 0.0f;
        for (int64_t k = 0; k < num_splits; k++)
            if (ml[2 * k + 1] > 0.0f) o += acc[k * D + d] * expf(ml[2 * k] - m);
        rf_attn_put(a.out, row * D + d, a.q_dt, l > 0.0f ? o / l : 0.0f);
    }
}

#include "attention_mma.cuh"
