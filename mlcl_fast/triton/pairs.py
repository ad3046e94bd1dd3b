"""The sparse-label regime: positive pairs listed outside the dense loop.

The softmax denominator needs no labels, so the dense kernels run label-free (MODE_NONE): the
forward gives lse_i, the backward the dense part G_i W_i p_ij of the gradient. The positive
pairs (i, j) with c_ij > 0 come from an inverted index (label -> sorted columns carrying it):
every label k of anchor i expands to the columns of k, giving (anchor, label slot, column)
triples, T = sum_i sum_{k in y_i} |columns of k| of them. Weights, normalisers Z_ik / Omega_i,
the loss and the gradient correction -(w_ij + r_ij) G_i / tau are computed on these lists only.
Memory is O(T); configs.choose_regime takes this regime only when T is small.

The list sizes depend on label values, so the operators here are opaque to torch.compile
(torch.library.custom_op with a fake implementation), unlike the dense triton_op ones. Both
operators and their fake implementations check the arguments' metadata (checks.py); the operators
also assert the values on the device unless `validated=True` (the driver, and the autograd
backward).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import checks, configs, launch, sparse
from .configs import FACTOR_CODES, WEIGHTING_CODES

_identity = lambda kernel: kernel  # noqa: E731


def positive_pairs(a_index: Tensor, c_index: Tensor, self_col: Tensor, col_lo: int, num_labels: int):
    """Triples and pairs of anchors with softmax columns sharing a label, self excluded.

    Returns (tri_seg [T] slot id i*KA + t, tri_pair [T] pair id, pi [P], pj [P], count [P] = c_ij),
    pairs sorted by (i, j), triples sorted by (i, t, j)."""
    dev = a_index.device
    C, KA = c_index.shape[0], a_index.shape[1]
    col_ids = torch.arange(C, device=dev).unsqueeze(1).expand_as(c_index)
    keep = (c_index >= 0) & (col_ids >= col_lo)
    labs, cols = c_index[keep], col_ids[keep]
    order = torch.argsort(labs * C + cols)  # keys are distinct: a deterministic order
    by_label = cols[order]
    col_ptr = sparse.offsets(labs[order], num_labels)

    flat = a_index.reshape(-1)
    slot = torch.nonzero(flat >= 0).flatten()        # i * KA + t, ascending
    label = flat[slot]
    length = col_ptr[label + 1] - col_ptr[label]
    tri_seg = torch.repeat_interleave(slot, length)
    first = torch.repeat_interleave(col_ptr[label] - (torch.cumsum(length, 0) - length), length)
    tri_col = by_label[first + torch.arange(tri_seg.numel(), device=dev)]
    tri_row = tri_seg // KA
    not_self = tri_col != self_col[tri_row].long()
    tri_seg, tri_row, tri_col = tri_seg[not_self], tri_row[not_self], tri_col[not_self]

    keys, tri_pair, count = torch.unique(tri_row * C + tri_col, sorted=True, return_inverse=True,
                                         return_counts=True)
    return tri_seg, tri_pair, keys // C, keys % C, count


def pair_weights(pi, pj, count, tri_seg, tri_pair, a_count, c_count, num_anchors: int, slots: int,
                 num_samples: int, weighting: int, factor: int, alpha: float, interpret: bool):
    """(w [P], W [M]) of SPEC from the lists; every sum is a CSR segment sum."""
    c = count.to(torch.float32)
    a_i = a_count[pi].to(torch.float32)
    a_j = c_count[pj].to(torch.float32)
    union = (a_i + a_j - c).clamp(min=1)
    row_ptr = sparse.offsets(pi, num_anchors)
    if weighting != WEIGHTING_CODES["label"]:
        if weighting == WEIGHTING_CODES["any"]:
            omega = torch.ones_like(c)
        elif weighting == WEIGHTING_CODES["all"]:
            omega = ((c == a_i) & (c == a_j)).to(torch.float32)
        else:
            omega = c / union
        total = sparse.segment_sum(omega, row_ptr, interpret)
        positive = total > 0
        scale = torch.where(positive, 1.0 / torch.where(positive, total, 1.0), 0.0)
        return omega * scale[pi], positive.to(torch.float32)

    if factor == FACTOR_CODES["one"]:
        f = torch.ones_like(c)
    elif factor == FACTOR_CODES["union"]:
        f = torch.where(pj >= num_samples, 1.0, 1.0 / union)
    elif alpha < 0:
        f = (c == a_j).to(torch.float32)
    else:
        f = (c / a_j.clamp(min=1)) ** alpha
    # Z_ik: triples are grouped by slot (i, t); each triple carries its pair's factor.
    slot_ptr = sparse.offsets(tri_seg, num_anchors * slots)
    z = sparse.segment_sum(f[tri_pair], slot_ptr, interpret)
    inv_z = torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0)
    # sum over the labels a pair shares of 1/Z_ik: regroup the triples by pair.
    by_pair = torch.argsort(tri_pair, stable=True)
    pair_ptr = sparse.offsets(tri_pair[by_pair], pi.numel())
    shared = sparse.segment_sum(inv_z[tri_seg[by_pair]], pair_ptr, interpret)
    inv_a = 1.0 / a_count.clamp(min=1).to(torch.float32)
    w_tot = (z.reshape(num_anchors, slots) > 0).sum(dim=1).to(torch.float32) * inv_a
    return f * shared * inv_a[pi], w_tot


def _check_forward(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau,
                   log_beta, alpha, weighting, factor, validated):
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    args.integer("num_labels", num_labels, 0)
    args.number("alpha", alpha)
    args.choice("weighting", weighting, WEIGHTING_CODES)
    args.choice("factor", factor, FACTOR_CODES)
    # The inverted index is addressed by label id (column lists may be empty: no slot needed).
    args.label_lists("a_index", a_index, args.M)
    args.tensor("c_index", c_index, (args.C, None), checks.INDEX_DTYPES)
    args.label_rows("a_index", a_index, num_labels, a_count, "a_count")
    args.label_rows("c_index", c_index, num_labels, c_count, "c_count")


@custom_op("mlcl_fast::triton_pairs_forward", mutates_args=())
def pairs_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_count: Tensor, c_index: Tensor,
                  c_count: Tensor, num_samples: int, col_lo: int, num_labels: int, inv_tau: float,
                  log_beta: float, alpha: float, weighting: int, factor: int, reg: bool,
                  allow_tf32: bool, validated: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [M], W [M], lse2 [M] (base 2, for the sweeps), pi [P], pj [P], w + r [P])."""
    _check_forward(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau,
                   log_beta, alpha, weighting, factor, validated)
    interpret = launch.INTERPRETED
    M = q.shape[0]
    labels, g = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta, allow_tf32)
    lse2, _, _ = launch.stats(q, k, labels, g, _identity)
    lse = lse2 * configs.LN2

    slots = a_index.shape[1]
    tri_seg, tri_pair, pi, pj, count = positive_pairs(a_index, c_index, self_col, col_lo, num_labels)
    w, w_tot = pair_weights(pi, pj, count, tri_seg, tri_pair, a_count, c_count, M, slots, num_samples,
                            weighting, factor, alpha, interpret)
    s = sparse.pair_dots(q, k, pi, pj, interpret) * inv_tau
    term = w * s
    coef = w
    if reg:
        log_b = torch.where(pj < num_samples, log_beta, 0.0)
        p = torch.exp(s + log_b - lse[pi])
        r = torch.where(w > 0, (p - w).clamp(min=0), 0.0)
        term = term + r * s
        coef = w + r
    row_ptr = sparse.offsets(pi, M)
    loss = w_tot * lse - sparse.segment_sum(term, row_ptr, interpret)
    loss = torch.where(w_tot > 0, loss, 0.0)
    return loss, w_tot, lse2, pi, pj, coef


