"""The benchmark runs end to end and reports what it measured (no timing is asserted)."""

import io
import json

import numpy as np
import pytest

import rocmforge as rf
from rocmforge.bench_allocator import run
from rocmforge.cli import main


def test_quick_benchmark_prints_a_table_then_json():
    buf = io.StringIO()
    summary = run(reps=1, quick=True, thread_counts=(1, 2), out=buf)
    lines = buf.getvalue().strip().splitlines()
    assert lines[0].startswith("benchmark")
    assert json.loads(lines[-1]) == summary
    for name in ("alloc_free_single", "alloc_free_batch", "decode_sim", "prefix_touch"):
        assert summary["results"][name]["median"] > 0
    assert set(summary["results"]["threads"]) == {"python_1", "python_2", "capi_1", "capi_2", "mixed"}
    assert summary["results"]["threads"]["mixed"]["decoders"] == 1


def test_c_api_loops_report_failures():
    """The C API loops check every status and raise the manager's errors."""
    from rocmforge import BlockManager, _bench_capi
    with pytest.raises(rf.OutOfBlocks):
        _bench_capi.alloc_free_batch(BlockManager(16, 4), 3, 32)
    m = BlockManager(64, 4, enable_prefix_caching=True)
    with pytest.raises(RuntimeError, match="0 of 2 blocks were cached"):
        _bench_capi.prefix_touch(m, np.zeros((1, 8), dtype=np.int32), 1)
    m = BlockManager(64, 4)
    with pytest.raises(rf.SequenceNotFound):
        _bench_capi.decode_sim(m, np.array([5], dtype=np.int64), np.array([3], dtype=np.int64),
                               np.array([4], dtype=np.int64), 1, 6)
    m.add_sequence(5)
    ids, left = np.array([5], dtype=np.int64), np.array([2], dtype=np.int64)
    assert _bench_capi.decode_sim(m, ids, left, np.array([4], dtype=np.int64), 3, 6) > 0
    assert ids.tolist() == [6] and left.tolist() == [3] and m.num_tokens(6) == 1
    m.check_invariants()


