"""`rocmforge replay`: a request trace through the engine with a synthetic model.

Mooncake JSONL traces (timestamp ms, input_length, output_length, hash_ids of
512-token blocks) are expanded into deterministic token ids per hash id, so a
shared prefix really is shared and hits the prefix cache. Azure CSV traces
(TIMESTAMP, ContextTokens, GeneratedTokens) have no prefix information; their
prompts are random. The synthetic model returns a deterministic next token and
K/V rows derived from each token and position, written through the real
kernels (GPU or host). The report ends with one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from rocmforge._dlpack import DeviceArray
from rocmforge._runtime import DeviceBuffer
from rocmforge.bench_prefix import expand_tokens
from rocmforge.config import CacheConfig, format_bytes, parse_bytes
from rocmforge.engine import Engine, Request, SchedulerConfig

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "conversation_sample.jsonl")
LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 2, 64, 16     # the synthetic model's K/V geometry


@dataclass
class TraceRequest:
    arrival: float                  # seconds since the trace start
    prompt: np.ndarray
    output_len: int


def load_trace(path, limit=None):
    """TraceRequests from a Mooncake JSONL or an Azure CSV trace, in arrival order."""
    out = []
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            rng = np.random.default_rng(0)
            start = None
            for row in csv.DictReader(f):
                if limit is not None and len(out) >= limit:
                    break
                t = datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp()
                start = t if start is None else start
                n = max(1, int(row["ContextTokens"]))
                out.append(TraceRequest(t - start, rng.integers(0, 50000, n).astype(np.int32),
                                        max(1, int(row["GeneratedTokens"]))))
        else:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                if line.strip():
                    r = json.loads(line)
                    out.append(TraceRequest(r["timestamp"] / 1000.0, expand_tokens(r["hash_ids"], r["input_length"]),
                                            max(1, int(r["output_length"]))))
    if not out:
        raise SystemExit(f"{path}: no requests")
    out.sort(key=lambda r: r.arrival)
    return out


class SyntheticModel:
    """Next token: a hash of the last token and the position. K/V: rows derived
    from each new token and its position (the same input gives the same K/V)."""

    def __init__(self, cache):
        self.cache = cache
        self.dtype = np.float32 if cache.dtype == "float32" else np.float16

    def __call__(self, batch):
        tokens = np.array([(int(r.context_slice(r.context_len - 1, r.context_len)[0]) * 1103515245
                            + r.context_len) % 50000 for r in batch.sampling], dtype=np.int64)
        ids = np.concatenate([r.context_slice(r.num_computed - n, r.num_computed)
                              for r, n in zip(batch.requests, batch.num_new_tokens)])
        pos = np.concatenate([np.arange(r.num_computed - n, r.num_computed)
                              for r, n in zip(batch.requests, batch.num_new_tokens)])
        base = ((ids.astype(np.int64) * 31 + pos) % 997).astype(np.float32) / 997.0
        kv = np.broadcast_to(base[:, None, None], (len(base), HEADS, HEAD_DIM)).astype(self.dtype)
        if self.cache.device != "cpu":          # the rows must live where the cache does
            buf = DeviceBuffer(kv.nbytes, int(self.cache.device.split(":")[1]))
            buf.copy_from_host(kv)
            kv = DeviceArray(buf, kv.shape, "float16")
        return _Out(tokens, [kv] * LAYERS, [kv] * LAYERS)


@dataclass
class _Out:
    tokens: np.ndarray
    keys: list
    values: list


def _progress(total):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc="replay", unit="req", file=sys.stderr)
    except ImportError:
        return None


def replay(trace, num_blocks, device="cpu", policy="lru", speed="max", check_every=0, progress=True):
    """Run the trace; returns the report dict and a per-step timeline."""
    import rocmforge as rf
    config = CacheConfig(LAYERS, HEADS, HEAD_DIM, block_size=BLOCK_SIZE, num_blocks=num_blocks, dtype="float16")
    cache = rf.KvCache(config, device, enable_prefix_caching=True, eviction_policy=policy)
    engine = Engine(cache, SyntheticModel(cache), SchedulerConfig(max_num_seqs=64, max_tokens_per_step=8192))
    bar = _progress(len(trace)) if progress else None
    timeline, peak, pending, done = [], 0, list(reversed(trace)), 0
    t0 = time.perf_counter()
    rejected = 0
    i = 0
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and (speed == "max" or pending[-1].arrival <= now):
            r = pending.pop()
            try:
                engine.submit(Request(i, r.prompt, r.output_len))
            except rf.ArgumentValueError:
                rejected += 1           # longer than the whole cache
            i += 1
        if not engine.has_work():
            time.sleep(min(0.01, max(0.0, pending[-1].arrival - now)))
            continue
        finished = engine.step()
        done += len(finished)
        if bar is not None:
            bar.update(len(finished))
        used = cache.manager.num_used_blocks
        peak = max(peak, used)
        timeline.append((time.perf_counter() - t0, used / num_blocks, engine.prefix_hit_rate))
        if check_every and engine.counters["steps"] % check_every == 0:
            cache.manager.check_invariants()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    cache.manager.check_invariants()
    met = engine.metrics()
    report = {
        "requests": done, "rejected": rejected, "prompt_tokens": met["prompt_tokens"],
        "generated_tokens": met["generated_tokens"], "wall_s": wall,
        "tokens_per_s": (met["prompt_tokens"] + met["generated_tokens"]) / wall,
        "prefix_hit_rate": met["prefix_hit_rate"], "preemptions": met["preemptions"], "steps": met["steps"],
        "peak_blocks_used": peak, "final_blocks_used": cache.manager.num_used_blocks, "num_blocks": num_blocks,
        "finished_records": met["finished_records"], "step_ms_p50": met["step_time_p50"] * 1e3,
        "step_ms_p99": met["step_time_p99"] * 1e3, "device": cache.device, "policy": policy,
    }
    cache.close()
    return report, timeline


def plot(timeline, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'rocmforge[plot]'") from None
    t, usage, hit = (np.array(c) for c in zip(*timeline)) if timeline else ([], [], [])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(t, usage, label="block usage")
    ax.plot(t, hit, label="prefix hit rate (cumulative)")
    ax.set_xlabel("seconds")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def print_report(report, trace_name):
    print(f"rocmforge replay of {trace_name} on {report['device']} (policy {report['policy']})")
    rows = [
        ("requests", f"{report['requests']} ({report['rejected']} rejected: longer than the cache)"),
        ("prompt / generated tokens", f"{report['prompt_tokens']} / {report['generated_tokens']}"),
        ("wall time", f"{report['wall_s']:.2f} s over {report['steps']} steps"),
        ("bookkeeping throughput", f"{report['tokens_per_s']:,.0f} tokens/s"),
        ("prefix hit rate", f"{report['prefix_hit_rate']:.1%}"),
        ("preemptions", str(report["preemptions"])),
        ("blocks used: peak / final", f"{report['peak_blocks_used']} / {report['final_blocks_used']} "
                                      f"of {report['num_blocks']}"),
        ("step latency p50 / p99", f"{report['step_ms_p50']:.2f} / {report['step_ms_p99']:.2f} ms"),
    ]
    for name, value in rows:
        print(f"  {name:<28} {value}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rocmforge replay", description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default=SAMPLE, help="Mooncake .jsonl or Azure .csv (default: bundled sample)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--blocks", type=int, help="cache blocks of 16 tokens")
    size.add_argument("--memory", default="256MiB", help="cache memory, e.g. 2GiB (default 256MiB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda:N or hip:N")
    parser.add_argument("--policy", default="lru", choices=["lru", "arc"])
    parser.add_argument("--speed", default="max", choices=["max", "realtime"])
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    parser.add_argument("--plot", help="write a PNG of block usage and hit rate over time")
    args = parser.parse_args(argv)
    per_block = 2 * LAYERS * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    num_blocks = args.blocks or max(1, parse_bytes(args.memory) // per_block)
    trace = load_trace(args.trace, args.limit)
    report, timeline = replay(trace, num_blocks, args.device, args.policy, args.speed)
    print_report(report, os.path.basename(args.trace))
    print(f"  {'cache':<28} {num_blocks} blocks, {format_bytes(num_blocks * per_block)}")
    if args.plot:
        plot(timeline, args.plot)
        print(f"  {'plot':<28} {args.plot}")
    print(json.dumps(report))
    return 0 if report["final_blocks_used"] == 0 else 1
