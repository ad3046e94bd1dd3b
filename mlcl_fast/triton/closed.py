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
pairs that share a tail label are listed (tail.py: a fixed-capacity list, none at all when the
columns carry at most HB labels, known from the shapes) and corrected by r(w^H + w^T) - r(w^H):
exact.

The label-sum structures have static shapes (nothing depends on label values but their
contents), are built on the device without a host synchronisation, and every sum is a CSR
segment sum in a fixed order (deterministic). Per-label sums live in a compact label space of at
most min(L, C * K_c) rows: the labels the softmax columns carry. The sweeps visit the anchors
with a positive first and skip the others (valid_first).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op, triton_op, wrap_triton

from . import configs, launch, sparse
from .labels import most_frequent, one_hot_rows


def label_index(a_index: Tensor, c_index: Tensor, self_col: Tensor, col_lo: int, num_labels: int):
    """The static-shape label structures of the closed form.

    Returns (col_ptr [U+1], col_sorted [C*Kc], col_cid [C, Kc], a_cid [M, Ka], cnt [U]):
    compact label ids u < U = min(L, C*Kc) for the labels carried by softmax columns; entries of
    col_sorted[col_ptr[u]:col_ptr[u+1]] are the softmax columns carrying label u (ascending);
    col_cid / a_cid map each column / anchor slot to its compact id (-1: padding, a column
    outside the softmax range, or an anchor label no softmax column carries); cnt[u] counts the
    columns of u."""
    dev = c_index.device
    C, Kc = c_index.shape
    L = num_labels
    U = max(1, min(L, C * Kc))
    col_ids = torch.arange(C, device=dev).unsqueeze(1).expand(C, Kc)
    valid = (c_index >= 0) & (col_ids >= col_lo)
    # Sort (label, column) keys; padding sorts last under the key L*C + column.
    keys = torch.where(valid, c_index * C + col_ids, L * C + col_ids).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    lab_s = sorted_keys // C
    valid_s = lab_s < L
    col_s = torch.where(valid_s, sorted_keys % C, -1)
    first = valid_s & torch.cat([torch.ones(1, dtype=torch.bool, device=dev), lab_s[1:] != lab_s[:-1]])
    cid_s = torch.where(valid_s, torch.cumsum(first.to(torch.int64), 0) - 1, U)
    col_ptr = torch.searchsorted(cid_s, torch.arange(U + 1, device=dev))
    cnt = (col_ptr[1:] - col_ptr[:-1]).to(torch.float32)
    # label -> compact id ([L + 1]; the last entry serves padding and labels without columns).
    to_cid = torch.full((L + 1,), -1, dtype=torch.int64, device=dev)
    to_cid.scatter_(0, torch.where(first, lab_s, L), torch.where(first, cid_s, -1))
    to_cid[L] = -1
    col_cid = torch.empty(C * Kc, dtype=torch.int64, device=dev)
    col_cid[order] = torch.where(valid_s, cid_s, -1)
    a_cid = to_cid[torch.where(a_index >= 0, a_index, L)]
    return col_ptr, col_s, col_cid.view(C, Kc), a_cid, cnt


def anchor_weights(a_cid: Tensor, a_count: Tensor, cnt: Tensor, self_col: Tensor, col_lo: int):
    """(u [M, Ka] = 1 / (a_i Z_ik) or 0, W [M], ubar [M], own [M] bool: own column in range)."""
    own = self_col.long() >= col_lo
    z = torch.where(a_cid >= 0, cnt[a_cid.clamp(min=0)], 0.0) - own.to(torch.float32)[:, None]
    positive = (a_cid >= 0) & (z > 0)
    inv_a = 1.0 / a_count.clamp(min=1).to(torch.float32)
    u = torch.where(positive, 1.0 / torch.where(positive, z, 1.0), 0.0) * inv_a[:, None]
    return u, positive.sum(dim=1).to(torch.float32) * inv_a, u.sum(dim=1), own


def _slot_ptr(rows: int, width: int, device) -> Tensor:
    return torch.arange(rows + 1, device=device) * width


