"""The sparse-label regime: positive pairs listed outside the dense loop.

The softmax denominator needs no labels, so the dense kernels run label-free (MODE_NONE): the
forward gives lse_i, the backward the dense part G_i W_i p_ij of the gradient. The positive
pairs (i, j) with c_ij > 0 come from an inverted index (label -> sorted columns carrying it):
every label k of anchor i expands to the columns of k, giving (anchor, label slot, column)
triples, T = sum_i sum_{k in y_i} |columns of k| of them. Weights, normalisers Z_ik / Omega_i,
the loss and the gradient correction -(w_ij + r_ij) G_i / tau are computed on these lists only.
Memory is O(T); configs.choose_regime takes this regime only when T is small.

Pair-centric weights (any, all, jaccard) add a head (`head_width` > 0): the columns' most frequent
labels become 0/1 fp16 rows, so the sweeps run the dense label mode (configs.MODE_DENSE: the head
overlap c^H_ij is one tl.dot per tile, on wgmma) and form omega(c^H_ij) on every pair. Only pairs
sharing a label outside the head are listed (T counts tail labels only, which removes the heavy
head's quadratic share); their weights are corrected by omega(c^H + c^T) - omega(c^H) in the
statistics, and the regulariser and gradient likewise, so every pair gets exactly omega(c_ij).

The list sizes depend on label values, so the operators here are opaque to torch.compile
(torch.library.custom_op with a fake implementation), unlike the dense triton_op ones. Both
operators and their fake implementations check the arguments' metadata (checks.py); the operators
also assert the values on the device unless `validated=True` (the driver, and the autograd
backward).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from .. import label_index
from . import checks, configs, launch, sparse
from . import labels as tl_labels
from .configs import FACTOR_CODES, WEIGHTING_CODES
from .ops import epilogue

_identity = lambda kernel: kernel  # noqa: E731


def positive_pairs(a_index: Tensor, c_index: Tensor, self_col: Tensor, col_lo: int, num_labels: int):
    """Triples and pairs of anchors with softmax columns sharing a label, self excluded.

    Returns (tri_seg [T] slot id i*KA + t, tri_pair [T] pair id, pi [P], pj [P], count [P] = c_ij),
    pairs sorted by (i, j), triples sorted by (i, t, j)."""
    dev = a_index.device
    C, KA = c_index.shape[0], a_index.shape[1]
    col_ptr, by_label = label_index.column_label_index(c_index, num_labels, col_lo)

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


def head_split(a_index: Tensor, c_index: Tensor, col_lo: int, num_labels: int, head_width: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a_head [M, W], c_head [C, W] fp16 0/1 rows of the head labels, W = labels.dense_width(head_width);
    a_tail, c_tail: the label lists with the head labels set to -1). The head: the `head_width`
    labels carried by most softmax columns (labels.most_frequent: ties to the smaller label)."""
    dev = c_index.device
    softmax = c_index[col_lo:]
    freq = torch.bincount(softmax[softmax >= 0], minlength=num_labels)
    head = tl_labels.most_frequent(freq, head_width)
    # Head slot of each label; the extra last entry (never a head label) is what a -1 pad reads.
    slot = torch.full((num_labels + 1,), -1, dtype=torch.int64, device=dev)
    slot[head] = torch.arange(head.numel(), device=dev)
    width = tl_labels.dense_width(head_width)

    def split(index: Tensor) -> tuple[Tensor, Tensor]:
        at = slot[index.long()]
        return tl_labels.one_hot_rows(at, width), torch.where(at >= 0, -1, index)

    (a_head, a_tail), (c_head, c_tail) = split(a_index), split(c_index)
    return a_head, c_head, a_tail, c_tail


def _sweep_labels(q, k, self_col, a_count, c_count, a_head, c_head, num_samples, col_lo, inv_tau, log_beta,
                  weighting, factor, alpha, reg, fp32_precision):
    """(label tuple, geometry) of the sweeps: the dense label mode over the head rows, or label-free."""
    if a_head.shape[1]:
        return launch.head_overlaps(q, k, self_col, a_count, c_count, a_head, c_head, num_samples, col_lo, inv_tau,
                                    log_beta, weighting, factor, alpha, reg, fp32_precision)
    return launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta,
                             fp32_precision)


