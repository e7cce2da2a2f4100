"""Type stubs for rocmforge._runtime (the GPU runtime layer)."""

from typing import Literal, Optional, TypedDict, Union

import numpy as np
import numpy.typing as npt

class DeviceInfo(TypedDict):
    index: int
    name: str
    arch: str
    total_memory: int
    free_memory: int

class BackendInfo(TypedDict):
    backend: Literal["host", "hip", "cuda"]
    reason: str
    devices: list[DeviceInfo]

def load_backend() -> tuple[str, str]: ...
def backend_info() -> BackendInfo: ...

class DeviceBuffer:
    nbytes: int
    device: int
    on_host: bool
    pinned: bool
    def __init__(self, nbytes: int, device: Optional[int] = None, *, pinned: bool = False) -> None: ...
    @property
    def ptr(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> "DeviceBuffer": ...
    def __exit__(self, *exc: object) -> None: ...
    def memset(self, value: int) -> None: ...
    def copy_from_host(self, data: Union[npt.NDArray[np.generic], bytes, bytearray]) -> None: ...
    def to_host(self) -> npt.NDArray[np.uint8]: ...
    def copy_from(self, other: "DeviceBuffer") -> None: ...
    def synchronize(self) -> None: ...

class DeviceKernels:
    """The precompiled K/V kernels loaded on one device (launched by KvCache)."""
    device: int
    def __init__(self, device: int = 0, image: Optional[bytes] = None) -> None: ...

class DeviceStream:
    """A non-blocking stream of rocmforge's own on one GPU (KvCache's copies)."""
    device: int
    def __init__(self, device: int) -> None: ...

class DeviceEvent:
    """An event without timing on one GPU, ordering rocmforge's streams."""
    device: int
    def __init__(self, device: int) -> None: ...
