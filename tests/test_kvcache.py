"""KvCache on every backend this machine has ("cpu" always, the GPU when there
is one), against the host kernels on numpy arrays as the reference: writes of
every dtype pair, copy-on-write, gather, swapping, compaction, DLPack, close."""

import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rocmforge as rf
from rocmforge import _kernels as K
from rocmforge import _runtime
from rocmforge.config import CacheConfig
from rocmforge._dlpack import DeviceArray

INFO = _runtime.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no GPU")])]
NP_IN = {"float32": np.float32, "float16": np.float16}
CACHE_TYPES = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8"]


@pytest.fixture(params=DEVICES)
def device(request):
    return "cpu" if request.param == "cpu" else GPU


def make(device, layers=2, heads=2, head_dim=8, block_size=4, num_blocks=16, dtype="float16", **kw):
    return rf.KvCache(CacheConfig(layers, heads, head_dim, block_size=block_size, num_blocks=num_blocks,
                                  dtype=dtype), device, **kw)


def on(cache, arr):
    """arr where cache can read it: itself on the host, else a device copy (a DeviceArray)."""
    if cache.device == "cpu":
        return arr
    buf = rf.DeviceBuffer(arr.nbytes, 0)
    buf.copy_from_host(np.ascontiguousarray(arr))
    name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(np.int64): "int64"}
    return DeviceArray(buf, arr.shape, name[arr.dtype])


def reference(cache):
    """Numpy mirrors of the cache's storage (zeros, like a fresh cache)."""
    storage = K.DTYPES[cache.dtype][1]
    shape = (cache.num_blocks, cache.block_size, cache.config.num_kv_heads, cache.config.head_dim)
    return [[np.zeros(shape, dtype=storage) for _ in range(2)] for _ in range(cache.num_layers)]


def assert_same(cache, ref):
    for layer, (k, v) in enumerate(ref):
        assert np.array_equal(cache.key_cache(layer).to_numpy().view(np.uint8), k.view(np.uint8))
        assert np.array_equal(cache.value_cache(layer).to_numpy().view(np.uint8), v.view(np.uint8))


@pytest.mark.parametrize("cache_dtype", CACHE_TYPES)
@pytest.mark.parametrize("in_dtype", list(NP_IN))
@pytest.mark.parametrize("device_slots", [False, True])
def test_write_kv_matches_the_host_kernels(device, cache_dtype, in_dtype, device_slots):
    scales = (0.5, 0.01) if cache_dtype in ("fp8_e4m3", "int8") else (1.0, 1.0)
    with make(device, dtype=cache_dtype, head_dim=16, k_scale=[scales[0], 2.0], v_scale=scales[1]) as cache:
        ref = reference(cache)
        rng = np.random.default_rng(3)
        for layer in range(cache.num_layers):
            T = 37
            slots = rng.permutation(cache.num_blocks * cache.block_size)[:T].astype(np.int64)
            slots[rng.random(T) < 0.2] = -1
            k = (rng.standard_normal((T, 2, 16)) * 40).astype(NP_IN[in_dtype])
            v = (rng.standard_normal((T, 2, 16)) * 0.02).astype(NP_IN[in_dtype])
            cache.write_kv(layer, on(cache, k), on(cache, v), on(cache, slots) if device_slots else slots)
            ks = (scales[0], 2.0)[layer] if cache_dtype in ("fp8_e4m3", "int8") else 1.0
            K.write_kv(ref[layer][0], ref[layer][1], k, v, slots, dtype=in_dtype, cache_dtype=cache_dtype,
                       k_scale=ks, v_scale=scales[1])
        cache.synchronize()
        assert_same(cache, ref)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_write_kv_random_geometry_on_the_host(data):
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 3, 8, 24]))
    bs, nb = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from(CACHE_TYPES))
    T = data.draw(st.integers(0, nb * bs))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    with make("cpu", layers=1, heads=heads, head_dim=head_dim, block_size=bs, num_blocks=nb, dtype=dtype) as cache:
        ref = reference(cache)
        slots = rng.permutation(nb * bs)[:T].astype(np.int64)
        k = rng.standard_normal((T, heads, head_dim)).astype(np.float32)
        cache.write_kv(0, k, -k, slots)
        K.write_kv(ref[0][0], ref[0][1], k, -k, slots, cache_dtype=dtype)
        assert_same(cache, ref)


