"""torch tensors as arguments: rocmforge reads their fields directly instead of
through DLPack (torch builds its DLPack export in Python, which cost about 2 us
a tensor). The results must equal the numpy path's, and the same bad arguments
must be refused with the same errors. On the host backend; skips without torch."""

import numpy as np
import pytest

import rocmforge as rf
from rocmforge.config import CacheConfig

torch = pytest.importorskip("torch")


def cache(dtype="float16"):
    return rf.KvCache(CacheConfig(1, 2, 8, block_size=4, num_blocks=8, dtype=dtype), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_tensors_write_what_their_numpy_twins_write(dtype):
    k = torch.randn((5, 2, 8), generator=torch.Generator().manual_seed(0)).to(dtype)
    slots = torch.tensor([0, 3, 4, 9, 31], dtype=torch.int64)
    with cache() as a, cache() as b:
        a.manager.allocate(8)
        b.manager.allocate(8)
        a.write_kv(0, k, -k, slots)
        as_numpy = k.float().numpy() if dtype == torch.bfloat16 else k.numpy()   # numpy has no bfloat16
        b.write_kv(0, as_numpy if dtype != torch.bfloat16 else torch.from_numpy(as_numpy).to(dtype),
                   -as_numpy if dtype != torch.bfloat16 else torch.from_numpy(-as_numpy).to(dtype), slots.numpy())
        for x, y in zip((a.key_cache(0), a.value_cache(0)), (b.key_cache(0), b.value_cache(0))):
            assert np.array_equal(x.to_numpy(), y.to_numpy())
        assert a.key_cache(0).to_numpy().any()


def test_bad_torch_arguments_get_the_numpy_paths_errors():
    with cache() as c:
        k = torch.zeros((4, 2, 8), dtype=torch.float16)
        slots = torch.arange(4)
        with pytest.raises(rf.ArgumentValueError):
            c.write_kv(0, k.transpose(0, 1).contiguous().transpose(0, 1), k, slots)   # not C-contiguous
        with pytest.raises(rf.ArgumentTypeError):
            c.write_kv(0, k.double(), k, slots)
        with pytest.raises(rf.ArgumentValueError):
            c.write_kv(0, k, k, slots.int())
        with pytest.raises(rf.ArgumentValueError):
            c.write_kv(0, k[:3], k, slots)
        with pytest.raises((rf.ArgumentValueError, rf.DeviceError)):
            c.write_kv(0, torch.zeros((4, 2, 8), dtype=torch.float16, device="meta"), k, slots)
        c.write_kv(0, k.requires_grad_(False), k, slots)      # a plain tensor works after all that
