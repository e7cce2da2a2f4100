"""The engine layer: blocks released on completion and cancel in the same step,
bounded finished records, preemption (recompute and swap) that changes no
output, eviction by the manager, threads submitting while one steps."""

import threading
import time

import numpy as np
import pytest

import rocmforge as rf
from rocmforge.config import CacheConfig
from rocmforge.engine import Engine, Request, RequestState, SchedulerConfig


def next_token(context):
    """A deterministic 'model': the next token depends on the context only."""
    return int((int(context[-1]) * 1103515245 + len(context) * 12345) % 50021)


class Model:
    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        assert len(batch.slots) == sum(batch.num_new_tokens)
        return np.array([next_token(r.context()) for r in batch.sampling], dtype=np.int64)


class KvModel(Model):
    """Also returns K/V for every new token: a function of (token, position), as a real model's would be."""

    def __init__(self, layers, heads, dim):
        super().__init__()
        self.shape = (layers, heads, dim)

    def __call__(self, batch):
        tokens = super().__call__(batch)
        rows = []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed - n
            ctx = req.context()[start:req.num_computed].astype(np.float32)
            pos = np.arange(start, req.num_computed, dtype=np.float32)
            rows.append(ctx[:, None] * 0.001 + pos[:, None])
        flat = np.concatenate(rows) if rows else np.zeros((0, 1), np.float32)
        layers, heads, dim = self.shape
        kv = np.broadcast_to(flat[:, :, None], (len(flat), heads, dim)).astype(np.float32)

        class Out:
            pass
        out = Out()
        out.tokens, out.keys, out.values = tokens, [kv] * layers, [-kv] * layers
        return out


