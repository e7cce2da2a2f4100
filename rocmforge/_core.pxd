# cython: language_level=3
# Declarations of rocmforge's core, for Cython extensions that embed it.
#
# An engine written in Cython can `cimport rocmforge._core` and call the
# ``c_*`` methods of BlockManager directly, without the GIL: each takes the
# manager's lock itself, returns a Status code, and fills an ErrInfo with the
# offending id or sizes. Turn a non-zero status into the matching Python
# exception with ``raise_status`` once the GIL is held again.
# Pointers passed in are borrowed for the duration of the call only.

from libc.stdint cimport int32_t, int64_t, uint64_t
from libcpp.vector cimport vector
cimport cython

cdef extern from "_core_support.h" nogil:
    # Sequence id -> record slot; see _core_support.h.
    cppclass rf_idmap:
        size_t count

cdef enum Status:
    RF_OK = 0
    RF_OUT_OF_BLOCKS = 1        # err.a = blocks needed, err.b = blocks available
    RF_SEQ_NOT_FOUND = 2        # err.id = sequence id
    RF_SEQ_EXISTS = 3           # err.id = sequence id
    RF_BLOCK_NOT_FOUND = 4      # err.id = block id
    RF_BLOCK_FREE = 5           # err.id = block id (incref/decref of a free block)
    RF_NO_EXTERNAL_REF = 6      # err.id = block id (decref of a block only tables hold)
    RF_REFCOUNT_OVERFLOW = 7    # err.id = block id
    RF_DUPLICATE_SEQ = 8        # err.id = sequence id named twice in one batch
    RF_NEGATIVE_COUNT = 9       # err.id = sequence id, err.a = count
    RF_TOKENS_REQUIRED = 10     # err.id = sequence id (it tracks tokens)
    RF_TOKENS_UNEXPECTED = 11   # err.id = sequence id (it tracks counts only)
    RF_BLOCK_IN_USE = 12        # err.id = block id that prevents a shrink
    RF_NO_MEMORY = 13           # host memory exhausted
    RF_TOO_MANY_SEQUENCES = 14  # err.a = limit
    RF_INVALID_ARGUMENT = 15    # err.id = offending value (negative id or count)
    RF_PENDING_COPIES = 16      # err.a = copies not yet taken (compact/shrink need none)

cdef struct ErrInfo:
    int64_t id
    int64_t a
    int64_t b

# One sequence. Its blocks hold one reference each on the block pool.
cdef struct SeqRec:
    int64_t seq_id
    int64_t num_tokens
    vector[int32_t] blocks
    vector[int32_t] tokens      # token ids, kept only when has_tokens
    bint has_tokens
    bint live
    double created_at
    double last_access
    int64_t access_count
    int32_t lru_prev            # slot of the previous (older) sequence, -1 at the head
    int32_t lru_next            # slot of the next (newer) sequence, -1 at the tail
    uint64_t mark               # == manager epoch while named by the running operation

# Per-block scratch for one operation, valid while mark == manager epoch.
cdef struct BlockScratch:
    uint64_t mark
    int32_t count               # times the operation names this block
    int32_t dec                 # references the operation would drop (eviction dry run)

cdef struct Stats:
    int64_t total_allocations
    int64_t total_deallocations
    int64_t peak_allocations
    int64_t evictions
    int64_t cow_copies
    int64_t compaction_count
    double last_compaction_ms

cdef int raise_status(int status, const ErrInfo* err) except -1

