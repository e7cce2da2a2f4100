/* rocmforge core, C++ side: the state of a BlockManager, as structs whose
 * layout Cython cannot control (alignment, atomics, C++ members). The
 * functions that work on them are Cython inline functions in the sibling
 * .pxd files; each field's meaning is documented beside its Cython
 * declaration there.
 *
 * A manager is one Core: the block pool's per-block state (refcounts, home
 * shard, scratch), its shards, the prefix index, and the queues callers take
 * from (copy-on-write copies, evicted ids). Each Shard has its own lock, its
 * own sequences and its own free blocks. */
#ifndef ROCMFORGE_RF_STATE_H
#define ROCMFORGE_RF_STATE_H

#include "_rf_containers.h"
#include "_rf_freeset.h"
#include "_rf_keys.h"

/* A block's reference counts: rc counts every reference (sequence tables
 * and external ones), ext the external ones. Side by side, so decref and
 * allocate touch one cache line per block. */
struct BlockRefs {
    int32_t rc;
    int32_t ext;
};

/* Per-block scratch for one operation, valid while mark == the operation's tag. */
struct BlockScratch {
    uint64_t mark;
    int32_t count;
    int32_t dec;
};

/* One sequence's record (declared here because Cython cannot align a struct).
 * The first 64-byte line holds every field a decode step reads or writes, so
 * append_batch over 256 running sequences touches 16 KiB of records, which
 * stays in L1, instead of 2-3 lines per record. The rest is read by slower
 * calls. Field meanings are documented beside the Cython declaration in
 * _core.pxd. */
struct alignas(64) SeqRec {
    /* hot: decode */
    rf_table blocks;
    int64_t num_tokens;
    double last_access;
    int64_t access_count;
    int32_t lru_prev;
    uint32_t mark;
    uint64_t sole_gen;
    int64_t seq_id;
    /* cold */
    int32_t lru_next;
    int has_tokens;
    std::vector<int32_t> tokens;
    std::vector<int64_t> keys;
    double created_at;
    int64_t salt;
    int64_t cached_tokens;
    int live;
    int cold;
    int warm;
};
static_assert(offsetof(SeqRec, lru_next) == 64, "decode fields must fill the first cache line");

/* The sole_gen that proves a record alone holds its last block under the
 * manager's share_gen. A sequence with token ids has the top bit set as well
 * (share_gen never reaches it), so the decode run, which appends counts only,
 * never takes one: its sole_gen test covers has_tokens too. */
static inline uint64_t rf_sole_gen(const SeqRec *s, uint64_t share_gen) noexcept {
    return share_gen | ((uint64_t)(s->has_tokens != 0) << 63);
}

/* Free token slots in the sequence's last block (0 when full or without blocks). */
static inline int64_t rf_room(const SeqRec *s, int64_t bs) noexcept {
    return (int64_t)s->blocks.len * bs - s->num_tokens;
}

/* The slots of count >= 1 consecutive tokens from slot `base` (a decode
 * step's single token skips the loop). */
static inline void rf_write_slots(int64_t *out, int64_t base, int64_t count) noexcept {
    out[0] = base;
    for (int64_t j = 1; j < count; j++) out[j] = base + j;
}

/* Prefix-cache state of one block (see _prefix.pxd). */
struct PBlock {
    int64_t key;
    int64_t salt;
    uint64_t serial;
    uint64_t stamp;
    int32_t parent;
    int32_t child;
    int32_t sib_prev;
    int32_t sib_next;
    int32_t ev_prev;
    int32_t ev_next;
    uint8_t ev_list;
    uint8_t hot;
    uint8_t cold;
};

struct KvEvent {
    int32_t kind;
    int32_t num_tokens;
    int64_t key;
    int64_t parent_key;
    int32_t medium;             /* 0: the GPU pool (the cache's own storage), 1: the host tier */
};

