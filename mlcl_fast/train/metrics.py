"""Multi-label metrics from scores (probabilities) and multi-hot truth.

Micro-F1, Macro-F1 and Hamming loss follow scikit-learn's definitions (f1_score with
zero_division=0, hamming_loss); macro mAP is scikit-learn's average precision (ties scored as one
threshold) averaged over the labels that have at least one positive, a label without positives
having no defined AP. They are computed here in vectorised form, because scikit-learn's per-label
loops take tens of seconds at 1000 labels; the tests check them against scikit-learn.
Thresholded metrics are given at 0.5 and at per-label thresholds tuned on validation.

Ranking metrics (the extreme-classification ones) are computed from the top-k labels of each row
and sparse truth, never from a dense [n, L] matrix: `topk_from_scores` reduces scores (a dense
array, taken a few rows at a time, an iterable of row blocks such as a model's batches, or a
sparse score matrix) to [n, k] label indices, and `ranking_metrics` scores them against a CSR
truth in O(n·k + nnz) memory, so L = 10^6 labels works. Every metric is averaged over all rows,
rows without a positive counting as 0 (as in the Extreme Classification Repository's code):

* P@k = |top-k ∩ y| / k.
* nDCG@k = DCG@k / IDCG@k, DCG@k = Σ_{r=1..k} [label at rank r ∈ y] / log2(r + 1), IDCG@k the
  DCG of a perfect ranking, Σ_{r=1..min(k, |y|)} 1 / log2(r + 1).
* Propensity-scored P@k and nDCG@k (Jain, Prabhu & Varma, KDD 2016) weight each correct label l
  by its inverse propensity 1/p_l (`inverse_propensity`), so that rare labels, the ones most often
  missing from the annotation, count more. Two conventions are in use, and both are reported:
  - `psp@k_raw`, `psndcg@k_raw`: the paper's definitions, PSP@k = (1/k) Σ_{r≤k} [l_r ∈ y] / p_{l_r}
    and PSnDCG@k = PSDCG@k / IDCG@k with PSDCG@k = Σ_{r≤k} [l_r ∈ y] / (p_{l_r} log2(r + 1)) and the
    unweighted IDCG@k above (unbounded: they grow with the weights);
  - `psp@k`, `psndcg@k`: the same divided by the value of the best achievable ranking (each row's
    true labels in decreasing order of 1/p_l), as the Extreme Classification Repository's
    evaluation code computes them (pyxclib's `psprecision`/`psndcg`, and napkinxc's
    `psprecision_at_k`/`psndcg_at_k` with their default normalize=True, "commonly used to report
    results"). The division is of sums over all rows (a ratio of means, not a mean of per-row
    ratios); the result is in [0, 1] and is NaN when no row has a positive.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
RANK_KS = (1, 3, 5)
"""The k of the ranking metrics that `evaluate` reports."""
TOPK_CHUNK_ELEMENTS = 1 << 22
"""`topk_from_scores` works on this many scores at a time (rows × labels; 32 MB of float64)."""

PROPENSITY_A, PROPENSITY_B = 0.55, 1.5
PROPENSITY_CONSTANTS = {
    "default": (0.55, 1.5),     # every other data set
    "wikipedia": (0.5, 0.4),    # WikiLSHTC-325K, WikipediaLarge-500K
    "amazon": (0.6, 2.6),       # Amazon-670K, Amazon-3M
}
"""The (A, B) of Jain et al. 2016's propensity model as published with the Extreme Classification
Repository (and used by its evaluation code, pyxclib, and by napkinxc)."""


def _dense(Y) -> np.ndarray:
    return (Y.toarray() if sp.issparse(Y) else np.asarray(Y)).astype(bool)


def _truth_csr(Y) -> sp.csr_matrix:
    """Multi-hot truth as a canonical CSR matrix (sorted, no duplicates, no stored zeros)."""
    if not sp.issparse(Y):
        return sp.csr_matrix(np.asarray(Y).astype(bool))
    Y = Y.tocsr()
    if not Y.has_canonical_format or (Y.data == 0).any():
        Y = Y.copy()
        Y.sum_duplicates()
        Y.eliminate_zeros()
    return Y


# ----------------------------------------------------------------------------------------------
# Top-k

def _topk_dense(S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a dense block, in the order of a stable descending sort (ties go to
    the lower label index); NaN ranks last, like -inf."""
    if np.isnan(S).any():
        S = np.where(np.isnan(S), -np.inf, S)
    b, L = S.shape
    if k >= L:
        idx = np.argsort(-S, axis=1, kind="stable")
        return idx.astype(np.int64), np.take_along_axis(S, idx, axis=1)
    kth = np.partition(S, L - k, axis=1)[:, L - k]          # the k-th largest score of each row
    rows, cols = np.nonzero(S >= kth[:, None])               # >= k candidates; more only on ties with it
    vals = S[rows, cols]
    order = np.lexsort((cols, -vals, rows))                  # by row, score descending, label ascending
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=b))[:-1]])
    take = order[starts[:, None] + np.arange(k)]
    return cols[take].astype(np.int64), vals[take]