def fill(cache, seq_ids, rng):
    """Write random K/V for every token of the sequences, mirrored in a reference."""
    ref = reference(cache)
    for sid in seq_ids:
        table, n = cache.manager.block_table(sid), cache.manager.num_tokens(sid)
        slots = (table[np.arange(n) // cache.block_size].astype(np.int64) * cache.block_size
                 + np.arange(n) % cache.block_size)
        for layer in range(cache.num_layers):
            k = rng.standard_normal((n, cache.config.num_kv_heads, cache.config.head_dim)).astype(np.float16)
            cache.write_kv(layer, on(cache, k), on(cache, k * 2), slots)
            K.write_kv(ref[layer][0], ref[layer][1], k, k * 2, slots)
    return ref


def gathered(cache, sid):
    return [tuple(a.to_numpy() for a in cache.gather(sid, layer)) for layer in range(cache.num_layers)]


def holds(cache, sid, want):
    """Whether sequence sid's K/V in every layer equal want (a gathered() result)."""
    return all(np.array_equal(a, b) for g, w in zip(gathered(cache, sid), want) for a, b in zip(g, w))


def with_holes(cache, seed):
    """Eight sequences of 10 tokens with random K/V, then the even ones removed:
    the odd ones' K/V by id."""
    m = cache.manager
    for sid in range(8):
        m.add_sequence(sid, num_tokens=10)
    fill(cache, range(8), np.random.default_rng(seed))
    for sid in range(0, 8, 2):
        m.remove_sequence(sid)
    return {sid: gathered(cache, sid) for sid in range(1, 8, 2)}


def test_copy_on_write_runs_before_the_write(device):
    with make(device) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=6)
        fill(cache, [1], np.random.default_rng(0))
        before = gathered(cache, 1)
        m.fork(1, 2)
        m.fork(2, 3)
        slots2 = m.append(2, 1)               # 2's partly filled last block is copied first
        slots3 = m.append(3, 1)
        row = np.full((1, 2, 8), 7, dtype=np.float16)
        cache.write_kv(0, on(cache, row), on(cache, row), slots2)
        cache.write_kv(0, on(cache, row * 2), on(cache, row * 2), slots3)
        for sid, value in ((2, 7), (3, 14)):
            k, v = cache.gather(sid, 0)
            k = k.to_numpy()
            assert np.array_equal(k[:6], before[0][0]) and (k[6] == value).all()
        assert np.array_equal(gathered(cache, 1)[1][1], before[1][1])   # layer 1 was copied too
        assert np.array_equal(gathered(cache, 3)[1][0][:6], before[1][0])


def test_gather_sees_copies_not_yet_run_by_a_write(device):
    with make(device) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=6)
        fill(cache, [1], np.random.default_rng(1))
        before = gathered(cache, 1)
        m.fork(1, 2)
        m.append(2, 1)                        # 2's last block: a fresh block, its copy pending
        k, v = cache.gather(2, 1)             # no write since: gather runs the copy first
        assert np.array_equal(k.to_numpy()[:6], before[1][0]) and np.array_equal(v.to_numpy()[:6], before[1][1])
        assert len(m.take_pending_copies()) == 0


def test_chained_copies_apply_in_order(device):
    """Pairs (a, b), (b, c): c must receive a's data, not b's old data."""
    with make(device) as cache:
        rng = np.random.default_rng(5)
        for sid in (1, 2, 3):
            cache.manager.add_sequence(sid, num_tokens=8)
        ref = fill(cache, [1, 2, 3], rng)
        t = [cache.manager.block_table(s) for s in (1, 2, 3)]
        pairs = np.array([[t[0][0], t[1][0]], [t[1][0], t[2][0]], [t[2][1], t[0][1]]], dtype=np.int32)
        cache.copy_blocks(pairs)
        K.copy_blocks([a for layer in ref for a in layer], pairs)
        assert_same(cache, ref)


@pytest.mark.parametrize("chain", [False, True])
def test_many_scattered_pairs_match_the_host_kernels(device, chain):
    """Hundreds of pairs in random order (a GPU takes them in one launch, by
    source block), and the same with one pair that reads a block an earlier one wrote."""
    with make(device, num_blocks=512, block_size=2) as cache:
        rng = np.random.default_rng(11)
        ref = reference(cache)
        slots = np.arange(cache.num_blocks * cache.block_size, dtype=np.int64)
        for layer in range(cache.num_layers):
            k, v = (rng.standard_normal((len(slots), 2, 8)).astype(np.float16) for _ in range(2))
            cache.write_kv(layer, on(cache, k), on(cache, v), slots)
            K.write_kv(ref[layer][0], ref[layer][1], k, v, slots)
        ids = rng.permutation(512)
        pairs = np.stack([ids[:200], ids[200:400]], axis=1).astype(np.int32)
        if chain:
            pairs[150] = [pairs[40, 1], ids[450]]
        cache.copy_blocks(pairs)
        K.copy_blocks([a for layer in ref for a in layer], pairs)
        assert_same(cache, ref)


