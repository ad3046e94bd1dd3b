"""Non-contrastive baselines of the study, for logits [B, L]: BCE, ZLPR and ASL."""
from __future__ import annotations

import math
from numbers import Real

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


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def zlpr_loss(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """ZLPR: log(1 + sum_{k in pos} e^{-x_k}) + log(1 + sum_{k not in pos} e^{x_k}), per sample.
    reduction: "mean" over the samples, "sum" over them, or "none" ([B])."""
    check_reduction(reduction)
    positive = _dense_targets(logits, labels)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    zero = torch.zeros_like(x[:, :1])
    pos = torch.cat([zero, (-x).masked_fill(~positive, float("-inf"))], dim=1)
    neg = torch.cat([zero, x.masked_fill(positive, float("-inf"))], dim=1)
    loss = torch.logsumexp(pos, dim=1) + torch.logsumexp(neg, dim=1)
    return _reduce(loss, reduction)


def bce_loss(logits: Tensor, labels, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy with logits: "mean" over samples and labels, "sum" over them, or
    "none" ([B, L])."""
    check_reduction(reduction)
    target = _dense_targets(logits, labels).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)


def _check_number(name: str, value, low: float, high: float, high_open: bool = False) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high) or (high_open and value == high):
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name}: expected a finite number {'in ' if math.isfinite(high) else ''}{interval}, "
                         f"got {value}")
    return value


def asl_loss(logits: Tensor, labels, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
             eps: float = 1e-8, reduction: str = "mean") -> Tensor:
    """Asymmetric loss (ASL; Ridnik et al., "Asymmetric Loss For Multi-Label Classification",
    ICCV 2021). With p = sigmoid(x) and, for negatives, the shifted probability
    p_m = max(p - clip, 0), each entry of [B, L] contributes

        positive:  -(1 - p)^gamma_pos * log(max(p, eps))
        negative:  -p_m^gamma_neg     * log(max(1 - p_m, eps))

    (0^0 = 1; the focusing weights are differentiated, as in the authors' code). Defaults are the
    paper's (gamma_pos=0, gamma_neg=4, clip=0.05). reduction: "mean" over samples and labels,
    comparable to bce_loss's mean; "sum" over them, which is the value of the authors'
    AsymmetricLoss (so the authors' loss = mean * B * L); "none" gives [B, L]. gamma_pos =
    gamma_neg = 0 with clip = 0 gives BCE per entry, capped at -log(eps) (eps=0: no cap).
    Half-precision logits are computed and returned in fp32.
    """
    gamma_pos = _check_number("gamma_pos", gamma_pos, 0.0, math.inf)
    gamma_neg = _check_number("gamma_neg", gamma_neg, 0.0, math.inf)
    clip = _check_number("clip", 0.0 if clip is None else clip, 0.0, 1.0)
    eps = _check_number("eps", eps, 0.0, 1.0, high_open=True)
    check_reduction(reduction)
    positive = _dense_targets(logits, labels)
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    floor = math.log(eps) if eps > 0 else -math.inf  # log(max(q, eps)) = max(log q, log eps)

    # Positives: log p and log(1 - p) as log-sigmoids, finite for every finite logit, so that
    # (1 - p)^gamma = exp(gamma * log(1 - p)) has a finite gradient even where 1 - p underflows.
    log_p = F.logsigmoid(x)
    pos = -torch.exp(gamma_pos * F.logsigmoid(-x)) * log_p.clamp(min=floor)

    # Negatives: log(1 - p_m) = log(min(1 - p + clip, 1)); p_m^gamma is 0 where p <= clip, computed
    # on a stand-in value there so that no 0 * inf reaches the gradient.
    if clip > 0:
        log_q = torch.log((torch.sigmoid(-x) + clip).clamp(max=1.0))
        p_m = (torch.sigmoid(x) - clip).clamp(min=0.0)
        shifted = p_m > 0
        log_pm = torch.log(torch.where(shifted, p_m, torch.ones_like(p_m)))
        weight = torch.where(shifted, torch.exp(gamma_neg * log_pm), torch.full_like(p_m, 0.0 if gamma_neg > 0 else 1.0))
    else:
        log_q = F.logsigmoid(-x)
        weight = torch.exp(gamma_neg * log_p)
    neg = -weight * log_q.clamp(min=floor)
    return _reduce(torch.where(positive, pos, neg), reduction)
