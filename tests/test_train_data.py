"""Loaders (npz, svmlight/XMC, ARFF, arrays), their errors, and the split/scaling step."""
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")
pytest.importorskip("arff")

from mlcl_fast.train import data as data_module
from mlcl_fast.train.data import (STRATIFY_MIN_LABELS, DatasetError, bundled_datasets, default_data_dir, from_arrays,
                                  load_arff, load_dataset, load_npz, load_svmlight, prepare_split,
                                  stratified_indices)


def write_npz(path, sparse_x=False, n_tr=6, n_te=4, d=3, L=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, n in (("train", n_tr), ("test", n_te)):
        X = rng.random((n, d)).astype(np.float32)
        Y = sp.csr_matrix((rng.random((n, L)) < 0.5).astype(np.int8))
        if sparse_x:
            Xs = sp.csr_matrix(X * (X > 0.5))
            arrays.update({f"X_{part}_data": Xs.data, f"X_{part}_indices": Xs.indices, f"X_{part}_indptr": Xs.indptr,
                           f"X_{part}_shape": np.array(Xs.shape)})
        else:
            arrays[f"X_{part}"] = X
        arrays.update({f"Y_{part}_indices": Y.indices, f"Y_{part}_indptr": Y.indptr, f"Y_{part}_shape": np.array(Y.shape)})
    arrays["label_names"] = np.array([f"l{k}" for k in range(L)])
    np.savez(path, **arrays)
    return arrays


def test_npz_dense_and_sparse(tmp_path):
    a = write_npz(tmp_path / "tiny.npz")
    ds = load_npz(tmp_path / "tiny.npz")
    assert ds.name == "tiny" and not ds.sparse and ds.X_train.dtype == np.float32
    np.testing.assert_array_equal(ds.X_train, a["X_train"])
    assert ds.Y_train.shape == (6, 4) and ds.label_names == ["l0", "l1", "l2", "l3"]
    write_npz(tmp_path / "sp.npz", sparse_x=True)
    ds = load_dataset(str(tmp_path / "sp.npz"))
    assert ds.sparse and ds.X_test.shape == (4, 3)


def test_npz_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="bad.npz.*not a readable"):
        load_npz(bad)
    np.savez(tmp_path / "partial.npz", X_train=np.zeros((2, 2)))
    with pytest.raises(DatasetError, match="partial.npz.*missing array"):
        load_npz(tmp_path / "partial.npz")


def test_name_resolution(tmp_path, monkeypatch):
    assert "emotions" in bundled_datasets()
    ds = load_dataset("emotions")
    assert ds.num_labels == 6 and ds.X_train.shape == (391, 72)
    write_npz(tmp_path / "mine.npz")
    assert load_dataset("mine", data_dir=str(tmp_path)).Y_test.shape == (4, 4)
    monkeypatch.setenv("MLCL_FAST_DATA", str(tmp_path))
    assert load_dataset("mine").name == "mine"
    with pytest.raises(DatasetError, match="nosuchset: no dataset of that name"):
        load_dataset("nosuchset")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(str(tmp_path / "absent.npz"))


