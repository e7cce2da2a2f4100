"""Host cost of one write_kv call on a GPU, in a fresh process.

    python benchmarks/bench_launch.py [--tokens 256] [--calls 2000] [--reps 9] [--per-graph 32]

write_kv with torch tensors, write_kv_raw with their addresses, the same write
step looped in C (rocmforge._bench_capi: no Python, parsing or lock; the floor
of the launch itself), write_kv captured in a CUDA graph (--per-graph calls a
graph, as a decode step writes every layer: the host cost of one replay over
the calls in it), and torch's own calls for scale (one small in-place add:
a single launch through torch; the two index_copy_ calls that do write_kv's
work), in alternating order, each the
median over --reps repetitions of --calls back-to-back calls (the GPU work per
call is far shorter than its host cost, so the host is what is timed).
Then the same after a torch.profiler (CUPTI) session in the same process: the
profiler leaves callbacks behind that slow every later launch, which is why
rocmforge.bench_kernels' host columns can read higher than these.
Prints a table, then one JSON line. Needs a GPU and torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--per-graph", type=int, default=32)
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    import rocmforge as rf
    from rocmforge._bench_capi import write_kv_launch_ns
    from rocmforge.config import CacheConfig

    heads, dim, T = 8, 128, args.tokens
    cfg = CacheConfig(1, heads, dim, block_size=16, num_blocks=4096, dtype="float16")
    backend = rf.backend_info()["backend"]
    with rf.KvCache(cfg, f"{backend}:0") as cache:
        k = torch.randn((T, heads, dim), dtype=torch.float16, device="cuda")
        v = torch.randn_like(k)
        slots = torch.from_numpy(np.random.default_rng(0).permutation(4096 * 16)[:T].astype(np.int64)).cuda()
        flat_k = torch.from_dlpack(cache.key_cache(0)).view(-1, heads, dim)
        flat_v = torch.from_dlpack(cache.value_cache(0)).view(-1, heads, dim)
        small = torch.zeros(16, device="cuda")
        kp, vp, sp = k.data_ptr(), v.data_ptr(), slots.data_ptr()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            cache.write_kv(0, k, v, slots, stream=side)             # warmed up on the stream it is captured on
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            for _ in range(args.per_graph):
                cache.write_kv(0, k, v, slots, stream=side)
        in_graph = f"write_kv in a CUDA graph of {args.per_graph}"
        cases = {
            "write_kv (torch tensors)": lambda: cache.write_kv(0, k, v, slots),
            "write_kv_raw (addresses)": lambda: cache.write_kv_raw(0, kp, vp, sp, T, "float16"),
            "C loop (no Python, no lock)": None,
            in_graph: graph.replay,
            "torch add_ (one launch)": lambda: small.add_(1),
            "torch index_copy_ x2": lambda: (flat_k.index_copy_(0, slots, k), flat_v.index_copy_(0, slots, v)),
        }
        per_call = {in_graph: args.per_graph}      # write_kv calls per call of the case

        def measure():
            times = {name: [] for name in cases}
            for _ in range(args.reps):
                for name, fn in cases.items():
                    torch.cuda.synchronize()
                    if fn is None:
                        times[name].append(write_kv_launch_ns(cache, 0, kp, vp, sp, T, "float16", args.calls) / 1e3)
                        continue
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    times[name].append((time.perf_counter() - t0) * 1e6 / args.calls / per_call.get(name, 1))
                    torch.cuda.synchronize()
            return {name: statistics.median(t) for name, t in times.items()}

        before = measure()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]):
            for fn in cases.values():
                if fn is not None:
                    fn()
            torch.cuda.synchronize()
        after = measure()
        flat_k.zero_()
        flat_v.zero_()
        graph.replay()                          # the graph writes what a call writes
        torch.cuda.synchronize()
        assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
        cache.write_kv(0, k, v, slots)
        cache.synchronize()
        assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
    print(f"host us per call, T={T}, median of {args.reps} x {args.calls} calls")
    print(f"{'case':<34} {'fresh':>8} {'after profiler':>15}")
    for name in cases:
        print(f"{name:<34} {before[name]:8.2f} {after[name]:15.2f}")
    print(json.dumps({"tokens": T, "fresh_us": before, "after_profiler_us": after}))


if __name__ == "__main__":
    main()
