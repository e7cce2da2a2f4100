"""Request traces: Mooncake JSONL and Azure LLM inference CSV, parsed and checked.

Mooncake lines are JSON objects with ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids``: one id per 512-token block of the prompt,
equal ids meaning equal blocks. ``expand_tokens`` turns them into token ids
(512 deterministic ids per hash id), so shared prefixes are shared tokens.
Azure CSVs have the columns TIMESTAMP, ContextTokens and GeneratedTokens and no
prefix information; their prompts are random.

Every defect raises TraceError, a ValueError whose message starts with
"path:line:".
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime

import numpy as np

HASH_BLOCK = 512                # tokens per Mooncake hash id
MAX_TOKENS = 1 << 24            # per request and field: longer than any model's context
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_OFFSETS = np.arange(HASH_BLOCK, dtype=np.uint64)


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file and line."""

    def __init__(self, path, line, message):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass
class TraceRequest:
    arrival: float                  # seconds since the trace start
    prompt: np.ndarray              # int32 token ids
    output_len: int


@dataclass(frozen=True)
class MooncakeRecord:
    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple


def expand_tokens(hash_ids, input_length):
    """input_length token ids: block j holds 512 ids derived from hash_ids[j] alone."""
    ids = np.asarray(hash_ids, dtype=np.uint64).reshape(-1, 1) * np.uint64(HASH_BLOCK) + _OFFSETS
    x = ids * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(29)
    return (x.reshape(-1)[:input_length] >> np.uint64(33)).astype(np.int32)


def _count(value, name, lo=0):
    """An integer field (JSON ints only: no bools, no floats) in [lo, MAX_TOKENS]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if not lo <= value <= MAX_TOKENS:
        raise ValueError(f"{name} {value} is outside [{lo}, {MAX_TOKENS}]")
    return value


def parse_mooncake(text, line=0, prompts_only=False):
    """One Mooncake line as a MooncakeRecord; ValueError (the reason) if it is not one.
    prompts_only: timestamp and output_length may be absent (0 then)."""
    try:
        r = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"invalid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(r, dict):
        raise ValueError(f"expected a JSON object, got {type(r).__name__}")
    for name in ("timestamp", "input_length", "output_length", "hash_ids"):
        if name not in r and not (prompts_only and name in ("timestamp", "output_length")):
            raise ValueError(f"missing field {name!r}")
    ts = r.get("timestamp", 0)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"timestamp must be a finite number of ms >= 0, got {json.dumps(ts)[:40]}")
    input_length = _count(r["input_length"], "input_length", lo=1)
    output_length = _count(r.get("output_length", 0), "output_length")
    hash_ids = r["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**63 for h in hash_ids):
        raise ValueError("hash_ids must be a list of integers in [0, 2**63)")
    cover = len(hash_ids) * HASH_BLOCK
    if input_length > cover:
        raise ValueError(f"input_length {input_length} is longer than its {len(hash_ids)} hash_ids "
                         f"cover ({cover} tokens)")
    return MooncakeRecord(line, float(ts), input_length, output_length, tuple(hash_ids))


def _lines(path, limit):
    """(line number, text) of the non-blank lines, up to limit of them."""
    taken = 0
    try:
        with open(path, encoding="utf-8") as f:
            number = 0
            try:
                for number, text in enumerate(f, 1):
                    if limit is not None and taken >= limit:
                        return
                    if text.strip():
                        taken += 1
                        yield number, text
            except UnicodeDecodeError:
                raise TraceError(path, number + 1, "not UTF-8 text") from None
    except OSError as exc:
        raise TraceError(path, 0, f"cannot read it: {exc.strerror or exc}") from None


def read_mooncake(path, limit=None, prompts_only=False):
    """The MooncakeRecords of a JSONL trace, in file order (at most limit)."""
    out = []
    for number, text in _lines(path, limit):
        try:
            out.append(parse_mooncake(text, number, prompts_only))
        except ValueError as exc:
            raise TraceError(path, number, str(exc)) from None
    return out


def parse_azure_row(row):
    """(timestamp s, context tokens, generated tokens) of one Azure CSV row (a dict)."""
    stamp = row.get("TIMESTAMP") or ""
    try:
        t = datetime.fromisoformat(stamp.strip()[:26]).timestamp()
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"TIMESTAMP {stamp[:40]!r} is not a date and time") from None
    counts = []
    for name in AZURE_COLUMNS[1:]:
        text = (row.get(name) or "").strip()
        if not text.isdigit():
            raise ValueError(f"{name} {text[:40]!r} is not a non-negative integer")
        counts.append(_count(int(text), name))
    return t, counts[0], counts[1]


def read_azure(path, limit=None, seed=0):
    """TraceRequests of an Azure CSV trace with random prompts (at most limit),
    arrivals counted from the earliest."""
    rng = np.random.default_rng(seed)
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, strict=True)
            try:
                missing = [c for c in AZURE_COLUMNS if c not in (reader.fieldnames or ())]
                if missing:
                    raise TraceError(path, 1, f"missing column {missing[0]!r}: the header must name "
                                              f"{', '.join(AZURE_COLUMNS)}")
                for row in reader:
                    if limit is not None and len(out) >= limit:
                        break
                    try:
                        t, context, generated = parse_azure_row(row)
                    except ValueError as exc:
                        raise TraceError(path, reader.line_num, str(exc)) from None
                    out.append(TraceRequest(t, rng.integers(0, 50000, max(1, context)).astype(np.int32),
                                            max(1, generated)))
            except (csv.Error, UnicodeDecodeError) as exc:
                raise TraceError(path, reader.line_num + 1, f"not a CSV trace: {exc}") from None
    except OSError as exc:
        raise TraceError(path, 0, f"cannot read it: {exc.strerror or exc}") from None
    start = min((r.arrival for r in out), default=0.0)
    for r in out:
        r.arrival -= start
    return out


def load_trace(path, limit=None):
    """TraceRequests from a Mooncake JSONL or (by its .csv name) an Azure CSV trace,
    in arrival order. Raises TraceError for a trace that is missing, malformed
    or empty."""
    path = str(path)
    if path.endswith(".csv"):
        out = read_azure(path, limit)
    else:
        out = [TraceRequest(r.timestamp_ms / 1000.0, expand_tokens(r.hash_ids, r.input_length),
                            max(1, r.output_length)) for r in read_mooncake(path, limit)]
    if not out:
        raise TraceError(path, 0, "no requests")
    out.sort(key=lambda r: r.arrival)
    return out
