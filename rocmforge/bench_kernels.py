"""GPU K/V kernel benchmarks: write_kv, copy_blocks and paged_decode against the
device's own copy bandwidth and against torch doing the same work (index_copy_;
scaled_dot_product_attention on K/V gathered from the same tables).

Needs a GPU and torch (CUDA events, the CUPTI profiler, the comparison).
Bandwidth counts bytes read plus bytes written; the ceiling is a 512 MiB
device-to-device copy (far beyond the L2 cache, so it measures the memory
itself). "device us" is the GPU time the profiler records per call (kernels
and copies, gaps excluded) and gives the bandwidth; "burst us" is CUDA-event
time per call over a burst of launches queued behind a GPU sleep (gaps
between launches included; copy_blocks with numpy pairs, which waits for its
stream, is timed on the wall clock instead; with pairs on the GPU it queues
one launch and is timed like the rest); the host's own cost per write_kv call is
reported apart, for write_kv on torch tensors ("host us") and for
write_kv_raw on their addresses ("raw us"); write_kv's JSON rows also give its
speed as a share of a one-piece copy of the same bytes (pct_of_same_size_copy). paged_decode's bandwidth counts
the K/V bytes it reads; "torch us" there is the gather plus SDPA.
Every figure is the median of several repetitions. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

HEADS, HEAD_DIM, BLOCK = 8, 128, 16


def _burst_us(torch, fn, launches, reps):
    """Median GPU time per launch of fn, in microseconds."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)           # lets the host queue the whole burst first
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / launches)
    return statistics.median(times)


def _device_us(torch, fn, calls, reps):
    """Median device time per call, in microseconds: the sum of the GPU activities
    (kernels, copies) CUPTI records for the calls, gaps between them excluded."""
    from torch.profiler import ProfilerActivity, profile
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        times.append(sum(e.device_time_total for e in prof.key_averages()) / calls)
    return statistics.median(times)


def _wall_us(fn, calls, reps, sync):
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
        sync()
    return statistics.median(times)


