"""Blocks and sequences between caches and processes (rocmforge.transfer) on the
host backend: transfers round-trip exactly, an adopted sequence has the
sender's K/V and prefix keys, a prefix the receiver holds is reused, failures
change nothing, and a sequence prefilled in another process is adopted here."""

import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import rocmforge as rf
from rocmforge.config import CacheConfig
from rocmforge.transfer import PackedSequence, adopt_sequence, pack_sequence, transfer_blocks

ROOT = pathlib.Path(__file__).resolve().parent.parent
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
        a.manager.add_sequence(40, num_tokens=4)
        with pytest.raises(rf.ArgumentValueError, match="token ids"):
            pack_sequence(a, 40)
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
