"""Every registered backend module follows the registry's contract (mlcl_fast/backends/__init__.py,
docs/BACKENDS.md), and the guide's file references exist."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from mlcl_fast import backends

ROOT = Path(__file__).resolve().parents[1]
# the optional hooks of inputs.prepare and their parameters, as the registry's docstring lists them
HOOKS = {"unit_rows": ["parts", "out_dtype"], "canonical_indices": ["labels", "num_labels"],
         "prologue": ["labels", "num_labels", "parts", "out_dtype"]}


@pytest.mark.parametrize("name", backends.BACKENDS)
def test_module_follows_the_contract(name):
    try:
        module = importlib.import_module(f"mlcl_fast.backends.{name}")
    except ImportError as err:  # an optional backend that cannot import here: the registry says why
        assert name in backends.backend_status() and backends.backend_status()[name] != "available", err
        return
    ok, reason = module.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and (ok or reason), (name, ok, reason)
    assert isinstance(module.supports(torch.device("cpu")), bool)
    assert list(inspect.signature(module.anchor_losses).parameters)[:1] == ["problem"]
    assert isinstance(getattr(module, "NATIVE_HALF", False), bool)
    for hook, params in HOOKS.items():
        if hasattr(module, hook):
            assert list(inspect.signature(getattr(module, hook)).parameters)[:len(params)] == params, (name, hook)
    docs = backends.__doc__
    assert all(hook in docs for hook in HOOKS) and "NATIVE_HALF" in docs


def test_auto_order_names_registered_backends():
    for order in backends._AUTO_ORDER.values():
        assert set(order) <= set(backends.BACKENDS)


def test_guide_references_exist():
    guide = (ROOT / "docs" / "BACKENDS.md").read_text()
    paths = set(re.findall(r"`((?:mlcl_fast|csrc|tests|bench|docs)/[\w./]+?)`", guide))
    paths |= {"docs/" + p for p in re.findall(r"\]\((\w+\.md)\)", guide)}
    assert len(paths) > 10
    missing = sorted(p for p in paths if "NAME" not in p and not (ROOT / p).exists())
    assert not missing, missing
