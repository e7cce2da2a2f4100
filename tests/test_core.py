"""Behaviour of BlockManager on hand-written scenarios (the seeds' plan and the awkward cases)."""

import time

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import BlockManager


def test_allocate_lowest_ids_first_and_free_on_zero():
    m = BlockManager(8, 4)
    assert m.allocate(3).tolist() == [0, 1, 2]
    m.decref([1])
    assert m.allocate(2).tolist() == [1, 3]
    assert m.allocate_one() == 4
    m.incref([4])
    assert m.refcount(4) == 2
    m.decref_one(4)
    m.decref_one(4)
    assert m.refcount(4) == 0 and m.num_free_blocks == 4
    m.check_invariants()


def test_allocate_is_all_or_nothing():
    m = BlockManager(4, 1)
    m.allocate(3)
    with pytest.raises(rf.OutOfBlocks):
        m.allocate(2)
    assert m.num_free_blocks == 1
    assert m.allocate(1).tolist() == [3]
    with pytest.raises(rf.OutOfBlocks):
        m.allocate_one()


def test_allocate_into_reused_buffer():
    m = BlockManager(16, 1)
    buf = np.empty(8, dtype=np.int32)
    got = m.allocate(8, out=buf)
    assert got is buf and buf.tolist() == list(range(8))
    got = m.allocate(3, out=buf)
    assert got.base is buf and got.tolist() == [8, 9, 10]


def test_refcount_underflow_raises_and_changes_nothing():
    m = BlockManager(4, 2)
    a, b = m.allocate(2)
    with pytest.raises(rf.RefcountError):
        m.decref([a, b, b])  # b would go below zero: nothing happens
    assert m.refcount(a) == 1 and m.refcount(b) == 1
    m.decref([a])
    with pytest.raises(rf.RefcountError, match="free"):
        m.decref([a])
    with pytest.raises(rf.RefcountError, match="free"):
        m.incref([a])


def test_incref_and_decref_fail_whole_after_partial_progress():
    """The first bad id comes after good ones (some listed twice): what was
    already added or taken is given back."""
    m = BlockManager(300, 2)
    ids = m.allocate(200)
    free_id = 250
    with pytest.raises(rf.RefcountError, match="free"):
        m.incref(np.concatenate([ids, ids[:5], [free_id]]).astype(np.int32))
    with pytest.raises(rf.BlockNotFound):
        m.incref(np.concatenate([ids, [300]]).astype(np.int32))
    assert [m.refcount(int(b)) for b in ids] == [1] * 200
    with pytest.raises(rf.RefcountError):
        m.decref(np.concatenate([ids, ids[7:8]]).astype(np.int32))
    with pytest.raises(rf.BlockNotFound):
        m.decref(np.concatenate([ids[:50], [-1]]).astype(np.int32))
    assert [m.refcount(int(b)) for b in ids] == [1] * 200
    assert m.num_free_blocks == 100
    m.check_invariants()


def test_decref_of_scattered_ids_keeps_the_free_set_exact():
    """Batched frees build bitmap words in registers; every freed id must come
    back, lowest first, and the summary levels must stay right."""
    rng = np.random.default_rng(1)
    m = BlockManager(70_000, 1)    # three bitmap levels
    ids = m.allocate(70_000)
    order = rng.permutation(ids).astype(np.int32)
    freed = set()
    for chunk in np.array_split(order[:40_000], 37):
        m.decref(chunk)
        freed.update(chunk.tolist())
        m.check_invariants()
    assert m.num_free_blocks == len(freed)
    assert m.allocate(1000).tolist() == sorted(freed)[:1000]
    m.check_invariants()


def test_decref_cannot_drop_a_table_reference():
    m = BlockManager(4, 2)
    m.add_sequence(1, num_tokens=3)
    b = m.block_table(1)[0]
    with pytest.raises(rf.RefcountError, match="sequence tables"):
        m.decref([b])
    m.incref([b])
    m.decref([b])
    assert m.refcount(b) == 1
    m.check_invariants()


