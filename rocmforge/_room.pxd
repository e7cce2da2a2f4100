# cython: language_level=3
# Making room for an operation's new blocks: evicting least recently accessed
# sequences (evict_sequences=True) when free and evictable blocks do not
# suffice, and, with several shards, moving free blocks into the operation's
# shard. Also the operation numbers that mark what an operation names.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from rocmforge._state cimport (
    Core, Shard, SeqRec, BlockScratch, ErrInfo, rf_reserve, rf_push, RF_OK, RF_NO_MEMORY,
    RF_OUT_OF_BLOCKS, NO_SLOT)
from rocmforge._blocks cimport avail_total, steal_free
from rocmforge._seqs cimport next_epoch, block_tag, scratch_at, drop_sequence, dir_erase


cdef inline uint64_t op_epoch(Core* c, Shard* sh, bint all_locks) noexcept nogil:
    """The running operation's number on shard sh. An operation holding every
    lock (several shards) may mark records of any shard, so every shard moves
    to one new number, larger than any before; a shard whose number crosses a
    2**32 boundary clears its records' 32-bit marks, as next_epoch does."""
    cdef uint64_t top = 0, e
    cdef int32_t t
    cdef size_t j
    cdef Shard* x
    if c.nshards == 1 or not all_locks:
        return next_epoch(sh)
    for t in range(c.nshards):
        if c.shards[t].epoch > top:
            top = c.shards[t].epoch
    e = top + 1
    if <uint32_t>e == 0:
        e += 1
    for t in range(c.nshards):
        x = &c.shards[t]
        if (x.epoch >> 32) != (e >> 32):
            for j in range(x.seqs.size()):
                x.seqs[j].mark = 0
        x.epoch = e
    return e


cdef inline void dry_evict(Core* c, Shard* sh, Shard* x, uint32_t mark, uint64_t tag, int64_t avail,
                           int64_t* needed, int64_t* freed) noexcept nogil:
    """Choose shard x's least recently accessed sequences not marked by the
    operation until avail + freed reaches needed: their (shard, slot) go to
    the operation shard sh's tmp_victims (room reserved by the caller)."""
    cdef int32_t slot = x.lru_head, b
    cdef int64_t eff, before, after
    cdef size_t j
    cdef SeqRec* s
    cdef BlockScratch* sc
    while slot != NO_SLOT and avail + freed[0] < needed[0]:
        s = &x.seqs[slot]
        if s.mark != mark:
            rf_push(sh.tmp_victims, (<int64_t>x.index << 32) | slot)
            for j in range(s.blocks.size()):
                b = s.blocks[j]
                sc = scratch_at(c, b, tag)
                eff = c.refs[b].rc - sc.dec
                if sc.count > 0:
                    before = sc.count if sc.count < eff - 1 else eff - 1
                    after = sc.count if sc.count < eff - 2 else eff - 2
                    needed[0] -= before - after
                sc.dec += 1
                if eff == 1:
                    freed[0] += 1
        slot = s.lru_next


cdef inline int ensure_free(Core* c, Shard* sh, int64_t needed, uint64_t epoch, ErrInfo* err) noexcept nogil:
    """Make `needed` blocks free or evictable, evicting sequences not marked with
    `epoch`: least recently accessed first, those of shard sh before the other
    shards' (in shard order). Holds every lock when there are several shards.

    Eviction is decided by a dry run first, so a request that cannot be
    met evicts nothing. Blocks marked with a copy-on-write count by the
    caller (scratch.count) lower `needed` as eviction drops their sharers.
    """
    cdef int64_t freed = 0, avail = avail_total(c), total = 0, v
    cdef uint64_t tag = block_tag(sh)
    cdef int32_t t
    cdef size_t j
    cdef Shard* x
    if needed <= avail:
        return RF_OK
    if not c.evict_sequences:
        err.a = needed
        err.b = avail
        return RF_OUT_OF_BLOCKS
    for t in range(c.nshards):
        total += c.shards[t].num_seqs.get()
    sh.tmp_victims.clear()
    if rf_reserve(sh.tmp_victims, total):
        return RF_NO_MEMORY
    dry_evict(c, sh, sh, <uint32_t>epoch, tag, avail, &needed, &freed)
    for t in range(c.nshards):
        if t != sh.index:
            dry_evict(c, sh, &c.shards[t], <uint32_t>epoch, tag, avail, &needed, &freed)
    if avail + freed < needed:
        err.a = needed
        err.b = avail + freed
        return RF_OUT_OF_BLOCKS
    if c.nshards > 1:
        c.q_lock.lock()     # take_evicted holds only this lock
    if rf_reserve(c.evicted, c.evicted.size() + sh.tmp_victims.size()):
        if c.nshards > 1:
            c.q_lock.unlock()
        return RF_NO_MEMORY
    for j in range(sh.tmp_victims.size()):
        v = sh.tmp_victims[j]
        x = &c.shards[v >> 32]
        t = <int32_t><uint32_t>v
        rf_push(c.evicted, x.seqs[t].seq_id)
        if c.nshards > 1:
            dir_erase(c, x.seqs[t].seq_id)
        drop_sequence(c, x, t)
        c.evictions.add(1)
    if c.nshards > 1:
        c.q_lock.unlock()
    return RF_OK


cdef inline void fill_shard(Core* c, Shard* sh, int64_t needed) noexcept nogil:
    """With several shards (every lock held): move free blocks into sh until it
    has `needed` or the other shards have none left (the rest comes from
    evictable blocks)."""
    if c.nshards > 1 and sh.free.num_free.get() < needed:
        steal_free(c, sh, needed)