def head_width(c_index: Tensor, num_labels: int, dim: int) -> int:
    """HB: the head tile's width (a power of two >= 16 for tl.dot, at most configs.HEAD_LABELS,
    or HEAD_LABELS_WIDE when d > 128)."""
    labels = max(1, min(num_labels, c_index.numel()))
    cap = configs.HEAD_LABELS_WIDE if dim > 128 else configs.HEAD_LABELS
    return max(16, min(cap, configs.pow2(labels)))


def has_tail(c_index: Tensor, num_labels: int, dim: int) -> bool:
    """Whether labels outside the head can exist (from shapes alone: no synchronisation)."""
    return min(num_labels, c_index.numel()) > head_width(c_index, num_labels, dim)


def head_tiles(cnt: Tensor, col_cid: Tensor, a_cid: Tensor, u: Tensor, hb: int):
    """(head_u [M, 2*HB] fp16, head_y [C, HB] fp16, row_scale [M] fp32, a_rank [M, Ka],
    c_rank [C, Kc]): the head labels are the HB compact labels carried by most columns; ranks
    are positions in the head (-1: not a head label)."""
    dev = cnt.device
    U = cnt.shape[0]
    top = most_frequent(cnt, hb)
    rank = torch.full((U + 1,), -1, dtype=torch.int64, device=dev)
    rank[top] = torch.arange(top.numel(), device=dev)
    c_rank = rank[torch.where(col_cid >= 0, col_cid, U)]
    a_rank = rank[torch.where(a_cid >= 0, a_cid, U)]
    M = a_cid.shape[0]
    head_y = one_hot_rows(c_rank, hb)
    uh = torch.zeros(M, hb + 1, dtype=torch.float32, device=dev)
    uh.scatter_add_(1, torch.where(a_rank >= 0, a_rank, hb), torch.where(a_rank >= 0, u, 0.0))
    uh = uh[:, :hb]
    # Per-row scaling keeps the fp16 parts normal; hi + lo hold 22 significant bits.
    top_u = uh.max(dim=1).values
    row_scale = torch.where(top_u > 0, top_u, 1.0)
    unit = uh / row_scale[:, None]
    hi = unit.to(torch.float16)
    lo = (unit - hi.to(torch.float32)).to(torch.float16)
    return torch.cat([hi, lo], dim=1).contiguous(), head_y, row_scale, a_rank, c_rank