def test_block_ids_out_of_range():
    m = BlockManager(4, 2)
    for bad in (-1, 4, 2**31 - 1, 2**31, 2**70):
        with pytest.raises(rf.BlockNotFound):
            m.refcount(bad)
        with pytest.raises(rf.BlockNotFound):
            m.decref_one(bad)
    for bad in ([-1], [4], np.array([2**31], dtype=np.int64)):
        with pytest.raises(rf.BlockNotFound):
            m.incref(bad)
        with pytest.raises(rf.BlockNotFound):
            m.decref(bad)
    assert m.refcount(3) == 0


def test_sequence_ids_at_the_edges_of_int64():
    m = BlockManager(8, 2)
    top = 2**63 - 1
    m.add_sequence(top, num_tokens=1)
    m.add_sequence(0, num_tokens=1)
    assert top in m and 0 in m and 2**63 not in m and -1 not in m
    assert m.sequence_ids().tolist() == [top, 0]
    m.fork(top, top - 1)
    assert m.append_batch(np.array([top, top - 1]), [1, 1]).tolist() == [2 * 2 + 1, 0 * 2 + 1]
    with pytest.raises(rf.ArgumentValueError):
        m.add_sequence(2**63)
    with pytest.raises(rf.ArgumentValueError):
        m.add_sequence(-1)
    m.check_invariants()


def test_slots_follow_block_ids():
    m = BlockManager(10, 4)
    m.allocate(1)  # block 0 held elsewhere
    slots = m.add_sequence(5, num_tokens=6)
    assert slots.dtype == np.int64
    assert slots.tolist() == [4, 5, 6, 7, 8, 9]
    assert m.append(5, 3).tolist() == [10, 11, 12]
    assert m.block_table(5).tolist() == [1, 2, 3]
    assert m.num_tokens(5) == 9


def test_tokens_are_kept_and_required():
    m = BlockManager(10, 4)
    m.add_sequence(1, tokens=[5, 6, 7])
    m.append(1, [8, 9])
    assert m.sequence_tokens(1).tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(rf.ArgumentValueError, match="tracks token ids"):
        m.append(1, 2)
    m.add_sequence(2, num_tokens=3)
    assert m.sequence_tokens(2) is None
    with pytest.raises(rf.ArgumentValueError, match="without token ids"):
        m.append(2, [1])
    with pytest.raises(rf.ArgumentValueError):
        m.add_sequence(3, tokens=[1, 2], num_tokens=5)


def test_fork_then_copy_on_write():
    m = BlockManager(16, 4)
    m.add_sequence(1, tokens=list(range(6)))  # blocks [0, 1], second half full
    m.fork(1, 2)
    assert m.block_table(2).tolist() == [0, 1]
    assert m.refcount(0) == 2 and m.refcount(1) == 2
    assert m.sequence_tokens(2).tolist() == list(range(6))
    slots = m.append(2, [6])
    # Block 1 is shared and partly filled: seq 2 gets a fresh block 2 and a copy is queued.
    assert m.block_table(2).tolist() == [0, 2]
    assert slots.tolist() == [2 * 4 + 2]
    assert m.take_pending_copies().tolist() == [[1, 2]]
    assert m.take_pending_copies().shape == (0, 2)
    # The parent now holds block 1 alone and appends in place.
    assert m.append(1, [7]).tolist() == [1 * 4 + 2]
    assert m.stats()["cow_copies"] == 1
    m.check_invariants()


def test_full_shared_block_needs_no_copy():
    m = BlockManager(8, 2)
    m.add_sequence(1, num_tokens=4)
    m.fork(1, 2)
    m.append(2, 1)
    assert m.take_pending_copies().size == 0
    assert m.block_table(2).tolist()[:2] == m.block_table(1).tolist()