def test_gather_matches_the_tables(device):
    with make(device) as cache:
        for sid, n in ((1, 0), (2, 5), (3, 16)):
            cache.manager.add_sequence(sid, num_tokens=n)
        ref = fill(cache, [1, 2, 3], np.random.default_rng(1))
        for sid in (1, 2, 3):
            for layer in range(2):
                k, v = cache.gather(sid, layer)
                n = cache.manager.num_tokens(sid)
                assert k.shape == (n, 2, 8) and k.dtype == "float16" and k.device == cache.device
                table = cache.manager.block_table(sid)
                assert np.array_equal(k.to_numpy(), K.gather_kv(ref[layer][0], table, n))
                assert np.array_equal(v.to_numpy(), K.gather_kv(ref[layer][1], table, n))


def test_swap_out_and_in_restores_data_tokens_and_salt(device):
    with make(device, num_blocks=8, enable_prefix_caching=True) as cache:
        m = cache.manager
        tokens = np.arange(10, dtype=np.int32)
        m.add_sequence(1, tokens, salt="tenant-a")
        m.add_sequence(2, num_tokens=7)
        fill(cache, [1, 2], np.random.default_rng(2))
        want = {sid: gathered(cache, sid) for sid in (1, 2)}
        salt_key = m.sequence_info(1)["salt_key"]
        cache.swap_out([1, 2])
        assert cache.swapped_sequences() == [1, 2] and cache.swapped_bytes() > 0
        assert len(m) == 0 and m.num_used_blocks == 0
        m.add_sequence(9, num_tokens=4 * 4)        # reuses the freed blocks (and evicts cached ones)
        m.remove_sequence(9)
        cache.swap_in([2, 1])
        assert cache.swapped_sequences() == []
        for sid in (1, 2):
            assert holds(cache, sid, want[sid])
        assert np.array_equal(m.sequence_tokens(1), tokens) and m.sequence_info(1)["salt_key"] == salt_key
        assert m.sequence_tokens(2) is None
        m.check_invariants()


def test_a_swap_out_that_runs_out_of_host_memory_halfway_moves_nothing(device, monkeypatch):
    """The host buffers of every named sequence are taken before any of them
    moves: when the second one's cannot be had, both stay in the cache."""
    from rocmforge import _kvcache

    class ShortNumpy:
        """numpy, except that the second host buffer for a swap cannot be had."""
        empties = 0

        def __getattr__(self, name):
            return getattr(np, name)

        def empty(self, *args, **kw):
            ShortNumpy.empties += 1
            if ShortNumpy.empties == 2:
                raise MemoryError("host memory exhausted")
            return np.empty(*args, **kw)

    with make(device, num_blocks=8) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=8)
        m.add_sequence(2, num_tokens=8)
        fill(cache, [1, 2], np.random.default_rng(8))
        want = {sid: gathered(cache, sid) for sid in (1, 2)}
        monkeypatch.setattr(_kvcache, "np", ShortNumpy())
        with pytest.raises(MemoryError):
            cache.swap_out([1, 2])
        monkeypatch.undo()
        assert cache.swapped_sequences() == [] and sorted(m.sequence_ids()) == [1, 2]
        for sid, w in want.items():
            assert holds(cache, sid, w)
        cache.swap_out([1, 2])
        cache.swap_in([1, 2])
        for sid, w in want.items():
            assert holds(cache, sid, w)
        m.check_invariants()


