"""A reference model of rocmforge.BlockManager, written from the README's contract.

Every rule here is one the README states ("The contract, rule by rule" and the
sections it points to); none is read off the core. Where the core is fast
(bitmaps, hash tables, intrusive lists, a tree of cached blocks), the model is
plain: lists, dicts and linear scans. Cached blocks are identified by their
content, the salt and every token id from the start of the sequence, not by
the physical block that holds their parent. A failing call restores a
snapshot taken before it. Exceptions are the classes the core raises, so a
test can compare outcomes one to one.

Under eviction_policy="arc" the contract does not say which evictable block
goes (that is ARC's own business); the model asks ``choose_victim`` (a
callable given the evictable blocks) and checks only what the contract does
promise about the choice.

With several shards (the README's threading model) it also follows which
shard each sequence lives in, which shard's free set each free block is in
(``home``), and the calling thread's shard (``bind``).
"""

import copy
import hashlib
from collections import OrderedDict

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

M64 = (1 << 64) - 1
INT32_MAX = 2**31 - 1


def ceil_div(a, b):
    return -(-a // b)


# --- keys (README: "Block keys") -------------------------------------------------


def salt_value(salt):
    """The salt as it enters keys: 0 for None, else the first 8 bytes of
    BLAKE2b(tag + payload) read as a little-endian signed integer."""
    if salt is None:
        return 0
    if isinstance(salt, str):
        data = b"s" + salt.encode()
    elif isinstance(salt, (bytes, bytearray)):
        data = b"b" + bytes(salt)
    else:
        data = b"i" + str(int(salt)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _mix(a, b):
    """fold(a * b): the 128-bit product's two 64-bit halves xored."""
    r = (a & M64) * (b & M64)
    return (r ^ (r >> 64)) & M64


def tokens_hash(tokens):
    c0, c1, c2, c3 = 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3
    u = [t & 0xFFFFFFFF for t in tokens]
    word = lambda i: u[i] | (u[i + 1] << 32)  # noqa: E731
    a, b = c2 ^ len(u), c3
    i = 0
    while len(u) - i >= 8:
        a = _mix(word(i) ^ c0, word(i + 2) ^ a)
        b = _mix(word(i + 4) ^ c1, word(i + 6) ^ b)
        i += 8
    for t in u[i:]:
        a = _mix(t ^ c0, a ^ c1)
    return _mix(a ^ c2, b ^ c1)


def block_key(parent_key, salt, tokens, mask=(1 << 63) - 1):
    """Key of a full block: parent_key is the key of the block before it, -1 for
    a sequence's first block (whose link is the salt instead)."""
    link = parent_key if parent_key >= 0 else (salt & M64) ^ 0x452821E638D01377
    rotated = ((link << 23) | (link >> 41)) & M64
    return ((rotated * 0xD6E8FEB86659FD93) & M64 ^ tokens_hash(tokens)) & mask


# --- state -------------------------------------------------------------------------


class Seq:
    def __init__(self, tokens, salt=0, shard=0):
        self.shard = shard
        self.blocks = []
        self.num_tokens = 0
        self.tokens = tokens     # token ids, or None for a count-only sequence
        self.salt = salt
        self.access_count = 1
        self.cached_tokens = 0


class Entry:
    """A cached block: its key, its content (salt, token ids from the start of
    the sequence through this block), and when it was last released."""

    def __init__(self, key, content):
        self.key = key
        self.content = content
        self.released = None     # release number while evictable (refcount 0)


class ModelManager:
    def __init__(self, num_blocks, block_size, evict_sequences=False, prefix=False,
                 policy="lru", key_bits=63, choose_victim=None, shards=1):
        self.num_blocks = num_blocks
        self.nshards = shards
        self.cur = 0                 # the calling thread's shard
        self.home = [0] * num_blocks
        self.peaks = [0] * shards
        self._spread(0, num_blocks)
        self.block_size = block_size
        self.evict = evict_sequences
        self.prefix = prefix
        self.policy = policy
        self.mask = (1 << key_bits) - 1
        self.choose_victim = choose_victim
        self.rc = [0] * num_blocks
        self.ext = [0] * num_blocks
        self.seqs = OrderedDict()    # least recently accessed first
        self.pending = []
        self.evicted = []
        self.cache = {}              # block -> Entry
        self.index = {}              # key -> block
        self.releases = 0
        self.events = []
        self.stats = dict(total_allocations=0, total_deallocations=0, peak_allocations=0,
                          evictions=0, shard_transfers=0, cow_copies=0, compaction_count=0,
                          prefix_lookups=0, prefix_query_tokens=0, prefix_hit_tokens=0,
                          cached_blocks_stored=0, cached_blocks_evicted=0)

    # --- shards --------------------------------------------------------------
    def bind(self, shard):
        self.cur = shard

    def _spread(self, lo, hi):
        """Blocks [lo, hi) go to the shards in equal contiguous ranges."""
        for s in range(self.nshards):
            for b in range(lo + (hi - lo) * s // self.nshards, lo + (hi - lo) * (s + 1) // self.nshards):
                self.home[b] = s

    def free_in(self, shard):
        return [b for b in range(self.num_blocks)
                if self.rc[b] == 0 and b not in self.cache and self.home[b] == shard]

    def _fill(self, need):
        """Free blocks move into the calling thread's shard until it has `need`:
        the shard with the most free blocks (lowest index on ties) gives half of
        them rounded up, or the shortfall if more, lowest ids first."""
        while len(self.free_in(self.cur)) < need:
            counts = [(len(self.free_in(s)), -s) for s in range(self.nshards) if s != self.cur]
            if not counts or max(counts)[0] == 0:
                return
            most, donor = max(counts)
            give = min(max((most + 1) // 2, need - len(self.free_in(self.cur))), most)
            for b in self.free_in(-donor)[:give]:
                self.home[b] = self.cur
            self.stats["shard_transfers"] += give

    def sequence_ids(self):
        return [sid for shard in range(self.nshards) for sid, s in self.seqs.items() if s.shard == shard]

    # --- queries -------------------------------------------------------------
    def evictable(self):
        return [b for b, e in self.cache.items() if self.rc[b] == 0]

    @property
    def num_free(self):
        """Blocks an allocation can take: refcount 0 (free or evictable)."""
        return self.rc.count(0)

    def used(self):
        return self.num_blocks - self.num_free

    # --- atomicity -----------------------------------------------------------
    def _atomic(self, fn):
        """Run fn; on any exception restore the state from before it."""
        chooser = self.choose_victim
        self.choose_victim = None
        snapshot = copy.deepcopy(self.__dict__)
        self.choose_victim = chooser
        try:
            result = fn()
        except Exception:
            self.__dict__.update(snapshot)
            self.choose_victim = chooser
            raise
        for shard in range(self.nshards):
            held = sum(1 for b in range(self.num_blocks) if self.rc[b] and self.home[b] == shard)
            self.peaks[shard] = max(self.peaks[shard], held)
        self.stats["peak_allocations"] = sum(self.peaks)
        return result

    # --- blocks --------------------------------------------------------------
    def _take(self):
        """One block with refcount 1 for the calling thread's shard: its lowest
        free id, else the policy's victim."""
        free = self.free_in(self.cur)
        if free:
            b = free[0]
        else:
            b = self._victim()
            self._uncache_tree(b)
            self.home[b] = self.cur
        self.rc[b] = 1
        self.stats["total_allocations"] += 1
        return b

    def _victim(self):
        candidates = self.evictable()
        assert candidates, "model: a block was taken with none free or evictable"
        if self.policy == "lru":
            return min(candidates, key=lambda b: self.cache[b].released)
        b = self.choose_victim(candidates)
        assert b in candidates, f"ARC evicted block {b}, which is not evictable"
        return b

    def _uncache_tree(self, b):
        """Uncache b and every cached block whose content extends b's; those
        evictable become free in the calling thread's shard."""
        salt, toks = self.cache[b].content
        for d in [d for d, e in self.cache.items()
                  if e.content[0] == salt and e.content[1][:len(toks)] == toks]:
            e = self.cache.pop(d)
            del self.index[e.key]
            self.events.append(("removed", e.key))
            self.stats["cached_blocks_evicted"] += 1
            if self.rc[d] == 0:
                self.home[d] = self.cur

    def _ref(self, b):
        if self.rc[b] == 0:
            self.stats["total_allocations"] += 1
            self.home[b] = self.cur
            if b in self.cache:
                self.cache[b].released = None
        self.rc[b] += 1

    def _unref(self, b):
        self.rc[b] -= 1
        if self.rc[b] == 0:
            self.stats["total_deallocations"] += 1
            if b in self.cache:
                self.releases += 1
                self.cache[b].released = self.releases

    # --- prefix cache --------------------------------------------------------
    def _keys(self, tokens, salt):
        keys, parent = [], -1
        for j in range(len(tokens) // self.block_size):
            parent = block_key(parent, salt, tokens[j * self.block_size:(j + 1) * self.block_size], self.mask)
            keys.append(parent)
        return keys

    def _hits(self, tokens, salt):
        """Leading full blocks cached with the same content, in order."""
        hits = []
        for j, key in enumerate(self._keys(tokens, salt)):
            b = self.index.get(key)
            if b is None or self.cache[b].content != (salt, tuple(tokens[:(j + 1) * self.block_size])):
                break
            hits.append(b)
        return hits

    def _cache_full_blocks(self, s, first):
        """Blocks first.. of s that are full now: each is cached unless its key is
        taken or the blocks before it are not cached with its content."""
        bs = self.block_size
        if not self.prefix or s.tokens is None:
            return
        for j in range(first, s.num_tokens // bs):
            b = s.blocks[j]
            key = self._keys(s.tokens[:(j + 1) * bs], s.salt)[-1]
            if b in self.cache or key in self.index or len(self._hits(s.tokens[:j * bs], s.salt)) < j:
                continue
            self.cache[b] = Entry(key, (s.salt, tuple(s.tokens[:(j + 1) * bs])))
            self.index[key] = b
            parent = self._keys(s.tokens[:j * bs], s.salt)[-1] if j else None
            self.events.append(("stored", key, parent, bs))
            self.stats["cached_blocks_stored"] += 1

    # --- sequences -----------------------------------------------------------
    def _drop(self, seq_id):
        """Release a sequence's blocks, tail first."""
        for b in reversed(self.seqs.pop(seq_id).blocks):
            self._unref(b)

    def _touch(self, seq_id):
        self.seqs.move_to_end(seq_id)
        self.seqs[seq_id].access_count += 1

    def _make_room(self, shortfall, named):
        """Evict least recently accessed sequences not named by the call until
        shortfall() <= 0 (all or nothing: the caller's snapshot undoes a failure)."""
        while shortfall() > 0:
            order = [self.cur] + [s for s in range(self.nshards) if s != self.cur]
            victims = [sid for shard in order for sid, s in self.seqs.items()
                       if s.shard == shard and sid not in named]
            if not self.evict or not victims:
                raise OutOfBlocks("model: out of blocks")
            self.evicted.append(victims[0])
            self._drop(victims[0])
            self.stats["evictions"] += 1

    def _fresh_need(self, entries):
        """Blocks taken by appending (seq_id, count) entries in order: one per new
        block, and one per copy of a shared, partly filled last block."""
        rc, need, bs = list(self.rc), 0, self.block_size
        for sid, c in entries:
            s = self.seqs[sid]
            if c == 0:
                continue
            need += ceil_div(s.num_tokens + c, bs) - ceil_div(s.num_tokens, bs)
            if s.num_tokens % bs and rc[s.blocks[-1]] > 1:
                rc[s.blocks[-1]] -= 1
                need += 1
        return need

    def _append(self, s, count, tokens):
        bs = self.block_size
        slots = []
        if count == 0:
            return slots
        if s.num_tokens % bs and self.rc[s.blocks[-1]] > 1:
            old = s.blocks[-1]
            new = self._take()
            self.pending.append((old, new))
            self._unref(old)
            s.blocks[-1] = new
            self.stats["cow_copies"] += 1
        full_before = s.num_tokens // bs
        for _ in range(count):
            if s.num_tokens % bs == 0:
                s.blocks.append(self._take())
            slots.append(s.blocks[-1] * bs + s.num_tokens % bs)
            s.num_tokens += 1
        if tokens is not None:
            s.tokens.extend(tokens)
            self._cache_full_blocks(s, full_before)
        return slots

    # --- block level ---------------------------------------------------------
    def allocate(self, n):
        def run():
            if n > self.num_free:
                self._make_room(lambda: n - self.num_free, set())
            self._fill(n)
            ids = [self._take() for _ in range(n)]
            for b in ids:
                self.ext[b] = 1
            return ids
        return self._atomic(run)

    def incref(self, ids):
        def run():
            for b in ids:
                if not 0 <= b < self.num_blocks:
                    raise BlockNotFound(b)
                if self.rc[b] == 0:
                    raise RefcountError(b)
                if self.rc[b] == INT32_MAX:
                    raise RefcountError(b)
                self.rc[b] += 1
                self.ext[b] += 1
        return self._atomic(run)

    def decref(self, ids):
        def run():
            for b in ids:
                if not 0 <= b < self.num_blocks:
                    raise BlockNotFound(b)
                if self.ext[b] == 0:
                    raise RefcountError(b)
                self.ext[b] -= 1
                self._unref(b)
        return self._atomic(run)

    # --- sequence level ------------------------------------------------------
    def add_sequence(self, seq_id, tokens=None, num_tokens=0, salt=None):
        def run():
            bs = self.block_size
            n = len(tokens) if tokens is not None else num_tokens
            if ceil_div(n, bs) > self.num_blocks:
                raise OutOfBlocks(seq_id)
            if seq_id in self.seqs:
                raise SequenceExists(seq_id)
            sv = salt_value(salt)
            lookup = self.prefix and tokens is not None
            hits = self._hits(tokens, sv) if lookup else []
            fresh = ceil_div(n, bs) - len(hits)
            self._make_room(lambda: fresh - sum(1 for b in range(self.num_blocks)
                                                if self.rc[b] == 0 and b not in hits), set())
            self._fill(fresh)
            s = Seq(list(tokens[:len(hits) * bs]) if tokens is not None else None, sv, self.cur)
            self.seqs[seq_id] = s
            for b in hits:
                self._ref(b)
                s.blocks.append(b)
            s.num_tokens = s.cached_tokens = len(hits) * bs
            slots = [b * bs + o for b in hits for o in range(bs)]
            slots += self._append(s, n - s.num_tokens, tokens[s.num_tokens:] if tokens is not None else None)
            if lookup:
                self.stats["prefix_lookups"] += 1
                self.stats["prefix_query_tokens"] += n
                self.stats["prefix_hit_tokens"] += s.cached_tokens
            return slots
        return self._atomic(run)

    def lookup_prefix(self, tokens, salt=None):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")
        return len(self._hits(tokens, salt_value(salt))) * self.block_size

    def acquire_prefix(self, tokens, salt=None):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")

        def run():
            hits = self._hits(tokens, salt_value(salt))
            for b in hits:
                self._ref(b)
                self.ext[b] += 1
            self.stats["prefix_lookups"] += 1
            self.stats["prefix_query_tokens"] += len(tokens)
            self.stats["prefix_hit_tokens"] += len(hits) * self.block_size
            return hits
        return self._atomic(run)

    def reset_prefix_cache(self):
        if not self.prefix:
            raise KvCacheError("prefix caching is off")
        for b in self.cache:
            if self.rc[b] == 0:
                self.home[b] = self.cur
        self.cache.clear()
        self.index.clear()
        self.events.append(("cleared",))

    def uncache_blocks(self, block_ids):
        def run():
            if not self.prefix:
                raise KvCacheError("prefix caching is off")
            for b in block_ids:
                if not 0 <= b < self.num_blocks:
                    raise BlockNotFound(b)
            for b in block_ids:
                if b in self.cache:
                    self._uncache_tree(b)
        return self._atomic(run)

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
            if self._fresh_need(entries) > self.num_blocks:
                raise OutOfBlocks("batch")
            self._make_room(lambda: self._fresh_need(entries) - self.num_free, named)
            self._fill(self._fresh_need(entries))
            slots, pos = [], 0
            for sid, c in entries:
                part = tokens[pos:pos + c] if tokens is not None else None
                pos += c
                slots += self._append(self.seqs[sid], c, part)
                self._touch(sid)
            return slots
        return self._atomic(run)

    def fork(self, src, dst):
        def run():
            if src not in self.seqs:
                raise SequenceNotFound(src)
            if dst in self.seqs:
                raise SequenceExists(dst)
            s = self.seqs[src]
            if any(self.rc[b] == INT32_MAX for b in s.blocks):
                raise RefcountError(src)
            self._touch(src)
            d = Seq(list(s.tokens) if s.tokens is not None else None, s.salt, self.cur)
            d.blocks = list(s.blocks)
            d.num_tokens = s.num_tokens
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
    def _occupied(self, b):
        return self.rc[b] != 0 or b in self.cache

    def compact(self, num_blocks=None):
        """The highest occupied block moves to the lowest free id, repeatedly,
        until the occupied blocks fill the lowest ids; then, with num_blocks,
        the pool is cut to that many (refused first when more are occupied)."""
        def run():
            if num_blocks is not None and not 1 <= num_blocks <= self.num_blocks:
                raise InvalidConfiguration(num_blocks)
            if self.pending:
                raise KvCacheError("pending copies")
            if num_blocks is not None and sum(map(self._occupied, range(self.num_blocks))) > num_blocks:
                raise OutOfBlocks("compact into fewer blocks than are occupied")
            moves = []
            while True:
                free = [b for b in range(self.num_blocks) if not self._occupied(b)]
                occupied = [b for b in range(self.num_blocks) if self._occupied(b)]
                if not free or not occupied or free[0] > occupied[-1]:
                    break
                old, new = occupied[-1], free[0]
                moves.append((old, new))
                self.rc[new], self.ext[new], self.home[new] = self.rc[old], self.ext[old], self.home[old]
                self.rc[old] = self.ext[old] = 0
                if old in self.cache:
                    self.cache[new] = self.cache.pop(old)
                    self.index[self.cache[new].key] = new
                for s in self.seqs.values():
                    s.blocks = [new if b == old else b for b in s.blocks]
            if moves:
                self._spread(sum(map(self._occupied, range(self.num_blocks))), self.num_blocks)
            self.stats["compaction_count"] += 1
            if num_blocks is not None:
                del self.rc[num_blocks:], self.ext[num_blocks:], self.home[num_blocks:]
                self.num_blocks = num_blocks
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
                if b in self.cache:
                    self._uncache_tree(b)
            del self.rc[n:], self.ext[n:], self.home[n:]
            self.num_blocks = n
        return self._atomic(run)

    def grow(self, n):
        def run():
            if n < self.num_blocks:
                raise InvalidConfiguration(n)
            self.rc += [0] * (n - self.num_blocks)
            self.ext += [0] * (n - self.num_blocks)
            self.home += [0] * (n - self.num_blocks)
            old, self.num_blocks = self.num_blocks, n
            self._spread(old, n)
        return self._atomic(run)