def test_batch_naming_parent_and_fork_copies_once():
    m = BlockManager(8, 4)
    m.add_sequence(1, num_tokens=2)
    m.fork(1, 2)
    slots = m.append_batch([1, 2], [1, 1])
    # The first sharer copies, the second is then the only holder and writes in place.
    assert m.take_pending_copies().tolist() == [[0, 1]]
    assert slots.tolist() == [1 * 4 + 2, 0 * 4 + 2]
    m.check_invariants()


def test_batch_with_parent_and_fork_fits_the_last_free_block():
    # Two sharers of a partly filled block need one copy, not two: exactly one block is free.
    m = BlockManager(2, 4)
    m.add_sequence(1, num_tokens=2)
    m.fork(1, 2)
    assert m.num_free_blocks == 1
    m.append_batch([1, 2], [1, 1])
    assert m.num_free_blocks == 0
    m.check_invariants()


def test_batch_failure_halfway_changes_nothing():
    m = BlockManager(4, 2)
    m.add_sequence(1, num_tokens=1)
    m.add_sequence(2, num_tokens=1)
    before = (m.num_free_blocks, m.block_table(1).tolist(), m.num_tokens(1), m.sequence_ids().tolist())
    for ids, counts, exc in [([1, 2, 99], [1, 1, 1], rf.SequenceNotFound),
                             ([1, 2, 1], [1, 1, 1], rf.ArgumentValueError),
                             ([1, 2], [3, 8], rf.OutOfBlocks)]:
        with pytest.raises(exc):
            m.append_batch(ids, counts)
        assert (m.num_free_blocks, m.block_table(1).tolist(), m.num_tokens(1),
                m.sequence_ids().tolist()) == before
    m.check_invariants()


def test_batch_failure_gives_back_blocks_taken_during_validation():
    # A decode step into a full last block takes its block while the batch is
    # still being checked; a failure later must free it again, uncounted, and
    # errors must count it as still needed.
    batched, single = BlockManager(8, 2), BlockManager(8, 2)
    for m in (batched, single):
        for sid in (1, 2, 3):
            m.add_sequence(sid, num_tokens=2)   # full last blocks
        m.add_sequence(4, num_tokens=1)

    def state():
        st = batched.stats()
        return (batched.num_free_blocks, [batched.block_table(s).tolist() for s in (1, 2, 3, 4)],
                [batched.sequence_info(s) for s in (1, 2, 3, 4)], batched.sequence_ids().tolist(),
                st["total_allocations"], st["total_deallocations"], st["peak_allocations"])

    batched.append_batch([2, 1], [0, 0])   # stamps 1 and 2 apart from 3 and 4
    single.append_batch([2, 1], [0, 0])
    before = state()
    for ids, counts, exc, msg in [([1, 2, 99], [1, 1, 1], rf.SequenceNotFound, "99"),
                                  ([1, 2, 1], [1, 1, 1], rf.ArgumentValueError, "twice"),
                                  ([1, 2, 4], [1, 1, 7], rf.OutOfBlocks, "need 5 free blocks, only 4")]:
        with pytest.raises(exc, match=msg):
            batched.append_batch(ids, counts)
        assert state() == before
        batched.check_invariants()
    ids, counts = [3, 1, 4, 2], [1, 2, 1, 1]
    slots = batched.append_batch(ids, counts).tolist()
    assert slots == [x for sid, c in zip(ids, counts) for x in single.append(sid, c).tolist()]
    for sid in (1, 2, 3, 4):
        assert batched.block_table(sid).tolist() == single.block_table(sid).tolist()
    assert batched.stats() == single.stats()
    batched.check_invariants()


