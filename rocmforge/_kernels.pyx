# cython: language_level=3, boundscheck=False, wraparound=False
"""Host K/V kernels on numpy arrays: the host backend's data path and the
reference for the GPU kernels. One thin wrapper per C function of
hip/rf_host_kernels.c; arguments are checked here, indices in C (before any
write), and the GIL is released while the C code runs.

Layouts (vLLM's): a layer's cache is [num_blocks, block_size, num_kv_heads,
head_dim]; new keys and values are [T, num_kv_heads, head_dim]. Storage
dtypes: float32, float16, bfloat16 (numpy uint16 holding the bits),
fp8_e4m3 (uint8) and int8, the last two quantized on write as x / scale.
"""

from libc.stdint cimport int32_t, int64_t, uintptr_t
cimport numpy as cnp
import numpy as np

from rocmforge._dlpack import DTYPES as _ARRAY_DTYPES
from rocmforge.errors import ArgumentTypeError, ArgumentValueError, BlockNotFound

cnp.import_array()

from rocmforge._host_kernels cimport *

# name -> (code, numpy storage dtype): the storage types of rocmforge._dlpack's table
DTYPES = {name: (code, storage) for name, (code, _, storage) in _ARRAY_DTYPES.items() if code <= RF_DT_I8}
_IMPLIED = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int8): "int8"}


cdef int _dtype_code(cnp.ndarray arr, object name, str what) except -1:
    """The element type of arr: named, or implied by its numpy dtype."""
    if name is None:
        name = _IMPLIED.get(arr.dtype)
        if name is None:
            raise ArgumentTypeError(
                f"{what} has numpy dtype {arr.dtype}: name its element type ({', '.join(DTYPES)})")
    if name not in DTYPES:
        raise ArgumentValueError(f"{what}: unknown dtype {name!r} ({', '.join(DTYPES)})")
    code, storage = DTYPES[name]
    if arr.dtype != storage:
        raise ArgumentTypeError(f"{what}: {name} is stored as numpy {storage}, got {arr.dtype}")
    return code


cdef cnp.ndarray _array(object obj, int ndim, str what):
    if not isinstance(obj, np.ndarray):
        raise ArgumentTypeError(f"{what} must be a numpy array, got {type(obj).__name__}")
    if obj.ndim != ndim:
        raise ArgumentValueError(f"{what} must be {ndim}-D, got shape {obj.shape}")
    if not obj.flags.c_contiguous:
        raise ArgumentValueError(f"{what} must be C-contiguous")
    return <cnp.ndarray>obj


def write_kv(key_cache, value_cache, key, value, slot_mapping, *, dtype=None, cache_dtype=None,
             float k_scale=1.0, float v_scale=1.0):
    """Scatter T new tokens' key and value rows into the caches at slot_mapping
    (int64; slot = block * block_size + offset; -1 skips a padding token).
    Slots must be distinct. Quantized caches store x / scale."""
    cdef cnp.ndarray kc = _array(key_cache, 4, "key_cache"), vc = _array(value_cache, 4, "value_cache")
    cdef cnp.ndarray k = _array(key, 3, "key"), v = _array(value, 3, "value")
    cdef cnp.ndarray slots = _array(slot_mapping, 1, "slot_mapping")
    cdef int in_dt = _dtype_code(k, dtype, "key"), cache_dt = _dtype_code(kc, cache_dtype, "key_cache")
    cdef int64_t T = k.shape[0], row = k.shape[1] * k.shape[2], num_slots = kc.shape[0] * kc.shape[1], bad = -1
    cdef int st
    if in_dt in (RF_DT_FP8_E4M3, RF_DT_I8):
        raise ArgumentValueError("key and value must be float32, float16 or bfloat16")
    if _dtype_code(v, dtype, "value") != in_dt or _dtype_code(vc, cache_dtype, "value_cache") != cache_dt:
        raise ArgumentTypeError("key and value (and their caches) must share a dtype")
    if (<object>k).shape != (<object>v).shape:
        raise ArgumentValueError(f"key {key.shape} and value {value.shape} differ in shape")
    if (<object>kc).shape != (<object>vc).shape or (<object>kc).shape[2:] != (<object>k).shape[1:]:
        raise ArgumentValueError(
            f"caches {key_cache.shape}/{value_cache.shape} do not fit rows of shape {key.shape[1:]}")
    if slots.dtype != np.int64 or slots.shape[0] != T:
        raise ArgumentValueError(f"slot_mapping must be int64 with {T} entries")
    if not (k_scale > 0 and v_scale > 0):
        raise ArgumentValueError("k_scale and v_scale must be > 0")
    with nogil:
        st = rf_host_write_kv(cnp.PyArray_DATA(kc), cnp.PyArray_DATA(vc), cnp.PyArray_DATA(k),
                              cnp.PyArray_DATA(v), <const int64_t*>cnp.PyArray_DATA(slots), T, row,
                              row, row, num_slots, in_dt, cache_dt, k_scale, v_scale, &bad)
    if st == RF_K_BAD_SLOT:
        raise ArgumentValueError(f"slot_mapping[{bad}] = {slot_mapping[bad]} outside [-1, {num_slots})")
    if st != RF_K_OK:
        raise ArgumentValueError(f"unsupported dtypes (status {st})")


