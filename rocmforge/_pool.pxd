# cython: language_level=3
# The pool as a whole (every lock held): its size (grow, shrink), compaction,
# the free sets rebuilt from the refcounts, and what the manager's structures
# take in memory.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy
from libcpp.vector cimport vector

from rocmforge._state cimport (
    Core, Shard, BlockRefs, BlockScratch, PBlock, SeqRec, ErrInfo, rf_reserve, rf_reserve_exact, rf_resize, rf_push,
    rf_idmap_update, rf_idmap_bytes, rf_popcount64, RF_OK, RF_NO_MEMORY, RF_PENDING_COPIES, RF_BLOCK_IN_USE,
    RF_POOL_TOO_SMALL, _ceil_div)
from rocmforge._freeset cimport fs_size, fs_summarize, fs_words
from rocmforge._prefix cimport pfx_reserve, pfx_resize, uncache, unregister_tree, reserve_registrations


cdef inline bint occupied(Core* c, int32_t b) noexcept nogil:
    """In use or cached: in no free set."""
    return c.refs[b].rc != 0 or (c.prefix and c.pfx.pb[b].serial != 0)


cdef inline int32_t num_occupied(Core* c) noexcept nogil:
    """Blocks in use or cached: those in no shard's free set."""
    cdef int64_t n = c.num_blocks
    cdef int32_t s
    for s in range(c.nshards):
        n -= c.shards[s].free.num_free.get()
    return <int32_t>n


cdef inline int64_t pending_count(Core* c) noexcept nogil:
    """Copy-on-write copies queued and not yet taken, in every shard."""
    cdef int64_t n = 0
    cdef int32_t s
    for s in range(c.nshards):
        n += c.shards[s].pending.size() // 3
    return n


