# The runtime layer's C-level interface for rocmforge's other extensions
# (_kvcache cimports it): device memory and raw kernel launches.
from libc.stdint cimport int64_t, uint64_t

from rocmforge._attn cimport rf_attn_args, RF_ATTN_THREADS, RF_ATTN_PART


# rf_runtime.h's status codes, for every extension that reads a status.
cdef extern from "rf_runtime.h" nogil:
    enum:
        RF_RT_OK
        RF_RT_NO_RUNTIME
        RF_RT_MISSING_SYMBOL
        RF_RT_NO_DEVICE
        RF_RT_RUNTIME
        RF_RT_BAD_DEVICE
        RF_RT_NOT_LOADED
        RF_RT_NOT_READY


cdef int check(int status, str what) except -1


cdef class DeviceBuffer:
    cdef readonly size_t nbytes
    cdef readonly int device            # -1: host memory
    cdef readonly bint on_host
    cdef readonly bint pinned           # page-locked host memory from the GPU runtime
    cdef uint64_t _ptr
    cdef bint _open
    cdef uint64_t _live(self) except? 0
    cdef int _release(self) noexcept


# A stream of rocmforge's own (non-blocking) and an event; each destroyed with its object.
cdef class DeviceStream:
    cdef void* handle
    cdef readonly int device


cdef class DeviceEvent:
    cdef void* handle
    cdef readonly int device
    # Statuses: record after the work queued on stream so far; make stream wait
    # (on the device) for that work; RF_RT_OK once it is done, RF_RT_NOT_READY before.
    cdef int record(self, void* stream) noexcept nogil
    cdef int wait(self, void* stream) noexcept nogil
    cdef int query(self) noexcept nogil
    cdef int synchronize(self) noexcept nogil     # the host waits for that work


cdef class DeviceKernels:
    cdef void* _module
    cdef void* _write
    cdef void* _copy
    cdef void* _gather
    cdef void* _to_staging
    cdef void* _from_staging
    cdef void* _between
    cdef readonly int device
    cdef int _launch(self, void* fn, unsigned gx, unsigned gy, unsigned threads, void** params,
                     void* stream, unsigned threads_y=*) noexcept nogil
    # Raw launches on `stream` (NULL: the default stream), asynchronous;
    # every pointer is a device address and every index was checked by the
    # caller (write_kv also checks slots on the device; its strides count
    # elements from one token's row to the next). Return a status.
    cdef int write_kv(self, uint64_t key_cache, uint64_t value_cache, uint64_t key, uint64_t value,
                      uint64_t slots, int64_t T, int64_t row, int64_t k_stride, int64_t v_stride,
                      int64_t num_slots, int in_dt, int cache_dt, float inv_k, float inv_v, uint64_t bad,
                      void* stream) noexcept nogil
    cdef int copy_blocks(self, uint64_t cache_ptrs, int64_t num_caches, uint64_t pairs, int64_t num_pairs,
                         int64_t block_bytes, int64_t num_blocks, uint64_t bad, void* stream) noexcept nogil
    # Blocks of one cache over blocks of another ((src, dst) pairs), every cache
    # (K and V of each layer): src_ptrs may name a peer GPU's memory it can reach.
    cdef int copy_between(self, uint64_t dst_ptrs, uint64_t src_ptrs, int64_t num_caches, uint64_t pairs,
                          int64_t num_pairs, int64_t block_bytes, void* stream) noexcept nogil
    cdef int gather(self, uint64_t out, uint64_t cache, uint64_t table, int64_t num_tokens,
                    int64_t block_size, int64_t row_bytes, void* stream) noexcept nogil
    # Blocks ids of every cache to or from staging: cache by cache ([cache][id][bytes],
    # the swap layout) or, by_block, block by block ([id][cache][bytes], host-tier slots).
    cdef int move_blocks(self, bint to_staging, uint64_t staging, uint64_t cache_ptrs, int64_t num_caches,
                         uint64_t ids, int64_t num_ids, int64_t block_bytes, void* stream,
                         bint by_block=*) noexcept nogil



cdef class AttentionKernels:
    cdef void* _module
    cdef void* _split[20]      # [4 * cache dtype + log2(query heads per block)]
    cdef void* _reduce
    cdef void* _mma[6]         # [3 * (dtype - float16) + log2(head_dim / 64)], NULL where the image lacks it
    cdef readonly int device
    cdef void* mma_kernel(self, int q_dt, int cache_dt, int64_t head_dim, int64_t slots) noexcept nogil
    cdef int heads_per_block(self, int q_dt, int cache_dt, int64_t head_dim, int64_t slots,
                             int64_t group) noexcept nogil
    # Queue paged attention on `stream`: the split kernel, then (num_splits > 1)
    # the reduction. a's pointers are device addresses; part_acc and part_ml hold
    # num_queries * num_q_heads * num_splits * (head_dim, 2) floats; bad is the
    # device word that receives the smallest failing sequence. Returns a status.
    cdef int paged_attention(self, rf_attn_args* a, int64_t num_splits, uint64_t part_acc, uint64_t part_ml,
                             uint64_t bad, void* stream) noexcept nogil


# A stream argument (None: the default stream; an int handle; a torch or cupy
# stream object) as the runtime's handle.
cdef void* stream_handle(object stream) except? NULL


# Thin stream-ordered wrappers of hip/rf_runtime.c for other extensions (the C
# layer's state lives in this module only). A status comes back, never raised.
cdef int rt_backend() noexcept nogil
cdef int rt_memset(int dev, uint64_t ptr, unsigned char value, size_t nbytes, void* stream) noexcept nogil
cdef int rt_htod(int dev, uint64_t dst, const void* src, size_t nbytes, void* stream) noexcept nogil
cdef int rt_dtoh(int dev, void* dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil
cdef int rt_dtod(int dev, uint64_t dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil
cdef int rt_stream_sync(int dev, void* stream) noexcept nogil
cdef int rt_device_sync(int dev) noexcept nogil
# Peer copies (dst on dst_dev from src on src_dev, the same device too), queued
# on a stream of dst_dev; and direct access from dev to peer's memory where the
# hardware allows (*enabled says whether it does).
cdef int rt_copy_peer(int dst_dev, uint64_t dst, int src_dev, uint64_t src, size_t nbytes,
                      void* stream) noexcept nogil
cdef int rt_enable_peer(int dev, int peer, int* enabled) noexcept nogil
