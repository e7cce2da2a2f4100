# cython: language_level=3, boundscheck=False, wraparound=False
"""The GPU runtime as Python sees it: which backend is in use, and device memory.

A thin wrapper per C call of hip/rf_runtime.c (status codes in, exceptions
out, the GIL released only around copies). With no GPU runtime, or with
ROCMFORGE_BACKEND=host, the host backend serves the same API from host memory.
"""

import os

from libc.stdint cimport int32_t, int64_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset, memcpy
cimport numpy as cnp
from rocmforge._host_kernels cimport RF_DT_F16, RF_DT_BF16
import numpy as np

from rocmforge.errors import ArgumentTypeError, ArgumentValueError, DeviceError, InvalidConfiguration

cnp.import_array()

cdef extern from "rf_runtime.h" nogil:
    ctypedef enum rf_backend:
        RF_BACKEND_HOST
        RF_BACKEND_HIP
        RF_BACKEND_CUDA
    int rf_rt_load(int want, char* msg, size_t cap)
    rf_backend rf_rt_backend()
    int rf_rt_device_count(int* count)
    int rf_rt_device_info(int dev, char* name, size_t name_cap, char* arch, size_t arch_cap,
                          size_t* total_bytes, size_t* free_bytes)
    int rf_rt_malloc(int dev, size_t nbytes, uint64_t* ptr)
    int rf_rt_free(int dev, uint64_t ptr)
    int rf_rt_host_alloc(int dev, size_t nbytes, void** ptr)
    int rf_rt_host_free(int dev, void* ptr)
    int rf_rt_memset(int dev, uint64_t ptr, unsigned char value, size_t nbytes)
    int rf_rt_copy_htod(int dev, uint64_t dst, const void* src, size_t nbytes)
    int rf_rt_copy_dtoh(int dev, void* dst, uint64_t src, size_t nbytes)
    int rf_rt_copy_dtod(int dev, uint64_t dst, uint64_t src, size_t nbytes)
    int rf_rt_synchronize(int dev)
    int rf_rt_memset_async(int dev, uint64_t ptr, unsigned char value, size_t nbytes, void* stream)
    int rf_rt_copy_htod_async(int dev, uint64_t dst, const void* src, size_t nbytes, void* stream)
    int rf_rt_copy_dtoh_async(int dev, void* dst, uint64_t src, size_t nbytes, void* stream)
    int rf_rt_copy_dtod_async(int dev, uint64_t dst, uint64_t src, size_t nbytes, void* stream)
    int rf_rt_stream_synchronize(int dev, void* stream)
    int rf_rt_copy_peer_async(int dst_dev, uint64_t dst, int src_dev, uint64_t src, size_t nbytes, void* stream)
    int rf_rt_stream_create(int dev, void** stream)
    int rf_rt_stream_destroy(int dev, void* stream)
    int rf_rt_event_create(int dev, void** event)
    int rf_rt_event_destroy(int dev, void* event)
    int rf_rt_event_record(int dev, void* event, void* stream)
    int rf_rt_stream_wait(int dev, void* stream, void* event)
    int rf_rt_event_query(int dev, void* event)
    int rf_rt_event_synchronize(int dev, void* event)
    int rf_rt_enable_peer(int dev, int peer, int* enabled)
    int rf_rt_last_error(char* msg, size_t cap)
    int rf_rt_module_load(int dev, const void* image, void** module)
    int rf_rt_module_unload(int dev, void* module)
    int rf_rt_function(int dev, void* module, const char* name, void** fn)
    int rf_rt_launch(int dev, void* fn, const unsigned* grid, const unsigned* block, unsigned shared_bytes,
                     void** params,
                     void* stream)

_BACKENDS = {"auto": -1, "hip": RF_BACKEND_HIP, "cuda": RF_BACKEND_CUDA, "host": RF_BACKEND_HOST}
_NAMES = {RF_BACKEND_HOST: "host", RF_BACKEND_HIP: "hip", RF_BACKEND_CUDA: "cuda"}
_STATUS = {RF_RT_NO_RUNTIME: "no GPU runtime", RF_RT_MISSING_SYMBOL: "runtime lacks a symbol",
           RF_RT_NO_DEVICE: "no device", RF_RT_BAD_DEVICE: "no such device",
           RF_RT_NOT_LOADED: "no GPU runtime is loaded (host backend)"}
_reason = None


