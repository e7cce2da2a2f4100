# cython: language_level=3, boundscheck=False, wraparound=False
"""Blocks out of and into a KvCache as one packed host array, uint8
[2 * num_layers, n, block_bytes] (K then V of each layer, the swap layout):
the unit that rocmforge.transfer moves between caches and processes."""

cimport numpy as cnp
import numpy as np

from rocmforge._kvcache cimport KvCache
from rocmforge.errors import ArgumentTypeError, ArgumentValueError, BlockNotFound

cnp.import_array()


cdef cnp.ndarray _ids(KvCache cache, object block_ids):
    """block_ids as int32, every one inside the pool (checked with the lock held)."""
    arr = np.asarray(block_ids)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ArgumentTypeError(f"block ids must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= cache._num_blocks):
        raise BlockNotFound(f"block ids must lie in [0, {cache._num_blocks})")
    return np.ascontiguousarray(arr, dtype=np.int32)


def pack_blocks(KvCache cache, block_ids):
    """The K/V of these blocks, every layer, as a new packed host array (copy-on-write
    and host-tier copies still pending run first)."""
    cdef cnp.ndarray ids, host
    cache._live()
    with cache._lock:
        cache._check_open()
        ids = _ids(cache, block_ids)
        host = np.empty((2 * cache._num_layers, ids.shape[0], cache._block_bytes), dtype=np.uint8)
        cache._move_blocks(True, ids, host)       # pending copies run first
    return host


def unpack_blocks(KvCache cache, block_ids, packed):
    """Write packed K/V (as pack_blocks returns it) into these blocks, every layer,
    after the copies still pending."""
    cdef cnp.ndarray ids
    cache._live()
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or not packed.flags.c_contiguous:
        raise ArgumentTypeError("packed must be a C-contiguous uint8 numpy array (pack_blocks' layout)")
    with cache._lock:
        cache._check_open()
        ids = _ids(cache, block_ids)
        want = (2 * cache._num_layers, ids.shape[0], cache._block_bytes)
        if (<object>packed).shape != want:
            raise ArgumentValueError(f"packed has shape {(<object>packed).shape}, these blocks need {want}")
        cache._apply_pending(NULL)
        cache._move_blocks(False, ids, packed)
