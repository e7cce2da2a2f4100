"""The engine layer: requests from arrival to release, continuous batching,
preemption, and bounded records of finished requests.

One thread calls ``Engine.step()``; any thread may ``submit`` and ``cancel``.
A request's KV blocks are released in the step that finishes, cancels or fails
it, always, and finished requests leave a record in a table bounded by count
and age, so an engine that runs forever keeps constant metadata. A model that
raises or breaks its return contract fails the requests of that step (each
record keeps the error) and the engine goes on serving the others.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from rocmforge._core import BlockManager
from rocmforge._kvcache import KvCache
from rocmforge.errors import ArgumentTypeError, ArgumentValueError, OutOfBlocks, SequenceExists

log = logging.getLogger("rocmforge.engine")

_INT32 = np.iinfo(np.int32)

MODEL_CONTRACT = (
    "model(batch) must return the next token id of every request in batch.sampling, in order: "
    "a 1-D integer array or list of len(batch.sampling) ids in int32 range, or an object or dict "
    "with 'tokens' (those ids) and, when the engine writes K/V into its KvCache, 'keys' and "
    "'values': one [len(batch.slots), heads, head_dim] array per layer")


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


def token_ids(obj, name="prompt_tokens") -> np.ndarray:
    """obj as a contiguous 1-D int32 array, checked as BlockManager checks tokens:
    integers only (no floats, bools or strings), every value in int32 range."""
    if obj is None or isinstance(obj, (str, bytes, dict, set)):
        raise ArgumentTypeError(f"{name} must be a 1-D array of integer token ids, got {type(obj).__name__}")
    try:
        arr = np.asarray(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ArgumentTypeError(f"{name} must be a 1-D array of integer token ids: {exc}") from None
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise ArgumentTypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ArgumentValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < _INT32.min or hi > _INT32.max:
            bad = lo if lo < _INT32.min else hi
            raise ArgumentValueError(f"{name} holds {bad}, outside [{_INT32.min}, {_INT32.max}]")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _int(value, name, lo=None, optional=False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ArgumentValueError(f"{name} must be >= {lo}, got {value}")


@dataclass(eq=False)
class Request:
    """A generation request. The engine owns every field after ``prompt_tokens``."""

    request_id: Any
    prompt_tokens: np.ndarray
    max_new_tokens: int
    salt: Any = None
    priority: int = 0                       # lower runs first; FCFS within a priority
    eos_token_id: Optional[int] = None
    state: RequestState = RequestState.WAITING
    output_tokens: list = field(default_factory=list)
    num_computed: int = 0                   # tokens of prompt + output already in the cache
    num_cached_tokens: int = 0              # prefix-cache hits at the last admission
    num_preemptions: int = 0
    arrival_time: float = 0.0
    finish_time: float = 0.0
    seq_id: int = -1

    def __post_init__(self):
        tokens = token_ids(self.prompt_tokens)
        if tokens.size == 0:
            raise ArgumentValueError("prompt_tokens must be a non-empty 1-D array of token ids")
        _int(self.max_new_tokens, "max_new_tokens", lo=1)
        _int(self.priority, "priority")
        _int(self.eos_token_id, "eos_token_id", optional=True)
        try:
            hash(self.request_id)
        except TypeError:
            raise ArgumentTypeError(f"request_id must be hashable, got {type(self.request_id).__name__}") from None
        if self.salt is not None and (isinstance(self.salt, (bool, np.bool_))
                                      or not isinstance(self.salt, (int, np.integer, str, bytes))):
            raise ArgumentTypeError(f"salt must be None, an int, str or bytes, got {type(self.salt).__name__}")
        self.prompt_tokens = tokens

    def context(self) -> np.ndarray:
        """Prompt and output so far: what a recomputed request prefills again."""
        if not self.output_tokens:
            return self.prompt_tokens
        return np.concatenate([self.prompt_tokens, np.asarray(self.output_tokens, dtype=np.int32)])

    @property
    def context_len(self) -> int:
        return len(self.prompt_tokens) + len(self.output_tokens)

    def context_slice(self, start: int, stop: int) -> np.ndarray:
        """context()[start:stop] without building the whole context (a decode step needs one token)."""
        p = len(self.prompt_tokens)
        if start >= p:
            return np.asarray(self.output_tokens[start - p:stop - p], dtype=np.int32)
        return self.context()[start:stop]


@dataclass(frozen=True)
class FinishedRecord:
    """What is kept of a request that left the engine: its state (FINISHED,
    CANCELLED or FAILED) and, for FAILED, the error as "Type: message"."""

    request_id: Any
    state: RequestState
    prompt_len: int
    output_tokens: tuple
    num_cached_tokens: int
    num_preemptions: int
    arrival_time: float
    finish_time: float
    error: Optional[str] = None


@dataclass
class SchedulerConfig:
    """max_num_seqs: running requests at most; max_tokens_per_step: the step's
    token budget (prompts are prefilled in chunks within it); preemption:
    "recompute", or "swap" to host memory (a KvCache is needed);
    max_finished / finished_ttl: the bound on finished records (count, seconds)."""

    max_num_seqs: int = 256
    max_tokens_per_step: int = 8192
    preemption: str = "recompute"
    max_finished: int = 10_000
    finished_ttl: float = 600.0
    growth_reserve: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.growth_reserve, (int, float)) and 0 <= self.growth_reserve <= 1):
            raise ArgumentValueError(f"growth_reserve must be in [0, 1], got {self.growth_reserve!r}")
        for name in ("max_num_seqs", "max_tokens_per_step", "max_finished"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.preemption not in ("recompute", "swap"):
            raise ArgumentValueError(f"preemption must be 'recompute' or 'swap', got {self.preemption!r}")
        if not self.finished_ttl > 0:
            raise ArgumentValueError("finished_ttl must be > 0 seconds")


@dataclass
class Batch:
    """One step's work: for each scheduled request, its new tokens and their
    cache slots; ``sampling`` lists the requests whose context is complete
    after this step, in order: the model returns one new token for each."""

    requests: list
    num_new_tokens: list
    slots: np.ndarray
    sampling: list


class Scheduler:
    """The scheduling half of the engine: the waiting, running and swapped
    queues, and each step's decisions (who gets tokens, who is admitted, who
    is preempted). Single-threaded: the Engine's stepping thread drives it."""

    def __init__(self, manager, cache, config: SchedulerConfig, counters: dict):
        self.manager, self.cache, self.config, self.counters = manager, cache, config, counters
        self.waiting: list = []                 # admission order: (priority, arrival)
        self.running: list = []
        self.swapped: list = []
        self.failed: list = []                  # (request, exception) for the engine to finish
        self._next_seq = 0

    def add(self, arrivals) -> None:
        if arrivals:
            self.waiting.extend(arrivals)
            self.waiting.sort(key=lambda r: (r.priority, r.arrival_time))

    def remove(self, request_ids) -> list:
        """Take the named requests out of every queue; returns them."""
        out = [r for q in (self.waiting, self.running, self.swapped) for r in q if r.request_id in request_ids]
        for queue in (self.waiting, self.running, self.swapped):
            queue[:] = [r for r in queue if r.request_id not in request_ids]
        return out

    def schedule(self, budget) -> list:
        """This step's work, [(request, slots of its new tokens)]: running requests
        first, then swapped-in and newly admitted ones, within the token budget."""
        self._reclaim_evicted(())
        work = self._place_running(budget)
        work += self._admit(budget - sum(len(w[1]) for w in work), work)
        return self._reclaim_evicted(work)          # evict_sequences may have taken some

    def retire(self) -> None:
        """Drop finished requests from the running queue."""
        self.running = [r for r in self.running if r.state is RequestState.RUNNING]

    def _reclaim_evicted(self, work) -> list:
        """Running requests whose sequences the manager evicted (evict_sequences=True)
        are preempted for recompute and leave this step's work."""
        evicted = set(self.manager.take_evicted().tolist())
        if not evicted:
            return list(work)
        for req in self.running:
            if req.seq_id in evicted:
                self._preempted(req, swapped=False)
                self.counters["evictions"] += 1
        self.retire()
        return [w for w in work if w[0].seq_id not in evicted]

    def _place_running(self, budget) -> list:
        """Slots for every running request's next tokens (one for decode, a chunk for
        a prefill in progress), preempting the least recently used request while the
        blocks do not suffice."""
        while self.running:
            reqs, want, left = [], [], budget
            for req in self.running:
                n = min(req.context_len - req.num_computed, left)
                if n > 0:
                    reqs.append(req)
                    want.append(n)
                    left -= n
            if not reqs:
                return []
            ids = np.array([r.seq_id for r in reqs], dtype=np.int64)
            tokens = np.concatenate([r.context_slice(r.num_computed, r.num_computed + n) for r, n in zip(reqs, want)])
            try:
                slots = self.manager.append_batch(ids, np.array(want, dtype=np.int32), tokens)
            except OutOfBlocks as exc:
                if len(self.running) == 1:      # nobody to give way: blocks are held outside the engine
                    self.failed.append((self.running.pop(), exc))
                    return []
                self._preempt_one()
                continue
            except Exception as exc:            # e.g. no host memory: the batch appended nothing, and fails
                self.failed += [(r, exc) for r in reqs]
                self.running = [r for r in self.running if r not in reqs]
                return []
            return list(zip(reqs, np.split(slots, np.cumsum(want)[:-1])))
        return []

    def _fits(self, req, context) -> bool:
        """Admission's test: the whole context and the growth_reserve share of its
        output fit in the free blocks, beside what every running request has yet
        to take: the rest of its prompt, one growing block, and the same share of
        its output to come. Prefix hits count as taken: evictable cached blocks
        are among the free ones and leave them when reused. A request admitted
        into a cache too small for it would only be preempted again."""
        bs, share = self.manager.block_size, self.config.growth_reserve
        need = -(-(len(context) + int(share * (req.max_new_tokens - len(req.output_tokens)))) // bs)
        reserved = len(self.running)
        for r in self.running:                  # what they have yet to take: prompt chunks, then output
            end = r.context_len + int(share * (r.max_new_tokens - len(r.output_tokens)))
            reserved += -(-end // bs) - (-(-r.num_computed // bs))
        return need <= self.manager.num_free_blocks - reserved

    def _add_sequence(self, req, tokens):
        """add_sequence under a sequence id no one else holds in the manager: the
        engine shares it with its user, who may add sequences of their own."""
        while True:
            if req.seq_id < 0 or req.seq_id in self.manager:
                while self._next_seq in self.manager:
                    self._next_seq += 1
                req.seq_id = self._next_seq
                self._next_seq += 1
            try:
                return self.manager.add_sequence(req.seq_id, tokens, salt=req.salt)
            except SequenceExists:              # taken by another thread since the check
                continue

    def _preempt_one(self) -> None:
        running = {r.seq_id: r for r in self.running}
        victim = next(running[s] for s in self.manager.sequence_ids().tolist() if s in running)
        swap = self.config.preemption == "swap"
        if swap:
            try:
                self.cache.swap_out([victim.seq_id])
            except (MemoryError, OSError) as exc:     # no host memory: recompute it instead
                log.warning("swap_out of request %r failed (%s); recomputing it", victim.request_id, str(exc))
                swap = False
        if not swap:
            self.manager.remove_sequence(victim.seq_id)
        self._preempted(victim, swapped=swap)
        self.running = [r for r in self.running if r is not victim]

    def _preempted(self, req, swapped) -> None:
        req.state = RequestState.PREEMPTED
        req.num_preemptions += 1
        self.counters["preemptions"] += 1
        if swapped:
            self.swapped.append(req)
        else:
            req.num_computed = 0
            self.waiting.insert(0, req)         # first in line when blocks free up

    def _written_hits(self, slots, cached, filling) -> int:
        """Of the cached leading tokens of a sequence just added (at slots), those
        whose K/V is in the cache: a hit on a block that this step fills (a request
        placed or admitted before it completed the block) is none yet, since that
        K/V is written only when the model returns. filling: the slots of this
        step's new K/V so far."""
        bs = self.manager.block_size
        if not cached or not filling:
            return cached
        first = np.flatnonzero(np.isin(slots[:cached:bs] // bs, np.concatenate(filling) // bs))
        return int(first[0]) * bs if len(first) else cached

    def _admit(self, budget, placed) -> list:
        """Bring back swapped requests, then admit waiting ones in order while the
        blocks, the token budget and max_num_seqs allow (prefix hits need no blocks,
        and count only once written: see _written_hits). placed: the running
        requests' work of this step."""
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            req = self.swapped[0]
            try:
                self.cache.swap_in([req.seq_id])
            except OutOfBlocks:
                return []
            except Exception as exc:            # the host copy cannot come back: fail the request
                self.swapped.pop(0)
                self.failed.append((req, exc))
                continue
            self.swapped.pop(0)
            req.state = RequestState.RUNNING
            self.running.append(req)
        work, filling = [], [w[1] for w in placed]
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            context = req.context()
            n = min(len(context), budget)
            if self.running and not self._fits(req, context):
                break
            try:
                slots = self._add_sequence(req, context[:n])
            except OutOfBlocks:
                break
            except Exception as exc:            # e.g. no host memory: it was not added, and fails
                self.waiting.pop(0)
                self.failed.append((req, exc))
                continue
            self.waiting.pop(0)
            cached = self._written_hits(slots, self.manager.num_cached_tokens(req.seq_id), filling)
            req.num_cached_tokens = cached
            self.counters["prefix_hit_tokens"] += cached
            self.counters["prefix_query_tokens"] += len(context)
            if req.num_preemptions == 0:
                self.counters["prompt_tokens"] += len(req.prompt_tokens)
            req.state = RequestState.RUNNING
            self.running.append(req)
            # cached tokens need no compute; the last one is kept when all are cached,
            # so that the model sees the context and samples (it rewrites the same K/V)
            skip = min(cached, n - 1)
            req.num_computed += skip
            work.append((req, slots[skip:]))
            filling.append(slots[cached:])      # (not the last hit token, which is written again as it was)
            budget -= n - skip
        return work


class Engine:
    """Continuous batching over a KvCache (K/V written when the model returns
    them) or a bare BlockManager (bookkeeping only).

    ``model(batch)`` returns the new token ids of ``batch.sampling``, or an
    object or dict with ``tokens`` and per-layer ``keys`` / ``values`` ([T,
    heads, head_dim] for the batch's T slots) for the engine to write (see
    MODEL_CONTRACT). With ``model_writes_kv=True`` the model writes K/V into
    the KvCache itself and returns the tokens alone. A model that raises or
    breaks the contract fails the step's requests; the engine keeps serving."""

    def __init__(self, cache, model: Callable[[Batch], Any], config: Optional[SchedulerConfig] = None, *,
                 model_writes_kv: bool = False):
        if isinstance(cache, KvCache):
            self.cache, self.manager = cache, cache.manager
        elif isinstance(cache, BlockManager):
            self.cache, self.manager = None, cache
        else:
            raise ArgumentTypeError(f"cache must be a KvCache or BlockManager, got {type(cache).__name__}")
        if not callable(model):
            raise ArgumentTypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.model_writes_kv = bool(model_writes_kv)
        self.config = config or SchedulerConfig()
        if not isinstance(self.config, SchedulerConfig):
            raise ArgumentTypeError(f"config must be a SchedulerConfig, got {type(self.config).__name__}")
        if self.config.preemption == "swap" and self.cache is None:
            raise ArgumentValueError("swap preemption needs a KvCache (host memory to swap to)")
        self._lock = threading.Lock()           # guards the inbox, cancels and the live table
        self._inbox: list = []
        self._cancels: set = set()
        self._live: dict = {}                   # request_id -> Request, not yet finished
        self.finished: OrderedDict = OrderedDict()
        self.counters = dict(steps=0, submitted=0, finished=0, cancelled=0, failed=0, preemptions=0,
                             evictions=0, prompt_tokens=0, generated_tokens=0, computed_tokens=0, prefix_hit_tokens=0,
                             prefix_query_tokens=0)
        self.scheduler = Scheduler(self.manager, self.cache, self.config, self.counters)
        self.step_times = deque(maxlen=4096)

    @property
    def waiting(self) -> list:
        return self.scheduler.waiting

    @property
    def running(self) -> list:
        return self.scheduler.running

    @property
    def swapped(self) -> list:
        return self.scheduler.swapped

    # ---- any thread ----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (admitted at the next step). Raises ArgumentValueError for an id in use."""
        if not isinstance(request, Request):
            raise ArgumentTypeError(f"expected a Request, got {type(request).__name__}")
        bs = self.manager.block_size
        if -(-(len(request.prompt_tokens) + request.max_new_tokens) // bs) > self.manager.num_blocks:
            raise ArgumentValueError(f"request {request.request_id!r} needs more blocks than the cache has")
        with self._lock:
            if request.request_id in self._live:
                raise ArgumentValueError(f"request {request.request_id!r} is already in the engine")
            request.arrival_time = time.monotonic()
            self._live[request.request_id] = request
            self._inbox.append(request)

    def cancel(self, request_id) -> bool:
        """Cancel a request not yet finished: released at the next step. False if unknown."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._cancels.add(request_id)
            return True

    # ---- the stepping thread ----------------------------------------------------------------------

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._live)

    def step(self) -> list:
        """Schedule, run the model once, append and write, finish and release.
        Returns the requests finished, cancelled or failed in this step."""
        t0 = time.perf_counter()
        done = self._take_inbox_and_cancels()
        try:
            work = self.scheduler.schedule(self.config.max_tokens_per_step)
            done += self._take_failed()
            if work:
                done += self._run_step(work)
        finally:
            self.scheduler.retire()
            self._purge_finished()
            self.counters["steps"] += 1
            self.step_times.append(time.perf_counter() - t0)
        return done

    def _run_step(self, work) -> list:
        for req, new in work:
            req.num_computed += len(new)
        sampling = [r for r, _ in work if r.num_computed == r.context_len]
        batch = Batch([w[0] for w in work], [len(w[1]) for w in work], np.concatenate([w[1] for w in work]),
                      sampling)
        self.counters["computed_tokens"] += len(batch.slots)
        try:
            tokens = self._run_model(batch)
        except BaseException as exc:            # the step's requests fail; even Ctrl-C leaves the engine whole
            failed = self._fail_step(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return failed
        done = []
        for req, token in zip(sampling, tokens):
            req.output_tokens.append(token)
            self.counters["generated_tokens"] += 1
            if len(req.output_tokens) >= req.max_new_tokens or token == req.eos_token_id:
                self._finish(req, RequestState.FINISHED)
                done.append(req)
        return done

    def _run_model(self, batch) -> list:
        """The model's output checked against MODEL_CONTRACT, K/V written; the sampled tokens.
        Pending copies (prefix blocks coming back from the host tier) land first, so a
        model that reads the storage with kernels of its own finds every block in place."""
        if self.cache is not None:
            self.cache.apply_pending_copies()
        out = self.model(batch)
        if isinstance(out, Mapping):
            tokens, keys, values = out.get("tokens"), out.get("keys"), out.get("values")
        elif hasattr(out, "tokens"):
            tokens, keys, values = out.tokens, getattr(out, "keys", None), getattr(out, "values", None)
        else:
            tokens, keys, values = out, None, None
        if tokens is None:
            raise ArgumentValueError(f"the model returned no tokens. {MODEL_CONTRACT}")
        try:
            ids = token_ids(tokens, "the model's tokens")
        except (ArgumentTypeError, ArgumentValueError) as exc:
            raise type(exc)(f"{exc}. {MODEL_CONTRACT}") from None
        if len(ids) != len(batch.sampling):
            raise ArgumentValueError(f"the model returned {len(ids)} tokens for {len(batch.sampling)} "
                                     f"requests in batch.sampling. {MODEL_CONTRACT}")
        writes = self.cache is not None and not self.model_writes_kv
        if (keys is None) != (values is None):
            raise ArgumentValueError(f"the model returned keys without values or values without keys. "
                                     f"{MODEL_CONTRACT}")
        if keys is not None and not writes:
            raise ArgumentValueError("the model returned K/V, but " + (
                "the engine runs on a bare BlockManager: there is no KvCache to write them to"
                if self.cache is None else "model_writes_kv=True says the model writes them itself") +
                f". {MODEL_CONTRACT}")
        if writes:
            if keys is None:
                raise ArgumentValueError(f"the model returned no K/V for the engine to write (pass "
                                         f"model_writes_kv=True if it writes them itself). {MODEL_CONTRACT}")
            keys, values = list(keys), list(values)
            layers = self.cache.num_layers
            if len(keys) != layers or len(values) != layers:
                raise ArgumentValueError(f"the model returned K/V for {len(keys)}/{len(values)} layers; the "
                                         f"cache has {layers}. {MODEL_CONTRACT}")
            for layer in range(layers):
                self.cache.write_kv(layer, keys[layer], values[layer], batch.slots)
        return ids.tolist()

    def _fail_step(self, batch, exc) -> list:
        """The step's requests fail with exc and their blocks are released now. First
        the blocks this step was to fill leave the prefix cache: completed in this
        step, they may be cached without the K/V the model never wrote. Blocks
        written in earlier steps, and prefix hits, stay cached."""
        # the traceback as text: a record that held the exception would keep the
        # batch's frames (and their K/V arrays) alive in any handler that buffers it
        reqs = batch.requests
        log.warning("model failed on a step of %d requests; they fail\n%s", len(reqs),
                    "".join(traceback.format_exception(exc)).rstrip())
        try:
            if self.manager.enable_prefix_caching:
                bs = self.manager.block_size
                self.manager.uncache_blocks(np.concatenate([np.zeros(0, np.int32)] + [
                    self.manager.block_table(r.seq_id)[max(r.num_computed - n, r.num_cached_tokens) // bs:]
                    for r, n in zip(reqs, batch.num_new_tokens)]))
        finally:                                # (uncaching can only fail for want of host memory)
            for req in reqs:
                self._finish(req, RequestState.FAILED, exc)
        return reqs

    def _take_failed(self) -> list:
        failed, self.scheduler.failed = self.scheduler.failed, []
        for req, exc in failed:
            log.warning("request %r fails: %s", req.request_id, str(exc))
            self._finish(req, RequestState.FAILED, exc)
        return [req for req, _ in failed]

    def _take_inbox_and_cancels(self) -> list:
        with self._lock:
            arrivals, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        self.counters["submitted"] += len(arrivals)
        self.scheduler.add(arrivals)
        done = self.scheduler.remove(cancels) if cancels else []
        for req in done:
            self._finish(req, RequestState.CANCELLED)
        return done

    def _finish(self, req, state, error=None) -> None:
        """Release the request's blocks now and keep a bounded record of it."""
        if req.seq_id >= 0 and req.state is RequestState.RUNNING and req.seq_id in self.manager:
            self.manager.remove_sequence(req.seq_id)
        elif self.cache is not None and req.seq_id in self.cache.swapped_sequences():
            self.cache.drop_swapped([req.seq_id])
        req.state = state
        req.finish_time = time.monotonic()
        self.counters[state.value] += 1
        with self._lock:
            self._live.pop(req.request_id, None)
        reason = None if error is None else f"{type(error).__name__}: {error}"
        self.finished[req.request_id] = FinishedRecord(
            req.request_id, state, len(req.prompt_tokens), tuple(req.output_tokens), req.num_cached_tokens,
            req.num_preemptions, req.arrival_time, req.finish_time, reason)
        self.finished.move_to_end(req.request_id)

    def _purge_finished(self) -> None:
        """Oldest records first: beyond max_finished, or older than finished_ttl."""
        limit = time.monotonic() - self.config.finished_ttl
        while self.finished:
            oldest = next(iter(self.finished.values()))
            if len(self.finished) <= self.config.max_finished and oldest.finish_time >= limit:
                break
            self.finished.popitem(last=False)

    # ---- metrics --------------------------------------------------------------------------------

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache at admission, over all admitted."""
        query = self.counters["prefix_query_tokens"]
        return self.counters["prefix_hit_tokens"] / query if query else 0.0

    def metrics(self) -> dict:
        """Counters and gauges: running, waiting, swapped, finished, cancelled,
        failed, preemptions, evictions, prefix hit rate, block usage, step time percentiles (seconds)."""
        m = self.manager
        times = np.array(self.step_times) if self.step_times else np.zeros(1)
        used = m.num_used_blocks
        return {
            **self.counters,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "swapped": len(self.swapped),
            "finished_records": len(self.finished),
            "prefix_hit_rate": self.prefix_hit_rate,
            "blocks_used": used,
            "blocks_total": m.num_blocks,
            "block_usage": used / m.num_blocks,
            "step_time_p50": float(np.percentile(times, 50)),
            "step_time_p99": float(np.percentile(times, 99)),
        }

    def metrics_text(self) -> str:
        """metrics() in the Prometheus text exposition format."""
        lines = []
        for name, value in self.metrics().items():
            kind = "counter" if name in self.counters else "gauge"
            lines.append(f"# TYPE rocmforge_{name} {kind}")
            lines.append(f"rocmforge_{name} {float(value):.9g}")
        return "\n".join(lines) + "\n"
