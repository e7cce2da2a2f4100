# cython: language_level=3, boundscheck=False, wraparound=False
"""KvCache: a BlockManager plus the K/V storage of every layer, on a GPU or in
host memory, and the data path between them (write, copy-on-write, gather,
swap, compaction) through the precompiled kernels or their host versions."""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset
from libcpp.vector cimport vector
cimport numpy as cnp
import numpy as np

from rocmforge._core cimport BlockManager
from rocmforge._dlpack cimport (ArrayInfo, DeviceArray, import_array, DL_CPU, DL_CUDA, DL_ROCM, DT_F32, DT_F16,
                                DT_BF16, DT_I32, DT_I64)
from rocmforge._dlpack import DTYPES as _ARRAY_DTYPES
from rocmforge._runtime cimport (RF_RT_BAD_DEVICE, RF_RT_NOT_READY, RF_RT_RUNTIME, DeviceBuffer, DeviceEvent,
                                 DeviceKernels, DeviceStream, check, rt_backend, rt_memset, rt_htod,
                                 rt_dtoh, rt_dtod, rt_stream_sync, rt_device_sync, stream_handle)
from rocmforge._runtime import backend_info, load_backend
from rocmforge._ids import repeats, runs, split_waves
from rocmforge._pair_order cimport PAIRS_ORDERED, order_pairs
from rocmforge.config import CacheConfig, format_bytes, host_memory_available, host_tier_blocks
from rocmforge.errors import (ArgumentTypeError, ArgumentValueError, BlockNotFound, DeviceError,
                              InvalidConfiguration, KvCacheError, OutOfBlocks, SequenceExists, SequenceNotFound)

cnp.import_array()

from rocmforge._host_kernels cimport *

STORAGE_DTYPES = ("float32", "float16", "bfloat16", "fp8_e4m3", "int8")
_ROW_DTYPES = {"float32": DT_F32, "float16": DT_F16, "bfloat16": DT_BF16}     # what write_kv takes
_kernels_by_device = {}         # one loaded kernel module per device, for the process


cdef DeviceKernels _kernels_for(int device):
    if device not in _kernels_by_device:
        _kernels_by_device[device] = DeviceKernels(device)
    return _kernels_by_device[device]


cdef int64_t _first_bad(const int64_t* slots, int64_t n, int64_t num_slots) noexcept nogil:
    """Index of the first slot outside [-1, num_slots), or -1."""
    cdef int64_t i
    for i in range(n):
        if slots[i] < -1 or slots[i] >= num_slots:
            return i
    return -1


cdef inline float _inverse(float scale) noexcept nogil:
    """1 / scale in float arithmetic, as the host kernel computes it."""
    cdef float one = 1.0
    return one / scale


def _distinct_ids(seq_ids):
    """Sequence ids as ints, refusing a repeated one."""
    ids = [int(s) for s in seq_ids]
    if len(set(ids)) != len(ids):
        raise ArgumentValueError("seq_ids repeats a sequence")
    return ids


def _order_pairs(pairs, int32_t num_blocks):
    """order_pairs() on int32 pairs [k, 2], for the tests: its status and its output."""
    cdef cnp.ndarray p = np.ascontiguousarray(pairs, dtype=np.int32)
    cdef cnp.ndarray out = np.full_like(p, -1)
    st = order_pairs(<const int32_t*>cnp.PyArray_DATA(p), <int32_t*>cnp.PyArray_DATA(out), p.shape[0], num_blocks)
    return st, out


