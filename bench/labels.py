"""Label sets for the benchmarks, as padded index matrices (never dense).

Every generator returns `index` [n, K] int64, each row sorted ascending, unique, padded with -1
at the end (mlcl_fast's canonical form), so a sweep point at L = 10^6 costs O(n·K), not O(n·L).

Regimes
- `few`:       L <= 128, sizes 1..8, labels uniform: most pairs of samples share a label.
- `powerlaw`:  Zipf-like label frequency (p(rank r) ∝ r^-exponent, exponent 1.1), sizes 2..20;
               each sample draws its labels by frequency without replacement.
- `bibtex`, `delicious`, ...: rows sampled from a real training label matrix stored in the
               layout of ../shared/data/load_npz.py (CSR parts `Y_train_indices/_indptr/_shape`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mlcl_fast.labels import LabelSets, as_label_sets

REPO = Path(__file__).resolve().parents[1]
REAL_DATASETS = ("bibtex", "delicious")
# Largest label set of any training row (both datasets' sizes are checked by tests/test_bench.py).
REAL_MAX_LABELS = {"bibtex": 28, "delicious": 25}
FEW_MAX_SIZE = 8
POWERLAW_SIZES = (2, 20)
ZIPF_EXPONENT = 1.1


def powerlaw_labels(n: int, num_labels: int, *, exponent: float = ZIPF_EXPONENT,
                    min_size: int = POWERLAW_SIZES[0], max_size: int = POWERLAW_SIZES[1], seed: int = 0,
                    permute: bool = True) -> Tensor:
    """n label sets over `num_labels` labels, sizes uniform in [min_size, max_size] (capped at L).

    Label of rank r has weight r^-exponent (exponent 0: uniform). A sample's labels are drawn
    one after another by these weights, skipping labels it already has (sampling without
    replacement). With `permute`, ranks map to label ids through a random permutation, so
    frequent labels are not all small indices.
    """
    if n < 0 or num_labels < 1:
        raise ValueError(f"n, num_labels: expected n >= 0 and num_labels >= 1, got {n}, {num_labels}")
    max_size = min(max_size, num_labels)
    min_size = min(min_size, max_size)
    if min_size < 0:
        raise ValueError(f"min_size: expected >= 0, got {min_size}")
    gen = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, num_labels + 1, dtype=torch.float64).pow_(-exponent)
    cdf = torch.cumsum(weights, 0)
    cdf /= cdf[-1].clone()
    sizes = torch.randint(min_size, max_size + 1, (n,), generator=gen)

    ranks = torch.full((n, max_size), -1, dtype=torch.int64)
    todo = torch.arange(n)
    draws = 2 * max_size
    for _ in range(6):
        if todo.numel() == 0:
            break
        got, ok = _draw_distinct(cdf, sizes[todo], max_size, draws, gen)
        ranks[todo[ok]] = got[ok]
        todo = todo[~ok]
        draws *= 2
    if todo.numel():  # very skewed weights: finish the few stubborn rows exactly
        rng = np.random.default_rng(seed + 1)
        p = (weights / weights.sum()).numpy()
        for row in todo.tolist():
            k = int(sizes[row])
            ranks[row, :k] = torch.from_numpy(rng.choice(num_labels, size=k, replace=False, p=p))

    labels = ranks
    if permute:
        perm = torch.randperm(num_labels, generator=gen)
        labels = torch.where(ranks >= 0, perm[ranks.clamp(min=0)], ranks)
    return sort_padded(labels, width=int(sizes.max()) if n else 0)


def _draw_distinct(cdf: Tensor, sizes: Tensor, width: int, draws: int, gen) -> tuple[Tensor, Tensor]:
    """Per row: the first sizes[r] distinct values of `draws` weighted draws, in draw order.

    Returns ([rows, width] ranks, -1 padded; [rows] bool: the row reached its size)."""
    rows = sizes.numel()
    u = torch.rand(rows, draws, generator=gen, dtype=torch.float64)
    vals = torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)
    sorted_vals, order = vals.sort(dim=1, stable=True)
    first_sorted = torch.ones_like(sorted_vals, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    first = torch.zeros_like(first_sorted).scatter_(1, order, first_sorted)  # first occurrence, draw order
    keep = first & (first.cumsum(1) <= sizes[:, None])
    ok = keep.sum(1) == sizes
    # move kept draws to the front, preserving draw order
    pos = torch.where(keep, torch.arange(draws).expand(rows, draws), draws)
    front = pos.sort(dim=1).values[:, :width]
    out = torch.where(front < draws, vals.gather(1, front.clamp(max=draws - 1)), torch.full_like(front, -1))
    return out, ok


def few_labels(n: int, num_labels: int = 64, *, max_size: int = FEW_MAX_SIZE, seed: int = 0) -> Tensor:
    """Small label space with dense overlaps: sizes 1..max_size, labels uniform."""
    if num_labels > 128:
        raise ValueError(f"num_labels: the 'few' regime is for L <= 128, got {num_labels}")
    return powerlaw_labels(n, num_labels, exponent=0.0, min_size=1, max_size=max_size, seed=seed, permute=False)


def sort_padded(labels: Tensor, width: Optional[int] = None) -> Tensor:
    """Rows of labels with -1 holes -> canonical rows (ascending, -1 at the end), `width` columns."""
    big = torch.iinfo(torch.int64).max
    out = torch.where(labels >= 0, labels, big).sort(dim=1).values
    out = torch.where(out == big, -1, out)
    return out if width is None else out[:, :width]


def data_dirs() -> list[Path]:
    """Where real label matrices are looked for, first hit wins."""
    dirs = [os.environ.get("MLCL_FAST_DATA_DIR")]
    dirs += [REPO.parent / "shared" / "data", REPO / "shared" / "data", REPO / ".benchdata"]
    return [Path(d) for d in dirs if d]


def find_dataset(name: str) -> Optional[Path]:
    for d in data_dirs():
        if (d / f"{name}.npz").is_file():
            return d / f"{name}.npz"
    return None


def load_label_matrix(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(indptr [rows+1], indices [nnz], L) of a dataset's training labels."""
    path = find_dataset(name)
    if path is None:
        raise FileNotFoundError(f"dataset {name!r}: no {name}.npz in " + ", ".join(map(str, data_dirs())))
    with np.load(path, allow_pickle=False) as z:
        shape = tuple(int(s) for s in z["Y_train_shape"])
        return z["Y_train_indptr"].astype(np.int64), z["Y_train_indices"].astype(np.int64), shape[1]


