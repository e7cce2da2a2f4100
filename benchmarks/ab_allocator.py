"""A/B of the allocator benchmarks between two builds of rocmforge, in one run.

Each build is a source tree with its extensions built in place (``python
setup.py build_ext --inplace``). Every repetition runs each case in a fresh
process per build, alternating the builds, so both see the same machine
state; the table gives the medians and the new/old ratio, then one JSON line.

    python benchmarks/ab_allocator.py OLD_TREE NEW_TREE [--reps 9] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    # name: (expression run in the build's rocmforge, unit)
    "alloc_free_single_capi": ("B.alloc_free_single_capi({n})", "ns/pair"),
    "alloc_free_batch_capi": ("B.alloc_free_batch_capi({n})", "ns/block"),
    "decode_sim_capi": ("B.decode_sim_capi({n})", "ns/token"),
    "prefix_touch_capi": ("B.prefix_touch_capi({n})", "ns/block"),
    "alloc_free_single": ("B.alloc_free_single({n})", "ns/pair"),
    "alloc_free_batch": ("B.alloc_free_batch({n})", "ns/block"),
    "decode_sim": ("B.decode_sim({n})", "ns/token"),
    "prefix_touch": ("B.prefix_touch({n})", "ns/block"),
}
WORK = {"alloc_free_single": 200_000, "alloc_free_batch": 20_000, "decode_sim": 200_000, "prefix_touch": 20_000}


def measure(tree, expr, n):
    """One figure from a fresh process importing the build in `tree` (after a
    warm-up run of a tenth of the work)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import rocmforge.bench_allocator as B; "
            f"{expr.format(n=max(n // 10, 1))}; print({expr.format(n=n)})")
    out = subprocess.run([sys.executable, "-c", code, tree], capture_output=True, text=True, check=True,
                         cwd="/")
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="1/100 of the work (smoke test)")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    args = parser.parse_args(argv)
    results = {}
    for name in args.cases:
        expr, unit = CASES[name]
        n = WORK[name.replace("_capi", "")] // (100 if args.quick else 1)
        samples = {"old": [], "new": []}
        for _ in range(args.reps):
            for label in ("old", "new"):
                tree = args.old if label == "old" else args.new
                samples[label].append(measure(tree, expr, n))
        old, new = statistics.median(samples["old"]), statistics.median(samples["new"])
        results[name] = {"unit": unit, "old": round(old, 2), "new": round(new, 2), "ratio": round(new / old, 3),
                         "old_samples": [round(x, 2) for x in samples["old"]],
                         "new_samples": [round(x, 2) for x in samples["new"]]}
        print(f"{name:<24} {old:9.2f} {new:9.2f} {unit:<9} new/old x{new / old:.3f}", flush=True)
    print(json.dumps({"benchmark": "allocator_ab", "reps": args.reps, "results": results}))


if __name__ == "__main__":
    main()
