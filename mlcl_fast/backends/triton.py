"""The fused Triton backend (mlcl_fast/triton): CUDA devices, or CPU tensors under the Triton
interpreter (TRITON_INTERPRET=1, how the kernels are tested without a GPU; `auto` never picks
it on the CPU). Triton decides between compiled and interpreted functions when it is first
imported, so this module does not import it: the setting in force at first use holds for the
whole process."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

NATIVE_HALF = True


def is_available():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'mlcl_fast[triton]')"
    return True, ""


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet imported, would run) under the interpreter: triton's
    own device functions and ours must agree."""
    ours = sys.modules.get("mlcl_fast.triton.launch")
    if ours is not None:
        return ours.INTERPRETED
    lang = sys.modules.get("triton.language")
    if lang is not None:
        from triton.runtime.jit import JITFunction

        return not isinstance(lang.zeros, JITFunction) and _interpret_requested()
    return _interpret_requested()


def supports(device) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and not kernels_interpreted()
    if device.type == "cpu":
        return kernels_interpreted()
    return False


def unit_rows(parts, out_dtype):
    """The row normaliser of inputs.prepare: features, keys and prototypes normalised into one
    stacked tensor by one kernel each way instead of a dozen torch operations per tensor and a
    concatenation (mlcl_fast/triton/normalize.py)."""
    from ..triton.normalize import unit_rows as run

    return run(parts, out_dtype)


def canonical_indices(labels, num_labels):
    """The padded-index canonicaliser of labels.as_label_sets (check_values=False): one kernel
    instead of about sixteen torch operations (mlcl_fast/triton/canonical.py)."""
    from ..triton.canonical import canonical_indices as run

    return run(labels, num_labels)


def prologue(labels, num_labels, parts, out_dtype):
    """canonical_indices and unit_rows together, where inputs.prepare needs both: one kernel
    (mlcl_fast/triton/prologue.py)."""
    from ..triton.prologue import prologue as run

    return run(labels, num_labels, parts, out_dtype)


def anchor_losses(problem):
    from ..triton.driver import anchor_losses as run

    return run(problem)
