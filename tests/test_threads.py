"""Many threads on one manager: every thread's own view stays exact, nothing is lost."""

import random
import threading

import numpy as np
import pytest

import rocmforge as rf

THREADS = 16
ROOTS = 4          # shared sequences every thread forks from
STEPS = 1500


def worker(m, tid, errors, ledger, barrier, refused):
    """Random operations on sequences and blocks this thread owns (forks share root
    blocks). An operation refused with OutOfBlocks changes nothing (all or
    nothing): the worker counts it in refused[tid] and goes on."""
    rng = random.Random(tid)
    base = (tid + 1) * 10**6
    seqs = {}       # seq_id -> expected num_tokens
    blocks = []     # external references this thread holds
    next_id = base
    barrier.wait()
    try:
        for _ in range(STEPS):
            try:
                next_id = step(m, rng, seqs, blocks, next_id)
            except rf.OutOfBlocks:
                refused[tid] += 1
            for sid in list(seqs)[:2]:
                assert m.num_tokens(sid) == seqs[sid]
    except Exception as exc:  # noqa: BLE001 - reported to the main thread
        errors.append((tid, repr(exc)))
    ledger[tid] = (seqs, blocks)


def step(m, rng, seqs, blocks, next_id):
    """One random operation; returns the next unused sequence id."""
    op = rng.random()
    if op < 0.15:
        n = rng.randrange(0, 40)
        m.add_sequence(next_id, num_tokens=n)
        seqs[next_id] = n
        return next_id + 1
    if op < 0.25:
        m.fork(rng.randrange(ROOTS), next_id)
        seqs[next_id] = m.num_tokens(next_id)
        return next_id + 1
    if op < 0.55 and seqs:
        ids = rng.sample(sorted(seqs), k=min(len(seqs), rng.randrange(1, 9)))
        counts = [rng.randrange(0, 5) for _ in ids]
        slots = m.append_batch(np.array(ids, dtype=np.int64), np.array(counts, dtype=np.int32))
        assert len(slots) == sum(counts)
        for sid, c in zip(ids, counts):
            seqs[sid] += c
    elif op < 0.7 and seqs:
        sid = rng.choice(sorted(seqs))
        m.remove_sequence(sid)
        del seqs[sid]
    elif op < 0.8:
        blocks.extend(m.allocate(rng.randrange(0, 4)).tolist())
    elif op < 0.85 and blocks:
        b = rng.choice(blocks)
        m.incref([b])
        blocks.append(b)
    elif op < 0.95 and blocks:
        k = rng.randrange(1, len(blocks) + 1)
        m.decref(blocks[:k])
        del blocks[:k]
    else:
        m.take_pending_copies()
    return next_id


