"""rocmforge: a paged KV-cache manager for LLM inference engines."""

from rocmforge._core import BlockManager
from rocmforge._dlpack import DeviceArray
from rocmforge._kvcache import KvCache
from rocmforge._runtime import DeviceBuffer, backend_info, live_buffers
from rocmforge._tensor_parallel import TensorParallelKvCache
from rocmforge.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BlockNotFound,
    DeviceError,
    InvalidConfiguration,
    InvariantError,
    KvCacheError,
    OutOfBlocks,
    RefcountError,
    SequenceExists,
    SequenceNotFound,
)
from rocmforge.events import AllCleared, BlockRemoved, BlockStored

__version__ = "0.1.0"


def get_include():
    """Directory holding rocmforge's .pxd files and C headers, for Cython extensions that cimport rocmforge."""
    import os
    return os.path.dirname(__file__)


__all__ = [
    "BlockManager",
    "get_include",
    "KvCacheError",
    "OutOfBlocks",
    "SequenceNotFound",
    "SequenceExists",
    "BlockNotFound",
    "RefcountError",
    "InvalidConfiguration",
    "ArgumentTypeError",
    "ArgumentValueError",
    "InvariantError",
    "DeviceError",
    "DeviceBuffer",
    "DeviceArray",
    "KvCache",
    "TensorParallelKvCache",
    "backend_info",
    "live_buffers",
    "BlockStored",
    "BlockRemoved",
    "AllCleared",
]
