# Included by _core.pyx (compiled in its module): turning status codes into
# exceptions, and Python arguments into the C values the core takes, with the
# GIL held and before any lock is taken.

# ---------------------------------------------------------------------------
# Status codes -> exceptions (called with the GIL, never with the lock held)
# ---------------------------------------------------------------------------

cdef int raise_status(int status, const ErrInfo* err) except -1:
    if status == RF_OK:
        return 0
    if status == RF_OUT_OF_BLOCKS:
        raise OutOfBlocks(f"need {err.a} free blocks, only {err.b} can be made free")
    if status == RF_SEQ_NOT_FOUND:
        raise SequenceNotFound(f"sequence {err.id} not found")
    if status == RF_SEQ_EXISTS:
        raise SequenceExists(f"sequence {err.id} already exists")
    if status == RF_BLOCK_NOT_FOUND:
        raise BlockNotFound(f"block {err.id} out of range [0, {err.a})")
    if status == RF_BLOCK_FREE:
        raise RefcountError(f"block {err.id} is free (refcount 0)")
    if status == RF_NO_EXTERNAL_REF:
        raise RefcountError(
            f"block {err.id} has no external reference left to drop "
            f"(its {err.a} reference(s) belong to sequence tables)")
    if status == RF_REFCOUNT_OVERFLOW:
        raise RefcountError(f"refcount of block {err.id} would exceed {INT32_MAX}")
    if status == RF_DUPLICATE_SEQ:
        raise ArgumentValueError(f"sequence {err.id} is named twice in one batch")
    if status == RF_NEGATIVE_COUNT:
        raise ArgumentValueError(f"negative token count {err.a} for sequence {err.id}")
    if status == RF_TOKENS_REQUIRED:
        raise ArgumentValueError(f"sequence {err.id} tracks token ids: append tokens, not a count")
    if status == RF_TOKENS_UNEXPECTED:
        raise ArgumentValueError(f"sequence {err.id} was created without token ids: append a count")
    if status == RF_BLOCK_IN_USE:
        raise InvalidConfiguration(
            f"cannot shrink below block {err.id + 1}: block {err.id} is in use (compact() first)")
    if status == RF_NO_MEMORY:
        raise MemoryError("rocmforge: host memory exhausted")
    if status == RF_TOO_MANY_SEQUENCES:
        raise KvCacheError(f"too many sequences (limit {err.a})")
    if status == RF_INVALID_ARGUMENT:
        raise ArgumentValueError(f"invalid argument value {err.id}")
    if status == RF_PENDING_COPIES:
        raise KvCacheError(
            f"{err.a} copy-on-write copies are pending: take_pending_copies() and apply them first")
    if status == RF_PREFIX_DISABLED:
        raise KvCacheError("prefix caching is off: build the manager with enable_prefix_caching=True")
    if status == RF_POOL_TOO_SMALL:
        raise OutOfBlocks(f"cannot compact into {err.b} blocks: {err.a} blocks are in use or cached")
    if status == RF_NO_SHARD:
        raise ArgumentValueError(f"shard {err.id} outside [0, {err.a})")
    raise KvCacheError(f"unknown rocmforge status {status}")


# ---------------------------------------------------------------------------
# Argument conversion (with the GIL, before any lock is taken)
# ---------------------------------------------------------------------------

cdef dict _DTYPES = {cnp.NPY_INT32: np.dtype(np.int32), cnp.NPY_INT64: np.dtype(np.int64)}


