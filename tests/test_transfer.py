"""Blocks and sequences between caches and processes (rocmforge.transfer) on the
host backend: transfers round-trip exactly, an adopted sequence has the
sender's K/V and prefix keys, a prefix the receiver holds is reused, failures
change nothing, and a sequence prefilled in another process is adopted here."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import DeviceArray
from rocmforge.config import CacheConfig
from rocmforge.errors import ArgumentValueError, BlockNotFound
from rocmforge.transfer import (PackedSequence, adopt_sequence, copy_device_blocks, pack_blocks, pack_sequence,
                                transfer_blocks)

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFO = rf.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
CFG = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="bfloat16")


def cache(num_blocks=16, **kw):
    return rf.KvCache(CacheConfig(num_blocks=num_blocks, **{**CFG, **kw}), "cpu", enable_prefix_caching=True,
                      enable_events=True)


def prefill(c, seq_id, tokens, seed, salt=None):
    """Add a sequence and write K/V of its own (a function of seed) for its uncached tokens."""
    slots = c.manager.add_sequence(seq_id, tokens, salt=salt)
    start = c.manager.num_cached_tokens(seq_id)
    rng = np.random.default_rng(seed)
    for layer in range(c.num_layers):
        k = rng.standard_normal((len(tokens), 2, 8)).astype(np.float32)
        c.write_kv(layer, k[start:], -k[start:], slots[start:])
    return slots


def kv(c, seq_id):
    return [[a.to_numpy() for a in c.gather(seq_id, layer)] for layer in range(c.num_layers)]


def test_transfer_blocks_copies_every_layer_exactly():
    with cache() as a, cache() as b:
        prefill(a, 0, list(range(10)), seed=1)
        src = a.manager.block_table(0)
        b.manager.add_sequence(5, num_tokens=10)
        dst = b.manager.block_table(5)
        transfer_blocks(a, src, b, dst)
        for (ka, va), (kb, vb) in zip(kv(a, 0), kv(b, 5)):
            assert np.array_equal(ka, kb) and np.array_equal(va, vb)
        with pytest.raises(rf.ArgumentValueError):
            transfer_blocks(a, src, b, dst[:1])
        with pytest.raises(rf.BlockNotFound):
            transfer_blocks(a, [99], b, [0])
        with cache(head_dim=16) as other, pytest.raises(rf.ArgumentValueError, match="differ"):
            transfer_blocks(a, src, other, dst)


def test_an_adopted_sequence_has_the_senders_kv_and_prefix_keys():
    tokens = list(range(100, 114))
    with cache() as a, cache() as b:
        prefill(a, 7, tokens, seed=2, salt="tenant")
        stored_a = [e.key for e in a.manager.take_events() if isinstance(e, rf.BlockStored)]
        packed = PackedSequence.from_bytes(pack_sequence(a, 7).to_bytes())     # as if sent
        slots = adopt_sequence(b, 3, packed)
        assert len(slots) == len(tokens)
        stored_b = [e.key for e in b.manager.take_events() if isinstance(e, rf.BlockStored)]
        assert stored_b == stored_a and len(stored_a) == 3                     # the same keys
        assert b.manager.lookup_prefix(tokens + [0], salt="tenant") == 12 == a.manager.lookup_prefix(
            tokens + [0], salt="tenant")
        assert b.manager.lookup_prefix(tokens + [0]) == 0                    # the salt came along
        for (ka, va), (kb, vb) in zip(kv(a, 7), kv(b, 3)):
            assert np.array_equal(ka, kb) and np.array_equal(va, vb)
        b.manager.append(3, [5])                                             # and decoding goes on
        b.manager.check_invariants()


def test_adoption_reuses_the_prefix_the_receiver_holds_and_is_all_or_nothing():
    shared = list(range(8))
    with cache() as a, cache(num_blocks=6) as b:
        prefill(a, 0, shared + [50, 51, 52, 53, 54], seed=3)
        prefill(b, 9, shared + [1], seed=3)                  # b computed the same prefix itself
        b.manager.remove_sequence(9)
        before = [x.copy() for x in kv(a, 0)[0]]
        adopt_sequence(b, 1, pack_sequence(a, 0))
        assert b.manager.num_cached_tokens(1) == 8           # two blocks reused, not copied
        assert np.array_equal(kv(b, 1)[0][0], before[0])
        packed = pack_sequence(a, 0)
        with pytest.raises(rf.SequenceExists):
            adopt_sequence(b, 1, packed)
        prefill(a, 5, list(range(200, 213)), seed=5)
        with pytest.raises(rf.OutOfBlocks):                  # 4 blocks held, 2 free: 4 needed
            adopt_sequence(b, 2, pack_sequence(a, 5))
        assert 2 not in b.manager and b.manager.num_used_blocks == 4
        bad = PackedSequence(packed.tokens, packed.salt_key, packed.geometry, packed.blocks[:, :2].copy())
        with pytest.raises(rf.ArgumentValueError):
            adopt_sequence(b, 2, bad)
        for junk in (b"", b"\x05\x00\x00\x00{}", packed.to_bytes() + b"x"):
            with pytest.raises(rf.ArgumentValueError):
                PackedSequence.from_bytes(junk)
        good = {"salt_key": 7, "geometry": [2, 2, 8, 4, "bfloat16"], "num_tokens": 0, "blocks": [4, 0, 256]}
        for field, value in (("blocks", [1e300]), ("blocks", [4, -1, 256]), ("blocks", [2**40, 2**40, 2**40]),
                             ("salt_key", 1.5), ("salt_key", True), ("salt_key", 2**63), ("num_tokens", -1),
                             ("geometry", {"layers": 2})):
            header = json.dumps({**good, field: value}).encode()
            with pytest.raises(rf.ArgumentValueError, match="not a packed sequence"):
                PackedSequence.from_bytes(len(header).to_bytes(4, "little") + header)
        header = json.dumps(good).encode()
        assert PackedSequence.from_bytes(len(header).to_bytes(4, "little") + header).salt_key == 7
        a.manager.add_sequence(40, num_tokens=4)
        with pytest.raises(rf.ArgumentValueError, match="token ids"):
            pack_sequence(a, 40)
        b.manager.check_invariants()


def test_an_adoption_interrupted_while_its_kv_goes_in_leaves_nothing_cached_without_it(monkeypatch):
    """adopt_sequence adds the sequence (its full blocks enter the prefix cache)
    before the packed K/V goes in: interrupted in between, it must not leave
    those blocks cached, or the next prompt with those tokens would read them.
    Its prefix hits and other prompts stay cached."""
    import rocmforge.transfer as transfer
    tokens, other = list(range(300, 313)), list(range(300, 304)) + [5] * 9   # (same length, same K/V draws)
    with cache() as a, cache() as b:
        prefill(a, 0, tokens, seed=7)
        packed = pack_sequence(a, 0)
        prefill(b, 0, other, seed=7)                # the same first block, the same K/V for it
        b.manager.remove_sequence(0)

        def interrupted(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(transfer, "unpack_blocks", interrupted)
        with pytest.raises(KeyboardInterrupt):
            adopt_sequence(b, 1, packed)
        monkeypatch.undo()
        assert 1 not in b.manager and b.manager.num_used_blocks == 0
        assert b.manager.lookup_prefix(tokens) == 4 and b.manager.lookup_prefix(other) == 12
        adopt_sequence(b, 1, packed)
        assert all(np.array_equal(x, y) for p, q in zip(kv(a, 0), kv(b, 1)) for x, y in zip(p, q))
        b.manager.check_invariants()


PREFILL = textwrap.dedent("""
    import sys
    import numpy as np
    import rocmforge as rf
    from rocmforge.config import CacheConfig
    from rocmforge.transfer import pack_sequence
    c = rf.KvCache(CacheConfig(2, 2, 8, block_size=4, num_blocks=16, dtype="bfloat16"), "cpu",
                   enable_prefix_caching=True)
    tokens = list(range(30, 47))
    slots = c.manager.add_sequence(0, tokens, salt=b"s")
    rng = np.random.default_rng(4)
    for layer in range(2):
        k = rng.standard_normal((len(tokens), 2, 8)).astype(np.float32)
        c.write_kv(layer, k, -k, slots)
    sys.stdout.buffer.write(pack_sequence(c, 0).to_bytes())
