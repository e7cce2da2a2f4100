// Paged attention over rocmforge's cache: one source for nvcc (CUDA) and hipcc
// (HIP). Arguments and semantics: ../rf_attention.h; the host version with
// the same results (up to float rounding): ../rf_host_attention.c.
//
// Split-K (flash-decoding): thread block (query token, kv head, head group,
// split) reads the split's RF_ATTN_PART positions of its sequence once, K
// then V, for up to HB query heads sharing the kv head. With one split it
// writes the output; else it writes its unnormalized sum, maximum and
// denominator, and rf_paged_attention_reduce combines the splits.
//
// Threads: RF_ATTN_THREADS per block, in subgroups of L lanes (L a power of
// two, L * 8 >= head_dim); a subgroup reads one key or value row, 8 elements
// per lane, so a block has RF_ATTN_THREADS / L rows in flight per step.
// Shuffles stay inside 32-lane groups, so a 64-wide AMD wavefront works alike.
#ifdef __HIPCC__
#include <hip/hip_runtime.h>
#define RF_SHFL_XOR(v, m) __shfl_xor((v), (m), 32)
#else
#define RF_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), 32)
#endif
#include <stdint.h>

#include "../rf_attention.h"
#include "../rf_convert.h"

#define RF_ATTN_GROUPS (RF_ATTN_THREADS / 32)

// 8 consecutive elements of a row of type DT at p (aligned to 8 elements), as floats.
template <int DT> __device__ __forceinline__ void rf_load8(const char *p, float *x, float scale) {
    if constexpr (DT == RF_DT_F32) {
        float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
        x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    } else if constexpr (DT == RF_DT_F16 || DT == RF_DT_BF16) {
        uint4 v = *(const uint4 *)p;
        uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint16_t h = (uint16_t)(w[j >> 1] >> ((j & 1) * 16));
            x[j] = DT == RF_DT_F16 ? rf_f16_bits_to_f32(h) : rf_bf16_bits_to_f32(h);
        }
    } else {
        uint2 v = *(const uint2 *)p;
        uint32_t w[2] = {v.x, v.y};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint8_t b = (uint8_t)(w[j >> 2] >> ((j & 3) * 8));
            x[j] = (DT == RF_DT_FP8_E4M3 ? rf_e4m3_bits_to_f32(b) : (float)(int8_t)b) * scale;
        }
    }
}

__device__ __forceinline__ int rf_attn_bytes(int dt) { return dt == RF_DT_F32 ? 4 : dt <= RF_DT_BF16 ? 2 : 1; }