def test_decode_batch_takes_fresh_blocks_across_bitmap_words():
    # Decode steps into full last blocks take fresh blocks a free-bitmap word
    # at a time; a batch that empties several words, with holes left by
    # removed sequences, must hand out the ids sequential appends would.
    batched, single = BlockManager(400, 1), BlockManager(400, 1)
    ids = list(range(150))
    for m in (batched, single):
        for sid in ids:
            m.add_sequence(sid, num_tokens=1)
        for sid in ids[::7]:
            m.remove_sequence(sid)
    live = [sid for sid in ids if sid % 7]
    before = (batched.num_free_blocks, batched.stats(), batched.block_table(live[-1]).tolist())
    with pytest.raises(rf.SequenceNotFound):
        batched.append_batch(live + [999], [1] * (len(live) + 1))
    assert (batched.num_free_blocks, batched.stats(),
            batched.block_table(live[-1]).tolist()) == before
    batched.check_invariants()
    for _ in range(2):
        slots = batched.append_batch(live, [1] * len(live)).tolist()
        assert slots == [single.append(sid, 1).tolist()[0] for sid in live]
    assert batched.stats() == single.stats()
    for sid in live:
        assert batched.block_table(sid).tolist() == single.block_table(sid).tolist()
    batched.check_invariants()


def test_batch_with_tokens_matches_single_appends_and_undoes_on_failure():
    # Items that fit their own last block are appended during validation; a
    # failure later in the batch must take them back, tokens included.
    batched = BlockManager(32, 4, enable_prefix_caching=True)
    single = BlockManager(32, 4, enable_prefix_caching=True)
    for m in (batched, single):
        m.add_sequence(1, [1, 2])        # room 2: one token fits in place
        m.add_sequence(2, [3, 4, 5])     # room 1: one token completes the block
        m.add_sequence(3, [6, 7, 8, 9])  # full: needs a fresh block
        m.fork(1, 4)                     # 1 and 4 share a partly filled block
        m.add_sequence(5, [20])          # room 3, its own: appended in place
    sids = (1, 2, 3, 4, 5)
    before = {sid: (batched.sequence_tokens(sid).tolist(), batched.block_table(sid).tolist())
              for sid in sids}
    with pytest.raises(rf.SequenceNotFound):
        batched.append_batch([5, 3, 2, 1, 99], [2, 1, 1, 1, 1], tokens=[21, 22, 10, 11, 12, 13])
    with pytest.raises(rf.ArgumentValueError):
        batched.append_batch([5, 3, 2, 1, 5], [2, 1, 1, 1, 1], tokens=[21, 22, 10, 11, 12, 13])
    assert {sid: (batched.sequence_tokens(sid).tolist(), batched.block_table(sid).tolist())
            for sid in sids} == before
    batched.check_invariants()
    ids, counts, toks = [3, 5, 2, 1, 4], [1, 2, 1, 1, 2], [10, 21, 22, 11, 12, 13, 14]
    slots = batched.append_batch(ids, counts, tokens=toks).tolist()
    expected, at = [], 0
    for sid, c in zip(ids, counts):
        expected += single.append(sid, toks[at:at + c]).tolist()
        at += c
    assert slots == expected
    for sid in sids:
        assert batched.sequence_tokens(sid).tolist() == single.sequence_tokens(sid).tolist()
        assert batched.block_table(sid).tolist() == single.block_table(sid).tolist()
    assert batched.take_pending_copies().tolist() == single.take_pending_copies().tolist()
    assert batched.num_cached_blocks == single.num_cached_blocks
    batched.check_invariants()


