"""The GPU runtime layer: backend choice with its reason, and device memory that is
freed exactly once. Runs on the host backend everywhere; tests marked gpu need a
HIP or CUDA device."""

import ctypes.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _runtime

INFO = _runtime.backend_info()
ON_GPU = INFO["backend"] in ("hip", "cuda")
gpu = pytest.mark.skipif(not ON_GPU, reason="no GPU runtime with a device")


def run_python(code, backend):
    """A fresh interpreter with ROCMFORGE_BACKEND set, started outside the source
    tree so it imports the same rocmforge as this process."""
    env = dict(os.environ, ROCMFORGE_BACKEND=backend)
    root = os.path.dirname(os.path.dirname(rf.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())


def info_with(backend):
    """backend_info() of a fresh process with ROCMFORGE_BACKEND set."""
    out = run_python("import json, rocmforge._runtime as r; print(json.dumps(r.backend_info()))", backend)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_backend_info_says_what_and_why():
    assert INFO["backend"] in ("host", "hip", "cuda")
    assert INFO["reason"]
    assert (len(INFO["devices"]) > 0) == ON_GPU
    for dev in INFO["devices"]:
        assert dev["name"] and dev["total_memory"] >= dev["free_memory"] > 0


def test_forcing_the_host_backend():
    info = info_with("host")
    assert info == {"backend": "host", "reason": "host backend requested", "devices": []}


def test_unknown_backend_name_is_refused():
    out = run_python("import rocmforge._runtime as r; r.backend_info()", "metal")
    assert out.returncode != 0 and "InvalidConfiguration" in out.stderr and "metal" in out.stderr


@pytest.mark.skipif(ctypes.util.find_library("amdhip64") is None, reason="HIP runtime not installed")
def test_hip_loader_reaches_a_clean_answer():
    """With the HIP runtime installed, forcing HIP either finds devices or falls
    back to host saying why (CI: Debian's libamdhip64, no AMD GPU)."""
    info = info_with("hip")
    if info["backend"] == "hip":
        assert info["devices"]
    else:
        assert info["backend"] == "host" and "device" in info["reason"], info


@pytest.mark.skipif(ctypes.util.find_library("cuda") is not None, reason="a CUDA driver is installed")
def test_missing_cuda_driver_is_reported():
    info = info_with("cuda")
    assert info["backend"] == "host" and "libcuda.so.1 not found" in info["reason"]


def roundtrip(device=None):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    with _runtime.DeviceBuffer(data.nbytes, device) as a, _runtime.DeviceBuffer(data.nbytes, device) as b:
        a.copy_from_host(data)
        b.copy_from(a)
        b.synchronize()
        assert (b.to_host() == data).all()
        a.memset(7)
        assert (a.to_host() == 7).all()
        assert (b.to_host() == data).all()


def test_buffer_roundtrip_on_the_current_backend():
    roundtrip()


def test_buffer_is_freed_once_and_refuses_use_after_close():
    b = _runtime.DeviceBuffer(64)
    assert not b.closed and b.ptr
    b.close()
    b.close()
    assert b.closed
    for call in (lambda: b.ptr, lambda: b.memset(0), b.to_host, lambda: b.copy_from_host(b"x")):
        with pytest.raises(rf.ArgumentValueError, match="closed"):
            call()


def test_empty_buffer():
    with _runtime.DeviceBuffer(0) as b:
        assert b.to_host().size == 0
        b.memset(1)
        b.copy_from_host(b"")


@pytest.mark.parametrize("nbytes, exc", [(-1, rf.ArgumentValueError), (1.5, rf.ArgumentTypeError),
                                         (True, rf.ArgumentTypeError), (1 << 63, rf.ArgumentValueError)])
def test_bad_sizes(nbytes, exc):
    with pytest.raises(exc):
        _runtime.DeviceBuffer(nbytes)


def test_bad_copies():
    with _runtime.DeviceBuffer(8) as b:
        with pytest.raises(rf.ArgumentValueError, match="do not fit"):
            b.copy_from_host(np.zeros(9, dtype=np.uint8))
        with pytest.raises(rf.ArgumentValueError, match="contiguous"):
            b.copy_from_host(np.zeros((4, 4), dtype=np.uint8)[:, ::2])
        with pytest.raises(rf.ArgumentTypeError):
            b.copy_from_host([1, 2, 3])
        with pytest.raises(rf.ArgumentValueError, match="byte"):
            b.memset(256)
        with _runtime.DeviceBuffer(16) as big:
            with pytest.raises(rf.ArgumentValueError, match="do not fit"):
                b.copy_from(big)


def test_bad_device_index():
    for device in (len(INFO["devices"]), -2, 1 << 40):
        with pytest.raises(rf.DeviceError, match="-1 is host memory") as info:
            _runtime.DeviceBuffer(8, device=device)
        assert info.value.code == 5
        if not INFO["devices"]:
            assert "no GPU is available" in str(info.value)
    with pytest.raises(rf.ArgumentTypeError):
        _runtime.DeviceBuffer(8, device="0")


def test_host_memory_on_any_backend():
    roundtrip(-1)
    with _runtime.DeviceBuffer(8, -1) as b:
        assert b.on_host and b.device == -1


@gpu
@pytest.mark.gpu
def test_gpu_roundtrip_on_every_device():
    for dev in INFO["devices"]:
        roundtrip(dev["index"])


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(bool(os.environ.get("ROCMFORGE_SANITIZER")),
                    reason="compute-sanitizer's tools take device memory of their own")
def test_gpu_memory_returns_after_many_buffers():
    free_before = _runtime.backend_info()["devices"][0]["free_memory"]
    for _ in range(1000):
        with _runtime.DeviceBuffer(8 << 20) as b:
            b.memset(1)
    buffers = [_runtime.DeviceBuffer(8 << 20) for _ in range(64)]
    del buffers                                     # freed by collection
    assert _runtime.backend_info()["devices"][0]["free_memory"] == free_before


@gpu
@pytest.mark.gpu
def test_gpu_out_of_memory_is_a_device_error():
    total = INFO["devices"][0]["total_memory"]
    with pytest.raises(rf.DeviceError) as info:
        _runtime.DeviceBuffer(total * 4)
    assert info.value.runtime_code


@pytest.mark.parametrize("compiler, image, markers", [
    ("hipcc", "kv_kernels.hsaco", [b"__CLANG_OFFLOAD_BUNDLE__", b"gfx90a", b"gfx940"]),
    ("nvcc", "kv_kernels.fatbin", [b"rf_write_kv", b"rf_copy_blocks", b"rf_scatter_blocks"]),
    ("hipcc", "attention.hsaco", [b"__CLANG_OFFLOAD_BUNDLE__", b"gfx90a", b"gfx940"]),
    ("nvcc", "attention.fatbin", [b"rf_paged_attention", b"rf_paged_attention_reduce"]),
])
def test_kernel_code_objects_are_built_when_the_compiler_is_present(compiler, image, markers):
    """setup.py compiles hip/kernels/*.cu with every GPU compiler on PATH (CI
    installs Debian's hipcc; nvcc where CUDA is installed) and ships the result."""
    import shutil
    if not shutil.which(compiler):
        pytest.skip(f"{compiler} not on PATH")
    if os.environ.get("ROCMFORGE_KERNELS") == "0":
        pytest.skip("this build skipped the GPU kernels (ROCMFORGE_KERNELS=0)")
    with open(os.path.join(_runtime.KERNEL_DIR, image), "rb") as f:
        data = f.read()
    for marker in markers:
        assert marker in data, (image, marker)


def test_load_backend_picks_once_and_agrees_with_backend_info():
    name, reason = _runtime.load_backend()
    assert (name, reason) == _runtime.load_backend()            # chosen once per process
    assert name == INFO["backend"] and reason == INFO["reason"]
    out = run_python("import rocmforge._runtime as r; print(r.load_backend())", "host")
    assert out.returncode == 0 and "('host', 'host backend requested')" in out.stdout


def test_host_device_array_views_its_buffer_at_an_offset():
    from rocmforge._dlpack import DeviceArray
    buf = rf.DeviceBuffer(64, device=-1)
    buf.copy_from_host(np.arange(16, dtype=np.float32))
    a = DeviceArray(buf, (2, 3), "float32", offset=8)               # elements 2..7
    assert (a.ptr, a.nbytes, a.device, a.offset, a.buffer) == (buf.ptr + 8, 24, "cpu", 8, buf)
    assert a.to_numpy().tolist() == [[2, 3, 4], [5, 6, 7]]
    assert np.from_dlpack(a).tolist() == [[2, 3, 4], [5, 6, 7]]
    assert a.__dlpack_device__() == (1, 0)
    with pytest.raises(rf.ArgumentValueError, match="exceeds"):
        DeviceArray(buf, (4, 4), "float32", offset=8)
    with pytest.raises(rf.ArgumentValueError, match="exceeds"):
        DeviceArray(buf, (1,), "float32", offset=-4)
    with pytest.raises(rf.ArgumentValueError, match="unknown dtype"):
        DeviceArray(buf, (1,), "float64")
    with pytest.raises(rf.ArgumentValueError, match="bad shape"):
        DeviceArray(buf, (-1,), "float32")


def test_dlpack_export_takes_stream_and_version_arguments():
    from rocmforge._dlpack import DeviceArray
    buf = rf.DeviceBuffer(16, device=-1)
    buf.copy_from_host(np.arange(4, dtype=np.int32))
    a = DeviceArray(buf, (4,), "int32")
    for kwargs in ({}, {"stream": None}, {"stream": 1}, {"max_version": (1, 0)}, {"max_version": (0, 8)},
                   {"dl_device": (1, 0)}, {"copy": False}):
        capsule = a.__dlpack__(**kwargs)
        versioned = kwargs.get("max_version", (0,))[0] >= 1
        assert type(capsule).__name__ == "PyCapsule"
        assert ("dltensor_versioned" if versioned else "dltensor") in repr(capsule)
    with pytest.raises(BufferError, match="without a copy"):
        a.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="cannot export"):
        a.__dlpack__(dl_device=(2, 0))
    del buf
    assert np.from_dlpack(a).tolist() == [0, 1, 2, 3]               # the array keeps its buffer alive


def test_live_buffers_counts_what_owns_memory():
    before = rf.live_buffers().get(-1, (0, 0))
    a, b = rf.DeviceBuffer(100, device=-1), rf.DeviceBuffer(28, device=-1)
    assert rf.live_buffers()[-1] == (before[0] + 2, before[1] + 128)
    a.close()
    a.close()                                           # closing twice counts once
    assert rf.live_buffers()[-1] == (before[0] + 1, before[1] + 28)
    del b                                               # collection frees it too
    assert rf.live_buffers().get(-1, (0, 0)) == before
