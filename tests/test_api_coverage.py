"""Every public method and property of rocmforge's public classes is used by at
least one test: a name no test file mentions as an attribute is untested."""

import inspect
import pathlib
import re

import pytest

import rocmforge as rf
from rocmforge import attention, config, engine, kv_events, router, traces, transfer

CLASSES = [rf.BlockManager, rf.KvCache, rf.DeviceBuffer, rf.DeviceArray, engine.Engine, engine.Scheduler,
           engine.Request, config.CacheConfig, config.MemoryProfile, router.PrefixRouter,
           kv_events.EventPublisher, kv_events.EventSubscriber, transfer.PackedSequence, rf.TensorParallelKvCache]
HERE = pathlib.Path(__file__).resolve()


def public_names(cls):
    return sorted(name for name, _ in inspect.getmembers(cls)
                  if not name.startswith("_") and name not in ("mro",))


def sources_text():
    return "\n".join(p.read_text() for p in HERE.parent.rglob("*.py") if p != HERE)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_public_attribute_is_used_by_a_test(cls):
    text = sources_text()
    unused = [name for name in public_names(cls) if not re.search(rf"\.{name}\b|\b{name}=", text)]
    assert not unused, f"{cls.__name__}: no test uses {unused}"


@pytest.mark.parametrize("module", [rf, attention, config, engine, kv_events, router, traces, transfer], ids=lambda m: m.__name__)
def test_every_public_function_is_called_by_a_test(module):
    text = sources_text()
    names = [name for name, obj in vars(module).items() if not name.startswith("_")
             and inspect.isfunction(obj) and obj.__module__ == module.__name__]
    uncalled = [name for name in names if not re.search(rf"\b{name}\(", text)]
    assert not uncalled, f"{module.__name__}: no test calls {uncalled}"


def test_every_subpackage_is_installed():
    """pyproject.toml lists its packages by hand: each directory of the package with an
    __init__.py must be there, or `pip install .` leaves it out."""
    tomllib = pytest.importorskip("tomllib")
    root = HERE.parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "rocmforge").rglob("__init__.py")}
    assert found <= listed, f"not in pyproject.toml's packages: {sorted(found - listed)}"
