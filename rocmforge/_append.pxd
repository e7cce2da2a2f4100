# cython: language_level=3
# Appending tokens to sequences: append_batch, the decode step, and the
# general append (copy-on-write of a shared last block, fresh blocks, token
# ids and prefix registration) that add_sequence shares.
#
# append_batch runs for the shard sh whose lock the caller holds. `fast`
# says the manager has several shards and only sh's lock is held: then any
# record, block or room outside sh makes it undo what it did and return
# RF_GLOBAL, and the caller runs it again holding every lock.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

from rocmforge._state cimport (
    Core, Shard, SeqRec, BlockScratch, ErrInfo, rf_reserve, rf_resize, rf_push, rf_append_n, rf_room,
    rf_write_slots, rf_sole_gen, rf_share_gen, rf_copy_number, rf_early_take_allowed, rf_decode_runs, RF_OK,
    RF_NO_MEMORY, RF_OUT_OF_BLOCKS, RF_SEQ_NOT_FOUND, RF_DUPLICATE_SEQ, RF_NEGATIVE_COUNT,
    RF_TOKENS_REQUIRED, RF_TOKENS_UNEXPECTED, RF_GLOBAL, NO_SLOT, _ceil_div)
from rocmforge._freeset cimport fs_set
from rocmforge._prefix cimport register_full, reserve_registrations
from rocmforge._blocks cimport take_block, note_peak
from rocmforge._seqs cimport (seq_find, block_tag, scratch_at, sole_last, lru_unlink, lru_insert_after,
                              lru_run_to_tail, touch, dir_find)
from rocmforge._room cimport op_epoch, ensure_free, fill_shard


cdef inline int count_shared_last(Core* c, Shard* sh, SeqRec* s, uint64_t tag) noexcept nogil:
    """s appends into its partly filled last block: when other tables share that
    block, count the copy it needs (first time: list the block in sh.tmp_blocks).
    RF_NO_MEMORY, counting nothing, when the list cannot grow."""
    cdef int32_t last = s.blocks.back()
    cdef BlockScratch* sc
    if c.refs[last].rc > 1:
        sc = scratch_at(c, last, tag)
        if sc.count == 0:
            if rf_reserve(sh.tmp_blocks, sh.tmp_blocks.size() + 1):
                return RF_NO_MEMORY
            rf_push(sh.tmp_blocks, last)
        sc.count += 1
    return RF_OK


cdef inline bint foreign(Core* c, Shard* sh, int32_t b) noexcept nogil:
    """Whether block b is guarded by another shard's lock than sh's."""
    return c.nshards > 1 and c.home[b] != sh.index


cdef inline SeqRec* find_record(Core* c, Shard* sh, bint fast, int64_t seq_id, Shard** where,
                                int32_t* slot) noexcept nogil:
    """The record of seq_id: in sh, else (several shards, every lock held, not
    fast) in the shard the directory names. NULL when there is none. A fast run
    holds only sh's lock, so it must not see another shard's records: for a
    sequence that lives elsewhere it gets NULL and goes global."""
    cdef int32_t t
    slot[0] = seq_find(sh, seq_id)
    where[0] = sh
    if slot[0] == NO_SLOT and c.nshards > 1 and not fast:
        t = dir_find(c, seq_id)
        if t >= 0 and t != sh.index:
            where[0] = &c.shards[t]
            slot[0] = seq_find(where[0], seq_id)
    if slot[0] == NO_SLOT:
        return NULL
    return &where[0].seqs[slot[0]]


cdef inline void append_in_place(SeqRec* s, int64_t count, int64_t fill, int64_t bs,
                                 const int32_t* tokens, int64_t* slots_out) noexcept nogil:
    """Append `count` tokens into the last block, which holds `fill` and has
    room for them (the decode step); token capacity was reserved by the caller."""
    rf_write_slots(slots_out, <int64_t>s.blocks.back() * bs + fill, count)
    if tokens != NULL:
        rf_append_n(s.tokens, tokens, count)
    s.num_tokens += count


