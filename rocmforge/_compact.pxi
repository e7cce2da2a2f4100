# Included by _kvcache.pyx: compaction for one cache or every rank of a
# tensor-parallel one (declared in _kvcache.pxd).


cdef compact_ranks(list ranks, object manager, bint shrink):
    """Compact the manager and move every rank's K/V with it; with shrink, cut the
    pool and every rank's storage to the occupied blocks. All or nothing: the
    upload space for the moves and the smaller storage are had before any block
    moves, and the manager refuses (OutOfBlocks) when other threads took blocks
    since they were counted. Returns the (old, new) moves. Call with every
    rank's lock held."""
    cdef KvCache r
    for r in ranks:
        r._check_open()
    for r in ranks:
        r._apply_pending(NULL)
    occupied = max(1, manager.num_used_blocks + manager.num_evictable_blocks)
    for r in ranks:
        if r._dev >= 0:                     # room to upload the moves before any is made
            r._reserve_scratch(8 * min(occupied, r._num_blocks - occupied) + 16)
    storage = None
    if shrink and occupied < (<KvCache>ranks[0])._num_blocks:
        storage = [r._new_storage(occupied) for r in ranks]
        moves = manager.compact(num_blocks=occupied)
    else:
        moves = manager.compact()
    if len(moves):
        for r in ranks:
            r._copy_pairs(moves, NULL)
    if storage is not None:
        for r, fresh in zip(ranks, storage):
            r._install(occupied, fresh, r._buffers)
    return moves
