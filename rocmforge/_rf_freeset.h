/* rocmforge core, C++ side: a shard's free blocks. A bitmap over every block
 * id (bit set = free in this shard) with one summary level per 64x, so the
 * lowest free id is found in O(log64 n). These functions keep the bitmap and
 * its summary levels; the free count and which blocks are free are the
 * caller's business (_blocks.pxd). */
#ifndef ROCMFORGE_RF_FREESET_H
#define ROCMFORGE_RF_FREESET_H

#include "_rf_base.h"

struct FreeSet {
    std::vector<uint64_t> bits;
    int levels = 0;
    int64_t level_off[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t low_word = 0;     /* leaf words below it are all zero (no free block) */
    rf_count num_free;
};

static inline int64_t rf_ceil_div(int64_t a, int64_t b) noexcept { return (a + b - 1) / b; }

/* Words the bitmap of n blocks takes, summary levels included. */
static inline int64_t fs_words(int64_t n) noexcept {
    int64_t words = rf_ceil_div(n, 64), total = 0;
    for (;;) {
        total += words;
        if (words == 1) return total;
        words = rf_ceil_div(words, 64);
    }
}

/* Size the bitmap for n blocks with every bit clear (no block free); the
 * caller reserved fs_words(n) words, so this cannot fail. */
static inline void fs_size(FreeSet *f, int32_t n) noexcept {
    int64_t words = rf_ceil_div(n, 64), total = 0;
    int levels = 0;
    for (;;) {
        f->level_off[levels] = total;
        total += words;
        levels++;
        if (words == 1) break;
        words = rf_ceil_div(words, 64);
    }
    f->bits.assign((size_t)total, 0);
    f->levels = levels;
    f->low_word = 0;
}

/* Recompute every summary level from the leaf words. */
static inline void fs_summarize(FreeSet *f, int32_t n) noexcept {
    int64_t words = rf_ceil_div(n, 64);
    uint64_t *bits = f->bits.data();
    for (int L = 1; L < f->levels; L++) {
        for (int64_t i = 0; i < rf_ceil_div(words, 64); i++) bits[f->level_off[L] + i] = 0;
        for (int64_t i = 0; i < words; i++)
            if (bits[f->level_off[L - 1] + i] != 0)
                bits[f->level_off[L] + (i >> 6)] |= (uint64_t)1 << (i & 63);
        words = rf_ceil_div(words, 64);
    }
    f->low_word = 0;
}

/* Index of the lowest leaf word with a free bit (one must exist). The word
 * named by low_word usually still has one, which saves the walk down the
 * summary levels (a chain of dependent loads). */
static inline int64_t fs_low_word(FreeSet *f) noexcept {
    int64_t idx = f->low_word;
    if (f->bits[idx] != 0) return idx;
    idx = 0;
    for (int L = f->levels - 1; L > 0; L--) idx = idx * 64 + rf_ctz64(f->bits[f->level_off[L] + idx]);
    f->low_word = idx;
    return idx;
}

/* The lowest free block (one must exist). */
static inline int32_t fs_lowest(FreeSet *f) noexcept {
    int64_t idx = fs_low_word(f);
    return (int32_t)(idx * 64 + rf_ctz64(f->bits[idx]));
}

static inline bool fs_has(const FreeSet *f, int32_t b) noexcept { return (f->bits[b >> 6] >> (b & 63)) & 1; }

/* Leaf word i just gained its first free bit: set its bit one level up (and higher). */
static inline void fs_set_summary(FreeSet *f, int64_t i) noexcept {
    for (int L = 1; L < f->levels; L++) {
        uint64_t *p = &f->bits[f->level_off[L] + (i >> 6)];
        uint64_t was = *p;
        *p = was | ((uint64_t)1 << (i & 63));
        if (was != 0) return;
        i >>= 6;
    }
}

/* Mark the blocks of leaf word i given by bits free (none of them was). */
static inline void fs_set_word(FreeSet *f, int64_t i, uint64_t bits) noexcept {
    uint64_t *leaf = &f->bits[i];
    uint64_t was = *leaf;
    *leaf = was | bits;
    if (i < f->low_word) f->low_word = i;
    if (was == 0 && f->levels > 1) fs_set_summary(f, i);
}

/* Mark b free: one leaf bit, and the summary levels only when its word was empty. */
static inline void fs_set(FreeSet *f, int32_t b) noexcept { fs_set_word(f, b >> 6, (uint64_t)1 << (b & 63)); }

/* Clear bit i of `level` and the summary bits above that it empties. */
static inline void fs_clear_from(FreeSet *f, int level, int64_t i) noexcept {
    for (int L = level; L < f->levels; L++) {
        uint64_t *p = &f->bits[f->level_off[L] + (i >> 6)];
        *p &= ~((uint64_t)1 << (i & 63));
        if (*p != 0) return;
        i >>= 6;
    }
}

/* Take the lowest free block out of the set (one must exist); the count is the caller's. */
static inline int32_t fs_pop_lowest(FreeSet *f) noexcept {
    int32_t b = fs_lowest(f);
    fs_clear_from(f, 0, b);
    return b;
}

#endif