@pytest.mark.parametrize("block_size, shards", [(1, 1), (16, 1), (16, 16)])
def test_sixteen_threads_private_and_forked_sequences(block_size, shards):
    m = rf.BlockManager(200_000 // block_size + 4096, block_size, shards=shards)
    for root in range(ROOTS):
        m.add_sequence(root, num_tokens=block_size * 3 + 1)  # partly filled last block: forks copy on write
    root_blocks = sum(len(m.block_table(r)) for r in range(ROOTS))
    errors, ledger, refused = [], {}, [0] * THREADS
    barrier = threading.Barrier(THREADS + 1)
    stop = threading.Event()

    checks = []

    def checker():
        # An O(pool) scan under the locks: pause between scans so workers are not starved.
        barrier.wait()
        while True:
            m.check_invariants()
            checks.append(1)
            if stop.wait(0.001):
                break

    threads = [threading.Thread(target=worker, args=(m, t, errors, ledger, barrier, refused))
               for t in range(THREADS)]
    inspector = threading.Thread(target=checker)
    for t in threads + [inspector]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    inspector.join()
    assert not errors, errors
    assert len(ledger) == THREADS
    # The pool is sized for the workers' peak: a refusal is rare, and reported.
    print(f"OutOfBlocks refusals per thread: {refused}")
    assert sum(refused) <= THREADS * STEPS // 100, refused
    assert checks, "the checker never ran while workers were busy"
    m.check_invariants()
    # Every thread's sequences are exactly as it left them.
    for tid, (seqs, blocks) in ledger.items():
        for sid, n in seqs.items():
            assert m.num_tokens(sid) == n
            assert len(m.block_table(sid)) == -(-n // block_size)
    # Conservation, then release everything and find the pool whole again.
    assert m.num_free_blocks + m.num_used_blocks == m.num_blocks
    for seqs, blocks in ledger.values():
        for sid in seqs:
            m.remove_sequence(sid)
        m.decref(blocks)
    m.take_pending_copies()
    assert m.num_used_blocks == root_blocks
    for root in range(ROOTS):
        m.remove_sequence(root)
    assert m.num_free_blocks == m.num_blocks and len(m) == 0
    stats = m.stats()
    assert stats["total_allocations"] == stats["total_deallocations"]
    m.check_invariants()


def test_threads_with_eviction_never_lose_a_block():
    """Threads race eviction against each other; evicted ids are reported exactly once."""
    m = rf.BlockManager(512, 4, evict_sequences=True)
    created = [[] for _ in range(8)]
    errors = []

    def run(tid):
        rng = random.Random(tid)
        try:
            for i in range(2000):
                sid = tid * 10**6 + i
                m.add_sequence(sid, num_tokens=rng.randrange(1, 64))
                created[tid].append(sid)
                try:
                    m.append_batch([sid], [rng.randrange(0, 16)])
                except rf.SequenceNotFound:
                    pass  # another thread's allocation evicted it first
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    m.check_invariants()
    evicted = m.take_evicted().tolist()
    alive = set(m.sequence_ids().tolist())
    everything = [s for per in created for s in per]
    assert len(evicted) == len(set(evicted)) == m.stats()["evictions"]
    assert set(evicted) | alive == set(everything) and not set(evicted) & alive


def test_gil_holding_calls_wait_for_a_nogil_holder_without_deadlock():
    """Large batches hold the manager's lock without the GIL while small calls
    contend for it holding the GIL: nothing deadlocks and no block is lost."""
    m = rf.BlockManager(8192 + 64, 16)
    stop = threading.Event()
    errors = []

    def big_batches():
        try:
            buf = np.empty(4096, dtype=np.int32)
            while not stop.is_set():
                m.decref(m.allocate(4096, out=buf))   # >= 4,096 ids: runs without the GIL
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=big_batches) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for _ in range(20_000):
            b = m.allocate_one()
            assert m.refcount(b) == 1
            m.decref_one(b)
            assert len(m) == 0 and m.num_free_blocks >= 0
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)
    assert not any(w.is_alive() for w in workers)
    assert not errors, errors
    assert m.num_free_blocks == 8192 + 64
    m.check_invariants()


