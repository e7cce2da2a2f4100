"""rocmforge: a paged KV-cache manager for LLM inference engines."""

from rocmforge._core import BlockManager
from rocmforge.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BlockNotFound,
    InvalidConfiguration,
    InvariantError,
    KvCacheError,
    OutOfBlocks,
    RefcountError,
    SequenceExists,
    SequenceNotFound,
)

__version__ = "0.1.0"

__all__ = [
    "BlockManager",
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
]
