"""Type stubs for rocmforge._kernels (host K/V kernels on numpy arrays)."""

from typing import Iterable, Literal, Optional

import numpy as np
import numpy.typing as npt

DType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "int8"]
DTYPES: dict[str, tuple[int, np.dtype]]

def write_kv(key_cache: npt.NDArray[np.generic], value_cache: npt.NDArray[np.generic],
             key: npt.NDArray[np.generic], value: npt.NDArray[np.generic],
             slot_mapping: npt.NDArray[np.int64], *, dtype: Optional[DType] = None,
             cache_dtype: Optional[DType] = None, k_scale: float = 1.0, v_scale: float = 1.0) -> None: ...
def copy_blocks(caches: Iterable[npt.NDArray[np.generic]], pairs: npt.NDArray[np.int32]) -> None: ...
def gather_kv(cache: npt.NDArray[np.generic], block_table: npt.NDArray[np.int32],
              num_tokens: int) -> npt.NDArray[np.generic]: ...