def test_cli_bench(capsys):
    assert main(["bench", "--quick", "--reps", "1", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quick"] is True


# --- bench_prefix --------------------------------------------------------------

import os  # noqa: E402
from collections import OrderedDict  # noqa: E402


from rocmforge import bench_prefix, traces  # noqa: E402

TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "conversation_trace.jsonl")


def plain_lru(requests, capacity_tokens):
    """An independent block-level LRU (vLLM order) over hash ids: the real replay must agree."""
    bs = bench_prefix.BLOCK
    num_blocks = capacity_tokens // bs
    cached, queue = set(), OrderedDict()
    hit = total = 0
    for ids, n in requests:
        keys = ids[:n // bs]
        total += n
        h = 0
        while h < len(keys) and keys[h] in cached:
            queue.pop(keys[h], None)
            h += 1
        hit += h * bs
        need = len(keys) - h + (1 if n % bs else 0)
        while num_blocks - len(cached) < need:
            cached.discard(queue.popitem(last=False)[0])
        cached.update(keys[h:])
        for k in reversed(keys):
            queue[k] = None
    return hit / total


def test_prefix_bench_on_a_tiny_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [([1, 2, 3], 1500), ([1, 2, 4], 1100), ([1, 2, 3, 5], 2048), ([9], 100), ([1, 2], 1024)]
    trace.write_text("\n".join(
        f'{{"timestamp": {i}, "input_length": {n}, "output_length": 1, "hash_ids": {ids}}}'
        for i, (ids, n) in enumerate(rows)))
    requests = bench_prefix.load_mooncake(str(trace))
    buf = io.StringIO()
    summary = bench_prefix.run(requests, capacities=(2048, 100_000), out=buf, name="tiny")
    assert json.loads(buf.getvalue().strip().splitlines()[-1]) == summary
    big = summary["results"]["100000"]
    # Unlimited room: requests 2, 3 and 5 each hit blocks 1, 2 (block 3 was partial
    # in request 1, so it was not cached then).
    assert big["lru"]["hit_tokens"] == big["arc"]["hit_tokens"] == big["belady"]["hit_tokens"] == 6 * 512
    for cap in ("2048", "100000"):
        assert summary["results"][cap]["lru"]["hit_rate"] == pytest.approx(plain_lru(requests, int(cap)))


def test_expanded_tokens_are_deterministic_and_distinct():
    a = traces.expand_tokens([7, 8], 1000)
    assert a.dtype == np.int32 and len(a) == 1000
    assert (a == traces.expand_tokens([7, 8], 1000)).all()
    assert (a[:512] == traces.expand_tokens([7, 9], 600)[:512]).all()
    assert not (a[512:600] == traces.expand_tokens([7, 9], 600)[512:]).all()


@pytest.mark.skipif(not os.path.exists(TRACE), reason="../shared/data not present")
def test_prefix_bench_on_the_conversation_trace():
    requests = bench_prefix.load_mooncake(TRACE, limit=2000)
    summary = bench_prefix.run(requests, capacities=(200_000, 1_000_000), out=io.StringIO())
    for cap, row in summary["results"].items():
        assert row["lru"]["hit_rate"] == pytest.approx(plain_lru(requests, int(cap)))
        assert row["belady"]["hit_rate"] >= max(row["lru"]["hit_rate"], row["arc"]["hit_rate"])
        assert row["lru"]["hit_rate"] > 0


@pytest.mark.parametrize("kind", ["agent", "docqa"])
def test_synthetic_traces_have_their_sharing_structure(kind):
    requests = bench_prefix.synthetic_trace(kind, num_requests=400, seed=3)
    assert len(requests) == 400 and requests == bench_prefix.synthetic_trace(kind, 400, seed=3)
    assert requests != bench_prefix.synthetic_trace(kind, 400, seed=4)
    for ids, n in requests:
        assert (len(ids) - 1) * bench_prefix.BLOCK < n <= len(ids) * bench_prefix.BLOCK
    firsts = [ids[0] for ids, _ in requests]
    assert len(set(firsts)) < len(firsts) // 2            # prompts share their leading blocks
    lengths = [len(ids) for ids, _ in requests]
    if kind == "docqa":
        assert min(lengths) >= 9 and max(lengths) <= 66   # a 8-64 block document + a 1-2 block question
    with pytest.raises(ValueError, match="unknown synthetic trace"):
        bench_prefix.synthetic_trace("chat")


def test_prefix_bench_main_prints_a_table_then_json(capsys, tmp_path):
    bench_prefix.main(["--synthetic", "docqa", "--limit", "300", "--capacity-tokens", "100000", "400000"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert lines[0].startswith("synthetic-docqa: 300 requests") and summary["requests"] == 300
    assert set(summary["results"]) == {"100000", "400000"}
    assert set(summary["results"]["100000"]) == {"lru", "arc", "belady"}
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"input_length": 600, "hash_ids": [1, 2]}\n{"input_length": 700, "hash_ids": [1, 3]}\n')
    bench_prefix.main(["--trace", str(trace), "--capacity-tokens", "5000", "--policy", "arc"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["results"]["5000"]["arc"]["hit_tokens"] == 512
    with pytest.raises(SystemExit):
        bench_prefix.main(["--synthetic", "agent", "--capacity-tokens", "100"])


def test_router_bench_keeps_each_prefix_group_on_one_instance(tmp_path, capsys):
    from rocmforge import bench_router
    trace = tmp_path / "groups.jsonl"
    # three groups of prompts in turn, each a 2-block stem (1,024 tokens) and a block of
    # its own; an instance holds two stems, so round-robin (every group on both) thrashes
    lines = [f'{{"timestamp": {i}, "input_length": 1536, "output_length": 1, '
             f'"hash_ids": [{10 * (i % 3)}, {10 * (i % 3) + 1}, {1000 + i}]}}' for i in range(48)]
    trace.write_text("\n".join(lines))
    assert bench_router.main(["--trace", str(trace), "--blocks", "200", "--steps-per-arrival", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    rr, prefix = summary["results"]
    assert rr["mode"] == "round-robin" and prefix["mode"] == "prefix"
    for res in (rr, prefix):
        assert sum(r["requests"] for r in res["instances"]) == 48 - res["rejected"] == 48
    assert prefix["hit_rate"] > rr["hit_rate"] + 0.4
    assert prefix["balance"] <= 1.4
