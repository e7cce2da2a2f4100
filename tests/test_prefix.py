"""Prefix caching: hits, verification under forced collisions, salts, evictable
blocks, both policies, events, restructuring, threads and bad input."""

import itertools
import random
import threading

import numpy as np
import pytest

import rocmforge as rf
from model import block_key, salt_value

BS = 4


def prefix_manager(num_blocks=32, **kw):
    return rf.BlockManager(num_blocks, BS, enable_prefix_caching=True, **kw)


def toks(*values):
    return np.array(values, dtype=np.int32)


PROMPT = toks(*range(1, 11))          # two full blocks and a partial one


def test_hit_reuses_blocks_and_reports_cached_tokens():
    m = prefix_manager()
    first = m.add_sequence(1, PROMPT)
    assert m.num_cached_tokens(1) == 0 and m.num_cached_blocks == 2
    second = m.add_sequence(2, np.r_[PROMPT[:8], [7, 7, 7]].astype(np.int32))
    assert m.num_cached_tokens(2) == 8
    assert second[:8].tolist() == first[:8].tolist()         # same slots: shared blocks
    assert m.block_table(2)[:2].tolist() == m.block_table(1)[:2].tolist()
    assert [m.refcount(b) for b in m.block_table(1)[:2]] == [2, 2]
    assert m.sequence_info(2)["num_cached_tokens"] == 8
    stats = m.stats()
    assert (stats["prefix_lookups"], stats["prefix_hit_tokens"], stats["prefix_query_tokens"]) == (2, 8, 21)
    assert stats["prefix_hit_rate"] == pytest.approx(8 / 21)
    m.check_invariants()


def test_released_blocks_stay_findable_until_allocation_needs_them():
    m = prefix_manager(num_blocks=3)
    m.add_sequence(1, PROMPT)
    m.remove_sequence(1)
    assert (m.num_free_blocks, m.num_evictable_blocks, m.num_used_blocks) == (3, 2, 0)
    assert m.lookup_prefix(PROMPT) == 8
    assert m.allocate(1).tolist() == [2]                    # the never-cached block goes first
    assert m.lookup_prefix(PROMPT) == 8
    assert m.allocate(1).tolist() == [1]                    # then the tail of the chain (LRU)
    assert m.lookup_prefix(PROMPT) == 4 and m.num_cached_blocks == 1
    m.check_invariants()


def test_partial_blocks_are_never_shared():
    m = prefix_manager()
    m.add_sequence(1, toks(1, 2, 3))
    assert m.num_cached_blocks == 0
    m.add_sequence(2, toks(1, 2, 3))
    assert m.num_cached_tokens(2) == 0
    assert m.block_table(1).tolist() != m.block_table(2).tolist()


def test_lookup_changes_nothing():
    m = prefix_manager(enable_events=True)
    m.add_sequence(1, PROMPT)
    m.remove_sequence(1)
    m.take_events()
    before = (m.stats(), m.num_evictable_blocks, m.num_free_blocks)
    assert m.lookup_prefix(PROMPT) == 8
    assert m.lookup_prefix(PROMPT[:7]) == 4
    assert m.lookup_prefix([]) == 0
    assert (m.stats(), m.num_evictable_blocks, m.num_free_blocks) == before
    assert m.take_events() == []


def test_appending_completes_and_registers_blocks():
    m = prefix_manager()
    m.add_sequence(1, toks(1, 2, 3))
    m.append(1, toks(4, 5))
    assert m.num_cached_blocks == 1
    m.append_batch([1], [3], toks(6, 7, 8))
    assert m.num_cached_blocks == 2
    m.add_sequence(2, toks(1, 2, 3, 4, 5, 6, 7, 8, 9))
    assert m.num_cached_tokens(2) == 8


def test_salts_never_share():
    m = prefix_manager()
    m.add_sequence(1, PROMPT, salt="tenant-a")
    assert m.lookup_prefix(PROMPT, salt="tenant-a") == 8
    for other in (None, "tenant-b", b"tenant-a", 0, 1):
        assert m.lookup_prefix(PROMPT, salt=other) == 0
    m.add_sequence(2, PROMPT, salt="tenant-b")
    assert m.num_cached_tokens(2) == 0 and m.num_cached_blocks == 4
    assert salt_value(7) == salt_value(np.int64(7)) != salt_value("7") != salt_value(b"7")


