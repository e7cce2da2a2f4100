# cython: language_level=3
# The prefix index shared by every shard: content keys -> blocks, each hit
# verified against a copy of the cached tokens; the tree of cached blocks
# (evicting a block drops its descendants); the eviction policies' lists
# (LRU, and ARC with its ghost keys); KV events. With several shards its
# state is guarded by PrefixState.lock; with one, by the shard's lock.
#
# Blocks this code frees (evictable descendants of a dropped block) join the
# free set of the shard `dest` running the operation.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t, INT32_MAX
from libc.string cimport memcpy
from libcpp.vector cimport vector

from rocmforge._state cimport (
    Core, Shard, SeqRec, PBlock, KvEvent, PrefixState, BlockRefs, push_event, ghost_remember,
    rf_reserve, rf_reserve_exact, rf_resize, rf_push, rf_prefetch, rf_idmap_find, rf_idmap_reserve, rf_idmap_put,
    rf_idmap_erase, rf_idmap_clear, rf_idmap_prefetch, rf_block_key, rf_tokens_equal,
    ErrInfo, RF_OK, RF_NO_MEMORY, RF_BLOCK_NOT_FOUND, POLICY_ARC, EV_STORED, EV_REMOVED, EV_CLEARED, GHOSTS_PER_BLOCK)
from rocmforge._freeset cimport fs_set
from rocmforge._host_tier cimport ht_offload, ht_clear


cdef inline void uncache(PBlock* p) noexcept nogil:
    """Forget a block's prefix-cache identity and tree links (policy links are the caller's)."""
    p.serial = 0
    p.parent = -1
    p.child = -1
    p.sib_prev = -1
    p.sib_next = -1
    p.hot = 0
    p.cold = 0


cdef inline void set_home(Core* c, int32_t b, Shard* sh) noexcept nogil:
    """With several shards, b is now guarded by (and returns to) shard sh."""
    if c.nshards > 1:
        c.home[b] = <uint8_t>sh.index


cdef inline int pfx_reserve(Core* c, int32_t n) noexcept nogil:
    """Room for the prefix cache's per-block state and ghost lists of n blocks
    (capacity only: nothing visible changes), so that pfx_resize(c, n) cannot fail."""
    cdef PrefixState* p = &c.pfx
    cdef int lst
    cdef size_t cap = <size_t>n * GHOSTS_PER_BLOCK
    if (rf_reserve_exact(p.pb, n) or rf_reserve_exact(p.btok, <size_t>n * <size_t>c.block_size)
            or rf_reserve(p.tmp_stack, n) or rf_idmap_reserve(p.index, n)):
        return RF_NO_MEMORY
    for lst in range(1, 3):
        if rf_reserve_exact(p.ghost_ring[lst], cap) or rf_idmap_reserve(p.ghost[lst], cap):
            return RF_NO_MEMORY
    return RF_OK


cdef inline void pfx_resize(Core* c, int32_t n) noexcept nogil:
    """Size the prefix cache's per-block state and ghost lists for n blocks,
    within the room pfx_reserve(c, n) made. Ghost lists are rebuilt empty (they
    only tune ARC's target)."""
    cdef PrefixState* p = &c.pfx
    cdef PBlock blank
    cdef int lst
    cdef int32_t zero = 0
    cdef int64_t i, cap = <int64_t>n * GHOSTS_PER_BLOCK
    blank.key = 0
    blank.salt = 0
    blank.stamp = 0
    blank.ev_prev = -1
    blank.ev_next = -1
    blank.ev_list = 0
    uncache(&blank)
    rf_resize(p.pb, n, blank)
    rf_resize(p.btok, <size_t>n * <size_t>c.block_size, zero)
    for lst in range(1, 3):
        rf_resize(p.ghost_ring[lst], cap, <int64_t>-1)
        rf_idmap_clear(p.ghost[lst])
        for i in range(cap):
            p.ghost_ring[lst][i] = -1
        p.ghost_pos[lst] = 0
    if p.arc_p > n:
        p.arc_p = n


# --- policy lists ----------------------------------------------------------------

