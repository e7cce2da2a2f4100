# cython: language_level=3
# Declarations of rocmforge's core, for Cython extensions that embed it.
#
# An engine written in Cython can `cimport rocmforge._core` and call the
# ``c_*`` methods of BlockManager directly, without the GIL: each takes the
# manager's lock itself, returns a Status code, and fills an ErrInfo with the
# offending id or sizes. Turn a non-zero status into the matching Python
# exception with ``raise_status`` once the GIL is held again.
# Pointers passed in are borrowed for the duration of the call only.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uint8_t
from libcpp.vector cimport vector
cimport cython

cdef extern from "_core_support.h" nogil:
    # Sequence id -> record slot; see _core_support.h.
    cppclass rf_idmap:
        size_t count
    # The manager's lock; lock() may be called with or without the GIL (it
    # lets go of the GIL while it waits). Never held across a Python call.
    cppclass rf_mutex:
        void lock()
        void unlock()
    # A block's reference counts, side by side so one load brings both:
    # rc counts every reference (tables and external), ext the external ones.
    struct BlockRefs:
        int32_t rc
        int32_t ext
    # A sequence's block table (keeps a copy of its last id); see _core_support.h.
    cppclass rf_table:
        size_t size()
        size_t capacity()
        size_t bytes()
        int32_t back()
        int32_t operator[](size_t i)
        const int32_t* data()
        void set(size_t i, int32_t b)
        void push(int32_t b)
        void pop()
        void clear()
        int reserve(size_t n)
    # One sequence; its blocks hold one reference each on the block pool. The
    # header lays it out with the fields a decode step uses in one cache line.
    cdef struct SeqRec:
        rf_table blocks
        int64_t num_tokens
        double last_access
        int64_t access_count
        int32_t lru_prev        # slot of the previous (older) sequence, -1 at the head
        uint32_t mark           # == low 32 bits of the manager epoch while named by the running operation
        uint64_t sole_gen       # rf_sole_gen(): manager's _share_gen when its last block was seen held by it alone
        int64_t seq_id          # -1 while the slot is free
        int32_t lru_next        # slot of the next (newer) sequence, -1 at the tail
        bint has_tokens
        vector[int32_t] tokens  # token ids, kept only when has_tokens
        vector[int64_t] keys    # content key of every full block (prefix caching, token sequences)
        double created_at
        int64_t salt            # salt of the first block's key
        int64_t cached_tokens   # leading tokens found in the prefix cache when it was added
        bint live
        bint cold               # ARC: its new cached blocks are released to the cold segment
        bint warm               # ARC: its new cached blocks count as reused (a returning prompt)

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
    RF_PREFIX_DISABLED = 17     # a prefix-caching call on a manager built without it

# Eviction policies for cached (refcount 0, still indexed) blocks.
cdef enum Policy:
    POLICY_LRU = 0              # one list; a released sequence's tail blocks go first
    POLICY_ARC = 1              # adaptive: first-use vs reused lists sized by ghost hits

# KV event kinds (take_events).
cdef enum EventKind:
    EV_STORED = 0
    EV_REMOVED = 1
    EV_CLEARED = 2

cdef struct ErrInfo:
    int64_t id
    int64_t a
    int64_t b

# Prefix-cache state of one block. A block is *registered* (serial != 0) when
# the prefix index maps its key to it; a registered block's parent is
# registered too, so every indexed chain is complete. A registered block with
# refcount 0 is *evictable*: it sits in one of the policy's lists.
cdef struct PBlock:
    int64_t key
    int64_t salt                # salt of a root block (parent == -1)
    uint64_t serial             # registration number, 0 when not registered
    uint64_t stamp              # when it last became evictable (policy clock)
    int32_t parent              # parent block, -1 for the first block of a chain
    int32_t child               # first registered child, -1 when none
    int32_t sib_prev            # siblings under the same parent
    int32_t sib_next
    int32_t ev_prev             # neighbours in the policy list (older / newer)
    int32_t ev_next
    uint8_t ev_list             # 0: not evictable, else which policy list holds it (1, 2 or 3)
    uint8_t hot                 # reused since it was registered (ARC sends it to list 2)
    uint8_t cold                # ARC, not sampled while thrashing: released to list 3

cdef struct KvEvent:
    int32_t kind
    int32_t num_tokens
    int64_t key
    int64_t parent_key          # -1 for a chain's first block

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
    int64_t prefix_lookups       # add_sequence calls that consulted the prefix index
    int64_t prefix_query_tokens  # tokens those calls asked for
    int64_t prefix_hit_tokens    # tokens served from cached blocks
    int64_t cached_blocks_evicted
    int64_t cached_blocks_stored

cdef int raise_status(int status, const ErrInfo* err) except -1

