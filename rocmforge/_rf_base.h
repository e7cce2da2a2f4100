/* rocmforge core, C++ side: allocation helpers that never throw, the lock,
 * relaxed counters, and bit tricks. Allocation may throw std::bad_alloc;
 * these wrappers turn that into a status so the nogil core never lets an
 * exception escape (and never aborts). */
#ifndef ROCMFORGE_RF_BASE_H
#define ROCMFORGE_RF_BASE_H

#include <Python.h>
#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

/* rf_mutex: the lock behind each shard of a BlockManager (and its prefix
 * index, pending copies and sequence directory when it has several shards).
 * An uncontended lock + unlock is one pthread mutex round trip (about 9 ns on
 * the 2-core CI machine). cython.pymutex is as cheap from Python 3.13 on
 * (PyMutex), but on 3.11 and 3.12 it falls back to a PyThread lock costing
 * about 60 ns, more than most core calls do in all. A thread that has to
 * wait while holding the GIL lets go of it first (as PyMutex does), so a
 * holder that needs the GIL, or a nogil holder the interpreter waits on, can
 * always finish. */
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

/* A counter written under a lock and read without one (stats(), free block
 * counts): relaxed atomics, which on x86 and ARM compile to plain loads and
 * stores, so the writer pays nothing and a lock-free reader is no data race. */
struct rf_count {
    std::atomic<int64_t> v{0};

    int64_t get() const noexcept { return v.load(std::memory_order_relaxed); }
    void set(int64_t x) noexcept { v.store(x, std::memory_order_relaxed); }
    void add(int64_t d) noexcept { v.store(v.load(std::memory_order_relaxed) + d, std::memory_order_relaxed); }
    /* Raise to x if below (a peak). */
    void raise_to(int64_t x) noexcept {
        if (x > v.load(std::memory_order_relaxed)) v.store(x, std::memory_order_relaxed);
    }
};

/* A double written under a lock and read without one. */
struct rf_real {
    std::atomic<double> v{0.0};

    double get() const noexcept { return v.load(std::memory_order_relaxed); }
    void set(double x) noexcept { v.store(x, std::memory_order_relaxed); }
};

/* Allocation faults, for tests (rocmforge._core._fail_allocation): while the
 * countdown is positive, each allocation the helpers here would make counts it
 * down, and the one that takes it to zero fails as if memory were exhausted.
 * Only the paths that allocate read it. */
inline std::atomic<int64_t> rf_fault_countdown{0};

static inline bool rf_alloc_fails() noexcept {
    if (rf_fault_countdown.load(std::memory_order_relaxed) <= 0) return false;
    return rf_fault_countdown.fetch_sub(1, std::memory_order_relaxed) == 1;
}

/* Arm the countdown (0: off); returns what was left of the one before. */
static inline int64_t rf_fault_arm(int64_t n) noexcept {
    return rf_fault_countdown.exchange(n, std::memory_order_relaxed);
}

/* Grow capacity to at least n; 0 on success, -1 when memory is exhausted.
 * Growth is geometric (at least doubling), so a vector that gains one element
 * per call (a sequence's blocks or tokens during decode) is reallocated
 * O(log n) times, not on every call. */
template <class T>
static inline int rf_reserve(std::vector<T> &v, size_t n) noexcept {
    if (v.capacity() < n && rf_alloc_fails()) return -1;
    try {
        if (v.capacity() < n) v.reserve(n > 2 * v.capacity() ? n : 2 * v.capacity());
        return 0;
    } catch (...) {
        return -1;
    }
}

/* Grow capacity to exactly n when below it, for arrays sized once per pool
 * resize (a later resize to n or less cannot fail); 0 on success, -1 when
 * memory is exhausted. */
template <class T>
static inline int rf_reserve_exact(std::vector<T> &v, size_t n) noexcept {
    if (v.capacity() < n && rf_alloc_fails()) return -1;
    try {
        v.reserve(n);
        return 0;
    } catch (...) {
        return -1;
    }
}

/* Resize (value-initialising new elements); 0 on success, -1 on failure. */
template <class T>
static inline int rf_resize(std::vector<T> &v, size_t n, const T &value) noexcept {
    if (v.capacity() < n && rf_alloc_fails()) return -1;
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

static inline void rf_append_n64(std::vector<int64_t> &v, const int64_t *src, size_t n) noexcept {
    v.insert(v.end(), src, src + n);
}

/* Index of the lowest set bit; x must be non-zero. */
static inline int rf_ctz64(uint64_t x) { return __builtin_ctzll(x); }

static inline int rf_popcount64(uint64_t x) { return __builtin_popcountll(x); }

static inline void rf_prefetch(const void *p) noexcept { __builtin_prefetch(p); }

#endif