cdef inline void ev_link_after(PrefixState* p, int32_t b, int lst, int32_t anchor) noexcept nogil:
    """Insert an evictable block into list lst after anchor (at the front when -1,
    as the newest entry when anchor is the list's tail)."""
    cdef PBlock* q = &p.pb[b]
    cdef int32_t nxt = p.ev_head[lst] if anchor < 0 else p.pb[anchor].ev_next
    p.ev_clock += 1
    q.stamp = p.ev_clock
    q.ev_list = <uint8_t>lst
    q.ev_prev = anchor
    q.ev_next = nxt
    if anchor >= 0:
        p.pb[anchor].ev_next = b
    else:
        p.ev_head[lst] = b
    if nxt >= 0:
        p.pb[nxt].ev_prev = b
    else:
        p.ev_tail[lst] = b
    p.ev_len[lst] += 1
    p.num_evictable.add(1)


cdef inline void ev_unlink(PrefixState* p, int32_t b) noexcept nogil:
    ev_unlink_uncounted(p, b)
    p.num_evictable.add(-1)


cdef inline void ev_unlink_uncounted(PrefixState* p, int32_t b) noexcept nogil:
    """Unlink b from its policy list; num_evictable is the caller's."""
    cdef PBlock* q = &p.pb[b]
    cdef int lst = q.ev_list
    if q.ev_prev >= 0:
        p.pb[q.ev_prev].ev_next = q.ev_next
    else:
        p.ev_head[lst] = q.ev_next
    if q.ev_next >= 0:
        p.pb[q.ev_next].ev_prev = q.ev_prev
    else:
        p.ev_tail[lst] = q.ev_prev
    q.ev_prev = -1
    q.ev_next = -1
    q.ev_list = 0
    p.ev_len[lst] -= 1


cdef inline bint arc_calm(PrefixState* p) noexcept nogil:
    """Recent ghost hits below a tenth of the real hits."""
    return p.arc_ghost_hits < 0.1 * p.arc_hits


cdef inline bint arc_thrashing(PrefixState* p) noexcept nogil:
    """Recent ghost hits at least half the real hits: reuse distances exceed what
    the cache holds."""
    return p.arc_ghost_hits > 0 and p.arc_ghost_hits >= 0.5 * p.arc_hits


cdef inline void release_cached(Core* c, int32_t b) noexcept nogil:
    """Put a cached block whose refcount reached zero into its policy list."""
    cdef PrefixState* p = &c.pfx
    cdef PBlock* q = &p.pb[b]
    if c.policy != POLICY_ARC or not (q.hot or q.cold):
        ev_link_after(p, b, 1, p.ev_tail[1])
    elif q.hot:
        ev_link_after(p, b, 2, p.ev_tail[2])
    else:
        # Cold blocks of one release line up tail first at the front of
        # list 3, ahead of those released earlier: the newest go first.
        ev_link_after(p, b, 3, p.cold_anchor)
        p.cold_anchor = b


cdef inline void ghost_add(PrefixState* p, int lst, int64_t key) noexcept nogil:
    """Remember an evicted key in ghost list lst, forgetting its oldest entry."""
    ghost_remember(p.ghost[lst], p.ghost_ring[lst], &p.ghost_pos[lst], key)


cdef inline int32_t ev_victim(Core* c) noexcept nogil:
    """Unlink and return the evictable block the policy gives up (one must exist)."""
    cdef PrefixState* p = &c.pfx
    cdef int lst = 1
    cdef int32_t b, once = p.ev_len[1] + p.ev_len[3]
    if c.policy == POLICY_ARC:
        if once == 0:
            lst = 2
        elif p.ev_len[2] == 0:
            lst = 3 if p.ev_len[3] > 0 else 1
        elif arc_calm(p):
            # Evicted keys rarely come back: the cache holds nearly every reuse
            # and the lists' split would only misorder. Plain recency decides.
            if p.ev_len[3] > 0:
                lst = 3
            elif p.pb[p.ev_head[2]].stamp < p.pb[p.ev_head[1]].stamp:
                lst = 2
        elif once <= p.arc_p:
            lst = 2
        elif p.ev_len[3] > 0:
            lst = 3
    b = p.ev_head[lst]
    ev_unlink(p, b)
    if c.policy == POLICY_ARC:
        ghost_add(p, 2 if lst == 2 else 1, p.pb[b].key)
    return b


