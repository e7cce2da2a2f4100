/* Host versions of rocmforge's K/V kernels: the host backend's data path and
 * the reference the GPU kernels are tested against. Plain C, no Python.
 * Every function validates all of its indices before writing anything. */
#ifndef ROCMFORGE_HOST_KERNELS_H
#define ROCMFORGE_HOST_KERNELS_H

#include <stdint.h>

/* Element types (RF_DT_*) and their conversions. fp8 e4m3 and int8 caches
 * store x / scale. */
#include "rf_convert.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { RF_K_OK = 0, RF_K_BAD_SLOT = 1, RF_K_BAD_BLOCK = 2, RF_K_BAD_DTYPE = 3 };

/* Write T rows of `row` elements of key and value (type in_dt; row t starts
 * t * key_stride and t * value_stride elements in) into the caches (type
 * cache_dt) at slot_mapping[t] (-1 skips a padding token). Caches hold
 * num_slots rows. *bad receives the offending index on error. */
int rf_host_write_kv(void *key_cache, void *value_cache, const void *key, const void *value,
                     const int64_t *slot_mapping, int64_t T, int64_t row, int64_t key_stride,
                     int64_t value_stride, int64_t num_slots, int in_dt, int cache_dt, float k_scale,
                     float v_scale, int64_t *bad);

/* For each (src, dst) pair, copy block src over block dst in every one of the
 * num_caches caches (K and V of every layer). */
int rf_host_copy_blocks(void *const *caches, int64_t num_caches, const int32_t *pairs,
                        int64_t num_pairs, int64_t block_bytes, int64_t num_blocks, int64_t *bad);

/* Copy the first num_tokens rows of the blocks in table into out, contiguous. */
int rf_host_gather(const void *cache, const int32_t *table, int64_t table_len, int64_t num_tokens,
                   int64_t block_size, int64_t row_bytes, int64_t num_blocks, void *out, int64_t *bad);

/* Swapping: copy blocks ids[0..num_ids) of every cache to out, laid out
 * [num_caches][num_ids][block_bytes] (gather), or back from in (scatter). */
int rf_host_gather_blocks(const void *const *caches, int64_t num_caches, const int32_t *ids, int64_t num_ids,
                          int64_t block_bytes, int64_t num_blocks, void *out, int64_t *bad);
int rf_host_scatter_blocks(void *const *caches, int64_t num_caches, const int32_t *ids, int64_t num_ids,
                           int64_t block_bytes, int64_t num_blocks, const void *in, int64_t *bad);

#ifdef __cplusplus
}
#endif
#endif
