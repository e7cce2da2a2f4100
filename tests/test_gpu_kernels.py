"""The GPU data path on the device machine: torch arrays in and out through
DLPack, bfloat16 inputs, streams, device-side slot checks, and memory that
comes back after many caches and sequences. (tests/test_kvcache.py runs its
kernel comparisons on the GPU too.) Skipped without a GPU."""

import os

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _kernels as K
from rocmforge import _runtime
from rocmforge._dlpack import DeviceArray
from rocmforge.config import CacheConfig

INFO = _runtime.backend_info()
ON_GPU = INFO["backend"] in ("hip", "cuda") and bool(INFO["devices"])
gpu = pytest.mark.skipif(not ON_GPU, reason="no GPU runtime with a device")
DEVICE = f"{INFO['backend']}:0"


def test_gpu_kernels_need_a_gpu_backend():
    if ON_GPU:
        pytest.skip("a GPU backend is loaded")
    with pytest.raises(rf.DeviceError, match="GPU backend"):
        _runtime.DeviceKernels()


def cache(dtype="float16", heads=8, head_dim=128, num_blocks=64, **kw):
    return rf.KvCache(CacheConfig(2, heads, head_dim, block_size=16, num_blocks=num_blocks, dtype=dtype), DEVICE, **kw)


def free_memory():
    return _runtime.backend_info()["devices"][0]["free_memory"]


@gpu
@pytest.mark.gpu
def test_a_bad_code_object_reports_the_loader():
    with pytest.raises(rf.DeviceError, match="loading the given code object") as info:
        _runtime.DeviceKernels(0, image=b"\x7fELF not really a code object" + bytes(64))
    assert info.value.runtime_code


def need_torch():
    """torch, for a test of torch interop. These tests run only on a GPU machine,
    where a missing torch is a failure: the suite must not pass by skipping."""
    try:
        import torch
    except ImportError:
        pytest.fail("torch is not installed: the GPU tests of torch interop need it")
    return torch


def device_array(host, dtype):
    """A DeviceArray on GPU 0 holding host's bytes (rocmforge's own buffers, no torch)."""
    buf = rf.DeviceBuffer(host.nbytes, 0)
    buf.copy_from_host(np.ascontiguousarray(host))
    return DeviceArray(buf, host.shape, dtype)