def test_svmlight_and_xmc(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("0,2 1:1.5 3:2\n1 2:1\n2 1:0.5\n0 3:1\n")
    ds = load_svmlight(plain)
    assert ds.Y_train.toarray().tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert sp.issparse(ds.X_train) and ds.X_train.shape[0] == 4
    xmc = tmp_path / "train.xmc"
    # header: rows, features, labels; 0-based features; a row with no label
    xmc.write_text("4 5 6\n0,5 0:1 4:2\n3 1:1\n 2:3\n1,2 3:1\n")
    test = tmp_path / "test.xmc"
    test.write_text("2 5 6\n4 0:1\n0 4:1\n")
    ds = load_dataset(str(xmc), test_file=str(test))
    assert ds.X_train.shape == (4, 5) and ds.Y_train.shape == (4, 6) and ds.Y_test.shape == (2, 6)
    assert ds.Y_train.toarray()[2].sum() == 0 and ds.X_train[2, 2] == 3
    assert ds.Y_train.toarray()[0].tolist() == [1, 0, 0, 0, 0, 1]


def test_svmlight_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1:x\n")
    with pytest.raises(DatasetError, match="bad.txt: not a valid svmlight"):
        load_svmlight(bad)
    short = tmp_path / "short.xmc"
    short.write_text("3 4 2\n0 1:1\n")
    with pytest.raises(DatasetError, match="header announces 3 rows, the file has 1"):
        load_svmlight(short)
    out_of_range = tmp_path / "oor.xmc"
    out_of_range.write_text("1 4 2\n5 1:1\n")
    with pytest.raises(DatasetError, match="label index 5 is out of range for 2 labels"):
        load_svmlight(out_of_range)


ARFF_DENSE = """@relation tiny
@attribute f1 numeric
@attribute color {red,green,blue}
@attribute flag {YES,NO}
@attribute a {0,1}
@attribute b {0,1}
@data
1.5,red,YES,1,0
-2,green,NO,0,1
0,blue,NO,1,1
"""

ARFF_SPARSE = """@relation 'sparse: -C -2'
@attribute w0 numeric
@attribute w1 numeric
@attribute w2 numeric
@attribute x {0,1}
@attribute y {0,1}
@data
{0 1,3 1}
{1 2,2 1,4 1}
{}
"""

LABELS_XML = """<?xml version="1.0" encoding="utf-8"?>
<labels xmlns="http://mulan.sourceforge.net/labels"><label name="b"></label><label name="a"></label></labels>
"""


def test_arff_dense_with_count_and_xml(tmp_path):
    f = tmp_path / "tiny.arff"
    f.write_text(ARFF_DENSE)
    ds = load_arff(f, labels=2)
    np.testing.assert_array_equal(ds.X_train, [[1.5, 0, 1], [-2, 1, 0], [0, 2, 0]])
    assert ds.Y_train.toarray().tolist() == [[1, 0], [0, 1], [1, 1]] and ds.label_names == ["a", "b"]
    xml = tmp_path / "tiny.xml"
    xml.write_text(LABELS_XML)
    ds = load_arff(f, labels=str(xml))
    assert ds.label_names == ["b", "a"] and ds.Y_train.toarray().tolist() == [[0, 1], [1, 0], [1, 1]]


def test_arff_sparse_meka_header(tmp_path):
    f = tmp_path / "sp.arff"
    f.write_text(ARFF_SPARSE)
    ds = load_arff(f)  # "-C -2": the last two attributes are labels
    assert ds.sparse and ds.X_train.toarray().tolist() == [[1, 0, 0], [0, 2, 1], [0, 0, 0]]
    assert ds.Y_train.toarray().tolist() == [[1, 0], [0, 1], [0, 0]]


def test_arff_errors(tmp_path):
    f = tmp_path / "tiny.arff"
    f.write_text(ARFF_DENSE)
    with pytest.raises(DatasetError, match="tiny.arff: cannot tell which attributes are labels"):
        load_arff(f)
    with pytest.raises(DatasetError, match="label count 9 is out of range"):
        load_arff(f, labels=9)
    with pytest.raises(DatasetError, match="label attribute 'color' has values other than 0/1"):
        load_arff(f, labels=4)
    broken = tmp_path / "broken.arff"
    broken.write_text("@relation x\n@attribute a numeric\n@data\n1,2,3\n")
    with pytest.raises(DatasetError, match="broken.arff: not a valid ARFF file"):
        load_arff(broken, labels=1)
    missing = tmp_path / "missing.arff"
    missing.write_text("@relation x\n@attribute f numeric\n@attribute l {0,1}\n@data\n?,1\n1,0\n")
    with pytest.raises(DatasetError, match="missing values"):
        load_arff(missing, labels=1)


def test_arrays_and_split():
    rng = np.random.default_rng(0)
    X = rng.normal(5.0, 3.0, size=(40, 3))
    ds = from_arrays(X, [[0], [1, 2]] * 20, seed=1)
    assert ds.X_train.shape == (30, 3) and ds.X_test.shape == (10, 3) and ds.num_labels == 3
    split = prepare_split(ds, val_fraction=0.2, seed=0)
    assert split.X_val.shape[0] == 6 and split.X_train.shape[0] == 24
    np.testing.assert_allclose(split.X_train.mean(0), 0, atol=1e-5)  # scaled with train statistics
    np.testing.assert_allclose(split.X_train.std(0), 1, atol=1e-4)
    assert abs(split.X_test.mean()) > 1e-3  # test rows are transformed, not re-fitted
    Xs = sp.random(40, 5, density=0.3, format="csr", random_state=0)
    sparse = prepare_split(from_arrays(Xs, (rng.random((40, 2)) < 0.5).astype(int)), seed=0)
    assert sp.issparse(sparse.X_train) and sparse.X_train.data.min() >= 0  # bag-of-words stays sparse, unscaled
    with pytest.raises(DatasetError, match="Y: a multi-hot matrix must hold only 0/1"):
        from_arrays(X, np.full((40, 2), 2))
    with pytest.raises(DatasetError, match="X: expected a 2-D array"):
        from_arrays(np.zeros(5), [[0]] * 5)
    with pytest.raises(DatasetError, match="train split has 40 feature rows but 3 label rows"):
        from_arrays(X, [[0]] * 3)
    with pytest.raises(DatasetError, match="X_test, Y_test: give both"):
        from_arrays(X, [[0]] * 40, X_test=X)


def test_arrays_are_checked_like_files():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8, 3))
    Y = (rng.random((8, 2)) < 0.5).astype(int)
    Xs = sp.csr_matrix(X)
    Xs.data[4] = np.nan
    with pytest.raises(DatasetError, match=r"X row 1 has the value nan \(X_data\[4\]\)"):
        from_arrays(Xs, Y)
    with pytest.raises(DatasetError, match=r"X row 0 has the value inf in column 2"):
        from_arrays(np.where(np.arange(24).reshape(8, 3) == 2, np.inf, X), Y)
    # scipy builds these without checking the indices; training would write out of bounds
    bad_y = sp.csr_matrix((np.ones(2, np.int8), np.array([0, 5]), np.array([0, 1, 2] + [2] * 6)), shape=(8, 2))
    with pytest.raises(DatasetError, match=r"Y_indices\[1\] \(row 1\) is 5; expected a column index in \[0, 2\)"):
        from_arrays(X, bad_y)
    bad_x = sp.csr_matrix((np.ones(1), np.array([-1]), np.array([0, 1] + [1] * 7)), shape=(8, 3))
    with pytest.raises(DatasetError, match=r"X_indices\[0\] \(row 0\) is -1"):
        from_arrays(bad_x, Y)
    with pytest.raises(DatasetError, match=r"Y: row 0 has label 'a'; labels must be integers >= 0"):
        from_arrays(X, [["a"]] * 8)
    ds = from_arrays(sp.csr_matrix(X), Y, seed=0)
    assert ds.sparse and ds.X_train.dtype == np.float32 and ds.Y_train.dtype == np.int8


