"""Designs for write_kv's and copy_blocks' kernels, side by side on one GPU:
the kernels rocmforge ships (hip/kernels/kv_kernels.cu) reduced to their
copy loops, against other load and store cache policies, thread shapes, grids
of one or two waves that loop over the work with the next item's loads in
flight, and bulk copies through shared memory (Hopper's cp.async.bulk), each checked for
the bytes it moved. The cases of rocmforge.bench_kernels: write_kv of 8,192
float16 tokens (8 heads x 128) to scattered slots, and copy_blocks of 1,024
scattered block pairs of 32 KiB in 16 caches (512 MiB).

    python benchmarks/kv_kernel_designs.py [--reps 11]

Prints median GPU time per call (CUDA events over a burst of launches, the
designs alternating within each repetition) and bandwidth as a share of a
512 MiB device copy timed the same way, then one JSON line. Needs an NVIDIA
GPU of compute capability 9.0 or later and cupy (its NVRTC compiles the
designs)."""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

SOURCE = r"""
typedef long long int64_t; typedef unsigned int uint32_t; typedef unsigned long long uint64_t;
struct __align__(16) V { uint32_t x, y, z, w; };

// loads: 0 plain, 1 read-only without L1 allocation, 2 read-only, 3 streaming (evict first)
template <int L> __device__ __forceinline__ V ld(const V *p) {
    V r;
    if (L == 0) return *p;
    if (L == 1) asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    if (L == 2) asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    if (L == 3) asm volatile("ld.global.cs.v4.u32 {%0,%1,%2,%3}, [%4];"
                             : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
// stores: 0 plain, 1 streaming
template <int S> __device__ __forceinline__ void st(V *p, V v) {
    if (S == 0) *p = v;
    if (S == 1) asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};"
                             :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// write_kv: block (x, y), y tokens, x threads per token with P 16-byte pieces each of its K and V rows (m pieces a row)
template <int P, int L, int S>
__global__ void write_kv(char *kc, char *vc, const char *k, const char *v, const int64_t *slots, int64_t T, int64_t m) {
    int64_t t = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= T) return;
    int64_t s = slots[t];
    const V *ks = (const V *)(k + t * m * 16), *vs = (const V *)(v + t * m * 16);
    V x[P];
#pragma unroll
    for (int j = 0; j < P; j++) { int i = threadIdx.x + j * blockDim.x; x[j] = ld<L>(i < m ? ks + i : vs + (i - m)); }
    V *kd = (V *)(kc + s * m * 16), *vd = (V *)(vc + s * m * 16);
#pragma unroll
    for (int j = 0; j < P; j++) { int i = threadIdx.x + j * blockDim.x; st<S>(i < m ? kd + i : vd + (i - m), x[j]); }
}

// copy_blocks: grid (pairs, caches), U pieces per thread and round, n pieces a block
template <int U, int L, int S>
__global__ void copy_blocks(char *const *caches, const int *pairs, int64_t n) {
    char *base = caches[blockIdx.y];
    const V *s = (const V *)(base + (int64_t)pairs[2 * blockIdx.x] * n * 16);
    V *d = (V *)(base + (int64_t)pairs[2 * blockIdx.x + 1] * n * 16);
    for (int64_t u = threadIdx.x; u < n; u += (int64_t)U * blockDim.x) {
        V x[U];
#pragma unroll
        for (int j = 0; j < U; j++) x[j] = ld<L>(s + u + j * blockDim.x);
#pragma unroll
        for (int j = 0; j < U; j++) st<S>(d + u + j * blockDim.x, x[j]);
    }
}

// write_kv on a grid of at most a few waves: each row of 64 threads takes tokens t, t + stride, ...
// and loads the next token's pieces (4 a thread) before storing this one's, so loads stay in flight across tokens
extern "C" __global__ void write_kv_loop(char *kc, char *vc, const char *k, const char *v, const int64_t *slots,
                                        int64_t T, int64_t m) {
    int64_t stride = (int64_t)gridDim.x * blockDim.y, t = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= T) return;
    // this thread's 4 pieces of token u's K and V rows (m pieces each), loaded
    auto load = [&](int64_t u, V *x) {
        const V *ks = (const V *)(k + u * m * 16), *vs = (const V *)(v + u * m * 16);
#pragma unroll
        for (int j = 0; j < 4; j++) { int i = threadIdx.x + j * 64; x[j] = ld<1>(i < m ? ks + i : vs + (i - m)); }
    };
    V cur[4], nxt[4];
    int64_t s = slots[t];
    load(t, cur);
    for (; t < T; t += stride) {
        int64_t tn = t + stride, sn = 0;
        if (tn < T) {
            sn = slots[tn];
            load(tn, nxt);
        }
        V *kd = (V *)(kc + s * m * 16), *vd = (V *)(vc + s * m * 16);
#pragma unroll
        for (int j = 0; j < 4; j++) { int i = threadIdx.x + j * 64; st<0>(i < m ? kd + i : vd + (i - m), cur[j]); }
#pragma unroll
        for (int j = 0; j < 4; j++) cur[j] = nxt[j];
        s = sn;
    }
}

// copy_blocks on a grid of a few waves: each CTA of 512 threads takes (pair, cache) items w, w + gridDim.x, ...
// (pair fastest) and loads the next item's block (4 pieces a thread) before storing this one's
extern "C" __global__ void copy_blocks_loop(char *const *caches, const int *pairs, int64_t n, int64_t num_pairs,
                                           int64_t items) {
    // this thread's 4 pieces of item w's source block, loaded; returns the item's destination block
    auto load = [&](int64_t w, V *x) {
        char *base = caches[w / num_pairs];
        const V *s = (const V *)(base + (int64_t)pairs[2 * (w % num_pairs)] * n * 16);
#pragma unroll
        for (int j = 0; j < 4; j++) x[j] = ld<0>(s + threadIdx.x + j * 512);
        return (V *)(base + (int64_t)pairs[2 * (w % num_pairs) + 1] * n * 16);
    };
    int64_t w = blockIdx.x;
    if (w >= items) return;
    V cur[4], nxt[4];
    V *d = load(w, cur);
    for (; w < items; w += gridDim.x) {
        int64_t wn = w + gridDim.x;
        V *dn = wn < items ? load(wn, nxt) : nullptr;
#pragma unroll
        for (int j = 0; j < 4; j++) st<0>(d + threadIdx.x + j * 512, cur[j]);
#pragma unroll
        for (int j = 0; j < 4; j++) cur[j] = nxt[j];
        d = dn;
    }
}

// bulk copies through shared memory, issued by one thread and tracked by an mbarrier
__device__ __forceinline__ uint32_t sa(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void bar_init(uint64_t *b) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(b)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void bulk_load(void *smem, const void *g, uint32_t bytes, uint64_t *b) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(sa(smem)), "l"(g), "r"(bytes), "r"(sa(b)) : "memory");
}
__device__ __forceinline__ void expect(uint64_t *b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sa(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void wait(uint64_t *b) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(sa(b)) : "memory");
}
__device__ __forceinline__ void bulk_store(void *g, const void *smem, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(g), "r"(sa(smem)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_drain() {
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}

// copy_blocks in `parts` bulk pieces per (pair, cache): each piece's store starts once it has landed
extern "C" __global__ void copy_blocks_bulk(char *const *caches, const int *pairs, int64_t n, int parts) {
    extern __shared__ __align__(128) char sm[];
    __shared__ uint64_t bar[4];
    if (threadIdx.x != 0) return;
    int64_t bytes = n * 16, part = bytes / parts;
    char *base = caches[blockIdx.y];
    const char *s = base + (int64_t)pairs[2 * blockIdx.x] * bytes;
    char *d = base + (int64_t)pairs[2 * blockIdx.x + 1] * bytes;
    for (int p = 0; p < parts; p++) bar_init(&bar[p]);
    for (int p = 0; p < parts; p++) { expect(&bar[p], part); bulk_load(sm + p * part, s + p * part, part, &bar[p]); }
    for (int p = 0; p < parts; p++) { wait(&bar[p]); bulk_store(d + p * part, sm + p * part, part); }
    bulk_drain();
}

// write_kv with `tok` tokens per CTA: their K and V rows (rb bytes each) in two bulk loads, one bulk store per row
extern "C" __global__ void write_kv_bulk(char *kc, char *vc, const char *k, const char *v, const int64_t *slots,
                                        int64_t T, int64_t rb, int tok) {
    extern __shared__ __align__(128) char sm[];
    __shared__ uint64_t bar[1];
    if (threadIdx.x != 0) return;
    int64_t t0 = (int64_t)blockIdx.x * tok;
    int nt = T - t0 < tok ? (int)(T - t0) : tok;
    bar_init(&bar[0]);
    expect(&bar[0], 2 * nt * rb);
    bulk_load(sm, k + t0 * rb, nt * rb, &bar[0]);
    bulk_load(sm + tok * rb, v + t0 * rb, nt * rb, &bar[0]);
    wait(&bar[0]);
    for (int j = 0; j < nt; j++) {
        int64_t s = slots[t0 + j];
        bulk_store(kc + s * rb, sm + j * rb, rb);
        bulk_store(vc + s * rb, sm + (tok + j) * rb, rb);
    }
    bulk_drain();
}
"""

