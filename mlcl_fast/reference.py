"""Reference backend: SPEC written as plain, readable PyTorch. The oracle for every other backend.

It materialises the |A| x |C| logit and weight matrices (memory O(|A|·|C|)), never anything
with a label dimension on top. Gradients come from autograd; the regulariser's r_ij is detached,
which yields SPEC's gradient W_i p_ij - w_ij - r_ij.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .problem import Problem

# Inductor options for torch.compile of this module. With prototypes as anchors, torch 2.13's
# joint-graph constant folding returns wrong feature gradients for this program (values are right;
# aot_eager is right); tests/test_compile.py checks both the bug and this workaround.
COMPILE_OPTIONS = {"joint_graph_constant_folding": False}


def anchor_losses(problem: Problem) -> tuple[Tensor, Tensor]:
    """Per-anchor loss l_i ([|A|], 0 for invalid anchors) and the validity mask ([|A|] bool)."""
    cfg = problem.config
    x = problem.samples
    n = problem.num_sample_columns  # samples, then keys: beta_j = beta; later columns are prototypes
    rows, cols = problem.embeddings(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None)
    logits = rows @ cols.T / problem.temperature

    with torch.no_grad():
        in_softmax = _softmax_columns(problem.anchor_columns(), cols.shape[0], n, cfg.beta)
        weights = positive_weights(problem, in_softmax, logits.dtype)

    is_sample_column = torch.arange(cols.shape[0], device=cols.device) < n
    log_beta = torch.zeros(cols.shape[0], dtype=logits.dtype, device=cols.device)
    if cfg.beta > 0:
        log_beta = torch.where(is_sample_column, torch.tensor(cfg.beta, dtype=logits.dtype).log(), log_beta)
    has_column = in_softmax.any(dim=1, keepdim=True)
    masked = (logits + log_beta).masked_fill(~in_softmax, float("-inf"))
    masked = torch.where(has_column, masked, torch.zeros_like(masked))  # rows with no column stay finite
    log_denominator = torch.logsumexp(masked, dim=1, keepdim=True)
    log_p = logits - log_denominator

    total_weight = weights.sum(dim=1)
    valid = total_weight > 0
    loss = -(weights * log_p).sum(dim=1)
    if cfg.reg:
        positive = weights > 0
        p = torch.exp(log_p.detach() + log_beta)  # p_ij = beta_j exp(s_ij) / D_i
        r = torch.where(positive, (p - weights).clamp(min=0), torch.zeros_like(p))
        loss = loss - (r * logits).sum(dim=1)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, valid


def _softmax_columns(self_column: Tensor, num_cols: int, n: int, beta: float) -> Tensor:
    """[|A|, |C|] bool: column j enters anchor i's softmax (j is not i itself, and beta_j > 0)."""
    column = torch.arange(num_cols, device=self_column.device)
    mask = column[None, :] != self_column[:, None]
    if beta == 0:
        mask = mask & (column >= n)[None, :]
    return mask


def positive_weights(problem: Problem, in_softmax: Tensor, dtype) -> Tensor:
    """w_ij of SPEC as a dense [|A|, |C|] matrix (zero outside in_softmax)."""
    cfg = problem.config
    n = problem.num_sample_columns
    row_sets, col_sets = problem.anchor_labels(), problem.column_labels()
    col_members = col_sets.dense(torch.bool)                       # [|C|, L]
    a_row = row_sets.count.to(dtype)
    a_col = col_sets.count.to(dtype)

    # Recomputed in each loop below rather than kept: K matrices of |A| x |C| would not fit.
    def member(t: int) -> Tensor:
        """[|A|, |C|] bool: column j carries anchor i's t-th label (summed over t: c_ij = |y_i ∩ y_j|)."""
        label_t = row_sets.index[:, t]
        has_t = (label_t >= 0).unsqueeze(1)
        return col_members.index_select(1, label_t.clamp(min=0)).T & has_t & in_softmax

    overlap = torch.zeros(in_softmax.shape, dtype=dtype, device=in_softmax.device)
    for t in range(row_sets.width):
        overlap = overlap + member(t)
    union = a_row[:, None] + a_col[None, :] - overlap

    if not cfg.label_centric:
        if cfg.weighting == "any":
            omega = (overlap > 0).to(dtype)
        elif cfg.weighting == "all":
            omega = ((overlap > 0) & (overlap == a_row[:, None]) & (overlap == a_col[None, :])).to(dtype)
        else:  # jaccard
            omega = torch.where(overlap > 0, overlap / union.clamp(min=1), torch.zeros_like(overlap))
        omega = omega * in_softmax
        total = omega.sum(dim=1, keepdim=True)
        return torch.where(total > 0, omega / total.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(omega))

    factor = _pair_factor(cfg, overlap, union, a_col, n)
    weights = torch.zeros_like(overlap)
    for t in range(row_sets.width):
        fm = factor * member(t)
        z = fm.sum(dim=1, keepdim=True)                             # Z_ik for the t-th label k of anchor i
        weights = weights + torch.where(z > 0, fm / z.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(fm))
    return weights / a_row.clamp(min=1)[:, None]


def _pair_factor(cfg, overlap: Tensor, union: Tensor, a_col: Tensor, n: int) -> Tensor:
    if cfg.f == "one":
        return torch.ones_like(overlap)
    if cfg.f == "union":
        is_prototype_column = torch.arange(union.shape[1], device=union.device) >= n
        return torch.where(is_prototype_column[None, :], 1.0, 1.0 / union.clamp(min=1))
    # overlap: (c_ij / a_j)^alpha on overlapping columns; alpha < 0: 1 iff y_j ⊆ y_i
    if cfg.alpha < 0:
        return (overlap == a_col[None, :]).to(overlap.dtype)
    ratio = overlap / a_col.clamp(min=1)[None, :]
    return torch.where(overlap > 0, ratio.pow(cfg.alpha), torch.zeros_like(ratio))
