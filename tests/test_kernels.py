"""Host K/V kernels against numpy references written independently: every dtype,
padding slots, partial last blocks, random shapes (hypothesis), bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rocmforge as rf
from rocmforge import _kernels as K


def e4m3_table():
    """Value of every fp8 e4m3 code (NaN for 0x7F / 0xFF)."""
    vals = np.empty(256, dtype=np.float64)
    for code in range(256):
        s, e, m = code >> 7, (code >> 3) & 15, code & 7
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        vals[code] = np.nan if code & 0x7F == 0x7F else (-v if s else v)
    return vals


E4M3 = e4m3_table()
FINITE = np.where(~np.isnan(E4M3))[0]


def ref_e4m3(x):
    """Nearest finite code (ties to the even mantissa), saturating at +-448."""
    x = np.clip(np.asarray(x, dtype=np.float64), -448, 448)
    d = np.abs(E4M3[FINITE][None, :] - x.reshape(-1, 1))
    best = d.min(axis=1, keepdims=True)
    cand = np.where(d == best, FINITE[None, :], 512)
    even = np.where((cand & 1) == 0, cand, 512).min(axis=1)
    codes = np.where(even < 512, even, cand.min(axis=1))
    # +0 and -0: keep the sign of x
    codes = np.where((E4M3[codes] == 0) & np.signbit(x.reshape(-1)), 0x80, codes)
    return codes.astype(np.uint8).reshape(np.shape(x))


def ref_bf16(x32):
    u = x32.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def to_storage(x32, name, scale=1.0):
    if name == "float32":
        return x32.astype(np.float32)
    if name == "float16":
        return x32.astype(np.float16)
    if name == "bfloat16":
        return ref_bf16(x32.astype(np.float32))
    if name == "fp8_e4m3":
        return ref_e4m3(x32.astype(np.float32).astype(np.float64) / np.float32(scale))
    q = np.rint(x32.astype(np.float32) * np.float32(1.0 / scale))
    return np.clip(q, -127, 127).astype(np.int8)


def from_storage(arr, name):
    if name == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


IN_TYPES = ["float32", "float16", "bfloat16"]
CACHE_TYPES = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8"]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), in_name=st.sampled_from(IN_TYPES), cache_name=st.sampled_from(CACHE_TYPES))
def test_write_kv_matches_numpy(data, in_name, cache_name):
    nb = data.draw(st.integers(1, 6))
    bs = data.draw(st.integers(1, 5))
    h = data.draw(st.integers(1, 3))
    d = data.draw(st.sampled_from([1, 2, 8, 16]))
    t = data.draw(st.integers(0, nb * bs))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    slots = rng.permutation(nb * bs)[:t].astype(np.int64)
    slots[rng.random(t) < 0.2] = -1                      # padding tokens
    k32 = (rng.standard_normal((t, h, d)) * 50).astype(np.float32)
    v32 = (rng.standard_normal((t, h, d)) * 0.01).astype(np.float32)
    k_in, v_in = to_storage(k32, in_name), to_storage(v32, in_name)
    storage = K.DTYPES[cache_name][1]
    kc = np.zeros((nb, bs, h, d), dtype=storage)
    vc = np.zeros((nb, bs, h, d), dtype=storage)
    ks, vs = (0.5, 0.001) if cache_name in ("fp8_e4m3", "int8") else (1.0, 1.0)
    K.write_kv(kc, vc, k_in, v_in, slots, dtype=in_name, cache_dtype=cache_name, k_scale=ks, v_scale=vs)
    expect_k = np.zeros_like(kc).reshape(nb * bs, h, d)
    expect_v = np.zeros_like(vc).reshape(nb * bs, h, d)
    live = slots >= 0
    k_f, v_f = from_storage(k_in, in_name), from_storage(v_in, in_name)
    expect_k[slots[live]] = to_storage(k_f[live], cache_name, ks)
    expect_v[slots[live]] = to_storage(v_f[live], cache_name, vs)
    assert np.array_equal(kc.reshape(nb * bs, h, d).view(np.uint8), expect_k.view(np.uint8))
    assert np.array_equal(vc.reshape(nb * bs, h, d).view(np.uint8), expect_v.view(np.uint8))


def test_fp8_edges():
    x = np.array([0, -0.0, 448, 449, 1e9, -1e9, 2**-9, 2**-10, 3 * 2**-10, 2**-6, 0.1, 240, 232],
                 dtype=np.float32)
    kc = np.zeros((1, len(x), 1, 1), dtype=np.uint8)
    K.write_kv(kc, kc.copy(), x.reshape(-1, 1, 1), x.reshape(-1, 1, 1), np.arange(len(x), dtype=np.int64),
               cache_dtype="fp8_e4m3")
    assert kc.reshape(-1).tolist() == ref_e4m3(x).tolist()
    assert E4M3[kc.reshape(-1)[3]] == 448 and E4M3[kc.reshape(-1)[5]] == -448


@settings(max_examples=40, deadline=None)
@given(data=st.data(), name=st.sampled_from(CACHE_TYPES))
def test_copy_blocks_and_gather_are_bit_exact(data, name):
    nb = data.draw(st.integers(2, 8))
    bs = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    storage = K.DTYPES[name][1]
    caches = [rng.integers(0, 255, (nb, bs, 2, 4), dtype=np.uint8).view(np.uint8).astype(storage)
              for _ in range(3)]
    src = rng.permutation(nb)[: nb // 2]
    dst = rng.permutation(np.setdiff1d(np.arange(nb), src))[: len(src)]
    pairs = np.stack([src, dst], axis=1).astype(np.int32)
    expect = [c.copy() for c in caches]
    for e in expect:
        e[dst] = e[src]
    K.copy_blocks(caches, pairs)
    for c, e in zip(caches, expect):
        assert np.array_equal(c.view(np.uint8), e.view(np.uint8))
    table = rng.permutation(nb).astype(np.int32)
    n = data.draw(st.integers(0, nb * bs))
    got = K.gather_kv(caches[0], table, n)
    assert np.array_equal(got.view(np.uint8), caches[0][table].reshape(-1, 2, 4)[:n].view(np.uint8))


def test_gather_follows_a_managers_tables():
    m = rf.BlockManager(8, 4)
    m.add_sequence(1, num_tokens=6)
    m.add_sequence(2, num_tokens=9)
    kc = np.zeros((8, 4, 1, 2), dtype=np.float32)
    vc = np.zeros_like(kc)
    slots = np.concatenate([m.append(1, 3), m.append(2, 1)])
    rows = np.arange(4 * 2, dtype=np.float32).reshape(4, 1, 2)
    K.write_kv(kc, vc, rows, -rows, slots)
    got = K.gather_kv(kc, m.block_table(1), m.num_tokens(1))
    assert np.array_equal(got[6:], rows[:3])
    assert np.array_equal(K.gather_kv(vc, m.block_table(2), 10)[9], -rows[3])


def test_bad_input_writes_nothing():
    kc = np.zeros((2, 2, 1, 2), dtype=np.float32)
    vc = np.zeros_like(kc)
    k = np.ones((2, 1, 2), dtype=np.float32)
    with pytest.raises(rf.ArgumentValueError, match="slot_mapping"):
        K.write_kv(kc, vc, k, k, np.array([0, 4], dtype=np.int64))
    assert not kc.any()
    with pytest.raises(rf.ArgumentValueError, match="slot_mapping"):
        K.write_kv(kc, vc, k, k, np.array([0, -2], dtype=np.int64))
    with pytest.raises(rf.ArgumentValueError):
        K.write_kv(kc, vc, k, k, np.array([0], dtype=np.int64))
    with pytest.raises(rf.ArgumentTypeError):
        K.write_kv(kc, vc, k.astype(np.uint16), k.astype(np.uint16), np.zeros(2, dtype=np.int64))
    with pytest.raises(rf.ArgumentValueError, match="do not fit"):
        K.write_kv(kc, vc, np.ones((2, 1, 3), dtype=np.float32), np.ones((2, 1, 3), dtype=np.float32),
                   np.zeros(2, dtype=np.int64))
    with pytest.raises(rf.ArgumentValueError, match="contiguous"):
        K.write_kv(kc, vc, np.ones((2, 1, 4), dtype=np.float32)[:, :, ::2], k, np.zeros(2, dtype=np.int64))
    with pytest.raises(rf.ArgumentValueError, match="scale"):
        K.write_kv(kc, vc, k, k, np.zeros(2, dtype=np.int64), k_scale=0.0)
    with pytest.raises(rf.BlockNotFound):
        K.copy_blocks([kc, vc], np.array([[0, 1], [1, 2]], dtype=np.int32))
    assert not kc.any()
    with pytest.raises(rf.BlockNotFound):
        K.gather_kv(kc, np.array([0, 5], dtype=np.int32), 4)
    with pytest.raises(rf.ArgumentValueError):
        K.gather_kv(kc, np.array([0], dtype=np.int32), 3)


def convert(x32, cache_name, scale=1.0, in_name="float32"):
    """Write x (as in_name) into a one-row cache of cache_name through the host kernel."""
    x = to_storage(x32, in_name) if in_name != "float32" else x32.astype(np.float32)
    kc = np.zeros((1, 1, 1, len(x32)), dtype=K.DTYPES[cache_name][1])
    K.write_kv(kc, kc.copy(), x.reshape(1, 1, -1), x.reshape(1, 1, -1), np.zeros(1, dtype=np.int64),
               dtype=in_name, cache_dtype=cache_name, k_scale=scale, v_scale=scale)
    return kc.reshape(-1)


EDGES = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2**-14, 2**-24, 2**-25,
                  2**-25 * 1.0001, 3 * 2**-26, 1e-30, 1e30, 0.5, 1.5, 2.5, -126.5, 127.49, 127.5, 1000,
                  np.finfo(np.float32).tiny, np.finfo(np.float32).max], dtype=np.float32)


def test_f16_conversions_match_numpy_for_every_code_and_edge():
    codes = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    finite = ~np.isnan(codes.view(np.float16))
    got = convert(codes.view(np.float16).astype(np.float32)[finite], "float32", in_name="float16")
    assert np.array_equal(got.view(np.uint32), codes.view(np.float16)[finite].astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(7)
    x = np.concatenate([EDGES, (rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000))
                        .astype(np.float32)])
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16)
    assert np.array_equal(convert(x, "float16").view(np.uint16), expect.view(np.uint16))
    assert np.isnan(convert(np.array([np.nan], dtype=np.float32), "float16").view(np.float16)[0])


def test_quantized_conversions_match_the_references():
    rng = np.random.default_rng(8)
    x = np.concatenate([EDGES, (rng.standard_normal(20000) * 10.0 ** rng.integers(-4, 4, 20000))
                        .astype(np.float32)])
    x = x[np.isfinite(x) | (np.abs(x) == np.inf)]
    assert convert(x, "fp8_e4m3").tolist() == ref_e4m3(x).tolist()
    assert np.array_equal(convert(x, "bfloat16"), ref_bf16(x))
    i8 = convert(x, "int8", scale=0.25)
    assert np.array_equal(i8, np.clip(np.rint(x.astype(np.float64) * 4), -127, 127).astype(np.int8))
    nan = np.array([np.nan, -np.nan], dtype=np.float32)
    assert convert(nan, "int8").tolist() == [0, 0]
    assert [c & 0x7F for c in convert(nan, "fp8_e4m3")] == [0x7F, 0x7F]
