"""Prefix-aware routing against round-robin: a trace replayed across several
engine instances (host backend, the synthetic model of `rocmforge replay`).

Requests arrive in trace order, one every --steps-per-arrival engine steps
(every instance steps each time). The router sees nothing but each instance's
KV events (in-process here; rocmforge.kv_events carries the same events
between processes) and its load (running plus waiting requests); round-robin
sends request i to instance i mod N. Reported per instance: requests, prompt
tokens, prefix hit rate, peak blocks; overall: the token hit rate and the load
balance (largest instance's share of prompt tokens over the mean). Prints a
table, then one JSON line.

    python benchmarks/bench_router.py [--trace FILE] [--limit N] [--instances 2] [--blocks 16384]
    python -m rocmforge.bench_router (the same)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rocmforge import KvCache
from rocmforge.config import CacheConfig
from rocmforge.engine import Engine, Request, SchedulerConfig
from rocmforge.errors import ArgumentValueError
from rocmforge.replay import BLOCK_SIZE, HEAD_DIM, HEADS, LAYERS, SAMPLE, SyntheticModel
from rocmforge.router import PrefixRouter
from rocmforge.traces import load_trace


def run(trace, mode, instances, num_blocks, steps_per_arrival, policy="lru", max_imbalance=4):
    config = CacheConfig(LAYERS, HEADS, HEAD_DIM, block_size=BLOCK_SIZE, num_blocks=num_blocks, dtype="float16")
    caches = [KvCache(config, "cpu", enable_prefix_caching=True, enable_events=True, eviction_policy=policy)
              for _ in range(instances)]
    engines = [Engine(c, SyntheticModel(c), SchedulerConfig(max_num_seqs=64, max_tokens_per_step=8192))
               for c in caches]
    router = PrefixRouter(BLOCK_SIZE, range(instances), max_imbalance=max_imbalance)
    served = [0] * instances
    peak = [0] * instances
    rejected = 0
    try:
        def step_all():
            for i, (e, c) in enumerate(zip(engines, caches)):
                if e.has_work():
                    e.step()
                peak[i] = max(peak[i], c.manager.num_used_blocks)
                router.apply(i, c.manager.take_events())
                router.set_load(i, len(e.running) + len(e.waiting))

        for n, r in enumerate(trace):
            target = router.route(r.prompt) if mode == "prefix" else n % instances
            try:
                engines[target].submit(Request(n, r.prompt, r.output_len))
                served[target] += 1
            except ArgumentValueError:
                rejected += 1                   # longer than a whole instance's cache
            for _ in range(steps_per_arrival):
                step_all()
        while any(e.has_work() for e in engines):
            step_all()
        rows = []
        for i, e in enumerate(engines):
            met = e.metrics()
            caches[i].manager.check_invariants()
            rows.append({"instance": i, "requests": served[i], "prompt_tokens": met["prompt_tokens"],
                         "hit_rate": met["prefix_hit_rate"], "computed_tokens": met["computed_tokens"],
                         "preemptions": met["preemptions"], "peak_blocks": peak[i]})
    finally:
        for c in caches:
            c.close()
    prompt = sum(r["prompt_tokens"] for r in rows)
    hit = sum(r["prompt_tokens"] * r["hit_rate"] for r in rows) / max(prompt, 1)
    balance = max(r["prompt_tokens"] for r in rows) / max(prompt / instances, 1)
    return {"mode": mode, "hit_rate": hit, "balance": balance, "rejected": rejected,
            "computed_tokens": sum(r["computed_tokens"] for r in rows), "instances": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default=SAMPLE, help="Mooncake JSONL or Azure CSV (default: the bundled sample)")
    parser.add_argument("--limit", type=int, default=0, help="first N requests only")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=16384, help="blocks of 16 tokens per instance")
    parser.add_argument("--steps-per-arrival", type=int, default=4)
    parser.add_argument("--policy", default="lru", choices=["lru", "arc"])
    parser.add_argument("--max-imbalance", type=float, default=4,
                        help="the router's bound on load (running + waiting requests) apart from the least loaded")
    args = parser.parse_args(argv)
    if args.instances < 1 or args.blocks < 1 or args.steps_per_arrival < 1 or args.limit < 0:
        parser.error("--instances, --blocks and --steps-per-arrival must be >= 1, --limit >= 0")
    trace = load_trace(args.trace)
    if args.limit:
        trace = trace[:args.limit]
    results = [run(trace, mode, args.instances, args.blocks, args.steps_per_arrival, args.policy,
                   args.max_imbalance) for mode in ("round-robin", "prefix")]
    print(f"{len(trace)} requests of {os.path.basename(args.trace)} across {args.instances} instances "
          f"of {args.blocks} blocks ({args.policy})")
    print(f"{'routing':<12} {'instance':>8} {'requests':>9} {'prompt tok':>11} {'hit rate':>9} {'computed':>10} "
          f"{'preempt':>8} {'peak blk':>9}")
    for res in results:
        for r in res["instances"]:
            print(f"{res['mode']:<12} {r['instance']:>8} {r['requests']:>9} {r['prompt_tokens']:>11} "
                  f"{r['hit_rate']:>9.1%} {r['computed_tokens']:>10} {r['preemptions']:>8} {r['peak_blocks']:>9}")
        print(f"{res['mode']:<12} {'all':>8} {'':>9} {'':>11} {res['hit_rate']:>9.1%} {res['computed_tokens']:>10} "
              f"  balance {res['balance']:.2f}")
    print(json.dumps({"trace": os.path.basename(args.trace), "requests": len(trace), "instances": args.instances,
                      "blocks": args.blocks, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
