"""Label sets in every accepted input form, reduced to one canonical form.

Canonical form (`LabelSets`): `index` [B, K] int64 with each row's labels sorted ascending,
unique, and padded with -1 at the end; `count` [B] = |y_b|; `num_labels` = L. Fused backends
read it directly (sorted lists make intersections a merge); `csr()` and `label_frequency()`
give the other views they need, computed once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from numbers import Integral
from typing import Callable, Optional

import torch
from torch import Tensor

LABEL_FORMATS = ("auto", "dense", "indices", "sparse")


@dataclass(frozen=True)
class LabelSets:
    index: Tensor
    count: Tensor
    num_labels: int

    @property
    def batch_size(self) -> int:
        return self.index.shape[0]

    @property
    def width(self) -> int:
        return self.index.shape[1]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def to(self, device) -> "LabelSets":
        return LabelSets(self.index.to(device), self.count.to(device), self.num_labels)

    def repeat_views(self, views: int) -> "LabelSets":
        """Row b*V + v carries the labels of sample b (features [B, V, d] flattened)."""
        if views == 1:
            return self
        return LabelSets(self.index.repeat_interleave(views, 0), self.count.repeat_interleave(views, 0),
                         self.num_labels)

    def concat(self, other: "LabelSets") -> "LabelSets":
        """Rows of self, then rows of other (same label space)."""
        width = max(self.width, other.width)
        pad = lambda s: s.index if s.width == width else torch.nn.functional.pad(s.index, (0, width - s.width), value=-1)
        return LabelSets(torch.cat([pad(self), pad(other)]), torch.cat([self.count, other.count]), self.num_labels)

    def dense(self, dtype=torch.bool) -> Tensor:
        out = torch.zeros(self.batch_size, self.num_labels + 1, dtype=dtype, device=self.device)
        sentinel = torch.where(self.index < 0, self.num_labels, self.index)
        out = out.scatter(1, sentinel, torch.ones_like(sentinel, dtype=dtype))
        return out[:, : self.num_labels]

    def csr(self) -> tuple[Tensor, Tensor]:
        """(row_ptr [B+1], col [nnz]) with sorted columns per row."""
        row_ptr = torch.zeros(self.batch_size + 1, dtype=torch.int64, device=self.device)
        row_ptr[1:] = torch.cumsum(self.count, 0)
        return row_ptr, self.index[self.index >= 0]

    def label_frequency(self) -> Tensor:
        """How many rows carry each label, [L] int64."""
        cols = self.index[self.index >= 0]
        return torch.bincount(cols, minlength=self.num_labels)

    @staticmethod
    def singletons(num_labels: int, device=None) -> "LabelSets":
        """The label sets {k} of the L prototypes."""
        index = torch.arange(num_labels, device=device).unsqueeze(1)
        return LabelSets(index, torch.ones(num_labels, dtype=torch.int64, device=device), num_labels)


def as_label_sets(labels, batch_size: int, num_labels: Optional[int] = None, label_format: str = "auto",
                  device=None, check_values: bool = True,
                  canonical_indices: Optional[Callable[[Tensor, int], LabelSets]] = None) -> LabelSets:
    """Validate `labels` (any accepted form) and return its canonical LabelSets.

    `num_labels` is L when known from elsewhere (prototypes, the module); it must then agree with
    the width of dense and sparse labels. `check_values=False` (padded indices with a known
    num_labels, or LabelSets): no host synchronisation; the label values are then checked on the
    device (torch._assert_async: a bad value fails the device's stream, not with a ValueError),
    and the canonical width stays K instead of the largest label count. A LabelSets is checked to
    be canonical like any other input (_check_label_sets), never trusted. `canonical_indices`:
    a backend's own form of `from_indices_on_device` for that path (same result, fewer launches).
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format: expected one of {list(LABEL_FORMATS)}, got {label_format!r}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, Integral) or num_labels < 0):
        raise ValueError(f"num_labels: expected a non-negative integer, got {num_labels!r}")
    if device is not None and isinstance(labels, Tensor) and labels.device != torch.device(device):
        raise ValueError(f"labels: on device {labels.device}, but features are on {device}")  # before converting
    if isinstance(labels, LabelSets):
        out = _check_label_sets(labels, num_labels, device, check_values)
    else:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels: expected a tensor (dense multi-hot [B, L], padded indices [B, K] "
                            f"or sparse [B, L]) or LabelSets, got {type(labels).__name__}")
        fmt = _detect_format(labels, num_labels) if label_format == "auto" else label_format
        if (fmt == "sparse") != (labels.layout in (torch.sparse_csr, torch.sparse_coo)):
            raise TypeError(f"labels: label_format={fmt!r} does not fit a tensor of layout {labels.layout}")
        if not check_values:
            if label_format != "indices" or num_labels is None:
                raise ValueError("check_values: False needs labels as padded indices with label_format='indices' "
                                 "and a known num_labels (or a LabelSets): other forms read label values on the host")
            out = (canonical_indices or from_indices_on_device)(labels, num_labels)
        elif fmt == "sparse":
            out = _from_sparse(labels, num_labels)
        elif fmt == "dense":
            out = _from_dense(labels, num_labels)
        else:
            out = _from_indices(labels, num_labels)
    if out.batch_size != batch_size:
        raise ValueError(f"labels: batch size {out.batch_size} does not match features' batch size {batch_size}")
    if device is not None and out.device != torch.device(device):
        raise ValueError(f"labels: on device {out.device}, but features are on {device}")
    return out


