# DLPack, the array exchange ABI (https://dmlc.github.io/dlpack/), written out
# here: the structs rocmforge reads when it imports an array and fills when it
# exports one. Field order and types are the ABI.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    DL_CPU = 1
    DL_CUDA = 2
    DL_ROCM = 10

cdef struct DLDevice:
    int32_t device_type
    int32_t device_id

cdef struct DLDataType:
    uint8_t code            # 0 int, 1 uint, 2 float, 4 bfloat
    uint8_t bits
    uint16_t lanes

cdef struct DLTensor:
    void* data
    DLDevice device
    int32_t ndim
    DLDataType dtype
    int64_t* shape
    int64_t* strides        # in elements; NULL means C-contiguous
    uint64_t byte_offset

cdef struct DLManagedTensor:
    DLTensor dl_tensor
    void* manager_ctx
    void (*deleter)(DLManagedTensor*) noexcept nogil

cdef struct DLPackVersion:
    uint32_t major
    uint32_t minor

cdef struct DLManagedTensorVersioned:
    DLPackVersion version
    void* manager_ctx
    void (*deleter)(DLManagedTensorVersioned*) noexcept nogil
    uint64_t flags
    DLTensor dl_tensor

# Element types as rocmforge names them: the kernels' RF_DT_* codes, then the
# index types.
cdef enum:
    DT_F32 = 0
    DT_F16 = 1
    DT_BF16 = 2
    DT_FP8_E4M3 = 3
    DT_I8 = 4
    DT_I32 = 5
    DT_I64 = 6
    DT_OTHER = -1

cdef struct ArrayInfo:
    uint64_t ptr            # data + byte_offset
    int device_type
    int device_id
    int dtype               # DT_*
    int ndim
    int64_t shape[8]
    bint contiguous         # C-contiguous
    bint rows_contiguous    # each entry of dimension 0 C-contiguous, entries stride0 elements apart
    int64_t stride0


# Import obj through its __dlpack__ for use on `stream` (an int handle, or
# None: the default stream). Fills info; returns the object that keeps the
# memory alive, to be held while info.ptr is used.
cdef object import_array(object obj, ArrayInfo* info, object stream)


# Whether obj is a torch tensor, whose fields import_array reads directly (torch
# builds its DLPack export, and its __dlpack_device__, in Python).
cdef object _TORCH_TENSOR          # torch.Tensor, once an object of that exact type was seen


cdef inline bint is_torch_tensor(object obj):
    """A torch tensor (or subclass) whose fields import_array may read directly."""
    if type(obj) is _TORCH_TENSOR:
        return True
    return _is_torch_tensor_slow(obj)


cdef bint _is_torch_tensor_slow(object obj)


cdef class DeviceArray:
    cdef readonly object buffer     # the DeviceBuffer whose memory this is
    cdef readonly tuple shape
    cdef readonly str dtype
    cdef readonly int64_t offset    # in bytes, into buffer
    cdef int _code
