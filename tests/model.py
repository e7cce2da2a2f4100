"""A plain-Python reference model of rocmforge.BlockManager: the oracle of the stateful tests.

It favours obviousness over speed: lists and dicts, linear scans, and a whole
snapshot restored when an operation fails. Exceptions are the classes the
core raises, so tests can compare outcomes one to one.
"""

import copy
import hashlib
from collections import OrderedDict, deque

from rocmforge.errors import (
    ArgumentValueError,
    BlockNotFound,
    InvalidConfiguration,
    KvCacheError,
    OutOfBlocks,
    RefcountError,
    SequenceExists,
    SequenceNotFound,
)


def ceil_div(a, b):
    return -(-a // b)


M64 = (1 << 64) - 1


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M64


def _mul_fold(a, b):
    r = a * b
    return (r ^ (r >> 64)) & M64


def tokens_hash(toks):
    S0, S1 = 0xA0761D6478BD642F, 0xE7037ED1A0B428DB
    S2, S3 = 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3
    n = len(toks)
    t = [x & 0xFFFFFFFF for x in toks]
    pair = lambda i: t[i] | t[i + 1] << 32  # noqa: E731
    a, b = S2 ^ n, S3
    i = 0
    while i + 8 <= n:
        a = _mul_fold(pair(i) ^ S0, pair(i + 2) ^ a)
        b = _mul_fold(pair(i + 4) ^ S1, pair(i + 6) ^ b)
        i += 8
    for x in t[i:]:
        a = _mul_fold(x ^ S0, a ^ S1)
    return _mul_fold(a ^ S2, b ^ S1)


def block_key(parent, salt, toks, mask):
    """The core's content key of one full block, written out independently."""
    link = parent if parent >= 0 else (salt & M64) ^ 0x452821E638D01377
    return ((_rotl(link, 23) * 0xD6E8FEB86659FD93) & M64 ^ tokens_hash(toks)) & mask


def salt_value(salt):
    if salt is None:
        return 0
    if isinstance(salt, str):
        data = b"s" + salt.encode()
    elif isinstance(salt, bytes):
        data = b"b" + salt
    else:
        data = b"i" + str(int(salt)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


class Seq:
    def __init__(self, tokens):
        self.blocks = []
        self.num_tokens = 0
        self.tokens = tokens  # list of ids, or None for a count-only sequence
        self.access_count = 1
        self.keys = []        # content keys of full blocks (prefix caching)
        self.salt = 0
        self.cached_tokens = 0
        self.cold = False
        self.warm = False


class Cached:
    """Prefix-cache state of one indexed block."""

    def __init__(self, key, salt, parent, tokens, serial):
        self.key, self.salt, self.parent, self.tokens, self.serial = key, salt, parent, tokens, serial
        self.hot = False
        self.cold = False


class ModelManager:
    def __init__(self, num_blocks, block_size, evict_sequences=False, prefix=False,
                 policy="lru", key_bits=63):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.evict = evict_sequences
        self.rc = [0] * num_blocks
        self.ext = [0] * num_blocks
        self.seqs = OrderedDict()  # least recently accessed first
        self.pending = []
        self.evicted = []
        self.stats = dict(total_allocations=0, total_deallocations=0, peak_allocations=0,
                          evictions=0, cow_copies=0, compaction_count=0,
                          prefix_lookups=0, prefix_query_tokens=0, prefix_hit_tokens=0,
                          cached_blocks_stored=0, cached_blocks_evicted=0)
        # Prefix cache: key -> block, block -> Cached, evictable lists (oldest first).
        self.prefix = prefix
        self.policy = policy
        self.mask = (1 << key_bits) - 1
        self.index = {}
        self.cached = {}
        self.lists = {1: [], 2: [], 3: []}   # evictable blocks, eviction order first
        self.serial = 0
        self.events = []
        self.arc_p = 0.0
        self.arc_hits = self.arc_ghost_hits = 0.0
        self.cold_anchor = None
        self.ev_clock = 0
        self.stamp = {}                      # block -> when it last became evictable
        self._reset_ghosts()

    def _reset_ghosts(self):
        """ARC's ghost lists: the last 2 x num_blocks keys evicted from each list
        (a key stays until its ring entry is overwritten or it comes back)."""
        self.ghost_ring = {1: deque(), 2: deque()}
        self.ghost_live = {1: {}, 2: {}}
        self.ghost_adds = 0

    # --- helpers -----------------------------------------------------------
    @property
    def num_free(self):
        """Blocks with refcount 0 (free or evictable)."""
        return sum(1 for r in self.rc if r == 0)

    def _is_free(self, b):
        return self.rc[b] == 0 and b not in self.cached

    def _in_list(self, b):
        return next((n for n, lst in self.lists.items() if b in lst), 0)

    def _children(self, b):
        return sorted((c for c, e in self.cached.items() if e.parent == b),
                      key=lambda c: self.cached[c].serial)

    def _unregister_tree(self, b):
        """Preorder, children oldest first (the core's stack order)."""
        kids = self._children(b)
        e = self.cached.pop(b)
        del self.index[e.key]
        self.events.append(("removed", e.key))
        self.stats["cached_blocks_evicted"] += 1
        lst = self._in_list(b)
        if lst:
            self.lists[lst].remove(b)
        for c in kids:
            self._unregister_tree(c)

    def _ghost_add(self, lst, key):
        cap = 2 * self.num_blocks
        ring, live = self.ghost_ring[lst], self.ghost_live[lst]
        if len(ring) == cap:
            old, tag = ring.popleft()
            if live.get(old) == tag:
                del live[old]
        self.ghost_adds += 1
        ring.append((key, self.ghost_adds))
        live[key] = self.ghost_adds

    def _victim(self):
        once, n2 = len(self.lists[1]) + len(self.lists[3]), len(self.lists[2])
        lst = 1
        if self.policy == "arc":
            if once == 0:
                lst = 2
            elif n2 == 0:
                lst = 3 if self.lists[3] else 1
            elif self.arc_ghost_hits < 0.1 * self.arc_hits:      # calm: plain recency
                if self.lists[3]:
                    lst = 3
                elif self.stamp[self.lists[2][0]] < self.stamp[self.lists[1][0]]:
                    lst = 2
            elif once <= self.arc_p:
                lst = 2
            elif self.lists[3]:
                lst = 3
        b = self.lists[lst].pop(0)
        if self.policy == "arc":
            self._ghost_add(2 if lst == 2 else 1, self.cached[b].key)
        return b

    def _thrashing(self):
        return self.arc_ghost_hits > 0 and self.arc_ghost_hits >= 0.5 * self.arc_hits

    def _atomic(self, fn):
        """Run fn; on any exception restore the state from before it."""
        snapshot = copy.deepcopy(self.__dict__)
        try:
            result = fn()
        except Exception:
            self.__dict__.update(snapshot)
            raise
        used = self.num_blocks - self.num_free
        self.stats["peak_allocations"] = max(self.stats["peak_allocations"], used)
        return result

    def _take(self):
        free = [b for b in range(self.num_blocks) if self._is_free(b)]
        if free:
            b = free[0]
        else:
            b = self._victim()
            self._unregister_tree(b)
        self.rc[b] = 1
        self.stats["total_allocations"] += 1
        return b

    def _unref(self, b):
        self.rc[b] -= 1
        if self.rc[b] == 0:
            self.stats["total_deallocations"] += 1
            if b in self.cached:
                e = self.cached[b]
                self.ev_clock += 1
                self.stamp[b] = self.ev_clock
                if self.policy != "arc" or not (e.hot or e.cold):
                    self.lists[1].append(b)
                elif e.hot:
                    self.lists[2].append(b)
                else:
                    # after the previous cold block of this release, else at the front
                    at = 0 if self.cold_anchor is None else self.lists[3].index(self.cold_anchor) + 1
                    self.lists[3].insert(at, b)
                    self.cold_anchor = b

    def _drop(self, seq_id):
        self.cold_anchor = None
        for b in reversed(self.seqs.pop(seq_id).blocks):
            self._unref(b)

    def _register(self, s, j):
        bs = self.block_size
        b = s.blocks[j]
        if b in self.cached or (j > 0 and s.blocks[j - 1] not in self.cached) or s.keys[j] in self.index:
            return
        self.serial += 1
        parent = s.blocks[j - 1] if j > 0 else -1
        e = Cached(s.keys[j], s.salt, parent, list(s.tokens[j * bs:(j + 1) * bs]), self.serial)
        e.cold = s.cold
        e.hot = s.warm
        self.cached[b] = e
        self.index[e.key] = b
        self.stats["cached_blocks_stored"] += 1
        self.events.append(("stored", e.key, s.keys[j - 1] if j > 0 else None, bs))
        if self.policy == "arc":
            n1, n2 = len(self.ghost_live[1]), len(self.ghost_live[2])
            decay = 1.0 - 1.0 / self.num_blocks
            self.arc_hits *= decay
            self.arc_ghost_hits *= decay
            if e.key in self.ghost_live[1]:
                self.arc_ghost_hits += 1
                self.arc_p = min(float(self.num_blocks), self.arc_p + (n2 / n1 if n2 > n1 else 1.0))
                del self.ghost_live[1][e.key]
                e.hot = True
            elif e.key in self.ghost_live[2]:
                self.arc_ghost_hits += 1
                self.arc_p = max(0.0, self.arc_p - (n1 / n2 if n1 > n2 else 1.0))
                del self.ghost_live[2][e.key]
                e.hot = True

    def _register_full(self, s):
        bs = self.block_size
        for j in range(len(s.keys), s.num_tokens // bs):
            parent = s.keys[j - 1] if j > 0 else -1
            s.keys.append(block_key(parent, s.salt, s.tokens[j * bs:(j + 1) * bs], self.mask))
            self._register(s, j)

    def _keys(self, tokens, salt):
        bs, keys, parent = self.block_size, [], -1
        for j in range(len(tokens) // bs):
            parent = block_key(parent, salt, tokens[j * bs:(j + 1) * bs], self.mask)
            keys.append(parent)
        return keys

    def _match(self, tokens, keys, salt):
        bs, hits, prev = self.block_size, [], -1
        for j, key in enumerate(keys):
            b = self.index.get(key)
            if b is None:
                break
            e = self.cached[b]
            if e.parent != prev or (prev < 0 and e.salt != salt) or e.tokens != list(tokens[j * bs:(j + 1) * bs]):
                break
            hits.append(b)
            prev = b
        return hits

    def _touch(self, seq_id):
        self.seqs.move_to_end(seq_id)
        self.seqs[seq_id].access_count += 1

    def _make_room(self, needed_fn, named):
        """Evict least recently accessed unnamed sequences until needed_fn() blocks are free."""
        while self.num_free < needed_fn():
            victims = [s for s in self.seqs if s not in named]
            if not self.evict or not victims:
                raise OutOfBlocks("model: out of blocks")
            self.evicted.append(victims[0])
            self._drop(victims[0])
            self.stats["evictions"] += 1

    def _append_need(self, entries):
        """Fresh blocks an append of (seq_id, count) entries takes, copy-on-write included."""
        rc = list(self.rc)
        need = 0
        for sid, c in entries:
            if c == 0:
                continue
            s = self.seqs[sid]
            nt = s.num_tokens
            need += ceil_div(nt + c, self.block_size) - ceil_div(nt, self.block_size)
            if nt % self.block_size and rc[s.blocks[-1]] > 1:
                rc[s.blocks[-1]] -= 1
                need += 1
        return need

    def _append_one(self, s, c, toks):
        bs = self.block_size
        out = []
        if c == 0:
            return out
        if s.num_tokens % bs and self.rc[s.blocks[-1]] > 1:
            old = s.blocks[-1]
            new = self._take()
            self.pending.append((old, new))
            self.rc[old] -= 1
            s.blocks[-1] = new
            self.stats["cow_copies"] += 1
        for _ in range(c):
            off = s.num_tokens % bs
            if off == 0:
                s.blocks.append(self._take())
            out.append(s.blocks[-1] * bs + off)
            s.num_tokens += 1
        if toks is not None:
            s.tokens.extend(toks)
            if self.prefix:
                self._register_full(s)
        return out

    # --- block level ---------------------------------------------------------
    def allocate(self, n):
        def run():
            self._make_room(lambda: n, set())
            ids = []
            for _ in range(n):
                b = self._take()
                self.ext[b] = 1
                ids.append(b)
            return ids
        return self._atomic(run)

    def incref(self, ids):
        def run():
            for b in ids:
                if not 0 <= b < self.num_blocks:
                    raise BlockNotFound(b)
                if self.rc[b] == 0:
                    raise RefcountError(b)
            for b in ids:
                self.rc[b] += 1
                self.ext[b] += 1
        return self._atomic(run)

    def decref(self, ids):
        def run():
            seen = {}
            for b in ids:
                if not 0 <= b < self.num_blocks:
                    raise BlockNotFound(b)
                seen[b] = seen.get(b, 0) + 1
                if seen[b] > self.ext[b]:
                    raise RefcountError(b)
            self.cold_anchor = None
            for b in ids:
                self.ext[b] -= 1
                self._unref(b)
        return self._atomic(run)

    # --- sequence level ------------------------------------------------------
    def add_sequence(self, seq_id, tokens=None, num_tokens=0, salt=None):
        def run():
            bs = self.block_size
            n = len(tokens) if tokens is not None else num_tokens
            need = ceil_div(n, bs)
            if need > self.num_blocks:
                raise OutOfBlocks(seq_id)
            if seq_id in self.seqs:
                raise SequenceExists(seq_id)
            sv = salt_value(salt)
            lookup = self.prefix and tokens is not None
            keys = self._keys(tokens, sv) if lookup else []
            hits = self._match(tokens, keys, sv) if lookup else []
            self._make_room(lambda: need - len(hits) + sum(self.rc[b] == 0 for b in hits), set())
            s = Seq([] if tokens is not None else None)
            s.salt = sv
            self.seqs[seq_id] = s
            out = []
            for b in hits:
                if self.rc[b] == 0:
                    self.lists[self._in_list(b)].remove(b)
                    self.stats["total_allocations"] += 1
                self.rc[b] += 1
                self.cached[b].hot = True
                s.blocks.append(b)
                out.extend(b * bs + o for o in range(bs))
            self.arc_hits += len(hits)
            h = len(hits) * bs
            if hits:
                s.tokens.extend(tokens[:h])
                s.num_tokens = s.cached_tokens = h
                s.keys = keys[:len(hits)]
            h_blocks = len(hits)
            if self.policy == "arc" and h_blocks < len(keys):
                if h_blocks >= 2 and 2 * h_blocks >= len(keys):
                    s.warm = True
                elif self._thrashing():
                    s.cold = bool(((keys[h_blocks] & M64) * 0x9E3779B97F4A7C15 & M64) >> 63)
            out.extend(self._append_one(s, n - h, tokens[h:] if tokens is not None else None))
            if lookup:
                self.stats["prefix_lookups"] += 1
                self.stats["prefix_query_tokens"] += n
                self.stats["prefix_hit_tokens"] += h
            return out
        return self._atomic(run)

    def lookup_prefix(self, tokens, salt=None):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")
        sv = salt_value(salt)
        return len(self._match(tokens, self._keys(tokens, sv), sv)) * self.block_size

    def acquire_prefix(self, tokens, salt=None):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")
        sv = salt_value(salt)
        hits = self._match(tokens, self._keys(tokens, sv), sv)
        for b in hits:
            if self.rc[b] == 0:
                self.lists[self._in_list(b)].remove(b)
                self.stats["total_allocations"] += 1
            self.rc[b] += 1
            self.ext[b] += 1
            self.cached[b].hot = True
        self.arc_hits += len(hits)
        self.stats["prefix_lookups"] += 1
        self.stats["prefix_query_tokens"] += len(tokens)
        self.stats["prefix_hit_tokens"] += len(hits) * self.block_size
        self.stats["peak_allocations"] = max(self.stats["peak_allocations"], self.num_blocks - self.num_free)
        return hits

    def reset_prefix_cache(self):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")
        self.cached.clear()
        self.index.clear()
        self.lists = {1: [], 2: [], 3: []}
        self.ghost_live = {1: {}, 2: {}}
        self.events.append(("cleared",))

    def take_events(self):
        out, self.events = self.events, []
        return out

    def append_batch(self, seq_ids, counts, tokens=None):
        def run():
            if len(seq_ids) != len(counts):
                raise ArgumentValueError("lengths")
            if any(c < 0 for c in counts):
                raise ArgumentValueError("negative")
            if tokens is not None and len(tokens) != sum(counts):
                raise ArgumentValueError("token count")
            named = set()
            for sid, c in zip(seq_ids, counts):
                if sid not in self.seqs:
                    raise SequenceNotFound(sid)
                if sid in named:
                    raise ArgumentValueError("duplicate")
                named.add(sid)
                has = self.seqs[sid].tokens is not None
                if tokens is not None and not has:
                    raise ArgumentValueError("unexpected tokens")
                if c > 0 and has and tokens is None:
                    raise ArgumentValueError("tokens required")
            entries = list(zip(seq_ids, counts))
            if self._append_need(entries) > self.num_blocks:
                raise OutOfBlocks("batch")
            self._make_room(lambda: self._append_need(entries), named)
            out, pos = [], 0
            for sid, c in entries:
                toks = tokens[pos:pos + c] if tokens is not None else None
                pos += c
                out.extend(self._append_one(self.seqs[sid], c, toks))
                self._touch(sid)
            return out
        return self._atomic(run)

    def fork(self, src, dst):
        def run():
            if src not in self.seqs:
                raise SequenceNotFound(src)
            if dst in self.seqs:
                raise SequenceExists(dst)
            self._touch(src)
            s = self.seqs[src]
            d = Seq(list(s.tokens) if s.tokens is not None else None)
            d.blocks = list(s.blocks)
            d.num_tokens = s.num_tokens
            d.keys = list(s.keys)
            d.salt = s.salt
            d.cold = s.cold
            d.warm = s.warm
            for b in s.blocks:
                self.rc[b] += 1
            self.seqs[dst] = d
        return self._atomic(run)

    def remove_sequence(self, seq_id):
        def run():
            if seq_id not in self.seqs:
                raise SequenceNotFound(seq_id)
            self._drop(seq_id)
        return self._atomic(run)

    def take_pending_copies(self):
        out, self.pending = self.pending, []
        return out

    def take_evicted(self):
        out, self.evicted = self.evicted, []
        return out

    # --- pool ----------------------------------------------------------------
    def compact(self):
        def run():
            if self.pending:
                raise KvCacheError("pending copies")
            moves = []
            lo, hi = 0, self.num_blocks - 1
            occupied = lambda b: self.rc[b] != 0 or b in self.cached  # noqa: E731
            while True:
                while lo < self.num_blocks and occupied(lo):
                    lo += 1
                while hi >= 0 and not occupied(hi):
                    hi -= 1
                if lo >= hi:
                    break
                moves.append((hi, lo))
                self.rc[lo], self.ext[lo] = self.rc[hi], self.ext[hi]
                self.rc[hi] = self.ext[hi] = 0
                if hi in self.cached:
                    self.cached[lo] = self.cached.pop(hi)
                    if hi in self.stamp:
                        self.stamp[lo] = self.stamp.pop(hi)
            remap = dict(moves)
            for s in self.seqs.values():
                s.blocks = [remap.get(b, b) for b in s.blocks]
            for e in self.cached.values():
                e.parent = remap.get(e.parent, e.parent)
            self.index = {k: remap.get(b, b) for k, b in self.index.items()}
            self.lists = {n: [remap.get(b, b) for b in lst] for n, lst in self.lists.items()}
            self.stats["compaction_count"] += 1
            return moves
        return self._atomic(run)

    def shrink(self, n):
        def run():
            if n < 1 or n > self.num_blocks:
                raise InvalidConfiguration(n)
            if self.pending:
                raise KvCacheError("pending copies")
            if any(self.rc[b] for b in range(n, self.num_blocks)):
                raise InvalidConfiguration("in use")
            for b in range(n, self.num_blocks):
                if b in self.cached:
                    self._unregister_tree(b)
            del self.rc[n:], self.ext[n:]
            self.num_blocks = n
            self._reset_ghosts()
            self.arc_p = min(self.arc_p, float(n))
        return self._atomic(run)

    def grow(self, n):
        def run():
            if n < self.num_blocks:
                raise InvalidConfiguration(n)
            if n > self.num_blocks:
                self._reset_ghosts()
            self.rc += [0] * (n - self.num_blocks)
            self.ext += [0] * (n - self.num_blocks)
            self.num_blocks = n
        return self._atomic(run)
