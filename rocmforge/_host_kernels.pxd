# The host K/V kernels of hip/rf_host_kernels.c, for the extensions that link
# them (_kernels: numpy wrappers; _kvcache: the host backend's data path).
from libc.stdint cimport int32_t, int64_t

cdef extern from "rf_host_kernels.h" nogil:
    enum:
        RF_DT_F32
        RF_DT_F16
        RF_DT_BF16
        RF_DT_FP8_E4M3
        RF_DT_I8
        RF_K_OK
        RF_K_BAD_SLOT
        RF_K_BAD_BLOCK
        RF_K_BAD_DTYPE
    int rf_host_write_kv(void* key_cache, void* value_cache, const void* key, const void* value,
                         const int64_t* slot_mapping, int64_t T, int64_t row, int64_t key_stride,
                         int64_t value_stride, int64_t num_slots, int in_dt, int cache_dt, float k_scale,
                         float v_scale, int64_t* bad)
    int rf_host_copy_blocks(void* const* caches, int64_t num_caches, const int32_t* pairs,
                            int64_t num_pairs, int64_t block_bytes, int64_t num_blocks, int64_t* bad)
    int rf_host_gather(const void* cache, const int32_t* table, int64_t table_len, int64_t num_tokens,
                       int64_t block_size, int64_t row_bytes, int64_t num_blocks, void* out, int64_t* bad)
    int rf_host_gather_blocks(const void* const* caches, int64_t num_caches, const int32_t* ids,
                              int64_t num_ids, int64_t block_bytes, int64_t num_blocks, void* out, int64_t* bad)
    int rf_host_scatter_blocks(void* const* caches, int64_t num_caches, const int32_t* ids, int64_t num_ids,
                               int64_t block_bytes, int64_t num_blocks, const void* src, int64_t* bad)
