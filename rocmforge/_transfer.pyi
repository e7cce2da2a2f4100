"""Type stubs for rocmforge._transfer (see rocmforge.transfer)."""

from typing import Any

import numpy as np
import numpy.typing as npt

from rocmforge._kvcache import KvCache

def pack_blocks(cache: KvCache, block_ids: Any) -> npt.NDArray[np.uint8]: ...
def unpack_blocks(cache: KvCache, block_ids: Any, packed: npt.NDArray[np.uint8]) -> None: ...
def copy_device_blocks(src: KvCache, src_block_ids: Any, dst: KvCache, dst_block_ids: Any) -> None: ...