""")


def test_a_sequence_prefilled_in_another_process_is_adopted_here():
    out = subprocess.run([sys.executable, "-c", PREFILL], capture_output=True, cwd=ROOT / "tests", timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    packed = PackedSequence.from_bytes(out.stdout)
    with cache() as b:
        adopt_sequence(b, 0, packed)
        tokens = list(range(30, 47))
        assert b.manager.lookup_prefix(tokens, salt=b"s") == 16
        rng = np.random.default_rng(4)
        for layer in range(2):
            k = rng.standard_normal((len(tokens), 2, 8)).astype(np.float32)
            got_k, got_v = kv(b, 0)[layer]
            want = (k.view(np.uint32).astype(np.uint64) + 0x7FFF + ((k.view(np.uint32) >> 16) & 1)) >> 16
            assert np.array_equal(got_k, want.astype(np.uint16))        # bfloat16 bits, rounded to nearest even
            assert np.array_equal(got_v, (want.astype(np.uint16) ^ 0x8000))


DISAGGREGATE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import torch.distributed as dist
    import rocmforge as rf
    from rocmforge.config import CacheConfig
    from rocmforge.transfer import adopt_sequence, pack_sequence, recv_packed, send_packed
    rank, out, backend = int(os.environ["RANK"]), sys.argv[1], sys.argv[2]
    device = "cpu" if backend == "gloo" else f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=2)
    c = rf.KvCache(CacheConfig(2, 2, 8, block_size=4, num_blocks=16, dtype="float16"), device,
                   enable_prefix_caching=True, enable_events=True)
    tokens = list(range(60, 79))
    if rank == 0:                                   # prefill, then send
        slots = c.manager.add_sequence(0, tokens, salt="t")
        rng = np.random.default_rng(6)
        for layer in range(2):
            k = rng.standard_normal((len(tokens), 2, 8)).astype(np.float16)
            c.write_kv(layer, k, k * 2, slots)
        send_packed(pack_sequence(c, 0), 1, device=device)
    else:
        adopt_sequence(c, 9, recv_packed(0, device=device))
    sid = 0 if rank == 0 else 9
    keys = [e.key for e in c.manager.take_events() if isinstance(e, rf.BlockStored)]
    c.manager.append(sid, [1])                      # decoding goes on in either process
    kv = [a.to_numpy() for layer in range(2) for a in c.gather(sid, layer)]
    np.savez(f"{out}/rank{rank}.npz", keys=np.array(keys, dtype=np.int64), *[a[:len(tokens)] for a in kv])
    dist.destroy_process_group()
""")


