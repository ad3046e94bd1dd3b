"""The fused, tiled C++ CPU backend (csrc/cpu, ops in the `mlcl_fast` torch.library namespace).

The ops see anchors as `rows` and the softmax columns as `cols`; this module builds both from a
Problem (samples are rows *and* columns, so autograd sums their two gradients through the slicing
and concatenation here). Memory beyond inputs and outputs is O((|A| + |C|)(d + K)).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem
from .op_args import op_inputs

# Half inputs arrive upcast to fp32 (the kernels compute in fp32 or fp64).
NATIVE_HALF = False

_LOAD_ERROR = ""
try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mlcl_fast.*)
except ImportError as err:  # extension not built
    _LOAD_ERROR = f"the C++ extension mlcl_fast._C is not built ({err}); run `make build`"

_OPS_PRESENT = not _LOAD_ERROR and hasattr(torch.ops.mlcl_fast, "anchor_loss_forward")


def is_available():
    if _LOAD_ERROR:
        return False, _LOAD_ERROR
    if not _OPS_PRESENT:
        return False, "mlcl_fast._C was built without the CPU operators"
    return True, ""


def supports(device) -> bool:
    return torch.device(device).type == "cpu"


def anchor_losses(problem: Problem) -> tuple[Tensor, Tensor]:
    """Per-anchor loss ([|A|], 0 for invalid anchors) and validity ([|A|] bool)."""
    half = problem.samples.dtype in (torch.float16, torch.bfloat16)
    loss, valid, *_ = torch.ops.mlcl_fast.anchor_loss_forward(*op_inputs(problem, torch.float32 if half else None))
    return loss, valid


# ------------------------------------------------------------------ autograd and fake tensors
def _normalizer_width(row_labels: Tensor, weighting: str) -> int:
    return row_labels.shape[1] if weighting == "label" else 1


def _forward_fake(rows, cols, row_labels, col_labels, self_col, num_sample_cols, num_labels, temperature, beta,
                  weighting, pair_factor, alpha, reg):
    r = rows.shape[0]
    stats = dict(dtype=torch.float64, device=rows.device)
    loss_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32  # half rows: fp32 loss
    return (rows.new_empty(r, dtype=loss_dtype), rows.new_empty(r, dtype=torch.bool), rows.new_empty(r, **stats),
            rows.new_empty(r, **stats), rows.new_empty((r, _normalizer_width(row_labels, weighting)), **stats))


def _backward_fake(grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer,
                   num_sample_cols, num_labels, temperature, beta, weighting, pair_factor, alpha, reg):
    return torch.empty_like(rows), torch.empty_like(cols)


def _setup_context(ctx, inputs, output):
    rows, cols, row_labels, col_labels, self_col = inputs[:5]
    _, _, lse, total_weight, normalizer = output
    ctx.save_for_backward(rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer)
    ctx.options = inputs[5:]


def _backward(ctx, grad_loss, *_other_outputs):
    # Only the loss output is differentiable: validity and the saved statistics are constants.
    rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = rows.new_zeros(rows.shape[0])
    grad_rows, grad_cols = torch.ops.mlcl_fast.anchor_loss_backward(
        grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer, *ctx.options)
    return (grad_rows, grad_cols) + (None,) * (3 + len(ctx.options))


if _OPS_PRESENT:
    torch.library.register_fake("mlcl_fast::anchor_loss_forward", _forward_fake)
    torch.library.register_fake("mlcl_fast::anchor_loss_backward", _backward_fake)
    torch.library.register_autograd("mlcl_fast::anchor_loss_forward", _backward, setup_context=_setup_context)