def test_batch_positions_follow_removal_and_slot_reuse():
    # append_batch remembers which record each position named; a record that
    # was recycled for another id (or an id re-added elsewhere) must not fool it.
    m = BlockManager(64, 4)
    for sid in (1, 2, 3):
        m.add_sequence(sid, num_tokens=1)
    m.append_batch([1, 2, 3], [1, 1, 1])
    m.remove_sequence(1)
    m.add_sequence(4, num_tokens=1)    # reuses 1's record
    m.remove_sequence(2)
    m.add_sequence(1, num_tokens=5)    # id 1 again, in 2's record
    for ids in ([1, 2, 3], [2], [-1]):
        with pytest.raises(rf.KvCacheError):
            m.append_batch(ids, [1] * len(ids))
    slots = m.append_batch([4, 1, 3], [1, 1, 1]).tolist()
    assert [m.num_tokens(s) for s in (4, 1, 3)] == [2, 6, 3]
    assert slots == [m.block_table(4)[0] * 4 + 1, m.block_table(1)[1] * 4 + 1,
                     m.block_table(3)[0] * 4 + 2]
    m.remove_sequence(3)               # its record stays free
    with pytest.raises(rf.SequenceNotFound):
        m.append_batch([4, 1, 3], [1, 1, 1])
    assert [m.num_tokens(s) for s in (4, 1)] == [2, 6]
    m.check_invariants()


def test_batch_touch_moves_a_record_and_the_one_that_followed_it():
    # A batch touches its sequences in batch order. Moving an out-of-place
    # record behind its batch predecessor can unsettle the next item, which
    # followed the moved record in the LRU list; it must move too.
    for ids, expected in (([1, 3, 4], [2, 1, 3, 4]), ([3, 1, 4], [2, 3, 1, 4]),
                          ([1, 3, 4, 2], [1, 3, 4, 2]), ([4, 3, 1], [2, 4, 3, 1])):
        m = BlockManager(32, 4)
        for sid in (1, 2, 3, 4):          # LRU order 1 2 3 4
            m.add_sequence(sid, num_tokens=1)
        m.append_batch(ids, [1] * len(ids))
        assert m.sequence_ids().tolist() == expected
        m.check_invariants()


def test_batch_of_counts_refuses_a_sequence_with_tokens_at_a_hinted_position():
    # The decode run takes count-only items at positions whose record it has
    # seen before; a sequence that keeps token ids must still be refused
    # there, after a token batch has proven it the sole holder of its block.
    m = BlockManager(16, 8)
    m.add_sequence(1, tokens=[7])
    m.add_sequence(2, num_tokens=1)
    m.append_batch([1], [1], tokens=[8])
    m.append_batch([1], [1], tokens=[9])
    before = (m.num_tokens(1), m.num_tokens(2), m.sequence_info(1)["access_count"])
    for ids in ([1], [1, 2], [2, 1]):
        with pytest.raises(rf.ArgumentValueError, match="tracks token ids"):
            m.append_batch(ids, [1] * len(ids))
    assert (m.num_tokens(1), m.num_tokens(2), m.sequence_info(1)["access_count"]) == before
    assert m.sequence_tokens(1).tolist() == [7, 8, 9]
    m.check_invariants()


def test_lru_eviction_when_full():
    m = BlockManager(6, 2, evict_sequences=True)
    for sid in (10, 11, 12):
        m.add_sequence(sid, num_tokens=4)  # two blocks each: the pool is full
    m.append(10, 1)  # needs a block: evicts 11, the least recently accessed
    assert m.take_evicted().tolist() == [11]
    assert m.sequence_ids().tolist() == [12, 10]
    m.add_sequence(13, num_tokens=4)  # needs 2, one is free: evicts 12
    assert m.take_evicted().tolist() == [12]
    assert m.sequence_ids().tolist() == [10, 13]
    assert m.stats()["evictions"] == 2
    m.check_invariants()


def test_eviction_spares_named_sequences_and_is_all_or_nothing():
    m = BlockManager(4, 2, evict_sequences=True)
    m.add_sequence(1, num_tokens=2)
    m.add_sequence(2, num_tokens=4)
    # 8 more tokens need 4 fresh blocks; 1 is free and evicting 2 frees 2: impossible,
    # so nothing is evicted.
    with pytest.raises(rf.OutOfBlocks):
        m.append_batch([1], [8])
    assert 2 in m and m.take_evicted().size == 0
    m.append_batch([1], [4])  # needs 2: evicts 2 (the oldest unnamed)
    assert m.take_evicted().tolist() == [2]
    m.check_invariants()