cdef inline int check_append(const SeqRec* s, int64_t count, bint with_tokens) noexcept nogil:
    """Whether `count` tokens may be appended to s, with or without token ids."""
    if count < 0:
        return RF_NEGATIVE_COUNT
    if with_tokens and not s.has_tokens:
        return RF_TOKENS_UNEXPECTED
    if count > 0 and s.has_tokens and not with_tokens:
        return RF_TOKENS_REQUIRED
    return RF_OK


cdef inline int64_t fresh_blocks(int64_t room, int64_t count, int64_t bs) noexcept nogil:
    """Blocks needed to append `count` tokens after `room` free slots (divides only past one block)."""
    if count <= room:
        return 0
    if count - room <= bs:
        return 1
    return _ceil_div(count - room, bs)


cdef inline void append_blocks(Core* c, Shard* sh, SeqRec* s, int64_t count, const int32_t* tokens,
                               int64_t* slots_out) noexcept nogil:
    """The general append: copy-on-write of a shared last block, fresh blocks as
    the tokens need them, token ids kept. Room and blocks reserved by the caller."""
    cdef int64_t bs = c.block_size
    cdef int64_t room = rf_room(s, bs)
    cdef int64_t off = bs - room if room else 0
    cdef int64_t j
    cdef int32_t cur = -1, fresh
    if off != 0:
        cur = s.blocks.back()
        if c.refs[cur].rc > 1:
            # Copy-on-write: the partly filled last block is shared.
            fresh = take_block(c, sh)
            rf_push(sh.pending, rf_copy_number(c))
            rf_push(sh.pending, <int64_t>cur)
            rf_push(sh.pending, <int64_t>fresh)
            c.refs[cur].rc -= 1
            s.blocks.set(s.blocks.size() - 1, fresh)
            sh.cow_copies.add(1)
            cur = fresh
    for j in range(count):
        if off == 0:
            cur = take_block(c, sh)
            s.blocks.push(cur)
        slots_out[j] = <int64_t>cur * bs + off
        off += 1
        if off == bs:
            off = 0
    if tokens != NULL:
        rf_append_n(s.tokens, tokens, count)
    s.num_tokens += count


cdef inline void append_apply(Core* c, Shard* sh, SeqRec* s, int64_t count, const int32_t* tokens,
                              int64_t* slots_out) noexcept nogil:
    """Append `count` tokens; room and free blocks were reserved by the caller."""
    cdef int64_t bs = c.block_size
    cdef int64_t room = rf_room(s, bs)
    if count == 0:
        return
    if count <= room and sole_last(c, s):
        append_in_place(s, count, bs - room, bs, tokens, slots_out)
    else:
        append_blocks(c, sh, s, count, tokens, slots_out)


cdef inline bint hint_holds(Shard* sh, int32_t slot, int64_t seq_id) noexcept nogil:
    """Whether a batch position's hint names the live record of seq_id
    (record 0, a new position's hint, may not exist yet)."""
    return (seq_id >= 0 and <size_t>slot < sh.seqs.size()
            and sh.seqs[slot].seq_id == seq_id)


cdef inline int append_room(Core* c, Shard* sh, bint fast, int64_t needed, int64_t early, int64_t regs,
                            uint64_t epoch, bint* prefix_locked, ErrInfo* err) noexcept nogil:
    """append_batch's reservations once pass 1 has counted: prefix
    registrations, pending copies (from the sharers in tmp_blocks), and
    `needed` fresh blocks plus one per copy (evicting if allowed; with
    several shards, moving free blocks into sh). Pass 1 took `early` blocks
    already; errors count them as still needed. In a fast run with
    registrations it takes the prefix lock (prefix_locked says so)."""
    cdef int64_t copies = 0
    cdef size_t j
    cdef int32_t b
    cdef BlockScratch* sc
    cdef int st
    if needed + early > c.num_blocks:
        err.a = needed + early
        err.b = c.num_blocks
        return RF_OUT_OF_BLOCKS
    for j in range(sh.tmp_blocks.size()):
        b = sh.tmp_blocks[j]
        sc = &c.scratch[b]
        copies += sc.count if sc.count < c.refs[b].rc - 1 else c.refs[b].rc - 1
    if fast and needed + copies > sh.free.num_free.get():
        return RF_GLOBAL
    if copies and rf_reserve(sh.pending, sh.pending.size() + 3 * copies):
        return RF_NO_MEMORY
    if regs:
        if fast:
            c.pfx.lock.lock()
            prefix_locked[0] = True
        if reserve_registrations(c, regs):
            return RF_NO_MEMORY
    if needed + copies > 0 and not fast:
        st = ensure_free(c, sh, needed + copies, epoch, err)
        if st == RF_OUT_OF_BLOCKS:
            err.a += early
            err.b += early
        if st == RF_OK:
            fill_shard(c, sh, needed + copies)
        return st
    return RF_OK


