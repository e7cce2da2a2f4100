# cython: language_level=3, boundscheck=False, wraparound=False
"""The GPU runtime as Python sees it: which backend is in use, and device memory.

A thin wrapper per C call of hip/rf_runtime.c (status codes in, exceptions
out, the GIL released only around copies). With no GPU runtime, or with
ROCMFORGE_BACKEND=host, the host backend serves the same API from host memory.
"""

import os

from libc.stdint cimport uint64_t, uintptr_t
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

    def close(self):
        """Free the memory now (later calls do nothing)."""
        cdef uint64_t ptr = self._ptr
        if not self._open:
            return
        self._open = False
        self._ptr = 0
        if self.on_host:
            free(<void*><uintptr_t>ptr)
        elif ptr:
            check(rf_rt_free(self.device, ptr), "freeing device memory")

    def __dealloc__(self):
        if self._open:
            self._open = False
            if self.on_host:
                free(<void*><uintptr_t>self._ptr)
            elif self._ptr:
                rf_rt_free(self.device, self._ptr)   # no exception can leave a destructor

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
