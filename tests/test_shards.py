"""A manager with several shards: where blocks and sequences go (the README's
threading model, rule by rule), calls that cross shards, threads that get
shards of their own, and bad arguments."""

import threading

import pytest

import rocmforge as rf


def test_shards_split_the_pool_and_a_short_shard_takes_from_the_fullest():
    m = rf.BlockManager(8, 4, shards=2)
    assert m.num_shards == 2 and m.thread_shard == 0
    # Shard 0 holds blocks 0-3, shard 1 blocks 4-7.
    assert m.allocate(3).tolist() == [0, 1, 2]
    m.bind_thread(1)
    assert m.allocate(1).tolist() == [4]
    m.bind_thread(0)
    # One free block left in shard 0, five wanted: shard 1 (3 free) gives
    # max(half rounded up, shortfall 4) capped at 3, lowest ids first.
    with pytest.raises(rf.OutOfBlocks):
        m.allocate(5)
    assert m.allocate(4).tolist() == [3, 5, 6, 7]
    m.check_invariants()
    m.decref(list(range(8)))
    m.check_invariants()
    # Blocks go back to the shard that took them: all 8 are shard 0's now, but
    # 4 was shard 1's take.
    m.bind_thread(1)
    assert m.allocate(1).tolist() == [4]
    m.check_invariants()


def test_sequences_live_in_their_creators_shard():
    m = rf.BlockManager(64, 4, shards=3)
    m.add_sequence(10, num_tokens=5)
    m.bind_thread(2)
    m.add_sequence(20, num_tokens=5)
    m.fork(10, 21)                                  # a fork across shards: 21 lives in shard 2
    m.bind_thread(1)
    m.add_sequence(30, num_tokens=1)
    assert [m.sequence_info(s)["shard"] for s in (10, 20, 21, 30)] == [0, 2, 2, 1]
    assert m.sequence_ids().tolist() == [10, 30, 20, 21]       # shard by shard, LRU within
    # Appends from another shard's thread: the sequences stay where they are.
    slots = m.append_batch([10, 20, 21], 1)
    assert len(slots) == 3 and [m.sequence_info(s)["shard"] for s in (10, 20, 21)] == [0, 2, 2]
    assert len(m.take_pending_copies()) == 1        # 10 and 21 shared a partly filled block
    m.check_invariants()
    m.remove_sequence(21)                            # removed from shard 1's thread
    m.remove_sequence(10)
    assert 21 not in m and 10 not in m and len(m) == 2
    m.check_invariants()


def test_copy_on_write_copies_come_out_in_the_order_they_were_made():
    m = rf.BlockManager(64, 4, shards=2)
    m.add_sequence(1, num_tokens=2)
    m.fork(1, 2)
    m.append(2, 1)                                   # copy a -> b, made by shard 0
    b = int(m.block_table(2)[0])
    m.bind_thread(1)
    m.fork(2, 3)
    m.append(3, 1)                                   # copy b -> c, made by shard 1
    c = int(m.block_table(3)[0])
    assert m.take_pending_copies().tolist() == [[int(m.block_table(1)[0]), b], [b, c]]
    m.check_invariants()


def test_a_duplicate_id_is_refused_across_shards():
    m = rf.BlockManager(16, 4, shards=2)
    m.add_sequence(7, num_tokens=1)
    m.bind_thread(1)
    with pytest.raises(rf.SequenceExists):
        m.add_sequence(7)
    with pytest.raises(rf.SequenceExists):
        m.fork(7, 7)
    with pytest.raises(rf.SequenceNotFound):
        m.fork(8, 9)
    assert len(m) == 1 and m.sequence_info(7)["shard"] == 0
    m.check_invariants()


def test_prefix_hits_across_shards():
    m = rf.BlockManager(32, 4, shards=2, enable_prefix_caching=True)
    prompt = list(range(12))
    m.add_sequence(1, prompt)                        # shard 0 caches 3 blocks, in use
    m.bind_thread(1)
    m.add_sequence(2, prompt)                        # hits blocks shard 0 holds
    assert m.num_cached_tokens(2) == 12 and m.block_table(2).tolist() == m.block_table(1).tolist()
    held = m.acquire_prefix(prompt)
    assert held.tolist() == m.block_table(1)[:3].tolist()
    m.check_invariants()
    m.remove_sequence(1)
    m.remove_sequence(2)
    m.decref(held)                                   # shard 1's thread releases shard 0's blocks
    assert m.lookup_prefix(prompt) == 12 and m.num_evictable_blocks == 3
    m.check_invariants()


def test_sequence_eviction_takes_the_callers_shard_first():
    m = rf.BlockManager(8, 4, shards=2, evict_sequences=True)
    m.add_sequence(1, num_tokens=8)                  # shard 0: 2 blocks, the oldest sequence
    m.bind_thread(1)
    m.add_sequence(2, num_tokens=8)                  # shard 1
    m.add_sequence(3, num_tokens=8)
    m.add_sequence(4, num_tokens=8)                  # every block in use
    m.allocate(2)                                    # shard 1's oldest (2) goes before shard 0's (1)
    assert m.take_evicted().tolist() == [2] and 1 in m
    m.check_invariants()


def test_compaction_gives_the_free_blocks_back_in_ranges():
    m = rf.BlockManager(8, 4, shards=2)
    ids = m.allocate(4).tolist()                     # 0-3
    m.decref(ids[:2])
    m.bind_thread(1)
    m.allocate(1)                                    # 4
    moves = m.compact()
    assert moves.tolist() == [[4, 0], [3, 1]]
    m.check_invariants()
    # Used: 0-2. Free 3-7 split: shard 0 gets 3-4, shard 1 gets 5-7.
    m.bind_thread(0)
    assert m.allocate(2).tolist() == [3, 4]
    m.bind_thread(1)
    assert m.allocate(1).tolist() == [5]
    m.grow(12)                                       # 8-9 to shard 0, 10-11 to shard 1
    m.bind_thread(0)
    assert m.allocate(1).tolist() == [8]
    m.check_invariants()


def test_threads_get_shards_round_robin():
    m = rf.BlockManager(64, 4, shards=4)
    seen = []
    lock = threading.Lock()

    def who():
        with lock:
            seen.append(m.thread_shard)

    threads = [threading.Thread(target=who) for _ in range(4)]
    for t in threads:
        t.start()
        t.join()
    assert sorted(seen) == [0, 1, 2, 3]
    assert m.thread_shard in (0, 1, 2, 3)


@pytest.mark.parametrize("shards, exc", [
    (0, rf.InvalidConfiguration), (65, rf.InvalidConfiguration), ("many", rf.InvalidConfiguration),
    (True, rf.ArgumentTypeError), (1.5, rf.ArgumentTypeError),
])
def test_bad_shard_counts(shards, exc):
    with pytest.raises(exc):
        rf.BlockManager(8, 4, shards=shards)


def test_auto_shards_and_bad_bindings():
    m = rf.BlockManager(1024, 4, shards="auto")
    assert 1 <= m.num_shards <= 16
    assert rf.BlockManager(2, 4, shards="auto").num_shards <= 2
    m = rf.BlockManager(16, 4, shards=2)
    with pytest.raises(rf.ArgumentValueError, match="shard 2"):
        m.bind_thread(2)
    with pytest.raises(rf.ArgumentValueError):
        m.bind_thread(-1)
    with pytest.raises(rf.ArgumentTypeError):
        m.bind_thread("0")
    assert "shards=2" in repr(m)