def pair_omega(c: Tensor, a_i: Tensor, a_j: Tensor, weighting: int) -> Tensor:
    """Unnormalised pair-centric weight (any, all, jaccard) from fp32 overlaps and label counts:
    the formula of tiles.pair_omega, so that list corrections cancel the sweeps' values exactly."""
    pos = c > 0
    if weighting == WEIGHTING_CODES["any"]:
        return pos.to(torch.float32)
    if weighting == WEIGHTING_CODES["all"]:
        return (pos & (c == a_i) & (c == a_j)).to(torch.float32)
    union = torch.clamp(a_i + a_j - c, min=1.0)
    return torch.where(pos, c / union, 0.0)


def pair_factor(c: Tensor, a_i: Tensor, a_j: Tensor, proto_col: Tensor, factor: int, alpha: float) -> Tensor:
    """f_ij of the label-centric weighting (one, union, overlap; alpha < 0: hard) from fp32
    overlaps and label counts: the formula of tiles.pair_factor."""
    if factor == FACTOR_CODES["one"]:
        return torch.ones_like(c)
    if factor == FACTOR_CODES["union"]:
        return torch.where(proto_col, 1.0, 1.0 / torch.clamp(a_i + a_j - c, min=1.0))
    if alpha < 0:
        return (c == a_j).to(torch.float32)
    return torch.where(c > 0, (c / a_j.clamp(min=1)) ** alpha, 0.0)


def pair_weights(pi, pj, count, tri_seg, tri_pair, a_count, c_count, num_anchors: int, slots: int,
                 num_samples: int, weighting: int, factor: int, alpha: float, interpret: bool):
    """(w [P], W [M]) of SPEC from the lists; every sum is a CSR segment sum."""
    c = count.to(torch.float32)
    a_i = a_count[pi].to(torch.float32)
    a_j = c_count[pj].to(torch.float32)
    row_ptr = sparse.offsets(pi, num_anchors)
    if weighting != WEIGHTING_CODES["label"]:
        omega = pair_omega(c, a_i, a_j, weighting)
        total = sparse.segment_sum(omega, row_ptr, interpret)
        positive = total > 0
        scale = torch.where(positive, 1.0 / torch.where(positive, total, 1.0), 0.0)
        return omega * scale[pi], positive.to(torch.float32)

    f = pair_factor(c, a_i, a_j, pj >= num_samples, factor, alpha)
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
                   log_beta, alpha, weighting, factor, head_width, fp32_precision, validated):
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    args.precision("fp32_precision", fp32_precision)
    args.integer("num_labels", num_labels, 0)
    args.number("alpha", alpha)
    args.choice("weighting", weighting, WEIGHTING_CODES)
    args.choice("factor", factor, FACTOR_CODES)
    # The head rows are the dense label mode's tiles: at most its width.
    args.integer("head_width", head_width, 0, configs.DENSE_MAX_LABELS)
    # The inverted index is addressed by label id (column lists may be empty: no slot needed).
    args.label_lists("a_index", a_index, args.M)
    args.tensor("c_index", c_index, (args.C, None), checks.INDEX_DTYPES)
    args.label_rows("a_index", a_index, num_labels, a_count, "a_count")
    args.label_rows("c_index", c_index, num_labels, c_count, "c_count")
    return args


