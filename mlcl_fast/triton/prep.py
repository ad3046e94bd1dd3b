"""The closed form's label preparation in a few kernels (static shapes, no host synchronisation),
and its label sums E_k in the last of them.

What closed.py needs from the labels, per call: the compact label index (labels the softmax
columns carry, each with its columns in ascending order: a CSR), every anchor slot's compact id
and weight u_ik = 1 / (a_i Z_ik), W_i, the head labels (the HB compact labels carried by most
columns, ties to the smaller label) as dense fp16 tiles, the tail labels' weights, the anchors'
visiting order and the anchor slots grouped by label for the backward. Written as torch
operations this is ~150 small launches per call; here it is three kernels and seven library
calls (three sorts, a cumulative sum, a top-k and two searchsorted), each O(nnz) or O(U) work.

Integer atomics (the live count) are exact, so every output is deterministic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import label_index
from . import configs
from .labels import most_frequent
from .recording import launch
from .sparse import csr_blocks, csr_row_chunk


@triton.jit
def label_keys_kernel(c_index, keys, label_start, col_owner, live, n, KC, L, C, col_lo, BLOCK: tl.constexpr):
    """Sort keys of the column label slots: the label, or L for padding and columns outside the
    softmax. Slot p is column p // KC's, so a stable sort keeps each label's columns ascending.
    Also the initial values of what later launches fill in: label_start [L + 1] and col_owner [C]
    -1 (none), the live count 0 (instead of three fill operations)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < n
    lab = tl.load(c_index + p, mask=m, other=-1)
    valid = (lab >= 0) & (p // KC >= col_lo)
    tl.store(keys + p, tl.where(valid, lab, L).to(keys.dtype.element_ty), mask=m)
    tl.store(label_start + p, tl.full([BLOCK], -1, tl.int64), mask=p < L + 1)
    tl.store(col_owner + p, tl.full([BLOCK], -1, tl.int32), mask=p < C)
    tl.store(live + p, tl.zeros([BLOCK], tl.int32), mask=p < 1)


@triton.jit
def label_runs_kernel(sorted_keys, order, first, col_sorted, label_start, n, KC, L, U, BLOCK: tl.constexpr):
    """Over the sorted slots: first[p] = 1 where a label's run starts (its cumulative sum is the
    run number, so the compact id of the run at p is run[p] - 1), U + 1 where the padding starts
    (every padding slot's run number then exceeds U: a search for u + 1 <= U + 1 stops at the end
    of the labels' slots, so empty labels past the carried ones get empty segments);
    label_start[label] = p at its run's start (with run[p], the label -> compact id map);
    col_sorted: the slot's column (-1 for padding)."""
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < n
    lab = tl.load(sorted_keys + p, mask=m, other=0).to(tl.int64)
    prev = tl.load(sorted_keys + p - 1, mask=m & (p > 0), other=-1).to(tl.int64)
    valid = lab < L
    starts = lab != prev
    tl.store(first + p, tl.where(valid, starts.to(tl.int32), tl.where(starts, U + 1, 0)), mask=m)
    tl.store(label_start + lab, p.to(tl.int64), mask=m & valid & starts)
    col = tl.load(order + p, mask=m, other=0) // KC
    tl.store(col_sorted + p, tl.where(valid, col, -1), mask=m)


@triton.jit
def compact_ids(lab, label_start, run, mask):
    """The compact ids of labels `lab` (-1: padding, or a label no softmax column carries), from
    label_runs_kernel's run starts and the run numbers."""
    start = tl.load(label_start + lab, mask=mask, other=-1)
    return tl.where(start >= 0, tl.load(run + start, mask=mask & (start >= 0), other=0) - 1, -1)


@triton.jit
def head_prep_kernel(a_index, a_count, self_col, label_start, run, col_ptr, top, a_cid, u_out, u_tail_out, w_out,
                     ubar_out, ubar_tail_out, head_u, row_scale, invalid, live, slot_keys, col_owner, c_index, col_cid,
                     head_y, col_sorted, k_ptr, e_out, M, KA, L, U, col_lo, n_top, stride_hu, anchor_programs,
                     column_programs, d_chunks, C, KC, d, stride_k, stride_e,
                     BLOCK_M: tl.constexpr, KA_P2: tl.constexpr, BLOCK_C: tl.constexpr, KC_P2: tl.constexpr,
                     HB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Everything that needs only the compact label index, in one launch: the first
    `anchor_programs` programs prepare blocks of anchors (_anchor_block), the next
    `column_programs` blocks of columns (_column_block: their slots' compact ids and head rows;
    both sides of the head only need its compact ids `top`), and the rest, U * d_chunks of them, the closed form's label sums
    E_k = sum of the softmax columns carrying k (sparse.csr_row_chunk over col_sorted), one
    label and feature chunk each."""
    pid = tl.program_id(0)
    if pid < anchor_programs:
        _anchor_block(pid, a_index, a_count, self_col, label_start, run, col_ptr, top, a_cid, u_out, u_tail_out, w_out,
                      ubar_out, ubar_tail_out, head_u, row_scale, invalid, live, slot_keys, col_owner,
                      M, KA, L, U, col_lo, n_top, stride_hu, BLOCK_M, KA_P2, HB)
    elif pid < anchor_programs + column_programs:
        _column_block(pid - anchor_programs, c_index, label_start, run, col_cid, top, head_y, C, KC, L, col_lo, n_top,
                      BLOCK_C, KC_P2, HB)
    else:
        r = pid - anchor_programs - column_programs
        csr_row_chunk(r // d_chunks, r % d_chunks, col_ptr, col_sorted, col_sorted, k_ptr, e_out, d, stride_k,
                      stride_e, BLOCK_P, BLOCK_D, True)


@triton.jit
def _anchor_block(pid, a_index, a_count, self_col, label_start, run, col_ptr, top, a_cid, u_out, u_tail_out, w_out,
                  ubar_out,
                  ubar_tail_out, head_u, row_scale, invalid, live, slot_keys, col_owner,
                  M, KA, L, U, col_lo, n_top, stride_hu,
                  BLOCK_M: tl.constexpr, KA_P2: tl.constexpr, HB: tl.constexpr):
    """Per anchor: compact ids of its labels, u_ik = 1 / (a_i Z_ik) (Z_ik: the columns of the
    label, less the own column), W_i, ubar_i (own column in range, else 0), the head part of u
    as a row-scaled fp16 hi/lo pair, the tail part, the visiting flag, the slots' sort keys, and
    the anchor that owns each column (its own column)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    slots = tl.arange(0, KA_P2)
    m2 = rmask[:, None] & (slots[None, :] < KA)
    flat = rows[:, None] * KA + slots[None, :]
    lab = tl.load(a_index + flat, mask=m2, other=-1)
    cid = compact_ids(tl.where(lab >= 0, lab, L), label_start, run, m2)
    has = cid >= 0
    cnt = tl.load(col_ptr + cid + 1, mask=m2 & has, other=0) - tl.load(col_ptr + cid, mask=m2 & has, other=0)
    own_col = tl.load(self_col + rows, mask=rmask, other=-1)
    own = own_col >= col_lo
    tl.store(col_owner + own_col, rows, mask=rmask & (own_col >= 0))
    a = tl.load(a_count + rows, mask=rmask, other=1).to(tl.float32)
    inv_a = 1.0 / tl.maximum(a, 1.0)
    z = cnt.to(tl.float32) - own.to(tl.float32)[:, None]
    positive = has & (z > 0)
    u = tl.where(positive, 1.0 / tl.where(positive, z, 1.0), 0.0) * inv_a[:, None]
    w = tl.sum(positive.to(tl.float32), axis=1) * inv_a
    hcol = tl.arange(0, HB)
    head_ids = tl.load(top + hcol, mask=hcol < n_top, other=-2)
    hit = cid[:, :, None] == head_ids[None, None, :]                       # [BLOCK_M, KA_P2, HB]
    uh = tl.sum(tl.where(hit, u[:, :, None], 0.0), axis=1)                  # [BLOCK_M, HB]
    in_head = tl.max(hit.to(tl.int32), axis=2) > 0
    u_tail = tl.where(in_head, 0.0, u)
    ubar = tl.where(own, tl.sum(u, axis=1), 0.0)
    ubar_tail = tl.where(own, tl.sum(u_tail, axis=1), 0.0)
    # Per-row scaling keeps the fp16 parts normal; hi + lo hold 22 significant bits.
    top_u = tl.max(uh, axis=1)
    scale = tl.where(top_u > 0, top_u, 1.0)
    unit = uh / scale[:, None]
    hi = unit.to(tl.float16)
    lo = (unit - hi.to(tl.float32)).to(tl.float16)
    tl.store(a_cid + flat, cid.to(tl.int64), mask=m2)
    tl.store(u_out + flat, u, mask=m2)
    tl.store(u_tail_out + flat, u_tail, mask=m2)
    # Sort keys of the slots: the compact label, U for padding (a stable sort keeps slot order).
    tl.store(slot_keys + flat, tl.where(has, cid, U).to(slot_keys.dtype.element_ty), mask=m2)
    tl.store(w_out + rows, w, mask=rmask)
    tl.store(ubar_out + rows, ubar, mask=rmask)
    tl.store(ubar_tail_out + rows, ubar_tail, mask=rmask)
    tl.store(row_scale + rows, scale, mask=rmask)
    hmask = rmask[:, None] & (hcol[None, :] < HB)
    tl.store(head_u + rows[:, None] * stride_hu + hcol[None, :], hi, mask=hmask)
    tl.store(head_u + rows[:, None] * stride_hu + HB + hcol[None, :], lo, mask=hmask)
    valid = rmask & (w > 0)
    tl.store(invalid + rows, (w <= 0).to(tl.int8), mask=rmask)
    tl.atomic_add(live, tl.sum(valid.to(tl.int32), axis=0))


@triton.jit
def _column_block(pid, c_index, label_start, run, col_cid, top, head_y, C, KC, L, col_lo, n_top,
                  BLOCK_C: tl.constexpr, KC_P2: tl.constexpr, HB: tl.constexpr):
    """Per column: the compact id of each label slot (-1 for padding and outside the softmax),
    and head_y[j, h] = 1 where column j carries the h-th head label (fp16, exact)."""
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    slots = tl.arange(0, KC_P2)
    m2 = cmask[:, None] & (slots[None, :] < KC)
    flat = cols[:, None] * KC + slots[None, :]
    lab = tl.load(c_index + flat, mask=m2, other=-1)
    carried = (lab >= 0) & (cols >= col_lo)[:, None]
    cid = compact_ids(tl.where(carried, lab, L), label_start, run, m2)
    tl.store(col_cid + flat, cid, mask=m2)
    hcol = tl.arange(0, HB)
    head_ids = tl.load(top + hcol, mask=hcol < n_top, other=-2)
    y = tl.max((cid[:, :, None] == head_ids[None, None, :]).to(tl.float32), axis=1)
    tl.store(head_y + cols[:, None] * HB + hcol[None, :], y.to(tl.float16), mask=cmask[:, None])


class Prepared(NamedTuple):
    col_ptr: Tensor      # [U+1] int64: CSR of the compact labels over col_sorted
    col_sorted: Tensor   # [C*Kc] int64: softmax columns by compact label, ascending (-1 past them)
    col_cid: Tensor      # [C, Kc] int64: compact id of each column slot (-1: none)
    a_cid: Tensor        # [M, Ka] int64: compact id of each anchor slot (-1: none)
    u: Tensor            # [M, Ka] fp32: u_ik = 1 / (a_i Z_ik), 0 where Z_ik = 0
    u_tail: Tensor       # [M, Ka] fp32: u_ik of the labels outside the head
    w_tot: Tensor        # [M] fp32: W_i
    ubar: Tensor         # [M] fp32: sum_k u_ik where the own column is a softmax column, else 0
    ubar_tail: Tensor    # [M] fp32: the same over the tail labels
    head_u: Tensor       # [M, 2*HB] fp16: the head labels' u / row_scale, hi and lo parts
    head_y: Tensor       # [C, HB] fp16: the columns' head labels, 0/1
    row_scale: Tensor    # [M] fp32
    order: Tensor        # [M] int32: anchors with a positive first (the sweeps' visiting order)
    live: Tensor         # [1] int32: how many have one
    slot_ptr: Tensor     # [U+1] int64: anchor slots grouped by compact label (backward), over ...
    slot_sorted: Tensor  # [M*Ka] int64: ... the slots (flat anchor * Ka + slot), by label, each label's ascending
    col_owner: Tensor    # [C] int32: the anchor whose own column it is, or -1
    top: Tensor          # [min(HB, U)] int64: the head's compact ids, most frequent first
    e: Tensor            # [U, d] fp32: E_k, the sum of the softmax columns carrying compact label k


def prepare(a_index: Tensor, a_count: Tensor, c_index: Tensor, self_col: Tensor, col_lo: int, num_labels: int,
            hb: int, k: Tensor, interpret: bool, wrap) -> Prepared:
    dev = c_index.device
    C, kc = c_index.shape
    M, ka = a_index.shape
    L = num_labels
    U = max(1, min(L, C * kc))
    n = C * kc
    block = 16 if interpret else 1024
    grid = (triton.cdiv(max(n, 1), block),)
    # The label index's keys and sort (mlcl_fast.label_index, whose slot_keys label_keys_kernel
    # writes fused with three initialisations); the compact ids' sort uses the same key type.
    key_dtype = label_index.key_dtype(L)
    keys = torch.empty(n, dtype=key_dtype, device=dev)
    label_start = torch.empty(L + 1, dtype=torch.int64, device=dev)  # entry L: padding
    col_owner = torch.empty(C, dtype=torch.int32, device=dev)
    live = torch.empty(1, dtype=torch.int32, device=dev)
    launch(label_keys_kernel, (triton.cdiv(max(n, L + 1, C), block),),
           (c_index, keys, label_start, col_owner, live, n, kc, L, C, col_lo), dict(BLOCK=block), wrap)
    sorted_keys, order = label_index.sort_slots(keys)
    first = torch.empty(n, dtype=torch.int32, device=dev)
    col_sorted = torch.empty(n, dtype=torch.int64, device=dev)
    launch(label_runs_kernel, grid, (sorted_keys, order, first, col_sorted, label_start, n, kc, L, U),
           dict(BLOCK=block), wrap)
    run = torch.cumsum(first, 0)
    # Compact label u's slots start where the run numbers reach u + 1 (padding's exceed U + 1).
    col_ptr = torch.searchsorted(run, torch.arange(1, U + 2, device=dev))

    # The head: the compact labels carried by most columns, ties to the smaller label (compact
    # ids follow the labels' order).
    n_top = min(hb, U)
    top = most_frequent(col_ptr[1:] - col_ptr[:-1], hb)

    a_cid = torch.empty(M, ka, dtype=torch.int64, device=dev)
    u = torch.empty(M, ka, dtype=torch.float32, device=dev)
    u_tail = torch.empty_like(u)
    slot_keys = torch.empty(M, ka, dtype=key_dtype, device=dev)
    w_tot, ubar, ubar_tail, row_scale = (torch.empty(M, dtype=torch.float32, device=dev) for _ in range(4))
    head_u = torch.empty(M, 2 * hb, dtype=torch.float16, device=dev)
    invalid = torch.empty(M, dtype=torch.int8, device=dev)
    head_y = torch.empty(C, hb, dtype=torch.float16, device=dev)
    col_cid = torch.empty(C, kc, dtype=torch.int64, device=dev)
    ka_p2, kc_p2 = configs.pow2(ka), configs.pow2(kc)
    # The [rows, slots, head] comparison cubes stay within 8K elements per program.
    bm = 16 if interpret else max(1, min(64, 8192 // (ka_p2 * hb)))
    bc = 16 if interpret else max(1, min(64, 8192 // (kc_p2 * hb)))
    d = k.shape[1]
    e = torch.empty(U, d, dtype=torch.float32, device=dev)
    bp, bd = csr_blocks(d, interpret)
    d_chunks = triton.cdiv(d, bd)
    anchor_programs, column_programs = triton.cdiv(M, bm), triton.cdiv(C, bc)
    programs = anchor_programs + column_programs + U * d_chunks
    if programs:
        launch(head_prep_kernel, (programs,),
               (a_index, a_count, self_col, label_start, run, col_ptr, top, a_cid, u, u_tail, w_tot, ubar, ubar_tail,
                head_u, row_scale, invalid, live, slot_keys, col_owner, c_index, col_cid, head_y, col_sorted, k, e, M,
                ka, L, U, col_lo, n_top, head_u.stride(0), anchor_programs, column_programs, d_chunks, C, kc, d,
                k.stride(0), e.stride(0)),
               dict(BLOCK_M=bm, KA_P2=ka_p2, BLOCK_C=bc, KC_P2=kc_p2, HB=hb, BLOCK_P=bp, BLOCK_D=bd), wrap)

    # Anchors with a positive first, in their own order (a stable sort of the 0/1 flags).
    visit_order = torch.sort(invalid, stable=True).indices.to(torch.int32)
    # Anchor slots by compact label (padding, keyed U, sorts last), each label's in slot order.
    slot_cid, slot_sorted = torch.sort(slot_keys.flatten(), stable=True)
    slot_ptr = torch.searchsorted(slot_cid, torch.arange(U + 1, device=dev, dtype=key_dtype))
    return Prepared(col_ptr, col_sorted, col_cid, a_cid, u, u_tail, w_tot, ubar, ubar_tail, head_u, head_y,
                    row_scale, visit_order, live, slot_ptr, slot_sorted, col_owner, top, e)
