"""The core when host memory runs out: the stateful machines of test_stateful.py,
where every call first meets an allocation failure at each allocation it makes
in turn (the first, then the second, ...) before it runs through. A call that
fails must raise MemoryError and change nothing anyone can observe (tables,
refcounts, LRU order, counters, events, invariants); the call that runs through
is then compared with the reference model as usual, so no failed attempt may
leave a trace that later calls would show."""

import pytest

import rocmforge
import test_stateful as base
from rocmforge import _core


def observed(core):
    """Everything a caller can read without consuming it."""
    ids = core.sequence_ids().tolist()
    seqs = []
    for sid in ids:
        toks = core.sequence_tokens(sid)
        info = core.sequence_info(sid)
        seqs.append((core.block_table(sid).tolist(), core.num_tokens(sid), None if toks is None else toks.tolist(),
                     core.num_cached_tokens(sid), info["access_count"], info["shard"]))
    state = dict(num_blocks=core.num_blocks, free=core.num_free_blocks, ids=ids, seqs=seqs,
                 refs=[core.refcount(b) for b in range(core.num_blocks)], stats=core.stats(),
                 fragmentation=core.fragmentation_ratio())
    if core.enable_prefix_caching:
        state.update(cached=core.num_cached_blocks, evictable=core.num_evictable_blocks)
    return state


def under_faults(core, call, failures):
    """call() under an allocation failure at each allocation it makes in turn
    (failures[0] counts them), each failed attempt checked to have changed
    nothing; then what it returns, or raises, once it runs through. The
    caller has taken the events of earlier calls."""
    n = 1
    while True:
        before = observed(core)
        _core._fail_allocation(n)
        try:
            return call()
        except MemoryError:
            assert _core._fail_allocation(0) == 0, "MemoryError without the injected failure"
            core.check_invariants()
            assert core.take_events() == [], f"a failed call (fault {n}) emitted events"
            after = observed(core)
            changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
            assert not changed, f"a failed call (fault {n}) changed {changed}"
            failures[0] += 1
            n += 1
        finally:
            _core._fail_allocation(0)


class Faults:
    """Mixed into a machine of test_stateful: its calls run under allocation faults."""

    failures = [0]

    def both(self, core_fn, model_fn):
        return super().both(lambda: under_faults(self.core, core_fn, self.failures), model_fn)


class CoreUnderFaults(Faults, base.CoreVsModel):
    pass


class PrefixCoreUnderFaults(Faults, base.PrefixCoreVsModel):
    pass


TestCoreUnderFaults = CoreUnderFaults.TestCase
TestPrefixCoreUnderFaults = PrefixCoreUnderFaults.TestCase


def test_the_injected_failure_is_a_memory_error_that_changes_nothing():
    """The hook itself: a call that must grow its table fails at that growth and
    leaves the sequence as it was; disarmed, the same call runs."""
    m = rocmforge.BlockManager(200, 1)
    m.add_sequence(0, num_tokens=64)            # a table of 64 blocks is full
    _core._fail_allocation(1)
    try:
        with pytest.raises(MemoryError):
            m.append(0, 1)
        assert _core._fail_allocation(0) == 0
    finally:
        _core._fail_allocation(0)
    assert m.num_tokens(0) == 64 and m.num_used_blocks == 64
    m.check_invariants()
    assert m.append(0, 1).tolist() == [64]


def outcome(m, op):
    """op(m)'s result as plain lists and reprs, or the class of the KvCacheError it raised."""
    try:
        result = op(m)
    except rocmforge.KvCacheError as exc:
        return type(exc)
    parts = result if isinstance(result, tuple) else (result,)
    return [p.tolist() if hasattr(p, "tolist") else [repr(e) for e in p] if isinstance(p, list) else p
            for p in parts]


def settled(m):
    """observed() without the one timing (last_compaction_ms)."""
    state = observed(m)
    state["stats"].pop("last_compaction_ms")
    return state


