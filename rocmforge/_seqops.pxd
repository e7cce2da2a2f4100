# cython: language_level=3
# Operations on sequences and external blocks, each for the shard sh whose
# lock the caller holds: allocate, add_sequence, fork, remove. As in _append.pxd, `fast` says only sh's lock is
# held on a manager with several shards: anything outside sh returns
# RF_GLOBAL before a change is made, and the caller runs the operation again
# holding every lock. Directory entries (several shards) are the caller's.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, INT32_MAX

from rocmforge._state cimport (
    Core, Shard, SeqRec, ErrInfo, PrefixState, rf_reserve, rf_resize, rf_push, rf_append_n, rf_append_n64,
    rf_idmap_put, rf_idmap_erase, rf_write_slots, rf_share_bump, RF_OK, RF_NO_MEMORY,
    RF_OUT_OF_BLOCKS, RF_SEQ_NOT_FOUND, RF_SEQ_EXISTS, RF_INVALID_ARGUMENT, RF_REFCOUNT_OVERFLOW,
    RF_GLOBAL, POLICY_ARC, NO_SLOT, _ceil_div)
from rocmforge._prefix cimport match_prefix, take_cached, reserve_registrations, register_block, arc_thrashing
from rocmforge._blocks cimport take_lowest, note_peak, all_home, avail_total
from rocmforge._seqs cimport (seq_find, scratch_at, block_tag, claim_slot, unclaim_slot, open_sequence,
                              drop_sequence, touch)
from rocmforge._room cimport op_epoch, ensure_free, fill_shard
from rocmforge._append cimport append_apply, foreign, find_record
from rocmforge._host_tier cimport ht_match, ht_reload, ht_pin, ht_unpin


cdef inline int allocate_blocks(Core* c, Shard* sh, bint fast, int32_t n, int32_t* out,
                                ErrInfo* err) noexcept nogil:
    """Take n blocks with one external reference each (see take_lowest), evicting
    sequences if allowed and needed; all or nothing."""
    cdef int st
    if n < 0:
        err.id = n
        return RF_INVALID_ARGUMENT
    if n > sh.free.num_free.get():
        if fast:
            return RF_GLOBAL
        # Cached blocks or sequences must give way: room for the events
        # their removal emits, then evict (or fail, changing nothing).
        if reserve_registrations(c, 0):
            return RF_NO_MEMORY
        st = ensure_free(c, sh, n, op_epoch(c, sh, True), err)
        if st != RF_OK:
            return st
        fill_shard(c, sh, n)
    take_lowest(c, sh, n, out)
    note_peak(sh)
    return RF_OK


