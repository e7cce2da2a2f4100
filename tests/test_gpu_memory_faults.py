"""The data path when GPU memory runs out. Copies taken from the manager that
cannot get the memory they need (space to upload their pairs, host-tier
staging) stay with the cache for its next call instead of being lost, and the
host tier's staging makes do with the buffer it has when no memory for another
can be had. Each test first fills the GPU with DeviceBuffers. GPU only."""

import os

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import DeviceBuffer
from rocmforge.config import CacheConfig
from test_kvcache import on

INFO = rf.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no GPU"),
              pytest.mark.skipif(bool(os.environ.get("ROCMFORGE_SANITIZER")),
                                 reason="compute-sanitizer's tools take device memory of their own")]


def fill_gpu():
    """DeviceBuffers over all the GPU memory that can still be had, largest first."""
    held = []
    for size in (1 << 30, 1 << 26, 1 << 20, 1 << 16, 1 << 12):
        while True:
            try:
                held.append(DeviceBuffer(size, 0))
            except (rf.DeviceError, MemoryError):
                break
    return held


def test_copies_that_cannot_get_upload_space_wait_for_the_next_call():
    """10,000 copy-on-write copies need more upload space than the cache holds
    (80 KB against 64 KiB); with the GPU full they cannot get it: the call
    raises, and once memory is back the next call applies every one of them."""
    n = 10_000
    with rf.KvCache(CacheConfig(1, 1, 8, block_size=4, num_blocks=3 * n, dtype="float32"), GPU) as cache:
        m = cache.manager
        for sid in range(n):
            m.add_sequence(sid, num_tokens=1)
        rows = np.repeat(np.arange(n, dtype=np.float32), 8).reshape(n, 1, 8)
        slots = np.array([m.block_table(sid)[0] * 4 for sid in range(n)], dtype=np.int64)
        cache.write_kv(0, on(cache, rows), on(cache, -rows), on(cache, slots))
        for sid in range(n):
            m.fork(sid, n + sid)
        m.append_batch(np.arange(n, 2 * n), 1)     # each fork's shared, partly filled block is copied first
        held = fill_gpu()
        try:
            with pytest.raises(rf.DeviceError):
                cache.apply_pending_copies()
        finally:
            for buf in held:
                buf.close()
        cache.apply_pending_copies()
        keys = cache.key_cache(0).to_numpy().reshape(-1, 8)
        firsts = np.array([m.block_table(n + sid)[0] * 4 for sid in range(n)])
        assert np.array_equal(keys[firsts, 0], np.arange(n, dtype=np.float32))


def test_host_tier_staging_makes_do_with_the_buffer_it_has():
    """600 blocks go to the host tier in one call, three staging batches of 256
    blocks; with the GPU full, the second batch cannot get a staging buffer of
    its own and waits for the first one's. Brought back, every block holds what
    was written to it."""
    cfg = CacheConfig(2, 8, 128, block_size=16, num_blocks=1024, dtype="float16")   # 128 KiB a block, all layers
    bs = cfg.block_size

    def tokens(first, nblocks):
        return list(range(first, first + nblocks * bs))

    def add(cache, seq_id, toks):
        """Add the sequence; its K/V (a function of the token and layer) ready on the GPU."""
        slots = on(cache, cache.manager.add_sequence(seq_id, toks))
        rows = np.repeat(np.asarray(toks, dtype=np.float32) % 2048, 8 * 128).reshape(-1, 8, 128)
        return [(on(cache, rows.astype(np.float16)), on(cache, (rows + layer).astype(np.float16)), slots)
                for layer in range(2)]

    def write(cache, kv):
        for layer, (k, v, slots) in enumerate(kv):
            cache.write_kv(layer, k, v, slots)

    with rf.KvCache(cfg, GPU, enable_prefix_caching=True, host_cache=1024 * cfg.bytes_per_block) as cache:
        m = cache.manager
        a, b, c = tokens(0, 256), tokens(100_000, 1024), tokens(200_000, 600)
        write(cache, add(cache, 1, a))
        m.remove_sequence(1)
        write(cache, add(cache, 2, b))              # evicts a's 256 blocks: one staging buffer, one batch
        cache.synchronize()
        m.remove_sequence(2)
        kv = add(cache, 3, c)                       # evicts 600 of b's blocks: three batches
        held = fill_gpu()
        try:
            write(cache, kv)
            cache.synchronize()
        finally:
            for buf in held:
                buf.close()
        m.remove_sequence(3)
        m.add_sequence(4, b)                        # b again: from the pool, then from the tier
        assert m.num_cached_tokens(4) == len(b)
        want = np.asarray(b, dtype=np.float32) % 2048
        for layer in range(2):
            k, v = (x.to_numpy().astype(np.float32) for x in cache.gather(4, layer))
            assert np.array_equal(k[:, 0, 0], want.astype(np.float16).astype(np.float32))
            assert np.array_equal(v[:, 3, 7], (want + layer).astype(np.float16).astype(np.float32))
        assert m.stats()["host_reloaded_blocks"] >= 600
