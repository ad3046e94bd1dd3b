"""The fused, tiled C++ CPU backend (csrc/cpu, ops in the `mlcl_fast` torch.library namespace;
the op layer is native_ops.py).

The ops see anchors as `rows` and the softmax columns as `cols`; native_ops.op_inputs builds both
from a Problem (samples are rows *and* columns, so autograd sums their two gradients through the
slicing and concatenation there). Memory beyond inputs and outputs is O((|A| + |C|)(d + K)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem
from . import native_ops
from .native_ops import ops_available

# Half inputs arrive upcast to fp32 (the kernels compute in fp32 or fp64).
NATIVE_HALF = False


def is_available():
    return ops_available()


def supports(device) -> bool:
    return torch.device(device).type == "cpu"


def anchor_losses(problem: Problem) -> tuple[Tensor, Tensor]:
    """Per-anchor loss ([|A|], 0 for invalid anchors) and validity ([|A|] bool)."""
    half = problem.samples.dtype in (torch.float16, torch.bfloat16)
    return native_ops.anchor_losses(problem, torch.float32 if half else None)
