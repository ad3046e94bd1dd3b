"""Synthetic stand-ins for extreme-classification (XMC) data sets, shaped by published statistics.

`generate(make_config("amazon670k", scale=0.01))` returns a train and a test split whose sizes,
feature and label dimensionality, mean labels per point and (at full scale) mean points per label
are those of the Extreme Classification Repository's table (PUBLISHED below). Everything else is
a model of ours (ASSUMED below says which numbers we chose): the data are synthetic. No text,
label name or feature meaning of the real sets is reproduced.

The model, for one seed:
* Labels. Label frequencies follow a power law over a random order of the label ids: at full
  scale label rank r is given f + B * r**-alpha training points (f = 1 when there are enough
  assignments for every label to have one, as in the repository's sets), B chosen so that the
  total is train points x labels per point. A scaled-down split keeps each of those points with
  probability `rows / published rows` (a binomial draw per label), so `scale=0.1` looks like a
  10% row sample of the full-size set: rare labels drop out, as they would from a real sample.
  The label assignments are dealt at random to rows whose label counts follow a gamma-Poisson
  (overdispersed) law with the target mean; labels carry no co-occurrence structure.
* Features. Every label has a topic: `topic_terms` feature ids fixed by a hash of (seed, label,
  slot), with Zipf-like weights over the slots. A row is a bag of tokens: each token is, with
  probability `noise`, a background word drawn from a Zipf law over a random order of the
  vocabulary, and otherwise a word of the topic of one of the row's labels. Term counts become
  tf-idf values (1 + log tf) * idf with idf from the training split, rows scaled to unit length,
  like the repository's bag-of-words files; `values="counts"` keeps raw counts. Labels are
  therefore learnable from features, and less so when `noise` is high or rows have many labels.

Cost: time O(nnz log nnz + L + D) and memory O(nnz + L + D) for nnz stored entries, L labels and
D features: topics are never stored (a hash gives a label's words when a token needs them), and no
[rows, labels] or [rows, features] array is ever formed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# ----------------------------------------------------------------------------------------------
# Statistics of the real sets


@dataclass(frozen=True)
class XMCStats:
    name: str
    features: int
    labels: int
    train: int
    test: int
    points_per_label: float
    labels_per_point: float
    points_per_label_counts_test: bool = False  # the published points per label counts test points too


# The Extreme Classification Repository's data set table (Bhatia, Dahiya, Jain, Kar, Mittal, Prabhu
# & Varma, http://manikvarma.org/downloads/XC/XMLRepository.html), bag-of-words versions: feature
# and label dimensionality, train and test points, average points per label, average labels per
# point. "Points per label" there is points x labels per point / labels (every label counts as
# used); for EURLex-4K the points are train and test ((15539 + 3809) x 5.31 / 3993 = 25.73, train
# alone gives 20.66), for the other four train points only.
PUBLISHED: dict[str, XMCStats] = {
    "eurlex4k": XMCStats("EURLex-4K", 5000, 3993, 15539, 3809, 25.73, 5.31, points_per_label_counts_test=True),
    "wiki10-31k": XMCStats("Wiki10-31K", 101938, 30938, 14146, 6616, 8.52, 18.64),
    "amazoncat13k": XMCStats("AmazonCat-13K", 203882, 13330, 1186239, 306782, 448.57, 5.04),
    "amazon670k": XMCStats("Amazon-670K", 135909, 670091, 490449, 153025, 3.99, 5.45),
    "delicious200k": XMCStats("Delicious-200K", 782585, 205443, 196606, 100095, 72.29, 75.54),
}
PRESETS = tuple(PUBLISHED)


@dataclass(frozen=True)
class Assumed:
    features_per_point: int   # mean stored features (distinct words) per row
    alpha: float              # exponent of the label-frequency power law


# Not in the repository's table, so chosen by us. Distinct words per row: our guess at the order
# of magnitude (short product texts for the Amazon sets, longer documents for EURLex and Wiki10,
# bookmarked pages for Delicious-200K), not measured on the real files. Each exponent sets how much
# of the labels-per-point budget the head takes: the most frequent label covers about 23%, 88%,
# 50%, 0.8% and 22% of the full-size training rows, and the rarest labels get about 6, 2, 45, 2
# and 30 points. Treat both as assumptions, not as properties of the real sets.
ASSUMED: dict[str, Assumed] = {
    "eurlex4k": Assumed(240, 0.8),
    "wiki10-31k": Assumed(650, 0.9),
    "amazoncat13k": Assumed(70, 1.0),
    "amazon670k": Assumed(75, 0.6),
    "delicious200k": Assumed(300, 0.6),
}

TOPIC_TERMS = 100        # words in a label's topic
TOPIC_EXPONENT = 1.0     # Zipf exponent of the word weights within a topic
BACKGROUND_EXPONENT = 1.0  # Zipf's law for the background vocabulary
NOISE = 0.6              # share of background tokens
DISPERSION = 2.0         # gamma shape of the per-row label count and document length (smaller: more spread)
VALUES = ("tfidf", "counts")
MAX_TOPIC_TERMS = 1 << 20  # slots are packed into 20 bits of the hash input
TOPUP_ROUNDS = 8
SYNTH_PREFIX = "synth:"


class SynthError(ValueError):
    """A synthetic data set that cannot be made as asked; the message names the argument."""


@dataclass(frozen=True)
class SynthConfig:
    preset: str
    train: int                 # rows of the training split
    test: int                  # rows of the test split
    features: int
    labels: int
    labels_per_point: float
    features_per_point: float
    alpha: float
    topic_terms: int = TOPIC_TERMS
    noise: float = NOISE
    values: str = "tfidf"
    seed: int = 0

    @property
    def published(self) -> XMCStats:
        return PUBLISHED[self.preset]

    @property
    def scale(self) -> float:
        """Training rows as a share of the published set's (the binomial keep-probability)."""
        return self.train / self.published.train


