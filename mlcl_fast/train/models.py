"""MLP backbone, projection head and the augmentation that makes contrastive views of tabular rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SparseRows:
    """A batch of sparse feature rows in CSR form, as `Batches` yields them for sparse data.
    Bag-of-words rows have a few dozen stored features out of 10^5 or more, so the dense
    [rows, features] batch would cost O(rows · features) memory and multiply-adds per step for
    nothing; `Backbone` reads SparseRows directly (`to_dense` is for augmentation only)."""
    indices: Tensor   # int64 [nnz], feature ids, row after row
    offsets: Tensor   # int64 [rows], where each row starts in indices
    values: Tensor    # float32 [nnz]
    shape: tuple      # (rows, features)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device) -> "SparseRows":
        return SparseRows(self.indices.to(device), self.offsets.to(device), self.values.to(device), self.shape)

    def cpu(self) -> "SparseRows":
        return self.to("cpu")

    def to_dense(self) -> Tensor:
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.device),
                                       torch.diff(self.offsets, append=self.offsets.new_tensor([self.indices.numel()])))
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.device)
        out[rows, self.indices] = self.values
        return out


class Backbone(nn.Module):
    """`layers` × (Linear → ReLU → Dropout); its output is the representation that probes and
    classifiers read. Takes dense rows or `SparseRows`; for the latter the first layer is a
    weighted sum of the weight columns of each row's stored features (embedding_bag): the same
    product as the dense one (up to rounding) in O(nnz · hidden)."""

    def __init__(self, in_dim: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        blocks, d = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
            d = hidden
        self.net = nn.Sequential(*blocks)
        self.out_dim = hidden

    def forward(self, x: "Tensor | SparseRows") -> Tensor:
        if isinstance(x, SparseRows):
            first = self.net[0]
            h = F.embedding_bag(x.indices, first.weight.t(), x.offsets, mode="sum", per_sample_weights=x.values)
            return self.net[1:](h + first.bias)
        return self.net(x)


class ProjectionHead(nn.Module):
    """Linear → ReLU → Linear, as in SupCon; the contrastive loss sees its (unnormalised) output."""

    def __init__(self, in_dim: int, proj_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, proj_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def make_views(x: Tensor, views: int, drop: float, noise: float, generator: torch.Generator) -> Tensor:
    """[B, d] -> [B, V, d]: each view zeroes a random `drop` fraction of the features (inverted
    dropout scaling) and adds Gaussian noise of std `noise` to the features it keeps. Dense inputs
    are standardised, so the noise is relative to one standard deviation; on bag-of-words pass
    noise=0 to keep rows non-negative."""
    out = []
    for _ in range(views):
        keep = (torch.rand(x.shape, generator=generator) >= drop).to(x.dtype)
        v = x * keep / max(1.0 - drop, 1e-6)
        if noise > 0:
            v = v + noise * torch.randn(x.shape, generator=generator) * keep
        out.append(v)
    return torch.stack(out, dim=1)
