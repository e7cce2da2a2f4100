# cython: language_level=3, boundscheck=False, wraparound=False
"""Blocks out of and into a KvCache as one packed host array, uint8
[2 * num_layers, n, block_bytes] (K then V of each layer, the swap layout):
the unit that rocmforge.transfer moves between caches and processes; and
blocks between two GPU caches of one process by peer copies."""

from libc.stdint cimport int64_t, uint64_t
cimport numpy as cnp
import numpy as np

from rocmforge._kvcache cimport KvCache
from rocmforge._runtime cimport (RF_RT_RUNTIME, DeviceBuffer, check, rt_copy_peer, rt_enable_peer,
                                 rt_stream_sync)
from rocmforge._ids import meets, repeats, runs
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
    cache._check_open()
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
    cache._check_open()
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


def copy_device_blocks(KvCache src, src_block_ids, KvCache dst, dst_block_ids):
    """Blocks src_block_ids of one GPU cache over dst_block_ids of another (on any
    GPU of this process, or the same one), pairwise, every layer, without host
    memory: copies still pending on either side run first, and the call returns
    once the data has landed. Destination ids must not repeat.

    When the destination's GPU can reach the source's memory (the same GPU, or
    a peer with peer access, which is enabled here where the hardware allows),
    one kernel on the destination's GPU copies every layer's blocks, reading the
    source in place. Otherwise the runtime's peer copies (hipMemcpyPeerAsync /
    cuMemcpyPeerAsync) move them: one per run of consecutive ids on both sides
    and layer's K or V, or, for scattered ids (and blocks moved within one cache
    onto each other), one for the whole batch, packed into a staging buffer on
    the source's GPU and unpacked on the destination's."""
    cdef KvCache first = src, second = dst
    src._check_open()
    dst._check_open()
    if src._dev < 0 or dst._dev < 0:
        raise ArgumentValueError(f"both caches must be on GPUs, not {src.device} and {dst.device}")
    if id(dst) < id(src):
        first, second = dst, src
    with first._lock:
        if second is first:
            _copy_locked(src, src_block_ids, dst, dst_block_ids)
        else:
            with second._lock:
                _copy_locked(src, src_block_ids, dst, dst_block_ids)


cdef int64_t _DIRECT_RUN_BYTES = 4 << 20    # runs at least this long on average (or few copies): no staging


cdef _copy_locked(KvCache src, object src_block_ids, KvCache dst, object dst_block_ids):
    """copy_device_blocks with both caches' locks held."""
    cdef cnp.ndarray s, d, starts, lengths
    cdef int st = 0, enabled = 0
    cdef int64_t n, r, plane, planes = 2 * src._num_layers, bb = src._block_bytes, used = 0, dused = 0
    cdef uint64_t ss = 0, dd = 0
    cdef DeviceBuffer out, into
    src._check_open()
    dst._check_open()
    if (src._num_layers, src._block_bytes) != (dst._num_layers, dst._block_bytes):
        raise ArgumentValueError("the caches differ in layers or block size")
    s, d = _ids(src, src_block_ids), _ids(dst, dst_block_ids)
    n = s.shape[0]
    if d.shape[0] != n:
        raise ArgumentValueError(f"{n} source blocks for {d.shape[0]} destinations")
    if repeats(d):
        raise ArgumentValueError("dst_block_ids names a block twice")
    if n == 0:
        return
    src._apply_pending(NULL)
    if dst is not src:
        dst._apply_pending(NULL)
    if src._dev != dst._dev:                    # the source's writes have landed (one GPU orders them itself)
        st = rt_stream_sync(src._dev, NULL)
        if st == 0:
            st = rt_enable_peer(dst._dev, src._dev, &enabled)
    kernel = (src._dev == dst._dev or enabled) and (dst is not src or not meets(s, d))
    if not kernel:                              # runs of ids consecutive on both sides
        starts, lengths = runs(s, d)
    if st == 0 and kernel:
        pairs = np.empty((n, 2), dtype=np.int32)
        pairs[:, 0], pairs[:, 1] = s, d
        dst._reserve_scratch(pairs.nbytes)
        ss = dst._stage(pairs, &dused, NULL)        # the source's layer addresses are read where they are
        st = RF_RT_RUNTIME if ss == 0 else dst._kernels.copy_between(dst._dev_addrs._ptr, src._dev_addrs._ptr,
                                                                     planes, ss, n, bb, NULL)
    elif st == 0 and dst is not src and (planes * starts.shape[0] <= 32
                                         or n * bb >= starts.shape[0] * _DIRECT_RUN_BYTES):
        for plane in range(planes):
            for r in range(starts.shape[0]):
                st = rt_copy_peer(dst._dev, dst._addrs[plane] + <uint64_t>d[starts[r]] * bb, src._dev,
                                  src._addrs[plane] + <uint64_t>s[starts[r]] * bb, lengths[r] * bb, NULL)
                if st != 0:
                    break
            if st != 0:
                break
    elif st == 0:
        out = DeviceBuffer(planes * n * bb, src._dev)
        into = out if src._dev == dst._dev else DeviceBuffer(planes * n * bb, dst._dev)
        src._reserve_scratch(s.nbytes + (d.nbytes + 16 if dst is src else 0))
        ss = src._stage(s, &used, NULL)
        st = RF_RT_RUNTIME if ss == 0 else src._kernels.move_blocks(True, out._ptr, src._dev_addrs._ptr, planes,
                                                                   ss, n, bb, NULL)
        if st == 0 and into is not out:
            st = rt_stream_sync(src._dev, NULL)
            if st == 0:
                st = rt_copy_peer(dst._dev, into._ptr, src._dev, out._ptr, planes * n * bb, NULL)
        if st == 0:
            if dst is src:
                dused = used
            else:
                dst._reserve_scratch(d.nbytes)
            dd = dst._stage(d, &dused, NULL)
            st = RF_RT_RUNTIME if dd == 0 else dst._kernels.move_blocks(False, into._ptr, dst._dev_addrs._ptr,
                                                                       planes, dd, n, bb, NULL)
    if st == 0:
        st = rt_stream_sync(dst._dev, NULL)     # every path ends on the destination's stream
    check(st, "copying blocks between GPU caches")
