"""The engine's fault list: a model that raises (also at random, read by a model that
checks every cached token it reads) or breaks its return contract,
bad requests, sequence ids already taken in the manager, a swap that cannot
go out or come back, the manager running out of host memory. Every fault fails only the requests it touches, with the
reason recorded; their blocks are released in the same step; the rest are
served with unchanged outputs; the manager stays consistent."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge.config import CacheConfig
from rocmforge.engine import Engine, Request, RequestState, SchedulerConfig, token_ids
from test_engine import KvModel, Model, expected_output, run


class FailOn(Model):
    """Model that raises (or returns `bad`) on calls whose number is in `calls`."""

    def __init__(self, calls, bad=None, exc=RuntimeError("boom"), inner=None):
        super().__init__()
        self.fail_calls, self.bad, self.exc, self.inner = set(calls), bad, exc, inner
        self.failed_ids = []

    def __call__(self, batch):
        if self.calls + 1 in self.fail_calls:
            self.calls += 1
            self.failed_ids.append([r.request_id for r in batch.requests])
            if self.bad is None:            # a fresh exception: one raised before keeps its traceback
                raise type(self.exc)(*self.exc.args)
            return self.bad(batch)
        if self.inner is None:
            return super().__call__(batch)
        self.calls += 1                     # (numbered here: the inner model counts only its own)
        return self.inner(batch)


def check_after_failure(eng, manager, failed, served, prompts, n_new):
    """failed requests are FAILED with a reason; served ones have their exact outputs;
    nothing is left in the manager; the engine is idle."""
    for rid in failed:
        rec = eng.finished[rid]
        assert rec.state is RequestState.FAILED and rec.error
    for rid in served:
        assert eng.finished[rid].state is RequestState.FINISHED
        assert eng.finished[rid].output_tokens == expected_output(prompts[rid], n_new)
    assert not eng.has_work() and not eng.running and not eng.waiting
    assert manager.num_used_blocks == 0 and len(manager) == 0
    assert eng.metrics()["failed"] == len(failed)
    manager.check_invariants()


def test_a_model_that_raises_fails_its_step_and_the_engine_serves_the_rest():
    m = rf.BlockManager(64, 4, enable_prefix_caching=True)
    model = FailOn({3})
    eng = Engine(m, model, SchedulerConfig(max_num_seqs=2))
    rng = np.random.default_rng(0)
    ps = {i: rng.integers(0, 900, 9).astype(np.int32) for i in range(5)}
    for i, p in ps.items():
        eng.submit(Request(i, p, max_new_tokens=4))
    steps = 0
    while eng.has_work():
        done = eng.step()
        steps += 1
        if steps == 3:                          # the failing step: its requests leave now
            assert {r.request_id for r in done} == set(model.failed_ids[0])
            assert all(r.state is RequestState.FAILED for r in done)
            assert all(r.seq_id not in m for r in done)
        assert steps < 100
    failed = model.failed_ids[0]
    assert eng.finished[failed[0]].error == "RuntimeError: boom"
    check_after_failure(eng, m, failed, [i for i in ps if i not in failed], ps, 4)


def test_a_failed_step_leaves_no_unwritten_blocks_in_the_prefix_cache():
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=32, dtype="float32")
    cache = rf.KvCache(cfg, "cpu", enable_prefix_caching=True)
    eng = Engine(cache, FailOn({1}, inner=KvModel(1, 1, 4)))
    prompt = np.arange(16, dtype=np.int32)
    eng.submit(Request("first", prompt, 2))
    eng.step()                                  # the prompt's blocks were completed, their K/V never written
    assert eng.finished["first"].state is RequestState.FAILED
    assert cache.manager.lookup_prefix(prompt) == 0 and cache.manager.num_cached_blocks == 0
    eng.submit(Request("second", prompt, 2))
    run(eng)
    assert eng.finished["second"].num_cached_tokens == 0
    assert eng.finished["second"].output_tokens == expected_output(prompt, 2)


def test_a_failed_step_keeps_the_blocks_earlier_steps_wrote_in_the_prefix_cache():
    """Only what the failed step was to write leaves the cache: a shared prefix that an
    earlier request wrote stays, and is hit again by the next request."""
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=64, dtype="float32")
    cache = rf.KvCache(cfg, "cpu", enable_prefix_caching=True, enable_events=True)
    m = cache.manager
    eng = Engine(cache, FailOn({3}, inner=KvModel(1, 1, 4)))
    shared = np.arange(16, dtype=np.int32)
    longer = np.concatenate([shared, np.arange(100, 116, dtype=np.int32)])
    other = np.arange(200, 208, dtype=np.int32)
    for rid, prompt in (("warm", shared), ("other", other)):
        eng.submit(Request(rid, prompt, 2))
    run(eng)                                    # model calls 1 and 2
    assert m.lookup_prefix(longer) == 16 and m.lookup_prefix(other) == 8
    m.take_events()
    eng.submit(Request("first", longer, 2))
    eng.step()                                  # call 3: its 16 new tokens' K/V never written
    assert eng.finished["first"].state is RequestState.FAILED
    assert m.lookup_prefix(longer) == 16 and m.lookup_prefix(other) == 8
    assert len([e for e in m.take_events() if isinstance(e, rf.BlockRemoved)]) == 4
    assert m.num_used_blocks == 0
    m.check_invariants()
    eng.submit(Request("second", longer, 2))
    run(eng)
    assert eng.finished["second"].num_cached_tokens == 16
    assert eng.finished["second"].output_tokens == expected_output(longer, 2)


def wrong_count(batch):
    return np.zeros(len(batch.sampling) + 1, dtype=np.int64)


BAD_RETURNS = {
    "too many tokens": (wrong_count, "returned 2 tokens for 1"),
    "None": (lambda b: None, "returned no tokens"),
    "a dict without tokens": (lambda b: {"ids": [1]}, "returned no tokens"),
    "float tokens": (lambda b: np.array([1.5]), "must hold integers"),
    "tokens past int32": (lambda b: [2**40], "outside"),
    "a string": (lambda b: "7", "must be a 1-D array"),
    "2-D tokens": (lambda b: np.zeros((1, 1), dtype=np.int64), "must be 1-D"),
    "K/V without a cache": (lambda b: {"tokens": [1], "keys": [np.zeros(1)], "values": [np.zeros(1)]},
                            "no KvCache"),
}


@pytest.mark.parametrize("name", sorted(BAD_RETURNS))
def test_a_broken_return_contract_fails_the_step_with_a_clear_error(name):
    bad, message = BAD_RETURNS[name]
    m = rf.BlockManager(32, 4)
    eng = Engine(m, FailOn({1}, bad=bad))
    p = {"a": np.arange(5, dtype=np.int32), "b": np.arange(7, 14, dtype=np.int32)}
    eng.submit(Request("a", p["a"], 3))
    run(eng)
    eng.submit(Request("b", p["b"], 3))
    run(eng)
    assert message in eng.finished["a"].error and "model(batch) must return" in eng.finished["a"].error
    check_after_failure(eng, m, ["a"], ["b"], p, 3)


def kv_out(tokens, layers, kv, **extra):
    return {"tokens": tokens, "keys": [kv] * layers, "values": [kv] * layers, **extra}


@pytest.mark.parametrize("case", ["plain tokens", "keys only", "one layer short", "wrong K/V shape"])
def test_a_kvcache_engine_refuses_output_it_cannot_write(case):
    cfg = CacheConfig(2, 1, 4, block_size=4, num_blocks=32, dtype="float32")
    cache = rf.KvCache(cfg, "cpu")

    def bad(batch):
        t = len(batch.slots)
        tokens = [1] * len(batch.sampling)
        return {"plain tokens": lambda: tokens,
                "keys only": lambda: {"tokens": tokens, "keys": [np.zeros((t, 1, 4), np.float32)] * 2},
                "one layer short": lambda: kv_out(tokens, 1, np.zeros((t, 1, 4), np.float32)),
                "wrong K/V shape": lambda: kv_out(tokens, 2, np.zeros((t, 2, 4), np.float32))}[case]()

    eng = Engine(cache, FailOn({1}, bad=bad, inner=KvModel(2, 1, 4)))
    p = {"a": np.arange(6, dtype=np.int32), "b": np.arange(3, 12, dtype=np.int32)}
    eng.submit(Request("a", p["a"], 2))
    run(eng)
    eng.submit(Request("b", p["b"], 2))
    run(eng)
    error = eng.finished["a"].error
    assert error.startswith("ArgumentValueError: ")
    if case == "plain tokens":
        assert "model_writes_kv=True" in error
    check_after_failure(eng, cache.manager, ["a"], ["b"], p, 2)


def test_dict_returns_and_a_model_that_writes_its_own_kv():
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=32, dtype="float32")
    cache = rf.KvCache(cfg, "cpu")
    inner = KvModel(1, 1, 4)

    def as_dict(batch):
        out = inner(batch)
        return {"tokens": out.tokens, "keys": out.keys, "values": out.values}

    eng = Engine(cache, as_dict)
    eng.submit(Request("d", np.arange(7, dtype=np.int32), 3))
    run(eng)
    assert eng.finished["d"].output_tokens == expected_output(np.arange(7), 3)

    def writes_itself(batch):
        out = inner(batch)
        cache.write_kv(0, out.keys[0], out.values[0], batch.slots)
        return out.tokens

    eng = Engine(cache, writes_itself, model_writes_kv=True)
    eng.submit(Request("w", np.arange(7, dtype=np.int32), 3))
    eng.submit(Request("kv", np.arange(9, dtype=np.int32), 3))
    eng.step()
    k, _ = cache.gather(eng.running[0].seq_id, 0)
    assert np.allclose(k.to_numpy()[:7, 0, 0], np.arange(7) * 0.001 + np.arange(7))
    run(eng)
    assert eng.finished["w"].output_tokens == expected_output(np.arange(7), 3)
    eng = Engine(cache, inner, model_writes_kv=True)       # returning K/V anyway is a contract error
    eng.submit(Request("x", np.arange(5, dtype=np.int32), 2))
    run(eng)
    assert "model_writes_kv=True" in eng.finished["x"].error and cache.manager.num_used_blocks == 0


def test_keyboard_interrupt_in_the_model_fails_the_step_and_propagates():
    m = rf.BlockManager(32, 4)
    eng = Engine(m, FailOn({1}, exc=KeyboardInterrupt()))
    eng.submit(Request("a", np.arange(5, dtype=np.int32), 3))
    with pytest.raises(KeyboardInterrupt):
        eng.step()
    assert eng.finished["a"].state is RequestState.FAILED and eng.finished["a"].error == "KeyboardInterrupt: "
    assert not eng.has_work() and m.num_used_blocks == 0 and eng.metrics()["steps"] == 1
    eng.submit(Request("b", np.arange(5, dtype=np.int32), 3))
    run(eng)
    assert eng.finished["b"].output_tokens == expected_output(np.arange(5), 3)


def test_transient_failures_never_stall_a_run_loop():
    """A model that fails every tenth call: `while has_work(): step()` ends, every
    request finished or failed, nothing leaked."""
    m = rf.BlockManager(128, 4, enable_prefix_caching=True)
    model = FailOn(range(10, 3000, 10))
    eng = Engine(m, model, SchedulerConfig(max_num_seqs=4, max_tokens_per_step=32))
    rng = np.random.default_rng(5)
    for i in range(60):
        eng.submit(Request(i, rng.integers(0, 40, int(rng.integers(3, 30))).astype(np.int32), 5))
    run(eng, max_steps=5000)
    met = eng.metrics()
    assert met["finished"] + met["failed"] == 60 and met["failed"] > 0 and met["finished"] > 0
    assert m.num_used_blocks == 0
    m.check_invariants()


@pytest.mark.parametrize("tokens, error", [
    ([1.5, 2.7], rf.ArgumentTypeError), ([2**40], rf.ArgumentValueError), ([float("nan")], rf.ArgumentTypeError),
    ([-2**31 - 1], rf.ArgumentValueError), (np.array([True, False]), rf.ArgumentTypeError),
    ("abc", rf.ArgumentTypeError), (None, rf.ArgumentTypeError), (np.zeros((2, 2), np.int32), rf.ArgumentValueError),
    ([], rf.ArgumentValueError), ([[1, 2], [3]], rf.ArgumentTypeError),
])
def test_request_prompts_are_checked_like_the_block_manager_checks_tokens(tokens, error):
    with pytest.raises(error):
        Request("r", tokens, 1)
    if tokens is None or len(tokens) == 0:          # the manager takes these: a sequence without tokens
        return
    with pytest.raises(error):                      # the manager refuses the same tokens the same way
        rf.BlockManager(8, 4).add_sequence(0, tokens)


def test_token_ids_names_the_argument_it_checks():
    assert token_ids((3, 4)).dtype == np.int32 and token_ids(np.zeros(0)).size == 0
    with pytest.raises(rf.ArgumentValueError, match="^ids holds 4294967296, outside"):
        token_ids([1, 2**32], "ids")


def test_request_fields_are_checked_and_int32_edges_are_accepted():
    r = Request("r", [-2**31, 0, 2**31 - 1], 1)
    assert r.prompt_tokens.dtype == np.int32 and r.prompt_tokens.tolist() == [-2**31, 0, 2**31 - 1]
    assert Request("r", np.array([1, 2], dtype=np.uint8), 1).prompt_tokens.tolist() == [1, 2]
    for bad in (dict(max_new_tokens=1.0), dict(max_new_tokens=True), dict(max_new_tokens=1, priority=0.5),
                dict(max_new_tokens=1, eos_token_id="2"), dict(max_new_tokens=1, salt=1.5),
                dict(max_new_tokens=1, salt=True)):
        with pytest.raises(rf.ArgumentTypeError):
            Request("r", [1, 2], **bad)
    with pytest.raises(rf.ArgumentTypeError, match="hashable"):
        Request(["unhashable"], [1, 2], 1)
    m = rf.BlockManager(8, 4)
    with pytest.raises(rf.ArgumentTypeError):
        Engine(m, "not callable")
    with pytest.raises(rf.ArgumentTypeError):
        Engine(m, Model(), config={"max_num_seqs": 4})
    with pytest.raises(rf.ArgumentTypeError):
        Engine(m, Model()).submit("not a request")


def test_sequence_ids_held_by_the_managers_user_are_never_taken():
    m = rf.BlockManager(64, 4)
    mine = {0: np.arange(5, dtype=np.int32), 1: np.arange(9, dtype=np.int32), 3: np.arange(2, dtype=np.int32)}
    for sid, toks in mine.items():
        m.add_sequence(sid, toks)
    used = m.num_used_blocks
    eng = Engine(m, Model())
    p = {i: np.arange(i, i + 6, dtype=np.int32) for i in range(4)}
    for i, toks in p.items():
        eng.submit(Request(i, toks, 3))
    seen = set()
    while eng.has_work():
        eng.step()
        seen |= {r.seq_id for r in eng.running}
    assert not seen & set(mine)
    for i in p:
        assert eng.finished[i].output_tokens == expected_output(p[i], 3)
    for sid, toks in mine.items():
        assert m.sequence_tokens(sid).tolist() == toks.tolist()
    assert m.num_used_blocks == used and sorted(m.sequence_ids().tolist()) == sorted(mine)


class Proxy:
    """Forwards to the wrapped object, except what a test overrides."""

    def __init__(self, inner, **overrides):
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __contains__(self, item):
        return item in self._inner


def test_an_id_taken_between_the_check_and_add_sequence_is_skipped():
    m = rf.BlockManager(32, 4)
    eng = Engine(m, Model())
    real_add = m.add_sequence

    def add_after_a_rival(seq_id, tokens, salt=None):
        if seq_id == 0 and 0 not in m:
            m.add_sequence(0, num_tokens=1)        # another thread takes the id first
        return real_add(seq_id, tokens, salt=salt)

    eng.scheduler.manager = Proxy(m, add_sequence=add_after_a_rival)
    eng.submit(Request("a", np.arange(5, dtype=np.int32), 2))
    run(eng)
    assert eng.finished["a"].output_tokens == expected_output(np.arange(5), 2)
    assert m.sequence_ids().tolist() == [0] and m.num_tokens(0) == 1


def swap_engine(**overrides):
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=40, dtype="float32")
    cache = rf.KvCache(cfg, "cpu")
    eng = Engine(cache, KvModel(1, 1, 4), SchedulerConfig(max_tokens_per_step=64, preemption="swap"))
    eng.scheduler.cache = Proxy(cache, **overrides)
    rng = np.random.default_rng(1)
    ps = {i: rng.integers(0, 900, int(rng.integers(10, 40))).astype(np.int32) for i in range(12)}
    for i, p in ps.items():
        eng.submit(Request(i, p, max_new_tokens=30))
    return eng, cache, ps


def test_a_swap_out_without_host_memory_falls_back_to_recompute():
    def no_memory(seq_ids):
        raise MemoryError("host memory exhausted")
    eng, cache, ps = swap_engine(swap_out=no_memory)
    run(eng)
    assert eng.metrics()["preemptions"] > 0 and eng.metrics()["failed"] == 0 and cache.swapped_sequences() == []
    check_after_failure(eng, cache.manager, [], list(ps), ps, 30)


def test_a_swap_in_that_fails_fails_only_that_request():
    state = {"failed": None}
    eng, cache, ps = swap_engine()

    def broken_once(seq_ids):
        if state["failed"] is None:
            state["failed"] = seq_ids[0]
            raise rf.DeviceError("copy failed")
        return cache.swap_in(seq_ids)

    eng.scheduler.cache = Proxy(cache, swap_in=broken_once)
    run(eng)
    failed = [i for i, rec in eng.finished.items() if rec.state is RequestState.FAILED]
    assert len(failed) == 1 and "DeviceError: copy failed" in eng.finished[failed[0]].error
    assert cache.swapped_sequences() == []
    check_after_failure(eng, cache.manager, failed, [i for i in ps if i not in failed], ps, 30)


def test_the_manager_running_out_of_host_memory_fails_only_the_requests_it_touches():
    """Host memory runs out inside the core during steps (a test hook fails the
    n-th allocation of the step): an admission that cannot add its sequence
    fails that request, and an append that cannot grow fails the requests it
    named. step() never raises; after every step each running request's
    sequence holds exactly its computed context, with the K/V the model wrote
    for it; the rest are served exactly; nothing leaks."""
    import random
    from rocmforge import _core
    from test_engine import KvModel
    total_failed = 0
    for seed in range(4):
        rng, nrng = random.Random(seed), np.random.default_rng(seed)
        cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=96, dtype="float32")
        with rf.KvCache(cfg, "cpu", enable_prefix_caching=True) as cache:
            eng = Engine(cache, KvModel(1, 1, 4), SchedulerConfig(max_num_seqs=6, max_tokens_per_step=48))
            stems = [nrng.integers(0, 900, 12).astype(np.int32) for _ in range(4)]
            ps = {i: np.concatenate([stems[i % 4], nrng.integers(0, 900, int(nrng.integers(1, 20)))]).astype(np.int32)
                  for i in range(40)}
            for i, p in ps.items():
                eng.submit(Request(i, p, max_new_tokens=6))
            steps = 0
            while eng.has_work():
                steps += 1
                assert steps < 1000
                _core._fail_allocation(rng.randint(1, 6) if rng.random() < 0.2 else 0)
                try:
                    eng.step()
                finally:
                    _core._fail_allocation(0)
                for req in eng.running:
                    n, ctx = req.num_computed, req.context()
                    assert cache.manager.sequence_tokens(req.seq_id).tolist() == ctx[:n].tolist()
                    k, v = (a.to_numpy()[:, 0, 0] for a in cache.gather(req.seq_id, 0))
                    assert np.allclose(k, ctx[:n] * 0.001 + np.arange(n), rtol=0, atol=1e-3)
                    assert np.array_equal(v, -k)
            failed = [i for i, rec in eng.finished.items() if rec.state is RequestState.FAILED]
            assert all(eng.finished[i].error == "MemoryError: rocmforge: host memory exhausted" for i in failed)
            check_after_failure(eng, cache.manager, failed, [i for i in ps if i not in failed], ps, 6)
            total_failed += len(failed)
    assert total_failed > 0


@pytest.mark.parametrize("seed", range(30))
def test_random_model_failures_never_leave_unwritten_kv_to_read(seed):
    """Requests with shared prompt stems arrive over time into a small cache (with
    a host tier or not, preempted by recompute or swap) while the model raises at
    random. The model reads every request's cached context straight from the
    storage when called: it must always hold the K/V written for those tokens
    (hits on blocks a failed step left unwritten, on blocks filled in the same
    step, or on reloads not yet applied would not). Outputs are exact, the
    manager stays consistent, and nothing is left at the end."""
    import logging
    import random
    from test_engine import Reader
    rng, nrng = random.Random(seed), np.random.default_rng(seed)

    class Flaky(Reader):
        def __call__(self, batch):
            out = super().__call__(batch)
            if rng.random() < p_fail:
                raise RuntimeError("flaky")
            return out

    p_fail = rng.choice([0.0, 0.05, 0.2])
    cfg = CacheConfig(1, 1, 4, block_size=4, num_blocks=rng.choice([12, 20, 40]), dtype="float32")
    host = {"host_cache_blocks": rng.choice([4, 16])} if rng.random() < 0.5 else {}
    sched = SchedulerConfig(max_num_seqs=rng.choice([1, 3, 6]), max_tokens_per_step=rng.choice([8, 24, 64]),
                            preemption=rng.choice(["recompute", "swap"]))
    stems = [nrng.integers(0, 30, rng.choice([4, 8, 9])).astype(np.int32) for _ in range(3)]
    prompts = {}
    logging.disable(logging.WARNING)
    try:
        with rf.KvCache(cfg, "cpu", enable_prefix_caching=True, **host) as cache:
            model = Flaky(cache, 1, 1, 4, raw=True)
            eng = Engine(cache, model, sched)
            for _ in range(600):
                if len(prompts) < 25 and rng.random() < 0.3:
                    tail = nrng.integers(0, 30, rng.randrange(10)).astype(np.int32)
                    req = Request(len(prompts), np.concatenate([stems[rng.randrange(3)], tail]), rng.randrange(1, 16))
                    eng.submit(req)
                    prompts[req.request_id] = (req.prompt_tokens, req.max_new_tokens)
                elif not eng.has_work() and len(prompts) == 25:
                    break
                eng.step()
                cache.manager.check_invariants()
            assert not eng.has_work() and cache.manager.num_used_blocks == 0
            assert model.unwritten == [] and model.read > 0
            for rid, rec in eng.finished.items():
                assert rec.state is RequestState.FAILED or rec.output_tokens == expected_output(*prompts[rid])
    finally:
        logging.disable(logging.NOTSET)
