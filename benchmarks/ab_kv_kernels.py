"""A/B of K/V kernel images on one GPU: each image (a build of
hip/kernels/kv_kernels.cu, for example with other -D values) gets caches of its
own, and write_kv (T=256 and 8192) and copy_blocks (512 MiB) are timed on the
cases of rocmforge.bench_kernels, the images alternating within each repetition.
Each case also runs with its slots (or block pairs) in order instead of
scattered, which shows what the scatter itself costs; write_kv T=8192 also with
the in-order slots shuffled (the same rows in another order), with the
scattered slots sorted (whole, and in runs of 32 in shuffled order) and
scattered over a pool four times larger, which tells the order of the rows from
the span they cover; copy_blocks also with its scattered pairs sorted by source and by
destination.

    python benchmarks/ab_kv_kernels.py NAME=IMAGE [NAME=IMAGE ...] [--reps 7]

"packaged" names the installed image. Prints a table of median GPU time per
call (CUDA events over a burst of launches) and bandwidth as a share of a 512
MiB device-to-device copy timed the same way, then one JSON line. Needs a GPU
and torch."""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from rocmforge.bench_kernels import BLOCK, HEAD_DIM, HEADS, _burst_us

SPAN = 4        # write_kv's caches hold this many times bench_kernels' pool


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="NAME=PATH of a kv_kernels code object, or 'packaged'")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    import rocmforge as rf
    from rocmforge import _kvcache
    from rocmforge._runtime import DeviceKernels
    from rocmforge.config import CacheConfig

    big = 512 << 20
    src = torch.empty(big, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceiling = 2 * big / _burst_us(torch, lambda: dst.copy_(src), 10, args.reps) / 1e6   # TB/s
    src = dst = None
    rng = np.random.default_rng(0)
    layers, pairs_n, num_blocks = 8, 1024, 8192
    pairs = np.stack([rng.permutation(pairs_n), pairs_n + rng.permutation(pairs_n)], axis=1).astype(np.int32)
    in_order = np.stack([np.arange(pairs_n), pairs_n + np.arange(pairs_n)], axis=1).astype(np.int32)
    inputs = {}
    for T in (256, 8192):
        k = torch.randn((T, HEADS, HEAD_DIM), dtype=torch.float16, device="cuda")
        orders = [("", rng.permutation(num_blocks * BLOCK)[:T]), (", in order", np.arange(T))]
        if T == 8192:       # where the scatter's cost comes from: the order of the rows or the span they cover
            scattered = orders[0][1]
            orders += [(", in order, shuffled", rng.permutation(T)),
                       (", scattered, sorted", np.sort(scattered)),
                       (", scattered, sorted runs of 32 shuffled",
                        np.sort(scattered).reshape(-1, 32)[rng.permutation(T // 32)].ravel()),
                       (", scattered over 4x the pool", rng.permutation(SPAN * num_blocks * BLOCK)[:T])]
        for order, ids in orders:
            inputs[f"T={T}{order}"] = (k, torch.randn_like(k), torch.from_numpy(ids.astype(np.int64)).cuda())
    # every image's caches, made while its module is the one new caches take
    caches = {}
    for spec in args.images:
        name, _, path = spec.partition("=")
        _kvcache._kernels_by_device[0] = DeviceKernels(0, None if name == "packaged" else open(path, "rb").read())
        caches[name] = (rf.KvCache(CacheConfig(1, HEADS, HEAD_DIM, block_size=BLOCK, num_blocks=SPAN * num_blocks,
                                               dtype="float16"), "cuda:0"),
                        rf.KvCache(CacheConfig(layers, HEADS, HEAD_DIM, block_size=BLOCK, num_blocks=2 * pairs_n,
                                               dtype="float16"), "cuda:0"))
    _kvcache._kernels_by_device.pop(0, None)
    cases = {f"write_kv {key}": (lambda c, key=key: c[0].write_kv(0, *inputs[key]),
                                 2 * 2 * inputs[key][0].numel() * 2, 50) for key in inputs}
    by_src, by_dst = pairs[np.argsort(pairs[:, 0])], pairs[np.argsort(pairs[:, 1])]
    for order, p in (("", pairs), (", in order", in_order), (", by source", by_src), (", by destination", by_dst)):
        p = torch.from_numpy(p).cuda()                  # on the GPU: copy_blocks neither stages nor waits
        cases[f"copy_blocks (512 MiB){order}"] = (lambda c, p=p: c[1].copy_blocks(p),
                                                  2 * 2 * layers * pairs_n * BLOCK * HEADS * HEAD_DIM * 2, 10)
    rows = []
    for case, (fn, nbytes, launches) in cases.items():
        times = {name: [] for name in caches}
        for _ in range(args.reps):
            for name, c in caches.items():
                times[name].append(_burst_us(torch, lambda: fn(c), launches, 1))
        for name in caches:
            us = statistics.median(times[name])
            rows.append({"case": case, "image": name, "us": us, "pct_of_copy": 100 * nbytes / us / 1e6 / ceiling})
    for name, (w, c) in caches.items():
        for k, v, slots in inputs.values():             # every image wrote what it was given
            kc = torch.from_dlpack(w.key_cache(0)).view(-1, HEADS, HEAD_DIM)
            w.write_kv(0, k, v, slots)
            w.synchronize()
            assert torch.equal(kc[slots], k), name
        w.close()
        c.close()
    print(f"{'case':<34} {'image':<14} {'us':>9} {'% copy':>7}")
    for r in rows:
        print(f"{r['case']:<34} {r['image']:<14} {r['us']:9.2f} {r['pct_of_copy']:7.1f}")
    print(json.dumps({"copy_tb_s": ceiling, "rows": rows}))


if __name__ == "__main__":
    main()