def _topk_sparse(S: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the stored entries of each row; rows with fewer are padded with index -1, score -inf."""
    S = S.tocsr()
    n = S.shape[0]
    rows = np.repeat(np.arange(n), np.diff(S.indptr))
    vals = np.where(np.isnan(S.data), -np.inf, S.data).astype(np.float64)
    order = np.lexsort((S.indices, -vals, rows))
    rank = np.arange(len(rows)) - S.indptr[rows[order]]
    keep = rank < k
    idx = np.full((n, k), -1, dtype=np.int64)
    out = np.full((n, k), -np.inf)
    idx[rows[order][keep], rank[keep]] = S.indices[order][keep]
    out[rows[order][keep], rank[keep]] = vals[order][keep]
    return idx, out


def topk_from_scores(scores, k: int = 5, *, chunk_elements: int = TOPK_CHUNK_ELEMENTS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The k best labels of each row: (indices int64 [n, min(k, L)], their scores), best first,
    ties going to the lower label index (the order of np.argsort(-scores, kind="stable")).

    `scores`: a dense [n, L] array, processed `chunk_elements` scores at a time; an iterable of
    dense [b, L] row blocks (e.g. a model's predictions batch by batch, so that the [n, L] matrix
    never exists); or a scipy sparse matrix, whose unstored entries count as not predicted (rows
    with fewer than k stored entries are padded with index -1 and score -inf). Memory beyond the
    input: O(n·k) for the result plus one chunk."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    if sp.issparse(scores):
        return _topk_sparse(scores, int(min(k, scores.shape[1])))
    blocks = [scores] if getattr(scores, "ndim", None) == 2 else scores
    idx_parts, val_parts = [], []
    width, num_labels = k, None
    for block in blocks:
        block = np.asarray(block)
        if block.ndim != 2 or (num_labels is not None and block.shape[1] != num_labels):
            raise ValueError(f"scores: expected blocks of [rows, L] scores with one L, got a block of shape "
                             f"{block.shape}" + ("" if num_labels is None else f" after L = {num_labels}"))
        num_labels = block.shape[1]
        width = min(k, num_labels)
        step = max(1, chunk_elements // max(block.shape[1], 1))
        for s in range(0, block.shape[0], step):
            i, v = _topk_dense(block[s:s + step], width)
            idx_parts.append(i)
            val_parts.append(v)
    if not idx_parts:
        return np.empty((0, width), dtype=np.int64), np.empty((0, width))
    return np.concatenate(idx_parts), np.concatenate(val_parts)


# ----------------------------------------------------------------------------------------------
# Propensities (Jain, Prabhu & Varma, KDD 2016)

def inverse_propensity(Y_train, A: float = PROPENSITY_A, B: float = PROPENSITY_B) -> np.ndarray:
    """1 / p_l for each label ([L]), from the training labels: p_l = 1 / (1 + C e^{-A log(N_l + B)})
    = 1 / (1 + C (N_l + B)^{-A}), C = (log N - 1)(B + 1)^A, N the number of training rows, N_l those
    with label l, log natural (pyxclib's `compute_inv_propesity`, napkinxc's
    `Jain_et_al_inverse_propensity`). A and B depend on the data set: PROPENSITY_CONSTANTS."""
    Y = _truth_csr(Y_train)
    N, L = Y.shape
    if N < 3:
        raise ValueError(f"propensities need at least 3 training rows (log N > 1), got {N}")
    if not (np.isfinite(A) and np.isfinite(B) and B > 0):
        raise ValueError(f"propensity constants: expected finite A and B > 0, got A={A}, B={B}")
    counts = np.bincount(Y.indices, minlength=L).astype(np.float64)
    C = (np.log(N) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * (counts + B) ** (-A)


def propensity(Y_train, A: float = PROPENSITY_A, B: float = PROPENSITY_B) -> np.ndarray:
    """p_l for each label ([L]); see `inverse_propensity`."""
    return 1.0 / inverse_propensity(Y_train, A, B)


# ----------------------------------------------------------------------------------------------
# Ranking metrics from top-k indices

def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k) + 2.0)


def ranking_metrics(Y, topk: np.ndarray, ks: Sequence[int] = RANK_KS, *, scores: Optional[np.ndarray] = None,
                    inv_propensity: Optional[np.ndarray] = None) -> dict:
    """P@k and nDCG@k for k in `ks` and, given `inv_propensity` ([L], see `inverse_propensity`),
    psp@k, psndcg@k (normalised by the best achievable ranking, the Extreme Classification
    Repository's convention) and psp@k_raw, psndcg@k_raw (Jain et al.'s unnormalised
    definitions); see the module docstring.

    Y: truth [n, L], scipy sparse (kept sparse) or dense. topk: [n, m] label indices, best first,
    distinct within a row; -1 marks an empty slot; ranks beyond m count as misses. `scores`
    ([n, m], optional): reorder each row by descending score first (for unsorted top-k)."""
    Y = _truth_csr(Y)
    n, L = Y.shape
    idx = np.asarray(topk)
    if idx.ndim != 2 or idx.shape[0] != n:
        raise ValueError(f"topk: expected [n, m] label indices with n = {n}, got shape {idx.shape}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"topk: expected integer label indices, got {idx.dtype}")
    if idx.size and (idx.max() >= L or idx.min() < -1):
        raise ValueError(f"topk: label indices must be in [0, {L}) (or -1 for an empty slot)")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != idx.shape:
            raise ValueError(f"scores: expected the shape of topk {idx.shape}, got {scores.shape}")
        idx = np.take_along_axis(idx, np.argsort(-scores, axis=1, kind="stable"), axis=1)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected integers >= 1, got {ks}")
    K = max(ks)
    idx = idx[:, :K].astype(np.int64)
    if idx.shape[1] < K:
        idx = np.hstack([idx, np.full((n, K - idx.shape[1]), -1, dtype=np.int64)])
    keys = ["p", "ndcg"] + (["psp", "psndcg", "psp_raw", "psndcg_raw"] if inv_propensity is not None else [])
    if n == 0:
        return {_key(name, k): float("nan") for name in keys for k in ks}

    # hits[i, r]: the label at rank r of row i is a positive (one search in the sorted CSR keys)
    row_nnz = np.diff(Y.indptr)
    y_keys = np.repeat(np.arange(n, dtype=np.int64), row_nnz) * L + Y.indices
    p_keys = np.arange(n, dtype=np.int64)[:, None] * L + idx
    if y_keys.size:
        at = np.minimum(np.searchsorted(y_keys, p_keys), y_keys.size - 1)
        hits = (y_keys[at] == p_keys) & (idx >= 0)
    else:
        hits = np.zeros(idx.shape, dtype=bool)

    disc = _discounts(K)
    ideal_dcg = np.cumsum(disc)                                   # IDCG@k for |y| >= k
    has_pos = row_nnz > 0

    def per_row_ndcg(gain: np.ndarray, k: int) -> np.ndarray:      # gain [n, K] -> [n], 0 without positives
        idcg = ideal_dcg[np.clip(np.minimum(row_nnz, k) - 1, 0, None)]
        return np.where(has_pos, gain[:, :k] @ disc[:k] / idcg, 0.0)

    out = {}
    for k in ks:
        out[f"p@{k}"] = float(hits[:, :k].sum() / (n * k))
    for k in ks:
        out[f"ndcg@{k}"] = float(per_row_ndcg(hits.astype(np.float64), k).mean())
    if inv_propensity is None:
        return out

    w = np.asarray(inv_propensity, dtype=np.float64).ravel()
    if w.shape != (L,):
        raise ValueError(f"inv_propensity: expected {L} weights, got shape {w.shape}")
    gain = np.where(hits, w[np.maximum(idx, 0)], 0.0)
    # the best achievable gains: each row's positives by decreasing weight, zero-padded to K
    rows = np.repeat(np.arange(n), row_nnz)
    pw = w[Y.indices]
    order = np.lexsort((-pw, rows))
    rank = np.arange(rows.size) - Y.indptr[rows[order]]
    keep = rank < K
    best = np.zeros((n, K))
    best[rows[order][keep], rank[keep]] = pw[order][keep]
    for k in ks:
        num, den = gain[:, :k].sum(), best[:, :k].sum()
        out[f"psp@{k}"] = float(num / den) if den > 0 else float("nan")
    for k in ks:
        num, den = per_row_ndcg(gain, k).sum(), per_row_ndcg(best, k).sum()
        out[f"psndcg@{k}"] = float(num / den) if den > 0 else float("nan")
    for k in ks:
        out[f"psp@{k}_raw"] = float(gain[:, :k].sum() / (n * k))
    for k in ks:
        out[f"psndcg@{k}_raw"] = float(per_row_ndcg(gain, k).mean())
    return out


def _key(name: str, k: int) -> str:
    return f"{name[:-4]}@{k}_raw" if name.endswith("_raw") else f"{name}@{k}"


def precision_at_k(Y, scores: np.ndarray, k: int) -> float:
    """P@k from a dense [n, L] score matrix (ties go to the lower label index)."""
    top, _ = topk_from_scores(np.asarray(scores), k)
    return ranking_metrics(Y, top, (k,))[f"p@{k}"]


def label_average_precision(Y, scores: np.ndarray) -> np.ndarray:
    """Average precision per label ([L], NaN where a label has no positive), with tied scores
    counted as one threshold as scikit-learn's average_precision_score does."""
    Y = _dense(Y)
    n = Y.shape[0]
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    hits = np.take_along_axis(Y, order, axis=0)
    cum = np.cumsum(hits, axis=0, dtype=np.float64)
    # every position is scored with the precision at the end of its block of tied scores
    last = np.ones_like(s, dtype=bool)
    last[:-1] = s[:-1] != s[1:]
    idx = np.where(last, np.arange(n)[:, None], n - 1)
    end = np.minimum.accumulate(idx[::-1], axis=0)[::-1]
    precision = np.take_along_axis(cum, end, axis=0) / (end + 1)
    pos = hits.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos > 0, (hits * precision).sum(axis=0) / pos, np.nan)