def bf16_bits(x):
    """bfloat16 bit patterns of float32 values, rounded to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def reference_write(cache_dtype, bits_k, bits_v, slots):
    storage = K.DTYPES[cache_dtype][1]
    ref_k = np.zeros((64, 16, 8, 128), dtype=storage)
    ref_v = np.zeros_like(ref_k)
    K.write_kv(ref_k, ref_v, bits_k, bits_v, slots, dtype="bfloat16", cache_dtype=cache_dtype,
               k_scale=0.25, v_scale=0.5)
    return ref_k, ref_v


def bf16_inputs(T=300):
    rng = np.random.default_rng(0)
    bits_k = bf16_bits((rng.standard_normal((T, 8, 128)) * 30).astype(np.float32))
    bits_v = bits_k ^ np.uint16(0x8000)                                    # -k
    slots = rng.permutation(64 * 16)[:T].astype(np.int64)
    slots[::7] = -1
    return bits_k, bits_v, slots


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16", "fp8_e4m3", "int8"])
def test_bfloat16_device_inputs_match_the_host(cache_dtype):
    bits_k, bits_v, slots = bf16_inputs()
    with cache(cache_dtype, k_scale=0.25, v_scale=0.5) as c:
        c.write_kv(1, device_array(bits_k, "bfloat16"), device_array(bits_v, "bfloat16"),
                   device_array(slots, "int64"))
        c.synchronize()
        ref_k, ref_v = reference_write(cache_dtype, bits_k, bits_v, slots)
        assert np.array_equal(c.key_cache(1).to_numpy().view(np.uint8), ref_k.view(np.uint8))
        assert np.array_equal(c.value_cache(1).to_numpy().view(np.uint8), ref_v.view(np.uint8))


@gpu
@pytest.mark.gpu
def test_torch_bfloat16_inputs_on_a_stream_match_the_host():
    torch = need_torch()
    bits_k, bits_v, slots = bf16_inputs()
    kb = torch.from_numpy(bits_k.view(np.int16)).cuda().view(torch.bfloat16)
    vb = torch.from_numpy(bits_v.view(np.int16)).cuda().view(torch.bfloat16)
    with cache("fp8_e4m3", k_scale=0.25, v_scale=0.5) as c:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            c.write_kv(1, kb, vb, torch.from_numpy(slots).cuda(), stream=stream)
        c.synchronize()
        ref_k, ref_v = reference_write("fp8_e4m3", bits_k, bits_v, slots)
        assert np.array_equal(c.key_cache(1).to_numpy().view(np.uint8), ref_k.view(np.uint8))
        assert np.array_equal(c.value_cache(1).to_numpy().view(np.uint8), ref_v.view(np.uint8))


@gpu
@pytest.mark.gpu
def test_torch_sees_the_cache_itself():
    torch = need_torch()
    with cache() as c:
        kc = torch.from_dlpack(c.key_cache(0))
        assert kc.shape == (64, 16, 8, 128) and kc.dtype == torch.float16 and kc.is_cuda
        assert kc.data_ptr() == c.key_cache(0).ptr
        c.manager.add_sequence(1, num_tokens=20)
        table = c.manager.block_table(1)
        kc[int(table[1]), 2] = 3.0                                 # token 18, written through torch
        torch.cuda.synchronize()
        k, _ = c.gather(1, 0)
        assert (k.to_numpy()[18] == 3.0).all() and not k.to_numpy()[:18].any()
        rows = torch.full((20, 8, 128), 5.0, dtype=torch.float16, device="cuda")
        slots = torch.from_numpy(c.manager.block_table(1).astype(np.int64)).cuda()
        slots = (slots[:, None] * 16 + torch.arange(16, device="cuda")).reshape(-1)[:20]
        c.write_kv(0, rows, rows, slots)
        c.synchronize()
        assert (kc[int(table[0])] == 5.0).all()                    # a write_kv is seen by torch
        got = torch.from_dlpack(c.gather(1, 0)[1])
        assert got.shape == (20, 8, 128) and (got == 5.0).all()
        fp8 = rf.KvCache(CacheConfig(1, 1, 16, num_blocks=2, dtype="fp8_e4m3"), DEVICE)
        assert torch.from_dlpack(fp8.key_cache(0)).dtype == torch.uint8
        assert torch.from_dlpack(cache("bfloat16").key_cache(0)).dtype == torch.bfloat16


@gpu
@pytest.mark.gpu
def test_device_side_bad_slots_are_skipped_and_reported():
    with cache() as c:
        rows = device_array(np.ones((3, 8, 128), dtype=np.float16), "float16")
        c.write_kv(0, rows, rows, device_array(np.array([5, 64 * 16, 7], dtype=np.int64), "int64"))
        with pytest.raises(rf.DeviceError, match=r"layer 0: slot_mapping\[1\]"):
            c.synchronize()
        c.synchronize()                                            # reported once
        flat = c.key_cache(0).to_numpy().reshape(-1, 8, 128)
        assert (flat[[5, 7]] == 1).all() and flat.sum() == 2 * 8 * 128


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(bool(os.environ.get("ROCMFORGE_SANITIZER")),
                    reason="compute-sanitizer's tools take device memory of their own")
def test_memory_comes_back_after_10000_caches_and_1000000_sequences():
    c = cache(num_blocks=4)            # loads the kernels once for the process
    c.close()
    start = free_memory()
    for i in range(10_000):
        with cache(num_blocks=4, heads=1, head_dim=64) as c:
            if i % 1000 == 0:
                c.manager.add_sequence(1, num_tokens=5)
    assert free_memory() == start
    with cache(num_blocks=256) as c:
        m = c.manager
        for i in range(1_000_000):
            m.add_sequence(i, num_tokens=1 + i % 64)
            m.remove_sequence(i)
        assert m.num_used_blocks == 0 and len(m) == 0
        m.check_invariants()
    assert free_memory() == start
