"""rocmforge as the KV cache of Hugging Face transformers models.

``RocmforgeCache(model, num_blocks=4096, block_size=16, attention="auto")`` is a
transformers ``Cache``: pass it to ``model.generate(..., past_key_values=cache)``
(or ``cache=cache`` on releases that renamed the argument: ``cache_kwarg``).
Each batch row is one rocmforge sequence in a ``KvCache``; new K/V go in with
``write_kv``. ``attention_path`` says how attention reads the rows' blocks:
"paged" (the default on a GPU) sets the model to the attention function
"rocmforge", which runs paged_decode / paged_prefill over the blocks in place
(a prompt with nothing cached before it goes through SDPA over its own K/V),
and rows hold only their real tokens (the attention mask's ones); "gather" (the
default elsewhere) gathers the blocks into the [batch, heads, length, head_dim]
tensors the model's own attention takes, padding included.

The cache sees the token ids and mask each forward call gets (a forward
pre-hook on the model), so rows with the same prompt share their prompt blocks
(one row is written, the others fork it: ``num_return_sequences``), beam search
reorders rows by forking, and full blocks are kept in the prefix cache when a
generation ends. ``prepare(input_ids, attention_mask)`` before ``generate``
reuses them: every row gets its cached prefix (whole blocks, short of the last
prompt token), so the model runs only the rest. Blocks are released when the
next generation starts, on ``reset()`` and on ``close()``, and in paged mode
when a row is fed its EOS (``eos_token_id``).

Needs torch and transformers 5.x (``pip install 'rocmforge[transformers]'``);
float32, float16 and bfloat16 models (the cache stores the model's dtype, so
outputs equal ``DynamicCache``'s)."""

from __future__ import annotations

import threading

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from rocmforge._kvcache import KvCache
from rocmforge.attention import paged_decode, paged_prefill
from rocmforge.config import CacheConfig
from rocmforge.errors import ArgumentValueError

__all__ = ["RocmforgeCache", "cache_kwarg"]

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def cache_kwarg(model, cache) -> dict:
    """``{name: cache}`` for ``model.generate(**...)``: ``cache`` where the model's
    forward takes that name (transformers 5.2x renamed it), else ``past_key_values``."""
    import inspect
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


class _Layer(CacheLayerMixin):
    """One model layer's view of the RocmforgeCache."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: "RocmforgeCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.is_initialized = True
        return self.owner._update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner._length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner._length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        if self.index == 0:
            self.owner._reorder(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.index == 0:
            self.owner._reorder([i for i in range(len(self.owner._rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices) -> None:
        if self.index == 0:
            self.owner._reorder(torch.as_tensor(indices).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RocmforgeCache cannot drop tokens (assisted decoding needs a croppable cache)")


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function "rocmforge": the paged kernels over the
    RocmforgeCache whose update returned `key`; transformers' SDPA for any other
    call (another cache, no cache)."""
    cache = getattr(_ACTIVE, "cache", None)
    if cache is None or key is not cache._new_keys:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    return cache._attend(query, scaling), None


def _mask(*args, **kwargs):
    """transformers' mask function "rocmforge": none for a decode step of this
    thread's RocmforgeCache that its pre-hook set up (every layer then reads the
    rows' blocks with the paged kernels, which take lengths, not masks); SDPA's
    mask for anything else (a prompt, whose layers fall back to SDPA)."""
    cache = getattr(_ACTIVE, "cache", None)
    if cache is not None and cache._stepped and cache._length > 0:
        return None
    return sdpa_mask(*args, **kwargs)


_ACTIVE = threading.local()      # .cache: the paged-mode RocmforgeCache whose forward runs in this thread


