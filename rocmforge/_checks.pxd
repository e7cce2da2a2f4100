# cython: language_level=3
# check_invariants (every lock held): recompute every derived quantity of the
# manager and compare. Each function returns 0 when consistent, else 1 with
# a message in msg.

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdio cimport snprintf
from libcpp.vector cimport vector

from rocmforge._state cimport (
    Core, Shard, SeqRec, PBlock, FreeSet, HostTier, rf_resize, rf_room, rf_sole_gen, rf_share_gen, rf_ctz64,
    rf_idmap_find, rf_block_key, POLICY_ARC, NO_SLOT, RF_DIR_STRIPES, _ceil_div)
from rocmforge._seqs cimport seq_find, dir_find
from rocmforge._pool cimport occupied


cdef inline int check_records(Core* c, Shard* x, vector[int32_t]* refs, vector[int32_t]* fills,
                              char* msg, size_t cap) noexcept nogil:
    """Shard x's records: index, directory, tables, tokens, LRU list; counts the
    table references of every block into refs."""
    cdef int64_t n = c.num_blocks, bs = c.block_size, fill, live = 0, lru_len = 0
    cdef int32_t b, slot, prev
    cdef size_t j
    cdef SeqRec* s
    for slot in range(<int32_t>x.seqs.size()):
        s = &x.seqs[slot]
        if not s.live:
            if s.seq_id != -1:
                snprintf(msg, cap, "free record slot %d still names sequence %lld", slot, <long long>s.seq_id)
                return 1
            continue
        live += 1
        if seq_find(x, s.seq_id) != slot:
            snprintf(msg, cap, "sequence %lld: index does not point at its record", <long long>s.seq_id)
            return 1
        if c.nshards > 1 and dir_find(c, s.seq_id) != x.index:
            snprintf(msg, cap, "sequence %lld: the directory does not name its shard %d",
                     <long long>s.seq_id, x.index)
            return 1
        if <int64_t>s.blocks.size() != _ceil_div(s.num_tokens, bs):
            snprintf(msg, cap, "sequence %lld: %lld tokens in %lld blocks of %lld", <long long>s.seq_id,
                     <long long>s.num_tokens, <long long>s.blocks.size(), <long long>bs)
            return 1
        if s.has_tokens and <int64_t>s.tokens.size() != s.num_tokens:
            snprintf(msg, cap, "sequence %lld: %lld token ids for %lld tokens", <long long>s.seq_id,
                     <long long>s.tokens.size(), <long long>s.num_tokens)
            return 1
        if s.blocks.back() != (s.blocks[s.blocks.size() - 1] if s.blocks.size() else -1):
            snprintf(msg, cap, "sequence %lld: table's copy of its last block is stale", <long long>s.seq_id)
            return 1
        if s.has_tokens and s.sole_gen == rf_share_gen(c):
            snprintf(msg, cap, "sequence %lld keeps token ids but its sole_gen lacks the token bit",
                     <long long>s.seq_id)
            return 1
        if (rf_room(s, bs) != 0 and s.sole_gen == rf_sole_gen(s, rf_share_gen(c))
                and c.refs[s.blocks.back()].rc != 1):
            snprintf(msg, cap, "sequence %lld: marked sole holder of block %d, refcount %d",
                     <long long>s.seq_id, s.blocks.back(), c.refs[s.blocks.back()].rc)
            return 1
        for j in range(s.blocks.size()):
            b = s.blocks[j]
            if b < 0 or b >= n:
                snprintf(msg, cap, "sequence %lld holds block %d outside the pool", <long long>s.seq_id, b)
                return 1
            refs[0][b] += 1
            fill = s.num_tokens - <int64_t>j * bs
            fill = bs if fill > bs else fill
            if fills[0][b] < 0:
                fills[0][b] = <int32_t>fill
            elif fills[0][b] != fill:
                snprintf(msg, cap, "block %d is shared with different fill levels (%d and %lld)",
                         b, fills[0][b], <long long>fill)
                return 1
    if live != <int64_t>x.ids.count or live != x.num_seqs.get():
        snprintf(msg, cap, "shard %d: %lld live sequences, %lld index entries, count %lld", x.index,
                 <long long>live, <long long>x.ids.count, <long long>x.num_seqs.get())
        return 1
    prev = NO_SLOT
    slot = x.lru_head
    while slot != NO_SLOT:
        s = &x.seqs[slot]
        if not s.live or s.lru_prev != prev:
            snprintf(msg, cap, "shard %d: LRU list broken at slot %d", x.index, slot)
            return 1
        lru_len += 1
        if lru_len > live:
            snprintf(msg, cap, "shard %d: LRU list longer than its %lld sequences", x.index, <long long>live)
            return 1
        prev = slot
        slot = s.lru_next
    if prev != x.lru_tail or lru_len != live:
        snprintf(msg, cap, "shard %d: LRU list holds %lld of %lld sequences", x.index, <long long>lru_len,
                 <long long>live)
        return 1
    return 0


