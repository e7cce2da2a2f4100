# cython: language_level=3
# Taking and releasing blocks: refcounts, the shards' free sets, external
# references (allocate / incref / decref), and free blocks moving between
# shards.
#
# Every operation runs for one shard `sh` (the calling thread's): blocks it
# takes come from sh's free set (else from the prefix cache's evictable
# blocks), and sh becomes their home. A block whose refcount reaches zero
# goes back to its home shard's free set (or, cached, to the policy lists).
# With one shard all of this is the one shard.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t, INT32_MAX

from rocmforge._state cimport (
    Core, Shard, BlockRefs, PBlock, ErrInfo, rf_ctz64, RF_OK, RF_BLOCK_NOT_FOUND, RF_BLOCK_FREE,
    RF_NO_EXTERNAL_REF, RF_REFCOUNT_OVERFLOW, POLICY_ARC, rf_share_bump)
from rocmforge._freeset cimport (fs_low_word, fs_lowest, fs_set, fs_set_word, fs_clear_from, fs_pop_lowest,
                                 fs_has)
from rocmforge._prefix cimport ev_victim, unregister_tree, release_cached, set_home


cdef inline Shard* home_of(Core* c, int32_t b) noexcept nogil:
    """The shard whose free set b returns to (and whose lock guards it)."""
    if c.nshards == 1:
        return c.shards
    return &c.shards[c.home[b]]


cdef inline int64_t avail_total(Core* c) noexcept nogil:
    """Blocks an allocation can take now in the whole pool: free plus evictable."""
    cdef int64_t n = c.pfx.num_evictable.get()
    cdef int32_t s
    for s in range(c.nshards):
        n += c.shards[s].free.num_free.get()
    return n


cdef inline void note_peak(Shard* sh) noexcept nogil:
    """The shard's blocks in use (taken minus returned) may have reached a new peak."""
    sh.peak_allocations.raise_to(sh.total_allocations.get() - sh.total_deallocations.get())


cdef inline int32_t take_block(Core* c, Shard* sh) noexcept nogil:
    """Take a block with refcount 1 for shard sh: its lowest free one, else the
    policy's victim among the evictable cached blocks (one of the two must
    exist)."""
    cdef int32_t b
    if sh.free.num_free.get() > 0:
        b = fs_pop_lowest(&sh.free)
        sh.free.num_free.add(-1)
    else:
        b = ev_victim(c)
        unregister_tree(c, sh, b, True)
        set_home(c, b, sh)
    c.refs[b].rc = 1
    sh.total_allocations.add(1)
    return b


cdef inline void take_lowest(Core* c, Shard* sh, int32_t n, int32_t* out) noexcept nogil:
    """Take n blocks for the caller, one external reference each (free or
    evictable blocks, they must exist): sh's lowest free ids a bitmap word at
    a time, then the policy's victims."""
    cdef int32_t avail = <int32_t>sh.free.num_free.get()
    cdef int32_t got = 0, b, from_bits = n if n < avail else avail
    cdef int64_t idx
    cdef uint64_t w
    cdef uint64_t* leaf
    cdef BlockRefs* cnt = c.refs.data()
    while got < from_bits:
        idx = fs_low_word(&sh.free)
        leaf = &sh.free.bits[idx]
        w = leaf[0]
        while w != 0 and got < from_bits:
            b = <int32_t>(idx * 64 + rf_ctz64(w))
            w &= w - 1
            cnt[b].rc = 1
            cnt[b].ext = 1
            out[got] = b
            got += 1
        leaf[0] = w
        if w == 0 and sh.free.levels > 1:
            fs_clear_from(&sh.free, 1, idx)
    sh.free.num_free.add(-from_bits)
    sh.total_allocations.add(from_bits)
    while got < n:
        b = take_block(c, sh)
        cnt[b].ext = 1
        out[got] = b
        got += 1


cdef inline void release_block(Core* c, int32_t b) noexcept nogil:
    """A block's refcount just reached zero: cached blocks become evictable,
    others free in their home shard."""
    cdef Shard* h = home_of(c, b)
    if c.prefix and c.pfx.pb[b].serial != 0:
        release_cached(c, b)
    else:
        fs_set(&h.free, b)
        h.free.num_free.add(1)
    h.total_deallocations.add(1)


cdef inline void unref(Core* c, int32_t b) noexcept nogil:
    c.refs[b].rc -= 1
    if c.refs[b].rc == 0:
        release_block(c, b)


