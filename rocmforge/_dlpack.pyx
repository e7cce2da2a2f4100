# cython: language_level=3, boundscheck=False, wraparound=False
"""Arrays across the DLPack boundary: importing any producer's array (numpy,
torch, cupy, ...) for the kernels, and DeviceArray, rocmforge's own export of
device or host memory without a copy (``torch.from_dlpack(arr)`` sees the
memory itself)."""

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_IsValid, PyCapsule_GetPointer
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
cimport numpy as cnp
import sys

import numpy as np

from rocmforge._runtime cimport DeviceBuffer, check, rt_backend, rt_dtoh, rt_device_sync
from rocmforge.errors import ArgumentTypeError, ArgumentValueError

cnp.import_array()

# name -> (DT code, DLPack (code, bits), numpy dtype holding the bits)
DTYPES = {
    "float32": (DT_F32, (2, 32), np.dtype(np.float32)),
    "float16": (DT_F16, (2, 16), np.dtype(np.float16)),
    "bfloat16": (DT_BF16, (4, 16), np.dtype(np.uint16)),
    "fp8_e4m3": (DT_FP8_E4M3, (1, 8), np.dtype(np.uint8)),   # exported as uint8 bits
    "int8": (DT_I8, (0, 8), np.dtype(np.int8)),
    "int32": (DT_I32, (0, 32), np.dtype(np.int32)),
    "int64": (DT_I64, (0, 64), np.dtype(np.int64)),
}
_BY_DLPACK = {(2, 32): DT_F32, (2, 16): DT_F16, (4, 16): DT_BF16, (0, 8): DT_I8, (0, 32): DT_I32,
              (0, 64): DT_I64}
_BY_NUMPY = {np.dtype(np.float32): DT_F32, np.dtype(np.float16): DT_F16, np.dtype(np.int8): DT_I8,
             np.dtype(np.int32): DT_I32, np.dtype(np.int64): DT_I64}
NAMES = {code: name for name, (code, _, _) in DTYPES.items()}
DEVICE_NAMES = {DL_CPU: "cpu", DL_CUDA: "cuda", DL_ROCM: "hip"}


_TORCH_TENSOR = None


cdef bint _is_torch_tensor_slow(object obj):
    """is_torch_tensor's first test of a type: torch's own Tensor is remembered,
    so that later tensors of it take one identity test."""
    global _TORCH_TENSOR
    cls = type(obj)
    if cls.__module__ != "torch" or not hasattr(obj, "data_ptr"):
        return False
    if cls.__name__ == "Tensor":
        _TORCH_TENSOR = cls
    return True


cdef void _set_layout(ArrayInfo* info, const int64_t* strides) noexcept:
    """contiguous, rows_contiguous and stride0 from strides in elements (NULL:
    C-contiguous). A dimension of one entry has no stride that matters."""
    cdef int64_t expect = 1
    cdef int i
    info.rows_contiguous = True
    for i in range(info.ndim - 1, 0, -1):
        if strides != NULL and info.shape[i] > 1 and strides[i] != expect:
            info.rows_contiguous = False
        expect *= info.shape[i]
    info.stride0 = expect
    if info.ndim and strides != NULL and info.shape[0] > 1:
        info.stride0 = strides[0]
    info.contiguous = info.rows_contiguous and info.stride0 == expect


cdef object import_array(object obj, ArrayInfo* info, object stream):
    cdef cnp.ndarray arr
    cdef DLManagedTensor* managed
    cdef DLManagedTensorVersioned* versioned
    cdef DLTensor* t
    cdef int i
    cdef int64_t strides[8]
    cdef Py_ssize_t itemsize
    cdef bint whole
    if isinstance(obj, np.ndarray):                 # numpy directly: also read-only arrays, and faster
        arr = <cnp.ndarray>obj
        if arr.ndim > 8:
            raise ArgumentValueError(f"arrays of {arr.ndim} dimensions are not supported")
        info.ptr = <uint64_t><size_t>cnp.PyArray_DATA(arr)
        info.device_type, info.device_id = DL_CPU, 0
        info.dtype = _BY_NUMPY.get(arr.dtype, DT_OTHER)
        info.ndim = arr.ndim
        itemsize = arr.itemsize or 1       # (a zero-size dtype has no layout to speak of)
        whole = True                        # every stride a whole number of elements
        for i in range(arr.ndim):
            info.shape[i] = arr.shape[i]
            strides[i] = arr.strides[i] // itemsize
            if arr.strides[i] % itemsize and arr.shape[i] > 1:
                whole = False
        _set_layout(info, NULL if cnp.PyArray_IS_C_CONTIGUOUS(arr) else strides)
        if not whole:
            info.contiguous = info.rows_contiguous = False
        return obj
    if is_torch_tensor(obj):
        return _torch_array(obj, info)
    try:
        device_type, device_id = obj.__dlpack_device__()
    except AttributeError:
        raise ArgumentTypeError(
            f"expected an array supporting DLPack (numpy, torch, cupy, ...), got {type(obj).__name__}") from None
    # The consumer stream (None: the legacy default stream, which is where the
    # kernels run when the caller names no stream).
    capsule = obj.__dlpack__() if device_type == DL_CPU or stream is None else obj.__dlpack__(stream=stream)
    if PyCapsule_IsValid(capsule, b"dltensor"):
        managed = <DLManagedTensor*>PyCapsule_GetPointer(capsule, b"dltensor")
        t = &managed.dl_tensor
    elif PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        versioned = <DLManagedTensorVersioned*>PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        t = &versioned.dl_tensor
    else:
        raise ArgumentTypeError(f"{type(obj).__name__}.__dlpack__ did not return a DLPack capsule")
    if t.ndim > 8:
        raise ArgumentValueError(f"arrays of {t.ndim} dimensions are not supported")
    info.ptr = <uint64_t><size_t>t.data + t.byte_offset
    info.device_type, info.device_id = t.device.device_type, t.device.device_id
    info.dtype = _BY_DLPACK.get((t.dtype.code, t.dtype.bits), DT_OTHER) if t.dtype.lanes == 1 else DT_OTHER
    info.ndim = t.ndim
    for i in range(t.ndim):
        info.shape[i] = t.shape[i]
    _set_layout(info, t.strides)
    return capsule


