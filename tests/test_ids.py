"""rocmforge._ids' sorted set tests against Python sets."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from rocmforge._ids import meets, repeats

ids = st.lists(st.integers(-2**31, 2**31 - 1), max_size=40).map(lambda v: np.array(v, dtype=np.int32))
small = st.lists(st.integers(0, 20), max_size=40).map(lambda v: np.array(v, dtype=np.int64))


@given(st.one_of(ids, small))
def test_repeats_is_a_set_test(a):
    assert repeats(a) == (len(set(a.tolist())) != len(a))


@given(st.one_of(ids, small), st.one_of(ids, small))
def test_meets_is_a_set_test(a, b):
    assert meets(a, b) == bool(set(a.tolist()) & set(b.tolist()))
