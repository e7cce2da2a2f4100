// rocmforge's K/V kernels: one source for nvcc (CUDA) and hipcc (HIP).
// Memory-bound copies: 16-byte accesses when rows (or blocks) allow, one
// thread block per row (or block pair), consecutive threads on consecutive
// addresses. Host versions with identical results: ../rf_host_kernels.c.
#ifdef __HIPCC__
#include <hip/hip_runtime.h>
#endif
#include <stdint.h>

struct alignas(16) rf_vec16 {
    uint32_t x, y, z, w;
};

// Copy n bytes from src to dst with the block's threads (16 bytes at a time
// when both are 16-byte aligned and n is a multiple of 16).
__device__ __forceinline__ void rf_copy(char *dst, const char *src, int64_t n) {
    if (((uintptr_t)dst | (uintptr_t)src | (uintptr_t)n) % 16 == 0) {
        rf_vec16 *d = (rf_vec16 *)dst;
        const rf_vec16 *s = (const rf_vec16 *)src;
        for (int64_t i = threadIdx.x; i < n / 16; i += blockDim.x) d[i] = s[i];
    } else {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// write_kv, same element type in and out: row t of key/value goes to row
// slot_mapping[t] of the caches; -1 skips a padding token. Slots are checked
// on the host before launch. Grid: one block per token.
extern "C" __global__ void rf_write_kv_rows(char *key_cache, char *value_cache, const char *key,
                                            const char *value, const int64_t *slot_mapping,
                                            int64_t row_bytes) {
    int64_t t = blockIdx.x;
    int64_t s = slot_mapping[t];
    if (s < 0) return;
    rf_copy(key_cache + s * row_bytes, key + t * row_bytes, row_bytes);
    rf_copy(value_cache + s * row_bytes, value + t * row_bytes, row_bytes);
}

// copy_blocks: grid (num_pairs, num_caches); caches is a device array of
// cache base addresses, pairs holds (src, dst) block ids.
extern "C" __global__ void rf_copy_blocks(char *const *caches, const int32_t *pairs,
                                          int64_t block_bytes) {
    char *base = caches[blockIdx.y];
    int64_t src = pairs[2 * blockIdx.x], dst = pairs[2 * blockIdx.x + 1];
    rf_copy(base + dst * block_bytes, base + src * block_bytes, block_bytes);
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
