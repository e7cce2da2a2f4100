# cython: language_level=3, boundscheck=False, wraparound=False
"""TensorParallelKvCache: one BlockManager, its K/V storage split by kv heads
across several KvCaches (ranks), each on its own device. Block ids, tables
and slots are the same on every rank; every copy the manager queues
(copy-on-write, host tier) reaches every rank, in order; swap, compaction and
grow change the manager once and every rank's storage with it."""

import threading

import numpy as np

from rocmforge._core cimport BlockManager
from rocmforge._kvcache cimport KvCache, compact_ranks, drop_swapped_ids, swap_in_ranks, swap_out_ranks
from rocmforge._kvcache import _distinct_ids
from rocmforge.config import CacheConfig, host_tier_blocks
from rocmforge.errors import ArgumentTypeError, ArgumentValueError, InvalidConfiguration


class _Fanout:
    """Hands each rank its share of the manager's pending copies: whichever rank
    asks first takes the queue and files it for all; each rank then applies its
    own file in order. Called with the asking rank's lock held; takes only its
    own lock, so ranks never wait on each other here."""

    def __init__(self, manager):
        self._manager = manager
        self._lock = threading.Lock()
        self._files = {}                # id(rank) -> list of pair arrays not yet applied there

    def add(self, rank):
        self._files[id(rank)] = []

    def __call__(self, KvCache rank):
        cdef BlockManager m = self._manager
        with self._lock:
            if m.c_has_pending_copies():
                pairs = m.take_pending_copies()
                if len(pairs):
                    for f in self._files.values():
                        f.append(pairs)
            mine = self._files[id(rank)]
            if not mine:
                return None
            self._files[id(rank)] = []
        return mine[0] if len(mine) == 1 else np.concatenate(mine)


cdef class _AllLocks:
    """Every rank's lock, taken in rank order (one order, so no deadlock), for a
    call that changes the manager and every rank's storage together."""
    cdef list ranks
    cdef int held

    def __cinit__(self, list ranks):
        self.ranks = ranks
        self.held = 0

    def __enter__(self):
        cdef KvCache r
        for r in self.ranks:
            r._lock.acquire()
            self.held += 1
        return self

    def __exit__(self, *exc):
        cdef KvCache r
        cdef int i
        for i in range(self.held - 1, -1, -1):
            r = self.ranks[i]
            r._lock.release()
        self.held = 0


