"""Thread scaling of the decode simulation on one manager (each thread on its
own shard), through the C API and the Python API, and 15 decoders beside a
16th thread that either calls lookup_prefix and stats() in a loop or spins in
Python without calling rocmforge (a control: what a 16th busy core costs).
Medians; prints one line per case, then one JSON line."""

import json
import statistics
import threading
import time

import numpy as np

from rocmforge import _bench_capi
from rocmforge import bench_allocator as B


def mixed(kind, n=15, tokens=2_000_000):
    """M tokens/s of n C API decoders (prefix caching on) with a 16th thread:
    kind "alone" (none), "calls" (lookup_prefix + stats in a loop) or "spin"."""
    m = B._decode_thread_manager(n, prefix=True)
    barrier, done, spans = threading.Barrier(n + 1), threading.Event(), []
    steps = tokens // B.DECODE_SEQS

    def work(t):
        m.bind_thread(t)
        ids, left, lengths = B._decode_start(m, t * 10**9, np.random.default_rng(t))
        left, lengths = np.array(left, dtype=np.int64), np.array(lengths[::-1], dtype=np.int64)
        _bench_capi.decode_sim(m, ids, left, lengths, steps // 4, t * 10**9 + B.DECODE_SEQS)
        barrier.wait()
        start = time.perf_counter()
        _bench_capi.decode_sim(m, ids, left, lengths[len(lengths) // 2:], steps, int(ids.max()) + 1)
        spans.append((start, time.perf_counter()))

    def monitor():
        prompt, x = np.arange(1024, dtype=np.int32), 0
        while not done.is_set():
            if kind == "calls":
                m.lookup_prefix(prompt)
                m.stats()
            else:
                for i in range(200):
                    x += i

    workers = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    other = None if kind == "alone" else threading.Thread(target=monitor)
    for w in workers:
        w.start()
    barrier.wait()
    if other:
        other.start()
    for w in workers:
        w.join()
    done.set()
    if other:
        other.join()
    return n * steps * B.DECODE_SEQS / (max(e for _, e in spans) - min(s for s, _ in spans)) / 1e6


def main():
    out = {}
    for path in ("capi", "python"):
        for n in (1, 2, 4, 8, 16):
            xs = [B.decode_threads(n, 2_000_000, path) / 1e6 for _ in range(9 if n == 1 else 5)]
            out[f"{path}_{n}"] = xs
            print(path, n, round(statistics.median(xs), 1), [round(x, 1) for x in xs], flush=True)
    for kind in ("alone", "spin", "calls") * 4:
        out.setdefault(f"mixed_{kind}", []).append(mixed(kind))
    for kind in ("alone", "spin", "calls"):
        xs = out[f"mixed_{kind}"]
        print("mixed", kind, round(statistics.median(xs), 1), [round(x, 1) for x in xs], flush=True)
    print(json.dumps({k: [round(x, 2) for x in v] for k, v in out.items()}))


if __name__ == "__main__":
    main()