cdef inline void spread_free(Core* c, int32_t lo, int32_t hi) noexcept nogil:
    """Give the blocks [lo, hi) to the shards in equal contiguous ranges, the
    first shard the lowest (their bits are set by rebuild_free)."""
    cdef int32_t s, b, start, end
    cdef int64_t span = hi - lo
    if c.nshards == 1:
        return
    for s in range(c.nshards):
        start = <int32_t>(lo + span * s // c.nshards)
        end = <int32_t>(lo + span * (s + 1) // c.nshards)
        for b in range(start, end):
            c.home[b] = <uint8_t>s
    

cdef inline void rebuild_free(Core* c) noexcept nogil:
    """Recompute every shard's free set (bits, summaries, count) from the
    refcounts: a block is free in its home shard when it is not occupied.
    The bitmaps must be sized for num_blocks."""
    cdef int32_t b, s, n = c.num_blocks
    cdef int64_t i
    cdef Shard* x
    for s in range(c.nshards):
        x = &c.shards[s]
        for i in range(_ceil_div(n, 64)):
            x.free.bits[i] = 0
    for b in range(n):
        if not occupied(c, b):
            x = c.shards if c.nshards == 1 else &c.shards[c.home[b]]
            x.free.bits[b >> 6] |= (<uint64_t>1) << (b & 63)
    for s in range(c.nshards):
        x = &c.shards[s]
        fs_summarize(&x.free, n)
        i = 0
        for b in range(_ceil_div(n, 64)):
            i += rf_popcount64(x.free.bits[b])
        x.free.num_free.set(i)


cdef inline int resize_pool(Core* c, int32_t n) noexcept nogil:
    """Resize per-block state to n blocks (new ones free, spread over the
    shards) and rebuild the free sets. Blocks >= n must be free. Changes
    nothing visible when it fails."""
    cdef BlockScratch blank
    cdef BlockRefs none
    cdef int32_t s, old = c.num_blocks
    cdef uint8_t zero = 0
    cdef int64_t total = fs_words(n)
    blank.mark = 0
    blank.count = 0
    blank.dec = 0
    none.rc = 0
    none.ext = 0
    # Room for everything first (capacity only, nothing visible changes):
    # past this point nothing can fail.
    if (rf_reserve_exact(c.refs, n) or rf_reserve_exact(c.scratch, n)
            or (c.nshards > 1 and rf_reserve_exact(c.home, n))):
        return RF_NO_MEMORY
    for s in range(c.nshards):
        if rf_reserve(c.shards[s].free.bits, total):
            return RF_NO_MEMORY
    if c.prefix and pfx_reserve(c, n):
        return RF_NO_MEMORY
    for s in range(c.nshards):
        fs_size(&c.shards[s].free, n)
    rf_resize(c.refs, n, none)
    rf_resize(c.scratch, n, blank)
    if c.nshards > 1:
        rf_resize(c.home, n, zero)
    if c.prefix:
        pfx_resize(c, n)
    c.num_blocks = n
    if n > old:
        spread_free(c, old, n)
    rebuild_free(c)
    return RF_OK


cdef inline void move_block(Core* c, int32_t src, int32_t dst) noexcept nogil:
    """Relabel occupied block src as free block dst (refcounts, home and
    prefix-cache state, with every link that names src). Sequence tables are
    the caller's."""
    cdef PBlock* p
    cdef int32_t ch
    cdef int64_t bs = c.block_size
    cdef BlockRefs none
    none.rc = 0
    none.ext = 0
    c.refs[dst] = c.refs[src]
    c.refs[src] = none
    if c.nshards > 1:
        c.home[dst] = c.home[src]
    if not c.prefix or c.pfx.pb[src].serial == 0:
        return
    c.pfx.pb[dst] = c.pfx.pb[src]
    p = &c.pfx.pb[dst]
    rf_idmap_update(c.pfx.index, p.key, dst)
    if p.sib_prev >= 0:
        c.pfx.pb[p.sib_prev].sib_next = dst
    elif p.parent >= 0:
        c.pfx.pb[p.parent].child = dst
    if p.sib_next >= 0:
        c.pfx.pb[p.sib_next].sib_prev = dst
    ch = p.child
    while ch >= 0:
        c.pfx.pb[ch].parent = dst
        ch = c.pfx.pb[ch].sib_next
    if p.ev_list:
        if p.ev_prev >= 0:
            c.pfx.pb[p.ev_prev].ev_next = dst
        else:
            c.pfx.ev_head[p.ev_list] = dst
        if p.ev_next >= 0:
            c.pfx.pb[p.ev_next].ev_prev = dst
        else:
            c.pfx.ev_tail[p.ev_list] = dst
    memcpy(&c.pfx.btok[<size_t>dst * bs], &c.pfx.btok[<size_t>src * bs], bs * sizeof(int32_t))
    p = &c.pfx.pb[src]
    uncache(p)
    p.ev_prev = -1
    p.ev_next = -1
    p.ev_list = 0


cdef inline int compact_pool(Core* c, vector[int32_t]* moves, ErrInfo* err) noexcept nogil:
    """Move the highest occupied block to the lowest free id, again and again,
    until the occupied blocks fill the lowest ids; rewrite every table. The
    free blocks then go back to the shards in equal contiguous ranges. No copy
    may be pending (compact_into checks)."""
    cdef int32_t lo = 0, hi = c.num_blocks - 1, s, slot, used = num_occupied(c), nfree = c.num_blocks - used
    cdef vector[int32_t] remap
    cdef int32_t neg = -1
    cdef size_t j
    cdef SeqRec* r
    cdef Shard* x
    if rf_reserve(moves[0], 2 * <size_t>(used if used < nfree else nfree)):
        return RF_NO_MEMORY
    if rf_resize(remap, c.num_blocks, neg):
        return RF_NO_MEMORY
    while True:
        while lo < c.num_blocks and occupied(c, lo):
            lo += 1
        while hi >= 0 and not occupied(c, hi):
            hi -= 1
        if lo >= hi:
            break
        rf_push(moves[0], hi)
        rf_push(moves[0], lo)
        remap[hi] = lo
        move_block(c, hi, lo)
    if moves.size():
        for s in range(c.nshards):
            x = &c.shards[s]
            for slot in range(<int32_t>x.seqs.size()):
                r = &x.seqs[slot]
                for j in range(r.blocks.size()):
                    if remap[r.blocks[j]] >= 0:
                        r.blocks.set(j, remap[r.blocks[j]])
        spread_free(c, used, c.num_blocks)
        rebuild_free(c)
    c.compaction_count.add(1)
    return RF_OK


cdef inline int shrink_pool(Core* c, Shard* dest, int32_t n, ErrInfo* err) noexcept nogil:
    """Cut the pool to n blocks; blocks past n must be free or evictable
    (cached ones leave the cache with their descendants, freed into dest)."""
    cdef int32_t b
    err.a = pending_count(c)
    if err.a:
        return RF_PENDING_COPIES
    for b in range(n, c.num_blocks):
        if c.refs[b].rc != 0:
            err.id = b
            return RF_BLOCK_IN_USE
    if reserve_registrations(c, 0):
        return RF_NO_MEMORY
    if c.prefix:
        for b in range(n, c.num_blocks):
            if c.pfx.pb[b].serial != 0:
                unregister_tree(c, dest, b, False)    # their storage goes: nothing to keep
    return resize_pool(c, n)


cdef inline int compact_into(Core* c, Shard* dest, int32_t n, vector[int32_t]* moves,
                             ErrInfo* err) noexcept nogil:
    """compact_pool, then (0 <= n < num_blocks) cut the pool to n blocks; all or nothing.
    Everything that can fail is checked or reserved before the first move:
    after compaction the blocks past n are free and uncached, and cutting the
    pool shrinks arrays, which cannot fail."""
    cdef int32_t occ = num_occupied(c)
    cdef int st
    err.a = pending_count(c)
    if err.a:
        return RF_PENDING_COPIES
    if n >= 0:
        if occ > n:
            err.a = occ
            err.b = n
            return RF_POOL_TOO_SMALL
        if reserve_registrations(c, 0):
            return RF_NO_MEMORY
    st = compact_pool(c, moves, err)
    if st != RF_OK or n < 0 or n >= c.num_blocks:
        return st
    return shrink_pool(c, dest, n, err)

