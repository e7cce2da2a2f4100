/* Small C++ helpers for _core.pyx that Cython cannot express directly.
 * Allocation may throw std::bad_alloc; these wrappers turn that into a
 * status so the nogil core never lets an exception escape (and never aborts). */
#ifndef ROCMFORGE_CORE_SUPPORT_H
#define ROCMFORGE_CORE_SUPPORT_H

#include <Python.h>
#include <pthread.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

/* rf_mutex: the lock behind each BlockManager. An uncontended lock + unlock
 * is one pthread mutex round trip (about 9 ns on the 2-core CI machine).
 * cython.pymutex is as cheap from Python 3.13 on (PyMutex), but on 3.11 and
 * 3.12 it falls back to a PyThread lock costing about 60 ns, more than most
 * core calls do in all. A thread that has to wait while holding the GIL lets
 * go of it first (as PyMutex does), so a holder that needs the GIL, or a
 * nogil holder the interpreter waits on, can always finish. */
struct rf_mutex {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;

    rf_mutex() = default;
    rf_mutex(const rf_mutex &) = delete;
    rf_mutex &operator=(const rf_mutex &) = delete;
    ~rf_mutex() { pthread_mutex_destroy(&m); }

    /* Callable with or without the GIL. */
    void lock() noexcept {
        if (pthread_mutex_trylock(&m) == 0) return;
        if (PyGILState_Check()) {
            PyThreadState *ts = PyEval_SaveThread();
            pthread_mutex_lock(&m);
            PyEval_RestoreThread(ts);
        } else {
            pthread_mutex_lock(&m);
        }
    }

    void unlock() noexcept { pthread_mutex_unlock(&m); }
};

/* rf_table: a sequence's block table. A growable int32 array that keeps a copy
 * of its last id beside its length, so a decode step learns the block it
 * writes into from the record's first cache line without loading the array.
 * Writes go through set() and push() to keep that copy true; reads use the
 * std::vector-like size()/back()/operator[]. The capacity lives in the word
 * before ids[0] (only growth reads it), which keeps the table at 16 bytes. */
struct rf_table {
    int32_t *ids = nullptr;
    uint32_t len = 0;
    int32_t last = -1;

    rf_table() = default;
    rf_table(const rf_table &o) : len(o.len), last(o.last) {
        if (o.len) {
            ids = alloc(nullptr, round_up(o.len));
            if (!ids) throw std::bad_alloc();
            std::memcpy(ids, o.ids, o.len * sizeof(int32_t));
        }
    }
    rf_table(rf_table &&o) noexcept : ids(o.ids), len(o.len), last(o.last) {
        o.ids = nullptr;
        o.len = 0;
        o.last = -1;
    }
    rf_table &operator=(const rf_table &) = delete;
    rf_table &operator=(rf_table &&) = delete;
    ~rf_table() { std::free(ids ? ids - 1 : nullptr); }

    size_t size() const noexcept { return len; }
    size_t capacity() const noexcept { return ids ? (uint32_t)ids[-1] : 0; }
    /* Heap bytes held, the capacity word included. */
    size_t bytes() const noexcept { return ids ? (capacity() + 1) * sizeof(int32_t) : 0; }
    int32_t back() const noexcept { return last; }
    int32_t operator[](size_t i) const noexcept { return ids[i]; }
    const int32_t *data() const noexcept { return ids; }
    void set(size_t i, int32_t b) noexcept {
        ids[i] = b;
        if (i + 1 == len) last = b;
    }
    /* Append within reserved capacity (callers reserve first). */
    void push(int32_t b) noexcept {
        ids[len++] = b;
        last = b;
    }
    /* Drop the last id (the table must not be empty). */
    void pop() noexcept {
        len--;
        last = len ? ids[len - 1] : -1;
    }
    void clear() noexcept {
        len = 0;
        last = -1;
    }
    /* Capacity for at least n ids (round_up), so a table that gains one id
     * per decode step grows O(log n) times and a new table has slack for its
     * first steps; 0 on success, -1 (table unchanged)
     * when memory is exhausted or n exceeds 2**31 - 2 ids. */
    int reserve(size_t n) noexcept {
        if (n <= capacity()) return 0;
        if (n > (size_t)INT32_MAX - 1) return -1;
        int32_t *grown = alloc(ids, round_up(n));
        if (!grown) return -1;
        ids = grown;
        return 0;
    }

private:
    /* The capacity kept for n ids: a power of two, at least 64 (256 bytes,
     * so tables of up to 64 blocks never grow), n <= 2**31. */
    static size_t round_up(size_t n) noexcept {
        size_t cap = 64;
        while (cap < n) cap *= 2;
        return cap;
    }