cdef int check(int status, str what) except -1:
    """Raise DeviceError for a non-zero status (with the runtime's own message)."""
    cdef char msg[256]
    cdef int code
    if status == RF_RT_OK:
        return 0
    if status == RF_RT_RUNTIME:
        code = rf_rt_last_error(msg, sizeof(msg))
        raise DeviceError(f"{what}: {msg.decode('utf-8', 'replace')}", status, code)
    raise DeviceError(f"{what}: {_STATUS.get(status, f'status {status}')}", status)


def load_backend():
    """Pick the backend once per process: ROCMFORGE_BACKEND=hip|cuda|host|auto
    (default auto: HIP, else CUDA, else host). Returns (name, reason)."""
    global _reason
    cdef char msg[512]
    cdef int want
    if _reason is None:
        choice = os.environ.get("ROCMFORGE_BACKEND", "auto").strip().lower() or "auto"
        if choice not in _BACKENDS:
            raise InvalidConfiguration(
                f"ROCMFORGE_BACKEND must be one of {', '.join(_BACKENDS)}, got {choice!r}")
        want = _BACKENDS[choice]
        with nogil:
            rf_rt_load(want, msg, sizeof(msg))
        _reason = msg.decode("utf-8", "replace")
    return _NAMES[rf_rt_backend()], _reason


def backend_info():
    """The backend in use, why it was chosen, and each device's name, arch and memory."""
    name, reason = load_backend()
    cdef int count = 0, dev
    cdef char dname[256]
    cdef char arch[32]
    cdef size_t total = 0, free_bytes = 0
    rf_rt_device_count(&count)
    devices = []
    for dev in range(count):
        check(rf_rt_device_info(dev, dname, sizeof(dname), arch, sizeof(arch), &total, &free_bytes),
              f"querying device {dev}")
        devices.append({"index": dev, "name": dname.decode("utf-8", "replace"),
                        "arch": arch.decode("ascii", "replace"),
                        "total_memory": total, "free_memory": free_bytes})
    return {"backend": name, "reason": reason, "devices": devices}


# Census of the DeviceBuffers that own memory, per place: slot 0 is host memory,
# slot d + 1 GPU d (the last slot also takes any GPU past it). Updated with the GIL.
cdef enum:
    CENSUS_SLOTS = 65
cdef int64_t _census_count[CENSUS_SLOTS]
cdef int64_t _census_bytes[CENSUS_SLOTS]


cdef inline int _census_slot(int device) noexcept:
    return min(device + 1, CENSUS_SLOTS - 1)


def live_buffers():
    """DeviceBuffers that still own memory (KvCache storage, gather results, staging),
    per device: {device: (count, bytes)}, device -1 being host memory. A leak check:
    after gc.collect(), what your code no longer references should be gone."""
    out = {}
    for slot in range(CENSUS_SLOTS):
        if _census_count[slot]:
            out[slot - 1] = (_census_count[slot], _census_bytes[slot])
    return out


