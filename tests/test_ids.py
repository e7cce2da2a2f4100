"""rocmforge._ids against plain Python: the sorted set tests against sets, runs
and copy waves against loops; copy_blocks' one-pass pair order (order_pairs)
against the waves and a sort."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rocmforge._ids import meets, repeats, runs, split_waves
from rocmforge._kvcache import _order_pairs

ids = st.lists(st.integers(-2**31, 2**31 - 1), max_size=40).map(lambda v: np.array(v, dtype=np.int32))
small = st.lists(st.integers(0, 20), max_size=40).map(lambda v: np.array(v, dtype=np.int64))


@given(st.one_of(ids, small))
def test_repeats_is_a_set_test(a):
    assert repeats(a) == (len(set(a.tolist())) != len(a))


@given(st.one_of(ids, small), st.one_of(ids, small))
def test_meets_is_a_set_test(a, b):
    assert meets(a, b) == bool(set(a.tolist()) & set(b.tolist()))


@given(st.lists(st.integers(-5, 5), min_size=1, max_size=30), st.data())
def test_runs_cut_where_any_array_does_not_rise_by_one(steps, data):
    a = np.cumsum(np.array(steps, dtype=np.int64))
    b = np.array(data.draw(st.lists(st.integers(-3, 3), min_size=len(a), max_size=len(a))), dtype=np.int32)
    starts, lengths = runs(a, b)
    want = [0] + [i for i in range(1, len(a)) if a[i] != a[i - 1] + 1 or b[i] != b[i - 1] + 1]
    assert starts.tolist() == want and lengths.sum() == len(a)
    assert lengths.tolist() == [e - s for s, e in zip(want, want[1:] + [len(a)])]
    assert runs(a)[0].tolist() == [0] + [i for i in range(1, len(a)) if a[i] != a[i - 1] + 1]


def chained(pairs):
    """Plain Python: whether some pair reads or writes a block an earlier pair
    writes, or writes a block an earlier pair reads."""
    reads, writes = set(), set()
    for src, dst in pairs.tolist():
        if src in writes or dst in writes or dst in reads:
            return True
        reads.add(src)
        writes.add(dst)
    return False


pair_lists = st.integers(1, 40).flatmap(lambda nb: st.tuples(
    st.just(nb), st.lists(st.tuples(st.integers(-2, nb + 1), st.integers(-2, nb + 1)), max_size=30)))


@given(pair_lists)
def test_waves_cut_before_each_chained_pair(case):
    pairs = np.array(case[1], dtype=np.int32).reshape(-1, 2)
    waves = split_waves(pairs)
    assert np.array_equal(np.concatenate(waves), pairs)
    assert all(not chained(w) for w in waves) and (len(waves) == 1 or all(len(w) for w in waves))
    assert all(chained(np.concatenate([a, b[:1]])) for a, b in zip(waves, waves[1:]))


def shift_for(n, num_blocks):
    """The smallest shift that puts ids [0, num_blocks) in at most n groups."""
    shift = 0
    while (num_blocks - 1) >> shift >= max(n, 1):
        shift += 1
    return shift


@given(pair_lists)
def test_order_pairs_sorts_by_source_unless_the_pairs_chain_or_leave_the_pool(case):
    num_blocks, pairs = case[0], np.array(case[1], dtype=np.int32).reshape(-1, 2)
    status, out = _order_pairs(pairs, num_blocks)
    if ((pairs < 0) | (pairs >= num_blocks)).any():
        assert status == 1
    elif chained(pairs):
        assert status == 2 and len(split_waves(pairs)) > 1
    else:
        assert status == 0 and len(split_waves(pairs)) <= 1
        assert np.array_equal(out, pairs[np.argsort(pairs[:, 0] >> shift_for(len(pairs), num_blocks),
                                                    kind="stable")])


@pytest.mark.parametrize("num_blocks", [2**20, 2**31 - 1])
def test_order_pairs_with_many_pairs_up_to_the_largest_pool(num_blocks):
    rng = np.random.default_rng(2)
    ids = rng.choice(num_blocks, 2 * 4096, replace=False)
    ids[0] = num_blocks - 1                                     # the last id a pool has
    pairs = ids.reshape(-1, 2).astype(np.int32)                 # every id once: nothing chains
    status, out = _order_pairs(pairs, num_blocks)
    assert status == 0 and np.all(np.diff(out[:, 0] >> shift_for(len(pairs), num_blocks)) >= 0)
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, pairs.tolist()))
    assert _order_pairs(pairs, int(ids.max()))[0] == 1         # one id beyond a smaller pool
