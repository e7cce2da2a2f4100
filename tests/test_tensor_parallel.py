"""TensorParallelKvCache: one manager, K/V split by kv heads across ranks. The
oracle is a single KvCache with every head, driven by the same operations:
tables, slots and every sequence's K/V (the ranks' heads put side by side)
must equal it after each step, through copy-on-write, the host tier, swap,
compaction, grow and copy_blocks. Host ranks ("cpu") run in CI; the GPU case
puts its two ranks on two GPUs where there are two, else on one."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rocmforge as rf
from rocmforge.attention import paged_decode
from rocmforge.config import CacheConfig

INFO = rf.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
BS, HEADS, DIM, LAYERS = 4, 4, 8, 2


def config(num_blocks=24, heads=HEADS, dtype="float16"):
    return CacheConfig(LAYERS, heads, DIM, block_size=BS, num_blocks=num_blocks, dtype=dtype)


def pair(ranks=2, device="cpu", host_blocks=0, **kw):
    """A single cache with every head, and a tensor-parallel one, over the same options
    (the host tier sized in bytes for the one, in blocks for the other)."""
    cfg = config(**kw)
    host = {"host_cache": host_blocks * cfg.bytes_per_block} if host_blocks else {}
    tp_host = {"host_cache_blocks": host_blocks} if host_blocks else {}
    return (rf.KvCache(cfg, device, enable_prefix_caching=True, **host),
            rf.TensorParallelKvCache(cfg, [device] * ranks, enable_prefix_caching=True, **tp_host))


def on(cache, arr):
    """A float16 numpy array where cache can read it (a copy on its GPU, if it has one)."""
    arr = np.ascontiguousarray(arr)
    if cache.device == "cpu":
        return arr
    buf = rf.DeviceBuffer(arr.nbytes, int(cache.device.split(":")[1]))
    buf.copy_from_host(arr)
    return rf.DeviceArray(buf, arr.shape, "float16")


def write(single, tp, slots, rng):
    """Random K/V at slots in every layer: all heads to the single cache, each rank's to it."""
    slots = np.asarray(slots, dtype=np.int64)
    for layer in range(LAYERS):
        k = rng.standard_normal((len(slots), HEADS, DIM)).astype(np.float16)
        v = rng.standard_normal((len(slots), HEADS, DIM)).astype(np.float16)
        single.write_kv(layer, on(single, k), on(single, v), slots)
        for r, rank in enumerate(tp.ranks):
            h = tp.heads(r)
            rank.write_kv(layer, on(rank, k[:, h.start:h.stop]), on(rank, v[:, h.start:h.stop]), slots)


def same(single, tp):
    """Tables and every sequence's K/V equal; both managers consistent."""
    single.manager.check_invariants()
    tp.manager.check_invariants()
    ids = single.manager.sequence_ids().tolist()
    assert ids == tp.manager.sequence_ids().tolist()
    for sid in ids:
        assert np.array_equal(single.manager.block_table(sid), tp.manager.block_table(sid))
        for layer in range(LAYERS):
            k, v = (a.to_numpy() for a in single.gather(sid, layer))
            tk, tv = tp.gather(sid, layer)
            assert np.array_equal(k, tk) and np.array_equal(v, tv), (sid, layer)


OPS = st.lists(st.tuples(st.sampled_from(["add", "append", "fork", "remove", "compact", "shrink", "swap_out",
                                          "swap_in", "grow", "copy"]),
                         st.integers(0, 5), st.lists(st.integers(0, 3), min_size=1, max_size=9)),
               min_size=1, max_size=30)


def run_ops(ops, ranks, host_blocks, seed):
    """Apply (op, k, tokens) steps to both caches, comparing after each; k picks the
    sequence an operation acts on among the live (or swapped-out) ones. Returns the stats."""
    rng = np.random.default_rng(seed)
    single, tp = pair(ranks, host_blocks=host_blocks, num_blocks=12)
    with single, tp:
        for step, (op, k, tokens) in enumerate(ops):
            live = single.manager.sequence_ids().tolist()
            swapped = single.swapped_sequences()
            sid = live[k % len(live)] if live else k
            results = []
            for cache in (single, tp):
                try:
                    if op == "add":
                        results.append(cache.manager.add_sequence(100 + step, tokens))
                    elif op == "append":
                        results.append(cache.manager.append(sid, tokens))
                    elif op == "fork":
                        results.append(cache.manager.fork(sid, 100 + step))
                    elif op == "remove":
                        results.append(cache.manager.remove_sequence(sid))
                    elif op in ("compact", "shrink"):
                        results.append(cache.compact(shrink=op == "shrink").tolist())
                    elif op == "swap_out":
                        results.append(cache.swap_out([sid]))
                    elif op == "swap_in":
                        results.append(cache.swap_in([swapped[k % len(swapped)]] if swapped else [k]))
                    elif op == "grow":
                        results.append(cache.grow(cache.num_blocks + tokens[0]))
                    else:
                        used = [b for s in live for b in cache.manager.block_table(s)]
                        pairs = np.array([[used[k % len(used)], used[(k + 1) % len(used)]]] if used else
                                         np.empty((0, 2)), dtype=np.int32)
                        results.append(cache.copy_blocks(pairs))
                except rf.KvCacheError as exc:
                    results.append(type(exc))
            a, b = results
            if isinstance(a, np.ndarray):
                assert np.array_equal(a, b)
                write(single, tp, a, rng)
            else:
                assert a == b, (op, a, b)
            same(single, tp)
        a, b = tp.stats(), single.stats()
        a.pop("last_compaction_ms"), b.pop("last_compaction_ms")
        assert a == b
    return a


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, ranks=st.sampled_from([1, 2, 4]), host_blocks=st.sampled_from([0, 6]), seed=st.integers(0, 99))
def test_every_operation_leaves_the_ranks_equal_to_one_cache_with_every_head(ops, ranks, host_blocks, seed):
    run_ops(ops, ranks, host_blocks, seed)