@custom_op("mlcl_fast::triton_pairs_forward", mutates_args=())
def pairs_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_count: Tensor, c_index: Tensor,
                  c_count: Tensor, num_samples: int, col_lo: int, num_labels: int, inv_tau: float,
                  log_beta: float, alpha: float, weighting: int, factor: int, reg: bool, head_width: int,
                  fp32_precision: str, order: Optional[Tensor] = None, live: Optional[Tensor] = None,
                  validated: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [M], W [M], lse2 [M] (base 2, for the sweeps), scale [M] (with a head: 1 / Omega, or
    1 / a_i for label-centric weights), inv_z [M, W or 1] (the head labels' 1 / Z_ih, label-centric
    weights with a head), pi [P], pj [P], coef [P] (w + r, or with a head the corrections of w + r),
    a_head [M, W], c_head [C, W] (W = 0 without a head))."""
    visit = _check_forward(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels,
                           inv_tau, log_beta, alpha, weighting, factor, head_width, fp32_precision,
                           validated).visit(order, live)
    interpret = launch.INTERPRETED
    M = q.shape[0]
    if head_width:
        a_head, c_head, a_list, c_list = head_split(a_index, c_index, col_lo, num_labels, head_width)
    else:
        a_head, c_head = q.new_empty(M, 0, dtype=torch.float16), k.new_empty(k.shape[0], 0, dtype=torch.float16)
        a_list, c_list = a_index, c_index
    labels, g = _sweep_labels(q, k, self_col, a_count, c_count, a_head, c_head, num_samples, col_lo, inv_tau,
                              log_beta, weighting, factor, alpha, reg, fp32_precision)
    lse2, acc_z, acc_s = launch.stats(q, k, labels, g, _identity, visit)
    lse = lse2 * configs.LN2

    slots = a_index.shape[1]
    tri_seg, tri_pair, pi, pj, count = positive_pairs(a_list, c_list, self_col, col_lo, num_labels)
    s = sparse.pair_dots(q, k, pi, pj, interpret) * inv_tau
    row_ptr = sparse.offsets(pi, M)
    log_b = torch.where(pj < num_samples, log_beta, 0.0)
    inv_z = lse.new_zeros(M, 1)  # the sweeps' label normalisers (label-centric weights with a head)
    if head_width and weighting == WEIGHTING_CODES["label"]:
        loss, w_tot, scale, inv_z, coef = _label_centric_head(
            q, k, labels, g, lse2, acc_z, acc_s, a_head, c_head, a_count, c_count, pi, pj, count, tri_seg, tri_pair,
            s, log_b, row_ptr, slots, num_samples, factor, alpha, reg, interpret, visit)
    elif head_width:
        # The sweeps weighed every pair by omega(c^H); the listed pairs also share tail labels.
        # c^H on the listed pairs: one pair dot of the 0/1 head rows each (exact; no [P, W] gather).
        c_head_ij = sparse.pair_dots(a_head, c_head, pi, pj, interpret)
        a_i, a_j = a_count[pi].to(torch.float32), c_count[pj].to(torch.float32)
        om_head = pair_omega(c_head_ij, a_i, a_j, weighting)
        om = pair_omega(c_head_ij + count.to(torch.float32), a_i, a_j, weighting)
        omega = acc_z[:, 0] + sparse.segment_sum(om - om_head, row_ptr, interpret)
        total = acc_s[:, 0] + sparse.segment_sum((om - om_head) * s, row_ptr, interpret)
        loss, w_tot, scale, _ = epilogue(lse, omega[:, None], total[:, None], a_count, False)
        loss, coef = _listed_corrections(q, k, labels, g, lse2, w_tot, scale, acc_z, loss, om_head * scale[pi],
                                         om * scale[pi], pi, s, log_b, row_ptr, reg, visit, interpret)
    else:
        w, w_tot = pair_weights(pi, pj, count, tri_seg, tri_pair, a_count, c_count, M, slots, num_samples,
                                weighting, factor, alpha, interpret)
        term = w * s
        coef = w
        if reg:
            p = torch.exp(s + log_b - lse[pi])
            r = torch.where(w > 0, (p - w).clamp(min=0), 0.0)
            term = term + r * s
            coef = w + r
        loss = w_tot * lse - sparse.segment_sum(term, row_ptr, interpret)
        scale = torch.zeros_like(w_tot)  # not read by the label-free sweeps (zeros: outputs are defined values)
    loss = torch.where(w_tot > 0, loss, 0.0)
    return loss, w_tot, lse2, scale, inv_z, pi, pj, coef, a_head, c_head


def _label_centric_head(q, k, labels, g, lse2, acc_z, acc_s, a_head, c_head, a_count, c_count, pi, pj, count,
                        tri_seg, tri_pair, s, log_b, row_ptr, slots, num_samples, factor, alpha, reg, interpret, visit):
    """Label-centric weights with a head: (loss, W, scale = 1/a_i, inv_z [M, W] of the head labels
    for the sweeps, coef [P] = the listed pairs' corrections of w + r).

    The sweeps summed, per head label h of anchor i, Z^H_ih and S^H_ih with the factor f(c^H_ij)
    of the head overlap. A listed pair shares a tail label, so its factor is f(c^H + c^T): its
    head labels' sums get the difference (summed per anchor over the columns' head rows, masked
    to the anchor's labels), and its tail labels' Z_ik, S_ik come from the triples. The pair's
    weight is then f (sum_h u_ih + sum_tail u_ik) / a_i against the sweeps' f(c^H) sum_h u_ih / a_i."""
    M = acc_z.shape[0]
    lse = lse2 * configs.LN2
    a_i, a_j = a_count[pi].to(torch.float32), c_count[pj].to(torch.float32)
    c_h = sparse.pair_dots(a_head, c_head, pi, pj, interpret)
    proto = pj >= num_samples
    f_head = pair_factor(c_h, a_i, a_j, proto, factor, alpha)
    f = pair_factor(c_h + count.to(torch.float32), a_i, a_j, proto, factor, alpha)
    own = a_head.to(torch.float32)
    z_head = acc_z + sparse.csr_rows(row_ptr, pj, f - f_head, c_head, interpret) * own
    s_head = acc_s + sparse.csr_rows(row_ptr, pj, (f - f_head) * s, c_head, interpret) * own
    slot_ptr = sparse.offsets(tri_seg, M * slots)
    z_tail = sparse.segment_sum(f[tri_pair], slot_ptr, interpret)
    s_tail = sparse.segment_sum((f * s)[tri_pair], slot_ptr, interpret)
    inv = lambda z: torch.where(z > 0, 1.0 / torch.where(z > 0, z, 1.0), 0.0)  # noqa: E731
    inv_head, inv_tail = inv(z_head), inv(z_tail)
    inv_a = 1.0 / a_count.clamp(min=1).to(torch.float32)
    w_tot = ((z_head > 0).sum(dim=1) + (z_tail.reshape(M, slots) > 0).sum(dim=1)).to(torch.float32) * inv_a
    weighted = (s_head * inv_head).sum(dim=1) + (s_tail * inv_tail).reshape(M, slots).sum(dim=1)
    loss = w_tot * lse - inv_a * weighted
    # Per listed pair: the head labels' sum of 1/Z (zero off the anchor's labels) and the tail's.
    u_head = sparse.pair_dots(inv_head, c_head, pi, pj, interpret)
    by_pair = torch.argsort(tri_pair, stable=True)
    u_tail = sparse.segment_sum(inv_tail[tri_seg[by_pair]], sparse.offsets(tri_pair[by_pair], pi.numel()), interpret)
    loss, coef = _listed_corrections(q, k, labels, g, lse2, w_tot, inv_a, inv_head, loss,
                                     f_head * u_head * inv_a[pi], f * (u_head + u_tail) * inv_a[pi], pi, s, log_b,
                                     row_ptr, reg, visit, interpret)
    return loss, w_tot, inv_a, inv_head.contiguous(), coef


def _listed_corrections(q, k, labels, g, lse2, w_tot, scale, inv_z, loss, w_head, w, pi, s, log_b, row_ptr, reg,
                        visit, interpret):
    """(loss, coef) with a head: the listed pairs' weights w replace the sweeps' w_head; with the
    regulariser, the sweeps' value sum_j r^H_ij s_ij (a second sweep) and the listed pairs'
    r(w) - r(w_head). coef [P] is the gradient correction w - w_head + r(w) - r(w_head)."""
    coef = w - w_head
    if reg:
        lse = lse2 * configs.LN2
        p = torch.exp(s + log_b - lse[pi])
        r_head = torch.where(w_head > 0, (p - w_head).clamp(min=0), 0.0)
        r = torch.where(w > 0, (p - w).clamp(min=0), 0.0)
        _, reg_head = launch.rows(q, k, labels, lse2, w_tot, scale, inv_z, torch.ones_like(lse2), g, _identity,
                                  reg_value=True, grad=False, visit=visit)
        loss = loss - reg_head - sparse.segment_sum((r - r_head) * s, row_ptr, interpret)
        coef = coef + (r - r_head)
    return loss, coef


@pairs_forward.register_fake
def _(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau, log_beta,
      alpha, weighting, factor, reg, head_width, fp32_precision, order=None, live=None, validated=False):
    # Metadata only: fake tensors hold no values.
    _check_forward(q, k, self_col, a_index, a_count, c_index, c_count, num_samples, col_lo, num_labels, inv_tau,
                   log_beta, alpha, weighting, factor, head_width, fp32_precision, validated=True).visit(order, live)
    M = q.shape[0]
    P = torch.library.get_ctx().new_dynamic_size()
    width = tl_labels.dense_width(head_width) if head_width else 0
    per_anchor = lambda: q.new_empty(M, dtype=torch.float32)  # noqa: E731
    return (per_anchor(), per_anchor(), per_anchor(), per_anchor(),
            q.new_empty(M, _inv_z_width(width, weighting), dtype=torch.float32),
            q.new_empty(P, dtype=torch.int64), q.new_empty(P, dtype=torch.int64), q.new_empty(P, dtype=torch.float32),
            q.new_empty(M, width, dtype=torch.float16), k.new_empty(k.shape[0], width, dtype=torch.float16))


def _inv_z_width(head_rows_width: int, weighting: int) -> int:
    """Columns of the sweeps' label normalisers: the head labels' for label-centric weights with a
    head, else one placeholder column."""
    return head_rows_width if head_rows_width and weighting == WEIGHTING_CODES["label"] else 1


def _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, scale, inv_z, a_head, c_head, pi, pj, coef, g_up,
                    num_samples, col_lo, inv_tau, log_beta, alpha, weighting, factor, fp32_precision, validated):
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    args.precision("fp32_precision", fp32_precision)
    args.number("alpha", alpha)
    args.choice("weighting", weighting, WEIGHTING_CODES)
    args.choice("factor", factor, FACTOR_CODES)
    for name, t in (("lse", lse), ("w_tot", w_tot), ("scale", scale), ("g_up", g_up)):
        args.tensor(name, t, (args.M,), (torch.float32,))
    args.tensor("a_head", a_head, (args.M, None), (torch.float16,))
    width = a_head.shape[1]
    args.tensor("c_head", c_head, (args.C, width), (torch.float16,))
    if width and (width < 16 or configs.pow2(width) != width or width > configs.DENSE_MAX_LABELS):
        raise ValueError(f"a_head: expected 0/1 head rows of a power-of-two width in [16, "
                         f"{configs.DENSE_MAX_LABELS}] (or none), got {width}")
    # The sweeps read the head labels' 1/Z_ih (label-centric weights with a head), else nothing.
    args.tensor("inv_z", inv_z, (args.M, _inv_z_width(width, weighting)), (torch.float32,))
    args.tensor("pi", pi, (None,), (torch.int64,))
    P = pi.shape[0]
    args.tensor("pj", pj, (P,), (torch.int64,))
    args.tensor("coef", coef, (P,), (torch.float32,))
    # The pairs are sorted by anchor (CSR offsets by searchsorted) and address q and k rows.
    args.ids("pi", pi, 0, args.M, "anchor indices")
    if not validated and P > 1:
        args.assert_values("pi", pi[1:] >= pi[:-1], "anchor indices sorted ascending")
    args.ids("pj", pj, 0, args.C, "column indices")
    return args