cdef inline int add_sequence(Core* c, Shard* sh, bint fast, int64_t seq_id, bint with_tokens,
                             const int32_t* tokens, int64_t num_tokens, int64_t salt, const int64_t* keys,
                             int64_t* slots_out, double now, ErrInfo* err) noexcept nogil:
    """A new sequence in sh with its first tokens (their slots to slots_out);
    keys: the content keys of its full blocks (NULL without prefix caching).
    A fast run with prefix caching holds the prefix lock throughout."""
    cdef PrefixState* p = &c.pfx
    cdef int st
    cdef int32_t slot, b
    cdef int64_t nblocks, bs = c.block_size, nfull = 0, h = 0, h_ev = 0, hh = 0, j
    cdef uint64_t epoch
    cdef SeqRec* s
    cdef int32_t neg = -1
    if seq_id < 0 or num_tokens < 0:
        err.id = seq_id if seq_id < 0 else num_tokens
        return RF_INVALID_ARGUMENT
    nblocks = _ceil_div(num_tokens, bs)
    if nblocks > c.num_blocks:
        err.a = nblocks
        err.b = c.num_blocks
        return RF_OUT_OF_BLOCKS
    if seq_find(sh, seq_id) != NO_SLOT:
        err.id = seq_id
        return RF_SEQ_EXISTS
    if keys != NULL:
        nfull = num_tokens // bs
        if rf_resize(p.tmp_hits, nfull, neg) or reserve_registrations(c, nfull):
            return RF_NO_MEMORY
        h = match_prefix(c, tokens, keys, nfull, salt, p.tmp_hits.data())
    # Hits cost no block; an evictable hit leaves the pool that can be taken.
    for j in range(h):
        b = p.tmp_hits[j]
        if p.pb[b].ev_list:
            h_ev += 1
        elif fast and foreign(c, sh, b):
            return RF_GLOBAL            # a hit another shard's sequences hold
        elif c.refs[b].rc == INT32_MAX:
            h = j       # this block cannot take another reference: reuse ends before it
            break
    if fast and nblocks - h > sh.free.num_free.get():
        return RF_GLOBAL
    if keys != NULL and p.host.capacity:
        # The host tier continues the pool's hits; they take fresh blocks, filled
        # by copies queued once the blocks are known.
        hh = ht_match(c, tokens, keys, h, nfull, salt, p.tmp_hits.data())
        if hh and rf_reserve(sh.pending, sh.pending.size() + 3 * hh):
            return RF_NO_MEMORY
        ht_pin(&p.host, p.tmp_hits.data() + h, hh)
    st = claim_slot(sh, &slot, err)
    if st != RF_OK:
        return st
    s = &sh.seqs[slot]
    if (s.blocks.reserve(nblocks) or (with_tokens and rf_reserve(s.tokens, num_tokens))
            or rf_reserve(s.keys, nfull)):
        return unclaim_slot(sh, slot, RF_NO_MEMORY)
    # Publish the id before evicting so failure can undo it with a plain erase.
    if rf_idmap_put(sh.ids, seq_id, slot):
        return unclaim_slot(sh, slot, RF_NO_MEMORY)
    if not fast:
        # Cached hits must stay out of the eviction dry run's count (this call
        # will hold them), and evictable hits leave the allocatable pool.
        epoch = op_epoch(c, sh, True)
        if nblocks - h + h_ev > avail_total(c):
            for j in range(h):
                scratch_at(c, p.tmp_hits[j], block_tag(sh)).dec = -1
        st = ensure_free(c, sh, nblocks - h + h_ev, epoch, err)
        if st != RF_OK:
            rf_idmap_erase(sh.ids, seq_id)
            return unclaim_slot(sh, slot, st)
        fill_shard(c, sh, nblocks - h)
    open_sequence(sh, slot, seq_id, with_tokens, now)
    s = &sh.seqs[slot]
    s.salt = salt
    take_cached(c, sh, p.tmp_hits.data(), h, False)
    for j in range(h):
        b = p.tmp_hits[j]
        s.blocks.push(b)
        rf_write_slots(slots_out + j * bs, <int64_t>b * bs, bs)
    if h:
        rf_append_n(s.tokens, tokens, h * bs)
        s.num_tokens = h * bs
        s.cached_tokens = h * bs
    append_apply(c, sh, s, num_tokens - h * bs, tokens + h * bs if with_tokens else NULL,
                 slots_out + h * bs)
    if hh:
        # Matched again: pinned slots stay, but a key may have moved (collisions).
        hh = ht_match(c, tokens, keys, h, h + hh, salt, p.tmp_hits.data())
        s = &sh.seqs[slot]
        for j in range(h, h + hh):
            ht_reload(c, sh, p.tmp_hits[j], s.blocks[j])
        ht_unpin(&p.host)
        s.cached_tokens = (h + hh) * bs
        p.host.hit_tokens.add(hh * bs)
    if keys != NULL:
        rf_append_n64(s.keys, keys, nfull)
        if c.policy == POLICY_ARC and h < nfull:
            if h >= 2 and 2 * h >= nfull:
                # Half the prompt or more was cached: a returning conversation,
                # whose new blocks are as likely to be reused as its history.
                s.warm = True
            elif arc_thrashing(p):
                # While the cache thrashes, only a sampled half of new prompts
                # (by key) enter list 1 proper; the rest go to the cold segment,
                # evicted first, so the sampled ones live long enough to be reused.
                s.cold = ((<uint64_t>keys[h]) * <uint64_t>0x9E3779B97F4A7C15) >> 63
        for j in range(h, nfull):
            register_block(c, s, j)
        for j in range(h, h + hh):
            p.pb[s.blocks[j]].hot = 1       # brought back from the host tier: a reused block
        p.lookups.add(1)
        p.query_tokens.add(num_tokens)
        p.hit_tokens.add((h + hh) * bs)
    note_peak(sh)
    return RF_OK


