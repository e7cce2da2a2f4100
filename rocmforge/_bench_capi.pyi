"""Type stubs for rocmforge._bench_capi (benchmark loops through the C-level APIs)."""

import numpy as np
import numpy.typing as npt

from rocmforge._core import BlockManager
from rocmforge._kvcache import KvCache

def alloc_free_batch(m: BlockManager, rounds: int, batch: int) -> float: ...
def prefix_touch(m: BlockManager, prompts: npt.NDArray[np.int32], rounds: int) -> float: ...
def decode_sim(m: BlockManager, ids: npt.NDArray[np.int64], left: npt.NDArray[np.int64],
               lengths: npt.NDArray[np.int64], steps: int, next_id: int) -> float: ...
def write_kv_launch_ns(cache: KvCache, layer: int, key: int, value: int, slots: int, num_tokens: int, dtype: str,
                       calls: int) -> float: ...
