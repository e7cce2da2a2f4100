import os
import sys

import gc

import pytest
from hypothesis import HealthCheck, settings

# The reference model and helpers live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

from opcount import OPS  # noqa: E402
from rocmforge import live_buffers  # noqa: E402

_GPU_OUTCOMES = {"passed": 0, "failed": 0, "skipped": 0}

# Hypothesis budgets. "ci" is the default; "deep" is for tools/stateful_deep.sh
# (ROCMFORGE_DEEP_EXAMPLES sets its example count; CI runs a seeded slice).
# --hypothesis-profile picks one, --hypothesis-seed fixes the seed.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=200, stateful_step_count=40, **_COMMON)
settings.register_profile("deep", max_examples=int(os.environ.get("ROCMFORGE_DEEP_EXAMPLES", 2500)),
                          stateful_step_count=100, **_COMMON)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def no_buffer_outlives_its_test(request):
    """Every DeviceBuffer a test made (KvCache storage, gather results, staging) is
    freed once the test's objects are collected: a leak fails the test, and GPU
    sanitizer runs (tools/device_check.sh sanitize) end with nothing allocated."""
    before = live_buffers()
    yield
    if live_buffers() != before:
        gc.collect()
        after = live_buffers()
        if after != before:
            pytest.fail(f"DeviceBuffers outlived the test: {before} before, {after} after "
                        f"({{device: (count, bytes)}}, device -1 is host memory); {_holders()}", pytrace=False)


def _holders():
    """Who holds the rocmforge objects still alive: what a leak report needs."""
    import threading
    out = []
    for obj in gc.get_objects():
        if type(obj).__name__ in ("KvCache", "DeviceArray") and type(obj).__module__.startswith("rocmforge"):
            refs = []
            for r in gc.get_referrers(obj)[:4]:
                code = getattr(r, "f_code", None)
                refs.append(f"frame {code.co_name}:{r.f_lineno}" if code else type(r).__name__)
            out.append(f"{type(obj).__name__} held by {refs}")
    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    return f"alive: {out[:6]}; other threads: {threads}"


def pytest_runtest_logreport(report):
    """Count the outcomes of tests marked gpu (a skip is reported at setup)."""
    if "gpu" in report.keywords and (report.when == "call" or (report.when == "setup" and not report.passed)):
        _GPU_OUTCOMES[report.outcome] += 1


def pytest_sessionfinish(session):
    """Empty torch's device and pinned-host caches, when a test used torch on a GPU,
    so that a leak check at exit (compute-sanitizer) reports only what is ours."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def pytest_terminal_summary(terminalreporter):
    if any(_GPU_OUTCOMES.values()):
        o = _GPU_OUTCOMES
        terminalreporter.write_line(f"GPU tests: {o['passed'] + o['failed']} ran ({o['passed']} passed, "
                                    f"{o['failed']} failed), {o['skipped']} skipped")
    if OPS:
        counts = ", ".join(f"{name} {n:,}" for name, n in sorted(OPS.items()))
        terminalreporter.write_line(f"stateful operations run against the reference model: {counts}")