/* The host tier: prefix blocks evicted from the pool, kept in host memory
 * slots, keyed like the index and verified the same way (tokens, and the
 * parent's key or the salt); LRU order from head (next to go) to tail. Sized
 * once, so that storing a block never allocates. Guarded with the prefix index. */
struct HostTier {
    int32_t capacity = 0;
    int32_t used = 0;
    int policy = 0;                     /* POLICY_LRU: list 1 only; POLICY_ARC: lists 1 and 2 */
    int32_t head[3] = {-1, -1, -1};     /* per list (1: stored once, 2: reused), next to go first */
    int32_t tail[3] = {-1, -1, -1};
    int32_t len[3] = {0, 0, 0};
    double target = 0;                  /* ARC: the length list 1 aims at */
    rf_idmap ghost[3];                  /* ARC: keys dropped from list 1 / 2 -> ring position */
    std::vector<int64_t> ghost_ring[3];
    int64_t ghost_pos[3] = {0, 0, 0};
    std::vector<int32_t> lst;           /* per slot: the list holding it */
    rf_idmap index;                     /* key -> slot */
    std::vector<int64_t> key;           /* per slot; -1 when free */
    std::vector<int64_t> parent_key;    /* -1 for a chain's first block */
    std::vector<int64_t> salt;
    std::vector<int32_t> prev, next;    /* LRU links */
    std::vector<uint64_t> pin;          /* == op: matched by the running add_sequence, not to be reused */
    uint64_t op = 1;
    std::vector<int32_t> free_slots;
    std::vector<int32_t> tok;           /* block_size token ids per slot */
    rf_count resident;                  /* used, for readers without the lock */
    rf_count hit_tokens;
    rf_count offloaded;
    rf_count reloaded;
    rf_count dropped;
};

/* One shard: a lock, the sequences homed here, the free blocks it hands
 * out, the scratch of the operation holding its lock, and its counters.
 * Aligned so that two shards never share a cache line. */
struct alignas(64) Shard {
    rf_mutex lock;
    int32_t index = 0;
    FreeSet free;
    std::vector<SeqRec> seqs;
    std::vector<int32_t> free_slots;
    rf_idmap ids;
    std::vector<int32_t> batch_slots;
    int32_t lru_head = -1;
    int32_t lru_tail = -1;
    uint64_t epoch = 0;
    std::vector<int32_t> tmp_blocks;
    std::vector<int64_t> tmp_slow;
    std::vector<double> tmp_stamps;
    std::vector<int64_t> tmp_moved;
    std::vector<int64_t> tmp_victims;
    std::vector<int64_t> pending;       /* copy-on-write copies: (number, src, dst) triples */
    /* What stats() and len() read without the lock, on a line of its own: a
     * monitoring thread reading it takes nothing else from the shard's owner. */
    alignas(64) rf_count total_allocations;
    rf_count total_deallocations;
    rf_count peak_allocations;
    rf_count cow_copies;
    rf_count num_seqs;
};

/* The prefix index shared by every shard (see _prefix.pxd). */
struct PrefixState {
    rf_mutex lock;
    rf_idmap index;
    std::vector<PBlock> pb;
    std::vector<int32_t> btok;
    uint64_t serial = 0;
    int32_t ev_head[4] = {-1, -1, -1, -1};
    int32_t ev_tail[4] = {-1, -1, -1, -1};
    int32_t ev_len[4] = {0, 0, 0, 0};
    rf_count num_evictable;
    double arc_p = 0;
    double arc_hits = 0;
    double arc_ghost_hits = 0;
    uint64_t ev_clock = 0;
    int32_t cold_anchor = -1;
    rf_idmap ghost[3];
    std::vector<int64_t> ghost_ring[3];
    int64_t ghost_pos[3] = {0, 0, 0};
    std::vector<int32_t> tmp_hits;
    std::vector<int32_t> tmp_stack;
    std::vector<KvEvent> events;
    rf_count lookups;
    rf_count query_tokens;
    rf_count hit_tokens;
    rf_count blocks_evicted;
    rf_count blocks_stored;
    HostTier host;
};

