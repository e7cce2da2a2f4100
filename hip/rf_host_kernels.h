/* Host versions of rocmforge's K/V kernels: the host backend's data path and
 * the reference the GPU kernels are tested against. Plain C, no Python.
 * Every function validates all of its indices before writing anything. */
#ifndef ROCMFORGE_HOST_KERNELS_H
#define ROCMFORGE_HOST_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of inputs and caches. fp8 is OCP e4m3 ("e4m3fn": no
 * infinities, largest 448), stored saturating; int8 is symmetric in
 * [-127, 127]. Both quantize x / scale with round-to-nearest-even. */
enum { RF_DT_F32 = 0, RF_DT_F16 = 1, RF_DT_BF16 = 2, RF_DT_FP8_E4M3 = 3, RF_DT_I8 = 4 };

enum { RF_K_OK = 0, RF_K_BAD_SLOT = 1, RF_K_BAD_BLOCK = 2, RF_K_BAD_DTYPE = 3 };

/* Write T rows of `row` elements of key and value (type in_dt) into the
 * caches (type cache_dt) at slot_mapping[t] (-1 skips a padding token).
 * Caches hold num_slots rows. *bad receives the offending index on error. */
int rf_host_write_kv(void *key_cache, void *value_cache, const void *key, const void *value,
                     const int64_t *slot_mapping, int64_t T, int64_t row, int64_t num_slots,
                     int in_dt, int cache_dt, float k_scale, float v_scale, int64_t *bad);

/* For each (src, dst) pair, copy block src over block dst in every one of the
 * num_caches caches (K and V of every layer). */
int rf_host_copy_blocks(void *const *caches, int64_t num_caches, const int32_t *pairs,
                        int64_t num_pairs, int64_t block_bytes, int64_t num_blocks, int64_t *bad);

/* Copy the first num_tokens rows of the blocks in table into out, contiguous. */
int rf_host_gather(const void *cache, const int32_t *table, int64_t table_len, int64_t num_tokens,
                   int64_t block_size, int64_t row_bytes, int64_t num_blocks, void *out, int64_t *bad);

/* Element conversions (exposed for tests). */
uint8_t rf_f32_to_e4m3(float x);
float rf_e4m3_to_f32(uint8_t v);
uint16_t rf_f32_to_bf16(float x);

#ifdef __cplusplus
}
#endif
#endif
