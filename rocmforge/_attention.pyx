# cython: language_level=3, boundscheck=False, wraparound=False
"""Paged attention over a KvCache, read in place: the arguments checked and
gathered into rf_attn_args (hip/rf_attention.h), then the host version or the
GPU kernels. The public entry points are in rocmforge.attention."""

from libc.math cimport sqrt
from libc.stdint cimport int32_t, int64_t, uint64_t
cimport numpy as cnp
import numpy as np

from rocmforge._dlpack cimport (ArrayInfo, DeviceArray, import_array, is_torch_tensor, DL_CPU, DT_F32, DT_F16,
                                DT_BF16, DT_I32)
from rocmforge._dlpack import NAMES as _DT_NAMES
from rocmforge._attn cimport *
from rocmforge._kvcache cimport KvCache
from rocmforge._runtime cimport RF_RT_RUNTIME, AttentionKernels, DeviceBuffer, check, rt_stream_sync, stream_handle
from rocmforge.errors import ArgumentTypeError, ArgumentValueError, BlockNotFound

cnp.import_array()

_I32_MIN, _I32_MAX = -2**31, 2**31 - 1
_kernels_by_device = {}


cdef bint _on_host(object obj):
    """Whether an index argument is host memory (a list, a numpy array, or a DLPack array on the CPU)."""
    if isinstance(obj, np.ndarray):
        return True
    if is_torch_tensor(obj):
        return obj.is_cpu
    if not hasattr(obj, "__dlpack_device__"):
        return True
    return obj.__dlpack_device__()[0] == DL_CPU