    /* (Re)allocate room for cap ids after a capacity word; nullptr on failure. */
    static int32_t *alloc(int32_t *ids, size_t cap) noexcept {
        void *base = std::realloc(ids ? ids - 1 : nullptr, (cap + 1) * sizeof(int32_t));
        if (!base) return nullptr;
        int32_t *grown = static_cast<int32_t *>(base) + 1;
        grown[-1] = (int32_t)(uint32_t)cap;
        return grown;
    }
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

/* Index of the lowest set bit; x must be non-zero. */
static inline int rf_ctz64(uint64_t x) { return __builtin_ctzll(x); }

/* A block's reference counts: rc counts every reference (sequence tables
 * and external ones), ext the external ones. Side by side, so decref and
 * allocate touch one cache line per block. */
struct BlockRefs {
    int32_t rc;
    int32_t ext;
};

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
static __attribute__((noinline)) int64_t rf_fresh_block(SeqRec *s, int64_t c, int64_t bs,
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
static inline Py_ssize_t rf_decode_run(SeqRec *recs, const int64_t *seq_ids, const int32_t *counts,
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

/* Grow capacity to at least n; 0 on success, -1 when memory is exhausted.
 * Growth is geometric (at least doubling), so a vector that gains one element
 * per call (a sequence's blocks or tokens during decode) is reallocated
 * O(log n) times, not on every call. */
template <class T>
static inline int rf_reserve(std::vector<T> &v, size_t n) noexcept {
    try {
        if (v.capacity() < n) v.reserve(n > 2 * v.capacity() ? n : 2 * v.capacity());
        return 0;
    } catch (...) {
        return -1;
    }
}

/* Resize (value-initialising new elements); 0 on success, -1 on failure. */
template <class T>
static inline int rf_resize(std::vector<T> &v, size_t n, const T &value) noexcept {
    try {
        v.resize(n, value);
        return 0;
    } catch (...) {
        return -1;
    }
}

/* Append within reserved capacity: callers reserve first, so this never throws. */
template <class T>
static inline void rf_push(std::vector<T> &v, const T &x) noexcept {
    v.push_back(x);
}

/* Append n values within reserved capacity (callers reserve first). */
static inline void rf_append_n(std::vector<int32_t> &v, const int32_t *src, size_t n) noexcept {
    v.insert(v.end(), src, src + n);
}

/* Append n int64 values within reserved capacity (callers reserve first). */
static inline void rf_append_n64(std::vector<int64_t> &v, const int64_t *src, size_t n) noexcept {
    v.insert(v.end(), src, src + n);
}

/* rf_idmap: sequence id (int64 >= 0) -> record slot (int32).
 * Open addressing with linear probing over a power-of-two table kept at most
 * half full; a multiplicative hash picks the home bucket, so a lookup costs a
 * multiply and a short scan (no division, no node chasing). Deletion shifts
 * later entries back, so there are no tombstones. Empty buckets hold key -1. */
struct rf_idmap {
    std::vector<int64_t> keys;
    std::vector<int32_t> vals;
    size_t count = 0;
    int shift = 64;   /* 64 - log2(capacity) */
};

static inline size_t rf_idmap_home(const rf_idmap &m, int64_t key) noexcept {
    return (size_t)(((uint64_t)key * 0x9E3779B97F4A7C15ull) >> m.shift);
}

/* The slot stored for key, or -1. */
static inline int32_t rf_idmap_find(const rf_idmap &m, int64_t key) noexcept {
    if (m.count == 0) return -1;
    const size_t mask = m.keys.size() - 1;
    for (size_t i = rf_idmap_home(m, key);; i = (i + 1) & mask) {
        if (m.keys[i] == key) return m.vals[i];
        if (m.keys[i] == -1) return -1;
    }
}

static inline void rf_idmap_place(rf_idmap &m, int64_t key, int32_t val) noexcept {
    const size_t mask = m.keys.size() - 1;
    size_t i = rf_idmap_home(m, key);
    while (m.keys[i] != -1 && m.keys[i] != key) i = (i + 1) & mask;
    if (m.keys[i] == -1) m.count++;
    m.keys[i] = key;
    m.vals[i] = val;
}

/* Room for n entries without rehashing later; 0 on success, -1 (map unchanged) when out of memory. */
static inline int rf_idmap_reserve(rf_idmap &m, size_t n) noexcept {
    size_t cap = m.keys.size();
    if (2 * n <= cap) return 0;
    size_t want = cap ? cap : 16;
    int shift = cap ? m.shift : 60;
    while (2 * n > want) { want *= 2; shift--; }
    rf_idmap grown;
    try {
        grown.keys.assign(want, -1);
        grown.vals.assign(want, -1);
    } catch (...) {
        return -1;
    }
    grown.shift = shift;
    for (size_t i = 0; i < cap; i++)
        if (m.keys[i] != -1) rf_idmap_place(grown, m.keys[i], m.vals[i]);
    m.keys.swap(grown.keys);
    m.vals.swap(grown.vals);
    m.shift = shift;
    return 0;
}

/* Insert or update; 0 on success, -1 (map unchanged) when out of memory. */
static inline int rf_idmap_put(rf_idmap &m, int64_t key, int32_t val) noexcept {
    if (rf_idmap_reserve(m, m.count + 1)) return -1;
    rf_idmap_place(m, key, val);
    return 0;
}

static inline void rf_idmap_erase(rf_idmap &m, int64_t key) noexcept {
    if (m.count == 0) return;
    const size_t mask = m.keys.size() - 1;
    size_t i = rf_idmap_home(m, key);
    while (m.keys[i] != key) {
        if (m.keys[i] == -1) return;
        i = (i + 1) & mask;
    }
    /* Backward shift: pull each later entry of the probe run into the hole
     * unless its home lies cyclically in (hole, position]. */
    for (size_t j = (i + 1) & mask; m.keys[j] != -1; j = (j + 1) & mask) {
        size_t home = rf_idmap_home(m, m.keys[j]);
        bool stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            m.keys[i] = m.keys[j];
            m.vals[i] = m.vals[j];
            i = j;
        }
    }
    m.keys[i] = -1;
    m.count--;
}

/* Start loading the bucket where key's probe begins (a hint; no effect on results). */
static inline void rf_idmap_prefetch(const rf_idmap &m, int64_t key) noexcept {
    if (m.count == 0) return;
    size_t i = rf_idmap_home(m, key);
    __builtin_prefetch(&m.keys[i]);
    __builtin_prefetch(&m.vals[i]);
}

static inline void rf_prefetch(const void *p) noexcept { __builtin_prefetch(p); }

/* Point an existing key at a new value (no allocation); the key must be present. */
static inline void rf_idmap_update(rf_idmap &m, int64_t key, int32_t val) noexcept {
    const size_t mask = m.keys.size() - 1;
    size_t i = rf_idmap_home(m, key);
    while (m.keys[i] != key) i = (i + 1) & mask;
    m.vals[i] = val;
}

static inline void rf_idmap_clear(rf_idmap &m) noexcept {
    for (size_t i = 0; i < m.keys.size(); i++) m.keys[i] = -1;
    m.count = 0;
}

static inline size_t rf_idmap_bytes(const rf_idmap &m) noexcept {
    return m.keys.capacity() * sizeof(int64_t) + m.vals.capacity() * sizeof(int32_t);
}

/* Content key of one full block of token ids, chained from its parent's key
 * (-1 for a chain's first block, whose key depends on the salt instead).
 * The tokens are hashed on their own first: two lanes each fold 16 bytes per
 * step into one 64x64 -> 128-bit multiply (its halves xored), and a last
 * multiply merges the lanes. Only one multiply links a block to its parent,
 * so the token hashes of a prompt's blocks overlap in the CPU instead of
 * waiting on each other. Keys are masked to non-negative int64 (fewer bits
 * only in tests that force collisions). Collisions are harmless: every hit
 * is verified against the cached token ids and parent block. */
static inline uint64_t rf_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t rf_pair(const int32_t *t) {
    return (uint64_t)(uint32_t)t[0] | ((uint64_t)(uint32_t)t[1] << 32);
}

/* Both halves of the 128-bit product, folded. */
static inline uint64_t rf_mul_fold(uint64_t a, uint64_t b) {
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

static inline uint64_t rf_tokens_hash(const int32_t *t, int64_t n) noexcept {
    const uint64_t S0 = 0xA0761D6478BD642Full, S1 = 0xE7037ED1A0B428DBull;
    const uint64_t S2 = 0x8EBC6AF09C88C6E3ull, S3 = 0x589965CC75374CC3ull;
    uint64_t a = S2 ^ (uint64_t)n, b = S3;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a = rf_mul_fold(rf_pair(t + i) ^ S0, rf_pair(t + i + 2) ^ a);
        b = rf_mul_fold(rf_pair(t + i + 4) ^ S1, rf_pair(t + i + 6) ^ b);
    }
    for (; i < n; i++) a = rf_mul_fold((uint64_t)(uint32_t)t[i] ^ S0, a ^ S1);
    return rf_mul_fold(a ^ S2, b ^ S1);
}

static inline int64_t rf_block_key(int64_t parent, int64_t salt, const int32_t *t, int64_t n,
                                   int64_t mask) noexcept {
    uint64_t link = parent >= 0 ? (uint64_t)parent : (uint64_t)salt ^ 0x452821E638D01377ull;
    uint64_t h = (rf_rotl(link, 23) * 0xD6E8FEB86659FD93ull) ^ rf_tokens_hash(t, n);
    return (int64_t)(h & (uint64_t)mask);
}

/* Whether n token ids are equal: a hit's verification. 32 bytes are compared
 * per step (SSE2 or NEON through GCC's vector extension), without early exit
 * (a mismatch means a hash collision, which is rare), so the loop is
 * branch-free and inlined where memcmp would be a call. */
typedef uint64_t rf_u64x2 __attribute__((vector_size(16)));

static inline bool rf_tokens_equal(const int32_t *a, const int32_t *b, int64_t n) noexcept {
    rf_u64x2 diff = {0, 0}, x0, y0, x1, y1;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __builtin_memcpy(&x0, a + i, 16);
        __builtin_memcpy(&y0, b + i, 16);
        __builtin_memcpy(&x1, a + i + 4, 16);
        __builtin_memcpy(&y1, b + i + 4, 16);
        diff |= (x0 ^ y0) | (x1 ^ y1);
    }
    uint64_t rest = diff[0] | diff[1];
    for (; i < n; i++) rest |= (uint32_t)(a[i] ^ b[i]);
    return rest == 0;
}

#endif
