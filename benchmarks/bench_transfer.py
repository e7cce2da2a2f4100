"""Block transfer bandwidth between two caches against torch's copy of the same bytes.

    python benchmarks/bench_transfer.py [--gib 1] [--reps 5]

Two KvCaches (GPUs 0 and 1 when there are two, else both on GPU 0) of the same
geometry; rocmforge.transfer.transfer_blocks moves --gib GiB of blocks (every
layer's K and V) from one to the other, beside torch copying one contiguous
tensor of the same size between the same devices (a peer copy across GPUs).
Between GPUs that reach each other's memory (one GPU, or peers with peer
access) a copy kernel moves every layer's blocks in one launch, in order or not
("scattered ids" sends them to a permutation of the destination's blocks);
other pairs of GPUs use the runtime's peer copies. "one block" is the fixed cost
of a call; "per K/V plane" is torch copying the same bytes in 16 pieces, one per
layer's K and V.
Prints a table of median microseconds and GB/s, then one JSON line. Needs a GPU and
torch."""

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
    from rocmforge.transfer import transfer_blocks

    backend = rf.backend_info()["backend"]
    devices = [f"{backend}:0", f"{backend}:{1 if torch.cuda.device_count() > 1 else 0}"]
    cfg = CacheConfig(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, num_blocks=1, dtype="float16")
    n = max(1, int(args.gib * 2**30 // cfg.bytes_per_block))
    cfg = CacheConfig(num_layers=8, num_kv_heads=8, head_dim=128, block_size=16, num_blocks=n, dtype="float16")
    nbytes = n * cfg.bytes_per_block
    ids = np.arange(n, dtype=np.int32)
    src_t = torch.empty(nbytes, dtype=torch.uint8, device=devices[0].replace("hip", "cuda"))
    dst_t = torch.empty(nbytes, dtype=torch.uint8, device=devices[1].replace("hip", "cuda"))
    scattered = np.random.default_rng(0).permutation(n).astype(np.int32)
    one = np.zeros(1, dtype=np.int32)
    planes = src_t.view(2 * cfg.num_layers, -1), dst_t.view(2 * cfg.num_layers, -1)
    times = {"rocmforge transfer_blocks": [], "rocmforge, scattered ids": [], "rocmforge, one block": [],
             "torch copy_, per K/V plane": [], "torch copy_": []}
    with rf.KvCache(cfg, devices[0]) as src, rf.KvCache(cfg, devices[1]) as dst:
        for _ in range(args.reps):
            for name in times:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if name == "torch copy_":
                    dst_t.copy_(src_t)
                elif name == "torch copy_, per K/V plane":
                    for a, b in zip(*planes):
                        b.copy_(a)
                elif name == "rocmforge, one block":
                    transfer_blocks(src, one, dst, one)
                elif name == "rocmforge, scattered ids":
                    transfer_blocks(src, ids, dst, scattered)
                else:
                    transfer_blocks(src, ids, dst, ids)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    moved = {"rocmforge, one block": cfg.bytes_per_block}
    rows = [{"case": name, "seconds": statistics.median(t),
             "gb_s": moved.get(name, nbytes) / statistics.median(t) / 1e9} for name, t in times.items()]
    print(f"{nbytes / 2**30:.2f} GiB of blocks, {devices[0]} -> {devices[1]}")
    print(f"{'case':<28} {'us':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['case']:<28} {r['seconds'] * 1e6:9.1f} {r['gb_s']:8.1f}")
    torch_s = rows[-1]["seconds"]
    print(json.dumps({"devices": devices, "bytes": nbytes, "rows": rows,
                      "share_of_torch": torch_s / rows[0]["seconds"],
                      "scattered_share_of_torch": torch_s / rows[1]["seconds"]}))


if __name__ == "__main__":
    main()
