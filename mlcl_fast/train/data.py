"""Multi-label datasets: loaders for .npz, svmlight/XMC, MULAN ARFF and user arrays, plus the
train/validation split, feature scaling and mini-batching used by the training protocols.

Every loader returns a `Dataset`: X as a dense float32 ndarray or a scipy CSR matrix (kept sparse
until a batch is drawn), Y as a CSR multi-hot matrix (int8). Errors name the file and the problem.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_DATASET = "emotions"
DATA_ENV = "MLCL_FAST_DATA"


class DatasetError(ValueError):
    """A dataset file or array that cannot be used; the message names the source and the problem."""


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
    the path of a MULAN .xml label file."""
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
                X = z[f"X_{part}"].astype(np.float32) if f"X_{part}" in files else _npz_csr(z, f"X_{part}", True)
                Y = _npz_csr(z, f"Y_{part}", False)
            except KeyError as err:
                raise DatasetError(f"{path}: missing array {err.args[0]!r}; expected X_{part} (dense) or "
                                   f"X_{part}_data/_indices/_indptr/_shape, and Y_{part}_indices/_indptr/_shape") from err
            parts += [X, Y]
        names = [str(s) for s in z["label_names"]] if "label_names" in files else []
        source = str(z["source"]) if "source" in files else str(path)
    X_tr, Y_tr, X_te, Y_te = parts
    _check_shapes(path, X_tr, Y_tr, "train")
    _check_shapes(path, X_te, Y_te, "test")
    if X_tr.shape[1] != X_te.shape[1] or Y_tr.shape[1] != Y_te.shape[1]:
        raise DatasetError(f"{path}: train and test disagree on the number of features or labels "
                           f"({X_tr.shape[1]} vs {X_te.shape[1]} features, {Y_tr.shape[1]} vs {Y_te.shape[1]} labels)")
    return Dataset(path.stem, X_tr, Y_tr, X_te, Y_te, names, source)


def _npz_csr(z, key: str, has_data: bool) -> sp.csr_matrix:
    shape = tuple(int(s) for s in z[key + "_shape"])
    idx, ptr = z[key + "_indices"], z[key + "_indptr"]
    data = z[key + "_data"].astype(np.float32) if has_data else np.ones(len(idx), dtype=np.int8)
    try:
        return sp.csr_matrix((data, idx, ptr), shape=shape)
    except ValueError as err:
        raise DatasetError(f"inconsistent CSR arrays for {key}: {err}") from err


def _check_shapes(path, X, Y, part: str) -> None:
    if X.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise DatasetError(f"{path}: {part} split has {X.shape[0]} feature rows but {Y.shape[0]} label rows")
    if X.shape[0] == 0:
        raise DatasetError(f"{path}: {part} split is empty")


# ----------------------------------------------------------------------------------------------
# svmlight / XMC text: "l1,l2 f:v f:v ...", optionally after an XMC header "n_samples n_features n_labels"

_HEADER = re.compile(rb"^\s*(\d+)\s+(\d+)\s+(\d+)\s*$")


def load_svmlight(path, n_features: Optional[int] = None, n_labels: Optional[int] = None) -> Dataset:
    """One svmlight/XMC multi-label file as the train part of a Dataset (the caller adds a test split)."""
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    raw = path.read_bytes()
    lines = raw.splitlines()
    header = _HEADER.match(lines[0]) if lines else None
    if header:
        n_rows, n_feat, n_lab = (int(g) for g in header.groups())
        n_features = n_features or n_feat
        n_labels = n_labels or n_lab
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
    Y = _label_lists_to_csr(path, y, n_labels)
    return Dataset(path.stem, X.tocsr(), Y, None, None, [], str(path))


