# Included by _kvcache.pyx: swapping for one cache or every rank of a
# tensor-parallel one (declared in _kvcache.pxd).


cdef swap_out_ranks(list ranks, object manager, dict swapped, list ids):
    """Move sequences' K/V, every rank's, to host memory (swapped[sid] = ([per
    rank packed K/V], num_tokens, tokens, salt_key)) and release their blocks.
    All named sequences must exist, and host memory must hold them all;
    nothing changes otherwise. Call with every rank's lock held."""
    cdef KvCache r
    cdef int i
    for r in ranks:
        r._check_open()
    for sid in ids:
        if sid not in manager:
            raise SequenceNotFound(f"sequence {sid} not found")
    for r in ranks:
        r._apply_pending(NULL)
    # Every host buffer first: if memory runs short, no sequence has moved.
    entries = []
    for sid in ids:
        info = manager.sequence_info(sid)
        table = np.ascontiguousarray(manager.block_table(sid), dtype=np.int32)
        hosts = [np.empty((2 * r._num_layers, len(table), r._block_bytes), dtype=np.uint8) for r in ranks]
        entries.append((sid, table, (hosts, info["num_tokens"], manager.sequence_tokens(sid), info["salt_key"])))
    for sid, table, entry in entries:
        for i in range(len(ranks)):
            (<KvCache>ranks[i])._move_blocks(True, table, entry[0][i])
        swapped[sid] = entry
        manager.remove_sequence(sid)


cdef swap_in_ranks(list ranks, object manager, dict swapped, list ids):
    """Bring swapped-out sequences back on every rank: fresh blocks (a cached prefix
    is reused), their K/V copied back. All or nothing: OutOfBlocks leaves them
    swapped out. Call with every rank's lock held."""
    cdef KvCache r
    cdef int i
    for r in ranks:
        r._check_open()
    for sid in ids:
        if sid not in swapped:
            raise SequenceNotFound(f"sequence {sid} is not swapped out")
        if sid in manager:
            raise SequenceExists(f"sequence {sid} exists")
    done, unfilled = [], None
    try:
        for sid in ids:
            hosts, num_tokens, tokens, salt_key = swapped[sid]
            if tokens is None:
                manager.add_sequence(sid, num_tokens=num_tokens)
            else:
                manager.add_sequence(sid, tokens, _salt_key=salt_key)
            done.append(sid)
            hits = manager.num_cached_tokens(sid) // manager.block_size
            unfilled = table = np.ascontiguousarray(manager.block_table(sid)[hits:], dtype=np.int32)
            for i in range(len(ranks)):
                r = ranks[i]
                r._move_blocks(False, table, np.ascontiguousarray(hosts[i][:, hits:]))
            unfilled = None
    except BaseException:
        try:
            if unfilled is not None and manager.enable_prefix_caching:
                manager.uncache_blocks(unfilled)    # cached before their K/V came back
        finally:
            for sid in done:
                manager.remove_sequence(sid)
        raise
    for sid in ids:
        del swapped[sid]


cdef drop_swapped_ids(dict swapped, list ids):
    """Forget swapped-out sequences; all must be swapped out, or nothing changes."""
    for sid in ids:
        if sid not in swapped:
            raise SequenceNotFound(f"sequence {sid} is not swapped out")
    for sid in ids:
        del swapped[sid]
