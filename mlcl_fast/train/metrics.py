"""Multi-label metrics from scores (probabilities) and multi-hot truth.

Micro-F1, Macro-F1 and Hamming loss follow scikit-learn's definitions (f1_score with
zero_division=0, hamming_loss); macro mAP is scikit-learn's average precision (ties scored as one
threshold) averaged over the labels that have at least one positive, a label without positives
having no defined AP. They are computed here in vectorised form, because scikit-learn's per-label
loops take tens of seconds at 1000 labels; the tests check them against scikit-learn.
Thresholded metrics are given at 0.5 and at per-label thresholds tuned on validation.

None of them needs the [n, L] score matrix: `ScoreStream` takes scores a block of rows at a time
and keeps per-label counts (true positives are the positives whose score reaches the threshold,
so only predictions need counting), the scores of the true positives, and each row's top-k; macro
mAP is exact with a second pass over the same blocks (see ScoreStream). The dense functions
(`evaluate`, `tune_thresholds`, `macro_map`, ...) run the same code over row blocks of an array.

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
"""`topk_from_scores` and `ScoreStream` work on this many scores at a time (rows × labels; 32 MB
of float64)."""
EVAL_BLOCK_ELEMENTS = 1 << 24
"""The most scores a model computes at once when it is evaluated (rows × labels; 64 MB of
float32): at 10^6 labels a block is 16 rows."""

PROPENSITY_A, PROPENSITY_B = 0.55, 1.5
PROPENSITY_CONSTANTS = {
    "default": (0.55, 1.5),     # every other data set
    "wikipedia": (0.5, 0.4),    # WikiLSHTC-325K, WikipediaLarge-500K
    "amazon": (0.6, 2.6),       # Amazon-670K, Amazon-3M
}
"""The (A, B) of Jain et al. 2016's propensity model as published with the Extreme Classification
Repository (and used by its evaluation code, pyxclib, and by napkinxc)."""


def truth_csr(Y) -> sp.csr_matrix:
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
    Y = truth_csr(Y_train)
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
    Y = truth_csr(Y)
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


# ----------------------------------------------------------------------------------------------
# Thresholded metrics and average precision from score blocks

def block_rows(num_labels: int, most: int) -> int:
    """Rows of one block of scores: `most`, or fewer where [most, L] would exceed
    EVAL_BLOCK_ELEMENTS (so a block of a model's scores stays at tens of MB at any L)."""
    return max(1, min(int(most), EVAL_BLOCK_ELEMENTS // max(int(num_labels), 1)))


def _lower_bound(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, query: np.ndarray) -> np.ndarray:
    """For each query q, the first position in values[lo:hi] (a sorted ascending segment of the flat
    array `values`) holding a value >= q, or hi; a binary search run on every query at once."""
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    active = lo < hi
    while active.any():
        mid = np.where(active, (lo + hi) // 2, 0)
        right = active & (values[mid] < query)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
        active = lo < hi
    return lo


def _count_metrics(tp: np.ndarray, predicted: np.ndarray, positives: np.ndarray, n: int) -> dict:
    """Micro-F1, Macro-F1 (every label, F1 = 0 where TP = 0) and Hamming loss from per-label counts
    of true positives, predictions and positives over n rows."""
    tp, predicted, positives = (np.asarray(a, dtype=np.float64) for a in (tp, predicted, positives))
    fp, fn = predicted - tp, positives - tp
    per_label = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    micro_den = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "micro_f1": float(2 * tp.sum() / micro_den) if micro_den > 0 else 0.0,
        "macro_f1": float(per_label.mean()) if per_label.size else 0.0,
        "hamming": float((fp.sum() + fn.sum()) / max(n * tp.size, 1)),
    }


def threshold_metrics(Y, pred) -> dict:
    """Micro-F1, Macro-F1 and Hamming loss of a boolean prediction matrix [n, L] against the truth
    (dense or scipy sparse)."""
    Y = truth_csr(Y)
    pred = np.asarray(pred, dtype=bool)
    rows = np.repeat(np.arange(Y.shape[0]), np.diff(Y.indptr))
    tp = np.bincount(Y.indices, weights=pred[rows, Y.indices], minlength=Y.shape[1])
    return _count_metrics(tp, pred.sum(axis=0), np.bincount(Y.indices, minlength=Y.shape[1]), Y.shape[0])


class ScoreStream:
    """Every metric of `evaluate` from scores [n, L] that arrive as blocks of rows, in row order,
    so that the score matrix never exists: memory O(n·k + nnz + L·G), time O(n·L) per pass.

    Pass 1 (`add`, every block once): the top-k labels of each row (ranking metrics), the scores
    of the true positives, and per label the number of rows predicted at threshold 0.5, at the
    `thresholds` given, and, with `tune`, at each point of the threshold grid (a histogram of
    [L, G] counts, from which `tuned_thresholds` picks per-label thresholds and `metrics` gives
    the metrics at any thresholds drawn from the grid). Thresholded metrics need nothing more:
    a label's true positives are its positives whose score reaches the threshold.

    Pass 2 (`add_again`, the same blocks once more): exact macro average precision. A label's AP
    averages, over its positives p, (positives scored >= s_p) / (rows scored >= s_p) (ties form
    one threshold, as in scikit-learn); the denominator needs every row's score on that label
    compared with scores known only after pass 1, hence the second pass, which keeps per-positive
    counts: per block, the columns of labels with a positive are sorted and every positive's
    count found by binary search: O(rows·P·log b) for P <= L labels with a positive and blocks
    of b rows, the order of the scoring itself. A scorer must give the same scores in both
    passes (a model in eval mode does); should they differ by rounding (a BLAS that picks kernels
    by memory alignment), only positives tied to within that rounding are affected, and a
    positive always counts itself. Scores are taken as float64 (float32 blocks convert exactly),
    so thresholds compare as in a dense float64 evaluation. Scores are assumed finite (a NaN is
    never predicted and ranks last in the top-k; its AP is undefined).
    """

    def __init__(self, Y, *, k: int = max(RANK_KS), thresholds=None, tune: bool = False,
                 grid=THRESHOLD_GRID, chunk_elements: int = TOPK_CHUNK_ELEMENTS):
        self.Y = Y = truth_csr(Y)
        self.n, self.L = n, L = Y.shape
        self.k = max(1, min(int(k), L))
        self.chunk_elements = chunk_elements
        self.pos_row = np.repeat(np.arange(n, dtype=np.int64), np.diff(Y.indptr))
        self.pos_col = Y.indices.astype(np.int64)
        self.positives = np.bincount(self.pos_col, minlength=L)
        self.pos_score = np.full(self.pos_col.size, np.nan)
        self.predicted_half = np.zeros(L, dtype=np.int64)
        self.thresholds = None
        if thresholds is not None:
            self.thresholds = self._check_thresholds(thresholds)
            self.predicted_thr = np.zeros(L, dtype=np.int64)
        self.grid = np.sort(np.asarray(grid, dtype=np.float64))
        self.hist = np.zeros((L, self.grid.size), dtype=np.int32) if tune else None   # rows < 2^31
        self.top_idx, self.top_val = [], []
        self.rows, self.rows_again = 0, 0
        # pass 2: labels that have a positive, and each positive's place among them
        self.ap_labels = np.flatnonzero(self.positives)
        self.pos_slot = np.searchsorted(self.ap_labels, self.pos_col)
        self.at_least = np.zeros(self.pos_col.size, dtype=np.int64)   # rows scored >= s_p, so far

    def _check_thresholds(self, thresholds) -> np.ndarray:
        t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (self.L,))
        return np.ascontiguousarray(t)

    def _blocks(self, block, done: int, width: int):
        """(first row, rows) of `block` in parts of about chunk_elements / width rows."""
        block = block.detach().cpu().numpy() if hasattr(block, "detach") else np.asarray(block)
        if block.ndim != 2 or block.shape[1] != self.L:
            raise ValueError(f"scores: expected blocks of [rows, {self.L}] scores, got shape {block.shape}")
        if done + block.shape[0] > self.n:
            raise ValueError(f"scores: more rows than the {self.n} rows of the truth")
        step = max(1, self.chunk_elements // max(width, 1))
        for s in range(0, block.shape[0], step):
            yield done + s, block[s:s + step]

    def add(self, block) -> None:
        """Pass 1: the next rows' scores, a [b, L] array (numpy or torch)."""
        for r0, part in self._blocks(block, self.rows, self.L):
            c = np.asarray(part, dtype=np.float64)
            b = c.shape[0]
            idx, val = _topk_dense(c, self.k)
            self.top_idx.append(idx)
            self.top_val.append(val)
            p0, p1 = self.Y.indptr[r0], self.Y.indptr[r0 + b]
            self.pos_score[p0:p1] = c[self.pos_row[p0:p1] - r0, self.pos_col[p0:p1]]
            self.predicted_half += (c >= 0.5).sum(axis=0)
            if self.thresholds is not None:
                self.predicted_thr += (c >= self.thresholds[None, :]).sum(axis=0)
            if self.hist is not None:
                # only scores at or above the lowest grid point are counted: with many labels
                # they are a small share of the block
                rows, cols = np.nonzero(c >= self.grid[0])
                bins = np.searchsorted(self.grid, c[rows, cols], side="right") - 1
                keys, counts = np.unique(cols * self.grid.size + bins, return_counts=True)
                self.hist.reshape(-1)[keys] += counts
            self.rows += b

    def add_again(self, block) -> None:
        """Pass 2 (for macro AP): the same scores as pass 1, in the same order."""
        if self.rows < self.n:
            raise ValueError(f"scores: the second pass starts after {self.rows} of {self.n} rows of the first")
        # only the columns of labels with a positive are read: parts of more rows
        for r0, part in self._blocks(block, self.rows_again, self.ap_labels.size):
            b = part.shape[0]
            if self.ap_labels.size:
                cols = np.ascontiguousarray(np.asarray(part)[:, self.ap_labels].T)   # [labels with a positive, b]
                cols.sort(axis=1)
                flat = cols.reshape(-1)
                start = self.pos_slot * b
                self.at_least += b - (_lower_bound(flat, start, start + b, self.pos_score) - start)
            self.rows_again += b

    # -- results ---------------------------------------------------------------------------------

    def _require(self, second: bool = False) -> None:
        if self.rows != self.n:
            raise ValueError(f"scores: {self.rows} of {self.n} rows seen")
        if second and self.rows_again != self.n:
            raise ValueError(f"scores: {self.rows_again} of {self.n} rows seen again (macro AP needs a second pass)")

    def topk(self) -> tuple[np.ndarray, np.ndarray]:
        self._require()
        if not self.top_idx:
            return np.empty((0, self.k), dtype=np.int64), np.empty((0, self.k))
        return np.concatenate(self.top_idx), np.concatenate(self.top_val)

    def _tp_at(self, thresholds: np.ndarray) -> np.ndarray:
        hit = self.pos_score >= thresholds[self.pos_col]
        return np.bincount(self.pos_col, weights=hit, minlength=self.L)

    def _predicted_at(self, thresholds: np.ndarray) -> np.ndarray:
        if self.thresholds is not None and np.array_equal(thresholds, self.thresholds):
            return self.predicted_thr
        if np.all(thresholds == 0.5):
            return self.predicted_half
        g = np.searchsorted(self.grid, thresholds)
        if self.hist is None or not np.array_equal(self.grid[np.minimum(g, self.grid.size - 1)], thresholds):
            raise ValueError("thresholds: counted only at 0.5, at the thresholds given to ScoreStream, and (with "
                             "tune=True) at the points of the grid")
        out = np.zeros(self.L, dtype=np.int64)
        for j in range(self.grid.size):          # rows scored >= grid[g_l]: bins g_l and above
            out += np.where(g <= j, self.hist[:, j], 0)
        return out

    def thresholded(self, thresholds=0.5) -> dict:
        """Micro-F1, Macro-F1 and Hamming loss at `thresholds` (a number or [L])."""
        self._require()
        t = self._check_thresholds(thresholds)
        return _count_metrics(self._tp_at(t), self._predicted_at(t), self.positives, self.n)

    def label_average_precision(self) -> np.ndarray:
        """Average precision per label ([L]; NaN where a label has no positive)."""
        self._require(second=True)
        ap = np.full(self.L, np.nan)
        if not self.pos_col.size:
            return ap
        # positives scored >= s_p among the positives of its own label
        order = np.lexsort((self.pos_score, self.pos_col))
        scores_sorted = self.pos_score[order]
        seg_start = np.searchsorted(self.pos_col[order], self.pos_col, side="left")
        seg_end = np.searchsorted(self.pos_col[order], self.pos_col, side="right")
        positives_above = seg_end - _lower_bound(scores_sorted, seg_start, seg_end, self.pos_score)
        precision = positives_above / np.maximum(self.at_least, positives_above)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[self.ap_labels] = (np.bincount(self.pos_col, weights=precision, minlength=self.L)[self.ap_labels]
                                  / self.positives[self.ap_labels])
        return ap

    def macro_map(self) -> float:
        ap = self.label_average_precision()
        return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")

    def tuned_thresholds(self) -> np.ndarray:
        """Per label, the grid threshold with the best F1 (ties: the one closest to 0.5; labels
        without a positive keep 0.5); needs tune=True."""
        self._require()
        if self.hist is None:
            raise ValueError("tuned_thresholds: the ScoreStream was made without tune=True")
        G = self.grid.size
        preference = np.empty(G, dtype=np.int64)     # 0 for the grid point closest to 0.5: it wins ties
        preference[np.argsort(np.abs(self.grid - 0.5), kind="stable")] = np.arange(G)
        pos_bin = np.searchsorted(self.grid, self.pos_score, side="right") - 1   # -1: below the grid
        tp = np.zeros(self.L, dtype=np.int64)          # positives scored >= grid[g], for g from the top down
        predicted = np.zeros(self.L, dtype=np.int64)   # rows scored >= grid[g]
        best = np.full(self.L, 0.5)
        best_f1 = np.full(self.L, -1.0)
        best_pref = np.full(self.L, G)
        for g in range(G - 1, -1, -1):
            tp += np.bincount(self.pos_col[pos_bin == g], minlength=self.L)
            predicted += self.hist[:, g]
            f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + (predicted - tp) + (self.positives - tp), 1), 0.0)
            better = (f1 > best_f1) | ((f1 == best_f1) & (preference[g] < best_pref))
            best[better], best_f1[better], best_pref[better] = self.grid[g], f1[better], preference[g]
        best[self.positives == 0] = 0.5
        return best

    def metrics(self, thresholds=None, inv_propensity=None, ks=RANK_KS) -> dict:
        """The metrics of `evaluate`: thresholded ones at 0.5 (and `thresholds` as *_tuned),
        macro mAP (after pass 2), and the ranking metrics of the top-k."""
        out = self.thresholded(0.5)
        out["map"] = self.macro_map()
        out.update(ranking_metrics(self.Y, self.topk()[0], ks, inv_propensity=inv_propensity))
        if thresholds is not None:
            out.update({f"{key}_tuned": val for key, val in self.thresholded(thresholds).items()})
        return out


def _row_blocks(scores: np.ndarray):
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores: expected a [n, L] array, got shape {scores.shape}")
    step = max(1, TOPK_CHUNK_ELEMENTS // max(scores.shape[1], 1))
    return (scores[s:s + step] for s in range(0, scores.shape[0], step))


def _stream(Y, scores, second_pass: bool = True, **options) -> ScoreStream:
    stream = ScoreStream(Y, **options)
    for block in _row_blocks(scores):
        stream.add(block)
    if second_pass:
        for block in _row_blocks(scores):
            stream.add_again(block)
    return stream


def label_average_precision(Y, scores: np.ndarray) -> np.ndarray:
    """Average precision per label ([L], NaN where a label has no positive), with tied scores
    counted as one threshold as scikit-learn's average_precision_score does."""
    return _stream(Y, scores).label_average_precision()


def macro_map(Y, scores: np.ndarray) -> float:
    return _stream(Y, scores).macro_map()


def tune_thresholds(Y_val, scores_val: np.ndarray, grid=THRESHOLD_GRID) -> np.ndarray:
    """Per label, the grid threshold with the best validation F1 (ties: the one closest to 0.5;
    labels without a validation positive keep 0.5)."""
    return _stream(Y_val, scores_val, second_pass=False, tune=True, grid=grid).tuned_thresholds()


def evaluate(Y, scores: np.ndarray, thresholds=None, inv_propensity=None) -> dict:
    """Every metric of the study. `thresholds` ([L], tuned on validation) adds the *_tuned entries;
    `inv_propensity` ([L], from the training labels: `inverse_propensity`) adds the
    propensity-scored ranking metrics (psp@k, psndcg@k and their _raw forms). A model's scores
    go through `ScoreStream` block by block instead (the training protocols do)."""
    return _stream(Y, scores, thresholds=thresholds).metrics(thresholds, inv_propensity)


METRIC_LABELS = {
    "micro_f1": "Micro-F1", "macro_f1": "Macro-F1", "hamming": "Hamming",
    "micro_f1_tuned": "Micro-F1 (tuned thr.)", "macro_f1_tuned": "Macro-F1 (tuned thr.)",
    "hamming_tuned": "Hamming (tuned thr.)", "map": "macro mAP",
    **{f"p@{k}": f"P@{k}" for k in RANK_KS}, **{f"ndcg@{k}": f"nDCG@{k}" for k in RANK_KS},
    **{f"psp@{k}": f"PSP@{k}" for k in RANK_KS}, **{f"psndcg@{k}": f"PSnDCG@{k}" for k in RANK_KS},
    **{f"psp@{k}_raw": f"PSP@{k} (unnormalised)" for k in RANK_KS},
    **{f"psndcg@{k}_raw": f"PSnDCG@{k} (unnormalised)" for k in RANK_KS},
}