@custom_op("mlcl_fast::triton_pairs_backward", mutates_args=())
def pairs_backward(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, lse: Tensor,
                   w_tot: Tensor, scale: Tensor, inv_z: Tensor, a_head: Tensor, c_head: Tensor, pi: Tensor,
                   pj: Tensor, coef: Tensor, g_up: Tensor, num_samples: int, col_lo: int, inv_tau: float,
                   log_beta: float, alpha: float, weighting: int, factor: int, reg: bool, fp32_precision: str,
                   order: Optional[Tensor] = None, live: Optional[Tensor] = None,
                   validated: bool = False) -> tuple[Tensor, Tensor]:
    visit = _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, scale, inv_z, a_head, c_head, pi, pj, coef,
                            g_up, num_samples, col_lo, inv_tau, log_beta, alpha, weighting, factor, fp32_precision,
                            validated).visit(order, live)
    interpret = launch.INTERPRETED
    M, C = q.shape[0], k.shape[0]
    labels, g = _sweep_labels(q, k, self_col, a_count, c_count, a_head, c_head, num_samples, col_lo, inv_tau,
                              log_beta, weighting, factor, alpha, reg, fp32_precision)
    dq, _ = launch.rows(q, k, labels, lse, w_tot, scale, inv_z, g_up, g, _identity, reg_value=False, grad=True,
                        visit=visit)
    dk = launch.cols(q, k, labels, lse, w_tot, scale, inv_z, g_up, g, _identity, visit)
    # The listed part: -(w_ij + r_ij) G_i / tau (with a head: its corrections), summed per anchor
    # (pairs sorted by anchor) and per column (the same pairs stably re-sorted by column).
    corr = -coef * g_up[pi] * inv_tau
    dq += sparse.csr_rows(sparse.offsets(pi, M), pj, corr, k, interpret)
    by_col = torch.argsort(pj, stable=True)
    dk += sparse.csr_rows(sparse.offsets(pj[by_col], C), pi[by_col], corr[by_col], q, interpret)
    return dq.to(q.dtype), dk.to(k.dtype)