cdef inline int check_free_set(Core* c, Shard* x, char* msg, size_t cap) noexcept nogil:
    """Shard x's free set holds exactly the unoccupied blocks homed there, with
    true summaries, count and lowest-word hint."""
    cdef FreeSet* f = &x.free
    cdef int64_t n = c.num_blocks, i, words, count = 0
    cdef int L
    cdef uint64_t bit, w
    cdef bint mine
    for i in range(n):
        bit = (f.bits[i >> 6] >> (i & 63)) & 1
        mine = c.nshards == 1 or c.home[i] == x.index
        if bit != (mine and not occupied(c, <int32_t>i)):
            snprintf(msg, cap, "block %lld: free bit %d in shard %d, refcount %d", <long long>i, <int>bit,
                     x.index, c.refs[i].rc)
            return 1
        count += bit
    if count != f.num_free.get():
        snprintf(msg, cap, "shard %d: free set holds %lld blocks, counter says %lld", x.index,
                 <long long>count, <long long>f.num_free.get())
        return 1
    words = _ceil_div(n, 64)
    for L in range(1, f.levels):
        for i in range(_ceil_div(words, 64) * 64):
            w = f.bits[f.level_off[L - 1] + i] if i < words else 0
            bit = (f.bits[f.level_off[L] + (i >> 6)] >> (i & 63)) & 1
            if bit != (w != 0):
                snprintf(msg, cap, "shard %d: free bitmap summary level %d wrong at word %lld", x.index, L,
                         <long long>i)
                return 1
        words = _ceil_div(words, 64)
    if n % 64 and (f.bits[n >> 6] >> (n & 63)) != 0:
        snprintf(msg, cap, "shard %d: free bitmap has bits set beyond num_blocks", x.index)
        return 1
    for i in range(f.low_word):
        if f.bits[i] != 0:
            snprintf(msg, cap, "shard %d: free block %lld lies below the lowest-word hint %lld", x.index,
                     <long long>(i * 64 + rf_ctz64(f.bits[i])), <long long>f.low_word)
            return 1
    return 0


cdef inline int check_pool(Core* c, char* msg, size_t cap) noexcept nogil:
    """Refcounts against the tables, free sets, counters, queued copies."""
    cdef int64_t n = c.num_blocks, i, held, dir_entries = 0, live = 0
    cdef int32_t s, zero = 0, neg = -1
    cdef size_t j
    cdef vector[int32_t] refs, fills
    cdef vector[int64_t] in_use
    cdef int64_t z64 = 0
    cdef Shard* x
    if <int64_t>c.refs.size() != n or <int64_t>c.scratch.size() != n or (
            c.nshards > 1 and <int64_t>c.home.size() != n):
        snprintf(msg, cap, "per-block arrays do not have num_blocks=%lld entries", <long long>n)
        return 1
    if rf_resize(refs, n, zero) or rf_resize(fills, n, neg) or rf_resize(in_use, c.nshards, z64):
        snprintf(msg, cap, "out of memory while checking invariants")
        return 1
    for s in range(c.nshards):
        if check_records(c, &c.shards[s], &refs, &fills, msg, cap):
            return 1
        live += c.shards[s].num_seqs.get()
    if c.nshards > 1:
        for s in range(RF_DIR_STRIPES):
            dir_entries += c.dir[s].map.count
        if dir_entries != live:
            snprintf(msg, cap, "%lld live sequences but %lld directory entries", <long long>live,
                     <long long>dir_entries)
            return 1
    for i in range(n):
        if c.refs[i].ext < 0 or c.refs[i].rc != refs[i] + c.refs[i].ext:
            snprintf(msg, cap, "block %lld: refcount %d != %d table refs + %d external refs", <long long>i,
                     c.refs[i].rc, refs[i], c.refs[i].ext)
            return 1
        if c.refs[i].rc != 0:
            in_use[0 if c.nshards == 1 else c.home[i]] += 1
    for s in range(c.nshards):
        x = &c.shards[s]
        if check_free_set(c, x, msg, cap):
            return 1
        held = x.total_allocations.get() - x.total_deallocations.get()
        if held != in_use[s]:
            snprintf(msg, cap, "shard %d: allocations minus deallocations (%lld) != its blocks in use (%lld)",
                     s, <long long>held, <long long>in_use[s])
            return 1
        if x.peak_allocations.get() < held:
            snprintf(msg, cap, "shard %d: peak allocations below current use", s)
            return 1
        for j in range(0, x.pending.size(), 3):
            if check_transfer(c, x.pending[j + 1], x.pending[j + 2], msg, cap):
                return 1
    if not c.prefix and c.pfx.num_evictable.get() != 0:
        snprintf(msg, cap, "%lld evictable blocks without prefix caching", <long long>c.pfx.num_evictable.get())
        return 1
    return 0


