"""Admission rules A/B: preemptions against work, on a replayed trace.

The baseline is the engine's earlier rule (kept here, not in the library): a
request is admitted when its whole context, less its prefix hits, fits beside
one growing block per running request. It ignored the prompt chunks that
running requests had yet to prefill, so admitted requests outgrew the pool and
were preempted. The current rule reserves what every running request has yet
to take (the rest of its prompt, one growing block, and growth_reserve of its
remaining output) and counts prefix hits as blocks the request takes from the
free pool.

Per rule: preemptions, engine steps (model calls), tokens the model computed
(recomputation after preemption included) and the replay's wall time (the
median of --reps, rules alternating within each repetition). Prints a table,
then one JSON line.

    python benchmarks/bench_admission.py [TRACE] [--limit N] [--memory 256MiB] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from unittest import mock

from rocmforge.config import parse_bytes
from rocmforge.engine import Scheduler, SchedulerConfig
from rocmforge.replay import BLOCK_SIZE, HEAD_DIM, HEADS, LAYERS, SAMPLE, replay
from rocmforge.traces import load_trace


def one_block_rule(self, req, context):
    """The earlier admission test (the baseline)."""
    bs = self.manager.block_size
    hits = self.manager.lookup_prefix(context, req.salt) // bs if self.manager.enable_prefix_caching else 0
    return -(-len(context) // bs) - hits <= self.manager.num_free_blocks - len(self.running)


RULES = {"one block (before)": None, "reserve 0": 0.0, "reserve 0.5": 0.5, "reserve 1": 1.0}


def run_rule(trace, num_blocks, share):
    cfg = SchedulerConfig(max_num_seqs=64, max_tokens_per_step=8192, growth_reserve=share or 0.0)
    if share is None:
        with mock.patch.object(Scheduler, "_fits", one_block_rule):
            return replay(trace, num_blocks, "cpu", progress=False, scheduler=cfg)[0]
    return replay(trace, num_blocks, "cpu", progress=False, scheduler=cfg)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default=SAMPLE)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--memory", default="256MiB")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    per_block = 2 * LAYERS * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    num_blocks = parse_bytes(args.memory) // per_block
    trace = load_trace(args.trace, args.limit)
    walls = {name: [] for name in RULES}
    reports = {}
    for _ in range(args.reps):
        for name, share in RULES.items():
            reports[name] = run_rule(trace, num_blocks, share)
            walls[name].append(reports[name]["wall_s"])
    base = reports["one block (before)"]
    print(f"{len(trace)} requests, {num_blocks} blocks of {BLOCK_SIZE} tokens, medians of {args.reps}")
    print(f"{'rule':<20} {'preemptions':>11} {'steps':>7} {'computed tokens':>16} {'vs before':>9} {'wall s':>7}")
    rows = {}
    for name, rep in reports.items():
        wall = statistics.median(walls[name])
        rows[name] = {"preemptions": rep["preemptions"], "steps": rep["steps"],
                      "computed_tokens": rep["computed_tokens"], "wall_s": round(wall, 3),
                      "requests": rep["requests"], "failed": rep["failed"]}
        print(f"{name:<20} {rep['preemptions']:>11} {rep['steps']:>7} {rep['computed_tokens']:>16,} "
              f"{rep['computed_tokens'] / base['computed_tokens']:>9.3f} {wall:>7.2f}")
    print(json.dumps({"benchmark": "admission", "requests": len(trace), "num_blocks": num_blocks,
                      "reps": args.reps, "rules": rows}))


if __name__ == "__main__":
    main()
