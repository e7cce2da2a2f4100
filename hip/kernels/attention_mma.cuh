// Paged attention on tensor cores (CUDA, compute capability 8.0 and newer),
// included by attention.cu, whose prologue (rf_attn_open) and split reduction
// it shares: float16/bfloat16 caches read by queries of the same type, head_dim
// 64, 128 or 256. The host picks it where the image has it (HIP images do not,
// nor CUDA images for older GPUs), else the general kernel.
//
// A thread block is one warp, for up to 16 query heads of one kv head: the 16
// rows of mma.m16n8k16, whose columns are 16 positions of a tile. Per tile:
//   S = Q K^T     head_dim / 16 steps of two MMAs (positions 0-7, 8-15), K
//                 from shared memory by ldmatrix; Q stays in registers;
//   softmax       online, in base 2, the row maximum over a lane quad (2
//                 shuffles a row), the denominator summed per lane until the end;
//   O += P V      P from S's registers (the accumulator layout of S is the
//                 operand layout of P), V by ldmatrix.trans; head_dim / 8 MMAs.
// K/V tiles come by cp.async into a ring of RF_MMA_STAGES tiles, 16-byte
// chunks XOR-swizzled by row so that ldmatrix's 8 rows hit 8 bank groups;
// positions past the split read as zeros (cp.async's zero fill) and score -inf.
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16), lane = 4 * gid + tig:
//   A (16 x 16): a0 (row gid, cols 2tig, 2tig+1), a1 (row gid+8), a2 (cols +8), a3 (both)
//   B (16 x 8):  b0 (rows 2tig, 2tig+1; col gid), b1 (rows +8)
//   C (16 x 8):  c0, c1 (row gid, cols 2tig, 2tig+1), c2, c3 (row gid+8)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

template <int D> struct rf_mma_shape {
    static constexpr int STAGES = D == 256 ? 2 : 3; // tiles in the ring (shared memory stays under 48 KiB)
    static constexpr int CH = D / 8;                // 16-byte chunks a row
    static constexpr int TILE = 16 * D;             // elements of a K or V tile
    static constexpr bool Q_SHARED = D == 256;      // Q read by ldmatrix: in registers it would spill
};

__device__ __forceinline__ uint32_t rf_mma_saddr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Copy 16 bytes (src_bytes 16), or write 16 zeros (src_bytes 0), without registers.
__device__ __forceinline__ void rf_cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void rf_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void rf_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <bool TRANS> __device__ __forceinline__ void rf_ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr)
                     : "memory");
}