def collide(mask_bits, block_size, salt=0):
    """Two different blocks of tokens whose 2-bit keys are equal (found by search)."""
    mask = (1 << mask_bits) - 1
    seen = {}
    for values in itertools.product(range(6), repeat=block_size):
        key = block_key(-1, salt, list(values), mask)
        if key in seen:
            return list(seen[key]), list(values)
        seen[key] = values
    raise AssertionError("no collision found")


def test_a_hash_collision_never_shares_a_wrong_block():
    a, b = collide(2, BS)
    m = prefix_manager(_key_bits=2)
    m.add_sequence(1, toks(*a))
    m.remove_sequence(1)
    assert m.lookup_prefix(toks(*b)) == 0                   # same key, other tokens: verified miss
    m.add_sequence(2, toks(*b))
    assert m.num_cached_tokens(2) == 0
    assert m.block_table(2).tolist() != [m.lookup_prefix(toks(*a))]
    assert m.lookup_prefix(toks(*a)) == BS                 # the cached one is intact
    m.check_invariants()


@pytest.mark.parametrize("block_size", [1, 3, 5])
def test_verification_compares_every_token_of_odd_sized_blocks(block_size):
    """Keys collide (1 bit) for blocks that differ only in their last token: the
    token check must see the odd tail, not only whole pairs."""
    m = rf.BlockManager(64, block_size, enable_prefix_caching=True, _key_bits=1)
    first = np.arange(1, 2 * block_size + 1, dtype=np.int32)
    m.add_sequence(1, first)
    m.remove_sequence(1)
    for pos in range(2 * block_size):
        other = first.copy()
        other[pos] += 1000
        assert m.lookup_prefix(other) == (pos // block_size) * block_size
    m.check_invariants()


def test_keys_match_the_documented_hash():
    m = prefix_manager(enable_events=True)
    m.add_sequence(1, PROMPT, salt=5)
    k0 = block_key(-1, salt_value(5), list(range(1, 5)), (1 << 63) - 1)
    k1 = block_key(k0, salt_value(5), list(range(5, 9)), (1 << 63) - 1)
    assert m.take_events() == [rf.BlockStored(k0, None, BS), rf.BlockStored(k1, k0, BS)]


def test_events_store_remove_clear_in_order():
    m = prefix_manager(num_blocks=2, enable_events=True)
    m.add_sequence(1, toks(*range(8)))
    stored = m.take_events()
    assert [type(e) for e in stored] == [rf.BlockStored, rf.BlockStored]
    m.remove_sequence(1)
    m.allocate(1)     # evicts the tail block
    assert m.take_events() == [rf.BlockRemoved(stored[1].key)]
    m.reset_prefix_cache()
    assert m.take_events() == [rf.AllCleared()]
    assert m.num_cached_blocks == 0 and m.num_free_blocks == 1


def test_evicting_a_parent_drops_its_cached_descendants():
    """ARC can pick a reused parent before a once-used child; the child could never
    be reached again, so it is freed with the parent."""
    m = prefix_manager(num_blocks=6, eviction_policy="arc", enable_events=True)
    m.add_sequence(1, toks(*range(4)))             # block A
    m.remove_sequence(1)
    m.add_sequence(2, toks(*range(8)))             # hits A (now reused), adds child B
    m.remove_sequence(2)
    m.take_events()
    m.allocate(4)                                  # the four never-used blocks
    assert m.num_evictable_blocks == 2
    m.allocate(1)   # list 1 (B, used once) goes first under ARC's initial target
    removed = [e.key for e in m.take_events()]
    assert len(removed) == 1 and m.num_cached_blocks == 1
    m.add_sequence(3, toks(*range(4)))
    assert m.num_cached_tokens(3) == 4
    m.check_invariants()


def test_unregistering_a_parent_in_use_keeps_its_block():
    """reset_prefix_cache leaves blocks in use with their sequences."""
    m = prefix_manager()
    m.add_sequence(1, PROMPT)
    table = m.block_table(1).tolist()
    m.reset_prefix_cache()
    assert m.block_table(1).tolist() == table and m.num_cached_blocks == 0
    m.append(1, toks(11, 12))                      # completes block 3: its parent is uncached
    assert m.num_cached_blocks == 0
    m.remove_sequence(1)
    assert m.num_free_blocks == m.num_blocks
    m.check_invariants()


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_compact_moves_cached_blocks_and_keeps_them_findable(policy):
    m = prefix_manager(num_blocks=16, eviction_policy=policy)
    m.allocate(6)
    m.add_sequence(1, PROMPT)
    m.add_sequence(2, toks(*range(50, 62)))
    m.remove_sequence(1)
    m.decref(list(range(6)))
    moves = m.compact()
    assert len(moves) > 0
    m.check_invariants()
    assert m.fragmentation_ratio() == 0.0
    assert m.lookup_prefix(PROMPT) == 8
    m.add_sequence(3, PROMPT)
    assert m.num_cached_tokens(3) == 8
    m.check_invariants()


def test_shrink_drops_cached_blocks_beyond_the_end_but_never_live_ones():
    m = prefix_manager(num_blocks=8)
    m.allocate(4)
    m.add_sequence(1, toks(*range(8)))              # blocks 4, 5
    with pytest.raises(rf.InvalidConfiguration):
        m.shrink(5)
    m.remove_sequence(1)
    m.shrink(5)                                    # block 5 (cached, evictable) leaves
    assert m.lookup_prefix(toks(*range(8))) == 4
    m.check_invariants()
    m.grow(8)
    m.check_invariants()


def test_last_free_block_with_a_cached_hit():
    """Hits on evictable blocks do not count as room for the rest of the prompt."""
    m = prefix_manager(num_blocks=4)
    m.add_sequence(1, toks(*range(8)))
    m.remove_sequence(1)
    m.allocate(1)                                  # 1 free block left, 2 evictable hits
    with pytest.raises(rf.OutOfBlocks):
        m.add_sequence(2, toks(*range(13)))        # 2 hits + 2 fresh blocks: one too many
    m.check_invariants()
    assert m.num_evictable_blocks == 2
    m.add_sequence(2, toks(*range(12)))            # 2 hits + 1 fresh: exactly fits
    assert m.num_cached_tokens(2) == 8 and m.num_free_blocks == 0
    m.check_invariants()


def test_sequence_eviction_with_prefix_hits():
    m = prefix_manager(num_blocks=4, evict_sequences=True)
    m.add_sequence(1, toks(*range(8)))
    m.add_sequence(2, toks(*range(100, 108)))
    table = m.block_table(1).tolist()
    # Needs one fresh block: LRU eviction takes seq 1 (whose blocks the prompt
    # hits, so they stay) and then seq 2 (which frees the room).
    m.add_sequence(3, toks(*range(12)))
    assert m.take_evicted().tolist() == [1, 2]
    assert m.num_cached_tokens(3) == 8 and m.block_table(3)[:2].tolist() == table
    m.check_invariants()


def test_thousand_requests_leave_nothing_in_use():
    m = prefix_manager(num_blocks=64, eviction_policy="arc")
    rng = random.Random(0)
    stems = [list(range(k, k + 12)) for k in range(5)]
    for i in range(1000):
        prompt = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 9))]
        m.add_sequence(i, prompt, salt=rng.choice([None, "x"]))
        m.append(i, [rng.randrange(3) for _ in range(rng.randrange(0, 6))])
        m.remove_sequence(i)
    m.check_invariants()
    assert m.num_used_blocks == 0 and len(m) == 0
    assert m.stats()["prefix_hit_tokens"] > 0