def _check_label_sets(sets: LabelSets, num_labels: Optional[int], device, check_values: bool) -> LabelSets:
    """A LabelSets (made by hand, or by another process) in the canonical form, as int64: every
    backend reads it as it is (kernels address memory with its label ids), so it is checked like
    any other label input, never trusted. Metadata always; values on the host, naming the first
    bad row, when `check_values` (and outside torch.compile, where a host read would break the
    graph), else by device-side assertions (no host synchronisation)."""
    index, count, L = sets.index, sets.count, sets.num_labels
    if not isinstance(index, Tensor) or not isinstance(count, Tensor):
        raise TypeError(f"labels: LabelSets index and count must be tensors, got {type(index).__name__} and "
                        f"{type(count).__name__}")
    if isinstance(L, bool) or not isinstance(L, Integral) or L < 0:
        raise ValueError(f"labels: LabelSets num_labels must be a non-negative integer, got {L!r}")
    if num_labels is not None and L != num_labels:
        raise ValueError(f"labels: LabelSets has num_labels={L}, expected {num_labels}")
    _check_2d(index, "LabelSets index")
    for name, t in (("index", index), ("count", count)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"labels: LabelSets {name} must be an integer tensor, got {t.dtype}")
    if count.dim() != 1 or count.shape[0] != index.shape[0]:
        raise ValueError(f"labels: LabelSets count must have shape [{index.shape[0]}] (one per row of index), "
                         f"got {tuple(count.shape)}")
    if count.device != index.device:
        raise ValueError(f"labels: LabelSets count is on {count.device}, its index on {index.device}")
    if device is not None and index.device != torch.device(device):
        raise ValueError(f"labels: on device {index.device}, but features are on {device}")  # before reading values
    index, count = index.long().contiguous(), count.long().contiguous()
    conditions = canonical_row_conditions(index, L, count)
    if check_values and not torch.compiler.is_compiling():
        bad = ~torch.stack([ok for ok, _ in conditions], dim=1)  # [B, 3]
        if bool(bad.any()):  # the one host read; the rest only on the way to the error
            row, kind = divmod(int(bad.flatten().nonzero()[0]), len(conditions))
            raise ValueError(f"labels: LabelSets row {row} has labels out of the canonical form: expected "
                             f"{conditions[kind][1]} (index {index[row].tolist()}, count {int(count[row])})")
    else:
        for ok, expected in conditions:
            torch._assert_async(ok.all(), f"labels: a LabelSets row has labels out of the canonical form: "
                                          f"expected {expected}")
    return LabelSets(index, count, L)


@contextlib.contextmanager
def label_errors_named(name: str):
    """Report the label checks' ValueError/TypeError (their messages name `labels`) as errors about
    the argument `name` (key_labels, ref_labels): messages start with "name: "."""
    try:
        yield
    except (ValueError, TypeError) as err:
        message = str(err)
        message = message[len("labels: "):] if message.startswith("labels: ") else message
        raise type(err)(f"{name}: {message}") from None


def canonical_row_conditions(index: Tensor, num_labels: Optional[int] = None,
                             count: Optional[Tensor] = None) -> list[tuple[Tensor, str]]:
    """The canonical form of padded label rows [B, K], as ([B] bool per row, what it expects):
    ids in [0, num_labels) (any id >= 0 when None) or -1; each row sorted ascending without
    repeats, -1 padding at the end; and, given `count`, count = the number of ids per row. Device
    tensor operations only: the caller reads them on the host or asserts them on the device."""
    in_range = index >= -1 if num_labels is None else (index >= -1) & (index < num_labels)
    ids = "label ids >= 0" if num_labels is None else f"label ids in [0, {num_labels})"
    a, b = index[:, :-1], index[:, 1:]
    out = [(in_range.all(dim=1), f"{ids}, or -1 for padding"),
           (((b == -1) | ((a != -1) & (b > a))).all(dim=1),
            "each row sorted ascending without repeats, -1 padding at the end")]
    if count is not None:
        out.append(((index >= 0).sum(dim=1) == count, "a count equal to the number of label ids in its row"))
    return out