cdef inline void ghost_check(Core* c, int32_t b) noexcept nogil:
    """ARC: a block being cached under a key evicted recently was evicted too
    early. Grow the target of the list it left and treat the block as reused."""
    cdef PrefixState* p = &c.pfx
    cdef int64_t key = p.pb[b].key
    cdef double n1 = p.ghost[1].count, n2 = p.ghost[2].count, step
    cdef double decay = 1.0 - 1.0 / <double>c.num_blocks
    # Hit and ghost-hit counts fade over about one cache's worth of new blocks.
    p.arc_hits *= decay
    p.arc_ghost_hits *= decay
    if rf_idmap_find(p.ghost[1], key) >= 0:
        p.arc_ghost_hits += 1
        step = n2 / n1 if n2 > n1 else 1.0
        p.arc_p = min(<double>c.num_blocks, p.arc_p + step)
        rf_idmap_erase(p.ghost[1], key)
        p.pb[b].hot = 1
    elif rf_idmap_find(p.ghost[2], key) >= 0:
        p.arc_ghost_hits += 1
        step = n1 / n2 if n1 > n2 else 1.0
        p.arc_p = max(0.0, p.arc_p - step)
        rf_idmap_erase(p.ghost[2], key)
        p.pb[b].hot = 1


# --- hits ----------------------------------------------------------------------------

cdef inline int64_t take_cached(Core* c, Shard* sh, const int32_t* ids, int64_t n,
                                bint external) noexcept nogil:
    """Add a reference to each of n cached blocks (a verified prefix), taking the
    evictable ones out of their policy lists into shard sh; they count as
    reused. Stops before a block whose refcount cannot grow; returns how many
    it took."""
    cdef int32_t b, r
    cdef int64_t j, revived = 0
    cdef BlockRefs* refs = c.refs.data()
    cdef PrefixState* p = &c.pfx
    cdef bint many = c.nshards > 1
    for j in range(n):
        b = ids[j]
        r = refs[b].rc
        if r == INT32_MAX:
            n = j
            break
        if r == 0:
            ev_unlink_uncounted(p, b)
            if many:
                c.home[b] = <uint8_t>sh.index
            revived += 1
        refs[b].rc = r + 1
        if external:
            refs[b].ext += 1
        p.pb[b].hot = 1
    p.num_evictable.add(-revived)
    sh.total_allocations.add(revived)
    p.arc_hits += <double>n
    return n


cdef inline bint foreign_hit(Core* c, Shard* sh, const int32_t* ids, int64_t n) noexcept nogil:
    """Whether a hit among ids is in use and guarded by another shard than sh
    (taking it changes a refcount sh's lock does not guard)."""
    cdef int64_t j
    for j in range(n):
        if c.pfx.pb[ids[j]].ev_list == 0 and c.home[ids[j]] != sh.index:
            return True
    return False


cdef inline int64_t match_prefix(Core* c, const int32_t* tokens, const int64_t* keys, int64_t nfull,
                                 int64_t salt, int32_t* hits) noexcept nogil:
    """Leading blocks found in the index, each verified: same parent block (same
    salt for the first) and the same token ids. Writes them to hits (room for
    nfull) and returns how many."""
    cdef PrefixState* p = &c.pfx
    cdef int64_t j, found = nfull, bs = c.block_size
    cdef int32_t b, prev = -1
    cdef PBlock* q
    # Pass 1 finds every candidate (the keys are all known, so the index
    # loads overlap) and starts loading their state; pass 2 verifies.
    for j in range(min(nfull, 8)):
        rf_idmap_prefetch(p.index, keys[j])
    for j in range(nfull):
        if j + 8 < nfull:
            rf_idmap_prefetch(p.index, keys[j + 8])
        b = rf_idmap_find(p.index, keys[j])
        if b < 0:
            found = j
            break
        hits[j] = b
        rf_prefetch(&p.pb[b])
        rf_prefetch(&p.btok[<size_t>b * bs])
    for j in range(found):
        b = hits[j]
        q = &p.pb[b]
        if q.parent != prev or (prev < 0 and q.salt != salt):
            return j
        if not rf_tokens_equal(&p.btok[<size_t>b * bs], tokens + j * bs, bs):
            return j
        prev = b
    return found


