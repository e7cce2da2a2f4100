"""Allocator benchmarks: the cost of the calls an engine makes on every step.

Each case runs twice: through the Python API, and through the C API of
rocmforge/_core.pxd (the cheapest path: what an engine written in Cython
calls, without Python's per-call cost). Each reports the median of several
repetitions. Prints a table, then one JSON line with every figure (for
scripts and CI logs).
"""

from __future__ import annotations

import heapq
import json
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

from rocmforge import BlockManager, _bench_capi
from rocmforge._progress import Progress

DECODE_SEQS = 256
DECODE_BLOCK = 16
MIN_LEN, MAX_LEN = 64, 2048


def _median(run, reps, desc):
    bar = Progress(reps, desc, leave=False)
    samples = []
    for _ in range(reps):
        samples.append(run())
        bar.update(1)
    bar.close()
    return statistics.median(samples), samples


def alloc_free_single(ops):
    """ns per allocate_one() + decref_one() pair on a 65,536-block pool."""
    m = BlockManager(65536, 16)
    alloc, free = m.allocate_one, m.decref_one
    start = time.perf_counter_ns()
    for _ in range(ops):
        free(alloc())
    return (time.perf_counter_ns() - start) / ops


def alloc_free_batch(rounds, batch=64):
    """ns per block of allocate(64, out=buf) + decref(buf)."""
    m = BlockManager(65536, 16)
    buf = np.empty(batch, dtype=np.int32)
    alloc, free = m.allocate, m.decref
    start = time.perf_counter_ns()
    for _ in range(rounds):
        free(alloc(batch, out=buf))
    return (time.perf_counter_ns() - start) / (rounds * batch)


PREFIX_BLOCKS = 64          # blocks per cached prefix (one engine request)
PREFIX_CACHED = 4096        # cached blocks in the pool


def _cached_prompts():
    """A manager holding 4,096 cached, evictable blocks (64 prompts of 64 blocks)."""
    m = BlockManager(2 * PREFIX_CACHED, DECODE_BLOCK, enable_prefix_caching=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 1 << 17, PREFIX_BLOCKS * DECODE_BLOCK, dtype=np.int32)
               for _ in range(PREFIX_CACHED // PREFIX_BLOCKS)]
    for i, p in enumerate(prompts):
        m.add_sequence(i, p)
        m.remove_sequence(i)
    return m, prompts


def _check_hits(name, m, hits_before, rounds):
    """Raise unless every round hit all its blocks."""
    if m.stats()["prefix_hit_tokens"] - hits_before != rounds * PREFIX_BLOCKS * DECODE_BLOCK:
        raise RuntimeError(f"{name}: a prompt missed the cache")


def _ns_per_block(name, m, hits_before, rounds, elapsed):
    """Check that every round hit all its blocks; ns per block."""
    _check_hits(name, m, hits_before, rounds)
    return elapsed / (rounds * PREFIX_BLOCKS)


def prefix_touch(rounds):
    """ns per block of a prefix hit for an engine that manages blocks: per round,
    acquire_prefix on a fully cached 64-block prompt (hash, look up and verify
    every block, take a reference) then decref the ids (back to evictable)."""
    m, prompts = _cached_prompts()
    buf = np.empty(PREFIX_BLOCKS, dtype=np.int32)
    acquire, release = m.acquire_prefix, m.decref
    before = m.stats()["prefix_hit_tokens"]
    start = time.perf_counter_ns()
    for i in range(rounds):
        release(acquire(prompts[i % len(prompts)], out=buf))
    return _ns_per_block("prefix_touch", m, before, rounds, time.perf_counter_ns() - start)


def prefix_sequence(rounds):
    """The same hit through sequences: add_sequence with the cached prompt (it
    also returns the 1,024 slots), then remove_sequence; ns per block."""
    m, prompts = _cached_prompts()
    add, remove = m.add_sequence, m.remove_sequence
    before = m.stats()["prefix_hit_tokens"]
    start = time.perf_counter_ns()
    for i in range(rounds):
        add(0, prompts[i % len(prompts)])
        remove(0)
    return _ns_per_block("prefix_sequence", m, before, rounds, time.perf_counter_ns() - start)


def _decode_start(m, id_base, rng):
    """256 running sequences, each started mid-way through its length (so a run
    sees steady churn): their ids, tokens left to each, and the lengths of the
    sequences that will replace them (drawn from [64, 2048], used from the end)."""
    ids = np.arange(id_base, id_base + DECODE_SEQS, dtype=np.int64)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=1 << 16).tolist()
    left = []
    for slot in range(DECODE_SEQS):
        length = lengths.pop()
        done = int(rng.integers(0, length))
        m.add_sequence(int(ids[slot]), num_tokens=done)
        left.append(length - done)
    return ids, left, lengths


