"""File fuzzing of the dataset loaders (.npz dense and sparse, svmlight, XMC, ARFF dense and sparse):
truncated files, lying headers, out-of-range ids, NaN/Inf features, inconsistent CSR arrays, wrong
dtypes. Every corrupted file must raise DatasetError naming the file, or load into a consistent
Dataset: never crash, raise another exception type, or hand out arrays that index out of bounds.
The corrupted files are generated from fixed seeds, so every run sees the same ones."""
import re

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")
pytest.importorskip("arff")

from mlcl_fast.train.data import DatasetError, load_arff, load_dataset, load_npz, load_svmlight, max_dim

N_FEATURES, N_LABELS = 4, 3
RANDOM_MUTATIONS = 60  # per format; a few hundred loads of tiny files take about a second


# ---------------------------------------------------------------------------------------------
# Valid files, and what a loaded dataset must satisfy

def npz_arrays(sparse_x: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", 8), ("test", 5)):
        X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        X[0, 1] = 1.0  # row 0 has a stored feature
        Ydense = (rng.random((n, N_LABELS)) < 0.5).astype(np.int8)
        Ydense[0, 0] = Ydense[1, 1] = 1  # rows 0 and 1 carry labels, so index entries 0 and 1 exist
        Y = sp.csr_matrix(Ydense)
        if sparse_x:
            Xs = sp.csr_matrix(X * (X > 0))
            arrays.update({f"X_{part}_data": Xs.data, f"X_{part}_indices": Xs.indices.astype(np.int32),
                           f"X_{part}_indptr": Xs.indptr.astype(np.int32), f"X_{part}_shape": np.array(Xs.shape)})
        else:
            arrays[f"X_{part}"] = X
        arrays.update({f"Y_{part}_indices": Y.indices.astype(np.int32), f"Y_{part}_indptr": Y.indptr.astype(np.int32),
                       f"Y_{part}_shape": np.array(Y.shape)})
    arrays["label_names"] = np.array([f"l{k}" for k in range(N_LABELS)])
    return arrays


SVMLIGHT = b"0,2 1:1.5 3:2\n1 2:1\n2 1:0.5 4:-1\n0 3:1\n1,2 2:0.25\n"
XMC = b"5 5 3\n0,2 0:1 4:2\n1 1:1\n 2:3\n1,2 3:1\n0 0:0.5\n"
ARFF_DENSE = b"""@relation 'dense: -C -2'
@attribute f1 numeric
@attribute f2 numeric
@attribute color {red,green}
@attribute a {0,1}
@attribute b {0,1}
@data
1.5,2,red,1,0
-2,0.5,green,0,1
0,1,red,1,1
3,-1,green,0,0
"""
ARFF_SPARSE = b"""@relation 'sparse: -C -2'
@attribute w0 numeric
@attribute w1 numeric
@attribute w2 numeric
@attribute x {0,1}
@attribute y {0,1}
@data
{0 1,3 1}
{1 2,2 1,4 1}
{}
{0 0.5,2 3,3 1,4 1}
"""
TEXT_FORMATS = {"svmlight": ("plain.txt", SVMLIGHT, load_svmlight), "xmc": ("train.xmc", XMC, load_svmlight),
                "arff_dense": ("dense.arff", ARFF_DENSE, load_arff), "arff_sparse": ("sparse.arff", ARFF_SPARSE, load_arff)}


def assert_consistent(ds) -> None:
    """What training relies on: CSR arrays in bounds, multi-hot 0/1 labels, finite float32 features."""
    for X, Y in ((ds.X_train, ds.Y_train), (ds.X_test, ds.Y_test)):
        if X is None and Y is None:  # text loaders return the train part only
            continue
        assert X.shape[0] == Y.shape[0] > 0
        assert 1 <= X.shape[1] == ds.num_features <= max_dim() and 1 <= Y.shape[1] == ds.num_labels <= max_dim()
        assert X.dtype == np.float32
        if sp.issparse(X):
            assert sp.isspmatrix_csr(X)
            X.check_format(full_check=True)  # raises on out-of-range indices or a broken indptr
            assert np.isfinite(X.data).all()
        else:
            assert X.ndim == 2 and np.isfinite(X).all()
        assert sp.isspmatrix_csr(Y) and Y.dtype == np.int8
        Y.check_format(full_check=True)
        assert Y.has_canonical_format and (Y.data == 1).all()
    assert ds.label_names == [] or len(ds.label_names) == ds.num_labels


def outcome(load, path, *args):
    """The loaded dataset, checked consistent, or the DatasetError, checked to name the file.
    Any other exception propagates and fails the test."""
    try:
        ds = load(path, *args)
    except DatasetError as err:
        assert path.name in str(err), f"the error does not name {path.name}: {err}"
        return err
    assert_consistent(ds)
    return ds


def expect_error(load, path, pattern, *args):
    err = outcome(load, path, *args)
    assert isinstance(err, DatasetError), f"{path.name} loaded; expected an error matching {pattern!r}"
    assert re.search(pattern, str(err)), f"{err} does not match {pattern!r}"


# ---------------------------------------------------------------------------------------------
# .npz: targeted corruptions of the arrays

def _set(key, k, value, dtype=None):
    def mutate(a):
        arr = a[key].astype(dtype or a[key].dtype)
        arr[k] = value
        a[key] = arr
    return mutate


def _replace(key, fn):
    def mutate(a):
        a[key] = fn(a[key])
    return mutate


def _bump_last(key, by):
    def mutate(a):
        arr = a[key].copy()
        arr[-1] += by
        a[key] = arr
    return mutate


def _decreasing(key):
    def mutate(a):
        arr = a[key].copy()
        arr[2] = arr[3] + 1
        a[key] = arr
    return mutate


def _both(first, second):
    def mutate(a):
        first(a)
        second(a)
    return mutate


def _drop_label_column(a):
    a["Y_train_shape"] = np.array([8, 0])
    a["Y_train_indices"] = np.zeros(0, np.int32)
    a["Y_train_indptr"] = np.zeros(9, np.int32)


NPZ_CASES = [  # (id, sparse X?, mutation, error pattern)
    ("label -1", False, _set("Y_train_indices", 1, -1), r"Y_train_indices\[1\] \(row 1\) is -1; expected a column index in \[0, 3\)"),
    ("label == L", False, _set("Y_train_indices", 1, N_LABELS), r"Y_train_indices\[1\] \(row 1\) is 3; expected"),
    ("label 2**40", False, _set("Y_train_indices", 0, 2**40, np.int64), r"Y_train_indices\[0\] \(row 0\) is 1099511627776"),
    ("test label -1", False, _set("Y_test_indices", 0, -1), r"Y_test_indices\[0\] \(row 0\) is -1"),
    ("unsigned huge label", False, _set("Y_train_indices", 0, 2**63, np.uint64), r"Y_train_indices\[0\] .* is 9223372036854775808"),
    ("feature index -1", True, _set("X_train_indices", 0, -1), r"X_train_indices\[0\] \(row 0\) is -1; expected a column index in \[0, 4\)"),
    ("feature index == d", True, _set("X_train_indices", 0, N_FEATURES), r"X_train_indices\[0\] \(row 0\) is 4"),
    ("indptr decreasing", False, _decreasing("Y_train_indptr"), r"Y_train_indptr decreases at row 2"),
    ("unsigned indptr decreasing", False, _both(_replace("Y_train_indptr", lambda v: v.astype(np.uint32)), _decreasing("Y_train_indptr")), r"Y_train_indptr decreases at row 2"),
    ("indptr not from 0", False, _set("Y_train_indptr", 0, 1), r"Y_train_indptr\[0\] is 1; expected 0"),
    ("indptr past the indices", False, _bump_last("Y_train_indptr", 5), r"Y_train_indptr ends at \d+ but there are \d+ indices"),
    ("indptr short", False, _replace("Y_train_indptr", lambda v: v[:-1]), r"Y_train_indptr has 8 entries; expected 9"),
    ("sparse indptr past the data", True, _bump_last("X_train_indptr", 3), r"X_train_indptr ends at"),
    ("data shorter than indices", True, _replace("X_train_data", lambda v: v[:-1]), r"X_train_indptr ends at .* values"),
    ("float indices", False, _replace("Y_train_indices", lambda v: v.astype(np.float64)), r"Y_train_indices is a float64 .*expected a 1-D array of integers"),
    ("bool indptr", False, _replace("Y_train_indptr", lambda v: v.astype(bool)), r"Y_train_indptr is a bool"),
    ("2-D indices", False, _replace("Y_train_indices", lambda v: v.reshape(-1, 1)), r"Y_train_indices is a int32 array of shape \(\d+, 1\)"),
    ("string indices", False, _replace("Y_train_indices", lambda v: v.astype(str)), r"Y_train_indices is a <U\d+"),
    ("string data", True, _replace("X_train_data", lambda v: v.astype(str)), r"X_train_data is a <U\d+.*real numbers"),
    ("shape of 3", False, _replace("Y_train_shape", lambda v: np.array([8, 3, 1])), r"Y_train_shape is \[8, 3, 1\].*two integers"),
    ("float shape", False, _replace("Y_train_shape", lambda v: v.astype(float)), r"Y_train_shape is .*float64"),
    ("negative shape", False, _replace("Y_train_shape", lambda v: np.array([8, -3])), r"Y_train_shape is \[8, -3\]"),
    ("shape claims 1e12 labels", False, _replace("Y_train_shape", lambda v: np.array([8, 10**12])), r"Y_train: the number of columns is 1000000000000, above the size bound"),
    ("shape claims 1e12 features", True, _replace("X_train_shape", lambda v: np.array([8, 10**12])), r"X_train: the number of columns is 1000000000000, above"),
    ("shape claims more rows", False, _replace("Y_train_shape", lambda v: np.array([20, 3])), r"Y_train_indptr has 9 entries; expected 21"),
    ("no label columns", False, _drop_label_column, r"train split has 4 features and 0 labels"),
    ("X NaN", False, _replace("X_train", lambda v: np.where(np.arange(v.size).reshape(v.shape) == 9, np.nan, v)), r"X_train row 2 has the value nan in column 1"),
    ("X -inf", False, _set("X_test", (3, 0), -np.inf), r"X_test row 3 has the value -inf in column 0"),
    ("X beyond float32", False, _set("X_train", (5, 2), 1e300, np.float64), r"X_train row 5 has the value 1e\+300"),
    ("sparse X NaN", True, _set("X_train_data", 2, np.nan), r"X_train row \d+ has the value nan \(X_train_data\[2\]\)"),
    ("sparse X inf", True, _set("X_test_data", 0, np.inf), r"X_test row 0 has the value inf"),
    ("X strings", False, _replace("X_train", lambda v: v.astype(str)), r"X_train is a <U\d+ array .*real numbers"),
    ("X complex", False, _replace("X_train", lambda v: v.astype(complex)), r"X_train is a complex128"),
    ("X 1-D", False, _replace("X_train", lambda v: v.ravel()), r"X_train is a float32 array of shape \(32,\); expected a 2-D"),
    ("X objects (pickled)", False, _replace("X_train", lambda v: v.astype(object)), r"array 'X_train' is unreadable"),
    ("X rows != Y rows", False, _replace("X_train", lambda v: v[:-1]), r"train split has 7 feature rows but 8 label rows"),
    ("test features differ", False, _replace("X_test", lambda v: v[:, :-1]), r"disagree on the number of features"),
    ("label names too few", False, _replace("label_names", lambda v: v[:-1]), r"label_names has 2 names for 3 labels"),
    ("missing indptr", False, lambda a: a.pop("Y_train_indptr"), r"missing array 'Y_train_indptr'"),
]


@pytest.mark.parametrize("sparse_x, mutate, pattern", [c[1:] for c in NPZ_CASES], ids=[c[0] for c in NPZ_CASES])
def test_npz_corrupt_arrays(tmp_path, sparse_x, mutate, pattern):
    arrays = npz_arrays(sparse_x)
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    expect_error(load_npz, path, pattern)


@pytest.mark.parametrize("sparse_x", [False, True], ids=["dense", "sparse"])
def test_npz_valid_files_load_unchanged(tmp_path, sparse_x):
    arrays = npz_arrays(sparse_x)
    path = tmp_path / "good.npz"
    np.savez(path, **arrays)
    ds = outcome(load_npz, path)
    X = ds.X_train.toarray() if sparse_x else ds.X_train
    expected = (sp.csr_matrix((arrays["X_train_data"], arrays["X_train_indices"], arrays["X_train_indptr"])).toarray()
                if sparse_x else arrays["X_train"])
    np.testing.assert_array_equal(X, expected)
    assert ds.Y_train.indices.tolist() == arrays["Y_train_indices"].tolist()


def test_npz_duplicate_label_entries_stay_multi_hot(tmp_path):
    arrays = npz_arrays(False)
    ind, ptr = arrays["Y_train_indices"], arrays["Y_train_indptr"]
    arrays["Y_train_indices"] = np.concatenate([ind[:1], ind[:1], ind[1:]])  # row 0 repeats its first label
    arrays["Y_train_indptr"] = np.concatenate([ptr[:1], ptr[1:] + 1])
    np.savez(tmp_path / "dup.npz", **arrays)
    ds = outcome(load_npz, tmp_path / "dup.npz")
    assert ds.Y_train.toarray().max() == 1


def test_npz_truncated_and_flipped_bytes(tmp_path):
    for sparse_x in (False, True):
        path = tmp_path / "whole.npz"
        np.savez(path, **npz_arrays(sparse_x))
        data = path.read_bytes()
        rng = np.random.default_rng(11 + sparse_x)
        cuts = sorted({0, 1, 4, 30, len(data) // 2, len(data) - 22, len(data) - 1, *rng.integers(1, len(data), 10)})
        for cut in cuts:
            bad = tmp_path / f"cut{cut}.npz"
            bad.write_bytes(data[:cut])
            expect_error(load_npz, bad, r"not a readable \.npz file|unreadable|missing array")
        for k in rng.integers(0, len(data), 25):
            bad = tmp_path / f"flip{k}.npz"
            bad.write_bytes(data[:k] + bytes([data[k] ^ 0x5A]) + data[k + 1:])
            outcome(load_npz, bad)  # the zip CRC or header checks catch it, or a harmless byte changed


NASTY_VALUES = (-1, N_LABELS, N_FEATURES, 2**31, -2**31 - 1, 2**62, np.nan, np.inf, -np.inf, 1e300, 0.5)


def _random_npz_mutation(arrays: dict, rng) -> str:
    key = sorted(arrays)[rng.integers(len(arrays))]
    arr = arrays[key]
    op = rng.integers(5)
    if op == 0 and arr.size:  # one entry replaced by a nasty value, the dtype widened to hold it
        value = NASTY_VALUES[rng.integers(len(NASTY_VALUES))]
        wide = np.float64 if isinstance(value, float) or arr.dtype.kind == "f" else np.int64
        if arr.dtype.kind in "US":
            wide = arr.dtype
        new = arr.astype(wide)
        flat = new.reshape(-1)
        k = rng.integers(flat.size)
        flat[k] = str(value) if arr.dtype.kind in "US" else value
        arrays[key] = new
        return f"{key}.flat[{k}] = {value}"
    if op == 1:  # one entry too many or too few
        arrays[key] = arr.reshape(-1)[:-1] if rng.integers(2) and arr.size else np.append(arr.reshape(-1), arr.reshape(-1)[:1])
        return f"{key} resized"
    if op == 2 and arr.dtype.kind not in "US":
        dtype = (np.float32, np.int8, np.uint16, bool, np.int64, str)[rng.integers(6)]
        arrays[key] = arr.astype(dtype)
        return f"{key} as {np.dtype(dtype)}"
    if op == 3:
        del arrays[key]
        return f"{key} removed"
    arrays[key] = rng.permutation(arr.reshape(-1)).reshape(arr.shape) if arr.size else arr
    return f"{key} shuffled"


@pytest.mark.parametrize("sparse_x", [False, True], ids=["dense", "sparse"])
def test_npz_random_array_mutations(tmp_path, sparse_x):
    rng = np.random.default_rng(2024 + sparse_x)
    errors = 0
    for i in range(RANDOM_MUTATIONS):
        arrays = npz_arrays(sparse_x, seed=i)
        what = [_random_npz_mutation(arrays, rng) for _ in range(1 + rng.integers(2))]
        path = tmp_path / f"m{i}.npz"
        np.savez(path, **arrays)
        try:
            errors += isinstance(outcome(load_npz, path), DatasetError)
        except Exception as err:
            raise AssertionError(f"mutation {i} ({'; '.join(what)}): {type(err).__name__}: {err}") from err
    assert errors > RANDOM_MUTATIONS // 3  # the mutations mostly break the file


# ---------------------------------------------------------------------------------------------
# svmlight / XMC text

SVMLIGHT_CASES = [  # (id, file content, error pattern)
    ("label -1", b"0 1:1\n-1 2:1\n", r"row 1 has label -1\.0; labels must be integers >= 0"),
    ("label nan", b"nan 1:1\n", r"row 0 has label nan"),
    ("label inf", b"0 1:1\ninf 1:1\n", r"row 1 has label inf"),
    ("label 1.5", b"1.5 1:1\n", r"row 0 has label 1\.5"),
    ("label 1e9", b"0 1:1\n1,1000000000 2:1\n", r"in row 1, label index 1000000000 is above the size bound of 10000000"),
    ("label 1e30", b"1e30 1:1\n", r"above the size bound"),
    ("feature index 1e9", b"0 1:1\n1 1000000000:1\n", r"row 1 has feature index \d+, above the size bound"),
    ("feature index 2**70", b"0 1180591620717411303424:1\n", r"not a valid svmlight"),
    ("feature index -1", b"0 -1:1\n", r"not a valid svmlight"),
    ("feature nan", b"0 1:1\n1 2:nan\n", r"features row 1 has the value nan"),
    ("feature -inf", b"0 1:-inf\n", r"features row 0 has the value -inf"),
    ("feature beyond float32", b"0 1:1\n1 1:2\n2 2:1e300\n", r"features row 2 has the value inf"),
    ("feature not a number", b"0 1:x\n", r"not a valid svmlight"),
    ("empty", b"", r"empty file"),
    ("blank", b"\n \n", r"empty file"),
    ("binary", b"\x00\xff\xfe\x89PNG\r\n", r"not a valid svmlight"),
    ("header: more rows", b"4 5 3\n0 1:1\n1 2:1\n", r"XMC header announces 4 rows, the file has 2"),
    ("header: fewer rows", b"1 5 3\n0 1:1\n1 2:1\n", r"XMC header announces 1 rows, the file has 2"),
    ("header: 1e12 features", b"2 1000000000000 3\n0 1:1\n1 2:1\n", r"number of features in the XMC header is 1000000000000, above the size bound"),
    ("header: 1e12 labels", b"2 5 1000000000000\n0 1:1\n1 2:1\n", r"number of labels in the XMC header is 1000000000000"),
    ("header: 1e12 rows", b"1000000000000 5 3\n0 1:1\n", r"announces 1000000000000 rows, the file has 1"),
    ("header: 40-digit number", b"2 " + b"9" * 40 + b" 3\n0 1:1\n1 2:1\n", r"not a valid svmlight"),
    ("header: too few features", b"2 2 3\n0 1:1\n1 4:1\n", r"not a valid svmlight.*n_features"),
    ("header: too few labels", b"2 5 2\n0 1:1\n5 2:1\n", r"in row 1, label index 5 is out of range for 2 labels"),
    ("header: no rows", b"0 5 3\n", r"empty file"),
    ("no row has a label", b" 1:1\n 2:1\n", r"no row carries any label"),
]


@pytest.mark.parametrize("content, pattern", [c[1:] for c in SVMLIGHT_CASES], ids=[c[0] for c in SVMLIGHT_CASES])
def test_svmlight_corrupt_files(tmp_path, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    expect_error(load_svmlight, path, pattern)


def test_xmc_test_file_must_agree_with_the_train_header(tmp_path):
    train = tmp_path / "train.xmc"
    train.write_bytes(XMC)
    for header, pattern in ((b"1 6 3\n", r"announces 6 features, expected 5"), (b"1 5 4\n", r"announces 4 labels, expected 3")):
        test = tmp_path / "test.xmc"
        test.write_bytes(header + b"0 1:1\n")
        expect_error(lambda p: load_dataset(str(train), test_file=str(p)), test, pattern)


def test_size_bound_can_be_raised_or_lowered(tmp_path, monkeypatch):
    path = tmp_path / "wide.txt"
    path.write_bytes(b"0 1:1\n1,20 2:1\n")
    assert load_svmlight(path).num_labels == 21
    monkeypatch.setenv("MLCL_FAST_MAX_DIM", "10")
    expect_error(load_svmlight, path, r"label index 20 is above the size bound of 10 labels \(raise \$MLCL_FAST_MAX_DIM")
    monkeypatch.setenv("MLCL_FAST_MAX_DIM", "lots")
    with pytest.raises(DatasetError, match=r"\$MLCL_FAST_MAX_DIM: expected an integer"):
        load_svmlight(path)


# ---------------------------------------------------------------------------------------------
# ARFF

ARFF_HEAD = b"@relation 'x: -C -2'\n@attribute f1 numeric\n@attribute f2 numeric\n@attribute a {0,1}\n@attribute b {0,1}\n@data\n"
ARFF_NUMERIC_LABELS = b"@relation 'x: -C -1'\n@attribute f1 numeric\n@attribute a numeric\n@data\n"

ARFF_CASES = [  # (id, file content, labels argument, error pattern)
    ("dense nan", ARFF_HEAD + b"1,2,0,1\n3,nan,1,0\n", None, r"row 1 has the value nan for attribute 'f2'"),
    ("dense inf", ARFF_HEAD + b"inf,2,0,1\n", None, r"row 0 has the value inf for attribute 'f1'"),
    ("dense beyond float32", ARFF_HEAD + b"1,2,0,1\n1,2,0,1\n1e300,2,0,1\n", None, r"row 2 has the value 1e\+300 for attribute 'f1'"),
    ("sparse nan", ARFF_HEAD + b"{0 1,2 1}\n{1 nan}\n", None, r"row 1 has the value nan for attribute 'f2'"),
    ("sparse -inf after empty rows", ARFF_HEAD + b"{}\n{}\n{0 -inf}\n", None, r"row 2 has the value -inf for attribute 'f1'"),
    ("sparse index beyond", ARFF_HEAD + b"{0 1,7 1}\n", None, r"not a valid ARFF file"),
    ("sparse index -1", ARFF_HEAD + b"{-1 1,2 1}\n", None, r"not a valid ARFF file"),
    ("nominal label 2", ARFF_HEAD + b"1,2,2,1\n", None, r"not a valid ARFF file"),
    ("numeric label 2", ARFF_NUMERIC_LABELS + b"1,1\n2,2\n", None, r"label attribute 'a' has values other than 0/1"),
    ("numeric label nan", ARFF_NUMERIC_LABELS + b"1,nan\n", None, r"row 0 has the value nan for attribute 'a'"),
    ("-C 0", ARFF_HEAD.replace(b"-C -2", b"-C 0") + b"1,2,0,1\n", None, r"label count 0 \(from '-C 0' in the relation name\) is out of range for 4 attributes"),
    ("-C -9", ARFF_HEAD.replace(b"-C -2", b"-C -9") + b"1,2,0,1\n", None, r"label count 9 \(from '-C -9'"),
    ("-C 9", ARFF_HEAD.replace(b"-C -2", b"-C 9") + b"1,2,0,1\n", None, r"label count 9 \(from '-C 9'"),
    ("-C every attribute", ARFF_HEAD.replace(b"-C -2", b"-C -4") + b"1,2,0,1\n", None, r"label count 4 .* out of range"),
    ("-C 40 digits", ARFF_HEAD.replace(b"-C -2", b"-C " + b"9" * 40) + b"1,2,0,1\n", None, r"cannot tell which attributes are labels"),
    ("--labels 0", ARFF_HEAD + b"1,2,0,1\n", 0, r"label count 0 is out of range"),
    ("missing value", ARFF_HEAD + b"?,2,0,1\n", None, r"missing values"),
    ("no data rows", ARFF_HEAD, None, r"no data rows"),
    ("no @data", ARFF_HEAD[:-6], None, r"no data rows|not a valid ARFF"),
    ("empty", b"", None, r"not a valid ARFF|no data rows"),
    ("binary", b"\x00\xff\xfe\x89PNG\r\n", None, r"not a valid ARFF"),
]


@pytest.mark.parametrize("content, labels, pattern", [c[1:] for c in ARFF_CASES], ids=[c[0] for c in ARFF_CASES])
def test_arff_corrupt_files(tmp_path, content, labels, pattern):
    path = tmp_path / "bad.arff"
    path.write_bytes(content)
    expect_error(load_arff, path, pattern, labels)


def test_arff_label_file_errors(tmp_path):
    data = tmp_path / "d.arff"
    data.write_bytes(ARFF_HEAD + b"1,0,0,1\n")
    for name, xml, pattern in (
            ("dup.xml", b'<labels><label name="a"/><label name="a"/></labels>', r"dup\.xml: label 'a' is listed twice"),
            ("all.xml", b'<labels>' + b"".join(b'<label name="%s"/>' % n for n in (b"f1", b"f2", b"a", b"b")) + b"</labels>",
             r"d\.arff: the file has 0 features and 4 labels"),
            ("unknown.xml", b'<labels><label name="zz"/></labels>', r"label 'zz' from .*unknown\.xml is not an attribute"),
            ("broken.xml", b"<labels><label name=", r"broken\.xml: not a readable MULAN label file")):
        (tmp_path / name).write_bytes(xml)
        with pytest.raises(DatasetError, match=pattern):
            load_arff(data, str(tmp_path / name))


def test_arff_valid_sparse_file_loads_unchanged(tmp_path):
    path = tmp_path / "sparse.arff"
    path.write_bytes(ARFF_SPARSE)
    ds = outcome(load_arff, path)
    assert ds.X_train.toarray().tolist() == [[1, 0, 0], [0, 2, 1], [0, 0, 0], [0.5, 0, 3]]
    assert ds.Y_train.toarray().tolist() == [[1, 0], [0, 1], [0, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------
# Every text format: truncation at every byte, and seeded random edits

@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
def test_text_truncated_at_every_byte(tmp_path, fmt):
    name, data, load = TEXT_FORMATS[fmt]
    (tmp_path / name).write_bytes(data)
    assert not isinstance(outcome(load, tmp_path / name), DatasetError)  # the intact file loads
    for cut in range(len(data)):
        path = tmp_path / f"cut{cut}_{name}"
        path.write_bytes(data[:cut])
        outcome(load, path)


NASTY_TOKENS = (b"-1", b"nan", b"inf", b"-inf", b"1e400", b"1e300", b"1000000000", b"4294967296", b"1" * 25,
                b"0", b"1.5", b"", b":", b",", b"{", b"}", b"?", b"x", b"\xff\xfe")
TOKEN = re.compile(rb"[^\s,:{}]+")


def _random_text_edit(data: bytes, rng) -> tuple[bytes, str]:
    op = rng.integers(5)
    lines = data.split(b"\n")
    if op == 0:
        tokens = list(TOKEN.finditer(data))
        m = tokens[rng.integers(len(tokens))]
        new = NASTY_TOKENS[rng.integers(len(NASTY_TOKENS))]
        return data[:m.start()] + new + data[m.end():], f"token {m.group()!r} at {m.start()} -> {new!r}"
    if op == 1:
        k = rng.integers(len(lines))
        return b"\n".join(lines[:k] + lines[k + 1:]), f"line {k} deleted"
    if op == 2:
        k = rng.integers(len(lines))
        return b"\n".join(lines[:k + 1] + lines[k:]), f"line {k} doubled"
    if op == 3:
        k = rng.integers(len(data))
        junk = bytes(rng.integers(0, 256, rng.integers(1, 4), dtype=np.uint8))
        return data[:k] + junk + data[k:], f"{junk!r} inserted at {k}"
    k = rng.integers(len(data))
    return data[:k] + data[k + 1:], f"byte {k} deleted"


@pytest.mark.parametrize("fmt", sorted(TEXT_FORMATS))
def test_text_random_edits(tmp_path, fmt):
    name, data, load = TEXT_FORMATS[fmt]
    rng = np.random.default_rng(sum(map(ord, fmt)))
    for i in range(RANDOM_MUTATIONS):
        edited, what = data, []
        for _ in range(1 + rng.integers(3)):
            edited, step = _random_text_edit(edited, rng)
            what.append(step)
        path = tmp_path / f"e{i}_{name}"
        path.write_bytes(edited)
        try:
            outcome(load, path)
        except Exception as err:
            raise AssertionError(f"edit {i} of {name} ({'; '.join(what)}): {type(err).__name__}: {err}") from err
