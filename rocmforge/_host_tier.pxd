# cython: language_level=3
# The host tier: prefix blocks the pool evicts are kept in host memory slots
# (LRU), found again by the same keys, and brought back into fresh blocks.
# The core keeps the bookkeeping; the data moves through the pending queue
# (take_pending_copies), where -1 - s names host slot s: (b, -1 - s) copies
# block b out to slot s, (-1 - s, b) copies it back. The queue is applied in
# order, so a slot is read before a later store overwrites it, and a block
# is written out before it is reused. Guarded with the prefix index.

from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy

from rocmforge._state cimport (
    Core, Shard, HostTier, push_event, ghost_remember, rf_push, rf_resize, rf_reserve, rf_idmap_find, rf_idmap_reserve,
    rf_idmap_put, rf_idmap_erase, rf_idmap_clear, rf_tokens_equal, rf_copy_number, RF_OK, RF_NO_MEMORY,
    EV_STORED, EV_REMOVED, POLICY_ARC)


cdef inline int ht_init(Core* c, int32_t capacity, int policy) noexcept nogil:
    """Size the tier for capacity blocks (all free); RF_NO_MEMORY leaves it empty."""
    cdef HostTier* h = &c.pfx.host
    cdef int64_t neg = -1
    cdef int32_t s, nothing = -1, zero = 0
    cdef uint64_t unpinned = 0
    cdef int lst
    if (rf_resize(h.key, capacity, neg) or rf_resize(h.parent_key, capacity, neg) or rf_resize(h.salt, capacity, neg)
            or rf_resize(h.prev, capacity, nothing) or rf_resize(h.next, capacity, nothing)
            or rf_resize(h.lst, capacity, zero) or rf_resize(h.pin, capacity, unpinned)
            or rf_resize(h.tok, <size_t>capacity * c.block_size, zero) or rf_reserve(h.free_slots, capacity)
            or rf_idmap_reserve(h.index, capacity)):
        return RF_NO_MEMORY
    if policy == POLICY_ARC:
        for lst in range(1, 3):
            if rf_resize(h.ghost_ring[lst], capacity, neg) or rf_idmap_reserve(h.ghost[lst], capacity):
                return RF_NO_MEMORY
    h.capacity = capacity
    h.policy = policy
    h.free_slots.clear()
    for s in range(capacity - 1, -1, -1):
        h.free_slots.push_back(s)
    return RF_OK


cdef inline void ht_unlink(HostTier* h, int32_t s) noexcept nogil:
    cdef int lst = h.lst[s]
    if h.prev[s] >= 0:
        h.next[h.prev[s]] = h.next[s]
    else:
        h.head[lst] = h.next[s]
    if h.next[s] >= 0:
        h.prev[h.next[s]] = h.prev[s]
    else:
        h.tail[lst] = h.prev[s]
    h.prev[s] = -1
    h.next[s] = -1
    h.lst[s] = 0
    h.len[lst] -= 1


cdef inline void ht_link_tail(HostTier* h, int32_t s, int lst) noexcept nogil:
    h.prev[s] = h.tail[lst]
    h.next[s] = -1
    if h.tail[lst] >= 0:
        h.next[h.tail[lst]] = s
    else:
        h.head[lst] = s
    h.tail[lst] = s
    h.lst[s] = lst
    h.len[lst] += 1


cdef inline bint ht_ghost_hit(HostTier* h, int64_t key) noexcept nogil:
    """ARC: a key stored again after it was dropped: the list it left was too short.
    Moves the target toward it; whether the block counts as reused."""
    cdef double n1 = h.ghost[1].count, n2 = h.ghost[2].count
    if rf_idmap_find(h.ghost[1], key) >= 0:
        h.target = min(<double>h.capacity, h.target + (n2 / n1 if n2 > n1 else 1.0))
        rf_idmap_erase(h.ghost[1], key)
        return True
    if rf_idmap_find(h.ghost[2], key) >= 0:
        h.target = max(0.0, h.target - (n1 / n2 if n1 > n2 else 1.0))
        rf_idmap_erase(h.ghost[2], key)
        return True
    return False


cdef inline int64_t ht_match(Core* c, const int32_t* tokens, const int64_t* keys, int64_t start, int64_t nfull,
                             int64_t salt, int32_t* slots) noexcept nogil:
    """How many blocks from start on the tier holds, each verified like a pool hit:
    the same tokens, and the previous block's key (or, first, the salt); their
    slots to slots[start:]. Changes nothing."""
    cdef HostTier* h = &c.pfx.host
    cdef int64_t j, bs = c.block_size
    cdef int32_t s
    if h.used == 0:
        return 0
    for j in range(start, nfull):
        s = rf_idmap_find(h.index, keys[j])
        if s < 0 or h.parent_key[s] != (keys[j - 1] if j > 0 else -1):
            return j - start
        if (j == 0 and h.salt[s] != salt) or not rf_tokens_equal(&h.tok[<size_t>s * bs], tokens + j * bs, bs):
            return j - start
        slots[j] = s
    return nfull - start


cdef inline void ht_pin(HostTier* h, const int32_t* slots, int64_t n) noexcept nogil:
    """Keep these slots (an add_sequence's matches) from being reused until the
    next operation starts: the blocks it evicts take other slots."""
    cdef int64_t j
    h.op += 1
    for j in range(n):
        h.pin[slots[j]] = h.op


