"""The GPU K/V kernels against the host kernels, byte for byte (device only)."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _kernels as host
from rocmforge import _runtime

ON_GPU = _runtime.backend_info()["backend"] in ("hip", "cuda")
gpu = pytest.mark.skipif(not ON_GPU, reason="no GPU runtime with a device")


def test_gpu_kernels_need_a_gpu_backend():
    if ON_GPU:
        pytest.skip("a GPU backend is loaded")
    with pytest.raises(rf.DeviceError, match="GPU backend"):
        _runtime.DeviceKernels()


def upload(arr):
    buf = _runtime.DeviceBuffer(arr.nbytes)
    buf.copy_from_host(np.ascontiguousarray(arr))
    return buf


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("heads, head_dim, dtype", [(8, 128, np.float16), (2, 3, np.float32), (1, 1, np.float16)])
@pytest.mark.parametrize("T", [0, 1, 37, 256])
def test_write_kv_rows_matches_host(heads, head_dim, dtype, T):
    kern = _runtime.DeviceKernels()
    rng = np.random.default_rng(T)
    nb, bs = 40, 16
    kc = rng.standard_normal((nb, bs, heads, head_dim)).astype(dtype)
    vc = rng.standard_normal((nb, bs, heads, head_dim)).astype(dtype)
    k = rng.standard_normal((T, heads, head_dim)).astype(dtype)
    v = rng.standard_normal((T, heads, head_dim)).astype(dtype)
    slots = rng.permutation(nb * bs)[:T].astype(np.int64)
    slots[rng.random(T) < 0.1] = -1
    dk, dv, dkc, dvc = upload(k), upload(v), upload(kc), upload(vc)
    row = heads * head_dim * k.itemsize
    kern.write_kv(dkc, dvc, dk, dv, slots, row)
    host.write_kv(kc, vc, k, v, slots)
    assert np.array_equal(dkc.to_host(), kc.view(np.uint8).reshape(-1))
    assert np.array_equal(dvc.to_host(), vc.view(np.uint8).reshape(-1))


@gpu
@pytest.mark.gpu
def test_copy_blocks_and_gather_match_host():
    kern = _runtime.DeviceKernels()
    rng = np.random.default_rng(1)
    caches = [rng.standard_normal((64, 16, 8, 128)).astype(np.float16) for _ in range(4)]
    bufs = [upload(c) for c in caches]
    pairs = np.stack([np.arange(0, 20), np.arange(40, 60)], axis=1).astype(np.int32)
    block_bytes = caches[0][0].nbytes
    kern.copy_blocks(bufs, pairs, block_bytes)
    host.copy_blocks(caches, pairs)
    for b, c in zip(bufs, caches):
        assert np.array_equal(b.to_host(), c.view(np.uint8).reshape(-1))
    table = rng.permutation(64).astype(np.int32)[:10]
    for n in (0, 1, 16, 150):
        out = _runtime.DeviceBuffer(max(n, 1) * 8 * 128 * 2)
        kern.gather(out, bufs[0], table, n, 16, 8 * 128 * 2)
        want = host.gather_kv(caches[0], table, n)
        assert np.array_equal(out.to_host()[: want.nbytes], want.view(np.uint8).reshape(-1))


@gpu
@pytest.mark.gpu
def test_kernel_arguments_are_checked_before_launch():
    kern = _runtime.DeviceKernels()
    cache = _runtime.DeviceBuffer(1024)
    rows = _runtime.DeviceBuffer(64)
    with pytest.raises(rf.ArgumentValueError, match="slot"):
        kern.write_kv(cache, cache, rows, rows, np.array([0, 32], dtype=np.int64), 32)
    with pytest.raises(rf.ArgumentValueError, match="block"):
        kern.copy_blocks([cache], np.array([[0, 8]], dtype=np.int32), 128)
    with pytest.raises(rf.ArgumentValueError, match="chain"):
        kern.copy_blocks([cache], np.array([[0, 1], [1, 2]], dtype=np.int32), 128)
    with pytest.raises(rf.ArgumentValueError, match="block"):
        kern.gather(rows, cache, np.array([32], dtype=np.int32), 1, 1, 32)   # 32 blocks of 32 bytes