# final: internal cdef methods are called directly (and inlined), not through a vtable.
@cython.final
cdef class BlockManager:
    cdef cython.pymutex _lock
    cdef readonly int32_t num_blocks
    cdef readonly int32_t block_size
    cdef readonly bint evict_sequences

    # Block pool: refcount = references from sequence tables + external ones.
    cdef vector[int32_t] _refcnt
    cdef vector[int32_t] _extref
    cdef vector[BlockScratch] _scratch
    cdef uint64_t _epoch
    cdef int32_t _num_free

    # Free set: a bitmap (bit set = free) with one summary level per 64x,
    # so the lowest free id is found in O(log64 n).
    cdef vector[uint64_t] _bits
    cdef int _levels
    cdef int64_t _level_off[8]

    # Sequences: records in reusable slots, an id -> slot index, an LRU list.
    cdef vector[SeqRec] _seqs
    cdef vector[int32_t] _free_slots
    cdef rf_idmap _index
    cdef int32_t _lru_head
    cdef int32_t _lru_tail

    # Operation scratch (used only with the lock held).
    cdef vector[int32_t] _tmp_slots       # record slots named by a batch
    cdef vector[int32_t] _tmp_blocks      # shared partly filled blocks a batch appends into
    cdef vector[int32_t] _tmp_victims     # sequences an eviction dry run chose

    # Outputs waiting to be taken by the caller.
    cdef vector[int32_t] _pending_copies   # flattened (src, dst) pairs
    cdef vector[int64_t] _evicted
    cdef Stats _stats

    # --- C API: takes the lock, never raises, safe without the GIL ---------
    cdef int c_allocate(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil
    cdef int c_incref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int c_decref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int c_add_sequence(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                            int64_t num_tokens, int64_t* slots_out, ErrInfo* err) noexcept nogil
    cdef int c_append_batch(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                            bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil
    cdef int c_fork(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil
    cdef int c_remove_sequence(self, int64_t seq_id, ErrInfo* err) noexcept nogil

    # --- internals: the caller holds the lock ------------------------------
    cdef int _resize_pool(self, int32_t n) noexcept nogil
    cdef void _bits_build(self) noexcept nogil
    cdef int32_t _bits_lowest(self) noexcept nogil
    cdef void _bits_set(self, int32_t b) noexcept nogil
    cdef void _bits_clear_from(self, int level, int64_t i) noexcept nogil
    cdef int32_t _take_block(self) noexcept nogil
    cdef void _take_lowest(self, int32_t n, int32_t* out) noexcept nogil
    cdef void _release_block(self, int32_t b) noexcept nogil
    cdef void _unref(self, int32_t b) noexcept nogil
    cdef void _note_peak(self) noexcept nogil
    cdef uint64_t _next_epoch(self) noexcept nogil
    cdef BlockScratch* _scratch_at(self, int32_t b, uint64_t epoch) noexcept nogil
    cdef int32_t _find(self, int64_t seq_id) noexcept nogil
    cdef void _lru_unlink(self, int32_t slot) noexcept nogil
    cdef void _lru_push(self, int32_t slot) noexcept nogil
    cdef void _touch(self, int32_t slot, double now) noexcept nogil
    cdef void _drop_sequence(self, int32_t slot) noexcept nogil
    cdef int _claim_slot(self, int32_t* slot_out, ErrInfo* err) noexcept nogil
    cdef int _unclaim_slot(self, int32_t slot, int status) noexcept nogil
    cdef void _open_sequence(self, int32_t slot, int64_t seq_id, bint has_tokens, double now) noexcept nogil
    cdef int _ensure_free(self, int64_t needed, uint64_t epoch, ErrInfo* err) noexcept nogil
    cdef void _append_apply(self, SeqRec* s, int64_t count, const int32_t* tokens,
                            int64_t* slots_out) noexcept nogil
    cdef int _allocate_locked(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil
    cdef int _incref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int _decref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int _add_sequence_locked(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                                  int64_t num_tokens, int64_t* slots_out, ErrInfo* err) noexcept nogil
    cdef int _append_batch_locked(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                                  bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                                  ErrInfo* err) noexcept nogil
    cdef int _fork_locked(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil
    cdef int _compact_locked(self, vector[int32_t]* moves, ErrInfo* err) noexcept nogil
    cdef int _shrink_locked(self, int32_t n, ErrInfo* err) noexcept nogil
    cdef int _check_locked(self, char* msg, size_t cap) noexcept nogil
    cdef int _gather_tables(self, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                            vector[int64_t]* lens, ErrInfo* err) noexcept nogil
    cdef object _append_batch(self, object seq_ids, object counts, object tokens, object out)