/* One stripe of the sequence directory (id -> shard) of a manager with
 * several shards: stripes are chosen by id, so adds and removals in
 * different threads rarely meet. */
struct alignas(64) DirStripe {
    rf_mutex lock;
    rf_idmap map;
};

enum { RF_DIR_STRIPES = 64, RF_MAX_SHARDS = 64 };

/* A manager's whole state. Allocated on its own (not inside the Python
 * object), so that the groups written by different threads start on cache
 * lines of their own: a thread taking the prefix index's lock or bumping a
 * counter must not evict the read-mostly fields every decode step reads. */
struct Core {
    /* read-mostly: set at creation, changed only while every lock is held */
    int32_t num_blocks = 0;
    int32_t block_size = 0;
    int32_t nshards = 1;
    int evict_sequences = 0;
    int prefix = 0;
    int events = 0;
    int policy = 0;
    int64_t key_mask = 0;
    std::vector<BlockRefs> refs;
    std::vector<uint8_t> home;
    std::vector<BlockScratch> scratch;
    Shard *shards = nullptr;
    DirStripe *dir = nullptr;
    uint64_t id = 0;
    /* bumped by forks and increfs, read by every decode step */
    alignas(64) std::atomic<uint64_t> share_gen{1};
    std::atomic<uint64_t> copy_seq{0};
    alignas(64) PrefixState pfx;
    alignas(64) rf_mutex q_lock;
    std::vector<int64_t> evicted;
    alignas(64) rf_count evictions;
    rf_count shard_transfers;           /* free blocks moved from one shard to another */
    rf_count compaction_count;
    rf_real last_compaction_ms;
    alignas(64) rf_mutex home_lock;     /* several shards: the two below */
    rf_idmap homes;                     /* thread -> shard */
    int32_t next_home = 0;

    Core() = default;
    Core(const Core &) = delete;
    Core &operator=(const Core &) = delete;
    ~Core() {
        delete[] shards;
        delete[] dir;
    }
};

/* Make nshards shards (and, with more than one, the directory); -1 when
 * memory is exhausted. */
static inline int rf_core_init(Core *c, int32_t nshards) noexcept {
    static std::atomic<uint64_t> ids{0};
    try {
        c->shards = new Shard[nshards];
        if (nshards > 1) c->dir = new DirStripe[RF_DIR_STRIPES];
    } catch (...) {
        return -1;
    }
    for (int32_t s = 0; s < nshards; s++) c->shards[s].index = s;
    c->nshards = nshards;
    c->id = ids.fetch_add(1) + 1;
    return 0;
}

/* Several shards: the home shard of the calling thread. A thread is given
 * one the first time it calls the manager (round robin) unless it was bound
 * with rf_bind_thread; each thread remembers its last few in a small cache,
 * so the lookup costs a compare on the hot path. */
struct rf_home_entry {
    uint64_t core_id;
    int32_t shard;
};

enum { RF_HOME_CACHE = 4 };

static inline rf_home_entry *rf_home_cache(uint64_t core_id) noexcept {
    static thread_local rf_home_entry cache[RF_HOME_CACHE];
    return &cache[core_id % RF_HOME_CACHE];
}

/* A number for the calling thread, never given to another (a pthread id is
 * reused once its thread has been joined). */
static inline int64_t rf_thread_key() noexcept {
    static std::atomic<int64_t> threads{0};
    static thread_local int64_t key = 0;
    if (key == 0) key = threads.fetch_add(1) + 1;
    return key;
}

static inline int32_t rf_thread_home_slow(Core *c, rf_home_entry *e) noexcept {
    int64_t key = rf_thread_key();
    int32_t s;
    c->home_lock.lock();
    s = rf_idmap_find(c->homes, key);
    if (s < 0) {
        s = c->next_home;
        if (rf_idmap_put(c->homes, key, s) == 0) c->next_home = (s + 1) % c->nshards;
    }
    c->home_lock.unlock();
    e->core_id = c->id;
    e->shard = s;
    return s;
}