cdef inline int fork_sequence(Core* c, Shard* sh, bint fast, int64_t src, int64_t dst, double now,
                              ErrInfo* err) noexcept nogil:
    """A new sequence dst in sh sharing all of src's blocks and tokens."""
    cdef Shard* ssh
    cdef int32_t src_slot, dst_slot, b
    cdef SeqRec* s
    cdef SeqRec* d
    cdef size_t j
    cdef int st
    s = find_record(c, sh, fast, src, &ssh, &src_slot)
    if s == NULL:
        if fast:
            return RF_GLOBAL
        err.id = src
        return RF_SEQ_NOT_FOUND
    if dst < 0:
        err.id = dst
        return RF_INVALID_ARGUMENT
    if seq_find(sh, dst) != NO_SLOT:
        err.id = dst
        return RF_SEQ_EXISTS
    if fast and not all_home(c, sh, s.blocks.data(), s.blocks.size()):
        return RF_GLOBAL
    for j in range(s.blocks.size()):
        if c.refs[s.blocks[j]].rc == INT32_MAX:
            err.id = s.blocks[j]
            return RF_REFCOUNT_OVERFLOW
    st = claim_slot(sh, &dst_slot, err)     # may move records: re-take pointers after
    if st != RF_OK:
        return st
    s = &ssh.seqs[src_slot]
    d = &sh.seqs[dst_slot]
    if (d.blocks.reserve(s.blocks.size()) or rf_reserve(d.tokens, s.tokens.size())
            or rf_reserve(d.keys, s.keys.size())):
        return unclaim_slot(sh, dst_slot, RF_NO_MEMORY)
    if rf_idmap_put(sh.ids, dst, dst_slot):
        return unclaim_slot(sh, dst_slot, RF_NO_MEMORY)
    touch(ssh, src_slot, now)
    open_sequence(sh, dst_slot, dst, s.has_tokens, now)
    rf_share_bump(c)
    for j in range(s.blocks.size()):
        b = s.blocks[j]
        d.blocks.push(b)
        c.refs[b].rc += 1
    if s.has_tokens and s.tokens.size():
        rf_append_n(d.tokens, s.tokens.data(), s.tokens.size())
    if s.keys.size():
        rf_append_n64(d.keys, s.keys.data(), s.keys.size())
    d.salt = s.salt
    d.cold = s.cold
    d.warm = s.warm
    d.num_tokens = s.num_tokens
    return RF_OK


cdef inline int remove_sequence(Core* c, Shard* sh, bint fast, int64_t seq_id, bint* prefix_locked,
                                ErrInfo* err) noexcept nogil:
    """Release a sequence's blocks and forget it. A fast run that releases a
    sequence with token ids under prefix caching takes the prefix lock first
    (prefix_locked says so; the caller releases it)."""
    cdef Shard* where
    cdef int32_t slot
    cdef SeqRec* s = find_record(c, sh, fast, seq_id, &where, &slot)
    if s == NULL:
        if fast:
            return RF_GLOBAL
        err.id = seq_id
        return RF_SEQ_NOT_FOUND
    if fast:
        if not all_home(c, sh, s.blocks.data(), s.blocks.size()):
            return RF_GLOBAL
        if c.prefix and s.has_tokens:
            c.pfx.lock.lock()
            prefix_locked[0] = True
    drop_sequence(c, where, slot)
    return RF_OK