cdef class DeviceBuffer:
    """``nbytes`` of memory on GPU ``device``, or of host memory for device -1.

    device=None picks GPU 0 when a GPU backend is loaded, else host memory.
    ``pinned=True`` (host memory, a GPU backend needed) allocates page-locked
    memory through the runtime, which GPU copies read and write asynchronously.
    Owns its memory and frees it exactly once: on close(), on leaving a with
    block, or when collected. ``ptr`` is the address (an int)."""

    def __cinit__(self, nbytes, device=None, *, pinned=False):
        cdef int count = 0
        cdef uint64_t ptr = 0
        cdef void* host = NULL
        cdef int dev
        self._open = False
        self.pinned = False
        if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
            raise ArgumentTypeError(f"nbytes must be an integer, got {type(nbytes).__name__}")
        n = nbytes.__index__()
        if n < 0 or n > (1 << 62):
            raise ArgumentValueError(f"nbytes must be in [0, 2**62], got {n}")
        load_backend()
        rf_rt_device_count(&count)
        if device is None:
            dev = 0 if count else -1
        elif isinstance(device, bool) or not hasattr(device, "__index__"):
            raise ArgumentTypeError(f"device must be an int or None, got {type(device).__name__}")
        else:
            dev = max(-2, min(device.__index__(), 1 << 20))
        if not -1 <= dev < count:
            where = (f"a GPU in [0, {count})" if count else
                     f"no GPU is available ({load_backend()[1]}), so only host memory")
            raise DeviceError(f"device {device} out of range: -1 is host memory (device=None picks GPU 0 "
                              f"when there is one, else the host), or {where}", RF_RT_BAD_DEVICE)
        if pinned and (dev >= 0 or not count):
            raise ArgumentValueError("pinned memory is host memory (device -1) and needs a GPU backend, "
                                     f"got device {dev} with {count} GPU(s)")
        self.nbytes = n
        self.device = dev
        self.on_host = dev < 0
        if pinned:
            check(rf_rt_host_alloc(0, n if n else 1, &host), f"allocating {n} bytes of pinned host memory")
            ptr = <uint64_t><uintptr_t>host
            self.pinned = True
        elif self.on_host:
            ptr = <uint64_t><uintptr_t>malloc(n if n else 1)
            if ptr == 0:
                raise MemoryError(f"cannot allocate {n} bytes of host memory")
        elif n:
            check(rf_rt_malloc(dev, n, &ptr), f"allocating {n} bytes on device {dev}")
        self._ptr = ptr
        self._open = True
        _census_count[_census_slot(dev)] += 1
        _census_bytes[_census_slot(dev)] += n

    cdef uint64_t _live(self) except? 0:
        if not self._open:
            raise ArgumentValueError("the buffer is closed")
        return self._ptr

    @property
    def ptr(self):
        return self._live()

    @property
    def closed(self):
        return not self._open

    cdef int _release(self) noexcept:
        """Free the memory if still owned (once); the runtime's status."""
        cdef uint64_t ptr = self._ptr
        if not self._open:
            return RF_RT_OK
        self._open = False
        self._ptr = 0
        _census_count[_census_slot(self.device)] -= 1
        _census_bytes[_census_slot(self.device)] -= self.nbytes
        if self.pinned:
            return rf_rt_host_free(0, <void*><uintptr_t>ptr)
        if self.on_host:
            free(<void*><uintptr_t>ptr)
            return RF_RT_OK
        return rf_rt_free(self.device, ptr) if ptr else RF_RT_OK

    def close(self):
        """Free the memory now (later calls do nothing)."""
        check(self._release(), "freeing device memory")

    def __dealloc__(self):
        self._release()     # a destructor cannot raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def memset(self, int value):
        """Set every byte to value (0-255)."""
        cdef uint64_t ptr = self._live()
        if not 0 <= value <= 255:
            raise ArgumentValueError(f"value must be a byte, got {value}")
        if self.on_host:
            memset(<void*><uintptr_t>ptr, value, self.nbytes)
        elif self.nbytes:
            check(rf_rt_memset(self.device, ptr, <unsigned char>value, self.nbytes), "memset")

    def copy_from_host(self, data):
        """Copy a C-contiguous numpy array (or bytes) of at most nbytes into the buffer's start."""
        cdef uint64_t ptr = self._live()
        cdef cnp.ndarray arr = _contiguous(data)
        cdef size_t n = arr.nbytes
        cdef const void* src = cnp.PyArray_DATA(arr)
        cdef int st = RF_RT_OK
        if n > self.nbytes:
            raise ArgumentValueError(f"{n} bytes do not fit in a {self.nbytes}-byte buffer")
        if self.on_host:
            memcpy(<void*><uintptr_t>ptr, src, n)
        elif n:
            with nogil:
                st = rf_rt_copy_htod(self.device, ptr, src, n)
            check(st, "host-to-device copy")

    def to_host(self):
        """The buffer's bytes as a new uint8 numpy array."""
        cdef uint64_t ptr = self._live()
        cdef cnp.ndarray out = np.empty(self.nbytes, dtype=np.uint8)
        cdef void* dst = cnp.PyArray_DATA(out)
        cdef int st = RF_RT_OK
        if self.on_host:
            memcpy(dst, <void*><uintptr_t>ptr, self.nbytes)
        elif self.nbytes:
            with nogil:
                st = rf_rt_copy_dtoh(self.device, dst, ptr, self.nbytes)
            check(st, "device-to-host copy")
        return out

    def copy_from(self, DeviceBuffer other not None):
        """Copy all of other (at most nbytes, same device) into this buffer's start."""
        cdef uint64_t dst = self._live(), src = other._live()
        cdef int st = RF_RT_OK
        if other.nbytes > self.nbytes:
            raise ArgumentValueError(f"{other.nbytes} bytes do not fit in a {self.nbytes}-byte buffer")
        if other.device != self.device or other.on_host != self.on_host:
            raise ArgumentValueError("both buffers must live on the same device")
        if self.on_host:
            memcpy(<void*><uintptr_t>dst, <void*><uintptr_t>src, other.nbytes)
        elif other.nbytes:
            with nogil:
                st = rf_rt_copy_dtod(self.device, dst, src, other.nbytes)
            check(st, "device-to-device copy")

    def synchronize(self):
        """Wait for all work on the buffer's device."""
        if not self.on_host:
            check(rf_rt_synchronize(self.device), "synchronize")

    def __repr__(self):
        where = "host" if self.on_host else f"device {self.device}"
        state = "closed" if not self._open else f"0x{self._ptr:x}"
        return f"DeviceBuffer({self.nbytes} bytes on {where}, {state})"


