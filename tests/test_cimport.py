"""An extension written against rocmforge/_core.pxd builds and drives the manager without the GIL."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import rocmforge as rf

pytest.importorskip("Cython")

HERE = os.path.dirname(__file__)

SETUP = """
import rocmforge
from Cython.Build import cythonize
from setuptools import Extension, setup
ext = Extension("engine_loop", ["engine_loop.pyx"], include_dirs=[rocmforge.get_include()],
                language="c++", extra_compile_args=["-O2", "-std=c++17"])
setup(ext_modules=cythonize([ext], include_path=[{root!r}], quiet=True))
"""


@pytest.fixture(scope="module")
def engine_loop(tmp_path_factory):
    build = tmp_path_factory.mktemp("cimport_ext")
    shutil.copy(os.path.join(HERE, "cimport_ext", "engine_loop.pyx"), build)
    root = os.path.dirname(rf.get_include())
    (build / "setup.py").write_text(SETUP.format(root=root))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(build))
    try:
        import engine_loop
        yield engine_loop
    finally:
        sys.path.remove(str(build))


def test_decode_steps_match_the_python_api(engine_loop):
    via_c, via_py = rf.BlockManager(256, 4), rf.BlockManager(256, 4)
    for m in (via_c, via_py):
        for sid in range(8):
            m.add_sequence(sid, num_tokens=sid)
        m.fork(3, 100)
    ids = np.array(list(range(8)) + [100], dtype=np.int64)
    counts = np.ones(len(ids), dtype=np.int32)
    slots = np.empty((20, len(ids)), dtype=np.int64)
    engine_loop.decode_steps(via_c, ids, counts, slots)
    expected = np.stack([via_py.append_batch(ids, counts) for _ in range(20)])
    assert np.array_equal(slots, expected)
    assert via_c.take_pending_copies().tolist() == via_py.take_pending_copies().tolist()
    via_c.check_invariants()


def test_status_codes_become_exceptions(engine_loop):
    m = rf.BlockManager(8, 4)
    with pytest.raises(rf.SequenceNotFound, match="sequence 5"):
        engine_loop.decode_steps(m, np.array([5], dtype=np.int64), np.ones(1, dtype=np.int32),
                                 np.empty((1, 1), dtype=np.int64))
    m.allocate(8)
    with pytest.raises(rf.OutOfBlocks):
        engine_loop.churn(m, 1)


def test_churn_through_the_c_api(engine_loop):
    m = rf.BlockManager(16, 4)
    m.allocate(3)
    assert engine_loop.churn(m, 1000) == 3 * 1000  # always the lowest free id
    assert m.num_used_blocks == 3
    m.check_invariants()


def test_sequence_marks_survive_the_epoch_wrap(engine_loop):
    # Records keep the low 32 bits of the operation number: a mark written just
    # before the wrap must not read as "named twice" 2**32 operations later.
    m = rf.BlockManager(64, 4, evict_sequences=True)
    for sid in range(3):
        m.add_sequence(sid, num_tokens=4)
    engine_loop.set_epoch(m, 2**32 - 2)
    m.append_batch(np.array([0], dtype=np.int64), np.ones(1, dtype=np.int32))  # marks 0 with 0xffffffff
    m.append_batch(np.array([1], dtype=np.int64), np.ones(1, dtype=np.int32))  # wraps
    engine_loop.set_epoch(m, 2**33 - 2)
    slots = m.append_batch(np.array([0, 2], dtype=np.int64), np.ones(2, dtype=np.int32))
    assert slots.tolist() == [m.block_table(0)[1] * 4 + 1, m.block_table(2)[1] * 4]
    with pytest.raises(rf.KvCacheError, match="twice"):
        m.append_batch(np.array([1, 1], dtype=np.int64), np.ones(2, dtype=np.int32))
    m.check_invariants()


INT32_MAX = 2**31 - 1


def test_refcounts_at_the_int32_edge(engine_loop):
    # A block one reference short of INT32_MAX takes exactly one more; every
    # call that would add another refuses (or stops before it), changing nothing.
    m = rf.BlockManager(16, 4, enable_prefix_caching=True)
    prompt = np.arange(12, dtype=np.int32)
    m.add_sequence(0, prompt)
    first, second, _ = m.block_table(0).tolist()
    engine_loop.add_external_refs(m, second, INT32_MAX - 2)
    m.incref(np.array([second], dtype=np.int32))
    assert m.refcount(second) == INT32_MAX
    m.check_invariants()
    before = (m.num_free_blocks, m.refcount(first), m.stats()["total_allocations"])
    with pytest.raises(rf.RefcountError, match="exceed"):
        m.incref(np.array([first, second], dtype=np.int32))
    with pytest.raises(rf.RefcountError):
        m.fork(0, 1)
    assert (m.num_free_blocks, m.refcount(first), m.stats()["total_allocations"]) == before
    assert 1 not in m
    # A prefix hit stops before the saturated block: the acquirer gets the
    # first block only, and a new sequence reuses only that one.
    assert m.acquire_prefix(prompt).tolist() == [first]
    m.add_sequence(2, prompt)
    assert m.num_cached_tokens(2) == 4
    assert m.block_table(2)[0] == first and second not in m.block_table(2).tolist()
    assert m.refcount(second) == INT32_MAX
    m.check_invariants()
    m.decref(np.array([first, second], dtype=np.int32))
    engine_loop.drop_external_refs(m, second, INT32_MAX - 2)
    for sid in (0, 2):
        m.remove_sequence(sid)
    assert m.num_used_blocks == 0
    m.check_invariants()
