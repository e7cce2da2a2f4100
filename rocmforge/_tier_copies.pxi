# Included by _kvcache.pyx: the host tier's data path. A slot of the tier holds
# one block's K and V of every layer back to back ([caches][block bytes]), so a
# block goes to or from its slot in one piece.
#
# On a GPU each run of copies in one direction goes in batches of up to 32 MiB,
# in slot order when no block or slot appears twice in the run (so that slots
# freed in one order and filled in another still move as a few long copies),
# and the host never waits (unless all of the cache's staging buffers are busy).
# An offload packs its blocks into a staging buffer on the caller's
# stream (one kernel; the blocks may be reused right after it) and sends the
# buffer to the slots on the cache's own stream (a copy per run of consecutive
# slots). A reload brings the slots into a staging buffer on the cache's own
# stream, and the caller's stream waits for that (an event) before one kernel
# unpacks it into the blocks. Both directions go through the cache's stream in
# the order the manager queued them, so a reload sees every earlier offload. A
# staging buffer is taken again only once its event says its copies are done.

cdef int _STAGING_BUFFERS = 4       # the most a cache keeps; the oldest is waited for beyond that
cdef int64_t _BATCH_BYTES = 32 << 20    # a batch stages at most this much (or one block), so staging stays small


cdef tier_copies(KvCache c, cnp.ndarray pairs, void* stream):
    """Copies between blocks and host-tier slots, in order: (b, -1 - s) stores
    block b's K and V of every layer in slot s, (-1 - s, b) brings them back.
    Call with the lock held."""
    cdef int64_t i, k, n = pairs.shape[0], caches = c._addrs.size(), bb = c._block_bytes, blk, slot, per
    cdef const int32_t* p = <const int32_t*>cnp.PyArray_DATA(pairs)
    cdef char* host
    cdef char* dev
    cdef char* kept
    cdef bint store
    if c._host is None:
        raise KvCacheError("the manager queued host-tier copies, but this KvCache has no host_cache")
    out = pairs[:, 1] < 0
    blocks = np.where(out, pairs[:, 0], pairs[:, 1])
    tier = -1 - np.where(out, pairs[:, 1], pairs[:, 0])
    bad_pairs = (blocks < 0) | (blocks >= c._num_blocks) | (tier < 0) | (tier >= c._host_slots)
    if bad_pairs.any():
        raise BlockNotFound(f"host-tier copy {pairs[int(np.argmax(bad_pairs))].tolist()} names a block or "
                            f"slot outside the cache")
    c._issued = True
    if c._dev >= 0:
        per = max(1, _BATCH_BYTES // (caches * bb))
        for run in np.split(np.arange(n), np.flatnonzero(np.diff(out.astype(np.int8))) + 1):
            if not repeats(blocks[run]) and not repeats(tier[run]):
                run = run[np.argsort(tier[run], kind="stable")]     # no copy depends on another: slot order
            for i in range(0, len(run), per):
                part = run[i:i + per]
                _tier_batch(c, bool(out[part[0]]), np.ascontiguousarray(blocks[part], dtype=np.int32),
                            np.ascontiguousarray(tier[part], dtype=np.int64), stream)
        return
    host = <char*><size_t>c._host._ptr
    with nogil:
        for i in range(n):
            store = p[2 * i + 1] < 0
            blk = p[2 * i] if store else p[2 * i + 1]
            slot = -1 - (p[2 * i + 1] if store else p[2 * i])
            for k in range(caches):
                dev = <char*><size_t>(c._addrs[k] + blk * bb)
                kept = host + (slot * caches + k) * bb
                memcpy(kept if store else dev, dev if store else kept, bb)


cdef _tier_batch(KvCache c, bint offload, cnp.ndarray blocks, cnp.ndarray slots, void* stream):
    """One batch of host-tier copies on a GPU, all offloads or all reloads (see the top)."""
    cdef int64_t n = blocks.shape[0], slot_bytes = c._addrs.size() * c._block_bytes, r, at
    cdef int64_t data = (n * slot_bytes + 255) // 256 * 256
    cdef uint64_t host = c._host._ptr
    cdef void* own = c._own_stream().handle
    cdef int st = 0
    cdef DeviceBuffer buf, ids
    cdef DeviceEvent done
    buf, ids, done = _staging(c, data + blocks.nbytes, blocks.nbytes)
    memcpy(<void*><size_t>ids._ptr, cnp.PyArray_DATA(blocks), blocks.nbytes)    # page-locked: no wait
    starts, lengths = runs(slots)
    if offload:
        st = rt_htod(c._dev, buf._ptr + data, <const void*><size_t>ids._ptr, blocks.nbytes, stream)
        if st == 0:
            st = c._kernels.move_blocks(True, buf._ptr, c._dev_addrs._ptr, c._addrs.size(), buf._ptr + data, n,
                                        c._block_bytes, stream, True)
        if st == 0:
            st = done.record(stream)
        if st == 0:
            st = done.wait(own)
        for r in range(starts.shape[0]):
            at = starts[r]
            if st == 0:
                st = rt_dtoh(c._dev, <void*><size_t>(host + <uint64_t>slots[at] * slot_bytes),
                             buf._ptr + at * slot_bytes, lengths[r] * slot_bytes, own)
        if st == 0:
            st = done.record(own)           # the staging buffer is free once the slots hold it
    else:
        for r in range(starts.shape[0]):
            at = starts[r]
            if st == 0:
                st = rt_htod(c._dev, buf._ptr + at * slot_bytes,
                             <const void*><size_t>(host + <uint64_t>slots[at] * slot_bytes),
                             lengths[r] * slot_bytes, own)
        if st == 0:
            st = done.record(own)
        if st == 0:
            st = done.wait(stream)
        if st == 0:
            st = rt_htod(c._dev, buf._ptr + data, <const void*><size_t>ids._ptr, blocks.nbytes, stream)
        if st == 0:
            st = c._kernels.move_blocks(False, buf._ptr, c._dev_addrs._ptr, c._addrs.size(), buf._ptr + data, n,
                                        c._block_bytes, stream, True)
        if st == 0:
            st = done.record(stream)        # free once the blocks hold it
    check(st, "host-tier copies")


cdef ready_staging(KvCache c, cnp.ndarray pairs):
    """A staging buffer that any batch of these copies fits in, made before the
    first is issued: when memory for more runs short, tier_copies waits for it."""
    cdef int64_t slot_bytes = c._addrs.size() * c._block_bytes
    cdef int64_t k = min(int((pairs < 0).any(axis=1).sum()), max(1, _BATCH_BYTES // slot_bytes))
    _staging(c, (k * slot_bytes + 255) // 256 * 256 + 4 * k, 4 * k)


cdef bint _fits(list entry, int64_t nbytes, int64_t id_bytes):
    return (<int64_t>(<DeviceBuffer>entry[0]).nbytes >= nbytes and entry[1] is not None
            and <int64_t>(<DeviceBuffer>entry[1]).nbytes >= id_bytes)


cdef list _staging(KvCache c, int64_t nbytes, int64_t id_bytes):
    """[staging buffer on the cache's GPU of at least nbytes, page-locked host buffer
    of at least id_bytes for the block ids, the event that will say when this use is
    done], all idle: one of the cache's few, a new one, or (all busy, or no memory
    for another) the oldest that is large enough once the host has waited for it."""
    cdef DeviceBuffer buf
    cdef DeviceEvent ev
    cdef int st, i
    for entry in c._staged:
        buf, ev = entry[0], entry[2]
        if <int64_t>buf.nbytes >= nbytes:
            st = ev.query()
            if st == 0:
                return _fit_ids(entry, id_bytes)
            if st != RF_RT_NOT_READY:
                check(st, "host-tier copies")
    if len(c._staged) < _STAGING_BUFFERS:
        try:
            entry = _fit_ids([DeviceBuffer(max(nbytes, 1 << 20), c._dev), None, DeviceEvent(c._dev)], id_bytes)
        except (MemoryError, DeviceError):
            if not any(_fits(e, nbytes, id_bytes) for e in c._staged):
                raise
        else:
            c._staged.append(entry)
            return entry
    i = next((j for j, e in enumerate(c._staged) if _fits(e, nbytes, id_bytes)), 0)
    entry = c._staged.pop(i)
    ev = entry[2]
    with nogil:
        st = ev.synchronize()
    check(st, "host-tier copies")
    if <int64_t>(<DeviceBuffer>entry[0]).nbytes < nbytes:
        entry[0] = DeviceBuffer(nbytes, c._dev)
    c._staged.append(entry)
    return _fit_ids(entry, id_bytes)


cdef list _fit_ids(list entry, int64_t id_bytes):
    """entry, its page-locked id buffer made (or grown) to hold id_bytes."""
    if entry[1] is None or <int64_t>(<DeviceBuffer>entry[1]).nbytes < id_bytes:
        entry[1] = DeviceBuffer(max(id_bytes, 4096), -1, pinned=True)
    return entry
