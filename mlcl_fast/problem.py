"""What the public API hands to a backend: normalised embeddings, canonical labels, config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .labels import LabelSets
from .presets import LossConfig


@dataclass
class Problem:
    """One loss evaluation.

    samples     [N, d] L2-normalised rows (views flattened: row b*V + v is view v of sample b)
    prototypes  [L, d] L2-normalised label prototypes, or None when config.prototype_mode == "none"
    labels      label sets of the N rows (already repeated over views)
    keys        [M, d] L2-normalised extra columns (never anchors), or None; key_labels their label sets
    Columns are the N rows, then the M keys, then the L prototypes when prototypes are used: the
    first N + M columns (`num_sample_columns`) are sample columns (beta_j = beta), the rest prototypes.
    Anchors are the sample rows [sample_anchors[0], sample_anchors[1]), then the prototypes
    [prototype_anchors[0], prototype_anchors[1]) when prototype_mode == "rows". By default that is
    every row and every prototype; a process of a distributed job anchors only its own share.
    Anchor i is never its own column (sample row r is column r, prototype k is column N + M + k).
    columns     optionally, the columns as one [N + M + L, d] tensor of which samples, keys and
                prototypes are the slices (inputs.prepare with a backend's joint normaliser), so
                that `embeddings` needs no concatenation
    """

    samples: Tensor
    prototypes: Optional[Tensor]
    labels: LabelSets
    config: LossConfig
    temperature: float
    sample_anchors: Optional[tuple[int, int]] = None
    prototype_anchors: Optional[tuple[int, int]] = None
    # False: backends must not read tensor values on the host either (fixed-capacity buffers,
    # device-side checks), as the caller's check_values=False asked.
    check_values: bool = True
    keys: Optional[Tensor] = None
    key_labels: Optional[LabelSets] = None
    columns: Optional[Tensor] = None

    def __post_init__(self):
        if (self.keys is None) != (self.key_labels is None):
            raise ValueError("keys: keys and key_labels come together")
        if self.keys is not None and self.key_labels.batch_size != self.keys.shape[0]:
            raise ValueError(f"key_labels: {self.key_labels.batch_size} label sets for {self.keys.shape[0]} keys")
        n = self.samples.shape[0]
        if self.sample_anchors is None:
            self.sample_anchors = (0, n)
        if self.prototype_anchors is None:
            rows = self.config.prototype_mode == "rows"
            self.prototype_anchors = (0, self.prototypes.shape[0] if rows else 0)
        lo, hi = self.sample_anchors
        plo, phi = self.prototype_anchors
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"sample_anchors: {self.sample_anchors} is not a range of the {n} rows")
        num_protos = self.prototypes.shape[0] if self.prototypes is not None else 0
        if not 0 <= plo <= phi <= num_protos or (phi > plo and self.config.prototype_mode != "rows"):
            raise ValueError(f"prototype_anchors: {self.prototype_anchors} is not a range of the prototypes "
                             f"(prototype_mode={self.config.prototype_mode!r})")
        if self.columns is not None:
            width = self.num_sample_columns + (num_protos if self.config.uses_prototypes else 0)
            if self.columns.shape != (width, self.samples.shape[1]) or self.columns.dtype != self.samples.dtype:
                raise ValueError(f"columns: expected the {width} columns as one [{width}, {self.samples.shape[1]}] "
                                 f"{self.samples.dtype} tensor, got {tuple(self.columns.shape)} {self.columns.dtype}")

    @property
    def num_samples(self) -> int:
        return self.samples.shape[0]

    @property
    def num_keys(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @property
    def num_sample_columns(self) -> int:
        """N + M: the columns with beta_j = beta (samples, then keys); later columns are prototypes."""
        return self.num_samples + self.num_keys

    @property
    def num_anchors(self) -> int:
        return (self.sample_anchors[1] - self.sample_anchors[0]) + (self.prototype_anchors[1] - self.prototype_anchors[0])

    def _column_range(self) -> Optional[tuple[int, int]]:
        """The anchors' own columns as one range [start, stop), when they are one."""
        n, s = self.num_samples, self.num_sample_columns
        (lo, hi), (plo, phi) = self.sample_anchors, self.prototype_anchors
        if plo == phi:
            return lo, hi
        if hi == n and plo == 0 and s == n:
            return lo, n + phi
        return None

    def embeddings(self, dtype=None) -> tuple[Tensor, Tensor]:
        """(anchor rows [|A|, d], columns [|C|, d]), in `dtype` (default: the samples' dtype).
        With `columns` the anchor rows are a slice of it where the anchors' own columns are one
        range (every sample and prototype anchored, no keys): nothing is copied."""
        if self.columns is not None:
            cols = self.columns if dtype is None else self.columns.to(dtype)
            span = self._column_range()
            if span == (0, cols.shape[0]):
                return cols, cols  # every column is an anchor: one tensor, no slice to differentiate
            if span is not None:
                return cols[span[0]:span[1]], cols
            return cols.index_select(0, self.anchor_columns()), cols
        x = self.samples if dtype is None else self.samples.to(dtype)
        lo, hi = self.sample_anchors
        sample_cols = x if self.keys is None else torch.cat([x, self.keys.to(x.dtype)])
        if not self.config.uses_prototypes:
            return x[lo:hi], sample_cols
        protos = self.prototypes.to(x.dtype)
        plo, phi = self.prototype_anchors
        rows = torch.cat([x[lo:hi], protos[plo:phi]]) if phi > plo else x[lo:hi]
        return rows, torch.cat([sample_cols, protos])

    def anchor_columns(self, dtype: torch.dtype = torch.int64) -> Tensor:
        """[|A|] (int64 by default): the column index of each anchor itself (excluded from its softmax)."""
        dev = self.samples.device
        s = self.num_sample_columns
        (lo, hi), (plo, phi) = self.sample_anchors, self.prototype_anchors
        span = self._column_range()
        if span is not None:
            return torch.arange(*span, device=dev, dtype=dtype)
        return torch.cat([torch.arange(lo, hi, device=dev, dtype=dtype),
                          torch.arange(s + plo, s + phi, device=dev, dtype=dtype)])

    def anchor_labels(self) -> LabelSets:
        """Label sets of the anchors: the anchored rows' sets, then {k} for prototype anchors
        (the columns' own sets where every column is an anchor: built once)."""
        if self._column_range() == (0, self.num_columns):
            return self.column_labels()
        lo, hi = self.sample_anchors
        rows = LabelSets(self.labels.index[lo:hi], self.labels.count[lo:hi], self.labels.num_labels)
        plo, phi = self.prototype_anchors
        if phi == plo:
            return rows
        protos = LabelSets.singletons(self.labels.num_labels, self.samples.device)
        protos = LabelSets(protos.index[plo:phi], protos.count[plo:phi], protos.num_labels)
        return rows.concat(protos)

    def column_labels(self) -> LabelSets:
        """Label sets of the columns: every row's set, every key's set, then {k} for each prototype
        column (built on the first call, then reused: every backend asks for them more than once)."""
        cached = self.__dict__.get("_column_sets")
        if cached is not None and cached[0] is self.labels and cached[1] is self.key_labels:
            return cached[2]
        sets = self.labels if self.keys is None else self.labels.concat(self.key_labels)
        if self.config.uses_prototypes:
            sets = sets.concat(LabelSets.singletons(self.prototypes.shape[0], self.samples.device))
        self.__dict__["_column_sets"] = (self.labels, self.key_labels, sets)
        return sets

    def candidate_anchors(self) -> Tensor:
        """[|A|] bool, on the problem's device, without a host read: anchors that share at least
        one label with a column of their softmax other than their own. Every positive weight
        needs a shared label, so an anchor outside this set has W_i = 0 (invalid: loss 0, no
        gradient); the backends leave such anchors out of their sweeps (most prototypes of a
        large label space, when prototypes are anchors)."""
        cols = self.column_labels().index
        if self.config.beta == 0.0:  # beta = 0 drops the sample columns from every softmax
            cols = cols[self.num_sample_columns:]
        L = self.labels.num_labels
        carriers = torch.zeros(L + 1, dtype=torch.int32, device=cols.device)  # slot L: the padding
        carriers.index_add_(0, torch.where(cols < 0, L, cols).reshape(-1),
                            torch.ones(cols.numel(), dtype=torch.int32, device=cols.device))
        carriers[L] = 0
        anchors = self.anchor_labels().index
        # an anchor's own column carries exactly the anchor's labels (row r: y_r; prototype k: {k})
        own = (self.anchor_columns() >= self.num_columns - cols.shape[0]).to(torch.int32)
        others = carriers[torch.where(anchors < 0, L, anchors)] - own[:, None]
        return ((others > 0) & (anchors >= 0)).any(1)

    @property
    def num_columns(self) -> int:
        n = self.num_sample_columns
        return n + self.prototypes.shape[0] if self.config.uses_prototypes else n
