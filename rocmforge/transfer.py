"""Moving K/V blocks between caches and processes, and handing a prefilled
sequence from one cache to another (prefill/decode disaggregation).

- ``transfer_blocks(src, src_block_ids, dst, dst_block_ids)`` copies every
  layer's K and V of those blocks from one KvCache to another of the same
  geometry (layers, kv heads, head_dim, block_size, dtype). Between two GPU
  caches of this process (one GPU or two) no host memory is used
  (``copy_device_blocks``: one copy kernel where one GPU can reach the other's
  memory, else the runtime's peer copies); otherwise the blocks go through a
  packed host array.
- ``pack_sequence(cache, seq_id)`` gives a ``PackedSequence``: its token ids,
  its salt's key and its blocks' K/V in one host array. ``to_bytes()`` and
  ``PackedSequence.from_bytes()`` carry it through any transport (a
  ``torch.distributed`` send of a uint8 tensor, a socket, a file).
- ``adopt_sequence(cache, seq_id, packed)`` re-creates it in another cache: a
  new sequence with those tokens and that salt, so its blocks get the same
  prefix-cache keys; blocks the cache already holds for that prefix are
  reused, the others are filled from the packed K/V. All or nothing.

- ``send_packed(packed, dst)`` / ``recv_packed(src)`` carry a PackedSequence
  between processes through ``torch.distributed`` point-to-point messages (a
  length, then the bytes): gloo between CPU processes, NCCL with ``device``
  set to each rank's GPU. torch is needed for these two only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from rocmforge._ids import repeats
from rocmforge._transfer import copy_device_blocks, pack_blocks, unpack_blocks
from rocmforge.errors import ArgumentValueError

__all__ = ["PackedSequence", "adopt_sequence", "copy_device_blocks", "pack_blocks", "pack_sequence", "recv_packed", "send_packed",
           "transfer_blocks", "unpack_blocks"]


def _geometry(cache) -> tuple:
    """What two caches must share for their blocks to move between them."""
    cfg = cache.config
    return (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.block_size, cfg.dtype)


def _same_geometry(a, b) -> None:
    if a != b:
        raise ArgumentValueError(f"the caches differ (layers, kv heads, head_dim, block_size, dtype): {a} vs {b}")


def transfer_blocks(src, src_block_ids, dst, dst_block_ids) -> None:
    """Copy blocks src_block_ids of src over dst_block_ids of dst, pairwise, every layer
    (no destination twice)."""
    _same_geometry(_geometry(src), _geometry(dst))
    if len(src_block_ids) != len(dst_block_ids):
        raise ArgumentValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destinations")
    if src.device != "cpu" and dst.device != "cpu":
        copy_device_blocks(src, src_block_ids, dst, dst_block_ids)      # checks the ids itself
        return
    if repeats(np.asarray(dst_block_ids)):
        raise ArgumentValueError("dst_block_ids names a block twice")
    unpack_blocks(dst, dst_block_ids, pack_blocks(src, src_block_ids))


@dataclass(frozen=True)
class PackedSequence:
    """A sequence's tokens, salt key and K/V, ready to move (see the module)."""

    tokens: np.ndarray          # int32 token ids
    salt_key: int               # the 64-bit digest of its salt (0 for none)
    geometry: tuple             # (layers, kv heads, head_dim, block_size, dtype) of its cache
    blocks: np.ndarray          # uint8 [2 * layers, num_blocks, block_bytes]

    def to_bytes(self) -> bytes:
        """One byte string: a length-prefixed JSON header, the tokens, the blocks."""
        header = json.dumps({"salt_key": self.salt_key, "geometry": list(self.geometry),
                             "num_tokens": len(self.tokens), "blocks": list(self.blocks.shape)}).encode()
        return struct.pack("<I", len(header)) + header + self.tokens.tobytes() + self.blocks.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PackedSequence":
        """The PackedSequence to_bytes() wrote; ArgumentValueError if data is not one."""
        try:
            (n,) = struct.unpack_from("<I", data)
            header = json.loads(data[4:4 + n])
            num_tokens, shape, salt_key, geometry = (header[k] for k in ("num_tokens", "blocks", "salt_key",
                                                                         "geometry"))
            if not (_count(num_tokens) and isinstance(shape, list) and len(shape) == 3 and all(map(_count, shape))
                    and type(salt_key) is int and -(2**63) <= salt_key < 2**63 and isinstance(geometry, list)):
                raise ValueError(f"a header of the wrong form: {header}")
            at = 4 + n
            tokens = np.frombuffer(data, np.int32, num_tokens, at).copy()
            at += tokens.nbytes
            blocks = np.frombuffer(data, np.uint8, math.prod(shape), at).reshape(shape).copy()
            if at + blocks.nbytes != len(data):
                raise ValueError("trailing bytes")
            return cls(tokens, salt_key, tuple(geometry), blocks)
        except (struct.error, ValueError, KeyError, TypeError, OverflowError) as exc:
            raise ArgumentValueError(f"not a packed sequence: {exc}") from None


