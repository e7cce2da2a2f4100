"""The GPU read side on the device machine: paged attention with its indices on
the GPU (splits, device-side checks reported by synchronize()), the GPU result
against the host version on the same data, copy_blocks with device pairs, and
a whole decode step (write_kv on two layers, paged_decode) captured in a CUDA
graph and replayed with new inputs. tests/test_attention.py runs the reference
comparisons on the GPU too. Skipped without a GPU."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _runtime
from rocmforge.attention import paged_decode, paged_prefill
from rocmforge.config import CacheConfig
from test_attention import host, kv, reference, to_device
from test_gpu_kernels import device_array, need_torch

INFO = _runtime.backend_info()
ON_GPU = INFO["backend"] in ("hip", "cuda") and bool(INFO["devices"])
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="no GPU runtime with a device")]
DEVICE = f"{INFO['backend']}:0"


def filled(dtype="float16", heads=8, head_dim=128, block_size=16, num_blocks=2048, lens=(5, 700, 2100)):
    """A GPU cache and a host cache holding the same tokens and K/V, with shuffled block ids."""
    caches = [rf.KvCache(CacheConfig(2, heads, head_dim, block_size=block_size, num_blocks=num_blocks,
                                     dtype=dtype), dev) for dev in (DEVICE, "cpu")]
    rng = np.random.default_rng(len(lens))
    for c in caches:
        c.manager.add_sequence(999, num_tokens=block_size * 37)      # blocks scattered by a hole
    for sid, n in enumerate(lens):
        k = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
        for c in caches:
            slots = c.manager.add_sequence(sid, list(range(n)))
            for layer in range(2):
                c.write_kv(layer, to_device(c, k), to_device(c, v), to_device(c, np.asarray(slots)))
    for c in caches:
        c.manager.remove_sequence(999)
    return caches


def test_the_gpu_equals_the_host_version_with_splits_and_device_indices():
    gpu, cpu = filled()
    ids = [0, 1, 2]
    lens = np.array([gpu.manager.num_tokens(i) for i in ids], dtype=np.int32)
    q = np.random.default_rng(1).standard_normal((3, 32, 128)).astype(np.float32)
    want = host(paged_decode(q, cpu, 1, cpu.manager.block_tables(ids), lens), "float32")
    dense = host(paged_decode(to_device(gpu, q), gpu, 1, gpu.manager.block_tables(ids), lens), "float32")
    on_gpu = host(paged_decode(to_device(gpu, q), gpu, 1,
                               device_array(gpu.manager.block_tables(ids), "int32"),
                               device_array(lens, "int32")), "float32")
    indptr, indices, _ = gpu.manager.csr_block_tables(ids)
    csr = host(paged_decode(to_device(gpu, q), gpu, 1, (device_array(indptr, "int32"),
                            device_array(indices, "int32")), device_array(lens, "int32"), max_seq_len=2100),
               "float32")
    gpu.synchronize()
    for got in (dense, on_gpu, csr):
        assert np.abs(got - want).max() < 2e-5 * max(1.0, np.abs(want).max())
    for c in (gpu, cpu):
        c.close()


def test_cuda_images_have_the_tensor_core_kernels():
    """The CUDA image (compute capability 8.0+) carries the float16/bfloat16 tensor-core
    kernels, so test_attention's tensor-core shapes run them; HIP images carry none."""
    assert _runtime.AttentionKernels(0).tensor_core_kernels == (6 if INFO["backend"] == "cuda" else 0)


def test_chunked_prefill_on_the_gpu_equals_the_host():
    gpu, cpu = filled(dtype="bfloat16", lens=(40, 600))
    starts = np.array([0, 8, 108], dtype=np.int32)
    lens = [40, 600]
    q = np.random.default_rng(2).standard_normal((108, 16, 128)).astype(np.float32)
    want = host(paged_prefill(q, cpu, 0, cpu.manager.block_tables([0, 1]), lens, starts), "float32")
    got = host(paged_prefill(to_device(gpu, q), gpu, 0, device_array(gpu.manager.block_tables([0, 1]), "int32"),
                             device_array(np.array(lens, np.int32), "int32"), device_array(starts, "int32")),
               "float32")
    assert np.abs(got - want).max() < 2e-5 * max(1.0, np.abs(want).max())
    for c in (gpu, cpu):
        c.close()


