# cython: language_level=3
# The calls of the C API (BlockManager.c_*) and how each takes its locks.
#
# A call runs for the calling thread's shard holding only that shard's lock
# ("fast"); when the operation returns RF_GLOBAL it changed nothing, and the
# call runs it again holding every lock: the shards' in order, then (several
# shards) the prefix index's. With one shard, that shard's lock is the only
# one and every operation runs once. The directory of ids is claimed and
# released under the shard's lock, so a caller holding every lock sees exactly
# the live sequences there.

from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME, CLOCK_MONOTONIC

from rocmforge._state cimport *
from rocmforge._blocks cimport incref_ids, decref_ids, all_home, note_peak
from rocmforge._prefix cimport (hash_prompt, match_prefix, take_cached, foreign_hit, reserve_registrations,
                                reset_prefix, uncache_blocks)
from rocmforge._host_tier cimport ht_match
from rocmforge._seqs cimport seq_find, dir_find, dir_claim, dir_erase
from rocmforge._append cimport append_batch, append_batch_any
from rocmforge._seqops cimport allocate_blocks, add_sequence, fork_sequence, remove_sequence
from rocmforge._pool cimport resize_pool, compact_into, shrink_pool, occupied, num_occupied
from rocmforge._checks cimport check_all


cdef inline double wall_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

cdef inline double mono_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec * 1e3 + <double>ts.tv_nsec * 1e-6


cdef inline void count_lookup(Core* c, Shard* sh, int64_t num_tokens, int64_t hits) noexcept nogil:
    """acquire_prefix's counters (prefix index lock held) and sh's peak."""
    c.pfx.lookups.add(1)
    c.pfx.query_tokens.add(num_tokens)
    c.pfx.hit_tokens.add(hits * c.block_size)
    note_peak(sh)

cdef inline Shard* home_shard(Core* c) noexcept nogil:
    """The calling thread's shard."""
    if c.nshards == 1:
        return c.shards
    return &c.shards[rf_thread_home(c)]

cdef inline void lock_all(Core* c) noexcept nogil:
    """Every shard's lock in shard order, then (several shards) the prefix index's."""
    cdef int32_t s
    for s in range(c.nshards):
        c.shards[s].lock.lock()
    if c.nshards > 1:
        c.pfx.lock.lock()

cdef inline void unlock_all(Core* c) noexcept nogil:
    cdef int32_t s
    if c.nshards > 1:
        c.pfx.lock.unlock()
    for s in range(c.nshards - 1, -1, -1):
        c.shards[s].lock.unlock()

cdef inline Shard* lock_seq(Core* c, int64_t seq_id) noexcept nogil:
    """Lock and return the shard that holds seq_id (NULL, nothing locked,
    when no shard does); with one shard, that shard."""
    cdef int32_t t
    if c.nshards == 1:
        c.shards.lock.lock()
        return c.shards
    t = dir_find(c, seq_id)
    if t < 0:
        return NULL
    c.shards[t].lock.lock()
    return &c.shards[t]

cdef inline void lock_prefix(Core* c) noexcept nogil:
    """The prefix index's lock for a call that touches nothing else."""
    if c.nshards == 1:
        c.shards.lock.lock()
    else:
        c.pfx.lock.lock()

cdef inline void unlock_prefix(Core* c) noexcept nogil:
    if c.nshards == 1:
        c.shards.lock.unlock()
    else:
        c.pfx.lock.unlock()


cdef inline void take_evicted(Core* c, vector[int64_t]* ids) noexcept nogil:
    """Swap the evicted sequence ids out (ids must be empty), under the lock that guards them."""
    if c.nshards == 1:
        c.shards.lock.lock()
    else:
        c.q_lock.lock()
    ids.swap(c.evicted)
    if c.nshards == 1:
        c.shards.lock.unlock()
    else:
        c.q_lock.unlock()