static inline int32_t rf_thread_home(Core *c) noexcept {
    rf_home_entry *e = rf_home_cache(c->id);
    if (e->core_id == c->id) return e->shard;
    return rf_thread_home_slow(c, e);
}

/* Bind the calling thread to shard s; -1 when memory is exhausted. */
static inline int rf_bind_thread(Core *c, int32_t s) noexcept {
    int st;
    c->home_lock.lock();
    st = rf_idmap_put(c->homes, rf_thread_key(), s);
    c->home_lock.unlock();
    if (st == 0) {
        rf_home_entry *e = rf_home_cache(c->id);
        e->core_id = c->id;
        e->shard = s;
    }
    return st;
}

/* share_gen: bumped whenever a block in use gains a reference (incref, fork),
 * so a record's sole_gen proves its partly filled last block unshared. With
 * several shards two bumps may race, so they are atomic increments. */
static inline uint64_t rf_share_gen(const Core *c) noexcept {
    return c->share_gen.load(std::memory_order_relaxed);
}

/* The number of a new copy-on-write copy: copies queued by different shards
 * are handed out in the order they were made. */
static inline int64_t rf_copy_number(Core *c) noexcept {
    if (c->nshards == 1) {
        uint64_t n = c->copy_seq.load(std::memory_order_relaxed) + 1;
        c->copy_seq.store(n, std::memory_order_relaxed);
        return (int64_t)n;
    }
    return (int64_t)c->copy_seq.fetch_add(1, std::memory_order_relaxed) + 1;
}

