"""Type stubs for rocmforge._bench_capi (allocator benchmark loops through the C API)."""

import numpy as np
import numpy.typing as npt

from rocmforge._core import BlockManager

def alloc_free_batch(m: BlockManager, rounds: int, batch: int) -> float: ...
def prefix_touch(m: BlockManager, prompts: npt.NDArray[np.int32], rounds: int) -> float: ...
def decode_sim(m: BlockManager, ids: npt.NDArray[np.int64], left: npt.NDArray[np.int64],
               lengths: npt.NDArray[np.int64], steps: int, next_id: int) -> float: ...
