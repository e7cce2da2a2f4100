"""rocmforge._ids against plain Python: the sorted set tests against sets, runs against a loop."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from rocmforge._ids import meets, repeats, runs

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