# final: internal cdef methods are called directly (and inlined), not through a vtable.
@cython.final
cdef class BlockManager:
    cdef rf_mutex _lock
    cdef readonly int32_t num_blocks
    cdef readonly int32_t block_size
    cdef readonly bint evict_sequences
    cdef readonly bint enable_prefix_caching
    cdef readonly bint enable_events
    cdef int _policy
    cdef int64_t _key_mask

    # Block pool: refcount = references from sequence tables + external ones.
    cdef vector[BlockRefs] _refs
    cdef vector[BlockScratch] _scratch
    cdef uint64_t _epoch
    # Bumped whenever a block already in use gains a reference (incref, fork),
    # so a record's sole_gen proves its partly filled last block unshared.
    # Prefix hits need no bump: they take full blocks only, never the partly
    # filled last block of a sequence.
    cdef uint64_t _share_gen
    cdef int32_t _num_free

    # Free set: a bitmap (bit set = free) with one summary level per 64x,
    # so the lowest free id is found in O(log64 n).
    cdef vector[uint64_t] _bits
    cdef int _levels
    cdef int64_t _level_off[8]
    cdef int64_t _low_word           # leaf words below it are all zero (no free block)

    # Sequences: records in reusable slots, an id -> slot index, an LRU list.
    cdef vector[SeqRec] _seqs
    cdef vector[int32_t] _free_slots
    cdef rf_idmap _index
    # Per batch position, the record slot append_batch found there: the
    # batch's own list of records, and a hint for the next batch. Engines
    # pass the same ids in the same order step after step, so the next batch
    # checks the hinted record's seq_id first and skips the hash lookup.
    cdef vector[int32_t] _batch_slots
    cdef int32_t _lru_head
    cdef int32_t _lru_tail

    # Operation scratch (used only with the lock held).
    cdef vector[int32_t] _tmp_blocks      # shared partly filled blocks a batch appends into
    cdef vector[int64_t] _tmp_slow        # (index, output offset) of batch items pass 2 appends
    cdef vector[double] _tmp_stamps       # last_access of each batch item before the batch
    cdef vector[int64_t] _tmp_moved       # batch items whose record is out of LRU order
    cdef vector[int32_t] _tmp_victims     # sequences an eviction dry run chose

    # Prefix cache: key -> block index, per-block state, token copies (for
    # verifying every hit), two policy lists, ARC's target and ghost keys.
    cdef rf_idmap _pindex
    cdef vector[PBlock] _pb
    cdef vector[int32_t] _btok            # block_size token ids per registered block
    cdef uint64_t _serial
    cdef int32_t _ev_head[4]
    cdef int32_t _ev_tail[4]
    cdef int32_t _ev_len[4]
    cdef int32_t _num_evictable
    cdef double _arc_p                    # ARC: target length of lists 1 + 3
    cdef double _arc_hits                 # ARC: recent hits and ghost hits (decaying counts)
    cdef double _arc_ghost_hits
    cdef uint64_t _ev_clock               # counts blocks made evictable
    cdef int32_t _cold_anchor             # last block released to list 3 by the running release
    cdef rf_idmap _ghost[3]               # ARC: keys evicted from list 1 / list 2 -> ring position
    cdef vector[int64_t] _ghost_ring[3]
    cdef int64_t _ghost_pos[3]
    cdef vector[int32_t] _tmp_hits        # blocks an add_sequence found cached
    cdef vector[int32_t] _tmp_stack       # subtree walk when unregistering
    cdef vector[KvEvent] _events

    # Outputs waiting to be taken by the caller.
    cdef vector[int32_t] _pending_copies   # flattened (src, dst) pairs
    cdef vector[int64_t] _evicted
    cdef Stats _stats

    # --- C API: takes the lock, never raises, safe without the GIL ---------
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

    # --- internals: the caller holds the lock ------------------------------
    cdef int _resize_pool(self, int32_t n) noexcept nogil
    cdef int _resize_prefix(self, int32_t n) noexcept nogil
    cdef void _bits_build(self) noexcept nogil
    cdef int64_t _bits_low_word(self) noexcept nogil
    cdef int32_t _bits_lowest(self) noexcept nogil
    cdef void _bits_set(self, int32_t b) noexcept nogil
    cdef void _bits_set_word(self, int64_t i, uint64_t bits) noexcept nogil
    cdef void _bits_set_summary(self, int64_t i) noexcept nogil
    cdef void _bits_clear_from(self, int level, int64_t i) noexcept nogil
    cdef int32_t _take_block(self) noexcept nogil
    cdef void _take_lowest(self, int32_t n, int32_t* out) noexcept nogil
    cdef void _release_block(self, int32_t b) noexcept nogil
    cdef void _release_cached(self, int32_t b) noexcept nogil
    cdef void _unref_plain(self, const int32_t* ids, size_t n) noexcept nogil
    cdef void _unref(self, int32_t b) noexcept nogil
    cdef void _unref_run(self, const int32_t* ids, Py_ssize_t n) noexcept nogil
    cdef void _ev_flush_tail(self, int32_t tail, uint64_t clock, int32_t linked) noexcept nogil
    cdef void _note_peak(self) noexcept nogil
    cdef uint64_t _next_epoch(self) noexcept nogil
    cdef BlockScratch* _scratch_at(self, int32_t b, uint64_t epoch) noexcept nogil
    cdef int32_t _find(self, int64_t seq_id) noexcept nogil
    cdef void _lru_unlink(self, int32_t slot) noexcept nogil
    cdef void _lru_push(self, int32_t slot) noexcept nogil
    cdef void _lru_insert_after(self, int32_t slot, int32_t anchor) noexcept nogil
    cdef void _lru_run_to_tail(self, int32_t first, int32_t last) noexcept nogil
    cdef void _touch(self, int32_t slot, double now) noexcept nogil
    cdef void _drop_sequence(self, int32_t slot) noexcept nogil
    cdef int _claim_slot(self, int32_t* slot_out, ErrInfo* err) noexcept nogil
    cdef int _unclaim_slot(self, int32_t slot, int status) noexcept nogil
    cdef void _open_sequence(self, int32_t slot, int64_t seq_id, bint has_tokens, double now) noexcept nogil
    cdef int _ensure_free(self, int64_t needed, uint64_t epoch, ErrInfo* err) noexcept nogil
    cdef bint _sole_last(self, SeqRec* s) noexcept nogil
    cdef void _append_apply(self, SeqRec* s, int64_t count, const int32_t* tokens,
                            int64_t* slots_out) noexcept nogil
    cdef void _append_blocks(self, SeqRec* s, int64_t count, const int32_t* tokens,
                             int64_t* slots_out) noexcept nogil
    cdef int _allocate_locked(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil
    cdef int _incref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int _decref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int _decref_status(self, int32_t b, ErrInfo* err) noexcept nogil
    cdef int _decref_plain(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil
    cdef int _add_sequence_locked(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                                  int64_t num_tokens, int64_t salt, const int64_t* keys,
                                  int64_t* slots_out, ErrInfo* err) noexcept nogil
    cdef int64_t _avail(self) noexcept nogil
    cdef int64_t _match_prefix(self, const int32_t* tokens, const int64_t* keys, int64_t nfull,
                               int64_t salt, int32_t* hits) noexcept nogil
    cdef int64_t* _hash_prompt(self, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                               int64_t* stack_keys, vector[int64_t]* heap_keys) noexcept nogil
    cdef void _ev_link_after(self, int32_t b, int lst, int32_t anchor) noexcept nogil
    cdef bint _arc_thrashing(self) noexcept nogil
    cdef bint _arc_calm(self) noexcept nogil
    cdef void _ev_unlink(self, int32_t b) noexcept nogil
    cdef int32_t _ev_victim(self) noexcept nogil
    cdef int64_t _take_cached(self, const int32_t* ids, int64_t n, bint external) noexcept nogil
    cdef void _ghost_add(self, int lst, int64_t key) noexcept nogil
    cdef void _ghost_check(self, int32_t b) noexcept nogil
    cdef void _event(self, int32_t kind, int64_t key, int64_t parent_key, int32_t ntok) noexcept nogil
    cdef void _unregister_tree(self, int32_t b) noexcept nogil
    cdef int32_t _cached_parent(self, SeqRec* s, int64_t j) noexcept nogil
    cdef void _register_block(self, SeqRec* s, int64_t j) noexcept nogil
    cdef void _register_full(self, SeqRec* s, int64_t from_block) noexcept nogil
    cdef int _reserve_registrations(self, int64_t n) noexcept nogil
    cdef void _move_block(self, int32_t src, int32_t dst) noexcept nogil
    cdef bint _occupied(self, int32_t b) noexcept nogil
    cdef void _reset_prefix_locked(self) noexcept nogil
    cdef int _check_prefix_locked(self, char* msg, size_t cap) noexcept nogil
    cdef Py_ssize_t _decode_runs(self, const int64_t* seq_ids, const int32_t* counts, const int32_t* slots, Py_ssize_t i, Py_ssize_t n, uint32_t mark, double now, int64_t* slots_out, int64_t* off, int64_t* early) noexcept nogil
    cdef bint _hint_holds(self, int32_t slot, int64_t seq_id) noexcept nogil
    cdef bint _early_take_allowed(self) noexcept nogil
    cdef void _took_from_word(self, int64_t word, int64_t k) noexcept nogil
    cdef int _append_room(self, int64_t needed, int64_t early, int64_t regs, uint64_t epoch, ErrInfo* err) noexcept nogil
    cdef void _append_undo(self, const int32_t* slots, const int32_t* counts, Py_ssize_t done, Py_ssize_t stamped) noexcept nogil
    cdef int _append_batch_locked(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                                  bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                                  ErrInfo* err) noexcept nogil
    cdef int _fork_locked(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil
    cdef int _compact_locked(self, vector[int32_t]* moves, ErrInfo* err) noexcept nogil
    cdef int _shrink_locked(self, int32_t n, ErrInfo* err) noexcept nogil
    cdef int _check_locked(self, char* msg, size_t cap) noexcept nogil
    cdef int _gather_tables(self, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                            vector[int64_t]* lens, ErrInfo* err) noexcept nogil
    cdef int _gather_tables_locked(self, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                                   vector[int64_t]* lens, ErrInfo* err) noexcept nogil
    cdef int64_t _token_count(self, object seq_id, bint cached) except -1
    cdef object _append_batch(self, object seq_ids, object counts, object tokens, object out)