cdef inline int check_prefix(Core* c, char* msg, size_t cap) noexcept nogil:
    """The prefix index, the child lists, the policy lists and every key."""
    cdef int64_t n = c.num_blocks, bs = c.block_size, i, j, registered = 0, linked = 0
    cdef int64_t nfull, key, parent_key, seen
    cdef int32_t b, ch, prev, s
    cdef int lst
    cdef PBlock* p
    cdef SeqRec* r
    cdef Shard* x
    for i in range(n):
        p = &c.pfx.pb[i]
        if p.serial == 0:
            if p.ev_list or p.child >= 0 or p.parent >= 0:
                snprintf(msg, cap, "block %lld: not cached but linked in the prefix cache", <long long>i)
                return 1
            continue
        registered += 1
        if rf_idmap_find(c.pfx.index, p.key) != i:
            snprintf(msg, cap, "block %lld: prefix index does not map its key to it", <long long>i)
            return 1
        if (p.ev_list != 0) != (c.refs[i].rc == 0):
            snprintf(msg, cap, "block %lld: cached with refcount %d but evictable=%d", <long long>i,
                     c.refs[i].rc, <int>p.ev_list)
            return 1
        if p.ev_list >= 2 and c.policy != POLICY_ARC:
            snprintf(msg, cap, "block %lld in list %d under the LRU policy", <long long>i, <int>p.ev_list)
            return 1
        parent_key = -1
        if p.parent >= 0:
            if c.pfx.pb[p.parent].serial == 0:
                snprintf(msg, cap, "block %lld: cached but its parent %d is not", <long long>i, p.parent)
                return 1
            parent_key = c.pfx.pb[p.parent].key
        key = rf_block_key(parent_key, p.salt, &c.pfx.btok[i * bs], bs, c.key_mask)
        if key != p.key:
            snprintf(msg, cap, "block %lld: key does not match its tokens and parent", <long long>i)
            return 1
        ch = p.child
        prev = -1
        while ch >= 0:
            if c.pfx.pb[ch].parent != i or c.pfx.pb[ch].sib_prev != prev or linked > n:
                snprintf(msg, cap, "block %lld: child list broken at %d", <long long>i, ch)
                return 1
            linked += 1
            prev = ch
            ch = c.pfx.pb[ch].sib_next
        if p.parent < 0:
            linked += 1
    if registered != <int64_t>c.pfx.index.count or linked != registered:
        snprintf(msg, cap, "%lld cached blocks, %lld index entries, %lld in the tree", <long long>registered,
                 <long long>c.pfx.index.count, <long long>linked)
        return 1
    seen = 0
    for lst in range(1, 4):
        prev = -1
        b = c.pfx.ev_head[lst]
        i = 0
        while b >= 0:
            if c.pfx.pb[b].ev_list != lst or c.pfx.pb[b].ev_prev != prev or i > n:
                snprintf(msg, cap, "policy list %d broken at block %d", lst, b)
                return 1
            # Lists 1 and 2 only gain blocks at their newest end, stamped in order.
            if (c.pfx.pb[b].stamp == 0 or c.pfx.pb[b].stamp > c.pfx.ev_clock
                    or (lst < 3 and prev >= 0 and c.pfx.pb[b].stamp <= c.pfx.pb[prev].stamp)):
                snprintf(msg, cap, "policy list %d: block %d stamped out of order", lst, b)
                return 1
            i += 1
            prev = b
            b = c.pfx.pb[b].ev_next
        if prev != c.pfx.ev_tail[lst] or i != c.pfx.ev_len[lst]:
            snprintf(msg, cap, "policy list %d holds %lld blocks, length says %d", lst, <long long>i,
                     c.pfx.ev_len[lst])
            return 1
        seen += i
    if seen != c.pfx.num_evictable.get():
        snprintf(msg, cap, "%lld blocks in policy lists, counter says %lld", <long long>seen,
                 <long long>c.pfx.num_evictable.get())
        return 1
    for s in range(c.nshards):
        x = &c.shards[s]
        for i in range(<int64_t>x.seqs.size()):
            r = &x.seqs[i]
            if not r.live or not r.has_tokens:
                continue
            nfull = r.num_tokens // bs
            if <int64_t>r.keys.size() != nfull:
                snprintf(msg, cap, "sequence %lld: %lld keys for %lld full blocks", <long long>r.seq_id,
                         <long long>r.keys.size(), <long long>nfull)
                return 1
            parent_key = -1
            for j in range(nfull):
                key = rf_block_key(parent_key, r.salt, &r.tokens[j * bs], bs, c.key_mask)
                b = r.blocks[j]
                if key != r.keys[j] or (c.pfx.pb[b].serial != 0 and c.pfx.pb[b].key != key):
                    snprintf(msg, cap, "sequence %lld: key of block %lld is wrong", <long long>r.seq_id,
                             <long long>j)
                    return 1
                parent_key = key
    return 0