cdef inline int call_allocate(Core* c, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st
    sh.lock.lock()
    if c.nshards == 1:
        st = allocate_blocks(c, sh, False, n, out, err)
        sh.lock.unlock()
        return st
    st = allocate_blocks(c, sh, True, n, out, err)
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = allocate_blocks(c, sh, False, n, out, err)
        unlock_all(c)
    return st

cdef inline int call_incref(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st = RF_GLOBAL
    sh.lock.lock()
    if c.nshards == 1 or all_home(c, sh, ids, n):
        st = incref_ids(c, ids, n, err)
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = incref_ids(c, ids, n, err)
        unlock_all(c)
    return st

cdef inline int call_decref(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st = RF_GLOBAL
    sh.lock.lock()
    if c.nshards == 1:
        st = decref_ids(c, ids, n, err)
    elif all_home(c, sh, ids, n):
        if c.prefix:
            c.pfx.lock.lock()   # a released cached block joins the policy lists
        st = decref_ids(c, ids, n, err)
        if c.prefix:
            c.pfx.lock.unlock()
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = decref_ids(c, ids, n, err)
        unlock_all(c)
    return st

cdef inline int call_add_sequence(Core* c, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                        int64_t num_tokens, int64_t salt, int64_t* slots_out,
                        ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st
    cdef vector[int64_t] heap_keys
    cdef int64_t stack_keys[KEYS_ON_STACK]
    cdef int64_t* keys = NULL
    cdef double now = wall_now()
    if with_tokens and c.prefix and num_tokens >= 0:
        # Keys are a pure function of the tokens: hash before taking a lock.
        keys = hash_prompt(c, tokens, num_tokens, salt, stack_keys, KEYS_ON_STACK, &heap_keys)
        if keys == NULL:
            return RF_NO_MEMORY
    if c.nshards == 1:
        sh.lock.lock()
        st = add_sequence(c, sh, False, seq_id, with_tokens, tokens, num_tokens, salt, keys,
                          slots_out, now, err)
        sh.lock.unlock()
        return st
    if seq_id < 0:
        err.id = seq_id
        return RF_INVALID_ARGUMENT
    # The id is claimed in the directory under the shard's lock, and given
    # back before it is released when the call fails, so a caller holding
    # every lock sees exactly the live sequences there.
    sh.lock.lock()
    if keys != NULL:
        c.pfx.lock.lock()
    st = dir_claim(c, seq_id, sh.index, err)
    if st == RF_OK:
        st = add_sequence(c, sh, True, seq_id, with_tokens, tokens, num_tokens, salt, keys, slots_out,
                          now, err)
        if st != RF_OK:
            dir_erase(c, seq_id)
    if keys != NULL:
        c.pfx.lock.unlock()
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = dir_claim(c, seq_id, sh.index, err)
        if st == RF_OK:
            st = add_sequence(c, sh, False, seq_id, with_tokens, tokens, num_tokens, salt, keys,
                              slots_out, now, err)
            if st != RF_OK:
                dir_erase(c, seq_id)
        unlock_all(c)
    return st

cdef inline int64_t call_lookup_prefix(Core* c, const int32_t* tokens, int64_t num_tokens,
                             int64_t salt) noexcept nogil:
    """Cached leading tokens for these token ids (no change of state); -1 when
    prefix caching is off or memory is exhausted."""
    cdef vector[int64_t] heap_keys
    cdef int64_t stack_keys[KEYS_ON_STACK]
    cdef vector[int32_t] hits
    cdef int64_t* keys
    cdef int64_t h, nfull = num_tokens // c.block_size
    cdef int32_t neg = -1
    if not c.prefix or rf_resize(hits, nfull, neg):
        return -1
    keys = hash_prompt(c, tokens, num_tokens, salt, stack_keys, KEYS_ON_STACK, &heap_keys)
    if keys == NULL:
        return -1
    lock_prefix(c)
    h = match_prefix(c, tokens, keys, nfull, salt, hits.data())
    h += ht_match(c, tokens, keys, h, nfull, salt, hits.data())
    unlock_prefix(c)
    return h * c.block_size

cdef inline int call_acquire_prefix(Core* c, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                          int32_t* ids_out, int64_t* num_out, ErrInfo* err) noexcept nogil:
    """Take an external reference on every block of the cached prefix of tokens
    (room for num_tokens // block_size ids); num_out = how many."""
    cdef Shard* sh = home_shard(c)
    cdef vector[int64_t] heap_keys
    cdef int64_t stack_keys[KEYS_ON_STACK]
    cdef int64_t* keys
    cdef int64_t h = 0, nfull = num_tokens // c.block_size
    cdef bint done = False
    num_out[0] = 0
    if not c.prefix:
        return RF_PREFIX_DISABLED
    keys = hash_prompt(c, tokens, num_tokens, salt, stack_keys, KEYS_ON_STACK, &heap_keys)
    if keys == NULL:
        return RF_NO_MEMORY
    sh.lock.lock()
    if c.nshards > 1:
        c.pfx.lock.lock()
    h = match_prefix(c, tokens, keys, nfull, salt, ids_out)
    if c.nshards == 1 or not foreign_hit(c, sh, ids_out, h):
        h = take_cached(c, sh, ids_out, h, True)
        count_lookup(c, sh, num_tokens, h)
        done = True
    if c.nshards > 1:
        c.pfx.lock.unlock()
    sh.lock.unlock()
    if not done:
        lock_all(c)
        h = take_cached(c, sh, ids_out, match_prefix(c, tokens, keys, nfull, salt, ids_out), True)
        count_lookup(c, sh, num_tokens, h)
        unlock_all(c)
    num_out[0] = h
    return RF_OK

cdef inline int call_append_batch(Core* c, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                        bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                        ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef double now = wall_now()
    cdef int st
    sh.lock.lock()
    if c.nshards == 1:
        st = append_batch(c, sh, False, seq_ids, counts, n, with_tokens, tokens, slots_out, now, err)
        sh.lock.unlock()
        return st
    st = append_batch(c, sh, True, seq_ids, counts, n, with_tokens, tokens, slots_out, now, err)
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = append_batch_any(c, sh, seq_ids, counts, n, with_tokens, tokens, slots_out, now, err)
        unlock_all(c)
    return st

cdef inline int call_fork(Core* c, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef double now = wall_now()
    cdef int st
    if c.nshards == 1:
        sh.lock.lock()
        st = fork_sequence(c, sh, False, src, dst, now, err)
        sh.lock.unlock()
        return st
    if dst < 0:
        err.id = dst
        return RF_INVALID_ARGUMENT
    if dir_find(c, src) < 0:
        err.id = src
        return RF_SEQ_NOT_FOUND
    sh.lock.lock()
    st = dir_claim(c, dst, sh.index, err)
    if st == RF_OK:
        st = fork_sequence(c, sh, True, src, dst, now, err)
        if st != RF_OK:
            dir_erase(c, dst)
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = dir_claim(c, dst, sh.index, err)
        if st == RF_OK:
            st = fork_sequence(c, sh, False, src, dst, now, err)
            if st != RF_OK:
                dir_erase(c, dst)
        unlock_all(c)
    return st

cdef inline int call_remove_sequence(Core* c, int64_t seq_id, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef bint prefix_locked = False
    cdef int st
    sh.lock.lock()
    if c.nshards == 1:
        st = remove_sequence(c, sh, False, seq_id, &prefix_locked, err)
        sh.lock.unlock()
        return st
    st = remove_sequence(c, sh, True, seq_id, &prefix_locked, err)
    if st == RF_OK:
        dir_erase(c, seq_id)
    if prefix_locked:
        c.pfx.lock.unlock()
    sh.lock.unlock()
    if st == RF_GLOBAL:
        lock_all(c)
        st = remove_sequence(c, sh, False, seq_id, &prefix_locked, err)
        if st == RF_OK:
            dir_erase(c, seq_id)
        unlock_all(c)
    return st


cdef inline int gather_tables(Core* c, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                        vector[int64_t]* lens, ErrInfo* err) noexcept nogil:
    """Copy the tables and token counts of n sequences into flat and lens
    (vector[int32_t], vector[int64_t]: length, tokens per sequence). With
    one shard, one snapshot; with several, each sequence's under its
    shard's lock."""
    cdef Py_ssize_t i
    cdef int32_t slot
    cdef Shard* x
    cdef SeqRec* s
    cdef int st = RF_OK
    if rf_reserve(lens[0], 2 * n):
        return RF_NO_MEMORY
    if c.nshards == 1:
        c.shards.lock.lock()
    for i in range(n):
        x = c.shards if c.nshards == 1 else lock_seq(c, ids[i])
        slot = NO_SLOT if x == NULL else seq_find(x, ids[i])
        if slot == NO_SLOT:
            err.id = ids[i]
            st = RF_SEQ_NOT_FOUND
        else:
            s = &x.seqs[slot]
            if rf_reserve(flat[0], flat.size() + s.blocks.size()):
                st = RF_NO_MEMORY
            else:
                if s.blocks.size():
                    rf_append_n(flat[0], s.blocks.data(), s.blocks.size())
                rf_push(lens[0], <int64_t>s.blocks.size())
                rf_push(lens[0], s.num_tokens)
        if c.nshards > 1 and x != NULL:
            x.lock.unlock()
        if st != RF_OK:
            break
    if c.nshards == 1:
        c.shards.lock.unlock()
    return st


# ---------------------------------------------------------------------------
# Calls on the whole manager: each holds every lock throughout
# ---------------------------------------------------------------------------

cdef inline int call_compact(Core* c, int32_t n, vector[int32_t]* moves, ErrInfo* err) noexcept nogil:
    """compact_into (free blocks into the calling thread's shard); its time goes to the stats."""
    cdef Shard* sh = home_shard(c)
    cdef double t0
    cdef int st
    lock_all(c)
    t0 = mono_ms()
    st = compact_into(c, sh, n, moves, err)
    if st == RF_OK:
        c.last_compaction_ms.set(mono_ms() - t0)
    unlock_all(c)
    return st

cdef inline int call_shrink(Core* c, int32_t n, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st
    lock_all(c)
    st = shrink_pool(c, sh, n, err)
    unlock_all(c)
    return st

cdef inline int call_grow(Core* c, int32_t n) noexcept nogil:
    cdef int st
    lock_all(c)
    st = resize_pool(c, n) if n > c.num_blocks else RF_OK
    unlock_all(c)
    return st

cdef inline int call_reset_prefix(Core* c) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st
    lock_all(c)
    st = reserve_registrations(c, 0)
    if st == RF_OK:
        reset_prefix(c, sh)
    unlock_all(c)
    return st

cdef inline int call_uncache(Core* c, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
    cdef Shard* sh = home_shard(c)
    cdef int st
    lock_all(c)
    st = reserve_registrations(c, 0)
    if st == RF_OK:
        st = uncache_blocks(c, sh, ids, n, err)
    unlock_all(c)
    return st

cdef inline double call_fragmentation(Core* c) noexcept nogil:
    """The share of [0, highest occupied id] that is free."""
    cdef int32_t top = -1, b, used
    lock_all(c)
    used = num_occupied(c)
    b = c.num_blocks - 1
    while b >= 0 and used > 0:
        if occupied(c, b):
            top = b
            break
        b -= 1
    unlock_all(c)
    if top < 0:
        return 0.0
    return <double>(top + 1 - used) / <double>(top + 1)

cdef inline int call_check(Core* c, char* msg, size_t cap) noexcept nogil:
    cdef int bad
    lock_all(c)
    bad = check_all(c, msg, cap)
    unlock_all(c)
    return bad
