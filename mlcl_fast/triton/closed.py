"""The closed-form regime: label-centric weights whose pair factor is 1 on every positive
(presets reg, reg_noreg, mulsupcon, proto), with no label loop in any sweep.

With f = 1 the weights are w_ij = sum_{k in y_i ∩ y_j} u_ik, u_ik = 1 / (a_i Z_ik), and Z_ik is
a label count: the softmax columns carrying k, less anchor i's own column (which carries every
label of i whenever it is a softmax column). So everything the weights contribute follows from
per-label sums of embeddings, O(nnz * d) work:

  E_k = sum_{softmax columns j carrying k} k_j                        (forward)
  V_i = sum_{k in y_i} u_ik E_k - ubar_i [own column in range] k_own  (ubar_i = sum_k u_ik)
  sum_j w_ij s_ij = <q_i, V_i> / tau,   W_i = |{k in y_i: Z_ik > 0}| / a_i
  loss_i = W_i lse_i - <q_i, V_i> / tau
  dq_i  -= G_i V_i / tau
  F_k   = sum_{anchors i carrying k} G_i u_ik q_i                      (backward)
  dk_j  -= (sum_{k in y_j} F_k - [j is anchor i's own column] G_i ubar_i q_i) / tau

The statistics sweep runs label-free (configs.MODE_NONE). The loss value takes every label from
the closed form. The gradient takes the HB most frequent labels of the columns ("head") inside
the second sweeps (configs.MODE_HEAD): a dense [C, HB] 0/1 tile and the anchors' u_ik over them
give w^H_ij from two small fp16 `tl.dot`s per tile, and g_ij = G_i (W_i p_ij - w^H_ij - r^H_ij)
is formed before the gradient product (so nothing large cancels where p_ij ~ w_ij); only the
other ("tail") labels' -w part comes from the sums above.

The regulariser r_ij = max(p_ij - w_ij, 0) needs all of w_ij on a pair: the sweeps use w^H, and
pairs that share a tail label are found through the label indexes and corrected by
r(w^H + w^T) - r(w^H) (tail.py: no list, nothing to size; nothing at all when the columns carry
at most HB labels, known from the shapes): exact.

The label-sum structures have static shapes (nothing depends on label values but their
contents), are built on the device without a host synchronisation, and every sum is a CSR
segment sum in a fixed order (deterministic). Per-label sums live in a compact label space of at
most min(L, C * K_c) rows: the labels the softmax columns carry. The sweeps visit the anchors
with a positive first and skip the others (prep.py).

The operators check their arguments (checks.py); `validated=True` (the driver, and the autograd
backward) leaves out the device-side assertions on the values the caller checked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import checks, configs, launch, prep, sparse
from . import tail as tail_pairs  # `tail`: closed_backward's flag
from .recording import launch as launch_kernel


def head_width(c_index: Tensor, num_labels: int, dim: int) -> int:
    """HB: the head tile's width (a power of two >= 16 for tl.dot, at most configs.HEAD_LABELS,
    or HEAD_LABELS_WIDE when d > 128)."""
    labels = max(1, min(num_labels, c_index.numel()))
    cap = configs.HEAD_LABELS_WIDE if dim > 128 else configs.HEAD_LABELS
    return max(16, min(cap, configs.pow2(labels)))


def has_tail(c_index: Tensor, num_labels: int, dim: int) -> bool:
    """Whether labels outside the head can exist (from shapes alone: no synchronisation)."""
    return min(num_labels, c_index.numel()) > head_width(c_index, num_labels, dim)


@triton.jit
def label_anchor_sums_kernel(slot_ptr, slot_sorted, u_tail, g_up, q_ptr, out, d, KA, stride_q, stride_o,
                             BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """F_u = sum over the anchor slots of compact label u (flat anchor * KA + slot, in slot
    order) of G_i u^T_ik q_i: one program per label and feature chunk, a fixed order."""
    seg = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < d
    lo = tl.load(slot_ptr + seg)
    hi = tl.load(slot_ptr + seg + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        slot = tl.load(slot_sorted + offs, mask=pmask, other=0)
        row = slot // KA
        c = tl.load(u_tail + slot, mask=pmask, other=0.0) * tl.load(g_up + row, mask=pmask, other=0.0)
        x = tl.load(q_ptr + row[:, None] * stride_q + dd[None, :], mask=pmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += c[:, None] * x
    tl.store(out + seg * stride_o + dd, tl.sum(acc, axis=0), mask=dmask)


@triton.jit
def column_label_grad_kernel(col_cid, f_ptr, col_owner, g_up, ubar_tail, q_ptr, dk, KC, d, inv_tau,
                             stride_f, stride_q, stride_dk, KC_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk_j -= (sum_{k in y_j} F_k - [j is anchor i's own column] G_i ubar^T_i q_i) / tau, in place."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    inv_tau = tl.cast(inv_tau, tl.float32)
    j = tl.program_id(0)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dd < d
    slots = tl.arange(0, KC_P2)
    cid = tl.load(col_cid + j * KC + slots, mask=slots < KC, other=-1)
    rows_f = tl.load(f_ptr + cid[:, None] * stride_f + dd[None, :], mask=(cid >= 0)[:, None] & dmask[None, :],
                     other=0.0)
    acc = tl.sum(rows_f, axis=0)
    owner = tl.load(col_owner + j)
    if owner >= 0:
        own = tl.load(g_up + owner) * tl.load(ubar_tail + owner)
        acc -= own * tl.load(q_ptr + owner * stride_q + dd, mask=dmask, other=0.0).to(tl.float32)
    cur = tl.load(dk + j * stride_dk + dd, mask=dmask, other=0.0)
    tl.store(dk + j * stride_dk + dd, cur - inv_tau * acc, mask=dmask)


def label_anchor_sums(slot_ptr: Tensor, slot_sorted: Tensor, u_tail: Tensor, g_up: Tensor, q: Tensor,
                      interpret: bool) -> Tensor:
    """[U, d] fp32: label_anchor_sums_kernel."""
    U, d = slot_ptr.numel() - 1, q.shape[1]
    out = torch.empty(U, d, dtype=torch.float32, device=q.device)
    bp, bd = sparse.csr_blocks(d, interpret)
    launch_kernel(label_anchor_sums_kernel, (U, triton.cdiv(d, bd)),
                  (slot_ptr, slot_sorted, u_tail, g_up, q, out, d, u_tail.shape[1], q.stride(0), out.stride(0)),
                  dict(BLOCK_P=bp, BLOCK_D=bd), wrap_triton)
    return out


def column_label_grad(col_cid: Tensor, f: Tensor, col_owner: Tensor, g_up: Tensor, ubar_tail: Tensor, q: Tensor,
                      dk: Tensor, inv_tau: float, interpret: bool) -> None:
    """column_label_grad_kernel: updates dk [C, d] fp32 in place."""
    C, kc = col_cid.shape
    d = q.shape[1]
    if C == 0 or d == 0:
        return
    bd = configs.block_width(d, 128, interpret)
    launch_kernel(column_label_grad_kernel, (C, triton.cdiv(d, bd)),
                  (col_cid, f, col_owner, g_up, ubar_tail, q, dk, kc, d, inv_tau, f.stride(0), q.stride(0),
                   dk.stride(0)), dict(KC_P2=configs.pow2(kc), BLOCK_D=bd), wrap_triton)




@triton_op("mlcl_fast::triton_closed_forward", mutates_args=())
def closed_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_count: Tensor, c_index: Tensor,
                   c_count: Tensor, num_samples: int, col_lo: int, num_labels: int, inv_tau: float,
                   log_beta: float, reg: bool, fp32_precision: str, grad_in_forward: bool, validated: bool = False,
                   symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [M] (regulariser included: the tail labels' part from tail.py), W [M],
    lse2 [M] (base 2), V^T [M, d] fp32 (the tail labels' V), then what the backward
    reuses: u^T [M, Ka] (the tail labels' u_ik), ubar^T [M], col_cid [C, Kc],
    slot_ptr [U+1], slot_sorted [M*Ka], col_owner [C], head_u [M, 2*HB], head_y [C, HB],
    row_scale [M], a_cid [M, Ka], col_ptr [U+1], col_sorted [C*Kc], top [min(HB, U)] (the head),
    dq_unit [M or 0, d] (the anchor-row gradient for G = 1, tail labels included), visit order
    [M], visit live [1]).

    The loss value takes every label from the closed form. The gradient takes the head labels'
    weights per pair inside the sweeps (g_ij = G_i (W_i p_ij - w^H_ij - r_ij), formed before the
    gradient GEMM, so near convergence, where p_ij ~ w_ij, nothing large cancels) and only the
    tail labels from the closed form.

    `symmetric`: the caller guarantees q[i] == k[self_col[i]] for every anchor (both cut from one
    embedding) and sums the two gradients (only dq_i + dk_own(i) matters); the backward may then
    take the symmetric sweep (launch.symmetric_applies: two products per tile instead of four), with
    the anchor-row gradient for G = 1 left out of the forward."""
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    args.precision("fp32_precision", fp32_precision)
    args.integer("num_labels", num_labels, 0)
    # prep.py indexes its label -> compact id map with the anchors' and the columns' label ids.
    args.label_lists("a_index", a_index, args.M)
    args.label_lists("c_index", c_index, args.C)
    args.label_rows("a_index", a_index, num_labels, a_count, "a_count")
    args.label_rows("c_index", c_index, num_labels, c_count, "c_count")
    interpret = launch.INTERPRETED
    hb = head_width(c_index, num_labels, q.shape[1])
    tail = has_tail(c_index, num_labels, q.shape[1])
    pre = prep.prepare(a_index, a_count, c_index, self_col, col_lo, num_labels, hb, k, interpret, wrap_triton)
    # The statistics sweep needs no labels at all; the second sweeps carry the head tiles.
    free, g_free = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta,
                                     fp32_precision)
    visit = (pre.order, pre.live)
    # The anchors' label sums V_i (and the loss without the regulariser) in the same programs.
    sums = (pre.a_cid, pre.u, pre.u_tail, pre.ubar, pre.ubar_tail, pre.w_tot, pre.e)
    lse2, _, _, loss, v_tail = launch.stats(q, k, free, g_free, wrap_triton, visit, sums=sums)
    labels, g = launch.head_tiles(q, k, self_col, a_count, c_count, pre.head_u, pre.head_y, num_samples, col_lo,
                                  inv_tau, log_beta, reg, fp32_precision)
    dq_unit = q.new_empty(0, q.shape[1], dtype=torch.float32)
    if reg or grad_in_forward:
        # The second sweep: the head regulariser's value and/or the anchor-row gradient for G = 1.
        dq_unit, reg_sum = launch.rows(q, k, labels, lse2, pre.w_tot, pre.row_scale, pre.u[:, :1],
                                       torch.ones_like(lse2), g, wrap_triton, reg_value=reg, grad=grad_in_forward,
                                       visit=visit)
        if reg:
            loss = loss - reg_sum  # 0 for the anchors without a positive, which are not visited
        if dq_unit is None:
            dq_unit = q.new_empty(0, q.shape[1], dtype=torch.float32)
        elif tail:
            dq_unit = dq_unit - inv_tau * v_tail  # the tail labels' -w part: dq_i -= G_i V^T_i / tau
        if reg and tail:
            # The regulariser of the pairs sharing a tail label: the value, and dq for G = 1 with it.
            pairs = tail_pairs.Labels(self_col, a_index, c_index, pre.a_cid, pre.col_ptr, pre.col_sorted, pre.u_tail,
                                      pre.head_u, pre.head_y, pre.row_scale, pre.col_cid, pre.slot_ptr,
                                      pre.slot_sorted, pre.top)
            tail_pairs.add_anchor_terms(q, k, pairs, lse2, num_samples, log_beta, inv_tau, wrap_triton, value=loss,
                                        dq=dq_unit if dq_unit.shape[0] else None)
    return (loss, pre.w_tot, lse2, v_tail, pre.u_tail, pre.ubar_tail, pre.col_cid, pre.slot_ptr, pre.slot_sorted,
            pre.col_owner, pre.head_u, pre.head_y, pre.row_scale, pre.a_cid, pre.col_ptr, pre.col_sorted,
            pre.top, dq_unit, *visit)


