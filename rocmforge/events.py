"""KV events: what a cache-aware router needs to mirror a manager's prefix index.

``BlockManager(..., enable_prefix_caching=True, enable_events=True)`` records
one event per change of its prefix index; ``take_events()`` returns them in
order. Keys are the 63-bit content keys of full blocks (a pure function of the
parent's key, the salt and the block's token ids, identical in every process).
``medium`` says which tier changed: "gpu" for the cache's own pool (on the
host backend too), "cpu" for the host tier (``host_cache_blocks``). A block may
be in both; AllCleared empties both.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class BlockStored:
    """A full block entered the prefix index."""

    key: int
    parent_key: Optional[int]   # None for the first block of a chain
    num_tokens: int
    medium: str = "gpu"         # "gpu": the cache's own pool; "cpu": the host tier


@dataclass(frozen=True)
class BlockRemoved:
    """A block left the prefix index (evicted, or its parent was)."""

    key: int
    medium: str = "gpu"


@dataclass(frozen=True)
class AllCleared:
    """Every entry left the prefix index (reset_prefix_cache)."""


__all__ = ["AllCleared", "BlockRemoved", "BlockStored"]