static inline void rf_share_bump(Core *c) noexcept {
    if (c->nshards == 1)
        c->share_gen.store(c->share_gen.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    else
        c->share_gen.fetch_add(1, std::memory_order_relaxed);
}

/* Free blocks the decode run may take for steps into a full last block:
 * the free bits of one leaf word of the manager's bitmap (block ids from
 * base), lowest first, as sequential appends would take them. The run
 * clears each bit it takes, sets the block's refcount to 1 and counts it in
 * `taken`; the caller accounts for them afterwards. An empty word supplies
 * nothing. */
struct rf_supply {
    uint64_t *word;
    int64_t base;
    BlockRefs *refs;
    int64_t taken;
};

/* The decode run's step into a full last block: push a fresh block from the
 * supply and return its room (bs), or 0 when the step is not one the run
 * takes (room left, count outside [1, bs], supply empty, table full). Out
 * of line, so the run's common path keeps its registers. */
static inline __attribute__((noinline)) int64_t rf_fresh_block(SeqRec *s, int64_t c, int64_t bs,
                                                        rf_supply *supply) noexcept {
    uint64_t w = *supply->word;
    if (rf_room(s, bs) != 0 || c < 1 || c > bs || w == 0 || s->blocks.len >= s->blocks.capacity())
        return 0;
    int32_t b = (int32_t)(supply->base + rf_ctz64(w));
    *supply->word = w & (w - 1);
    supply->refs[b].rc = 1;
    supply->taken++;
    s->blocks.push(b);
    return bs;
}

/* append_batch's decode fast path, from item i up to n. While an item
 * names the record its batch position named last time (slots[i], the hint,
 * which always indexes an existing record), that record is not yet marked
 * by this batch and follows the previous item's record (`prev`) in the LRU
 * list, and the item appends either count >= 1 tokens into a last block
 * that the record alone holds and that has room for them (a sole_gen equal
 * to share_gen also says the sequence keeps no token ids), or up to bs
 * tokens after a full last block (rf_fresh_block): mark and stamp the
 * record (its old stamp saved in old[i]), write the tokens' slots at *off
 * and count the tokens. Returns the first item it did not take, for
 * append_batch's general loop. A negative id needs no test: it can only
 * match a free record, which has no room. A few registers do here what the
 * general loop spills to the stack. */
static inline __attribute__((noinline)) Py_ssize_t rf_decode_run(SeqRec *recs, const int64_t *seq_ids, const int32_t *counts,
                                      const int32_t *slots, Py_ssize_t i, Py_ssize_t n,
                                      uint32_t mark, uint64_t share_gen, int64_t bs, int32_t prev,
                                      rf_supply *supply, double now, double *old,
                                      int64_t *slots_out, int64_t *off) noexcept {
    int64_t *out = slots_out + *off;
    for (; i < n; i++) {
        int32_t slot = slots[i];
        SeqRec *s = &recs[slot];
        int64_t c = counts[i], nt = s->num_tokens;
        int64_t room = rf_room(s, bs);
        if (s->seq_id != seq_ids[i] || s->mark == mark || s->sole_gen != share_gen ||
            s->lru_prev != prev)
            break;
        if ((uint64_t)(c - 1) >= (uint64_t)room) {   /* not 1 <= c <= room */
            room = rf_fresh_block(s, c, bs, supply);
            if (room == 0) break;
        }
        s->mark = mark;
        old[i] = s->last_access;
        s->last_access = now;
        s->access_count++;
        rf_write_slots(out, (int64_t)s->blocks.last * bs + (bs - room), c);
        s->num_tokens = nt + c;
        out += c;
        prev = slot;
    }
    *off = out - slots_out;
    return i;
}

/* Whether append_batch's pass 1 may take fresh blocks for decode steps into
 * full last blocks: only while no item waits for pass 2 and no sequence can
 * be evicted, so ids go out in batch order, as sequential appends give them. */
static inline bool rf_early_take_allowed(const Core *c, const Shard *sh) noexcept {
    return !c->evict_sequences && sh->tmp_slow.empty() && sh->free.num_free.get() > 0;
}

/* Account for k blocks taken from leaf word `word` (bits cleared, refcounts
 * already 1): the summary levels follow an emptied word. */
static inline void rf_took_from_word(Shard *sh, int64_t word, int64_t k) noexcept {
    sh->free.num_free.add(-k);
    sh->total_allocations.add(k);
    if (sh->free.bits[word] == 0 && sh->free.levels > 1) fs_clear_from(&sh->free, 1, word);
}

/* append_batch's pass 1 through rf_decode_run from item i, which takes fresh
 * blocks from the shard's lowest free bitmap word while early takes are
 * allowed; when that word runs dry the run goes on with the next one.
 * Returns the first item no run took. Out of line, so the run keeps its
 * values in registers instead of sharing them with append_batch's. */
static inline __attribute__((noinline)) Py_ssize_t rf_decode_runs(Core *c, Shard *sh, const int64_t *seq_ids,
                                                           const int32_t *counts, const int32_t *slots,
                                                           Py_ssize_t i, Py_ssize_t n, uint32_t mark,
                                                           double now, int64_t *slots_out, int64_t *off,
                                                           int64_t *early) noexcept {
    rf_supply supply;
    uint64_t no_blocks = 0;
    int64_t word = 0;
    supply.refs = c->refs.data();
    for (;;) {
        int32_t prev = i != 0 ? slots[i - 1] : sh->seqs[slots[0]].lru_prev;   /* item 0 follows nothing */
        supply.word = &no_blocks;
        supply.taken = 0;
        if (rf_early_take_allowed(c, sh)) {
            word = fs_low_word(&sh->free);
            supply.word = &sh->free.bits[word];
            supply.base = word * 64;
        }
        i = rf_decode_run(sh->seqs.data(), seq_ids, counts, slots, i, n, mark, rf_share_gen(c), c->block_size,
                          prev, &supply, now, sh->tmp_stamps.data(), slots_out, off);
        if (supply.taken == 0) return i;
        rf_took_from_word(sh, word, supply.taken);
        *early += supply.taken;
        if (i >= n || *supply.word != 0) return i;
    }
}

#endif