cdef inline void append_undo(Core* c, Shard* sh, const int32_t* slots, const int32_t* counts,
                             Py_ssize_t done, Py_ssize_t stamped) noexcept nogil:
    """Take back the appends pass 1 made to items [0, done): all items with
    tokens to append except those it recorded in tmp_slow. A last block
    left empty was taken by pass 1 (a last block always holds a token):
    it goes back to sh's free set, uncounted. Then the stamps of items
    [0, stamped)."""
    cdef Py_ssize_t i
    cdef size_t k = 0
    cdef int32_t b, zero = 0
    cdef SeqRec* s
    for i in range(stamped):
        s = &sh.seqs[slots[i]]
        s.last_access = sh.tmp_stamps[i]
        s.access_count -= 1
    for i in range(done):
        if k < sh.tmp_slow.size() and sh.tmp_slow[k] == i:
            k += 2
            continue
        if counts[i] > 0:
            s = &sh.seqs[slots[i]]
            s.num_tokens -= counts[i]
            if s.has_tokens:
                rf_resize(s.tokens, <size_t>s.num_tokens, zero)   # shrinks: cannot fail
            if <int64_t>(s.blocks.size() - 1) * c.block_size >= s.num_tokens:
                b = s.blocks.back()
                s.blocks.pop()
                c.refs[b].rc = 0
                fs_set(&sh.free, b)
                sh.free.num_free.add(1)
                sh.total_allocations.add(-1)


