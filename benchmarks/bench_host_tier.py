"""Host-tier copy bandwidth, and write_kv's latency with an offload under way.

    python benchmarks/bench_host_tier.py [--gib 1] [--reps 5]

A KvCache with a host tier (8 layers, 8 kv heads of 128, float16, blocks of 16:
512 KiB a block) is filled with --gib GiB of cached prefix blocks. Allocating as
many fresh blocks evicts them all into the tier (offload: KvCache packs them on
the caller's stream and sends them on its own); looking the prefix up again
brings them back (reload). Each is timed from the call that runs the queued
copies to the end of a device synchronize, beside torch copying the same bytes
between a GPU tensor and a page-locked host tensor in the same run, both ways.

Then write_kv's GPU time (CUDA events around a burst of 20 on the default
stream, queued behind a GPU sleep; 256 tokens into blocks the copies do not
touch) alone, and right after an offload of the whole batch was queued, while
its copy to host memory runs on the cache's stream. Medians of --reps; prints a table, then one JSON line. Needs a GPU and
torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    import rocmforge as rf
    from rocmforge.config import CacheConfig

    bs, layers, heads, dim = 16, 8, 8, 128
    block = CacheConfig(layers, heads, dim, block_size=bs, num_blocks=1, dtype="float16").bytes_per_block
    n = max(1, int(args.gib * 2**30 // block))
    # the write_kv sequence's 16 blocks, and the prefix's n full blocks plus one
    cfg = CacheConfig(layers, heads, dim, block_size=bs, num_blocks=n + 17, dtype="float16")
    device = f"{rf.backend_info()['backend']}:0"
    nbytes = n * block
    gpu_t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    host_t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    prefix = list(range(n * bs))
    W, P, FILL = 0, 1, 2                                # sequence ids
    times = {"offload (rocmforge)": [], "reload (rocmforge)": [], "D2H (torch, pinned)": [],
             "H2D (torch, pinned)": [], "write_kv alone": [], "write_kv, offload under way": []}

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def write_us(cache, k, v, slots, burst=20):
        """GPU time per write_kv over a burst queued behind a GPU sleep (so the host's
        cost per call is not timed)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)      # about 1 ms: the offload copy is still under way after it
        start.record()
        for _ in range(burst):
            cache.write_kv(0, k, v, slots)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / burst

    with rf.KvCache(cfg, device, enable_prefix_caching=True, host_cache=nbytes) as cache:
        m = cache.manager
        k = torch.randn((256, heads, dim), dtype=torch.float16, device="cuda")
        slots = torch.from_numpy(m.add_sequence(W, num_tokens=256).astype(np.int64)).cuda()
        for rep in range(args.reps):
            m.add_sequence(P, prefix + [0])             # n full blocks, cached when removed
            cache.apply_pending_copies()
            m.remove_sequence(P)
            m.add_sequence(FILL, num_tokens=n * bs + 1)     # one free block, then evicts all n into the tier
            times["offload (rocmforge)"].append(timed(cache.apply_pending_copies))
            m.remove_sequence(FILL)
            m.add_sequence(P, prefix + [0])             # the prefix found in the tier
            assert m.num_cached_tokens(P) == n * bs
            times["reload (rocmforge)"].append(timed(cache.apply_pending_copies))
            m.remove_sequence(P)
            times["D2H (torch, pinned)"].append(timed(lambda: host_t.copy_(gpu_t, non_blocking=True)))
            times["H2D (torch, pinned)"].append(timed(lambda: gpu_t.copy_(host_t, non_blocking=True)))
            torch.cuda.synchronize()
            times["write_kv alone"].append(write_us(cache, k, k, slots) / 1e6)
            m.add_sequence(FILL, num_tokens=n * bs + 1)
            cache.apply_pending_copies()                # packs on the default stream, sends on its own
            times["write_kv, offload under way"].append(write_us(cache, k, k, slots) / 1e6)
            cache.synchronize()
            m.remove_sequence(FILL)
            m.reset_prefix_cache()
        stats = cache.stats()
    rows = [{"case": name, "seconds": statistics.median(t),
             "gb_s": None if name.startswith("write_kv") else nbytes / statistics.median(t) / 1e9}
            for name, t in times.items()]
    by = {r["case"]: r["seconds"] for r in rows}
    print(f"{nbytes / 2**30:.2f} GiB of blocks ({n} x {block >> 10} KiB) on {device}; medians of {args.reps}")
    print(f"{'case':<30} {'us':>10} {'GB/s':>8}")
    for r in rows:
        print(f"{r['case']:<30} {r['seconds'] * 1e6:10.1f} {'' if r['gb_s'] is None else format(r['gb_s'], '8.1f')}")
    print(json.dumps({"bytes": nbytes, "rows": rows,
                      "offload_share_of_torch": by["D2H (torch, pinned)"] / by["offload (rocmforge)"],
                      "reload_share_of_torch": by["H2D (torch, pinned)"] / by["reload (rocmforge)"],
                      "write_kv_slowdown": by["write_kv, offload under way"] / by["write_kv alone"],
                      "host_offloaded_blocks": stats["host_offloaded_blocks"],
                      "host_reloaded_blocks": stats["host_reloaded_blocks"]}))


if __name__ == "__main__":
    main()
