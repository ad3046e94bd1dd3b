"""Custom operators with autograd: the dense-label regimes as torch.library.triton_op (their
kernels are visible to torch.compile through wrap_triton), the sparse regime in pairs.py.

dense_forward(q [M, d], k [C, d], labels...) -> (loss [M] fp32, W [M], lse2 [M] (base 2), scale [M],
inv_z [M, slots], dq_unit [M or 0, d]); only `loss` is differentiable. The backward recomputes
logits from (lse, W, scale, inv_z) unless the forward already produced the anchor-row gradient
(`grad_in_forward`, MLCL_FAST_TRITON_GRAD=forward), in which case only the column kernel runs.

Both operators check their arguments (checks.py); `validated=True` (the driver, and the autograd
backward) leaves out the device-side assertions on label and column values the caller checked.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import checks, configs, launch
from .configs import LN2
from .labels import dense_width


def epilogue(lse: Tensor, acc_z: Tensor, acc_s: Tensor, a_count: Tensor, label_centric: bool):
    """(loss without the regulariser, W, scale, inv_z) from the forward sums (see forward.py)."""
    if label_centric:
        positive = acc_z > 0
        inv_z = torch.where(positive, 1.0 / torch.where(positive, acc_z, 1.0), 0.0)
        scale = 1.0 / a_count.clamp(min=1).to(torch.float32)
        w_tot = positive.sum(dim=1).to(torch.float32) * scale
        weighted = scale * (acc_s * inv_z).sum(dim=1)
    else:
        omega, total = acc_z[:, 0], acc_s[:, 0]
        positive = omega > 0
        scale = torch.where(positive, 1.0 / torch.where(positive, omega, 1.0), 0.0)
        w_tot = positive.to(torch.float32)
        weighted = scale * total
        inv_z = acc_z  # unused by the kernels for pair-centric weights
    return w_tot * lse - weighted, w_tot, scale, inv_z


_IN_TILE_MODES = {name: configs.REGIMES[name] for name in ("bits", "gather", "list", "dense")}


def check_arguments(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_bits: Tensor, a_count: Tensor,
                    table: Tensor, c_count: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float,
                    alpha: float, mode: int, weighting: int, factor: int, validated: bool) -> checks.Arguments:
    """The arguments both operators share: the label tensors in the forms of `mode`
    (labels.column_table, labels.bitsets / dense_rows) and the scalars."""
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    M, C = args.M, args.C
    args.choice("mode", mode, _IN_TILE_MODES)
    args.choice("weighting", weighting, configs.WEIGHTING_CODES)
    args.choice("factor", factor, configs.FACTOR_CODES)
    args.number("alpha", alpha)
    args.label_lists("a_index", a_index, M)
    # The bound of the anchors' label ids is what the column table can hold (a bitset's bits, a
    # 0/1 row's columns); label lists are only compared, so any id is safe there.
    if mode == configs.MODE_DENSE:
        args.tensor("table", table, (C, None), (torch.float16,))
        width = table.shape[1]
        if width < 16 or configs.pow2(width) != width or width > dense_width(configs.DENSE_MAX_LABELS):
            raise ValueError(f"table: expected 0/1 label rows of a power-of-two width in [16, "
                             f"{dense_width(configs.DENSE_MAX_LABELS)}], got {width}")
        args.tensor("a_bits", a_bits, (M, width), (torch.float16,))
        bound = width
    elif mode == configs.MODE_LIST:
        args.label_lists("table", table, C)
        args.tensor("a_bits", a_bits, (M, None), (torch.int32,))  # not read
        args.label_rows("table", table, None, c_count, "c_count")
        bound = None
    else:
        args.tensor("table", table, (C, None), (torch.int32,))
        words = table.shape[1]
        if words < 1:
            raise ValueError("table: expected label bitsets of at least one int32 word per column, got none")
        args.tensor("a_bits", a_bits, (M, words) if mode == configs.MODE_BITS else (M, None), (torch.int32,))
        bound = 32 * words
    args.label_rows("a_index", a_index, bound, a_count, "a_count")
    return args


@triton_op("mlcl_fast::triton_dense_forward", mutates_args=())
def dense_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_bits: Tensor, a_count: Tensor,
                  table: Tensor, c_count: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float,
                  alpha: float, mode: int, weighting: int, factor: int, reg: bool, fp32_precision: str,
                  grad_in_forward: bool, order: Optional[Tensor] = None, live: Optional[Tensor] = None,
                  validated: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    checks.Arguments.precision("fp32_precision", fp32_precision)
    args = check_arguments(q, k, self_col, a_index, a_bits, a_count, table, c_count, num_samples, col_lo, inv_tau,
                           log_beta, alpha, mode, weighting, factor, validated)
    visit = args.visit(order, live)
    labels = (self_col, a_index, a_bits, a_count, table, c_count)
    g = launch.geometry(q, k, labels, num_samples, col_lo, inv_tau, log_beta, alpha, mode, weighting, factor, reg,
                        fp32_precision)
    lse, acc_z, acc_s = launch.stats(q, k, labels, g, wrap_triton, visit)  # base 2, as the sweeps read it
    loss, w_tot, scale, inv_z = epilogue(lse * LN2, acc_z, acc_s, a_count,
                                         weighting == configs.WEIGHTING_CODES["label"])
    dq_unit = None
    if reg or grad_in_forward:
        ones = torch.ones_like(lse)
        dq_unit, reg_sum = launch.rows(q, k, labels, lse, w_tot, scale, inv_z, ones, g, wrap_triton,
                                       reg_value=reg, grad=grad_in_forward, visit=visit)
        if reg:
            loss = loss - reg_sum
    if dq_unit is None:
        dq_unit = q.new_empty(0, q.shape[1], dtype=torch.float32)
    loss = torch.where(w_tot > 0, loss, 0.0)
    return loss, w_tot, lse, scale, inv_z, dq_unit


@triton_op("mlcl_fast::triton_dense_backward", mutates_args=())
def dense_backward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_bits: Tensor, a_count: Tensor,
                   table: Tensor, c_count: Tensor, lse: Tensor, w_tot: Tensor, scale: Tensor, inv_z: Tensor,
                   g_up: Tensor, dq_unit: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float,
                   alpha: float, mode: int, weighting: int, factor: int, reg: bool,
                   fp32_precision: str, order: Optional[Tensor] = None, live: Optional[Tensor] = None,
                   validated: bool = False) -> tuple[Tensor, Tensor]:
    checks.Arguments.precision("fp32_precision", fp32_precision)
    args = check_arguments(q, k, self_col, a_index, a_bits, a_count, table, c_count, num_samples, col_lo, inv_tau,
                           log_beta, alpha, mode, weighting, factor, validated)
    visit = args.visit(order, live)
    labels = (self_col, a_index, a_bits, a_count, table, c_count)
    g = launch.geometry(q, k, labels, num_samples, col_lo, inv_tau, log_beta, alpha, mode, weighting, factor, reg,
                        fp32_precision)
    M = args.M
    for name, t in (("lse", lse), ("w_tot", w_tot), ("scale", scale), ("g_up", g_up)):
        args.tensor(name, t, (M,), (torch.float32,))
    args.tensor("inv_z", inv_z, (M, g.slots), (torch.float32,))
    args.anchor_gradient("dq_unit", dq_unit)
    if dq_unit.shape[0] == q.shape[0]:
        dq = dq_unit * g_up[:, None]  # the anchor-row gradient is linear in G_i
    else:
        dq, _ = launch.rows(q, k, labels, lse, w_tot, scale, inv_z, g_up, g, wrap_triton, reg_value=False, grad=True,
                            visit=visit)
    dk = launch.cols(q, k, labels, lse, w_tot, scale, inv_z, g_up, g, wrap_triton, visit)
    return dq.to(q.dtype), dk.to(k.dtype)


_NUM_LABEL_TENSORS = 6
_SCALARS = ("num_samples", "col_lo", "inv_tau", "log_beta", "alpha", "mode", "weighting", "factor", "reg",
            "fp32_precision")


def _setup_context(ctx, inputs, output):
    q, k = inputs[:2]
    labels = inputs[2:2 + _NUM_LABEL_TENSORS]
    rest = inputs[2 + _NUM_LABEL_TENSORS:]
    scalars = rest[:len(_SCALARS)]  # then grad_in_forward, order, live, validated
    order, live = (rest[len(_SCALARS) + 1:len(_SCALARS) + 3] + (None, None))[:2]
    _, w_tot, lse, scale, inv_z, dq_unit = output
    ctx.scalars = dict(zip(_SCALARS, scalars))
    ctx.visit = order is not None
    ctx.save_for_backward(q, k, *labels, lse, w_tot, scale, inv_z, dq_unit,
                          *((order, live) if ctx.visit else ()))


def _backward(ctx, g_loss, *_unused):
    saved = ctx.saved_tensors
    visit = saved[-2:] if ctx.visit else (None, None)
    saved = saved[:-2] if ctx.visit else saved
    g_up = g_loss.to(torch.float32).contiguous()
    # The saved tensors are the forward's checked inputs and its outputs: no value assertions again.
    dq, dk = dense_backward(*saved[:-1], g_up, saved[-1], **ctx.scalars, order=visit[0], live=visit[1],
                            validated=True)
    return (dq, dk) + (None,) * (_NUM_LABEL_TENSORS + len(_SCALARS) + 4)  # + grad_in_forward, order, live, validated


dense_forward.register_autograd(_backward, setup_context=_setup_context)