@pairs_forward.register_fake
def _(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau, log_beta,
      alpha, weighting, factor, reg, allow_tf32, validated=False):
    # Metadata only: fake tensors hold no values.
    _check_forward(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau,
                   log_beta, alpha, weighting, factor, validated=True)
    M = q.shape[0]
    P = torch.library.get_ctx().new_dynamic_size()
    per_anchor = lambda: q.new_empty(M, dtype=torch.float32)  # noqa: E731
    return (per_anchor(), per_anchor(), per_anchor(), q.new_empty(P, dtype=torch.int64),
            q.new_empty(P, dtype=torch.int64), q.new_empty(P, dtype=torch.float32))


def _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef, g_up, num_samples, col_lo, inv_tau,
                    log_beta, validated):
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    for name, t in (("lse", lse), ("w_tot", w_tot), ("g_up", g_up)):
        args.tensor(name, t, (args.M,), (torch.float32,))
    args.tensor("pi", pi, (None,), (torch.int64,))
    P = pi.shape[0]
    args.tensor("pj", pj, (P,), (torch.int64,))
    args.tensor("coef", coef, (P,), (torch.float32,))
    # The pairs are sorted by anchor (CSR offsets by searchsorted) and address q and k rows.
    args.ids("pi", pi, 0, args.M, "anchor indices")
    if not validated and P > 1:
        args.assert_values("pi", pi[1:] >= pi[:-1], "anchor indices sorted ascending")
    args.ids("pj", pj, 0, args.C, "column indices")