def expected_output(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(next_token(np.array(ctx)))
    return tuple(ctx[len(prompt):])


def run(engine, max_steps=100_000):
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps
    return steps


def prompts(n, rng, lo=5, hi=60):
    return [rng.integers(0, 1000, int(rng.integers(lo, hi))).astype(np.int32) for _ in range(n)]


def test_completion_releases_blocks_in_the_same_step():
    m = rf.BlockManager(64, 4)
    eng = Engine(m, Model())
    eng.submit(Request("a", np.arange(10, dtype=np.int32), max_new_tokens=3))
    finished = []
    while not finished:
        finished = eng.step()
        if not finished:
            assert m.num_used_blocks > 0
    assert finished[0].state is RequestState.FINISHED and m.num_used_blocks == 0 and len(m) == 0
    assert eng.finished["a"].output_tokens == expected_output(np.arange(10), 3)


def test_a_thousand_requests_leave_nothing_behind():
    m = rf.BlockManager(256, 16, enable_prefix_caching=True)
    eng = Engine(m, Model(), SchedulerConfig(max_finished=100))
    rng = np.random.default_rng(0)
    ps = prompts(1000, rng)
    for i, p in enumerate(ps):
        eng.submit(Request(i, p, max_new_tokens=int(rng.integers(1, 20)), eos_token_id=7))
        if i % 50 == 0:
            run(eng)
    run(eng)
    m.check_invariants()
    assert m.num_used_blocks == 0 and len(m) == 0
    assert len(eng.finished) == 100 and not eng.running and not eng.waiting and not eng.has_work()
    assert eng.metrics()["finished"] == 1000
    for rid in list(eng.finished)[-5:]:
        rec = eng.finished[rid]
        full = expected_output(ps[rid], 20)
        assert rec.output_tokens == full[:len(rec.output_tokens)]


def test_finished_records_are_purged_by_age():
    eng = Engine(rf.BlockManager(64, 4), Model(), SchedulerConfig(finished_ttl=0.05))
    eng.submit(Request("old", np.arange(3, dtype=np.int32), 1))
    run(eng)
    assert "old" in eng.finished
    time.sleep(0.1)
    eng.submit(Request("new", np.arange(3, dtype=np.int32), 1))
    run(eng)
    assert list(eng.finished) == ["new"]


def test_cancel_releases_waiting_and_running_requests():
    m = rf.BlockManager(64, 4)
    eng = Engine(m, Model(), SchedulerConfig(max_num_seqs=1))
    eng.submit(Request("run", np.arange(12, dtype=np.int32), 100))
    eng.submit(Request("wait", np.arange(12, dtype=np.int32), 100))
    eng.step()
    assert m.num_used_blocks > 0 and len(eng.waiting) == 1
    assert eng.cancel("run") and eng.cancel("wait") and not eng.cancel("nobody")
    done = eng.step()
    assert {r.request_id for r in done} == {"run", "wait"}
    assert all(r.state is RequestState.CANCELLED for r in done)
    assert m.num_used_blocks == 0 and not eng.has_work()


@pytest.mark.parametrize("mode", ["recompute", "swap", "evict"])
def test_a_full_cache_preempts_and_outputs_are_unchanged(mode):
    rng = np.random.default_rng(1)
    ps = prompts(12, rng, 10, 40)
    cfg = CacheConfig(2, 1, 4, block_size=4, num_blocks=40, dtype="float32")
    cache = rf.KvCache(cfg, "cpu", evict_sequences=(mode == "evict"))
    eng = Engine(cache, KvModel(2, 1, 4),
                 SchedulerConfig(max_tokens_per_step=64, preemption="swap" if mode == "swap" else "recompute"))
    for i, p in enumerate(ps):
        eng.submit(Request(i, p, max_new_tokens=30))
    if mode == "evict":              # another user of the manager takes blocks: running requests are evicted
        for _ in range(3):
            eng.step()
        cache.manager.add_sequence(10**9, num_tokens=4 * 30)
        eng.step()
        cache.manager.remove_sequence(10**9)
    run(eng)
    metrics = eng.metrics()
    assert metrics["preemptions"] > 0
    if mode == "evict":
        assert metrics["evictions"] > 0
    for i, p in enumerate(ps):
        assert eng.finished[i].output_tokens == expected_output(p, 30)
    assert cache.manager.num_used_blocks == 0 and cache.swapped_sequences() == []
    cache.manager.check_invariants()


def test_kv_written_by_the_engine_is_in_the_cache():
    cfg = CacheConfig(2, 1, 4, block_size=4, num_blocks=64, dtype="float32")
    cache = rf.KvCache(cfg, "cpu")
    captured = {}

    class Peek(KvModel):
        def __call__(self, batch):
            out = super().__call__(batch)
            for req in batch.requests:
                if req.num_computed == req.context_len and len(req.output_tokens) == 2:
                    captured["ctx"] = req.context().copy()
            return out

    eng = Engine(cache, Peek(2, 1, 4))
    eng.submit(Request("x", np.arange(9, dtype=np.int32), max_new_tokens=5))
    while "ctx" not in captured:
        eng.step()
    k, v = cache.gather(eng.running[0].seq_id, 1)
    ctx = captured["ctx"]
    want = ctx.astype(np.float32) * 0.001 + np.arange(len(ctx), dtype=np.float32)
    assert np.allclose(k.to_numpy()[:, 0, 0], want) and np.allclose(v.to_numpy()[:, 0, 3], -want)


class Reader(KvModel):
    """Reads, as attention would, each request's cached context (every position
    before its new tokens) when called, and notes the requests for which it
    does not hold the K/V the model wrote for those tokens. raw: straight from
    the host cache's storage, as a model's own kernel would, not through gather()."""

    def __init__(self, cache, *shape, raw=False):
        super().__init__(*shape)
        self.cache, self.raw, self.read, self.unwritten = cache, raw, 0, []

    def _keys(self, seq_id, n):
        if not self.raw:
            return self.cache.gather(seq_id, 0)[0].to_numpy()[:n, 0, 0]
        bs = self.cache.block_size
        table = self.cache.manager.block_table(seq_id)
        slots = table[np.arange(n) // bs].astype(np.int64) * bs + np.arange(n) % bs
        return np.asarray(self.cache.key_cache(0)).reshape(-1, *self.shape[1:])[slots, 0, 0]

    def __call__(self, batch):
        for req, n in zip(batch.requests, batch.num_new_tokens):
            start = req.num_computed - n
            k = self._keys(req.seq_id, start)
            want = req.context()[:start].astype(np.float32) * 0.001 + np.arange(start, dtype=np.float32)
            if not np.allclose(k, want, rtol=0, atol=1e-3):
                self.unwritten.append(req.request_id)
            self.read += start
        return super().__call__(batch)


@pytest.mark.parametrize("prompt_len", [16, 19, 40])
def test_a_prefix_cached_in_this_step_is_not_read_before_it_is_written(prompt_len):
    """Requests admitted in one step with the same prompt: the first caches the
    prompt's blocks as it is added, but their K/V is written only after the
    model returns. The others must compute those tokens themselves in that
    step (a hit counts from the next step on), never read them from the cache."""
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=64, dtype="float32")
    cache = rf.KvCache(cfg, "cpu", enable_prefix_caching=True)
    model = Reader(cache, 1, 1, 4)
    eng = Engine(cache, model, SchedulerConfig(max_num_seqs=4, max_tokens_per_step=64))
    prompt = np.arange(prompt_len, dtype=np.int32) % 7
    for rid in "abc":
        eng.submit(Request(rid, prompt, 3))
    eng.step()
    eng.submit(Request("d", prompt, 3))         # the next step: a hit on written blocks
    run(eng)
    assert model.unwritten == []
    assert all(eng.finished[r].output_tokens == expected_output(prompt, 3) for r in "abcd")
    assert eng.finished["d"].num_cached_tokens == prompt_len // 4 * 4 and model.read > 0


def test_threads_submit_and_cancel_while_one_thread_steps():
    m = rf.BlockManager(512, 8, enable_prefix_caching=True)
    eng = Engine(m, Model(), SchedulerConfig(max_tokens_per_step=256))
    stop = threading.Event()
    errors = []

    def stepper():
        try:
            while not stop.is_set() or eng.has_work():
                eng.step()
        except Exception as exc:        # reported below
            errors.append(exc)

    def client(k):
        rng = np.random.default_rng(k)
        for i in range(200):
            eng.submit(Request((k, i), rng.integers(0, 50, int(rng.integers(1, 40))).astype(np.int32), 8))
            if i % 7 == 0:
                eng.cancel((k, i - 3))

    t = threading.Thread(target=stepper)
    t.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    stop.set()
    t.join()
    assert not errors
    met = eng.metrics()
    assert met["finished"] + met["cancelled"] == 800 and m.num_used_blocks == 0
    m.check_invariants()


def test_metrics_text_and_bad_input():
    m = rf.BlockManager(8, 4)
    eng = Engine(m, Model())
    text = eng.metrics_text()
    assert "# TYPE rocmforge_preemptions counter" in text and "rocmforge_block_usage 0" in text
    with pytest.raises(rf.ArgumentValueError, match="more blocks"):
        eng.submit(Request("big", np.arange(30, dtype=np.int32), 10))
    eng.submit(Request("a", np.arange(3, dtype=np.int32), 1))
    with pytest.raises(rf.ArgumentValueError, match="already"):
        eng.submit(Request("a", np.arange(3, dtype=np.int32), 1))
    for bad in (dict(prompt_tokens=np.zeros(0, np.int32), max_new_tokens=1),
                dict(prompt_tokens=np.zeros(3, np.int32), max_new_tokens=0)):
        with pytest.raises(rf.ArgumentValueError):
            Request("b", **bad)
    with pytest.raises(rf.ArgumentValueError):
        SchedulerConfig(preemption="drop")
    with pytest.raises(rf.ArgumentValueError, match="swap"):
        Engine(m, Model(), SchedulerConfig(preemption="swap"))
    with pytest.raises(rf.ArgumentTypeError):
        Engine(object(), Model())


def test_prefix_hits_are_not_computed_again():
    m = rf.BlockManager(64, 4, enable_prefix_caching=True)
    seen = []

    class Record(Model):
        def __call__(self, batch):
            seen.append(list(batch.num_new_tokens))
            return super().__call__(batch)

    eng = Engine(m, Record())
    prompt = np.arange(16, dtype=np.int32)
    for rid in ("first", "second"):
        eng.submit(Request(rid, prompt, max_new_tokens=2))
        run(eng)
    assert seen[0] == [16] and seen[2] == [1]            # 15 of 16 prompt tokens were cache hits
    assert eng.finished["second"].num_cached_tokens == 16
    assert eng.finished["second"].output_tokens == eng.finished["first"].output_tokens
    assert eng.metrics()["prefix_hit_rate"] == 0.5


def test_cancel_drops_a_swapped_out_request():
    rng = np.random.default_rng(3)
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=40, dtype="float32")
    cache = rf.KvCache(cfg, "cpu")
    eng = Engine(cache, KvModel(1, 1, 4), SchedulerConfig(max_tokens_per_step=64, preemption="swap"))
    for i, p in enumerate(prompts(12, rng, 10, 40)):
        eng.submit(Request(i, p, max_new_tokens=30))
    while not eng.swapped:
        eng.step()
    for i in range(12):
        eng.cancel(i)
    eng.step()
    assert cache.swapped_sequences() == [] and cache.manager.num_used_blocks == 0 and not eng.has_work()