cdef inline int64_t* hash_prompt(Core* c, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                                 int64_t* stack_keys, int64_t stack_cap,
                                 vector[int64_t]* heap_keys) noexcept nogil:
    """Keys of the full blocks of a prompt (a pure function of the tokens, so no
    lock): into stack_keys when stack_cap suffice, else heap_keys. NULL when
    memory is exhausted."""
    cdef int64_t j, bs = c.block_size, nfull = num_tokens // bs, parent = -1
    cdef int64_t* keys = stack_keys
    if nfull > stack_cap:
        if rf_resize(heap_keys[0], nfull, parent):
            return NULL
        keys = heap_keys.data()
    for j in range(nfull):
        parent = rf_block_key(parent, salt, tokens + j * bs, bs, c.key_mask)
        keys[j] = parent
    return keys


# --- registration --------------------------------------------------------------------

cdef inline void event(Core* c, int32_t kind, int64_t key, int64_t parent_key, int32_t ntok) noexcept nogil:
    push_event(c, kind, key, parent_key, ntok, 0)


cdef inline int reserve_registrations(Core* c, int64_t n) noexcept nogil:
    """Room for n new index entries and for every event an operation may emit
    (n stores and, with a host tier, n reloads leaving it; one removal per
    indexed block and, with a host tier, a store there and a removal from
    there for each; a clear), so applying cannot fail."""
    cdef PrefixState* p = &c.pfx
    if not c.prefix:
        return RF_OK
    if rf_idmap_reserve(p.index, p.index.count + n):
        return RF_NO_MEMORY
    if c.events and rf_reserve(p.events, p.events.size() + 2 * n + 3 * p.index.count + 1):
        return RF_NO_MEMORY
    return RF_OK


cdef inline void unregister_tree(Core* c, Shard* dest, int32_t b, bint offload) noexcept nogil:
    """Drop b and all its cached descendants from the index (none of them could be
    reached once b is gone). Evictable ones become free in shard dest (and,
    with offload and a host tier, are kept there); blocks in use stay
    allocated, uncached. b itself becomes free only if it was still evictable."""
    cdef PrefixState* p = &c.pfx
    cdef PBlock* q = &p.pb[b]
    cdef int32_t x, ch
    if q.sib_prev >= 0:
        p.pb[q.sib_prev].sib_next = q.sib_next
    elif q.parent >= 0:
        p.pb[q.parent].child = q.sib_next
    if q.sib_next >= 0:
        p.pb[q.sib_next].sib_prev = q.sib_prev
    p.tmp_stack.clear()
    rf_push(p.tmp_stack, b)     # capacity num_blocks: each block is pushed once
    while p.tmp_stack.size():
        x = p.tmp_stack.back()
        p.tmp_stack.pop_back()
        q = &p.pb[x]
        ch = q.child
        while ch >= 0:
            rf_push(p.tmp_stack, ch)
            ch = p.pb[ch].sib_next
        rf_idmap_erase(p.index, q.key)
        event(c, EV_REMOVED, q.key, -1, 0)
        p.blocks_evicted.add(1)
        # A victim (b, taken off its list already) and evictable descendants were
        # released, so their K/V is complete: the host tier keeps them.
        if offload and (q.ev_list or x == b) and p.host.capacity:
            ht_offload(c, dest, q.key, p.pb[q.parent].key if q.parent >= 0 else -1, q.salt, x,
                       &p.btok[<size_t>x * c.block_size], q.hot)
        uncache(q)
        if q.ev_list:
            ev_unlink(p, x)
            set_home(c, x, dest)
            fs_set(&dest.free, x)
            dest.free.num_free.add(1)


cdef inline int uncache_blocks(Core* c, Shard* dest, const int32_t* ids, Py_ssize_t n,
                               ErrInfo* err) noexcept nogil:
    """Drop the cached blocks among ids[0..n) from the index, each with its cached
    descendants; ids not cached (or dropped already as a descendant) are
    skipped. Nothing goes to the host tier: their K/V may never have been
    written. Every id is checked first (room for the events reserved)."""
    cdef Py_ssize_t i
    for i in range(n):
        if ids[i] < 0 or ids[i] >= c.num_blocks:
            err.id = ids[i]
            err.a = c.num_blocks
            return RF_BLOCK_NOT_FOUND
    for i in range(n):
        if c.pfx.pb[ids[i]].serial != 0:
            unregister_tree(c, dest, ids[i], False)
    return RF_OK


