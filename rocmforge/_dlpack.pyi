"""Type stubs for rocmforge._dlpack (arrays across DLPack)."""

from typing import Any, Literal, Optional

import numpy as np
import numpy.typing as npt

from rocmforge._runtime import DeviceBuffer

DTypeName = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int32", "int64"]

class DeviceArray:
    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: DTypeName
    offset: int
    def __init__(self, buffer: DeviceBuffer, shape: tuple[int, ...], dtype: DTypeName, offset: int = 0) -> None: ...
    @property
    def ptr(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> str: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def __dlpack__(self, *, stream: Optional[int] = None, max_version: Optional[tuple[int, int]] = None,
                   dl_device: Optional[tuple[int, int]] = None, copy: Optional[bool] = None) -> Any: ...
    def to_numpy(self) -> npt.NDArray[np.generic]: ...
    def __array__(self, dtype: Optional[npt.DTypeLike] = None, copy: Optional[bool] = None) -> npt.NDArray[np.generic]: ...