def test_device_side_bad_indices_are_reported_by_synchronize():
    gpu, cpu = filled(lens=(20, 600))
    cpu.close()
    tables = gpu.manager.block_tables([0, 1])
    q = to_device(gpu, np.ones((2, 8, 128), np.float32))
    bad = tables.copy()
    bad[1, 0] = 5000
    lens = device_array(np.array([20, 600], np.int32), "int32")
    paged_decode(q, gpu, 0, device_array(bad, "int32"), lens)
    with pytest.raises(rf.DeviceError, match="paged attention: sequence 1"):
        gpu.synchronize()
    gpu.synchronize()                                              # reported once
    paged_decode(q, gpu, 0, device_array(tables, "int32"), device_array(np.array([20, 9999], np.int32), "int32"))
    with pytest.raises(rf.DeviceError, match="sequence 1"):        # longer than its table
        gpu.synchronize()
    paged_decode(q, gpu, 0, device_array(tables, "int32"), lens, max_seq_len=100)
    with pytest.raises(rf.DeviceError, match="sequence 1"):        # 600 positions, one split of 512
        gpu.synchronize()
    paged_decode(q, gpu, 0, device_array(tables, "int32"), lens)
    gpu.synchronize()
    gpu.close()


def test_copy_blocks_with_device_pairs_and_their_check():
    gpu, cpu = filled(lens=(40,))
    cpu.close()
    src, dst = gpu.manager.block_table(0)[0], 1500
    gpu.copy_blocks(device_array(np.array([[src, dst]], np.int32), "int32"))
    k = gpu.key_cache(1).to_numpy()
    assert np.array_equal(k[dst], k[src])
    gpu.copy_blocks(device_array(np.array([[src, 1501], [src, 99999]], np.int32), "int32"))
    with pytest.raises(rf.DeviceError, match=r"copy_blocks: pairs\[1\]"):
        gpu.synchronize()
    assert np.array_equal(gpu.key_cache(0).to_numpy()[1501], gpu.key_cache(0).to_numpy()[src])
    gpu.close()


def test_a_decode_step_replays_in_a_cuda_graph_with_new_inputs():
    torch = need_torch()
    heads, dim, width = 8, 128, 16
    with rf.KvCache(CacheConfig(2, heads, dim, block_size=16, num_blocks=256, dtype="float16"), DEVICE) as c:
        m = c.manager
        rng = np.random.default_rng(3)
        for sid, n in enumerate([30, 100, 17]):
            slots = m.add_sequence(sid, list(range(n)))
            for layer in range(2):
                k = torch.from_numpy(rng.standard_normal((n, heads, dim)).astype(np.float16)).cuda()
                c.write_kv(layer, k, -k, torch.from_numpy(slots).cuda())
        dev = torch.device("cuda:0")
        k_new = torch.zeros((3, heads, dim), dtype=torch.float16, device=dev)
        v_new = torch.zeros_like(k_new)
        q = torch.zeros((3, 4 * heads, dim), dtype=torch.float16, device=dev)
        out = torch.empty_like(q)
        slots = torch.zeros(3, dtype=torch.int64, device=dev)
        tables = torch.full((3, width), -1, dtype=torch.int32, device=dev)
        lens = torch.zeros(3, dtype=torch.int32, device=dev)

        def advance():
            """The manager's next decode step, copied into the captured inputs in place."""
            new = [int(m.append(sid, [7])[0]) for sid in range(3)]
            slots.copy_(torch.tensor(new))
            t = np.full((3, width), -1, np.int32)
            for sid in range(3):
                row = m.block_table(sid)
                t[sid, :len(row)] = row
            tables.copy_(torch.from_numpy(t))
            lens.copy_(torch.tensor([m.num_tokens(sid) for sid in range(3)], dtype=torch.int32))
            for x in (k_new, v_new, q):
                x.copy_(torch.randn(x.shape, dtype=torch.float16, device=dev))

        stream = torch.cuda.Stream()

        def step():
            s = torch.cuda.current_stream()
            for layer in range(2):
                c.write_kv(layer, k_new, v_new, slots, stream=s)
            paged_decode(q, c, 1, tables, lens, out=out, stream=s, max_seq_len=width * 16)

        advance()
        with torch.cuda.stream(stream):
            step()                                  # warm-up on the capture stream
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        for _ in range(3):
            advance()
            graph.replay()
            torch.cuda.synchronize()
            c.synchronize()
            qh = q.float().cpu().numpy().astype(np.float64)
            got = out.float().cpu().numpy()
            for sid in range(3):
                n = m.num_tokens(sid)
                k, v = kv(c, sid, 1)
                assert np.array_equal(k[-1], k_new[sid].float().cpu().numpy())      # the replayed write landed
                want = reference(qh[sid:sid + 1], k, v, n - 1, dim ** -0.5)
                assert np.abs(got[sid:sid + 1] - want).max() < 2e-3 * max(1.0, np.abs(want).max())
