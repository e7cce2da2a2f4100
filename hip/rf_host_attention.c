/* Paged attention on the host: the host backend's read path and the
 * reference the GPU kernels are tested against; see rf_attention.h. */
#include "rf_attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rf_convert.h"

static void rf_attn_store(void *p, int64_t i, int dt, float x) {
    switch (dt) {
    case RF_DT_F32: ((float *)p)[i] = x; break;
    case RF_DT_F16: ((uint16_t *)p)[i] = rf_f32_to_f16_bits(x); break;
    default: ((uint16_t *)p)[i] = rf_f32_to_bf16_bits(x);
    }
}

/* Sequence s's table: its entries and how many there are. */
static const int32_t *rf_attn_table(const rf_attn_args *a, int64_t s, int64_t *len) {
    if (a->indptr) {
        *len = a->indptr[s + 1] - a->indptr[s];
        return a->tables + a->indptr[s];
    }
    *len = a->stride;
    return a->tables + s * a->stride;
}

static int64_t rf_attn_queries(const rf_attn_args *a, int64_t s, int64_t *first) {
    if (!a->query_start) {
        *first = s;
        return 1;
    }
    *first = a->query_start[s];
    return a->query_start[s + 1] - a->query_start[s];
}

int rf_attn_check(const rf_attn_args *a, int64_t *bad) {
    int64_t s, i, len, first;
    if (a->query_start) {
        if (a->query_start[0] != 0 || a->query_start[a->num_seqs] != a->num_queries) {
            *bad = a->query_start[0] != 0 ? 0 : a->num_seqs;
            return RF_ATTN_BAD_QUERIES;
        }
        for (s = 0; s < a->num_seqs; s++) {
            if (a->query_start[s + 1] < a->query_start[s]) {
                *bad = s;
                return RF_ATTN_BAD_QUERIES;
            }
        }
    }
    if (a->indptr) {
        for (s = 0; s < a->num_seqs; s++) {
            if (a->indptr[s] < 0 || a->indptr[s + 1] < a->indptr[s] || a->indptr[s + 1] > a->num_indices) {
                *bad = s;
                return RF_ATTN_BAD_LEN;
            }
        }
    }
    for (s = 0; s < a->num_seqs; s++) {
        const int32_t *table = rf_attn_table(a, s, &len);
        int64_t n = a->seq_lens[s], nq = rf_attn_queries(a, s, &first);
        int64_t used = (n + a->block_size - 1) / a->block_size;
        *bad = s;
        if (n < 0 || used > len || (n > 0 && n < nq)) return RF_ATTN_BAD_LEN;
        for (i = 0; i < used; i++)
            if (table[i] < 0 || table[i] >= a->num_blocks) return RF_ATTN_BAD_BLOCK;
    }
    *bad = -1;
    return RF_ATTN_OK;
}

/* Positions read at a time: their K and V rows are converted once for the
 * kv head's query heads, which then take one softmax rescale per chunk. */
#define RF_ATTN_CHUNK 32

#if defined(__GNUC__) && defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

/* Whether the CPU has F16C and the OS saves AVX registers (CPUID leaf 1 ECX bits
 * 27-29, XCR0 bits 1-2). Asked once per process: CPUID traps to the hypervisor in
 * a virtual machine (tens of microseconds). */
static int rf_has_f16c(void) {
    static int known = -1;
    unsigned a, b, c, d, lo, hi;
    int has = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (has >= 0) return has;
    has = __get_cpuid(1, &a, &b, &c, &d) && (c & (7u << 27)) == (7u << 27);
    if (has) {
        __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        has = (lo & 6u) == 6u;
    }
    __atomic_store_n(&known, has, __ATOMIC_RELAXED);
    return has;
}

/* float16 to float32 eight at a time with the F16C instructions (x86 CPUs since
 * 2012; used when the CPU has them): exact, as rf_f16_bits_to_f32. */
__attribute__((target("avx,f16c"))) static void rf_f16_row_f16c(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = rf_f16_bits_to_f32(src[i]);
}
#else
static int rf_has_f16c(void) { return 0; }
#define rf_f16_row_f16c(src, n, dst) ((void)0)
#endif

/* D elements of a cache row as floats (fp8/int8 times their scale; fp8 through
 * fp8, the table of its 256 values; float16 by F16C when f16c). */
static void rf_attn_row(const void *cache, int64_t base, int64_t D, int dt, float scale, const float *fp8, int f16c,
                        float *dst) {
    int64_t d;
    switch (dt) {
    case RF_DT_F32: memcpy(dst, (const float *)cache + base, sizeof(float) * D); break;
    case RF_DT_F16:
        if (f16c) {
            rf_f16_row_f16c((const uint16_t *)cache + base, D, dst);
            break;
        }
        for (d = 0; d < D; d++) dst[d] = rf_f16_bits_to_f32(((const uint16_t *)cache)[base + d]);
        break;
    case RF_DT_BF16:
        for (d = 0; d < D; d++) dst[d] = rf_bf16_bits_to_f32(((const uint16_t *)cache)[base + d]);
        break;
    case RF_DT_FP8_E4M3:
        for (d = 0; d < D; d++) dst[d] = fp8[((const uint8_t *)cache)[base + d]] * scale;
        break;
    default:
        for (d = 0; d < D; d++) dst[d] = (float)((const int8_t *)cache)[base + d] * scale;
    }
}

/* x . y in eight independent partial sums (no chain of D dependent adds). */
static float rf_attn_dot(const float *x, const float *y, int64_t D) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0}, rest = 0.0f;
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        for (int j = 0; j < 8; j++) part[j] += x[d + j] * y[d + j];
    for (; d < D; d++) rest += x[d] * y[d];
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + rest;
}

