"""Multi-label datasets: loaders for .npz, svmlight/XMC, MULAN ARFF and user arrays, plus the
train/validation split and feature scaling used by the training protocols.

Every loader returns a `Dataset`: X as a dense float32 ndarray or a scipy CSR matrix (kept sparse,
batches included: protocols.Batches), Y as a CSR multi-hot matrix (int8). Errors name the file
and the problem.

Everything read is checked before it is used: sparse index arrays (in range, consistent row
pointers), finite features (NaN, Inf, or beyond float32 range is an error naming the first bad
row; rows count from 0), and the number of features and of labels, which may not exceed
`max_dim()`: MAX_DIM (10 million) unless $MLCL_FAST_MAX_DIM says otherwise. The bound stops a
lying header or a stray huge id from asking for tens of GB; the models hold dense
[features, hidden] and [hidden, labels] weights, so real data sets stay far below it.
"""
from __future__ import annotations

import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

from ..data_synth import SYNTH_PREFIX

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DATASET = "emotions"
DATA_ENV = "MLCL_FAST_DATA"
MAX_DIM = 10_000_000
MAX_DIM_ENV = "MLCL_FAST_MAX_DIM"


class DatasetError(ValueError):
    """A dataset file or array that cannot be used; the message names the source and the problem."""


def max_dim() -> int:
    """The most features, and the most labels, a dataset may have ($MLCL_FAST_MAX_DIM, else MAX_DIM)."""
    env = os.environ.get(MAX_DIM_ENV)
    if not env:
        return MAX_DIM
    try:
        return int(env)
    except ValueError:
        raise DatasetError(f"${MAX_DIM_ENV}: expected an integer, got {env!r}") from None


def _check_dim(source, what: str, n: int) -> None:
    if n > max_dim():
        raise DatasetError(f"{source}: {what} is {n}, above the size bound of {max_dim()} "
                           f"(raise ${MAX_DIM_ENV} if the data really is that large)")


# ----------------------------------------------------------------------------------------------
# Checks shared by every loader

_INT_KINDS = "iu"
_NUMBER_KINDS = "biuf"


def _row_of(indptr: np.ndarray, k: int) -> int:
    return int(np.searchsorted(indptr, k, side="right")) - 1


def checked_csr(source, what: str, data, indices, indptr, shape, *, binary: bool = False) -> sp.csr_matrix:
    """A CSR matrix from its arrays, built only once they are consistent (scipy checks index
    bounds only on request; out-of-range indices corrupt memory later). `what` names the matrix
    in errors (arrays `what`_indices, `what`_indptr, `what`_data). With `binary`, `data` is
    ignored and the matrix is multi-hot int8 (duplicates merged); otherwise finite float32."""
    rows, cols = shape
    _check_dim(source, f"{what}: the number of columns", cols)
    arrays = {"indptr": indptr, "indices": indices} if binary else {"indptr": indptr, "indices": indices, "data": data}
    for name, a in arrays.items():
        kinds = _NUMBER_KINDS if name == "data" else _INT_KINDS
        if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype.kind not in kinds:
            desc = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            expected = "real numbers" if name == "data" else "integers"
            raise DatasetError(f"{source}: {what}_{name} is a {desc}; expected a 1-D array of {expected}")
    if len(indptr) != rows + 1:
        raise DatasetError(f"{source}: {what}_indptr has {len(indptr)} entries; expected {rows + 1} "
                           f"(rows + 1 for {rows} rows)")
    if len(indptr) and indptr[0] != 0:
        raise DatasetError(f"{source}: {what}_indptr[0] is {indptr[0]}; expected 0")
    step = np.flatnonzero(indptr[1:] < indptr[:-1])  # not np.diff: it wraps around for unsigned arrays
    if step.size:
        k = int(step[0])
        raise DatasetError(f"{source}: {what}_indptr decreases at row {k} ({indptr[k]} then {indptr[k + 1]}); "
                           f"expected non-decreasing row offsets")
    nnz = int(indptr[-1]) if len(indptr) else 0
    if nnz != len(indices) or (not binary and len(data) != len(indices)):
        sizes = f"{len(indices)} indices" + ("" if binary else f" and {len(data)} values")
        raise DatasetError(f"{source}: {what}_indptr ends at {nnz} but there are {sizes}; expected them to match")
    bad = np.flatnonzero((indices < 0) | (indices >= cols))
    if bad.size:
        k = int(bad[0])
        raise DatasetError(f"{source}: {what}_indices[{k}] (row {_row_of(indptr, k)}) is {indices[k]}; "
                           f"expected a column index in [0, {cols})")
    if binary:
        values = np.ones(len(indices), dtype=np.int8)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            values = data.astype(np.float32)  # beyond float32 range becomes inf, caught below
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            k = int(bad[0])
            raise DatasetError(f"{source}: {what} row {_row_of(indptr, k)} has the value {data[k]} "
                               f"({what}_data[{k}]); features must be finite float32 numbers")
    M = sp.csr_matrix((values, indices.astype(np.int64), indptr.astype(np.int64)), shape=(rows, cols))
    M.sum_duplicates()  # repeated entries add up, as they would when densified
    if binary:
        M.data[:] = 1
    elif not np.isfinite(M.data).all():
        k = int(np.flatnonzero(~np.isfinite(M.data))[0])
        raise DatasetError(f"{source}: {what} row {_row_of(M.indptr, k)} repeats column {M.indices[k]}, "
                           f"and the repeated values add up beyond float32 range")
    return M


