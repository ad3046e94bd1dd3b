"""The closed form's tail pairs: the regulariser of the pairs that share a label outside the head.

The closed form's sweeps see the head labels' part w^H_ij of the weights only (closed.py); the
regulariser r_ij = max(p_ij - w_ij, 0) of a pair that also shares a tail label needs the rest,
w^T_ij = sum_{k in y_i ∩ y_j, k in tail} u_ik. Those pairs are corrected by
delta_ij = r(w^H + w^T) - r(w^H): the value gains -sum_j delta_ij s_ij, the gradient
-G_i delta_ij / tau on the pair (delta is a constant of the gradient, like r).

No list of those pairs is built: each kernel finds them through the closed form's label indexes
(O(nnz) integers, built by prep.py) and recomputes the pair's logit, p, w^H and w^T on the spot,
so memory and every shape are independent of how many pairs share a tail label (nothing to size,
no capacity to overflow, no host read). Both kernels add into outputs of the closed form's
operators (closed.py), in place, one launch each:

- `tail_anchor_kernel`, a program per anchor (and, for the gradient, per feature chunk): for each
  of the anchor's tail label slots, the columns carrying that label (the CSR label -> columns);
  it adds the value's -sum_j delta_ij s_ij and/or dq_i's -G_i/tau sum_j delta_ij k_j (G_i = 1 in
  the forward's anchor-row gradient, which the backward scales);
- `tail_column_kernel`, a program per column and feature chunk: for each of the column's labels
  outside the head, the anchor slots of that label (the CSR label -> anchor slots); it adds
  dk_j's -1/tau sum_i G_i delta_ij q_i.

A pair sharing several tail labels is met once per shared label; only the meeting through its
first shared tail label (the anchor's lowest such slot) counts, so no sort or unique is needed.
Every output block has one owner summing in a fixed order: deterministic, no atomics.

The pairs' work runs on CUDA cores (a d-long dot per pair and direction, gathered rows), so its
cost is O(T_tail d), T_tail the anchor-column pairs met through tail labels; the head (the HB
most frequent labels, inside the tensor-core sweeps) keeps T_tail small on heavy-head label sets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import checks, configs, launch
from .recording import launch as _launch


@triton.jit
def _delta(dot, lse2_i, j, w_head, w_tail, keep, num_samples, scale2, log2_beta):
    """r(w^H + w^T) - r(w^H) of the kept pairs (0 elsewhere), r(w) = max(p - w, 0) where w > 0."""
    s2 = dot * scale2 + tl.where(j < num_samples, log2_beta, 0.0)
    p = tl.exp2(s2 - lse2_i)
    w_full = w_head + w_tail
    r_full = tl.where(w_full > 0, tl.maximum(p - w_full, 0.0), 0.0)
    r_head = tl.where(w_head > 0, tl.maximum(p - w_head, 0.0), 0.0)
    return tl.where(keep, r_full - r_head, 0.0)


@triton.jit
def tail_anchor_kernel(q_ptr, k_ptr, a_index, a_cid, u_tail, c_index, col_ptr, col_s, self_col, lse2, head_u,
                       head_y, row_scale, g_up, value_out, dq_out, d, KA, KC, num_samples, scale2, log2_beta,
                       inv_tau, stride_q, stride_k, stride_hu, stride_hy, stride_o,
                       BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, KC_P2: tl.constexpr, HB: tl.constexpr,
                       VALUE: tl.constexpr, GRAD: tl.constexpr, SCALE_G: tl.constexpr, WHOLE: tl.constexpr):
    """Anchor i's tail pairs, added in place: value_out[i] -= sum_j delta_ij s_ij (VALUE; by the
    programs of chunk 0) and dq_out[i, chunk] -= G_i / tau sum_j delta_ij k_j[chunk] (GRAD; G_i = 1
    unless SCALE_G). WHOLE (BLOCK_D >= d, one program per anchor): each gathered column row is
    loaded once, for its logit and its gradient term; otherwise each chunk's program recomputes
    the pair's d-long logit and loads its chunk again."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32)
    inv_tau = tl.cast(inv_tau, tl.float32)
    i = tl.program_id(0)
    oo = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    omask = oo < d
    if WHOLE:
        q_row = tl.load(q_ptr + i * stride_q + oo, mask=omask, other=0.0).to(tl.float32)
    own = tl.load(self_col + i)
    lse_i = tl.load(lse2 + i)
    rs = tl.load(row_scale + i)
    hcol = tl.arange(0, HB)
    unit = tl.load(head_u + i * stride_hu + hcol).to(tl.float32) + \
        tl.load(head_u + i * stride_hu + HB + hcol).to(tl.float32)
    cslots = tl.arange(0, KC_P2)
    total = tl.zeros([BLOCK_J], dtype=tl.float32)
    acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
    for t in range(KA):
        u_t = tl.load(u_tail + i * KA + t)
        if u_t > 0:
            cid = tl.load(a_cid + i * KA + t)
            lo = tl.load(col_ptr + cid)
            hi = tl.load(col_ptr + cid + 1)
            for e0 in range(lo, hi, BLOCK_J):
                e = e0 + tl.arange(0, BLOCK_J)
                emask = e < hi
                j = tl.load(col_s + e, mask=emask, other=0)
                if WHOLE:
                    k_rows = tl.load(k_ptr + j[:, None] * stride_k + oo[None, :],
                                     mask=emask[:, None] & omask[None, :], other=0.0).to(tl.float32)
                    dot = tl.sum(k_rows * q_row[None, :], axis=1)
                else:
                    dot = tl.zeros([BLOCK_J], dtype=tl.float32)
                    for d0 in range(0, d, BLOCK_D):
                        dd = d0 + tl.arange(0, BLOCK_D)
                        dmask = dd < d
                        qi = tl.load(q_ptr + i * stride_q + dd, mask=dmask, other=0.0).to(tl.float32)
                        kj = tl.load(k_ptr + j[:, None] * stride_k + dd[None, :],
                                     mask=emask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                        dot += tl.sum(kj * qi[None, :], axis=1)
                # The column's labels against the anchor's tail labels: w^T and the first shared slot.
                c_lab = tl.load(c_index + j[:, None] * KC + cslots[None, :],
                                mask=emask[:, None] & (cslots[None, :] < KC), other=-1)
                w_tail = tl.zeros([BLOCK_J], dtype=tl.float32)
                first = tl.zeros([BLOCK_J], dtype=tl.int32) + KA
                for t2 in range(KA):
                    u2 = tl.load(u_tail + i * KA + t2)
                    # A slot outside the tail (u = 0) matches no column label (ids >= -1).
                    lab2 = tl.where(u2 > 0, tl.load(a_index + i * KA + t2), -2)
                    hit = tl.max((c_lab == lab2).to(tl.int32), axis=1) > 0
                    w_tail += tl.where(hit, u2, 0.0)
                    first = tl.minimum(first, tl.where(hit, t2, KA))
                hy = tl.load(head_y + j[:, None] * stride_hy + hcol[None, :], mask=emask[:, None], other=0.0)
                w_head = tl.sum(hy.to(tl.float32) * unit[None, :], axis=1) * rs
                keep = emask & (first == t) & (j != own)
                delta = _delta(dot, lse_i, j, w_head, w_tail, keep, num_samples, scale2, log2_beta)
                if GRAD:
                    if WHOLE:
                        acc += delta[:, None] * k_rows
                    else:
                        ko = tl.load(k_ptr + j[:, None] * stride_k + oo[None, :],
                                     mask=emask[:, None] & omask[None, :], other=0.0).to(tl.float32)
                        acc += delta[:, None] * ko
                if VALUE:
                    total += delta * dot * inv_tau
    if GRAD:
        if SCALE_G:
            coef = -inv_tau * tl.load(g_up + i)
        else:
            coef = -inv_tau
        cur = tl.load(dq_out + i * stride_o + oo, mask=omask, other=0.0)
        tl.store(dq_out + i * stride_o + oo, cur + coef * tl.sum(acc, axis=0), mask=omask)
    if VALUE:
        if tl.program_id(1) == 0:
            tl.store(value_out + i, tl.load(value_out + i) - tl.sum(total, axis=0))


@triton.jit
def tail_column_kernel(q_ptr, k_ptr, a_index, u_tail, c_index, col_cid, slot_ptr, slot_s, top, self_col, lse2,
                       head_u, head_y, row_scale, g_up, out, d, KA, KC, n_top, num_samples, scale2, log2_beta,
                       inv_tau, stride_q, stride_k, stride_hu, stride_hy, stride_o,
                       BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, KA_P2: tl.constexpr, HB: tl.constexpr,
                       WHOLE: tl.constexpr):
    """Column j's tail pairs, added in place: out[j, chunk] -= 1/tau sum_i G_i delta_ij q_i[chunk],
    over the anchor slots of j's labels outside the head (flat anchor * KA + slot in slot_s).
    WHOLE (BLOCK_D >= d): each gathered anchor row is loaded once, as in tail_anchor_kernel."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    scale2, log2_beta = tl.cast(scale2, tl.float32), tl.cast(log2_beta, tl.float32)
    inv_tau = tl.cast(inv_tau, tl.float32)
    j = tl.program_id(0)
    oo = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    omask = oo < d
    if WHOLE:
        k_row = tl.load(k_ptr + j * stride_k + oo, mask=omask, other=0.0).to(tl.float32)
    hcol = tl.arange(0, HB)
    hy = tl.load(head_y + j * stride_hy + hcol).to(tl.float32)
    head_ids = tl.load(top + hcol, mask=hcol < n_top, other=-2)
    aslots = tl.arange(0, KA_P2)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for s in range(KC):
        cid = tl.load(col_cid + j * KC + s)
        in_head = tl.max((head_ids == cid).to(tl.int32), axis=0)
        if (cid >= 0) & (in_head == 0):
            lo = tl.load(slot_ptr + cid)
            hi = tl.load(slot_ptr + cid + 1)
            for e0 in range(lo, hi, BLOCK_P):
                e = e0 + tl.arange(0, BLOCK_P)
                emask = e < hi
                slot = tl.load(slot_s + e, mask=emask, other=0)
                i = slot // KA
                t = slot % KA
                m2 = emask[:, None] & (aslots[None, :] < KA)
                a_lab = tl.load(a_index + i[:, None] * KA + aslots[None, :], mask=m2, other=-2)
                u_row = tl.load(u_tail + i[:, None] * KA + aslots[None, :], mask=m2, other=0.0)
                hit = a_lab != a_lab  # all false
                for s2 in range(KC):
                    hit = hit | (a_lab == tl.load(c_index + j * KC + s2))
                hit = hit & (u_row > 0)
                w_tail = tl.sum(tl.where(hit, u_row, 0.0), axis=1)
                first = tl.min(tl.where(hit, aslots[None, :], KA_P2), axis=1)
                unit = tl.load(head_u + i[:, None] * stride_hu + hcol[None, :], mask=emask[:, None],
                               other=0.0).to(tl.float32) + \
                    tl.load(head_u + i[:, None] * stride_hu + HB + hcol[None, :], mask=emask[:, None],
                            other=0.0).to(tl.float32)
                rs = tl.load(row_scale + i, mask=emask, other=0.0)
                w_head = tl.sum(unit * hy[None, :], axis=1) * rs
                if WHOLE:
                    q_rows = tl.load(q_ptr + i[:, None] * stride_q + oo[None, :],
                                     mask=emask[:, None] & omask[None, :], other=0.0).to(tl.float32)
                    dot = tl.sum(q_rows * k_row[None, :], axis=1)
                else:
                    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
                    for d0 in range(0, d, BLOCK_D):
                        dd = d0 + tl.arange(0, BLOCK_D)
                        dmask = dd < d
                        kj = tl.load(k_ptr + j * stride_k + dd, mask=dmask, other=0.0).to(tl.float32)
                        qi = tl.load(q_ptr + i[:, None] * stride_q + dd[None, :],
                                     mask=emask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                        dot += tl.sum(qi * kj[None, :], axis=1)
                own = tl.load(self_col + i, mask=emask, other=-1)
                lse_i = tl.load(lse2 + i, mask=emask, other=0.0)
                keep = emask & (first == t) & (own != j)
                delta = _delta(dot, lse_i, j, w_head, w_tail, keep, num_samples, scale2, log2_beta)
                g = tl.load(g_up + i, mask=emask, other=0.0)
                if WHOLE:
                    acc += (delta * g)[:, None] * q_rows
                else:
                    qo = tl.load(q_ptr + i[:, None] * stride_q + oo[None, :],
                                 mask=emask[:, None] & omask[None, :], other=0.0).to(tl.float32)
                    acc += (delta * g)[:, None] * qo
    cur = tl.load(out + j * stride_o + oo, mask=omask, other=0.0)
    tl.store(out + j * stride_o + oo, cur - inv_tau * tl.sum(acc, axis=0), mask=omask)


class Labels(NamedTuple):
    """The label indexes the tail kernels walk (the closed form's preparation, prep.py)."""
    self_col: Tensor     # [M] the anchors' own columns (-1: none)
    a_index: Tensor      # [M, Ka] canonical label rows of the anchors
    c_index: Tensor      # [C, Kc] canonical label rows of the columns
    a_cid: Tensor        # [M, Ka] compact label id of each anchor slot (-1: none)
    col_ptr: Tensor      # [U+1] CSR: compact label -> ...
    col_sorted: Tensor   # [C*Kc] ... softmax columns carrying it, ascending
    u_tail: Tensor       # [M, Ka] fp32 u_ik of the tail labels (0 elsewhere)
    head_u: Tensor       # [M, 2*HB] fp16 the head labels' u / row_scale, hi and lo
    head_y: Tensor       # [C, HB] fp16 the columns' head labels
    row_scale: Tensor    # [M] fp32
    col_cid: Tensor      # [C, Kc] compact label id of each column slot (-1: none)
    slot_ptr: Tensor     # [U+1] CSR: compact label -> ...
    slot_sorted: Tensor  # [M*Ka] ... anchor slots (anchor * Ka + slot), each label's ascending
    top: Tensor          # [min(HB, U)] the head's compact ids


def check(args: checks.Arguments, a_index: Tensor, c_index: Tensor, a_cid: Tensor, col_ptr: Tensor,
          col_sorted: Tensor, top: Tensor, U: int, hb: int, ka: int, kc: int) -> None:
    """The checks of the label indexes only the tail kernels read (an operator checks the rest):
    a_index [M, Ka] and c_index [C, Kc] (the label slots of the operator's other label tensors) as
    the kernels compare them, a_cid, the CSR label -> columns (col_ptr over col_sorted, U
    segments) and the head's compact ids `top`."""
    M, C = args.M, args.C
    args.tensor("a_index", a_index, (M, ka), checks.INDEX_DTYPES)
    args.tensor("c_index", c_index, (C, kc), checks.INDEX_DTYPES)
    args.tensor("a_cid", a_cid, (M, ka), (torch.int64,))
    args.offsets("col_ptr", col_ptr, C * kc, segments=U)
    args.tensor("col_sorted", col_sorted, (C * kc,), (torch.int64,))
    args.tensor("top", top, (min(hb, U),), (torch.int64,))
    # The kernels compare label ids only; they address col_ptr by compact id, k and c_index by
    # the listed columns.
    args.label_rows("a_index", a_index, None)
    args.label_rows("c_index", c_index, None)
    args.ids("a_cid", a_cid, -1, U, "compact label ids (-1: none)")
    args.ids("top", top, 0, U, "compact label ids")
    args.ids("col_sorted", col_sorted, -1, C, "column indices (-1 past the listed ones)")
    if not args.validated:
        listed = torch.arange(col_sorted.numel(), device=col_sorted.device) < col_ptr[-1]
        args.assert_values("col_sorted", (col_sorted >= 0) | ~listed, f"column indices in [0, {C}) up to col_ptr[-1]")


# The widest feature block of a tail program: up to 256 features (T1's d) one program per anchor
# or column holds the whole row, so each gathered row is read once for its logit and its gradient
# term (at d = 256 the chunked kernels read it three times: the logit in each of two chunk
# programs, then the chunk). Half of T1's step at L = 16384 was these kernels (H200 profile,
# bench/RESULTS.md).
TAIL_MAX_CHUNK = 256


def _warps(block_d: int, owner: str) -> int:
    """8 warps for 256-wide rows; at 128 also for the anchor kernel, which at 4 warps takes 234
    registers (two programs per multiprocessor for a kernel that waits on gathers), while the
    column kernel at 8 warps spills in fp32 (static report)."""
    return 8 if block_d > 128 or (block_d == 128 and owner == "anchors") else 4


def _scalars(q: Tensor, k: Tensor, t: Labels, num_samples: int, log_beta: float, inv_tau: float) -> tuple:
    return (num_samples, inv_tau * configs.LOG2E, log_beta * configs.LOG2E, inv_tau, q.stride(0), k.stride(0),
            t.head_u.stride(0), t.head_y.stride(0))


def add_anchor_terms(q: Tensor, k: Tensor, t: Labels, lse2: Tensor, num_samples: int, log_beta: float,
                     inv_tau: float, wrap, value: Tensor | None = None, dq: Tensor | None = None,
                     g_up: Tensor | None = None) -> None:
    """tail_anchor_kernel, one launch: value [M] -= sum_j delta_ij s_ij and/or dq [M, d] fp32 -=
    G_i / tau sum_j delta_ij k_j (G_i = 1 without g_up), in place."""
    M, ka = t.a_index.shape
    d = q.shape[1]
    if M == 0 or ka == 0 or d == 0 or (value is None and dq is None):
        return
    bd = configs.block_width(d, TAIL_MAX_CHUNK, launch.INTERPRETED)
    grad = dq is not None
    _launch(tail_anchor_kernel, (M, triton.cdiv(d, bd) if grad else 1),
            (q, k, t.a_index, t.a_cid, t.u_tail, t.c_index, t.col_ptr, t.col_sorted, t.self_col, lse2, t.head_u,
             t.head_y, t.row_scale, lse2 if g_up is None else g_up, lse2 if value is None else value,
             dq if grad else lse2, d, ka, t.c_index.shape[1], *_scalars(q, k, t, num_samples, log_beta, inv_tau),
             dq.stride(0) if grad else 0),
            dict(BLOCK_J=16 if launch.INTERPRETED else 32, BLOCK_D=bd, KC_P2=configs.pow2(t.c_index.shape[1]),
                 HB=t.head_y.shape[1], VALUE=value is not None, GRAD=grad, SCALE_G=g_up is not None, WHOLE=bd >= d,
                 num_warps=_warps(bd, "anchors")),
            wrap)


def add_column_terms(q: Tensor, k: Tensor, t: Labels, lse2: Tensor, g_up: Tensor, num_samples: int,
                     log_beta: float, inv_tau: float, dk: Tensor, wrap) -> None:
    """tail_column_kernel, one launch: dk [C, d] fp32 -= 1/tau sum_i G_i delta_ij q_i, in place."""
    M, ka = t.a_index.shape
    C, kc = t.c_index.shape
    d = q.shape[1]
    if M == 0 or ka == 0 or C == 0 or d == 0:
        return
    bd = configs.block_width(d, TAIL_MAX_CHUNK, launch.INTERPRETED)
    _launch(tail_column_kernel, (C, triton.cdiv(d, bd)),
            (q, k, t.a_index, t.u_tail, t.c_index, t.col_cid, t.slot_ptr, t.slot_sorted, t.top, t.self_col, lse2,
             t.head_u, t.head_y, t.row_scale, g_up, dk, d, ka, kc, t.top.numel(),
             *_scalars(q, k, t, num_samples, log_beta, inv_tau), dk.stride(0)),
            # 16 anchor slots per step: 32 spill registers at d = 256 (the static report).
            dict(BLOCK_P=16, BLOCK_D=bd, KA_P2=configs.pow2(ka), HB=t.head_y.shape[1], WHOLE=bd >= d,
                 num_warps=_warps(bd, "columns")), wrap)