cdef inline int check_transfer(Core* c, int64_t src, int64_t dst, char* msg, size_t cap) noexcept nogil:
    """A queued copy: blocks of the pool, or one block and one host slot (-1 - slot)."""
    cdef int64_t n = c.num_blocks, slots = c.pfx.host.capacity
    cdef bint src_ok = (0 <= src < n) or (-slots <= src < 0 and 0 <= dst < n)
    cdef bint dst_ok = (0 <= dst < n) or (-slots <= dst < 0 and 0 <= src < n)
    if not (src_ok and dst_ok):
        snprintf(msg, cap, "pending copy (%lld, %lld) names a block outside the pool or a host slot outside "
                 "the tier", <long long>src, <long long>dst)
        return 1
    return 0


cdef inline int check_host(Core* c, char* msg, size_t cap) noexcept nogil:
    """The host tier: its lists hold each used slot once (list 2 only under ARC),
    its index maps each slot's key to it, and every key is the key of its
    slot's content."""
    cdef HostTier* h = &c.pfx.host
    cdef int32_t s, prev, seen = 0, n
    cdef int64_t bs = c.block_size
    cdef int lst
    if h.used != <int32_t>h.index.count or h.used + <int32_t>h.free_slots.size() != h.capacity:
        snprintf(msg, cap, "host tier: %d used, %lld indexed, %lld free of %d slots", h.used,
                 <long long>h.index.count, <long long>h.free_slots.size(), h.capacity)
        return 1
    if h.policy != POLICY_ARC and h.len[2] != 0:
        snprintf(msg, cap, "host tier: LRU with %d slots in list 2", h.len[2])
        return 1
    for lst in range(1, 3):
        s, prev, n = h.head[lst], -1, 0
        while s >= 0:
            if n >= h.used or h.prev[s] != prev or h.key[s] < 0 or h.lst[s] != lst:
                snprintf(msg, cap, "host tier: list %d broken at slot %d", lst, s)
                return 1
            if rf_idmap_find(h.index, h.key[s]) != s:
                snprintf(msg, cap, "host tier: slot %d's key is not indexed to it", s)
                return 1
            if h.key[s] != rf_block_key(h.parent_key[s], h.salt[s], &h.tok[<size_t>s * bs], bs, c.key_mask):
                snprintf(msg, cap, "host tier: slot %d's key is not the key of its tokens", s)
                return 1
            prev = s
            s = h.next[s]
            n += 1
        if n != h.len[lst] or h.tail[lst] != prev:
            snprintf(msg, cap, "host tier: list %d holds %d slots, counted %d", lst, n, h.len[lst])
            return 1
        seen += n
    if seen != h.used:
        snprintf(msg, cap, "host tier: its lists hold %d of %d used slots", seen, h.used)
        return 1
    for s in h.free_slots:
        if h.key[s] != -1 or h.lst[s] != 0:
            snprintf(msg, cap, "host tier: free slot %d holds a key", s)
            return 1
    return 0


cdef inline int check_all(Core* c, char* msg, size_t cap) noexcept nogil:
    if check_pool(c, msg, cap):
        return 1
    if c.prefix and check_prefix(c, msg, cap):
        return 1
    return check_host(c, msg, cap)
