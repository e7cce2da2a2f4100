/* rocmforge core, C++ side: the containers Cython cannot express directly:
 * a sequence's block table and an int64 -> int32 hash map. */
#ifndef ROCMFORGE_RF_CONTAINERS_H
#define ROCMFORGE_RF_CONTAINERS_H

#include "_rf_base.h"

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
        if (rf_alloc_fails()) return -1;
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
    if (rf_alloc_fails()) return -1;
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

#endif