cdef inline int append_batch(Core* c, Shard* sh, bint fast, const int64_t* seq_ids, const int32_t* counts,
                             Py_ssize_t n, bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                             double now, ErrInfo* err) noexcept nogil:
    """Append counts[i] tokens to seq_ids[i] for every i, all or nothing (see
    the module comment for `fast`)."""
    cdef uint64_t epoch = op_epoch(c, sh, not fast)
    cdef uint64_t tag = block_tag(sh)
    cdef int64_t bs = c.block_size
    cdef int64_t needed = 0, nt, cnt, room, fresh, off = 0
    cdef int64_t full_new, regs = 0, early = 0
    cdef bint prefix = c.prefix, prefix_locked = False
    cdef Py_ssize_t i, done = n, stamped = 0, settled = 0
    cdef size_t k
    cdef int32_t slot, zero = 0
    cdef int32_t* slots
    cdef SeqRec* s
    cdef int st = RF_OK
    # A new position's hint is record 0: any record will do, since hints
    # are checked, and records are never taken away once made (the run
    # starts once one exists).
    if <Py_ssize_t>sh.batch_slots.size() < n and rf_resize(sh.batch_slots, n, zero):
        return RF_NO_MEMORY
    if <Py_ssize_t>sh.tmp_stamps.size() < n and rf_resize(sh.tmp_stamps, n, 0.0):
        return RF_NO_MEMORY
    slots = sh.batch_slots.data()   # hints in, this batch's records out
    sh.tmp_blocks.clear()
    sh.tmp_slow.clear()
    sh.tmp_moved.clear()
    # Pass 1: validate every item. Tokens that fit the sequence's own last
    # block (a decode step) are appended at once, and taken back below if
    # the batch fails. For the rest it records (index, output offset) and
    # counts fresh blocks and sharers of shared partly filled last blocks
    # (each needs a copy unless it is the last reference:
    # min(sharers_in_batch, refcount - 1) copies per block). Every record
    # is stamped when it is marked (items [0, stamped)), its old stamp
    # kept for the undo. tmp_moved lists the items whose record does not
    # follow its predecessor's in the LRU list (the run takes none).
    i = -1
    while True:
        i += 1
        if not with_tokens and i < n and hint_holds(sh, slots[i], seq_ids[i]):
            i = rf_decode_runs(c, sh, seq_ids, counts, slots, i, n, <uint32_t>epoch, now,
                               slots_out, &off, &early)
            stamped = i
        if i >= n:
            break
        slot = slots[i]
        if not hint_holds(sh, slot, seq_ids[i]):
            slot = seq_find(sh, seq_ids[i])
            if slot == NO_SLOT:
                err.id = seq_ids[i]
                st = RF_GLOBAL if fast else RF_SEQ_NOT_FOUND
                done = i
                break
        s = &sh.seqs[slot]
        if s.mark == <uint32_t>epoch:
            err.id = seq_ids[i]
            st = RF_DUPLICATE_SEQ
            done = i
            break
        s.mark = <uint32_t>epoch
        slots[i] = slot
        sh.tmp_stamps[i] = s.last_access
        s.last_access = now
        s.access_count += 1
        stamped = i + 1
        if i != 0 and s.lru_prev != slots[i - 1]:
            if rf_reserve(sh.tmp_moved, sh.tmp_moved.size() + 1):
                st = RF_NO_MEMORY
                done = i
                break
            rf_push(sh.tmp_moved, <int64_t>i)
        cnt = counts[i]
        st = check_append(s, cnt, with_tokens)
        if st != RF_OK:
            err.id = seq_ids[i]
            err.a = cnt
            done = i
            break
        if cnt == 0:
            continue
        nt = s.num_tokens
        room = rf_room(s, bs)
        if room != 0 and fast and foreign(c, sh, s.blocks.back()):
            st = RF_GLOBAL          # its last block's refcount is another shard's
            done = i
            break
        if (cnt <= room and (not with_tokens or not prefix or cnt < room)
                and sole_last(c, s)):
            if with_tokens and rf_reserve(s.tokens, nt + cnt):
                st = RF_NO_MEMORY
                done = i
                break
            append_in_place(s, cnt, bs - room, bs, tokens + off if with_tokens else NULL,
                            slots_out + off)
            off += cnt
            continue
        if room == 0 and cnt <= bs and not with_tokens and rf_early_take_allowed(c, sh):
            # A decode step into a full last block takes the lowest free
            # block at once (given back if the batch fails).
            if s.blocks.reserve(s.blocks.size() + 1):
                st = RF_NO_MEMORY
                done = i
                break
            s.blocks.push(take_block(c, sh))
            s.sole_gen = rf_sole_gen(s, rf_share_gen(c))   # a fresh block is its alone
            append_in_place(s, cnt, 0, bs, NULL, slots_out + off)
            off += cnt
            early += 1
            continue
        if rf_reserve(sh.tmp_slow, sh.tmp_slow.size() + 2):
            st = RF_NO_MEMORY
            done = i
            break
        if room != 0 and count_shared_last(c, sh, s, tag):
            st = RF_NO_MEMORY
            done = i
            break
        if cnt > room:
            fresh = fresh_blocks(room, cnt, bs)
            needed += fresh
            if s.blocks.reserve(s.blocks.size() + fresh):
                st = RF_NO_MEMORY
                done = i
                break
        if with_tokens:
            if rf_reserve(s.tokens, nt + cnt):
                st = RF_NO_MEMORY
                done = i
                break
            if prefix:
                full_new = (nt + cnt) // bs - nt // bs
                if full_new and rf_reserve(s.keys, s.keys.size() + full_new):
                    st = RF_NO_MEMORY
                    done = i
                    break
                regs += full_new
        rf_push(sh.tmp_slow, <int64_t>i)
        rf_push(sh.tmp_slow, off)
        off += cnt
    if st == RF_OK:
        st = append_room(c, sh, fast, needed, early, regs, epoch, &prefix_locked, err)
    if st != RF_OK:
        if prefix_locked:
            c.pfx.lock.unlock()
        append_undo(c, sh, slots, counts, done, stamped)
        return st
    # Pass 2: append the rest in batch order (cannot fail now).
    for k in range(0, sh.tmp_slow.size(), 2):
        i = sh.tmp_slow[k]
        off = sh.tmp_slow[k + 1]
        s = &sh.seqs[slots[i]]
        append_blocks(c, sh, s, counts[i], tokens + off if with_tokens else NULL, slots_out + off)
        if with_tokens and prefix:
            register_full(c, s, s.keys.size())
    if prefix_locked:
        c.pfx.lock.unlock()
    # Touch in batch order, as sequential touches would: move each record
    # out of place behind its predecessor in the batch, then the whole
    # run, now contiguous, to the newest end. A steady decode batch moves
    # nothing. Moving a record can only unsettle the next item (whose
    # record followed it), so each move checks that one too.
    for k in range(sh.tmp_moved.size()):
        i = sh.tmp_moved[k]
        if i < settled:
            continue
        while i < n:
            slot = slots[i]
            if sh.seqs[slot].lru_prev == slots[i - 1]:
                break
            lru_unlink(sh, slot)
            lru_insert_after(sh, slot, slots[i - 1])
            i += 1
        settled = i + 1
    if n != 0:
        lru_run_to_tail(sh, slots[0], slots[n - 1])
    note_peak(sh)
    return RF_OK