cdef inline void ht_unpin(HostTier* h) noexcept nogil:
    h.op += 1


cdef inline void ht_touch(HostTier* h, int32_t s) noexcept nogil:
    """s was used again: it goes last (under ARC, to the reused list)."""
    cdef int lst = 2 if h.policy == POLICY_ARC else 1
    ht_unlink(h, s)
    ht_link_tail(h, s, lst)


cdef inline void ht_forget(Core* c, int32_t s) noexcept nogil:
    """Slot s's block leaves the tier (the slot is the caller's to reuse or free)."""
    cdef HostTier* h = &c.pfx.host
    ht_unlink(h, s)
    rf_idmap_erase(h.index, h.key[s])
    push_event(c, EV_REMOVED, h.key[s], -1, 0, 1)
    h.key[s] = -1
    h.used -= 1
    h.resident.add(-1)


cdef inline int32_t ht_victim(HostTier* h, int lst) noexcept nogil:
    """The first slot of list lst not pinned by the running add_sequence, or -1."""
    cdef int32_t s = h.head[lst]
    while s >= 0 and h.pin[s] == h.op:
        s = h.next[s]
    return s


cdef inline int32_t ht_take_slot(Core* c) noexcept nogil:
    """A slot for a new block: a free one, else the policy's victim (its block
    leaves the tier): LRU's oldest; ARC's oldest of list 1 while that list is
    longer than its target (or list 2 is empty), else of list 2. -1 when there
    is none."""
    cdef HostTier* h = &c.pfx.host
    cdef int32_t s
    cdef int lst = 1
    if h.free_slots.size():
        s = h.free_slots.back()
        h.free_slots.pop_back()
        return s
    if h.policy == POLICY_ARC and not (h.len[1] > 0 and (h.len[1] > h.target or h.len[2] == 0)):
        lst = 2
    s = ht_victim(h, lst)
    if s < 0:
        lst = 3 - lst
        s = ht_victim(h, lst)
    if s < 0:
        return -1
    if h.policy == POLICY_ARC:
        ghost_remember(h.ghost[lst], h.ghost_ring[lst], &h.ghost_pos[lst], h.key[s])
    ht_forget(c, s)
    h.dropped.add(1)
    return s


cdef inline void ht_offload(Core* c, Shard* dest, int64_t key, int64_t parent_key, int64_t salt, int32_t b,
                            const int32_t* tokens, bint reused) noexcept nogil:
    """Block b (key, parent's key, salt, tokens; reused: hit since it was cached)
    leaves the pool: keep it in the tier, its copy queued in dest. A key the
    tier already holds is only touched; when no slot or no queue room can be
    had, the block is dropped as without a tier."""
    cdef HostTier* h = &c.pfx.host
    cdef int32_t s = rf_idmap_find(h.index, key)
    cdef int64_t bs = c.block_size
    if s >= 0:
        ht_touch(h, s)
        return
    if rf_reserve(dest.pending, dest.pending.size() + 3):
        return
    s = ht_take_slot(c)
    if s < 0:
        return
    rf_push(dest.pending, rf_copy_number(c))
    rf_push(dest.pending, <int64_t>b)
    rf_push(dest.pending, -1 - <int64_t>s)
    h.key[s] = key
    h.parent_key[s] = parent_key
    h.salt[s] = salt
    memcpy(&h.tok[<size_t>s * bs], tokens, bs * sizeof(int32_t))
    rf_idmap_put(h.index, key, s)      # room reserved for capacity keys
    if h.policy == POLICY_ARC and ht_ghost_hit(h, key):
        reused = True
    ht_link_tail(h, s, 2 if h.policy == POLICY_ARC and reused else 1)
    h.used += 1
    h.resident.add(1)
    h.offloaded.add(1)
    push_event(c, EV_STORED, key, parent_key, <int32_t>bs, 1)


cdef inline void ht_reload(Core* c, Shard* sh, int32_t s, int32_t b) noexcept nogil:
    """Queue the copy of slot s into block b (room reserved by the caller); the
    block leaves the tier."""
    cdef HostTier* h = &c.pfx.host
    rf_push(sh.pending, rf_copy_number(c))
    rf_push(sh.pending, -1 - <int64_t>s)
    rf_push(sh.pending, <int64_t>b)
    h.reloaded.add(1)
    # Exclusive tiers: the block now lives in the pool (until it is evicted and
    # kept here again), so its slot is free; the queue reads it before any later store.
    ht_forget(c, s)
    h.free_slots.push_back(s)


cdef inline void ht_clear(Core* c) noexcept nogil:
    """Forget every block of the tier (its slots become free) and, under ARC, its ghosts."""
    cdef HostTier* h = &c.pfx.host
    cdef int32_t s
    cdef int lst
    if h.capacity == 0:
        return
    rf_idmap_clear(h.index)
    h.free_slots.clear()
    for s in range(h.capacity - 1, -1, -1):
        h.key[s] = -1
        h.prev[s] = -1
        h.next[s] = -1
        h.lst[s] = 0
        h.free_slots.push_back(s)
    for lst in range(3):
        h.head[lst] = -1
        h.tail[lst] = -1
        h.len[lst] = 0
        if lst and h.policy == POLICY_ARC:
            rf_idmap_clear(h.ghost[lst])
            h.ghost_pos[lst] = 0
    h.target = 0
    h.used = 0
    h.resident.set(0)
