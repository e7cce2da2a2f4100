"""The benchmark runs end to end and reports what it measured (no timing is asserted)."""

import io
import json

from rocmforge.bench_allocator import run
from rocmforge.cli import main


def test_quick_benchmark_prints_a_table_then_json():
    buf = io.StringIO()
    summary = run(reps=1, quick=True, thread_counts=(1, 2), out=buf)
    lines = buf.getvalue().strip().splitlines()
    assert lines[0].startswith("benchmark")
    assert json.loads(lines[-1]) == summary
    for name in ("alloc_free_single", "alloc_free_batch", "decode_sim"):
        assert summary["results"][name]["median"] > 0
    assert set(summary["results"]["threads"]) == {"1", "2"}


def test_cli_bench(capsys):
    assert main(["bench", "--quick", "--reps", "1", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quick"] is True
