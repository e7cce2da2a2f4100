# Included by _core.pyx (compiled in its module): the bodies of the Python
# API's reading calls, which copy state out under the right locks and build
# numpy arrays, dicts and event objects from it.


cdef object _i64_from_vector(const vector[int64_t]& v):
    cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, [v.size()], cnp.NPY_INT64, 0)
    if v.size():
        memcpy(cnp.PyArray_DATA(arr), v.data(), v.size() * sizeof(int64_t))
    return arr


cdef object _take_pending(BlockManager m):
    """Every shard's queued copies, (src, dst) in the order they were made; all
    of them or, when host memory is short, none (they stay queued)."""
    cdef vector[int64_t] triples
    cdef int32_t s
    cdef size_t total = 0
    cdef bint room
    lock_all(m._c)
    for s in range(m._c.nshards):
        total += m._c.shards[s].pending.size()
    room = rf_reserve(triples, total) == 0
    if room:
        for s in range(m._c.nshards):
            if m._c.shards[s].pending.size():
                rf_append_n64(triples, m._c.shards[s].pending.data(), m._c.shards[s].pending.size())
            m._c.shards[s].pending.clear()
    unlock_all(m._c)
    if not room:
        raise MemoryError("rocmforge: host memory exhausted")
    arr = np.asarray(_i64_from_vector(triples)).reshape(-1, 3)
    if m._c.nshards > 1 and len(arr) > 1:
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
    return np.ascontiguousarray(arr[:, 1:], dtype=np.int32)


cdef list _event_objects(const vector[KvEvent]& evs):
    cdef size_t i
    out = []
    for i in range(evs.size()):
        medium = "cpu" if evs[i].medium else "gpu"
        if evs[i].kind == EV_STORED:
            out.append(BlockStored(evs[i].key, None if evs[i].parent_key < 0 else evs[i].parent_key,
                                   evs[i].num_tokens, medium))
        elif evs[i].kind == EV_REMOVED:
            out.append(BlockRemoved(evs[i].key, medium))
        else:
            out.append(AllCleared())
    return out


