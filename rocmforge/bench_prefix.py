"""Prefix-cache hit rates on a request trace, per eviction policy and capacity.

Replays a Mooncake-format trace (JSON lines with ``input_length`` and
``hash_ids``, one id per 512-token block of the prompt) through a real
BlockManager with block_size 512. Each hash id is expanded into 512
deterministic token ids, so equal ids give equal tokens and the manager's own
hashing, lookup and verification decide every hit. Requests run one at a
time: look up and take the cached prefix, allocate the rest, release.

The ceiling is Belady's offline optimum on the same replay: when a block must
go, evict the cached block whose next use lies furthest in the future.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import heapq
import json
import sys
from collections import defaultdict

import numpy as np

from rocmforge import BlockManager
from rocmforge._progress import Progress
from rocmforge.traces import HASH_BLOCK as BLOCK, TraceError, expand_tokens, read_mooncake

DEFAULT_CAPACITIES = (1_000_000, 3_000_000, 10_000_000)


def load_mooncake(path, limit=None):
    """[(hash_ids, input_length)] from a Mooncake JSONL trace (TraceError if malformed)."""
    requests = [(list(r.hash_ids), r.input_length) for r in read_mooncake(path, limit, prompts_only=True)]
    if not requests:
        raise TraceError(path, 0, "no requests")
    return requests


def synthetic_trace(kind, num_requests=12000, seed=0):
    """A Mooncake-format request list with a known sharing structure (no file needed).

    - "agent": tool-using agents. 40 system prompts (4-24 blocks, Zipf
      popularity); sessions of geometric length (mean 4 turns) interleave,
      each turn re-sending the whole history plus 1-6 new blocks.
    - "docqa": questions over 300 shared documents (8-64 blocks, Zipf
      popularity), each followed by a unique 1-2 block question.
    """
    rng = np.random.default_rng(seed)
    next_id = [0]

    def fresh(n):
        ids = list(range(next_id[0], next_id[0] + n))
        next_id[0] += n
        return ids

    def zipf_pick(n):
        weights = 1.0 / np.arange(1, n + 1)
        return int(rng.choice(n, p=weights / weights.sum()))

    requests = []
    if kind == "agent":
        prompts = [fresh(int(rng.integers(4, 25))) for _ in range(40)]
        live = []
        while len(requests) < num_requests:
            if not live or rng.random() < 0.3:
                live.append({"ids": list(prompts[zipf_pick(len(prompts))]),
                             "turns": int(rng.geometric(0.25))})
            s = live[int(rng.integers(len(live)))]
            s["ids"] = s["ids"] + fresh(int(rng.integers(1, 7)))
            requests.append((list(s["ids"]), len(s["ids"]) * BLOCK - int(rng.integers(0, BLOCK))))
            s["turns"] -= 1
            if s["turns"] <= 0:
                live.remove(s)
    elif kind == "docqa":
        docs = [fresh(int(rng.integers(8, 65))) for _ in range(300)]
        for _ in range(num_requests):
            ids = docs[zipf_pick(len(docs))] + fresh(int(rng.integers(1, 3)))
            requests.append((ids, len(ids) * BLOCK - int(rng.integers(0, BLOCK))))
    else:
        raise ValueError(f"unknown synthetic trace {kind!r} (agent, docqa)")
    return requests


def replay(requests, capacity_tokens, policy, host_capacity_tokens=0, host_policy=None):
    """Token hit rate of one policy at one capacity (a real BlockManager), with
    a host tier of host_capacity_tokens behind it, under host_policy (default:
    the same policy; its copies are bookkeeping here: the queue is emptied
    after every request)."""
    num_blocks = max(capacity_tokens // BLOCK, 1)
    m = BlockManager(num_blocks, BLOCK, enable_prefix_caching=True, eviction_policy=policy,
                     host_cache_blocks=host_capacity_tokens // BLOCK, host_eviction_policy=host_policy or policy)
    hit = total = skipped = 0
    for hash_ids, input_length in requests:
        if -(-input_length // BLOCK) > num_blocks:
            skipped += 1
            continue
        total += input_length
        m.add_sequence(0, expand_tokens(hash_ids, input_length))
        hit += m.num_cached_tokens(0)
        m.remove_sequence(0)
        if host_capacity_tokens:
            m.take_pending_copies()
    m.check_invariants()
    stats = m.stats()
    return {"hit_rate": hit / total if total else 0.0, "hit_tokens": hit, "tokens": total,
            "skipped": skipped, "cached_blocks_evicted": stats["cached_blocks_evicted"],
            "host_hit_tokens": stats["host_hit_tokens"], "host_offloaded_blocks": stats["host_offloaded_blocks"],
            "host_reloaded_blocks": stats["host_reloaded_blocks"]}


def run_tiered(requests, pairs, policies=("lru", "arc"), out=None, name="trace", host_policy=None):
    """Per (GPU capacity, host capacity) and policy: the two-tier hit rate (the
    tier under host_policy, default the same policy), and that of one cache of
    the combined size beside it."""
    out = out or sys.stdout
    bar = Progress(len(pairs) * len(policies) * 2, "replays", leave=False)
    results = {}
    for gpu, host in pairs:
        row = {}
        for policy in policies:
            tiered = replay(requests, gpu, policy, host, host_policy)
            bar.update(1)
            single = replay(requests, gpu + host, policy)
            bar.update(1)
            row[policy] = {"tiered": tiered, "single": single,
                           "ratio": tiered["hit_rate"] / single["hit_rate"] if single["hit_rate"] else None}
        results[f"{gpu}+{host}"] = row
    bar.close()
    print(f"{name}: {len(requests)} requests, block size {BLOCK}; pool + host tier against one cache of the sum",
          file=out)
    print(f"{'pool + host (tokens)':<26} {'policy':<7} {'two tiers':>10} {'from host':>10} {'one cache':>10} "
          f"{'ratio':>7}", file=out)
    for key, row in results.items():
        gpu, host = key.split("+")
        for policy, r in row.items():
            t, single = r["tiered"], r["single"]
            from_host = t["host_hit_tokens"] / t["tokens"] if t["tokens"] else 0.0
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
            print(f"{int(gpu):>11,} + {int(host):>11,}  {policy:<7} {100 * t['hit_rate']:>9.2f}% "
                  f"{100 * from_host:>9.2f}% {100 * single['hit_rate']:>9.2f}% {ratio:>7}", file=out)
    summary = {"benchmark": "prefix-tiered", "trace": name, "requests": len(requests), "block_size": BLOCK,
               "results": results}
    print(json.dumps(summary), file=out)
    return summary


def belady(requests, capacity_tokens):
    """Token hit rate of the offline optimum on the same sequential replay.

    Only full blocks are cached (as in the manager). A child is never used
    without its parent, so its next use is never sooner: evicting the furthest
    next use (deepest first on ties) never strands a child without its parent.
    """
    num_blocks = max(capacity_tokens // BLOCK, 1)
    chains = [(ids[:n // BLOCK], n) for ids, n in requests if -(-n // BLOCK) <= num_blocks]
    uses = defaultdict(list)
    for t, (keys, _) in enumerate(chains):
        for k in keys:
            uses[k].append(t)
    cursor = defaultdict(int)
    never = len(chains)
    cached, depth, current = set(), {}, {}
    heap = []
    hit = total = 0
    for t, (keys, n) in enumerate(chains):
        total += n
        h = 0
        while h < len(keys) and keys[h] in cached:
            current.pop(keys[h], None)
            h += 1
        hit += h * BLOCK
        need = len(keys) - h + (1 if n % BLOCK else 0)
        while num_blocks - len(cached) < need:
            nxt, _, k = heapq.heappop(heap)
            if current.get(k) == -nxt:
                del current[k]
                cached.discard(k)
        for j in range(h, len(keys)):
            cached.add(keys[j])
            depth[keys[j]] = j
        for k in keys:
            u, c = uses[k], cursor[k]
            while c < len(u) and u[c] <= t:
                c += 1
            cursor[k] = c
            nxt = u[c] if c < len(u) else never
            current[k] = nxt
            heapq.heappush(heap, (-nxt, -depth[k], k))
    return {"hit_rate": hit / total if total else 0.0, "hit_tokens": hit, "tokens": total}


def run(requests, capacities=DEFAULT_CAPACITIES, policies=("lru", "arc"), out=None, name="trace"):
    out = out or sys.stdout
    bar = Progress(len(capacities) * (len(policies) + 1), "replays", leave=False)
    results = {}
    for cap in capacities:
        row = {}
        for policy in policies:
            row[policy] = replay(requests, cap, policy)
            bar.update(1)
        row["belady"] = belady(requests, cap)
        bar.update(1)
        results[str(cap)] = row
    bar.close()
    names = list(policies) + ["belady"]
    headers = ["capacity (tokens)"] + [f"{p} hit" for p in names]
    base = policies[0]
    others = [p for p in policies if p != base]
    headers += [f"{p} / {base}" for p in others]
    rows = []
    for cap, row in results.items():
        cells = [f"{int(cap):,}"] + [f"{100 * row[p]['hit_rate']:.2f}%" for p in names]
        for p in others:
            ratio = row[p]["hit_rate"] / row[base]["hit_rate"] if row[base]["hit_rate"] else float("nan")
            cells.append(f"x{ratio:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows + [headers]) for i in range(len(headers))]
    print(f"{name}: {len(requests)} requests, block size {BLOCK}, token ids expanded from hash ids", file=out)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)
    summary = {"benchmark": "prefix", "trace": name, "requests": len(requests), "block_size": BLOCK,
               "results": results}
    print(json.dumps(summary), file=out)
    return summary


def main(argv=None):
    import argparse
    import os
    parser = argparse.ArgumentParser(description="prefix-cache hit rate per eviction policy on a Mooncake trace")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="Mooncake JSONL trace (hash_ids of 512-token blocks)")
    source.add_argument("--synthetic", choices=["agent", "docqa"], help="a generated trace instead")
    parser.add_argument("--capacity-tokens", type=int, nargs="+", default=list(DEFAULT_CAPACITIES))
    parser.add_argument("--policy", nargs="+", default=["lru", "arc"], help="first one is the baseline")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--host-policy", choices=["lru", "arc"], default=None,
                        help="the host tier's policy (default: the same as the pool's)")
    parser.add_argument("--host-capacity-tokens", type=int, nargs="+", default=None,
                        help="a host tier behind each --capacity-tokens (one value for all, or one each): "
                             "compared with one cache of the combined size")
    args = parser.parse_args(argv)
    if any(c < BLOCK for c in args.capacity_tokens):
        parser.error(f"--capacity-tokens must be >= {BLOCK}")
    hosts = args.host_capacity_tokens
    if hosts is not None:
        if len(hosts) == 1:
            hosts = hosts * len(args.capacity_tokens)
        if len(hosts) != len(args.capacity_tokens) or any(h < BLOCK for h in hosts):
            parser.error(f"--host-capacity-tokens: one value, or one per --capacity-tokens, each >= {BLOCK}")
    if args.trace:
        requests, name = load_mooncake(args.trace, args.limit), os.path.basename(args.trace)
    else:
        requests, name = synthetic_trace(args.synthetic, args.limit or 12000), f"synthetic-{args.synthetic}"
    if hosts is not None:
        run_tiered(requests, list(zip(args.capacity_tokens, hosts)), tuple(args.policy), name=name,
                   host_policy=args.host_policy)
    else:
        run(requests, tuple(args.capacity_tokens), tuple(args.policy), name=name)


if __name__ == "__main__":
    main()