@triton_op("mlcl_fast::triton_closed_backward", mutates_args=())
def closed_backward(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, lse2: Tensor,
                    w_tot: Tensor, v_tail: Tensor, u_tail: Tensor, ubar_tail: Tensor, col_cid: Tensor,
                    slot_ptr: Tensor, slot_sorted: Tensor, col_owner: Tensor, head_u: Tensor, head_y: Tensor,
                    row_scale: Tensor, a_index: Tensor, c_index: Tensor, a_cid: Tensor, col_ptr: Tensor,
                    col_sorted: Tensor, top: Tensor, dq_unit: Tensor, order: Tensor, live: Tensor, g_up: Tensor,
                    num_samples: int, col_lo: int,
                    inv_tau: float, log_beta: float, reg: bool, tail: bool,
                    fp32_precision: str, validated: bool = False, symmetric: bool = False) -> tuple[Tensor, Tensor]:
    args = checks.common(q, k, self_col, num_samples, col_lo, inv_tau, log_beta, validated, a_count, c_count)
    args.precision("fp32_precision", fp32_precision)
    M, C, d = args.M, args.C, args.d
    for name, t in (("lse2", lse2), ("w_tot", w_tot), ("ubar_tail", ubar_tail), ("row_scale", row_scale),
                    ("g_up", g_up)):
        args.tensor(name, t, (M,), (torch.float32,))
    args.tensor("v_tail", v_tail, (M, d), (torch.float32,))
    ka = args.label_lists("u_tail", u_tail, M, (torch.float32,))
    args.label_lists("col_cid", col_cid, C, (torch.int64,))
    # The anchor slots of each compact label (slot_ptr, over slot_sorted's flat slots).
    U = args.offsets("slot_ptr", slot_ptr, M * ka)
    args.tensor("slot_sorted", slot_sorted, (M * ka,), (torch.int64,))
    args.tensor("col_owner", col_owner, (C,), (torch.int32,))
    hb = args.head("head_u", head_u, M, 2)
    args.tensor("head_y", head_y, (C, hb), (torch.float16,))
    args.anchor_gradient("dq_unit", dq_unit)
    args.visit(order, live)
    # What else the kernels address memory with: anchors (col_owner, slot_sorted's slots) and
    # compact labels (col_cid).
    args.ids("col_cid", col_cid, -1, U, "compact label ids (-1: none)")
    args.ids("slot_sorted", slot_sorted, 0, max(1, M * ka), "anchor slots (anchor * Ka + slot)")
    args.ids("col_owner", col_owner, -1, M, "anchor indices (-1: none)")
    # The tail kernels' label indexes (the regulariser of pairs sharing a tail label).
    tail_pairs.check(args, a_index, c_index, a_cid, col_ptr, col_sorted, top, U, hb, ka, col_cid.shape[1])
    interpret = launch.INTERPRETED
    labels, g = launch.head_tiles(q, k, self_col, a_count, c_count, head_u, head_y, num_samples, col_lo, inv_tau,
                                  log_beta, reg, fp32_precision)
    visit = (order, live)
    # The symmetric sweep (its contract: q[i] == k[self_col[i]], see closed_forward) where it applies.
    sym = symmetric and dq_unit.shape[0] != q.shape[0] and launch.symmetric_applies(g)
    if dq_unit.shape[0] == q.shape[0]:
        dq = dq_unit * g_up[:, None]  # the anchor-row gradient is linear in G_i
    else:
        # Symmetric: the anchor rows sweep only the columns no visited anchor owns; the owned ones
        # come with the column sweep below.
        columns = launch.symmetric_columns(col_owner, w_tot) if sym else None
        dq, _ = launch.rows(q, k, labels, lse2, w_tot, row_scale, u_tail[:, :1], g_up, g, wrap_triton,
                            reg_value=False, grad=True, visit=visit, columns=columns)
        if tail:  # the tail labels' -w part: dq_i -= G_i V^T_i / tau
            dq = dq - (g_up * inv_tau)[:, None] * v_tail
    pairs = tail_pairs.Labels(self_col, a_index, c_index, a_cid, col_ptr, col_sorted, u_tail, head_u, head_y,
                              row_scale, col_cid, slot_ptr, slot_sorted, top)
    if reg and tail and dq_unit.shape[0] != q.shape[0]:
        # The regulariser of the pairs sharing a tail label (the forward added it to dq_unit).
        tail_pairs.add_anchor_terms(q, k, pairs, lse2, num_samples, log_beta, inv_tau, wrap_triton, dq=dq, g_up=g_up)
    dk = launch.cols(q, k, labels, lse2, w_tot, row_scale, u_tail[:, :1], g_up, g, wrap_triton, visit,
                     owners=col_owner if sym else None)
    if tail:
        # F_u = sum over the anchor slots of compact label u of G_i u_ik q_i; each column
        # subtracts the F of its labels (less its owner's own-column term), in place.
        f = label_anchor_sums(slot_ptr, slot_sorted, u_tail, g_up, q, interpret)
        column_label_grad(col_cid, f, col_owner, g_up, ubar_tail, q, dk, inv_tau, interpret)
        if reg:
            tail_pairs.add_column_terms(q, k, pairs, lse2, g_up, num_samples, log_beta, inv_tau, dk, wrap_triton)
    return dq.to(q.dtype), dk.to(k.dtype)