def copy_blocks(caches, pairs):
    """For each (src, dst) row of pairs (int32 [k, 2]), in order, copy block src
    over block dst in every cache of the list (K and V of every layer)."""
    cdef list arrays = list(caches)
    cdef cnp.ndarray p = _array(pairs, 2, "pairs")
    cdef cnp.ndarray first, a
    cdef int64_t n, block_bytes, num_blocks, bad = -1, i
    cdef int st
    if not arrays:
        return
    first = _array(arrays[0], 4, "caches[0]")
    for i, obj in enumerate(arrays):
        a = _array(obj, 4, f"caches[{i}]")
        if (<object>a).shape != (<object>first).shape or a.dtype != first.dtype:
            raise ArgumentValueError("every cache must have the same shape and dtype")
    if p.dtype != np.int32 or p.shape[1] != 2:
        raise ArgumentValueError("pairs must be int32 of shape (k, 2)")
    n = len(arrays)
    cdef cnp.ndarray ptrs = np.array([a.ctypes.data for a in arrays], dtype=np.uintp)
    block_bytes = first.strides[0]
    num_blocks = first.shape[0]
    with nogil:
        st = rf_host_copy_blocks(<void* const*>cnp.PyArray_DATA(ptrs), n,
                                 <const int32_t*>cnp.PyArray_DATA(p), p.shape[0], block_bytes,
                                 num_blocks, &bad)
    if st != RF_K_OK:
        raise BlockNotFound(f"pairs[{bad}] = {pairs[bad].tolist()} names a block outside [0, {num_blocks})")


def gather_kv(cache, block_table, num_tokens):
    """A sequence's first num_tokens rows, contiguous: [num_tokens, heads, head_dim]."""
    cdef cnp.ndarray c = _array(cache, 4, "cache")
    cdef cnp.ndarray table = _array(block_table, 1, "block_table")
    cdef int64_t n = num_tokens, bad = -1, bs = c.shape[1]
    cdef int st
    if table.dtype != np.int32:
        raise ArgumentTypeError("block_table must be int32")
    if n < 0:
        raise ArgumentValueError("num_tokens must be >= 0")
    cdef cnp.ndarray out = np.empty((n, c.shape[2], c.shape[3]), dtype=c.dtype)
    with nogil:
        st = rf_host_gather(cnp.PyArray_DATA(c), <const int32_t*>cnp.PyArray_DATA(table), table.shape[0],
                            n, bs, c.strides[1], c.shape[0], cnp.PyArray_DATA(out), &bad)
    if st == RF_K_BAD_SLOT:
        raise ArgumentValueError(f"{n} tokens need more than the table's {table.shape[0]} blocks")
    if st != RF_K_OK:
        raise BlockNotFound(f"block_table[{bad}] = {block_table[bad]} outside [0, {c.shape[0]})")
    return out