cdef cnp.ndarray _index_array(object obj, int typenum, str name, object range_error=ArgumentValueError):
    """obj as a 1-D C-contiguous integer array of `typenum`, zero-copy when it already is one.

    Lists, tuples and integer arrays of other widths are converted (values are
    range-checked); floats, bools, 2-D and non-contiguous arrays are refused.
    """
    cdef object arr
    if cnp.PyArray_CheckExact(obj):
        if (cnp.PyArray_TYPE(obj) == typenum and cnp.PyArray_NDIM(obj) == 1
                and cnp.PyArray_IS_C_CONTIGUOUS(obj)):
            return <cnp.ndarray>obj
        arr = obj
    elif isinstance(obj, (str, bytes, dict, set)) or obj is None:
        raise ArgumentTypeError(f"{name} must be a 1-D array of integers, got {type(obj).__name__}")
    else:
        try:
            arr = np.asarray(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ArgumentTypeError(f"{name} must be a 1-D array of integers: {exc}") from None
        if arr.ndim == 1 and arr.size == 0:
            return np.empty(0, dtype=_DTYPES[typenum])
    if arr.dtype.kind not in "iu":
        raise ArgumentTypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ArgumentValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ArgumentValueError(f"{name} must be contiguous (use np.ascontiguousarray)")
    dtype = _DTYPES[typenum]
    info = np.iinfo(dtype)
    if arr.size:
        lo = int(arr.min())
        hi = int(arr.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise range_error(f"{name} holds {bad}, outside [{info.min}, {info.max}]")
    return np.ascontiguousarray(arr, dtype=dtype)


cdef object _as_index(object obj, str name):
    """Any integer-like (int, numpy integer; not bool) as a Python int."""
    if isinstance(obj, (bool, np.bool_)) or not hasattr(obj, "__index__"):
        raise ArgumentTypeError(f"{name} must be an integer, got {type(obj).__name__}")
    return obj.__index__()


cdef int64_t _config_int(object obj, str name, int64_t lo, int64_t hi) except? -1:
    """A construction parameter: an integer in [lo, hi]."""
    value = _as_index(obj, name)
    if not lo <= value <= hi:
        raise InvalidConfiguration(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


cdef int32_t _shard_count(object shards, int32_t num_blocks) except -1:
    """The number of shards for `shards` (1..64 or "auto")."""
    if isinstance(shards, str):
        if shards != "auto":
            raise InvalidConfiguration(f"shards must be an integer in [1, {RF_MAX_SHARDS}] or 'auto', got {shards!r}")
        return max(1, min(os.cpu_count() or 1, 16, num_blocks))
    if isinstance(shards, bool) or not hasattr(shards, "__index__"):
        raise ArgumentTypeError(f"shards must be an integer or 'auto', got {type(shards).__name__}")
    return _config_int(shards, "shards", 1, RF_MAX_SHARDS)


cdef inline bint _exact_int(object obj, long long* value) noexcept:
    """Fast path: obj is a plain int that fits in int64."""
    cdef int overflow = 0
    if not PyLong_CheckExact(obj):
        return False
    value[0] = PyLong_AsLongLongAndOverflow(obj, &overflow)
    return overflow == 0


cdef bint _is_integer(object obj):
    """An int or numpy integer scalar (not a bool)."""
    return (PyLong_CheckExact(obj) or isinstance(obj, np.integer)
            or (isinstance(obj, int) and not isinstance(obj, bool)))


cdef int64_t _count(object obj, str name, int64_t limit) except -1:
    """A non-negative integer no larger than `limit`."""
    cdef long long v
    if _exact_int(obj, &v) and 0 <= v <= limit:
        return v
    value = _as_index(obj, name)
    if value < 0 or value > limit:
        raise ArgumentValueError(f"{name} must be in [0, {limit}], got {value}")
    return value


cdef int64_t _seq_id(object obj, str name="seq_id") except -1:
    """A sequence id: an integer in [0, 2**63)."""
    cdef long long v
    if _exact_int(obj, &v) and v >= 0:
        return v
    value = _as_index(obj, name)
    if not 0 <= value <= INT64_MAX:
        raise ArgumentValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


cdef int32_t _block_id(object obj) except? -1:
    cdef long long v
    if _exact_int(obj, &v) and 0 <= v <= INT32_MAX:
        return <int32_t>v
    value = _as_index(obj, "block id")
    if value < 0 or value > INT32_MAX:
        raise BlockNotFound(f"block {value} out of range")
    return value


cdef cnp.ndarray _counts_array(object counts, Py_ssize_t n, int64_t* total):
    """append_batch's counts: n non-negative int32 (one integer: that count for
    every sequence); *total gets their sum."""
    cdef cnp.ndarray cnt
    cdef const int32_t* cptr
    cdef Py_ssize_t i
    cdef bint negative = False
    if cnp.PyArray_CheckExact(counts) or not _is_integer(counts):
        cnt = _index_array(counts, cnp.NPY_INT32, "counts")
    else:
        cnt = np.full(n, _count(counts, "counts", INT32_MAX), dtype=np.int32)
    if cnp.PyArray_DIM(cnt, 0) != n:
        raise ArgumentValueError(f"{n} seq_ids but {cnp.PyArray_DIM(cnt, 0)} counts")
    cptr = <const int32_t*>cnp.PyArray_DATA(cnt)
    total[0] = 0
    for i in range(n):
        if cptr[i] < 0:
            negative = True
        total[0] += cptr[i]
    if negative:
        raise ArgumentValueError("counts must be >= 0")
    return cnt


cdef cnp.ndarray _out_array(object out, Py_ssize_t n, int typenum, str name):
    """A caller-supplied output buffer (checked) or a new array of length n."""
    cdef cnp.ndarray arr
    if out is None:
        return cnp.PyArray_EMPTY(1, [n], typenum, 0)
    if not cnp.PyArray_Check(out):
        raise ArgumentTypeError(f"{name} must be a numpy array")
    arr = <cnp.ndarray>out
    if (cnp.PyArray_TYPE(arr) != typenum or cnp.PyArray_NDIM(arr) != 1
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISWRITEABLE(arr)):
        raise ArgumentTypeError(
            f"{name} must be a writeable 1-D contiguous {_DTYPES[typenum]} array")
    if cnp.PyArray_DIM(arr, 0) < n:
        raise ArgumentValueError(f"{name} has {cnp.PyArray_DIM(arr, 0)} elements, {n} needed")
    return arr


cdef object _fit(cnp.ndarray arr, Py_ssize_t n):
    return arr if cnp.PyArray_DIM(arr, 0) == n else arr[:n]


cdef cnp.ndarray _i32_from_vector(const vector[int32_t]& v, Py_ssize_t start, Py_ssize_t n):
    cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, [n], cnp.NPY_INT32, 0)
    if n:
        memcpy(cnp.PyArray_DATA(arr), &v[start], n * sizeof(int32_t))
    return arr


cdef int64_t _salt_value(object salt) except? -1:
    """A salt as the int64 that enters block keys: 0 for None, else a 64-bit digest.

    ints, str and bytes are digested with distinct prefixes, so 1, "1" and
    b"1" are different salts.
    """
    if salt is None:
        return 0
    if isinstance(salt, (bool, np.bool_)):
        raise ArgumentTypeError("salt must be None, an int, str or bytes, got bool")
    if isinstance(salt, str):
        data = b"s" + salt.encode("utf-8")
    elif isinstance(salt, (bytes, bytearray, memoryview)):
        data = b"b" + bytes(salt)
    elif hasattr(salt, "__index__"):
        data = b"i" + str(salt.__index__()).encode()
    else:
        raise ArgumentTypeError(f"salt must be None, an int, str or bytes, got {type(salt).__name__}")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


