"""A/B of paged attention kernel images on one GPU: each image (a build of
hip/kernels/attention.cu, for example with other -D tuning values) is loaded in
turn in place of the packaged one, and paged_decode is timed on the cases of
rocmforge.bench_kernels, the images alternating within each repetition.

    python benchmarks/ab_attention.py NAME=IMAGE [NAME=IMAGE ...] [--reps 7]

"packaged" names the installed image. Prints a table of median GPU time
(CUDA events over a burst of launches) and bandwidth as a share of a
device-to-device copy, then one JSON line. Needs a GPU and torch."""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from rocmforge.bench_kernels import BLOCK, HEAD_DIM, HEADS, _burst_us

# (sequences, context, kv heads, head_dim, dtype): bench_kernels' cases (GQA 4 over 8 kv heads of
# 128, float16), and the transformers example's decode step (4 query heads over 1 kv head of 64, bfloat16)
CASES = ((256, 2048, HEADS, HEAD_DIM, "float16"), (64, 4096, HEADS, HEAD_DIM, "float16"),
         (8, 32768, HEADS, HEAD_DIM, "float16"), (32, 1152, 1, 64, "bfloat16"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="NAME=PATH of an attention code object, or 'packaged'")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    import rocmforge as rf
    from rocmforge import _attention
    from rocmforge._runtime import AttentionKernels
    from rocmforge.attention import paged_decode
    from rocmforge.config import CacheConfig

    kernels = {}
    for spec in args.images:
        name, _, path = spec.partition("=")
        image = None if name == "packaged" else open(path, "rb").read()
        kernels[name] = AttentionKernels(0, image)
    big = 512 << 20
    src = torch.empty(big, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceiling = 2 * big / _burst_us(torch, lambda: dst.copy_(src), 10, args.reps) / 1e6   # TB/s
    rng = np.random.default_rng(0)
    rows = []
    for seqs, ctx, heads, dim, dtype in CASES:
        per_seq = ctx // BLOCK
        num_blocks = seqs * per_seq + 4096
        with rf.KvCache(CacheConfig(1, heads, dim, block_size=BLOCK, num_blocks=num_blocks,
                                    dtype=dtype), "cuda:0") as cache:
            torch.from_dlpack(cache.key_cache(0)).normal_()
            torch.from_dlpack(cache.value_cache(0)).normal_()
            ids = rng.permutation(num_blocks)[:seqs * per_seq].reshape(seqs, per_seq).astype(np.int32)
            tables = torch.from_numpy(ids).cuda()
            lens = torch.full((seqs,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn((seqs, 4 * heads, dim), dtype=getattr(torch, dtype), device="cuda")
            out = torch.empty_like(q)
            times = {name: [] for name in kernels}
            results = {}
            for _ in range(args.reps):
                for name, k in kernels.items():
                    _attention._kernels_by_device[0] = k
                    times[name].append(_burst_us(torch, lambda: paged_decode(
                        q, cache, 0, tables, lens, out=out, max_seq_len=ctx), 20, 1))
                    results[name] = out.float().clone()
            cache.synchronize()
            first = next(iter(results.values()))
            nbytes = 2 * seqs * ctx * heads * dim * 2
            for name in kernels:
                us = statistics.median(times[name])
                rows.append({"case": f"{seqs}x{ctx}" + ("" if heads == HEADS else f"/{heads}x{dim}"), "image": name, "us": us,
                             "pct_of_copy": 100 * nbytes / us / 1e6 / ceiling,
                             "max_diff_vs_first": (results[name] - first).abs().max().item()})
    _attention._kernels_by_device.pop(0, None)
    print(f"{'case':<16} {'image':<14} {'us':>9} {'% copy':>7} {'max diff':>9}")
    for r in rows:
        print(f"{r['case']:<16} {r['image']:<14} {r['us']:9.1f} {r['pct_of_copy']:7.1f} {r['max_diff_vs_first']:9.2g}")
    print(json.dumps({"copy_tb_s": ceiling, "rows": rows}))


if __name__ == "__main__":
    main()