def _detect_format(labels: Tensor, num_labels: Optional[int]) -> str:
    if labels.layout in (torch.sparse_csr, torch.sparse_coo):
        return "sparse"
    if labels.layout != torch.strided:
        raise TypeError(f"labels: unsupported layout {labels.layout}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point:
        return "dense"
    if labels.dim() != 2:
        return "indices"  # let the indices path report the shape error
    # An integer matrix is multi-hot when it holds only 0/1 and has the width of the label space.
    binary = labels.numel() == 0 or bool(((labels == 0) | (labels == 1)).all())
    width_ok = num_labels is None or labels.shape[1] == num_labels
    return "dense" if binary and width_ok else "indices"


def _check_2d(labels: Tensor, what: str) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels: expected {what} of shape [B, ...] with 2 dimensions, got shape {tuple(labels.shape)}")


def _from_dense(labels: Tensor, num_labels: Optional[int]) -> LabelSets:
    _check_2d(labels, "dense multi-hot labels")
    if labels.is_complex():
        raise TypeError("labels: complex dtype is not a multi-hot label matrix")
    if num_labels is not None and labels.shape[1] != num_labels:
        raise ValueError(f"labels: dense labels have {labels.shape[1]} columns, expected num_labels={num_labels}")
    if labels.dtype != torch.bool:
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels: dense multi-hot labels must contain only 0 and 1")
        labels = labels != 0
    rows, cols = labels.nonzero(as_tuple=True)
    return _from_pairs(rows, cols, labels.shape[0], labels.shape[1])


def _from_sparse(labels: Tensor, num_labels: Optional[int]) -> LabelSets:
    if labels.dim() != 2:
        raise ValueError(f"labels: expected sparse labels of shape [B, L], got shape {tuple(labels.shape)}")
    if num_labels is not None and labels.shape[1] != num_labels:
        raise ValueError(f"labels: sparse labels have {labels.shape[1]} columns, expected num_labels={num_labels}")
    coo = (labels.to_sparse_coo() if labels.layout == torch.sparse_csr else labels).coalesce()
    values, (rows, cols) = coo.values(), coo.indices()
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("labels: sparse multi-hot labels must have values 0 or 1")
    keep = values != 0
    return _from_pairs(rows[keep], cols[keep], labels.shape[0], labels.shape[1])


def _from_indices(labels: Tensor, num_labels: Optional[int]) -> LabelSets:
    _check_2d(labels, "padded label indices")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: padded label indices must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    if labels.numel() and bool((labels < -1).any()):
        raise ValueError("labels: padded label indices must be >= 0, or -1 for padding")
    largest = int(labels.max()) if labels.numel() else -1
    if num_labels is None:
        num_labels = largest + 1
    elif largest >= num_labels:
        raise ValueError(f"labels: label index {largest} is out of range for num_labels={num_labels}")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    keep = labels >= 0
    return _from_pairs(rows[keep], labels[keep], labels.shape[0], num_labels)


INDEX_RANGE_MESSAGE = "labels: padded label indices must be in [0, num_labels), or -1 for padding"


def check_padded_indices(labels: Tensor) -> None:
    """What every canonicaliser of padded indices requires of its input: 2-D, integer."""
    _check_2d(labels, "padded label indices")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: padded label indices must be an integer tensor, got {labels.dtype}")


def from_indices_on_device(labels: Tensor, num_labels: int) -> LabelSets:
    """Padded indices -> canonical form with static shapes and no host synchronisation: each row
    sorted, repeats replaced by padding, padding moved to the end; width K. Values outside
    [-1, num_labels) fail a device-side assertion. (A backend may do this in its own kernels:
    as_label_sets' `canonical_indices`.)"""
    check_padded_indices(labels)
    labels = labels.long()
    if labels.numel():
        torch._assert_async(((labels >= -1) & (labels < num_labels)).all(), INDEX_RANGE_MESSAGE)
    pad = num_labels  # sorts after every label
    keyed = labels.masked_fill(labels < 0, pad).sort(dim=1).values
    repeat = torch.nn.functional.pad(keyed[:, 1:] == keyed[:, :-1], (1, 0), value=False)
    keyed = keyed.masked_fill(repeat, pad).sort(dim=1).values
    present = keyed < pad
    return LabelSets(keyed.masked_fill(~present, -1), present.sum(dim=1), num_labels)


def _from_pairs(rows: Tensor, cols: Tensor, batch_size: int, num_labels: int) -> LabelSets:
    """(row, label) pairs in any order, possibly repeated -> canonical padded sorted form."""
    device = rows.device
    key = torch.unique(rows.long() * (num_labels + 1) + cols.long())  # sorted, deduplicated
    rows, cols = key // (num_labels + 1), key % (num_labels + 1)
    count = torch.bincount(rows, minlength=batch_size)
    width = int(count.max()) if count.numel() and rows.numel() else 0
    start = torch.cumsum(count, 0) - count
    slot = torch.arange(rows.numel(), device=device) - start[rows]
    index = torch.full((batch_size, width), -1, dtype=torch.int64, device=device)
    index[rows, slot] = cols
    return LabelSets(index, count, num_labels)
