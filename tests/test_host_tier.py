"""The host tier of the prefix cache: blocks the pool evicts are kept in host
memory and brought back on a hit (joint lookup: the pool's prefix, then the
tier), with their copies in the pending queue. Bookkeeping against stated
rules (what is offloaded, LRU order, exclusivity, salt, verification, reset,
shrink, events, invariants), and data on the host backend against an oracle:
every row of every sequence must hold the value its token prefix defines,
whichever tier served it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rocmforge as rf
from rocmforge.config import CacheConfig
from rocmforge.engine import Engine, Request, RequestState, SchedulerConfig
from rocmforge.replay import SyntheticModel

BS = 4
INFO = rf.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no GPU")])]


def manager(num_blocks=8, host=6, **kw):
    return rf.BlockManager(num_blocks, BS, enable_prefix_caching=True, host_cache_blocks=host, **kw)


def blocks(*starts):
    """Token ids: one full block per start value."""
    return [t for s in starts for t in range(s, s + BS)]


def test_an_evicted_prefix_comes_back_from_the_host_tier():
    m = manager(enable_events=True)
    m.add_sequence(0, blocks(10, 20, 30) + [1])
    m.remove_sequence(0)                                  # three cached, evictable blocks
    m.take_events()
    m.add_sequence(1, blocks(100, 110, 120, 130, 140, 150, 160, 170))   # every block: evicts them
    copies = m.take_pending_copies()
    assert (copies[:, 1] < 0).all() and len(copies) == 3           # each evicted block to a slot
    assert sorted(copies[:, 0].tolist()) == [0, 1, 2] and sorted((-1 - copies[:, 1]).tolist()) == [0, 1, 2]
    stored = [e for e in m.take_events() if isinstance(e, rf.BlockStored) and e.medium == "cpu"]
    assert len(stored) == 3
    assert m.stats()["host_cached_blocks"] == 3 and m.stats()["host_offloaded_blocks"] == 3
    m.remove_sequence(1)
    prompt = blocks(10, 20, 30) + [9]
    assert m.lookup_prefix(prompt) == 3 * BS                       # found across the tiers
    m.take_pending_copies()
    m.add_sequence(2, prompt)
    assert m.num_cached_tokens(2) == 3 * BS
    table = m.block_table(2)
    back = m.take_pending_copies()
    reloads = back[back[:, 0] < 0]
    assert sorted(reloads[:, 1].tolist()) == sorted(table[:3].tolist())  # each slot into its new block
    assert m.stats()["host_reloaded_blocks"] == 3 and m.stats()["host_hit_tokens"] == 3 * BS
    st = m.stats()                                                 # exclusive: the three left the tier
    assert st["host_cached_blocks"] == st["host_offloaded_blocks"] - st["host_dropped_blocks"] - 3
    assert m.lookup_prefix(prompt) == 3 * BS                       # now from the pool itself
    m.check_invariants()


def test_the_pool_prefix_then_the_tier_continue_one_chain():
    m = manager(num_blocks=6, host=6)
    m.add_sequence(0, blocks(1, 2, 3) + [0])
    m.remove_sequence(0)
    m.add_sequence(1, blocks(1) + blocks(50, 60, 70, 80, 90))      # reuses block 1, evicts 2 and 3
    m.take_pending_copies()
    assert m.stats()["host_cached_blocks"] == 2
    assert m.lookup_prefix(blocks(1, 2, 3) + [0]) == 3 * BS        # pool: block 1, tier: 2 and 3
    assert m.lookup_prefix(blocks(2, 3)) == 0                      # not a chain from the root
    assert m.lookup_prefix(blocks(1, 3)) == BS                     # wrong parent: the tier stops
    m.check_invariants()


def test_the_tier_drops_its_least_recently_used_block_when_full():
    m = manager(num_blocks=4, host=2, enable_events=True)
    for sid, start in enumerate((10, 20, 30)):
        m.add_sequence(sid, blocks(start) + [0])
        m.remove_sequence(sid)
        m.add_sequence(100 + sid, blocks(200 + 10 * sid, 300, 400) + [0])   # evicts the cached block
        m.remove_sequence(100 + sid)
    m.take_pending_copies()
    assert m.stats()["host_dropped_blocks"] >= 1
    removed = [e for e in m.take_events() if isinstance(e, rf.BlockRemoved) and e.medium == "cpu"]
    assert removed                                                 # the tier said what it dropped
    assert m.lookup_prefix(blocks(10) + [0]) == 0                  # the oldest went first
    m.check_invariants()


@pytest.mark.parametrize("policy", ["lru", "arc"])
def test_the_tiers_own_policy_decides_what_it_drops(policy):
    m = manager(num_blocks=2, host=2, host_eviction_policy=policy)
    m.add_sequence(0, blocks(1) + [0])
    m.remove_sequence(0)
    m.add_sequence(1, blocks(1) + [0])                 # a hit: block A is reused
    m.remove_sequence(1)
    for sid, start in ((2, 2), (3, 3), (4, 4)):          # each evicts the one cached before it
        m.add_sequence(sid, blocks(start) + [0])
        m.remove_sequence(sid)
        m.check_invariants()
    kept = [m.lookup_prefix(blocks(start) + [0]) // BS for start in (1, 2, 3)]
    # the tier held A (reused), B and C (stored once) for two slots: LRU drops the
    # oldest (A); ARC drops a block stored once (B) and keeps the reused one
    assert kept == ([0, 1, 1] if policy == "lru" else [1, 0, 1])
    assert m.stats()["host_dropped_blocks"] == 1
    m.add_sequence(5, blocks(2) + [0])                 # B is back only as a recomputed block
    m.remove_sequence(5)
    m.add_sequence(6, blocks(5) + [0])
    m.remove_sequence(6)                               # B leaves again: under ARC a ghost hit on its way in
    m.check_invariants()
    m.reset_prefix_cache()
    m.check_invariants()
    with pytest.raises(rf.InvalidConfiguration):
        manager(host_eviction_policy="fifo")


def test_salt_and_token_verification_hold_in_the_tier():
    # 2-bit keys: most blocks collide, so only the verification keeps hits right
    m = manager(num_blocks=4, host=16, _key_bits=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 5, size=2 * BS + 1).tolist() for _ in range(40)]
    for i, p in enumerate(prompts):
        salt = "a" if i % 2 else None
        want = m.lookup_prefix(p, salt=salt)
        m.add_sequence(i, p, salt=salt)
        assert m.num_cached_tokens(i) == want
        m.remove_sequence(i)
        m.take_pending_copies()
        m.check_invariants()
    m = manager(num_blocks=4, host=16)                             # full keys: the salt alone differs
    m.add_sequence(999, blocks(7, 8) + [0], salt="x")
    m.remove_sequence(999)
    m.add_sequence(998, blocks(70, 80, 90) + [0])                  # evicts the salted chain
    m.remove_sequence(998)
    assert m.lookup_prefix(blocks(7, 8) + [0]) == 0                # another salt: no hit
    assert m.lookup_prefix(blocks(7, 8) + [0], salt="x") == 2 * BS


def test_reset_empties_both_tiers_and_shrink_keeps_nothing_it_cuts():
    m = manager(num_blocks=6, host=6, enable_events=True)
    m.add_sequence(0, blocks(1, 2) + [0])
    m.remove_sequence(0)
    m.add_sequence(1, blocks(5, 6, 7, 8, 9) + [0])
    m.remove_sequence(1)
    assert m.stats()["host_cached_blocks"] >= 1
    m.reset_prefix_cache()
    assert isinstance(m.take_events()[-1], rf.AllCleared)
    assert m.stats()["host_cached_blocks"] == 0 and m.lookup_prefix(blocks(1, 2) + [0]) == 0
    m.take_pending_copies()
    m.add_sequence(2, blocks(3, 4) + [0])
    m.remove_sequence(2)
    m.shrink(1)                                                    # the cached blocks go with the pool
    assert len(m.take_pending_copies()) == 0                       # and are not kept: no copy to run
    m.check_invariants()


def test_bad_host_tier_arguments():
    with pytest.raises(rf.InvalidConfiguration):
        rf.BlockManager(4, 4, host_cache_blocks=2)                 # no prefix cache to back
    for bad in (-1, 2**31):
        with pytest.raises(rf.InvalidConfiguration):
            manager(host=bad)
    for bad in (1.5, "2", True):
        with pytest.raises(rf.ArgumentTypeError):
            manager(host=bad)
    cfg = CacheConfig(1, 1, 8, block_size=BS, num_blocks=4, dtype="float32")
    with pytest.raises(rf.InvalidConfiguration):
        rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=10)         # not one block
    with pytest.raises(rf.ArgumentValueError):
        rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache="1MiB", host_cache_blocks=3)
    with pytest.raises(MemoryError):
        rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache="1000TiB")


def row_value(tokens, i):
    """The value every K element of token i holds: a function of tokens[: i + 1]."""
    h = 7
    for t in tokens[: i + 1]:
        h = (h * 1_000_003 + t + 1) % 16_777_213
    return float(h)


def write_rows(cache, sid, tokens, slots, start):
    for layer in range(cache.num_layers):
        vals = np.array([row_value(tokens, i) + layer for i in range(start, len(tokens))], dtype=np.float32)
        rows = np.broadcast_to(vals[:, None, None], (len(vals),) + cache.key_cache(0).shape[2:]).copy()
        cache.write_kv(layer, rows, -rows, np.ascontiguousarray(slots[start:]))


def check_rows(cache, sid, tokens):
    for layer in range(cache.num_layers):
        k, v = (a.to_numpy() for a in cache.gather(sid, layer))
        want = np.array([row_value(tokens, i) + layer for i in range(len(tokens))], dtype=np.float32)
        assert np.array_equal(k[:, 0, 0], want), (sid, layer)
        assert np.array_equal(v[:, 0, 0], -want)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_row_holds_its_prefixs_value_whichever_tier_served_it(data):
    """Random adds, appends (one by one and batched), forks, removals, resets,
    compactions, external blocks and acquired prefixes, with 1 or 2 shards and
    with sequence eviction on or off; after each, every live sequence's rows are
    checked against the oracle."""
    num_blocks = data.draw(st.integers(4, 12), label="num_blocks")
    host = data.draw(st.integers(1, 10), label="host blocks")
    cfg = CacheConfig(2, 1, 4, block_size=BS, num_blocks=num_blocks, dtype="float32")
    stems = [blocks(*(10 * s + j for j in range(1, 4))) for s in range(4)]
    with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=host * cfg.bytes_per_block,
                    eviction_policy=data.draw(st.sampled_from(["lru", "arc"])),
                    host_eviction_policy=data.draw(st.sampled_from(["lru", "arc"])),
                    shards=data.draw(st.sampled_from([1, 2])), evict_sequences=data.draw(st.booleans())) as cache:
        m = cache.manager
        live = {}
        for step in range(data.draw(st.integers(5, 40), label="steps")):
            op = data.draw(st.sampled_from(["add"] * 4 + ["remove"] * 4 + [
                "append", "fork", "compact", "reset", "external", "acquire", "batch"]))
            sid = data.draw(st.sampled_from(sorted(live))) if live else None
            try:
                if op == "remove" and sid is not None:
                    m.remove_sequence(sid)
                    del live[sid]
                elif op == "append" and sid is not None:
                    more = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=BS + 1))
                    slots = m.append(sid, more)
                    live[sid] = live[sid] + more
                    write_rows(cache, sid, live[sid], np.concatenate([np.zeros(len(live[sid]) - len(more),
                               np.int64), slots]), len(live[sid]) - len(more))
                elif op == "fork" and sid is not None:
                    m.fork(sid, step)
                    live[step] = list(live[sid])
                elif op == "reset":
                    m.reset_prefix_cache()
                elif op == "external":               # blocks held outside any sequence, then let go
                    m.decref(m.allocate(data.draw(st.integers(1, num_blocks))))
                elif op == "acquire":                # the pool's part of a prefix, held and let go
                    stem = stems[data.draw(st.integers(0, 3))]
                    ids = m.acquire_prefix(stem + [0])
                    assert len(ids) * BS <= m.lookup_prefix(stem + [0])
                    m.decref(ids)
                elif op == "batch" and live:         # one token for every live sequence
                    ids = sorted(live)
                    more = data.draw(st.lists(st.integers(0, 9), min_size=len(ids), max_size=len(ids)))
                    slots = m.append_batch(ids, np.ones(len(ids), np.int32), np.array(more, np.int32))
                    for k, (other, t) in enumerate(zip(ids, more)):
                        live[other] = live[other] + [t]
                        write_rows(cache, other, live[other], np.concatenate(
                            [np.zeros(len(live[other]) - 1, np.int64), slots[k:k + 1]]), len(live[other]) - 1)
                elif op == "compact":
                    cache.compact(shrink=data.draw(st.booleans()))
                elif op == "add":
                    stem = stems[data.draw(st.integers(0, 3))]
                    tokens = stem[:data.draw(st.integers(1, len(stem)))] + data.draw(
                        st.lists(st.integers(0, 9), max_size=2 * BS))
                    slots = m.add_sequence(step, tokens)
                    write_rows(cache, step, tokens, slots, m.num_cached_tokens(step))
                    live[step] = tokens
            except rf.OutOfBlocks:
                pass
            for gone in m.take_evicted().tolist():    # sequences the manager evicted for room
                live.pop(gone, None)
            for other, tokens in live.items():
                check_rows(cache, other, tokens)
            m.check_invariants()
        for sid in list(live):
            m.remove_sequence(sid)
        for rnd in range(2):                # every stem twice: more than the pool caches, so the tier serves
            for i, stem in enumerate(stems):
                sid = 1000 + 10 * rnd + i
                try:
                    slots = m.add_sequence(sid, stem + [rnd])
                except rf.OutOfBlocks:
                    continue
                write_rows(cache, sid, stem + [rnd], slots, m.num_cached_tokens(sid))
                check_rows(cache, sid, stem + [rnd])
                m.remove_sequence(sid)
        m.check_invariants()
        assert m.stats()["host_offloaded_blocks"] >= m.stats()["host_reloaded_blocks"]


def test_an_engine_with_a_host_tier_hits_more_and_computes_the_same_tokens():
    trace = [(list(range(100 * (i % 5), 100 * (i % 5) + 96)) + [1000 + i], 4) for i in range(40)]
    outs = {}
    for host in (None, "8MiB"):
        cfg = CacheConfig(2, 2, 64, block_size=16, num_blocks=20, dtype="float16")
        with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=host) as cache:
            eng = Engine(cache, SyntheticModel(cache), SchedulerConfig(max_num_seqs=2, max_tokens_per_step=256))
            for i, (prompt, out_len) in enumerate(trace):
                eng.submit(Request(i, prompt, out_len))
            done = []
            while eng.has_work():
                done += eng.step()
                cache.manager.check_invariants()
            outs[host] = ({r.request_id: list(r.output_tokens) for r in done}, eng.metrics(), cache.stats())
    plain, tiered = outs[None], outs["8MiB"]
    assert plain[0] == tiered[0] and len(plain[0]) == 40               # the same tokens generated
    assert tiered[2]["host_hit_tokens"] > 0 and tiered[2]["host_bytes_reloaded"] > 0
    assert tiered[1]["prefix_hit_rate"] > plain[1]["prefix_hit_rate"]
    assert tiered[1]["computed_tokens"] < plain[1]["computed_tokens"]


def test_a_prefix_the_engine_reloads_from_the_tier_is_in_place_when_the_model_reads():
    """A prefix evicted to the host tier and hit again comes back through copies
    the cache queues; the model, reading the storage with its own code, must find
    them applied when the engine calls it. (host_cache_blocks sizes the tier in blocks.)"""
    from test_engine import Reader
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=12, dtype="float32")
    with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache_blocks=32) as cache:
        model = Reader(cache, 1, 1, 4, raw=True)
        eng = Engine(cache, model, SchedulerConfig(max_num_seqs=1))
        prompt = np.arange(16, dtype=np.int32) + 50
        for i in range(4):                      # the prompt, then others that push it to the tier
            eng.submit(Request(i, prompt if i == 0 else np.arange(16, dtype=np.int32) + 100 * i, 2))
            while eng.has_work():
                eng.step()
        eng.submit(Request("again", prompt, 2))
        while eng.has_work():
            eng.step()
        assert cache.stats()["host_hit_tokens"] > 0 and eng.finished["again"].num_cached_tokens > 0
        assert model.unwritten == [] and model.read > 0
        assert all(rec.state is RequestState.FINISHED for rec in eng.finished.values())


@pytest.mark.parametrize("shards", [1, 2])
def test_threads_share_a_tiered_cache_and_every_row_stays_right(shards):
    import threading
    cfg = CacheConfig(1, 1, 4, block_size=BS, num_blocks=12, dtype="float32")
    stems = [blocks(*(10 * s + j for j in range(1, 4))) for s in range(12)]    # more than the pool caches
    errors = []
    with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=64 * cfg.bytes_per_block,
                    shards=shards) as cache:
        m = cache.manager

        def work(t):
            # Each thread its own stems: a block another thread registered may not hold
            # its K/V yet (it is written after add_sequence returns), while a block this
            # thread's earlier sequences left is complete, in the pool or in the tier.
            rng = np.random.default_rng(t)
            mine = stems[3 * t: 3 * t + 3]
            try:
                for i in range(150):
                    sid = t * 1000 + i
                    tokens = mine[rng.integers(0, len(mine))] + rng.integers(0, 9, size=3).tolist()
                    try:
                        slots = m.add_sequence(sid, tokens)
                    except rf.OutOfBlocks:
                        continue
                    write_rows(cache, sid, tokens, slots, m.num_cached_tokens(sid))
                    check_rows(cache, sid, tokens)
                    m.remove_sequence(sid)
            except Exception as exc:             # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        m.check_invariants()
        for i, stem in enumerate(stems):               # the pool holds a third of the stems at most
            tokens = stem + [0]
            slots = m.add_sequence(10_000 + i, tokens)
            write_rows(cache, 10_000 + i, tokens, slots, m.num_cached_tokens(10_000 + i))
            check_rows(cache, 10_000 + i, tokens)
            m.remove_sequence(10_000 + i)
        st = m.stats()
        assert st["host_hit_tokens"] > 0, st


def test_compaction_with_blocks_in_the_tier_keeps_every_row_right():
    cfg = CacheConfig(2, 1, 4, block_size=BS, num_blocks=10, dtype="float32")
    with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=12 * cfg.bytes_per_block) as cache:
        m = cache.manager
        done = []
        for i, stem in enumerate([blocks(1, 2, 3), blocks(4, 5, 6), blocks(7, 8, 9), blocks(11, 12, 13)]):
            tokens = stem + [i]
            slots = m.add_sequence(i, tokens)
            write_rows(cache, i, tokens, slots, m.num_cached_tokens(i))
            done.append(tokens)
            if i != 2:
                m.remove_sequence(i)                   # released: cached, then evicted to the tier
        assert m.stats()["host_cached_blocks"] > 0
        moves = cache.compact(shrink=True)             # sequence 2 moves to the lowest blocks
        assert len(moves) and cache.num_blocks < 10
        check_rows(cache, 2, done[2])
        for i in (0, 1, 3):                            # back from the tier or the pool, after the move
            tokens = done[i]
            slots = m.add_sequence(100 + i, tokens)
            assert m.num_cached_tokens(100 + i) == 3 * BS
            write_rows(cache, 100 + i, tokens, slots, m.num_cached_tokens(100 + i))
            check_rows(cache, 100 + i, tokens)
            m.remove_sequence(100 + i)
        m.check_invariants()


def test_engine_preemption_with_a_host_tier_loses_nothing():
    prompts = [list(range(50 * (i % 3), 50 * (i % 3) + 64)) + [900 + i] for i in range(24)]
    outs = {}
    for host in (None, "4MiB"):
        cfg = CacheConfig(2, 2, 64, block_size=16, num_blocks=14, dtype="float16")
        with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, host_cache=host) as cache:
            eng = Engine(cache, SyntheticModel(cache), SchedulerConfig(max_num_seqs=4, max_tokens_per_step=128))
            for i, p in enumerate(prompts):
                eng.submit(Request(i, p, 60))              # outputs outgrow the pool: preemptions
            done = []
            while eng.has_work():
                done += eng.step()
            cache.manager.check_invariants()
            assert cache.manager.num_used_blocks == 0 and len(cache.manager) == 0
            outs[host] = ({r.request_id: list(r.output_tokens) for r in done}, eng.metrics())
    assert outs[None][0] == outs["4MiB"][0] and len(outs[None][0]) == 24
    assert outs["4MiB"][1]["preemptions"] > 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "fp8_e4m3", "int8"])
@pytest.mark.parametrize("device", DEVICES)
def test_k_and_v_round_trip_through_the_tier_bit_for_bit(device, dtype):
    device = "cpu" if device == "cpu" else GPU
    cfg = CacheConfig(2, 2, 8, block_size=BS, num_blocks=4, dtype=dtype)
    with rf.KvCache(cfg, device, enable_prefix_caching=True, host_cache=8 * cfg.bytes_per_block,
                    k_scale=0.05, v_scale=0.07) as cache:
        m = cache.manager
        prompt = blocks(1, 2, 3) + [0]
        slots = m.add_sequence(0, prompt)
        rng = np.random.default_rng(len(dtype))
        for layer in range(2):
            k = rng.standard_normal((len(prompt), 2, 8)).astype(np.float32)
            cache.write_kv(layer, k, -k, slots) if device == "cpu" else cache.write_kv(
                layer, _dev(k), _dev(-k), _dev(np.asarray(slots)))
        before = [[a.to_numpy() for a in cache.gather(0, layer)] for layer in range(2)]
        m.remove_sequence(0)
        m.add_sequence(1, blocks(50, 60, 70, 80))                  # the whole pool: all three to the tier
        cache.apply_pending_copies()
        m.remove_sequence(1)
        assert cache.stats()["host_cached_blocks"] == 3
        m.add_sequence(2, prompt)
        assert m.num_cached_tokens(2) == 3 * BS
        for layer in range(2):
            k, v = (a.to_numpy() for a in cache.gather(2, layer))
            assert np.array_equal(k[:3 * BS].view(np.uint8), before[layer][0][:3 * BS].view(np.uint8))
            assert np.array_equal(v[:3 * BS].view(np.uint8), before[layer][1][:3 * BS].view(np.uint8))
        if device != "cpu":
            assert cache.stats()["host_bytes_reloaded"] == 3 * cfg.bytes_per_block


@pytest.mark.parametrize("device", DEVICES)
def test_blocks_reused_at_once_and_slots_read_at_once_keep_every_copy_in_order(device):
    """An evicted block is overwritten by its new owner right after its offload is
    queued, and a reloaded prefix is read right after; over rounds that keep several
    batches (and staging buffers) in flight, every read sees the data it should."""
    device = "cpu" if device == "cpu" else GPU
    cfg = CacheConfig(2, 2, 8, block_size=BS, num_blocks=4, dtype="float32")
    on = (lambda a: a) if device == "cpu" else _dev
    rng = np.random.default_rng(7)
    with rf.KvCache(cfg, device, enable_prefix_caching=True, host_cache=8 * cfg.bytes_per_block) as cache:
        m = cache.manager
        for round in range(12):
            prompt = blocks(100 + round, 200 + round, 300 + round) + [0]
            kv = rng.standard_normal((2, len(prompt), 2, 8)).astype(np.float32)
            slots = m.add_sequence(0, prompt)
            for layer in range(2):
                cache.write_kv(layer, on(kv[layer]), on(-kv[layer]), on(np.asarray(slots)))
            m.remove_sequence(0)
            other = rng.standard_normal((4 * BS, 2, 8)).astype(np.float32)
            fill = m.add_sequence(1, num_tokens=4 * BS)            # the whole pool: the three go to the tier
            for layer in range(2):                                  # and their blocks are overwritten at once
                cache.write_kv(layer, on(other), on(other), on(np.asarray(fill)))
            assert np.array_equal(cache.gather(1, 1)[0].to_numpy(), other)
            m.remove_sequence(1)
            m.add_sequence(2, prompt)                               # back from the tier, read at once
            assert m.num_cached_tokens(2) == 3 * BS
            for layer in range(2):
                k, v = (a.to_numpy() for a in cache.gather(2, layer))
                assert np.array_equal(k[:3 * BS], kv[layer][:3 * BS]), (round, layer)
                assert np.array_equal(v[:3 * BS], -kv[layer][:3 * BS]), (round, layer)
            m.remove_sequence(2)
        m.check_invariants()
        assert cache.stats()["host_reloaded_blocks"] == 36


def _dev(arr):
    """A copy of arr on GPU 0 (rocmforge's own buffers)."""
    from rocmforge._dlpack import DeviceArray
    buf = rf.DeviceBuffer(arr.nbytes, 0)
    buf.copy_from_host(np.ascontiguousarray(arr))
    return DeviceArray(buf, arr.shape, {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64"}[arr.dtype])


def test_pinned_memory_needs_a_gpu_backend():
    if GPU is not None:
        with rf.DeviceBuffer(4096, -1, pinned=True) as buf:
            assert buf.pinned and buf.on_host
            buf.copy_from_host(np.arange(1024, dtype=np.int32))
            assert (buf.to_host().view(np.int32) == np.arange(1024)).all()
        with pytest.raises(rf.ArgumentValueError, match="pinned"):
            rf.DeviceBuffer(16, 0, pinned=True)                   # pinned memory is host memory
    else:
        with pytest.raises(rf.ArgumentValueError, match="pinned"):
            rf.DeviceBuffer(4096, -1, pinned=True)
    assert not rf.DeviceBuffer(16, -1).pinned