cdef inline void unref_plain(Core* c, const int32_t* ids, size_t n) noexcept nogil:
    """Drop one reference from each of n blocks without prefix caching: those
    that reach zero go back to the free set, counters kept in locals."""
    cdef BlockRefs* cnt = c.refs.data()
    cdef int32_t freed = 0, b
    cdef size_t j
    cdef Shard* sh = c.shards
    if c.nshards > 1:
        for j in range(n):
            unref(c, ids[j])
        return
    for j in range(n):
        b = ids[j]
        cnt[b].rc -= 1
        if cnt[b].rc == 0:
            fs_set(&sh.free, b)
            freed += 1
    sh.free.num_free.add(freed)
    sh.total_deallocations.add(freed)


cdef inline void ev_flush_tail(Core* c, int32_t tail, uint64_t clock, int32_t linked) noexcept nogil:
    """Write back what unref_run kept in locals: `linked` blocks appended to list 1."""
    c.pfx.ev_tail[1] = tail
    c.pfx.ev_clock = clock
    c.pfx.ev_len[1] += linked
    c.pfx.num_evictable.add(linked)
    c.shards.total_deallocations.add(linked)


cdef inline void unref_run(Core* c, const int32_t* ids, Py_ssize_t n) noexcept nogil:
    """unref each id in order (one release, as drop_sequence's). With one
    shard, cached blocks bound for the tail of list 1 (every one under LRU)
    are linked with that tail, the clock and the counters held in locals,
    written back once; any other release goes through release_block."""
    cdef Py_ssize_t i
    cdef int32_t b, r, tail = c.pfx.ev_tail[1], linked = 0
    cdef uint64_t clock = c.pfx.ev_clock
    cdef BlockRefs* cnt = c.refs.data()
    cdef PBlock* pb = c.pfx.pb.data()
    cdef PBlock* p
    cdef bint arc = c.policy == POLICY_ARC
    c.pfx.cold_anchor = -1
    if c.nshards > 1:
        for i in range(n):
            unref(c, ids[i])
        return
    for i in range(n):
        b = ids[i]
        r = cnt[b].rc - 1
        cnt[b].rc = r
        if r != 0:
            continue
        p = &pb[b]
        if p.serial == 0 or (arc and (p.hot or p.cold)):
            ev_flush_tail(c, tail, clock, linked)
            release_block(c, b)
            tail = c.pfx.ev_tail[1]
            clock = c.pfx.ev_clock
            linked = 0
            continue
        clock += 1
        p.stamp = clock
        p.ev_list = 1
        p.ev_prev = tail
        p.ev_next = -1
        if tail >= 0:
            pb[tail].ev_next = b
        else:
            c.pfx.ev_head[1] = b
        tail = b
        linked += 1
    ev_flush_tail(c, tail, clock, linked)


# --- external references -------------------------------------------------------------