def test_a_swap_in_interrupted_before_its_data_is_back_leaves_nothing_cached_without_it(monkeypatch):
    """swap_in re-adds a sequence (its full blocks enter the prefix cache) before
    its K/V is copied back: interrupted in between, it must not leave those
    blocks cached, or the next prompt with those tokens would read zeros. Its
    prefix hits and other prompts stay cached."""
    from rocmforge import _kvcache
    with make("cpu", num_blocks=8, enable_prefix_caching=True) as cache:
        m = cache.manager
        tokens, other = list(range(100, 110)), list(range(100, 104)) + [7, 7, 7, 7]
        m.add_sequence(1, tokens)
        m.add_sequence(2, other)                    # sharing block 0
        fill(cache, [1, 2], np.random.default_rng(9))
        want, table = gathered(cache, 1), m.block_table(1)
        cache.swap_out([1])
        m.uncache_blocks(table[1:])                 # swap_in hits block 0 and copies the rest back
        m.remove_sequence(2)
        assert m.lookup_prefix(tokens) == 4 and m.lookup_prefix(other) == 8

        class Interrupted:
            def __getattr__(self, name):
                return getattr(np, name)

            def ascontiguousarray(self, a, *args, **kw):
                if a.dtype == np.uint8:             # the host copy, on its way back
                    raise KeyboardInterrupt
                return np.ascontiguousarray(a, *args, **kw)

        monkeypatch.setattr(_kvcache, "np", Interrupted())
        with pytest.raises(KeyboardInterrupt):
            cache.swap_in([1])
        monkeypatch.undo()
        assert cache.swapped_sequences() == [1] and 1 not in m
        assert m.lookup_prefix(tokens) == 4 and m.lookup_prefix(other) == 8
        cache.swap_in([1])
        assert holds(cache, 1, want)
        m.check_invariants()


def test_swap_in_hits_the_cached_prefix(device):
    with make(device, num_blocks=8, enable_prefix_caching=True) as cache:
        m = cache.manager
        m.add_sequence(1, np.arange(9, dtype=np.int32))
        fill(cache, [1], np.random.default_rng(4))
        want = gathered(cache, 1)
        cache.swap_out([1])
        cache.swap_in([1])
        assert m.num_cached_tokens(1) == 8                  # both full blocks were still cached
        for g, w in zip(gathered(cache, 1), want):
            assert all(np.array_equal(a, b) for a, b in zip(g, w))


def test_swap_is_all_or_nothing(device):
    with make(device, num_blocks=4) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=8)
        m.add_sequence(2, num_tokens=8)
        fill(cache, [1, 2], np.random.default_rng(6))
        with pytest.raises(rf.SequenceNotFound):
            cache.swap_out([1, 3])
        assert len(m) == 2 and cache.swapped_sequences() == []
        cache.swap_out([1, 2])
        m.add_sequence(3, num_tokens=4)                       # leaves room for only one of them
        with pytest.raises(rf.OutOfBlocks):
            cache.swap_in([1, 2])
        assert cache.swapped_sequences() == [1, 2] and list(m.sequence_ids()) == [3]
        m.check_invariants()
        with pytest.raises(rf.SequenceNotFound):
            cache.swap_in([7])
        with pytest.raises(rf.ArgumentValueError):
            cache.swap_out([3, 3])
        with pytest.raises(rf.ArgumentValueError):
            cache.drop_swapped([1, 1])
        assert cache.swapped_sequences() == [1, 2]
        cache.drop_swapped([1, 2])
        assert cache.swapped_sequences() == [] and cache.swapped_bytes() == 0


def test_compact_moves_data_and_gives_memory_back(device):
    with make(device, num_blocks=32) as cache:
        m = cache.manager
        want = with_holes(cache, 7)
        before = cache.nbytes
        old_view = np.from_dlpack(cache.key_cache(0)) if device == "cpu" else None
        moves = cache.compact()                    # keeps its size unless told to shrink
        assert len(moves) > 0 and cache.num_blocks == m.num_blocks == 32 and cache.nbytes == before
        assert m.block_table(1).max() < 12 and len(cache.compact()) == 0
        for sid, w in want.items():
            assert holds(cache, sid, w)
        cache.compact(shrink=True)
        assert cache.num_blocks == m.num_blocks == m.num_used_blocks == 12
        assert cache.nbytes == before * 12 // 32
        for sid, w in want.items():
            assert holds(cache, sid, w)
        if old_view is not None:
            old_view[...] = 0                      # the old storage stays alive for its export
        cache.grow(20)
        assert cache.num_blocks == m.num_blocks == 20
        m.add_sequence(100, num_tokens=8 * 4)
        assert not cache.key_cache(1).to_numpy()[12:].any()      # new blocks are zeroed
        m.check_invariants()


def test_compact_with_shrink_changes_nothing_when_the_smaller_storage_cannot_be_had(monkeypatch):
    """The smaller storage is allocated before anything moves: when it cannot
    be, the tables, the pool and the data are as they were, and a later try
    runs through."""
    from rocmforge import _kvcache
    with make("cpu", num_blocks=32) as cache:
        m = cache.manager
        want = with_holes(cache, 3)
        tables = {sid: m.block_table(sid).tolist() for sid in want}
        monkeypatch.setattr(_kvcache, "host_memory_available", lambda: 0)
        with pytest.raises(MemoryError, match="lower num_blocks"):
            cache.compact(shrink=True)
        assert cache.num_blocks == m.num_blocks == 32 and m.stats()["compaction_count"] == 0
        assert {sid: m.block_table(sid).tolist() for sid in tables} == tables
        monkeypatch.undo()
        moves = cache.compact(shrink=True)
        assert len(moves) and cache.num_blocks == m.num_blocks == 12
        for sid, w in want.items():
            assert holds(cache, sid, w)
        m.check_invariants()