def test_admission_waits_while_the_blocks_held_elsewhere_leave_no_room():
    """With nothing running, admission tries add_sequence, which raises OutOfBlocks
    while blocks are held outside the engine: the request keeps waiting, and is
    admitted once they are released."""
    m = rf.BlockManager(8, 4)
    held = m.allocate(6)
    eng = Engine(m, Model())
    eng.submit(Request("big", np.arange(12, dtype=np.int32), max_new_tokens=2))   # 3 blocks
    assert eng.step() == [] and [r.request_id for r in eng.waiting] == ["big"] and not eng.running
    assert m.num_used_blocks == 6 and len(m) == 0
    m.decref(held)
    run(eng)
    assert eng.finished["big"].output_tokens == expected_output(np.arange(12), 2)
    assert m.num_used_blocks == 0


def test_a_lone_running_request_that_outgrows_the_pool_fails():
    """Preemption needs another running request to give way: a lone request that
    cannot grow fails with OutOfBlocks, its blocks released, the manager consistent."""
    m = rf.BlockManager(6, 4)
    eng = Engine(m, Model())
    eng.submit(Request("long", np.arange(11, dtype=np.int32), max_new_tokens=10))
    eng.step()                                     # admitted: 3 blocks
    held = m.allocate(m.num_free_blocks)           # the rest held outside the engine
    done = []
    while not done:
        done = eng.step()
    assert [r.request_id for r in done] == ["long"] and done[0].state is RequestState.FAILED
    assert eng.finished["long"].error.startswith("OutOfBlocks: ")
    assert not eng.has_work() and m.num_used_blocks == len(held) and eng.metrics()["failed"] == 1
    m.check_invariants()


