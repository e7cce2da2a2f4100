# cython: language_level=3
# Sequence records: each lives in a reusable slot of its shard, found through
# the shard's id -> slot index, and linked into the shard's LRU list (least
# recently accessed first). With several shards a directory, striped by id,
# says which shard holds each id.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, INT32_MAX
from libcpp.vector cimport vector

from rocmforge._state cimport (
    Core, Shard, SeqRec, BlockScratch, DirStripe, ErrInfo, rf_reserve, rf_push, rf_idmap_find, rf_idmap_put,
    rf_idmap_erase, rf_idmap_reserve, rf_sole_gen, rf_share_gen, RF_OK, RF_NO_MEMORY,
    RF_TOO_MANY_SEQUENCES, RF_SEQ_EXISTS, RF_DIR_STRIPES, RF_MAX_SHARDS, NO_SLOT)
from rocmforge._blocks cimport unref, unref_plain


cdef inline int32_t seq_find(Shard* sh, int64_t seq_id) noexcept nogil:
    return rf_idmap_find(sh.ids, seq_id)


cdef inline uint64_t next_epoch(Shard* sh) noexcept nogil:
    """A new operation number for this shard. Sequence records keep its low 32
    bits (their mark shares the decode cache line), so when those wrap, every
    record's mark is cleared and 0 is skipped: a stale mark never matches."""
    cdef size_t j
    sh.epoch += 1
    if <uint32_t>sh.epoch == 0:
        for j in range(sh.seqs.size()):
            sh.seqs[j].mark = 0
        sh.epoch += 1
    return sh.epoch


cdef inline uint64_t block_tag(Shard* sh) noexcept nogil:
    """The running operation's mark for per-block scratch: unique across shards,
    since a block's scratch may be used by operations of several."""
    return sh.epoch * RF_MAX_SHARDS + <uint64_t>sh.index


cdef inline BlockScratch* scratch_at(Core* c, int32_t b, uint64_t tag) noexcept nogil:
    cdef BlockScratch* sc = &c.scratch[b]
    if sc.mark != tag:
        sc.mark = tag
        sc.count = 0
        sc.dec = 0
    return sc


# --- LRU order ---------------------------------------------------------------------------

cdef inline void lru_unlink(Shard* sh, int32_t slot) noexcept nogil:
    cdef SeqRec* s = &sh.seqs[slot]
    if s.lru_prev != NO_SLOT:
        sh.seqs[s.lru_prev].lru_next = s.lru_next
    else:
        sh.lru_head = s.lru_next
    if s.lru_next != NO_SLOT:
        sh.seqs[s.lru_next].lru_prev = s.lru_prev
    else:
        sh.lru_tail = s.lru_prev
    s.lru_prev = NO_SLOT
    s.lru_next = NO_SLOT


cdef inline void lru_insert_after(Shard* sh, int32_t slot, int32_t anchor) noexcept nogil:
    """Link an unlinked record right after `anchor` (a linked one)."""
    cdef SeqRec* s = &sh.seqs[slot]
    cdef SeqRec* a = &sh.seqs[anchor]
    s.lru_prev = anchor
    s.lru_next = a.lru_next
    if a.lru_next != NO_SLOT:
        sh.seqs[a.lru_next].lru_prev = slot
    else:
        sh.lru_tail = slot
    a.lru_next = slot


cdef inline void lru_push(Shard* sh, int32_t slot) noexcept nogil:
    """Link an unlinked record at the newest end."""
    cdef SeqRec* s = &sh.seqs[slot]
    if sh.lru_tail != NO_SLOT:
        lru_insert_after(sh, slot, sh.lru_tail)
    else:
        s.lru_prev = NO_SLOT
        s.lru_next = NO_SLOT
        sh.lru_head = slot
        sh.lru_tail = slot


cdef inline void lru_run_to_tail(Shard* sh, int32_t first, int32_t last) noexcept nogil:
    """Move the contiguous run first..last (oldest to newest) to the newest end."""
    cdef SeqRec* f = &sh.seqs[first]
    cdef SeqRec* l = &sh.seqs[last]
    if sh.lru_tail == last:
        return
    sh.seqs[l.lru_next].lru_prev = f.lru_prev     # last is not the tail
    if f.lru_prev != NO_SLOT:
        sh.seqs[f.lru_prev].lru_next = l.lru_next
    else:
        sh.lru_head = l.lru_next
    f.lru_prev = sh.lru_tail
    sh.seqs[sh.lru_tail].lru_next = first
    l.lru_next = NO_SLOT
    sh.lru_tail = last


cdef inline void touch(Shard* sh, int32_t slot, double now) noexcept nogil:
    """Record an access: move the sequence to the newest end of the LRU list and stamp it."""
    cdef SeqRec* s = &sh.seqs[slot]
    lru_run_to_tail(sh, slot, slot)
    s.last_access = now
    s.access_count += 1


# --- records -------------------------------------------------------------------------------