def check_finite(source, what: str, X: np.ndarray) -> np.ndarray:
    """`X` as float32, or an error naming the first row with NaN, Inf or a value beyond float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        X32 = np.asarray(X).astype(np.float32)
    ok = np.isfinite(X32)
    if not ok.all():
        i, j = (int(v) for v in np.argwhere(~ok)[0])
        raise DatasetError(f"{source}: {what} row {i} has the value {np.asarray(X)[i, j]} in column {j}; "
                           f"features must be finite float32 numbers")
    return X32


@dataclass
class Dataset:
    name: str
    X_train: object            # float32 ndarray [n, d] or scipy CSR
    Y_train: sp.csr_matrix     # int8 multi-hot [n, L]
    X_test: object
    Y_test: sp.csr_matrix
    label_names: list = field(default_factory=list)
    source: str = ""

    @property
    def num_labels(self) -> int:
        return self.Y_train.shape[1]

    @property
    def num_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def sparse(self) -> bool:
        return sp.issparse(self.X_train)

    def describe(self) -> str:
        kind = "sparse" if self.sparse else "dense"
        card = self.Y_train.sum() / max(self.Y_train.shape[0], 1)
        return (f"{self.name}: {self.X_train.shape[0]} train / {self.X_test.shape[0]} test, "
                f"{self.num_features} {kind} features, {self.num_labels} labels, cardinality {card:.2f}")


# ----------------------------------------------------------------------------------------------
# Resolution of a dataset name or path

def default_data_dir() -> Optional[Path]:
    """$MLCL_FAST_DATA, else ../shared/data seen from the working directory or the repository."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for cand in (Path.cwd() / ".." / "shared" / "data", repo.parent / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def bundled_datasets() -> list[str]:
    return sorted(p.stem for p in PACKAGE_DATA.glob("*.npz"))