def test_eviction_of_a_fork_partner_frees_nothing_shared():
    m = BlockManager(3, 2, evict_sequences=True)
    m.add_sequence(1, num_tokens=4)  # blocks 0, 1
    m.fork(1, 2)
    m.allocate(1)
    # Pool full. A new sequence evicts 1 (oldest), which frees nothing (2 shares),
    # then 2, which frees both blocks.
    m.add_sequence(3, num_tokens=2)
    assert m.take_evicted().tolist() == [1, 2]
    m.check_invariants()


def test_no_eviction_without_the_flag():
    m = BlockManager(2, 2)
    m.add_sequence(1, num_tokens=4)
    with pytest.raises(rf.OutOfBlocks):
        m.add_sequence(2, num_tokens=1)
    assert 1 in m


def test_lifetime_tracking():
    m = BlockManager(8, 4)
    t0 = time.time()
    m.add_sequence(1, num_tokens=2)
    info = m.sequence_info(1)
    assert info["access_count"] == 1 and info["num_blocks"] == 1 and info["num_tokens"] == 2
    assert t0 - 1 <= info["created_at"] <= time.time() + 1
    time.sleep(0.01)
    m.append(1, 3)
    later = m.sequence_info(1)
    assert later["access_count"] == 2 and later["num_tokens"] == 5 and later["num_blocks"] == 2
    assert later["last_access"] > info["last_access"] and later["created_at"] == info["created_at"]


def test_thousand_sequences_leave_nothing_behind():
    m = BlockManager(64, 16)
    base = m.metadata_bytes()
    for sid in range(1000):
        m.add_sequence(sid, tokens=np.arange(sid % 40, dtype=np.int32))
        m.append(sid, np.arange(sid % 7, dtype=np.int32))
        if sid % 3 == 0:
            m.fork(sid, sid + 10**6)
            m.append(sid + 10**6, [1])
            m.remove_sequence(sid + 10**6)
        m.remove_sequence(sid)
    m.take_pending_copies()
    assert len(m) == 0 and m.num_free_blocks == 64 and m.num_used_blocks == 0
    s = m.stats()
    assert s["total_allocations"] == s["total_deallocations"] and s["current_allocations"] == 0
    # Slots are recycled: metadata does not grow with the number of sequences served.
    assert m.metadata_bytes() < base + 64 * 1024
    m.check_invariants()


def test_remove_frees_and_unknown_sequences_raise():
    m = BlockManager(8, 2)
    m.add_sequence(1, num_tokens=5)
    assert m.num_free_blocks == 5
    m.remove_sequence(1)
    assert m.num_free_blocks == 8
    for fn in (m.remove_sequence, m.block_table, m.num_tokens, m.sequence_info, m.sequence_tokens):
        with pytest.raises(rf.SequenceNotFound):
            fn(1)
    with pytest.raises(rf.SequenceNotFound):
        m.fork(1, 2)
    m.add_sequence(2)
    with pytest.raises(rf.SequenceExists):
        m.fork(2, 2)
    with pytest.raises(rf.SequenceExists):
        m.add_sequence(2)


def test_block_tables_vllm_layout():
    m = BlockManager(16, 2)
    m.add_sequence(1, num_tokens=5)
    m.add_sequence(2, num_tokens=1)
    m.add_sequence(3)
    t = m.block_tables([1, 2, 3])
    assert t.dtype == np.int32 and t.tolist() == [[0, 1, 2], [3, -1, -1], [-1, -1, -1]]
    out = np.zeros((3, 5), dtype=np.int32)
    assert m.block_tables([1, 2, 3], out=out) is out
    assert out[0].tolist() == [0, 1, 2, -1, -1]
    with pytest.raises(rf.ArgumentValueError):
        m.block_tables([1, 2, 3], out=np.zeros((3, 2), dtype=np.int32))
    with pytest.raises(rf.SequenceNotFound):
        m.block_tables([1, 9])


