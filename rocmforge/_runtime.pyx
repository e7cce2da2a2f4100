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
import numpy as np

from rocmforge.errors import ArgumentTypeError, ArgumentValueError, DeviceError, InvalidConfiguration

cnp.import_array()

cdef extern from "rf_runtime.h" nogil:
    ctypedef enum rf_backend:
        RF_BACKEND_HOST
        RF_BACKEND_HIP
        RF_BACKEND_CUDA
    enum:
        RF_RT_OK
        RF_RT_NO_RUNTIME
        RF_RT_MISSING_SYMBOL
        RF_RT_NO_DEVICE
        RF_RT_RUNTIME
        RF_RT_BAD_DEVICE
        RF_RT_NOT_LOADED
    int rf_rt_load(int want, char* msg, size_t cap)
    rf_backend rf_rt_backend()
    int rf_rt_device_count(int* count)
    int rf_rt_device_info(int dev, char* name, size_t name_cap, char* arch, size_t arch_cap,
                          size_t* total_bytes, size_t* free_bytes)
    int rf_rt_malloc(int dev, size_t nbytes, uint64_t* ptr)
    int rf_rt_free(int dev, uint64_t ptr)
    int rf_rt_memset(int dev, uint64_t ptr, unsigned char value, size_t nbytes)
    int rf_rt_copy_htod(int dev, uint64_t dst, const void* src, size_t nbytes)
    int rf_rt_copy_dtoh(int dev, void* dst, uint64_t src, size_t nbytes)
    int rf_rt_copy_dtod(int dev, uint64_t dst, uint64_t src, size_t nbytes)
    int rf_rt_synchronize(int dev)
    int rf_rt_last_error(char* msg, size_t cap)
    int rf_rt_module_load(int dev, const void* image, void** module)
    int rf_rt_module_unload(int dev, void* module)
    int rf_rt_function(int dev, void* module, const char* name, void** fn)
    int rf_rt_launch(int dev, void* fn, const unsigned* grid, const unsigned* block, void** params)

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


cdef class DeviceBuffer:
    """``nbytes`` of memory on ``device`` (host memory on the host backend).

    Owns its memory and frees it exactly once: on close(), on leaving a with
    block, or when collected. ``ptr`` is the device address (an int)."""

    cdef readonly size_t nbytes
    cdef readonly int device
    cdef readonly bint on_host
    cdef uint64_t _ptr
    cdef bint _open

    def __cinit__(self, nbytes, int device=0):
        cdef int count = 0
        cdef uint64_t ptr = 0
        self._open = False
        if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
            raise ArgumentTypeError(f"nbytes must be an integer, got {type(nbytes).__name__}")
        n = nbytes.__index__()
        if n < 0 or n > (1 << 62):
            raise ArgumentValueError(f"nbytes must be in [0, 2**62], got {n}")
        load_backend()
        self.nbytes = n
        self.device = device
        self.on_host = rf_rt_backend() == RF_BACKEND_HOST
        if self.on_host:
            if device != 0:
                raise DeviceError(f"device {device}: the host backend has only device 0", RF_RT_BAD_DEVICE)
            ptr = <uint64_t><uintptr_t>malloc(n if n else 1)
            if ptr == 0:
                raise MemoryError(f"cannot allocate {n} bytes of host memory")
        else:
            rf_rt_device_count(&count)
            if not 0 <= device < count:
                raise DeviceError(f"device {device} out of range [0, {count})", RF_RT_BAD_DEVICE)
            if n:
                check(rf_rt_malloc(device, n, &ptr), f"allocating {n} bytes on device {device}")
        self._ptr = ptr
        self._open = True

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
_IMAGES = {RF_BACKEND_CUDA: "kv_kernels.fatbin", RF_BACKEND_HIP: "kv_kernels.hsaco"}
THREADS = 256