def load_dataset(name_or_path: str, data_dir: Optional[str] = None, *, test_file: Optional[str] = None,
                 labels: Optional[str] = None, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """A dataset by NAME (bundled file, then `data_dir`, then $MLCL_FAST_DATA or ../shared/data)
    or by PATH (.npz, .arff, svmlight/XMC text). Files without a test split get one drawn at random
    (`test_size`, `seed`) unless `test_file` is given. `labels` (ARFF only): the label count or
    the path of a MULAN .xml label file. A NAME `synth:PRESET[?key=value&...]` (for instance
    `synth:eurlex4k?scale=0.1&seed=1`) is a synthetic XMC-like set generated in memory by
    mlcl_fast.data_synth, with its own test split and its own seed (0 unless given)."""
    if name_or_path.startswith(SYNTH_PREFIX):
        if test_file:
            raise DatasetError(f"{name_or_path}: a synthetic data set has its own test split; drop the test file")
        return synth_dataset(name_or_path)
    path = Path(name_or_path)
    looks_like_path = path.suffix != "" or os.sep in name_or_path or path.exists()
    if not looks_like_path:
        path = _find_by_name(name_or_path, data_dir)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory; give a dataset file or a dataset name with --data-dir")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if test_file:
            raise DatasetError(f"{path}: a .npz file holds its own test split; drop the test file")
        return load_npz(path)
    if suffix == ".arff":
        train = load_arff(path, labels)
        test = load_arff(test_file, labels) if test_file else None
    else:
        train = load_svmlight(path)
        test = load_svmlight(test_file, n_features=train.X_train.shape[1],
                             n_labels=train.num_labels) if test_file else None
    if test is None:
        return split_test(train, test_size, seed)
    return _join(train, test)


def _find_by_name(name: str, data_dir: Optional[str]) -> Path:
    tried = []
    for folder in (PACKAGE_DATA, Path(data_dir) if data_dir else None, default_data_dir()):
        if folder is None:
            continue
        cand = folder / f"{name}.npz"
        tried.append(str(folder))
        if cand.exists():
            return cand
    raise DatasetError(f"{name}: no dataset of that name in {tried} (bundled: {bundled_datasets()}); "
                       f"give --data-dir or set ${DATA_ENV}, or pass a file path")


# ----------------------------------------------------------------------------------------------
# Synthetic XMC-like sets by name

def synth_dataset(spec: str) -> Dataset:
    """The synthetic data set `spec` names (mlcl_fast.data_synth.parse_spec), generated in memory;
    equal to the one read back from the files `mlcl-fast data synth` writes for the same settings."""
    from ..data_synth import SynthError, generate, parse_spec, spec_name

    try:
        cfg = parse_spec(spec)
    except SynthError as err:
        raise DatasetError(str(err)) from None
    data = generate(cfg)
    parts = []
    for split in (data.train, data.test):
        parts.append(checked_csr(spec, "features", split.x_data, split.x_indices, split.x_indptr,
                                 (split.rows, split.num_features)))
        parts.append(checked_csr(spec, "labels", None, split.y_indices, split.y_indptr,
                                 (split.rows, split.num_labels), binary=True))
    X_tr, Y_tr, X_te, Y_te = parts
    return Dataset(spec_name(cfg, spec), X_tr, Y_tr, X_te, Y_te, [], f"{spec} (synthetic, {cfg.published.name}-like)")


# ----------------------------------------------------------------------------------------------
# .npz (layout of the project's shared benchmark copies)

def load_npz(path) -> Dataset:
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DatasetError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err
    with z:
        files = set(z.files)
        parts = []
        for part in ("train", "test"):
            try:
                X = _npz_dense(path, z, f"X_{part}") if f"X_{part}" in files else _npz_csr(path, z, f"X_{part}", False)
                Y = _npz_csr(path, z, f"Y_{part}", True)
            except KeyError as err:
                raise DatasetError(f"{path}: missing array {err.args[0]!r}; expected X_{part} (dense) or "
                                   f"X_{part}_data/_indices/_indptr/_shape, and Y_{part}_indices/_indptr/_shape") from err
            parts += [X, Y]
        names = [str(s) for s in _npz_array(path, z, "label_names").ravel()] if "label_names" in files else []
        source = str(_npz_array(path, z, "source")) if "source" in files else str(path)
    X_tr, Y_tr, X_te, Y_te = parts
    _check_shapes(path, X_tr, Y_tr, "train split")
    _check_shapes(path, X_te, Y_te, "test split")
    if X_tr.shape[1] != X_te.shape[1] or Y_tr.shape[1] != Y_te.shape[1]:
        raise DatasetError(f"{path}: train and test disagree on the number of features or labels "
                           f"({X_tr.shape[1]} vs {X_te.shape[1]} features, {Y_tr.shape[1]} vs {Y_te.shape[1]} labels)")
    if names and len(names) != Y_tr.shape[1]:
        raise DatasetError(f"{path}: label_names has {len(names)} names for {Y_tr.shape[1]} labels")
    return Dataset(path.stem, X_tr, Y_tr, X_te, Y_te, names, source)


def _npz_array(path: Path, z, key: str) -> np.ndarray:
    """One array of an open .npz; KeyError when absent, DatasetError when it cannot be read."""
    if key not in z.files:
        raise KeyError(key)
    try:
        return z[key]
    except Exception as err:  # truncated member, bad header, pickled objects, ...
        raise DatasetError(f"{path}: array {key!r} is unreadable ({type(err).__name__}: {err})") from err


def _npz_dense(path: Path, z, key: str) -> np.ndarray:
    X = _npz_array(path, z, key)
    if X.ndim != 2 or X.dtype.kind not in _NUMBER_KINDS:
        raise DatasetError(f"{path}: {key} is a {X.dtype} array of shape {X.shape}; expected a 2-D array of real numbers")
    return check_finite(path, key, X)


def _npz_csr(path: Path, z, key: str, binary: bool) -> sp.csr_matrix:
    shape = _npz_array(path, z, key + "_shape")
    if shape.shape != (2,) or shape.dtype.kind not in _INT_KINDS or (shape < 0).any():
        raise DatasetError(f"{path}: {key}_shape is {shape.tolist()!r} ({shape.dtype}); expected two integers >= 0")
    idx, ptr = _npz_array(path, z, key + "_indices"), _npz_array(path, z, key + "_indptr")
    data = None if binary else _npz_array(path, z, key + "_data")
    return checked_csr(path, key, data, idx, ptr, (int(shape[0]), int(shape[1])), binary=binary)


def _check_shapes(path, X, Y, part: str) -> None:
    """`part` ("train split", "the file", ...) is the subject of the messages."""
    if X.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise DatasetError(f"{path}: {part} has {X.shape[0]} feature rows but {Y.shape[0]} label rows")
    if X.shape[0] == 0:
        raise DatasetError(f"{path}: {part} is empty")
    if X.shape[1] == 0 or Y.shape[1] == 0:
        raise DatasetError(f"{path}: {part} has {X.shape[1]} features and {Y.shape[1]} labels; "
                           f"expected at least one of each")
    _check_dim(path, f"{part}: the number of features", X.shape[1])


# ----------------------------------------------------------------------------------------------
# svmlight / XMC text: "l1,l2 f:v f:v ...", optionally after an XMC header "n_samples n_features n_labels"

_HEADER = re.compile(rb"^\s*(\d{1,30})\s+(\d{1,30})\s+(\d{1,30})\s*$")  # digits bounded for int()


def load_svmlight(path, n_features: Optional[int] = None, n_labels: Optional[int] = None) -> Dataset:
    """One svmlight/XMC multi-label file as the train part of a Dataset (the caller adds a test split)."""
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    raw = _read_bytes(path)
    lines = raw.splitlines()
    header = _HEADER.match(lines[0]) if lines else None
    if header:
        n_rows, n_feat, n_lab = (int(g) for g in header.groups())
        for what, claim, known in (("features", n_feat, n_features), ("labels", n_lab, n_labels)):
            _check_dim(path, f"the number of {what} in the XMC header", claim)
            if known is not None and claim != known:
                raise DatasetError(f"{path}: the XMC header announces {claim} {what}, expected {known} "
                                   f"(as in the train file)")
        n_features, n_labels = n_feat, n_lab
        # rows with no label start with a feature; sklearn wants a (possibly empty) label field first
        body = [(b" " + ln) if (b":" in ln.split(b" ", 1)[0]) else ln for ln in lines[1:] if ln.strip()]
        if len(body) != n_rows:
            raise DatasetError(f"{path}: the XMC header announces {n_rows} rows, the file has {len(body)}")
        raw = b"\n".join(body) + b"\n"
    if not raw.strip():
        raise DatasetError(f"{path}: empty file")
    try:
        X, y = load_svmlight_file(io.BytesIO(raw), n_features=n_features, multilabel=True, zero_based=True
                                  if header else "auto", dtype=np.float32)
    except Exception as err:
        raise DatasetError(f"{path}: not a valid svmlight/XMC multi-label file ({err})") from err
    X = X.tocsr()
    if n_features is None and X.shape[1] > max_dim():  # the width comes from the largest feature id
        k = int(np.argmax(X.indices))
        raise DatasetError(f"{path}: row {_row_of(X.indptr, k)} has feature index {X.indices[k]}, above the "
                           f"size bound of {max_dim()} features (raise ${MAX_DIM_ENV} if the data really is that large)")
    X = checked_csr(path, "features", X.data, X.indices, X.indptr, X.shape)
    Y = _label_lists_to_csr(path, y, n_labels)
    _check_shapes(path, X, Y, "the file")
    return Dataset(path.stem, X, Y, None, None, [], str(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file ({err.strerror or err})") from err


def _label_id(lab) -> Optional[int]:
    """`lab` as a label index, or None when it is not an integer >= 0."""
    try:
        v = float(lab)
    except (TypeError, ValueError):
        return None
    return int(v) if np.isfinite(v) and v >= 0 and v == int(v) else None


def _label_lists_to_csr(source, label_lists, n_labels: Optional[int]) -> sp.csr_matrix:
    counts, cols = [], []
    for i, labs in enumerate(label_lists):
        for lab in labs:
            c = _label_id(lab)
            if c is None:
                raise DatasetError(f"{source}: row {i} has label {lab!r}; labels must be integers >= 0")
            if c >= (max_dim() if n_labels is None else n_labels):
                bound = (f"above the size bound of {max_dim()} labels (raise ${MAX_DIM_ENV} if the data "
                         f"really is that large)" if n_labels is None else f"out of range for {n_labels} labels")
                raise DatasetError(f"{source}: in row {i}, label index {c} is {bound}")
            cols.append(c)
        counts.append(len(cols))
    if n_labels is None:
        n_labels = max(cols) + 1 if cols else 0
    if n_labels == 0:
        raise DatasetError(f"{source}: no row carries any label")
    indptr = np.array([0] + counts, dtype=np.int64)
    return checked_csr(source, "labels", None, np.array(cols, dtype=np.int64), indptr, (len(counts), n_labels),
                       binary=True)


# ----------------------------------------------------------------------------------------------
# MULAN ARFF: the label attributes are named by an .xml file, or are the last `n` attributes
# (MEKA's "-C n" in the relation name: the first n when n > 0, the last |n| when n < 0)

def load_arff(path, labels=None) -> Dataset:
    import arff

    path = Path(path)
    text = _read_bytes(path).decode(errors="replace")
    try:
        doc = arff.loads(text, return_type=arff.COO) if _is_sparse_arff(text) else arff.loads(text)
    except Exception as err:
        raise DatasetError(f"{path}: not a valid ARFF file ({type(err).__name__}: {err})") from err
    attrs = doc["attributes"]
    n_attr = len(attrs)
    label_cols = _arff_label_columns(path, doc, labels)
    feature_cols = [j for j in range(n_attr) if j not in set(label_cols) and attrs[j][1] != "STRING"]
    if isinstance(doc["data"], tuple):
        X, Y = _arff_sparse(path, text, attrs, doc["data"], feature_cols, label_cols)
    else:
        table = np.array(doc["data"], dtype=object).reshape(-1, n_attr)
        if table.shape[0] == 0:
            raise DatasetError(f"{path}: no data rows")
        X = np.empty((table.shape[0], len(feature_cols)), dtype=np.float32)
        for out, j in enumerate(feature_cols):
            X[:, out] = _arff_column(path, attrs[j], table[:, j])
        Y = np.empty((table.shape[0], len(label_cols)), dtype=np.int8)
        for out, j in enumerate(label_cols):
            Y[:, out] = _arff_labels(path, attrs[j], table[:, j])
        Y = sp.csr_matrix(Y)
    _check_shapes(path, X, Y, "the file")
    names = [attrs[j][0] for j in label_cols]
    return Dataset(path.stem, X, Y, None, None, names, str(path))


def _arff_sparse(path: Path, text: str, attrs, coo, feature_cols, label_cols):
    """Sparse ARFF from the parser's (values, rows, columns) triplets, never densified."""
    vals, rows, cols = coo
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    vals = np.asarray(vals, dtype=object)
    # trailing all-zero rows "{}" leave no entry; count the data lines
    n_rows = max(len(_arff_data_lines(text)), int(rows.max()) + 1 if rows.size else 0)
    if n_rows == 0:
        raise DatasetError(f"{path}: no data rows")
    order = np.lexsort((cols, rows))  # row-major, as CSR needs
    rows, cols, vals = rows[order], cols[order], vals[order]
    values = np.zeros(len(vals), dtype=np.float32)
    is_label, is_feature = set(label_cols), set(feature_cols)
    by_col = np.argsort(cols, kind="stable")
    for at in np.split(by_col, np.flatnonzero(np.diff(cols[by_col])) + 1):  # entries of one attribute
        if not at.size:
            continue
        j = int(cols[at[0]])
        if j in is_label:
            values[at] = _arff_labels(path, attrs[j], vals[at], rows[at])
        elif j in is_feature:
            values[at] = _arff_column(path, attrs[j], vals[at], rows[at])

    def csr(what, chosen, binary):
        pos = np.full(len(attrs), -1, dtype=np.int64)
        pos[chosen] = np.arange(len(chosen))
        keep = (pos[cols] >= 0) & (values != 0)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=n_rows))])
        return checked_csr(path, what, values[keep], pos[cols[keep]], indptr, (n_rows, len(chosen)), binary=binary)

    return csr("features", feature_cols, False), csr("labels", label_cols, True)