cdef inline int append_batch_any(Core* c, Shard* sh, const int64_t* seq_ids, const int32_t* counts,
                                 Py_ssize_t n, bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                                 double now, ErrInfo* err) noexcept nogil:
    """append_batch holding every lock of a manager with several shards: the
    named sequences may live in any shard (each stays there), new blocks come
    from sh. The same effects as append_batch, item by item in batch order,
    without its decode-step shortcuts."""
    cdef uint64_t epoch = op_epoch(c, sh, True)
    cdef uint64_t tag = block_tag(sh)
    cdef int64_t bs = c.block_size, needed = 0, regs = 0, nt, cnt, room, fresh, off = 0, full_new, handle
    cdef bint prefix = c.prefix, unused = False
    cdef Py_ssize_t i
    cdef size_t k
    cdef int32_t slot
    cdef Shard* where
    cdef SeqRec* s
    cdef int st = RF_OK
    sh.tmp_blocks.clear()
    sh.tmp_moved.clear()
    if rf_reserve(sh.tmp_moved, n):
        return RF_NO_MEMORY
    # Validate every item, in order, counting new blocks and copies.
    for i in range(n):
        s = find_record(c, sh, False, seq_ids[i], &where, &slot)
        if s == NULL:
            err.id = seq_ids[i]
            return RF_SEQ_NOT_FOUND
        if s.mark == <uint32_t>epoch:
            err.id = seq_ids[i]
            return RF_DUPLICATE_SEQ
        s.mark = <uint32_t>epoch
        rf_push(sh.tmp_moved, (<int64_t>where.index << 32) | slot)
        cnt = counts[i]
        st = check_append(s, cnt, with_tokens)
        if st != RF_OK:
            err.id = seq_ids[i]
            err.a = cnt
            return st
        if cnt == 0:
            continue
        nt = s.num_tokens
        room = rf_room(s, bs)
        if room != 0 and cnt <= room and sole_last(c, s):
            fresh = 0
        else:
            if room != 0 and count_shared_last(c, sh, s, tag):
                return RF_NO_MEMORY
            fresh = fresh_blocks(room, cnt, bs)
        needed += fresh
        if s.blocks.reserve(s.blocks.size() + fresh) or (with_tokens and rf_reserve(s.tokens, nt + cnt)):
            return RF_NO_MEMORY
        if with_tokens and prefix:
            full_new = (nt + cnt) // bs - nt // bs
            if full_new and rf_reserve(s.keys, s.keys.size() + full_new):
                return RF_NO_MEMORY
            regs += full_new
        off += cnt
    st = append_room(c, sh, False, needed, 0, regs, epoch, &unused, err)
    if st != RF_OK:
        return st
    # Apply in batch order, then touch in batch order.
    off = 0
    for i in range(n):
        handle = sh.tmp_moved[i]
        s = &c.shards[handle >> 32].seqs[<int32_t><uint32_t>handle]
        append_apply(c, sh, s, counts[i], tokens + off if with_tokens else NULL, slots_out + off)
        if with_tokens and prefix and counts[i]:
            register_full(c, s, s.keys.size())
        off += counts[i]
    for k in range(sh.tmp_moved.size()):
        handle = sh.tmp_moved[k]
        touch(&c.shards[handle >> 32], <int32_t><uint32_t>handle, now)
    note_peak(sh)
    return RF_OK
