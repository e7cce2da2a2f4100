"""A prefix-aware router over several cache instances, fed by their KV events alone.

Each instance (an engine, a process, a machine) runs a BlockManager with
``enable_prefix_caching=True, enable_events=True`` and hands its events to the
router: in-process with ``router.apply(instance, manager.take_events())``, or
across processes through ``rocmforge.kv_events`` (ZMQ). The router mirrors
every instance's set of cached block keys, and routes a request to the
instance holding the longest cached prefix of its prompt; among equals, the
least loaded (the load each instance reports with ``set_load``), then the one
caching least, then the one named first. ``max_imbalance`` bounds how far the
load may drift apart.

Keys are a pure function of the token ids, the block size and the salt
(``block_keys``), so the router needs no tokens from the instances. A mirror
counts a block as cached while its key is stored and not removed; the manager
verifies every hit token by token, the mirror trusts the 63-bit keys.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Optional

from rocmforge._core import block_keys
from rocmforge.errors import ArgumentValueError
from rocmforge.events import AllCleared, BlockRemoved, BlockStored

__all__ = ["PrefixRouter", "block_keys"]


class PrefixRouter:
    """Mirrors of several instances' prefix indexes, and routing by longest prefix.

    ``block_size`` is the instances' block size (all must share it). Instances
    are any hashable names, added with ``add_instance`` in preference order.
    ``max_imbalance`` (None: unbounded) keeps the load even: only instances
    whose load is within it of the least loaded one are candidates, so a
    popular prefix cannot pull every request onto one instance.
    """

    def __init__(self, block_size: int, instances: Iterable[Hashable] = (), *,
                 max_imbalance: Optional[float] = None):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ArgumentValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if max_imbalance is not None and not max_imbalance >= 0:
            raise ArgumentValueError(f"max_imbalance must be >= 0 or None, got {max_imbalance!r}")
        self.block_size = block_size
        self.max_imbalance = max_imbalance
        self._keys: Dict[Hashable, Dict[int, set]] = {}       # instance -> key -> tiers holding it
        self._load: Dict[Hashable, float] = {}
        for name in instances:
            self.add_instance(name)

    @property
    def instances(self) -> List[Hashable]:
        return list(self._keys)

    def add_instance(self, name: Hashable) -> None:
        """Start mirroring an instance (with an empty index and load 0)."""
        if name in self._keys:
            raise ArgumentValueError(f"instance {name!r} is already routed to")
        self._keys[name] = {}
        self._load[name] = 0.0

    def remove_instance(self, name: Hashable) -> None:
        """Stop routing to an instance and forget its mirror."""
        self._check(name)
        del self._keys[name], self._load[name]

    def _check(self, name: Hashable) -> None:
        if name not in self._keys:
            raise ArgumentValueError(f"unknown instance {name!r}")

    def apply(self, name: Hashable, events: Iterable) -> None:
        """Apply an instance's events, in the order it recorded them. A block
        counts as cached while either tier (medium "gpu" or "cpu") holds it."""
        self._check(name)
        tiers = self._keys[name]
        for ev in events:
            if isinstance(ev, BlockStored):
                tiers.setdefault(ev.key, set()).add(ev.medium)
            elif isinstance(ev, BlockRemoved):
                held = tiers.get(ev.key)
                if held is not None:
                    held.discard(ev.medium)
                    if not held:
                        del tiers[ev.key]
            elif isinstance(ev, AllCleared):
                tiers.clear()
            else:
                raise ArgumentValueError(f"not a KV event: {ev!r}")

    def set_load(self, name: Hashable, load: float) -> None:
        """The instance's current load (running requests, queued tokens: any
        measure, the same for all); the tiebreak among equal prefixes."""
        self._check(name)
        self._load[name] = float(load)

    def cached_keys(self, name: Hashable, medium: Optional[str] = None) -> frozenset:
        """The keys the router believes the instance holds (in one tier, "gpu"
        or "cpu", or in either)."""
        self._check(name)
        return frozenset(k for k, tiers in self._keys[name].items() if medium is None or medium in tiers)

    def match(self, tokens, salt=None) -> Dict[Hashable, int]:
        """Per instance, the leading tokens of the prompt it holds (whole blocks)."""
        keys = block_keys(tokens, self.block_size, salt).tolist()
        out = {}
        for name, held in self._keys.items():
            n = 0
            while n < len(keys) and keys[n] in held:
                n += 1
            out[name] = n * self.block_size
        return out

    def route(self, tokens, salt=None) -> Optional[Hashable]:
        """The instance to send the prompt to: among the candidates (see
        max_imbalance), the longest cached prefix, then the least load, then
        the smallest cached index (new prefixes spread out), then the first
        added. None when there is no instance."""
        if not self._keys:
            return None
        hits = self.match(tokens, salt)
        names = list(self._keys)
        if self.max_imbalance is not None:
            least = min(self._load.values())
            names = [n for n in names if self._load[n] <= least + self.max_imbalance]
        return min(names, key=lambda name: (-hits[name], self._load[name], len(self._keys[name])))