def preset_key(name: str) -> Optional[str]:
    """The preset a name stands for ("EURLex-4K", "eurlex4k", "amazon_670k", ...), or None."""
    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())
    for key, st in PUBLISHED.items():
        if norm(name) in (norm(key), norm(st.name)):
            return key
    return None


def _max_dim() -> int:
    from .train.data import max_dim  # the loaders' size bound: what is written must load
    return max_dim()


def make_config(preset: str, *, scale: Optional[float] = None, train: Optional[int] = None,
                test: Optional[int] = None, labels: Optional[int] = None, features: Optional[int] = None,
                labels_per_point: Optional[float] = None, features_per_point: Optional[float] = None,
                alpha: Optional[float] = None, topic_terms: int = TOPIC_TERMS, noise: float = NOISE,
                values: str = "tfidf", seed: int = 0, name: Callable[[str], str] = str) -> SynthConfig:
    """A checked configuration. Rows: `scale` x the published train / test rows (default 1.0),
    or `train` / `test` rows given directly (each overrides the scaled count). Other arguments
    override the preset's published (`labels`, `features`, `labels_per_point`) or assumed
    (`features_per_point`, `alpha`) values; a `features` override below the preset's features
    per point lowers that to a quarter of the vocabulary. `name(arg)` is how errors name an
    argument (the CLI passes one that turns `labels_per_point` into `--labels-per-point`)."""
    key = preset_key(str(preset))
    if key is None:
        raise SynthError(f"{name('preset')}: unknown preset {preset!r}; expected one of {list(PRESETS)}")
    pub, ass = PUBLISHED[key], ASSUMED[key]
    bound = _max_dim()

    def number(arg, value, lo, hi=math.inf, integer=False, lo_open=False):
        if integer:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SynthError(f"{name(arg)}: expected an integer, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise SynthError(f"{name(arg)}: expected a number, got {value!r}")
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            low = f"> {lo}" if lo_open else f">= {lo}"
            rng = low if hi == math.inf else f"{low} and <= {hi}"
            raise SynthError(f"{name(arg)}: expected a {'whole ' if integer else ''}number {rng}, got {value!r}")
        return int(value) if integer else float(value)

    if scale is not None:
        number("scale", scale, 0, lo_open=True)
    s = 1.0 if scale is None else float(scale)
    n_train = number("train", train, 1, integer=True) if train is not None else max(1, round(s * pub.train))
    n_test = number("test", test, 1, integer=True) if test is not None else max(1, round(s * pub.test))
    n_labels = number("labels", labels, 1, bound, integer=True) if labels is not None else pub.labels
    n_features = number("features", features, 1, bound, integer=True) if features is not None else pub.features
    lpp = number("labels_per_point", labels_per_point, 0, lo_open=True) if labels_per_point is not None \
        else pub.labels_per_point
    if lpp > n_labels:
        raise SynthError(f"{name('labels_per_point')}: {lpp} labels per point is more than the {n_labels} labels")
    fpp = number("features_per_point", features_per_point, 1) if features_per_point is not None \
        else float(ass.features_per_point)
    if fpp > n_features:
        if features_per_point is not None:
            raise SynthError(f"{name('features_per_point')}: {fpp} features per point is more than the "
                             f"{n_features} features")
        fpp = max(1.0, n_features / 4)  # a vocabulary overridden below the preset's document length
    a = number("alpha", alpha, 0) if alpha is not None else ass.alpha
    k = number("topic_terms", topic_terms, 1, MAX_TOPIC_TERMS, integer=True)
    nz = number("noise", noise, 0, 1)
    if values not in VALUES:
        raise SynthError(f"{name('values')}: expected one of {list(VALUES)}, got {values!r}")
    sd = number("seed", seed, 0, 2 ** 63 - 1, integer=True)
    return SynthConfig(key, n_train, n_test, n_features, n_labels, lpp, fpp, a, k, nz, values, sd)


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class SynthSplit:
    """One split as CSR parts: X (float32 values) and Y (multi-hot, indices only), rows in order."""
    x_indptr: np.ndarray
    x_indices: np.ndarray
    x_data: np.ndarray
    y_indptr: np.ndarray
    y_indices: np.ndarray
    num_features: int
    num_labels: int
    duplicate_labels: int = 0  # label draws that repeated a label already in their row (dropped)

    @property
    def rows(self) -> int:
        return len(self.x_indptr) - 1

    def X(self):
        import scipy.sparse as sp
        return sp.csr_matrix((self.x_data, self.x_indices, self.x_indptr), shape=(self.rows, self.num_features))

    def Y(self):
        import scipy.sparse as sp
        return sp.csr_matrix((np.ones(len(self.y_indices), dtype=np.int8), self.y_indices, self.y_indptr),
                             shape=(self.rows, self.num_labels))


@dataclass
class SynthData:
    config: SynthConfig
    train: SynthSplit
    test: SynthSplit
    full_scale_degrees: np.ndarray  # training points per label of the full-size set, by label id


def label_degrees(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Training points of each label id in the full-size set: f + B r**-alpha by rank r, rounded
    at random (the sum is right on average), ranks dealt to label ids in random order."""
    total = cfg.published.train * cfg.labels_per_point
    L = cfg.labels
    floor = min(1.0, total / (2 * L))  # every label gets a point when there are enough to go round
    z = np.arange(1, L + 1, dtype=np.float64) ** -cfg.alpha
    w = floor + (total - floor * L) / z.sum() * z
    w = np.minimum(w, cfg.published.train)  # a label cannot be in more rows than there are
    d = np.floor(w + rng.random(L)).astype(np.int64)
    out = np.empty(L, dtype=np.int64)
    out[rng.permutation(L)] = d
    return out


def _thin(d: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Each of a label's d points kept with probability p (p > 1: floor(p) copies, then the rest)."""
    whole = math.floor(p)
    return d * whole + rng.binomial(d, p - whole)


def _label_rows(counts: np.ndarray, n: int, L: int, rng: np.random.Generator, max_rounds: int = 30):
    """Deal sum(counts) label draws to n rows with gamma-Poisson row sizes (at least one label per
    row when there are enough draws). A draw that repeats a label of its row is swapped with a
    draw elsewhere, so labels keep their counts and rows their sizes; repeats still left after
    `max_rounds` (a label in nearly every row) are merged. Returns indptr, indices (sorted within
    rows) and the number of merged repeats."""
    lab = np.repeat(np.arange(L, dtype=np.int64), counts)
    rng.shuffle(lab)
    M = len(lab)
    base = 1 if M >= n else 0
    weights = rng.gamma(DISPERSION, size=n)
    size = base + rng.multinomial(M - base * n, weights / weights.sum())
    rows = np.repeat(np.arange(n, dtype=np.int64), size)
    for _ in range(max_rounds):
        keys = rows * L + lab
        order = np.argsort(keys, kind="stable")
        dup = order[1:][keys[order[1:]] == keys[order[:-1]]]
        if dup.size == 0:
            break
        # partners: distinct random draws that are not repeats themselves; a swap may create a new
        # repeat, which the next round moves again
        cand = rng.integers(0, M, 2 * dup.size + 16)
        cand = rng.permutation(np.unique(cand[~np.isin(cand, dup)]))
        k = min(dup.size, cand.size)
        a, b = dup[:k], cand[:k]
        lab[a], lab[b] = lab[b], lab[a].copy()
    keys = np.unique(rows * L + lab)  # sorts by row, then label; merges what is left of the repeats
    row, lab = np.divmod(keys, L)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    return indptr, lab, M - len(keys)


def _zipf_rank(u: np.ndarray, n: int, a: float) -> np.ndarray:
    """Ranks in [0, n) with P(rank = x) about proportional to (x + 1)**-a: the inverse of the
    continuous law's CDF, floored (no table over n, so the cost is per draw)."""
    if abs(a - 1.0) < 1e-9:
        x = np.power(float(n + 1), u) - 1.0
    else:
        e = 1.0 - a
        x = np.power(1.0 + u * ((n + 1.0) ** e - 1.0), 1.0 / e) - 1.0
    return np.minimum(x.astype(np.int64), n - 1)


_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _hash_unit(label: np.ndarray, slot: np.ndarray, key: np.uint64) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per (key, label, slot): the splitmix64 finaliser
    of the packed pair, so a topic's words are recomputed when needed instead of stored."""
    z = (label.astype(np.uint64) << np.uint64(20)) | slot.astype(np.uint64)
    z = z ^ key
    with np.errstate(over="ignore"):
        z = z + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Vocabulary:
    """What a token can be: a background word or a word of one of its row's labels' topics."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        self.cfg = cfg
        self.key = np.uint64(rng.integers(0, 2 ** 63))
        self.background = rng.permutation(cfg.features)  # background rank -> feature id
        self.terms = min(cfg.topic_terms, cfg.features)

    def tokens(self, rows, y_indptr, y_indices, rng) -> np.ndarray:
        cfg = self.cfg
        n_labels = np.diff(y_indptr)[rows]
        topical = (rng.random(len(rows)) >= cfg.noise) & (n_labels > 0)
        out = np.empty(len(rows), dtype=np.int64)
        nb = int((~topical).sum())
        out[~topical] = self.background[_zipf_rank(rng.random(nb), cfg.features, BACKGROUND_EXPONENT)]
        r = rows[topical]
        pick = y_indptr[r] + (rng.random(len(r)) * n_labels[topical]).astype(np.int64)
        slot = _zipf_rank(rng.random(len(r)), self.terms, TOPIC_EXPONENT)
        # topic words are spread uniformly over the vocabulary, independently of the background order
        h = _hash_unit(y_indices[pick], slot, self.key)
        out[topical] = np.minimum((h * cfg.features).astype(np.int64), cfg.features - 1)
        return out


def _feature_rows(n: int, y_indptr, y_indices, vocab: _Vocabulary, rng: np.random.Generator):
    """Term counts per row: each row aims at a gamma-Poisson number of distinct words (mean
    features_per_point); tokens are drawn until it has them (repeats add to a word's count), in
    rounds that draw the missing number again. Returns indptr, feature ids, counts."""
    cfg = vocab.cfg
    mean = cfg.features_per_point
    target = rng.poisson(rng.gamma(DISPERSION, mean / DISPERSION, size=n))
    target = np.clip(target, 1, cfg.features).astype(np.int64)
    keys = np.empty(0, dtype=np.int64)
    counts = np.empty(0, dtype=np.int64)
    need, drawn = target, np.zeros(n, dtype=np.int64)
    for _ in range(TOPUP_ROUNDS):
        rows = np.repeat(np.arange(n, dtype=np.int64), need)
        new = rows * cfg.features + vocab.tokens(rows, y_indptr, y_indices, rng)
        keys, inverse = np.unique(np.concatenate([keys, new]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, np.ones(len(new), dtype=np.int64)]),
                             minlength=len(keys)).astype(np.int64)
        drawn += need
        have = np.bincount(keys // cfg.features, minlength=n)
        missing = np.maximum(target - have, 0)
        if missing.sum() <= 0.002 * target.sum():  # close enough; rows near the whole vocabulary never finish
            break
        # tokens per new word so far: a round draws the missing words times that, which still
        # falls short (later words are rarer), so rows approach their target from below
        need = np.ceil(missing * drawn / np.maximum(have, 1)).astype(np.int64)
    row, feat = np.divmod(keys, cfg.features)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    return indptr, feat, counts


def _tfidf(indptr, feat, counts, idf) -> np.ndarray:
    v = (1.0 + np.log(counts)) * idf[feat]
    row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    norm = np.sqrt(np.bincount(row, weights=v * v, minlength=len(indptr) - 1))
    # rounded to the 6 significant digits the files carry, so a data set read back from its
    # files equals the one generated in memory
    return round_significant(v / norm[row], 6).astype(np.float32)


def generate(cfg: SynthConfig) -> SynthData:
    """The train and test splits of `cfg`; the same config gives the same arrays."""
    ss_labels, ss_train, ss_test, ss_vocab = np.random.SeedSequence(cfg.seed).spawn(4)
    d = label_degrees(cfg, np.random.default_rng(ss_labels))
    vocab = _Vocabulary(cfg, np.random.default_rng(ss_vocab))
    parts = []
    for n, ss in ((cfg.train, ss_train), (cfg.test, ss_test)):
        rng = np.random.default_rng(ss)
        # a split of n rows is a row sample of the full-size set at rate n / published train rows
        counts = _thin(d, n / cfg.published.train, rng)
        y_indptr, y_indices, dup = _label_rows(counts, n, cfg.labels, rng)
        x_indptr, x_indices, x_counts = _feature_rows(n, y_indptr, y_indices, vocab, rng)
        parts.append([y_indptr, y_indices, dup, x_indptr, x_indices, x_counts])
    idf = None
    if cfg.values == "tfidf":
        df = np.bincount(parts[0][4], minlength=cfg.features)
        idf = np.log((1.0 + cfg.train) / (1.0 + df)) + 1.0  # smoothed: words unseen in train stay finite
    splits = []
    for y_indptr, y_indices, dup, x_indptr, x_indices, x_counts in parts:
        data = _tfidf(x_indptr, x_indices, x_counts, idf) if idf is not None else x_counts.astype(np.float32)
        splits.append(SynthSplit(x_indptr, x_indices, data, y_indptr, y_indices, cfg.features, cfg.labels, dup))
    return SynthData(cfg, splits[0], splits[1], d)


# ----------------------------------------------------------------------------------------------
# Statistics


def power_law_fit(label_counts: np.ndarray, min_count: int = 10) -> Optional[float]:
    """The exponent alpha of count ~ rank**-alpha: least squares on log count against log rank
    over the labels with at least `min_count` points, skipping the top rank (a label capped at
    every row bends the head; `min_count` keeps the +f floor and small-count noise out of the
    tail). None when fewer than 10 labels besides the top one qualify."""
    c = np.sort(np.asarray(label_counts)[np.asarray(label_counts) >= min_count])[::-1]
    if len(c) < 11:
        return None
    r = np.arange(1, len(c) + 1, dtype=np.float64)
    slope = np.polyfit(np.log(r[1:]), np.log(c[1:].astype(np.float64)), 1)[0]
    return float(-slope)


def split_stats(split: SynthSplit) -> dict:
    n = split.rows
    counts = np.bincount(split.y_indices, minlength=split.num_labels)
    used = int((counts > 0).sum())
    fit = power_law_fit(counts)
    return {
        "rows": n,
        "features": split.num_features,
        "labels": split.num_labels,
        "nnz": int(len(split.x_indices)),
        "features_per_point": round(len(split.x_indices) / n, 3),
        "labels_per_point": round(len(split.y_indices) / n, 4),
        "labels_used": used,
        "points_per_label_used": round(len(split.y_indices) / max(used, 1), 3),
        "top_label_points": int(counts.max()),
        "top_label_share": round(int(counts.max()) / n, 4),
        "power_law_exponent_fit": None if fit is None else round(fit, 3),
        "duplicate_label_draws_dropped": int(split.duplicate_labels),
    }


def stats(data: SynthData) -> dict:
    """Published targets, the generator's settings, and what the splits realise."""
    cfg = data.config
    pub = cfg.published
    d = data.full_scale_degrees
    return {
        "synthetic": True,
        "preset": cfg.preset,
        "stands_in_for": pub.name,
        "note": (f"synthetic data shaped like {pub.name}'s published statistics (sizes, labels per point, "
                 f"power-law label frequencies); features and labels mean nothing"),
        "published": asdict(pub),
        "config": {**asdict(cfg), "scale": round(cfg.scale, 6)},
        "full_scale": {
            # the degree sequence the splits are row samples of: what scale 1 would give, counted
            # as the repository counts it (train points, or train and test points for EURLex-4K)
            "points_per_label": round(float(d.sum()) * (1 + pub.test / pub.train if pub.points_per_label_counts_test
                                                         else 1) / max(int((d > 0).sum()), 1), 3),
            "train_points_per_label": round(float(d.sum()) / max(int((d > 0).sum()), 1), 3),
            "labels_per_point": round(float(d.sum()) / pub.train, 4),
            "top_label_share": round(float(d.max()) / pub.train, 4),
            "power_law_exponent_nominal": cfg.alpha,
        },
        "train": split_stats(data.train),
        "test": split_stats(data.test),
    }


# ----------------------------------------------------------------------------------------------
# XMC text files


def round_significant(x: np.ndarray, digits: int) -> np.ndarray:
    """`x` rounded to `digits` significant decimal digits (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    nz = np.flatnonzero(x)
    if nz.size:
        e = np.floor(np.log10(np.abs(x[nz])))
        k = digits - 1 - e
        # dividing by an exact power of ten gives the double nearest the decimal, as a parser would
        out[nz] = np.where(k >= 0, np.round(x[nz] * 10.0 ** k) / 10.0 ** np.maximum(k, 0),
                           np.round(x[nz] / 10.0 ** -k) * 10.0 ** np.maximum(-k, 0))
    return out


def _value_format(data: np.ndarray) -> str:
    # 6 significant digits when they carry the values exactly (generated tf-idf values are rounded
    # to 6, counts are integers), else 9, which carries any float32 exactly
    six = np.array_equal(round_significant(data, 6).astype(np.float32), np.asarray(data, dtype=np.float32))
    return "%d:%.6g" if six else "%d:%.9g"


def write_xmc(path, split: SynthSplit, block: int = 1 << 20) -> None:
    """Write one split in the XMC text format the loaders read: the header `rows features labels`,
    then per row `l1,l2,... f:v f:v ...` with 0-based ids (a row without labels starts with its
    first feature). Atomic: a crash leaves no partial file. Rows are formatted about `block`
    stored entries at a time, so the text never exists whole in memory."""
    from .train.files import atomic_open

    fmt = _value_format(split.x_data)
    n, xp, yp = split.rows, split.x_indptr, split.y_indptr
    with atomic_open(path, "w") as f:
        f.write(f"{n} {split.num_features} {split.num_labels}\n")
        start = 0
        while start < n:
            stop = int(np.searchsorted(xp, xp[start] + block, side="right")) - 1
            stop = min(max(stop, start + 1), n)
            pairs = list(map(fmt.__mod__, zip(split.x_indices[xp[start]:xp[stop]].tolist(),
                                              split.x_data[xp[start]:xp[stop]].astype(np.float64).tolist())))
            labs = list(map(str, split.y_indices[yp[start]:yp[stop]].tolist()))
            xo, yo = (xp[start:stop + 1] - xp[start]).tolist(), (yp[start:stop + 1] - yp[start]).tolist()
            lines = []
            for i in range(stop - start):
                head, body = ",".join(labs[yo[i]:yo[i + 1]]), " ".join(pairs[xo[i]:xo[i + 1]])
                lines.append(f"{head} {body}" if head and body else head or body)
            f.write("\n".join(lines) + "\n")
            start = stop


def write_synth(out, cfg: SynthConfig) -> dict:
    """Generate `cfg` and write `out`/train.txt, test.txt and stats.json; returns the statistics."""
    from .train.files import ensure_output_folder, write_json

    out = ensure_output_folder(out)
    data = generate(cfg)
    write_xmc(Path(out) / "train.txt", data.train)
    write_xmc(Path(out) / "test.txt", data.test)
    st = stats(data)
    st["files"] = {"train": str(Path(out) / "train.txt"), "test": str(Path(out) / "test.txt")}
    write_json(Path(out) / "stats.json", st)
    return st


# ----------------------------------------------------------------------------------------------
# Data set names: synth:PRESET[?key=value&key=value...]

_INT_KEYS = ("train", "test", "labels", "features", "topic_terms", "seed")
_FLOAT_KEYS = ("scale", "labels_per_point", "features_per_point", "alpha", "noise")
SPEC_KEYS = _INT_KEYS + _FLOAT_KEYS + ("values",)


def parse_spec(spec: str) -> SynthConfig:
    """The configuration a data set name `synth:PRESET[?key=value&...]` stands for; keys are
    make_config's arguments (scale, train, test, labels, features, seed, ...)."""
    if not spec.startswith(SYNTH_PREFIX):
        raise SynthError(f"{spec}: a synthetic data set name starts with {SYNTH_PREFIX!r}")
    preset, _, query = spec[len(SYNTH_PREFIX):].partition("?")
    kwargs: dict = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in SPEC_KEYS:
            raise SynthError(f"{spec}: {item!r} is not key=value with a key among {list(SPEC_KEYS)}")
        if key in kwargs:
            raise SynthError(f"{spec}: {key} is given twice")
        try:
            kwargs[key] = int(value) if key in _INT_KEYS else float(value) if key in _FLOAT_KEYS else value
        except ValueError:
            kind = "an integer" if key in _INT_KEYS else "a number"
            raise SynthError(f"{spec}: {key}: expected {kind}, got {value!r}") from None
    try:
        return make_config(preset, **kwargs)
    except SynthError as err:
        raise SynthError(f"{spec}: {err}") from None


def spec_name(cfg: SynthConfig, spec: str) -> str:
    """A file-name-safe data set name for `spec` ("synth-eurlex4k-scale0.1")."""
    _, _, query = spec.partition("?")
    extra = "".join(f"-{k}{v}" for k, _, v in (item.partition("=") for item in query.split("&") if item))
    return f"synth-{cfg.preset}{extra}"


def describe_presets() -> str:
    head = "| preset | stands in for | features | labels | train | test | labels/point | points/label | feat./point* | alpha* |"
    rows = [head, "|" + "---|" * 10]
    for key, p in PUBLISHED.items():
        a = ASSUMED[key]
        rows.append(f"| {key} | {p.name} | {p.features} | {p.labels} | {p.train} | {p.test} | {p.labels_per_point} "
                    f"| {p.points_per_label} | {a.features_per_point} | {a.alpha} |")
    return "\n".join(rows) + "\n* assumed (not in the repository's table)"


__all__ = ["PUBLISHED", "ASSUMED", "PRESETS", "SynthConfig", "SynthData", "SynthSplit", "SynthError",
           "make_config", "generate", "stats", "split_stats", "power_law_fit", "write_xmc", "write_synth",
           "parse_spec", "spec_name", "describe_presets", "round_significant"]