def test_sixteen_threads_share_prefixes_forks_and_free_blocks_across_shards():
    """16 threads, each bound to a shard of its own on a pool too small for any
    one shard's share: their prompts hit blocks other shards cached, they fork
    sequences other shards hold, and short shards take free blocks from
    others. A seventeenth thread reads (lookup_prefix, stats, tables of other
    threads' sequences) and checks invariants meanwhile. Nothing is lost."""
    shards, bs = 16, 4
    m = rf.BlockManager(16 * 150, bs, shards=shards, enable_prefix_caching=True, eviction_policy="arc")
    stems = [list(range(100 * k, 100 * k + 12)) for k in range(4)]
    for root, stem in enumerate(stems):
        m.add_sequence(root, stem + [7])            # shard 0 (the main thread) caches the stems
    errors, refused, done = [], [0] * shards, threading.Event()
    ledgers = {}

    def worker(tid):
        rng = random.Random(tid)
        m.bind_thread(tid)
        mine, held = {}, []
        try:
            for i in range(400):
                sid = (tid + 1) * 10**6 + i
                op = rng.random()
                try:
                    if op < 0.3:
                        prompt = rng.choice(stems) + [tid, i % 5, rng.randrange(3)]
                        m.add_sequence(sid, prompt)
                        mine[sid] = len(prompt)
                    elif op < 0.4:
                        m.fork(rng.randrange(len(stems)), sid)     # a root in shard 0
                        mine[sid] = m.num_tokens(sid)
                    elif op < 0.65 and mine:
                        ids = rng.sample(sorted(mine), k=min(len(mine), 4))
                        m.append_batch(ids, 1, tokens=[tid] * len(ids))
                        for s in ids:
                            mine[s] += 1
                    elif op < 0.9 and mine:
                        victim = rng.choice(sorted(mine))
                        m.remove_sequence(victim)
                        del mine[victim]
                    elif op < 0.95:
                        held.extend(m.allocate(rng.randrange(1, 4)).tolist())
                    elif held:
                        m.decref(held)
                        held.clear()
                except rf.OutOfBlocks:
                    refused[tid] += 1
                for s in list(mine)[:1]:
                    assert m.num_tokens(s) == mine[s]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((tid, repr(exc)))
        ledgers[tid] = (mine, held)

    def reader():
        rng = random.Random(99)
        while not done.wait(0.0005):
            try:
                m.lookup_prefix(rng.choice(stems))
                m.stats()
                live = m.sequence_ids().tolist()
                if live:
                    m.block_tables(rng.sample(live, k=min(4, len(live))))
                m.check_invariants()
            except rf.SequenceNotFound:
                pass                                    # removed between the listing and the read
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(("reader", repr(exc)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(shards)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors[:3]
    print(f"OutOfBlocks refusals per thread: {refused}")
    assert sum(refused) < shards * 400 // 4, refused
    m.check_invariants()
    stats = m.stats()
    assert stats["prefix_hit_tokens"] > 0 and stats["cow_copies"] > 0 and stats["shard_transfers"] > 0
    for tid, (mine, held) in ledgers.items():
        for sid, n in mine.items():
            assert m.num_tokens(sid) == n
            m.remove_sequence(sid)
        m.decref(held)
    for root in range(len(stems)):
        m.remove_sequence(root)
    m.check_invariants()
    assert len(m) == 0 and m.num_used_blocks == 0 and m.num_free_blocks == m.num_blocks
    stats = m.stats()
    assert stats["total_allocations"] == stats["total_deallocations"]


def test_threads_meet_inside_the_core_without_the_gil():
    """Calls large enough to run without the GIL (batches of 1,024 sequences,
    4,096 block ids, 16,384-token prompts, forks, tables, checks), so threads
    really meet inside the core: tools/tsan.sh runs this under
    ThreadSanitizer. Decoders on their own shards, allocate/free loops,
    prefix hits on blocks another shard cached, the C API's decode loop, forks
    across shards, and a thread reading tables and checking invariants, all at
    once. Nothing is lost."""
    from rocmforge import _bench_capi
    from rocmforge.bench_allocator import _decode_start
    shards, bs = 8, 16
    m = rf.BlockManager(4 * 33_000 + 4 * 1024 * 16 + 4 * 8192, bs, shards=shards, enable_prefix_caching=True)
    prompt = np.random.default_rng(0).integers(0, 1 << 17, 16384, dtype=np.int32)
    m.add_sequence(10**12, prompt)                  # shard 0 caches it and keeps it in use
    errors, done = [], threading.Event()
    barrier = threading.Barrier(shards + 1)

    def guarded(fn):
        def run(*args):
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))
                barrier.abort()
        return run

    running = {}

    @guarded
    def decoder(t):
        m.bind_thread(t)
        ids, left, lengths = _decode_start(m, t * 10**9, np.random.default_rng(t))
        many = np.arange(t * 10**9 + 10**8, t * 10**9 + 10**8 + 1024, dtype=np.int64)
        for sid in many.tolist():
            m.add_sequence(sid, num_tokens=sid % 7)
        running[t] = ids
        barrier.wait()
        out = np.empty(len(many), dtype=np.int64)
        for _ in range(200):
            m.append_batch(many, 1, out=out)        # 1,024 sequences: no GIL inside
            m.append_batch(ids, 1)
        left = np.array(left, dtype=np.int64) - 200
        _bench_capi.decode_sim(m, ids, left, np.array(lengths[-512:], dtype=np.int64), 40,
                               t * 10**9 + len(ids))
        del running[t]
        for sid in ids.tolist() + many.tolist():
            m.remove_sequence(sid)

    @guarded
    def churner(t):
        m.bind_thread(t)
        barrier.wait()
        for _ in range(30):
            m.decref(m.allocate(4096))              # 4,096 ids: no GIL inside
            m.decref(m.acquire_prefix(prompt))      # 16,384 tokens: hits shard 0's blocks

    @guarded
    def reader():
        k = 0
        while not done.is_set():
            k += 1
            for ids in list(running.values()):
                try:
                    m.block_tables(ids[:64])        # another shard's sequences, while it decodes
                    m.fork(int(ids[0]), 10**13 + k)
                except (rf.SequenceNotFound, rf.SequenceExists, rf.OutOfBlocks):
                    pass
            m.lookup_prefix(prompt)
            if k % 16 == 0:
                m.check_invariants()

    workers = ([threading.Thread(target=decoder, args=(t,)) for t in range(shards // 2)]
               + [threading.Thread(target=churner, args=(t,)) for t in range(shards // 2, shards)])
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in workers:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass                                        # a worker failed: reported below
    for t in workers:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors[:3]
    m.check_invariants()
    for sid in m.sequence_ids().tolist():
        m.remove_sequence(sid)
    m.check_invariants()
    assert m.num_used_blocks == 0 and len(m) == 0
    stats = m.stats()
    assert stats["total_allocations"] == stats["total_deallocations"] and stats["prefix_hit_tokens"] > 0


def test_calls_naming_another_shards_sequence_take_its_lock():
    """A fork from, or a removal of, a sequence that lives in another shard must
    run holding that shard's lock, even when the sequence has no blocks (so
    none of them is another shard's). A thread on shard 0 keeps moving its
    LRU list without the GIL (two batches of 1,024 sequences, in turn) while a
    thread on shard 1 forks and removes blockless sequences of shard 0."""
    m = rf.BlockManager(1024, 16, shards=2)
    first = np.arange(0, 1024, dtype=np.int64)
    second = np.arange(1024, 2048, dtype=np.int64)
    errors, done = [], threading.Event()
    ready = threading.Barrier(2)

    def mover():
        m.bind_thread(0)
        for sid in range(2048):
            m.add_sequence(sid, num_tokens=0)
        for sid in range(10**6, 10**6 + 4000):
            m.add_sequence(sid)                     # blockless: the other thread's to fork and remove
        ready.wait()
        try:
            while not done.is_set():
                m.append_batch(first, 0)            # 1,024 sequences: no GIL inside; each call
                m.append_batch(second, 0)           # moves its run to the newest end
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def forker():
        m.bind_thread(1)
        ready.wait()
        try:
            for sid in range(10**6, 10**6 + 4000):
                m.fork(sid, sid + 10**7)            # touches sid in shard 0
                m.remove_sequence(sid)              # drops it from shard 0
                m.remove_sequence(sid + 10**7)
                if sid % 500 == 0:
                    m.check_invariants()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))
        finally:
            done.set()

    threads = [threading.Thread(target=mover), threading.Thread(target=forker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    m.check_invariants()
    assert sorted(m.sequence_ids().tolist()) == list(range(2048))
