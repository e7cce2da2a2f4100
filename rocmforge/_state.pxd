# cython: language_level=3
# The state of a BlockManager, declared from the C++ headers that lay it out
# (_rf_state.h and the headers it includes), with the status codes, error
# details and enums every part of the core shares. The functions that work on
# this state live in the sibling .pxd files, as inline functions:
#   _freeset.pxd  a shard's free blocks (bitmap)
#   _prefix.pxd   the prefix index and its eviction policies
#   _blocks.pxd   taking and releasing blocks, refcounts, shards and stealing
#   _seqs.pxd     sequence records, their index and LRU order
#   _append.pxd   append_batch (the decode step)
#   _seqops.pxd   add, fork, remove, eviction of sequences
#   _pool.pxd     compaction, shrink and grow
#   _checks.pxd   check_invariants

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libcpp.vector cimport vector

cdef extern from "_rf_state.h" nogil:
    # The lock of a shard (and of the prefix index, the queues and each
    # directory stripe with several shards); lock() may be called with or
    # without the GIL (it lets go of the GIL while it waits). Never held
    # across a Python call.
    cppclass rf_mutex:
        void lock()
        void unlock()
    # Counters written under a lock, readable without one.
    cppclass rf_count:
        int64_t get()
        void set(int64_t x)
        void add(int64_t d)
        void raise_to(int64_t x)
    cppclass rf_real:
        double get()
        void set(double x)
    # Sequence id -> record slot (or shard); see _rf_containers.h.
    cppclass rf_idmap:
        size_t count
    # A sequence's block table (keeps a copy of its last id); see _rf_containers.h.
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
    # A block's reference counts, side by side so one load brings both:
    # rc counts every reference (tables and external), ext the external ones.
    struct BlockRefs:
        int32_t rc
        int32_t ext
    # Per-block scratch for one operation, valid while mark == its tag.
    struct BlockScratch:
        uint64_t mark
        int32_t count               # times the operation names this block
        int32_t dec                 # references the operation would drop (eviction dry run)
    # One sequence; its blocks hold one reference each on the block pool. The
    # header lays it out with the fields a decode step uses in one cache line.
    cdef struct SeqRec:
        rf_table blocks
        int64_t num_tokens
        double last_access
        int64_t access_count
        int32_t lru_prev        # slot of the previous (older) sequence, -1 at the head
        uint32_t mark           # == low 32 bits of the shard's epoch while named by the running operation
        uint64_t sole_gen       # rf_sole_gen(): share_gen when its last block was seen held by it alone
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
    # Prefix-cache state of one block. A block is *registered* (serial != 0) when
    # the prefix index maps its key to it; a registered block's parent is
    # registered too, so every indexed chain is complete. A registered block with
    # refcount 0 is *evictable*: it sits in one of the policy's lists.
    struct PBlock:
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
    struct KvEvent:
        int32_t kind
        int32_t num_tokens
        int64_t key
        int64_t parent_key          # -1 for a chain's first block
        int32_t medium              # 0: the pool, 1: the host tier
    cppclass HostTier:
        int32_t capacity
        int32_t used
        int policy                  # POLICY_LRU: list 1 only; POLICY_ARC: lists 1 and 2
        int32_t head[3]             # per list (1: stored once, 2: reused), next to go first
        int32_t tail[3]
        int32_t len[3]
        double target               # ARC: the length list 1 aims at
        rf_idmap ghost[3]           # ARC: keys dropped from list 1 / 2 -> ring position
        vector[int64_t] ghost_ring[3]
        int64_t ghost_pos[3]
        vector[int32_t] lst         # per slot: the list holding it
        rf_idmap index              # key -> slot
        vector[int64_t] key         # per slot, -1 when free
        vector[int64_t] parent_key
        vector[int64_t] salt
        vector[int32_t] prev
        vector[int32_t] next
        vector[uint64_t] pin        # == op: matched by the running add_sequence, not to be reused
        uint64_t op
        vector[int32_t] free_slots
        vector[int32_t] tok         # block_size token ids per slot
        rf_count resident           # used, for readers without the lock
        rf_count hit_tokens
        rf_count offloaded
        rf_count reloaded
        rf_count dropped
    # A shard's free blocks: bit b of level 0 is set when block b is free here;
    # each summary level has a bit per non-empty word of the level below.
    cppclass FreeSet:
        vector[uint64_t] bits
        int levels
        int64_t level_off[8]
        int64_t low_word            # leaf words below it are all zero (no free block)
        rf_count num_free
    cppclass Shard:
        rf_mutex lock
        int32_t index
        FreeSet free
        # Sequences: records in reusable slots, an id -> slot index, an LRU list.
        vector[SeqRec] seqs
        vector[int32_t] free_slots
        rf_idmap ids
        rf_count num_seqs
        # Per batch position, the record slot append_batch found there: the
        # batch's own list of records, and a hint for the next batch. Engines
        # pass the same ids in the same order step after step, so the next batch
        # checks the hinted record's seq_id first and skips the hash lookup.
        vector[int32_t] batch_slots
        int32_t lru_head
        int32_t lru_tail
        uint64_t epoch              # operations run on this shard
        # Scratch of the operation holding the lock.
        vector[int32_t] tmp_blocks      # shared partly filled blocks a batch appends into
        vector[int64_t] tmp_slow        # (index, output offset) of batch items pass 2 appends
        vector[double] tmp_stamps       # last_access of each batch item before the batch
        vector[int64_t] tmp_moved       # batch items whose record is out of LRU order
        vector[int64_t] tmp_victims     # sequences an eviction dry run chose: shard << 32 | slot
        vector[int64_t] pending         # copy-on-write copies queued here: (number, src, dst)
        # Blocks whose refcount left 0 / reached 0 here, and the peak of their difference.
        rf_count total_allocations
        rf_count total_deallocations
        rf_count peak_allocations
        rf_count cow_copies
    # Prefix cache: key -> block index, per-block state, token copies (for
    # verifying every hit), the policy lists, ARC's target and ghost keys.
    cppclass PrefixState:
        rf_mutex lock
        rf_idmap index
        vector[PBlock] pb
        vector[int32_t] btok            # block_size token ids per registered block
        uint64_t serial
        int32_t ev_head[4]
        int32_t ev_tail[4]
        int32_t ev_len[4]
        rf_count num_evictable
        double arc_p                    # ARC: target length of lists 1 + 3
        double arc_hits                 # ARC: recent hits and ghost hits (decaying counts)
        double arc_ghost_hits
        uint64_t ev_clock               # counts blocks made evictable
        int32_t cold_anchor             # last block released to list 3 by the running release
        rf_idmap ghost[3]               # ARC: keys evicted from list 1 / list 2 -> ring position
        vector[int64_t] ghost_ring[3]
        int64_t ghost_pos[3]
        vector[int32_t] tmp_hits        # blocks an add_sequence found cached
        vector[int32_t] tmp_stack       # subtree walk when unregistering
        vector[KvEvent] events
        rf_count lookups                # add_sequence / acquire_prefix calls that consulted the index
        rf_count query_tokens
        rf_count hit_tokens
        rf_count blocks_evicted
        rf_count blocks_stored
        HostTier host                   # evicted prefix blocks in host memory (_host_tier.pxd)
    cppclass DirStripe:
        rf_mutex lock
        rf_idmap map
    cppclass Core:
        Core() except +
        int32_t num_blocks
        int32_t block_size
        int32_t nshards
        bint evict_sequences
        bint prefix
        bint events
        int policy
        int64_t key_mask
        # Block pool: refcount = references from sequence tables + external ones.
        vector[BlockRefs] refs
        vector[uint8_t] home            # several shards: the shard whose lock guards the block
        vector[BlockScratch] scratch
        Shard* shards
        PrefixState pfx
        rf_mutex q_lock                 # several shards: the evicted ids
        vector[int64_t] evicted
        DirStripe* dir                  # several shards: sequence id -> shard
        rf_count evictions
        rf_count shard_transfers
        rf_count compaction_count
        rf_real last_compaction_ms
        uint64_t id
        rf_idmap homes                  # several shards: thread -> shard
    enum:
        RF_DIR_STRIPES
        RF_MAX_SHARDS
    int rf_core_init(Core* c, int32_t nshards)
    int32_t rf_thread_home(Core* c)
    int rf_bind_thread(Core* c, int32_t s)
    uint64_t rf_share_gen(const Core* c)
    void rf_share_bump(Core* c)
    int64_t rf_copy_number(Core* c)

    int64_t rf_fault_arm(int64_t n)
    int rf_reserve[T](vector[T]& v, size_t n)
    int rf_reserve_exact[T](vector[T]& v, size_t n)
    int rf_resize[T](vector[T]& v, size_t n, const T& value)
    void rf_push[T](vector[T]& v, const T& x)
    void rf_append_n(vector[int32_t]& v, const int32_t* src, size_t n)
    void rf_append_n64(vector[int64_t]& v, const int64_t* src, size_t n)
    int rf_ctz64(uint64_t x)
    int rf_popcount64(uint64_t x)
    void rf_prefetch(const void* p)
    int32_t rf_idmap_find(const rf_idmap& m, int64_t key)
    int rf_idmap_reserve(rf_idmap& m, size_t n)
    int rf_idmap_put(rf_idmap& m, int64_t key, int32_t val)
    void rf_idmap_erase(rf_idmap& m, int64_t key)
    void rf_idmap_update(rf_idmap& m, int64_t key, int32_t val)
    void rf_idmap_clear(rf_idmap& m)
    void rf_idmap_prefetch(const rf_idmap& m, int64_t key)
    size_t rf_idmap_bytes(const rf_idmap& m)
    int64_t rf_block_key(int64_t parent, int64_t salt, const int32_t* t, int64_t n, int64_t mask)
    bint rf_tokens_equal(const int32_t* a, const int32_t* b, int64_t n)
    uint64_t rf_sole_gen(const SeqRec* s, uint64_t share_gen)
    int64_t rf_room(const SeqRec* s, int64_t bs)
    void rf_write_slots(int64_t* out, int64_t base, int64_t count)
    bint rf_early_take_allowed(const Core* c, const Shard* sh)
    Py_ssize_t rf_decode_runs(Core* c, Shard* sh, const int64_t* seq_ids, const int32_t* counts,
                              const int32_t* slots, Py_ssize_t i, Py_ssize_t n, uint32_t mark, double now,
                              int64_t* slots_out, int64_t* off, int64_t* early)

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
    RF_NO_SHARD = 18            # err.id = shard index outside [0, num_shards)
    RF_POOL_TOO_SMALL = 19      # err.a = occupied blocks, err.b = the pool size asked for
    RF_GLOBAL = 100             # internal: run again holding every lock (never returned)

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