def test_dlpack_exports_are_zero_copy_on_the_host():
    with make("cpu", dtype="float32") as cache:
        view = np.from_dlpack(cache.key_cache(1))
        assert view.shape == (16, 4, 2, 8) and view.dtype == np.float32
        cache.manager.add_sequence(1, num_tokens=3)
        rows = np.arange(48, dtype=np.float32).reshape(3, 2, 8)
        cache.write_kv(1, rows, rows, np.array([0, 1, 2], dtype=np.int64))
        assert np.array_equal(view[0, :3], rows)                 # the write is seen through the export
        view[0, 0] = -1                                          # and a write through it by gather
        assert (cache.gather(1, 1)[0].to_numpy()[0] == -1).all()
        capsule = cache.value_cache(0).__dlpack__(max_version=(1, 0))
        assert "dltensor_versioned" in repr(capsule)
        assert "dltensor" in repr(cache.value_cache(0).__dlpack__())
        with pytest.raises(BufferError):
            cache.value_cache(0).__dlpack__(copy=True)
        with pytest.raises(BufferError):
            cache.value_cache(0).__dlpack__(dl_device=(2, 0))
        cache.close()
        view[1] = 5                                              # the export kept its memory alive
        assert (view[1] == 5).all()


def test_write_kv_raw_writes_what_write_kv_writes(device):
    rng = np.random.default_rng(21)
    with make(device, dtype="bfloat16") as a, make(device, dtype="bfloat16") as b:
        for c in (a, b):
            c.manager.add_sequence(1, num_tokens=7)
        k = rng.standard_normal((7, 2, 8)).astype(np.float16)
        v = rng.standard_normal((7, 2, 8)).astype(np.float16)
        slots = np.array([3, 9, -1, 0, 12, 40, 63], dtype=np.int64)
        a.write_kv(np.int64(1), on(a, k), on(a, v), on(a, slots))     # a layer through __index__
        kd, vd, sd = on(b, k), on(b, v), on(b, slots)
        addr = (lambda x: x.ctypes.data) if b.device == "cpu" else (lambda x: x.ptr)
        b.write_kv_raw(1, addr(kd), addr(vd), addr(sd), 7, "float16")
        b.write_kv_raw(1, addr(kd), addr(vd), addr(sd), 0, "float16")          # nothing to do
        assert np.array_equal(a.key_cache(1).to_numpy(), b.key_cache(1).to_numpy())
        assert np.array_equal(a.value_cache(1).to_numpy(), b.value_cache(1).to_numpy())
        for args, exc in [((2, 1, 1, 1, 1, "float16"), rf.ArgumentValueError),
                          ((0, 1, 1, 1, 1, "int8"), rf.ArgumentTypeError),
                          ((0, 0, 1, 1, 1, "float16"), rf.ArgumentValueError),
                          ((0, 1, 1, 1, -1, "float16"), rf.ArgumentValueError)]:
            with pytest.raises(exc):
                b.write_kv_raw(*args)
        if b.device == "cpu":
            bad = np.array([0, 64 * 4], dtype=np.int64)
            before = b.key_cache(0).to_numpy()
            with pytest.raises(rf.ArgumentValueError, match=r"slot_mapping\[1\]"):
                b.write_kv_raw(0, kd.ctypes.data, vd.ctypes.data, bad.ctypes.data, 2, "float16")
            assert np.array_equal(before, b.key_cache(0).to_numpy())


@pytest.mark.parametrize("dtype, storage", [("float32", np.float32), ("float16", np.float16),
                                            ("bfloat16", np.uint16), ("fp8_e4m3", np.uint8), ("int8", np.int8)])
