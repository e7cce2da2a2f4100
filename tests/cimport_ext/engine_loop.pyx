# cython: language_level=3, boundscheck=False, wraparound=False
# distutils: language = c++
"""An engine-side loop written in Cython: it cimports rocmforge's manager and
drives it through the C API, without the GIL and without Python objects."""

from libc.stdint cimport int32_t, int64_t, uint64_t
from rocmforge._core cimport BlockManager, ErrInfo, RF_OK, raise_status


def decode_steps(BlockManager manager, const int64_t[::1] seq_ids, const int32_t[::1] counts,
                 int64_t[:, ::1] slots):
    """Run slots.shape[0] append_batch steps; row i of `slots` receives step i's slots."""
    cdef ErrInfo err
    cdef int status = RF_OK
    cdef Py_ssize_t step
    with nogil:
        for step in range(slots.shape[0]):
            status = manager.c_append_batch(&seq_ids[0], &counts[0], seq_ids.shape[0],
                                            False, NULL, &slots[step, 0], &err)
            if status != RF_OK:
                break
    if status != RF_OK:
        raise_status(status, &err)


def churn(BlockManager manager, int rounds):
    """Allocate one block and free it, `rounds` times; returns the sum of the ids seen."""
    cdef ErrInfo err
    cdef int status = RF_OK
    cdef int32_t block = -1
    cdef int64_t total = 0
    cdef int i
    with nogil:
        for i in range(rounds):
            status = manager.c_allocate(1, &block, &err)
            if status == RF_OK:
                status = manager.c_decref(&block, 1, &err)
            if status != RF_OK:
                break
            total += block
    if status != RF_OK:
        raise_status(status, &err)
    return total


def set_epoch(BlockManager manager, uint64_t epoch):
    """Jump the manager's operation counter (tests of its 32-bit wrap-around)."""
    manager._c.shards[0].epoch = epoch


def add_external_refs(BlockManager manager, int32_t block, int32_t count):
    """Give a block in use `count` more external references in one step, so
    tests can reach refcounts at the edge of int32 (the caller keeps the sum
    within range and takes them back with drop_external_refs)."""
    manager._c.refs[block].rc += count
    manager._c.refs[block].ext += count


def drop_external_refs(BlockManager manager, int32_t block, int32_t count):
    manager._c.refs[block].rc -= count
    manager._c.refs[block].ext -= count