def _arff_data_lines(text: str) -> list[str]:
    at = text.lower().find("@data")
    if at < 0:
        return []
    return [s for s in (line.strip() for line in text[at + 5:].splitlines()) if s and not s.startswith("%")]


def _is_sparse_arff(text: str) -> bool:
    lines = _arff_data_lines(text)
    return bool(lines) and lines[0].startswith("{")


def _arff_label_columns(path: Path, doc, labels) -> list[int]:
    names = [a[0] for a in doc["attributes"]]
    if labels is not None and str(labels).lower().endswith(".xml"):
        wanted = _xml_label_names(Path(labels))
        twice = [w for w, count in Counter(wanted).items() if count > 1]
        if twice:
            raise DatasetError(f"{labels}: label {twice[0]!r} is listed twice")
        position = {name: j for j, name in reversed(list(enumerate(names)))}  # first attribute of a name
        missing = [w for w in wanted if w not in position]
        if missing:
            raise DatasetError(f"{path}: label {missing[0]!r} from {labels} is not an attribute of the file")
        return [position[w] for w in wanted]
    if labels is None:
        m = re.search(r"-C\s+(-?\d{1,30})\b", doc.get("relation", ""))  # digits bounded for int()
        if not m:
            raise DatasetError(f"{path}: cannot tell which attributes are labels; give the label count "
                               f"(--labels N, the last N attributes) or a MULAN .xml label file")
        n = int(m.group(1))
        _check_label_count(path, abs(n), len(names), f" (from '-C {n}' in the relation name)")
        return list(range(n)) if n > 0 else list(range(len(names) + n, len(names)))
    try:
        n = int(labels)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: labels must be a label count or a .xml file, got {labels!r}") from None
    _check_label_count(path, n, len(names))
    return list(range(len(names) - n, len(names)))


