# hip/rf_attention.h: the arguments of paged attention shared by the host
# version and the GPU kernels, for _runtime (launches) and _attention (the API).
from libc.stdint cimport int32_t, int64_t

cdef extern from "rf_attention.h" nogil:
    enum:
        RF_ATTN_THREADS
        RF_ATTN_PART
    ctypedef struct rf_attn_args:
        void* out
        const void* query
        const void* key_cache
        const void* value_cache
        const int32_t* tables
        const int32_t* indptr
        const int32_t* seq_lens
        const int32_t* query_start
        int64_t num_seqs, num_queries, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks
        int64_t stride, num_indices
        int q_dt, cache_dt
        float k_scale, v_scale, scale
        int64_t part
    enum:
        RF_ATTN_OK
        RF_ATTN_BAD_BLOCK
        RF_ATTN_BAD_LEN
        RF_ATTN_BAD_QUERIES
        RF_ATTN_NO_MEMORY
    int rf_attn_check(const rf_attn_args* a, int64_t* bad)
    int rf_host_paged_attention(const rf_attn_args* a, int64_t* bad)