# ----------------------------------------------------------------------------------------------
# The validation split: random, or iterative stratification (iterstrat)

def rare_label_data(n=600, common=10, rare=50, per_rare=5, seed=0):
    """Every row has one of `common` frequent labels; each of `rare` labels has `per_rare`
    positives. X is sparse with the row number + 1 in column 0 (sparse features stay unscaled, so
    the rows of each part can be told apart)."""
    rng = np.random.default_rng(seed)
    Y = np.zeros((n, common + rare), dtype=np.int8)
    Y[np.arange(n), rng.integers(0, common, n)] = 1
    for label in range(common, common + rare):
        Y[rng.choice(n, per_rare, replace=False), label] = 1
    X = sp.csr_matrix(np.column_stack([np.arange(1, n + 1), rng.random((n, 3))]))
    ds = from_arrays(X, Y, X_test=X[:5], Y_test=Y[:5], name="rare")
    return ds, Y


def row_ids(X) -> np.ndarray:
    return np.asarray(X[:, 0].toarray()).ravel().astype(int) - 1


def test_stratified_split_keeps_rare_labels_in_validation():
    ds, Y = rare_label_data()
    assert ds.num_labels == 60 > STRATIFY_MIN_LABELS
    auto = prepare_split(ds, val_fraction=0.15, seed=0)                    # the default for > 50 labels
    assert auto.val_split == "stratified"
    rand = prepare_split(ds, val_fraction=0.15, seed=0, val_split="random")
    assert rand.val_split == "random"
    counts = Y.sum(0)
    missing = {}
    for name, split in (("stratified", auto), ("random", rand)):
        in_val = np.asarray(split.Y_val.sum(0)).ravel()
        missing[name] = int(((in_val == 0) & (counts >= 4)).sum())
        share = in_val / counts
        missing[name + " deviation"] = float(np.abs(share - 0.15).mean())   # per-label validation share vs 15%
    # the random split leaves about half of the 50 five-positive labels out of validation
    # (0.85^5 = 44% each); iterative stratification gives every label with 4+ positives its share
    assert missing["random"] >= 10 and missing["stratified"] == 0, missing
    assert missing["stratified deviation"] < missing["random deviation"] / 2, missing