cdef cnp.ndarray _contiguous(object data):
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise ArgumentTypeError(f"expected a numpy array or bytes, got {type(data).__name__}")
    if not data.flags.c_contiguous:
        raise ArgumentValueError("the array must be C-contiguous (use np.ascontiguousarray)")
    return <cnp.ndarray>data


KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
_IMAGES = {RF_BACKEND_CUDA: "fatbin", RF_BACKEND_HIP: "hsaco"}      # file suffix per backend
_KERNELS = (b"rf_write_kv", b"rf_copy_blocks", b"rf_gather_rows", b"rf_gather_blocks", b"rf_scatter_blocks",
            b"rf_copy_between")
# One split kernel per cache dtype and query heads per block (1, 2, 4, 8), then the reduction.
_ATTENTION_KERNELS = tuple(f"rf_paged_attention_{dt}_{hb}".encode() for dt in range(5) for hb in (1, 2, 4, 8)) \
    + (b"rf_paged_attention_reduce",)
# The tensor-core kernels (float16, bfloat16 by head_dim 64, 128, 256): only CUDA images for compute capability
# 8.0 and newer have them, so they are looked up, not required.
_ATTENTION_MMA_KERNELS = tuple(f"rf_paged_attention_mma_{dt}_{d}".encode() for dt in (1, 2) for d in (64, 128, 256))


cdef class DeviceStream:
    """A stream of rocmforge's own on one GPU, non-blocking (events order it
    against other streams); destroyed with the object."""

    def __cinit__(self, int device):
        self.device = device
        check(rf_rt_stream_create(device, &self.handle), "creating a stream")

    def __dealloc__(self):
        if self.handle != NULL:
            rf_rt_stream_destroy(self.device, self.handle)


cdef class DeviceEvent:
    """An event (no timing) on one GPU; destroyed with the object."""

    def __cinit__(self, int device):
        self.device = device
        check(rf_rt_event_create(device, &self.handle), "creating an event")

    def __dealloc__(self):
        if self.handle != NULL:
            rf_rt_event_destroy(self.device, self.handle)

    cdef int record(self, void* stream) noexcept nogil:
        return rf_rt_event_record(self.device, self.handle, stream)

    cdef int wait(self, void* stream) noexcept nogil:
        return rf_rt_stream_wait(self.device, stream, self.handle)

    cdef int query(self) noexcept nogil:
        return rf_rt_event_query(self.device, self.handle)

    cdef int synchronize(self) noexcept nogil:
        return rf_rt_event_synchronize(self.device, self.handle)


cdef unsigned THREADS = 256
cdef unsigned COPY_THREADS = 512          # a block copy: a 32 KiB block in one round of four pieces