def test_a_scripted_run_covers_copy_on_write_the_host_tier_and_swap():
    """The same comparison over steps chosen to reach what random ones rarely do."""
    a, x1, x2, y = [1, 2, 3, 4, 5, 6], list(range(10, 18)) + [0], list(range(20, 28)) + [0], list(range(40, 76))
    ops = [("add", 0, a), ("fork", 0, [0]), ("append", 1, [3]),             # copy-on-write
           ("remove", 0, [0]), ("remove", 0, [0]), ("add", 0, x1), ("remove", 0, [0]), ("add", 0, x2),
           ("remove", 0, [0]), ("add", 0, y),                                  # evicts cached blocks: offload
           ("remove", 0, [0]), ("add", 0, x1),                                 # a hit in the tier: reload
           ("add", 0, a), ("swap_out", 0, [0]), ("copy", 0, [0]), ("compact", 0, [0]), ("swap_in", 0, [0]),
           ("shrink", 0, [0]), ("grow", 0, [3])]
    stats = run_ops(ops, 2, 6, 0)
    assert stats["cow_copies"] > 0 and stats["host_offloaded_blocks"] > 0 and stats["host_reloaded_blocks"] > 0
    assert stats["prefix_hit_tokens"] > 0 and stats["compaction_count"] == 2


def test_a_shrink_that_one_rank_cannot_allocate_changes_nothing(monkeypatch):
    """compact(shrink=True) allocates every rank's smaller storage before
    anything moves: when the second rank's cannot be had, every rank, the
    tables and the data are as they were; a later try runs through."""
    from rocmforge import _kvcache
    rng = np.random.default_rng(11)
    single, tp = pair()
    with single, tp:
        for sid in range(6):
            slots = [c.manager.add_sequence(sid, num_tokens=6) for c in (single, tp)][0]
            write(single, tp, slots, rng)
        for sid in (0, 2, 4):
            for c in (single, tp):
                c.manager.remove_sequence(sid)
        free = iter([None, 0])                      # the first rank's check passes, the second's fails
        monkeypatch.setattr(_kvcache, "host_memory_available", lambda: next(free))
        with pytest.raises(MemoryError):
            tp.compact(shrink=True)
        assert [r.num_blocks for r in tp.ranks] == [24, 24] and tp.manager.num_blocks == 24
        same(single, tp)
        monkeypatch.undo()
        for c in (single, tp):
            c.compact(shrink=True)
        assert [r.num_blocks for r in tp.ranks] == [6, 6] and tp.manager.num_blocks == 6
        same(single, tp)


def test_copy_on_write_reaches_every_rank_before_its_next_read():
    rng = np.random.default_rng(1)
    single, tp = pair()
    with single, tp:
        slots = [c.manager.add_sequence(0, [1, 2, 3, 4, 5, 6]) for c in (single, tp)][0]
        write(single, tp, slots, rng)
        for cache in (single, tp):
            cache.manager.fork(0, 1)
            cache.manager.append(1, [7])         # the shared partly filled block is copied first
        tp.ranks[1].apply_pending_copies()       # rank 1 takes the queue: rank 0 keeps its share
        assert len(tp.manager.take_pending_copies()) == 0
        same(single, tp)                         # rank 0's gather applies its share first


