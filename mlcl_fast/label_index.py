"""The columns' inverted label index: for every label, the columns that carry it, ascending.

Every path that expands an anchor's labels into its positive columns starts from this index, and
this module is its one implementation: the Triton backend's pair lists (triton/pairs.py) and its
closed form's compact label index (triton/prep.py, whose fused key kernel writes `slot_keys` and
sorts them with `sort_slots`), and the blocked algorithm of the C++/CUDA ops, which calls it as
the operator `mlcl_fast::column_label_index` (schema in csrc/cpu/ops.cpp, registered by
backends/native_ops.py).

Built with one stable sort of the flat [C, K] label slots, static shapes and no host
synchronisation, on any device: slot p belongs to column p // K, so a stable sort by label keeps
each label's columns ascending; padding (-1), and the columns before `col_lo` (outside the
softmax), are keyed `num_labels` and sort last.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .labels import canonical_row_conditions


class LabelIndex(NamedTuple):
    ptr: Tensor   # [L + 1] int64: label k's columns are cols[ptr[k]:ptr[k + 1]]
    cols: Tensor  # [C * K] int64: columns by label, ascending within each; entries from ptr[L] on are padding's


def key_dtype(num_labels: int) -> torch.dtype:
    """32-bit sort keys where the labels (and the padding key `num_labels`) fit: a GPU radix sort
    then makes half the passes of one over 64-bit keys."""
    return torch.int32 if num_labels < 2**31 - 1 else torch.int64


def slot_keys(col_labels: Tensor, num_labels: int, col_lo: int = 0) -> Tensor:
    """[C * K] sort keys of the label slots: the label, or `num_labels` for padding and for the
    columns before `col_lo`."""
    keep = col_labels >= 0
    if col_lo > 0:
        column = torch.arange(col_labels.shape[0], device=col_labels.device)
        keep = keep & (column >= col_lo).unsqueeze(1)
    return torch.where(keep, col_labels, num_labels).reshape(-1).to(key_dtype(num_labels))


def sort_slots(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted keys, slot order): stable, so each label's slots (hence columns) stay ascending."""
    return torch.sort(keys, stable=True)


def column_label_index(col_labels: Tensor, num_labels: int, col_lo: int = 0) -> LabelIndex:
    """The inverted index of `col_labels` ([C, K] canonical label lists, -1 padded) over the
    labels [0, num_labels), columns before `col_lo` left out."""
    sorted_keys, order = sort_slots(slot_keys(col_labels, num_labels, col_lo))
    cols = torch.div(order, max(col_labels.shape[1], 1), rounding_mode="floor")
    bounds = torch.arange(num_labels + 1, dtype=sorted_keys.dtype, device=sorted_keys.device)
    return LabelIndex(torch.searchsorted(sorted_keys, bounds), cols)


def check_arguments(col_labels: Tensor, num_labels: int, col_lo: int = 0) -> None:
    """The operator's argument types and shapes (host only; the fake implementation runs it too)."""
    if not isinstance(col_labels, Tensor) or col_labels.dim() != 2 or col_labels.dtype not in (torch.int32,
                                                                                                 torch.int64):
        got = (f"{col_labels.dtype} of shape {tuple(col_labels.shape)}" if isinstance(col_labels, Tensor)
               else type(col_labels).__name__)
        raise ValueError(f"col_labels: expected a 2-D int32 or int64 tensor of label lists, got {got}")
    if num_labels < 0:
        raise ValueError(f"num_labels: expected >= 0, got {num_labels}")
    if not 0 <= col_lo <= col_labels.shape[0]:
        raise ValueError(f"col_lo: expected a column in [0, {col_labels.shape[0]}], got {col_lo}")


def checked_column_label_index(col_labels: Tensor, num_labels: int, col_lo: int = 0,
                               check_values: bool = True) -> LabelIndex:
    """`column_label_index` for direct callers (the operator `mlcl_fast::column_label_index`): the
    arguments' types and shapes checked on the host and, with `check_values`, the label values
    (canonical rows: ascending ids in [0, num_labels), then -1 padding) asserted on the labels'
    device, so no value is read back (on a GPU a violation fails the stream; on the CPU it raises
    at once). The blocked C++ ops pass check_values=False: their own checks covered the labels."""
    check_arguments(col_labels, num_labels, col_lo)
    if check_values and col_labels.numel():
        for ok, expected in canonical_row_conditions(col_labels, num_labels):
            torch._assert_async(ok.all(), f"col_labels: expected canonical label lists: {expected}")
    return column_label_index(col_labels, num_labels, col_lo)
