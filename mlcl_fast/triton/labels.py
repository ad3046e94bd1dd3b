"""Label tensors in the forms the kernels read, and label statistics for the regime choice.

Everything here is O((|A| + |C|) * K) (bitsets: O(|C| * L / 32)); nothing pairs anchors with
columns. The positive-pair lists of the sparse regime live in pairs.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..labels import LabelSets
from .configs import DENSE_MAX_LABELS, pow2, MODE_BITS, MODE_DENSE, MODE_GATHER, MODE_LIST, MODE_NONE


def padded_index(sets: LabelSets, dtype=torch.int32) -> Tensor:
    """[B, max(K, 1)] sorted labels, -1 padded (at least one slot, so pointers stay valid)."""
    index = sets.index
    if index.shape[1] == 0:
        index = torch.full((index.shape[0], 1), -1, dtype=index.dtype, device=index.device)
    return index.to(dtype).contiguous()


def bitsets(sets: LabelSets) -> Tensor:
    """[B, ceil(L/32)] int32: bit (k mod 32) of word k // 32 is set when the row carries label k."""
    words = max(1, -(-sets.num_labels // 32))
    index = sets.index
    present = index >= 0
    label = index.clamp(min=0)
    bit = torch.where(present, torch.ones_like(label) << (label % 32), torch.zeros_like(label))
    out = torch.zeros(sets.batch_size, words, dtype=torch.int64, device=index.device)
    # Labels of a row are distinct, so adding their bits is their OR.
    out.scatter_add_(1, (label // 32), bit)
    out = torch.where(out >= 2**31, out - 2**32, out)  # the int32 with the same 32 bits
    return out.to(torch.int32).contiguous()


def most_frequent(counts: Tensor, k: int) -> Tensor:
    """Indices of the k largest integer counts, ties to the smaller index: one deterministic
    choice, shared by the closed form's head (prep.py) and the pairs regime's (pairs.py)."""
    n = counts.numel()
    key = counts.to(torch.int64) * n - torch.arange(n, device=counts.device)  # distinct keys
    return torch.topk(key, min(k, n)).indices


def dense_width(num_labels: int) -> int:
    """Columns of the MODE_DENSE label rows: a power of two >= 16 (a tl.dot's K)."""
    return max(16, pow2(num_labels))


def one_hot_rows(index: Tensor, width: int) -> Tensor:
    """[B, width] fp16 0/1 rows from padded ids [B, K] (ids < 0 or >= width are left out)."""
    out = torch.zeros(index.shape[0], width + 1, dtype=torch.float16, device=index.device)
    out.scatter_(1, torch.where((index >= 0) & (index < width), index, width), 1.0)
    return out[:, :width].contiguous()


def dense_rows(sets: LabelSets) -> Tensor:
    """[B, dense_width(L)] fp16 0/1 label rows (MODE_DENSE; exact, and so are their dot products)."""
    if sets.num_labels > DENSE_MAX_LABELS:
        raise ValueError(f"labels: the dense label mode holds at most {DENSE_MAX_LABELS} labels, got {sets.num_labels}")
    return one_hot_rows(sets.index, dense_width(sets.num_labels))


def column_table(sets: LabelSets, mode: int) -> Tensor:
    """What the kernels read for the column labels in `mode`."""
    if mode == MODE_DENSE:
        return dense_rows(sets)
    if mode in (MODE_BITS, MODE_GATHER):
        return bitsets(sets)
    if mode == MODE_LIST:
        return padded_index(sets)
    if mode == MODE_NONE:
        return torch.full((sets.batch_size, 1), -1, dtype=torch.int32, device=sets.device)
    raise ValueError(f"unknown label mode {mode}")


def visiting_order(candidates: Tensor) -> tuple[Tensor, Tensor]:
    """(order [M] int32, live [1] int32) from Problem.candidate_anchors: the anchors that may have
    a positive first, in their own order, and how many they are (static shapes, no host read).
    The sweeps visit order[0..live) only (launch.visiting), so an anchor without a positive costs
    nothing; its loss and gradient stay exactly 0."""
    order = torch.sort((~candidates).to(torch.int8), stable=True).indices.to(torch.int32)
    return order, candidates.sum().to(torch.int32).reshape(1)


def positive_triples(anchor_sets: LabelSets, column_sets: LabelSets, col_lo: int, skip_most_frequent: int = 0
                     ) -> int:
    """Number of (anchor, label, column) triples with the column in [col_lo, |C|) carrying the
    anchor's label (the anchor's own column included): the size of the sparse regime's lists.
    `skip_most_frequent` leaves out the labels carried by most of those columns (the pairs
    regime's head, ties to the smaller label as there: the count of its list of pairs sharing a
    label outside the head). Reads label data back to the host (one synchronisation)."""
    idx = column_sets.index[col_lo:]
    freq = torch.bincount(idx[idx >= 0], minlength=column_sets.num_labels)
    if skip_most_frequent:
        freq[most_frequent(freq, skip_most_frequent)] = 0
    a = anchor_sets.index
    return int(freq[a.clamp(min=0)].masked_fill(a < 0, 0).sum())