def _label_lists_to_csr(source, label_lists, n_labels: Optional[int]) -> sp.csr_matrix:
    rows, cols = [], []
    for i, labs in enumerate(label_lists):
        for lab in labs:
            if lab != int(lab) or lab < 0:
                raise DatasetError(f"{source}: row {i} has label {lab!r}; labels must be integers >= 0")
            rows.append(i)
            cols.append(int(lab))
    top = max(cols) + 1 if cols else 0
    if n_labels is None:
        n_labels = top
    elif top > n_labels:
        raise DatasetError(f"{source}: label index {top - 1} is out of range for {n_labels} labels")
    if n_labels == 0:
        raise DatasetError(f"{source}: no row carries any label")
    data = np.ones(len(rows), dtype=np.int8)
    Y = sp.csr_matrix((data, (rows, cols)), shape=(len(label_lists), n_labels))
    Y.sum_duplicates()
    Y.data[:] = 1
    return Y


# ----------------------------------------------------------------------------------------------
# MULAN ARFF: the label attributes are named by an .xml file, or are the last `n` attributes
# (MEKA's "-C n" in the relation name: the first n when n > 0, the last |n| when n < 0)

def load_arff(path, labels=None) -> Dataset:
    import arff

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    text = path.read_text(errors="replace")
    try:
        doc = arff.loads(text, return_type=arff.COO) if _is_sparse_arff(text) else arff.loads(text)
    except Exception as err:
        raise DatasetError(f"{path}: not a valid ARFF file ({type(err).__name__}: {err})") from err
    attrs = doc["attributes"]
    n_attr = len(attrs)
    label_cols = _arff_label_columns(path, doc, labels)
    if isinstance(doc["data"], tuple):
        vals, rows, cols = doc["data"]
        n_rows = len(_arff_data_lines(text))  # trailing all-zero rows "{}" leave no COO entry
        table = np.zeros((n_rows, n_attr), dtype=object)
        table[:] = 0.0
        for v, r, c in zip(vals, rows, cols):
            table[r, c] = v
    else:
        table = np.array(doc["data"], dtype=object).reshape(-1, n_attr)
    if table.shape[0] == 0:
        raise DatasetError(f"{path}: no data rows")
    feature_cols = [j for j in range(n_attr) if j not in set(label_cols) and attrs[j][1] != "STRING"]
    X = np.empty((table.shape[0], len(feature_cols)), dtype=np.float32)
    for out, j in enumerate(feature_cols):
        X[:, out] = _arff_column(path, attrs[j], table[:, j])
    Y = np.empty((table.shape[0], len(label_cols)), dtype=np.int8)
    for out, j in enumerate(label_cols):
        col = _arff_column(path, attrs[j], table[:, j])
        if not np.isin(col, (0, 1)).all():
            raise DatasetError(f"{path}: label attribute {attrs[j][0]!r} has values other than 0/1")
        Y[:, out] = col
    names = [attrs[j][0] for j in label_cols]
    Xs = sp.csr_matrix(X) if isinstance(doc["data"], tuple) else X
    return Dataset(path.stem, Xs, sp.csr_matrix(Y), None, None, names, str(path))


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
        missing = [w for w in wanted if w not in names]
        if missing:
            raise DatasetError(f"{path}: label {missing[0]!r} from {labels} is not an attribute of the file")
        return [names.index(w) for w in wanted]
    if labels is None:
        m = re.search(r"-C\s+(-?\d+)", doc.get("relation", ""))
        if not m:
            raise DatasetError(f"{path}: cannot tell which attributes are labels; give the label count "
                               f"(--labels N, the last N attributes) or a MULAN .xml label file")
        n = int(m.group(1))
        return list(range(n)) if n > 0 else list(range(len(names) + n, len(names)))
    try:
        n = int(labels)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: labels must be a label count or a .xml file, got {labels!r}") from None
    if not 0 < n < len(names):
        raise DatasetError(f"{path}: label count {n} is out of range for {len(names)} attributes")
    return list(range(len(names) - n, len(names)))


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