def test_numpy_asarray_views_a_host_array(dtype, storage):
    with make("cpu", dtype=dtype) as cache:
        cache.manager.add_sequence(1, num_tokens=3)
        rows = (np.arange(48, dtype=np.float32).reshape(3, 2, 8) % 7).astype(np.float16)
        cache.write_kv(0, rows, rows, np.array([0, 1, 2], dtype=np.int64))
        k, _ = cache.gather(1, 0)
        view = np.asarray(k)
        assert view.dtype == storage and view.shape == (3, 2, 8)
        assert np.array_equal(view, k.to_numpy())
        assert view.base is k.buffer                             # shared, not copied
        copied = np.array(k, copy=True)
        assert copied.flags.owndata and np.array_equal(copied, view)
        wide = np.asarray(k, dtype=np.float64)
        assert wide.dtype == np.float64 and np.array_equal(wide, view.astype(np.float64))
        with pytest.raises(ValueError):
            np.asarray(k, dtype=np.float64, copy=False)
        pool = np.asarray(cache.key_cache(0))
        cache.close()
        assert pool.shape == (16, 4, 2, 8) and np.array_equal(pool[0, :3], view)   # memory kept alive


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no GPU")
def test_numpy_asarray_of_a_gpu_array_says_to_copy():
    with make(GPU) as cache:
        with pytest.raises(rf.ArgumentTypeError, match="to_numpy"):
            np.asarray(cache.key_cache(0))


def test_close_is_once_and_use_after_close_raises(device):
    cache = make(device)
    cache.close()
    cache.close()
    assert cache.closed and cache.nbytes == 0
    k = np.zeros((1, 2, 8), dtype=np.float16)
    for call in (lambda: cache.write_kv(0, k, k, np.zeros(1, dtype=np.int64)), lambda: cache.key_cache(0),
                 lambda: cache.gather(1, 0), cache.compact, lambda: cache.swap_out([]), cache.synchronize):
        with pytest.raises(rf.ArgumentValueError, match="closed"):
            call()
    m = cache.manager                              # bookkeeping goes on, with no storage behind it
    m.add_sequence(1, np.arange(5, dtype=np.int32))
    m.append(1, np.arange(3, dtype=np.int32))
    assert m.num_tokens(1) == 8
    m.remove_sequence(1)
    m.check_invariants()


def test_an_engine_on_a_closed_cache_fails_its_steps_and_stays_live():
    from rocmforge.engine import Engine, Request, RequestState

    def model(batch):
        kv = np.zeros((len(batch.slots), 2, 8), np.float16)
        return {"tokens": [1] * len(batch.sampling), "keys": [kv] * 2, "values": [kv] * 2}

    cache = make("cpu")
    eng = Engine(cache, model)
    cache.close()
    eng.submit(Request("a", np.arange(5, dtype=np.int32), 2))
    done = eng.step()
    assert done[0].state is RequestState.FAILED and "closed" in eng.finished["a"].error
    assert not eng.has_work() and cache.manager.num_used_blocks == 0


def test_bad_input_changes_nothing(device):
    with make(device) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=2)
        m.fork(1, 2)
        slots = m.append(2, 1)                                  # queues a copy-on-write pair
        k = on(cache, np.ones((1, 2, 8), dtype=np.float16))
        bad = [
            ((0, k, k, np.array([64], dtype=np.int64)), rf.ArgumentValueError, "slot_mapping"),
            ((0, k, k, np.array([-2], dtype=np.int64)), rf.ArgumentValueError, "slot_mapping"),
            ((0, k, k, np.zeros(2, dtype=np.int64)), rf.ArgumentValueError, "int64"),
            ((0, k, k, np.zeros(1, dtype=np.int32)), rf.ArgumentValueError, "int64"),
            ((2, k, k, slots), rf.ArgumentValueError, "layer"),
            ((True, k, k, slots), rf.ArgumentTypeError, "layer"),
            ((1.0, k, k, slots), rf.ArgumentTypeError, "layer"),
            ((-1, k, k, slots), rf.ArgumentValueError, "layer"),
            ((2 ** 70, k, k, slots), rf.ArgumentValueError, "layer"),
            ((np.int64(-2 ** 40), k, k, slots), rf.ArgumentValueError, "layer"),
            ((0, on(cache, np.ones((1, 2, 4), dtype=np.float16)), k, slots), rf.ArgumentValueError, r"\[T, 2, 8\]"),
            ((0, k, on(cache, np.ones((1, 2, 8), dtype=np.float32)), slots), rf.ArgumentValueError, "same dtype"),
            ((0, np.ones((1, 2, 8), dtype=np.int32), k, slots), rf.ArgumentTypeError, "float"),
            ((0, [1, 2], k, slots), rf.ArgumentTypeError, "DLPack"),
        ]
        if device == "cpu":
            bad.append(((0, np.ones((1, 2, 16), dtype=np.float16)[:, :, ::2], k, slots),
                        rf.ArgumentValueError, "contiguous"))
        else:
            host = np.ones((1, 2, 8), dtype=np.float16)
            bad.append(((0, host, host, slots), rf.ArgumentValueError, "lives on cpu"))
        for args, exc, match in bad:
            with pytest.raises(exc, match=match):
                cache.write_kv(*args)
        assert len(m.take_pending_copies()) == 1                # still queued
        assert not cache.key_cache(0).to_numpy().any()
        with pytest.raises(rf.ArgumentTypeError):
            cache.write_kv(0, k, k, slots, stream="default")


