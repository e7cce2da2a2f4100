"""Every Python example in README.md runs unchanged, each on its own (a fresh
namespace, as a newcomer pastes it), and prints what its comments say."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_example_runs_as_written(code):
    if "import torch" in code or "from transformers" in code:
        pytest.importorskip("torch")
        pytest.importorskip("transformers")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    printed = out.getvalue().splitlines()
    promises = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+# ([^:;\n]+)", code, re.M)]
    assert len(printed) >= len(promises)
    for promise, line in zip(promises, printed):     # "print(x)  # 96: why" promises that x prints 96
        if "..." in promise or promise.startswith(("{", "[")):
            continue                                  # an outline, not a value
        if not promise.startswith("("):
            promise = promise.split(",")[0]           # "2, Prometheus text": the first value printed
        assert line.startswith(promise), (promise, line)
