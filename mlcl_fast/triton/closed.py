"""The closed-form regime: label-centric weights with pair factor 1 and no regulariser
(presets mulsupcon, proto, reg_noreg), with no label work in any dense sweep.

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

The dense kernels run label-free (configs.MODE_NONE): lse in the forward, G_i W_i p_ij in the
backward. The label-sum structures have static shapes (nothing depends on label values but
their contents), are built on the device without a host synchronisation, and every sum is a
CSR segment sum in a fixed order (deterministic). Per-label sums live in a compact label space
of at most min(L, C * K_c) rows: the labels the softmax columns carry.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import launch, sparse


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


@triton_op("mlcl_fast::triton_closed_forward", mutates_args=())
def closed_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, a_count: Tensor, c_index: Tensor,
                   c_count: Tensor, num_samples: int, col_lo: int, num_labels: int, inv_tau: float,
                   log_beta: float, allow_tf32: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [M], W [M], lse [M], V [M, d] fp32, then what the backward reuses: u [M, Ka],
    ubar [M], col_cid [C, Kc], slot_ptr [U+1], slot_rows [M*Ka], slot_order [M*Ka])."""
    interpret = launch.INTERPRETED
    M = q.shape[0]
    labels, g = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta,
                                  allow_tf32)
    lse, _, _ = launch.stats(q, k, labels, g, wrap_triton)
    col_ptr, col_s, col_cid, a_cid, cnt = label_index(a_index, c_index, self_col, col_lo, num_labels)
    u, w_tot, ubar, own = anchor_weights(a_cid, a_count, cnt, self_col, col_lo)
    e = sparse.csr_rows(col_ptr, col_s, torch.ones(col_s.shape, device=q.device), k, interpret, wrap_triton)
    ka = a_index.shape[1]
    v = sparse.csr_rows(_slot_ptr(M, ka, q.device), a_cid.flatten(), u.flatten(), e, interpret, wrap_triton)
    ubar = torch.where(own, ubar, 0.0)
    v = v - ubar[:, None] * k[self_col.long().clamp(min=0)].to(torch.float32)
    weighted = (q.to(torch.float32) * v).sum(dim=1) * inv_tau
    loss = torch.where(w_tot > 0, w_tot * lse - weighted, 0.0)
    slot_ptr, slot_rows, slot_order = _slot_order(a_cid, cnt.shape[0])
    return loss, w_tot, lse, v, u, ubar, col_cid, slot_ptr, slot_rows, slot_order


@triton_op("mlcl_fast::triton_closed_backward", mutates_args=())
def closed_backward(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, lse: Tensor,
                    w_tot: Tensor, v: Tensor, u: Tensor, ubar: Tensor, col_cid: Tensor, slot_ptr: Tensor,
                    slot_rows: Tensor, slot_order: Tensor, g_up: Tensor, num_samples: int, col_lo: int,
                    inv_tau: float, log_beta: float, allow_tf32: bool) -> tuple[Tensor, Tensor]:
    interpret = launch.INTERPRETED
    M, C = q.shape[0], k.shape[0]
    labels, g = launch.label_free(q, k, self_col, a_count, c_count, num_samples, col_lo, inv_tau, log_beta,
                                  allow_tf32)
    no_z = torch.zeros(M, 1, dtype=torch.float32, device=q.device)
    dq, _ = launch.rows(q, k, labels, lse, w_tot, w_tot, no_z, g_up, g, wrap_triton, reg_value=False, grad=True)
    dk = launch.cols(q, k, labels, lse, w_tot, w_tot, no_z, g_up, g, wrap_triton)
    dq = dq - (g_up * inv_tau)[:, None] * v
    # F_u = sum over the anchor slots of compact label u of G_i u_ik q_i; then each column sums
    # the F of its labels.
    f = sparse.csr_rows(slot_ptr, slot_rows, (g_up[:, None] * u).flatten()[slot_order], q, interpret, wrap_triton)
    kc = col_cid.shape[1]
    label_part = sparse.csr_rows(_slot_ptr(C, kc, q.device), col_cid.flatten(), torch.ones(C * kc, device=q.device),
                                 f, interpret, wrap_triton)
    # Each column is the own column of at most one anchor (ubar = 0 for the others): one
    # non-zero add per row, so the result does not depend on the order of the adds.
    own_term = (g_up * ubar)[:, None] * q.to(torch.float32)
    label_part = label_part.index_add(0, self_col.long().clamp(min=0), -own_term)
    dk = dk - inv_tau * label_part
    return dq.to(q.dtype), dk.to(k.dtype)


_INPUTS = ("q", "k", "self_col", "a_index", "a_count", "c_index", "c_count")
_SCALARS = ("num_samples", "col_lo", "num_labels", "inv_tau", "log_beta", "allow_tf32")


def _setup_context(ctx, inputs, output):
    q, k, self_col, _, a_count, _, c_count = inputs[:len(_INPUTS)]
    s = dict(zip(_SCALARS, inputs[len(_INPUTS):]))
    _, w_tot, lse, v, u, ubar, col_cid, slot_ptr, slot_rows, slot_order = output
    ctx.scalars = {name: s[name] for name in ("num_samples", "col_lo", "inv_tau", "log_beta", "allow_tf32")}
    ctx.save_for_backward(q, k, self_col, a_count, c_count, lse, w_tot, v, u, ubar, col_cid, slot_ptr, slot_rows,
                          slot_order)


def _backward(ctx, g_loss, *_unused):
    dq, dk = closed_backward(*ctx.saved_tensors, g_loss.to(torch.float32).contiguous(), **ctx.scalars)
    return (dq, dk) + (None,) * (len(_INPUTS) - 2 + len(_SCALARS))


closed_forward.register_autograd(_backward, setup_context=_setup_context)
