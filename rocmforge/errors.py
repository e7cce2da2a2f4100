"""Exception types raised by rocmforge.

Every error derives from :class:`KvCacheError`. Errors about bad arguments also
derive from the matching built-in (``TypeError``/``ValueError``/``LookupError``)
so generic handlers keep working. A call that raises leaves the manager's state
exactly as it was before the call.
"""


class KvCacheError(Exception):
    """Base class of every rocmforge error."""


class OutOfBlocks(KvCacheError):
    """Not enough free blocks, even after the eviction the manager may do."""


class SequenceNotFound(KvCacheError, LookupError):
    """The named sequence id is not in the manager."""


class SequenceExists(KvCacheError, ValueError):
    """A sequence with that id already exists."""


class BlockNotFound(KvCacheError, LookupError):
    """A block id outside ``[0, num_blocks)``."""


class RefcountError(KvCacheError):
    """A reference count would underflow or overflow, or the block is free."""


class InvalidConfiguration(KvCacheError, ValueError):
    """A configuration or pool-size value is out of range."""


class ArgumentTypeError(KvCacheError, TypeError):
    """An argument has the wrong type, dtype or shape."""


class ArgumentValueError(KvCacheError, ValueError):
    """An argument has the right type but a value out of range."""


class InvariantError(KvCacheError, AssertionError):
    """``check_invariants()`` found the core inconsistent (a bug in rocmforge)."""


__all__ = [
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


class DeviceError(KvCacheError):
    """The GPU runtime failed or is unavailable. ``code`` is rocmforge's status;
    ``runtime_code`` the HIP/CUDA error code when the runtime itself failed."""

    def __init__(self, message, code=None, runtime_code=None):
        super().__init__(message)
        self.code = code
        self.runtime_code = runtime_code
