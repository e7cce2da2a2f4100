"""`rocmforge replay` end to end: the bundled sample, trace formats, a plot, and a
10,000-request soak on the host backend with invariants checked along the way."""

import json
import os

import numpy as np
import pytest

from rocmforge import cli
from rocmforge.replay import SAMPLE, replay
from rocmforge.traces import TraceRequest, load_trace

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def test_replay_of_the_bundled_sample(capsys, tmp_path):
    args = ["replay", "--limit", "20", "--device", "cpu"]
    if _has_matplotlib():
        args += ["--plot", str(tmp_path / "run.png")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["requests"] == 20 and report["rejected"] == 0 and report["final_blocks_used"] == 0 and report["finished_records"] == 20
    assert report["generated_tokens"] == sum(r.output_len for r in load_trace(SAMPLE, 20))
    assert report["peak_blocks_used"] > 0 and "prefix hit rate" in out
    if _has_matplotlib():
        assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_mooncake_prefixes_are_shared_tokens():
    trace = load_trace(SAMPLE, 2)           # both requests start with hash id 0
    assert np.array_equal(trace[0].prompt[:512], trace[1].prompt[:512])
    assert not np.array_equal(trace[0].prompt[512:1024], trace[1].prompt[512:1024])
    assert len(trace[0].prompt) == 6758 and trace[0].output_len == 500


@pytest.mark.skipif(not os.path.exists(os.path.join(DATA, "AzureLLMInferenceTrace_conv.csv")),
                    reason="../shared/data not present")
def test_azure_csv_trace():
    trace = load_trace(os.path.join(DATA, "AzureLLMInferenceTrace_conv.csv"), 30)
    assert len(trace) == 30 and trace[0].arrival == 0 and len(trace[0].prompt) == 374
    assert all(b.arrival >= a.arrival for a, b in zip(trace, trace[1:]))
    report, _ = replay(trace, num_blocks=4096, progress=False)
    assert report["requests"] == 30 and report["final_blocks_used"] == 0


def test_soak_10000_requests_on_the_host_backend():
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 1000, 48).astype(np.int32) for _ in range(20)]
    trace = []
    for i in range(10_000):
        head = prefixes[int(rng.integers(len(prefixes)))][: int(rng.integers(0, 49))]
        tail = rng.integers(0, 1000, int(rng.integers(1, 24))).astype(np.int32)
        trace.append(TraceRequest(0.0, np.concatenate([head, tail]), int(rng.integers(1, 100))))
    report, timeline = replay(trace, num_blocks=160, check_every=500, progress=False)
    assert report["requests"] == 10_000 and report["rejected"] == 0
    assert report["final_blocks_used"] == 0 and report["finished_records"] == 10_000
    assert report["preemptions"] > 0 and report["prefix_hit_rate"] > 0.2
    assert len(timeline) == report["steps"]


def test_realtime_speed_waits_for_arrivals():
    rng = np.random.default_rng(5)
    trace = [TraceRequest(t, rng.integers(0, 100, 20).astype(np.int32), 3) for t in (0.0, 0.3, 0.6)]
    report, timeline = replay(trace, num_blocks=64, speed="realtime", progress=False)
    assert report["requests"] == 3 and report["final_blocks_used"] == 0
    assert report["wall_s"] >= 0.6 and timeline[-1][0] >= 0.6


def test_replay_with_a_host_tier_reports_its_hits_and_traffic(capsys, tmp_path):
    # four prompt groups in turn (3 shared blocks of 512 tokens, one of their own): a pool
    # of 400 blocks holds about two requests, so repeats must come back from the tier
    trace = tmp_path / "groups.jsonl"
    trace.write_text("\n".join(f'{{"timestamp": {i}, "input_length": 2048, "output_length": 4, '
                               f'"hash_ids": [{10 * (i % 4)}, {10 * (i % 4) + 1}, {10 * (i % 4) + 2}, '
                               f'{1000 + i}]}}' for i in range(60)))
    args = ["replay", str(trace), "--device", "cpu", "--blocks", "400", "--host-memory", "64MiB"]
    if _has_matplotlib():
        args += ["--plot", str(tmp_path / "tiers.png")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["requests"] + report["rejected"] == 60 and report["final_blocks_used"] == 0
    assert report["host_cache_blocks"] > 0 and 0 < report["host_hit_rate"] <= report["prefix_hit_rate"]
    assert report["host_bytes_offloaded"] > 0 and report["host_bytes_reloaded"] > 0
    assert "from the host tier" in out and "host tier traffic" in out
    plain = replay(load_trace(str(trace)), 400, "cpu", progress=False)[0]
    assert report["prefix_hit_rate"] > plain["prefix_hit_rate"] and plain["host_hit_rate"] == 0
    assert report["generated_tokens"] == plain["generated_tokens"]
    for bad, says in (("lots", "--host-memory"), ("1000TiB", "host tier"), ("10", "holds no block")):
        with pytest.raises(SystemExit) as info:
            cli.main(["replay", "--device", "cpu", "--limit", "2", "--host-memory", bad])
        assert info.value.code == 2 and says in capsys.readouterr().err
