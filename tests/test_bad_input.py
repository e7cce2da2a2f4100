"""Bad arguments raise a clear KvCacheError (also TypeError/ValueError) and change nothing."""

import numpy as np
import pytest

import rocmforge as rf


def fingerprint(m):
    ids = m.sequence_ids().tolist()
    return (
        m.num_blocks,
        m.num_free_blocks,
        [m.refcount(b) for b in range(m.num_blocks)],
        ids,
        [m.block_table(s).tolist() for s in ids],
        [m.num_tokens(s) for s in ids],
        {k: v for k, v in m.stats().items() if k != "last_compaction_ms"},
    )


@pytest.fixture
def m():
    mgr = rf.BlockManager(16, 4)
    mgr.add_sequence(1, num_tokens=5)
    mgr.add_sequence(2, tokens=[1, 2, 3])
    mgr.fork(1, 3)
    mgr.allocate(2)
    return mgr


TYPE_ERRORS = [
    ("allocate", (1.5,)),
    ("allocate", ("3",)),
    ("allocate", (True,)),
    ("allocate", (None,)),
    ("incref", ([1.0],)),
    ("incref", (np.array([1.0]),)),
    ("incref", (np.array([True]),)),
    ("incref", ("12",)),
    ("decref", (None,)),
    ("decref", ({1: 2},)),
    ("add_sequence", (1.0,)),
    ("add_sequence", ("7",)),
    ("add_sequence", (7, np.array([1.5, 2.5]))),
    ("add_sequence", (7, None, 2.0)),
    ("append", (1, 2.5)),
    ("append", (1.0, 2)),
    ("append_batch", ([1], [1.0])),
    ("append_batch", ([1.0], [1])),
    ("append_batch", ([2], [1], [1.5])),
    ("fork", (1, "x")),
    ("remove_sequence", (None,)),
    ("block_table", (2.0,)),
    ("block_tables", ([1, 2], np.zeros((2, 4), dtype=np.int64))),
    ("refcount", (1.0,)),
    ("decref_one", ("0",)),
    ("shrink", (3.5,)),
    ("grow", ("20",)),
    ("should_compact", ("0.3",)),
]

VALUE_ERRORS = [
    ("allocate", (-1,)),
    ("allocate", (2**31,)),
    ("incref", (np.zeros((2, 2), dtype=np.int32),)),
    ("incref", (np.arange(8, dtype=np.int32)[::2],)),
    ("decref", (np.int32(3),)),
    ("add_sequence", (-1,)),
    ("add_sequence", (2**63,)),
    ("add_sequence", (7, None, -3)),
    ("add_sequence", (7, [1, 2], 5)),
    ("add_sequence", (7, [2**40])),
    ("add_sequence", (7, np.zeros((1, 3), dtype=np.int32))),
    ("append", (1, -2)),
    ("append", (1, 2**31)),
    ("append", (-5, 1)),
    ("append_batch", ([1, 3], [1])),
    ("append_batch", ([1, 3], [1, -1])),
    ("append_batch", ([1, 1], [1, 1])),
    ("append_batch", ([2], [2], [1])),
    ("append_batch", ([1], [1], [7])),
    ("append_batch", ([2], [1])),
    ("append_batch", ([1, 3], np.ones((2, 1), dtype=np.int32))),
    ("append_batch", (np.arange(6, dtype=np.int64)[::3], [1, 1])),
    ("append_batch", ([1], [1]), {"out": np.empty(0, dtype=np.int64)}),
    ("fork", (1, -1)),
    ("shrink", (0,)),
    ("shrink", (17,)),
    ("shrink", (3,)),
    ("grow", (15,)),
    ("should_compact", (1.5,)),
]

LOOKUP_ERRORS = [
    ("remove_sequence", (99,), rf.SequenceNotFound),
    ("append", (99, 1), rf.SequenceNotFound),
    ("append_batch", ([1, 99], [1, 1]), rf.SequenceNotFound),
    ("fork", (99, 100), rf.SequenceNotFound),
    ("fork", (1, 2), rf.SequenceExists),
    ("add_sequence", (1,), rf.SequenceExists),
    ("block_tables", ([1, 99],), rf.SequenceNotFound),
    ("csr_block_tables", ([99],), rf.SequenceNotFound),
    ("incref", ([0, 16],), rf.BlockNotFound),
    ("decref", ([-1],), rf.BlockNotFound),
    ("refcount", (16,), rf.BlockNotFound),
    ("decref", ([15],), rf.RefcountError),
    ("decref", ([0],), rf.RefcountError),
    ("incref", ([15],), rf.RefcountError),
    ("allocate", (20,), rf.OutOfBlocks),
    ("add_sequence", (9, None, 10**6), rf.OutOfBlocks),
    ("add_sequence", (9, None, 2**62), rf.OutOfBlocks),
    ("append", (1, 10**6), rf.OutOfBlocks),
]


def call(m, name, args, kwargs=None):
    return getattr(m, name)(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", TYPE_ERRORS, ids=lambda c: f"{c[0]}{c[1]!r}"[:60])
def test_type_errors(m, case):
    before = fingerprint(m)
    with pytest.raises(rf.ArgumentTypeError) as info:
        call(m, *case)
    assert isinstance(info.value, TypeError) and isinstance(info.value, rf.KvCacheError)
    assert str(info.value)
    assert fingerprint(m) == before
    m.check_invariants()


@pytest.mark.parametrize("case", VALUE_ERRORS, ids=lambda c: f"{c[0]}{c[1]!r}"[:60])
def test_value_errors(m, case):
    before = fingerprint(m)
    with pytest.raises(rf.KvCacheError) as info:
        call(m, *case)
    assert isinstance(info.value, ValueError), repr(info.value)
    assert str(info.value)
    assert fingerprint(m) == before
    m.check_invariants()


@pytest.mark.parametrize("case", LOOKUP_ERRORS, ids=lambda c: f"{c[0]}{c[1]!r}"[:60])
def test_unknown_ids_and_exhaustion(m, case):
    name, args, exc = case
    before = fingerprint(m)
    with pytest.raises(exc):
        call(m, name, args)
    assert fingerprint(m) == before
    m.check_invariants()


def test_errors_name_the_offender(m):
    with pytest.raises(rf.SequenceNotFound, match="99"):
        m.append_batch([1, 99], [1, 1])
    with pytest.raises(rf.BlockNotFound, match="16"):
        m.incref([16])
    with pytest.raises(rf.ArgumentValueError, match="sequence 1 is named twice"):
        m.append_batch([1, 1], [1, 1])
    with pytest.raises(rf.OutOfBlocks, match="need"):
        m.allocate(100)


def test_exact_int_dtypes_are_not_copied_and_others_are_converted(m):
    ids = np.array([1, 3], dtype=np.int64)
    counts = np.array([1, 1], dtype=np.int32)
    m.append_batch(ids, counts)
    m.append_batch(np.array([1, 3], dtype=np.uint8), np.array([1, 1], dtype=np.int64))
    m.append_batch((1, 3), [0, 0])
    assert m.num_tokens(1) == m.num_tokens(3) == 7
    m.check_invariants()


def test_readonly_inputs_are_accepted_and_readonly_outputs_refused(m):
    ids = np.array([1], dtype=np.int64)
    ids.flags.writeable = False
    m.append_batch(ids, [1])
    out = np.empty(4, dtype=np.int64)
    out.flags.writeable = False
    with pytest.raises(rf.ArgumentTypeError):
        m.append_batch([1], [1], out=out)
