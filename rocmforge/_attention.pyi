"""Type stubs for rocmforge._attention (see rocmforge.attention)."""

from typing import Any, Optional, Sequence, Union

from rocmforge._dlpack import DeviceArray
from rocmforge._kvcache import KvCache

def paged_attention(query: Any, cache: KvCache, layer: int, block_tables: Union[Any, Sequence[Any]],
                    seq_lens: Any, query_start: Optional[Any] = None, scale: Optional[float] = None,
                    out: Optional[Any] = None, stream: Optional[Any] = None,
                    max_seq_len: Optional[int] = None) -> Union[DeviceArray, Any]: ...
