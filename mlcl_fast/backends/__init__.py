"""Backend registry: one API, several implementations of SPEC.

A backend is a module `mlcl_fast.backends.<name>` exposing
    is_available() -> (bool, reason)
    supports(device: torch.device) -> bool
    anchor_losses(problem: Problem) -> (loss [|A|], valid [|A|] bool)
    NATIVE_HALF: bool   # True: receives fp16/bf16 embeddings as they are (accumulates in fp32)
and optionally its own forms of steps of inputs.prepare (each must give what the torch
formulation gives; see mlcl_fast/backends/triton.py):
    unit_rows(parts, out_dtype) -> the rows of 1-3 tensors normalised, stacked
    canonical_indices(labels, num_labels) -> LabelSets   # check_values=False, padded indices
    prologue(labels, num_labels, parts, out_dtype) -> (LabelSets, rows)   # the two above at once
Modules that are missing or fail to import count as unavailable, with the reason kept for
`backend_status()`.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
# On GPUs `triton` comes first, by measurement on an H200 (bench/RESULTS.md, 2026-12-04: reg, bf16,
# N = 16384, d = 256, forward + backward): 2.0x faster than `cuda` at L = 262144 and 5.2x at
# L = 10^6, the label spaces this package is for; `cuda` is 7-21 % faster at L = 16384 and about
# 1.5 ms at N = 1024 (where both are host-bound), and needs no kernel compilation at first use.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}
_loaded: dict[str, ModuleType | str] = {}
_warned_fallback = False


def _load(name: str) -> ModuleType | str:
    if name not in _loaded:
        try:
            module = importlib.import_module(f"mlcl_fast.backends.{name}")
            ok, reason = module.is_available()
            _loaded[name] = module if ok else reason
        except Exception as err:  # a broken optional backend must never break the package
            _loaded[name] = f"{type(err).__name__}: {err}"
    return _loaded[name]


def backend_status() -> dict[str, str]:
    """Every backend with 'available' or the reason it is not."""
    return {name: ("available" if isinstance(_load(name), ModuleType) else _load(name)) for name in BACKENDS}


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable here (for `device`, when given), in the order `auto` prefers them."""
    names = [n for n in BACKENDS if isinstance(_load(n), ModuleType)]
    if device is None:
        return names
    device = torch.device(device)
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return [n for n in order if n in names and _load(n).supports(device)]


def resolve_backend(name: str, device: torch.device) -> tuple[str, ModuleType]:
    """The backend module for `name` ('auto' picks the fastest usable one for `device`)."""
    global _warned_fallback
    if name == "auto":
        usable = available_backends(device)
        chosen = usable[0] if usable else "reference"
        if chosen == "reference" and device.type == "cpu" and not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"mlcl_fast: the cpp backend is unavailable ({backend_status()['cpp']}); "
                          "using the slower reference backend", RuntimeWarning, stacklevel=3)
        return chosen, _load(chosen)
    if name not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKENDS)}, got {name!r}")
    module = _load(name)
    if not isinstance(module, ModuleType):
        raise RuntimeError(f"backend: {name!r} is unavailable: {module}")
    if not module.supports(device):
        raise ValueError(f"backend: {name!r} does not run on device {device}")
    return name, module


# Resolve every backend once at import (a few ms, triton itself is not imported): later lookups are
# plain dict reads, which torch.compile can trace.
for _name in BACKENDS:
    _load(_name)
