# cython: language_level=3
# Declarations of rocmforge's core, for Cython extensions that embed it.
#
# An engine written in Cython can `cimport rocmforge._core` and call the
# ``c_*`` methods of BlockManager directly, without the GIL: each takes the
# locks it needs itself, returns a Status code, and fills an ErrInfo with the
# offending id or sizes. Turn a non-zero status into the matching Python
# exception with ``raise_status`` once the GIL is held again.
# Pointers passed in are borrowed for the duration of the call only.
#
# The manager's state (Core) and the statuses are declared in _state.pxd;
# the functions that work on them in its sibling .pxd files.

from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector
cimport cython

from rocmforge._state cimport (
    Core, Shard, SeqRec, BlockRefs, ErrInfo, Status, RF_OK, RF_OUT_OF_BLOCKS, RF_SEQ_NOT_FOUND,
    RF_SEQ_EXISTS, RF_BLOCK_NOT_FOUND, RF_BLOCK_FREE, RF_NO_EXTERNAL_REF, RF_REFCOUNT_OVERFLOW,
    RF_DUPLICATE_SEQ, RF_NEGATIVE_COUNT, RF_TOKENS_REQUIRED, RF_TOKENS_UNEXPECTED, RF_BLOCK_IN_USE,
    RF_NO_MEMORY, RF_TOO_MANY_SEQUENCES, RF_INVALID_ARGUMENT, RF_PENDING_COPIES, RF_PREFIX_DISABLED,
    RF_NO_SHARD, Policy, POLICY_LRU, POLICY_ARC, EventKind, EV_STORED, EV_REMOVED, EV_CLEARED)

cdef int raise_status(int status, const ErrInfo* err) except -1

# final: internal cdef methods are called directly (and inlined), not through a vtable.
@cython.final
cdef class BlockManager:
    cdef Core* _c
    cdef readonly int32_t block_size
    cdef readonly bint evict_sequences
    cdef readonly bint enable_prefix_caching
    cdef readonly bint enable_events
    cdef readonly int32_t num_shards

    # --- C API: takes the locks, never raises, safe without the GIL ---------
    cdef int c_allocate(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil
    cdef int c_incref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int c_decref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int c_add_sequence(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                            int64_t num_tokens, int64_t salt, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil
    cdef int64_t c_lookup_prefix(self, const int32_t* tokens, int64_t num_tokens,
                                 int64_t salt) noexcept nogil
    cdef int c_acquire_prefix(self, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                              int32_t* ids_out, int64_t* num_out, ErrInfo* err) noexcept nogil
    cdef int c_append_batch(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                            bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil
    cdef int c_fork(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil
    cdef int c_remove_sequence(self, int64_t seq_id, ErrInfo* err) noexcept nogil
    cdef bint c_has_pending_copies(self) noexcept nogil

    # --- helpers of the Python API ------------------------------------------------
    cdef int64_t _token_count(self, object seq_id, bint cached) except -1
    cdef object _append_batch(self, object seq_ids, object counts, object tokens, object out)