def _slot_order(a_cid: Tensor, num_labels_compact: int):
    """Anchor slots grouped by compact label, in a fixed order (padding last): (ptr [U+1],
    anchor row of each sorted slot or -1 [M*Ka], slot of each sorted position [M*Ka])."""
    M, ka = a_cid.shape
    U = num_labels_compact
    slot_rows = torch.arange(M, device=a_cid.device).repeat_interleave(ka)
    cid = a_cid.flatten()
    keys = torch.where(cid >= 0, cid * M + slot_rows, U * M + slot_rows)
    sorted_keys, order = torch.sort(keys, stable=True)
    ptr = torch.searchsorted(sorted_keys // M, torch.arange(U + 1, device=a_cid.device))
    return ptr, torch.where(sorted_keys < U * M, sorted_keys % M, -1), order


def valid_first(w_tot: Tensor) -> tuple[Tensor, Tensor]:
    """The sweeps' visiting order: anchors with a positive (W_i > 0) first, in their own order,
    and their count on the device (launch.visiting). Anchors without a positive contribute
    nothing to any output, so their sweeps are skipped: e.g. the prototypes of labels absent from
    the batch, most anchors of a large label space."""
    valid = w_tot > 0
    order = torch.sort((~valid).to(torch.int8), stable=True).indices.to(torch.int32)
    return order, valid.sum().to(torch.int32).reshape(1)


@triton_op("mlcl_fast::triton_closed_forward", mutates_args=())
def closed_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_count: Tensor, c_index: Tensor,
                   c_count: Tensor, num_samples: int, col_lo: int, num_labels: int, inv_tau: float,
                   log_beta: float, reg: bool, allow_tf32: bool, grad_in_forward: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                              Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [M] (with the head labels' regulariser; tail.tail_forward adds the rest), W [M],
    lse2 [M] (base 2), V^T [M, d] fp32 (the tail labels' V), then what the backward and
    tail_forward reuse: u^T [M, Ka] (the tail labels' u_ik), ubar^T [M], col_cid [C, Kc],
    slot_ptr [U+1], slot_rows [M*Ka], slot_order [M*Ka], head_u [M, 2*HB], head_y [C, HB],
    row_scale [M], a_cid [M, Ka], col_ptr [U+1], col_sorted [C*Kc], dq_unit [M or 0, d],
    visit order [M], visit live [1]).

    The loss value takes every label from the closed form. The gradient takes the head labels'
    weights per pair inside the sweeps (g_ij = G_i (W_i p_ij - w^H_ij - r_ij), formed before the
    gradient GEMM, so near convergence, where p_ij ~ w_ij, nothing large cancels) and only the
    tail labels from the closed form."""
    interpret = launch.INTERPRETED
    M = q.shape[0]
    col_ptr, col_s, col_cid, a_cid, cnt = label_index(a_index, c_index, self_col, col_lo, num_labels)
    u, w_tot, _, own = anchor_weights(a_cid, a_count, cnt, self_col, col_lo)
    hb = head_width(c_index, num_labels, q.shape[1])
    head_u, head_y, row_scale, a_rank, c_rank = head_tiles(cnt, col_cid, a_cid, u, hb)
    # The statistics sweep needs no labels at all; the second sweeps carry the head tiles.
    free, g_free = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta,
                                     allow_tf32)
    visit = valid_first(w_tot)
    lse2, _, _ = launch.stats(q, k, free, g_free, wrap_triton, visit)
    labels, g = launch.head_tiles(q, k, self_col, a_count, c_count, head_u, head_y, num_samples, col_lo, inv_tau,
                                  log_beta, reg, allow_tf32)
    e = sparse.csr_rows(col_ptr, col_s, torch.ones(col_s.shape, device=q.device), k, interpret, wrap_triton)
    ka = a_index.shape[1]
    slots = _slot_ptr(M, ka, q.device)
    # Anchor i's own column holds the same embedding as its row: q_i itself, no gather from k.
    q32 = q.to(torch.float32)
    v = sparse.csr_rows(slots, a_cid.flatten(), u.flatten(), e, interpret, wrap_triton)
    v = v - torch.where(own, u.sum(dim=1), 0.0)[:, None] * q32
    weighted = (q32 * v).sum(dim=1) * inv_tau
    loss = w_tot * (lse2 * configs.LN2) - weighted
    u_tail = torch.where(a_rank < 0, u, 0.0)
    ubar_tail = torch.where(own, u_tail.sum(dim=1), 0.0)
    if has_tail(c_index, num_labels, q.shape[1]):
        v_tail = sparse.csr_rows(slots, a_cid.flatten(), u_tail.flatten(), e, interpret, wrap_triton)
        v_tail = v_tail - ubar_tail[:, None] * q32
    else:
        v_tail = torch.zeros_like(v)
    dq_unit = q.new_empty(0, q.shape[1], dtype=torch.float32)
    if reg or grad_in_forward:
        # The second sweep: the head regulariser's value and/or the anchor-row gradient for G = 1.
        dq_unit, reg_sum = launch.rows(q, k, labels, lse2, w_tot, row_scale, u[:, :1], torch.ones_like(lse2), g,
                                       wrap_triton, reg_value=reg, grad=grad_in_forward, visit=visit)
        if reg:
            loss = loss - reg_sum
        if dq_unit is None:
            dq_unit = q.new_empty(0, q.shape[1], dtype=torch.float32)
    loss = torch.where(w_tot > 0, loss, 0.0)
    slot_ptr, slot_rows, slot_order = _slot_order(a_cid, cnt.shape[0])
    return (loss, w_tot, lse2, v_tail, u_tail, ubar_tail, col_cid, slot_ptr, slot_rows, slot_order, head_u, head_y,
            row_scale, a_cid, col_ptr, col_s, dq_unit, *visit)


@triton_op("mlcl_fast::triton_closed_backward", mutates_args=())
def closed_backward(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, lse2: Tensor,
                    w_tot: Tensor, v_tail: Tensor, u_tail: Tensor, ubar_tail: Tensor, col_cid: Tensor,
                    slot_ptr: Tensor, slot_rows: Tensor, slot_order: Tensor, head_u: Tensor, head_y: Tensor,
                    row_scale: Tensor, dq_unit: Tensor, order: Tensor, live: Tensor, g_up: Tensor,
                    num_samples: int, col_lo: int,
                    inv_tau: float, log_beta: float, reg: bool, tail: bool,
                    allow_tf32: bool) -> tuple[Tensor, Tensor]:
    interpret = launch.INTERPRETED
    C = k.shape[0]
    labels, g = launch.head_tiles(q, k, self_col, a_count, c_count, head_u, head_y, num_samples, col_lo, inv_tau,
                                  log_beta, reg, allow_tf32)
    visit = (order, live)
    if dq_unit.shape[0] == q.shape[0]:
        dq = dq_unit * g_up[:, None]  # the anchor-row gradient is linear in G_i
    else:
        dq, _ = launch.rows(q, k, labels, lse2, w_tot, row_scale, u_tail[:, :1], g_up, g, wrap_triton,
                            reg_value=False, grad=True, visit=visit)
    dk = launch.cols(q, k, labels, lse2, w_tot, row_scale, u_tail[:, :1], g_up, g, wrap_triton, visit)
    if tail:
        # The tail labels' -w part: dq_i -= G_i V^T_i / tau; F_u = sum over the anchor slots of
        # compact label u of G_i u_ik q_i, and each column subtracts the F of its labels.
        dq = dq - (g_up * inv_tau)[:, None] * v_tail
        f = sparse.csr_rows(slot_ptr, slot_rows, (g_up[:, None] * u_tail).flatten()[slot_order], q, interpret,
                            wrap_triton)
        kc = col_cid.shape[1]
        label_part = sparse.csr_rows(_slot_ptr(C, kc, q.device), col_cid.flatten(),
                                     torch.ones(C * kc, device=q.device), f, interpret, wrap_triton)
        # Each column is the own column of at most one anchor (ubar = 0 for the others): one
        # non-zero add per row, so the result does not depend on the order of the adds.
        own_term = (g_up * ubar_tail)[:, None] * q.to(torch.float32)
        label_part = label_part.index_add(0, self_col.long().clamp(min=0), -own_term)
        dk = dk - inv_tau * label_part
    return dq.to(q.dtype), dk.to(k.dtype)


_INPUTS = ("q", "k", "self_col", "a_index", "a_count", "c_index", "c_count")
_SCALARS = ("num_samples", "col_lo", "num_labels", "inv_tau", "log_beta", "reg", "allow_tf32", "grad_in_forward")


def _setup_context(ctx, inputs, output):
    q, k, self_col, _, a_count, c_index, c_count = inputs[:len(_INPUTS)]
    s = dict(zip(_SCALARS, inputs[len(_INPUTS):]))
    (_, w_tot, lse2, v_tail, u_tail, ubar_tail, col_cid, slot_ptr, slot_rows, slot_order, head_u, head_y, row_scale,
     _, _, _, dq_unit, order, live) = output
    ctx.scalars = {name: s[name] for name in ("num_samples", "col_lo", "inv_tau", "log_beta", "reg", "allow_tf32")}
    ctx.scalars["tail"] = has_tail(c_index, s["num_labels"], q.shape[1])
    ctx.save_for_backward(q, k, self_col, a_count, c_count, lse2, w_tot, v_tail, u_tail, ubar_tail, col_cid,
                          slot_ptr, slot_rows, slot_order, head_u, head_y, row_scale, dq_unit, order, live)


def _backward(ctx, g_loss, *_unused):
    dq, dk = closed_backward(*ctx.saved_tensors, g_loss.to(torch.float32).contiguous(), **ctx.scalars)
    return (dq, dk) + (None,) * (len(_INPUTS) - 2 + len(_SCALARS))


closed_forward.register_autograd(_backward, setup_context=_setup_context)