def _decode_manager():
    return BlockManager(DECODE_SEQS * MAX_LEN // DECODE_BLOCK + 64, DECODE_BLOCK)


def decode_sim(tokens, manager=None, id_base=0, seed=0):
    """One append_batch per step over 256 running sequences; a sequence that
    reaches its length is removed and a new one starts.
    Returns ns per appended token (churn included)."""
    m = manager if manager is not None else _decode_manager()
    ids, left, lengths = _decode_start(m, id_base, np.random.default_rng(seed))
    ones = np.ones(DECODE_SEQS, dtype=np.int32)
    out = np.empty(DECODE_SEQS, dtype=np.int64)
    ends = [(n, slot) for slot, n in enumerate(left)]
    heapq.heapify(ends)
    next_id = id_base + DECODE_SEQS
    steps = max(tokens // DECODE_SEQS, 1)
    append, remove, add = m.append_batch, m.remove_sequence, m.add_sequence
    start = time.perf_counter_ns()
    for step in range(1, steps + 1):
        append(ids, ones, out=out)
        while ends[0][0] == step:
            _, slot = heapq.heappop(ends)
            remove(int(ids[slot]))
            ids[slot] = next_id
            add(next_id)
            next_id += 1
            heapq.heappush(ends, (step + lengths.pop(), slot))
    elapsed = time.perf_counter_ns() - start
    for sid in ids.tolist():
        remove(sid)
    return elapsed / (steps * DECODE_SEQS)


# --- the same work through the C API (rocmforge/_core.pxd) --------------------

def alloc_free_single_capi(ops):
    """alloc_free_single as an engine written in Cython runs it."""
    return _bench_capi.alloc_free_batch(BlockManager(65536, 16), ops, 1)


def alloc_free_batch_capi(rounds, batch=64):
    """alloc_free_batch through the C API."""
    return _bench_capi.alloc_free_batch(BlockManager(65536, 16), rounds, batch)


def prefix_touch_capi(rounds):
    """prefix_touch through the C API."""
    m, prompts = _cached_prompts()
    before = m.stats()["prefix_hit_tokens"]
    ns = _bench_capi.prefix_touch(m, np.stack(prompts), rounds)
    _check_hits("prefix_touch", m, before, rounds)
    return ns


def decode_sim_capi(tokens, seed=0):
    """decode_sim through the C API (same sequences and lengths)."""
    m = _decode_manager()
    ids, left, lengths = _decode_start(m, 0, np.random.default_rng(seed))
    left = np.array(left, dtype=np.int64)
    ns = _bench_capi.decode_sim(m, ids, left, np.array(lengths[::-1], dtype=np.int64),
                                max(tokens // DECODE_SEQS, 1), DECODE_SEQS)
    for sid in ids.tolist():
        m.remove_sequence(sid)
    m.check_invariants()
    return ns


def _decode_thread_manager(nthreads, prefix=False):
    """One thread's pool per thread, one shard per thread (the default single
    shard for one thread)."""
    return BlockManager(nthreads * (DECODE_SEQS * MAX_LEN // DECODE_BLOCK + 64), DECODE_BLOCK,
                        shards=nthreads, enable_prefix_caching=prefix)


def decode_threads(nthreads, tokens_per_thread, path="python", prefix=False, monitor=False):
    """Aggregate tokens/s of decode_sim run by n threads on one manager, each on
    its own shard with its own sequences; through the Python API or the C API
    (each thread's whole loop without the GIL). With monitor, one more thread
    calls lookup_prefix and stats() in a loop meanwhile (prefix caching on)."""
    m = _decode_thread_manager(nthreads, prefix=prefix or monitor)
    barrier = threading.Barrier(nthreads + 1)
    done = threading.Event()
    errors, polls, spans = [], [0], []
    steps = max(tokens_per_thread // DECODE_SEQS, 1)

    def work(t):
        # Each thread first decodes a quarter of its steps (so the memory its
        # sequences grow into is mapped and warm, not page-faulted during the
        # measurement), then times itself from the barrier: the main thread
        # may wake later than the workers start.
        try:
            m.bind_thread(t)
            rng = np.random.default_rng(t)
            if path == "python":
                decode_sim(tokens_per_thread // 4, manager=m, id_base=t * 10**9 + 5 * 10**8, seed=t)
                barrier.wait()
                start = time.perf_counter()
                decode_sim(tokens_per_thread, manager=m, id_base=t * 10**9, seed=t)
            else:
                ids, left, lengths = _decode_start(m, t * 10**9, rng)
                left = np.array(left, dtype=np.int64)
                lengths = np.array(lengths[::-1], dtype=np.int64)
                _bench_capi.decode_sim(m, ids, left, lengths, steps // 4, t * 10**9 + DECODE_SEQS)
                barrier.wait()
                start = time.perf_counter()
                _bench_capi.decode_sim(m, ids, left, lengths[len(lengths) // 2:], steps, int(ids.max()) + 1)
            spans.append((start, time.perf_counter()))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    def watch():
        prompt = np.arange(PREFIX_BLOCKS * DECODE_BLOCK, dtype=np.int32)
        while not done.is_set():
            m.lookup_prefix(prompt)
            m.stats()
            polls[0] += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    watcher = threading.Thread(target=watch) if monitor else None
    if watcher:
        watcher.start()
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    done.set()
    if watcher:
        watcher.join()
    if errors:
        raise errors[0]
    if monitor and polls[0] == 0:
        raise RuntimeError("the monitoring thread never ran")
    m.check_invariants()
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return nthreads * steps * DECODE_SEQS / elapsed


def run(reps=5, quick=False, thread_counts=(1, 2, 4, 8, 16), out=None):
    out = out or sys.stdout
    scale = 100 if quick else 1
    single_ops = 200_000 // scale
    batch_rounds = 20_000 // scale
    decode_tokens = 200_000 // scale
    thread_tokens = 2_000_000 // scale      # per thread: tens of ms, beyond thread start-up skew
    prefix_rounds = 20_000 // scale
    results = {}
    rows = []
    # (name, Python path, C API path or None, work, unit, target)
    for name, fn, capi, arg, unit, target in [
        ("alloc_free_single", alloc_free_single, alloc_free_single_capi, single_ops, "ns/pair", 60),
        ("alloc_free_batch", alloc_free_batch, alloc_free_batch_capi, batch_rounds, "ns/block", 5),
        ("decode_sim", decode_sim, decode_sim_capi, decode_tokens, "ns/token", 10),
        ("prefix_touch", prefix_touch, prefix_touch_capi, prefix_rounds, "ns/block", 30),
        ("prefix_sequence", prefix_sequence, None, prefix_rounds, "ns/block", None),
    ]:
        for path, f, key in [("python", fn, name), ("C API", capi, name + "_capi")]:
            if f is None:
                continue
            f(max(arg // 10, 1))  # warm up
            med, samples = _median(lambda: f(arg), reps, key)
            results[key] = {"median": round(med, 2), "unit": unit, "target": target, "path": path,
                            "samples": [round(x, 2) for x in samples]}
            if target is None:
                verdict = "-"
            elif quick:                 # 1/100 of the work: start-up costs dominate, no verdict
                verdict = f"<= {target} (quick run: no verdict)"
            else:
                verdict = f"<= {target}: " + ("met" if med <= target else "not met")
            rows.append((name, path, f"{med:.1f} {unit}", verdict,
                         f"{min(samples):.1f}-{max(samples):.1f}"))
    threads = {}
    for path in ("python", "capi"):
        base = None
        for n in thread_counts:
            med, samples = _median(lambda: decode_threads(n, thread_tokens, path), reps, f"{path} threads={n}")
            base = base or med
            threads[f"{path}_{n}"] = {"tokens_per_s": round(med), "scaling": round(med / base, 2)}
            rows.append((f"threads x{n}", "python" if path == "python" else "C API", f"{med / 1e6:.1f} M tok/s",
                         f"x{med / base:.2f} vs 1", f"{min(samples) / 1e6:.1f}-{max(samples) / 1e6:.1f}"))
    if max(thread_counts) > 1:
        n = max(thread_counts) - 1
        quiet, _ = _median(lambda: decode_threads(n, thread_tokens, "capi", prefix=True), reps, f"{n} decoders")
        busy, samples = _median(lambda: decode_threads(n, thread_tokens, "capi", monitor=True), reps,
                                f"{n} decoders + monitor")
        threads["mixed"] = {"decoders": n, "tokens_per_s_alone": round(quiet), "tokens_per_s_monitored": round(busy),
                            "ratio": round(busy / quiet, 3)}
        rows.append((f"{n} decoders + monitor", "C API", f"{busy / 1e6:.1f} M tok/s",
                     f"x{busy / quiet:.3f} vs alone", f"{min(samples) / 1e6:.1f}-{max(samples) / 1e6:.1f}"))
    results["threads"] = threads
    headers = ("benchmark", "path", f"median of {reps}", "target / scaling", "range")
    widths = [max(len(str(r[i])) for r in rows + [headers]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), file=out)
    summary = {"benchmark": "allocator", "reps": reps, "quick": quick,
               "python": platform.python_version(), "cpus": os.cpu_count(), "results": results}
    print(json.dumps(summary), file=out)
    return summary


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="rocmforge bench", description="rocmforge allocator benchmarks: "
                                     "a table of medians, then one JSON line")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="1/100 of the work (smoke test)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    if args.reps < 1 or any(t < 1 for t in args.threads):
        parser.error("--reps and --threads must be >= 1")
    run(reps=args.reps, quick=args.quick, thread_counts=args.threads)


if __name__ == "__main__":
    main()