def test_threads_share_prefixes_without_losing_blocks():
    m = prefix_manager(num_blocks=512, eviction_policy="arc")
    stems = [list(range(100 * k, 100 * k + 16)) for k in range(6)]
    errors = []

    def run(tid):
        rng = random.Random(tid)
        try:
            for i in range(400):
                sid = tid * 10**6 + i
                prompt = rng.choice(stems)[: rng.randrange(4, 17)] + [tid, i % 7]
                m.add_sequence(sid, prompt)
                got = m.sequence_tokens(sid).tolist()
                assert got == prompt, (got, prompt)
                m.append(sid, [1, 2, 3])
                if rng.random() < 0.3:
                    m.lookup_prefix(prompt)
                m.remove_sequence(sid)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    def check(stop):
        while not stop.wait(0.001):
            m.check_invariants()

    stop = threading.Event()
    checker = threading.Thread(target=check, args=(stop,))
    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    checker.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    checker.join()
    assert not errors, errors
    m.check_invariants()
    assert m.num_used_blocks == 0 and m.stats()["prefix_hit_tokens"] > 0


@pytest.mark.parametrize("kwargs, exc", [
    (dict(eviction_policy="lfu"), rf.InvalidConfiguration),
    (dict(eviction_policy=None), rf.InvalidConfiguration),
    (dict(enable_events=True, enable_prefix_caching=False), rf.InvalidConfiguration),
    (dict(_key_bits=0), rf.InvalidConfiguration),
])
def test_bad_configuration(kwargs, exc):
    kw = dict(enable_prefix_caching=True)
    kw.update(kwargs)
    with pytest.raises(exc):
        rf.BlockManager(8, 4, **kw)


