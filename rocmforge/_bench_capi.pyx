# cython: language_level=3, boundscheck=False, wraparound=False
"""Benchmark loops driven through rocmforge's C-level APIs: the allocator's
(rocmforge/_core.pxd) and KvCache's write step (write_kv_launch_ns).

An engine written in Cython (or C++ through Cython) calls the manager's
``c_*`` methods directly; these loops measure that path, the cheapest the
manager offers, without Python's per-call cost. Each runs the same work as
its Python twin in bench_allocator.py, checks every status, and returns
nanoseconds per operation.
"""

from libc.stdint cimport int32_t, int64_t, uint64_t, INT64_MAX
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import numpy as np

from rocmforge._core cimport BlockManager, ErrInfo, RF_OK, raise_status
from rocmforge._dlpack cimport DT_BF16, DT_F16, DT_F32
from rocmforge._kvcache cimport KvCache
from rocmforge._runtime cimport check


cdef inline double _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec * 1e9 + <double>ts.tv_nsec


def alloc_free_batch(BlockManager m, long rounds, int32_t batch):
    """ns per block of c_allocate(batch) + c_decref of the same ids (batch 1 is
    alloc_free_single: ns per pair)."""
    cdef int32_t[::1] buf = np.empty(batch, dtype=np.int32)
    cdef ErrInfo err
    cdef long i
    cdef int st = RF_OK
    cdef double t
    with nogil:
        t = _now_ns()
        for i in range(rounds):
            st = m.c_allocate(batch, &buf[0], &err)
            if st != RF_OK:
                break
            st = m.c_decref(&buf[0], batch, &err)
            if st != RF_OK:
                break
        t = _now_ns() - t
    if st != RF_OK:
        raise_status(st, &err)
    return t / (rounds * batch)


def prefix_touch(BlockManager m, int32_t[:, ::1] prompts, long rounds):
    """ns per block of c_acquire_prefix on a cached prompt + c_decref of its ids.
    Raises RuntimeError if a prompt was not fully cached."""
    cdef int64_t ntok = prompts.shape[1], want = ntok // m.block_size, got = 0
    cdef int32_t[::1] ids = np.empty(max(want, 1), dtype=np.int32)
    cdef Py_ssize_t nprompts = prompts.shape[0]
    cdef ErrInfo err
    cdef long i
    cdef int st = RF_OK
    cdef double t
    with nogil:
        t = _now_ns()
        for i in range(rounds):
            st = m.c_acquire_prefix(&prompts[i % nprompts, 0], ntok, 0, &ids[0], &got, &err)
            if st != RF_OK or got != want:
                break
            st = m.c_decref(&ids[0], got, &err)
            if st != RF_OK:
                break
        t = _now_ns() - t
    if st != RF_OK:
        raise_status(st, &err)
    if got != want:
        raise RuntimeError(f"prefix_touch: {got} of {want} blocks were cached")
    return t / (rounds * want)


def decode_sim(BlockManager m, int64_t[::1] ids, int64_t[::1] left, int64_t[::1] lengths,
               long steps, int64_t next_id):
    """ns per token of decode steps: one c_append_batch adding a token to every
    sequence in ids; a sequence whose `left` count runs out is removed and a new
    one (next length from `lengths`) takes its place. ids and left are updated.
    Like its Python twin's heap, the loop keeps each sequence's last step and
    looks for ended ones only at steps where one ends, so the harness's own
    bookkeeping stays out of the figure."""
    cdef Py_ssize_t n = ids.shape[0], k, used = 0
    cdef int32_t[::1] ones = np.ones(n, dtype=np.int32)
    cdef int64_t[::1] slots = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] last_step = np.asarray(left).copy()
    cdef int64_t next_end = min(left) if n else 0, step = 0
    cdef ErrInfo err
    cdef int st = RF_OK
    cdef double t
    with nogil:
        t = _now_ns()
        while step < steps:
            st = m.c_append_batch(&ids[0], &ones[0], n, False, NULL, &slots[0], &err)
            if st != RF_OK:
                break
            step += 1
            if step != next_end:
                continue
            next_end = INT64_MAX
            for k in range(n):
                if last_step[k] == step:
                    st = m.c_remove_sequence(ids[k], &err)
                    if st == RF_OK:
                        st = m.c_add_sequence(next_id, False, NULL, 0, 0, NULL, &err)
                    if st != RF_OK:
                        break
                    ids[k] = next_id
                    next_id += 1
                    last_step[k] = step + lengths[used % lengths.shape[0]]
                    used += 1
                next_end = min(next_end, last_step[k])
            if st != RF_OK:
                break
        t = _now_ns() - t
    for k in range(n):
        left[k] = last_step[k] - step
    if st != RF_OK:
        raise_status(st, &err)
    return t / (steps * n)


def write_kv_launch_ns(KvCache cache, int layer, uint64_t key, uint64_t value, uint64_t slots, int64_t num_tokens,
                       str dtype, long calls):
    """ns per write_kv from C: the cache's own write step (the kernel's arguments
    and the runtime's launch) with no Python call, argument parsing or lock, on
    the default stream: the floor under write_kv_raw. The addresses are as
    write_kv_raw takes them; the cache must be on a GPU."""
    cdef int dt = {"float32": DT_F32, "float16": DT_F16, "bfloat16": DT_BF16}[dtype]
    cdef int64_t bad = -1
    cdef long i
    cdef int st = 0
    cdef double t
    if cache._dev < 0 or not 0 <= layer < cache._num_layers or num_tokens <= 0:
        raise ValueError("a GPU cache, a layer inside it and at least one token")
    t = _now_ns()
    for i in range(calls):
        st = cache._write_rows(layer, key, value, slots, num_tokens, dt, cache._row, cache._row, NULL, &bad)
        if st != 0:
            break
    t = _now_ns() - t
    check(st, "write_kv_launch_ns")
    return t / calls
