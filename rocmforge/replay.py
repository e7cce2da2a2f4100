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
import json
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from rocmforge._dlpack import DeviceArray
from rocmforge._progress import Progress
from rocmforge._runtime import DeviceBuffer
from rocmforge.config import CacheConfig, format_bytes, parse_bytes
from rocmforge.engine import Engine, Request, SchedulerConfig
from rocmforge.errors import ArgumentValueError, KvCacheError
from rocmforge.traces import TraceError, load_trace

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "conversation_sample.jsonl")
LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 2, 64, 16     # the synthetic model's K/V geometry


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


class Sample(NamedTuple):
    """The state after one engine step."""
    t: float                        # seconds since the start
    usage: float                    # blocks held by requests, over the pool
    hit_rate: float                 # prefix hit rate so far
    cached: float                   # evictable cached blocks, over the pool
    running: int
    waiting: int
    preemptions: int                # so far
    host_hit_rate: float            # prefix hits served by the host tier so far, over the prompt tokens looked up


def replay(trace, num_blocks, device="cpu", policy="lru", speed="max", check_every=0, progress=True,
           scheduler=None, host_memory=None):
    """Run the trace; returns the report dict and the timeline (one Sample per step).
    scheduler: a SchedulerConfig (default: 64 requests, 8192 tokens per step).
    host_memory: bytes (or "8GiB") of host tier behind the prefix cache.
    Raises ArgumentValueError when the cache is too small for every request."""
    from rocmforge import KvCache
    config = CacheConfig(LAYERS, HEADS, HEAD_DIM, block_size=BLOCK_SIZE, num_blocks=num_blocks, dtype="float16")
    fits = [r for r in trace if -(-(len(r.prompt) + r.output_len) // BLOCK_SIZE) <= num_blocks]
    if not fits:
        need = min(-(-(len(r.prompt) + r.output_len) // BLOCK_SIZE) for r in trace)
        raise ArgumentValueError(f"a cache of {num_blocks} blocks of {BLOCK_SIZE} tokens holds no request of the "
                                 f"trace (the smallest needs {need} blocks): give more --memory or --blocks")
    cache = KvCache(config, device, enable_prefix_caching=True, eviction_policy=policy, host_cache=host_memory)
    try:
        return _run(trace, cache, speed, check_every, progress,
                    scheduler or SchedulerConfig(max_num_seqs=64, max_tokens_per_step=8192))
    finally:
        cache.close()


def _run(trace, cache, speed, check_every, progress, scheduler):
    m = cache.manager
    engine = Engine(cache, SyntheticModel(cache), scheduler)
    bar = Progress(len(trace), "replay") if progress else None
    timeline, peak, pending, done, rejected, i = [], 0, list(reversed(trace)), 0, 0, 0
    t0 = time.perf_counter()
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and (speed == "max" or pending[-1].arrival <= now):
            r = pending.pop()
            try:
                engine.submit(Request(i, r.prompt, r.output_len))
            except ArgumentValueError:
                rejected += 1           # longer than the whole cache
            i += 1
        if not engine.has_work():
            time.sleep(min(0.01, max(0.0, pending[-1].arrival - now)) if pending else 0)
            continue
        finished = engine.step()
        done += len(finished)
        if bar is not None:
            bar.update(len(finished))
        used = m.num_used_blocks
        peak = max(peak, used)
        met = engine.counters
        timeline.append(Sample(time.perf_counter() - t0, used / m.num_blocks, engine.prefix_hit_rate,
                               m.num_evictable_blocks / m.num_blocks, len(engine.running), len(engine.waiting),
                               met["preemptions"], _host_share(cache, met)))
        if check_every and met["steps"] % check_every == 0:
            m.check_invariants()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    m.check_invariants()
    met = engine.metrics()
    report = {
        "requests": done, "rejected": rejected, "failed": met["failed"], "prompt_tokens": met["prompt_tokens"],
        "generated_tokens": met["generated_tokens"], "computed_tokens": met["computed_tokens"], "wall_s": wall,
        "tokens_per_s": (met["prompt_tokens"] + met["generated_tokens"]) / wall,
        "prefix_hit_rate": met["prefix_hit_rate"], "preemptions": met["preemptions"], "steps": met["steps"],
        "peak_blocks_used": peak, "final_blocks_used": m.num_used_blocks, "num_blocks": m.num_blocks,
        "finished_records": met["finished_records"], "step_ms_p50": met["step_time_p50"] * 1e3,
        "step_ms_p99": met["step_time_p99"] * 1e3, "device": cache.device, "policy": m.eviction_policy,
    }
    st = cache.stats()
    report.update({
        "host_cache_blocks": cache.host_cache_blocks,
        "host_hit_rate": _host_share(cache, engine.counters),
        "host_bytes_offloaded": st["host_bytes_offloaded"], "host_bytes_reloaded": st["host_bytes_reloaded"],
    })
    return report, timeline


def _host_share(cache, counters):
    """Prompt tokens the host tier served, over those the engine looked up at admission
    (the denominator of the engine's prefix hit rate); 0 without a tier, reading no stats."""
    if not cache.host_cache_blocks:
        return 0.0
    return cache.manager.stats()["host_hit_tokens"] / max(counters["prefix_query_tokens"], 1)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or ModuleNotFoundError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModuleNotFoundError("--plot needs matplotlib: pip install 'rocmforge[plot]'") from None
    return plt


def plot(timeline, path, title="rocmforge replay"):
    """Three panels over time: the pool (blocks held by requests, cached blocks that
    can be evicted, preemptions marked), the queues, and the prefix hit rate."""
    plt = _pyplot()
    if timeline:
        cols = Sample(*(np.array(c) for c in zip(*timeline)))
    else:
        cols = Sample(*(np.zeros(0) for _ in Sample._fields))
    fig, (pool, queues, hits) = plt.subplots(3, 1, figsize=(9, 7), sharex=True,
                                             gridspec_kw={"height_ratios": [2, 1, 1]})
    fig.suptitle(title)
    pool.stackplot(cols.t, 100 * cols.usage, 100 * cols.cached, labels=["held by requests", "cached, evictable"],
                   colors=["tab:blue", "tab:green"], alpha=0.8)
    preempt_at = cols.t[np.flatnonzero(np.diff(cols.preemptions, prepend=0) > 0)]
    if len(preempt_at):
        pool.vlines(preempt_at, 0, 100, colors="tab:red", linewidth=0.6, alpha=0.8,
                    label=f"preemption ({int(cols.preemptions[-1])})")
    pool.set_ylabel("% of the pool's blocks")
    pool.set_ylim(0, 100)
    pool.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    queues.plot(cols.t, cols.running, label="running")
    queues.plot(cols.t, cols.waiting, label="waiting")
    queues.set_ylabel("requests")
    queues.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    hits.plot(cols.t, 100 * cols.hit_rate, color="tab:purple", label="both tiers")
    if cols.host_hit_rate.any():
        hits.plot(cols.t, 100 * cols.host_hit_rate, color="tab:orange", label="from the host tier")
        hits.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    hits.set_ylabel("prefix hit rate\n(cumulative, %)")
    hits.set_ylim(0, min(100.0, max(5.0, 125 * float(cols.hit_rate.max(initial=0)))))
    hits.set_xlabel("seconds since the start")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_report(report, trace_name):
    print(f"rocmforge replay of {trace_name} on {report['device']} (policy {report['policy']})")
    rows = [
        ("requests", f"{report['requests']} ({report['rejected']} rejected: longer than the cache; "
                     f"{report['failed']} failed)"),
        ("prompt / generated tokens", f"{report['prompt_tokens']} / {report['generated_tokens']}"),
        ("wall time", f"{report['wall_s']:.2f} s over {report['steps']} steps"),
        ("bookkeeping throughput", f"{report['tokens_per_s']:,.0f} tokens/s"),
        ("prefix hit rate", f"{report['prefix_hit_rate']:.1%}"),
    ]
    if report.get("host_cache_blocks"):
        rows += [
            ("  from the host tier", f"{report['host_hit_rate']:.1%} "
                                     f"({report['host_cache_blocks']} blocks of host memory)"),
            ("  host tier traffic", f"{format_bytes(report['host_bytes_offloaded'])} out, "
                                    f"{format_bytes(report['host_bytes_reloaded'])} back"),
        ]
    rows += [
        ("preemptions", str(report["preemptions"])),
        ("blocks used: peak / final", f"{report['peak_blocks_used']} / {report['final_blocks_used']} "
                                      f"of {report['num_blocks']}"),
        ("step latency p50 / p99", f"{report['step_ms_p50']:.2f} / {report['step_ms_p99']:.2f} ms"),
    ]
    for name, value in rows:
        print(f"  {name:<28} {value}")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None):
    parser = _Parser(prog="rocmforge replay", description=__doc__.splitlines()[0])
    parser.add_argument("trace", nargs="?", default=SAMPLE, help="Mooncake .jsonl or Azure .csv (default: bundled sample)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--blocks", type=_positive, help="cache blocks of 16 tokens")
    size.add_argument("--memory", default="256MiB", help="cache memory, e.g. 2GiB (default 256MiB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda:N or hip:N")
    parser.add_argument("--policy", default="lru", choices=["lru", "arc"])
    parser.add_argument("--speed", default="max", choices=["max", "realtime"])
    parser.add_argument("--limit", type=_positive, help="replay only the first N requests")
    parser.add_argument("--plot", help="write a PNG of the pool, the queues and the hit rate over time")
    parser.add_argument("--host-memory", help="a host tier for the prefix cache, e.g. 8GiB")
    args = parser.parse_args(argv)
    per_block = 2 * LAYERS * BLOCK_SIZE * HEADS * HEAD_DIM * 2
    try:
        if args.plot:
            _pyplot()                   # before a long run, not after it
            folder = os.path.dirname(os.path.abspath(args.plot))
            if not os.path.isdir(folder):
                raise TraceError(args.plot, 0, "cannot write the plot: no such folder")
        num_blocks = args.blocks or max(1, parse_bytes(args.memory, "--memory") // per_block)
        if args.host_memory is not None:
            parse_bytes(args.host_memory, "--host-memory")      # before a long run, not after it
        trace = load_trace(args.trace, args.limit)
        report, timeline = replay(trace, num_blocks, args.device, args.policy, args.speed,
                                  host_memory=args.host_memory)
    except (TraceError, KvCacheError, MemoryError, ModuleNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    name = os.path.basename(args.trace)
    print_report(report, name)
    print(f"  {'cache':<28} {num_blocks} blocks, {format_bytes(num_blocks * per_block)}")
    if args.plot:
        plot(timeline, args.plot, f"rocmforge replay: {name}, {report['requests']} requests, "
                                  f"{num_blocks} blocks, policy {report['policy']}")
        print(f"  {'plot':<28} {args.plot}")
    print(json.dumps(report))
    return 0 if report["final_blocks_used"] == 0 and report["failed"] == 0 else 1
