# KvCache's C-level layout, for the extensions that read its storage in place
# (_attention): the attributes below, used with the lock held.
cimport cython
from libc.stdint cimport int64_t, uint64_t
from libcpp.vector cimport vector
cimport numpy as cnp

from rocmforge._dlpack cimport ArrayInfo, DeviceArray
from rocmforge._runtime cimport DeviceBuffer, DeviceKernels, DeviceStream


@cython.final
cdef class KvCache:
    cdef readonly object config
    cdef readonly object manager
    cdef readonly str device
    cdef readonly str dtype
    cdef int _dev                       # GPU index, -1 for host memory
    cdef int _dt
    cdef int _num_layers
    cdef int64_t _heads, _head_dim, _row, _itemsize, _block_size, _block_bytes, _num_blocks
    cdef list _buffers                  # K0, V0, K1, V1, ...: one DeviceBuffer per layer and kind
    cdef vector[uint64_t] _addrs        # their addresses
    cdef vector[float] _k_scale, _v_scale   # per layer
    cdef DeviceBuffer _dev_addrs        # GPU: _addrs on the device (copy_blocks, swap)
    cdef DeviceBuffer _scratch          # GPU: host-side indices uploaded for a call
    cdef DeviceBuffer _bad              # GPU: per layer, the first token a device-checked write skipped
    cdef DeviceKernels _kernels
    cdef dict _swapped                  # seq_id -> (host bytes, num_tokens, tokens, salt_key)
    cdef dict _workspaces               # GPU: stream handle -> paged attention workspaces, the newest last
    cdef DeviceBuffer _host             # the host tier: [2 * layers][slots][block bytes] of host memory
    cdef int64_t _host_slots
    cdef object _fanout                 # tensor parallelism: this rank's share of the pending copies
    cdef DeviceStream _stream           # GPU: a stream of the cache's own (made when first needed)
    cdef list _staged                   # GPU: host-tier staging, [device buffer, page-locked ids, event] each
    cdef object _unapplied              # copies taken from the manager that could not start, or None
    cdef bint _issued                   # whether the copies being applied have started reaching the storage
    cdef cython.pymutex _lock
    cdef bint _open

    cdef vector[float] _scales(self, object scale, str name) except *
    cdef int _parse_device(self, object device) except -2
    cdef _check_room(self, int64_t num_blocks)
    cdef _allocate(self, int64_t num_blocks, list old)
    cdef tuple _new_storage(self, int64_t num_blocks)
    cdef _install(self, int64_t num_blocks, tuple storage, list old)
    cdef int _layer(self, object layer) except -1
    cdef DeviceArray _export(self, int i)
    cdef int _check_open(self) except -1
    cdef DeviceStream _own_stream(self)
    cdef uint64_t _stage(self, cnp.ndarray arr, int64_t* used, void* stream) noexcept
    cdef _reserve_scratch(self, int64_t nbytes)
    cdef int _write_rows(self, int l, uint64_t key, uint64_t value, uint64_t slots, int64_t T, int in_dt,
                         int64_t k_stride, int64_t v_stride, void* stream, int64_t* bad) noexcept
    cdef int _check_rows(self, ArrayInfo* a, str what) except -1
    cdef int _check_device(self, ArrayInfo* a, str what) except -1
    cdef _apply_pending(self, void* stream)
    cdef _whole(self, str what)
    cdef _copy_pairs(self, cnp.ndarray pairs, void* stream)
    cdef _move_blocks(self, bint out, cnp.ndarray ids, cnp.ndarray host)


# Swapping for one cache ([cache]) or every rank of a TensorParallelKvCache; call
# with every rank's lock held. swapped: seq_id -> ([per rank K/V], num_tokens, tokens, salt_key).
cdef swap_out_ranks(list ranks, object manager, dict swapped, list ids)
cdef swap_in_ranks(list ranks, object manager, dict swapped, list ids)
cdef drop_swapped_ids(dict swapped, list ids)

# Compaction for one cache ([cache]) or every rank of a TensorParallelKvCache;
# call with every rank's lock held.
cdef compact_ranks(list ranks, object manager, bint shrink)
