"""MLP backbone, projection head and the augmentation that makes contrastive views of tabular rows."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Backbone(nn.Module):
    """`layers` × (Linear → ReLU → Dropout); its output is the representation that probes and
    classifiers read."""

    def __init__(self, in_dim: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        blocks, d = [], in_dim
        for _ in range(layers):
            blocks += [nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout)]
            d = hidden
        self.net = nn.Sequential(*blocks)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
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