def _check_label_count(path: Path, n: int, n_attr: int, origin: str = "") -> None:
    if not 0 < n < n_attr:  # at least one label and one other attribute
        raise DatasetError(f"{path}: label count {n}{origin} is out of range for {n_attr} attributes "
                           f"(expected 1 to {n_attr - 1})")


def _xml_label_names(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise DatasetError(f"{path}: not a readable MULAN label file ({err})") from err
    names = [el.get("name") for el in root.iter() if el.tag.split("}")[-1] == "label" and el.get("name")]
    if not names:
        raise DatasetError(f"{path}: no <label name=...> element found")
    return names


def _arff_column(path: Path, attr, column, rows=None) -> np.ndarray:
    """One attribute's values as finite float32 (`rows`: their row numbers, default 0, 1, ...)."""
    name, kind = attr
    if any(v is None for v in column):
        raise DatasetError(f"{path}: attribute {name!r} has missing values ('?'), which are not supported")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, caught below
        if isinstance(kind, list):  # nominal: numeric-valued categories keep their value, others their position
            try:
                out = np.array([float(v) for v in column], dtype=np.float32)
            except (TypeError, ValueError):
                pos = {v: i for i, v in enumerate(kind)}
                lowered = [str(k).lower() for k in kind]
                if sorted(lowered) == ["no", "yes"]:
                    pos = {k: float(str(k).lower() == "yes") for k in kind}
                out = np.array([pos[v] if isinstance(v, str) else float(v) for v in column], dtype=np.float32)
        else:
            try:
                out = np.asarray(column, dtype=np.float32)
            except (TypeError, ValueError) as err:
                raise DatasetError(f"{path}: attribute {name!r} has non-numeric values ({err})") from None
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        k = int(bad[0])
        row = k if rows is None else int(rows[k])
        raise DatasetError(f"{path}: row {row} has the value {column[k]} for attribute {name!r}; "
                           f"values must be finite float32 numbers")
    return out


def _arff_labels(path: Path, attr, column, rows=None) -> np.ndarray:
    col = _arff_column(path, attr, column, rows)
    if not np.isin(col, (0, 1)).all():
        raise DatasetError(f"{path}: label attribute {attr[0]!r} has values other than 0/1")
    return col


# ----------------------------------------------------------------------------------------------
# User arrays

def from_arrays(X, Y, X_test=None, Y_test=None, *, name: str = "arrays", label_names: Sequence[str] = (),
                num_labels: Optional[int] = None, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """X: [n, d] array or scipy sparse; Y: multi-hot [n, L] (dense or sparse) or a list of label
    lists. Without X_test/Y_test a random test split is drawn."""
    Xc, Yc = _as_x(X, "X"), _as_y(Y, "Y", num_labels)
    _check_shapes(name, Xc, Yc, "train split")
    ds = Dataset(name, Xc, Yc, None, None, list(label_names), "arrays")
    if X_test is None and Y_test is None:
        return split_test(ds, test_size, seed)
    if X_test is None or Y_test is None:
        raise DatasetError("X_test, Y_test: give both or neither")
    Xt, Yt = _as_x(X_test, "X_test"), _as_y(Y_test, "Y_test", Yc.shape[1])
    _check_shapes(name, Xt, Yt, "test split")
    if Xt.shape[1] != Xc.shape[1]:
        raise DatasetError(f"X_test: has {Xt.shape[1]} features, X has {Xc.shape[1]}")
    return replace(ds, X_test=Xt, Y_test=Yt)


def _as_x(X, what: str):
    if sp.issparse(X):
        M = X.tocsr()
        return checked_csr(what, what, M.data, M.indices, M.indptr, M.shape)
    try:
        arr = np.asarray(X)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{what}: not an array of numbers ({err})") from None
    if arr.ndim != 2:
        raise DatasetError(f"{what}: expected a 2-D array [n, d], got shape {arr.shape}")
    if arr.dtype.kind not in _NUMBER_KINDS:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{what}: not an array of numbers ({err})") from None
    return check_finite(what, what, arr)


def _as_y(Y, what: str, num_labels: Optional[int]) -> sp.csr_matrix:
    if sp.issparse(Y) or (isinstance(Y, np.ndarray) and Y.ndim == 2):
        M = sp.csr_matrix(Y)
        if M.nnz and not np.isin(M.data, (0, 1)).all():
            raise DatasetError(f"{what}: a multi-hot matrix must hold only 0/1")
        M.eliminate_zeros()
        if num_labels is not None and M.shape[1] != num_labels:
            raise DatasetError(f"{what}: has {M.shape[1]} label columns, expected {num_labels}")
        return checked_csr(what, what, None, M.indices, M.indptr, M.shape, binary=True)
    if isinstance(Y, np.ndarray) and Y.ndim != 2:
        raise DatasetError(f"{what}: expected a multi-hot [n, L] array or a list of label lists, got shape {Y.shape}")
    try:
        lists = [list(row) for row in Y]
    except TypeError:
        raise DatasetError(f"{what}: expected a multi-hot [n, L] array or a list of label lists") from None
    return _label_lists_to_csr(what, lists, num_labels)


# ----------------------------------------------------------------------------------------------
# Splits, scaling, batches

def split_test(ds: Dataset, test_size: float, seed: int) -> Dataset:
    n = ds.X_train.shape[0]
    if not 0 < test_size < 1:
        raise DatasetError(f"test_size: expected a fraction in (0, 1), got {test_size}")
    n_test = int(round(n * test_size))
    if n_test < 1 or n_test >= n:
        raise DatasetError(f"{ds.source or ds.name}: {n} rows are too few to split off a test set")
    perm = np.random.default_rng(seed).permutation(n)
    te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return replace(ds, X_train=ds.X_train[tr], Y_train=ds.Y_train[tr], X_test=ds.X_train[te], Y_test=ds.Y_train[te])


def _join(train: Dataset, test: Dataset) -> Dataset:
    if test.X_train.shape[1] != train.X_train.shape[1]:
        raise DatasetError(f"{test.source}: has {test.X_train.shape[1]} features, the train file "
                           f"{train.source} has {train.X_train.shape[1]}")
    if test.num_labels != train.num_labels:
        raise DatasetError(f"{test.source}: has {test.num_labels} labels, the train file has {train.num_labels}")
    X_te = test.X_train
    if sp.issparse(train.X_train) != sp.issparse(X_te):
        X_te = sp.csr_matrix(X_te) if sp.issparse(train.X_train) else X_te.toarray()
    return replace(train, X_test=X_te, Y_test=test.Y_train)


@dataclass
class Split:
    """Train / validation / test parts ready for training (dense parts standardised)."""
    X_train: object
    Y_train: sp.csr_matrix
    X_val: object
    Y_val: sp.csr_matrix
    X_test: object
    Y_test: sp.csr_matrix
    num_labels: int
    num_features: int
    val_split: str = "random"  # how the validation part was drawn: "random" or "stratified"
    # 1 / p_l of Jain et al.'s propensity model from the training file's labels (validation rows
    # included, as extreme-classification evaluations count them); None below 3 rows
    inv_propensity: Optional[np.ndarray] = None


VAL_SPLITS = ("auto", "stratified", "random")
STRATIFY_MIN_LABELS = 50
"""`val_split="auto"` stratifies data sets with more labels than this, and draws at random otherwise."""
STRATIFY_MAX_WORK = 20_000_000_000
"""`auto` falls back to a random split when rows × labels² (labels with a positive) exceeds this:
iterstrat's iterative stratification works on a dense [rows, labels] matrix and sums it once per
label it processes, so its time grows as rows × labels² (about 3e-10 s per unit on a 2-core
machine: delicious, 12,920 rows × 983 labels, takes about 3 s; 12,000 × 4,000 about a minute)."""


def stratified_indices(Y, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Iterative stratification (Sechidis, Tsoumakas & Vlahavas 2011) of the rows of a multi-hot
    matrix into (train, validation) row indices, sorted, with the package iterative-stratification
    (iterstrat). The validation part gets about `n_val` rows: the algorithm fills each part to its
    per-label quotas, so the count can differ from `n_val` by a few percent. The rarest labels are
    placed first, each row going to the part that most lacks that label's positives: at a 15%
    share a label gets a validation positive from 4 positives on (a random split leaves a label
    with 4 positives out of validation with probability 0.85^4 = 52%). Deterministic per seed."""
    try:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
    except ImportError as err:
        raise ImportError("the stratified validation split needs the package iterative-stratification "
                          "(pip install iterative-stratification, or the `train` extra)") from err
    Y = sp.csr_matrix(Y)
    n = Y.shape[0]
    present = np.flatnonzero(np.diff(Y.tocsc().indptr) > 0)  # labels without a positive change nothing
    dense = np.zeros((n, max(len(present), 2)), dtype=bool)  # iterstrat needs two columns or more
    dense[:, :len(present)] = Y[:, present].toarray() != 0
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    tr, val = next(splitter.split(np.zeros((n, 1)), dense))
    return np.sort(tr), np.sort(val)


def choose_val_split(ds: Dataset, val_split: str = "auto") -> str:
    """The validation split `val_split` stands for on `ds`: "stratified" or "random" as given;
    "auto": stratified when the data set has more than STRATIFY_MIN_LABELS labels and
    stratifying costs at most STRATIFY_MAX_WORK (with a warning when it does not), else random."""
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split: expected one of {VAL_SPLITS}, got {val_split!r}")
    if val_split != "auto":
        return val_split
    if ds.num_labels <= STRATIFY_MIN_LABELS:
        return "random"
    n = ds.Y_train.shape[0]
    present = int((np.bincount(ds.Y_train.indices, minlength=ds.num_labels) > 0).sum())
    if n * present ** 2 > STRATIFY_MAX_WORK:
        import warnings
        warnings.warn(f"{ds.name}: {n} rows × {present} labels are too many for iterative stratification "
                      f"(time grows as rows × labels²); the validation split is random (val_split='stratified' "
                      f"forces it)", UserWarning, stacklevel=3)
        return "random"
    return "stratified"


def prepare_split(ds: Dataset, val_fraction: float = 0.15, seed: int = 0,
                  max_train: Optional[int] = None, val_split: str = "auto",
                  propensity: Optional[tuple[float, float]] = None) -> Split:
    """Hold out a validation slice of train (for early stopping, model and threshold choice),
    optionally subsample the remaining train rows, and standardise dense features with train
    statistics. Sparse bag-of-words stays sparse and unscaled.

    `val_split`: "random" (a seeded permutation), "stratified" (iterative stratification,
    `stratified_indices`: every label's share of positives in validation stays close to
    `val_fraction`, so rare labels are not left out by chance), or "auto" (the default:
    stratified above STRATIFY_MIN_LABELS labels, see `choose_val_split`). Both are deterministic
    for a seed; the choice is recorded in `Split.val_split`. `propensity`: the constants (A, B) of
    the propensity model behind the PSP@k metrics (default metrics.PROPENSITY_A, PROPENSITY_B)."""
    from .metrics import PROPENSITY_A, PROPENSITY_B, inverse_propensity

    strategy = choose_val_split(ds, val_split)
    a, b = propensity or (PROPENSITY_A, PROPENSITY_B)
    # computed first: bad constants fail before any training
    inv_prop = inverse_propensity(ds.Y_train, a, b) if ds.Y_train.shape[0] >= 3 else None
    rng = np.random.default_rng(seed)
    n = ds.X_train.shape[0]
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DatasetError(f"{ds.name}: {n} training rows are too few to hold out a validation slice")
    if strategy == "stratified":
        tr, val = stratified_indices(ds.Y_train, n_val, seed)
        if len(val) == 0 or len(tr) == 0:
            raise DatasetError(f"{ds.name}: {n} training rows are too few for a stratified validation split; "
                               f"use val_split='random'")
        tr = rng.permutation(tr)  # so that max_train keeps a random subset
    else:
        perm = rng.permutation(n)
        val, tr = np.sort(perm[:n_val]), perm[n_val:]
    if max_train is not None and len(tr) > max_train:
        tr = tr[:max_train]
    tr = np.sort(tr)
    X_tr, X_val, X_te = ds.X_train[tr], ds.X_train[val], ds.X_test
    if not sp.issparse(X_tr):
        mean = X_tr.mean(axis=0)
        std = X_tr.std(axis=0)
        std[std < 1e-8] = 1.0  # constant columns stay at 0 rather than exploding
        X_tr, X_val, X_te = ((x - mean) / std for x in (X_tr, X_val, X_te))
        X_tr, X_val, X_te = (x.astype(np.float32) for x in (X_tr, X_val, X_te))
    return Split(X_tr, ds.Y_train[tr], X_val, ds.Y_train[val], X_te, ds.Y_test, ds.num_labels, ds.num_features,
                 strategy, inv_prop)
