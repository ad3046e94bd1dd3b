"""The C++/CUDA backend (csrc/cuda): the blocked algorithm (cuBLAS products on bounded anchor
blocks, fused per-block kernels) behind the same `mlcl_fast` ops as the CPU backend, so the op
layer (mlcl_fast/backends/native_ops.py: arguments, autograd, fake tensors) is shared.

Available when torch is a CUDA build, mlcl_fast._C was compiled with CUDA (it then holds CUDA
kernels for the ops), and a CUDA device exists. fp16/bf16 embeddings go to the kernels as they are
(fp32 accumulation); float64 embeddings are accepted but computed in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem
from . import native_ops
from .native_ops import FORWARD, op_inputs, ops_available

NATIVE_HALF = True


def _unavailable_reason() -> str:
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    ok, reason = ops_available()
    if not ok:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, "CUDA"):
        return "mlcl_fast._C was built without CUDA (needs nvcc / CUDA_HOME at build time; rebuild with `make build`)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return ""


def is_available():
    reason = _unavailable_reason()
    return not reason, reason


def supports(device) -> bool:
    return torch.device(device).type == "cuda"


def anchor_losses(problem: Problem) -> tuple[Tensor, Tensor]:
    """Per-anchor loss ([|A|] fp32, or fp64 for fp64 embeddings; 0 for invalid anchors) and validity."""
    return native_ops.anchor_losses(problem)