# (pieces per thread, load policy, store policy, threads per token) for write_kv; the first is rocmforge's old kernel
WRITE_KV = [(4, 0, 0, 64), (4, 1, 0, 64), (4, 2, 0, 64), (4, 3, 0, 64), (4, 0, 1, 64), (4, 1, 1, 64),
            (2, 1, 0, 128), (8, 1, 0, 32)]
# (pieces per thread and round, load policy, store policy, threads) for copy_blocks; the first is the old kernel
COPY_BLOCKS = [(8, 0, 0, 256), (4, 0, 0, 512), (2, 0, 0, 1024), (4, 0, 0, 256), (4, 1, 0, 512), (4, 2, 0, 512),
               (4, 3, 0, 512), (4, 0, 1, 512), (4, 3, 1, 512)]
LOADS = ["plain", "nc.L1::no_allocate", "nc", "cs"]
STORES = ["plain", "cs"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args(argv)
    import cupy as cp

    names = ([f"write_kv<{p},{l},{s}>" for p, l, s, _ in WRITE_KV]
             + [f"copy_blocks<{u},{l},{s}>" for u, l, s, _ in COPY_BLOCKS])
    mod = cp.RawModule(code=SOURCE, options=("-std=c++17", "-arch=sm_90"), name_expressions=names)
    fn = {n: mod.get_function(n) for n in names + ["copy_blocks_bulk", "write_kv_bulk", "write_kv_loop",
                                                    "copy_blocks_loop"]}
    sms = cp.cuda.Device(0).attributes["MultiProcessorCount"]
    fn["copy_blocks_bulk"].max_dynamic_shared_size_bytes = 64 << 10
    fn["write_kv_bulk"].max_dynamic_shared_size_bytes = 128 << 10

    def burst(f, launches):
        cp.cuda.Device(0).synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        for _ in range(launches):
            f()
        b.record()
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b) * 1000 / launches

    def timed(cases, launches):
        times = {name: [] for name in cases}
        for _ in range(args.reps):
            for name, f in cases.items():
                times[name].append(burst(f, launches))
        return {name: statistics.median(t) for name, t in times.items()}

    rng = np.random.default_rng(0)
    big = 512 << 20
    src, dst = cp.empty(big, cp.uint8), cp.empty(big, cp.uint8)
    copy_us = timed({"copy": lambda: dst.data.copy_from_device_async(src.data, big)}, 10)["copy"]
    ceiling = 2 * big / copy_us / 1e6
    src = dst = None
    rows = []

    # write_kv
    T, m = 8192, 128
    rb, num_slots = m * 16, 4096 * 16 * 2
    kc, vc = cp.empty(num_slots * rb, cp.uint8), cp.empty(num_slots * rb, cp.uint8)
    k = cp.random.randint(0, 255, T * rb, dtype=cp.uint8)
    v = cp.random.randint(0, 255, T * rb, dtype=cp.uint8)
    slots = cp.asarray(rng.permutation(num_slots)[:T].astype(np.int64))
    cases = {}
    for p, l, s, tx in WRITE_KV:
        ty = 256 // tx
        name = f"{tx}x{ty} threads, {p} pieces, load {LOADS[l]}, store {STORES[s]}"
        cases[name] = (lambda f=fn[f"write_kv<{p},{l},{s}>"], tx=tx, ty=ty:
                       f((T // ty,), (tx, ty), (kc, vc, k, v, slots, np.int64(T), np.int64(m))))
    for tok in (4, 8, 16):
        cases[f"bulk copies, {tok} tokens a CTA"] = (
            lambda tok=tok: fn["write_kv_bulk"]((T // tok,), (32,), (kc, vc, k, v, slots, np.int64(T), np.int64(rb),
                                                np.int32(tok)), shared_mem=2 * tok * rb))
    for waves in (1, 2):        # 8 CTAs of 256 threads fill an SM
        cases[f"64x4 threads looping over tokens, {waves} wave(s) of CTAs, next token's loads first"] = (
            lambda waves=waves: fn["write_kv_loop"]((waves * 8 * sms,), (64, 4),
                                                    (kc, vc, k, v, slots, np.int64(T), np.int64(m))))
    a, b = cp.empty(2 * T * rb, cp.uint8), cp.empty(2 * T * rb, cp.uint8)
    cases["one copy of the same 64 MiB"] = lambda: a.data.copy_from_device_async(b.data, 2 * T * rb)
    for name, us in timed(cases, 50).items():
        rows.append({"case": f"write_kv T=8192: {name}", "us": us,
                     "pct_of_copy": 100 * 4 * T * rb / us / 1e6 / ceiling})
    for name, f in cases.items():
        if name.startswith("one copy"):
            continue
        kc.fill(0)
        vc.fill(0)
        f()
        ok = bool((kc.reshape(num_slots, rb)[slots] == k.reshape(T, rb)).all()
                  and (vc.reshape(num_slots, rb)[slots] == v.reshape(T, rb)).all())
        assert ok, f"write_kv design {name!r} wrote wrong bytes"
    kc = vc = None

    # copy_blocks
    caches, pairs_n, n = 16, 1024, 2048
    bufs = [cp.random.randint(0, 255, 2 * pairs_n * n * 16, dtype=cp.uint8) for _ in range(caches)]
    ptrs = cp.asarray(np.array([buf.data.ptr for buf in bufs], dtype=np.uint64))
    host_pairs = np.stack([rng.permutation(pairs_n), pairs_n + rng.permutation(pairs_n)], axis=1).astype(np.int32)
    pairs = cp.asarray(host_pairs)
    cases = {}
    for u, l, s, th in COPY_BLOCKS:
        name = f"{th} threads, {u} pieces a round, load {LOADS[l]}, store {STORES[s]}"
        cases[name] = (lambda f=fn[f"copy_blocks<{u},{l},{s}>"], th=th:
                       f((pairs_n, caches), (th,), (ptrs, pairs, np.int64(n))))
    for parts in (1, 2, 4):
        cases[f"bulk copies, {parts} part(s) a block"] = (
            lambda parts=parts: fn["copy_blocks_bulk"]((pairs_n, caches), (32,), (ptrs, pairs, np.int64(n),
                                                       np.int32(parts)), shared_mem=n * 16))
    for waves in (1, 2):        # 4 CTAs of 512 threads fill an SM
        cases[f"512 threads looping over blocks, {waves} wave(s) of CTAs, next block's loads first"] = (
            lambda waves=waves: fn["copy_blocks_loop"]((waves * 4 * sms,), (512,), (
                ptrs, pairs, np.int64(n), np.int64(pairs_n), np.int64(pairs_n * caches))))
    for name, us in timed(cases, 10).items():
        rows.append({"case": f"copy_blocks 512 MiB: {name}", "us": us,
                     "pct_of_copy": 100 * 2 * caches * pairs_n * n * 16 / us / 1e6 / ceiling})
    for name, f in cases.items():
        for buf in bufs[:2]:
            buf[pairs_n * n * 16:] = 0
        f()
        for buf in bufs[:2]:
            blocks = buf.reshape(2 * pairs_n, n * 16)
            assert bool((blocks[host_pairs[:, 1]] == blocks[host_pairs[:, 0]]).all()), f"copy_blocks design {name!r}"

    print(f"median GPU us per call over {args.reps} repetitions; 512 MiB copy {copy_us:.1f} us ({ceiling:.3f} TB/s)")
    print(f"{'case':<88} {'us':>8} {'% copy':>7}")
    for r in rows:
        print(f"{r['case']:<88} {r['us']:8.2f} {r['pct_of_copy']:7.1f}")
    print(json.dumps({"copy_tb_s": ceiling, "rows": rows}))


if __name__ == "__main__":
    main()