cdef class DeviceKernels:
    """rocmforge's precompiled K/V kernels, loaded on one device.

    Byte-level forms of write_kv (same element type in and out), copy_blocks
    and gather_kv on DeviceBuffers; results equal the host kernels'. Every
    index is checked on the host before a launch; calls return when the
    device is done."""

    cdef void* _module
    cdef void* _write
    cdef void* _copy
    cdef void* _gather
    cdef readonly int device

    def __cinit__(self, int device=0):
        cdef bytes image
        cdef int count = 0
        cdef const char* data
        self._module = NULL
        self.device = device
        load_backend()
        backend = rf_rt_backend()
        if backend == RF_BACKEND_HOST:
            raise DeviceError("GPU kernels need a GPU backend (the host backend uses the host kernels)",
                              RF_RT_NOT_LOADED)
        rf_rt_device_count(&count)
        if not 0 <= device < count:
            raise DeviceError(f"device {device} out of range [0, {count})", RF_RT_BAD_DEVICE)
        path = os.path.join(KERNEL_DIR, _IMAGES[backend])
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as exc:
            raise DeviceError(f"kernel code object missing ({exc}); rebuild rocmforge with the GPU compiler "
                              f"on PATH", RF_RT_NO_RUNTIME) from None
        data = image
        check(rf_rt_module_load(device, data, &self._module), f"loading {path}")
        check(rf_rt_function(device, self._module, b"rf_write_kv_rows", &self._write), "rf_write_kv_rows")
        check(rf_rt_function(device, self._module, b"rf_copy_blocks", &self._copy), "rf_copy_blocks")
        check(rf_rt_function(device, self._module, b"rf_gather_rows", &self._gather), "rf_gather_rows")

    def __dealloc__(self):
        if self._module != NULL:
            rf_rt_module_unload(self.device, self._module)

    cdef int _launch(self, void* fn, unsigned gx, unsigned gy, void** params) except -1:
        cdef unsigned grid[3]
        cdef unsigned block[3]
        cdef int st
        grid[0], grid[1], grid[2] = gx, gy, 1
        block[0], block[1], block[2] = THREADS, 1, 1
        with nogil:
            st = rf_rt_launch(self.device, fn, grid, block, params)
            if st == RF_RT_OK:
                st = rf_rt_synchronize(self.device)
        return check(st, "kernel")

    cdef DeviceBuffer _upload(self, cnp.ndarray arr):
        cdef DeviceBuffer buf = DeviceBuffer(arr.nbytes, self.device)
        buf.copy_from_host(arr)
        return buf

    def _same_device(self, *buffers):
        for b in buffers:
            if (<DeviceBuffer?>b).on_host or (<DeviceBuffer>b).device != self.device:
                raise ArgumentValueError(f"every buffer must live on device {self.device}")
            (<DeviceBuffer>b)._live()

    def write_kv(self, DeviceBuffer key_cache not None, DeviceBuffer value_cache not None,
                 DeviceBuffer key not None, DeviceBuffer value not None, slot_mapping, row_bytes):
        """Row t of key/value (row_bytes each) to row slot_mapping[t] of the caches
        (a host int64 array; -1 skips a padding token)."""
        cdef int64_t rb = row_bytes, T
        cdef cnp.ndarray slots = np.ascontiguousarray(slot_mapping)
        self._same_device(key_cache, value_cache, key, value)
        if slots.dtype != np.int64 or slots.ndim != 1:
            raise ArgumentTypeError("slot_mapping must be a 1-D int64 array")
        T = slots.shape[0]
        if rb <= 0 or T * rb > min(key.nbytes, value.nbytes):
            raise ArgumentValueError(f"{T} rows of {rb} bytes do not fit the key/value buffers")
        num_slots = min(key_cache.nbytes, value_cache.nbytes) // rb
        if T and (slots.min() < -1 or slots.max() >= num_slots):
            raise ArgumentValueError(f"slot_mapping holds a slot outside [-1, {num_slots})")
        if T == 0:
            return
        cdef DeviceBuffer dslots = self._upload(slots)
        cdef uint64_t kc = key_cache._ptr, vc = value_cache._ptr, k = key._ptr, v = value._ptr
        cdef uint64_t sp = dslots._ptr
        cdef void* params[6]
        params[0], params[1], params[2], params[3] = &kc, &vc, &k, &v
        params[4], params[5] = &sp, &rb
        self._launch(self._write, <unsigned>T, 1, params)
        dslots.close()

    def copy_blocks(self, caches, pairs, block_bytes):
        """For each (src, dst) row of pairs (host int32 [k, 2]), copy block src over
        block dst (block_bytes each) in every buffer of caches. Pairs must not
        chain (a dst is never another pair's src): they run in parallel."""
        cdef list bufs = list(caches)
        cdef int64_t bb = block_bytes
        cdef cnp.ndarray p = np.ascontiguousarray(pairs)
        if not bufs:
            return
        self._same_device(*bufs)
        if p.dtype != np.int32 or p.ndim != 2 or p.shape[1] != 2:
            raise ArgumentTypeError("pairs must be int32 of shape (k, 2)")
        if bb <= 0:
            raise ArgumentValueError("block_bytes must be > 0")
        num_blocks = min((<DeviceBuffer>b).nbytes for b in bufs) // bb
        if p.shape[0] == 0:
            return
        if p.min() < 0 or p.max() >= num_blocks:
            raise ArgumentValueError(f"pairs name a block outside [0, {num_blocks})")
        if set(p[:, 1].tolist()) & set(p[:, 0].tolist()):
            raise ArgumentValueError("pairs chain (a destination is also a source)")
        cdef DeviceBuffer dptrs = self._upload(np.array([(<DeviceBuffer>b)._ptr for b in bufs], dtype=np.uint64))
        cdef DeviceBuffer dpairs = self._upload(p)
        cdef uint64_t cp = dptrs._ptr, pp = dpairs._ptr
        cdef void* params[3]
        params[0], params[1], params[2] = &cp, &pp, &bb
        self._launch(self._copy, <unsigned>p.shape[0], <unsigned>len(bufs), params)
        dptrs.close()
        dpairs.close()

    def gather(self, DeviceBuffer out not None, DeviceBuffer cache not None, block_table, num_tokens,
               block_size, row_bytes):
        """The first num_tokens rows of the blocks in block_table (host int32), contiguous in out."""
        cdef int64_t n = num_tokens, bs = block_size, rb = row_bytes
        cdef cnp.ndarray table = np.ascontiguousarray(block_table)
        self._same_device(out, cache)
        if table.dtype != np.int32 or table.ndim != 1:
            raise ArgumentTypeError("block_table must be a 1-D int32 array")
        if n < 0 or bs <= 0 or rb <= 0 or n > table.shape[0] * bs or n * rb > out.nbytes:
            raise ArgumentValueError("num_tokens, block_size or row_bytes do not fit the table and out")
        num_blocks = cache.nbytes // (bs * rb)
        used = -(-n // bs)
        if used and (table[:used].min() < 0 or table[:used].max() >= num_blocks):
            raise ArgumentValueError(f"block_table names a block outside [0, {num_blocks})")
        if used == 0:
            return
        cdef DeviceBuffer dtable = self._upload(table)
        cdef uint64_t op = out._ptr, cp = cache._ptr, tp = dtable._ptr
        cdef void* params[6]
        params[0], params[1], params[2] = &op, &cp, &tp
        params[3], params[4], params[5] = &n, &bs, &rb
        self._launch(self._gather, <unsigned>used, 1, params)
        dtable.close()
