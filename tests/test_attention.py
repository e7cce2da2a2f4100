"""Paged attention (rocmforge.attention) against a float64 numpy reference over
the K/V that gather() returns: every storage dtype, grouped-query ratios,
block sizes, 1-token and 32k-token sequences, forks sharing blocks, dense
tables with -1 padding and CSR tables, chunked prefill, padding rows, and bad
arguments (refused before anything runs, nothing written)."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge import _runtime
from rocmforge._dlpack import DeviceArray
from rocmforge.attention import paged_decode, paged_prefill
from rocmforge.config import CacheConfig
from test_kernels import E4M3, from_storage, ref_bf16

INFO = _runtime.backend_info()
GPU = f"{INFO['backend']}:0" if INFO["devices"] else None
DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="no GPU")])]
CACHE_TYPES = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8"]
SCALES = {"fp8_e4m3": (0.02, 0.03), "int8": (0.05, 0.04)}
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@pytest.fixture(params=DEVICES)
def device(request):
    return "cpu" if request.param == "cpu" else GPU


def make(device, heads=2, head_dim=16, block_size=8, num_blocks=64, dtype="float16", layers=2, **kw):
    k_scale, v_scale = SCALES.get(dtype, (1.0, 1.0))
    return rf.KvCache(CacheConfig(layers, heads, head_dim, block_size=block_size, num_blocks=num_blocks,
                                  dtype=dtype), device, k_scale=k_scale, v_scale=v_scale, **kw)


def to_device(cache, arr, dtype=None):
    """arr (float32 numpy, or int32/int64 indices) as an array the cache can read, in `dtype`."""
    dtype = dtype or {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32",
                      np.dtype(np.int64): "int64"}[arr.dtype]
    bits = {"float32": arr.astype(np.float32), "float16": arr.astype(np.float16),
            "bfloat16": ref_bf16(arr.astype(np.float32)), "int32": arr, "int64": arr}[dtype]
    if cache.device == "cpu" and dtype != "bfloat16":
        return bits
    buf = rf.DeviceBuffer(max(bits.nbytes, 1), -1 if cache.device == "cpu" else int(cache.device.split(":")[1]))
    buf.copy_from_host(np.ascontiguousarray(bits))
    return DeviceArray(buf, bits.shape, dtype)


def host(arr, dtype):
    """A result as float64 numpy."""
    data = arr.to_numpy() if isinstance(arr, DeviceArray) else np.asarray(arr)
    return from_storage(data, dtype).astype(np.float64)


def write(cache, seq_id, new_tokens, rng, layers=None):
    """Append (or add) new_tokens to seq_id and write random K/V for them in every layer."""
    m = cache.manager
    slots = m.add_sequence(seq_id, new_tokens) if seq_id not in m.sequence_ids() else m.append(seq_id, new_tokens)
    shape = (len(new_tokens), cache.config.num_kv_heads, cache.config.head_dim)
    for layer in range(cache.num_layers) if layers is None else layers:
        k = rng.standard_normal(shape).astype(np.float32)
        v = rng.standard_normal(shape).astype(np.float32)
        cache.write_kv(layer, to_device(cache, k), to_device(cache, v), to_device(cache, np.asarray(slots)))


def kv(cache, seq_id, layer):
    """A sequence's K/V of a layer as float64, dequantized as the kernels read them."""
    k, v = (a.to_numpy() for a in cache.gather(seq_id, layer))
    ks, vs = SCALES.get(cache.dtype, (1.0, 1.0))
    if cache.dtype == "fp8_e4m3":
        return E4M3[k] * np.float32(ks), E4M3[v] * np.float32(vs)
    if cache.dtype == "int8":
        return k * np.float64(np.float32(ks)), v * np.float64(np.float32(vs))
    return from_storage(k, cache.dtype).astype(np.float64), from_storage(v, cache.dtype).astype(np.float64)


