# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""rocmforge's core: a paged KV-cache block manager that knows block ids, not memory.

Locking: one mutex per manager guards all of its state. Every public method
is atomic: it takes the lock once, checks everything it needs, and then either
applies all of its effects or none (it returns a status and raises only after
the lock is released). Batched loops run without the GIL.
"""

from cpython.long cimport PyLong_CheckExact, PyLong_AsLongLongAndOverflow
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, uint8_t, INT32_MAX, INT64_MAX
from libc.stdio cimport snprintf
from libc.string cimport memcpy
from libcpp.vector cimport vector
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME, CLOCK_MONOTONIC
cimport numpy as cnp
cimport cython

import hashlib

import numpy as np

from rocmforge.errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BlockNotFound,
    InvalidConfiguration,
    InvariantError,
    KvCacheError,
    OutOfBlocks,
    RefcountError,
    SequenceExists,
    SequenceNotFound,
)
from rocmforge.events import AllCleared, BlockRemoved, BlockStored

cnp.import_array()

cdef extern from "_core_support.h" nogil:
    int rf_reserve[T](vector[T]& v, size_t n)
    int rf_resize[T](vector[T]& v, size_t n, const T& value)
    void rf_push[T](vector[T]& v, const T& x)
    void rf_append_n(vector[int32_t]& v, const int32_t* src, size_t n)
    void rf_append_n64(vector[int64_t]& v, const int64_t* src, size_t n)
    int32_t rf_idmap_find(const rf_idmap& m, int64_t key)
    int rf_idmap_reserve(rf_idmap& m, size_t n)
    int rf_idmap_put(rf_idmap& m, int64_t key, int32_t val)
    void rf_idmap_erase(rf_idmap& m, int64_t key)
    void rf_idmap_update(rf_idmap& m, int64_t key, int32_t val)
    void rf_idmap_clear(rf_idmap& m)
    void rf_idmap_prefetch(const rf_idmap& m, int64_t key)
    void rf_prefetch(const void* p)
    size_t rf_idmap_bytes(const rf_idmap& m)
    int64_t rf_block_key(int64_t parent, int64_t salt, const int32_t* t, int64_t n, int64_t mask)
    int rf_ctz64(uint64_t x)
    bint rf_tokens_equal(const int32_t* a, const int32_t* b, int64_t n)
    uint64_t rf_sole_gen(const SeqRec* s, uint64_t share_gen)
    int64_t rf_room(const SeqRec* s, int64_t bs)
    void rf_write_slots(int64_t* out, int64_t base, int64_t count)
    struct rf_supply:
        uint64_t* word
        int64_t base
        BlockRefs* refs
        int64_t taken
    Py_ssize_t rf_decode_run(SeqRec* recs, const int64_t* seq_ids, const int32_t* counts,
                             const int32_t* slots, Py_ssize_t i, Py_ssize_t n, uint32_t mark,
                             uint64_t share_gen, int64_t bs, int32_t prev, rf_supply* supply,
                             double now, double* old, int64_t* slots_out, int64_t* off)

cdef enum:
    MAX_BLOCK_SIZE = 1 << 20    # largest block the core accepts (slots stay far from int64 limits)
    NO_SLOT = -1                # "no record" in the LRU links and lookups
    # Calls release the GIL only when their work outweighs dropping and retaking
    # it (about 0.2-0.4 us): 64 sequences of a batch, 1,024 block ids (a few ns
    # each), 16,384 prompt tokens (hashing and lookup).
    NOGIL_MIN = 64
    NOGIL_MIN_IDS = 1024
    NOGIL_MIN_TOKENS = 16384
    PREFETCH_AHEAD = 8          # batch loops request the data of the item this far ahead
    KEYS_ON_STACK = 256         # prompts up to this many full blocks hash into a stack buffer
    GHOSTS_PER_BLOCK = 2        # ARC remembers 2 x num_blocks evicted keys per ghost list

cdef int32_t _NEG_ONE = -1
cdef int32_t _ZERO = 0
cdef BlockRefs _NO_REFS = BlockRefs(0, 0)


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline void _append_in_place(SeqRec* s, int64_t count, int64_t fill, int64_t bs,
                                  const int32_t* tokens, int64_t* slots_out) noexcept nogil:
    """Append `count` tokens into the last block, which holds `fill` and has
    room for them (the decode step); token capacity was reserved by the caller."""
    rf_write_slots(slots_out, <int64_t>s.blocks.back() * bs + fill, count)
    if tokens != NULL:
        rf_append_n(s.tokens, tokens, count)
    s.num_tokens += count


cdef inline int _check_append(const SeqRec* s, int64_t count, bint with_tokens) noexcept nogil:
    """Whether `count` tokens may be appended to s, with or without token ids."""
    if count < 0:
        return RF_NEGATIVE_COUNT
    if with_tokens and not s.has_tokens:
        return RF_TOKENS_UNEXPECTED
    if count > 0 and s.has_tokens and not with_tokens:
        return RF_TOKENS_REQUIRED
    return RF_OK


cdef inline int64_t _fresh_blocks(int64_t room, int64_t count, int64_t bs) noexcept nogil:
    """Blocks needed to append `count` tokens after `room` free slots (divides only past one block)."""
    if count <= room:
        return 0
    if count - room <= bs:
        return 1
    return _ceil_div(count - room, bs)


cdef inline void _uncache(PBlock* p) noexcept nogil:
    """Forget a block's prefix-cache identity and tree links (policy links are the caller's)."""
    p.serial = 0
    p.parent = -1
    p.child = -1
    p.sib_prev = -1
    p.sib_next = -1
    p.hot = 0
    p.cold = 0


cdef inline double _wall_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline double _mono_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec * 1e3 + <double>ts.tv_nsec * 1e-6


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


cdef inline bint _exact_int(object obj, long long* value) noexcept:
    """Fast path: obj is a plain int that fits in int64."""
    cdef int overflow = 0
    if not PyLong_CheckExact(obj):
        return False
    value[0] = PyLong_AsLongLongAndOverflow(obj, &overflow)
    return overflow == 0


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


cdef dict _POLICIES = {"lru": POLICY_LRU, "arc": POLICY_ARC}
cdef tuple _POLICY_NAMES = ("lru", "arc")


# ---------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------

@cython.final
cdef class BlockManager:
    """Paged KV-cache bookkeeping: a pool of fixed-size blocks shared by sequences.

    BlockManager(num_blocks, block_size, *, evict_sequences=False,
                 enable_prefix_caching=False, eviction_policy="lru", enable_events=False)

    Block ids are int32 in ``[0, num_blocks)``; the cache slot of token
    ``offset`` in block ``b`` is ``b * block_size + offset`` (int64).

    A block's refcount is the number of sequence tables that hold it plus the
    references taken with :meth:`allocate`/:meth:`incref`. A block returns to
    the free set when its refcount reaches zero. Allocation always hands out the
    lowest free ids.

    With ``evict_sequences=True`` an allocation that cannot be served removes
    the least recently accessed sequences not named by that call until it can;
    their ids are returned by :meth:`take_evicted`.

    With ``enable_prefix_caching=True`` every full block of a sequence that
    keeps token ids is indexed by a content key chained from its parent's key,
    its tokens and the sequence's salt. ``add_sequence`` reuses the longest
    run of cached leading blocks (each hit verified token by token). A cached
    block whose refcount drops to zero stays findable (*evictable*) until an
    allocation needs it: free blocks go first, then evictable ones in the
    order of ``eviction_policy``; evicting a block also drops its cached
    descendants, which could never be reached again. Policies:

    - ``"lru"``: least recently released first; a released sequence's tail
      blocks go before its head (vLLM's order).
    - ``"arc"``: adaptive replacement over two such lists, blocks used once
      and blocks reused since they were cached. Keys of evicted blocks are
      remembered (2 x num_blocks per list); when one comes back, the list it
      was evicted from grows. While such ghost hits reach half the real hits
      (the cache thrashes), only a sampled half of new prompts enters the
      once-used list; the rest go to a cold segment that is evicted first.
      A prompt that finds half of its blocks cached has its new blocks
      counted as reused. While ghost hits stay under a tenth of the real
      hits, plain recency picks between the lists. O(1) per operation.

    Every method is thread-safe and atomic; one that raises leaves the state
    exactly as it was.
    """

    def __cinit__(self, num_blocks, block_size, *, evict_sequences=False,
                  enable_prefix_caching=False, eviction_policy="lru", enable_events=False,
                  _key_bits=63):
        if isinstance(num_blocks, bool) or not hasattr(num_blocks, "__index__"):
            raise ArgumentTypeError(f"num_blocks must be an integer, got {type(num_blocks).__name__}")
        if isinstance(block_size, bool) or not hasattr(block_size, "__index__"):
            raise ArgumentTypeError(f"block_size must be an integer, got {type(block_size).__name__}")
        nb = num_blocks.__index__()
        bs = block_size.__index__()
        if not 1 <= nb <= INT32_MAX:
            raise InvalidConfiguration(f"num_blocks must be in [1, {INT32_MAX}], got {nb}")
        if not 1 <= bs <= MAX_BLOCK_SIZE:
            raise InvalidConfiguration(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {bs}")
        self.num_blocks = 0
        self.block_size = bs
        if eviction_policy not in _POLICIES:
            raise InvalidConfiguration(
                f"eviction_policy must be one of {', '.join(_POLICY_NAMES)}, got {eviction_policy!r}")
        if not isinstance(_key_bits, int) or not 1 <= _key_bits <= 63:
            raise InvalidConfiguration("_key_bits must be in [1, 63]")
        self.evict_sequences = bool(evict_sequences)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        if enable_events and not enable_prefix_caching:
            raise InvalidConfiguration("enable_events needs enable_prefix_caching=True")
        self.enable_events = bool(enable_events)
        self._policy = _POLICIES[eviction_policy]
        self._key_mask = (1 << _key_bits) - 1
        self._serial = 0
        self._num_evictable = 0
        self._arc_p = 0
        cdef int lst
        self._arc_hits = 0
        self._arc_ghost_hits = 0
        self._cold_anchor = -1
        for lst in range(4):
            self._ev_head[lst] = -1
            self._ev_tail[lst] = -1
            self._ev_len[lst] = 0
        self._epoch = 0
        self._share_gen = 1
        self._num_free = 0
        self._lru_head = NO_SLOT
        self._lru_tail = NO_SLOT
        self._levels = 0
        cdef int st
        cdef int32_t n = nb
        with nogil:
            st = self._resize_pool(n)
        if st != RF_OK:
            raise MemoryError(f"cannot allocate bookkeeping for {nb} blocks")

    # --- block pool internals ----------------------------------------------

    cdef int _resize_pool(self, int32_t n) noexcept nogil:
        """Resize per-block arrays to n blocks (new ones free) and rebuild the free bitmap.

        Blocks >= n must be free. Changes nothing visible when it fails."""
        cdef BlockScratch blank
        blank.mark = 0
        blank.count = 0
        blank.dec = 0
        cdef int64_t words = _ceil_div(n, 64)
        cdef int64_t total = 0
        cdef int levels = 0
        cdef int64_t offs[8]
        while True:
            offs[levels] = total
            total += words
            levels += 1
            if words == 1:
                break
            words = _ceil_div(words, 64)
        if (rf_resize(self._refs, n, _NO_REFS) or rf_resize(self._scratch, n, blank)
                or rf_resize(self._bits, total, <uint64_t>0)):
            return RF_NO_MEMORY
        if self.enable_prefix_caching and self._resize_prefix(n):
            return RF_NO_MEMORY
        self._num_free += n - self.num_blocks
        self.num_blocks = n
        self._levels = levels
        memcpy(self._level_off, offs, sizeof(offs))
        self._bits_build()
        return RF_OK

    cdef int _resize_prefix(self, int32_t n) noexcept nogil:
        """Size the prefix cache's per-block state and ghost lists for n blocks.

        Ghost lists are rebuilt empty (they only tune ARC's target)."""
        cdef PBlock blank
        cdef int lst
        cdef int64_t i, cap = <int64_t>n * GHOSTS_PER_BLOCK
        blank.key = 0
        blank.salt = 0
        blank.stamp = 0
        blank.ev_prev = -1
        blank.ev_next = -1
        blank.ev_list = 0
        _uncache(&blank)
        if (rf_resize(self._pb, n, blank)
                or rf_resize(self._btok, <size_t>n * <size_t>self.block_size, _ZERO)
                or rf_reserve(self._tmp_stack, n) or rf_idmap_reserve(self._pindex, n)):
            return RF_NO_MEMORY
        for lst in range(1, 3):
            if (rf_resize(self._ghost_ring[lst], cap, <int64_t>-1)
                    or rf_idmap_reserve(self._ghost[lst], cap)):
                return RF_NO_MEMORY
            rf_idmap_clear(self._ghost[lst])
            for i in range(cap):
                self._ghost_ring[lst][i] = -1
            self._ghost_pos[lst] = 0
        if self._arc_p > n:
            self._arc_p = n
        return RF_OK

    cdef void _bits_build(self) noexcept nogil:
        """Recompute every level of the free bitmap from the refcounts."""
        cdef int64_t i, n = self.num_blocks, words
        cdef int L
        cdef uint64_t* bits = self._bits.data()
        for i in range(<int64_t>self._bits.size()):
            bits[i] = 0
        cdef bint prefix = self.enable_prefix_caching
        for i in range(n):
            if self._refs[i].rc == 0 and not (prefix and self._pb[i].serial != 0):
                bits[i >> 6] |= (<uint64_t>1) << (i & 63)
        words = _ceil_div(n, 64)
        for L in range(1, self._levels):
            for i in range(words):
                if bits[self._level_off[L - 1] + i] != 0:
                    bits[self._level_off[L] + (i >> 6)] |= (<uint64_t>1) << (i & 63)
            words = _ceil_div(words, 64)
        self._low_word = 0

    cdef int64_t _bits_low_word(self) noexcept nogil:
        """Index of the lowest leaf word with a free bit (one must exist). The
        word named by _low_word usually still has one, which saves the walk
        down the summary levels (a chain of dependent loads)."""
        cdef int64_t idx = self._low_word
        cdef int L
        if self._bits[idx] != 0:
            return idx
        idx = 0
        for L in range(self._levels - 1, 0, -1):
            idx = idx * 64 + rf_ctz64(self._bits[self._level_off[L] + idx])
        self._low_word = idx
        return idx

    cdef int32_t _bits_lowest(self) noexcept nogil:
        """The lowest free block (one must exist)."""
        cdef int64_t idx = self._bits_low_word()
        return <int32_t>(idx * 64 + rf_ctz64(self._bits[idx]))

    cdef inline void _bits_set(self, int32_t b) noexcept nogil:
        """Mark b free: one leaf bit, and the summary levels only when its word was empty."""
        self._bits_set_word(b >> 6, (<uint64_t>1) << (b & 63))   # level 0 starts at offset 0

    cdef inline void _bits_set_word(self, int64_t i, uint64_t bits) noexcept nogil:
        """Mark the blocks of leaf word i given by bits free (none of them was)."""
        cdef uint64_t* leaf = &self._bits[i]
        cdef uint64_t was = leaf[0]
        leaf[0] = was | bits
        if i < self._low_word:
            self._low_word = i
        if was == 0 and self._levels > 1:
            self._bits_set_summary(i)

    cdef void _bits_set_summary(self, int64_t i) noexcept nogil:
        """Leaf word i just gained its first free bit: set its bit one level up (and higher)."""
        cdef int L
        cdef uint64_t* p
        cdef uint64_t was
        for L in range(1, self._levels):
            p = &self._bits[self._level_off[L] + (i >> 6)]
            was = p[0]
            p[0] = was | ((<uint64_t>1) << (i & 63))
            if was != 0:
                return
            i >>= 6

    cdef void _bits_clear_from(self, int level, int64_t i) noexcept nogil:
        cdef int L
        cdef uint64_t* p
        for L in range(level, self._levels):
            p = &self._bits[self._level_off[L] + (i >> 6)]
            p[0] &= ~((<uint64_t>1) << (i & 63))
            if p[0] != 0:
                return
            i >>= 6

    cdef int32_t _take_block(self) noexcept nogil:
        """Take a block with refcount 1: the lowest free one, else the policy's victim
        among the evictable cached blocks (one of the two must exist)."""
        cdef int32_t b
        if self._num_free > 0:
            b = self._bits_lowest()
            self._bits_clear_from(0, b)
            self._num_free -= 1
        else:
            b = self._ev_victim()
            self._unregister_tree(b)
        self._refs[b].rc = 1
        self._stats.total_allocations += 1
        return b

    cdef void _take_lowest(self, int32_t n, int32_t* out) noexcept nogil:
        """Take n blocks for the caller, one external reference each (free or
        evictable blocks, they must exist): the lowest free ids a bitmap word
        at a time, then the policy's victims."""
        cdef int32_t got = 0, b, from_bits = n if n < self._num_free else self._num_free
        cdef int64_t idx
        cdef uint64_t w
        cdef uint64_t* leaf
        cdef BlockRefs* cnt = self._refs.data()
        while got < from_bits:
            idx = self._bits_low_word()
            leaf = &self._bits[idx]
            w = leaf[0]
            while w != 0 and got < from_bits:
                b = <int32_t>(idx * 64 + rf_ctz64(w))
                w &= w - 1
                cnt[b].rc = 1
                cnt[b].ext = 1
                out[got] = b
                got += 1
            leaf[0] = w
            if w == 0 and self._levels > 1:
                self._bits_clear_from(1, idx)
        self._num_free -= from_bits
        self._stats.total_allocations += from_bits
        while got < n:
            b = self._take_block()
            cnt[b].ext = 1
            out[got] = b
            got += 1

    cdef inline void _release_block(self, int32_t b) noexcept nogil:
        """A block's refcount just reached zero: cached blocks become evictable,
        others free."""
        if self.enable_prefix_caching and self._pb[b].serial != 0:
            self._release_cached(b)
        else:
            self._bits_set(b)
            self._num_free += 1
        self._stats.total_deallocations += 1

    cdef void _release_cached(self, int32_t b) noexcept nogil:
        """Put a cached block whose refcount reached zero into its policy list."""
        cdef PBlock* p = &self._pb[b]
        if self._policy != POLICY_ARC or not (p.hot or p.cold):
            self._ev_link_after(b, 1, self._ev_tail[1])
        elif p.hot:
            self._ev_link_after(b, 2, self._ev_tail[2])
        else:
            # Cold blocks of one release line up tail first at the front of
            # list 3, ahead of those released earlier: the newest go first.
            self._ev_link_after(b, 3, self._cold_anchor)
            self._cold_anchor = b

    cdef void _unref_plain(self, const int32_t* ids, size_t n) noexcept nogil:
        """Drop one reference from each of n blocks without prefix caching:
        those that reach zero go back to the free set, counters kept in
        locals."""
        cdef BlockRefs* cnt = self._refs.data()
        cdef int32_t freed = 0, b
        cdef size_t j
        for j in range(n):
            b = ids[j]
            cnt[b].rc -= 1
            if cnt[b].rc == 0:
                self._bits_set(b)
                freed += 1
        self._num_free += freed
        self._stats.total_deallocations += freed

    cdef inline void _unref(self, int32_t b) noexcept nogil:
        self._refs[b].rc -= 1
        if self._refs[b].rc == 0:
            self._release_block(b)

    cdef void _note_peak(self) noexcept nogil:
        cdef int64_t used = self.num_blocks - self._avail()
        if used > self._stats.peak_allocations:
            self._stats.peak_allocations = used

    cdef inline int64_t _avail(self) noexcept nogil:
        """Blocks an allocation can take now: free plus evictable."""
        return <int64_t>self._num_free + self._num_evictable

    # --- prefix cache internals (the caller holds the lock) -----------------

    cdef void _ev_link_after(self, int32_t b, int lst, int32_t anchor) noexcept nogil:
        """Insert an evictable block into list lst after anchor (at the front when -1,
        as the newest entry when anchor is the list's tail)."""
        cdef PBlock* p = &self._pb[b]
        cdef int32_t nxt = self._ev_head[lst] if anchor < 0 else self._pb[anchor].ev_next
        self._ev_clock += 1
        p.stamp = self._ev_clock
        p.ev_list = <uint8_t>lst
        p.ev_prev = anchor
        p.ev_next = nxt
        if anchor >= 0:
            self._pb[anchor].ev_next = b
        else:
            self._ev_head[lst] = b
        if nxt >= 0:
            self._pb[nxt].ev_prev = b
        else:
            self._ev_tail[lst] = b
        self._ev_len[lst] += 1
        self._num_evictable += 1

    cdef bint _arc_calm(self) noexcept nogil:
        """Recent ghost hits below a tenth of the real hits."""
        return self._arc_ghost_hits < 0.1 * self._arc_hits

    cdef bint _arc_thrashing(self) noexcept nogil:
        """Recent ghost hits at least half the real hits: reuse distances exceed what
        the cache holds."""
        return self._arc_ghost_hits > 0 and self._arc_ghost_hits >= 0.5 * self._arc_hits

    cdef void _ev_unlink(self, int32_t b) noexcept nogil:
        cdef PBlock* p = &self._pb[b]
        cdef int lst = p.ev_list
        if p.ev_prev >= 0:
            self._pb[p.ev_prev].ev_next = p.ev_next
        else:
            self._ev_head[lst] = p.ev_next
        if p.ev_next >= 0:
            self._pb[p.ev_next].ev_prev = p.ev_prev
        else:
            self._ev_tail[lst] = p.ev_prev
        p.ev_prev = -1
        p.ev_next = -1
        p.ev_list = 0
        self._ev_len[lst] -= 1
        self._num_evictable -= 1

    cdef int64_t _take_cached(self, const int32_t* ids, int64_t n, bint external) noexcept nogil:
        """Add a reference to each of n cached blocks (a verified prefix), taking the
        evictable ones out of their policy lists; they count as reused. Stops
        before a block whose refcount cannot grow; returns how many it took."""
        cdef int32_t b, r
        cdef int64_t j
        for j in range(n):
            b = ids[j]
            r = self._refs[b].rc
            if r == INT32_MAX:
                n = j
                break
            if r == 0:
                self._ev_unlink(b)
                self._stats.total_allocations += 1
            self._refs[b].rc = r + 1
            if external:
                self._refs[b].ext += 1
            self._pb[b].hot = 1
        self._arc_hits += <double>n
        return n

    cdef int32_t _ev_victim(self) noexcept nogil:
        """Unlink and return the evictable block the policy gives up (one must exist)."""
        cdef int lst = 1
        cdef int32_t b, once = self._ev_len[1] + self._ev_len[3]
        if self._policy == POLICY_ARC:
            if once == 0:
                lst = 2
            elif self._ev_len[2] == 0:
                lst = 3 if self._ev_len[3] > 0 else 1
            elif self._arc_calm():
                # Evicted keys rarely come back: the cache holds nearly every reuse
                # and the lists' split would only misorder. Plain recency decides.
                if self._ev_len[3] > 0:
                    lst = 3
                elif self._pb[self._ev_head[2]].stamp < self._pb[self._ev_head[1]].stamp:
                    lst = 2
            elif once <= self._arc_p:
                lst = 2
            elif self._ev_len[3] > 0:
                lst = 3
        b = self._ev_head[lst]
        self._ev_unlink(b)
        if self._policy == POLICY_ARC:
            self._ghost_add(2 if lst == 2 else 1, self._pb[b].key)
        return b

    cdef void _ghost_add(self, int lst, int64_t key) noexcept nogil:
        """Remember an evicted key in ghost list lst, forgetting its oldest entry."""
        cdef int64_t cap = self._ghost_ring[lst].size()
        cdef int64_t pos = self._ghost_pos[lst] % cap
        cdef int64_t old = self._ghost_ring[lst][pos]
        if old >= 0 and rf_idmap_find(self._ghost[lst], old) == pos:
            rf_idmap_erase(self._ghost[lst], old)
        self._ghost_ring[lst][pos] = key
        rf_idmap_put(self._ghost[lst], key, <int32_t>pos)   # reserved for cap entries
        self._ghost_pos[lst] += 1

    cdef void _ghost_check(self, int32_t b) noexcept nogil:
        """ARC: a block being cached under a key evicted recently was evicted too
        early. Grow the target of the list it left and treat the block as reused."""
        cdef int64_t key = self._pb[b].key
        cdef double n1 = self._ghost[1].count, n2 = self._ghost[2].count, step
        cdef double decay = 1.0 - 1.0 / <double>self.num_blocks
        # Hit and ghost-hit counts fade over about one cache's worth of new blocks.
        self._arc_hits *= decay
        self._arc_ghost_hits *= decay
        if rf_idmap_find(self._ghost[1], key) >= 0:
            self._arc_ghost_hits += 1
            step = n2 / n1 if n2 > n1 else 1.0
            self._arc_p = min(<double>self.num_blocks, self._arc_p + step)
            rf_idmap_erase(self._ghost[1], key)
            self._pb[b].hot = 1
        elif rf_idmap_find(self._ghost[2], key) >= 0:
            self._arc_ghost_hits += 1
            step = n1 / n2 if n1 > n2 else 1.0
            self._arc_p = max(0.0, self._arc_p - step)
            rf_idmap_erase(self._ghost[2], key)
            self._pb[b].hot = 1

    cdef void _event(self, int32_t kind, int64_t key, int64_t parent_key, int32_t ntok) noexcept nogil:
        cdef KvEvent ev
        if not self.enable_events:
            return
        ev.kind = kind
        ev.key = key
        ev.parent_key = parent_key
        ev.num_tokens = ntok
        rf_push(self._events, ev)   # capacity reserved by _reserve_registrations

    cdef int _reserve_registrations(self, int64_t n) noexcept nogil:
        """Room for n new index entries and for every event an operation may emit
        (n stores, one removal per indexed block, a clear), so applying cannot fail."""
        if not self.enable_prefix_caching:
            return RF_OK
        if rf_idmap_reserve(self._pindex, self._pindex.count + n):
            return RF_NO_MEMORY
        if self.enable_events and rf_reserve(
                self._events, self._events.size() + n + self._pindex.count + 1):
            return RF_NO_MEMORY
        return RF_OK

    cdef void _unregister_tree(self, int32_t b) noexcept nogil:
        """Drop b and all its cached descendants from the index (none of them could be
        reached once b is gone). Evictable ones become free; blocks in use stay
        allocated, uncached. b itself becomes free only if it was still evictable."""
        cdef PBlock* p = &self._pb[b]
        cdef int32_t x, c
        if p.sib_prev >= 0:
            self._pb[p.sib_prev].sib_next = p.sib_next
        elif p.parent >= 0:
            self._pb[p.parent].child = p.sib_next
        if p.sib_next >= 0:
            self._pb[p.sib_next].sib_prev = p.sib_prev
        self._tmp_stack.clear()
        rf_push(self._tmp_stack, b)     # capacity num_blocks: each block is pushed once
        while self._tmp_stack.size():
            x = self._tmp_stack.back()
            self._tmp_stack.pop_back()
            p = &self._pb[x]
            c = p.child
            while c >= 0:
                rf_push(self._tmp_stack, c)
                c = self._pb[c].sib_next
            rf_idmap_erase(self._pindex, p.key)
            self._event(EV_REMOVED, p.key, -1, 0)
            self._stats.cached_blocks_evicted += 1
            _uncache(p)
            if p.ev_list:
                self._ev_unlink(x)
                self._bits_set(x)
                self._num_free += 1

    cdef int32_t _cached_parent(self, SeqRec* s, int64_t j) noexcept nogil:
        """The cached block whose content chain is s's first j >= 1 blocks, or -1.

        That is s's own block j - 1 when it is cached. Otherwise it may be a
        twin cached earlier by another sequence (s completed a block equal to a
        cached one, which is not cached twice): the block indexed under s's key
        of block j - 1, accepted only if its chain holds s's tokens block by
        block up to a block s itself holds (or to a root with s's salt), so a
        hash collision can never give a wrong parent."""
        cdef int32_t x = s.blocks[j - 1], found
        cdef int64_t i = j - 1, bs = self.block_size
        if self._pb[x].serial != 0:
            return x
        found = rf_idmap_find(self._pindex, s.keys[j - 1])
        x = found
        while x >= 0:
            if x == s.blocks[i]:
                return found
            if not rf_tokens_equal(&self._btok[<size_t>x * bs], &s.tokens[i * bs], bs):
                return -1
            if i == 0:
                return found if self._pb[x].parent < 0 and self._pb[x].salt == s.salt else -1
            x = self._pb[x].parent
            i -= 1
        return -1

    cdef void _register_block(self, SeqRec* s, int64_t j) noexcept nogil:
        """Index full block j of s under s.keys[j] when the key is new and the
        blocks before it are cached, as s's own or as twins by content (room
        reserved by the caller)."""
        cdef int32_t b = s.blocks[j], parent = -1
        cdef int64_t bs = self.block_size
        cdef PBlock* p = &self._pb[b]
        if p.serial != 0:
            return
        if rf_idmap_find(self._pindex, s.keys[j]) >= 0:
            return
        if j > 0:
            parent = self._cached_parent(s, j)
            if parent < 0:
                return
        rf_idmap_put(self._pindex, s.keys[j], b)
        self._serial += 1
        p.serial = self._serial
        p.key = s.keys[j]
        p.salt = s.salt
        p.parent = parent
        p.child = -1
        p.sib_prev = -1
        p.sib_next = -1
        p.hot = s.warm
        p.cold = s.cold
        if parent >= 0:
            p.sib_next = self._pb[parent].child
            if p.sib_next >= 0:
                self._pb[p.sib_next].sib_prev = b
            self._pb[parent].child = b
        memcpy(&self._btok[<size_t>b * bs], &s.tokens[j * bs], bs * sizeof(int32_t))
        self._stats.cached_blocks_stored += 1
        self._event(EV_STORED, p.key, s.keys[j - 1] if j > 0 else -1, <int32_t>bs)
        if self._policy == POLICY_ARC:
            self._ghost_check(b)

    cdef void _register_full(self, SeqRec* s, int64_t from_block) noexcept nogil:
        """Key (and index) the blocks of s that became full after block from_block - 1."""
        cdef int64_t bs = self.block_size, j, nfull = s.num_tokens // bs, parent
        for j in range(from_block, nfull):
            parent = s.keys[j - 1] if j > 0 else -1
            rf_push(s.keys, rf_block_key(parent, s.salt, &s.tokens[j * bs], bs, self._key_mask))
            self._register_block(s, j)

    cdef int64_t _match_prefix(self, const int32_t* tokens, const int64_t* keys, int64_t nfull,
                               int64_t salt, int32_t* hits) noexcept nogil:
        """Leading blocks found in the index, each verified: same parent block (same
        salt for the first) and the same token ids. Writes them to hits (room for
        nfull) and returns how many."""
        cdef int64_t j, found = nfull, bs = self.block_size
        cdef int32_t b, prev = -1
        cdef PBlock* p
        # Pass 1 finds every candidate (the keys are all known, so the index
        # loads overlap) and starts loading their state; pass 2 verifies.
        for j in range(min(nfull, 8)):
            rf_idmap_prefetch(self._pindex, keys[j])
        for j in range(nfull):
            if j + 8 < nfull:
                rf_idmap_prefetch(self._pindex, keys[j + 8])
            b = rf_idmap_find(self._pindex, keys[j])
            if b < 0:
                found = j
                break
            hits[j] = b
            rf_prefetch(&self._pb[b])
            rf_prefetch(&self._btok[<size_t>b * bs])
        for j in range(found):
            b = hits[j]
            p = &self._pb[b]
            if p.parent != prev or (prev < 0 and p.salt != salt):
                return j
            if not rf_tokens_equal(&self._btok[<size_t>b * bs], tokens + j * bs, bs):
                return j
            prev = b
        return found

    cdef uint64_t _next_epoch(self) noexcept nogil:
        """A new operation number. Sequence records keep its low 32 bits (their
        mark shares the decode cache line), so when those wrap, every record's
        mark is cleared and 0 is skipped: a stale mark never matches."""
        cdef size_t j
        self._epoch += 1
        if <uint32_t>self._epoch == 0:
            for j in range(self._seqs.size()):
                self._seqs[j].mark = 0
            self._epoch += 1
        return self._epoch

    cdef inline BlockScratch* _scratch_at(self, int32_t b, uint64_t epoch) noexcept nogil:
        cdef BlockScratch* sc = &self._scratch[b]
        if sc.mark != epoch:
            sc.mark = epoch
            sc.count = 0
            sc.dec = 0
        return sc

    # --- sequence internals ----------------------------------------------

    cdef int32_t _find(self, int64_t seq_id) noexcept nogil:
        return rf_idmap_find(self._index, seq_id)

    cdef void _lru_unlink(self, int32_t slot) noexcept nogil:
        cdef SeqRec* s = &self._seqs[slot]
        if s.lru_prev != NO_SLOT:
            self._seqs[s.lru_prev].lru_next = s.lru_next
        else:
            self._lru_head = s.lru_next
        if s.lru_next != NO_SLOT:
            self._seqs[s.lru_next].lru_prev = s.lru_prev
        else:
            self._lru_tail = s.lru_prev
        s.lru_prev = NO_SLOT
        s.lru_next = NO_SLOT

    cdef void _lru_push(self, int32_t slot) noexcept nogil:
        """Link an unlinked record at the newest end."""
        cdef SeqRec* s = &self._seqs[slot]
        if self._lru_tail != NO_SLOT:
            self._lru_insert_after(slot, self._lru_tail)
        else:
            s.lru_prev = NO_SLOT
            s.lru_next = NO_SLOT
            self._lru_head = slot
            self._lru_tail = slot

    cdef void _lru_insert_after(self, int32_t slot, int32_t anchor) noexcept nogil:
        """Link an unlinked record right after `anchor` (a linked one)."""
        cdef SeqRec* s = &self._seqs[slot]
        cdef SeqRec* a = &self._seqs[anchor]
        s.lru_prev = anchor
        s.lru_next = a.lru_next
        if a.lru_next != NO_SLOT:
            self._seqs[a.lru_next].lru_prev = slot
        else:
            self._lru_tail = slot
        a.lru_next = slot

    cdef void _lru_run_to_tail(self, int32_t first, int32_t last) noexcept nogil:
        """Move the contiguous run first..last (oldest to newest) to the newest end."""
        cdef SeqRec* f = &self._seqs[first]
        cdef SeqRec* l = &self._seqs[last]
        if self._lru_tail == last:
            return
        self._seqs[l.lru_next].lru_prev = f.lru_prev     # last is not the tail
        if f.lru_prev != NO_SLOT:
            self._seqs[f.lru_prev].lru_next = l.lru_next
        else:
            self._lru_head = l.lru_next
        f.lru_prev = self._lru_tail
        self._seqs[self._lru_tail].lru_next = first
        l.lru_next = NO_SLOT
        self._lru_tail = last

    cdef void _touch(self, int32_t slot, double now) noexcept nogil:
        """Record an access: move the sequence to the newest end of the LRU list and stamp it."""
        cdef SeqRec* s = &self._seqs[slot]
        self._lru_run_to_tail(slot, slot)
        s.last_access = now
        s.access_count += 1

    cdef void _drop_sequence(self, int32_t slot) noexcept nogil:
        """Release every block of a sequence and recycle its slot."""
        cdef SeqRec* s = &self._seqs[slot]
        cdef size_t j
        if self.enable_prefix_caching:
            # Tail first, so a cached chain's deepest blocks are the first to be evicted.
            self._cold_anchor = -1
            for j in range(s.blocks.size(), 0, -1):
                self._unref(s.blocks[j - 1])
        else:
            self._unref_plain(s.blocks.data(), s.blocks.size())
        self._lru_unlink(slot)
        rf_idmap_erase(self._index, s.seq_id)
        s.blocks.clear()
        s.tokens.clear()
        s.keys.clear()
        s.live = False
        s.seq_id = -1                     # a batch hint naming this slot no longer matches
        s.num_tokens = 0
        rf_push(self._free_slots, slot)   # capacity kept >= len(_seqs)

    cdef int _claim_slot(self, int32_t* slot_out, ErrInfo* err) noexcept nogil:
        """Take a free record slot off the free list (invisible to callers until opened).

        A caller that fails afterwards hands it back with _unclaim_slot."""
        cdef SeqRec blank
        cdef size_t n = self._seqs.size()
        if self._free_slots.size() == 0:
            if n >= <size_t>(INT32_MAX - 1):
                err.a = INT32_MAX - 1
                return RF_TOO_MANY_SEQUENCES
            if (rf_reserve(self._seqs, n + 1 if n < 16 else n + n // 2)
                    or rf_reserve(self._free_slots, self._seqs.capacity())):
                return RF_NO_MEMORY
            blank.seq_id = -1
            blank.num_tokens = 0
            blank.has_tokens = False
            blank.live = False
            blank.created_at = 0
            blank.last_access = 0
            blank.access_count = 0
            blank.lru_prev = NO_SLOT
            blank.lru_next = NO_SLOT
            blank.mark = 0
            blank.sole_gen = 0
            blank.salt = 0
            blank.cached_tokens = 0
            blank.cold = False
            blank.warm = False
            rf_push(self._seqs, blank)
            rf_push(self._free_slots, <int32_t>n)
        slot_out[0] = self._free_slots.back()
        self._free_slots.pop_back()
        return RF_OK

    cdef inline int _unclaim_slot(self, int32_t slot, int status) noexcept nogil:
        rf_push(self._free_slots, slot)   # capacity kept >= len(_seqs)
        return status

    cdef void _open_sequence(self, int32_t slot, int64_t seq_id, bint has_tokens, double now) noexcept nogil:
        """Turn a claimed slot into a live, empty, most recently used sequence."""
        cdef SeqRec* s = &self._seqs[slot]
        s.seq_id = seq_id
        s.num_tokens = 0
        s.has_tokens = has_tokens
        s.live = True
        s.created_at = now
        s.last_access = now
        s.access_count = 1
        s.mark = 0
        s.sole_gen = 0
        s.salt = 0
        s.cached_tokens = 0
        s.cold = False
        s.warm = False
        s.keys.clear()
        self._lru_push(slot)

    cdef int _ensure_free(self, int64_t needed, uint64_t epoch, ErrInfo* err) noexcept nogil:
        """Make `needed` blocks free, evicting LRU sequences not marked with `epoch`.

        Eviction is decided by a dry run first, so a request that cannot be
        met evicts nothing. Blocks marked with a copy-on-write count by the
        caller (scratch.count) lower `needed` as eviction drops their sharers.
        """
        cdef int64_t freed = 0, eff, before, after
        cdef int32_t slot, b
        cdef size_t j
        cdef SeqRec* s
        cdef BlockScratch* sc
        cdef int64_t avail = self._avail()
        if needed <= avail:
            return RF_OK
        if not self.evict_sequences:
            err.a = needed
            err.b = avail
            return RF_OUT_OF_BLOCKS
        self._tmp_victims.clear()
        if rf_reserve(self._tmp_victims, self._index.count):
            return RF_NO_MEMORY
        slot = self._lru_head
        while slot != NO_SLOT and avail + freed < needed:
            s = &self._seqs[slot]
            if s.mark != <uint32_t>epoch:
                rf_push(self._tmp_victims, slot)
                for j in range(s.blocks.size()):
                    b = s.blocks[j]
                    sc = self._scratch_at(b, epoch)
                    eff = self._refs[b].rc - sc.dec
                    if sc.count > 0:
                        before = sc.count if sc.count < eff - 1 else eff - 1
                        after = sc.count if sc.count < eff - 2 else eff - 2
                        needed -= before - after
                    sc.dec += 1
                    if eff == 1:
                        freed += 1
            slot = s.lru_next
        if avail + freed < needed:
            err.a = needed
            err.b = avail + freed
            return RF_OUT_OF_BLOCKS
        if rf_reserve(self._evicted, self._evicted.size() + self._tmp_victims.size()):
            return RF_NO_MEMORY
        for j in range(self._tmp_victims.size()):
            slot = self._tmp_victims[j]
            rf_push(self._evicted, self._seqs[slot].seq_id)
            self._drop_sequence(slot)
            self._stats.evictions += 1
        return RF_OK

    cdef inline bint _sole_last(self, SeqRec* s) noexcept nogil:
        """Whether the sequence alone holds its (partly filled) last block; a
        yes is remembered until some block in use gains a reference."""
        cdef uint64_t proof = rf_sole_gen(s, self._share_gen)
        if s.sole_gen == proof:
            return True
        if self._refs[s.blocks.back()].rc == 1:
            s.sole_gen = proof
            return True
        return False

    cdef inline void _append_apply(self, SeqRec* s, int64_t count, const int32_t* tokens,
                                   int64_t* slots_out) noexcept nogil:
        """Append `count` tokens; room and free blocks were reserved by the caller."""
        cdef int64_t bs = self.block_size
        cdef int64_t room = rf_room(s, bs)
        if count == 0:
            return
        if count <= room and self._sole_last(s):
            _append_in_place(s, count, bs - room, bs, tokens, slots_out)
        else:
            self._append_blocks(s, count, tokens, slots_out)

    cdef void _append_blocks(self, SeqRec* s, int64_t count, const int32_t* tokens,
                             int64_t* slots_out) noexcept nogil:
        """_append_apply's general case: copy-on-write of a shared last block,
        fresh blocks as the tokens need them, token ids kept."""
        cdef int64_t bs = self.block_size
        cdef int64_t room = rf_room(s, bs)
        cdef int64_t off = bs - room if room else 0
        cdef int64_t j
        cdef int32_t cur = -1, fresh
        if off != 0:
            cur = s.blocks.back()
            if self._refs[cur].rc > 1:
                # Copy-on-write: the partly filled last block is shared.
                fresh = self._take_block()
                rf_push(self._pending_copies, cur)
                rf_push(self._pending_copies, fresh)
                self._refs[cur].rc -= 1
                s.blocks.set(s.blocks.size() - 1, fresh)
                self._stats.cow_copies += 1
                cur = fresh
        for j in range(count):
            if off == 0:
                cur = self._take_block()
                s.blocks.push(cur)
            slots_out[j] = <int64_t>cur * bs + off
            off += 1
            if off == bs:
                off = 0
        if tokens != NULL:
            rf_append_n(s.tokens, tokens, count)
        s.num_tokens += count

    # --- C API (declared in _core.pxd) -------------------------------------

    cdef int c_allocate(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil:
        cdef int st
        self._lock.lock()
        st = self._allocate_locked(n, out, err)
        self._lock.unlock()
        return st

    cdef int _allocate_locked(self, int32_t n, int32_t* out, ErrInfo* err) noexcept nogil:
        cdef int st
        if n < 0:
            err.id = n
            return RF_INVALID_ARGUMENT
        if n > self._num_free:
            # Cached blocks or sequences must give way: room for the events
            # their removal emits, then evict (or fail, changing nothing).
            if self._reserve_registrations(0):
                return RF_NO_MEMORY
            st = self._ensure_free(n, self._next_epoch(), err)
            if st != RF_OK:
                return st
        self._take_lowest(n, out)
        self._note_peak()
        return RF_OK

    cdef int c_incref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        cdef int st
        self._lock.lock()
        st = self._incref_locked(ids, n, err)
        self._lock.unlock()
        return st

    cdef int _incref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        """Add the references one id at a time; on the first bad id, take back those
        already added (so an id listed twice is checked against its own additions)."""
        cdef Py_ssize_t i
        cdef int32_t b, nb = self.num_blocks
        cdef int st = RF_OK
        cdef BlockRefs* cnt = self._refs.data()
        for i in range(n):
            b = ids[i]
            if b < 0 or b >= nb:
                err.id = b
                err.a = nb
                st = RF_BLOCK_NOT_FOUND
            elif cnt[b].rc == 0:
                err.id = b
                st = RF_BLOCK_FREE
            elif cnt[b].rc == INT32_MAX:
                err.id = b
                st = RF_REFCOUNT_OVERFLOW
            if st != RF_OK:
                while i > 0:
                    i -= 1
                    cnt[ids[i]].rc -= 1
                    cnt[ids[i]].ext -= 1
                return st
            cnt[b].rc += 1
            cnt[b].ext += 1
        self._share_gen += 1
        return RF_OK

    cdef int c_decref(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        cdef int st
        self._lock.lock()
        st = self._decref_locked(ids, n, err)
        self._lock.unlock()
        return st

    cdef int _decref_locked(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        """Drop one external reference per id, freeing blocks that reach zero;
        on the first id without one left, everything is given back."""
        cdef Py_ssize_t i
        cdef int32_t b, nb = self.num_blocks
        cdef BlockRefs* cnt = self._refs.data()
        if not self.enable_prefix_caching:
            return self._decref_plain(ids, n, err)
        # Cached blocks go to policy lists one by one: check every id first.
        for i in range(n):
            b = ids[i]
            if b < 0 or b >= nb or cnt[b].ext == 0:
                while i > 0:
                    i -= 1
                    cnt[ids[i]].ext += 1
                return self._decref_status(b, err)
            cnt[b].ext -= 1
        self._unref_run(ids, n)
        return RF_OK

    cdef void _unref_run(self, const int32_t* ids, Py_ssize_t n) noexcept nogil:
        """_unref each id in order (one release, as _drop_sequence's). Cached
        blocks bound for the tail of list 1 (every one under LRU) are linked
        with that tail, the clock and the counters held in locals, written
        back once; any other release goes through _release_block."""
        cdef Py_ssize_t i
        cdef int32_t b, r, tail = self._ev_tail[1], linked = 0
        cdef uint64_t clock = self._ev_clock
        cdef BlockRefs* cnt = self._refs.data()
        cdef PBlock* pb = self._pb.data()
        cdef PBlock* p
        cdef bint arc = self._policy == POLICY_ARC
        self._cold_anchor = -1
        for i in range(n):
            b = ids[i]
            r = cnt[b].rc - 1
            cnt[b].rc = r
            if r != 0:
                continue
            p = &pb[b]
            if p.serial == 0 or (arc and (p.hot or p.cold)):
                self._ev_flush_tail(tail, clock, linked)
                self._release_block(b)
                tail = self._ev_tail[1]
                clock = self._ev_clock
                linked = 0
                continue
            clock += 1
            p.stamp = clock
            p.ev_list = 1
            p.ev_prev = tail
            p.ev_next = -1
            if tail >= 0:
                pb[tail].ev_next = b
            else:
                self._ev_head[1] = b
            tail = b
            linked += 1
        self._ev_flush_tail(tail, clock, linked)

    cdef inline void _ev_flush_tail(self, int32_t tail, uint64_t clock, int32_t linked) noexcept nogil:
        """Write back what _unref_run kept in locals: `linked` blocks appended to list 1."""
        self._ev_tail[1] = tail
        self._ev_clock = clock
        self._ev_len[1] += linked
        self._num_evictable += linked
        self._stats.total_deallocations += linked

    cdef int _decref_status(self, int32_t b, ErrInfo* err) noexcept nogil:
        """The error for a decref of block b, which has no external reference left."""
        err.id = b
        if b < 0 or b >= self.num_blocks:
            err.a = self.num_blocks
            return RF_BLOCK_NOT_FOUND
        err.a = self._refs[b].rc
        return RF_BLOCK_FREE if self._refs[b].rc == 0 else RF_NO_EXTERNAL_REF

    cdef int _decref_plain(self, const int32_t* ids, Py_ssize_t n, ErrInfo* err) noexcept nogil:
        """decref without prefix caching, in one pass: blocks reaching zero are
        freed with their bitmap word built up in a register (an engine's ids
        come in runs that share words) and the counters updated once. The
        first id without an external reference left undoes the pass."""
        cdef Py_ssize_t i, j
        cdef int32_t b, nb = self.num_blocks, freed = 0
        cdef int64_t word = -1
        cdef uint64_t acc = 0
        cdef BlockRefs* cnt = self._refs.data()
        for i in range(n):
            b = ids[i]
            # One unsigned compare checks both bounds (a negative id wraps high).
            if <uint32_t>b >= <uint32_t>nb or cnt[b].ext == 0:
                # Newest first, so an id named twice is re-taken once. (Bits still
                # in `acc` were never set: clearing them changes nothing.)
                for j in range(i - 1, -1, -1):
                    cnt[ids[j]].ext += 1
                    cnt[ids[j]].rc += 1
                    if cnt[ids[j]].rc == 1:
                        self._bits_clear_from(0, ids[j])
                return self._decref_status(b, err)
            cnt[b].ext -= 1
            cnt[b].rc -= 1
            if cnt[b].rc != 0:
                continue
            freed += 1
            if (b >> 6) != word:
                if word >= 0:
                    self._bits_set_word(word, acc)
                word = b >> 6
                acc = 0
            acc |= (<uint64_t>1) << (b & 63)
        if word >= 0:
            self._bits_set_word(word, acc)
        self._num_free += freed
        self._stats.total_deallocations += freed
        return RF_OK

    cdef int c_add_sequence(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                            int64_t num_tokens, int64_t salt, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil:
        cdef int st
        cdef vector[int64_t] heap_keys
        cdef int64_t stack_keys[KEYS_ON_STACK]
        cdef int64_t* keys = NULL
        if with_tokens and self.enable_prefix_caching and num_tokens >= 0:
            # Keys are a pure function of the tokens: hash before taking the lock.
            keys = self._hash_prompt(tokens, num_tokens, salt, stack_keys, &heap_keys)
            if keys == NULL:
                return RF_NO_MEMORY
        self._lock.lock()
        st = self._add_sequence_locked(seq_id, with_tokens, tokens, num_tokens, salt,
                                       keys, slots_out, err)
        self._lock.unlock()
        return st

    cdef int _add_sequence_locked(self, int64_t seq_id, bint with_tokens, const int32_t* tokens,
                                  int64_t num_tokens, int64_t salt, const int64_t* keys,
                                  int64_t* slots_out, ErrInfo* err) noexcept nogil:
        """keys: the content keys of the full blocks (NULL without prefix caching)."""
        cdef int st
        cdef int32_t slot, b
        cdef int64_t nblocks, bs = self.block_size, nfull = 0, h = 0, h_ev = 0, j
        cdef uint64_t epoch
        cdef SeqRec* s
        if seq_id < 0 or num_tokens < 0:
            err.id = seq_id if seq_id < 0 else num_tokens
            return RF_INVALID_ARGUMENT
        nblocks = _ceil_div(num_tokens, bs)
        if nblocks > self.num_blocks:
            err.a = nblocks
            err.b = self.num_blocks
            return RF_OUT_OF_BLOCKS
        if self._find(seq_id) != NO_SLOT:
            err.id = seq_id
            return RF_SEQ_EXISTS
        if keys != NULL:
            nfull = num_tokens // bs
            if rf_resize(self._tmp_hits, nfull, _NEG_ONE) or self._reserve_registrations(nfull):
                return RF_NO_MEMORY
            h = self._match_prefix(tokens, keys, nfull, salt, self._tmp_hits.data())
        st = self._claim_slot(&slot, err)
        if st != RF_OK:
            return st
        s = &self._seqs[slot]
        if (s.blocks.reserve(nblocks) or (with_tokens and rf_reserve(s.tokens, num_tokens))
                or rf_reserve(s.keys, nfull)):
            return self._unclaim_slot(slot, RF_NO_MEMORY)
        # Publish the id before evicting so failure can undo it with a plain erase.
        if rf_idmap_put(self._index, seq_id, slot):
            return self._unclaim_slot(slot, RF_NO_MEMORY)
        # Cached hits must stay out of the eviction dry run's count (this call
        # will hold them), and evictable hits leave the allocatable pool.
        epoch = self._next_epoch()
        for j in range(h):
            if self._refs[self._tmp_hits[j]].rc == INT32_MAX:
                h = j       # this block cannot take another reference: reuse ends before it
                break
            if self._refs[self._tmp_hits[j]].rc == 0:
                h_ev += 1
        if nblocks - h + h_ev > self._avail():
            for j in range(h):
                self._scratch_at(self._tmp_hits[j], epoch).dec = -1
        st = self._ensure_free(nblocks - h + h_ev, epoch, err)
        if st != RF_OK:
            rf_idmap_erase(self._index, seq_id)
            return self._unclaim_slot(slot, st)
        self._open_sequence(slot, seq_id, with_tokens, _wall_now())
        s = &self._seqs[slot]
        s.salt = salt
        self._take_cached(self._tmp_hits.data(), h, False)
        for j in range(h):
            b = self._tmp_hits[j]
            s.blocks.push(b)
            rf_write_slots(slots_out + j * bs, <int64_t>b * bs, bs)
        if h:
            rf_append_n(s.tokens, tokens, h * bs)
            s.num_tokens = h * bs
            s.cached_tokens = h * bs
        self._append_apply(s, num_tokens - h * bs, tokens + h * bs if with_tokens else NULL,
                           slots_out + h * bs)
        if keys != NULL:
            rf_append_n64(s.keys, keys, nfull)
            if self._policy == POLICY_ARC and h < nfull:
                if h >= 2 and 2 * h >= nfull:
                    # Half the prompt or more was cached: a returning conversation,
                    # whose new blocks are as likely to be reused as its history.
                    s.warm = True
                elif self._arc_thrashing():
                    # While the cache thrashes, only a sampled half of new prompts
                    # (by key) enter list 1 proper; the rest go to the cold segment,
                    # evicted first, so the sampled ones live long enough to be reused.
                    s.cold = ((<uint64_t>keys[h]) * <uint64_t>0x9E3779B97F4A7C15) >> 63
            for j in range(h, nfull):
                self._register_block(s, j)
            self._stats.prefix_lookups += 1
            self._stats.prefix_query_tokens += num_tokens
            self._stats.prefix_hit_tokens += h * bs
        self._note_peak()
        return RF_OK

    cdef int64_t* _hash_prompt(self, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                               int64_t* stack_keys, vector[int64_t]* heap_keys) noexcept nogil:
        """Keys of the full blocks of a prompt (a pure function of the tokens, so no
        lock): into stack_keys when KEYS_ON_STACK suffice, else heap_keys. NULL
        when memory is exhausted."""
        cdef int64_t j, bs = self.block_size, nfull = num_tokens // bs, parent = -1
        cdef int64_t* keys = stack_keys
        if nfull > KEYS_ON_STACK:
            if rf_resize(heap_keys[0], nfull, parent):
                return NULL
            keys = heap_keys.data()
        for j in range(nfull):
            parent = rf_block_key(parent, salt, tokens + j * bs, bs, self._key_mask)
            keys[j] = parent
        return keys

    cdef int64_t c_lookup_prefix(self, const int32_t* tokens, int64_t num_tokens,
                                 int64_t salt) noexcept nogil:
        """Cached leading tokens for these token ids (no change of state); -1 when
        prefix caching is off or memory is exhausted."""
        cdef vector[int64_t] heap_keys
        cdef int64_t stack_keys[KEYS_ON_STACK]
        cdef vector[int32_t] hits
        cdef int64_t* keys
        cdef int64_t h, nfull = num_tokens // self.block_size
        if not self.enable_prefix_caching or rf_resize(hits, nfull, _NEG_ONE):
            return -1
        keys = self._hash_prompt(tokens, num_tokens, salt, stack_keys, &heap_keys)
        if keys == NULL:
            return -1
        self._lock.lock()
        h = self._match_prefix(tokens, keys, nfull, salt, hits.data())
        self._lock.unlock()
        return h * self.block_size

    cdef int c_acquire_prefix(self, const int32_t* tokens, int64_t num_tokens, int64_t salt,
                              int32_t* ids_out, int64_t* num_out, ErrInfo* err) noexcept nogil:
        """Take an external reference on every block of the cached prefix of tokens
        (room for num_tokens // block_size ids); num_out = how many."""
        cdef vector[int64_t] heap_keys
        cdef int64_t stack_keys[KEYS_ON_STACK]
        cdef int64_t* keys
        cdef int64_t h, nfull = num_tokens // self.block_size
        num_out[0] = 0
        if not self.enable_prefix_caching:
            return RF_PREFIX_DISABLED
        keys = self._hash_prompt(tokens, num_tokens, salt, stack_keys, &heap_keys)
        if keys == NULL:
            return RF_NO_MEMORY
        self._lock.lock()
        h = self._take_cached(ids_out, self._match_prefix(tokens, keys, nfull, salt, ids_out), True)
        self._stats.prefix_lookups += 1
        self._stats.prefix_query_tokens += num_tokens
        self._stats.prefix_hit_tokens += h * self.block_size
        self._note_peak()
        self._lock.unlock()
        num_out[0] = h
        return RF_OK

    cdef int c_append_batch(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                            bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                            ErrInfo* err) noexcept nogil:
        cdef int st
        self._lock.lock()
        st = self._append_batch_locked(seq_ids, counts, n, with_tokens, tokens, slots_out, err)
        self._lock.unlock()
        return st

    cdef int _append_batch_locked(self, const int64_t* seq_ids, const int32_t* counts, Py_ssize_t n,
                                  bint with_tokens, const int32_t* tokens, int64_t* slots_out,
                                  ErrInfo* err) noexcept nogil:
        cdef uint64_t epoch = self._next_epoch()
        cdef int64_t bs = self.block_size
        cdef int64_t needed = 0, nt, c, room, fresh, off = 0
        cdef int64_t full_new, regs = 0, early = 0
        cdef bint prefix = self.enable_prefix_caching
        cdef Py_ssize_t i, done = n, stamped = 0, settled = 0
        cdef size_t k
        cdef int32_t slot, last
        cdef int32_t* slots
        cdef SeqRec* s
        cdef BlockScratch* sc
        cdef double now
        cdef int st = RF_OK
        # A new position's hint is record 0: any record will do, since hints
        # are checked, and records are never taken away once made (the run
        # starts once one exists).
        if <Py_ssize_t>self._batch_slots.size() < n and rf_resize(self._batch_slots, n, _ZERO):
            return RF_NO_MEMORY
        if <Py_ssize_t>self._tmp_stamps.size() < n and rf_resize(self._tmp_stamps, n, 0.0):
            return RF_NO_MEMORY
        slots = self._batch_slots.data()   # hints in, this batch's records out
        now = _wall_now()
        self._tmp_blocks.clear()
        self._tmp_slow.clear()
        self._tmp_moved.clear()
        # Pass 1: validate every item. Tokens that fit the sequence's own last
        # block (a decode step) are appended at once, and taken back below if
        # the batch fails. For the rest it records (index, output offset) and
        # counts fresh blocks and sharers of shared partly filled last blocks
        # (each needs a copy unless it is the last reference:
        # min(sharers_in_batch, refcount - 1) copies per block). Every record
        # is stamped when it is marked (items [0, stamped)), its old stamp
        # kept for the undo. _tmp_moved lists the items whose record does not
        # follow its predecessor's in the LRU list (the run takes none).
        i = -1
        while True:
            i += 1
            if not with_tokens and i < n and self._hint_holds(slots[i], seq_ids[i]):
                i = self._decode_runs(seq_ids, counts, slots, i, n, <uint32_t>epoch, now,
                                      slots_out, &off, &early)
                stamped = i
            if i >= n:
                break
            slot = slots[i]
            if not self._hint_holds(slot, seq_ids[i]):
                slot = self._find(seq_ids[i])
                if slot == NO_SLOT:
                    err.id = seq_ids[i]
                    st = RF_SEQ_NOT_FOUND
                    done = i
                    break
            s = &self._seqs[slot]
            if s.mark == <uint32_t>epoch:
                err.id = seq_ids[i]
                st = RF_DUPLICATE_SEQ
                done = i
                break
            s.mark = <uint32_t>epoch
            slots[i] = slot
            self._tmp_stamps[i] = s.last_access
            s.last_access = now
            s.access_count += 1
            stamped = i + 1
            if i != 0 and s.lru_prev != slots[i - 1]:
                if rf_reserve(self._tmp_moved, self._tmp_moved.size() + 1):
                    st = RF_NO_MEMORY
                    done = i
                    break
                rf_push(self._tmp_moved, <int64_t>i)
            c = counts[i]
            st = _check_append(s, c, with_tokens)
            if st != RF_OK:
                err.id = seq_ids[i]
                err.a = c
                done = i
                break
            if c == 0:
                continue
            nt = s.num_tokens
            room = rf_room(s, bs)
            if (c <= room and (not with_tokens or not prefix or c < room)
                    and self._sole_last(s)):
                if with_tokens and rf_reserve(s.tokens, nt + c):
                    st = RF_NO_MEMORY
                    done = i
                    break
                _append_in_place(s, c, bs - room, bs, tokens + off if with_tokens else NULL,
                                 slots_out + off)
                off += c
                continue
            if room == 0 and c <= bs and not with_tokens and self._early_take_allowed():
                # A decode step into a full last block takes the lowest free
                # block at once (given back if the batch fails).
                if s.blocks.reserve(s.blocks.size() + 1):
                    st = RF_NO_MEMORY
                    done = i
                    break
                s.blocks.push(self._take_block())
                s.sole_gen = rf_sole_gen(s, self._share_gen)   # a fresh block is its alone
                _append_in_place(s, c, 0, bs, NULL, slots_out + off)
                off += c
                early += 1
                continue
            if rf_reserve(self._tmp_slow, self._tmp_slow.size() + 2):
                st = RF_NO_MEMORY
                done = i
                break
            if room != 0:
                last = s.blocks.back()
                if self._refs[last].rc > 1:
                    sc = self._scratch_at(last, epoch)
                    if sc.count == 0:
                        if rf_reserve(self._tmp_blocks, self._tmp_blocks.size() + 1):
                            st = RF_NO_MEMORY
                            done = i
                            break
                        rf_push(self._tmp_blocks, last)
                    sc.count += 1
            if c > room:
                fresh = _fresh_blocks(room, c, bs)
                needed += fresh
                if s.blocks.reserve(s.blocks.size() + fresh):
                    st = RF_NO_MEMORY
                    done = i
                    break
            if with_tokens:
                if rf_reserve(s.tokens, nt + c):
                    st = RF_NO_MEMORY
                    done = i
                    break
                if prefix:
                    full_new = (nt + c) // bs - nt // bs
                    if full_new and rf_reserve(s.keys, s.keys.size() + full_new):
                        st = RF_NO_MEMORY
                        done = i
                        break
                    regs += full_new
            rf_push(self._tmp_slow, <int64_t>i)
            rf_push(self._tmp_slow, off)
            off += c
        if st == RF_OK:
            st = self._append_room(needed, early, regs, epoch, err)
        if st != RF_OK:
            self._append_undo(slots, counts, done, stamped)
            return st
        # Pass 2: append the rest in batch order (cannot fail now).
        for k in range(0, self._tmp_slow.size(), 2):
            i = self._tmp_slow[k]
            off = self._tmp_slow[k + 1]
            s = &self._seqs[slots[i]]
            self._append_blocks(s, counts[i], tokens + off if with_tokens else NULL, slots_out + off)
            if with_tokens and prefix:
                self._register_full(s, s.keys.size())
        # Touch in batch order, as sequential touches would: move each record
        # out of place behind its predecessor in the batch, then the whole
        # run, now contiguous, to the newest end. A steady decode batch moves
        # nothing. Moving a record can only unsettle the next item (whose
        # record followed it), so each move checks that one too.
        for k in range(self._tmp_moved.size()):
            i = self._tmp_moved[k]
            if i < settled:
                continue
            while i < n:
                slot = slots[i]
                if self._seqs[slot].lru_prev == slots[i - 1]:
                    break
                self._lru_unlink(slot)
                self._lru_insert_after(slot, slots[i - 1])
                i += 1
            settled = i + 1
        if n != 0:
            self._lru_run_to_tail(slots[0], slots[n - 1])
        self._note_peak()
        return RF_OK

    cdef Py_ssize_t _decode_runs(self, const int64_t* seq_ids, const int32_t* counts,
                                 const int32_t* slots, Py_ssize_t i, Py_ssize_t n, uint32_t mark,
                                 double now, int64_t* slots_out, int64_t* off,
                                 int64_t* early) noexcept nogil:
        """append_batch's pass 1 through rf_decode_run from item i, which takes
        fresh blocks from the lowest free bitmap word while early takes are
        allowed; when that word runs dry the run goes on with the next one.
        Returns the first item no run took."""
        cdef rf_supply supply
        cdef uint64_t no_blocks = 0
        cdef int64_t word = 0
        cdef int32_t prev = NO_SLOT
        supply.refs = self._refs.data()
        while True:
            if i != 0:
                prev = slots[i - 1]
            else:
                prev = self._seqs[slots[0]].lru_prev   # item 0 follows nothing
            supply.word = &no_blocks
            supply.taken = 0
            if self._early_take_allowed():
                word = self._bits_low_word()
                supply.word = &self._bits[word]
                supply.base = word * 64
            i = rf_decode_run(self._seqs.data(), seq_ids, counts, slots, i, n, mark,
                              self._share_gen, self.block_size, prev, &supply, now,
                              self._tmp_stamps.data(), slots_out, off)
            if supply.taken == 0:
                return i
            self._took_from_word(word, supply.taken)
            early[0] += supply.taken
            if i >= n or supply.word[0] != 0:
                return i

    cdef inline bint _hint_holds(self, int32_t slot, int64_t seq_id) noexcept nogil:
        """Whether a batch position's hint names the live record of seq_id
        (record 0, a new position's hint, may not exist yet)."""
        return (seq_id >= 0 and <size_t>slot < self._seqs.size()
                and self._seqs[slot].seq_id == seq_id)

    cdef bint _early_take_allowed(self) noexcept nogil:
        """Whether append_batch's pass 1 may take fresh blocks for decode steps
        into full last blocks: only while no item waits for pass 2 and no
        sequence can be evicted, so ids go out in batch order, as sequential
        appends give them."""
        return not self.evict_sequences and self._tmp_slow.size() == 0 and self._num_free > 0

    cdef void _took_from_word(self, int64_t word, int64_t k) noexcept nogil:
        """Account for k blocks taken by clearing their bits in leaf word `word`
        (refcounts already 1): the summary levels follow an emptied word."""
        self._num_free -= k
        self._stats.total_allocations += k
        if self._bits[word] == 0 and self._levels > 1:
            self._bits_clear_from(1, word)

    cdef int _append_room(self, int64_t needed, int64_t early, int64_t regs, uint64_t epoch,
                          ErrInfo* err) noexcept nogil:
        """append_batch's reservations once pass 1 has counted: prefix
        registrations, pending copies (from the sharers in _tmp_blocks), and
        `needed` fresh blocks plus one per copy (evicting if allowed). Pass 1
        took `early` blocks already; errors count them as still needed."""
        cdef int64_t copies = 0
        cdef size_t j
        cdef int32_t b
        cdef BlockScratch* sc
        cdef int st
        if regs and self._reserve_registrations(regs):
            return RF_NO_MEMORY
        if needed + early > self.num_blocks:
            err.a = needed + early
            err.b = self.num_blocks
            return RF_OUT_OF_BLOCKS
        for j in range(self._tmp_blocks.size()):
            b = self._tmp_blocks[j]
            sc = &self._scratch[b]
            copies += sc.count if sc.count < self._refs[b].rc - 1 else self._refs[b].rc - 1
        if copies and rf_reserve(self._pending_copies, self._pending_copies.size() + 2 * copies):
            return RF_NO_MEMORY
        if needed + copies > 0:
            st = self._ensure_free(needed + copies, epoch, err)
            if st == RF_OUT_OF_BLOCKS:
                err.a += early
                err.b += early
            return st
        return RF_OK

    cdef void _append_undo(self, const int32_t* slots, const int32_t* counts,
                           Py_ssize_t done, Py_ssize_t stamped) noexcept nogil:
        """Take back the appends pass 1 made to items [0, done): all items with
        tokens to append except those it recorded in _tmp_slow. A last block
        left empty was taken by pass 1 (a last block always holds a token):
        it goes back to the free set, uncounted. Then the stamps of items
        [0, stamped)."""
        cdef Py_ssize_t i
        cdef size_t k = 0
        cdef int32_t b
        cdef SeqRec* s
        for i in range(stamped):
            s = &self._seqs[slots[i]]
            s.last_access = self._tmp_stamps[i]
            s.access_count -= 1
        for i in range(done):
            if k < self._tmp_slow.size() and self._tmp_slow[k] == i:
                k += 2
                continue
            if counts[i] > 0:
                s = &self._seqs[slots[i]]
                s.num_tokens -= counts[i]
                if s.has_tokens:
                    rf_resize(s.tokens, <size_t>s.num_tokens, _ZERO)   # shrinks: cannot fail
                if <int64_t>(s.blocks.size() - 1) * self.block_size >= s.num_tokens:
                    b = s.blocks.back()
                    s.blocks.pop()
                    self._refs[b].rc = 0
                    self._bits_set(b)
                    self._num_free += 1
                    self._stats.total_allocations -= 1

    cdef int c_fork(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil:
        cdef int st
        self._lock.lock()
        st = self._fork_locked(src, dst, err)
        self._lock.unlock()
        return st

    cdef int _fork_locked(self, int64_t src, int64_t dst, ErrInfo* err) noexcept nogil:
        cdef int32_t src_slot = self._find(src), dst_slot, b
        cdef SeqRec* s
        cdef SeqRec* d
        cdef size_t j
        cdef int st
        cdef double now
        if src_slot == NO_SLOT:
            err.id = src
            return RF_SEQ_NOT_FOUND
        if dst < 0:
            err.id = dst
            return RF_INVALID_ARGUMENT
        if self._find(dst) != NO_SLOT:
            err.id = dst
            return RF_SEQ_EXISTS
        s = &self._seqs[src_slot]
        for j in range(s.blocks.size()):
            if self._refs[s.blocks[j]].rc == INT32_MAX:
                err.id = s.blocks[j]
                return RF_REFCOUNT_OVERFLOW
        st = self._claim_slot(&dst_slot, err)   # may move records: re-take pointers after
        if st != RF_OK:
            return st
        s = &self._seqs[src_slot]
        d = &self._seqs[dst_slot]
        if (d.blocks.reserve(s.blocks.size()) or rf_reserve(d.tokens, s.tokens.size())
                or rf_reserve(d.keys, s.keys.size())):
            return self._unclaim_slot(dst_slot, RF_NO_MEMORY)
        if rf_idmap_put(self._index, dst, dst_slot):
            return self._unclaim_slot(dst_slot, RF_NO_MEMORY)
        now = _wall_now()
        self._touch(src_slot, now)
        self._open_sequence(dst_slot, dst, s.has_tokens, now)
        self._share_gen += 1
        for j in range(s.blocks.size()):
            b = s.blocks[j]
            d.blocks.push(b)
            self._refs[b].rc += 1
        if s.has_tokens and s.tokens.size():
            rf_append_n(d.tokens, s.tokens.data(), s.tokens.size())
        if s.keys.size():
            rf_append_n64(d.keys, s.keys.data(), s.keys.size())
        d.salt = s.salt
        d.cold = s.cold
        d.warm = s.warm
        d.num_tokens = s.num_tokens
        return RF_OK

    cdef int c_remove_sequence(self, int64_t seq_id, ErrInfo* err) noexcept nogil:
        cdef int32_t slot
        self._lock.lock()
        slot = self._find(seq_id)
        if slot != NO_SLOT:
            self._drop_sequence(slot)
        self._lock.unlock()
        if slot == NO_SLOT:
            err.id = seq_id
            return RF_SEQ_NOT_FOUND
        return RF_OK

    # --- pool restructuring ------------------------------------------------

    cdef int _compact_locked(self, vector[int32_t]* moves, ErrInfo* err) noexcept nogil:
        cdef int32_t lo = 0, hi = self.num_blocks - 1, slot
        cdef int32_t used = self.num_blocks - self._num_free
        cdef vector[int32_t] remap
        cdef size_t j
        cdef SeqRec* s
        cdef double t0 = _mono_ms()
        if self._pending_copies.size():
            err.a = self._pending_copies.size() // 2
            return RF_PENDING_COPIES
        if rf_reserve(moves[0], 2 * <size_t>(used if used < self._num_free else self._num_free)):
            return RF_NO_MEMORY
        if rf_resize(remap, self.num_blocks, _NEG_ONE):
            return RF_NO_MEMORY
        while True:
            while lo < self.num_blocks and self._occupied(lo):
                lo += 1
            while hi >= 0 and not self._occupied(hi):
                hi -= 1
            if lo >= hi:
                break
            rf_push(moves[0], hi)
            rf_push(moves[0], lo)
            remap[hi] = lo
            self._move_block(hi, lo)
        if moves.size():
            for slot in range(<int32_t>self._seqs.size()):
                s = &self._seqs[slot]
                for j in range(s.blocks.size()):
                    if remap[s.blocks[j]] >= 0:
                        s.blocks.set(j, remap[s.blocks[j]])
            self._bits_build()
        self._stats.compaction_count += 1
        self._stats.last_compaction_ms = _mono_ms() - t0
        return RF_OK

    cdef inline bint _occupied(self, int32_t b) noexcept nogil:
        """In use or cached: not in the free bitmap."""
        return self._refs[b].rc != 0 or (self.enable_prefix_caching and self._pb[b].serial != 0)

    cdef void _move_block(self, int32_t src, int32_t dst) noexcept nogil:
        """Relabel occupied block src as free block dst (refcounts and prefix-cache
        state, with every link that names src). Sequence tables are the caller's."""
        cdef PBlock* p
        cdef int32_t c
        cdef int64_t bs = self.block_size
        self._refs[dst] = self._refs[src]
        self._refs[src] = _NO_REFS
        if not self.enable_prefix_caching or self._pb[src].serial == 0:
            return
        self._pb[dst] = self._pb[src]
        p = &self._pb[dst]
        rf_idmap_update(self._pindex, p.key, dst)
        if p.sib_prev >= 0:
            self._pb[p.sib_prev].sib_next = dst
        elif p.parent >= 0:
            self._pb[p.parent].child = dst
        if p.sib_next >= 0:
            self._pb[p.sib_next].sib_prev = dst
        c = p.child
        while c >= 0:
            self._pb[c].parent = dst
            c = self._pb[c].sib_next
        if p.ev_list:
            if p.ev_prev >= 0:
                self._pb[p.ev_prev].ev_next = dst
            else:
                self._ev_head[p.ev_list] = dst
            if p.ev_next >= 0:
                self._pb[p.ev_next].ev_prev = dst
            else:
                self._ev_tail[p.ev_list] = dst
        memcpy(&self._btok[<size_t>dst * bs], &self._btok[<size_t>src * bs], bs * sizeof(int32_t))
        p = &self._pb[src]
        _uncache(p)
        p.ev_prev = -1
        p.ev_next = -1
        p.ev_list = 0

    cdef int _shrink_locked(self, int32_t n, ErrInfo* err) noexcept nogil:
        cdef int32_t b
        if self._pending_copies.size():
            err.a = self._pending_copies.size() // 2
            return RF_PENDING_COPIES
        for b in range(n, self.num_blocks):
            if self._refs[b].rc != 0:
                err.id = b
                return RF_BLOCK_IN_USE
        if self._reserve_registrations(0):
            return RF_NO_MEMORY
        if self.enable_prefix_caching:
            # Cached blocks past the new end leave the cache (with their descendants).
            for b in range(n, self.num_blocks):
                if self._pb[b].serial != 0:
                    self._unregister_tree(b)
        return self._resize_pool(n)

    # --- invariants ------------------------------------------------------

    cdef int _check_locked(self, char* msg, size_t cap) noexcept nogil:
        """Recompute every derived quantity and compare; 0 when consistent."""
        cdef int64_t n = self.num_blocks, bs = self.block_size, fill, words
        cdef int64_t i, free_count = 0, live = 0, lru_len = 0, total = 0, used
        cdef int32_t b, slot, prev
        cdef size_t j
        cdef int L
        cdef SeqRec* s
        cdef vector[int32_t] refs, fills
        cdef uint64_t bit, w
        if <int64_t>self._refs.size() != n or <int64_t>self._scratch.size() != n:
            snprintf(msg, cap, "per-block arrays do not have num_blocks=%lld entries", n)
            return 1
        if rf_resize(refs, n, _ZERO) or rf_resize(fills, n, _NEG_ONE):
            snprintf(msg, cap, "out of memory while checking invariants")
            return 1
        for slot in range(<int32_t>self._seqs.size()):
            s = &self._seqs[slot]
            if not s.live:
                if s.seq_id != -1:
                    snprintf(msg, cap, "free record slot %d still names sequence %lld", slot, s.seq_id)
                    return 1
                continue
            live += 1
            if self._find(s.seq_id) != slot:
                snprintf(msg, cap, "sequence %lld: index does not point at its record", s.seq_id)
                return 1
            if <int64_t>s.blocks.size() != _ceil_div(s.num_tokens, bs):
                snprintf(msg, cap, "sequence %lld: %lld tokens in %lld blocks of %lld",
                         s.seq_id, s.num_tokens, <int64_t>s.blocks.size(), bs)
                return 1
            if s.has_tokens and <int64_t>s.tokens.size() != s.num_tokens:
                snprintf(msg, cap, "sequence %lld: %lld token ids for %lld tokens",
                         s.seq_id, <int64_t>s.tokens.size(), s.num_tokens)
                return 1
            if s.blocks.back() != (s.blocks[s.blocks.size() - 1] if s.blocks.size() else -1):
                snprintf(msg, cap, "sequence %lld: table's copy of its last block is stale", s.seq_id)
                return 1
            if s.has_tokens and s.sole_gen == self._share_gen:
                snprintf(msg, cap, "sequence %lld keeps token ids but its sole_gen lacks the token bit",
                         s.seq_id)
                return 1
            if (rf_room(s, bs) != 0 and s.sole_gen == rf_sole_gen(s, self._share_gen)
                    and self._refs[s.blocks.back()].rc != 1):
                snprintf(msg, cap, "sequence %lld: marked sole holder of block %d, refcount %d",
                         s.seq_id, s.blocks.back(), self._refs[s.blocks.back()].rc)
                return 1
            for j in range(s.blocks.size()):
                b = s.blocks[j]
                if b < 0 or b >= n:
                    snprintf(msg, cap, "sequence %lld holds block %d outside the pool", s.seq_id, b)
                    return 1
                refs[b] += 1
                fill = s.num_tokens - <int64_t>j * bs
                fill = bs if fill > bs else fill
                if fills[b] < 0:
                    fills[b] = <int32_t>fill
                elif fills[b] != fill:
                    snprintf(msg, cap, "block %d is shared with different fill levels (%d and %lld)",
                             b, fills[b], fill)
                    return 1
        if live != <int64_t>self._index.count:
            snprintf(msg, cap, "%lld live sequences but %lld index entries", live,
                     <int64_t>self._index.count)
            return 1
        prev = NO_SLOT
        slot = self._lru_head
        while slot != NO_SLOT:
            s = &self._seqs[slot]
            if not s.live or s.lru_prev != prev:
                snprintf(msg, cap, "LRU list broken at slot %d", slot)
                return 1
            lru_len += 1
            if lru_len > live:
                snprintf(msg, cap, "LRU list longer than the %lld live sequences", live)
                return 1
            prev = slot
            slot = s.lru_next
        if prev != self._lru_tail or lru_len != live:
            snprintf(msg, cap, "LRU list holds %lld of %lld sequences", lru_len, live)
            return 1
        for i in range(n):
            if self._refs[i].ext < 0 or self._refs[i].rc != refs[i] + self._refs[i].ext:
                snprintf(msg, cap, "block %lld: refcount %d != %d table refs + %d external refs",
                         i, self._refs[i].rc, refs[i], self._refs[i].ext)
                return 1
            bit = (self._bits[i >> 6] >> (i & 63)) & 1
            if bit != (not self._occupied(<int32_t>i)):
                snprintf(msg, cap, "block %lld: free bit %d but refcount %d", i, <int>bit, self._refs[i].rc)
                return 1
            free_count += bit
        if free_count != self._num_free:
            snprintf(msg, cap, "free set holds %lld blocks, counter says %d", free_count, self._num_free)
            return 1
        words = _ceil_div(n, 64)
        for L in range(1, self._levels):
            for i in range(_ceil_div(words, 64) * 64):
                w = self._bits[self._level_off[L - 1] + i] if i < words else 0
                bit = (self._bits[self._level_off[L] + (i >> 6)] >> (i & 63)) & 1
                if bit != (w != 0):
                    snprintf(msg, cap, "free bitmap summary level %d wrong at word %lld", L, i)
                    return 1
            words = _ceil_div(words, 64)
        if n % 64 and (self._bits[n >> 6] >> (n & 63)) != 0:
            snprintf(msg, cap, "free bitmap has bits set beyond num_blocks")
            return 1
        for i in range(self._low_word):
            if self._bits[i] != 0:
                snprintf(msg, cap, "free block %lld lies below the lowest-word hint %lld",
                         i * 64 + rf_ctz64(self._bits[i]), self._low_word)
                return 1
        for j in range(self._pending_copies.size()):
            if self._pending_copies[j] < 0 or self._pending_copies[j] >= n:
                snprintf(msg, cap, "pending copy names block %d outside the pool", self._pending_copies[j])
                return 1
        used = n - self._avail()
        if self._stats.peak_allocations < used:
            snprintf(msg, cap, "peak allocations below current use")
            return 1
        if self._stats.total_allocations - self._stats.total_deallocations != used:
            snprintf(msg, cap, "allocations minus deallocations (%lld) != used blocks (%lld)",
                     self._stats.total_allocations - self._stats.total_deallocations, used)
            return 1
        if self.enable_prefix_caching:
            return self._check_prefix_locked(msg, cap)
        if self._num_evictable != 0:
            snprintf(msg, cap, "%d evictable blocks without prefix caching", self._num_evictable)
            return 1
        return 0

    cdef int _check_prefix_locked(self, char* msg, size_t cap) noexcept nogil:
        """The prefix index, the child lists, the policy lists and every key."""
        cdef int64_t n = self.num_blocks, bs = self.block_size, i, j, registered = 0, linked = 0
        cdef int64_t nfull, key, parent_key, seen
        cdef int32_t b, c, prev
        cdef int lst
        cdef PBlock* p
        cdef SeqRec* s
        for i in range(n):
            p = &self._pb[i]
            if p.serial == 0:
                if p.ev_list or p.child >= 0 or p.parent >= 0:
                    snprintf(msg, cap, "block %lld: not cached but linked in the prefix cache", i)
                    return 1
                continue
            registered += 1
            if rf_idmap_find(self._pindex, p.key) != i:
                snprintf(msg, cap, "block %lld: prefix index does not map its key to it", i)
                return 1
            if (p.ev_list != 0) != (self._refs[i].rc == 0):
                snprintf(msg, cap, "block %lld: cached with refcount %d but evictable=%d",
                         i, self._refs[i].rc, <int>p.ev_list)
                return 1
            if p.ev_list >= 2 and self._policy != POLICY_ARC:
                snprintf(msg, cap, "block %lld in list %d under the LRU policy", i, <int>p.ev_list)
                return 1
            parent_key = -1
            if p.parent >= 0:
                if self._pb[p.parent].serial == 0:
                    snprintf(msg, cap, "block %lld: cached but its parent %d is not", i, p.parent)
                    return 1
                parent_key = self._pb[p.parent].key
            key = rf_block_key(parent_key, p.salt, &self._btok[i * bs], bs, self._key_mask)
            if key != p.key:
                snprintf(msg, cap, "block %lld: key does not match its tokens and parent", i)
                return 1
            c = p.child
            prev = -1
            while c >= 0:
                if self._pb[c].parent != i or self._pb[c].sib_prev != prev or linked > n:
                    snprintf(msg, cap, "block %lld: child list broken at %d", i, c)
                    return 1
                linked += 1
                prev = c
                c = self._pb[c].sib_next
            if p.parent < 0:
                linked += 1
        if registered != <int64_t>self._pindex.count or linked != registered:
            snprintf(msg, cap, "%lld cached blocks, %lld index entries, %lld in the tree",
                     registered, <int64_t>self._pindex.count, linked)
            return 1
        seen = 0
        for lst in range(1, 4):
            prev = -1
            b = self._ev_head[lst]
            i = 0
            while b >= 0:
                if self._pb[b].ev_list != lst or self._pb[b].ev_prev != prev or i > n:
                    snprintf(msg, cap, "policy list %d broken at block %d", lst, b)
                    return 1
                # Lists 1 and 2 only gain blocks at their newest end, stamped in order.
                if (self._pb[b].stamp == 0 or self._pb[b].stamp > self._ev_clock
                        or (lst < 3 and prev >= 0 and self._pb[b].stamp <= self._pb[prev].stamp)):
                    snprintf(msg, cap, "policy list %d: block %d stamped out of order", lst, b)
                    return 1
                i += 1
                prev = b
                b = self._pb[b].ev_next
            if prev != self._ev_tail[lst] or i != self._ev_len[lst]:
                snprintf(msg, cap, "policy list %d holds %lld blocks, length says %d",
                         lst, i, self._ev_len[lst])
                return 1
            seen += i
        if seen != self._num_evictable:
            snprintf(msg, cap, "%lld blocks in policy lists, counter says %d", seen, self._num_evictable)
            return 1
        for i in range(<int64_t>self._seqs.size()):
            s = &self._seqs[i]
            if not s.live or not s.has_tokens:
                continue
            nfull = s.num_tokens // bs
            if <int64_t>s.keys.size() != nfull:
                snprintf(msg, cap, "sequence %lld: %lld keys for %lld full blocks",
                         s.seq_id, <int64_t>s.keys.size(), nfull)
                return 1
            parent_key = -1
            for j in range(nfull):
                key = rf_block_key(parent_key, s.salt, &s.tokens[j * bs], bs, self._key_mask)
                b = s.blocks[j]
                if key != s.keys[j] or (self._pb[b].serial != 0 and self._pb[b].key != key):
                    snprintf(msg, cap, "sequence %lld: key of block %lld is wrong", s.seq_id, j)
                    return 1
                parent_key = key
        return 0

    cdef void _reset_prefix_locked(self) noexcept nogil:
        """Empty the prefix index: evictable blocks become free, blocks in use stay
        allocated but uncached. Ghost keys are forgotten too."""
        cdef int32_t b
        cdef PBlock* p
        cdef int lst
        for b in range(self.num_blocks):
            p = &self._pb[b]
            if p.serial == 0:
                continue
            if p.ev_list:
                self._ev_unlink(b)
                self._bits_set(b)
                self._num_free += 1
            _uncache(p)
        rf_idmap_clear(self._pindex)
        for lst in range(1, 3):
            rf_idmap_clear(self._ghost[lst])
        self._event(EV_CLEARED, -1, -1, 0)

    # =======================================================================
    # Python API
    # =======================================================================

    # --- block level ---------------------------------------------------------

    def allocate(self, n, *, out=None):
        """Take ``n`` free blocks (lowest ids first) with refcount 1; int32 array.

        All or nothing: raises OutOfBlocks and allocates nothing when ``n``
        blocks cannot be made free. ``out`` may be a reusable int32 buffer of
        at least ``n`` elements; the result is then (a view of) ``out``.
        """
        cdef int32_t count = <int32_t>_count(n, "n", INT32_MAX)
        cdef cnp.ndarray arr = _out_array(out, count, cnp.NPY_INT32, "out")
        cdef int32_t* ptr = <int32_t*>cnp.PyArray_DATA(arr)
        cdef ErrInfo err
        cdef int st
        if count >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_allocate(count, ptr, &err)
        else:
            st = self.c_allocate(count, ptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(arr, count)

    def allocate_one(self):
        """Take the lowest free block with refcount 1 and return its id (fast path)."""
        cdef int32_t b = -1
        cdef ErrInfo err
        cdef int st
        self._lock.lock()
        st = self._allocate_locked(1, &b, &err)
        self._lock.unlock()
        if st != RF_OK:
            raise_status(st, &err)
        return b

    def incref(self, ids):
        """Add one reference to each listed block (an id listed twice gains two)."""
        cdef cnp.ndarray arr = _index_array(ids, cnp.NPY_INT32, "ids", BlockNotFound)
        cdef const int32_t* ptr = <const int32_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_incref(ptr, n, &err)
        else:
            st = self.c_incref(ptr, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def decref(self, ids):
        """Drop one reference from each listed block; blocks at zero become free.

        Only references taken with allocate/incref can be dropped here;
        references held by sequence tables are dropped by remove_sequence.
        Raises RefcountError (changing nothing) on any would-be underflow.
        """
        cdef cnp.ndarray arr = _index_array(ids, cnp.NPY_INT32, "ids", BlockNotFound)
        cdef const int32_t* ptr = <const int32_t*>cnp.PyArray_DATA(arr)
        cdef Py_ssize_t n = cnp.PyArray_DIM(arr, 0)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_IDS:
            with nogil:
                st = self.c_decref(ptr, n, &err)
        else:
            st = self.c_decref(ptr, n, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def decref_one(self, block_id):
        """Drop one external reference from a single block (fast path of decref)."""
        cdef int32_t b = _block_id(block_id)
        cdef ErrInfo err
        cdef int st
        self._lock.lock()
        st = self._decref_locked(&b, 1, &err)
        self._lock.unlock()
        if st != RF_OK:
            raise_status(st, &err)

    def refcount(self, block_id):
        """Current refcount of one block (table references plus external ones)."""
        cdef int32_t b = _block_id(block_id)
        cdef int32_t rc = -1, n
        self._lock.lock()
        n = self.num_blocks
        if b < n:
            rc = self._refs[b].rc
        self._lock.unlock()
        if rc < 0:
            raise BlockNotFound(f"block {b} out of range [0, {n})")
        return rc

    # --- sequence level ------------------------------------------------------

    def add_sequence(self, seq_id, tokens=None, num_tokens=0, salt=None, *, _salt_key=None):
        """Create a sequence with its initial tokens; returns their int64 slots.

        Pass ``tokens`` (token ids) to have the sequence keep them, or only a
        ``num_tokens`` count. With prefix caching, the longest run of cached
        leading full blocks with the same ``salt`` (None, int, str or bytes;
        blocks never match across salts) is reused instead of allocated:
        ``num_cached_tokens(seq_id)`` says how many leading tokens need no
        K/V write. Raises SequenceExists, OutOfBlocks. (``_salt_key``, private:
        a salt already digested, as ``sequence_info`` reports it, for restoring
        a swapped-out sequence.)
        """
        cdef int64_t sid = _seq_id(seq_id)
        cdef int64_t salt_value = _salt_value(salt) if _salt_key is None else _salt_key
        cdef int64_t count = _count(num_tokens, "num_tokens", INT64_MAX)
        cdef cnp.ndarray toks = None
        cdef const int32_t* tptr = NULL
        cdef bint with_tokens = tokens is not None
        cdef ErrInfo err
        cdef int st
        if with_tokens:
            toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
            if count not in (0, cnp.PyArray_DIM(toks, 0)):
                raise ArgumentValueError(
                    f"num_tokens={count} disagrees with {cnp.PyArray_DIM(toks, 0)} tokens")
            count = cnp.PyArray_DIM(toks, 0)
            tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        if count > <int64_t>self.num_blocks * self.block_size:
            raise OutOfBlocks(f"{count} tokens need more blocks than the pool has ({self.num_blocks})")
        cdef cnp.ndarray slots = cnp.PyArray_EMPTY(1, [count], cnp.NPY_INT64, 0)
        cdef int64_t* sptr = <int64_t*>cnp.PyArray_DATA(slots)
        if count >= NOGIL_MIN_TOKENS:
            with nogil:
                st = self.c_add_sequence(sid, with_tokens, tptr, count, salt_value, sptr, &err)
        else:
            st = self.c_add_sequence(sid, with_tokens, tptr, count, salt_value, sptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return slots

    def append(self, seq_id, tokens_or_count):
        """Append tokens (an array of ids) or a count to one sequence; int64 slots."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t c
        if isinstance(tokens_or_count, (int, np.integer)) and not isinstance(tokens_or_count, (bool, np.bool_)):
            c = <int32_t>_count(tokens_or_count, "count", INT32_MAX)
            return self._append_batch(np.array([sid], dtype=np.int64), np.array([c], dtype=np.int32),
                                      None, None)
        toks = _index_array(tokens_or_count, cnp.NPY_INT32, "tokens")
        return self._append_batch(np.array([sid], dtype=np.int64),
                                  np.array([len(toks)], dtype=np.int32), toks, None)

    def append_batch(self, seq_ids, counts, tokens=None, *, out=None):
        """Append ``counts[i]`` tokens to ``seq_ids[i]`` for every i in one atomic step.

        The decode hot path: one call per step for all running sequences.
        ``tokens`` (optional) holds the appended token ids back to back; it is
        required exactly for sequences that keep token ids. Returns the int64
        slot of every appended token, in order; ``out`` may be a reusable
        buffer. All or nothing; the GIL is released while the core works.
        """
        return self._append_batch(seq_ids, counts, tokens, out)

    cdef object _append_batch(self, object seq_ids, object counts, object tokens, object out):
        cdef cnp.ndarray ids = _index_array(seq_ids, cnp.NPY_INT64, "seq_ids")
        cdef cnp.ndarray cnt = _index_array(counts, cnp.NPY_INT32, "counts")
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0), i
        cdef const int32_t* cptr = <const int32_t*>cnp.PyArray_DATA(cnt)
        cdef const int64_t* iptr = <const int64_t*>cnp.PyArray_DATA(ids)
        cdef const int32_t* tptr = NULL
        cdef int64_t total = 0
        cdef bint negative = False
        cdef ErrInfo err
        cdef int st
        if cnp.PyArray_DIM(cnt, 0) != n:
            raise ArgumentValueError(f"{n} seq_ids but {cnp.PyArray_DIM(cnt, 0)} counts")
        for i in range(n):
            if cptr[i] < 0:
                negative = True
            total += cptr[i]
        if negative:
            raise ArgumentValueError("counts must be >= 0")
        if tokens is not None:
            toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
            if cnp.PyArray_DIM(toks, 0) != total:
                raise ArgumentValueError(f"counts add up to {total} but {len(toks)} tokens were given")
            tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef cnp.ndarray slots = _out_array(out, total, cnp.NPY_INT64, "out")
        cdef int64_t* sptr = <int64_t*>cnp.PyArray_DATA(slots)
        cdef bint with_tokens = tokens is not None
        if n >= NOGIL_MIN:
            with nogil:
                st = self.c_append_batch(iptr, cptr, n, with_tokens, tptr, sptr, &err)
        else:
            st = self.c_append_batch(iptr, cptr, n, with_tokens, tptr, sptr, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(slots, total)

    def fork(self, src, dst):
        """Create sequence ``dst`` sharing all of ``src``'s blocks (and tokens).

        Appending into a shared, partly filled last block later copies it
        first (copy-on-write); see take_pending_copies().
        """
        cdef int64_t s = _seq_id(src, "src"), d = _seq_id(dst, "dst")
        cdef ErrInfo err
        cdef int st
        with nogil:
            st = self.c_fork(s, d, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def remove_sequence(self, seq_id):
        """Remove a sequence, dropping its reference on every block it holds."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef ErrInfo err
        cdef int st
        # Releasing costs a few ns per block: cheaper than dropping the GIL.
        st = self.c_remove_sequence(sid, &err)
        if st != RF_OK:
            raise_status(st, &err)

    def take_pending_copies(self):
        """Return and clear the queued copy-on-write copies: int32 (k, 2) of (src, dst).

        Apply them (copy block src's K/V into dst) before writing new tokens.
        """
        cdef vector[int32_t] pairs
        self._lock.lock()
        pairs.swap(self._pending_copies)
        self._lock.unlock()
        return _i32_from_vector(pairs, 0, pairs.size()).reshape(-1, 2)

    # --- prefix cache --------------------------------------------------------

    def lookup_prefix(self, tokens, salt=None):
        """Number of leading tokens of ``tokens`` that are cached (whole blocks,
        verified), changing nothing."""
        cdef cnp.ndarray toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
        cdef int64_t salt_value = _salt_value(salt)
        cdef const int32_t* tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef int64_t n = cnp.PyArray_DIM(toks, 0), hit
        cdef ErrInfo err
        if not self.enable_prefix_caching:
            raise_status(RF_PREFIX_DISABLED, &err)
        with nogil:
            hit = self.c_lookup_prefix(tptr, n, salt_value)
        if hit < 0:
            raise MemoryError("rocmforge: host memory exhausted")
        return hit

    def acquire_prefix(self, tokens, salt=None, *, out=None):
        """Take the cached prefix of ``tokens`` for an engine that manages blocks
        itself: every hit block gains one external reference (drop it with
        decref). Returns the int32 ids, in order (a view of ``out`` when given:
        room for ``len(tokens) // block_size`` ids). Counts as a lookup in stats."""
        cdef cnp.ndarray toks = _index_array(tokens, cnp.NPY_INT32, "tokens")
        cdef int64_t salt_value = _salt_value(salt)
        cdef int64_t n = cnp.PyArray_DIM(toks, 0), got = 0
        cdef cnp.ndarray ids = _out_array(out, n // self.block_size, cnp.NPY_INT32, "out")
        cdef const int32_t* tptr = <const int32_t*>cnp.PyArray_DATA(toks)
        cdef int32_t* iptr = <int32_t*>cnp.PyArray_DATA(ids)
        cdef ErrInfo err
        cdef int st
        if n >= NOGIL_MIN_TOKENS:
            with nogil:
                st = self.c_acquire_prefix(tptr, n, salt_value, iptr, &got, &err)
        else:
            st = self.c_acquire_prefix(tptr, n, salt_value, iptr, &got, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _fit(ids, got)

    def num_cached_tokens(self, seq_id):
        """Leading tokens of a sequence that add_sequence found in the prefix cache."""
        return self._token_count(seq_id, True)

    def reset_prefix_cache(self):
        """Empty the prefix index. Evictable cached blocks become free; blocks in
        use stay with their sequences (uncached). Emits AllCleared."""
        cdef ErrInfo err
        cdef int st = RF_OK
        if not self.enable_prefix_caching:
            raise_status(RF_PREFIX_DISABLED, &err)
        with nogil:
            self._lock.lock()
            st = self._reserve_registrations(0)
            if st == RF_OK:
                self._reset_prefix_locked()
            self._lock.unlock()
        if st != RF_OK:
            raise_status(st, &err)

    @property
    def num_cached_blocks(self):
        """Blocks in the prefix index (in use or evictable)."""
        cdef size_t n
        self._lock.lock()
        n = self._pindex.count
        self._lock.unlock()
        return n

    @property
    def num_evictable_blocks(self):
        """Cached blocks with refcount 0: reusable by a hit, reclaimable by allocation."""
        cdef int32_t n
        self._lock.lock()
        n = self._num_evictable
        self._lock.unlock()
        return n

    @property
    def eviction_policy(self):
        """Name of the policy that orders evictable cached blocks."""
        return _POLICY_NAMES[self._policy]

    def take_events(self):
        """Return and clear the KV events recorded since the last call, in order:
        BlockStored, BlockRemoved and AllCleared (see rocmforge.events)."""
        cdef vector[KvEvent] evs
        cdef size_t i
        self._lock.lock()
        evs.swap(self._events)
        self._lock.unlock()
        out = []
        for i in range(evs.size()):
            if evs[i].kind == EV_STORED:
                out.append(BlockStored(evs[i].key, None if evs[i].parent_key < 0 else evs[i].parent_key,
                                       evs[i].num_tokens))
            elif evs[i].kind == EV_REMOVED:
                out.append(BlockRemoved(evs[i].key))
            else:
                out.append(AllCleared())
        return out

    def take_evicted(self):
        """Return and clear the ids of sequences evicted since the last call (int64)."""
        cdef vector[int64_t] ids
        self._lock.lock()
        ids.swap(self._evicted)
        self._lock.unlock()
        cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, [ids.size()], cnp.NPY_INT64, 0)
        if ids.size():
            memcpy(cnp.PyArray_DATA(arr), ids.data(), ids.size() * sizeof(int64_t))
        return arr

    # --- tables --------------------------------------------------------------

    cdef int _gather_tables(self, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                            vector[int64_t]* lens, ErrInfo* err) noexcept nogil:
        """Copy the tables (and token counts) of n sequences into local vectors."""
        cdef int st
        self._lock.lock()
        st = self._gather_tables_locked(ids, n, flat, lens, err)
        self._lock.unlock()
        return st

    cdef int _gather_tables_locked(self, const int64_t* ids, Py_ssize_t n, vector[int32_t]* flat,
                                   vector[int64_t]* lens, ErrInfo* err) noexcept nogil:
        cdef Py_ssize_t i
        cdef int32_t slot
        cdef SeqRec* s
        cdef size_t total = 0
        for i in range(n):
            slot = self._find(ids[i])
            if slot == NO_SLOT:
                err.id = ids[i]
                return RF_SEQ_NOT_FOUND
            total += self._seqs[slot].blocks.size()
        if rf_reserve(flat[0], total) or rf_reserve(lens[0], 2 * n):
            return RF_NO_MEMORY
        for i in range(n):
            s = &self._seqs[self._find(ids[i])]
            if s.blocks.size():
                rf_append_n(flat[0], s.blocks.data(), s.blocks.size())
            rf_push(lens[0], <int64_t>s.blocks.size())
            rf_push(lens[0], s.num_tokens)
        return RF_OK

    def block_table(self, seq_id):
        """The block ids of one sequence, in order (int32 copy)."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef vector[int32_t] flat
        cdef vector[int64_t] lens
        cdef ErrInfo err
        cdef int st
        with nogil:
            st = self._gather_tables(&sid, 1, &flat, &lens, &err)
        if st != RF_OK:
            raise_status(st, &err)
        return _i32_from_vector(flat, 0, flat.size())

    def block_tables(self, seq_ids, out=None):
        """Tables of many sequences as an int32 [n, max_blocks] array padded with -1.

        vLLM's layout. ``out`` may be a reusable C-contiguous int32 [n, m]
        array with m at least the longest table; every row is padded to m.
        """
        cdef cnp.ndarray ids = _index_array(seq_ids, cnp.NPY_INT64, "seq_ids")
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0), i, width = 0, pos = 0, k
        cdef vector[int32_t] flat
        cdef vector[int64_t] lens
        cdef ErrInfo err
        cdef int st
        with nogil:
            st = self._gather_tables(<const int64_t*>cnp.PyArray_DATA(ids), n, &flat, &lens, &err)
        if st != RF_OK:
            raise_status(st, &err)
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
                raise ArgumentValueError(
                    f"out has shape {out.shape}, need ({n}, >= {width})")
            width = cnp.PyArray_DIM(table, 1)
        cdef int32_t* dst = <int32_t*>cnp.PyArray_DATA(table)
        with nogil:
            for i in range(n):
                for k in range(width):
                    dst[i * width + k] = flat[pos + k] if k < lens[2 * i] else -1
                pos += lens[2 * i]
        return table

    def csr_block_tables(self, seq_ids):
        """Tables in FlashInfer's CSR layout: (indptr, indices, last_page_len), all int32.

        ``indices[indptr[i]:indptr[i+1]]`` are the blocks of ``seq_ids[i]``;
        ``last_page_len[i]`` is the number of tokens in its last block
        (0 for an empty sequence).
        """
        cdef cnp.ndarray ids = _index_array(seq_ids, cnp.NPY_INT64, "seq_ids")
        cdef Py_ssize_t n = cnp.PyArray_DIM(ids, 0), i
        cdef vector[int32_t] flat
        cdef vector[int64_t] lens
        cdef ErrInfo err
        cdef int st
        cdef int64_t nt, bs = self.block_size
        with nogil:
            st = self._gather_tables(<const int64_t*>cnp.PyArray_DATA(ids), n, &flat, &lens, &err)
        if st != RF_OK:
            raise_status(st, &err)
        if flat.size() > INT32_MAX:
            raise ArgumentValueError("tables too large for int32 indptr")
        cdef cnp.ndarray indptr = cnp.PyArray_EMPTY(1, [n + 1], cnp.NPY_INT32, 0)
        cdef cnp.ndarray last = cnp.PyArray_EMPTY(1, [n], cnp.NPY_INT32, 0)
        cdef int32_t* ip = <int32_t*>cnp.PyArray_DATA(indptr)
        cdef int32_t* lp = <int32_t*>cnp.PyArray_DATA(last)
        ip[0] = 0
        for i in range(n):
            ip[i + 1] = ip[i] + <int32_t>lens[2 * i]
            nt = lens[2 * i + 1]
            lp[i] = 0 if nt == 0 else <int32_t>(nt - (nt - 1) // bs * bs)
        return indptr, _i32_from_vector(flat, 0, flat.size()), last

    # --- sequence queries ----------------------------------------------------

    def num_tokens(self, seq_id):
        """Number of tokens in a sequence."""
        return self._token_count(seq_id, False)

    cdef int64_t _token_count(self, object seq_id, bint cached) except -1:
        """A sequence's token count, or its count of tokens found cached."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t slot
        cdef int64_t nt = 0
        self._lock.lock()
        slot = self._find(sid)
        if slot != NO_SLOT:
            nt = self._seqs[slot].cached_tokens if cached else self._seqs[slot].num_tokens
        self._lock.unlock()
        if slot == NO_SLOT:
            raise SequenceNotFound(f"sequence {sid} not found")
        return nt

    def sequence_tokens(self, seq_id):
        """The token ids of a sequence (int32 copy), or None if it was created without them."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t slot
        cdef bint has = False
        cdef vector[int32_t] toks
        cdef int st = RF_OK
        cdef SeqRec* s
        self._lock.lock()
        slot = self._find(sid)
        if slot != NO_SLOT:
            s = &self._seqs[slot]
            has = s.has_tokens
            if has and s.tokens.size():
                if rf_reserve(toks, s.tokens.size()):
                    st = RF_NO_MEMORY
                else:
                    rf_append_n(toks, s.tokens.data(), s.tokens.size())
        self._lock.unlock()
        if slot == NO_SLOT:
            raise SequenceNotFound(f"sequence {sid} not found")
        if st != RF_OK:
            raise MemoryError("rocmforge: host memory exhausted")
        if not has:
            return None
        return _i32_from_vector(toks, 0, toks.size())

    def sequence_info(self, seq_id):
        """A dict: seq_id, created_at, last_access (time.time() seconds), access_count,
        num_blocks, num_tokens, has_tokens, num_cached_tokens and salt_key (the
        64-bit digest of the sequence's salt that enters its block keys; 0 for none)."""
        cdef int64_t sid = _seq_id(seq_id)
        cdef int32_t slot
        cdef SeqRec* s
        cdef double created = 0, last = 0
        cdef int64_t accesses = 0, nt = 0, nblocks = 0, cached = 0, salt = 0
        cdef bint has = False
        self._lock.lock()
        slot = self._find(sid)
        if slot != NO_SLOT:
            s = &self._seqs[slot]
            created, last, accesses = s.created_at, s.last_access, s.access_count
            nt, nblocks, has = s.num_tokens, s.blocks.size(), s.has_tokens
            cached, salt = s.cached_tokens, s.salt
        self._lock.unlock()
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
        }

    def sequence_ids(self):
        """Ids of all sequences, least recently accessed first (int64)."""
        cdef vector[int64_t] ids
        cdef int32_t slot
        cdef int st = RF_OK
        self._lock.lock()
        if rf_reserve(ids, self._index.count):
            st = RF_NO_MEMORY
        else:
            slot = self._lru_head
            while slot != NO_SLOT:
                rf_push(ids, self._seqs[slot].seq_id)
                slot = self._seqs[slot].lru_next
        self._lock.unlock()
        if st != RF_OK:
            raise MemoryError("rocmforge: host memory exhausted")
        cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, [ids.size()], cnp.NPY_INT64, 0)
        if ids.size():
            memcpy(cnp.PyArray_DATA(arr), ids.data(), ids.size() * sizeof(int64_t))
        return arr

    def __contains__(self, seq_id):
        if isinstance(seq_id, (bool, np.bool_)) or not hasattr(seq_id, "__index__"):
            return False
        value = seq_id.__index__()
        if value < 0 or value > INT64_MAX:
            return False
        cdef int64_t sid = value
        cdef bint found
        self._lock.lock()
        found = self._find(sid) != NO_SLOT
        self._lock.unlock()
        return found

    def __len__(self):
        cdef size_t n
        self._lock.lock()
        n = self._index.count
        self._lock.unlock()
        return n

    # --- pool ------------------------------------------------------------

    @property
    def num_free_blocks(self):
        """Blocks with refcount 0, all of which an allocation can take (free ones
        and, with prefix caching, evictable cached ones)."""
        cdef int64_t n
        self._lock.lock()
        n = self._avail()
        self._lock.unlock()
        return n

    @property
    def num_used_blocks(self):
        """Blocks with refcount > 0."""
        cdef int64_t n
        self._lock.lock()
        n = self.num_blocks - self._avail()
        self._lock.unlock()
        return n

    def stats(self):
        """Counters as a dict (see the README for their meaning)."""
        cdef Stats st
        cdef int64_t used
        cdef size_t nseq
        self._lock.lock()
        st = self._stats
        used = self.num_blocks - self._avail()
        nseq = self._index.count
        self._lock.unlock()
        return {
            "total_allocations": st.total_allocations,
            "total_deallocations": st.total_deallocations,
            "peak_allocations": st.peak_allocations,
            "current_allocations": used,
            "evictions": st.evictions,
            "cow_copies": st.cow_copies,
            "compaction_count": st.compaction_count,
            "last_compaction_ms": st.last_compaction_ms,
            "num_sequences": nseq,
            "prefix_lookups": st.prefix_lookups,
            "prefix_query_tokens": st.prefix_query_tokens,
            "prefix_hit_tokens": st.prefix_hit_tokens,
            "prefix_hit_rate": (<double>st.prefix_hit_tokens / <double>st.prefix_query_tokens
                                if st.prefix_query_tokens else 0.0),
            "cached_blocks_stored": st.cached_blocks_stored,
            "cached_blocks_evicted": st.cached_blocks_evicted,
        }

    def fragmentation_ratio(self):
        """Share of the span [0, highest occupied id] that is free: 0.0 when packed.
        Occupied blocks are those in use or cached."""
        cdef int64_t top = -1, b
        cdef int64_t used
        self._lock.lock()
        used = self.num_blocks - self._num_free
        b = self.num_blocks - 1
        while b >= 0 and used > 0:
            if self._occupied(<int32_t>b):
                top = b
                break
            b -= 1
        self._lock.unlock()
        if top < 0:
            return 0.0
        return <double>(top + 1 - used) / <double>(top + 1)

    def memory_efficiency(self):
        """Share of the token slots in sequence-held blocks that hold tokens (1.0 when
        every block is full). Shared blocks count once; blocks held only through
        allocate()/incref() are not counted."""
        cdef int64_t filled = 0, held = 0, bs = self.block_size, fill
        cdef vector[int32_t] seen
        cdef int32_t slot, b
        cdef size_t j
        cdef SeqRec* s
        cdef int st = RF_OK
        self._lock.lock()
        if rf_resize(seen, self.num_blocks, _ZERO):
            st = RF_NO_MEMORY
        else:
            for slot in range(<int32_t>self._seqs.size()):
                s = &self._seqs[slot]
                if not s.live:
                    continue
                for j in range(s.blocks.size()):
                    b = s.blocks[j]
                    if seen[b]:
                        continue
                    seen[b] = 1
                    fill = s.num_tokens - <int64_t>j * bs
                    filled += bs if fill > bs else fill
                    held += bs
        self._lock.unlock()
        if st != RF_OK:
            raise MemoryError("rocmforge: host memory exhausted")
        return 1.0 if held == 0 else <double>filled / <double>held

    def should_compact(self, threshold=0.3):
        """True when fragmentation_ratio() exceeds ``threshold`` (in [0, 1])."""
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise ArgumentTypeError("threshold must be a number")
        if not 0.0 <= threshold <= 1.0:
            raise ArgumentValueError(f"threshold must be in [0, 1], got {threshold}")
        return self.fragmentation_ratio() > threshold

    def compact(self):
        """Move live blocks from the top of the pool into the lowest free ids.

        Afterwards occupied blocks (in use, and cached ones with prefix
        caching) fill the lowest ids. Every sequence table and the prefix
        index are rewritten; returns the moves as int32 (k, 2) of (old, new) so
        the data path can move K/V and callers can remap ids they hold through
        allocate()/incref(). Refuses (KvCacheError) while copy-on-write copies
        are pending.
        """
        cdef vector[int32_t] moves
        cdef ErrInfo err
        cdef int st
        with nogil:
            self._lock.lock()
            st = self._compact_locked(&moves, &err)
            self._lock.unlock()
        if st != RF_OK:
            raise_status(st, &err)
        return _i32_from_vector(moves, 0, moves.size()).reshape(-1, 2)

    def shrink(self, num_blocks):
        """Reduce the pool to ``num_blocks``; every block being dropped must be free."""
        cdef int32_t n = <int32_t>_count(num_blocks, "num_blocks", INT32_MAX)
        cdef ErrInfo err
        cdef int st
        if n < 1:
            raise InvalidConfiguration("num_blocks must be >= 1")
        if n > self.num_blocks:
            raise InvalidConfiguration(f"shrink to {n} > num_blocks={self.num_blocks}: use grow()")
        with nogil:
            self._lock.lock()
            st = self._shrink_locked(n, &err)
            self._lock.unlock()
        if st != RF_OK:
            raise_status(st, &err)

    def grow(self, num_blocks):
        """Enlarge the pool to ``num_blocks``; the new blocks are free."""
        cdef int32_t n = <int32_t>_count(num_blocks, "num_blocks", INT32_MAX)
        cdef int st
        if n < self.num_blocks:
            raise InvalidConfiguration(f"grow to {n} < num_blocks={self.num_blocks}: use shrink()")
        with nogil:
            self._lock.lock()
            st = self._resize_pool(n) if n > self.num_blocks else RF_OK
            self._lock.unlock()
        if st != RF_OK:
            raise MemoryError(f"cannot allocate bookkeeping for {n} blocks")

    def metadata_bytes(self):
        """Host memory held by the manager's own structures, in bytes (capacities)."""
        cdef size_t total = 0, slot
        self._lock.lock()
        total += self._refs.capacity() * sizeof(BlockRefs)
        total += self._scratch.capacity() * sizeof(BlockScratch)
        total += self._bits.capacity() * sizeof(uint64_t)
        total += self._seqs.capacity() * sizeof(SeqRec)
        for slot in range(self._seqs.size()):
            total += self._seqs[slot].blocks.bytes()
            total += self._seqs[slot].tokens.capacity() * sizeof(int32_t)
            total += self._seqs[slot].keys.capacity() * sizeof(int64_t)
        total += self._free_slots.capacity() * sizeof(int32_t)
        total += rf_idmap_bytes(self._index)
        total += (self._batch_slots.capacity() + self._tmp_blocks.capacity()
                  + self._tmp_victims.capacity() + self._pending_copies.capacity()) * sizeof(int32_t)
        total += ((self._evicted.capacity() + self._tmp_slow.capacity() + self._tmp_moved.capacity())
                  * sizeof(int64_t))
        total += self._tmp_stamps.capacity() * sizeof(double)
        total += self._pb.capacity() * sizeof(PBlock) + self._btok.capacity() * sizeof(int32_t)
        total += rf_idmap_bytes(self._pindex) + rf_idmap_bytes(self._ghost[1]) + rf_idmap_bytes(self._ghost[2])
        total += (self._ghost_ring[1].capacity() + self._ghost_ring[2].capacity()) * sizeof(int64_t)
        total += (self._tmp_hits.capacity() + self._tmp_stack.capacity()) * sizeof(int32_t)
        total += self._events.capacity() * sizeof(KvEvent)
        self._lock.unlock()
        return total + sizeof(BlockManager)

    def check_invariants(self):
        """Recompute every derived quantity and raise InvariantError on any mismatch.

        Checks: refcount == table references + external references for every
        block; the free set is exactly the blocks at refcount 0 (every bitmap
        level); token counts match block counts; shared partly filled blocks
        have one fill level; the index and LRU list hold exactly the live
        sequences; statistics agree with the pool.
        """
        cdef char msg[512]
        cdef int bad
        with nogil:
            self._lock.lock()
            bad = self._check_locked(msg, sizeof(msg))
            self._lock.unlock()
        if bad:
            raise InvariantError(msg.decode("utf-8", "replace"))

    def __repr__(self):
        cached = f", cached={self.num_cached_blocks}" if self.enable_prefix_caching else ""
        return (f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"free={self.num_free_blocks}{cached}, sequences={len(self)})")