def _arff_column(path: Path, attr, column) -> np.ndarray:
    name, kind = attr
    if any(v is None for v in column):
        raise DatasetError(f"{path}: attribute {name!r} has missing values ('?'), which are not supported")
    if isinstance(kind, list):  # nominal: numeric-valued categories keep their value, others their position
        try:
            return np.array([float(v) for v in column], dtype=np.float32)
        except (TypeError, ValueError):
            pos = {v: i for i, v in enumerate(kind)}
            lowered = [str(k).lower() for k in kind]
            if sorted(lowered) == ["no", "yes"]:
                pos = {k: float(str(k).lower() == "yes") for k in kind}
            return np.array([pos[v] if isinstance(v, str) else float(v) for v in column], dtype=np.float32)
    return np.asarray(column, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# User arrays

def from_arrays(X, Y, X_test=None, Y_test=None, *, name: str = "arrays", label_names: Sequence[str] = (),
                num_labels: Optional[int] = None, test_size: float = 0.25, seed: int = 0) -> Dataset:
    """X: [n, d] array or scipy sparse; Y: multi-hot [n, L] (dense or sparse) or a list of label
    lists. Without X_test/Y_test a random test split is drawn."""
    Xc, Yc = _as_x(X, "X"), _as_y(Y, "Y", num_labels)
    _check_shapes(name, Xc, Yc, "train")
    ds = Dataset(name, Xc, Yc, None, None, list(label_names), "arrays")
    if X_test is None and Y_test is None:
        return split_test(ds, test_size, seed)
    if X_test is None or Y_test is None:
        raise DatasetError("X_test, Y_test: give both or neither")
    Xt, Yt = _as_x(X_test, "X_test"), _as_y(Y_test, "Y_test", Yc.shape[1])
    _check_shapes(name, Xt, Yt, "test")
    if Xt.shape[1] != Xc.shape[1]:
        raise DatasetError(f"X_test: has {Xt.shape[1]} features, X has {Xc.shape[1]}")
    return replace(ds, X_test=Xt, Y_test=Yt)


def _as_x(X, what: str):
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    arr = np.asarray(X, dtype=np.float32)
    if arr.ndim != 2:
        raise DatasetError(f"{what}: expected a 2-D array [n, d], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{what}: contains NaN or Inf")
    return arr


def _as_y(Y, what: str, num_labels: Optional[int]) -> sp.csr_matrix:
    if sp.issparse(Y) or (isinstance(Y, np.ndarray) and Y.ndim == 2):
        M = sp.csr_matrix(Y)
        if M.nnz and not np.isin(M.data, (0, 1)).all():
            raise DatasetError(f"{what}: a multi-hot matrix must hold only 0/1")
        M.eliminate_zeros()
        M = M.astype(np.int8)
        if num_labels is not None and M.shape[1] != num_labels:
            raise DatasetError(f"{what}: has {M.shape[1]} label columns, expected {num_labels}")
        return M
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


def prepare_split(ds: Dataset, val_fraction: float = 0.15, seed: int = 0,
                  max_train: Optional[int] = None) -> Split:
    """Hold out a validation slice of train (for early stopping, model and threshold choice),
    optionally subsample the remaining train rows, and standardise dense features with train
    statistics. Sparse bag-of-words stays sparse and unscaled."""
    rng = np.random.default_rng(seed)
    n = ds.X_train.shape[0]
    perm = rng.permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DatasetError(f"{ds.name}: {n} training rows are too few to hold out a validation slice")
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
    return Split(X_tr, ds.Y_train[tr], X_val, ds.Y_train[val], X_te, ds.Y_test, ds.num_labels, ds.num_features)


def dense_rows(X, rows=None) -> np.ndarray:
    """Rows of X as a dense float32 array (sparse matrices are densified only here, per batch)."""
    part = X if rows is None else X[rows]
    return part.toarray().astype(np.float32) if sp.issparse(part) else np.asarray(part, dtype=np.float32)