cdef inline void drop_sequence(Core* c, Shard* sh, int32_t slot) noexcept nogil:
    """Release every block of a sequence and recycle its slot (the directory
    entry, with several shards, is the caller's)."""
    cdef SeqRec* s = &sh.seqs[slot]
    cdef size_t j
    if c.prefix and s.has_tokens:
        # Tail first, so a cached chain's deepest blocks are the first to be
        # evicted. (Count-only sequences never hold cached blocks.)
        c.pfx.cold_anchor = -1
        for j in range(s.blocks.size(), 0, -1):
            unref(c, s.blocks[j - 1])
    else:
        unref_plain(c, s.blocks.data(), s.blocks.size())
    lru_unlink(sh, slot)
    rf_idmap_erase(sh.ids, s.seq_id)
    sh.num_seqs.add(-1)
    s.blocks.clear()
    s.tokens.clear()
    s.keys.clear()
    s.live = False
    s.seq_id = -1                     # a batch hint naming this slot no longer matches
    s.num_tokens = 0
    rf_push(sh.free_slots, slot)      # capacity kept >= len(seqs)


cdef inline int claim_slot(Shard* sh, int32_t* slot_out, ErrInfo* err) noexcept nogil:
    """Take a free record slot off the free list (invisible to callers until opened).

    A caller that fails afterwards hands it back with unclaim_slot."""
    cdef SeqRec blank
    cdef size_t n = sh.seqs.size()
    if sh.free_slots.size() == 0:
        if n >= <size_t>(INT32_MAX - 1):
            err.a = INT32_MAX - 1
            return RF_TOO_MANY_SEQUENCES
        if (rf_reserve(sh.seqs, n + 1 if n < 16 else n + n // 2)
                or rf_reserve(sh.free_slots, sh.seqs.capacity())):
            return RF_NO_MEMORY
        blank.seq_id = -1
        blank.num_tokens = 0
        blank.has_tokens = False
        blank.live = False
        blank.created_at = 0
        blank.last_access = 0
        blank.access_count = 0
        blank.lru_prev = NO_SLOT
        blank.lru_next = NO_SLOT
        blank.mark = 0
        blank.sole_gen = 0
        blank.salt = 0
        blank.cached_tokens = 0
        blank.cold = False
        blank.warm = False
        rf_push(sh.seqs, blank)
        rf_push(sh.free_slots, <int32_t>n)
    slot_out[0] = sh.free_slots.back()
    sh.free_slots.pop_back()
    return RF_OK


cdef inline int unclaim_slot(Shard* sh, int32_t slot, int status) noexcept nogil:
    rf_push(sh.free_slots, slot)   # capacity kept >= len(seqs)
    return status


cdef inline void open_sequence(Shard* sh, int32_t slot, int64_t seq_id, bint has_tokens,
                               double now) noexcept nogil:
    """Turn a claimed slot (its id already in the index) into a live, empty,
    most recently used sequence."""
    cdef SeqRec* s = &sh.seqs[slot]
    s.seq_id = seq_id
    s.num_tokens = 0
    s.has_tokens = has_tokens
    s.live = True
    s.created_at = now
    s.last_access = now
    s.access_count = 1
    s.mark = 0
    s.sole_gen = 0
    s.salt = 0
    s.cached_tokens = 0
    s.cold = False
    s.warm = False
    s.keys.clear()
    sh.num_seqs.add(1)
    lru_push(sh, slot)


cdef inline bint sole_last(Core* c, SeqRec* s) noexcept nogil:
    """Whether the sequence alone holds its (partly filled) last block; a
    yes is remembered until some block in use gains a reference."""
    cdef uint64_t proof = rf_sole_gen(s, rf_share_gen(c))
    if s.sole_gen == proof:
        return True
    if c.refs[s.blocks.back()].rc == 1:
        s.sole_gen = proof
        return True
    return False


# --- the directory (several shards) --------------------------------------------------------

cdef inline DirStripe* dir_stripe(Core* c, int64_t seq_id) noexcept nogil:
    return &c.dir[(<uint64_t>seq_id * <uint64_t>0x9E3779B97F4A7C15) >> 58]


cdef inline int32_t dir_find(Core* c, int64_t seq_id) noexcept nogil:
    """The shard holding seq_id (or claiming it for an add in progress), -1 if none."""
    cdef DirStripe* d = dir_stripe(c, seq_id)
    cdef int32_t s
    d.lock.lock()
    s = rf_idmap_find(d.map, seq_id)
    d.lock.unlock()
    return s


cdef inline int dir_claim(Core* c, int64_t seq_id, int32_t shard, ErrInfo* err) noexcept nogil:
    """Record seq_id as shard's, refusing an id any shard holds (or claims)."""
    cdef DirStripe* d = dir_stripe(c, seq_id)
    cdef int st = RF_OK
    d.lock.lock()
    if rf_idmap_find(d.map, seq_id) >= 0:
        err.id = seq_id
        st = RF_SEQ_EXISTS
    elif rf_idmap_put(d.map, seq_id, shard):
        st = RF_NO_MEMORY
    d.lock.unlock()
    return st


cdef inline void dir_erase(Core* c, int64_t seq_id) noexcept nogil:
    cdef DirStripe* d = dir_stripe(c, seq_id)
    d.lock.lock()
    rf_idmap_erase(d.map, seq_id)
    d.lock.unlock()