def _two_gpus():
    try:
        import torch
        return torch.cuda.device_count() >= 2
    except ImportError:
        return False


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _two_gpus(), reason="NCCL between processes needs two GPUs")])])
def test_a_sequence_moves_between_processes_over_torch_distributed(tmp_path, backend):
    """gloo between CPU processes carries the same messages (a length, then the bytes)
    as NCCL between GPU processes (caches on GPUs 0 and 1)."""
    pytest.importorskip("torch.distributed")
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", DISAGGREGATE, str(tmp_path), backend], env={**env, "RANK": str(r)},
                              cwd=ROOT / "tests", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    a, b = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    assert np.array_equal(a["keys"], b["keys"]) and len(a["keys"]) == 4          # the same prefix-cache keys
    for i in range(4):
        assert np.array_equal(a[f"arr_{i}"], b[f"arr_{i}"])                      # the same K/V, every layer


def _on(c, arr):
    """arr (float32 numpy) where cache c can read it."""
    if c.device == "cpu":
        return arr
    buf = rf.DeviceBuffer(arr.nbytes, int(c.device.split(":")[1]))
    buf.copy_from_host(np.ascontiguousarray(arr))
    return DeviceArray(buf, arr.shape, "float32")


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no GPU")
@pytest.mark.parametrize("src_dev, dst_dev", [("gpu", "gpu"), ("cpu", "gpu"), ("gpu", "cpu")])
def test_transfer_blocks_between_a_gpu_and_any_cache(src_dev, dst_dev):
    devices = {"gpu": GPU, "cpu": "cpu"}
    cfg = CacheConfig(num_blocks=16, **CFG)
    with rf.KvCache(cfg, devices[src_dev]) as a, rf.KvCache(cfg, devices[dst_dev]) as b:
        slots = a.manager.add_sequence(0, num_tokens=10)
        rng = np.random.default_rng(3)
        for layer in range(a.num_layers):
            k = rng.standard_normal((10, 2, 8)).astype(np.float32)
            a.write_kv(layer, _on(a, k), _on(a, -k), slots)
        b.manager.add_sequence(5, num_tokens=10)
        transfer_blocks(a, a.manager.block_table(0), b, b.manager.block_table(5))
        for (ka, va), (kb, vb) in zip(kv(a, 0), kv(b, 5)):
            assert np.array_equal(ka, kb) and np.array_equal(va, vb)
        a.synchronize()
        b.synchronize()


