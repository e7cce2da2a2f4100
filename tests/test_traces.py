"""Trace parsing (rocmforge.traces) and `rocmforge replay`'s handling of bad input:
every defect is one line naming the file and line, exit status 2, no traceback."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rocmforge import cli, replay
from rocmforge.traces import (HASH_BLOCK, MAX_TOKENS, TraceError, expand_tokens, load_trace, parse_azure_row,
                              parse_mooncake, read_azure, read_mooncake)

GOOD = '{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}'

BAD_MOONCAKE = [
    ("{bad json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2}', "missing field 'hash_ids'"),
    ('{"input_length": 10, "output_length": 2, "hash_ids": [1]}', "missing field 'timestamp'"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 2, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": NaN, "input_length": 10, "output_length": 2, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": "0", "input_length": 10, "output_length": 2, "hash_ids": [1]}', "timestamp must be"),
    ('{"timestamp": 0, "input_length": 0, "output_length": 2, "hash_ids": [1]}', "input_length 0 is outside"),
    ('{"timestamp": 0, "input_length": 10.5, "output_length": 2, "hash_ids": [1]}', "input_length must be an integer"),
    ('{"timestamp": 0, "input_length": true, "output_length": 2, "hash_ids": [1]}', "input_length must be an integer"),
    ('{"timestamp": 0, "input_length": 10, "output_length": -2, "hash_ids": [1]}', "output_length -2 is outside"),
    (f'{{"timestamp": 0, "input_length": 10, "output_length": {MAX_TOKENS + 1}, "hash_ids": [1]}}', "outside"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [-1]}', "hash_ids must be"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1.0]}', "hash_ids must be"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [18446744073709551616]}', "hash_ids"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": "1"}', "hash_ids must be"),
    ('{"timestamp": 0, "input_length": 1000, "output_length": 2, "hash_ids": [1]}',
     "input_length 1000 is longer than its 1 hash_ids cover (512 tokens)"),
    ("[" * 100_000, "invalid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_MOONCAKE, ids=[m for _, m in BAD_MOONCAKE])
def test_a_bad_mooncake_line_names_its_file_line_and_fault(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n\n" + line + "\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)
    assert info.value.line == 3 and isinstance(info.value, ValueError)


def test_good_mooncake_lines_and_their_tokens(tmp_path):
    rec = parse_mooncake(GOOD, 7)
    assert (rec.line, rec.timestamp_ms, rec.input_length, rec.output_length, rec.hash_ids) == (7, 5.0, 600, 3, (1, 2))
    assert parse_mooncake('{"input_length": 3, "hash_ids": [4]}', prompts_only=True).output_length == 0
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"timestamp": 5', '"timestamp": 1') + "\n" + GOOD + "\n")
    trace = load_trace(path, limit=2)
    assert [r.arrival for r in trace] == [0.001, 0.005] and [len(r.prompt) for r in trace] == [600, 600]
    assert np.array_equal(trace[0].prompt, expand_tokens([1, 2], 600))
    assert len(read_mooncake(path)) == 3 and len(read_mooncake(path, limit=1)) == 1
    a = expand_tokens([7, 8], 1000)
    assert a.dtype == np.int32 and len(a) == 1000 and np.array_equal(a[:HASH_BLOCK], expand_tokens([7], 512))


BAD_AZURE = [
    ("a,b\n1,2\n", 1, "missing column 'TIMESTAMP'"),
    ("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.97,5\n", 1, "missing column 'GeneratedTokens'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,5,1\nyesterday,5,1\n", 3,
     "TIMESTAMP 'yesterday' is not a date"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,-5,1\n", 2, "ContextTokens '-5'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,5\n", 2, "GeneratedTokens ''"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,99999999999,1\n", 2, "is outside"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,5\x00,1\n", 2, "is not a non-negative"),
    ('TIMESTAMP,ContextTokens,GeneratedTokens\n"2023-11-16 18:17:03.97,5,1\n', 2, "not a CSV trace"),
]


@pytest.mark.parametrize("text, line, message", BAD_AZURE, ids=[m for _, _, m in BAD_AZURE])
def test_a_bad_azure_row_names_its_file_line_and_fault(tmp_path, text, line, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and message in str(info.value)


def test_azure_rows_and_unreadable_or_empty_traces(tmp_path):
    assert parse_azure_row({"TIMESTAMP": "2023-11-16 18:17:03.9799600", "ContextTokens": "4808",
                            "GeneratedTokens": "10"})[1:] == (4808, 10)
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:04.5,0,0\n2023-11-16 18:17:03.5,7,2\n")
    assert [len(r.prompt) for r in read_azure(path, limit=1)] == [1]             # file order, not sorted
    assert np.array_equal(read_azure(path, seed=3)[1].prompt, read_azure(path, seed=3)[1].prompt)
    trace = load_trace(path)
    assert [r.arrival for r in trace] == [0.0, 1.0] and [len(r.prompt) for r in trace] == [7, 1]
    assert [r.output_len for r in trace] == [2, 1]
    cases = {"missing.jsonl": None, "empty.jsonl": "\n\n", "empty.csv": "TIMESTAMP,ContextTokens,GeneratedTokens\n",
             "binary.jsonl": b"\xff\xfe\x00garbage"}
    for name, content in cases.items():
        p = tmp_path / name
        if isinstance(content, str):
            p.write_text(content)
        elif content is not None:
            p.write_bytes(content)
        with pytest.raises(TraceError, match="cannot read it|no requests|not UTF-8"):
            load_trace(p)
    with pytest.raises(TraceError, match="Is a directory"):
        load_trace(tmp_path)


def run_cli(capsys, *args):
    """rocmforge replay args: (exit status, stdout, stderr)."""
    try:
        status = cli.main(["replay", *args])
    except SystemExit as exc:
        status = exc.code
    out = capsys.readouterr()
    return status, out.out, out.err


def bad_trace(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing trace", "bad JSON", "missing field", "bad CSV", "cover", "blocks 0",
                                  "blocks -3", "limit 0", "memory", "memory 8TiB", "device", "all rejected",
                                  "plot folder"])
def test_replay_reports_bad_input_in_one_line_with_status_2(capsys, tmp_path, monkeypatch, case):
    ran = []
    monkeypatch.setattr(replay, "_run", lambda *a: ran.append(a))      # nothing may start running
    args, want = {
        "missing trace": ([str(tmp_path / "nope.jsonl")], "nope.jsonl: cannot read it: No such file"),
        "bad JSON": ([bad_trace(tmp_path, "a.jsonl", GOOD + "\n{oops\n")], "a.jsonl:2: invalid JSON"),
        "missing field": ([bad_trace(tmp_path, "b.jsonl", '{"timestamp": 1}\n')], "b.jsonl:1: missing field"),
        "bad CSV": ([bad_trace(tmp_path, "c.csv", "x,y\n")], "c.csv:1: missing column 'TIMESTAMP'"),
        "cover": ([bad_trace(tmp_path, "d.jsonl", GOOD.replace("600", "2000"))], "d.jsonl:1: input_length 2000"),
        "blocks 0": (["--blocks", "0"], "argument --blocks: must be >= 1, got 0"),
        "blocks -3": (["--blocks", "-3"], "argument --blocks: must be >= 1, got -3"),
        "limit 0": (["--limit", "0"], "argument --limit: must be >= 1"),
        "memory": (["--memory", "lots"], "--memory: cannot parse 'lots'"),
        "memory 8TiB": (["--memory", "8TiB", "--device", "cpu"], "lower num_blocks or memory_budget"),
        "device": (["--device", "tpu:0"], "device"),
        "all rejected": (["--blocks", "4", "--device", "cpu"], "holds no request of the trace"),
        "plot folder": (["--plot", str(tmp_path / "no" / "x.png")], "no such folder"),
    }[case]
    if case == "plot folder":
        pytest.importorskip("matplotlib")
    status, out, err = run_cli(capsys, *args)
    assert status == 2 and out == "" and not ran
    assert err.startswith("rocmforge replay: error: ") and err.count("\n") == 1 and want in err, err


def test_plot_without_matplotlib_is_refused_before_the_run(capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(replay, "_run", lambda *a: ran.append(a))
    monkeypatch.setitem(sys.modules, "matplotlib", None)               # import matplotlib raises ImportError
    status, out, err = run_cli(capsys, "--plot", "x.png", "--limit", "3")
    assert status == 2 and not ran and err == ("rocmforge replay: error: --plot needs matplotlib: "
                                               "pip install 'rocmforge[plot]'\n")


def test_the_command_line_prints_no_traceback(tmp_path):
    path = bad_trace(tmp_path, "t.jsonl", GOOD + "\n" + '{"timestamp": 0, "input_length": 3, "hash_ids": [1]}\n')
    proc = subprocess.run([sys.executable, "-m", "rocmforge.cli", "replay", path], capture_output=True, text=True,
                          cwd=tmp_path)          # not the source tree, which would shadow the installed package
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"rocmforge replay: error: {path}:2: missing field 'output_length'\n"


def test_rocmforge_commands_document_their_own_options(capsys):
    for command, text in (("bench", "--quick"), ("replay", "--blocks")):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert info.value.code == 0 and out.startswith(f"usage: rocmforge {command} ") and text in out
    for argv, message in (([], "required: COMMAND"), (["nope"], "invalid choice: 'nope'")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_replay_that_runs_ends_with_its_json_line(capsys):
    status, out, err = run_cli(capsys, "--limit", "3", "--device", "cpu")
    report = json.loads(out.strip().splitlines()[-1])
    assert status == 0 and report["requests"] == 3 and report["failed"] == 0 and "Traceback" not in err
