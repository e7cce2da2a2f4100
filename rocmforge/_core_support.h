/* Small C++ helpers for _core.pyx that Cython cannot express directly.
 * Allocation may throw std::bad_alloc; these wrappers turn that into a
 * status so the nogil core never lets an exception escape (and never aborts). */
#ifndef ROCMFORGE_CORE_SUPPORT_H
#define ROCMFORGE_CORE_SUPPORT_H

#include <cstdint>
#include <new>
#include <unordered_map>
#include <vector>

/* Grow capacity to at least n; 0 on success, -1 when memory is exhausted. */
template <class T>
static inline int rf_reserve(std::vector<T> &v, size_t n) noexcept {
    try {
        if (v.capacity() < n) v.reserve(n);
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

/* Approximate heap bytes of an unordered_map: bucket array plus one node per entry. */
static inline size_t rf_map_bytes(const std::unordered_map<int64_t, int32_t> &m) noexcept {
    struct node { void *next; std::pair<const int64_t, int32_t> kv; size_t hash; };
    return m.bucket_count() * sizeof(void *) + m.size() * sizeof(node);
}

/* Insert key -> value; 0 on success, -1 when memory is exhausted. */
static inline int rf_map_put(std::unordered_map<int64_t, int32_t> &m, int64_t key, int32_t value) noexcept {
    try {
        m[key] = value;
        return 0;
    } catch (...) {
        return -1;
    }
}

/* Index of the lowest set bit; x must be non-zero. */
static inline int rf_ctz64(uint64_t x) { return __builtin_ctzll(x); }

#endif