// c += a b for one 16 x 8 tile (float32 accumulators).
template <int DT> __device__ __forceinline__ void rf_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    if constexpr (DT == RF_DT_F16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as a pair of DT elements, lo in the low half (round to nearest even).
template <int DT> __device__ __forceinline__ uint32_t rf_mma_pack(float lo, float hi) {
    uint32_t r;
    if constexpr (DT == RF_DT_F16)
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Byte offset in a tile of 16-byte chunk c of row r.
template <int D> __device__ __forceinline__ uint32_t rf_mma_chunk(int r, int c) {
    return (uint32_t)(r * D + ((c ^ (r & 7)) << 3)) * 2;
}

template <int DT, int D>
__device__ void rf_attn_mma(const rf_attn_args &a, int64_t num_splits, float *part_acc, float *part_ml,
                            unsigned long long *bad) {
    using S = rf_mma_shape<D>;
    // The ring; before the first tile it holds the split's table entries.
    __shared__ __align__(128) uint16_t ring[S::STAGES][2][S::TILE];
    __shared__ int32_t slots[RF_ATTN_PART];     // each position's row: block * block_size + offset
    __shared__ __align__(128) uint16_t qs[S::Q_SHARED ? S::TILE : 8];  // Q as a tile, for head_dim 256
    static_assert(sizeof(ring) >= (RF_ATTN_PART + 1) * sizeof(int32_t), "the table entries fit in the ring");
    int32_t *blocks = (int32_t *)&ring[0][0][0];
    rf_attn_job job;
    if (!rf_attn_open<32>(a, 16, num_splits, blocks, part_ml, bad, job)) return;
    const int lane = threadIdx.x, gid = lane >> 2, tig = lane & 3;
    const int cnt = (int)(job.end - job.begin), bs = (int)a.block_size, off0 = (int)(job.begin - job.b0 * bs);
    for (int i = lane; i < cnt; i += 32) slots[i] = blocks[(off0 + i) / bs] * bs + (off0 + i) % bs;
    __syncwarp();                               // the ring is free again, slots[] complete

    const int64_t row_bytes = a.num_kv_heads * D * 2;
    const char *kc = (const char *)a.key_cache + job.g * D * 2, *vc = (const char *)a.value_cache + job.g * D * 2;
    // Tile i (positions 16i .. 16i+15 of the split) into ring stage st.
    auto load = [&](int i, int st) {
        const uint32_t ks = rf_mma_saddr(&ring[st][0][0]), vs = rf_mma_saddr(&ring[st][1][0]);
#pragma unroll
        for (int k = 0; k < 16 * S::CH / 32; k++) {
            const int e = lane + 32 * k, r = e / S::CH, c = e % S::CH, p = 16 * i + r;
            const bool on = p < cnt;
            const int64_t off = on ? (int64_t)slots[p] * row_bytes + c * 16 : 0;
            rf_cp_async16(ks + rf_mma_chunk<D>(r, c), kc + off, on ? 16 : 0);
            rf_cp_async16(vs + rf_mma_chunk<D>(r, c), vc + off, on ? 16 : 0);
        }
    };

    // Q as A operands, rows past the heads zero; element (row, col) is query head h0 + row, dimension col.
    const uint16_t *q = (const uint16_t *)a.query + job.out_row;
    auto qpair = [&](int row, int col) -> uint32_t {
        return row < job.nh ? (uint32_t)q[row * D + col] | (uint32_t)q[row * D + col + 1] << 16 : 0u;
    };
    uint32_t qa[S::Q_SHARED ? 1 : D / 16][4];
    if constexpr (S::Q_SHARED) {
        for (int e = lane; e < S::TILE / 2; e += 32) {
            const int row = e / (D / 2), col = 2 * (e % (D / 2));
            *(uint32_t *)((char *)qs + rf_mma_chunk<D>(row, col / 8) + 2 * (col % 8)) = qpair(row, col);
        }
        __syncwarp();
    } else {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            qa[kk][0] = qpair(gid, 16 * kk + 2 * tig), qa[kk][1] = qpair(gid + 8, 16 * kk + 2 * tig);
            qa[kk][2] = qpair(gid, 16 * kk + 2 * tig + 8), qa[kk][3] = qpair(gid + 8, 16 * kk + 2 * tig + 8);
        }
    }
    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   // rows gid and gid + 8, base 2
    const float qk = a.scale * a.k_scale * 1.4426950408889634f;

    const int tiles = (cnt + 15) / 16;
    // ldmatrix lanes of an A operand or of V^T: rows 0-7 / 8-15 (lanes 8-15, 24-31), chunk +1 (lanes 16-31)
    const int ar = (lane & 7) + (((lane >> 3) & 1) << 3), ac = lane >> 4;
#pragma unroll
    for (int st = 0; st < S::STAGES - 1; st++) {
        if (st < tiles) load(st, st);
        rf_cp_async_commit();
    }
    for (int i = 0; i < tiles; i++) {
        if (i + S::STAGES - 1 < tiles) load(i + S::STAGES - 1, (i + S::STAGES - 1) % S::STAGES);
        rf_cp_async_commit();
        rf_cp_async_wait<S::STAGES - 1>();      // this lane's copies of tile i have landed
        __syncwarp();                           // and every lane's
        const int st = i % S::STAGES;
        const uint32_t ks = rf_mma_saddr(&ring[st][0][0]), vs = rf_mma_saddr(&ring[st][1][0]);

        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};   // [positions 0-7, 8-15]
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            // matrices: rows 0-7 / 8-15 (lanes 16-31) by chunk 2kk / 2kk+1 (lanes 8-15, 24-31)
            const int r = (lane & 7) + ((lane >> 4) << 3), c = 2 * kk + ((lane >> 3) & 1);
            uint32_t b[4];
            rf_ldmatrix_x4<false>(b, ks + rf_mma_chunk<D>(r, c));
            if constexpr (S::Q_SHARED) rf_ldmatrix_x4<false>(qa[0], rf_mma_saddr(qs) + rf_mma_chunk<D>(ar, 2 * kk + ac));
            rf_mma<DT>(s[0], qa[S::Q_SHARED ? 0 : kk], b[0], b[1]);
            rf_mma<DT>(s[1], qa[S::Q_SHARED ? 0 : kk], b[2], b[3]);
        }
        const bool tail = 16 * i + 16 > cnt;
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                s[n][e] = tail && 16 * i + 8 * n + 2 * tig + (e & 1) >= cnt ? -INFINITY : s[n][e] * qk;
        float c[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float top = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
            top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
            top = fmaxf(fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2)), m[h]);
            c[h] = top == m[h] ? 1.0f : exp2f(m[h] - top);
            m[h] = top;
            const float base = top == -INFINITY ? 0.0f : top;   // a row of -inf scores stays at zero