def test_bad_configuration_and_devices():
    with pytest.raises(rf.ArgumentTypeError):
        rf.KvCache({"num_layers": 1}, "cpu")
    with pytest.raises(rf.InvalidConfiguration, match="fp8_e5m2"):
        make("cpu", dtype="fp8_e5m2")
    for device in ("gpu", "cuda:x", "cpu:0", 3):
        with pytest.raises((rf.ArgumentValueError, rf.ArgumentTypeError)):
            make(device)
    other = "hip:0" if INFO["backend"] == "cuda" else "cuda:0"
    with pytest.raises(rf.DeviceError, match="backend"):
        make(other)
    for scale in (0.0, -1.0, float("nan"), [1.0]):
        with pytest.raises(rf.ArgumentValueError, match="scale"):
            make("cpu", k_scale=scale)
    assert make("auto").device == (GPU or "cpu")


def test_compact_grow_and_close_are_serialized_with_writes_and_gathers(device):
    """Writers and readers on every layer while another thread compacts (moving
    the sequences' blocks), shrinks and grows the pool, then closes the cache.
    Every gather sees exactly its sequence's K/V, every compaction carries the
    data along, and once the cache is closed every call raises the closed error.

    Slots are stale after a compaction that moves their blocks (the README says
    so), so the compactor waits until every writer has finished a write since
    its last compaction: a stale write then lands only where no sequence's
    block is, or past the pool (ArgumentValueError, retried)."""
    L, bs, heads, dim, nseq = 3, 4, 2, 8, 4
    cache = make(device, layers=L, heads=heads, head_dim=dim, block_size=bs, num_blocks=128)
    m = cache.manager
    held = m.allocate(60).tolist()                # external blocks below the sequences: each one
    for sid in range(nseq):                       # dropped is a hole a sequence block moves into
        m.add_sequence(sid, num_tokens=9 + 2 * sid)

    def rows(sid, layer):
        n = 9 + 2 * sid
        base = np.arange(n, dtype=np.float32)[:, None, None] + 100 * sid + 1000 * layer
        return np.broadcast_to(base, (n, heads, dim)).astype(np.float16)

    def write(sid, layer):
        table = m.block_table(sid).astype(np.int64)
        slots = (table[:, None] * bs + np.arange(bs)).reshape(-1)[:9 + 2 * sid]
        k = rows(sid, layer)
        cache.write_kv(layer, on(cache, k), on(cache, -k), on(cache, slots))

    for sid in range(nseq):
        for layer in range(L):
            write(sid, layer)
    closed = threading.Event()
    ticks = [0] * L
    errors, counts = [], {"gathers": 0, "writes": 0, "moves": 0, "closed_errors": 0}

    def guarded(fn):
        def run(*args):
            try:
                fn(*args)
            except rf.ArgumentValueError as exc:
                if "closed" not in str(exc) or not closed.is_set():
                    errors.append(repr(exc))
                counts["closed_errors"] += 1
            except Exception as exc:      # reported below
                errors.append(repr(exc))
        return run

    @guarded
    def writer(layer):
        rng = np.random.default_rng(layer)
        while True:
            try:
                write(int(rng.integers(nseq)), layer)
                counts["writes"] += 1
            except rf.ArgumentValueError as exc:
                if "outside" not in str(exc):
                    raise
            ticks[layer] += 1

    @guarded
    def reader(seed):
        rng = np.random.default_rng(100 + seed)
        while True:
            sid, layer = int(rng.integers(nseq)), int(rng.integers(L))
            k, v = cache.gather(sid, layer)
            got = k.to_numpy()
            assert np.array_equal(got, rows(sid, layer)), (sid, layer, np.nonzero((got != rows(sid, layer)).any(axis=(1, 2)))[0].tolist(), got[:, 0, 0].tolist())
            assert np.array_equal(v.to_numpy(), -rows(sid, layer)), (sid, layer)
            counts["gathers"] += 1

    def sequence_blocks():
        return {b for sid in range(nseq) for b in m.block_table(sid).tolist()}

    @guarded
    def compactor():
        try:
            compact_cycles()
        finally:
            closed.set()
            cache.close()

    def compact_cycles():
        for cycle in range(20):
            m.decref(held[:3])                  # holes below the sequences
            del held[:3]
            seen = list(ticks)
            while any(t == s for t, s in zip(ticks, seen)) and not errors:
                threading.Event().wait(0.0005)
            before = sequence_blocks()
            moves = dict(cache.compact(shrink=cycle % 2 == 0).tolist())
            counts["moves"] += len(before - sequence_blocks())
            held[:] = sorted(moves.get(b, b) for b in held)
            if cycle % 2:
                cache.grow(cache.num_blocks + 6)

    threads = ([threading.Thread(target=writer, args=(layer,), daemon=True) for layer in range(L)]
               + [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
               + [threading.Thread(target=compactor, daemon=True)])
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)                 # switch threads often: races show up
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
    assert counts["moves"] >= 10 and counts["gathers"] > 0 and counts["writes"] > 0
    assert counts["closed_errors"] == L + 2                # each writer and reader met the close
    with pytest.raises(rf.ArgumentValueError, match="closed"):
        cache.gather(0, 0)


