"""Random operation sequences run on the core and on the reference model; every
observable must agree after every step, and check_invariants() must pass."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import rocmforge
from model import ModelManager

SEQ_IDS = st.integers(min_value=0, max_value=7)
TOKEN = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Prefix-cache runs draw tokens from a few shared stems and a tiny alphabet, so
# prompts share leading blocks and hits, misses and key collisions all happen.
STEMS = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5]]
PROMPT = st.tuples(st.sampled_from(STEMS), st.lists(st.integers(0, 2), max_size=8)).map(
    lambda t: (t[0] + t[1])[:14])
SALT = st.sampled_from([None, None, 1, "tenant"])


def event_tuple(ev):
    if isinstance(ev, rocmforge.BlockStored):
        return ("stored", ev.key, ev.parent_key, ev.num_tokens)
    if isinstance(ev, rocmforge.BlockRemoved):
        return ("removed", ev.key)
    return ("cleared",)


class CoreVsModel(RuleBasedStateMachine):
    core = None
    prefix = False

    @initialize(num_blocks=st.integers(1, 40), block_size=st.integers(1, 5), evict=st.booleans(),
                policy=st.sampled_from(["lru", "arc"]), key_bits=st.sampled_from([63, 63, 2]))
    def setup(self, num_blocks, block_size, evict, policy, key_bits):
        if self.prefix:
            self.core = rocmforge.BlockManager(
                num_blocks, block_size, evict_sequences=evict, enable_prefix_caching=True,
                eviction_policy=policy, enable_events=True, _key_bits=key_bits)
            self.model = ModelManager(num_blocks, block_size, evict, prefix=True, policy=policy,
                                      key_bits=key_bits)
        else:
            self.core = rocmforge.BlockManager(num_blocks, block_size, evict_sequences=evict)
            self.model = ModelManager(num_blocks, block_size, evict)

    def both(self, core_fn, model_fn):
        """Run one operation on both sides: same exception class, or same result."""
        try:
            expected = model_fn()
        except Exception as exc:  # noqa: BLE001 - the class is what is compared
            expected_exc = type(exc)
        else:
            expected_exc = None
        try:
            got = core_fn()
        except rocmforge.KvCacheError as exc:
            assert expected_exc is not None, f"core raised {exc!r}, model succeeded"
            assert type(exc) is expected_exc, f"core raised {exc!r}, model {expected_exc.__name__}"
            return None
        assert expected_exc is None, f"model raised {expected_exc.__name__}, core succeeded"
        return got, expected

    def block_ids(self):
        return st.integers(-1, self.model.num_blocks)

    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        r = self.both(lambda: self.core.allocate(n), lambda: self.model.allocate(n))
        if r:
            assert r[0].tolist() == r[1]

    @rule(n=st.integers(0, 3), data=st.data())
    def allocate_one_or_decref_one(self, n, data):
        if n == 0:
            r = self.both(self.core.allocate_one, lambda: self.model.allocate(1))
            if r:
                assert [r[0]] == r[1]
        else:
            b = data.draw(self.block_ids())
            self.both(lambda: self.core.decref_one(b), lambda: self.model.decref([b]))

    @rule(data=st.data())
    def incref(self, data):
        ids = data.draw(st.lists(self.block_ids(), max_size=3))
        self.both(lambda: self.core.incref(np.array(ids, dtype=np.int32)), lambda: self.model.incref(ids))

    @rule(data=st.data())
    def decref(self, data):
        ids = data.draw(st.lists(self.block_ids(), max_size=3))
        self.both(lambda: self.core.decref(ids), lambda: self.model.decref(ids))

    @rule(sid=SEQ_IDS, with_tokens=st.booleans(), data=st.data())
    def add_sequence(self, sid, with_tokens, data):
        n = data.draw(st.integers(0, 14))
        if with_tokens:
            toks = data.draw(st.lists(TOKEN, min_size=n, max_size=n))
            r = self.both(lambda: self.core.add_sequence(sid, np.array(toks, dtype=np.int64)),
                          lambda: self.model.add_sequence(sid, tokens=toks))
        else:
            r = self.both(lambda: self.core.add_sequence(sid, num_tokens=n),
                          lambda: self.model.add_sequence(sid, num_tokens=n))
        if r:
            assert r[0].tolist() == r[1]

    @precondition(lambda self: self.prefix)
    @rule(sid=SEQ_IDS, prompt=PROMPT, salt=SALT)
    def add_prompt(self, sid, prompt, salt):
        r = self.both(lambda: self.core.add_sequence(sid, np.array(prompt, dtype=np.int32), salt=salt),
                      lambda: self.model.add_sequence(sid, tokens=prompt, salt=salt))
        if r:
            assert r[0].tolist() == r[1]

    @precondition(lambda self: self.prefix)
    @rule(turns=st.lists(st.tuples(SEQ_IDS, PROMPT, SALT), min_size=1, max_size=4))
    def prompt_turns(self, turns):
        """Requests coming and going: each replaces its sequence id with a new prompt."""
        for sid, prompt, salt in turns:
            if sid in self.model.seqs:
                self.both(lambda: self.core.remove_sequence(sid), lambda: self.model.remove_sequence(sid))
            self.add_prompt(sid, prompt, salt)

    @precondition(lambda self: self.prefix)
    @rule(prompt=PROMPT, salt=SALT)
    def lookup_prefix(self, prompt, salt):
        assert self.core.lookup_prefix(prompt, salt=salt) == self.model.lookup_prefix(prompt, salt)

    @precondition(lambda self: self.prefix)
    @rule(prompt=PROMPT, salt=SALT)
    def acquire_prefix(self, prompt, salt):
        assert self.core.acquire_prefix(prompt, salt=salt).tolist() == self.model.acquire_prefix(prompt, salt)

    @precondition(lambda self: self.prefix)
    @rule()
    def reset_prefix_cache(self):
        self.core.reset_prefix_cache()
        self.model.reset_prefix_cache()

    @precondition(lambda self: self.prefix)
    @rule()
    def take_events(self):
        assert [event_tuple(e) for e in self.core.take_events()] == self.model.take_events()

    @rule(sids=st.lists(SEQ_IDS, max_size=5), with_tokens=st.booleans(), data=st.data())
    def append_batch(self, sids, with_tokens, data):
        counts = data.draw(st.lists(st.integers(0, 6), min_size=len(sids), max_size=len(sids)))
        toks = data.draw(st.lists(TOKEN, min_size=sum(counts), max_size=sum(counts))) if with_tokens else None
        r = self.both(
            lambda: self.core.append_batch(np.array(sids, dtype=np.int64), np.array(counts, dtype=np.int32),
                                           None if toks is None else np.array(toks, dtype=np.int32)),
            lambda: self.model.append_batch(sids, counts, toks))
        if r:
            assert r[0].tolist() == r[1]

    @rule(sid=SEQ_IDS, count=st.integers(0, 4), with_tokens=st.booleans())
    def append(self, sid, count, with_tokens):
        if with_tokens:
            toks = list(range(100, 100 + count))
            r = self.both(lambda: self.core.append(sid, toks), lambda: self.model.append_batch([sid], [count], toks))
        else:
            r = self.both(lambda: self.core.append(sid, count), lambda: self.model.append_batch([sid], [count]))
        if r:
            assert r[0].tolist() == r[1]

    @rule(src=SEQ_IDS, dst=SEQ_IDS)
    def fork(self, src, dst):
        self.both(lambda: self.core.fork(src, dst), lambda: self.model.fork(src, dst))

    @rule(sid=SEQ_IDS)
    def remove(self, sid):
        self.both(lambda: self.core.remove_sequence(sid), lambda: self.model.remove_sequence(sid))

    @rule()
    def take_pending_copies(self):
        assert [tuple(p) for p in self.core.take_pending_copies().tolist()] == self.model.take_pending_copies()

    @rule()
    def take_evicted(self):
        assert self.core.take_evicted().tolist() == self.model.take_evicted()

    @precondition(lambda self: self.core is not None)
    @rule()
    def compact(self):
        r = self.both(self.core.compact, self.model.compact)
        if r:
            assert [tuple(m) for m in r[0].tolist()] == r[1]

    @rule(data=st.data())
    def shrink(self, data):
        n = data.draw(st.integers(0, self.model.num_blocks + 1))
        self.both(lambda: self.core.shrink(n), lambda: self.model.shrink(n))

    @rule(extra=st.integers(0, 8))
    def grow(self, extra):
        n = self.model.num_blocks + extra
        self.both(lambda: self.core.grow(n), lambda: self.model.grow(n))

    @invariant()
    def agrees_with_model(self):
        if self.core is None:
            return
        core, model = self.core, self.model
        core.check_invariants()
        assert core.num_blocks == model.num_blocks
        assert core.num_free_blocks == model.num_free
        assert [core.refcount(b) for b in range(model.num_blocks)] == model.rc
        assert core.sequence_ids().tolist() == list(model.seqs)
        for sid, s in model.seqs.items():
            assert core.block_table(sid).tolist() == s.blocks
            assert core.num_tokens(sid) == s.num_tokens
            toks = core.sequence_tokens(sid)
            assert (None if toks is None else toks.tolist()) == s.tokens
            assert core.sequence_info(sid)["access_count"] == s.access_count
            assert core.num_cached_tokens(sid) == s.cached_tokens
        if self.prefix:
            assert core.num_cached_blocks == len(model.cached)
            assert core.num_evictable_blocks == sum(len(lst) for lst in model.lists.values())
        stats = core.stats()
        for key, value in model.stats.items():
            assert stats[key] == value, key


class PrefixCoreVsModel(CoreVsModel):
    """The same machine with prefix caching, both policies, events and (2-bit
    keys) forced hash collisions."""

    prefix = True


SETTINGS = settings(max_examples=200, stateful_step_count=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TestCoreVsModel = CoreVsModel.TestCase
TestCoreVsModel.settings = SETTINGS
TestPrefixCoreVsModel = PrefixCoreVsModel.TestCase
TestPrefixCoreVsModel.settings = SETTINGS
