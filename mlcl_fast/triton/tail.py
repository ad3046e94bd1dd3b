"""The closed form's tail list: the regulariser of the pairs that share a label outside the head.

The closed form's sweeps see the head labels' part w^H_ij of the weights only (closed.py); the
regulariser r_ij = max(p_ij - w_ij, 0) of a pair that also shares a tail label needs the rest,
w^T_ij = sum_{k in y_i ∩ y_j, k in tail} u_ik. Those pairs are listed and corrected by
delta_ij = r(w^H + w^T) - r(w^H): the value gains -sum_j delta_ij s_ij, the gradient
-G_i delta_ij / tau on the pair (delta is a constant of the gradient, like r).

One kernel builds the list and computes everything on it (`tail_pairs_kernel`): a program per
anchor label slot (i, t) whose label is in the tail walks the columns carrying that label (the
closed form's CSR label index) and writes them at the slot's offset, an exclusive prefix sum of
the slots' column counts. A pair sharing several tail labels appears once per shared label; only
the entry of its first shared tail label (lowest slot) carries delta, the others are 0, so no
sort or unique is needed. The list has a fixed capacity (static shapes: torch.compile and CUDA
graphs capture it) and its true length is checked on the device: more entries than the capacity
fail the stream with an error naming configs.TAIL_CAPACITY_ENV (torch._assert_async), never a
silently wrong value. The driver sizes the capacity exactly (one host read) while it may read
label values, else from shapes (configs.tail_capacity).

The operators check their arguments (checks.py); `validated=True` (the driver, and the autograd
backward) leaves out the device-side assertions on the values the caller checked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import checks, configs, launch, recording, sparse
from .recording import launch as _launch


@triton.jit
def tail_pairs_kernel(q_ptr, k_ptr, a_index, a_cid, u_tail, c_index, col_ptr, col_s, self_col, lse2, head_u,
                      head_y, row_scale, start, pi_out, pj_out, delta_out, value_out,
                      d, KA, KC, num_samples, cap, scale2, log2_beta, inv_tau,
                      stride_q, stride_k, stride_hu, stride_hy,
                      BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, KA_P2: tl.constexpr, KC_P2: tl.constexpr,
                      HB: tl.constexpr):
    slot = tl.program_id(0)
    i = slot // KA
    t = slot % KA
    u_t = tl.load(u_tail + slot)
    total = tl.zeros([BLOCK_J], dtype=tl.float32)
    if u_t > 0:
        cid = tl.load(a_cid + slot)
        lo = tl.load(col_ptr + cid)
        hi = tl.load(col_ptr + cid + 1)
        base = tl.load(start + slot)
        own = tl.load(self_col + i)
        lse_i = tl.load(lse2 + i)
        rs = tl.load(row_scale + i)
        slots = tl.arange(0, KA_P2)
        smask = slots < KA
        a_lab = tl.load(a_index + i * KA + slots, mask=smask, other=-2)
        u_row = tl.load(u_tail + i * KA + slots, mask=smask, other=0.0)
        tail_slot = u_row > 0
        hcol = tl.arange(0, HB)
        unit = tl.load(head_u + i * stride_hu + hcol).to(tl.float32) + \
            tl.load(head_u + i * stride_hu + HB + hcol).to(tl.float32)
        cslots = tl.arange(0, KC_P2)
        for e0 in range(lo, hi, BLOCK_J):
            e = e0 + tl.arange(0, BLOCK_J)
            emask = e < hi
            j = tl.load(col_s + e, mask=emask, other=0)
            dot = tl.zeros([BLOCK_J], dtype=tl.float32)
            for d0 in range(0, d, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                dmask = dd < d
                qi = tl.load(q_ptr + i * stride_q + dd, mask=dmask, other=0.0).to(tl.float32)
                kj = tl.load(k_ptr + j[:, None] * stride_k + dd[None, :], mask=emask[:, None] & dmask[None, :],
                             other=0.0).to(tl.float32)
                dot += tl.sum(kj * qi[None, :], axis=1)
            # The column's labels against the anchor's tail labels: w^T and the first shared slot.
            c_lab = tl.load(c_index + j[:, None] * KC + cslots[None, :],
                            mask=emask[:, None] & (cslots[None, :] < KC), other=-1)
            hit = tl.max((c_lab[:, None, :] == a_lab[None, :, None]).to(tl.int32), axis=2) > 0
            hit = hit & tail_slot[None, :]
            w_tail = tl.sum(tl.where(hit, u_row[None, :], 0.0), axis=1)
            first = tl.min(tl.where(hit, slots[None, :], KA_P2), axis=1)
            hy = tl.load(head_y + j[:, None] * stride_hy + hcol[None, :], mask=emask[:, None], other=0.0)
            w_head = tl.sum(hy.to(tl.float32) * unit[None, :], axis=1) * rs
            s2 = dot * scale2 + tl.where(j < num_samples, log2_beta, 0.0)
            p = tl.exp2(s2 - lse_i)
            w_full = w_head + w_tail
            r_full = tl.where(w_full > 0, tl.maximum(p - w_full, 0.0), 0.0)
            r_head = tl.where(w_head > 0, tl.maximum(p - w_head, 0.0), 0.0)
            keep = emask & (first == t) & (j != own)
            delta = tl.where(keep, r_full - r_head, 0.0)
            pos = base + (e - lo)
            ok = emask & (pos < cap)
            tl.store(pi_out + pos, tl.zeros([BLOCK_J], dtype=tl.int32) + i, mask=ok)
            tl.store(pj_out + pos, j.to(tl.int32), mask=ok)
            tl.store(delta_out + pos, delta, mask=ok)
            total += delta * dot * inv_tau
    tl.store(value_out + slot, -tl.sum(total, axis=0))


@triton_op("mlcl_fast::triton_closed_tail_forward", mutates_args=())
def tail_forward(q: Tensor, k: Tensor, self_col: Tensor, a_index: Tensor, c_index: Tensor, a_cid: Tensor,
                 col_ptr: Tensor, col_sorted: Tensor, tail_len: Tensor, lse2: Tensor, u_tail: Tensor, head_u: Tensor,
                 head_y: Tensor, row_scale: Tensor, num_samples: int, log_beta: float, inv_tau: float, capacity: int,
                 validated: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(-sum_j delta_ij s_ij [M], pi [cap], pj [cap] (-1 past the list), delta [cap],
    row_ptr [M+1]): the tail pairs of every anchor, in the order of its label slots."""
    args = checks.common(q, k, self_col, num_samples, 0, inv_tau, log_beta, validated)
    M, C = args.M, args.C
    ka = args.label_lists("a_index", a_index, M)
    kc = args.label_lists("c_index", c_index, C)
    args.tensor("a_cid", a_cid, (M, ka), (torch.int64,))
    U = args.offsets("col_ptr", col_ptr, C * kc)
    args.tensor("col_sorted", col_sorted, (C * kc,), (torch.int64,))
    args.tensor("tail_len", tail_len, (M * ka,), (torch.int64,))
    args.tensor("lse2", lse2, (M,), (torch.float32,))
    args.tensor("u_tail", u_tail, (M, ka), (torch.float32,))
    args.tensor("row_scale", row_scale, (M,), (torch.float32,))
    hb = args.head("head_u", head_u, M, 2)
    args.tensor("head_y", head_y, (C, hb), (torch.float16,))
    args.integer("capacity", capacity, 0)
    # The kernel compares label ids only; it addresses col_ptr by compact id, k and c_index by the
    # listed columns, and the list by the prefix sums of tail_len.
    args.label_rows("a_index", a_index, None)
    args.label_rows("c_index", c_index, None)
    args.ids("a_cid", a_cid, -1, U, "compact label ids (-1: none)")
    args.ids("col_sorted", col_sorted, -1, C, "column indices (-1 past the listed ones)")
    if not validated:
        listed = torch.arange(col_sorted.numel(), device=col_sorted.device) < col_ptr[-1]
        args.assert_values("col_sorted", (col_sorted >= 0) | ~listed, f"column indices in [0, {C}) up to col_ptr[-1]")
    args.ids("tail_len", tail_len, 0, C + 1, "column counts")
    cap = max(1, capacity)
    end = torch.cumsum(tail_len, 0)
    start = end - tail_len
    # The list's length (0 without anchor slots: no entry to read it from).
    total = end[-1:] if M * ka else torch.zeros(1, dtype=end.dtype, device=end.device)
    if not recording.active():  # recorded launches leave the lengths uninitialised
        torch._assert_async(total[0] <= cap, f"closed-form tail list: more pairs than its capacity of {cap}; "
                                             f"set {configs.TAIL_CAPACITY_ENV} higher (entries per anchor and column)")
    pi = torch.zeros(cap, dtype=torch.int32, device=q.device)
    pj = torch.full((cap,), -1, dtype=torch.int32, device=q.device)
    delta = torch.zeros(cap, dtype=torch.float32, device=q.device)
    value = torch.empty(M * ka, dtype=torch.float32, device=q.device)
    interpret = launch.INTERPRETED
    bd = 16 if interpret else max(16, min(configs.pow2(q.shape[1]), 128))
    if M * ka:
        _launch(tail_pairs_kernel, (M * ka,),
                (q, k, a_index, a_cid, u_tail, c_index, col_ptr, col_sorted, self_col, lse2, head_u, head_y,
                 row_scale, start, pi, pj, delta, value, q.shape[1], ka, kc, num_samples, cap,
                 inv_tau * configs.LOG2E, log_beta * configs.LOG2E, inv_tau,
                 q.stride(0), k.stride(0), head_u.stride(0), head_y.stride(0)),
                dict(BLOCK_J=16 if interpret else 32, BLOCK_D=bd, KA_P2=configs.pow2(ka), KC_P2=configs.pow2(kc),
                     HB=hb, num_warps=4), wrap_triton)
    row_ptr = torch.cat([start.view(M, ka)[:, 0], total]).clamp(max=cap)
    return value.view(M, ka).sum(dim=1), pi, pj, delta, row_ptr


