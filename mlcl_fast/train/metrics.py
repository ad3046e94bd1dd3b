"""Multi-label metrics from scores (probabilities) and multi-hot truth.

Micro-F1, Macro-F1 and Hamming loss follow scikit-learn's definitions (f1_score with
zero_division=0, hamming_loss); macro mAP is scikit-learn's average precision (ties scored as one
threshold) averaged over the labels that have at least one positive, a label without positives
having no defined AP. They are computed here in vectorised form, because scikit-learn's per-label
loops take tens of seconds at 1000 labels; the tests check them against scikit-learn.
P@k = |top-k ∩ y| / k averaged over all samples (the extreme-classification definition).
Thresholded metrics are given at 0.5 and at per-label thresholds tuned on validation.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def _dense(Y) -> np.ndarray:
    return (Y.toarray() if sp.issparse(Y) else np.asarray(Y)).astype(bool)


def precision_at_k(Y, scores: np.ndarray, k: int) -> float:
    Y = _dense(Y)
    k_eff = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    hits = np.take_along_axis(Y, top, axis=1).sum(axis=1)
    return float(np.mean(hits / k))


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


def evaluate(Y, scores: np.ndarray, thresholds=None) -> dict:
    """Every metric of the study. `thresholds` ([L], tuned on validation) adds the *_tuned entries."""
    scores = np.asarray(scores, dtype=np.float64)
    out = threshold_metrics(Y, scores >= 0.5)
    out["map"] = macro_map(Y, scores)
    for k in (1, 3, 5):
        out[f"p@{k}"] = precision_at_k(Y, scores, k)
    if thresholds is not None:
        tuned = threshold_metrics(Y, scores >= np.asarray(thresholds)[None, :])
        out.update({f"{key}_tuned": val for key, val in tuned.items()})
    return out


METRIC_LABELS = {
    "micro_f1": "Micro-F1", "macro_f1": "Macro-F1", "hamming": "Hamming",
    "micro_f1_tuned": "Micro-F1 (tuned thr.)", "macro_f1_tuned": "Macro-F1 (tuned thr.)",
    "hamming_tuned": "Hamming (tuned thr.)", "map": "macro mAP", "p@1": "P@1", "p@3": "P@3", "p@5": "P@5",
}