def reference(q, k, v, first_pos, scale):
    """softmax(q k^T * scale) v for query rows at positions first_pos, first_pos+1, ...
    (each sees keys [0, its position]); q [n, Hq, D], k and v [T, Hkv, D]."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    out = np.zeros(q.shape)
    for i in range(n):
        pos = first_pos + i
        for h in range(hq):
            s = k[:pos + 1, h // group] @ q[i, h] * scale
            p = np.exp(s - s.max())
            out[i, h] = p @ v[:pos + 1, h // group] / p.sum()
    return out


def check(got, want, q_dtype):
    scale = max(1.0, np.abs(want).max())
    assert np.abs(got - want).max() <= TOL[q_dtype] * scale, np.abs(got - want).max()


@pytest.mark.parametrize("cache_dtype", CACHE_TYPES)
@pytest.mark.parametrize("q_dtype", ["float32", "float16", "bfloat16"])
def test_decode_matches_the_reference_for_every_dtype(device, cache_dtype, q_dtype):
    rng = np.random.default_rng(CACHE_TYPES.index(cache_dtype))
    with make(device, dtype=cache_dtype) as cache:
        lens = [1, 7, 8, 9, 40]
        for sid, n in enumerate(lens):
            write(cache, sid, list(range(n)), rng)
        q = rng.standard_normal((len(lens), 4, 16)).astype(np.float32)
        tables = cache.manager.block_tables(range(len(lens)))
        assert (tables == -1).any()                                  # padded rows
        out = paged_decode(to_device(cache, q, q_dtype), cache, 1, tables, lens)
        got = host(out, q_dtype)
        qr = host(to_device(cache, q, q_dtype), q_dtype)
        for sid, n in enumerate(lens):
            k, v = kv(cache, sid, 1)
            check(got[sid:sid + 1], reference(qr[sid:sid + 1], k, v, n - 1, 16 ** -0.5), q_dtype)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_gqa_ratios_and_block_sizes(device, group, block_size):
    rng = np.random.default_rng(group * block_size)
    with make(device, heads=2, head_dim=32, block_size=block_size, dtype="float32") as cache:
        lens = [3, block_size, 2 * block_size + 5]
        for sid, n in enumerate(lens):
            write(cache, sid, list(range(n)), rng)
        q = rng.standard_normal((3, 2 * group, 32)).astype(np.float32)
        got = host(paged_decode(to_device(cache, q), cache, 0, cache.manager.block_tables([0, 1, 2]), lens,
                                scale=0.3), "float32")
        for sid, n in enumerate(lens):
            check(got[sid:sid + 1], reference(q[sid:sid + 1], *kv(cache, sid, 0), n - 1, 0.3), "float32")


@pytest.mark.parametrize("dtype,head_dim,group,block_size", [
    ("float16", 64, 1, 8), ("float16", 128, 4, 16), ("float16", 256, 32, 32),
    ("bfloat16", 64, 32, 16), ("bfloat16", 128, 1, 32), ("bfloat16", 256, 4, 8)])
def test_tensor_core_shapes_match_the_reference(device, dtype, head_dim, group, block_size):
    """The shapes the GPU reads on tensor cores (queries of the cache's float16 or
    bfloat16 type, head_dim 64/128/256): up to 16 query heads a thread block (32:
    two blocks), tiles of 16 positions that straddle blocks of 8 or lie inside
    blocks of 32, partial last tiles, one split and many, a padding row, and a
    prefill chunk. The host backend runs the same cases through its own kernel."""
    rng = np.random.default_rng(head_dim + group + block_size)
    with make(device, heads=2, head_dim=head_dim, block_size=block_size, num_blocks=256, dtype=dtype,
              layers=1) as cache:
        short, long = [1, 15, 16, 17], 600
        for sid, n in enumerate(short + [long]):
            write(cache, sid, list(range(n)), rng)
        scale = head_dim ** -0.5
        for ids, lens in ((range(4), short + [0]), ([4], [long])):     # one split; many
            ids = list(ids)
            tables = np.full((len(lens), -(-long // block_size)), -1, dtype=np.int32)
            for row, sid in enumerate(ids):
                table = cache.manager.block_table(sid)
                tables[row, :len(table)] = table
            q = to_device(cache, rng.standard_normal((len(lens), 2 * group, head_dim)).astype(np.float32), dtype)
            got = host(paged_decode(q, cache, 0, tables, lens), dtype)
            qr = host(q, dtype)
            for row, sid in enumerate(ids):
                check(got[row:row + 1], reference(qr[row:row + 1], *kv(cache, sid, 0), lens[row] - 1, scale), dtype)
            assert (got[len(ids):] == 0).all()
        q = to_device(cache, rng.standard_normal((20, 2 * group, head_dim)).astype(np.float32), dtype)
        got = host(paged_prefill(q, cache, 0, cache.manager.block_tables([4]), [long], [0, 20]), dtype)
        check(got, reference(host(q, dtype), *kv(cache, 4, 0), long - 20, scale), dtype)


def test_csr_tables_equal_dense_tables(device):
    rng = np.random.default_rng(5)
    with make(device, dtype="bfloat16") as cache:
        lens = [5, 17, 33]
        for sid, n in enumerate(lens):
            write(cache, sid, list(range(n)), rng)
        q = to_device(cache, rng.standard_normal((3, 4, 16)).astype(np.float32), "float16")
        dense = host(paged_decode(q, cache, 0, cache.manager.block_tables([0, 1, 2]), lens), "float16")
        csr = host(paged_decode(q, cache, 0, cache.manager.csr_block_tables([0, 1, 2]), lens), "float16")
        indptr, indices, _ = cache.manager.csr_block_tables([0, 1, 2])
        pair = host(paged_decode(q, cache, 0, (indptr, indices), lens), "float16")
        assert np.array_equal(dense, csr) and np.array_equal(dense, pair)


def test_forks_share_blocks_and_read_their_own_copies(device):
    rng = np.random.default_rng(9)
    with make(device, dtype="float32") as cache:
        m = cache.manager
        write(cache, 0, list(range(13)), rng)
        m.fork(0, 1)
        write(cache, 1, [99], rng)          # the fork's partial last block is copied on write
        write(cache, 0, [98], rng)
        assert m.block_table(0)[0] == m.block_table(1)[0]           # the full block is shared
        q = rng.standard_normal((2, 2, 16)).astype(np.float32)
        got = host(paged_decode(to_device(cache, q), cache, 1, m.block_tables([0, 1]), [14, 14]), "float32")
        for sid in (0, 1):
            check(got[sid:sid + 1], reference(q[sid:sid + 1], *kv(cache, sid, 1), 13, 0.25), "float32")
        assert not np.allclose(got[0], got[1])


def test_a_32k_token_sequence(device):
    rng = np.random.default_rng(32)
    with make(device, heads=1, head_dim=8, block_size=32, num_blocks=1100, dtype="float16", layers=1) as cache:
        write(cache, 0, list(range(32768)), rng)
        write(cache, 1, [1], rng)
        q = rng.standard_normal((2, 2, 8)).astype(np.float32)
        lens = [32768, 1]
        got = host(paged_decode(to_device(cache, q), cache, 0, cache.manager.block_tables([0, 1]), lens),
                   "float32")
        for sid, n in enumerate(lens):
            check(got[sid:sid + 1], reference(q[sid:sid + 1], *kv(cache, sid, 0), n - 1, 8 ** -0.5), "float32")


@pytest.mark.parametrize("cache_dtype", ["float16", "int8"])
def test_chunked_prefill_is_causal_over_the_cached_prefix(device, cache_dtype):
    rng = np.random.default_rng(11)
    with make(device, dtype=cache_dtype) as cache:
        write(cache, 0, list(range(20)), rng)        # a cached prefix of 20 tokens, then a chunk of 6
        write(cache, 0, list(range(6)), rng)
        write(cache, 1, list(range(5)), rng)         # a first chunk: no prefix
        write(cache, 2, list(range(9)), rng)         # a decode row inside the same batch
        starts = np.array([0, 6, 11, 12], dtype=np.int32)
        lens = [26, 5, 9]
        q = rng.standard_normal((12, 4, 16)).astype(np.float32)
        got = host(paged_prefill(to_device(cache, q), cache, 0, cache.manager.block_tables([0, 1, 2]), lens,
                                 starts), "float32")
        for sid, n in enumerate(lens):
            a, b = starts[sid], starts[sid + 1]
            want = reference(q[a:b], *kv(cache, sid, 0), n - (b - a), 0.25)
            check(got[a:b], want, "float32")


def test_prefill_with_one_query_each_equals_decode(device):
    rng = np.random.default_rng(12)
    with make(device) as cache:
        for sid, n in enumerate([4, 30]):
            write(cache, sid, list(range(n)), rng)
        q = to_device(cache, rng.standard_normal((2, 2, 16)).astype(np.float32))
        tables = cache.manager.block_tables([0, 1])
        a = host(paged_decode(q, cache, 0, tables, [4, 30]), "float32")
        b = host(paged_prefill(q, cache, 0, tables, [4, 30], [0, 1, 2]), "float32")
        assert np.array_equal(a, b)


def test_torch_cpu_indices_equal_numpy_indices():
    """Index arguments as torch CPU tensors (the transformers integration's paged
    path on the CPU) read as their numpy views; a dtype numpy has no view of is refused."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    with make("cpu", dtype="float32") as cache:
        lens = [3, 20]
        for sid, n in enumerate(lens):
            write(cache, sid, list(range(n)), rng)
        q = rng.standard_normal((2, 4, 16)).astype(np.float32)
        tables = cache.manager.block_tables([0, 1])
        want = paged_decode(q, cache, 0, tables, lens)
        for t, n in ((torch.from_numpy(tables), torch.tensor(lens)),
                     (torch.from_numpy(tables).long(), torch.tensor(lens, dtype=torch.int32))):
            got = paged_decode(torch.from_numpy(q), cache, 0, t, n)
            assert np.array_equal(host(got, "float32"), host(want, "float32"))
        for bad in (torch.from_numpy(tables).to(torch.bfloat16),                  # no numpy view
                    torch.from_numpy(tables).float().requires_grad_()):           # not integers
            with pytest.raises(rf.ArgumentTypeError):
                paged_decode(q, cache, 0, bad, lens)