cdef inline int incref_ids(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    """Add the references one id at a time; on the first bad id, take back those
    already added (so an id listed twice is checked against its own additions)."""
    cdef Py_ssize_t i
    cdef int32_t b, nb = c.num_blocks
    cdef int st = RF_OK
    cdef BlockRefs* cnt = c.refs.data()
    for i in range(n):
        b = ids[i]
        if b < 0 or b >= nb:
            err.id = b
            err.a = nb
            st = RF_BLOCK_NOT_FOUND
        elif cnt[b].rc == 0:
            err.id = b
            st = RF_BLOCK_FREE
        elif cnt[b].rc == INT32_MAX:
            err.id = b
            st = RF_REFCOUNT_OVERFLOW
        if st != RF_OK:
            while i > 0:
                i -= 1
                cnt[ids[i]].rc -= 1
                cnt[ids[i]].ext -= 1
            return st
        cnt[b].rc += 1
        cnt[b].ext += 1
    rf_share_bump(c)
    return RF_OK


cdef inline int decref_status(Core* c, int32_t b, ErrInfo* err) noexcept nogil:
    """The error for a decref of block b, which has no external reference left."""
    err.id = b
    if b < 0 or b >= c.num_blocks:
        err.a = c.num_blocks
        return RF_BLOCK_NOT_FOUND
    err.a = c.refs[b].rc
    return RF_BLOCK_FREE if c.refs[b].rc == 0 else RF_NO_EXTERNAL_REF


cdef inline int decref_plain(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    """decref with one shard and without prefix caching, in one pass: blocks
    reaching zero are freed with their bitmap word built up in a register (an
    engine's ids come in runs that share words) and the counters updated
    once. The first id without an external reference left undoes the pass."""
    cdef Py_ssize_t i, j
    cdef int32_t b, nb = c.num_blocks, freed = 0
    cdef int64_t word = -1
    cdef uint64_t acc = 0
    cdef BlockRefs* cnt = c.refs.data()
    cdef Shard* sh = c.shards
    for i in range(n):
        b = ids[i]
        # One unsigned compare checks both bounds (a negative id wraps high).
        if <uint32_t>b >= <uint32_t>nb or cnt[b].ext == 0:
            # Newest first, so an id named twice is re-taken once. (Bits still
            # in `acc` were never set: clearing them changes nothing.)
            for j in range(i - 1, -1, -1):
                cnt[ids[j]].ext += 1
                cnt[ids[j]].rc += 1
                if cnt[ids[j]].rc == 1:
                    fs_clear_from(&sh.free, 0, ids[j])
            return decref_status(c, b, err)
        cnt[b].ext -= 1
        cnt[b].rc -= 1
        if cnt[b].rc != 0:
            continue
        freed += 1
        if (b >> 6) != word:
            if word >= 0:
                fs_set_word(&sh.free, word, acc)
            word = b >> 6
            acc = 0
        acc |= (<uint64_t>1) << (b & 63)
    if word >= 0:
        fs_set_word(&sh.free, word, acc)
    sh.free.num_free.add(freed)
    sh.total_deallocations.add(freed)
    return RF_OK


cdef inline int decref_ids(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    """Drop one external reference per id, freeing blocks that reach zero;
    on the first id without one left, everything is given back."""
    cdef Py_ssize_t i
    cdef int32_t b, nb = c.num_blocks
    cdef BlockRefs* cnt = c.refs.data()
    if not c.prefix and c.nshards == 1:
        return decref_plain(c, ids, n, err)
    # Releases go block by block (policy lists, home shards): check every id first.
    for i in range(n):
        b = ids[i]
        if b < 0 or b >= nb or cnt[b].ext == 0:
            while i > 0:
                i -= 1
                cnt[ids[i]].ext += 1
            return decref_status(c, b, err)
        cnt[b].ext -= 1
    unref_run(c, ids, n)
    return RF_OK


# --- several shards --------------------------------------------------------------------

cdef inline bint all_home(Core* c, Shard* sh, const int32_t* ids, size_t n) noexcept nogil:
    """Whether every listed block (in range) is guarded by sh's lock: what an
    operation holding only that lock may change."""
    cdef size_t j
    cdef uint8_t k = <uint8_t>sh.index
    cdef int32_t b
    if c.nshards == 1:
        return True
    for j in range(n):
        b = ids[j]
        if <uint32_t>b < <uint32_t>c.num_blocks and c.home[b] != k:
            return False
    return True


cdef inline void move_free(Core* c, Shard* src, Shard* dst, int64_t k) noexcept nogil:
    """Move src's k lowest free blocks into dst's free set (every lock held)."""
    cdef int32_t b
    cdef int64_t j
    for j in range(k):
        b = fs_pop_lowest(&src.free)
        fs_set(&dst.free, b)
        c.home[b] = <uint8_t>dst.index
    src.free.num_free.add(-k)
    dst.free.num_free.add(k)
    c.shard_transfers.add(k)


cdef inline void steal_free(Core* c, Shard* sh, int64_t needed) noexcept nogil:
    """Give shard sh at least `needed` free blocks if the pool has them (every
    lock held): while it has fewer, the shard with the most free blocks (the
    lowest index on ties) gives half of them rounded up, or the shortfall if
    that is more, lowest ids first."""
    cdef int32_t s, donor
    cdef int64_t have, most, give, short
    while True:
        have = sh.free.num_free.get()
        if have >= needed:
            return
        donor = -1
        most = 0
        for s in range(c.nshards):
            if s != sh.index and c.shards[s].free.num_free.get() > most:
                most = c.shards[s].free.num_free.get()
                donor = s
        if donor < 0:
            return
        short = needed - have
        give = (most + 1) // 2
        if give < short:
            give = short if short < most else most
        move_free(c, &c.shards[donor], sh, give)