cdef inline unsigned _threads(int64_t work, unsigned limit=THREADS) noexcept nogil:
    """Threads per block for `work` parallel items: a multiple of 32, at most limit."""
    return <unsigned>min(<int64_t>limit, max(<int64_t>32, (work + 31) // 32 * 32))


cdef inline unsigned _copy_threads(int64_t nbytes) noexcept nogil:
    """Threads per block for rf_copy of nbytes: four 16-byte pieces a thread, at most COPY_THREADS."""
    return _threads(nbytes // 64, COPY_THREADS)


cdef inline int64_t _dt_bytes(int dt) noexcept nogil:
    return 4 if dt == 0 else (2 if dt <= 2 else 1)


cdef int _load_module(int device, str name, bytes image, void** module, tuple kernels, void*** fns) except -1:
    """Load the packaged code object `name` (hip/kernels/<name>.cu) for the loaded
    backend on `device`, or `image` (the bytes of another build), and find its kernels."""
    cdef int count = 0
    cdef const char* data
    load_backend()
    backend = rf_rt_backend()
    if backend == RF_BACKEND_HOST:
        raise DeviceError("GPU kernels need a GPU backend (the host backend uses the host kernels)",
                          RF_RT_NOT_LOADED)
    rf_rt_device_count(&count)
    if not 0 <= device < count:
        raise DeviceError(f"device {device} out of range [0, {count})", RF_RT_BAD_DEVICE)
    path = os.path.join(KERNEL_DIR, f"{name}.{_IMAGES[backend]}") if image is None else "the given code object"
    if image is None:
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise DeviceError(f"kernel code object missing ({exc}); rebuild rocmforge with the GPU "
                              f"compiler on PATH", RF_RT_NO_RUNTIME) from None
    data = image
    check(rf_rt_module_load(device, data, module), f"loading {path}")
    for i, kernel in enumerate(kernels):
        check(rf_rt_function(device, module[0], kernel, fns[i]), kernel.decode())
    return 0


cdef class DeviceKernels:
    """rocmforge's precompiled K/V kernels (hip/kernels/kv_kernels.cu), loaded
    on one device. Launches are asynchronous, on the caller's stream; their
    C-level interface is in _runtime.pxd (KvCache is the Python API)."""

    def __cinit__(self, int device=0, bytes image=None):
        """Load the packaged code object for the backend, or ``image`` (the bytes
        of another build of kv_kernels.cu)."""
        cdef void** slots[6]
        self._module = NULL
        self.device = device
        slots[0], slots[1], slots[2] = &self._write, &self._copy, &self._gather
        slots[3], slots[4], slots[5] = &self._to_staging, &self._from_staging, &self._between
        _load_module(device, "kv_kernels", image, &self._module, _KERNELS, slots)

    def __dealloc__(self):
        if self._module != NULL:
            rf_rt_module_unload(self.device, self._module)

    cdef int _launch(self, void* fn, unsigned gx, unsigned gy, unsigned threads, void** params,
                     void* stream, unsigned threads_y=1) noexcept nogil:
        cdef unsigned grid[3]
        cdef unsigned block[3]
        grid[0], grid[1], grid[2] = gx, gy, 1
        block[0], block[1], block[2] = threads, threads_y, 1
        return rf_rt_launch(self.device, fn, grid, block, 0, params, stream)

    cdef int write_kv(self, uint64_t key_cache, uint64_t value_cache, uint64_t key, uint64_t value,
                      uint64_t slots, int64_t T, int64_t row, int64_t k_stride, int64_t v_stride,
                      int64_t num_slots, int in_dt, int cache_dt, float inv_k, float inv_v, uint64_t bad,
                      void* stream) noexcept nogil:
        cdef void* params[15]
        cdef int64_t k_bytes = k_stride * _dt_bytes(in_dt), v_bytes = v_stride * _dt_bytes(in_dt)
        # same type: K and V rows as 16-byte pieces, four per thread; converting: 8 elements of a row
        cdef int64_t work = (2 * row * _dt_bytes(in_dt) // 16 + 3) // 4 if in_dt == cache_dt else row // 8
        cdef unsigned tx = _threads(work), ty = THREADS // tx      # several short rows share a block
        if T == 0:
            return RF_RT_OK
        params[0], params[1], params[2], params[3] = &key_cache, &value_cache, &key, &value
        params[4], params[5], params[6], params[7], params[8] = &slots, &T, &row, &k_bytes, &v_bytes
        params[9], params[10], params[11], params[12] = &num_slots, &in_dt, &cache_dt, &inv_k
        params[13], params[14] = &inv_v, &bad
        return self._launch(self._write, <unsigned>((T + ty - 1) // ty), 1, tx, params, stream, ty)

    cdef int copy_blocks(self, uint64_t cache_ptrs, int64_t num_caches, uint64_t pairs, int64_t num_pairs,
                         int64_t block_bytes, int64_t num_blocks, uint64_t bad, void* stream) noexcept nogil:
        cdef void* params[5]
        if num_pairs == 0 or num_caches == 0:
            return RF_RT_OK
        params[0], params[1], params[2], params[3], params[4] = &cache_ptrs, &pairs, &block_bytes, &num_blocks, &bad
        return self._launch(self._copy, <unsigned>num_pairs, <unsigned>num_caches,
                            _copy_threads(block_bytes), params, stream)

    cdef int copy_between(self, uint64_t dst_ptrs, uint64_t src_ptrs, int64_t num_caches, uint64_t pairs,
                          int64_t num_pairs, int64_t block_bytes, void* stream) noexcept nogil:
        cdef void* params[4]
        if num_pairs == 0 or num_caches == 0:
            return RF_RT_OK
        params[0], params[1], params[2], params[3] = &dst_ptrs, &src_ptrs, &pairs, &block_bytes
        return self._launch(self._between, <unsigned>num_pairs, <unsigned>num_caches,
                            _copy_threads(block_bytes), params, stream)

    cdef int gather(self, uint64_t out, uint64_t cache, uint64_t table, int64_t num_tokens,
                    int64_t block_size, int64_t row_bytes, void* stream) noexcept nogil:
        cdef void* params[6]
        cdef int64_t used = (num_tokens + block_size - 1) // block_size
        if used == 0:
            return RF_RT_OK
        params[0], params[1], params[2] = &out, &cache, &table
        params[3], params[4], params[5] = &num_tokens, &block_size, &row_bytes
        return self._launch(self._gather, <unsigned>used, 1, _copy_threads(block_size * row_bytes), params, stream)

    cdef int move_blocks(self, bint to_staging, uint64_t staging, uint64_t cache_ptrs, int64_t num_caches,
                         uint64_t ids, int64_t num_ids, int64_t block_bytes, void* stream,
                         bint by_block=False) noexcept nogil:
        cdef void* params[6]
        cdef int64_t layout = by_block
        if num_ids == 0 or num_caches == 0:
            return RF_RT_OK
        params[0], params[1], params[2], params[3], params[4] = &staging, &cache_ptrs, &ids, &num_ids, &block_bytes
        params[5] = &layout
        return self._launch(self._to_staging if to_staging else self._from_staging, <unsigned>num_ids,
                            <unsigned>num_caches, _copy_threads(block_bytes), params, stream)


cdef class AttentionKernels:
    """The paged attention kernels (hip/kernels/attention.cu), loaded on one
    device; rocmforge.attention is the Python API."""

    def __cinit__(self, int device=0, bytes image=None):
        cdef void** slots[21]
        self._module = NULL
        self.device = device
        for i in range(20):
            slots[i] = &self._split[i]
        slots[20] = &self._reduce
        _load_module(device, "attention", image, &self._module, _ATTENTION_KERNELS, slots)
        for i, kernel in enumerate(_ATTENTION_MMA_KERNELS):
            if rf_rt_function(device, self._module, kernel, &self._mma[i]) != RF_RT_OK:
                self._mma[i] = NULL

    @property
    def tensor_core_kernels(self):
        """How many of the 6 tensor-core kernels the loaded image has (CUDA for 8.0+: all; HIP: none)."""
        return sum(self._mma[i] != NULL for i in range(6))

    cdef void* mma_kernel(self, int q_dt, int cache_dt, int64_t head_dim, int64_t slots) noexcept nogil:
        """The tensor-core kernel for these arguments, or NULL: it takes float16/bfloat16 queries over a
        cache of the same type, head_dim 64/128/256, and a pool of fewer than 2**31 rows."""
        cdef int d = 0 if head_dim == 64 else (1 if head_dim == 128 else (2 if head_dim == 256 else -1))
        if q_dt != cache_dt or not (q_dt == RF_DT_F16 or q_dt == RF_DT_BF16) or d < 0 or slots >= (<int64_t>1 << 31):
            return NULL
        return self._mma[3 * (q_dt - RF_DT_F16) + d]

    cdef int heads_per_block(self, int q_dt, int cache_dt, int64_t head_dim, int64_t slots,
                             int64_t group) noexcept nogil:
        """Query heads one thread block takes: 16 for the tensor-core kernel, else 1, 2, 4 or 8."""
        if self.mma_kernel(q_dt, cache_dt, head_dim, slots) != NULL:
            return 16
        return 1 if group == 1 else (2 if group == 2 else (4 if group <= 4 else 8))

    def __dealloc__(self):
        if self._module != NULL:
            rf_rt_module_unload(self.device, self._module)

    cdef int paged_attention(self, rf_attn_args* a, int64_t num_splits, uint64_t part_acc, uint64_t part_ml,
                             uint64_t bad, void* stream) noexcept nogil:
        cdef void* params[7]
        cdef unsigned grid[3]
        cdef unsigned block[3]
        cdef int64_t group = a.num_q_heads // a.num_kv_heads
        cdef int hb = self.heads_per_block(a.q_dt, a.cache_dt, a.head_dim, a.num_blocks * a.block_size, group)
        cdef int hbi = 0 if hb == 1 else (1 if hb == 2 else (2 if hb == 4 else 3))
        cdef int lanes = 1
        cdef int st
        if a.num_queries == 0:
            return RF_RT_OK
        while lanes * 8 < a.head_dim:
            lanes *= 2
        grid[0], grid[1], grid[2] = <unsigned>(a.num_queries * a.num_kv_heads * ((group + hb - 1) // hb)), \
            <unsigned>num_splits, 1
        if hb == 16:                            # one warp, static shared memory; no lane count
            block[0], block[1], block[2] = 32, 1, 1
            params[0], params[1], params[2], params[3], params[4] = a, &num_splits, &part_acc, &part_ml, &bad
            st = rf_rt_launch(self.device, self.mma_kernel(a.q_dt, a.cache_dt, a.head_dim,
                                                           a.num_blocks * a.block_size),
                              grid, block, 0, params, stream)
        else:
            block[0], block[1], block[2] = RF_ATTN_THREADS, 1, 1
            params[0], params[1], params[2] = a, &lanes, &num_splits
            params[3], params[4], params[5] = &part_acc, &part_ml, &bad
            st = rf_rt_launch(self.device, self._split[4 * a.cache_dt + hbi], grid, block,
                              <unsigned>(4 * (hb * a.head_dim + (RF_ATTN_THREADS // 32) * hb)),
                              params, stream)
        block[0] = RF_ATTN_THREADS
        if st != RF_RT_OK or num_splits == 1:
            return st
        grid[0], grid[1], grid[2] = <unsigned>a.num_queries, <unsigned>a.num_q_heads, 1
        params[1], params[2], params[3] = &num_splits, &part_acc, &part_ml
        return rf_rt_launch(self.device, self._reduce, grid, block, 0, params, stream)


cdef void* stream_handle(object stream) except? NULL:
    """None (the default stream), an int handle, or a torch / cupy stream object."""
    if stream is None:
        return NULL
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            stream = getattr(stream, attr)
            break
    if isinstance(stream, bool) or not hasattr(stream, "__index__"):
        raise ArgumentTypeError(f"stream must be None, an int handle or a stream object, got {type(stream).__name__}")
    return <void*><size_t>stream.__index__()


cdef int rt_backend() noexcept nogil:
    return rf_rt_backend()

cdef int rt_memset(int dev, uint64_t ptr, unsigned char value, size_t nbytes, void* stream) noexcept nogil:
    return rf_rt_memset_async(dev, ptr, value, nbytes, stream) if nbytes else RF_RT_OK

cdef int rt_htod(int dev, uint64_t dst, const void* src, size_t nbytes, void* stream) noexcept nogil:
    return rf_rt_copy_htod_async(dev, dst, src, nbytes, stream) if nbytes else RF_RT_OK

cdef int rt_dtoh(int dev, void* dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    return rf_rt_copy_dtoh_async(dev, dst, src, nbytes, stream) if nbytes else RF_RT_OK

cdef int rt_dtod(int dev, uint64_t dst, uint64_t src, size_t nbytes, void* stream) noexcept nogil:
    return rf_rt_copy_dtod_async(dev, dst, src, nbytes, stream) if nbytes else RF_RT_OK

cdef int rt_stream_sync(int dev, void* stream) noexcept nogil:
    return rf_rt_stream_synchronize(dev, stream)

cdef int rt_device_sync(int dev) noexcept nogil:
    return rf_rt_synchronize(dev)

cdef int rt_copy_peer(int dst_dev, uint64_t dst, int src_dev, uint64_t src, size_t nbytes,
                      void* stream) noexcept nogil:
    return rf_rt_copy_peer_async(dst_dev, dst, src_dev, src, nbytes, stream)

cdef int rt_enable_peer(int dev, int peer, int* enabled) noexcept nogil:
    return rf_rt_enable_peer(dev, peer, enabled)