cdef cnp.ndarray _host_index(object obj, int ndim, str what):
    """A host index argument as a C-contiguous int32 numpy array (any integer
    dtype is accepted when its values fit)."""
    try:
        if isinstance(obj, np.ndarray):
            arr = obj
        elif is_torch_tensor(obj):          # a CPU tensor's own view: far cheaper than its DLPack export
            arr = (obj.detach() if obj.requires_grad else obj).numpy()
        else:
            arr = np.from_dlpack(obj) if hasattr(obj, "__dlpack__") else np.asarray(obj)
    except (TypeError, ValueError, BufferError) as exc:
        raise ArgumentTypeError(f"{what}: expected an integer array, got {type(obj).__name__} ({exc})") from None
    if arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{what} must hold integers, got {arr.dtype}")
    if arr.ndim != ndim:
        raise ArgumentValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    if arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        if arr.size and (arr.min() < _I32_MIN or arr.max() > _I32_MAX):
            raise ArgumentValueError(f"{what} holds values outside int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


cdef class _Indices:
    """The index arguments of one call: host copies (int32), or device arrays
    imported through DLPack, with what keeps them alive."""
    cdef list keep
    cdef bint on_device                 # any of them on the GPU
    cdef cnp.ndarray h_tables, h_indptr, h_lens, h_starts
    cdef ArrayInfo tables, indptr, lens, starts
    cdef bint csr, prefill
    cdef int64_t num_seqs, stride

    cdef object _one(self, object obj, int ndim, str what, ArrayInfo* info, KvCache cache, object handle):
        """Import one index argument into info; return its host int32 copy, or None on the GPU."""
        cdef cnp.ndarray arr
        if _on_host(obj):
            arr = _host_index(obj, ndim, what)
            info.ptr = <uint64_t><size_t>cnp.PyArray_DATA(arr)
            info.ndim = arr.ndim
            for i in range(arr.ndim):
                info.shape[i] = arr.shape[i]
            return arr
        self.keep.append(import_array(obj, info, handle))
        if info.dtype != DT_I32 or info.ndim != ndim or not info.contiguous:
            raise ArgumentValueError(f"{what} on the GPU must be a C-contiguous {ndim}-D int32 array")
        cache._check_device(info, what)
        self.on_device = True
        return None

    cdef int load(self, KvCache cache, object block_tables, object seq_lens, object query_start,
                  object handle) except -1:
        self.keep = []
        self.csr = isinstance(block_tables, (tuple, list))
        if self.csr:
            if len(block_tables) not in (2, 3):
                raise ArgumentValueError("CSR block tables are (indptr, indices) or the manager's "
                                         "(indptr, indices, last_page_len)")
            self.h_indptr = self._one(block_tables[0], 1, "indptr", &self.indptr, cache, handle)
            self.h_tables = self._one(block_tables[1], 1, "indices", &self.tables, cache, handle)
            self.num_seqs = self.indptr.shape[0] - 1
            self.stride = 0
            if self.num_seqs < 0:
                raise ArgumentValueError("indptr must hold num_seqs + 1 offsets")
        else:
            self.h_tables = self._one(block_tables, 2, "block_tables", &self.tables, cache, handle)
            self.num_seqs, self.stride = self.tables.shape[0], self.tables.shape[1]
        self.h_lens = self._one(seq_lens, 1, "seq_lens", &self.lens, cache, handle)
        if self.lens.shape[0] != self.num_seqs:
            raise ArgumentValueError(f"seq_lens has {self.lens.shape[0]} entries for {self.num_seqs} tables")
        self.prefill = query_start is not None
        if self.prefill:
            self.h_starts = self._one(query_start, 1, "query_start", &self.starts, cache, handle)
            if self.starts.shape[0] != self.num_seqs + 1:
                raise ArgumentValueError(f"query_start must hold num_seqs + 1 = {self.num_seqs + 1} offsets")
        if self.csr and not self.on_device and self.h_indptr.size:
            if self.h_indptr[0] < 0 or self.h_indptr[self.num_seqs] > self.h_tables.shape[0]:
                raise ArgumentValueError(f"indptr runs outside the {self.h_tables.shape[0]} indices")
        return 0


def _describe(int st, int64_t bad, _Indices idx, int64_t num_blocks):
    """The error for a failed host-side check of sequence `bad`."""
    if st == RF_ATTN_BAD_BLOCK:
        return BlockNotFound(f"the table of sequence {bad} names a block outside [0, {num_blocks})")
    if st == RF_ATTN_BAD_QUERIES:
        return ArgumentValueError("query_start must rise from 0 to the number of query tokens, never falling")
    if st == RF_ATTN_NO_MEMORY:
        return MemoryError("paged attention: no memory for the host version's scratch")
    return ArgumentValueError(f"seq_lens[{bad}] = {idx.h_lens[bad]} is negative, longer than its table holds, "
                              f"or shorter than its query tokens")


cdef AttentionKernels _kernels_for(int device):
    if device not in _kernels_by_device:
        _kernels_by_device[device] = AttentionKernels(device)
    return _kernels_by_device[device]


cdef uint64_t _workspace(KvCache cache, object handle, int64_t nbytes) except? 0:
    """The split results' workspace of a stream: work on one stream is ordered,
    so its calls share one buffer. A larger one is made here when needed
    (outside a graph capture: warm up on the stream you capture on); the older
    ones stay until close(), since a captured graph may still use them. Call
    with the cache's lock held."""
    cdef list bufs = cache._workspaces.setdefault(handle, [])
    cdef DeviceBuffer buf
    if not bufs or <int64_t>(<DeviceBuffer>bufs[len(bufs) - 1]).nbytes < nbytes:
        bufs.append(DeviceBuffer(max(nbytes, 1 << 20), cache._dev))
    buf = bufs[len(bufs) - 1]
    return buf._ptr


cdef int64_t _FILL = 1024      # thread blocks that keep every SM of a large GPU busy
cdef int64_t _MIN_PART = 64    # below this a split's fixed costs outweigh its reads


cdef int64_t _splits(_Indices idx, KvCache cache, object max_seq_len, int64_t per_split, int64_t* part) except -1:
    """Splits per query for the GPU kernels, of *part positions each: enough for
    the longest sequence, bounded by max_seq_len, the host seq_lens, or the
    tables' size. Splits are RF_ATTN_PART long unless fewer than _FILL thread
    blocks (per_split a split) would run: then shorter, down to _MIN_PART, so
    that a small batch still reads through many SMs at once."""
    if max_seq_len is not None:
        bound = max_seq_len.__index__()
    elif idx.h_lens is not None:
        bound = int(idx.h_lens.max()) if idx.h_lens.size else 0
    elif not idx.csr:
        bound = idx.stride * cache._block_size
    else:
        bound = idx.tables.shape[0] * cache._block_size
    part[0] = RF_ATTN_PART
    splits = max(1, -(-bound // part[0]))
    while part[0] > _MIN_PART and per_split * splits < _FILL and bound > part[0]:
        part[0] //= 2
        splits = max(1, -(-bound // part[0]))
    if splits > 65535:
        raise ArgumentValueError(f"sequences of up to {bound} tokens need {splits} splits, more than a grid "
                                 f"holds: pass max_seq_len")
    return splits


cdef const int32_t* _staged(KvCache cache, object host, ArrayInfo* info, int64_t* used, void* stream):
    """A device address for an index argument: its own, or its host copy staged in the scratch buffer."""
    if host is None:
        return <const int32_t*>info.ptr
    return <const int32_t*>cache._stage(<cnp.ndarray>host, used, stream)


def paged_attention(query, KvCache cache, layer, block_tables, seq_lens, query_start=None, scale=None,
                    out=None, stream=None, max_seq_len=None):
    """See rocmforge.attention.paged_decode and paged_prefill."""
    cdef int l = cache._layer(layer)
    cdef ArrayInfo q, o
    cdef rf_attn_args a
    cdef _Indices idx = _Indices()
    cdef int64_t bad = -1, splits = 1, used = 0, part, span = RF_ATTN_PART
    cdef int st = 0, check_st = RF_ATTN_OK
    cdef void* strm = stream_handle(stream)
    cdef uint64_t ws
    cdef AttentionKernels kernels = None
    cdef bint gpu = cache._dev >= 0
    handle = None if strm == NULL else <size_t>strm     # producers take the consumer stream as an int
    keep_q = import_array(query, &q, handle)
    if q.dtype not in (DT_F32, DT_F16, DT_BF16):
        raise ArgumentTypeError("query must be float32, float16 or bfloat16")
    if q.ndim != 3 or q.shape[2] != cache._head_dim or q.shape[1] % cache._heads or q.shape[1] == 0:
        shape = tuple(q.shape[i] for i in range(q.ndim))
        raise ArgumentValueError(f"query must be [num_tokens, num_q_heads, {cache._head_dim}] with num_q_heads "
                                 f"a multiple of the cache's {cache._heads} kv heads, got {shape}")
    if not q.contiguous:
        raise ArgumentValueError("query must be C-contiguous")
    cache._check_device(&q, "query")
    if gpu and (cache._head_dim % 8 or cache._head_dim > 256):
        raise ArgumentValueError(f"the GPU kernels take head_dim a multiple of 8 up to 256, not {cache._head_dim}")
    idx.load(cache, block_tables, seq_lens, query_start, handle)
    if not idx.prefill and q.shape[0] != idx.num_seqs:
        raise ArgumentValueError(f"paged_decode takes one query token per sequence: {q.shape[0]} queries "
                                 f"for {idx.num_seqs} sequences")
    if scale is None:
        scale = 1.0 / sqrt(<double>cache._head_dim)
    elif not (float(scale) == float(scale) and abs(float(scale)) != float("inf")):
        raise ArgumentValueError(f"scale must be finite, got {scale}")
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not hasattr(max_seq_len, "__index__")
                                    or max_seq_len.__index__() < 0):
        raise ArgumentValueError(f"max_seq_len must be an int >= 0, got {max_seq_len!r}")
    if gpu:
        if q.shape[0] * q.shape[1] >= 2 ** 31:
            raise ArgumentValueError(f"the GPU kernels take fewer than 2**31 query rows (tokens x heads), "
                                     f"not {q.shape[0] * q.shape[1]}")
        kernels = _kernels_for(cache._dev)
        # a split's thread blocks: one per query token, kv head and group of query heads
        hb = kernels.heads_per_block(q.dtype, cache._dt, cache._head_dim, cache._num_blocks * cache._block_size,
                                     q.shape[1] // cache._heads)
        splits = _splits(idx, cache, max_seq_len, q.shape[0] * cache._heads * (-(-(q.shape[1] // cache._heads) // hb)),
                         &span)
    shape = (q.shape[0], q.shape[1], q.shape[2])
    if out is None:
        result = DeviceArray(DeviceBuffer(q.shape[0] * q.shape[1] * q.shape[2] * (4 if q.dtype == DT_F32 else 2),
                                          cache._dev), shape, _DT_NAMES[q.dtype])
    else:
        result = out
    keep_o = import_array(result, &o, handle)
    if o.dtype != q.dtype or o.ndim != 3 or (o.shape[0], o.shape[1], o.shape[2]) != shape or not o.contiguous:
        raise ArgumentValueError(f"out must be a C-contiguous {_DT_NAMES[q.dtype]} array of shape {shape}")
    cache._check_device(&o, "out")
    a.out, a.query = <void*>o.ptr, <const void*>q.ptr
    a.tables, a.seq_lens = <const int32_t*>idx.tables.ptr, <const int32_t*>idx.lens.ptr
    a.indptr = <const int32_t*>idx.indptr.ptr if idx.csr else NULL
    a.query_start = <const int32_t*>idx.starts.ptr if idx.prefill else NULL
    a.num_seqs, a.num_queries, a.stride = idx.num_seqs, q.shape[0], idx.stride
    a.num_indices = idx.tables.shape[0] if idx.csr else 0
    a.num_q_heads, a.num_kv_heads, a.head_dim = q.shape[1], cache._heads, cache._head_dim
    a.block_size, a.q_dt, a.cache_dt, a.scale, a.part = cache._block_size, q.dtype, cache._dt, scale, span
    part = q.shape[0] * q.shape[1] * splits
    with cache._lock:
        cache._check_open()
        a.key_cache, a.value_cache = <const void*>cache._addrs[2 * l], <const void*>cache._addrs[2 * l + 1]
        a.num_blocks, a.k_scale, a.v_scale = cache._num_blocks, cache._k_scale[l], cache._v_scale[l]
        if not idx.on_device:                   # every index on the host: checked before anything runs
            check_st = rf_attn_check(&a, &bad)
        if check_st == RF_ATTN_OK:
            cache._apply_pending(strm)         # reads see the copy-on-write copies
        if check_st == RF_ATTN_OK and not gpu:
            with nogil:
                check_st = rf_host_paged_attention(&a, &bad)
        elif check_st == RF_ATTN_OK:
            ws = _workspace(cache, handle, 4 * part * (cache._head_dim + 2))
            staged = [h for h in (idx.h_tables, idx.h_lens, idx.h_indptr, idx.h_starts) if h is not None]
            if staged:                          # host indices go over through the scratch buffer
                cache._reserve_scratch(sum(h.nbytes + 16 for h in staged))
            a.tables = _staged(cache, idx.h_tables, &idx.tables, &used, strm)
            a.seq_lens = _staged(cache, idx.h_lens, &idx.lens, &used, strm)
            if idx.csr:
                a.indptr = _staged(cache, idx.h_indptr, &idx.indptr, &used, strm)
            if idx.prefill:
                a.query_start = _staged(cache, idx.h_starts, &idx.starts, &used, strm)
            if a.tables == NULL or a.seq_lens == NULL or (idx.csr and a.indptr == NULL) or \
                    (idx.prefill and a.query_start == NULL):
                st = RF_RT_RUNTIME
            else:
                st = kernels.paged_attention(&a, splits, ws, ws + 4 * part * cache._head_dim,
                                             cache._bad._ptr + 8 * cache._num_layers, strm)
            if st == 0 and used:                # staged host indices: the scratch is reused after the lock
                st = rt_stream_sync(cache._dev, strm)
    if check_st != RF_ATTN_OK:
        raise _describe(check_st, bad, idx, a.num_blocks)
    check(st, "paged attention")
    del keep_q, keep_o
    return result
