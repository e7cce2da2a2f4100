"""Fuzz target: cache configuration and size strings (rocmforge.config).

parse_bytes on arbitrary text, and CacheConfig / CacheConfig.from_preset /
CacheConfig.for_context_length on fields drawn from the input (integers at the
edges of their types, strings, floats, None). The only exceptions allowed are
rocmforge's typed errors (InvalidConfiguration, ArgumentTypeError, ...), and a
config that builds must be consistent: its sizes multiply out and fit in
2**63 bytes and in its memory_budget.

    python fuzz/fuzz_config.py [libFuzzer flags] [CORPUS_DIR]     # tools/fuzz.sh runs it
"""

import sys

import atheris

with atheris.instrument_imports(include=["rocmforge"]):
    from rocmforge.config import DTYPE_BYTES, CacheConfig, format_bytes, parse_bytes
    from rocmforge.errors import KvCacheError

EDGES = [0, 1, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63), 4096, 4097, 65536, 1 << 20]


def value(fdp):
    """A field value: mostly integers (edges and arbitrary), sometimes another type."""
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind < 4:
        return fdp.PickValueInList(EDGES)
    if kind < 7:
        return fdp.ConsumeIntInRange(-(2**40), 2**40)
    return fdp.PickValueInList([None, 1.5, float("nan"), "16", True, b"x", [], fdp.ConsumeUnicode(8)])


def size(fdp):
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return None
    if kind == 1:
        return value(fdp)
    return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 24))


def check(cfg):
    assert cfg.bytes_per_block == cfg.bytes_per_token * cfg.block_size
    assert cfg.bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES[cfg.dtype]
    assert 1 <= cfg.num_blocks <= 2**31 - 1 and cfg.estimated_memory_bytes() < 2**63
    if cfg.memory_budget is not None:
        assert cfg.estimated_memory_bytes() <= cfg.memory_budget
    assert cfg.max_context_length() == cfg.num_blocks * cfg.block_size
    format_bytes(cfg.estimated_memory_bytes())


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 400))
    try:
        n = parse_bytes(text)
        assert isinstance(n, int) and 1 <= n < 2**63
    except KvCacheError:
        pass
    dtype = fdp.PickValueInList(sorted(DTYPE_BYTES) + ["float64", "", None])
    how = fdp.ConsumeIntInRange(0, 2)
    try:
        if how == 0:
            cfg = CacheConfig(value(fdp), value(fdp), value(fdp), block_size=value(fdp), num_blocks=size(fdp),
                              dtype=dtype, memory_budget=size(fdp))
        elif how == 1:
            cfg = CacheConfig.from_preset(fdp.PickValueInList(["small", "MEDIUM", "large", "custom", "huge", 3]),
                                          block_size=value(fdp), num_blocks=value(fdp), dtype=dtype)
        else:
            cfg = CacheConfig.for_context_length(value(fdp), value(fdp), value(fdp), value(fdp),
                                                 block_size=value(fdp), dtype=dtype, memory_budget=size(fdp))
    except KvCacheError:
        return
    check(cfg)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