def run(reps=7):
    import torch

    import rocmforge as rf
    from rocmforge.config import CacheConfig

    info = rf.backend_info()
    if info["backend"] == "host":
        raise SystemExit(f"bench_kernels needs a GPU ({info['reason']})")
    device = f"{info['backend']}:0"
    rng = np.random.default_rng(0)
    rows = []

    def row(name, fn, calls, nbytes, ceiling_tbs=None, torch_fn=None, wall=False):
        """Measure fn (and torch_fn doing the same work); one row of the table."""
        us = _device_us(torch, fn, calls, reps)
        other = (_wall_us(fn, calls, reps, torch.cuda.synchronize) if wall
                 else _burst_us(torch, fn, calls, reps))
        tbs = nbytes / (us * 1e-6) / 1e12
        theirs = _device_us(torch, torch_fn, calls, reps) if torch_fn else None
        rows.append({"case": name, "device_us": us, "tb_s": tbs,
                     "pct_of_copy": None if ceiling_tbs is None else 100.0 * tbs / ceiling_tbs,
                     ("wall_us" if wall else "burst_us"): other,
                     "torch_device_us": theirs, "speedup_vs_torch": None if theirs is None else theirs / us})
        return tbs

    # the ceiling: a device-to-device copy far larger than the L2 cache
    big = 512 << 20
    src = torch.empty(big, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceiling = row(f"d2d copy ({big >> 20} MiB)", lambda: dst.copy_(src), 20, 2 * big)
    src = dst = None                        # the 1 GiB goes back before the next cases

    # write_kv: one layer, float16, random distinct slots
    num_blocks = 8192
    with rf.KvCache(CacheConfig(1, HEADS, HEAD_DIM, block_size=BLOCK, num_blocks=num_blocks,
                                dtype="float16"), device) as cache:
        kc, vc = torch.from_dlpack(cache.key_cache(0)), torch.from_dlpack(cache.value_cache(0))
        for T in (256, 8192):
            k = torch.randn((T, HEADS, HEAD_DIM), dtype=torch.float16, device="cuda")
            v = torch.randn_like(k)
            slots = torch.from_numpy(rng.permutation(num_blocks * BLOCK)[:T].astype(np.int64)).cuda()
            flat_k, flat_v = kc.view(-1, HEADS, HEAD_DIM), vc.view(-1, HEADS, HEAD_DIM)

            def torch_write():
                flat_k.index_copy_(0, slots, k)
                flat_v.index_copy_(0, slots, v)

            nbytes = 2 * 2 * k.numel() * 2              # K and V, read and written, 2 bytes each
            row(f"write_kv T={T}", lambda: cache.write_kv(0, k, v, slots), 200, nbytes, ceiling, torch_write)
            # a copy of the same bytes in one piece: the ceiling at this size (a short
            # kernel's launch and ramp cost a share a 512 MiB copy does not see)
            same_src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            same_dst = torch.empty_like(same_src)
            same_us = _device_us(torch, lambda: same_dst.copy_(same_src), 200, reps)
            rows[-1]["pct_of_same_size_copy"] = 100.0 * same_us / rows[-1]["device_us"]
            rows[-1]["host_us_per_call"] = _wall_us(lambda: cache.write_kv(0, k, v, slots), 2000, reps,
                                                    torch.cuda.synchronize)
            kp, vp, sp = k.data_ptr(), v.data_ptr(), slots.data_ptr()
            rows[-1]["raw_host_us_per_call"] = _wall_us(lambda: cache.write_kv_raw(0, kp, vp, sp, T, "float16"),
                                                        2000, reps, torch.cuda.synchronize)
            cache.write_kv(0, k, v, slots)
            cache.synchronize()
            assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)

    # copy_blocks: 8 layers (16 caches) of 32 KiB blocks; 1,024 pairs move 512 MiB
    layers, pairs_n = 8, 1024
    with rf.KvCache(CacheConfig(layers, HEADS, HEAD_DIM, block_size=BLOCK, num_blocks=2 * pairs_n,
                                dtype="float16"), device) as cache:
        pairs = np.stack([rng.permutation(pairs_n), pairs_n + rng.permutation(pairs_n)], axis=1).astype(np.int32)
        moved = 2 * layers * pairs_n * BLOCK * HEADS * HEAD_DIM * 2
        caches = [torch.from_dlpack(cache.key_cache(i)) for i in range(layers)]
        caches += [torch.from_dlpack(cache.value_cache(i)) for i in range(layers)]
        s_idx = torch.from_numpy(pairs[:, 0].astype(np.int64)).cuda()
        d_idx = torch.from_numpy(pairs[:, 1].astype(np.int64)).cuda()

        def torch_copy():
            for c in caches:
                c.index_copy_(0, d_idx, c.index_select(0, s_idx))

        for c in caches:
            c.normal_()
        row(f"copy_blocks ({moved >> 20} MiB)", lambda: cache.copy_blocks(pairs), 10, 2 * moved, ceiling,
            torch_copy, wall=True)
        # the same pairs already on the GPU (an engine's tensor; what graph capture takes): one
        # launch, no staging copy and no wait
        gpu_pairs = torch.from_numpy(pairs).cuda()
        row(f"copy_blocks ({moved >> 20} MiB), pairs on the GPU", lambda: cache.copy_blocks(gpu_pairs), 10,
            2 * moved, ceiling, torch_copy)
        cache.synchronize()
        assert all(torch.equal(c[d_idx], c[s_idx]) for c in caches), "copy_blocks left a block uncopied"
    # paged_decode: GQA 4 (32 query heads), blocks scattered through the pool, indices on the GPU;
    # torch's SDPA on K/V gathered from the same tables (the gather included) beside it
    from rocmforge.attention import paged_decode
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for seqs, ctx in ((256, 2048), (64, 4096), (8, 32768)):
        per_seq = ctx // BLOCK
        num_blocks = seqs * per_seq + 4096
        with rf.KvCache(CacheConfig(1, HEADS, HEAD_DIM, block_size=BLOCK, num_blocks=num_blocks,
                                    dtype="float16"), device) as cache:
            kc, vc = torch.from_dlpack(cache.key_cache(0)), torch.from_dlpack(cache.value_cache(0))
            kc.normal_()
            vc.normal_()
            ids = rng.permutation(num_blocks)[:seqs * per_seq].reshape(seqs, per_seq).astype(np.int32)
            tables = torch.from_numpy(ids).cuda()
            lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn((seqs, 4 * HEADS, HEAD_DIM), dtype=torch.float16, device="cuda")
            out = torch.empty_like(q)
            flat = tables.long().view(-1)

            def ours():
                paged_decode(q, cache, 0, tables, lens, out=out, max_seq_len=ctx)

            def gathered_sdpa():
                k = kc[flat].view(seqs, ctx, HEADS, HEAD_DIM).transpose(1, 2)
                v = vc[flat].view(seqs, ctx, HEADS, HEAD_DIM).transpose(1, 2)
                return sdpa(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)

            ours()
            err = (out.float() - gathered_sdpa().float()).abs().max().item()
            cache.synchronize()
            nbytes = 2 * seqs * ctx * HEADS * HEAD_DIM * 2          # K and V, read once
            row(f"paged_decode {seqs}x{ctx}", ours, 20, nbytes, ceiling, gathered_sdpa)
            rows[-1]["max_abs_err_vs_sdpa"] = err
            assert err < 1e-2, f"paged_decode {seqs}x{ctx} differs from SDPA by {err}"
    return {"device": info["devices"][0]["name"], "backend": info["backend"], "rows": rows}


def print_table(result):
    print(f"rocmforge kernels on {result['device']} ({result['backend']})")
    print(f"{'case':<40} {'device us':>10} {'TB/s':>7} {'% copy':>7} {'burst/wall us':>14} "
          f"{'torch us':>9} {'vs torch':>9} {'host us':>8} {'raw us':>7}")
    for r in result["rows"]:
        def fmt(v, spec):
            return "" if v is None else format(v, spec)
        print(f"{r['case']:<40} {r['device_us']:>10.2f} {r['tb_s']:>7.3f} {fmt(r['pct_of_copy'], '.1f'):>7} "
              f"{fmt(r.get('burst_us', r.get('wall_us')), '.2f'):>14} {fmt(r['torch_device_us'], '.2f'):>9} "
              f"{fmt(r['speedup_vs_torch'], '.2f'):>9} {fmt(r.get('host_us_per_call'), '.2f'):>8} "
              f"{fmt(r.get('raw_host_us_per_call'), '.2f'):>7}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rocmforge.bench_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="repetitions per figure (median)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    try:
        import torch
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: needs torch with a GPU (pip install torch), to time the "
                       f"kernels with CUDA events and compare them with torch's own writes\n")
    if not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: error: needs a GPU; torch sees none\n")
    result = run(args.reps)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
