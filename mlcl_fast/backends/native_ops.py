"""The op layer shared by the cpp and cuda backends: loading mlcl_fast._C (which defines the
`torch.ops.mlcl_fast` schemas, csrc/README.md), the ops' arguments for a Problem, and their one
`register_fake` / `register_autograd` registration, so every device's kernels share them and the
ops run under torch.compile(fullgraph=True).

The CPU kernels save their statistics in float64 (they compute in fp32 or fp64), the CUDA ones in
float32; the fake kernel follows the device.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import label_index
from ..problem import Problem

LOAD_ERROR = ""
try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mlcl_fast.*)
except ImportError as err:  # extension not built
    LOAD_ERROR = f"the C++ extension mlcl_fast._C is not built ({err}); run `make build`"

OPS_PRESENT = not LOAD_ERROR and hasattr(torch.ops.mlcl_fast, "anchor_loss_forward")
FORWARD = "mlcl_fast::anchor_loss_forward"
LABEL_INDEX = "mlcl_fast::column_label_index"


def ops_available() -> tuple[bool, str]:
    if LOAD_ERROR:
        return False, LOAD_ERROR
    if not OPS_PRESENT:
        return False, "mlcl_fast._C was built without the operators"
    return True, ""


def op_inputs(problem: Problem, dtype=None, check_values: bool = False, combine_self: bool = False) -> tuple:
    """Forward op arguments; embeddings in `dtype` (default: as prepared by mlcl_fast.inputs).

    The Problem's labels are canonical (mlcl_fast.labels validated them on the host, or asserted
    them on their device with check_values=False), so by default the ops check label values with
    device-side assertions only, and make no host synchronisation; `check_values=True` asks for
    the ops' exact host-side checks (one device-to-host copy per op on a GPU). `combine_self`:
    the anchor rows and the columns are cut from the same embeddings (Problem.embeddings), so
    the backward may return an anchor's gradient and its own column's in one place
    (csrc/README.md)."""
    cfg = problem.config
    rows, cols = problem.embeddings(dtype)
    return (rows, cols, problem.anchor_labels().index, problem.column_labels().index, problem.anchor_columns(),
            problem.num_sample_columns, problem.labels.num_labels, problem.temperature, cfg.beta, cfg.weighting, cfg.f,
            cfg.alpha, cfg.reg, check_values, combine_self)


def anchor_losses(problem: Problem, dtype=None) -> tuple[Tensor, Tensor]:
    """Per-anchor loss ([|A|], 0 for invalid anchors) and validity ([|A|] bool) from the ops, the
    embeddings in `dtype`.

    Anchors that cannot be valid (Problem.candidate_anchors) are left out of the ops' rows: a problem with
    prototype anchors for every label of a large label space has mostly such anchors (the
    prototypes of labels absent from the batch), and the blocked CUDA kernels would sweep each of
    them against every column. Finding them costs one host read (the number of candidates), so it
    is done when the caller allows host reads (check_values=True) and outside torch.compile."""
    args = op_inputs(problem, dtype, combine_self=True)
    if not problem.check_values or torch.compiler.is_compiling() or problem.num_anchors == 0:
        return torch.ops.mlcl_fast.anchor_loss_forward(*args)[:2]
    keep = problem.candidate_anchors().nonzero().squeeze(1)
    if keep.numel() == problem.num_anchors:
        return torch.ops.mlcl_fast.anchor_loss_forward(*args)[:2]
    rows, cols, row_labels, col_labels, self_col = args[:5]
    loss, valid = torch.ops.mlcl_fast.anchor_loss_forward(rows.index_select(0, keep), cols,
                                                          row_labels.index_select(0, keep), col_labels,
                                                          self_col.index_select(0, keep), *args[5:])[:2]
    full_loss = loss.new_zeros(problem.num_anchors).index_copy(0, keep, loss)
    full_valid = valid.new_zeros(problem.num_anchors).index_copy(0, keep, valid)
    return full_loss, full_valid


def stats_dtype(device: torch.device) -> torch.dtype:
    """dtype of the saved statistics (lse, total_weight, normalizer) on `device`."""
    return torch.float32 if device.type == "cuda" else torch.float64


# ------------------------------------------------------------------ autograd and fake tensors
def _normalizer_width(row_labels: Tensor, weighting: str) -> int:
    return row_labels.shape[1] if weighting == "label" else 1


def label_prep_size(rows: Tensor, cols: Tensor, row_labels: Tensor, col_labels: Tensor, num_labels: int) -> int:
    """Entries of the forward's label preparation (`label_prep`, int32) where the blocked
    algorithm runs (CUDA, or the CPU with MLCL_FAST_CPU_ALGORITHM=blocked), else 0: the columns'
    inverted label index (num_labels + 1 offsets, C * Kc columns), the label counts (R + C) and
    the int32 row labels (R * Kr), csrc/cpu/blocked.cpp."""
    blocked = rows.device.type == "cuda" or os.environ.get("MLCL_FAST_CPU_ALGORITHM", "") == "blocked"
    if not blocked:
        return 0
    R, C = rows.shape[0], cols.shape[0]
    return num_labels + 1 + C * col_labels.shape[1] + R + C + R * row_labels.shape[1]


def _forward_fake(rows, cols, row_labels, col_labels, self_col, num_sample_cols, num_labels, temperature, beta,
                  weighting, pair_factor, alpha, reg, check_values=True, combine_self=False):
    r = rows.shape[0]
    stats = dict(dtype=stats_dtype(rows.device), device=rows.device)
    loss_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32  # half rows: fp32 loss
    prep = label_prep_size(rows, cols, row_labels, col_labels, num_labels)
    return (rows.new_empty(r, dtype=loss_dtype), rows.new_empty(r, dtype=torch.bool), rows.new_empty(r, **stats),
            rows.new_empty(r, **stats), rows.new_empty((r, _normalizer_width(row_labels, weighting)), **stats),
            rows.new_empty(prep, dtype=torch.int32))


def _backward_fake(grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer,
                   num_sample_cols, num_labels, temperature, beta, weighting, pair_factor, alpha, reg,
                   check_values=True, combine_self=False, label_prep=None):
    return torch.empty_like(rows), torch.empty_like(cols)


def _column_label_index(col_labels: Tensor, num_labels: int, col_lo: int = 0,
                        check_values: bool = True) -> tuple[Tensor, Tensor]:
    return tuple(label_index.checked_column_label_index(col_labels, num_labels, col_lo, check_values))


def _column_label_index_fake(col_labels, num_labels, col_lo=0, check_values=True):
    label_index.check_arguments(col_labels, num_labels, col_lo)
    return (col_labels.new_empty(num_labels + 1, dtype=torch.int64),
            col_labels.new_empty(col_labels.numel(), dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    rows, cols, row_labels, col_labels, self_col = inputs[:5]
    _, _, lse, total_weight, normalizer, label_prep = output
    # The label preparation (blocked algorithm) is the forward's: the backward reuses it.
    ctx.save_for_backward(rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer, label_prep)
    ctx.options = inputs[5:]


def _backward(ctx, grad_loss, *_other_outputs):
    # Only the loss output is differentiable: validity and the saved statistics are constants.
    rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer, label_prep = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = rows.new_zeros(rows.shape[0])
    grad_rows, grad_cols = torch.ops.mlcl_fast.anchor_loss_backward(
        grad_loss, rows, cols, row_labels, col_labels, self_col, lse, total_weight, normalizer, *ctx.options,
        label_prep=label_prep)
    return (grad_rows, grad_cols) + (None,) * (3 + len(ctx.options))


if OPS_PRESENT:
    torch.library.register_fake(FORWARD, _forward_fake)
    torch.library.register_fake("mlcl_fast::anchor_loss_backward", _backward_fake)
    torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)
    # The blocked algorithm's label index (csrc/cpu/blocked.cpp calls it): the Python one, for every device.
    torch.library.impl(LABEL_INDEX, "default", _column_label_index)
    torch.library.register_fake(LABEL_INDEX, _column_label_index_fake)
