# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""rocmforge's core: a paged KV-cache block manager that knows block ids, not memory.

This file is the manager itself: its locks and how each call takes them, the
C API (``c_*``) and the Python API. The state it guards is declared in
_state.pxd and worked on by the inline functions of its sibling .pxd files.

Locking. A manager has one or more shards, each with its own lock, its own
sequences and its own free blocks. A call runs for the calling thread's
shard holding only that shard's lock when everything it touches is the
shard's ("fast"); otherwise it gives up before changing anything and runs
again holding every lock, in shard order, then the prefix index's ("global").
With one shard, its lock is the only one. Every call is atomic: it checks
everything it needs, then applies all of its effects or none (it returns a
status and raises only after the locks are released). Batched loops run
without the GIL.
"""

from cpython.long cimport PyLong_CheckExact, PyLong_AsLongLongAndOverflow
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uint8_t, INT32_MAX, INT64_MAX
from libc.string cimport memcpy
from libcpp.vector cimport vector
cimport numpy as cnp
cimport cython

import hashlib
import os

import numpy as np

from rocmforge._state cimport *
from rocmforge._blocks cimport avail_total
from rocmforge._seqs cimport seq_find
from rocmforge._pool cimport resize_pool
from rocmforge._calls cimport *
from rocmforge._host_tier cimport ht_init

from rocmforge.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BlockNotFound,
    InvalidConfiguration,
    InvariantError,
    KvCacheError,
    OutOfBlocks,
    RefcountError,
    SequenceExists,
    SequenceNotFound,
)
from rocmforge.events import AllCleared, BlockRemoved, BlockStored

cnp.import_array()

include "_convert.pxi"
include "_report.pxi"

cdef enum:
    # Calls release the GIL only when their work outweighs retaking it. That
    # costs 0.2-0.4 us when no other thread wants the GIL, but a thread wake-up
    # (several us) when others do: on the device host, 16 Python threads
    # decoding 256 sequences per call (3 us of work) ran at half one thread's
    # rate when each call released the GIL. So about 10 us of work: 1,024
    # sequences of a batch, 4,096 block ids, 16,384 prompt tokens (hashing and
    # lookup). The calls below branch on these sizes in two spelled-out arms:
    # Cython's `with nogil(cond):` takes only a condition known at compile time.
    NOGIL_MIN = 1024
    NOGIL_MIN_IDS = 4096
    NOGIL_MIN_TOKENS = 16384

cdef dict _POLICIES = {"lru": POLICY_LRU, "arc": POLICY_ARC}
cdef tuple _POLICY_NAMES = ("lru", "arc")


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------

@cython.final
cdef class BlockManager:
    """Paged KV-cache bookkeeping: a pool of fixed-size blocks shared by sequences.

    BlockManager(num_blocks, block_size, *, evict_sequences=False,
                 enable_prefix_caching=False, eviction_policy="lru", enable_events=False,
                 shards=1)

    Block ids are int32 in ``[0, num_blocks)``; the cache slot of token
    ``offset`` in block ``b`` is ``b * block_size + offset`` (int64).

    A block's refcount is the number of sequence tables that hold it plus the
    references taken with :meth:`allocate`/:meth:`incref`. A block returns to
    the free set when its refcount reaches zero. Allocation hands out the
    lowest free ids.

    With ``evict_sequences=True`` an allocation that cannot be served removes
    the least recently accessed sequences not named by that call until it can;
    their ids are returned by :meth:`take_evicted`.

    With ``enable_prefix_caching=True`` every full block of a sequence that
    keeps token ids is indexed by a content key chained from its parent's key,
    its tokens and the sequence's salt. ``add_sequence`` reuses the longest
    run of cached leading blocks (each hit verified token by token). A cached
    block whose refcount drops to zero stays findable (*evictable*) until an
    allocation needs it: free blocks go first, then evictable ones in the
    order of ``eviction_policy`` ("lru" or "arc", see the README); evicting
    a block also drops its cached descendants.

    ``shards`` (1 to 64, or "auto") splits the manager for threads: each
    shard has its own lock, sequences and free blocks, and threads whose
    calls touch only their own shard's do not wait for each other (see the
    README's threading model). With one shard (the default) every call is
    served exactly as by one lock.

    Every method is thread-safe and atomic; one that raises leaves the state
    exactly as it was.
    """

    def __cinit__(self, num_blocks, block_size, *, evict_sequences=False,
                  enable_prefix_caching=False, eviction_policy="lru", enable_events=False,
                  shards=1, host_cache_blocks=0, host_eviction_policy="lru", _key_bits=63):
        nb = _config_int(num_blocks, "num_blocks", 1, INT32_MAX)
        bs = _config_int(block_size, "block_size", 1, MAX_BLOCK_SIZE)
        if eviction_policy not in _POLICIES:
            raise InvalidConfiguration(
                f"eviction_policy must be one of {', '.join(_POLICY_NAMES)}, got {eviction_policy!r}")
        if not isinstance(_key_bits, int) or not 1 <= _key_bits <= 63:
            raise InvalidConfiguration("_key_bits must be in [1, 63]")
        if enable_events and not enable_prefix_caching:
            raise InvalidConfiguration("enable_events needs enable_prefix_caching=True")
        host_blocks = _config_int(host_cache_blocks, "host_cache_blocks", 0, INT32_MAX)
        if host_blocks and not enable_prefix_caching:
            raise InvalidConfiguration("host_cache_blocks needs enable_prefix_caching=True")
        if host_eviction_policy not in _POLICIES:
            raise InvalidConfiguration(
                f"host_eviction_policy must be one of {', '.join(_POLICY_NAMES)}, got {host_eviction_policy!r}")
        cdef int host_policy = _POLICIES[host_eviction_policy]
        cdef int32_t nshards = _shard_count(shards, nb)
        self._c = new Core()
        self.block_size = bs
        self.evict_sequences = bool(evict_sequences)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.enable_events = bool(enable_events)
        self.num_shards = nshards
        self._c.block_size = bs
        self._c.evict_sequences = self.evict_sequences
        self._c.prefix = self.enable_prefix_caching
        self._c.events = self.enable_events
        self._c.policy = _POLICIES[eviction_policy]
        self._c.key_mask = (1 << _key_bits) - 1
        cdef int st
        cdef int32_t n = nb
        if rf_core_init(self._c, nshards):
            raise MemoryError(f"cannot allocate {nshards} shards")
        cdef int32_t nhost = host_blocks
        with nogil:
            st = resize_pool(self._c, n)
            if st == RF_OK and nhost:
                st = ht_init(self._c, nhost, host_policy)
        if st != RF_OK:
            raise MemoryError(f"cannot allocate bookkeeping for {nb} blocks and {host_blocks} host blocks")

    def __dealloc__(self):
        del self._c

    # --- C API (declared in _core.pxd; the bodies are in _calls.pxd) ----------

    cdef int c_allocate(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil:
        return call_allocate(self._c, n, out, err)

    cdef int c_incref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        return call_incref(self._c, ids, n, err)

    cdef int c_decref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        return call_decref(self._c, ids, n, err)

    cdef bint c_has_pending_copies(self) noexcept nogil:
        """Whether take_pending_copies() would return any copy (each shard's lock, in turn)."""
        cdef int32_t s
        cdef bint any_pending = False
        for s in range(self._c.nshards):
            self._c.shards[s].lock.lock()
            any_pending = self._c.shards[s].pending.size() != 0
            self._c.shards[s].lock.unlock()
            if any_pending:
                return True
        return False

    cdef int c_add_sequence(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                            int64_t num_tokens, int64_t salt, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil:
        return call_add_sequence(self._c, seq_id, with_tokens, tokens, num_tokens, salt, slots_out, err)

    cdef int64_t c_lookup_prefix(self, const int32_t* tokens, int64_t num_tokens,
                                 int64_t salt) noexcept nogil:
        return call_lookup_prefix(self._c, tokens, num_tokens, salt)

    cdef int c_acquire_prefix(self, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                              int32_t* ids_out, int64_t* num_out, ErrInfo* err) noexcept nogil:
        return call_acquire_prefix(self._c, tokens, num_tokens, salt, ids_out, num_out, err)

    cdef int c_append_batch(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                            bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil:
        return call_append_batch(self._c, seq_ids, counts, n, with_tokens, tokens, slots_out, err)

    cdef int c_fork(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil:
        return call_fork(self._c, src, dst, err)

    cdef int c_remove_sequence(self, int64_t seq_id, ErrInfo* err) noexcept nogil:
        return call_remove_sequence(self._c, seq_id, err)

    cdef int64_t _token_count(self, object seq_id, bint cached) except -1:
        """A sequence's token count, or its count of tokens found cached."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t slot = NO_SLOT
        cdef int64_t nt = 0
        cdef Shard* x = lock_seq(self._c, sid)
        if x != NULL:
            slot = seq_find(x, sid)
            if slot != NO_SLOT:
                nt = x.seqs[slot].cached_tokens if cached else x.seqs[slot].num_tokens
            x.lock.unlock()
        if slot == NO_SLOT:
            raise SequenceNotFound(f"sequence {sid} not found")
        return nt

    cdef object _append_batch(self, object seq_ids, object counts, object tokens, object out):
        cdef cnp.ndarray ids = _index_array(seq_ids, cnp.NPY_INT64, "seq_ids")
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0)
        cdef int64_t total = 0
        cdef cnp.ndarray cnt = _counts_array(counts, n, &total)
        cdef const int32_t* cptr = <const int32_t*>cnp.PyArray_DATA(cnt)
        cdef const int64_t* iptr = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef const int32_t* tptr = NULL
        cdef ErrInfo err
        cdef int st
        if tokens is not None:
            toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
            if cnp.PyArray_DIM(toks, 0) != total:
                raise ArgumentValueError(f"counts add up to {total} but {len(toks)} tokens were given")
            tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef cnp.ndarray slots = _out_array(out, total, cnp.NPY_INT64, "out")
        cdef int64_t* sptr = <int64_t*>cnp.PyArray_DATA(slots)
        cdef bint with_tokens = tokens is not None
        if n >= NOGIL_MIN:
            with nogil:
                st = self.c_append_batch(iptr, cptr, n, with_tokens, tptr, sptr, &err)
        else:
            st = self.c_append_batch(iptr, cptr, n, with_tokens, tptr, sptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(slots, total)

    # =======================================================================
    # Python API
    # =======================================================================

    # --- block level ---------------------------------------------------------

    def allocate(self, n, *, out=None):
        """Take ``n`` free blocks (lowest ids first) with refcount 1; int32 array.

        All or nothing: raises OutOfBlocks and allocates nothing when ``n``
        blocks cannot be made free. ``out`` may be a reusable int32 buffer of
        at least ``n`` elements; the result is then (a view of) ``out``.
        """
        cdef int32_t count = <int32_t>_count(n, "n", INT32_MAX)
        cdef cnp.ndarray arr = _out_array(out, count, cnp.NPY_INT32, "out")
        cdef int32_t* ptr = <int32_t*>cnp.PyArray_DATA(arr)
        cdef ErrInfo err
        cdef int st
        if count >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_allocate(count, ptr, &err)
        else:
            st = self.c_allocate(count, ptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(arr, count)

    def allocate_one(self):
        """Take the lowest free block with refcount 1 and return its id (fast path)."""
        cdef int32_t b = -1
        cdef ErrInfo err
        cdef int st = self.c_allocate(1, &b, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return b

    def incref(self, ids):
        """Add one reference to each listed block (an id listed twice gains two)."""
        cdef cnp.ndarray arr = _index_array(ids, cnp.NPY_INT32, "ids", BlockNotFound)
        cdef const int32_t* ptr = <const int32_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_incref(ptr, n, &err)
        else:
            st = self.c_incref(ptr, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def decref(self, ids):
        """Drop one reference from each listed block; blocks at zero become free.

        Only references taken with allocate/incref can be dropped here;
        references held by sequence tables are dropped by remove_sequence.
        Raises RefcountError (changing nothing) on any would-be underflow.
        """
        cdef cnp.ndarray arr = _index_array(ids, cnp.NPY_INT32, "ids", BlockNotFound)
        cdef const int32_t* ptr = <const int32_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_decref(ptr, n, &err)
        else:
            st = self.c_decref(ptr, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    @cython.always_allow_keywords(False)
    def decref_one(self, block_id):
        """Drop one external reference from a single block (fast path of decref)."""
        cdef int32_t b = _block_id(block_id)
        cdef ErrInfo err
        cdef int st = self.c_decref(&b, 1, &err)
        if st != RF_OK:
            raise_status(st, &err)

    @cython.always_allow_keywords(False)
    def refcount(self, block_id):
        """Current refcount of one block (table references plus external ones)."""
        cdef int32_t b = _block_id(block_id)
        cdef int32_t rc = -1, n
        lock_all(self._c)
        n = self._c.num_blocks
        if b < n:
            rc = self._c.refs[b].rc
        unlock_all(self._c)
        if rc < 0:
            raise BlockNotFound(f"block {b} out of range [0, {n})")
        return rc

    # --- sequence level ------------------------------------------------------

    def add_sequence(self, seq_id, tokens=None, num_tokens=0, salt=None, *, _salt_key=None):
        """Create a sequence with its initial tokens; returns their int64 slots.

        Pass ``tokens`` (token ids) to have the sequence keep them, or only a
        ``num_tokens`` count. With prefix caching, the longest run of cached
        leading full blocks with the same ``salt`` (None, int, str or bytes;
        blocks never match across salts) is reused instead of allocated:
        ``num_cached_tokens(seq_id)`` says how many leading tokens need no
        K/V write. The sequence lives in the calling thread's shard. Raises
        SequenceExists, OutOfBlocks. (``_salt_key``, private: a salt already
        digested, as ``sequence_info`` reports it, for restoring a
        swapped-out sequence.)
        """
        cdef int64_t sid = _seq_id(seq_id)
        cdef int64_t salt_value = _salt_value(salt) if _salt_key is None else _salt_key
        cdef int64_t count = _count(num_tokens, "num_tokens", INT64_MAX)
        cdef cnp.ndarray toks = None
        cdef const int32_t* tptr = NULL
        cdef bint with_tokens = tokens is not None
        cdef ErrInfo err
        cdef int st
        if with_tokens:
            toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
            if count not in (0, cnp.PyArray_DIM(toks, 0)):
                raise ArgumentValueError(
                    f"num_tokens={count} disagrees with {cnp.PyArray_DIM(toks, 0)} tokens")
            count = cnp.PyArray_DIM(toks, 0)
            tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        if count > <int64_t>self._c.num_blocks * self.block_size:
            raise OutOfBlocks(f"{count} tokens need more blocks than the pool has ({self._c.num_blocks})")
        cdef cnp.ndarray slots = cnp.PyArray_EMPTY(1, [count], cnp.NPY_INT64, 0)
        cdef int64_t* sptr = <int64_t*>cnp.PyArray_DATA(slots)
        if count >= NOGIL_MIN_TOKENS:
            with nogil:
                st = self.c_add_sequence(sid, with_tokens, tptr, count, salt_value, sptr, &err)
        else:
            st = self.c_add_sequence(sid, with_tokens, tptr, count, salt_value, sptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return slots

    def append(self, seq_id, tokens_or_count):
        """Append tokens (an array of ids) or a count to one sequence; int64 slots."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t c
        if isinstance(tokens_or_count, (int, np.integer)) and not isinstance(tokens_or_count, (bool, np.bool_)):
            c = <int32_t>_count(tokens_or_count, "count", INT32_MAX)
            return self._append_batch(np.array([sid], dtype=np.int64), np.array([c], dtype=np.int32),
                                      None, None)
        toks = _index_array(tokens_or_count, cnp.NPY_INT32, "tokens")
        return self._append_batch(np.array([sid], dtype=np.int64),
                                  np.array([len(toks)], dtype=np.int32), toks, None)

    def append_batch(self, seq_ids, counts, tokens=None, *, out=None):
        """Append ``counts[i]`` tokens to ``seq_ids[i]`` for every i in one atomic step.

        The decode hot path: one call per step for all running sequences.
        ``counts`` may be one integer for every sequence. ``tokens``
        (optional) holds the appended token ids back to back; it is required
        exactly for sequences that keep token ids. Returns the int64 slot of
        every appended token, in order; ``out`` may be a reusable buffer. All
        or nothing; the GIL is released while the core works.
        """
        return self._append_batch(seq_ids, counts, tokens, out)

    def fork(self, src, dst):
        """Create sequence ``dst`` (in the calling thread's shard) sharing all of
        ``src``'s blocks and tokens.

        Appending into a shared, partly filled last block later copies it
        first (copy-on-write); see take_pending_copies().
        """
        cdef int64_t s = _seq_id(src, "src"), d = _seq_id(dst, "dst")
        cdef ErrInfo err
        cdef int st
        with nogil:
            st = self.c_fork(s, d, &err)
        if st != RF_OK:
            raise_status(st, &err)

    @cython.always_allow_keywords(False)
    def remove_sequence(self, seq_id):
        """Remove a sequence, dropping its reference on every block it holds."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef ErrInfo err
        # Releasing costs a few ns per block: cheaper than dropping the GIL.
        cdef int st = self.c_remove_sequence(sid, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def take_pending_copies(self):
        """Return and clear the queued copy-on-write copies: int32 (k, 2) of (src, dst),
        in the order they were made.

        Apply them (copy block src's K/V into dst) before writing new tokens.
        """
        return _take_pending(self)

    def take_evicted(self):
        """Return and clear the ids of sequences evicted since the last call (int64)."""
        cdef vector[int64_t] ids
        take_evicted(self._c, &ids)
        return _i64_from_vector(ids)

    # --- threads ----------------------------------------------------------------

    def bind_thread(self, shard):
        """Make ``shard`` the calling thread's shard for this manager: the sequences
        it adds and forks live there, and its calls take blocks from there. A
        thread that calls without binding gets one the first time (round robin)."""
        cdef int32_t s = <int32_t>_count(shard, "shard", INT32_MAX)
        cdef ErrInfo err
        if s >= self._c.nshards:
            err.id = s
            err.a = self._c.nshards
            raise_status(RF_NO_SHARD, &err)
        if self._c.nshards > 1 and rf_bind_thread(self._c, s):
            raise MemoryError("rocmforge: host memory exhausted")

    @property
    def thread_shard(self):
        """The calling thread's shard (see bind_thread)."""
        return home_shard(self._c).index

    # --- prefix cache --------------------------------------------------------

    def lookup_prefix(self, tokens, salt=None):
        """Number of leading tokens of ``tokens`` that are cached (whole blocks,
        verified), changing nothing."""
        cdef cnp.ndarray toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
        cdef int64_t salt_value = _salt_value(salt)
        cdef const int32_t* tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef int64_t n = cnp.PyArray_DIM(toks, 0), hit
        cdef ErrInfo err
        if not self.enable_prefix_caching:
            raise_status(RF_PREFIX_DISABLED, &err)
        with nogil:
            hit = self.c_lookup_prefix(tptr, n, salt_value)
        if hit < 0:
            raise MemoryError("rocmforge: host memory exhausted")
        return hit

    def acquire_prefix(self, tokens, salt=None, *, out=None):
        """Take the cached prefix of ``tokens`` for an engine that manages blocks
        itself: every hit block gains one external reference (drop it with
        decref). Returns the int32 ids, in order (a view of ``out`` when given:
        room for ``len(tokens) // block_size`` ids). Counts as a lookup in stats."""
        cdef cnp.ndarray toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
        cdef int64_t salt_value = _salt_value(salt)
        cdef int64_t n = cnp.PyArray_DIM(toks, 0), got = 0
        cdef cnp.ndarray ids = _out_array(out, n // self.block_size, cnp.NPY_INT32, "out")
        cdef const int32_t* tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef int32_t* iptr = <int32_t*>cnp.PyArray_DATA(ids)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_TOKENS:
            with nogil:
                st = self.c_acquire_prefix(tptr, n, salt_value, iptr, &got, &err)
        else:
            st = self.c_acquire_prefix(tptr, n, salt_value, iptr, &got, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(ids, got)

    def num_cached_tokens(self, seq_id):
        """Leading tokens of a sequence that add_sequence found in the prefix cache."""
        return self._token_count(seq_id, True)

    def reset_prefix_cache(self):
        """Empty the prefix index. Evictable cached blocks become free (in the
        calling thread's shard); blocks in use stay with their sequences
        (uncached). Emits AllCleared."""
        cdef ErrInfo err
        cdef int st
        if not self.enable_prefix_caching:
            raise_status(RF_PREFIX_DISABLED, &err)
        with nogil:
            st = call_reset_prefix(self._c)
        if st != RF_OK:
            raise_status(st, &err)

    def uncache_blocks(self, block_ids):
        """Take blocks out of the prefix index, each with every cached block whose
        prefix runs through it, so that no later sequence matches them: for blocks
        whose K/V never got written (a model step that raised, a copy that broke
        off). Call it before releasing the blocks. Blocks in use stay with their
        sequences, uncached; evictable ones become free (in the calling thread's
        shard); blocks not cached are skipped. Unlike reset_prefix_cache, the rest
        of the cache stays. Emits BlockRemoved for each key, and the blocks count
        in stats' cached_blocks_evicted. BlockNotFound, changing nothing, for an
        id outside the pool."""
        cdef cnp.ndarray arr = _index_array(block_ids, cnp.NPY_INT32, "block_ids", BlockNotFound)
        cdef const int32_t* ptr = <const int32_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef ErrInfo err
        cdef int st
        if not self.enable_prefix_caching:
            raise_status(RF_PREFIX_DISABLED, &err)
        with nogil:
            st = call_uncache(self._c, ptr, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    @property
    def num_cached_blocks(self):
        """Blocks in the prefix index (in use or evictable)."""
        cdef size_t n
        lock_prefix(self._c)
        n = self._c.pfx.index.count
        unlock_prefix(self._c)
        return n

    @property
    def num_evictable_blocks(self):
        """Cached blocks with refcount 0: reusable by a hit, reclaimable by allocation."""
        return self._c.pfx.num_evictable.get()

    @property
    def eviction_policy(self):
        """Name of the policy that orders evictable cached blocks."""
        return _POLICY_NAMES[self._c.policy]

    def take_events(self):
        """Return and clear the KV events recorded since the last call, in order:
        BlockStored, BlockRemoved and AllCleared (see rocmforge.events)."""
        cdef vector[KvEvent] evs
        lock_prefix(self._c)
        evs.swap(self._c.pfx.events)
        unlock_prefix(self._c)
        return _event_objects(evs)

    # --- tables and queries ------------------------------------------------------

    def block_table(self, seq_id):
        """The block ids of one sequence, in order (int32 copy)."""
        cdef int64_t sid = _seq_id(seq_id)
        return _tables(self, np.array([sid], dtype=np.int64), None, 0)

    def block_tables(self, seq_ids, out=None):
        """Tables of many sequences as an int32 [n, max_blocks] array padded with -1.

        vLLM's layout. ``out`` may be a reusable C-contiguous int32 [n, m]
        array with m at least the longest table; every row is padded to m.
        With several shards each table is read under its own shard's lock.
        """
        return _tables(self, seq_ids, out, 1)

    def csr_block_tables(self, seq_ids):
        """Tables in FlashInfer's CSR layout: (indptr, indices, last_page_len), all int32.

        ``indices[indptr[i]:indptr[i+1]]`` are the blocks of ``seq_ids[i]``;
        ``last_page_len[i]`` is the number of tokens in its last block
        (0 for an empty sequence).
        """
        return _tables(self, seq_ids, None, 2)

    @cython.always_allow_keywords(False)
    def num_tokens(self, seq_id):
        """Number of tokens in a sequence."""
        return self._token_count(seq_id, False)

    def sequence_tokens(self, seq_id):
        """The token ids of a sequence (int32 copy), or None if it was created without them."""
        return _sequence_tokens(self, _seq_id(seq_id))

    def sequence_info(self, seq_id):
        """A dict: seq_id, created_at, last_access (time.time() seconds), access_count,
        num_blocks, num_tokens, has_tokens, num_cached_tokens, salt_key (the
        64-bit digest of the sequence's salt that enters its block keys; 0 for
        none) and shard."""
        return _sequence_info(self, _seq_id(seq_id))

    def sequence_ids(self):
        """Ids of all sequences (int64): shard by shard, each least recently
        accessed first (with one shard, the manager's LRU order)."""
        return _sequence_ids(self)

    def __contains__(self, seq_id):
        if isinstance(seq_id, (bool, np.bool_)) or not hasattr(seq_id, "__index__"):
            return False
        value = seq_id.__index__()
        if value < 0 or value > INT64_MAX:
            return False
        cdef int64_t sid = value
        cdef bint found = False
        cdef Shard* x = lock_seq(self._c, sid)
        if x != NULL:
            found = seq_find(x, sid) != NO_SLOT
            x.lock.unlock()
        return found

    def __len__(self):
        cdef int64_t n = 0
        cdef int32_t s
        for s in range(self._c.nshards):
            n += self._c.shards[s].num_seqs.get()
        return n

    # --- pool ------------------------------------------------------------

    @property
    def num_blocks(self):
        """Blocks in the pool (grow and shrink change it)."""
        cdef int32_t n
        self._c.shards.lock.lock()      # it changes only while every lock is held
        n = self._c.num_blocks
        self._c.shards.lock.unlock()
        return n

    @property
    def host_cache_blocks(self):
        """Blocks the host tier holds at most (0: none); fixed at construction."""
        return self._c.pfx.host.capacity

    @property
    def num_free_blocks(self):
        """Blocks with refcount 0, all of which an allocation can take (free ones
        and, with prefix caching, evictable cached ones). Read without a lock."""
        return avail_total(self._c)

    @property
    def num_used_blocks(self):
        """Blocks with refcount > 0."""
        return self.num_blocks - avail_total(self._c)

    def stats(self):
        """Counters as a dict (see the README for their meaning). Read without
        taking a lock, so monitoring never stalls the threads that decode."""
        return _stats(self)

    def fragmentation_ratio(self):
        """Share of the span [0, highest occupied id] that is free: 0.0 when packed.
        Occupied blocks are those in use or cached."""
        return call_fragmentation(self._c)

    def memory_efficiency(self):
        """Share of the token slots in sequence-held blocks that hold tokens (1.0 when
        every block is full). Shared blocks count once; blocks held only through
        allocate()/incref() are not counted."""
        return _memory_efficiency(self)

    def should_compact(self, threshold=0.3):
        """True when fragmentation_ratio() exceeds ``threshold`` (in [0, 1])."""
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise ArgumentTypeError("threshold must be a number")
        if not 0.0 <= threshold <= 1.0:
            raise ArgumentValueError(f"threshold must be in [0, 1], got {threshold}")
        return self.fragmentation_ratio() > threshold

    def compact(self, *, num_blocks=None):
        """Move live blocks from the top of the pool into the lowest free ids.

        Afterwards occupied blocks (in use, and cached ones with prefix
        caching) fill the lowest ids. Every sequence table and the prefix
        index are rewritten; returns the moves as int32 (k, 2) of (old, new) so
        the data path can move K/V and callers can remap ids they hold through
        allocate()/incref(). With several shards, the free blocks are then
        given back to the shards in equal contiguous ranges. Refuses
        (KvCacheError) while copy-on-write copies are pending.

        With ``num_blocks`` the pool is then cut to that many blocks, in the
        same step: OutOfBlocks, changing nothing, when more blocks than that
        are occupied (a caller that sized new storage from an earlier count
        learns that others took blocks since).
        """
        cdef vector[int32_t] moves
        cdef ErrInfo err
        cdef int st
        cdef int32_t n = -1
        if num_blocks is not None:
            n = <int32_t>_count(num_blocks, "num_blocks", INT32_MAX)
            if n < 1:
                raise InvalidConfiguration("num_blocks must be >= 1")
            if n > self.num_blocks:
                raise InvalidConfiguration(f"compact into {n} > num_blocks={self.num_blocks}: use grow()")
        with nogil:
            st = call_compact(self._c, n, &moves, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _i32_from_vector(moves, 0, moves.size()).reshape(-1, 2)

    def shrink(self, num_blocks):
        """Reduce the pool to ``num_blocks``; every block being dropped must be free."""
        cdef int32_t n = <int32_t>_count(num_blocks, "num_blocks", INT32_MAX)
        cdef ErrInfo err
        cdef int st
        if n < 1:
            raise InvalidConfiguration("num_blocks must be >= 1")
        if n > self.num_blocks:
            raise InvalidConfiguration(f"shrink to {n} > num_blocks={self.num_blocks}: use grow()")
        with nogil:
            st = call_shrink(self._c, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def grow(self, num_blocks):
        """Enlarge the pool to ``num_blocks``; the new blocks are free (with several
        shards, given to the shards in equal contiguous ranges)."""
        cdef int32_t n = <int32_t>_count(num_blocks, "num_blocks", INT32_MAX)
        cdef int st
        if n < self.num_blocks:
            raise InvalidConfiguration(f"grow to {n} < num_blocks={self.num_blocks}: use shrink()")
        with nogil:
            st = call_grow(self._c, n)
        if st != RF_OK:
            raise MemoryError(f"cannot allocate bookkeeping for {n} blocks")

    def metadata_bytes(self):
        """Host memory held by the manager's own structures, in bytes (capacities)."""
        return _metadata_bytes(self)

    def check_invariants(self):
        """Recompute every derived quantity and raise InvariantError on any mismatch.

        Checks: refcount == table references + external references for every
        block; each shard's free set is exactly the unoccupied blocks homed
        there (every bitmap level); token counts match block counts; shared
        partly filled blocks have one fill level; the indexes, the directory
        and the LRU lists hold exactly the live sequences; counters agree with
        the pool; with prefix caching, the index, tree, policy lists and keys.
        """
        cdef char msg[512]
        cdef int bad
        with nogil:
            bad = call_check(self._c, msg, sizeof(msg))
        if bad:
            raise InvariantError(msg.decode("utf-8", "replace"))

    def __repr__(self):
        cached = f", cached={self.num_cached_blocks}" if self.enable_prefix_caching else ""
        shards = f", shards={self.num_shards}" if self.num_shards > 1 else ""
        return (f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"free={self.num_free_blocks}{cached}, sequences={len(self)}{shards})")


def _fail_allocation(int64_t n):
    """For tests: the n-th allocation the core makes from now on (in any
    manager of this process) fails as if host memory were exhausted; 0 disarms.
    Returns how many were left to count of the previous arming (0: it fired)."""
    return rf_fault_arm(n)


def block_keys(tokens, int block_size, salt=None):
    """The prefix-cache keys of the full blocks of ``tokens`` (int64, first to
    last): what a manager of this block size registers for them, and what its
    KV events carry (README, "Block keys"). A pure function, the same in every
    process: a router computes a request's keys with it."""
    cdef cnp.ndarray toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
    cdef int64_t salt_value = _salt_value(salt)
    cdef const int32_t* t = <const int32_t*>cnp.PyArray_DATA(toks)
    cdef int64_t n, j, parent = -1
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidConfiguration(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    n = cnp.PyArray_DIM(toks, 0) // block_size
    cdef cnp.ndarray keys = cnp.PyArray_EMPTY(1, [n], cnp.NPY_INT64, 0)
    cdef int64_t* out = <int64_t*>cnp.PyArray_DATA(keys)
    with nogil:
        for j in range(n):
            parent = rf_block_key(parent, salt_value, t + j * block_size, block_size, (1 << 63) - 1)
            out[j] = parent
    return keys