def random_call(rng, live, held, stems, fresh):
    """One random call (a function of the manager) and whether it gives back
    block ids to hold; updates the lists of live sequences and held ids."""
    r = rng.random()
    if r < 0.3 or not live:
        sid, salt = fresh(), rng.choice([None, None, 7])
        prompt = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(9))]
        live.append(sid)
        return lambda x: x.add_sequence(sid, prompt, salt=salt), False
    if r < 0.45:
        ids = rng.sample(live, k=min(len(live), rng.randint(1, 3)))
        counts = [rng.randrange(6) for _ in ids]
        toks = [rng.randrange(3) for _ in range(sum(counts))]
        return lambda x: x.append_batch(ids, counts, tokens=toks), False
    if r < 0.52:
        src, dst = rng.choice(live), fresh()
        live.append(dst)
        return lambda x: x.fork(src, dst), False
    if r < 0.7:
        sid = live.pop(rng.randrange(len(live)))
        return lambda x: x.remove_sequence(sid), False
    if r < 0.75:
        prompt = rng.choice(stems) + [0]
        return lambda x: x.acquire_prefix(prompt), True
    if r < 0.8:
        n = rng.randint(1, 3)
        return lambda x: x.allocate(n), True
    if r < 0.84 and held:
        ids = held.pop()
        return lambda x: x.decref(ids), False
    if r < 0.87:
        return lambda x: x.compact(), False
    if r < 0.9:
        k = rng.randint(1, 4)
        return lambda x: x.grow(min(x.num_blocks + k, 32)), False
    if r < 0.93:
        k = rng.randint(1, 4)
        return lambda x: x.shrink(max(1, x.num_blocks - k)), False
    if r < 0.94:
        return lambda x: x.reset_prefix_cache(), False
    if r < 0.96:
        ids = [rng.randrange(32) for _ in range(rng.randint(1, 3))]
        return lambda x: x.uncache_blocks(ids), False
    return lambda x: x.take_evicted(), False


def make_room_for_copies(x):
    """Grow the copy queue's capacity past what any later call here needs. An
    offload into the tier that cannot grow the queue is the one allocation
    failure the core absorbs (the tier drops the block, as it would without
    room), so a call could run through a fault and leave its twin behind."""
    x.grow(64)
    for sid, first in ((10**9, 0), (10**9 + 1, 10**6)):
        x.add_sequence(sid, list(range(first, first + 64 * 4)))
        x.remove_sequence(sid)                  # the second evicts all 64 blocks of the first
    x.take_pending_copies()
    x.reset_prefix_cache()
    x.shrink(24)
    x.take_events()


@pytest.mark.parametrize("seed", range(12))
def test_a_host_tier_and_shards_under_allocation_faults(seed):
    """A manager with a host tier (and, for odd seeds, two shards) runs random
    calls under allocation faults beside a twin that runs the same calls
    without them: prompts that share stems (so the pool evicts into the tier
    and brings blocks back), appends, forks, removals, external references,
    compaction, grow and shrink, and resets. After each call the two agree on
    everything observable, and give the same pending copies and events."""
    import random
    rng = random.Random(seed)
    kw = dict(enable_prefix_caching=True, enable_events=True, host_cache_blocks=rng.choice([3, 16]),
              evict_sequences=rng.random() < 0.5, eviction_policy=rng.choice(["lru", "arc"]),
              host_eviction_policy=rng.choice(["lru", "arc"]), shards=1 + seed % 2)
    twin, m = rocmforge.BlockManager(24, 4, **kw), rocmforge.BlockManager(24, 4, **kw)
    for x in (twin, m):
        make_room_for_copies(x)
    stems = [list(range(100 * k, 100 * k + 4 * rng.randint(1, 6))) for k in range(8)]
    live, held, ids, failures = [], [], iter(range(10**6)), [0]
    for step in range(1500):
        call, holds = random_call(rng, live, held, stems, lambda: next(ids))
        expected = outcome(twin, call)
        got = outcome(m, lambda x: under_faults(x, lambda: call(x), failures))
        assert got == expected, (step, got, expected)
        if holds and isinstance(got, list):
            held.append(got[0])
        m.check_invariants()
        a, b = settled(m), settled(twin)
        assert a == b, (step, {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "stats"},
                        {k: (a["stats"][k], b["stats"][k]) for k in a["stats"] if a["stats"][k] != b["stats"][k]})
        drain = lambda x: (x.take_pending_copies(), x.take_events())     # noqa: E731
        assert outcome(m, drain) == outcome(twin, drain), step
        live[:] = [sid for sid in live if sid in twin]     # evicted, or refused
    assert failures[0] > 300, failures


