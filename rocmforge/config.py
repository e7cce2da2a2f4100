"""Cache geometry and memory sizing: how many blocks a model's KV cache needs or fits.

Every size is checked: a value outside its field's range, or a product that
would not fit in a signed 64-bit byte count, raises InvalidConfiguration
naming the field.
"""

from __future__ import annotations

import enum
import re
from fractions import Fraction
from dataclasses import dataclass, field

from rocmforge.errors import ArgumentTypeError, InvalidConfiguration

INT64_MAX = 2**63 - 1
MAX_BLOCKS = 2**31 - 1
MAX_BLOCK_SIZE = 1 << 20

#: Bytes per element of each supported cache dtype.
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
}
#: Quantized dtypes keep one float32 scale for K and one for V per layer.
QUANTIZED = {"int8", "fp8_e4m3", "fp8_e5m2"}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name="memory_budget") -> int:
    """An int byte count, or a string such as "2GiB", "512 MB", "1.5gb"."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a byte count, got bool")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise InvalidConfiguration(f"{name}: cannot parse {value!r} (e.g. '2GiB', '512MB')")
        size = int(Fraction(match.group(1)) * _UNITS[match.group(2).lower()])   # exact: no float overflow
    else:
        raise ArgumentTypeError(f"{name} must be an int or a string like '2GiB', got {type(value).__name__}")
    if not 1 <= size <= INT64_MAX:
        raise InvalidConfiguration(f"{name} must be in [1, 2**63), got {size}")
    return size


def host_memory_available() -> int | None:
    """Bytes of host memory this process can still take: the kernel's MemAvailable,
    lowered to the room left under a cgroup (container) limit; None where unknown."""
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None

    avail = None
    text = read("/proc/meminfo")
    if text:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
        avail = int(match.group(1)) * 1024 if match else None
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = read(limit_path), read(usage_path)
        if limit and usage and limit.strip().isdigit() and usage.strip().isdigit():
            room = max(0, int(limit) - int(usage))
            if int(limit) < 2**60:
                avail = room if avail is None else min(avail, room)
            break
    return avail


def host_tier_blocks(host_cache, bytes_per_block: int) -> int:
    """Blocks of bytes_per_block a host tier of host_cache bytes (an int or a string
    like "16GiB") holds: InvalidConfiguration if none, MemoryError if the host
    has not that much memory free."""
    blocks = parse_bytes(host_cache, "host_cache") // bytes_per_block
    if blocks < 1:
        raise InvalidConfiguration(f"host_cache={host_cache!r} holds no block of {format_bytes(bytes_per_block)}")
    need, free = blocks * bytes_per_block, host_memory_available()
    if free is not None and need > free:
        raise MemoryError(f"the host tier needs {format_bytes(need)} of host memory, and "
                          f"{format_bytes(free)} is free: lower host_cache")
    return blocks


def format_bytes(n: int) -> str:
    """A byte count in binary units, e.g. '1.50 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _int_field(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidConfiguration(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


class CachePreset(enum.Enum):
    """Typical model shapes (num_layers, num_kv_heads, head_dim); CUSTOM takes them from you."""

    SMALL = (16, 8, 64)      # about a 1B-parameter model with grouped-query attention
    MEDIUM = (32, 8, 128)    # about an 8B model (Llama-3-8B shape)
    LARGE = (80, 8, 128)     # about a 70B model (Llama-3-70B shape)
    CUSTOM = None


