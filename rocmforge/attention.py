"""Paged attention over a KvCache, read in place (never gathered).

``paged_decode`` attends one query token per sequence to that sequence's
cached K/V; ``paged_prefill`` attends a chunk of query tokens per sequence,
causally within the chunk, to the cached prefix and the chunk itself (whose
K/V were written first with ``write_kv``). Both run on the cache's device:
the host version on the host backend, the GPU kernels on a GPU.

Arguments:

- ``query``: ``[num_tokens, num_q_heads, head_dim]`` float32, float16 or
  bfloat16 (any DLPack array, on the cache's device); ``num_q_heads`` a
  multiple of the cache's kv heads (grouped-query attention: q head h reads
  kv head ``h // (num_q_heads // num_kv_heads)``).
- ``block_tables``: the manager's dense tables (``manager.block_tables(ids)``,
  int32 ``[num_seqs, width]`` padded with -1) or its CSR tables
  (``manager.csr_block_tables(ids)``: ``(indptr, indices, last_page_len)``;
  ``(indptr, indices)`` also works).
- ``seq_lens``: tokens of each sequence in the cache, the query tokens' own
  included (``manager.num_tokens(id)``). 0 marks a padding row: its queries
  get zeros.
- ``query_start`` (prefill): ``num_seqs + 1`` offsets; sequence s owns query
  rows ``query_start[s]:query_start[s+1]``, the last tokens of its sequence.
- ``scale``: the softmax scale, ``1 / sqrt(head_dim)`` by default. fp8/int8
  caches are read as stored value times the cache's k_scale / v_scale.
- ``out``: an array like ``query`` to write into; else a new DeviceArray.

Index arguments on the host (lists, numpy) are checked before anything runs;
a bad one raises (BlockNotFound for a block outside the pool,
ArgumentValueError for a length beyond its table). Pending copy-on-write
copies run first, so the read sees them.

On a GPU (head_dim a multiple of 8, at most 256) the work is queued on
``stream`` (None: the default stream; an int handle or a torch/cupy stream).
Host indices are uploaded and the call waits for its stream. Indices already
on the GPU (int32) are read there: nothing is allocated, copied from the host
or waited for when ``out`` is given, so the call can be captured in a CUDA
graph: warm up with one call of the same shape on the stream you then
capture on (``torch.cuda.graph(g, stream=s)``), which sizes that stream's
workspace in the cache, and apply pending copy-on-write copies before. The kernels check them on the device: a bad sequence
makes the cache's next ``synchronize()`` raise DeviceError, and its output is
undefined. Each query's context is cut into splits of 512 positions (shorter, down to
64, when a small batch would leave SMs idle), read in parallel and then
combined; the split count comes from ``max_seq_len`` (an
upper bound of seq_lens), else the host seq_lens, else the width of dense
tables (or the size of CSR tables).
"""

from rocmforge._attention import paged_attention as _paged_attention

__all__ = ["paged_decode", "paged_prefill"]


def paged_decode(query, cache, layer, block_tables, seq_lens, scale=None, out=None, stream=None, *,
                 max_seq_len=None):
    """Attention of one query token per sequence (``query[s]`` for sequence s)
    over its cached K/V of ``layer``. Returns ``out`` (or a new DeviceArray)
    shaped like ``query``. See the module's documentation for the arguments."""
    return _paged_attention(query, cache, layer, block_tables, seq_lens, None, scale, out, stream, max_seq_len)


def paged_prefill(query, cache, layer, block_tables, seq_lens, query_start, scale=None, out=None, stream=None, *,
                  max_seq_len=None):
    """Chunked prefill: the query tokens of each sequence (rows ``query_start[s]``
    to ``query_start[s+1]``, its last tokens) attend to its cached prefix and
    causally to each other. Returns ``out`` (or a new DeviceArray) shaped like
    ``query``. See the module's documentation for the arguments."""
    return _paged_attention(query, cache, layer, block_tables, seq_lens, query_start, scale, out, stream,
                            max_seq_len)
