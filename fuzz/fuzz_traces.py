"""Fuzz target: the trace parsers (rocmforge.traces) on arbitrary bytes.

The first byte picks the format: a Mooncake JSONL file or an Azure CSV file
(at most four requests are built from it, since an Azure row may ask for 16M
random tokens). The only exception allowed is TraceError, with a message that
names the file; whatever parses must make sense: int32 prompts no longer than
MAX_TOKENS, arrivals in order and never negative (Azure's from zero), at least
one output token.

    python fuzz/fuzz_traces.py [libFuzzer flags] [CORPUS_DIR]     # tools/fuzz.sh runs it
"""

import io
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["rocmforge"]):
    from rocmforge.traces import MAX_TOKENS, TraceError, load_trace, parse_mooncake

FOLDER = tempfile.mkdtemp(prefix="rocmforge-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
PATHS = [os.path.join(FOLDER, "trace.jsonl"), os.path.join(FOLDER, "trace.csv")]


def one_input(data: bytes) -> None:
    if not data:
        return
    path = PATHS[data[0] & 1]
    with open(path, "wb") as f:
        f.write(data[1:])
    try:
        trace = load_trace(path, limit=4)
    except TraceError as exc:
        assert str(exc).startswith(path), exc
        return
    assert 1 <= len(trace) <= 4 and trace[0].arrival >= 0.0
    if path.endswith(".csv"):
        assert trace[0].arrival == 0.0              # Azure arrivals count from the earliest
    for a, b in zip(trace, trace[1:]):
        assert a.arrival <= b.arrival
    for r in trace:
        assert r.prompt.dtype.name == "int32" and 1 <= len(r.prompt) <= MAX_TOKENS and r.output_len >= 1
    if path.endswith(".jsonl") and len(trace) == 1:     # the file's one request, parsed from its line
        text = next(line for line in io.StringIO(data[1:].decode("utf-8"), newline=None) if line.strip())
        assert parse_mooncake(text).input_length == len(trace[0].prompt)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
