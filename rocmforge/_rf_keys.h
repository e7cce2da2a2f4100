/* rocmforge core, C++ side: content keys of full blocks (the function the
 * README's "Block keys" gives) and the token comparison that verifies a hit. */
#ifndef ROCMFORGE_RF_KEYS_H
#define ROCMFORGE_RF_KEYS_H

#include "_rf_base.h"

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