class TensorParallelKvCache:
    """A paged KV cache split by kv heads across devices (tensor parallelism).

    ``devices`` is a list of devices, one per rank ("cpu" for all of them
    simulates several ranks in host memory); ``config.num_kv_heads`` must
    divide among them. Rank r holds kv heads [r * H / n, (r + 1) * H / n) of
    every block in ``ranks[r]``, a KvCache whose ``manager`` is this cache's
    ``manager``. Write and read through the ranks (``ranks[r].write_kv``,
    ``ranks[r].key_cache``, ``paged_decode(q_r, ranks[r], ...)``): they take
    and give that rank's heads. Pending copies reach every rank before its next
    write or read. Swap, compaction and grow go through this object, which
    applies them to the manager once and to every rank.

    ``host_cache`` (bytes for all ranks together) gives the prefix cache a host
    tier; each rank keeps its heads' share. ``manager_options`` go to the
    BlockManager. A context manager; close() closes every rank."""

    def __init__(self, config, devices, *, k_scale=1.0, v_scale=1.0, host_cache=None, **manager_options):
        if not isinstance(config, CacheConfig):
            raise ArgumentTypeError(f"config must be a rocmforge.config.CacheConfig, got {type(config).__name__}")
        if isinstance(devices, str) or not hasattr(devices, "__len__") or len(devices) == 0:
            raise ArgumentTypeError("devices must be a non-empty list, one device per rank")
        n = len(devices)
        if config.num_kv_heads % n:
            raise InvalidConfiguration(f"{config.num_kv_heads} kv heads do not divide among {n} ranks")
        if host_cache is not None:
            if "host_cache_blocks" in manager_options:
                raise ArgumentValueError("give host_cache (bytes) or host_cache_blocks, not both")
            manager_options["host_cache_blocks"] = host_tier_blocks(host_cache, config.bytes_per_block)
        self.config = config
        self.manager = BlockManager(config.num_blocks, config.block_size, **manager_options)
        rank_config = CacheConfig(config.num_layers, config.num_kv_heads // n, config.head_dim,
                                  block_size=config.block_size, num_blocks=config.num_blocks, dtype=config.dtype)
        ranks = []
        self._fanout = _Fanout(self.manager)
        self._swapped = {}              # seq_id -> ([per rank packed host K/V], num_tokens, tokens, salt_key)
        try:
            for dev in devices:
                rank = KvCache(rank_config, dev, k_scale=k_scale, v_scale=v_scale,
                               _rank_of=(self.manager, self._fanout))
                self._fanout.add(rank)
                ranks.append(rank)
        except BaseException:
            for rank in ranks:
                rank.close()
            raise
        self.ranks = tuple(ranks)

    # ---- the whole cache -------------------------------------------------------------------------

    @property
    def num_ranks(self):
        return len(self.ranks)

    def heads(self, rank):
        """The kv heads rank ``rank`` holds, as a range."""
        per = self.config.num_kv_heads // len(self.ranks)
        return range(rank * per, (rank + 1) * per)

    @property
    def closed(self):
        return all(r.closed for r in self.ranks)

    def _live(self):
        if any(r.closed for r in self.ranks):
            raise ArgumentValueError("the TensorParallelKvCache is closed")

    def close(self):
        for r in self.ranks:
            r.close()
        self._swapped = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"TensorParallelKvCache({len(self.ranks)} ranks: {', '.join(r.device for r in self.ranks)})"

    @property
    def num_blocks(self):
        return self.ranks[0].num_blocks

    def stats(self):
        """The manager's stats() plus the bytes its host-tier copies move (all ranks)."""
        out = self.manager.stats()
        out["host_bytes_offloaded"] = out["host_offloaded_blocks"] * self.config.bytes_per_block
        out["host_bytes_reloaded"] = out["host_reloaded_blocks"] * self.config.bytes_per_block
        return out

    def apply_pending_copies(self, stream=None):
        """Apply the pending copies on every rank now (each rank's writes and reads do it anyway)."""
        for r in self.ranks:
            r.apply_pending_copies(stream)

    def copy_blocks(self, pairs, stream=None):
        """copy_blocks(pairs) on every rank, in rank order. Host pairs are checked by
        the first rank before it copies anything, so bad pairs change no rank."""
        self._live()
        for r in self.ranks:
            r.copy_blocks(pairs, stream)

    def synchronize(self):
        """synchronize() on every rank (the first rank's error is raised after all have run)."""
        errors = []
        for r in self.ranks:
            try:
                r.synchronize()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def gather(self, seq_id, layer):
        """A sequence's keys and values of one layer with every rank's heads, as two
        host numpy arrays [num_tokens, num_kv_heads, head_dim] (storage dtype)."""
        self._live()
        keys, values = [], []
        for r in self.ranks:
            k, v = r.gather(seq_id, layer)
            keys.append(k.to_numpy())
            values.append(v.to_numpy())
        return np.concatenate(keys, axis=1), np.concatenate(values, axis=1)

    # ---- calls that change the manager and every rank --------------------------------------------

    def swap_out(self, seq_ids):
        """Move sequences' K/V (every rank's) to host memory and release their blocks.
        All named sequences must exist; nothing changes otherwise."""
        self._live()
        ids = _distinct_ids(seq_ids)
        with _AllLocks(list(self.ranks)):
            swap_out_ranks(list(self.ranks), self.manager, self._swapped, ids)

    def swap_in(self, seq_ids):
        """Bring swapped-out sequences back on every rank (a cached prefix is reused).
        All or nothing: OutOfBlocks leaves them swapped out."""
        self._live()
        ids = _distinct_ids(seq_ids)
        with _AllLocks(list(self.ranks)):
            swap_in_ranks(list(self.ranks), self.manager, self._swapped, ids)

    def drop_swapped(self, seq_ids):
        """Forget swapped-out sequences (their host copies are freed)."""
        ids = _distinct_ids(seq_ids)
        with _AllLocks(list(self.ranks)):
            drop_swapped_ids(self._swapped, ids)

    def swapped_sequences(self):
        """Ids of the sequences swapped out to host memory."""
        with _AllLocks(list(self.ranks)):
            return sorted(self._swapped)

    def compact(self, shrink=False):
        """Compact the manager and move every rank's K/V with it (see KvCache.compact:
        all or nothing, every rank's smaller storage allocated first); returns
        the (old, new) moves."""
        self._live()
        ranks = list(self.ranks)
        with _AllLocks(ranks):
            return compact_ranks(ranks, self.manager, shrink)

    def grow(self, num_blocks):
        """Enlarge the pool and every rank's storage to num_blocks (new blocks are zeroed).
        If a rank cannot allocate, the pool keeps its size (ranks that grew keep
        storage the pool does not use)."""
        cdef KvCache r
        self._live()
        if isinstance(num_blocks, bool) or not hasattr(num_blocks, "__index__"):
            raise ArgumentTypeError("num_blocks must be an int")
        n = num_blocks.__index__()
        ranks = list(self.ranks)
        with _AllLocks(ranks):
            for r in ranks:
                r._check_open()
            if n < self.manager.num_blocks:
                raise InvalidConfiguration(f"grow to {n} < num_blocks={self.manager.num_blocks}: use compact()")
            for r in ranks:
                if n > r._num_blocks:
                    r._allocate(n, r._buffers)
            self.manager.grow(n)

