import pytest

import rocmforge as rf
from rocmforge.config import CacheConfig, CachePreset, MemoryProfile, format_bytes, host_tier_blocks, parse_bytes


def test_sizes():
    c = CacheConfig(32, 8, 128, block_size=16, num_blocks=1000)
    assert c.bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert c.bytes_per_block == 131072 * 16
    assert c.estimated_memory_bytes() == 1000 * 131072 * 16
    assert c.estimated_memory_human() == "1.95 GiB"
    assert c.max_context_length() == 16000


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("float16", 2), ("bfloat16", 2),
                                        ("int8", 1), ("fp8_e4m3", 1), ("fp8_e5m2", 1)])
def test_dtypes(dtype, size):
    c = CacheConfig(2, 2, 4, block_size=2, num_blocks=3, dtype=dtype)
    assert c.bytes_per_token == 2 * 2 * 2 * 4 * size
    scales = 2 * 2 * 4 if dtype in ("int8", "fp8_e4m3", "fp8_e5m2") else 0
    assert c.estimated_memory_bytes() == 3 * c.bytes_per_block + scales


def test_budget_sets_num_blocks():
    c = CacheConfig(32, 8, 128, memory_budget="2GiB")
    assert c.num_blocks == 2**31 // (131072 * 16) == 1024
    assert c.memory_budget == 2**31
    with pytest.raises(rf.InvalidConfiguration, match="num_blocks"):
        CacheConfig(32, 8, 128, num_blocks=1025, memory_budget="2GiB")
    with pytest.raises(rf.InvalidConfiguration, match="holds no block"):
        CacheConfig(32, 8, 128, memory_budget=1000)
    with pytest.raises(rf.InvalidConfiguration, match="num_blocks or memory_budget"):
        CacheConfig(32, 8, 128)


def test_host_tier_blocks_sizes_a_tier_in_whole_blocks():
    assert host_tier_blocks("1MiB", 4096) == 256
    assert host_tier_blocks(10_000, 4096) == 2                       # the remainder is no block
    with pytest.raises(rf.InvalidConfiguration, match="holds no block"):
        host_tier_blocks(4095, 4096)
    with pytest.raises(MemoryError, match="lower host_cache"):
        host_tier_blocks("1000TiB", 4096)
    with pytest.raises(rf.InvalidConfiguration):
        host_tier_blocks("lots", 4096)


def test_presets_and_context_length():
    c = CacheConfig.from_preset(CachePreset.MEDIUM, num_blocks=10)
    assert (c.num_layers, c.num_kv_heads, c.head_dim) == (32, 8, 128)
    assert CacheConfig.from_preset("large", num_blocks=1).num_layers == 80
    assert CacheConfig.from_preset("small", num_blocks=1, head_dim=96).head_dim == 96
    custom = CacheConfig.from_preset(CachePreset.CUSTOM, num_layers=2, num_kv_heads=1, head_dim=8, num_blocks=4)
    assert custom.bytes_per_token == 2 * 2 * 1 * 8 * 2
    with pytest.raises(rf.InvalidConfiguration, match="CUSTOM"):
        CacheConfig.from_preset(CachePreset.CUSTOM, num_blocks=4)
    with pytest.raises(rf.InvalidConfiguration):
        CacheConfig.from_preset("huge", num_blocks=4)
    ctx = CacheConfig.for_context_length(100_000, 32, 8, 128)
    assert ctx.num_blocks == 6250 and ctx.max_context_length() >= 100_000
    with pytest.raises(rf.InvalidConfiguration, match="over the memory_budget"):
        CacheConfig.for_context_length(100_000, 32, 8, 128, memory_budget="1GiB")


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_layers=0), "num_layers"),
    (dict(num_layers=10**6), "num_layers"),
    (dict(num_kv_heads=-1), "num_kv_heads"),
    (dict(head_dim=2**40), "head_dim"),
    (dict(block_size=0), "block_size"),
    (dict(num_blocks=2**31), "num_blocks"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(dtype="float8"), "dtype"),
    (dict(memory_budget="lots"), "memory_budget"),
    (dict(memory_budget=-5), "memory_budget"),
    (dict(num_layers=4096, num_kv_heads=4096, head_dim=65536, block_size=2**20, num_blocks=2**31 - 1), "num_blocks"),
])
def test_absurd_values_name_the_field(kwargs, field):
    args = dict(num_layers=4, num_kv_heads=4, head_dim=64, num_blocks=8)
    args.update(kwargs)
    with pytest.raises(rf.InvalidConfiguration, match=field):
        CacheConfig(**args)


def test_wrong_types():
    with pytest.raises(rf.ArgumentTypeError):
        CacheConfig(4.0, 4, 64, num_blocks=8)
    with pytest.raises(rf.ArgumentTypeError):
        CacheConfig(4, 4, 64, num_blocks=True)
    with pytest.raises(rf.ArgumentTypeError):
        CacheConfig(4, 4, 64, memory_budget=2.5)


def test_parse_and_format_bytes():
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes(4096) == 4096
    assert format_bytes(512) == "512 B" and format_bytes(3 * 2**29) == "1.50 GiB"
    # exact arithmetic: no float rounding, and no OverflowError past float's range
    assert parse_bytes("1.001kB") == 1001 and int(float("1.001") * 1000) == 1000
    for huge in ("9" * 400, "1" + "0" * 309 + "kb"):
        with pytest.raises(rf.InvalidConfiguration, match=r"must be in \[1, 2\*\*63\)"):
            parse_bytes(huge)


def test_memory_profile_from_a_live_manager():
    config = CacheConfig(4, 2, 64, block_size=16, num_blocks=64)
    m = rf.BlockManager(config.num_blocks, config.block_size)
    m.add_sequence(1, num_tokens=40)
    p = MemoryProfile.from_manager(m, config)
    assert p.used_bytes == 3 * config.bytes_per_block
    assert p.total_bytes == p.used_bytes + p.free_bytes == 64 * config.bytes_per_block
    assert p.metadata_bytes == m.metadata_bytes() > 0
    assert p.memory_efficiency == pytest.approx(40 / 48)
    text = p.report()
    assert "3/64 blocks" in text and "metadata" in text
    with pytest.raises(rf.InvalidConfiguration, match="block_size"):
        MemoryProfile.from_manager(rf.BlockManager(8, 8), config)