// Query and output elements (one at a time: they are read once per block).
__device__ __forceinline__ float rf_attn_get(const void *p, int64_t i, int dt) {
    if (dt == RF_DT_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    return dt == RF_DT_F16 ? rf_f16_bits_to_f32(h) : rf_bf16_bits_to_f32(h);
}

__device__ __forceinline__ void rf_attn_put(void *p, int64_t i, int dt, float x) {
    if (dt == RF_DT_F32) ((float *)p)[i] = x;
    else ((uint16_t *)p)[i] = dt == RF_DT_F16 ? rf_f32_to_f16_bits(x) : rf_f32_to_bf16_bits(x);
}

// The sequence of query token t, its first query row and its query count.
__device__ __forceinline__ int64_t rf_attn_seq(const rf_attn_args &a, int64_t t, int64_t *first, int64_t *nq) {
    if (!a.query_start) {
        *first = t, *nq = 1;
        return t;
    }
    int64_t lo = 0, hi = a.num_seqs - 1;         // the last s with query_start[s] <= t
    while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (a.query_start[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    *first = a.query_start[lo], *nq = a.query_start[lo + 1] - a.query_start[lo];
    return lo;
}

// Sum (or maximum) of v over the 32-lane group, then over the block's groups
// through red (RF_ATTN_GROUPS * HB floats); every thread gets the block's value.
template <int HB, bool MAX> __device__ __forceinline__ void rf_attn_block_reduce(float *v, float *red) {
    const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
#pragma unroll
    for (int h = 0; h < HB; h++) {
        for (int o = 16; o > 0; o >>= 1) {
            float w = RF_SHFL_XOR(v[h], o);
            v[h] = MAX ? fmaxf(v[h], w) : v[h] + w;
        }
        if (lane == 0) red[group * HB + h] = v[h];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < HB; h++) {
        v[h] = red[h];
        for (int g = 1; g < RF_ATTN_GROUPS; g++) v[h] = MAX ? fmaxf(v[h], red[g * HB + h]) : v[h] + red[g * HB + h];
    }
    __syncthreads();
}

// Dynamic shared memory: scores [RF_ATTN_PART][HB], sums [HB][head_dim], red [GROUPS][HB].
template <int DT, int HB>
__device__ void rf_attn_split(const rf_attn_args &a, int L, int64_t num_splits, float *part_acc, float *part_ml,
                              unsigned long long *bad) {
    extern __shared__ float rf_attn_smem[];
    float *scores = rf_attn_smem, *sums = scores + RF_ATTN_PART * HB, *red = sums + HB * a.head_dim;
    __shared__ int rf_attn_bad;
    const int64_t t = blockIdx.x, D = a.head_dim, Hq = a.num_q_heads, G = Hq / a.num_kv_heads;
    const int64_t chunks = (G + HB - 1) / HB, g = blockIdx.y / chunks, h0 = g * G + (blockIdx.y % chunks) * HB;
    const int64_t split = blockIdx.z, bs = a.block_size;
    const int nh = (int)(G - (blockIdx.y % chunks) * HB < HB ? G - (blockIdx.y % chunks) * HB : HB);
    const int lane = threadIdx.x % L, sg = threadIdx.x / L, nsg = RF_ATTN_THREADS / L;
    const bool lane_on = lane * 8 < D;
    int64_t first, nq, s = rf_attn_seq(a, t, &first, &nq);
    int64_t n = a.seq_lens[s], len = a.stride;
    const int32_t *table = a.tables + s * a.stride;
    if (a.indptr) {
        table = a.tables + a.indptr[s];
        len = a.indptr[s + 1] - a.indptr[s];
    }
    const int64_t ctx = n == 0 ? 0 : n - nq + (t - first) + 1;    // positions [0, ctx) are attended
    const int64_t begin = split * RF_ATTN_PART, end = ctx < begin + RF_ATTN_PART ? ctx : begin + RF_ATTN_PART;

    // Checks, as rf_attn_check: a failing sequence is reported and gets no result.
    if (threadIdx.x == 0) {
        bool ok = n >= 0 && (n + bs - 1) / bs <= len && (n == 0 || n >= nq) && t >= first && t < first + nq &&
                  ctx <= num_splits * RF_ATTN_PART;
        if (a.indptr) ok = ok && a.indptr[s] >= 0 && len >= 0 && a.indptr[s + 1] <= a.num_indices;
        rf_attn_bad = !ok;
    }
    __syncthreads();
    if (!rf_attn_bad && begin < end) {
        for (int64_t b = begin / bs + threadIdx.x; b <= (end - 1) / bs; b += RF_ATTN_THREADS)
            if (table[b] < 0 || table[b] >= a.num_blocks) rf_attn_bad = 1;
    }
    __syncthreads();
    if (rf_attn_bad && threadIdx.x == 0) atomicMin(bad, (unsigned long long)s);
    const int64_t out_row = (t * Hq + h0) * D;
    if (rf_attn_bad || begin >= end) {          // nothing to attend: zeros, or an empty split
        if (num_splits == 1) {
            for (int64_t i = threadIdx.x; i < nh * D; i += RF_ATTN_THREADS) rf_attn_put(a.out, out_row + i, a.q_dt, 0.0f);
        } else if (threadIdx.x < nh) {
            int64_t k = ((t * Hq + h0 + threadIdx.x) * num_splits + split) * 2;
            part_ml[k] = -INFINITY, part_ml[k + 1] = 0.0f;
        }
        return;
    }

    // Pass 1: scores of the split's positions, a subgroup per key row.
    float q[HB][8];
#pragma unroll
    for (int h = 0; h < HB; h++)
#pragma unroll
        for (int j = 0; j < 8; j++)
            q[h][j] = lane_on && h < nh ? rf_attn_get(a.query, out_row + h * D + lane * 8 + j, a.q_dt) : 0.0f;
    const int64_t rowb = D * rf_attn_bytes(a.cache_dt), Hkv = a.num_kv_heads;
    const char *kc = (const char *)a.key_cache + (g * D + lane * 8) * rf_attn_bytes(a.cache_dt);
    const char *vc = (const char *)a.value_cache + (g * D + lane * 8) * rf_attn_bytes(a.cache_dt);
    for (int64_t base = begin; base < end; base += nsg) {       // uniform across each 32-lane group
        const int64_t p = base + sg;
        float k[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (p < end && lane_on)
            rf_load8<DT>(kc + ((int64_t)table[p / bs] * bs + p % bs) * Hkv * rowb, k, a.k_scale);
#pragma unroll
        for (int h = 0; h < HB; h++) {
            float d = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) d += q[h][j] * k[j];
            for (int o = L / 2; o > 0; o >>= 1) d += RF_SHFL_XOR(d, o);
            if (p < end && lane == 0) scores[(p - begin) * HB + h] = d * a.scale;
        }
    }
    __syncthreads();

    // Softmax over the split: maximum and denominator per head.
    const int64_t cnt = end - begin;
    float m[HB], l[HB];
#pragma unroll
    for (int h = 0; h < HB; h++) m[h] = -INFINITY;
    for (int64_t i = threadIdx.x; i < cnt; i += RF_ATTN_THREADS)
#pragma unroll
        for (int h = 0; h < HB; h++) m[h] = fmaxf(m[h], scores[i * HB + h]);
    rf_attn_block_reduce<HB, true>(m, red);
#pragma unroll
    for (int h = 0; h < HB; h++) l[h] = 0.0f;
    for (int64_t i = threadIdx.x; i < cnt; i += RF_ATTN_THREADS)
#pragma unroll
        for (int h = 0; h < HB; h++) {
            float e = expf(scores[i * HB + h] - m[h]);
            scores[i * HB + h] = e;
            l[h] += e;
        }
    for (int64_t i = threadIdx.x; i < HB * D; i += RF_ATTN_THREADS) sums[i] = 0.0f;
    rf_attn_block_reduce<HB, false>(l, red);    // its barriers also publish scores and sums

    // Pass 2: the weighted sum of value rows, a subgroup per row, then across subgroups.
    float acc[HB][8];
#pragma unroll
    for (int h = 0; h < HB; h++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[h][j] = 0.0f;
    if (lane_on) {
        for (int64_t p = begin + sg; p < end; p += nsg) {
            float v[8];
            rf_load8<DT>(vc + ((int64_t)table[p / bs] * bs + p % bs) * Hkv * rowb, v, a.v_scale);
#pragma unroll
            for (int h = 0; h < HB; h++) {
                float w = scores[(p - begin) * HB + h];
#pragma unroll
                for (int j = 0; j < 8; j++) acc[h][j] += w * v[j];
            }
        }
#pragma unroll
        for (int h = 0; h < HB; h++)
            if (h < nh)
#pragma unroll
                for (int j = 0; j < 8; j++) atomicAdd(&sums[h * D + lane * 8 + j], acc[h][j]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < nh * D; i += RF_ATTN_THREADS) {
        const int h = (int)(i / D);
        if (num_splits == 1) {
            rf_attn_put(a.out, out_row + i, a.q_dt, sums[i] / l[h]);
        } else {
            int64_t k = (t * Hq + h0 + h) * num_splits + split;
            part_acc[k * D + i % D] = sums[i];
            if (i % D == 0) part_ml[2 * k] = m[h], part_ml[2 * k + 1] = l[h];
        }
    }
}

template <int DT>
__device__ void rf_attn_split_heads(const rf_attn_args &a, int hb, int L, int64_t num_splits, float *part_acc,
                                    float *part_ml, unsigned long long *bad) {
    switch (hb) {
    case 1: rf_attn_split<DT, 1>(a, L, num_splits, part_acc, part_ml, bad); break;
    case 2: rf_attn_split<DT, 2>(a, L, num_splits, part_acc, part_ml, bad); break;
    case 4: rf_attn_split<DT, 4>(a, L, num_splits, part_acc, part_ml, bad); break;
    default: rf_attn_split<DT, 8>(a, L, num_splits, part_acc, part_ml, bad);
    }
}

// Grid (num_queries, num_kv_heads * ceil(G / hb), num_splits), RF_ATTN_THREADS
// threads, (RF_ATTN_PART * hb + hb * head_dim + RF_ATTN_GROUPS * hb) * 4 bytes
// of dynamic shared memory. hb (1, 2, 4 or 8) query heads per block; L lanes per row.
// *bad (all ones before) receives the smallest failing sequence.
extern "C" __global__ void __launch_bounds__(RF_ATTN_THREADS)
rf_paged_attention(rf_attn_args a, int hb, int L, int64_t num_splits, float *part_acc, float *part_ml,
                   unsigned long long *bad) {
    switch (a.cache_dt) {
    case RF_DT_F32: rf_attn_split_heads<RF_DT_F32>(a, hb, L, num_splits, part_acc, part_ml, bad); break;
    case RF_DT_F16: rf_attn_split_heads<RF_DT_F16>(a, hb, L, num_splits, part_acc, part_ml, bad); break;
    case RF_DT_BF16: rf_attn_split_heads<RF_DT_BF16>(a, hb, L, num_splits, part_acc, part_ml, bad); break;
    case RF_DT_FP8_E4M3: rf_attn_split_heads<RF_DT_FP8_E4M3>(a, hb, L, num_splits, part_acc, part_ml, bad); break;
    default: rf_attn_split_heads<RF_DT_I8>(a, hb, L, num_splits, part_acc, part_ml, bad);
    }
}

// Combine the splits: grid (num_queries, num_q_heads), RF_ATTN_THREADS threads.
extern "C" __global__ void __launch_bounds__(RF_ATTN_THREADS)
rf_paged_attention_reduce(rf_attn_args a, int64_t num_splits, const float *part_acc, const float *part_ml) {
    const int64_t row = (int64_t)blockIdx.x * a.num_q_heads + blockIdx.y, D = a.head_dim;
    const float *ml = part_ml + row * num_splits * 2, *acc = part_acc + row * num_splits * D;
    float m = -INFINITY, l = 0.0f;
    for (int64_t k = 0; k < num_splits; k++)
        if (ml[2 * k + 1] > 0.0f) m = fmaxf(m, ml[2 * k]);
    for (int64_t k = 0; k < num_splits; k++)
        if (ml[2 * k + 1] > 0.0f) l += ml[2 * k + 1] * expf(ml[2 * k] - m);
    for (int64_t d = threadIdx.x; d < D; d += RF_ATTN_THREADS) {
        float o = 0.0f;
        for (int64_t k = 0; k < num_splits; k++)
            if (ml[2 * k + 1] > 0.0f) o += acc[k * D + d] * expf(ml[2 * k] - m);
        rf_attn_put(a.out, row * D + d, a.q_dt, l > 0.0f ? o / l : 0.0f);
    }
}