cdef dict _BY_TORCH = {}            # torch dtype -> DT_*, filled on the first torch tensor


cdef object _torch_array(object t, ArrayInfo* info):
    """A torch tensor's fields read directly: the same facts its DLPack export
    gives, at a fraction of the cost (torch builds that export in Python; here
    no device object is made and the dtype is looked up by identity)."""
    cdef int i
    cdef int64_t strides[8]
    if not _BY_TORCH:
        torch = sys.modules["torch"]
        _BY_TORCH.update({torch.float32: DT_F32, torch.float16: DT_F16, torch.bfloat16: DT_BF16,
                          torch.int8: DT_I8, torch.int32: DT_I32, torch.int64: DT_I64})
    shape = t.shape
    if len(shape) > 8:
        raise ArgumentValueError(f"arrays of {len(shape)} dimensions are not supported")
    info.ptr = t.data_ptr()
    if t.is_cuda:                   # also ROCm builds of torch; first, as the hot path's tensors are there
        info.device_type, info.device_id = (DL_ROCM if rt_backend() == 1 else DL_CUDA), t.get_device()
    elif t.is_cpu:
        info.device_type, info.device_id = DL_CPU, 0
    else:
        info.device_type, info.device_id = -1, 0
    info.dtype = _BY_TORCH.get(t.dtype, DT_OTHER)
    info.ndim = len(shape)
    for i in range(info.ndim):
        info.shape[i] = shape[i]
    if t.is_contiguous():
        _set_layout(info, NULL)
    else:
        strides_obj = t.stride()
        for i in range(info.ndim):
            strides[i] = strides_obj[i]
        _set_layout(info, strides)
    return t


cdef struct Export:                 # one allocation per exported legacy tensor
    DLManagedTensor managed
    int64_t shape[8]

cdef struct ExportVersioned:
    DLManagedTensorVersioned managed
    int64_t shape[8]


cdef void _release(DLManagedTensor* m) noexcept nogil:
    """The exported tensor's deleter: drop its reference on the buffer, free the struct."""
    with gil:
        Py_XDECREF(<PyObject*>m.manager_ctx)
    free(m)


cdef void _release_versioned(DLManagedTensorVersioned* m) noexcept nogil:
    with gil:
        Py_XDECREF(<PyObject*>m.manager_ctx)
    free(m)


cdef void _capsule_gone(object capsule) noexcept:
    """A capsule collected unconsumed still owns its tensor (consumers rename it)."""
    cdef DLManagedTensor* m
    cdef DLManagedTensorVersioned* v
    if PyCapsule_IsValid(capsule, b"dltensor"):
        m = <DLManagedTensor*>PyCapsule_GetPointer(capsule, b"dltensor")
        m.deleter(m)
    elif PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        v = <DLManagedTensorVersioned*>PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        v.deleter(v)