def test_priority_then_arrival_order_eos_and_request_times():
    """One request at a time: lower priority values run first, FCFS within one;
    an EOS token ends a request early; arrival and finish times are stamped."""
    m = rf.BlockManager(64, 4)
    eng = Engine(m, Model(), SchedulerConfig(max_num_seqs=1))
    prompt = np.arange(1, 6, dtype=np.int32)
    eos = expected_output(prompt, 3)[1]
    reqs = [Request("late", prompt, 3, priority=1), Request("first", prompt, 3, priority=0),
            Request("second", prompt, 3, priority=0), Request("eos", prompt, 3, priority=-1, eos_token_id=eos)]
    for r in reqs:
        eng.submit(r)
    order = []
    while eng.has_work():
        order += [r.request_id for r in eng.step()]
    assert order == ["eos", "first", "second", "late"]
    assert eng.finished["eos"].output_tokens == expected_output(prompt, 3)[:2]
    assert all(r.arrival_time > 0 and r.finish_time >= r.arrival_time and r.num_preemptions == 0 for r in reqs)
    assert reqs[1].arrival_time <= reqs[2].arrival_time
    assert eng.finished["late"].finish_time == reqs[0].finish_time


def test_context_slice_equals_slicing_the_context():
    r = Request("r", np.arange(5, dtype=np.int32), 10)
    r.output_tokens += [50, 51, 52]
    for start, stop in ((0, 8), (3, 6), (5, 7), (6, 8), (7, 8)):
        assert r.context_slice(start, stop).tolist() == r.context()[start:stop].tolist()