def test_calls_that_change_the_manager_go_through_the_group():
    _, tp = pair()
    with tp:
        tp.manager.add_sequence(0, [1, 2, 3])
        for call in (lambda r: r.swap_out([0]), lambda r: r.swap_in([0]), lambda r: r.compact(),
                     lambda r: r.grow(64)):
            with pytest.raises(rf.KvCacheError, match="TensorParallelKvCache"):
                call(tp.ranks[0])
        assert tp.ranks[0].manager is tp.manager and tp.ranks[1].manager is tp.manager
        assert tp.ranks[1].key_cache(0).shape == (24, BS, HEADS // 2, DIM)   # DLPack: a rank's heads
        assert list(tp.heads(1)) == [2, 3] and tp.num_ranks == 2
    assert tp.closed and all(r.closed for r in tp.ranks)


def test_bad_arguments_are_refused_before_anything_is_allocated():
    before = rf.live_buffers()
    with pytest.raises(rf.InvalidConfiguration, match="do not divide"):
        rf.TensorParallelKvCache(config(heads=4), ["cpu"] * 3)
    with pytest.raises(rf.ArgumentTypeError):
        rf.TensorParallelKvCache(config(), "cpu")
    with pytest.raises(rf.ArgumentTypeError):
        rf.TensorParallelKvCache(config(), [])
    with pytest.raises(rf.ArgumentValueError, match="not both"):
        rf.TensorParallelKvCache(config(), ["cpu"] * 2, enable_prefix_caching=True, host_cache="1MiB",
                                 host_cache_blocks=4)
    with pytest.raises(rf.KvCacheError):
        rf.TensorParallelKvCache(config(), ["cpu", "nonsense"])     # the first rank is closed again
    assert rf.live_buffers() == before
    _, tp = pair()
    with tp:
        with pytest.raises(rf.BlockNotFound):
            tp.copy_blocks(np.array([[0, 99]], np.int32))
        with pytest.raises(rf.ArgumentValueError):
            tp.copy_blocks(np.array([1, 2, 3], np.int32))
        with pytest.raises(rf.SequenceNotFound):
            tp.swap_out([5])
        with pytest.raises(rf.SequenceNotFound):
            tp.drop_swapped([5])
        with pytest.raises(rf.InvalidConfiguration):
            tp.grow(2)
    with pytest.raises(rf.ArgumentValueError, match="closed"):
        tp.compact()


def test_each_ranks_attention_is_its_share_of_the_whole():
    rng = np.random.default_rng(3)
    single, tp = pair()
    with single, tp:
        for sid, n in enumerate([5, 13]):
            slots = [c.manager.add_sequence(sid, list(range(sid, sid + n))) for c in (single, tp)][0]
            write(single, tp, slots, rng)
        q = rng.standard_normal((2, 2 * HEADS, DIM)).astype(np.float32)      # GQA 2
        whole = paged_decode(q, single, 1, single.manager.block_tables([0, 1]), [5, 13]).to_numpy()
        for r, rank in enumerate(tp.ranks):
            h = tp.heads(r)
            part = paged_decode(np.ascontiguousarray(q[:, 2 * h.start:2 * h.stop]), rank, 1,
                                tp.manager.block_tables([0, 1]), [5, 13]).to_numpy()
            assert np.array_equal(part, whole[:, 2 * h.start:2 * h.stop])


def test_ranks_written_from_their_own_threads_while_sequences_fork():
    """One thread per rank writes its heads; the main thread forks and appends,
    queueing copy-on-write copies that every rank must apply before its writes."""
    rng = np.random.default_rng(4)
    _, tp = pair(ranks=2, num_blocks=256)
    with tp:
        m = tp.manager
        m.add_sequence(0, list(range(6)))
        slots = {}
        for i in range(1, 40):
            m.fork(0 if i == 1 else i - 1, i)
            slots[i] = m.append(i, [100 + i])
        values = {i: rng.standard_normal((1, HEADS, DIM)).astype(np.float16) for i in slots}
        errors = []

        def worker(r):
            try:
                h = tp.heads(r)
                for i, s in slots.items():
                    part = np.ascontiguousarray(values[i][:, h.start:h.stop])
                    tp.ranks[r].write_kv(0, part, part, s)
            except BaseException as exc:         # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in slots:
            k, _ = tp.gather(i, 0)
            assert np.array_equal(k[-1], values[i][0])
        m.check_invariants()


@pytest.mark.parametrize("where", ["cpu", pytest.param("gpu", marks=[
    pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no GPU")])])
def test_two_ranks_equal_one_cache_through_every_whole_cache_call(where):
    """On GPUs: ranks on GPUs 0 and 1 when there are two, else both on GPU 0."""
    rng = np.random.default_rng(5)
    devices = ["cpu", "cpu"] if where == "cpu" else [GPU, f"{INFO['backend']}:{min(1, len(INFO['devices']) - 1)}"]
    cfg = config()
    opts = dict(enable_prefix_caching=True, host_cache=4 * cfg.bytes_per_block)
    single, tp = rf.KvCache(cfg, devices[0], **opts), rf.TensorParallelKvCache(cfg, devices, **opts)
    assert [r.device for r in tp.ranks] == devices
    with single, tp:
        for sid, tokens in enumerate([[1, 2, 3, 4, 5], [1, 2, 3, 4, 9, 9, 9]]):
            slots = [c.manager.add_sequence(sid, tokens) for c in (single, tp)][0]
            write(single, tp, slots, rng)
        for c in (single, tp):
            c.manager.fork(1, 7)
            c.manager.append(7, [3])
            c.swap_out([0])
            c.compact(shrink=True)
            c.grow(40)
            c.swap_in([0])
        same(single, tp)
        tp.synchronize()