static float rf_pick(int take_b, float a, float b) {    /* take_b ? b : a, as masks (no branch) */
    uint32_t m = 0u - (uint32_t)take_b;
    return rf_float((rf_bits(a) & ~m) | (rf_bits(b) & m));
}

/* e^x for x <= 0 within 2.5e-7 relative (NaN stays NaN), branch-free so that a
 * loop of it vectorizes: 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2 and
 * e^r by its series to degree 6 (remainder below 1.2e-7). Below -87, where e^x
 * is under 2^-125, it gives about 1.6e-38 rather than 0. */
static float rf_exp_neg(float x) {
    const float shift = 12582912.0f;                    /* 1.5 * 2^23: adding it rounds to an integer */
    x = rf_pick(x < -87.0f, x, -87.0f);
    float n = (x * 1.44269504088896341f + shift) - shift;
    float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;     /* ln 2 in two parts */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    float e = rf_pick(!(n <= 0.0f), n, 0.0f);          /* (NaN: 0, so the conversion is defined) */
    e = rf_pick(!(e >= -126.0f), e, -126.0f);
    return p * rf_float((uint32_t)((int32_t)e + 127) << 23);
}

/* One query token of sequence s at position pos, all heads: q holds its
 * num_q_heads * head_dim query values; kbuf and vbuf hold RF_ATTN_CHUNK rows,
 * m and l num_q_heads floats (scratch of rf_host_paged_attention). */
static void rf_attn_token(const rf_attn_args *a, const int32_t *table, int64_t pos, const float *q, const float *fp8,
                          int f16c, float *out, float *kbuf, float *vbuf, float *m, float *l) {
    const int64_t D = a->head_dim, G = a->num_q_heads / a->num_kv_heads, Hkv = a->num_kv_heads;
    float sc[RF_ATTN_CHUNK], w[RF_ATTN_CHUNK];
    for (int64_t h = 0; h < a->num_q_heads; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(out, 0, sizeof(float) * a->num_q_heads * D);
    for (int64_t g = 0; g < Hkv; g++) {
        for (int64_t p0 = 0; p0 <= pos; p0 += RF_ATTN_CHUNK) {
            const int64_t n = pos + 1 - p0 < RF_ATTN_CHUNK ? pos + 1 - p0 : RF_ATTN_CHUNK;
            for (int64_t j = 0; j < n; j++) {
                const int64_t p = p0 + j;
                const int64_t base = (((int64_t)table[p / a->block_size] * a->block_size + p % a->block_size) * Hkv
                                      + g) * D;
                rf_attn_row(a->key_cache, base, D, a->cache_dt, a->k_scale, fp8, f16c, kbuf + j * D);
                rf_attn_row(a->value_cache, base, D, a->cache_dt, a->v_scale, fp8, f16c, vbuf + j * D);
            }
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                float *acc = out + h * D, top = m[h];
                for (int64_t j = 0; j < n; j++) {
                    sc[j] = rf_attn_dot(q + h * D, kbuf + j * D, D) * a->scale;
                    top = sc[j] > top ? sc[j] : top;
                }
                if (top > m[h]) {                       /* a new maximum: rescale what is summed */
                    const float c = expf(m[h] - top);
                    for (int64_t d = 0; d < D; d++) acc[d] *= c;
                    l[h] *= c;
                    m[h] = top;
                }
                for (int64_t j = 0; j < n; j++) w[j] = rf_exp_neg(sc[j] - m[h]);
                for (int64_t j = 0; j < n; j++) {
                    const float *v = vbuf + j * D;
                    l[h] += w[j];
                    for (int64_t d = 0; d < D; d++) acc[d] += w[j] * v[d];
                }
            }
        }
    }
    for (int64_t h = 0; h < a->num_q_heads; h++)
        for (int64_t d = 0; d < D; d++) out[h * D + d] = l[h] > 0.0f ? out[h * D + d] / l[h] : 0.0f;
}

int rf_host_paged_attention(const rf_attn_args *a, int64_t *bad) {
    const int64_t D = a->head_dim, row = a->num_q_heads * D;
    int st = rf_attn_check(a, bad);
    float *q, *acc, *kbuf, *vbuf, *m, *l, fp8[256];
    if (st != RF_ATTN_OK) return st;
    const int f16c = a->cache_dt == RF_DT_F16 && rf_has_f16c();
    if (a->cache_dt == RF_DT_FP8_E4M3)
        for (int i = 0; i < 256; i++) fp8[i] = rf_e4m3_bits_to_f32((uint8_t)i);
    q = (float *)malloc(sizeof(float) * (2 * row + 2 * RF_ATTN_CHUNK * D + 2 * a->num_q_heads));
    if (!q) return RF_ATTN_NO_MEMORY;
    acc = q + row, kbuf = acc + row, vbuf = kbuf + RF_ATTN_CHUNK * D, m = vbuf + RF_ATTN_CHUNK * D;
    l = m + a->num_q_heads;
    for (int64_t s = 0; s < a->num_seqs; s++) {
        int64_t len, first, nq = rf_attn_queries(a, s, &first), n = a->seq_lens[s];
        const int32_t *table = rf_attn_table(a, s, &len);
        for (int64_t i = 0; i < nq; i++) {
            int64_t t = first + i;
            rf_attn_row(a->query, t * row, row, a->q_dt, 1.0f, NULL, 0, q);
            rf_attn_token(a, table, n - nq + i, q, fp8, f16c, acc, kbuf, vbuf, m, l);   /* n == 0: pos < 0, zeros */
            for (int64_t j = 0; j < row; j++) rf_attn_store(a->out, t * row + j, a->q_dt, acc[j]);
        }
    }
    free(q);
    return RF_ATTN_OK;
}