def test_taking_the_copies_of_every_shard_is_all_or_nothing():
    """Copy-on-write copies queued in two shards: a take that cannot get the
    memory to gather them leaves every one queued."""
    m = rocmforge.BlockManager(32, 4, shards=2)
    for shard, sid in ((0, 1), (1, 10)):
        m.bind_thread(shard)
        m.add_sequence(sid, num_tokens=2)
        m.fork(sid, sid + 1)
        m.append(sid + 1, 1)                    # the shared partly filled block is copied first
    copies, refused = [], 0
    for n in (1, 2, 3):                         # the first, second or third allocation of the take fails
        _core._fail_allocation(n)
        try:
            copies += m.take_pending_copies().tolist()
        except MemoryError:
            refused += 1
        finally:
            _core._fail_allocation(0)
    copies += m.take_pending_copies().tolist()
    assert refused and len(copies) == 2
    assert copies[0][0] == m.block_table(1)[0] and copies[1][0] == m.block_table(10)[0]
    m.check_invariants()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_threads_meet_allocation_faults_without_deadlock_or_loss(shards):
    """Four threads add prompts that share stems, append, fork, remove, take
    and drop prefix references and drain the queues, while a fifth keeps
    arming the allocation-fault hook: calls fail with MemoryError at random
    points in any thread. No thread hangs, the invariants hold, and once every
    thread has released what it holds, nothing is left (tools/tsan.sh runs
    this under ThreadSanitizer)."""
    import random
    import threading
    import time
    m = rocmforge.BlockManager(600, 4, shards=shards, enable_prefix_caching=True, enable_events=True,
                               host_cache_blocks=32, evict_sequences=shards != 2)
    stems = [list(range(100 * k, 100 * k + 12)) for k in range(6)]
    errors, refused, stop = [], [0] * 4, threading.Event()

    def worker(tid):
        rng = random.Random(tid)
        m.bind_thread(tid % shards)
        mine, held = [], []
        try:
            for i in range(3000):
                r = rng.random()
                try:
                    if r < 0.3 or not mine:
                        m.add_sequence(tid * 10**6 + i, rng.choice(stems) + [rng.randrange(5)] * rng.randrange(9))
                        mine.append(tid * 10**6 + i)
                    elif r < 0.5:
                        ids = rng.sample(mine, k=min(3, len(mine)))
                        m.append_batch(ids, [1] * len(ids), tokens=[1] * len(ids))
                    elif r < 0.6:
                        m.fork(rng.choice(mine), tid * 10**6 + i)
                        mine.append(tid * 10**6 + i)
                    elif r < 0.85:
                        m.remove_sequence(mine.pop(rng.randrange(len(mine))))
                    elif r < 0.9:
                        held.append(m.acquire_prefix(rng.choice(stems)))
                    elif r < 0.95 and held:
                        m.decref(held.pop())
                    else:
                        m.take_pending_copies()
                        m.take_evicted()
                except MemoryError:
                    refused[tid] += 1
                except (rocmforge.OutOfBlocks, rocmforge.SequenceNotFound):
                    mine[:] = [s for s in mine if s in m]   # evicted (evict_sequences), or never added
            for sid in mine:
                if sid in m:
                    m.remove_sequence(sid)
            for ids in held:
                m.decref(ids)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def faulter():
        rng = random.Random(shards)
        while not stop.is_set():
            _core._fail_allocation(rng.randint(1, 20))
            time.sleep(0.0002)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    arming = threading.Thread(target=faulter)
    arming.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop.set()
    arming.join()
    _core._fail_allocation(0)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors[:3]
    assert sum(refused) > 0
    m.take_pending_copies()
    m.check_invariants()
    assert len(m) == 0 and m.num_used_blocks == 0
