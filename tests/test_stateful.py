"""Random operation sequences run on the core and on the reference model
(tests/model.py, written from the README's contract); every observable must
agree after every step, and check_invariants() must pass.

Budgets come from the Hypothesis profiles in conftest.py: ``ci`` by default,
``--hypothesis-profile=deep`` for tools/stateful_deep.sh. The operation count
is printed at the end of the session."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import rocmforge
from model import ModelManager, salt_value
from opcount import OPS

# Ids at the edges of their types come up as often as small ones.
SEQ_IDS = st.integers(min_value=0, max_value=6) | st.just(2**63 - 1)
TOKEN = st.integers(min_value=-(2**31), max_value=2**31 - 1)
# Prefix-cache runs draw tokens from a few shared stems and a tiny alphabet, so
# prompts share leading blocks, repeat each other's blocks, and (with 2-bit
# keys) collide.
STEMS = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5], [1, 2, 1, 2, 1, 2, 1, 2]]
PROMPT = st.tuples(st.sampled_from(STEMS), st.lists(st.integers(0, 2), max_size=8)).map(
    lambda t: (t[0] + t[1])[:14])
SALTS = [None, 1, "tenant"]
SALT = st.sampled_from([None, None, 1, "tenant"])


def event_tuple(ev):
    if isinstance(ev, rocmforge.BlockStored):
        return ("stored", ev.key, ev.parent_key, ev.num_tokens)
    if isinstance(ev, rocmforge.BlockRemoved):
        return ("removed", ev.key)
    return ("cleared",)


def canonical(events):
    """Events with each run of removals sorted: the contract does not order the
    blocks that one eviction uncaches."""
    out, run = [], []
    for ev in events + [None]:
        if ev is not None and ev[0] == "removed":
            run.append(ev)
            continue
        out += sorted(run)
        run = []
        if ev is not None:
            out.append(ev)
    return out


class CoreVsModel(RuleBasedStateMachine):
    prefix = False

    def __init__(self):
        super().__init__()
        self.core = None
        self.removed = []       # keys the core uncached in the running call (ARC's victims)
        self.mirror = set()     # the core's cached keys, as a router mirrors them from events
        self.prompts = []       # (prompt, salt) of every prompt added so far

    @initialize(num_blocks=st.integers(1, 40), block_size=st.integers(1, 5), evict=st.booleans(),
                policy=st.sampled_from(["lru", "arc"]), key_bits=st.sampled_from([63, 63, 2]),
                shards=st.sampled_from([1, 1, 2, 3]))
    def setup(self, num_blocks, block_size, evict, policy, key_bits, shards):
        if self.prefix:
            self.core = rocmforge.BlockManager(
                num_blocks, block_size, evict_sequences=evict, enable_prefix_caching=True,
                eviction_policy=policy, enable_events=True, _key_bits=key_bits, shards=shards)
            self.model = ModelManager(num_blocks, block_size, evict, prefix=True, policy=policy,
                                      key_bits=key_bits, choose_victim=self.core_victim, shards=shards)
        else:
            self.core = rocmforge.BlockManager(num_blocks, block_size, evict_sequences=evict, shards=shards)
            self.model = ModelManager(num_blocks, block_size, evict, shards=shards)
        assert self.core.num_shards == shards and self.core.thread_shard == 0

    def core_victim(self, candidates):
        """ARC: the block the core evicted next. Its removal events list each
        victim before the descendants it took along, which the model has
        uncached already by the time it asks again."""
        by_key = {self.model.cache[b].key: b for b in self.model.cache}
        while self.removed:
            key = self.removed.pop(0)
            if key in by_key:
                return by_key[key]
        raise AssertionError("the model had to evict a cached block; the core evicted none")

    def both(self, core_fn, model_fn):
        """Run one call on the core, then on the model: the same exception class or
        results to compare, and the same KV events."""
        OPS[type(self).__name__] += 1
        try:
            got, core_exc = core_fn(), None
        except rocmforge.KvCacheError as exc:
            got, core_exc = None, exc
        events = [event_tuple(e) for e in self.core.take_events()]
        self.removed = [e[1] for e in events if e[0] == "removed"]
        try:
            expected, model_exc = model_fn(), None
        except rocmforge.KvCacheError as exc:
            expected, model_exc = None, exc
        if core_exc is not None or model_exc is not None:
            assert type(core_exc) is type(model_exc), f"core: {core_exc!r}, model: {model_exc!r}"
        assert canonical(events) == canonical(self.model.take_events())
        for ev in events:
            if ev[0] == "stored":
                assert ev[1] not in self.mirror
                self.mirror.add(ev[1])
            elif ev[0] == "removed":
                self.mirror.remove(ev[1])
            else:
                self.mirror.clear()
        return None if core_exc is not None else (got, expected)

    def block_ids(self):
        return st.integers(-1, self.model.num_blocks)

    def existing_or_any(self, data):
        """A live sequence id (forks of forks, appends that land), sometimes any id."""
        if self.model.seqs and data.draw(st.integers(0, 3)):
            return data.draw(st.sampled_from(sorted(self.model.seqs)))
        return data.draw(SEQ_IDS)

    # --- shards ---------------------------------------------------------------
    @precondition(lambda self: self.core is not None and self.model.nshards > 1)
    @rule(data=st.data())
    def bind_thread(self, data):
        """Calls from here on come from a thread of another shard."""
        shard = data.draw(st.integers(0, self.model.nshards - 1))
        OPS[type(self).__name__] += 1
        self.core.bind_thread(shard)
        self.model.bind(shard)
        assert self.core.thread_shard == shard

    # --- blocks ---------------------------------------------------------------
    @rule(n=st.integers(0, 6))
    def allocate(self, n):
        r = self.both(lambda: self.core.allocate(n), lambda: self.model.allocate(n))
        if r:
            assert r[0].tolist() == r[1]

    @rule()
    def fill_pool(self):
        """Take every block an allocation can take (the last free block and beyond)."""
        n = self.model.num_free
        r = self.both(lambda: self.core.allocate(n), lambda: self.model.allocate(n))
        if r:
            assert r[0].tolist() == r[1]

    @rule(data=st.data())
    def release_external(self, data):
        held = [b for b in range(self.model.num_blocks) for _ in range(self.model.ext[b])]
        ids = data.draw(st.lists(st.sampled_from(held), max_size=len(held))) if held else []
        self.both(lambda: self.core.decref(np.array(ids, dtype=np.int32)), lambda: self.model.decref(ids))

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

    # --- sequences ------------------------------------------------------------
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

    @rule(data=st.data(), with_tokens=st.booleans())
    def append_batch(self, data, with_tokens):
        sids = [self.existing_or_any(data) for _ in range(data.draw(st.integers(0, 5)))]
        counts = data.draw(st.lists(st.integers(0, 6), min_size=len(sids), max_size=len(sids)))
        toks = data.draw(st.lists(TOKEN, min_size=sum(counts), max_size=sum(counts))) if with_tokens else None
        r = self.both(
            lambda: self.core.append_batch(np.array(sids, dtype=np.int64), np.array(counts, dtype=np.int32),
                                           None if toks is None else np.array(toks, dtype=np.int32)),
            lambda: self.model.append_batch(sids, counts, toks))
        if r:
            assert r[0].tolist() == r[1]

    @rule(data=st.data(), count=st.integers(0, 4), with_tokens=st.booleans())
    def append(self, data, count, with_tokens):
        sid = self.existing_or_any(data)
        if with_tokens:
            toks = data.draw(st.lists(st.integers(0, 9), min_size=count, max_size=count))
            r = self.both(lambda: self.core.append(sid, toks), lambda: self.model.append_batch([sid], [count], toks))
        else:
            r = self.both(lambda: self.core.append(sid, count), lambda: self.model.append_batch([sid], [count]))
        if r:
            assert r[0].tolist() == r[1]

    @rule(data=st.data(), dst=SEQ_IDS)
    def fork(self, data, dst):
        src = self.existing_or_any(data)
        self.both(lambda: self.core.fork(src, dst), lambda: self.model.fork(src, dst))

    @rule(data=st.data())
    def remove(self, data):
        sid = self.existing_or_any(data)
        self.both(lambda: self.core.remove_sequence(sid), lambda: self.model.remove_sequence(sid))

    @rule()
    def take_pending_copies(self):
        assert [tuple(p) for p in self.core.take_pending_copies().tolist()] == self.model.take_pending_copies()

    @rule()
    def take_evicted(self):
        assert self.core.take_evicted().tolist() == self.model.take_evicted()

    # --- prefix cache -----------------------------------------------------------
    @precondition(lambda self: self.prefix)
    @rule(sid=SEQ_IDS, prompt=PROMPT, salt=SALT)
    def add_prompt(self, sid, prompt, salt):
        self.prompts.append((prompt, salt))
        r = self.both(lambda: self.core.add_sequence(sid, np.array(prompt, dtype=np.int32), salt=salt),
                      lambda: self.model.add_sequence(sid, tokens=prompt, salt=salt))
        if r:
            assert r[0].tolist() == r[1]

    @precondition(lambda self: self.prefix)
    @rule(sid=SEQ_IDS, prompt=PROMPT, salt=SALT, data=st.data())
    def prompt_in_pieces(self, sid, prompt, salt, data):
        """A prompt that arrives in pieces (chunked prefill, or a decode that
        repeats a cached block): a block completed by an append may equal one
        that is cached already, and the blocks after it must still be cached."""
        cut = data.draw(st.integers(0, len(prompt)))
        self.add_prompt(sid, prompt[:cut], salt)
        while cut < len(prompt) and sid in self.model.seqs:
            step = data.draw(st.integers(1, len(prompt) - cut))
            piece = prompt[cut:cut + step]
            self.both(lambda: self.core.append(sid, piece),
                      lambda: self.model.append_batch([sid], [len(piece)], piece))
            cut += step

    @precondition(lambda self: self.prefix and self.prompts)
    @rule(sid=SEQ_IDS, data=st.data(), more=st.lists(st.integers(0, 2), max_size=6))
    def earlier_prompt_in_pieces(self, sid, data, more):
        """An earlier prompt, maybe cached, sent again in pieces with new tokens
        after it: the pieces complete twins of cached blocks, then new blocks."""
        prompt, salt = data.draw(st.sampled_from(self.prompts))
        if sid in self.model.seqs:
            self.both(lambda: self.core.remove_sequence(sid), lambda: self.model.remove_sequence(sid))
        self.prompt_in_pieces(sid, prompt + more, salt, data)

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
        r = self.both(lambda: self.core.lookup_prefix(prompt, salt=salt),
                      lambda: self.model.lookup_prefix(prompt, salt))
        assert r[0] == r[1]

    @precondition(lambda self: self.prefix)
    @rule(prompt=PROMPT, salt=SALT)
    def acquire_prefix(self, prompt, salt):
        r = self.both(lambda: self.core.acquire_prefix(prompt, salt=salt),
                      lambda: self.model.acquire_prefix(prompt, salt))
        assert r[0].tolist() == r[1]

    @precondition(lambda self: self.prefix)
    @rule()
    def reset_prefix_cache(self):
        self.both(self.core.reset_prefix_cache, self.model.reset_prefix_cache)

    @rule(data=st.data())
    def uncache_blocks(self, data):
        """Blocks out of the prefix index (ids past the pool too, and with prefix caching off)."""
        ids = data.draw(st.lists(st.integers(-1, self.model.num_blocks), max_size=3))
        self.both(lambda: self.core.uncache_blocks(ids), lambda: self.model.uncache_blocks(ids))

    # --- pool ---------------------------------------------------------------------
    @precondition(lambda self: self.core is not None)
    @rule()
    def compact(self):
        r = self.both(self.core.compact, self.model.compact)
        if r:
            assert [tuple(m) for m in r[0].tolist()] == r[1]

    @precondition(lambda self: self.core is not None)
    @rule(data=st.data())
    def compact_into(self, data):
        """Compaction that also cuts the pool, in one step (or none)."""
        n = data.draw(st.integers(0, self.model.num_blocks + 1))
        r = self.both(lambda: self.core.compact(num_blocks=n), lambda: self.model.compact(n))
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
        assert core.sequence_ids().tolist() == model.sequence_ids()
        for sid, s in model.seqs.items():
            assert core.block_table(sid).tolist() == s.blocks
            assert core.num_tokens(sid) == s.num_tokens
            toks = core.sequence_tokens(sid)
            assert (None if toks is None else toks.tolist()) == s.tokens
            info = core.sequence_info(sid)
            assert info["access_count"] == s.access_count and info["salt_key"] == s.salt
            assert info["shard"] == s.shard
            assert core.num_cached_tokens(sid) == s.cached_tokens
        if self.prefix:
            assert core.num_cached_blocks == len(model.cache)
            assert core.num_evictable_blocks == len(model.evictable())
            assert self.mirror == set(model.index)
            salts = {salt_value(x): x for x in SALTS}
            for e in model.cache.values():
                salt, tokens = e.content
                assert core.lookup_prefix(list(tokens), salt=salts[salt]) == len(tokens)
        stats = core.stats()
        for key, value in model.stats.items():
            assert stats[key] == value, key


class PrefixCoreVsModel(CoreVsModel):
    """The same machine with prefix caching, both policies, events and (2-bit
    keys) forced hash collisions."""

    prefix = True


TestCoreVsModel = CoreVsModel.TestCase
TestPrefixCoreVsModel = PrefixCoreVsModel.TestCase