def test_padding_rows_get_zeros_and_out_is_written_in_place(device):
    rng = np.random.default_rng(13)
    with make(device, dtype="float32") as cache:
        write(cache, 0, list(range(10)), rng)
        tables = np.full((3, 4), -1, dtype=np.int32)
        tables[0, :2] = cache.manager.block_table(0)
        q = rng.standard_normal((3, 2, 16)).astype(np.float32)
        out = to_device(cache, np.full((3, 2, 16), 7.0, dtype=np.float32))
        got = paged_decode(to_device(cache, q), cache, 0, tables, [10, 0, 0], out=out)
        assert got is out
        res = host(out, "float32")
        assert (res[1:] == 0).all()
        check(res[:1], reference(q[:1], *kv(cache, 0, 0), 9, 0.25), "float32")


def test_bad_arguments_are_refused_before_anything_runs(device):
    rng = np.random.default_rng(14)
    with make(device, dtype="float32") as cache:
        write(cache, 0, list(range(10)), rng)
        tables = cache.manager.block_tables([0])
        q = to_device(cache, rng.standard_normal((1, 4, 16)).astype(np.float32))
        out = to_device(cache, np.full((1, 4, 16), 3.0, dtype=np.float32))
        bad_block = tables.copy()
        bad_block[0, 1] = 64
        cases = [
            (rf.BlockNotFound, dict(block_tables=bad_block)),
            (rf.BlockNotFound, dict(block_tables=np.array([[0, -1]], dtype=np.int32))),
            (rf.ArgumentValueError, dict(seq_lens=[17])),             # beyond its 2-block table
            (rf.ArgumentValueError, dict(seq_lens=[-1])),
            (rf.ArgumentValueError, dict(seq_lens=[10, 10])),
            (rf.ArgumentValueError, dict(seq_lens=[2**31])),
            (rf.ArgumentTypeError, dict(seq_lens=[1.5])),
            (rf.ArgumentTypeError, dict(seq_lens="ten")),
            (rf.ArgumentValueError, dict(block_tables=tables[0])),
            (rf.ArgumentValueError, dict(block_tables=([0, 5], [0, 1]))),          # indptr beyond indices
            (rf.ArgumentValueError, dict(block_tables=([0],))),
            (rf.ArgumentValueError, dict(layer=2)),
            (rf.ArgumentTypeError, dict(layer="0")),
            (rf.ArgumentValueError, dict(query=to_device(cache, np.zeros((1, 3, 16), np.float32)))),
            (rf.ArgumentValueError, dict(query=to_device(cache, np.zeros((2, 4, 16), np.float32)))),
            (rf.ArgumentValueError, dict(query=to_device(cache, np.zeros((1, 4, 8), np.float32)))),
            (rf.ArgumentTypeError, dict(query=to_device(cache, np.zeros((1, 4, 16), np.int32)))),
            (rf.ArgumentValueError, dict(out=to_device(cache, np.zeros((1, 4, 8), np.float32)))),
            (rf.ArgumentValueError, dict(out=to_device(cache, np.zeros((1, 4, 16), np.float32), "float16"))),
            (rf.ArgumentValueError, dict(scale=float("nan"))),
        ]
        base = dict(query=q, layer=0, block_tables=tables, seq_lens=[10], out=out)
        for exc, change in cases:
            args = {**base, **change}
            with pytest.raises(exc):
                paged_decode(args["query"], cache, args["layer"], args["block_tables"], args["seq_lens"],
                             scale=args.get("scale"), out=args["out"])
            assert (host(out, "float32") == 3.0).all(), change
        for bad_len in (-1, 1.5, True, "8"):
            with pytest.raises(rf.ArgumentValueError, match="max_seq_len"):
                paged_decode(q, cache, 0, tables, [10], out=out, max_seq_len=bad_len)
        for starts in ([0, 2], [1, 1], [0]):
            with pytest.raises(rf.ArgumentValueError):
                paged_prefill(q, cache, 0, tables, [10], starts, out=out)
        with pytest.raises(rf.ArgumentValueError):               # more queries than tokens
            paged_prefill(to_device(cache, np.zeros((11, 4, 16), np.float32)), cache, 0, tables, [10], [0, 11])
        cache.close()
        with pytest.raises(rf.ArgumentValueError, match="closed"):
            paged_decode(q, cache, 0, tables, [10])