cdef inline int32_t cached_parent(Core* c, SeqRec* s, int64_t j) noexcept nogil:
    """The cached block whose content chain is s's first j >= 1 blocks, or -1.

    That is s's own block j - 1 when it is cached. Otherwise it may be a
    twin cached earlier by another sequence (s completed a block equal to a
    cached one, which is not cached twice): the block indexed under s's key
    of block j - 1, accepted only if its chain holds s's tokens block by
    block up to a block s itself holds (or to a root with s's salt), so a
    hash collision can never give a wrong parent."""
    cdef PrefixState* p = &c.pfx
    cdef int32_t x = s.blocks[j - 1], found
    cdef int64_t i = j - 1, bs = c.block_size
    if p.pb[x].serial != 0:
        return x
    found = rf_idmap_find(p.index, s.keys[j - 1])
    x = found
    while x >= 0:
        if x == s.blocks[i]:
            return found
        if not rf_tokens_equal(&p.btok[<size_t>x * bs], &s.tokens[i * bs], bs):
            return -1
        if i == 0:
            return found if p.pb[x].parent < 0 and p.pb[x].salt == s.salt else -1
        x = p.pb[x].parent
        i -= 1
    return -1


cdef inline void register_block(Core* c, SeqRec* s, int64_t j) noexcept nogil:
    """Index full block j of s under s.keys[j] when the key is new and the
    blocks before it are cached, as s's own or as twins by content (room
    reserved by the caller)."""
    cdef PrefixState* p = &c.pfx
    cdef int32_t b = s.blocks[j], parent = -1
    cdef int64_t bs = c.block_size
    cdef PBlock* q = &p.pb[b]
    if q.serial != 0:
        return
    if rf_idmap_find(p.index, s.keys[j]) >= 0:
        return
    if j > 0:
        parent = cached_parent(c, s, j)
        if parent < 0:
            return
    rf_idmap_put(p.index, s.keys[j], b)
    p.serial += 1
    q.serial = p.serial
    q.key = s.keys[j]
    q.salt = s.salt
    q.parent = parent
    q.child = -1
    q.sib_prev = -1
    q.sib_next = -1
    q.hot = s.warm
    q.cold = s.cold
    if parent >= 0:
        q.sib_next = p.pb[parent].child
        if q.sib_next >= 0:
            p.pb[q.sib_next].sib_prev = b
        p.pb[parent].child = b
    memcpy(&p.btok[<size_t>b * bs], &s.tokens[j * bs], bs * sizeof(int32_t))
    p.blocks_stored.add(1)
    event(c, EV_STORED, q.key, s.keys[j - 1] if j > 0 else -1, <int32_t>bs)
    if c.policy == POLICY_ARC:
        ghost_check(c, b)


cdef inline void register_full(Core* c, SeqRec* s, int64_t from_block) noexcept nogil:
    """Key (and index) the blocks of s that became full after block from_block - 1."""
    cdef int64_t bs = c.block_size, j, nfull = s.num_tokens // bs, parent
    for j in range(from_block, nfull):
        parent = s.keys[j - 1] if j > 0 else -1
        rf_push(s.keys, rf_block_key(parent, s.salt, &s.tokens[j * bs], bs, c.key_mask))
        register_block(c, s, j)


cdef inline void reset_prefix(Core* c, Shard* dest) noexcept nogil:
    """Empty the prefix index: evictable blocks become free in shard dest, blocks
    in use stay allocated but uncached. Ghost keys are forgotten too."""
    cdef PrefixState* p = &c.pfx
    cdef int32_t b
    cdef PBlock* q
    cdef int lst
    for b in range(c.num_blocks):
        q = &p.pb[b]
        if q.serial == 0:
            continue
        if q.ev_list:
            ev_unlink(p, b)
            set_home(c, b, dest)
            fs_set(&dest.free, b)
            dest.free.num_free.add(1)
        uncache(q)
    rf_idmap_clear(p.index)
    for lst in range(1, 3):
        rf_idmap_clear(p.ghost[lst])
    ht_clear(c)
    event(c, EV_CLEARED, -1, -1, 0)