@pytest.mark.parametrize("val_split", ["stratified", "random"])
def test_validation_split_is_deterministic_disjoint_and_sized(val_split):
    ds, Y = rare_label_data()
    a = prepare_split(ds, val_fraction=0.2, seed=3, val_split=val_split)
    b = prepare_split(ds, val_fraction=0.2, seed=3, val_split=val_split)
    c = prepare_split(ds, val_fraction=0.2, seed=4, val_split=val_split)
    tr, val = row_ids(a.X_train), row_ids(a.X_val)
    assert not set(tr) & set(val) and sorted(set(tr) | set(val)) == list(range(600))   # a partition
    np.testing.assert_array_equal(tr, row_ids(b.X_train))
    np.testing.assert_array_equal(val, row_ids(b.X_val))                              # same seed, same rows
    assert set(row_ids(c.X_val)) != set(val)                                          # another seed, others
    np.testing.assert_array_equal(a.Y_val.toarray(), Y[val])                          # labels follow their rows
    assert abs(len(val) - 120) <= (0 if val_split == "random" else 12)                # 20% of 600 (stratified: about)
    sub = prepare_split(ds, val_fraction=0.2, seed=3, val_split=val_split, max_train=100)
    sub_tr = row_ids(sub.X_train)
    assert len(sub_tr) == 100 and set(sub_tr) <= set(tr) and set(row_ids(sub.X_val)) == set(val)
    assert sub_tr.max() > 300                       # a random subset of the train rows, not the first 100


def test_stratified_indices_directly():
    _, Y = rare_label_data(n=200, rare=20, per_rare=4)
    tr, val = stratified_indices(sp.csr_matrix(Y), 40, seed=1)
    assert (np.diff(tr) > 0).all() and (np.diff(val) > 0).all()                     # sorted, no repeats
    assert np.intersect1d(tr, val).size == 0 and tr.size + val.size == 200
    assert (Y[val].sum(0) > 0).all()                   # every label, 4 positives or more, in validation
    tr2, val2 = stratified_indices(sp.csr_matrix(Y), 40, seed=1)
    assert np.array_equal(val, val2) and np.array_equal(tr, tr2)
    one = np.zeros((50, 1), dtype=np.int8)
    one[:10] = 1                                       # a single label (iterstrat needs two columns)
    tr, val = stratified_indices(sp.csr_matrix(one), 10, seed=0)
    assert one[val].sum() == 2 and tr.size + val.size == 50


def test_auto_split_rule(monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 3))
    few = from_arrays(X, (rng.random((80, STRATIFY_MIN_LABELS)) < 0.3).astype(int), seed=0)
    split = prepare_split(few, val_fraction=0.25, seed=2)
    assert split.val_split == "random"
    # the random split is the one of earlier versions: the first quarter of a seeded permutation
    perm = np.random.default_rng(2).permutation(60)
    np.testing.assert_array_equal(split.Y_val.toarray(), few.Y_train[np.sort(perm[:15])].toarray())
    many = from_arrays(X, (rng.random((80, STRATIFY_MIN_LABELS + 1)) < 0.3).astype(int), seed=0)
    assert prepare_split(many, seed=2).val_split == "stratified"
    assert prepare_split(few, seed=2, val_split="stratified").val_split == "stratified"
    monkeypatch.setattr(data_module, "STRATIFY_MAX_WORK", 60 * 51 ** 2 - 1)   # too costly: random, with a warning
    with pytest.warns(UserWarning, match="too many for iterative stratification"):
        assert prepare_split(many, seed=2).val_split == "random"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_split(many, seed=2, val_split="stratified").val_split == "stratified"  # forced: no check
    with pytest.raises(ValueError, match="val_split: expected one of"):
        prepare_split(few, val_split="iterative")


def test_stratified_split_of_delicious_takes_seconds():
    folder = default_data_dir()
    if folder is None or not (folder / "delicious.npz").exists():
        pytest.skip("delicious.npz is not in the shared data folder")
    ds = load_dataset("delicious")
    assert ds.num_labels == 983
    start = time.perf_counter()
    split = prepare_split(ds, val_fraction=0.15, seed=0)
    seconds = time.perf_counter() - start
    assert split.val_split == "stratified"
    assert seconds < 15, f"{seconds:.1f}s"              # about 3 s on a shared 2-core machine
    n = ds.Y_train.shape[0]
    assert split.Y_train.shape[0] + split.Y_val.shape[0] == n and abs(split.Y_val.shape[0] - 0.15 * n) < 0.1 * n