@pairs_backward.register_fake
def _(q, k, self_col, a_count, c_count, lse, w_tot, scale, inv_z, a_head, c_head, pi, pj, coef, g_up, num_samples,
      col_lo, inv_tau, log_beta, alpha, weighting, factor, reg, fp32_precision, order=None, live=None,
      validated=False):
    _check_backward(q, k, self_col, a_count, c_count, lse, w_tot, scale, inv_z, a_head, c_head, pi, pj, coef, g_up,
                    num_samples, col_lo, inv_tau, log_beta, alpha, weighting, factor, fp32_precision,
                    validated=True).visit(order, live)
    return torch.empty_like(q), torch.empty_like(k)


_SCALARS = ("num_samples", "col_lo", "num_labels", "inv_tau", "log_beta", "alpha", "weighting", "factor", "reg",
            "head_width", "fp32_precision")


def _setup_context(ctx, inputs, output):
    q, k, self_col, a_index, a_count, c_index, c_count, *rest = inputs
    scalars = rest[:len(_SCALARS)]  # then order, live, validated
    order, live = (tuple(rest[len(_SCALARS):len(_SCALARS) + 2]) + (None, None))[:2]
    _, w_tot, lse, scale, inv_z, pi, pj, coef, a_head, c_head = output
    s = dict(zip(_SCALARS, scalars))
    ctx.visit = order is not None
    ctx.scalars = {name: s[name] for name in ("num_samples", "col_lo", "inv_tau", "log_beta", "alpha", "weighting",
                                              "factor", "reg", "fp32_precision")}
    ctx.save_for_backward(q, k, self_col, a_count, c_count, lse, w_tot, scale, inv_z, a_head, c_head, pi, pj, coef,
                          *((order, live) if ctx.visit else ()))


def _backward(ctx, g_loss, *_unused):
    saved = ctx.saved_tensors
    visit = saved[-2:] if ctx.visit else (None, None)
    saved = saved[:-2] if ctx.visit else saved
    # The saved tensors are the forward's checked inputs and its outputs: no value assertions again.
    dq, dk = pairs_backward(*saved, g_loss.to(torch.float32).contiguous(), **ctx.scalars, order=visit[0],
                            live=visit[1], validated=True)
    return (dq, dk) + (None,) * (5 + len(_SCALARS) + 3)  # + order, live, validated


pairs_forward.register_autograd(_backward, setup_context=_setup_context)
