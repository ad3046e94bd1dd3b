"""Padded label indices -> canonical LabelSets in one kernel: the triton backend's form of
labels._from_indices_on_device (the check_values=False path), where the torch formulation issues
about sixteen operations (two sorts, masks, a pad, the range check; each is host time on a GPU,
tests/test_triton.py counts them).

Each program takes BLOCK_R rows of the [B, K] input. Padding (-1) and repeats become a sentinel L,
which sorts after every label, so one sort puts the row's distinct labels first in ascending
order: a repeat is an entry equal to an earlier one of the sorted row (found by comparing every
pair of the row's entries, a [BLOCK_R, KP, KP] mask: K is at most MAX_WIDTH here), and a second
sort moves the repeats behind. The output has the input's width K, like the torch formulation's.
A value outside [-1, L) marks its row: the row's count is written as -1, and one device-side
assertion after the launch (torch._assert_async: no host synchronisation) fails with the torch
formulation's message.

`canonical_indices` is a triton_op (torch.compile sees the kernel); inputs wider than MAX_WIDTH
keep the torch formulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..labels import INDEX_RANGE_MESSAGE, LabelSets, check_padded_indices, from_indices_on_device
from . import recording

# Widest padded input the kernel takes: its repeat mask has KP * KP entries per row.
MAX_WIDTH = 64
_ELEMENTS = 4096  # entries of a program's repeat mask (BLOCK_R * KP * KP)


@triton.jit
def canonical_rows_kernel(x_ptr, out_ptr, count_ptr, B, K, L, stride_r, stride_c,
                          BLOCK_R: tl.constexpr, KP: tl.constexpr):
    canonical_block(tl.program_id(0), x_ptr, out_ptr, count_ptr, B, K, L, stride_r, stride_c, BLOCK_R, KP)


@triton.jit
def canonical_block(pid, x_ptr, out_ptr, count_ptr, B, K, L, stride_r, stride_c,
                    BLOCK_R: tl.constexpr, KP: tl.constexpr):
    """Rows [pid * BLOCK_R, (pid + 1) * BLOCK_R) of the [B, K] input (also a role of
    prologue.prologue_kernel)."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    cols = tl.arange(0, KP)
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c, mask=mask,
                other=-1).to(tl.int64)
    # (lanes past K are masked out of both: an unsigned `other` would not read as -1)
    bad = tl.max((((x < -1) | (x >= L)) & mask).to(tl.int32), axis=1) > 0
    key = tl.where(mask & (x >= 0) & (x < L), x, L)
    key = tl.sort(key, dim=1)
    # an entry equal to an earlier entry of the sorted row is a repeat
    earlier = cols[None, None, :] < cols[None, :, None]                      # [1, P, Q]: q < p
    same = (key[:, :, None] == key[:, None, :]) & earlier
    repeat = tl.max(same.to(tl.int32), axis=2) > 0
    key = tl.sort(tl.where(repeat, L, key), dim=1)
    present = key < L
    count = tl.sum(present.to(tl.int64), axis=1)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], tl.where(present, key, -1), mask=mask)
    tl.store(count_ptr + rows, tl.where(bad, -1, count), mask=rmask)


def blocks(K: int) -> tuple[int, int]:
    kp = max(2, triton.next_power_of_2(K))
    return max(1, min(64, _ELEMENTS // (kp * kp))), kp


def check_labels(labels: Tensor) -> None:
    if labels.dim() != 2 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected a 2-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    if labels.shape[1] > MAX_WIDTH:
        raise ValueError(f"labels: the kernel takes at most {MAX_WIDTH} label slots per row, got {labels.shape[1]}")


def takes(labels: Tensor) -> bool:
    """Whether the kernel takes these padded indices (else the torch formulation does); raises
    for what no canonicaliser takes (labels.check_padded_indices)."""
    check_padded_indices(labels)
    return 0 < labels.shape[1] <= MAX_WIDTH


def outputs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(index [B, K] int64, count [B] int64), unfilled: what the kernel writes."""
    B, K = labels.shape
    return (torch.empty(B, K, dtype=torch.int64, device=labels.device),
            torch.empty(B, dtype=torch.int64, device=labels.device))


@triton_op("mlcl_fast::triton_canonical_indices", mutates_args=())
def canonical_index_rows(labels: Tensor, num_labels: int) -> tuple[Tensor, Tensor]:
    """(index [B, K] int64: each row's distinct labels ascending, then -1; count [B] int64, -1 for
    a row holding a value outside [-1, num_labels))."""
    check_labels(labels)
    index, count = outputs(labels)
    B, K = labels.shape
    if B:
        br, kp = blocks(K)
        recording.launch(canonical_rows_kernel, (triton.cdiv(B, br),),
                         (labels, index, count, B, K, num_labels, labels.stride(0), labels.stride(1)),
                         dict(BLOCK_R=br, KP=kp), wrap_triton)
    return index, count


def checked(index: Tensor, count: Tensor, num_labels: int) -> LabelSets:
    """The kernel's outputs as LabelSets, after the device-side range assertion (no host read)."""
    if count.numel():
        ok = count.min() >= 0
        if recording.active():  # a recorded launch leaves count without values: the same operations, no verdict
            ok = torch.ones_like(ok)
        torch._assert_async(ok, INDEX_RANGE_MESSAGE)
    return LabelSets(index, count, num_labels)


def canonical_indices(labels: Tensor, num_labels: int) -> LabelSets:
    """labels._from_indices_on_device in one kernel (plus the device-side range assertion); the
    torch formulation for inputs wider than MAX_WIDTH or with no label slot."""
    if not takes(labels):
        return from_indices_on_device(labels, num_labels)
    return checked(*canonical_index_rows(labels, num_labels), num_labels)