ALL_ATTENTION_FUNCTIONS.register("rocmforge", _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("rocmforge", _mask)


class RocmforgeCache(Cache):
    """A transformers Cache backed by a rocmforge KvCache (see the module)."""

    def __init__(self, model, num_blocks: int = 4096, block_size: int = 16, device: str | None = None,
                 attention: str = "auto", eos_token_id=None):
        """``attention``: "paged", "gather", or "auto" (paged on a GPU). ``eos_token_id``
        (an id or several; paged mode): a row fed one has finished, and its blocks go back."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        dtype = _DTYPES.get(model.dtype)
        if dtype is None:
            raise ArgumentValueError(f"RocmforgeCache stores float32, float16 or bfloat16, not {model.dtype}")
        if attention not in ("auto", "gather", "paged"):
            raise ArgumentValueError(f"attention must be 'auto', 'gather' or 'paged', not {attention!r}")
        device = device or ("cpu" if model.device.type == "cpu" else f"{model.device.type}:{model.device.index or 0}")
        self.attention_path = ("paged" if device != "cpu" else "gather") if attention == "auto" else attention
        self._eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
        if self._eos and self.attention_path != "paged":
            raise ArgumentValueError("eos_token_id releases finished rows in paged mode only (attention='paged')")
        self.num_layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv = KvCache(CacheConfig(self.num_layers, heads, head_dim, block_size=block_size,
                                      num_blocks=num_blocks, dtype=dtype), device, enable_prefix_caching=True)
        super().__init__(layers=[_Layer(self, i) for i in range(self.num_layers)])
        self.block_size = block_size
        self._rows: list = []               # rocmforge sequence id of each batch row (None: a twin to fork)
        self._twin: dict = {}               # row -> the row it will fork once that one has its prompt
        self._fresh: set = set()            # rows whose sequence the first forward adds, tokens and all
        self._done: set = set()             # rows fed their EOS: an empty sequence stands in
        self._prepared = None               # prepare()'s rows, the tokens the first forward must bring
        self._length = 0                    # positions every row holds
        self._target = 0                    # positions every row holds once this forward is done
        self._next_id = 0
        self._tokens = self._mask = None    # token ids and attention mask of the forward call under way
        self._stepped = False               # its decode step is set up already (by the pre-hook)
        self._slots = None                  # where this forward's new K/V go, shared by the layers
        self._writes = None                 # which of this forward's [batch * new] K/V rows are written
        self._tables = None                 # this forward's block tables, on the model's device
        self._lens = self._queries = None   # paged mode: each row's length; prefill's query rows
        self._max_len = 0
        self._steps = None                  # paged decode steps' tables and lengths, kept (see _decode_upload)
        self._new_keys, self._layer = None, 0   # paged mode: this layer's update, for _attention
        self.model_tokens = 0               # token positions the model computed, all rows, all calls
        self._views = [(torch.from_dlpack(self.kv.key_cache(i)), torch.from_dlpack(self.kv.value_cache(i)))
                       for i in range(self.num_layers)]
        self._model, self._restore = model, None
        if self.attention_path == "paged":  # rows hold their real tokens only; the kernels read the blocks
            self._restore = config._attn_implementation
            model.set_attn_implementation("rocmforge")
        self._hook = model.register_forward_pre_hook(self._see_inputs, with_kwargs=True)

    # ---- the batch's sequences -------------------------------------------------------------------

    def _see_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._tokens = ids if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        _ACTIVE.cache = self if self.attention_path == "paged" else None
        # A decode step of this cache is set up now, before the model queues its work: reading
        # the new tokens then waits for no kernel, and the tables go over while the GPU is idle.
        batch = len(ids) if self._tokens is not None else -1
        self._stepped = kwargs.get("past_key_values", kwargs.get("cache")) is self and self._decode_ready(batch) \
            and self._decode_step(batch, self._tokens.device)

    def _decode_ready(self, batch: int) -> bool:
        """Whether this forward can be the usual decode step: token ids for one new
        position of each of the batch's rows, which all exist already."""
        return self._tokens is not None and self._tokens.shape == (batch, 1) and len(self._rows) == batch \
            and not self._twin and not self._fresh and self._prepared is None and self._target == self._length

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _release(self) -> None:
        m = self.kv.manager
        if self._target > self._length and m.enable_prefix_caching:
            # The last forward raised before its last layer: blocks it completed may be
            # cached without every layer's K/V. Every block this generation filled
            # (past its rows' prefix hits) leaves the cache; other prefixes stay.
            bs = m.block_size
            m.uncache_blocks(np.concatenate([np.zeros(0, np.int32)] + [
                m.block_table(sid)[m.num_cached_tokens(sid) // bs:]
                for sid in self._rows if sid is not None and sid in m]))
        for sid in self._rows:
            if sid is not None and sid in m:   # (a fresh row's sequence is added by its first forward)
                m.remove_sequence(sid)
        self._rows, self._twin, self._fresh, self._done, self._length, self._target = [], {}, set(), set(), 0, 0
        self._steps = None

    def prepare(self, input_ids, attention_mask=None) -> int:
        """Start a generation of these prompts ([batch, length] token ids, padded as
        generate gets them, with their attention mask) from their cached prefix:
        returns the positions each row already holds, which generate then skips."""
        self._release()
        ids = torch.as_tensor(input_ids).cpu()
        rows = [r.tolist() for r in ids]
        width, bs, m = ids.shape[1], self.block_size, self.kv.manager
        if self.attention_path == "gather":     # rows hold their pads too: a common prefix, whole blocks
            reuse = min([m.lookup_prefix(r) for r in rows] + [max(0, (width - 1) // bs * bs)])
            self._length = reuse
            self._open(rows)
        else:                                   # rows hold their real tokens: each may skip its pads too
            mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).cpu()
            real = [[t for t, keep in zip(r, mk) if keep] for r, mk in zip(rows, mask.tolist())]
            pads = [width - len(r) for r in real]
            reuse = min([p + m.lookup_prefix(r) for p, r in zip(pads, real)] + [width - 1])
            while reuse > 0 and any(reuse > p and (reuse - p) % bs for p in pads):
                reuse -= 1                      # every row's cached part must be whole blocks
            self._length = reuse
            self._open(real, [max(0, reuse - p) for p in pads])
        self._prepared = [r[reuse:] for r in rows]
        return reuse

    def _open(self, rows, held=None) -> None:
        """A sequence per distinct row: holding its first _length tokens, or (at 0)
        added whole by the first forward, so that rows find the blocks earlier rows
        share with them in the prefix cache; a count for rows without token ids. A
        twin (the same tokens) waits to fork its first."""
        m, first = self.kv.manager, {}
        self._rows, self._twin, self._fresh, self._done = [], {}, set(), set()
        for i, r in enumerate(rows):
            key = None if r is None else np.asarray(r, dtype=np.int64).tobytes()
            if key is not None and key in first:
                self._rows.append(None)
                self._twin[i] = first[key]
                continue
            sid = self._new_id()
            have = self._length if held is None else held[i]
            if r is None:
                m.add_sequence(sid, num_tokens=have)
            elif have:
                m.add_sequence(sid, r[:have])
            else:
                self._fresh.add(i)
            if key is not None:
                first[key] = i
            self._rows.append(sid)

    def _expand(self, repeats: int) -> None:
        """Each row repeated (generate's num_return_sequences): the copies are twins."""
        rows, twin = [], {}
        for n in range(len(self._rows) * repeats):
            lead = self._twin.get(n // repeats, n // repeats) * repeats
            rows.append(self._rows[n // repeats] if n == lead else None)
            if n != lead:
                twin[n] = lead
        self._rows, self._twin = rows, twin
        self._fresh = {j * repeats for j in self._fresh}

    def _begin_forward(self, batch: int, count: int, device) -> None:
        """Layer 0 of a forward call: every row's slots for `count` new positions."""
        if self._stepped:                       # the forward's pre-hook did it
            self._stepped = False
            return
        if self._target > self._length:
            raise ArgumentValueError("the last forward through this cache raised before it finished: call reset() "
                                     "(or prepare()) before the next")
        if count == 1 and self._decode_ready(batch) and self._decode_step(batch, device):
            return
        m = self.kv.manager
        ids = self._tokens if self._tokens is not None and self._tokens.shape == (batch, count) else None
        tokens = None if ids is None else ids.cpu().numpy()     # [batch, count]: one copy, whole arrays after
        if not self._rows:
            self._open(list(tokens) if tokens is not None else [None] * batch)
        elif batch != len(self._rows) and batch % len(self._rows) == 0:
            self._expand(batch // len(self._rows))
        prepared, self._prepared = self._prepared, None
        if len(self._rows) != batch or (prepared is not None and tokens is not None and tokens.tolist() != [
                prepared[i * len(prepared) // batch] for i in range(batch)]):
            self._release()
            raise ArgumentValueError(f"generate runs other prompts than prepare() was given ({batch} rows for "
                                     f"{len(prepared or self._rows)}): the cache is reset")
        # From here on rows change one by one: until the last layer has written, the
        # forward is unfinished (a failure on the way leaves it so, for reset() to see).
        self._target = self._length + count
        # Paged mode stores a row's real positions only (its mask's ones); gather mode all of them.
        every = np.arange(count)
        keep = [every] * batch
        if self.attention_path == "paged" and self._mask is not None:
            keep = [np.flatnonzero(row) for row in self._mask[:, -count:].cpu().numpy()]
        if self._eos and tokens is not None and self._length:
            for i, sid in enumerate(self._rows):    # fed its EOS: finished; an empty sequence stands in
                if i not in self._done and sid is not None and int(tokens[i, -1]) in self._eos:
                    m.remove_sequence(sid)
                    self._rows[i] = self._new_id()
                    m.add_sequence(self._rows[i], num_tokens=0)
                    self._done.add(i)
        if self._done:
            keep = [every[:0] if i in self._done else k for i, k in enumerate(keep)]
        slots, writes = [], []
        for i, sid in enumerate(self._rows):
            if sid is None or not len(keep[i]):
                continue
            new = tokens[i, keep[i]] if tokens is not None else None
            if i in self._fresh:
                s = m.add_sequence(sid, new) if new is not None else m.add_sequence(sid, num_tokens=len(keep[i]))
                have = m.num_cached_tokens(sid)
            elif new is not None and m.sequence_info(sid)["has_tokens"]:
                s, have = m.append(sid, new), 0
            else:
                s, have = m.append(sid, len(keep[i])), 0
            slots.append(s[have:])              # cached positions hold their K/V already
            writes.append(i * count + keep[i][have:])
        for i, lead in self._twin.items():      # twins share what their first just wrote
            self._rows[i] = self._new_id()
            m.fork(self._rows[lead], self._rows[i])
        self._twin, self._fresh = {}, set()
        self.model_tokens += batch * count
        self._upload(np.concatenate(slots) if slots else np.empty(0, np.int64), device)
        writes = np.concatenate(writes) if writes else np.empty(0, np.int64)
        self._writes = None if len(writes) == batch * count else torch.from_numpy(writes).to(device)
        if self.attention_path == "paged":      # prefill's query rows: every row's real positions
            new = np.array([len(k) for k in keep])
            decode = count == 1 and all(n == 1 or i in self._done for i, n in enumerate(new))
            rows = np.concatenate([i * count + k for i, k in enumerate(keep)] or [every[:0]])
            self._queries = None if decode else (
                torch.from_numpy(np.concatenate([[0], np.cumsum(new)]).astype(np.int32)).to(device),
                torch.from_numpy(rows.astype(np.int64)).to(device))

    def _decode_step(self, batch: int, device) -> bool:
        """The usual decode step in whole-batch calls: each row not finished appends
        its one new token (one append_batch, one read of the new tokens and mask).
        False, with nothing changed, when the step needs the general path (a padding
        position, a row fed its EOS just now). Call when _decode_ready."""
        paged = self.attention_path == "paged"
        if paged and self._mask is not None:
            last = self._mask[:, -1:]
            pairs = torch.cat((self._tokens, last if last.dtype == self._tokens.dtype else last.to(self._tokens.dtype)),
                              1).tolist()
            if not all(one for _, one in pairs):
                return False
            toks = [tok for tok, _ in pairs]
        else:
            toks = self._tokens[:, 0].tolist()
        live = [i for i in range(batch) if i not in self._done]
        if self._eos and any(toks[i] in self._eos for i in live):
            return False
        m = self.kv.manager
        sids = np.array([self._rows[i] for i in live], dtype=np.int64)
        keeps = len(live) > 0 and m.sequence_info(int(sids[0]))["has_tokens"]
        slots = m.append_batch(sids, 1, np.array([toks[i] for i in live], dtype=np.int32) if keeps else None)
        self._target = self._length + 1
        self.model_tokens += batch
        if len(live) < batch or not self._decode_upload(slots):
            self._upload(slots, device)
        self._writes = None if len(live) == batch else torch.tensor(live, dtype=torch.long, device=device)
        self._queries = None
        return True

    def _upload(self, slots, device) -> None:
        """This forward's slots and block tables (paged mode: each row's length too),
        made once for every layer and copied to the model's device in one transfer."""
        m = self.kv.manager
        tables = m.block_tables(self._rows)
        if self.attention_path == "gather":     # cut to the blocks the rows now use
            tables = np.ascontiguousarray(tables[:, :-(-self._target // self.block_size)])
            lens = np.empty(0, np.int32)
        else:
            lens = np.array([m.num_tokens(sid) for sid in self._rows], dtype=np.int32)
            self._max_len = int(lens.max()) if len(lens) else 0
        n = 2 * len(slots)
        packed = torch.from_numpy(np.concatenate([np.ascontiguousarray(slots, np.int64).view(np.int32),
                                                  tables.ravel(), lens])).to(device)
        self._slots = packed[:n].view(torch.int64)
        self._tables = packed[n:n + tables.size].view(tables.shape)
        self._lens = packed[n + tables.size:]
        if self.attention_path == "paged":
            self._keep_for_steps(tables, lens, device)

    def _keep_for_steps(self, tables, lens, device) -> None:
        """The rows' tables (twice as wide, for the blocks to come) and lengths in one
        host buffer, with a device buffer and its views, for _decode_upload."""
        rows, width = tables.shape
        wide = 2 * max(width, 1)
        host = np.full(2 * rows + rows * wide + rows, -1, dtype=np.int32)
        kept = host[2 * rows:2 * rows + rows * wide].reshape(rows, wide)
        kept[:, :width] = tables
        host[2 * rows + rows * wide:] = lens
        dev = torch.empty(len(host), dtype=torch.int32, device=device)
        self._steps = (np.arange(rows), torch.from_numpy(host), host[:2 * rows].view(np.int64), kept,
                       host[2 * rows + rows * wide:], dev, dev[:2 * rows].view(torch.int64),
                       dev[2 * rows:2 * rows + rows * wide].view(rows, wide), dev[2 * rows + rows * wide:])

    def _decode_upload(self, slots) -> bool:
        """A paged decode step of every row: each row's table changes in one entry
        at most (the block of the position just appended, new or copied on write),
        so the kept host tables are updated there and go over with the slots and
        lengths in one copy into the buffer the kept views read. False when nothing
        is kept or a table outgrows its width (the next upload keeps wider ones)."""
        if self._steps is None:
            return False
        rows, host_t, host_slots, tables, lens, dev, dev_slots, dev_tables, dev_lens = self._steps
        if len(rows) != len(slots) or self._max_len // self.block_size >= tables.shape[1]:
            self._steps = None
            return False
        host_slots[:] = slots
        tables[rows, lens // self.block_size] = slots // self.block_size   # the appended positions' entries
        lens += 1
        dev.copy_(host_t)
        self._slots, self._tables, self._lens = dev_slots, dev_tables, dev_lens
        self._max_len += 1
        return True

    def _update(self, layer: int, key_states, value_states):
        batch, heads, count, dim = key_states.shape
        if layer == 0:
            self._begin_forward(batch, count, key_states.device)
        if count == 1:                          # a decode step: [batch, heads, dim] is a view
            k, v = key_states.reshape(batch, heads, dim), value_states.reshape(batch, heads, dim)
        else:
            k = key_states.transpose(1, 2).reshape(-1, heads, dim)
            v = value_states.transpose(1, 2).reshape(-1, heads, dim)
        if self._writes is not None:
            k, v = k.index_select(0, self._writes), v.index_select(0, self._writes)
        self.kv.write_kv(layer, k.contiguous(), v.contiguous(), self._slots)
        if layer == self.num_layers - 1:
            self._length = self._target
        if self.attention_path == "paged":
            # A forward with no positions before it (the prompt, unless prepare() reused a prefix)
            # attends within its own K/V: the model's SDPA over them, as with DynamicCache. Later
            # forwards return what _attention recognizes, and it reads the blocks.
            self._layer, self._new_keys = layer, None if self._target == count else key_states
            return key_states, value_states
        return self._read(layer)

    def _attend(self, query, scaling):
        """Paged attention of this forward's queries ([batch, heads, new, head_dim]) over
        the rows' blocks: [batch, new, heads, head_dim], zeros at padding positions."""
        batch, heads, count, dim = query.shape
        q = query.reshape(batch, heads, dim) if count == 1 else query.transpose(1, 2).reshape(batch * count, heads, dim)
        if self._queries is None:               # decode: one real token per row
            out = torch.empty_like(q)
            paged_decode(q.contiguous(), self.kv, self._layer, self._tables, self._lens, scale=scaling, out=out,
                         max_seq_len=self._max_len)
            return out.reshape(batch, count, heads, dim)
        starts, rows = self._queries
        picked = q.index_select(0, rows).contiguous()
        got = torch.empty_like(picked)
        paged_prefill(picked, self.kv, self._layer, self._tables, self._lens, starts, scale=scaling, out=got,
                      max_seq_len=self._max_len)
        out = torch.zeros_like(q)
        out.index_copy_(0, rows, got)
        return out.reshape(batch, count, heads, dim)

    def _read(self, layer: int):
        """Every row's K and V of `layer`, [batch, heads, length, head_dim], through the block tables."""
        kc, vc = self._views[layer]
        shape = (len(self._rows), -1, kc.shape[2], kc.shape[3])
        k = kc[self._tables].reshape(shape)[:, :self._target].transpose(1, 2)
        v = vc[self._tables].reshape(shape)[:, :self._target].transpose(1, 2)
        return k, v

    def _reorder(self, order: list[int]) -> None:
        """Rows become forks of the rows `order` names (beam search, batch selection)."""
        m = self.kv.manager
        rows = []
        try:
            for i in order:
                sid = self._new_id()
                m.fork(self._rows[i], sid)
                rows.append(sid)
        except BaseException:
            for sid in rows:                    # the rows stay as they were
                m.remove_sequence(sid)
            raise
        for sid in self._rows:
            m.remove_sequence(sid)
        self._rows = rows
        self._twin = {}
        self._steps = None
        self._done = {i for i, o in enumerate(order) if o in self._done}

    # ---- the Cache interface, and closing --------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self._rows) if self._rows else -1

    def reset(self) -> None:
        """Release every row's blocks (full prompt blocks stay in the prefix cache)."""
        self._release()
        super().reset()

    def close(self) -> None:
        """Release everything and free the storage; the model's hook is removed and
        its attention implementation restored."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._restore is not None:
            self._model.set_attn_implementation(self._restore)
            self._restore = None
        if getattr(_ACTIVE, "cache", None) is self:
            _ACTIVE.cache = None
        self._views = []
        self.kv.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
