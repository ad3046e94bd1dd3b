"""Non-contrastive baselines of the study, for logits [B, L]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import check_reduction
from .labels import as_label_sets


def _dense_targets(logits: Tensor, labels) -> Tensor:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits: expected a float tensor [B, L], got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if logits.shape[0] < 1 or logits.shape[1] < 1:  # as the contrastive loss: no mean over nothing
        raise ValueError(f"logits: expected at least one sample and one label, got shape {tuple(logits.shape)}")
    sets = as_label_sets(labels, logits.shape[0], logits.shape[1], device=logits.device)
    return sets.dense(torch.bool)


def zlpr_loss(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """ZLPR: log(1 + sum_{k in pos} e^{-x_k}) + log(1 + sum_{k not in pos} e^{x_k}), per sample."""
    check_reduction(reduction)
    positive = _dense_targets(logits, labels)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    zero = torch.zeros_like(x[:, :1])
    pos = torch.cat([zero, (-x).masked_fill(~positive, float("-inf"))], dim=1)
    neg = torch.cat([zero, x.masked_fill(positive, float("-inf"))], dim=1)
    loss = torch.logsumexp(pos, dim=1) + torch.logsumexp(neg, dim=1)
    return loss.mean() if reduction == "mean" else loss


def bce_loss(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits, mean over samples and labels (or [B, L] with 'none')."""
    check_reduction(reduction)
    target = _dense_targets(logits, labels).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