@pytest.mark.parametrize("salt", [1.5, [1], True, object()])
def test_bad_salt_changes_nothing(salt):
    m = prefix_manager()
    with pytest.raises(rf.ArgumentTypeError):
        m.add_sequence(1, PROMPT, salt=salt)
    with pytest.raises(TypeError):
        m.lookup_prefix(PROMPT, salt=salt)
    assert len(m) == 0 and m.num_free_blocks == m.num_blocks


def test_prefix_calls_without_prefix_caching():
    m = rf.BlockManager(8, 4)
    with pytest.raises(rf.KvCacheError, match="prefix caching is off"):
        m.lookup_prefix(PROMPT)
    with pytest.raises(rf.KvCacheError, match="prefix caching is off"):
        m.reset_prefix_cache()
    m.add_sequence(1, PROMPT)
    assert m.num_cached_tokens(1) == 0 and m.num_cached_blocks == 0
    assert m.take_events() == [] and m.eviction_policy == "lru"


@pytest.mark.parametrize("bad", [[1.5, 2.0], "abc", np.zeros((2, 2), dtype=np.int32), [2**31]])
def test_lookup_bad_tokens(bad):
    m = prefix_manager()
    with pytest.raises((rf.ArgumentTypeError, rf.ArgumentValueError)):
        m.lookup_prefix(bad)


def test_arc_thrash_protection_matches_the_model():
    """A loop of prompts larger than the cache makes ARC's evicted keys come back
    (ghost hits); it then sends an unsampled half of new prompts to the cold
    segment. Core and reference model must agree block for block throughout."""
    from model import ModelManager
    core = prefix_manager(num_blocks=24, eviction_policy="arc", enable_events=True)
    model = ModelManager(24, BS, prefix=True, policy="arc")
    rng = random.Random(1)
    stems = [[s] * 8 + [s + 100] * 4 for s in range(12)]       # 3 full blocks each
    cold_seen = False
    for i in range(600):
        prompt = stems[(i + rng.randrange(2)) % len(stems)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
        got = core.add_sequence(i, prompt)
        assert got.tolist() == model.add_sequence(i, tokens=prompt)
        core.remove_sequence(i)
        model.remove_sequence(i)
        cold_seen |= bool(model.lists[3])
        assert [core.refcount(b) for b in range(24)] == model.rc
        assert core.num_evictable_blocks == sum(map(len, model.lists.values()))
        assert [(type(e).__name__, e.key) for e in core.take_events()] == [
            ("BlockStored" if e[0] == "stored" else "BlockRemoved", e[1]) for e in model.take_events()]
        core.check_invariants()
    assert cold_seen, "the loop never made ARC protect against thrashing"
    stats = core.stats()
    assert stats["prefix_hit_tokens"] == model.stats["prefix_hit_tokens"] > 0


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_released_hits_go_to_the_newest_end(policy):
    # Blocks taken from the cache and released again are the newest evictable
    # ones: stamped after every earlier release (check_invariants verifies the
    # order), and under LRU evicted after blocks released before them.
    m = rf.BlockManager(16, 4, enable_prefix_caching=True, eviction_policy=policy)
    a, b = np.arange(8, dtype=np.int32), np.arange(100, 108, dtype=np.int32)
    for sid, prompt in ((1, a), (2, b)):
        m.add_sequence(sid, prompt)
        m.remove_sequence(sid)
    m.decref(m.acquire_prefix(a))
    m.check_invariants()
    if policy == "lru":
        m.allocate(14)
        assert (m.lookup_prefix(a), m.lookup_prefix(b)) == (8, 0)
