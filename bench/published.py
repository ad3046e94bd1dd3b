"""The dense formulation of REG, as the authors' code computes it (SPEC, "How the official code scales").

Anchors and columns are the same M = N + L embeddings (samples, then prototypes). The label
weights are built as one M x M x L tensor

    T[i, j, k] = y_ik · y_jk · [j != i] · f_ij          f_ij = (c_ij / a_j)^alpha  (alpha >= 0)
                                                        f_ij = [y_j ⊆ y_i]         (alpha < 0)

and reduced: Z_ik = Σ_j T[i, j, k], w_ij = (1/a_i) Σ_{k: Z_ik > 0} T[i, j, k] / Z_ik.
The rest is SPEC: log-softmax over j != i with β_j = beta for sample columns, the regulariser
r_ij = max(p_ij - w_ij, 0) on positives (a constant), mean over anchors with Σ_j w_ij > 0.

Memory is M²·L elements for T alone: the point of this provider is to show that cost, so T is
built for real (in place where possible, one copy at a time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mlcl_fast.labels import LabelSets
from mlcl_fast.presets import LossConfig

NORM_EPS = 1e-12


def supports(cfg: LossConfig) -> bool:
    """The configurations this formulation covers: REG and its variants (alpha, reg on/off)."""
    return (cfg.weighting == "label" and cfg.f == "overlap" and cfg.prototype_mode == "rows"
            and cfg.beta > 0 and cfg.anchor_weight == "uniform")


def weight_tensor_bytes(num_samples: int, num_labels: int, itemsize: int = 4) -> int:
    """Bytes of the M x M x L label-weight tensor."""
    m = num_samples + num_labels
    return m * m * num_labels * itemsize


def published_loss(features: Tensor, labels: LabelSets, prototypes: Tensor, cfg: LossConfig,
                   temperature: float) -> Tensor:
    """Mean REG loss of features [N, d] with prototypes [L, d] (SPEC), via the dense tensor."""
    if not supports(cfg):
        raise ValueError(f"cfg: the published formulation covers weighting='label', f='overlap', "
                         f"prototype_mode='rows', beta > 0, anchor_weight='uniform'; got {cfg}")
    if features.dim() != 2 or prototypes.dim() != 2 or prototypes.shape[1] != features.shape[1]:
        raise ValueError(f"features, prototypes: expected [N, d] and [L, d], got {tuple(features.shape)} "
                         f"and {tuple(prototypes.shape)}")
    n, num_labels = features.shape[0], prototypes.shape[0]
    if labels.batch_size != n or labels.num_labels != num_labels:
        raise ValueError(f"labels: expected {n} label sets over {num_labels} labels, got "
                         f"{labels.batch_size} over {labels.num_labels}")
    dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    emb = F.normalize(torch.cat([features, prototypes.to(features.dtype)]).to(dtype), dim=1, eps=NORM_EPS)
    logits = emb @ emb.T / temperature
    with torch.no_grad():
        weights = _dense_weights(labels, num_labels, cfg.alpha, dtype)
    return _reg_from_weights(logits, weights, n, cfg)


def _dense_weights(labels: LabelSets, num_labels: int, alpha: float, dtype) -> Tensor:
    device = labels.device
    y = torch.cat([labels.dense(dtype), torch.eye(num_labels, dtype=dtype, device=device)])  # [M, L]
    m = y.shape[0]
    a = y.sum(1)
    overlap = y @ y.T                                                   # c_ij
    if alpha < 0:
        pair = (overlap == a[None, :]).to(dtype)
    else:
        ratio = overlap / a.clamp(min=1)[None, :]
        pair = torch.where(overlap > 0, ratio.pow(alpha), torch.zeros_like(ratio))
    pair.fill_diagonal_(0)                                              # an anchor is never its own column

    t = y[:, None, :] * y[None, :, :]                                   # [M, M, L] label-weight tensor
    t.mul_(pair[:, :, None])
    z = t.sum(1)                                                        # Z_ik
    inv_z = torch.where(z > 0, 1.0 / z.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(z))
    t.mul_(inv_z[:, None, :])
    weights = t.sum(2) / a.clamp(min=1)[:, None]
    del t
    assert weights.shape == (m, m)
    return weights


def _reg_from_weights(logits: Tensor, weights: Tensor, n: int, cfg: LossConfig) -> Tensor:
    m = logits.shape[0]
    log_beta = torch.zeros(m, dtype=logits.dtype, device=logits.device)
    log_beta[:n] = torch.log(torch.tensor(cfg.beta, dtype=logits.dtype))
    eye = torch.eye(m, dtype=torch.bool, device=logits.device)
    log_denominator = torch.logsumexp((logits + log_beta).masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_p = logits - log_denominator
    loss = -(weights * log_p).sum(1)
    if cfg.reg:
        p = torch.exp(log_p.detach() + log_beta)
        r = torch.where(weights > 0, (p - weights).clamp(min=0), torch.zeros_like(p))
        loss = loss - (r * logits).sum(1)
    valid = weights.sum(1) > 0
    return torch.where(valid, loss, torch.zeros_like(loss)).sum() / valid.sum().clamp(min=1).to(loss.dtype)