cdef object _tables(BlockManager m, object seq_ids, object out, int layout):
    """Block tables of seq_ids: layout 0 one sequence's table, 1 vLLM's padded
    [n, max_blocks] (into out when given), 2 FlashInfer's CSR triple."""
    cdef cnp.ndarray ids = _index_array(seq_ids, cnp.NPY_INT64, "seq_ids")
    cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0), i, k, width = 0, pos = 0
    cdef vector[int32_t] flat
    cdef vector[int64_t] lens
    cdef ErrInfo err
    cdef int st
    cdef int64_t nt, bs = m.block_size
    with nogil:
        st = gather_tables(m._c, <const int64_t*>cnp.PyArray_DATA(ids), n, &flat, &lens, &err)
    if st != RF_OK:
        raise_status(st, &err)
    if layout == 0:
        return _i32_from_vector(flat, 0, flat.size())
    if layout == 2:
        if flat.size() > INT32_MAX:
            raise ArgumentValueError("tables too large for int32 indptr")
        indptr = cnp.PyArray_EMPTY(1, [n + 1], cnp.NPY_INT32, 0)
        last = cnp.PyArray_EMPTY(1, [n], cnp.NPY_INT32, 0)
        ip = <int32_t*>cnp.PyArray_DATA(indptr)
        lp = <int32_t*>cnp.PyArray_DATA(last)
        ip[0] = 0
        for i in range(n):
            ip[i + 1] = ip[i] + <int32_t>lens[2 * i]
            nt = lens[2 * i + 1]
            lp[i] = 0 if nt == 0 else <int32_t>(nt - (nt - 1) // bs * bs)
        return indptr, _i32_from_vector(flat, 0, flat.size()), last
    for i in range(n):
        width = max(width, <Py_ssize_t>lens[2 * i])
    cdef cnp.ndarray table
    if out is None:
        table = np.empty((n, width), dtype=np.int32)
    else:
        if (not cnp.PyArray_Check(out) or cnp.PyArray_TYPE(out) != cnp.NPY_INT32
                or cnp.PyArray_NDIM(out) != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(out)
                or not cnp.PyArray_ISWRITEABLE(out)):
            raise ArgumentTypeError("out must be a writeable C-contiguous int32 2-D array")
        table = <cnp.ndarray>out
        if cnp.PyArray_DIM(table, 0) != n or cnp.PyArray_DIM(table, 1) < width:
            raise ArgumentValueError(f"out has shape {out.shape}, need ({n}, >= {width})")
        width = cnp.PyArray_DIM(table, 1)
    cdef int32_t* dst = <int32_t*>cnp.PyArray_DATA(table)
    with nogil:
        for i in range(n):
            for k in range(width):
                dst[i * width + k] = flat[pos + k] if k < lens[2 * i] else -1
            pos += lens[2 * i]
    return table


cdef object _sequence_tokens(BlockManager m, int64_t sid):
    cdef int32_t slot = NO_SLOT
    cdef bint has = False
    cdef vector[int32_t] toks
    cdef int st = RF_OK
    cdef SeqRec* s
    cdef Shard* x = lock_seq(m._c, sid)
    if x != NULL:
        slot = seq_find(x, sid)
        if slot != NO_SLOT:
            s = &x.seqs[slot]
            has = s.has_tokens
            if has and s.tokens.size():
                if rf_reserve(toks, s.tokens.size()):
                    st = RF_NO_MEMORY
                else:
                    rf_append_n(toks, s.tokens.data(), s.tokens.size())
        x.lock.unlock()
    if slot == NO_SLOT:
        raise SequenceNotFound(f"sequence {sid} not found")
    if st != RF_OK:
        raise MemoryError("rocmforge: host memory exhausted")
    if not has:
        return None
    return _i32_from_vector(toks, 0, toks.size())


cdef dict _sequence_info(BlockManager m, int64_t sid):
    cdef int32_t slot = NO_SLOT, shard = 0
    cdef SeqRec* s
    cdef double created = 0, last = 0
    cdef int64_t accesses = 0, nt = 0, nblocks = 0, cached = 0, salt = 0
    cdef bint has = False
    cdef Shard* x = lock_seq(m._c, sid)
    if x != NULL:
        slot = seq_find(x, sid)
        if slot != NO_SLOT:
            s = &x.seqs[slot]
            created, last, accesses = s.created_at, s.last_access, s.access_count
            nt, nblocks, has = s.num_tokens, s.blocks.size(), s.has_tokens
            cached, salt, shard = s.cached_tokens, s.salt, x.index
        x.lock.unlock()
    if slot == NO_SLOT:
        raise SequenceNotFound(f"sequence {sid} not found")
    return {
        "seq_id": sid,
        "created_at": created,
        "last_access": last,
        "access_count": accesses,
        "num_blocks": nblocks,
        "num_tokens": nt,
        "has_tokens": bool(has),
        "num_cached_tokens": cached,
        "salt_key": salt,
        "shard": shard,
    }


cdef object _sequence_ids(BlockManager m):
    cdef vector[int64_t] ids
    cdef int32_t slot, s
    cdef int st = RF_OK
    cdef Shard* x
    lock_all(m._c)
    for s in range(m._c.nshards):
        x = &m._c.shards[s]
        if rf_reserve(ids, ids.size() + x.ids.count):
            st = RF_NO_MEMORY
            break
        slot = x.lru_head
        while slot != NO_SLOT:
            rf_push(ids, x.seqs[slot].seq_id)
            slot = x.seqs[slot].lru_next
    unlock_all(m._c)
    if st != RF_OK:
        raise MemoryError("rocmforge: host memory exhausted")
    return _i64_from_vector(ids)


cdef dict _stats(BlockManager m):
    """Counters summed over the shards, each read without a lock."""
    cdef Core* c = m._c
    cdef int64_t alloc = 0, dealloc = 0, peak = 0, cow = 0, nseq = 0
    cdef int32_t s
    cdef Shard* x
    for s in range(c.nshards):
        x = &c.shards[s]
        alloc += x.total_allocations.get()
        dealloc += x.total_deallocations.get()
        peak += x.peak_allocations.get()
        cow += x.cow_copies.get()
        nseq += x.num_seqs.get()
    query = c.pfx.query_tokens.get()
    hits = c.pfx.hit_tokens.get()
    return {
        "total_allocations": alloc,
        "total_deallocations": dealloc,
        "peak_allocations": peak,
        "current_allocations": alloc - dealloc,
        "evictions": c.evictions.get(),
        "shard_transfers": c.shard_transfers.get(),
        "cow_copies": cow,
        "compaction_count": c.compaction_count.get(),
        "last_compaction_ms": c.last_compaction_ms.get(),
        "num_sequences": nseq,
        "prefix_lookups": c.pfx.lookups.get(),
        "prefix_query_tokens": query,
        "prefix_hit_tokens": hits,
        "prefix_hit_rate": hits / query if query else 0.0,
        "cached_blocks_stored": c.pfx.blocks_stored.get(),
        "cached_blocks_evicted": c.pfx.blocks_evicted.get(),
        "host_cached_blocks": c.pfx.host.resident.get(),
        "host_hit_tokens": c.pfx.host.hit_tokens.get(),
        "host_offloaded_blocks": c.pfx.host.offloaded.get(),
        "host_reloaded_blocks": c.pfx.host.reloaded.get(),
        "host_dropped_blocks": c.pfx.host.dropped.get(),
    }


cdef double _memory_efficiency(BlockManager m) except -1:
    cdef int64_t filled = 0, held = 0, bs = m.block_size, fill
    cdef vector[int32_t] seen
    cdef int32_t slot, b, s, zero = 0
    cdef size_t j
    cdef SeqRec* r
    cdef Shard* x
    cdef int st = RF_OK
    lock_all(m._c)
    if rf_resize(seen, m._c.num_blocks, zero):
        st = RF_NO_MEMORY
    else:
        for s in range(m._c.nshards):
            x = &m._c.shards[s]
            for slot in range(<int32_t>x.seqs.size()):
                r = &x.seqs[slot]
                if not r.live:
                    continue
                for j in range(r.blocks.size()):
                    b = r.blocks[j]
                    if seen[b]:
                        continue
                    seen[b] = 1
                    fill = r.num_tokens - <int64_t>j * bs
                    filled += bs if fill > bs else fill
                    held += bs
    unlock_all(m._c)
    if st != RF_OK:
        raise MemoryError("rocmforge: host memory exhausted")
    return 1.0 if held == 0 else <double>filled / <double>held


cdef size_t _metadata_bytes(BlockManager m):
    cdef Core* c = m._c
    cdef size_t total = sizeof(BlockManager) + sizeof(Core), slot
    cdef int32_t s
    cdef int lst
    cdef Shard* x
    lock_all(m._c)
    total += c.refs.capacity() * sizeof(BlockRefs) + c.scratch.capacity() * sizeof(BlockScratch)
    total += c.home.capacity() + c.evicted.capacity() * sizeof(int64_t)
    total += c.nshards * sizeof(Shard)
    if c.nshards > 1:
        total += RF_DIR_STRIPES * sizeof(DirStripe) + rf_idmap_bytes(c.homes)
        for s in range(RF_DIR_STRIPES):
            total += rf_idmap_bytes(c.dir[s].map)
    for s in range(c.nshards):
        x = &c.shards[s]
        total += x.free.bits.capacity() * sizeof(uint64_t) + x.seqs.capacity() * sizeof(SeqRec)
        for slot in range(x.seqs.size()):
            total += x.seqs[slot].blocks.bytes()
            total += x.seqs[slot].tokens.capacity() * sizeof(int32_t)
            total += x.seqs[slot].keys.capacity() * sizeof(int64_t)
        total += (x.free_slots.capacity() + x.batch_slots.capacity() + x.tmp_blocks.capacity()) * sizeof(int32_t)
        total += rf_idmap_bytes(x.ids)
        total += ((x.tmp_victims.capacity() + x.tmp_slow.capacity() + x.tmp_moved.capacity()
                   + x.pending.capacity()) * sizeof(int64_t))
        total += x.tmp_stamps.capacity() * sizeof(double)
    total += c.pfx.pb.capacity() * sizeof(PBlock) + c.pfx.btok.capacity() * sizeof(int32_t)
    total += rf_idmap_bytes(c.pfx.index)
    for lst in range(1, 3):
        total += rf_idmap_bytes(c.pfx.ghost[lst]) + c.pfx.ghost_ring[lst].capacity() * sizeof(int64_t)
    total += (c.pfx.tmp_hits.capacity() + c.pfx.tmp_stack.capacity()) * sizeof(int32_t)
    total += c.pfx.events.capacity() * sizeof(KvEvent)
    unlock_all(m._c)
    return total