def real_labels(name: str, n: int, *, seed: int = 0) -> tuple[Tensor, int]:
    """n rows of a real training label matrix (without replacement when n <= its rows), and L."""
    indptr, indices, num_labels = load_label_matrix(name)
    num_rows = indptr.size - 1
    rng = np.random.default_rng(seed)
    rows = rng.choice(num_rows, size=n, replace=n > num_rows)
    start, length = indptr[rows], indptr[rows + 1] - indptr[rows]
    width = int(length.max()) if n else 0
    slots = np.arange(width)
    valid = slots[None, :] < length[:, None]
    gathered = np.where(valid, indices[np.minimum(start[:, None] + slots[None, :], indices.size - 1)], -1)
    return sort_padded(torch.from_numpy(gathered)), num_labels


def make_labels(regime: str, n: int, num_labels: Optional[int], *, seed: int = 0,
                sizes: Optional[tuple[int, int]] = None) -> tuple[Tensor, int]:
    """(padded index [n, K], L) for one sweep point's regime; `sizes` (min, max labels per
    sample) replaces the power-law regime's 2..20 (the CPU target point draws 2..8)."""
    if sizes is not None and regime != "powerlaw":
        raise ValueError(f"sizes: only the 'powerlaw' regime takes label-set sizes, got regime {regime!r}")
    if regime == "few":
        return few_labels(n, num_labels, seed=seed), num_labels
    if regime == "powerlaw":
        lo, hi = sizes if sizes is not None else POWERLAW_SIZES
        return powerlaw_labels(n, num_labels, min_size=lo, max_size=hi, seed=seed), num_labels
    if regime in REAL_DATASETS:
        return real_labels(regime, n, seed=seed)
    raise ValueError(f"regime: expected 'few', 'powerlaw' or one of {list(REAL_DATASETS)}, got {regime!r}")


def max_labels(regime: str, num_labels: int) -> int:
    """Upper bound on K for a regime (used to predict memory before generating anything)."""
    if regime == "few":
        return min(FEW_MAX_SIZE, num_labels)
    if regime == "powerlaw":
        return min(POWERLAW_SIZES[1], num_labels)
    return REAL_MAX_LABELS[regime]


def to_label_sets(index: Tensor, num_labels: int, device=None) -> LabelSets:
    sets = as_label_sets(index, index.shape[0], num_labels, label_format="indices")
    return sets if device is None else sets.to(device)