@triton_op("mlcl_fast::triton_closed_tail_backward", mutates_args=())
def tail_backward(q: Tensor, k: Tensor, pi: Tensor, pj: Tensor, delta: Tensor, row_ptr: Tensor, g_up: Tensor,
                  inv_tau: float, validated: bool = False) -> tuple[Tensor, Tensor]:
    """d(-delta_ij s_ij)/ds_ij = -delta_ij: per anchor from the list's order, per column after one
    stable sort of the list by column (entries past the list sort last)."""
    args = checks.Arguments(q, k, validated)
    M, C = args.M, args.C
    cap = pi.numel()
    args.tensor("pi", pi, (cap,), (torch.int32,))
    args.tensor("pj", pj, (cap,), (torch.int32,))
    args.tensor("delta", delta, (cap,), (torch.float32,))
    args.offsets("row_ptr", row_ptr, cap, segments=M)
    args.tensor("g_up", g_up, (M,), (torch.float32,))
    args.number("inv_tau", inv_tau, positive=True)
    # Entries past the list hold pi = 0 (no anchor to read when there are none), pj = -1.
    args.ids("pi", pi, 0, max(M, 1), "anchor indices")
    args.ids("pj", pj, -1, C, "column indices (-1 past the list)")
    if M == 0:
        return torch.zeros_like(q), torch.zeros_like(k)
    interpret = launch.INTERPRETED
    corr = -delta * g_up[pi.long()] * inv_tau
    dq = sparse.csr_rows(row_ptr, pj, corr, k, interpret, wrap_triton)
    by_col, order = torch.sort(torch.where(pj >= 0, pj, C), stable=True)
    col_ptr = torch.searchsorted(by_col, torch.arange(C + 1, dtype=by_col.dtype, device=q.device))
    dk = sparse.csr_rows(col_ptr, pi[order], corr[order], q, interpret, wrap_triton)
    return dq.to(q.dtype), dk.to(k.dtype)


def _tail_setup(ctx, inputs, output):
    q, k = inputs[:2]
    _, pi, pj, delta, row_ptr = output
    ctx.inv_tau = inputs[16]
    ctx.save_for_backward(q, k, pi, pj, delta, row_ptr)
    ctx.set_materialize_grads(False)  # only the value is differentiated


_TAIL_INPUTS = 19  # tail_forward's arguments, validated included


def _tail_backward(ctx, g_value, *_unused):
    if g_value is None:
        return (None,) * _TAIL_INPUTS
    # The list is the forward's output: no value assertions again.
    dq, dk = tail_backward(*ctx.saved_tensors, g_value.to(torch.float32).contiguous(), ctx.inv_tau, validated=True)
    return (dq, dk) + (None,) * (_TAIL_INPUTS - 2)


tail_forward.register_autograd(_tail_backward, setup_context=_tail_setup)
