/* Paged attention on the host: the host backend's read path and the
 * reference the GPU kernels are tested against; see rf_attention.h. */
#include "rf_attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rf_convert.h"

static float rf_attn_load(const void *p, int64_t i, int dt, float scale) {
    switch (dt) {
    case RF_DT_F32: return ((const float *)p)[i];
    case RF_DT_F16: return rf_f16_bits_to_f32(((const uint16_t *)p)[i]);
    case RF_DT_BF16: return rf_bf16_bits_to_f32(((const uint16_t *)p)[i]);
    case RF_DT_FP8_E4M3: return rf_e4m3_bits_to_f32(((const uint8_t *)p)[i]) * scale;
    default: return (float)((const int8_t *)p)[i] * scale;
    }
}

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

/* One query token of sequence s at position pos, all heads: q holds its
 * num_q_heads * head_dim query values, state the scratch of rf_host_paged_attention. */
static void rf_attn_token(const rf_attn_args *a, const int32_t *table, int64_t pos, const float *q, float *out,
                          float *krow, float *vrow, float *m, float *l) {
    const int64_t D = a->head_dim, G = a->num_q_heads / a->num_kv_heads, Hkv = a->num_kv_heads;
    for (int64_t h = 0; h < a->num_q_heads; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(out, 0, sizeof(float) * a->num_q_heads * D);
    for (int64_t p = 0; p <= pos; p++) {
        int64_t row = ((int64_t)table[p / a->block_size] * a->block_size + p % a->block_size) * Hkv;
        for (int64_t g = 0; g < Hkv; g++) {
            int64_t base = (row + g) * D;
            for (int64_t d = 0; d < D; d++) {
                krow[d] = rf_attn_load(a->key_cache, base + d, a->cache_dt, a->k_scale);
                vrow[d] = rf_attn_load(a->value_cache, base + d, a->cache_dt, a->v_scale);
            }
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                const float *qh = q + h * D;
                float *acc = out + h * D, dot = 0.0f, w;
                for (int64_t d = 0; d < D; d++) dot += qh[d] * krow[d];
                dot *= a->scale;
                if (dot > m[h]) {                       /* a new maximum: rescale what is summed */
                    float c = expf(m[h] - dot);
                    for (int64_t d = 0; d < D; d++) acc[d] *= c;
                    l[h] *= c;
                    m[h] = dot;
                }
                w = expf(dot - m[h]);
                l[h] += w;
                for (int64_t d = 0; d < D; d++) acc[d] += w * vrow[d];
            }
        }
    }
    for (int64_t h = 0; h < a->num_q_heads; h++)
        for (int64_t d = 0; d < D; d++) out[h * D + d] = l[h] > 0.0f ? out[h * D + d] / l[h] : 0.0f;
}

int rf_host_paged_attention(const rf_attn_args *a, int64_t *bad) {
    const int64_t D = a->head_dim, row = a->num_q_heads * D;
    int st = rf_attn_check(a, bad);
    float *q, *acc, *krow, *vrow, *m, *l;
    if (st != RF_ATTN_OK) return st;
    q = (float *)malloc(sizeof(float) * (2 * row + 2 * D + 2 * a->num_q_heads));
    if (!q) return RF_ATTN_NO_MEMORY;
    acc = q + row, krow = acc + row, vrow = krow + D, m = vrow + D, l = m + a->num_q_heads;
    for (int64_t s = 0; s < a->num_seqs; s++) {
        int64_t len, first, nq = rf_attn_queries(a, s, &first), n = a->seq_lens[s];
        const int32_t *table = rf_attn_table(a, s, &len);
        for (int64_t i = 0; i < nq; i++) {
            int64_t t = first + i;
            for (int64_t j = 0; j < row; j++) q[j] = rf_attn_load(a->query, t * row + j, a->q_dt, 1.0f);
            rf_attn_token(a, table, n - nq + i, q, acc, krow, vrow, m, l);   /* n == 0: pos < 0, zeros */
            for (int64_t j = 0; j < row; j++) rf_attn_store(a->out, t * row + j, a->q_dt, acc[j]);
        }
    }
    free(q);
    return RF_ATTN_OK;
}