@dataclass(frozen=True)
class CacheConfig:
    """Shape of a paged KV cache.

    Give ``num_blocks`` or ``memory_budget`` (bytes or a string like "2GiB"):
    with only a budget, ``num_blocks`` is as many blocks as fit in it; with
    both, the blocks must fit in the budget.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    num_blocks: int | None = None
    dtype: str = "float16"
    memory_budget: int | str | None = None
    bytes_per_token: int = field(init=False)
    bytes_per_block: int = field(init=False)

    def __post_init__(self):
        _int_field("num_layers", self.num_layers, 1, 4096)
        _int_field("num_kv_heads", self.num_kv_heads, 1, 4096)
        _int_field("head_dim", self.head_dim, 1, 65536)
        _int_field("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        if self.dtype not in DTYPE_BYTES:
            raise InvalidConfiguration(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        per_token = 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]
        per_block = per_token * self.block_size
        object.__setattr__(self, "bytes_per_token", per_token)
        object.__setattr__(self, "bytes_per_block", per_block)
        budget = None
        if self.memory_budget is not None:
            budget = parse_bytes(self.memory_budget)
            object.__setattr__(self, "memory_budget", budget)
        if self.num_blocks is None:
            if budget is None:
                raise InvalidConfiguration("give num_blocks or memory_budget")
            fit = (budget - self._scale_bytes()) // per_block
            if fit < 1:
                raise InvalidConfiguration(
                    f"memory_budget of {format_bytes(budget)} holds no block of {format_bytes(per_block)}")
            object.__setattr__(self, "num_blocks", min(fit, MAX_BLOCKS))
        _int_field("num_blocks", self.num_blocks, 1, MAX_BLOCKS)
        total = self.estimated_memory_bytes()
        if total > INT64_MAX:
            raise InvalidConfiguration(f"num_blocks: {self.num_blocks} blocks need {total} bytes, over 2**63")
        if budget is not None and total > budget:
            raise InvalidConfiguration(
                f"num_blocks: {self.num_blocks} blocks need {format_bytes(total)}, "
                f"over the memory_budget of {format_bytes(budget)}")

    def _scale_bytes(self) -> int:
        return 2 * self.num_layers * 4 if self.dtype in QUANTIZED else 0

    @classmethod
    def from_preset(cls, preset: CachePreset | str, **overrides) -> CacheConfig:
        """A config for a preset shape; keyword arguments override or (CUSTOM) supply fields."""
        if isinstance(preset, str):
            try:
                preset = CachePreset[preset.upper()]
            except KeyError:
                raise InvalidConfiguration(
                    f"unknown preset {preset!r}; one of {[p.name for p in CachePreset]}") from None
        if not isinstance(preset, CachePreset):
            raise ArgumentTypeError(f"preset must be a CachePreset or its name, got {type(preset).__name__}")
        if preset.value is not None:
            layers, heads, dim = preset.value
            overrides.setdefault("num_layers", layers)
            overrides.setdefault("num_kv_heads", heads)
            overrides.setdefault("head_dim", dim)
        missing = {"num_layers", "num_kv_heads", "head_dim"} - overrides.keys()
        if missing:
            raise InvalidConfiguration(f"CUSTOM preset needs {sorted(missing)}")
        return cls(**overrides)

    @classmethod
    def for_context_length(cls, target_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int,
                           block_size: int = 16, dtype: str = "float16",
                           memory_budget: int | str | None = None) -> CacheConfig:
        """The smallest config that holds ``target_tokens`` tokens (within the budget, if given)."""
        _int_field("target_tokens", target_tokens, 1, MAX_BLOCKS * MAX_BLOCK_SIZE)
        _int_field("block_size", block_size, 1, MAX_BLOCK_SIZE)
        blocks = -(-target_tokens // block_size)
        if blocks > MAX_BLOCKS:
            raise InvalidConfiguration(f"target_tokens: {target_tokens} tokens need over {MAX_BLOCKS} blocks")
        return cls(num_layers, num_kv_heads, head_dim, block_size=block_size, num_blocks=blocks,
                   dtype=dtype, memory_budget=memory_budget)

    def estimated_memory_bytes(self) -> int:
        """Bytes of K and V storage for all blocks (plus per-layer scales for quantized dtypes)."""
        return self.num_blocks * self.bytes_per_block + self._scale_bytes()

    def estimated_memory_human(self) -> str:
        return format_bytes(self.estimated_memory_bytes())

    def max_context_length(self) -> int:
        """Tokens the whole pool holds: the longest single sequence possible."""
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class MemoryProfile:
    """Where the cache's memory goes, read from a live manager at one moment."""

    total_bytes: int
    used_bytes: int
    free_bytes: int
    metadata_bytes: int
    bytes_per_token: int
    fragmentation: float
    memory_efficiency: float
    num_blocks: int
    used_blocks: int

    @classmethod
    def from_manager(cls, manager, config: CacheConfig) -> MemoryProfile:
        if manager.block_size != config.block_size:
            raise InvalidConfiguration(
                f"block_size: manager has {manager.block_size}, config has {config.block_size}")
        used = manager.num_used_blocks
        per_block = config.bytes_per_block
        return cls(
            total_bytes=manager.num_blocks * per_block,
            used_bytes=used * per_block,
            free_bytes=(manager.num_blocks - used) * per_block,
            metadata_bytes=manager.metadata_bytes(),
            bytes_per_token=config.bytes_per_token,
            fragmentation=manager.fragmentation_ratio(),
            memory_efficiency=manager.memory_efficiency(),
            num_blocks=manager.num_blocks,
            used_blocks=used,
        )

    def report(self) -> str:
        """A short human-readable table."""
        share = self.used_blocks / self.num_blocks if self.num_blocks else 0.0
        rows = [
            ("KV storage", format_bytes(self.total_bytes)),
            ("used", f"{format_bytes(self.used_bytes)} ({share:.1%}, {self.used_blocks}/{self.num_blocks} blocks)"),
            ("free", format_bytes(self.free_bytes)),
            ("metadata (host)", format_bytes(self.metadata_bytes)),
            ("bytes per token", str(self.bytes_per_token)),
            ("fragmentation", f"{self.fragmentation:.1%}"),
            ("slot efficiency", f"{self.memory_efficiency:.1%}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["CacheConfig", "CachePreset", "MemoryProfile", "DTYPE_BYTES", "parse_bytes", "format_bytes"]