cdef enum:
    MAX_BLOCK_SIZE = 1 << 20    # largest block the core accepts (slots stay far from int64 limits)
    NO_SLOT = -1                # "no record" in the LRU links and lookups
    PREFETCH_AHEAD = 8          # batch loops request the data of the item this far ahead
    KEYS_ON_STACK = 256         # prompts up to this many full blocks hash into a stack buffer
    GHOSTS_PER_BLOCK = 2        # ARC remembers 2 x num_blocks evicted keys per ghost list


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void push_event(Core* c, int32_t kind, int64_t key, int64_t parent_key, int32_t ntok,
                            int32_t medium) noexcept nogil:
    """Record a KV event when events are on (capacity reserved by the prefix
    index's reserve_registrations); medium 0 is the pool, 1 the host tier."""
    cdef KvEvent ev
    if not c.events:
        return
    ev.kind = kind
    ev.key = key
    ev.parent_key = parent_key
    ev.num_tokens = ntok
    ev.medium = medium
    rf_push(c.pfx.events, ev)


cdef inline void ghost_remember(rf_idmap& ghost, vector[int64_t]& ring, int64_t* pos, int64_t key) noexcept nogil:
    """ARC's ghost list: remember an evicted key at the ring's next position,
    forgetting the key it overwrites (the map is reserved for the ring's size)."""
    cdef int64_t cap = ring.size()
    cdef int64_t at = pos[0] % cap
    cdef int64_t old = ring[at]
    if old >= 0 and rf_idmap_find(ghost, old) == at:
        rf_idmap_erase(ghost, old)
    ring[at] = key
    rf_idmap_put(ghost, key, <int32_t>at)
    pos[0] += 1
