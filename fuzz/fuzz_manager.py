"""Fuzz target: BlockManager operation sequences decoded from the fuzzer's bytes.

The bytes drive the stateful harness of tests/test_stateful.py through
Hypothesis (fuzz_one_input): each input is a sequence of operations run on
the core and on the reference model (tests/model.py), every observable
compared and check_invariants() run after every step. The first byte picks
the machine: plain, or with the prefix cache. Any disagreement, invariant
failure or unexpected exception is a crash; atheris saves the input.

    python fuzz/fuzz_manager.py [libFuzzer flags] [CORPUS_DIR]     # tools/fuzz.sh runs it
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

with atheris.instrument_imports(include=["model", "test_stateful", "rocmforge"]):
    import test_stateful

import hypothesis.core
from hypothesis import HealthCheck, settings
from hypothesis.internal.conjecture.providers import BytestringProvider
from hypothesis.stateful import get_state_machine_test


class OffsetProvider(BytestringProvider):
    """Hypothesis's bytes-to-choices provider for fuzz_one_input, with bounded
    integers drawn as an offset from min_value. The released provider compares
    the raw bits with the bounds, so a range that does not start near zero is
    drawn again until the input runs out and no test case ever runs (Hypothesis
    pull request 4847)."""

    def draw_integer(self, min_value=None, max_value=None, *, weights=None, shrink_towards=0):
        if min_value is None or max_value is None:
            return super().draw_integer(min_value, max_value, weights=weights, shrink_towards=shrink_towards)
        span = max_value - min_value
        while True:
            value = self._draw_bits(span.bit_length())
            if value <= span:
                return min_value + value


hypothesis.core.BytestringProvider = OffsetProvider

SETTINGS = settings(database=None, deadline=None, max_examples=1, stateful_step_count=60,
                    suppress_health_check=list(HealthCheck))
MACHINES = [get_state_machine_test(machine, settings=SETTINGS).hypothesis.fuzz_one_input
            for machine in (test_stateful.CoreVsModel, test_stateful.PrefixCoreVsModel)]


def one_input(data: bytes) -> None:
    if data:
        MACHINES[data[0] & 1](data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
