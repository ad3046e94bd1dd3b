"""Argument checks of the custom operators (ops.py, closed.py, tail.py, pairs.py): one definition
of each kind of check, used by every operator, so that a bad argument raises an error whose
message starts with the argument's name and says what was expected, instead of a kernel reading
past the end of a tensor or returning garbage.

- Metadata (dtype, device, shape, contiguity, scalar ranges) lives on the host: checked on every
  call at no cost, also under FakeTensorMode and torch.compile (the opaque operators' fake
  implementations run the same checks). A wrong dtype raises TypeError, anything else ValueError.
- Values (label ids and their canonical order, label counts, row / column indices, CSR offsets:
  what the kernels address memory with) are checked by device-side assertions
  (torch._assert_async): no host synchronisation and no data-dependent Python branch, so they
  hold under torch.compile and CUDA graphs. On the CPU a violation raises RuntimeError at once; on
  a GPU it fails the stream. An operator leaves them out when its caller has validated those
  values already (`validated=True`): the driver, whose labels mlcl_fast.labels canonicalised and
  checked (on the host, or asserted on the device with check_values=False) and whose anchor
  columns come from the Problem's ranges; and the autograd backward, whose tensors the forward
  operator made. The public call therefore issues no device operation for them
  (tests/test_triton.py counts its device operations and proves it free of host
  synchronisation).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..labels import canonical_row_conditions
from . import configs, launch, recording

FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes) -> str:
    names = [str(t).replace("torch.", "") for t in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _shape(shape) -> str:
    return "[" + ", ".join("*" if n is None else str(n) for n in shape) + "]"


class Arguments:
    """The checks of one operator call. `q` [M, d] and `k` [C, d] are checked on construction
    (every operator takes them); the sizes M, C, d and q's device are what the other arguments
    are checked against. `validated`: the caller vouches for the tensors' values (see above)."""

    def __init__(self, q: Tensor, k: Tensor, validated: bool):
        self.validated = validated
        if q.dim() != 2:
            raise ValueError(f"q: expected the anchors' rows of shape [M, d], got shape {list(q.shape)}")
        if q.dtype not in FEATURE_DTYPES:
            raise TypeError(f"q: expected {_names(FEATURE_DTYPES)} (float64 goes to the reference backend), "
                            f"got {q.dtype}")
        if q.device.type != "cuda" and not (q.device.type == "cpu" and (launch.INTERPRETED or recording.active())):
            raise ValueError(f"q: expected a CUDA tensor (a CPU tensor only under the Triton interpreter), "
                             f"got device {q.device}")
        if q.dtype == torch.bfloat16 and launch.INTERPRETED:
            # The interpreter's bf16 tl.dot gives wrong results (values ~1e10, even for a bare 16x16
            # product): refused, not computed. The driver upcasts bf16 to fp32 on this path.
            raise TypeError("q: bfloat16 does not run under the Triton interpreter (its bf16 tl.dot is wrong); "
                            "pass float32")
        self.M, self.d = q.shape
        self.device = q.device
        self.tensor("q", q, (self.M, self.d), (q.dtype,))
        self.tensor("k", k, (None, self.d), (q.dtype,))
        self.C = k.shape[0]

    # ------------------------------------------------------------------------------- metadata
    def tensor(self, name: str, t: Tensor, shape: tuple, dtypes: tuple) -> None:
        """dtype one of `dtypes`, on q's device, contiguous (the kernels address rows by stride(0)
        and entries by position), of `shape` (None: any size)."""
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected {_names(dtypes)}, got {t.dtype}")
        if t.device != self.device:
            raise ValueError(f"{name}: expected a tensor on {self.device} (where q is), got {t.device}")
        if t.dim() != len(shape) or any(n is not None and t.shape[i] != n for i, n in enumerate(shape)):
            raise ValueError(f"{name}: expected shape {_shape(shape)}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor (strides {t.stride()})")

    def label_lists(self, name: str, t: Tensor, rows: int, dtypes: tuple = INDEX_DTYPES) -> int:
        """Padded label rows [rows, K] with K >= 1 (the kernels address slot 0); returns K."""
        self.tensor(name, t, (rows, None), dtypes)
        if t.shape[1] < 1:
            raise ValueError(f"{name}: expected at least one label slot per row (pad with -1), got shape "
                             f"{list(t.shape)}")
        return t.shape[1]

    @staticmethod
    def integer(name: str, value: int, lo: int, hi: int | None = None) -> None:
        """lo <= value (<= hi)."""
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name}: expected an integer {bound}, got {value}")

    @staticmethod
    def number(name: str, value: float, positive: bool = False) -> None:
        if not math.isfinite(value) or (positive and value <= 0):
            raise ValueError(f"{name}: expected a finite number{' > 0' if positive else ''}, got {value}")

    @staticmethod
    def choice(name: str, value: int, allowed: dict) -> None:
        if value not in allowed.values():
            raise ValueError(f"{name}: expected one of {allowed}, got {value}")

    @staticmethod
    def precision(name: str, value: str) -> None:
        """An fp32 dot precision: one of configs.FP32_PRECISIONS."""
        if value not in configs.FP32_PRECISIONS:
            raise ValueError(f"{name}: expected one of {list(configs.FP32_PRECISIONS)}, got {value!r}")

    def visit(self, order: Tensor | None, live: Tensor | None) -> tuple | None:
        """The anchors' visiting order [M] and live count [1] (int32; launch.visiting), both or
        neither: (order, live), or None for every anchor in its own order."""
        if (order is None) != (live is None):
            raise ValueError(f"{'live' if live is None else 'order'}: order and live come together "
                             f"(the anchors' visiting order and how many of them are visited)")
        if order is None:
            return None
        self.tensor("order", order, (self.M,), (torch.int32,))
        self.tensor("live", live, (1,), (torch.int32,))
        self.ids("order", order, 0, self.M, "anchor indices")
        self.ids("live", live, 0, self.M + 1, "a count of anchors")
        return order, live

    def anchor_gradient(self, name: str, t: Tensor) -> None:
        """The forward's anchor-row gradient for G = 1: fp32 [M, d], or [0, d] when the forward
        left it to the backward."""
        self.tensor(name, t, (None, self.d), (torch.float32,))
        if t.shape[0] not in (0, self.M):
            raise ValueError(f"{name}: expected {self.M} rows (the forward's anchor-row gradient) or none, "
                             f"got {t.shape[0]}")

    def head(self, name: str, t: Tensor, rows: int, width_factor: int = 1) -> int:
        """A closed-form head tile [rows, factor * HB] fp16 (HB a power of two >= 16: a tl.dot's
        K and a tl.arange); returns HB."""
        self.tensor(name, t, (rows, None), (torch.float16,))
        hb = t.shape[1] // width_factor
        if hb < 16 or configs.pow2(hb) != hb or t.shape[1] != width_factor * hb:
            raise ValueError(f"{name}: expected {width_factor} x HB columns with HB a power of two >= 16, "
                             f"got {t.shape[1]}")
        return hb

    # --------------------------------------------------------------------------------- values
    def assert_values(self, name: str, ok: Tensor, expected: str) -> None:
        """Device-side assertion that the bool tensor `ok` holds everywhere (nothing when the
        caller validated the values)."""
        if not self.validated and ok.numel():
            torch._assert_async(ok.all(), f"{name}: expected {expected}")

    def ids(self, name: str, t: Tensor, lo: int, hi: int, what: str) -> None:
        """Every entry in [lo, hi)."""
        if not self.validated:
            self.assert_values(name, (t >= lo) & (t < hi), f"{what} in [{lo}, {hi})")

    def offsets(self, name: str, ptr: Tensor, end: int, segments: int | None = None) -> int:
        """CSR offsets (int64) of `segments` segments (any number >= 1 when None) into a list of
        `end` entries: nondecreasing, in [0, end]. Returns the number of segments."""
        self.tensor(name, ptr, (None if segments is None else segments + 1,), (torch.int64,))
        if ptr.numel() < 2:
            raise ValueError(f"{name}: expected offsets of at least one segment (two entries), got {ptr.numel()}")
        if not self.validated:
            self.assert_values(name, (ptr >= 0) & (ptr <= end), f"offsets in [0, {end}]")
            self.assert_values(name, ptr[1:] >= ptr[:-1], "nondecreasing offsets")
        return ptr.numel() - 1

    def label_rows(self, name: str, index: Tensor, num_labels: int | None, count: Tensor | None = None,
                   count_name: str = "") -> None:
        """Canonical label rows (LabelSets; labels.canonical_row_conditions): ids in
        [0, num_labels) (any id >= 0 when None) sorted ascending without repeats, -1 padding at the
        end; `count` the ids per row."""
        if self.validated:
            return
        for i, (ok, expected) in enumerate(canonical_row_conditions(index, num_labels, count)):
            self.assert_values(count_name if i == 2 else name, ok, expected)


def common(q: Tensor, k: Tensor, self_col: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float,
           validated: bool, a_count: Tensor | None = None, c_count: Tensor | None = None) -> Arguments:
    """The checks of the arguments every sweep takes: q, k, the anchors' own columns, the sample
    count and first softmax column, the temperature, log beta, and the label counts when given."""
    args = Arguments(q, k, validated)
    args.integer("num_samples", num_samples, 0, args.C)
    args.integer("col_lo", col_lo, 0, args.C)  # the sweeps start at column col_lo
    args.number("inv_tau", inv_tau, positive=True)
    args.number("log_beta", log_beta)
    args.tensor("self_col", self_col, (args.M,), INDEX_DTYPES)
    if a_count is not None:
        args.tensor("a_count", a_count, (args.M,), INDEX_DTYPES)
    if c_count is not None:
        args.tensor("c_count", c_count, (args.C,), INDEX_DTYPES)
    # Compared with column indices in the sweeps, and an address in prep.py (its column's owner).
    args.ids("self_col", self_col, -1, args.C, "the anchors' own column indices (-1: none)")
    return args
