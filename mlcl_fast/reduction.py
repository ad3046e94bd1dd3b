"""SPEC's reductions over anchors ("mean" and "sum"), shared by the single-process and the
gathered (distributed) loss."""
from __future__ import annotations

from torch import Tensor

from .inputs import anchor_label_counts
from .problem import Problem


def mean_terms(problem: Problem, losses: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) of the mean: uniform -> (Σ_valid l_i, #valid);
    labels -> (Σ a_i l_i, Σ_{i in A} a_i). Invalid anchors have l_i = 0. The numerator is the
    loss of reduction="sum"."""
    if problem.config.anchor_weight == "uniform":
        return losses.sum(), valid.sum(dtype=losses.dtype)
    counts = anchor_label_counts(problem).to(losses.dtype)
    return (counts * losses).sum(), counts.sum()


def mean_loss(problem: Problem, losses: Tensor, valid: Tensor) -> Tensor:
    """The reduced loss; 0 (with zero gradients) when no anchor is valid."""
    numerator, denominator = mean_terms(problem, losses, valid)
    return numerator / denominator.clamp(min=1)


def sum_loss(problem: Problem, losses: Tensor, valid: Tensor) -> Tensor:
    """Σ_i c_i l_i with the mean's anchor weights c_i (1 on valid anchors for "uniform", a_i for
    "labels"): the mean times its normaliser. 0 (with zero gradients) when no anchor is valid."""
    return mean_terms(problem, losses, valid)[0]


def reduce_anchor_losses(problem: Problem, losses: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """The per-anchor losses reduced as `reduction` ("mean", "sum" or "none") asks."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return sum_loss(problem, losses, valid)
    return mean_loss(problem, losses, valid)