@custom_op("mlcl_fast::triton_pairs_backward", mutates_args=())
def pairs_backward(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, lse: Tensor,
                   w_tot: Tensor, pi: Tensor, pj: Tensor, coef: Tensor, g_up: Tensor, num_samples: int,
                   col_lo: int, inv_tau: float, log_beta: float, allow_tf32: bool,
                   validated: bool = False) -> tuple[Tensor, Tensor]:
    _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef, g_up, num_samples, col_lo, inv_tau,
                    log_beta, validated)
    interpret = launch.INTERPRETED
    M, C = q.shape[0], k.shape[0]
    labels, g = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta, allow_tf32)
    no_z = torch.zeros(M, 1, dtype=torch.float32, device=q.device)
    dq, _ = launch.rows(q, k, labels, lse, w_tot, w_tot, no_z, g_up, g, _identity, reg_value=False, grad=True)
    dk = launch.cols(q, k, labels, lse, w_tot, w_tot, no_z, g_up, g, _identity)
    # The positives' part: -(w_ij + r_ij) G_i / tau, summed per anchor (pairs sorted by anchor) and
    # per column (the same pairs stably re-sorted by column).
    corr = -coef * g_up[pi] * inv_tau
    dq += sparse.csr_rows(sparse.offsets(pi, M), pj, corr, k, interpret)
    by_col = torch.argsort(pj, stable=True)
    dk += sparse.csr_rows(sparse.offsets(pj[by_col], C), pi[by_col], corr[by_col], q, interpret)
    return dq.to(q.dtype), dk.to(k.dtype)


@pairs_backward.register_fake
def _(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef, g_up, num_samples, col_lo, inv_tau, log_beta,
      allow_tf32, validated=False):
    _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef, g_up, num_samples, col_lo, inv_tau,
                    log_beta, validated=True)
    return torch.empty_like(q), torch.empty_like(k)


_SCALARS = ("num_samples", "col_lo", "num_labels", "inv_tau", "log_beta", "alpha", "weighting", "factor", "reg",
            "allow_tf32")


def _setup_context(ctx, inputs, output):
    q, k, self_col, a_index, a_count, c_index, c_count, *scalars = inputs
    _, w_tot, lse, pi, pj, coef = output
    s = dict(zip(_SCALARS, scalars))
    ctx.scalars = dict(num_samples=s["num_samples"], col_lo=s["col_lo"], inv_tau=s["inv_tau"],
                       log_beta=s["log_beta"], allow_tf32=s["allow_tf32"])
    ctx.save_for_backward(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef)


def _backward(ctx, g_loss, *_unused):
    q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef = ctx.saved_tensors
    # The saved tensors are the forward's checked inputs and its outputs: no value assertions again.
    dq, dk = pairs_backward(q, k, self_col, a_count, c_count, lse, w_tot, pi, pj, coef,
                            g_loss.to(torch.float32).contiguous(), **ctx.scalars, validated=True)
    return (dq, dk) + (None,) * (5 + len(_SCALARS) + 1)  # + validated


pairs_forward.register_autograd(_backward, setup_context=_setup_context)
