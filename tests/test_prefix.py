"""Prefix caching: hits, verification under forced collisions, salts, evictable
blocks, both policies, events, restructuring, threads and bad input."""

import ast
import itertools
import pathlib
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
    keys = []
    for sid, salt in enumerate((7, np.int64(7), "7", b"7", None), start=10):
        m.add_sequence(sid, PROMPT, salt=salt)
        keys.append(m.sequence_info(sid)["salt_key"])
    assert keys[0] == keys[1] == salt_value(7)
    assert len({keys[0], keys[2], keys[3], keys[4]}) == 4 and keys[4] == 0


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
    cached = m.block_table(1).tolist()
    m.remove_sequence(1)
    assert m.lookup_prefix(toks(*b)) == 0                   # same key, other tokens: verified miss
    m.add_sequence(2, toks(*b))
    assert m.num_cached_tokens(2) == 0
    assert m.block_table(2).tolist() != cached              # a block of its own, not the cached one
    assert m.refcount(cached[0]) == 0 and m.num_cached_blocks == 1   # the key stays with the first
    assert m.lookup_prefix(toks(*a)) == BS                 # the cached one is intact
    assert m.lookup_prefix(toks(*b)) == 0
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


def readme_key_vectors():
    """The README's test vectors: (salt, block_size, tokens, keys) per line."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("# salt | block_size | token ids -> keys")[1].split("\n", 1)[1].split("```")[0]
    vectors = []
    for line in block.strip().splitlines():
        left, keys = line.split("->")
        salt, bs, tokens = (part.strip() for part in left.split("|"))
        vectors.append((ast.literal_eval(salt), int(bs), [int(t) for t in tokens.split()],
                        [int(k, 16) for k in keys.split()]))
    return vectors


def test_keys_match_the_readme_vectors():
    vectors = readme_key_vectors()
    assert len(vectors) >= 4
    for salt, bs, tokens, keys in vectors:
        m = rf.BlockManager(8, bs, enable_prefix_caching=True, enable_events=True)
        m.add_sequence(1, tokens, salt=salt)
        events = m.take_events()
        assert [e.key for e in events] == keys
        assert [e.parent_key for e in events] == [None] + keys[:-1]


def test_model_keys_follow_the_readme_function():
    """The model's key function (written from the README's text) gives the README's vectors."""
    for salt, bs, tokens, keys in readme_key_vectors():
        parent, got = -1, []
        for j in range(len(tokens) // bs):
            parent = block_key(parent, salt_value(salt), tokens[j * bs:(j + 1) * bs])
            got.append(parent)
        assert got == keys


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


def test_uncache_blocks_drops_those_blocks_and_their_descendants_only():
    """Block 1 of a prompt leaves the cache with block 2 after it (unreachable
    without it); block 0 and another prompt stay. A block in use stays with its
    sequence, an evictable one becomes free; bad ids change nothing."""
    m = prefix_manager(enable_events=True)
    m.add_sequence(1, toks(*range(1, 13)))         # three full blocks
    m.add_sequence(2, toks(50, 51, 52, 53, 54))
    m.remove_sequence(2)                           # block 3 cached, evictable
    table = m.block_table(1).tolist()
    m.take_events()
    for bad, exc in (([table[0], 32], rf.BlockNotFound), ([-1], rf.BlockNotFound), ("x", rf.ArgumentTypeError)):
        with pytest.raises(exc):
            m.uncache_blocks(bad)
        assert m.num_cached_blocks == 4 and m.take_events() == []
    m.uncache_blocks([table[1]])
    assert m.lookup_prefix(toks(*range(1, 13))) == 4 and m.lookup_prefix(toks(50, 51, 52, 53)) == 4
    assert len([e for e in m.take_events() if isinstance(e, rf.BlockRemoved)]) == 2
    assert m.block_table(1).tolist() == table and m.num_cached_blocks == 2
    m.uncache_blocks(np.array([3, 3, table[2]], dtype=np.int64))   # evictable, twice; not cached
    assert m.num_cached_blocks == 1 and m.num_free_blocks == m.num_blocks - 3
    assert m.stats()["cached_blocks_evicted"] == 3
    m.uncache_blocks([])
    m.check_invariants()
    with pytest.raises(rf.KvCacheError, match="prefix caching is off"):
        rf.BlockManager(4, BS).uncache_blocks([0])


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


def test_arc_is_not_worse_than_lru_on_a_loop_larger_than_the_cache():
    """A loop of prompts larger than the cache (each prompt sometimes repeated)
    evicts most blocks under LRU before their reuse; ARC's ghost hits make it
    protect a sampled part of the loop, and it must hit at least as often."""
    stems = [[s] * 8 + [s + 100] * 4 for s in range(12)]       # 3 full blocks each, 36 in all
    hits = {}
    for policy in ("lru", "arc"):
        m = prefix_manager(num_blocks=24, eviction_policy=policy)
        rng = random.Random(1)
        for i in range(600):
            prompt = stems[(i + rng.randrange(2)) % len(stems)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
            m.add_sequence(i, prompt)
            m.remove_sequence(i)
        m.check_invariants()
        hits[policy] = m.stats()["prefix_hit_tokens"]
    assert hits["arc"] >= hits["lru"] > 0


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


def test_a_block_completed_after_a_cached_twin_is_cached():
    """Sequence 1 completes a copy of a cached block (it arrived in pieces), then a
    new block: the new block is cached under its content chain, whichever
    physical block holds its parent's content."""
    m = rf.BlockManager(10, 4, enable_prefix_caching=True, eviction_policy="lru", enable_events=True)
    m.add_sequence(0, [1, 2, 3, 4, 9])
    m.add_sequence(1, [1, 2])
    m.append(1, [3, 4])                     # equal to sequence 0's first block: not cached twice
    m.append(1, [5, 6, 7, 8])               # new: cached, its parent being sequence 0's block
    stored = m.take_events()
    assert len(stored) == 2 and stored[1].parent_key == stored[0].key
    m.add_sequence(2, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert m.num_cached_tokens(2) == 8
    assert m.block_table(2)[:2].tolist() == [m.block_table(0)[0], m.block_table(1)[1]]
    m.check_invariants()
    m.remove_sequence(0)                    # evicting the parent takes the child along
    m.remove_sequence(2)
    m.remove_sequence(1)
    m.allocate(m.num_blocks - m.num_evictable_blocks)
    m.take_events()
    m.allocate(1)
    assert m.num_cached_blocks == 0 and sorted(e.key for e in m.take_events()) == sorted(e.key for e in stored)
    m.check_invariants()


def test_a_twin_whose_chain_differs_is_no_parent():
    """With 2-bit keys, [a] and [b] collide, so [a, 7] and [b, 7] share both keys.
    Sequence 2 = [b, 7, 8] finds [7] cached under its key with its tokens, but
    after [a], not [b]: that block is no parent for [8], which stays uncached
    (it would otherwise serve [a, 7, 8] K/V computed after [b, 7])."""
    mask = 3
    key = lambda parent, t: block_key(parent, 0, [t], mask)  # noqa: E731
    a, b = next((a, b) for a in range(50) for b in range(a + 1, 50)
                if key(-1, a) == key(-1, b) and key(key(-1, a), 7) != key(-1, a)
                and key(key(key(-1, a), 7), 8) not in (key(-1, a), key(key(-1, a), 7)))
    m = rf.BlockManager(8, 1, enable_prefix_caching=True, _key_bits=2)
    m.add_sequence(1, [a, 7])
    m.add_sequence(2, [b])
    m.append(2, [7])
    m.append(2, [8])
    assert m.num_cached_blocks == 2
    assert m.lookup_prefix([a, 7, 8]) == 2 and m.lookup_prefix([b, 7, 8]) == 0
    m.check_invariants()


@pytest.mark.parametrize("trace", ["agent", "docqa", "sample"])
def test_arc_hits_at_least_as_many_tokens_as_lru(trace):
    """The README's stated bound for arc."""
    from rocmforge import bench_prefix
    if trace == "sample":
        requests = bench_prefix.load_mooncake(pathlib.Path(rf.__file__).parent / "data" / "conversation_sample.jsonl")
    else:
        requests = bench_prefix.synthetic_trace(trace, 3000)
    for capacity in (100_000, 300_000, 1_000_000, 3_000_000):
        lru = bench_prefix.replay(requests, capacity, "lru")["hit_tokens"]
        arc = bench_prefix.replay(requests, capacity, "arc")["hit_tokens"]
        assert arc >= lru, (trace, capacity, arc, lru)