def test_csr_block_tables_flashinfer_layout():
    m = BlockManager(16, 4)
    m.add_sequence(1, num_tokens=5)
    m.add_sequence(2, num_tokens=8)
    m.add_sequence(3)
    indptr, indices, last = m.csr_block_tables([1, 2, 3])
    assert indptr.tolist() == [0, 2, 4, 4]
    assert indices.tolist() == [0, 1, 2, 3]
    assert last.tolist() == [1, 4, 0]
    assert indptr.dtype == indices.dtype == last.dtype == np.int32


def test_compaction_packs_blocks_and_rewrites_tables():
    m = BlockManager(10, 1)
    for sid in range(10):
        m.add_sequence(sid, num_tokens=1)
    for sid in (0, 2, 3, 5):
        m.remove_sequence(sid)
    ext = m.allocate(1)[0]          # takes block 0
    assert ext == 0
    assert m.fragmentation_ratio() == pytest.approx(3 / 10)
    assert m.should_compact(0.25) and not m.should_compact(0.3)
    moves = m.compact()
    assert moves.tolist() == [[9, 2], [8, 3], [7, 5]]
    assert sorted(int(m.block_table(s)[0]) for s in (1, 4, 6, 7, 8, 9)) == [1, 2, 3, 4, 5, 6]
    assert m.block_table(9).tolist() == [2]
    assert m.fragmentation_ratio() == 0.0 and m.stats()["compaction_count"] == 1
    m.shrink(7)
    assert m.num_blocks == 7 and m.num_free_blocks == 0
    with pytest.raises(rf.InvalidConfiguration):
        m.shrink(6)
    m.grow(12)
    assert m.num_free_blocks == 5 and m.allocate(1).tolist() == [7]
    m.check_invariants()


def test_compact_into_fewer_blocks_is_one_step_or_none():
    m = BlockManager(10, 1)
    for sid in range(6):
        m.add_sequence(sid, num_tokens=1)
    for sid in (0, 2):
        m.remove_sequence(sid)
    held = m.allocate(1)                            # block 0: 5 occupied, the highest is 5
    tables = {sid: m.block_table(sid).tolist() for sid in (1, 3, 4, 5)}
    with pytest.raises(rf.OutOfBlocks, match="cannot compact into 4 blocks: 5 blocks are in use"):
        m.compact(num_blocks=4)
    assert m.num_blocks == 10 and {sid: m.block_table(sid).tolist() for sid in tables} == tables
    assert m.stats()["compaction_count"] == 0
    for bad, exc in ((0, rf.InvalidConfiguration), (11, rf.InvalidConfiguration), (1.5, rf.ArgumentTypeError),
                     (-1, rf.ArgumentValueError)):
        with pytest.raises(exc):
            m.compact(num_blocks=bad)
    moves = m.compact(num_blocks=5)
    assert moves.tolist() == [[5, 2]] and m.num_blocks == 5 and m.num_free_blocks == 0
    assert held.tolist() == [0] and m.refcount(0) == 1
    assert m.block_table(5).tolist() == [2]
    m.check_invariants()
    assert m.compact(num_blocks=5).tolist() == []    # packed and at that size already


def test_compact_refuses_while_copies_are_pending():
    m = BlockManager(8, 4)
    m.add_sequence(1, num_tokens=1)
    m.fork(1, 2)
    m.append(2, 1)
    with pytest.raises(rf.KvCacheError, match="take_pending_copies"):
        m.compact()
    m.take_pending_copies()
    m.compact()


def test_stats_and_efficiency():
    m = BlockManager(8, 4)
    m.add_sequence(1, num_tokens=6)
    m.fork(1, 2)
    s = m.stats()
    assert s["current_allocations"] == 2 and s["peak_allocations"] == 2 and s["num_sequences"] == 2
    assert m.memory_efficiency() == pytest.approx(6 / 8)
    m.remove_sequence(1)
    m.remove_sequence(2)
    s = m.stats()
    assert s["total_deallocations"] == 2 and s["peak_allocations"] == 2 and s["current_allocations"] == 0
    assert m.memory_efficiency() == 1.0