def _count(x) -> bool:
    """Whether x is a count in a packed sequence's header: an int, 0 to 2**62."""
    return type(x) is int and 0 <= x <= 2**62


def pack_sequence(cache, seq_id) -> PackedSequence:
    """Sequence seq_id of cache (created with its token ids) as a PackedSequence."""
    tokens = cache.manager.sequence_tokens(seq_id)
    if tokens is None:
        raise ArgumentValueError(f"sequence {seq_id} was created without token ids: nothing to key it by")
    info = cache.manager.sequence_info(seq_id)
    return PackedSequence(np.ascontiguousarray(tokens, dtype=np.int32), info["salt_key"], _geometry(cache),
                          pack_blocks(cache, cache.manager.block_table(seq_id)))


def adopt_sequence(cache, seq_id, packed: PackedSequence) -> np.ndarray:
    """Re-create a packed sequence in cache as seq_id: its tokens and salt (so the
    same prefix-cache keys), cached blocks reused, the rest filled from the
    packed K/V. Returns the slots of its tokens, as add_sequence does. Raises
    (OutOfBlocks, SequenceExists, ...) with nothing changed; interrupted while
    the K/V goes in, it takes the new blocks, cached before their K/V arrived,
    out of the prefix cache (uncache_blocks) as it removes the sequence."""
    _same_geometry(_geometry(cache), tuple(packed.geometry))
    bs = cache.config.block_size
    need = -(-len(packed.tokens) // bs)
    if packed.blocks.shape[1] != need:
        raise ArgumentValueError(f"{len(packed.tokens)} tokens need {need} blocks, the packed K/V has "
                                 f"{packed.blocks.shape[1]}")
    m = cache.manager
    slots = m.add_sequence(seq_id, packed.tokens, _salt_key=packed.salt_key)
    have = m.num_cached_tokens(seq_id) // bs
    fresh = m.block_table(seq_id)[have:]
    try:
        unpack_blocks(cache, fresh, np.ascontiguousarray(packed.blocks[:, have:]))
    except BaseException:
        try:
            if m.enable_prefix_caching:
                m.uncache_blocks(fresh)
        finally:
            m.remove_sequence(seq_id)
        raise
    return slots


def send_packed(packed: PackedSequence, dst: int, group=None, device="cpu") -> None:
    """Send a PackedSequence to rank dst of the initialized torch.distributed
    process group: its byte length (int64), then its bytes (uint8), both on
    ``device`` ("cpu" for gloo, the rank's GPU for NCCL)."""
    import torch
    import torch.distributed as dist
    data = packed.to_bytes()
    dist.send(torch.tensor([len(data)], dtype=torch.int64, device=device), dst, group=group)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), dst, group=group)


def recv_packed(src: int, group=None, device="cpu") -> PackedSequence:
    """Receive the PackedSequence rank src sends with send_packed."""
    import torch
    import torch.distributed as dist
    size = torch.empty(1, dtype=torch.int64, device=device)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, src, group=group)
    return PackedSequence.from_bytes(payload.cpu().numpy().tobytes())