def macro_map(Y, scores: np.ndarray) -> float:
    ap = label_average_precision(Y, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def threshold_metrics(Y, pred: np.ndarray) -> dict:
    Y = _dense(Y)
    pred = np.asarray(pred, dtype=bool)
    tp = (pred & Y).sum(axis=0).astype(np.float64)
    fp = (pred & ~Y).sum(axis=0).astype(np.float64)
    fn = (~pred & Y).sum(axis=0).astype(np.float64)
    per_label = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / micro_den) if micro_den > 0 else 0.0,
        "macro_f1": float(per_label.mean()),
        "hamming": float((fp.sum() + fn.sum()) / Y.size),
    }


def tune_thresholds(Y_val, scores_val: np.ndarray, grid=THRESHOLD_GRID) -> np.ndarray:
    """Per label, the grid threshold with the best validation F1 (ties: the one closest to 0.5;
    labels without a validation positive keep 0.5)."""
    Y = _dense(Y_val)
    order = np.argsort(np.abs(grid - 0.5), kind="stable")
    grid = grid[order]
    pred = scores_val[None, :, :] >= grid[:, None, None]           # [G, n, L]
    tp = (pred & Y[None]).sum(axis=1)
    fp = (pred & ~Y[None]).sum(axis=1)
    fn = Y.sum(axis=0)[None, :] - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = grid[np.argmax(f1, axis=0)]                             # argmax keeps the first (closest to 0.5)
    best[~Y.any(axis=0)] = 0.5
    return best