def test_prefix_hit_rate_counts_cached_prompt_tokens():
    m = rf.BlockManager(64, 4, enable_prefix_caching=True)
    eng = Engine(m, Model())
    assert eng.prefix_hit_rate == 0.0
    eng.submit(Request("a", np.arange(16, dtype=np.int32), 1))
    run(eng)
    eng.submit(Request("b", np.arange(16, dtype=np.int32), 1))
    run(eng)
    assert eng.prefix_hit_rate == pytest.approx(16 / 32)      # b found all 4 blocks of a
    assert eng.metrics()["prefix_hit_rate"] == eng.prefix_hit_rate


def test_the_scheduler_alone_places_admits_and_retires():
    from rocmforge.engine import Scheduler
    m = rf.BlockManager(16, 4)
    counters = dict(preemptions=0, evictions=0, prompt_tokens=0, prefix_hit_tokens=0, prefix_query_tokens=0)
    sched = Scheduler(m, None, SchedulerConfig(max_tokens_per_step=10), counters)
    a, b = Request("a", np.arange(6, dtype=np.int32), 2), Request("b", np.arange(9, dtype=np.int32), 2)
    a.seq_id, b.seq_id = 0, 1
    sched.add([a, b])
    work = sched.schedule(10)                                  # a's 6 tokens, then 4 of b's prompt
    assert [(r.request_id, len(s)) for r, s in work] == [("a", 6), ("b", 4)]
    assert m.num_tokens(0) == 6 and m.num_tokens(1) == 4 and counters["prompt_tokens"] == 15
    for r, s in work:
        r.num_computed += len(s)
    a.state = RequestState.FINISHED
    m.remove_sequence(0)
    sched.retire()
    assert sched.running == [b]


def test_admission_reserves_the_prompt_chunks_running_requests_have_yet_to_take():
    """A starts with a cached prefix, so its first chunk costs little of the step's
    token budget and B could be admitted in the same step: B's prompt fits in the
    blocks free then, but not beside the rest of A's prompt. B waits until there
    is room, and nobody is preempted."""
    m = rf.BlockManager(24, 4, enable_prefix_caching=True)
    eng = Engine(m, Model(), SchedulerConfig(max_tokens_per_step=20))
    prefix = np.arange(16, dtype=np.int32)
    eng.submit(Request("warm", prefix, max_new_tokens=1))
    run(eng)                                            # 4 blocks cached, evictable
    a = np.concatenate([prefix, np.arange(100, 164, dtype=np.int32)])     # 80 tokens: 20 blocks
    b = np.arange(200, 216, dtype=np.int32)
    eng.submit(Request("a", a, max_new_tokens=4))
    eng.submit(Request("b", b, max_new_tokens=4))
    eng.step()
    assert [r.request_id for r in eng.running] == ["a"] and eng.running[0].num_cached_tokens == 16
    run(eng)
    assert eng.metrics()["preemptions"] == 0
    assert eng.finished["a"].output_tokens == expected_output(a, 4)
    assert eng.finished["b"].output_tokens == expected_output(b, 4)


@pytest.mark.parametrize("share, overlap", [(0.0, True), (1.0, False)])
def test_growth_reserve_holds_back_room_for_running_outputs(share, overlap):
    """Room for one running request's whole output (growth_reserve=1) keeps a second
    request waiting that the default admits at once."""
    m = rf.BlockManager(12, 4)
    eng = Engine(m, Model(), SchedulerConfig(growth_reserve=share))
    eng.submit(Request("a", np.arange(8, dtype=np.int32), max_new_tokens=24))      # 2 blocks, up to 8
    eng.step()
    eng.submit(Request("b", np.arange(50, 58, dtype=np.int32), max_new_tokens=2))
    eng.step()
    assert (len(eng.running) == 2) is overlap
    run(eng)
    assert eng.finished["b"].output_tokens == expected_output(np.arange(50, 58), 2)
    with pytest.raises(rf.ArgumentValueError, match="growth_reserve"):
        SchedulerConfig(growth_reserve=1.5)