def test_invalid_configuration():
    for args in [(0, 16), (2**31, 16), (10, 0), (10, 2**21), (-5, 16)]:
        with pytest.raises(rf.InvalidConfiguration):
            BlockManager(*args)
    with pytest.raises(rf.ArgumentTypeError):
        BlockManager(1.5, 16)
    with pytest.raises(rf.ArgumentTypeError):
        BlockManager(10, "16")


def test_configuration_properties_are_read_only():
    m = rf.BlockManager(8, 4, evict_sequences=True, enable_prefix_caching=True, enable_events=True,
                        eviction_policy="arc")
    assert (m.evict_sequences, m.enable_prefix_caching, m.enable_events, m.eviction_policy) == (
        True, True, True, "arc")
    plain = rf.BlockManager(8, 4)
    assert (plain.evict_sequences, plain.enable_prefix_caching, plain.enable_events) == (False, False, False)
    for name in ("evict_sequences", "enable_prefix_caching", "enable_events", "num_blocks", "block_size"):
        with pytest.raises(AttributeError):
            setattr(m, name, getattr(m, name))


def test_sequence_info_says_whether_token_ids_are_kept():
    m = rf.BlockManager(8, 4)
    m.add_sequence(1, [5, 6, 7])
    m.add_sequence(2, num_tokens=3)
    assert m.sequence_info(1)["has_tokens"] is True and m.sequence_info(2)["has_tokens"] is False
    assert m.sequence_tokens(2) is None and m.sequence_tokens(1).tolist() == [5, 6, 7]


def test_last_compaction_ms_times_the_last_compaction():
    m = rf.BlockManager(400_000, 1)
    assert m.stats()["last_compaction_ms"] == 0.0 and m.stats()["compaction_count"] == 0
    held = m.allocate(300_000)
    m.decref(np.ascontiguousarray(held[::2]))       # 150,000 holes below 150,000 used blocks
    start = time.perf_counter()
    moves = m.compact()
    wall_ms = (time.perf_counter() - start) * 1e3
    stats = m.stats()
    assert len(moves) > 0 and stats["compaction_count"] == 1
    assert 0.0 < stats["last_compaction_ms"] <= wall_ms
    m.compact()                                     # nothing to move: the time of this one
    assert m.stats()["compaction_count"] == 2 and m.stats()["last_compaction_ms"] != stats["last_compaction_ms"]


def test_append_batch_takes_one_count_for_every_sequence():
    m = rf.BlockManager(16, 4)
    for sid in (1, 2, 3):
        m.add_sequence(sid, num_tokens=1)
    assert m.append_batch([1, 2, 3], 1).tolist() == [1, 5, 9]          # each sequence's second slot
    assert m.append_batch(np.array([1, 2, 3]), np.int64(2)).tolist() == [2, 3, 6, 7, 10, 11]
    assert [m.num_tokens(s) for s in (1, 2, 3)] == [4, 4, 4]
    for bad in (True, 1.0, -1, 2**40):
        with pytest.raises((rf.ArgumentTypeError, rf.ArgumentValueError)):
            m.append_batch([1, 2, 3], bad)
    assert [m.num_tokens(s) for s in (1, 2, 3)] == [4, 4, 4]


def test_shrink_to_the_same_size_still_refuses_while_copies_are_pending():
    for shards in (1, 2):
        m = rf.BlockManager(8, 2, shards=shards)
        m.add_sequence(0, num_tokens=1)
        m.fork(0, 1)
        m.append(1, 1)                                   # a copy-on-write copy is pending
        with pytest.raises(rf.KvCacheError, match="pending"):
            m.shrink(8)
        m.take_pending_copies()
        m.shrink(8)
        m.check_invariants()
