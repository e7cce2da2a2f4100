"""write_kv of token rows that lie apart: the K and V parts of a fused QKV
projection's output and one tensor-parallel rank's heads go in as views,
without a copy, and write what their contiguous copies write. Rows that overlap
(or run backwards) and rows that are not contiguous inside are refused before
anything is written. numpy and torch on the host; torch on the GPU, the
16-byte path and the byte path (a stride that breaks 16-byte alignment) both."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _runtime
from rocmforge.config import CacheConfig

INFO = _runtime.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
HEADS, DIM, Q_HEADS, T = 2, 16, 8, 21


def make(device, dtype="float16"):
    return rf.KvCache(CacheConfig(1, HEADS, DIM, block_size=4, num_blocks=16, dtype=dtype), device)


def fused_qkv(rng, extra=0, dtype=np.float16):
    """[T, q + k + v (+ extra)] rows, and views of their K and V parts as [T, HEADS, DIM]."""
    width = (Q_HEADS + 2 * HEADS) * DIM + extra
    qkv = (rng.standard_normal((T, width)) * 3).astype(dtype)
    k = qkv[:, Q_HEADS * DIM:(Q_HEADS + HEADS) * DIM].reshape(T, HEADS, DIM)
    v = qkv[:, (Q_HEADS + HEADS) * DIM:(Q_HEADS + 2 * HEADS) * DIM].reshape(T, HEADS, DIM)
    assert np.shares_memory(k, qkv) and not k.flags.c_contiguous
    return qkv, k, v


def slots_for(rng):
    slots = rng.permutation(64)[:T].astype(np.int64)
    slots[3] = -1
    return slots


def same_storage(a, b):
    for x, y in ((a.key_cache(0), b.key_cache(0)), (a.value_cache(0), b.value_cache(0))):
        if not np.array_equal(x.to_numpy().view(np.uint8), y.to_numpy().view(np.uint8)):
            return False
    return True


@pytest.mark.parametrize("cache_dtype", ["float16", "float32", "fp8_e4m3"])
@pytest.mark.parametrize("extra", [0, 3])
def test_numpy_views_of_a_fused_projection_write_their_copies(cache_dtype, extra):
    rng = np.random.default_rng(extra)
    _, k, v = fused_qkv(rng, extra)
    slots = slots_for(rng)
    with make("cpu", cache_dtype) as a, make("cpu", cache_dtype) as b:
        a.write_kv(0, k, v, slots)
        b.write_kv(0, k.copy(), v.copy(), slots)
        assert same_storage(a, b) and a.key_cache(0).to_numpy().any()


def test_a_ranks_heads_and_raw_strides_write_their_copies():
    rng = np.random.default_rng(1)
    full = rng.standard_normal((T, 2 * HEADS, DIM)).astype(np.float16)     # two ranks' heads
    part = full[:, HEADS:]                                                  # rank 1's, a view
    slots = slots_for(rng)
    with make("cpu") as a, make("cpu") as b, make("cpu") as c:
        a.write_kv(0, part, -part, slots)
        b.write_kv(0, part.copy(), -part, slots)
        neg = np.ascontiguousarray(-full)
        c.write_kv_raw(0, part.ctypes.data, neg[:, HEADS:].ctypes.data, slots.ctypes.data, T, "float16",
                       key_stride=2 * HEADS * DIM, value_stride=2 * HEADS * DIM)
        assert same_storage(a, b) and same_storage(a, c)


def test_overlapping_backward_and_gappy_rows_are_refused_and_write_nothing():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((T, HEADS, DIM)).astype(np.float16)
    slots = slots_for(rng)
    overlapping = np.lib.stride_tricks.as_strided(rows, (T, HEADS, DIM), (2 * DIM, 2 * DIM, 2))
    broadcast = np.broadcast_to(rows[:1], (T, HEADS, DIM))
    with make("cpu") as c:
        for bad in (rows[::-1], overlapping, broadcast):
            with pytest.raises(rf.ArgumentValueError, match="overlap"):
                c.write_kv(0, bad, rows, slots)
        with pytest.raises(rf.ArgumentValueError, match="contiguous"):
            c.write_kv(0, rows, np.zeros((T, HEADS, 2 * DIM), np.float16)[:, :, ::2], slots)
        for stride in (-HEADS * DIM, 1, HEADS * DIM - 1):
            with pytest.raises(rf.ArgumentValueError, match="stride"):
                c.write_kv_raw(0, rows.ctypes.data, rows.ctypes.data, slots.ctypes.data, T, "float16",
                               key_stride=stride)
        assert not c.key_cache(0).to_numpy().any()


def test_torch_views_on_the_host():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    qkv, _, _ = fused_qkv(rng)
    t = torch.from_numpy(qkv)
    k, v = t[:, Q_HEADS * DIM:(Q_HEADS + HEADS) * DIM].view(T, HEADS, DIM), t[:, -HEADS * DIM:].view(T, HEADS, DIM)
    assert not k.is_contiguous()
    slots = torch.from_numpy(slots_for(rng))
    with make("cpu") as a, make("cpu") as b:
        a.write_kv(0, k, v, slots)
        b.write_kv(0, k.contiguous(), v.contiguous(), slots)
        assert same_storage(a, b)
        with pytest.raises(rf.ArgumentValueError, match="overlap"):
            a.write_kv(0, t.as_strided((T, HEADS, DIM), (DIM, DIM, 1)), v, slots)
        with pytest.raises(rf.ArgumentValueError, match="contiguous"):
            a.write_kv(0, k.transpose(1, 2).contiguous().transpose(1, 2), v, slots)


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16", "fp8_e4m3"])
@pytest.mark.parametrize("extra", [0, 3])       # 3 more elements a token: rows off 16-byte alignment
@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="no GPU")
def test_torch_views_on_the_gpu(cache_dtype, extra):
    try:
        import torch
    except ImportError:
        pytest.fail("the GPU tests of torch interop need torch")
    rng = np.random.default_rng(4)
    qkv, _, _ = fused_qkv(rng, extra)
    t = torch.from_numpy(qkv).cuda()
    k = t[:, Q_HEADS * DIM:(Q_HEADS + HEADS) * DIM].view(T, HEADS, DIM)
    v = t[:, (Q_HEADS + HEADS) * DIM:(Q_HEADS + 2 * HEADS) * DIM].view(T, HEADS, DIM)
    slots = torch.from_numpy(slots_for(rng)).cuda()
    with make(GPU, cache_dtype) as a, make(GPU, cache_dtype) as b, make(GPU, cache_dtype) as c:
        a.write_kv(0, k, v, slots)
        b.write_kv(0, k.contiguous(), v.contiguous(), slots)
        c.write_kv_raw(0, k.data_ptr(), v.data_ptr(), slots.data_ptr(), T, "float16", key_stride=k.stride(0),
                       value_stride=v.stride(0))
        for x in (a, b, c):
            x.synchronize()
        assert same_storage(a, b) and same_storage(a, c) and a.key_cache(0).to_numpy().any()
