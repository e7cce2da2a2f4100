# cython: language_level=3
# copy_blocks' pairs on their way to the GPU: one pass that tells whether they
# may all run in one launch, and puts them in the order of their source blocks.
# In one launch the pairs' thread blocks start in the order of the pairs; sorted
# by source, the copies in flight at any moment read neighbouring blocks. On the
# H200, 1,024 scattered pairs of 32 KiB blocks in 16 caches (512 MiB) took
# 265.2-266.5 us sorted against 268.9-270.0 us as given (CUPTI, two runs). This
# pass costs 9-12 us of host time for those pairs on the H200's host, where
# the numpy chain test it replaces cost 44-47 (numpy's argsort alone: about 20
# on the 2-core machine).

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

cdef enum:
    PAIRS_ORDERED = 0       # out holds every pair, by source block
    PAIRS_OUTSIDE = 1       # an id outside [0, num_blocks) (a host-tier slot or a bad id)
    PAIRS_CHAIN = 2         # a block is both read and written, or written twice
    PAIRS_NO_ROOM = 3       # more than 2**28 pairs, or no memory for the scratch table

cdef enum:
    _READ = 1
    _WRITTEN = 2


cdef inline uint64_t* _entry(uint64_t* table, int bits, int32_t b) noexcept nogil:
    """Block b's entry ((b + 1) << 2 | its marks; 0 where empty) in an
    open-addressing table of 2**bits entries."""
    cdef uint32_t mask = (1u << bits) - 1, h = (<uint32_t>b * 2654435769u) >> (32 - bits)
    cdef uint64_t key = <uint64_t>b + 1
    while table[h] != 0 and table[h] >> 2 != key:
        h = (h + 1) & mask
    if table[h] == 0:
        table[h] = key << 2
    return &table[h]


cdef inline int order_pairs(const int32_t* pairs, int32_t* out, Py_ssize_t n, int32_t num_blocks) noexcept nogil:
    """Put the n (src, dst) pairs into out, grouped by src >> shift (the
    smallest shift that makes at most n groups), in their given order within a
    group, when no pair reads or writes a block an earlier pair writes, or
    writes a block an earlier pair reads: then every order gives the same
    result. Otherwise out is left unfinished and the status says why."""
    cdef Py_ssize_t i, j
    cdef int bits = 1, shift = 0, status = PAIRS_ORDERED
    cdef int64_t b, buckets
    cdef uint64_t* src_entry
    cdef uint64_t* dst_entry
    cdef uint64_t* table
    cdef int64_t* starts
    if n > (1 << 28):
        return PAIRS_NO_ROOM
    for i in range(2 * n):
        if pairs[i] < 0 or pairs[i] >= num_blocks:
            return PAIRS_OUTSIDE
    while (<int64_t>1 << bits) < 4 * n:            # the blocks seen fill at most half of it
        bits += 1
    while ((num_blocks - 1) >> shift) >= n and n > 0:
        shift += 1
    buckets = ((num_blocks - 1) >> shift) + 1
    table = <uint64_t*>calloc(<size_t>1 << bits, sizeof(uint64_t))
    starts = <int64_t*>calloc(buckets + 1, sizeof(int64_t))
    if table == NULL or starts == NULL:
        status = PAIRS_NO_ROOM
    else:
        for i in range(n):
            src_entry = _entry(table, bits, pairs[2 * i])
            dst_entry = _entry(table, bits, pairs[2 * i + 1])
            if src_entry[0] & _WRITTEN or dst_entry[0] & (_READ | _WRITTEN):
                status = PAIRS_CHAIN
                break
            src_entry[0] |= _READ
            dst_entry[0] |= _WRITTEN
    if status == PAIRS_ORDERED:
        for i in range(n):
            starts[(pairs[2 * i] >> shift) + 1] += 1
        for b in range(buckets):
            starts[b + 1] += starts[b]
        for i in range(n):
            j = starts[pairs[2 * i] >> shift]
            starts[pairs[2 * i] >> shift] += 1
            out[2 * j], out[2 * j + 1] = pairs[2 * i], pairs[2 * i + 1]
    free(table)
    free(starts)
    return status