cdef class KvCache:
    """A paged KV cache: ``manager`` (a BlockManager) hands out blocks; this
    object owns the K and V storage of every layer, shaped [num_blocks,
    block_size, num_kv_heads, head_dim], and moves data in and out of it.

    ``device`` is "auto" (GPU 0 when a GPU backend is loaded, else "cpu"),
    "cpu", "cuda:N" or "hip:N". A context manager: memory is freed once, on
    close() or collection; arrays exported with key_cache()/value_cache()
    keep their memory alive until they are gone. Thread-safe: storage changes
    (compact, grow, close) are serialized with the data path."""

    def __init__(self, config, device="auto", *, k_scale=1.0, v_scale=1.0, host_cache=None, _rank_of=None,
                 **manager_options):
        """``manager_options`` go to BlockManager (evict_sequences,
        enable_prefix_caching, eviction_policy, enable_events, shards). ``k_scale`` and
        ``v_scale`` (a float or one per layer) are the quantization scales of
        fp8_e4m3 and int8 storage: the cache holds x / scale.

        ``host_cache`` adds a host tier for the prefix cache: bytes (an int or a
        string like "16GiB") of host memory that keep the K/V of prefix blocks
        the pool evicts, brought back on a hit (needs enable_prefix_caching;
        the manager's host_cache_blocks is set from it). ``host_cache_blocks=n``
        instead gives the tier's size in blocks.

        ``_rank_of`` is for rocmforge.TensorParallelKvCache alone: (manager,
        fanout), a shared BlockManager (with its host tier) and the function
        that hands this rank its share of the manager's pending copies."""
        if not isinstance(config, CacheConfig):
            raise ArgumentTypeError(f"config must be a rocmforge.config.CacheConfig, got {type(config).__name__}")
        if config.dtype not in STORAGE_DTYPES:
            raise InvalidConfiguration(f"dtype: the kernels store {', '.join(STORAGE_DTYPES)}, not {config.dtype}")
        self._open = False
        self.config = config
        self.dtype = config.dtype
        self._dt = _ARRAY_DTYPES[config.dtype][0]
        self._itemsize = _ARRAY_DTYPES[config.dtype][2].itemsize
        self._num_layers = config.num_layers
        self._heads, self._head_dim = config.num_kv_heads, config.head_dim
        self._row = self._heads * self._head_dim
        self._block_size = config.block_size
        self._block_bytes = self._block_size * self._row * self._itemsize
        self._k_scale = self._scales(k_scale, "k_scale")
        self._v_scale = self._scales(v_scale, "v_scale")
        self._dev = self._parse_device(device)
        self.device = "cpu" if self._dev < 0 else f"{'hip' if rt_backend() == 1 else 'cuda'}:{self._dev}"
        if self._dev >= 0:
            self._kernels = _kernels_for(self._dev)
            self._bad = DeviceBuffer(8 * (self._num_layers + 2), self._dev)
            self._bad.memset(0xFF)
            self._scratch = DeviceBuffer(1 << 16, self._dev)
        self._check_room(config.num_blocks)        # before the manager's metadata, too
        self._fanout = None
        if _rank_of is not None:
            self.manager, self._fanout = _rank_of
        elif host_cache is not None:
            if "host_cache_blocks" in manager_options:
                raise ArgumentValueError("give host_cache (bytes) or host_cache_blocks, not both")
            manager_options["host_cache_blocks"] = host_tier_blocks(host_cache, config.bytes_per_block)
        if _rank_of is None:
            self.manager = BlockManager(config.num_blocks, config.block_size, **manager_options)
        self._host_slots = self.manager.host_cache_blocks
        if self._host_slots:      # page-locked when a GPU copies to and from it
            self._host = DeviceBuffer(self._host_slots * config.bytes_per_block, -1, pinned=self._dev >= 0)
        self._swapped = {}
        self._workspaces = {}
        self._staged = []
        self._unapplied = None
        self._buffers = []
        self._allocate(config.num_blocks, None)
        self._open = True

    cdef vector[float] _scales(self, object scale, str name) except *:
        cdef vector[float] out
        values = [scale] * self._num_layers if isinstance(scale, (int, float)) else list(scale)
        if len(values) != self._num_layers:
            raise ArgumentValueError(f"{name}: one scale per layer ({self._num_layers}), got {len(values)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise ArgumentValueError(f"{name} must hold finite numbers > 0, got {v!r}")
            out.push_back(<float>v)
        return out

    cdef int _parse_device(self, object device) except -2:
        cdef int count
        if not isinstance(device, str):
            raise ArgumentTypeError(f"device must be a string ('auto', 'cpu', 'cuda:N', 'hip:N'), got {device!r}")
        backend, reason = load_backend()
        name, _, index = device.strip().lower().partition(":")
        if name == "auto" and not index:
            return 0 if backend != "host" else -1
        if name == "cpu" and not index:
            return -1
        if name not in ("cuda", "hip") or (index and not index.isdigit()):
            raise ArgumentValueError(f"device must be 'auto', 'cpu', 'cuda:N' or 'hip:N', got {device!r}")
        if backend != name:
            raise DeviceError(f"device {device!r} needs the {name} backend; the {backend} backend is loaded "
                              f"({reason})", RF_RT_BAD_DEVICE)
        count = len(backend_info()["devices"])
        dev = int(index or 0)
        if dev >= count:
            raise DeviceError(f"device {device!r}: only {count} device(s)", RF_RT_BAD_DEVICE)
        return dev

    cdef _check_room(self, int64_t num_blocks):
        """MemoryError, before anything is allocated, when the storage for num_blocks
        blocks exceeds the free memory where it would live: a host allocation past it
        would not fail but be zero-filled until the machine runs out."""
        total = 2 * self._num_layers * num_blocks * self._block_bytes
        if self._dev < 0:
            free, where = host_memory_available(), "host memory"
        else:
            free, where = backend_info()["devices"][self._dev]["free_memory"], f"memory on GPU {self._dev}"
        if free is not None and total > free:
            raise MemoryError(
                f"the KV cache needs {format_bytes(total)} of {where} ({self._num_layers} layers x K and V x "
                f"{num_blocks} blocks of {format_bytes(self._block_bytes)}), and {format_bytes(free)} is free: "
                f"lower num_blocks or memory_budget")

    cdef _allocate(self, int64_t num_blocks, list old):
        """Storage for num_blocks blocks per cache, keeping the leading blocks of old
        (zeros elsewhere), installed once it is complete: raises before changing
        anything. The caller holds the lock (or is __init__)."""
        self._install(num_blocks, self._new_storage(num_blocks), old)

    cdef tuple _new_storage(self, int64_t num_blocks):
        """Buffers for num_blocks blocks per cache and the device table of their
        addresses, neither filled nor installed: raises, changing nothing, when
        memory is short."""
        self._check_room(num_blocks)
        fresh = [DeviceBuffer(num_blocks * self._block_bytes, self._dev) for _ in range(2 * self._num_layers)]
        table = None
        if self._dev >= 0:
            table = DeviceBuffer(8 * len(fresh), self._dev)
            table.copy_from_host(np.array([b.ptr for b in fresh], dtype=np.uint64))
        return fresh, table

    cdef _install(self, int64_t num_blocks, tuple storage, list old):
        """Make _new_storage's buffers the cache's, holding the leading blocks of
        old (zeros past them). The caller holds the lock (or is __init__)."""
        cdef int64_t nbytes = num_blocks * self._block_bytes, keep
        cdef DeviceBuffer buf, prev
        cdef int st = 0, i
        cdef vector[uint64_t] addrs
        fresh, table = storage
        keep = min(nbytes, old[0].nbytes) if old else 0
        for i in range(len(fresh)):
            buf = fresh[i]
            addrs.push_back(buf._ptr)
            if buf.on_host:
                memset(<void*><size_t>(buf._ptr + keep), 0, nbytes - keep)
            elif st == 0:
                st = rt_memset(self._dev, buf._ptr + keep, 0, nbytes - keep, NULL)
        for i in range(len(fresh) if old else 0):
            buf, prev = fresh[i], old[i]
            if buf.on_host:
                memcpy(<void*><size_t>buf._ptr, <const void*><size_t>prev._ptr, keep)
            elif st == 0:
                st = rt_dtod(self._dev, buf._ptr, prev._ptr, keep, NULL)
        if st == 0 and self._dev >= 0:
            st = rt_device_sync(self._dev)
        if st == 0:
            self._buffers, self._addrs, self._dev_addrs, self._num_blocks = fresh, addrs, table, num_blocks
        check(st, "allocating the cache storage")

    # ---- state ------------------------------------------------------------------------------------

    @property
    def closed(self):
        return not self._open

    @property
    def num_layers(self):
        return self._num_layers

    @property
    def num_blocks(self):
        return self._num_blocks

    @property
    def block_size(self):
        return self._block_size

    @property
    def nbytes(self):
        """Bytes of K/V storage held (all layers)."""
        return 2 * self._num_layers * self._num_blocks * self._block_bytes if self._open else 0

    def close(self):
        """Free the storage now (later calls do nothing). Arrays exported earlier
        keep their memory alive until they are collected."""
        cdef int st = 0
        with self._lock:
            if self._stream is not None:    # host-tier copies still under way finish first
                st = rt_stream_sync(self._dev, self._stream.handle)
            self._open = False
            self._staged = []
            self._unapplied = None
            self._buffers, self._dev_addrs, self._scratch, self._bad = [], None, None, None
            self._addrs.clear()
            self._swapped = {}
            self._workspaces = {}
            self._host = None
            self._stream = None
        check(st, "close")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if not self._open else f"{self._num_blocks} blocks"
        return (f"KvCache({self._num_layers} layers x {self._heads} heads x {self._head_dim}, {self.dtype}, "
                f"block_size={self._block_size}, {state}, device={self.device!r})")

    cdef int _layer(self, object layer) except -1:
        cdef object i = layer
        self._check_open()
        if type(layer) is not int:          # the common case skips the protocol lookups
            if isinstance(layer, bool) or not hasattr(layer, "__index__"):
                raise ArgumentTypeError(f"layer must be an int, got {type(layer).__name__}")
            i = layer.__index__()
        if not 0 <= i < self._num_layers:
            raise ArgumentValueError(f"layer {layer} outside [0, {self._num_layers})")
        return i

    def key_cache(self, layer):
        """Layer's key cache as a DeviceArray [num_blocks, block_size, heads, head_dim]
        (zero-copy through DLPack). compact() and grow() replace the storage:
        take the arrays again after them."""
        return self._export(2 * self._layer(layer))

    def value_cache(self, layer):
        """Layer's value cache as a DeviceArray (see key_cache)."""
        return self._export(2 * self._layer(layer) + 1)

    cdef DeviceArray _export(self, int i):
        with self._lock:
            self._check_open()
            return DeviceArray(self._buffers[i], self._cache_shape(), self.dtype)

    cdef int _check_open(self) except -1:
        """Raise if closed. Calls that touch the storage check before they take
        the lock and again under it: close() may have run in between."""
        if not self._open:
            raise ArgumentValueError("the KvCache is closed")
        return 0

    def _cache_shape(self):
        return (self._num_blocks, self._block_size, self._heads, self._head_dim)

    # ---- scratch: host-side indices for GPU kernels ---------------------------------------------------

    cdef uint64_t _stage(self, cnp.ndarray arr, int64_t* used, void* stream) noexcept:
        """Copy a host array into the scratch buffer at *used (16-byte aligned),
        stream-ordered; the caller synchronizes the stream before the lock is
        released, so the next call may reuse the space. Call with the lock held."""
        cdef int64_t at = (used[0] + 15) // 16 * 16, n = arr.nbytes
        cdef int st
        if at + n > <int64_t>self._scratch.nbytes:
            return 0
        st = rt_htod(self._dev, self._scratch._ptr + at, cnp.PyArray_DATA(arr), n, stream)
        if st != 0:
            return 0
        used[0] = at + n
        return self._scratch._ptr + at

    cdef DeviceStream _own_stream(self):
        """The cache's own stream on its GPU (made on first use, destroyed at close()).
        Call with the lock held."""
        if self._stream is None:
            self._stream = DeviceStream(self._dev)
        return self._stream

    cdef _reserve_scratch(self, int64_t nbytes):
        """Grow the scratch buffer to hold nbytes (plus alignment). Call with the lock held."""
        if nbytes + 64 > <int64_t>self._scratch.nbytes:
            self._scratch = DeviceBuffer(max(nbytes + 64, 2 * <int64_t>self._scratch.nbytes), self._dev)

    # ---- the data path ----------------------------------------------------------------------------

    def write_kv(self, layer, key, value, slot_mapping, stream=None):
        """Write T new tokens' key and value ([T, num_kv_heads, head_dim], float32,
        float16 or bfloat16, any DLPack array on the cache's device) at
        slot_mapping (int64 [T]; -1 skips a padding token); key and value must not
        overlap the cache's own storage. Each token's [num_kv_heads, head_dim] must
        be contiguous, but tokens may lie any distance apart that keeps them from
        overlapping: the K and V parts of a fused QKV projection's output
        (``qkv[:, q_size:q_size + kv_size].view(T, heads, dim)``) or one
        tensor-parallel rank's heads (``key[:, first:last]``) go in without a
        copy. Pending copy-on-write copies run first. On a GPU the work is queued
        on ``stream`` (None: the default stream; an int handle or a torch/cupy
        stream).

        A host (numpy) slot_mapping is checked before anything is written (and
        makes a GPU call wait for its stream). A slot_mapping on the GPU is
        checked by the kernel: a bad slot is skipped and the next synchronize()
        raises DeviceError naming it."""
        cdef int l = self._layer(layer)
        cdef ArrayInfo k, v, s
        cdef void* strm = stream_handle(stream)
        cdef int64_t T, bad = -1, used = 0
        cdef uint64_t slots_dev = 0
        cdef int st = 0
        handle = None if strm == NULL else <size_t>strm      # producers take the consumer stream as an int
        keep = (import_array(key, &k, handle), import_array(value, &v, handle),
                import_array(slot_mapping, &s, handle))
        self._check_rows(&k, "key")
        self._check_rows(&v, "value")
        T = k.shape[0]
        if v.dtype != k.dtype or v.shape[0] != T:
            raise ArgumentValueError("key and value must have the same dtype and shape")
        if s.dtype != DT_I64 or s.ndim != 1 or s.shape[0] != T or not s.contiguous:
            raise ArgumentValueError(f"slot_mapping must be a contiguous 1-D int64 array of {T} entries")
        host_slots = s.device_type == DL_CPU
        if not host_slots:
            self._check_device(&s, "slot_mapping")
        elif not isinstance(slot_mapping, np.ndarray):     # e.g. a torch CPU tensor: view its memory
            slot_mapping = cnp.PyArray_SimpleNewFromData(1, &T, cnp.NPY_INT64, <void*><size_t>s.ptr)
        if T == 0:
            return
        if host_slots:
            bad = _first_bad(<const int64_t*><size_t>s.ptr, T, self._num_blocks * self._block_size)
            if bad >= 0:
                raise ArgumentValueError(f"slot_mapping[{bad}] = {slot_mapping[bad]} outside "
                                         f"[-1, {self._num_blocks * self._block_size})")
        with self._lock:
            self._check_open()
            if self._dev >= 0 and host_slots:
                self._reserve_scratch(8 * T)
            self._apply_pending(strm)
            if host_slots:      # checked again: compact() may have shrunk the pool meanwhile
                bad = _first_bad(<const int64_t*><size_t>s.ptr, T, self._num_blocks * self._block_size)
            if bad < 0 and self._dev < 0:
                st = self._write_rows(l, k.ptr, v.ptr, s.ptr, T, k.dtype, k.stride0, v.stride0, strm, &bad)
            elif bad < 0:
                slots_dev = self._stage(<cnp.ndarray>slot_mapping, &used, strm) if host_slots else s.ptr
                st = RF_RT_RUNTIME if slots_dev == 0 else self._write_rows(l, k.ptr, v.ptr, slots_dev, T, k.dtype,
                                                                         k.stride0, v.stride0, strm, &bad)
                if st == 0 and host_slots:
                    st = rt_stream_sync(self._dev, strm)
        if bad >= 0:
            raise ArgumentValueError(f"slot_mapping[{bad}] = {slot_mapping[bad]} outside "
                                     f"[-1, {self._num_blocks * self._block_size})")
        check(st, "write_kv")
        del keep

    def write_kv_raw(self, int layer, uint64_t key, uint64_t value, uint64_t slot_mapping, int64_t num_tokens,
                     str dtype, uint64_t stream=0, int64_t key_stride=0, int64_t value_stride=0):
        """write_kv for engines that hold raw addresses: key and value point at
        num_tokens rows of [num_kv_heads, head_dim] contiguous elements of `dtype`
        ("float32", "float16" or "bfloat16"), a row key_stride (value_stride)
        elements after the one before it (0: num_kv_heads * head_dim, rows packed),
        slot_mapping at num_tokens int64 slots, all on the cache's device (host
        memory on the host backend); stream is the runtime's stream handle (0:
        the default stream). Nothing is parsed or converted: the addresses must
        be valid for those sizes.
        Slots are checked by the kernel: on a GPU a bad one is skipped and the
        next synchronize() raises DeviceError; on the host nothing is written
        and ArgumentValueError is raised."""
        cdef int dt = _ROW_DTYPES.get(dtype, -1)
        cdef int64_t bad = -1
        cdef int st = 0
        if not 0 <= layer < self._num_layers:
            raise ArgumentValueError(f"layer {layer} outside [0, {self._num_layers})")
        if dt < 0:
            raise ArgumentTypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        if num_tokens < 0 or (num_tokens and (key == 0 or value == 0 or slot_mapping == 0)):
            raise ArgumentValueError("num_tokens must be >= 0, with non-null addresses")
        if not (key_stride == 0 or key_stride >= self._row) or not (value_stride == 0 or value_stride >= self._row):
            raise ArgumentValueError(f"key_stride and value_stride must be 0 (rows packed) or at least a row's "
                                     f"{self._row} elements, got {key_stride} and {value_stride}")
        if num_tokens == 0:
            return
        with self._lock:
            self._check_open()
            self._apply_pending(<void*><size_t>stream)
            st = self._write_rows(layer, key, value, slot_mapping, num_tokens, dt, key_stride or self._row,
                                  value_stride or self._row, <void*><size_t>stream, &bad)
        if self._dev < 0 and st == RF_K_BAD_SLOT:
            raise ArgumentValueError(f"slot_mapping[{bad}] outside [-1, {self._num_blocks * self._block_size})")
        check(st, "write_kv_raw")

    cdef int _write_rows(self, int l, uint64_t key, uint64_t value, uint64_t slots, int64_t T, int in_dt,
                         int64_t k_stride, int64_t v_stride, void* stream, int64_t* bad) noexcept:
        """The write itself (row t of key at t * k_stride elements, of value at
        t * v_stride), on the cache's device (slots there too): the host
        kernel (a status, *bad the first bad slot) or the GPU kernel queued on
        stream (bad slots reported by synchronize()). Call with the lock held."""
        if self._dev < 0:
            return rf_host_write_kv(<void*><size_t>self._addrs[2 * l], <void*><size_t>self._addrs[2 * l + 1],
                                    <void*><size_t>key, <void*><size_t>value, <const int64_t*><size_t>slots, T,
                                    self._row, k_stride, v_stride, self._num_blocks * self._block_size, in_dt,
                                    self._dt, self._k_scale[l], self._v_scale[l], bad)
        return self._kernels.write_kv(self._addrs[2 * l], self._addrs[2 * l + 1], key, value, slots, T, self._row,
                                      k_stride, v_stride, self._num_blocks * self._block_size, in_dt, self._dt,
                                      _inverse(self._k_scale[l]), _inverse(self._v_scale[l]),
                                      self._bad._ptr + 8 * l, stream)

    cdef int _check_rows(self, ArrayInfo* a, str what) except -1:
        if a.dtype not in (DT_F32, DT_F16, DT_BF16):
            raise ArgumentTypeError(f"{what} must be float32, float16 or bfloat16")
        if a.ndim != 3 or a.shape[1] != self._heads or a.shape[2] != self._head_dim:
            shape = tuple(a.shape[i] for i in range(a.ndim))
            raise ArgumentValueError(f"{what} must be [T, {self._heads}, {self._head_dim}], got {shape}")
        if not a.rows_contiguous or a.stride0 < self._row:
            raise ArgumentValueError(f"{what}'s rows must each be contiguous and must not overlap (a stride of at "
                                     f"least {self._row} elements between tokens), got {a.stride0}")
        return self._check_device(a, what)

    cdef int _check_device(self, ArrayInfo* a, str what) except -1:
        if self._dev < 0:
            ok = a.device_type == DL_CPU
        else:
            ok = a.device_type == (DL_ROCM if rt_backend() == 1 else DL_CUDA) and a.device_id == self._dev
        if not ok:
            where = {DL_CPU: "cpu", DL_CUDA: "cuda", DL_ROCM: "hip"}.get(a.device_type, "another device type")
            raise ArgumentValueError(f"{what} lives on {where}:{a.device_id}, the cache on {self.device}")
        return 0

    def copy_blocks(self, pairs, stream=None):
        """Copy block src over block dst, for each (src, dst) row of pairs (int32
        [k, 2]), in order, in every layer's K and V. Nothing is copied if any id
        is outside the pool (BlockNotFound). On a GPU, pairs that do not chain
        go in one launch, sorted by source block (the copies in flight then
        read neighbouring blocks); chained pairs go in runs that do not.

        Pairs already on the GPU are applied in one launch, with no host work
        (graph-capturable): they must not chain (no block both read and
        written, none written twice), and they run in the order given, fastest
        sorted by source. The kernel skips a pair naming a block outside the
        pool and the next synchronize() raises DeviceError."""
        cdef ArrayInfo p
        cdef int st = 0
        cdef void* strm = stream_handle(stream)
        self._check_open()
        if self._dev >= 0 and hasattr(pairs, "__dlpack_device__") and not isinstance(pairs, np.ndarray) \
                and pairs.__dlpack_device__()[0] != DL_CPU:
            keep = import_array(pairs, &p, None if strm == NULL else <size_t>strm)
            if p.dtype != DT_I32 or p.ndim != 2 or p.shape[1] != 2 or not p.contiguous:
                raise ArgumentValueError("pairs must be a C-contiguous int32 array of shape (k, 2)")
            self._check_device(&p, "pairs")
            with self._lock:
                self._check_open()
                self._apply_pending(strm)
                st = self._kernels.copy_blocks(self._dev_addrs._ptr, self._addrs.size(), p.ptr, p.shape[0],
                                               self._block_bytes, self._num_blocks,
                                               self._bad._ptr + 8 * (self._num_layers + 1), strm)
            check(st, "copy_blocks")
            del keep
            return
        arr = np.asarray(pairs)
        if arr.dtype != np.int32 or arr.ndim != 2 or arr.shape[1] != 2:
            raise ArgumentValueError("pairs must be int32 of shape (k, 2)")
        with self._lock:
            self._check_open()
            if arr.size and (arr.min() < 0 or arr.max() >= self._num_blocks):
                raise BlockNotFound(f"pairs name a block outside [0, {self._num_blocks})")
            if len(arr):
                self._copy_pairs(arr, strm)

    def apply_pending_copies(self, stream=None):
        """Run the manager's queued copy-on-write copies now (write_kv does it first anyway)."""
        cdef void* strm = stream_handle(stream)
        self._check_open()
        with self._lock:
            self._check_open()
            self._apply_pending(strm)

    cdef _apply_pending(self, void* stream):
        """Take the manager's pending copies and apply them. Call with the lock
        held, so no other call writes a copy's target before the copy lands. A
        tensor-parallel rank applies its own share: every rank sees every copy, in order.
        When they fail before the first reaches the storage (no GPU memory to
        upload them or to stage host-tier copies: that is made ready first),
        they stay with the cache, first in line for its next call, and the
        error is raised."""
        if self._fanout is not None:
            pairs = self._fanout(self)
        elif self._unapplied is None and not (<BlockManager>self.manager).c_has_pending_copies():
            return                      # the common case, without building an empty array
        else:
            pairs = self.manager.take_pending_copies()
        if self._unapplied is not None:
            pairs = self._unapplied if pairs is None or not len(pairs) else np.concatenate([self._unapplied, pairs])
            self._unapplied = None
        if pairs is None or not len(pairs):
            return
        self._issued = False
        try:
            if self._dev >= 0 and pairs.min() < 0:
                # Runs of pool copies and host-tier copies take turns: room for any
                # run (8 bytes a pair, 16 a wave) and for any tier batch before the first.
                self._reserve_scratch(24 * len(pairs))
                ready_staging(self, pairs)
            self._copy_pairs(pairs, stream)
        except BaseException:
            if not self._issued:
                self._unapplied = pairs
            raise

    cdef _whole(self, str what):
        """Refuse a call that changes the shared manager on one rank of a tensor-parallel cache."""
        if self._fanout is not None:
            raise KvCacheError(f"this KvCache is one rank of a TensorParallelKvCache: call the group's {what}()")

    cdef _copy_pairs(self, cnp.ndarray pairs, void* stream):
        """Apply (src, dst) block copies, in order, to every layer's K and V; an
        id -1 - s names slot s of the host tier. Call with the lock held."""
        cdef int64_t bad = -1, used = 0
        cdef uint64_t staged
        cdef int st = 0
        cdef cnp.ndarray wave
        pairs = np.ascontiguousarray(pairs, dtype=np.int32)
        cdef cnp.ndarray ordered = np.empty_like(pairs) if self._dev >= 0 else None
        if ordered is not None and order_pairs(<const int32_t*>cnp.PyArray_DATA(pairs),
                                               <int32_t*>cnp.PyArray_DATA(ordered), pairs.shape[0],
                                               self._num_blocks) == PAIRS_ORDERED:
            waves = [ordered]           # the common case: one launch, the pairs by source
        elif pairs.min() < 0:
            # runs of pool copies and runs of host-tier copies, in order
            host = (pairs < 0).any(axis=1)
            cuts = np.flatnonzero(np.diff(host.astype(np.int8))) + 1
            for run in np.split(pairs, cuts):
                if run[0, 0] < 0 or run[0, 1] < 0:
                    tier_copies(self, run, stream)
                else:
                    self._copy_pairs(run, stream)
            return
        else:
            waves = split_waves(pairs) if self._dev >= 0 else [pairs]
        if self._dev >= 0:
            self._reserve_scratch(pairs.nbytes + 16 * len(waves))
        self._issued = True
        for wave in waves:
            if self._dev < 0:
                st = rf_host_copy_blocks(<void* const*>self._addrs.data(), self._addrs.size(),
                                         <const int32_t*>cnp.PyArray_DATA(wave), wave.shape[0],
                                         self._block_bytes, self._num_blocks, &bad)
            else:
                staged = self._stage(wave, &used, stream)
                st = RF_RT_RUNTIME if staged == 0 else self._kernels.copy_blocks(
                    self._dev_addrs._ptr, self._addrs.size(), staged, wave.shape[0], self._block_bytes,
                    self._num_blocks, self._bad._ptr + 8 * (self._num_layers + 1), stream)
            if st != 0:
                break
        if st == 0 and self._dev >= 0:
            st = rt_stream_sync(self._dev, stream)
        if self._dev < 0 and st != 0:
            raise BlockNotFound(f"copy pair {pairs[bad].tolist()} names a block outside [0, {self._num_blocks})")
        check(st, "copy_blocks")

    def stats(self):
        """The manager's stats() plus the bytes its host-tier copies move
        (blocks x config.bytes_per_block, every layer's K and V)."""
        out = self.manager.stats()
        out["host_bytes_offloaded"] = out["host_offloaded_blocks"] * self.config.bytes_per_block
        out["host_bytes_reloaded"] = out["host_reloaded_blocks"] * self.config.bytes_per_block
        return out

    @property
    def host_cache_blocks(self):
        """Blocks the host tier holds at most (0: none)."""
        return self._host_slots

    def synchronize(self):
        """Wait for the device's queued work; raise DeviceError if a write_kv with a
        device-side slot_mapping met a slot outside the cache (that token was
        skipped), copy_blocks with device-side pairs met a block outside the pool
        (that pair was skipped), or paged attention with device-side indices met a bad sequence
        (a table entry outside the pool, a length beyond its table or split
        count, or queries beyond its length; its output is undefined)."""
        cdef cnp.ndarray words = np.empty(self._num_layers + 2, dtype=np.uint64)
        cdef int st = 0
        cdef DeviceBuffer flags
        self._check_open()
        if self._dev < 0:
            return
        with self._lock:
            self._check_open()
            flags = self._bad           # kept alive here if close() runs meanwhile
        with nogil:
            st = rt_device_sync(self._dev)
            if st == 0:
                st = rt_dtoh(self._dev, cnp.PyArray_DATA(words), flags._ptr, 8 * (self._num_layers + 2), NULL)
            if st == 0:
                st = rt_device_sync(self._dev)
        check(st, "synchronize")
        if (words != np.uint64(2**64 - 1)).any():
            layer = int(np.argmax(words != np.uint64(2**64 - 1)))
            flags.memset(0xFF)
            if layer == self._num_layers + 1:
                raise DeviceError(f"copy_blocks: pairs[{int(words[layer])}] named a block outside "
                                  f"[0, {self._num_blocks}); that pair was not copied", 0)
            if layer == self._num_layers:
                raise DeviceError(f"paged attention: sequence {int(words[layer])} had a bad length, query range "
                                  f"or table entry (outside [0, {self._num_blocks})); its output is undefined", 0)
            raise DeviceError(f"write_kv on layer {layer}: slot_mapping[{int(words[layer])}] was outside "
                              f"[-1, {self._num_blocks * self._block_size}); that token was not written", 0)

    def gather(self, seq_id, layer):
        """A sequence's keys and values of one layer, contiguous: two DeviceArrays
        [num_tokens, heads, head_dim] in the storage dtype (copies). The table is
        read under the lock, so a compaction is entirely before or after; pending
        copies (copy-on-write, host tier) run first."""
        cdef int l = self._layer(layer)
        cdef cnp.ndarray table
        cdef int64_t n, bad = -1, used = 0, i, row_bytes = self._row * self._itemsize
        cdef uint64_t staged
        cdef int st = 0
        cdef DeviceBuffer out
        with self._lock:
            self._check_open()
            self._apply_pending(NULL)
            _, table, last = self.manager.csr_block_tables([seq_id])      # one consistent snapshot
            n = 0 if len(table) == 0 else (len(table) - 1) * self._block_size + int(last[0])
            outs = [DeviceBuffer(n * row_bytes, self._dev) for _ in range(2)]
            if self._dev >= 0:
                self._reserve_scratch(table.nbytes)
            for i in range(2):
                out = outs[i]
                if self._dev < 0:
                    st = rf_host_gather(<void*><size_t>self._addrs[2 * l + i], <const int32_t*>cnp.PyArray_DATA(table),
                                        table.shape[0], n, self._block_size, row_bytes, self._num_blocks,
                                        <void*><size_t>out._ptr, &bad)
                else:
                    staged = self._stage(table, &used, NULL) if i == 0 else staged
                    st = RF_RT_RUNTIME if staged == 0 else self._kernels.gather(
                        out._ptr, self._addrs[2 * l + i], staged, n, self._block_size, row_bytes, NULL)
                if st != 0:
                    break
            if st == 0 and self._dev >= 0:
                st = rt_stream_sync(self._dev, NULL)
        check(st, "gather")
        shape = (n, self._heads, self._head_dim)
        return DeviceArray(outs[0], shape, self.dtype), DeviceArray(outs[1], shape, self.dtype)

    # ---- swapping ---------------------------------------------------------------------------------

    cdef _move_blocks(self, bint out, cnp.ndarray ids, cnp.ndarray host):
        """Copy blocks ids of every cache to host ([2L, len(ids), block_bytes] bytes) or
        back. Call with the lock held."""
        cdef int64_t bad = -1, used = 0, n = ids.shape[0]
        cdef uint64_t staged
        cdef int st = 0
        cdef DeviceBuffer staging = None
        if n == 0:
            return
        if out:
            self._apply_pending(NULL)       # the blocks hold what their copies bring
        if self._dev >= 0:
            staging = DeviceBuffer(host.nbytes, self._dev)
            self._reserve_scratch(ids.nbytes)
        if self._dev < 0 and out:
            st = rf_host_gather_blocks(<const void* const*>self._addrs.data(), self._addrs.size(),
                                       <const int32_t*>cnp.PyArray_DATA(ids), n, self._block_bytes,
                                       self._num_blocks, cnp.PyArray_DATA(host), &bad)
        elif self._dev < 0:
            st = rf_host_scatter_blocks(<void* const*>self._addrs.data(), self._addrs.size(),
                                        <const int32_t*>cnp.PyArray_DATA(ids), n, self._block_bytes,
                                        self._num_blocks, cnp.PyArray_DATA(host), &bad)
        else:
            staged = self._stage(ids, &used, NULL)
            st = RF_RT_RUNTIME if staged == 0 else 0
            if st == 0 and not out:
                st = rt_htod(self._dev, staging._ptr, cnp.PyArray_DATA(host), host.nbytes, NULL)
            if st == 0:
                st = self._kernels.move_blocks(out, staging._ptr, self._dev_addrs._ptr, self._addrs.size(),
                                               staged, n, self._block_bytes, NULL)
            if st == 0 and out:
                st = rt_dtoh(self._dev, cnp.PyArray_DATA(host), staging._ptr, host.nbytes, NULL)
            if st == 0:
                st = rt_stream_sync(self._dev, NULL)
        check(st, "swapping blocks")

    def swap_out(self, seq_ids):
        """Move sequences' K/V to host memory and release their blocks (preemption
        by swapping). All named sequences must exist; nothing changes otherwise."""
        self._check_open()
        self._whole("swap_out")
        ids = _distinct_ids(seq_ids)
        with self._lock:
            swap_out_ranks([self], self.manager, self._swapped, ids)

    def swap_in(self, seq_ids):
        """Bring swapped-out sequences back: fresh blocks (a cached prefix is reused),
        their K/V copied back. All or nothing: OutOfBlocks leaves them swapped out."""
        self._check_open()
        self._whole("swap_in")
        ids = _distinct_ids(seq_ids)
        with self._lock:
            swap_in_ranks([self], self.manager, self._swapped, ids)

    def drop_swapped(self, seq_ids):
        """Forget swapped-out sequences (their host copies are freed)."""
        ids = _distinct_ids(seq_ids)
        with self._lock:
            drop_swapped_ids(self._swapped, ids)

    def swapped_sequences(self):
        """Ids of the sequences swapped out to host memory."""
        with self._lock:
            return sorted(self._swapped)

    def swapped_bytes(self):
        """Host memory held by swapped-out sequences."""
        with self._lock:
            return sum(h.nbytes for entry in self._swapped.values() for h in entry[0])

    # ---- pool size ----------------------------------------------------------------------------------

    def compact(self, shrink=False):
        """Compact the manager (occupied blocks move to the lowest ids) and move
        their K/V accordingly; the cache keeps its size. With ``shrink=True`` it
        also cuts the pool and the storage down to the occupied blocks, giving
        the memory back (grow() adds blocks again). Returns the (old, new) moves.
        All or nothing: the smaller storage is allocated first, and when it
        cannot be, or other threads took blocks meanwhile (OutOfBlocks), nothing
        has moved.

        Serialized with the data path: a write_kv, gather or swap in another
        thread runs entirely before or after it. Block ids and slots taken
        before it are stale after it (remap them with the moves)."""
        self._check_open()
        self._whole("compact")
        with self._lock:
            return compact_ranks([self], self.manager, shrink)

    def grow(self, num_blocks):
        """Enlarge the pool and the storage to num_blocks (new blocks are zeroed)."""
        self._check_open()
        self._whole("grow")
        if isinstance(num_blocks, bool) or not hasattr(num_blocks, "__index__"):
            raise ArgumentTypeError("num_blocks must be an int")
        n = num_blocks.__index__()
        with self._lock:
            self._check_open()
            if n < self._num_blocks:
                raise InvalidConfiguration(f"grow to {n} < num_blocks={self._num_blocks}: use compact()")
            self._allocate(n, self._buffers)
            self.manager.grow(n)


include "_compact.pxi"
include "_swap.pxi"
include "_tier_copies.pxi"
