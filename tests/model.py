"""A plain-Python reference model of rocmforge.BlockManager: the oracle of the stateful tests.

It favours obviousness over speed: lists and dicts, linear scans, and a whole
snapshot restored when an operation fails. Exceptions are the classes the
core raises, so tests can compare outcomes one to one.
"""

import copy
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


def ceil_div(a, b):
    return -(-a // b)


class Seq:
    def __init__(self, tokens):
        self.blocks = []
        self.num_tokens = 0
        self.tokens = tokens  # list of ids, or None for a count-only sequence
        self.access_count = 1


class ModelManager:
    def __init__(self, num_blocks, block_size, evict_sequences=False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.evict = evict_sequences
        self.rc = [0] * num_blocks
        self.ext = [0] * num_blocks
        self.seqs = OrderedDict()  # least recently accessed first
        self.pending = []
        self.evicted = []
        self.stats = dict(total_allocations=0, total_deallocations=0, peak_allocations=0,
                          evictions=0, cow_copies=0, compaction_count=0)

    # --- helpers -----------------------------------------------------------
    @property
    def num_free(self):
        return sum(1 for r in self.rc if r == 0)

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
        b = self.rc.index(0)
        self.rc[b] = 1
        self.stats["total_allocations"] += 1
        return b

    def _unref(self, b):
        self.rc[b] -= 1
        if self.rc[b] == 0:
            self.stats["total_deallocations"] += 1

    def _drop(self, seq_id):
        for b in self.seqs.pop(seq_id).blocks:
            self._unref(b)

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
            for b in ids:
                self.ext[b] -= 1
                self._unref(b)
        return self._atomic(run)

    # --- sequence level ------------------------------------------------------
    def add_sequence(self, seq_id, tokens=None, num_tokens=0):
        def run():
            n = len(tokens) if tokens is not None else num_tokens
            need = ceil_div(n, self.block_size)
            if need > self.num_blocks:
                raise OutOfBlocks(seq_id)
            if seq_id in self.seqs:
                raise SequenceExists(seq_id)
            self._make_room(lambda: need, set())
            s = Seq([] if tokens is not None else None)
            self.seqs[seq_id] = s
            return self._append_one(s, n, tokens)
        return self._atomic(run)

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
            while True:
                while lo < self.num_blocks and self.rc[lo] != 0:
                    lo += 1
                while hi >= 0 and self.rc[hi] == 0:
                    hi -= 1
                if lo >= hi:
                    break
                moves.append((hi, lo))
                self.rc[lo], self.ext[lo] = self.rc[hi], self.ext[hi]
                self.rc[hi] = self.ext[hi] = 0
            remap = dict(moves)
            for s in self.seqs.values():
                s.blocks = [remap.get(b, b) for b in s.blocks]
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
            del self.rc[n:], self.ext[n:]
            self.num_blocks = n
        return self._atomic(run)

    def grow(self, n):
        def run():
            if n < self.num_blocks:
                raise InvalidConfiguration(n)
            self.rc += [0] * (n - self.num_blocks)
            self.ext += [0] * (n - self.num_blocks)
            self.num_blocks = n
        return self._atomic(run)