#pragma unroll
            for (int n = 0; n < 2; n++)
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; e++) s[n][e] = exp2f(s[n][e] - base);
            l[h] = l[h] * c[h] + s[0][2 * h] + s[0][2 * h + 1] + s[1][2 * h] + s[1][2 * h + 1];
        }
        const uint32_t pa[4] = {rf_mma_pack<DT>(s[0][0], s[0][1]), rf_mma_pack<DT>(s[0][2], s[0][3]),
                                rf_mma_pack<DT>(s[1][0], s[1][1]), rf_mma_pack<DT>(s[1][2], s[1][3])};
#pragma unroll
        for (int dd = 0; dd < D / 16; dd++) {
            uint32_t b[4];
            rf_ldmatrix_x4<true>(b, vs + rf_mma_chunk<D>(ar, 2 * dd + ac));
#pragma unroll
            for (int e = 0; e < 4; e++) acc[2 * dd][e] *= c[e >> 1], acc[2 * dd + 1][e] *= c[e >> 1];
            rf_mma<DT>(acc[2 * dd], pa, b[0], b[1]);
            rf_mma<DT>(acc[2 * dd + 1], pa, b[2], b[3]);
        }
        __syncwarp();                           // every lane is done with stage st before it is refilled
    }
    rf_cp_async_wait<0>();

    // Rows gid and gid + 8: the denominator over the quad, then the output or the split's share.
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    const int64_t Hq = a.num_q_heads;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = gid + 8 * h;
        if (row >= job.nh) continue;
        const int64_t k = (job.t * Hq + job.h0 + row) * num_splits + blockIdx.y;
        const float inv = num_splits == 1 ? (l[h] > 0.0f ? a.v_scale / l[h] : 0.0f) : a.v_scale;
#pragma unroll
        for (int j = 0; j < D / 8; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int d = 8 * j + 2 * tig + e;
                const float x = acc[j][2 * h + e] * inv;
                if (num_splits == 1) rf_attn_put(a.out, job.out_row + row * D + d, a.q_dt, x);
                else part_acc[k * D + d] = x;
            }
        if (num_splits > 1 && tig == 0)         // the maximum in natural-log units, as the reduction reads it
            part_ml[2 * k] = m[h] * 0.6931471805599453f, part_ml[2 * k + 1] = l[h];
    }
}

// rf_paged_attention_mma_<dt>_<head_dim>: grid (num_queries * num_kv_heads *
// ceil(G / 16), num_splits), 32 threads, static shared memory; arguments as
// rf_paged_attention_<dt>_<hb>, without L.
#define RF_MMA_KERNEL(DT, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32) rf_paged_attention_mma_##DT##_##D(                          \
        rf_attn_args a, int64_t num_splits, float *part_acc, float *part_ml, unsigned long long *bad) {          \
        rf_attn_mma<DT, D>(a, num_splits, part_acc, part_ml, bad);                                              \
    }
RF_MMA_KERNEL(1, 64)
RF_MMA_KERNEL(1, 128)
RF_MMA_KERNEL(1, 256)
RF_MMA_KERNEL(2, 64)
RF_MMA_KERNEL(2, 128)
RF_MMA_KERNEL(2, 256)

#endif