_INPUTS = ("q", "k", "self_col", "a_index", "a_count", "c_index", "c_count")
_SCALARS = ("num_samples", "col_lo", "num_labels", "inv_tau", "log_beta", "reg", "fp32_precision", "grad_in_forward",
            "validated", "symmetric")


def _setup_context(ctx, inputs, output):
    q, k, self_col, a_index, a_count, c_index, c_count = inputs[:len(_INPUTS)]
    s = dict(zip(_SCALARS, inputs[len(_INPUTS):]))
    (_, w_tot, lse2, v_tail, u_tail, ubar_tail, col_cid, slot_ptr, slot_sorted, col_owner, head_u, head_y, row_scale,
     a_cid, col_ptr, col_sorted, top, dq_unit, order, live) = output
    ctx.scalars = {name: s.get(name, False) for name in ("num_samples", "col_lo", "inv_tau", "log_beta", "reg",
                                                         "fp32_precision", "symmetric")}
    ctx.scalars["tail"] = has_tail(c_index, s["num_labels"], q.shape[1])
    ctx.set_materialize_grads(False)  # only the loss is differentiated: no zero gradients for the rest
    ctx.save_for_backward(q, k, self_col, a_count, c_count, lse2, w_tot, v_tail, u_tail, ubar_tail, col_cid,
                          slot_ptr, slot_sorted, col_owner, head_u, head_y, row_scale, a_index, c_index, a_cid,
                          col_ptr, col_sorted, top, dq_unit, order, live)


def _backward(ctx, g_loss, *_unused):
    if g_loss is None:
        return (None,) * (len(_INPUTS) + len(_SCALARS))
    # The saved tensors are the forward's checked inputs and its outputs: no value assertions again.
    dq, dk = closed_backward(*ctx.saved_tensors, g_loss.to(torch.float32).contiguous(), **ctx.scalars,
                             validated=True)
    return (dq, dk) + (None,) * (len(_INPUTS) - 2 + len(_SCALARS))


closed_forward.register_autograd(_backward, setup_context=_setup_context)