def evaluate(Y, scores: np.ndarray, thresholds=None, inv_propensity=None) -> dict:
    """Every metric of the study. `thresholds` ([L], tuned on validation) adds the *_tuned entries;
    `inv_propensity` ([L], from the training labels: `inverse_propensity`) adds the
    propensity-scored ranking metrics (psp@k, psndcg@k and their _raw forms)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = threshold_metrics(Y, scores >= 0.5)
    out["map"] = macro_map(Y, scores)
    top, _ = topk_from_scores(scores, max(RANK_KS))
    out.update(ranking_metrics(Y, top, RANK_KS, inv_propensity=inv_propensity))
    if thresholds is not None:
        tuned = threshold_metrics(Y, scores >= np.asarray(thresholds)[None, :])
        out.update({f"{key}_tuned": val for key, val in tuned.items()})
    return out


METRIC_LABELS = {
    "micro_f1": "Micro-F1", "macro_f1": "Macro-F1", "hamming": "Hamming",
    "micro_f1_tuned": "Micro-F1 (tuned thr.)", "macro_f1_tuned": "Macro-F1 (tuned thr.)",
    "hamming_tuned": "Hamming (tuned thr.)", "map": "macro mAP",
    **{f"p@{k}": f"P@{k}" for k in RANK_KS}, **{f"ndcg@{k}": f"nDCG@{k}" for k in RANK_KS},
    **{f"psp@{k}": f"PSP@{k}" for k in RANK_KS}, **{f"psndcg@{k}": f"PSnDCG@{k}" for k in RANK_KS},
    **{f"psp@{k}_raw": f"PSP@{k} (unnormalised)" for k in RANK_KS},
    **{f"psndcg@{k}_raw": f"PSnDCG@{k} (unnormalised)" for k in RANK_KS},
}
