/* Host K/V kernels; see rf_host_kernels.h. */
#include "rf_host_kernels.h"

#include <string.h>

static int rf_dtype_size(int dt) {
    switch (dt) {
    case RF_DT_F32: return 4;
    case RF_DT_F16: case RF_DT_BF16: return 2;
    case RF_DT_FP8_E4M3: case RF_DT_I8: return 1;
    default: return 0;
    }
}

static float rf_load(const void *p, int64_t i, int dt) {
    switch (dt) {
    case RF_DT_F32: return ((const float *)p)[i];
    case RF_DT_F16: return rf_f16_bits_to_f32(((const uint16_t *)p)[i]);
    default: return rf_bf16_bits_to_f32(((const uint16_t *)p)[i]);
    }
}

static void rf_store(void *p, int64_t i, int dt, float x, float inv_scale) {
    switch (dt) {
    case RF_DT_F32: ((float *)p)[i] = x; break;
    case RF_DT_F16: ((uint16_t *)p)[i] = rf_f32_to_f16_bits(x); break;
    case RF_DT_BF16: ((uint16_t *)p)[i] = rf_f32_to_bf16_bits(x); break;
    case RF_DT_FP8_E4M3: ((uint8_t *)p)[i] = rf_f32_to_e4m3_bits(x * inv_scale); break;
    default: ((int8_t *)p)[i] = rf_f32_to_i8(x * inv_scale);
    }
}

static int rf_check_blocks(const int32_t *ids, int64_t n, int64_t num_blocks, int64_t *bad) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= num_blocks) {
            *bad = i;
            return RF_K_BAD_BLOCK;
        }
    }
    return RF_K_OK;
}

int rf_host_write_kv(void *key_cache, void *value_cache, const void *key, const void *value,
                     const int64_t *slot_mapping, int64_t T, int64_t row, int64_t key_stride,
                     int64_t value_stride, int64_t num_slots, int in_dt, int cache_dt, float k_scale,
                     float v_scale, int64_t *bad) {
    int64_t t, j;
    int isz = rf_dtype_size(in_dt), csz = rf_dtype_size(cache_dt);
    float ik = 1.0f / k_scale, iv = 1.0f / v_scale;
    if (isz == 0 || in_dt > RF_DT_BF16 || csz == 0) return RF_K_BAD_DTYPE;
    for (t = 0; t < T; t++) {
        if (slot_mapping[t] < -1 || slot_mapping[t] >= num_slots) {
            *bad = t;
            return RF_K_BAD_SLOT;
        }
    }
    for (t = 0; t < T; t++) {
        int64_t s = slot_mapping[t];
        const char *k = (const char *)key + t * key_stride * isz, *v = (const char *)value + t * value_stride * isz;
        if (s < 0) continue;
        if (in_dt == cache_dt) {                           /* same type: a plain row copy */
            memcpy((char *)key_cache + s * row * csz, k, row * isz);
            memcpy((char *)value_cache + s * row * csz, v, row * isz);
            continue;
        }
        for (j = 0; j < row; j++) {
            rf_store(key_cache, s * row + j, cache_dt, rf_load(k, j, in_dt), ik);
            rf_store(value_cache, s * row + j, cache_dt, rf_load(v, j, in_dt), iv);
        }
    }
    return RF_K_OK;
}

int rf_host_copy_blocks(void *const *caches, int64_t num_caches, const int32_t *pairs,
                        int64_t num_pairs, int64_t block_bytes, int64_t num_blocks, int64_t *bad) {
    int64_t i, c;
    for (i = 0; i < 2 * num_pairs; i++) {
        if (pairs[i] < 0 || pairs[i] >= num_blocks) {
            *bad = i / 2;
            return RF_K_BAD_BLOCK;
        }
    }
    for (c = 0; c < num_caches; c++)
        for (i = 0; i < num_pairs; i++)
            if (pairs[2 * i] != pairs[2 * i + 1])
                memcpy((char *)caches[c] + pairs[2 * i + 1] * block_bytes,
                       (const char *)caches[c] + pairs[2 * i] * block_bytes, block_bytes);
    return RF_K_OK;
}

int rf_host_gather(const void *cache, const int32_t *table, int64_t table_len, int64_t num_tokens,
                   int64_t block_size, int64_t row_bytes, int64_t num_blocks, void *out, int64_t *bad) {
    int64_t i, done = 0;
    if (num_tokens > table_len * block_size) {
        *bad = num_tokens;
        return RF_K_BAD_SLOT;
    }
    if (rf_check_blocks(table, (num_tokens + block_size - 1) / block_size, num_blocks, bad) != RF_K_OK)
        return RF_K_BAD_BLOCK;
    for (i = 0; done < num_tokens; i++) {
        int64_t n = num_tokens - done < block_size ? num_tokens - done : block_size;
        memcpy((char *)out + done * row_bytes, (const char *)cache + table[i] * block_size * row_bytes,
               n * row_bytes);
        done += n;
    }
    return RF_K_OK;
}

int rf_host_gather_blocks(const void *const *caches, int64_t num_caches, const int32_t *ids, int64_t num_ids,
                          int64_t block_bytes, int64_t num_blocks, void *out, int64_t *bad) {
    int st = rf_check_blocks(ids, num_ids, num_blocks, bad);
    if (st != RF_K_OK) return st;
    for (int64_t c = 0; c < num_caches; c++)
        for (int64_t i = 0; i < num_ids; i++)
            memcpy((char *)out + (c * num_ids + i) * block_bytes,
                   (const char *)caches[c] + ids[i] * block_bytes, block_bytes);
    return RF_K_OK;
}

int rf_host_scatter_blocks(void *const *caches, int64_t num_caches, const int32_t *ids, int64_t num_ids,
                           int64_t block_bytes, int64_t num_blocks, const void *in, int64_t *bad) {
    int st = rf_check_blocks(ids, num_ids, num_blocks, bad);
    if (st != RF_K_OK) return st;
    for (int64_t c = 0; c < num_caches; c++)
        for (int64_t i = 0; i < num_ids; i++)
            memcpy((char *)caches[c] + ids[i] * block_bytes,
                   (const char *)in + (c * num_ids + i) * block_bytes, block_bytes);
    return RF_K_OK;
}