def test_apply_pending_copies_runs_the_managers_copies_now(device):
    with make(device) as cache:
        m = cache.manager
        m.add_sequence(1, num_tokens=6)                         # its second block is partly filled
        slots = m.block_table(1).astype(np.int64)[:, None] * 4 + np.arange(4)
        k = np.arange(6 * 2 * 8, dtype=np.float32).reshape(6, 2, 8).astype(np.float16)
        cache.write_kv(0, on(cache, k), on(cache, k), on(cache, slots.reshape(-1)[:6]))
        m.fork(1, 2)
        m.append(2, 1)                                          # copy-on-write: queued (src, dst)
        src, dst = m.block_table(1)[1], m.block_table(2)[1]
        cache.apply_pending_copies()
        assert len(m.take_pending_copies()) == 0
        kc = cache.key_cache(0).to_numpy()
        assert np.array_equal(kc[dst], kc[src]) and kc[dst].any()
        cache.apply_pending_copies()                            # nothing pending: nothing changes
        assert np.array_equal(cache.key_cache(0).to_numpy(), kc)


def test_copy_blocks_refuses_bad_pairs_and_copies_nothing(device):
    with make(device) as cache:
        k = np.ones((4, 2, 8), dtype=np.float16)
        cache.write_kv(0, on(cache, k), on(cache, k), on(cache, np.arange(4, dtype=np.int64)))
        before = [cache.key_cache(layer).to_numpy() for layer in range(2)]
        for bad, exc in ((np.array([[0, 1], [0, 16]], dtype=np.int32), rf.BlockNotFound),
                         (np.array([[-1, 3]], dtype=np.int32), rf.BlockNotFound),
                         (np.array([[0, 1]], dtype=np.int64), rf.ArgumentValueError),
                         (np.array([0, 1], dtype=np.int32), rf.ArgumentValueError),
                         (np.zeros((1, 3), dtype=np.int32), rf.ArgumentValueError)):
            with pytest.raises(exc):
                cache.copy_blocks(bad)
        assert all(np.array_equal(cache.key_cache(layer).to_numpy(), b) for layer, b in enumerate(before))
        cache.copy_blocks(np.zeros((0, 2), dtype=np.int32))     # no pairs: fine
        cache.copy_blocks(np.array([[0, 5]], dtype=np.int32))
        assert np.array_equal(cache.key_cache(0).to_numpy()[5], before[0][0])
    with pytest.raises(rf.ArgumentValueError, match="closed"):
        cache.copy_blocks(np.array([[0, 1]], dtype=np.int32))


def test_a_cache_larger_than_free_memory_fails_fast_with_memory_error():
    from rocmforge.config import host_memory_available
    free = host_memory_available()
    if free is None:
        pytest.skip("free host memory is unknown on this platform")
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match="lower num_blocks or memory_budget"):
        rf.KvCache(CacheConfig(32, 8, 128, memory_budget=2 * free + (1 << 30)), device="cpu")
    assert time.perf_counter() - t0 < 5                # refused before touching the memory
    with make("cpu", num_blocks=8) as cache:           # a grow past it changes nothing
        cache.manager.add_sequence(1, num_tokens=5)
        blocks = 2 * free // cache.config.bytes_per_block + 8     # bytes_per_block: all layers, K and V
        with pytest.raises(MemoryError):
            cache.grow(min(blocks, 2**31 - 1))
        assert cache.num_blocks == 8 and cache.manager.num_blocks == 8
        cache.manager.check_invariants()