cdef class DeviceArray:
    """A C-contiguous array over a DeviceBuffer's memory (GPU or host), for
    exchange through DLPack: ``torch.from_dlpack(a)``, ``cupy.from_dlpack(a)``,
    ``np.from_dlpack(a)`` (host) see this memory, not a copy, and keep it alive.
    bfloat16 is exported as bfloat16, fp8_e4m3 as its uint8 bits (view it as
    float8_e4m3fn). ``to_numpy()`` copies to a new host array."""

    def __init__(self, DeviceBuffer buffer not None, shape, str dtype, int64_t offset=0):
        if dtype not in DTYPES:
            raise ArgumentValueError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
        shape = tuple(int(n) for n in shape)
        if len(shape) > 8 or any(n < 0 for n in shape):
            raise ArgumentValueError(f"bad shape {shape}")
        self._code = DTYPES[dtype][0]
        nbytes = DTYPES[dtype][2].itemsize
        for n in shape:
            nbytes *= n
        if offset < 0 or offset + nbytes > buffer.nbytes:
            raise ArgumentValueError(f"shape {shape} of {dtype} at offset {offset} exceeds the "
                                     f"{buffer.nbytes}-byte buffer")
        self.buffer, self.shape, self.dtype, self.offset = buffer, shape, dtype, offset

    @property
    def ptr(self):
        return (<DeviceBuffer>self.buffer)._live() + self.offset

    @property
    def nbytes(self):
        n = DTYPES[self.dtype][2].itemsize
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self):
        """"cpu", "cuda:N" or "hip:N"."""
        kind, index = self.__dlpack_device__()
        return "cpu" if kind == DL_CPU else f"{DEVICE_NAMES[kind]}:{index}"

    def __dlpack_device__(self):
        cdef DeviceBuffer buf = self.buffer
        if buf.on_host:
            return (DL_CPU, 0)
        return (DL_ROCM if rt_backend() == 1 else DL_CUDA, buf.device)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """Export without copying. The producer waits for the device's pending
        work, so the consumer's stream sees every write made before this call."""
        cdef DeviceBuffer buf = self.buffer
        cdef uint64_t ptr = buf._live() + self.offset
        cdef Export* e = NULL
        cdef ExportVersioned* ev = NULL
        cdef DLTensor* t
        cdef int i
        if copy:
            raise BufferError("DeviceArray exports its memory only without a copy")
        if dl_device is not None and tuple(dl_device) != tuple(self.__dlpack_device__()):
            raise BufferError(f"cannot export to device {dl_device}: the array lives on {self.device}")
        if not buf.on_host:
            check(rt_device_sync(buf.device), "synchronizing before a DLPack export")
        versioned = max_version is not None and max_version[0] >= 1
        if versioned:
            ev = <ExportVersioned*>malloc(sizeof(ExportVersioned))
            if ev == NULL:
                raise MemoryError()
            ev.managed.version.major, ev.managed.version.minor = 1, 0
            ev.managed.flags = 0
            ev.managed.manager_ctx = <void*>buf
            ev.managed.deleter = _release_versioned
            t = &ev.managed.dl_tensor
        else:
            e = <Export*>malloc(sizeof(Export))
            if e == NULL:
                raise MemoryError()
            e.managed.manager_ctx = <void*>buf
            e.managed.deleter = _release
            t = &e.managed.dl_tensor
        Py_INCREF(buf)                              # released by the deleter
        t.data = <void*><size_t>ptr
        dev_type, dev_id = self.__dlpack_device__()
        t.device.device_type, t.device.device_id = dev_type, dev_id
        t.ndim = len(self.shape)
        t.dtype.code, t.dtype.bits = DTYPES[self.dtype][1]
        t.dtype.lanes = 1
        t.shape = &ev.shape[0] if versioned else &e.shape[0]
        for i in range(t.ndim):
            t.shape[i] = self.shape[i]
        t.strides = NULL                            # C-contiguous
        t.byte_offset = 0
        if versioned:
            return PyCapsule_New(ev, b"dltensor_versioned", _capsule_gone)
        return PyCapsule_New(e, b"dltensor", _capsule_gone)

    def to_numpy(self):
        """A host copy (bfloat16 as uint16 bits, fp8_e4m3 as uint8 bits)."""
        cdef DeviceBuffer buf = self.buffer
        cdef uint64_t src = buf._live() + self.offset
        cdef cnp.ndarray out = np.empty(self.shape, dtype=DTYPES[self.dtype][2])
        cdef size_t n = out.nbytes
        cdef int st = 0
        if buf.on_host:
            memcpy(cnp.PyArray_DATA(out), <void*><size_t>src, n)
        elif n:
            with nogil:
                st = rt_device_sync(buf.device)
                if st == 0:
                    st = rt_dtoh(buf.device, cnp.PyArray_DATA(out), src, n, NULL)
                if st == 0:
                    st = rt_device_sync(buf.device)
            check(st, "copying a DeviceArray to the host")
        return out

    def __array__(self, dtype=None, copy=None):
        """numpy's view of a host array: ``np.asarray(a)`` shares the memory
        (bfloat16 as uint16 bits, fp8_e4m3 as uint8 bits, as to_numpy()). A GPU
        array is not host memory: copy it with to_numpy()."""
        cdef DeviceBuffer buf = self.buffer
        cdef cnp.ndarray out
        cdef cnp.npy_intp dims[8]
        cdef int i
        if not buf.on_host:
            raise ArgumentTypeError(f"this DeviceArray lives on {self.device}: numpy cannot view it; "
                                    "copy it to the host with to_numpy()")
        if copy:
            out = self.to_numpy()
        else:
            for i in range(len(self.shape)):
                dims[i] = self.shape[i]
            storage = DTYPES[self.dtype][2]
            out = cnp.PyArray_SimpleNewFromData(len(self.shape), dims, storage.num,
                                                <void*><size_t>(buf._live() + self.offset))
            Py_INCREF(buf)                          # the view keeps the memory alive
            cnp.PyArray_SetBaseObject(out, buf)
        if dtype is not None and np.dtype(dtype) != out.dtype:
            if copy is False:
                raise ValueError(f"a {self.dtype} DeviceArray cannot be viewed as {np.dtype(dtype)} without a copy")
            return out.astype(dtype)
        return out

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device={self.device})"