def test_copy_device_blocks_takes_gpu_caches_only_and_no_destination_twice():
    with rf.KvCache(CacheConfig(num_blocks=8, **CFG), "cpu") as a, rf.KvCache(CacheConfig(num_blocks=8, **CFG),
                                                                                "cpu") as b:
        with pytest.raises(ArgumentValueError, match="GPUs"):
            copy_device_blocks(a, [0], b, [0])
        with pytest.raises(ArgumentValueError, match="twice"):
            transfer_blocks(a, [0, 1], b, [3, 3])


def _second_gpu():
    return f"{INFO['backend']}:1" if len(INFO["devices"]) > 1 else GPU


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no GPU")
@pytest.mark.parametrize("where", ["same GPU", "next GPU", "same cache"])
def test_peer_copies_move_runs_and_scattered_blocks_exactly(where):
    """Blocks in order, scattered, and (within one cache) moved onto each other:
    every byte of every layer arrives, and bad ids change nothing. (One GPU reaches
    the other's memory here, so a copy kernel serves the first two; blocks moved
    onto each other go through staging.)"""
    cfg = CacheConfig(num_blocks=64, **CFG)
    with rf.KvCache(cfg, GPU) as a, rf.KvCache(cfg, _second_gpu() if where == "next GPU" else GPU) as other:
        b = a if where == "same cache" else other
        slots = a.manager.add_sequence(0, num_tokens=32 * 4)      # blocks 0-31 of a hold data
        rng = np.random.default_rng(5)
        for layer in range(a.num_layers):
            k = rng.standard_normal((len(slots), 2, 8)).astype(np.float32)
            a.write_kv(layer, _on(a, k), _on(a, k * 3), slots)
        src = np.arange(32, dtype=np.int32)
        cases = [(src[:8], np.arange(40, 48, dtype=np.int32)),                  # one run
                 (rng.permutation(src)[:20], 32 + rng.permutation(32)[:20].astype(np.int32))]   # scattered
        if where == "same cache":
            cases.append((src[:8], src[4:12]))                                  # onto each other
        for s, d in cases:
            want = pack_blocks(a, s)
            copy_device_blocks(a, s, b, d)
            assert np.array_equal(pack_blocks(b, d), want)
        before = pack_blocks(b, np.arange(64, dtype=np.int32))
        with pytest.raises(BlockNotFound):
            copy_device_blocks(a, [0, 1], b, [2, 64])
        with pytest.raises(ArgumentValueError, match="destinations"):
            copy_device_blocks(a, [0, 1], b, [2])
        with pytest.raises(ArgumentValueError, match="twice"):
            copy_device_blocks(a, [0, 1], b, [2, 2])
        assert np.array_equal(pack_blocks(b, np.arange(64, dtype=np.int32)), before)
