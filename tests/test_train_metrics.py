"""Metrics against scikit-learn, napkinxc, a dense reference and hand-computed values; threshold
tuning; the top-k path for large label spaces."""
import json
import math
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from mlcl_fast.train.metrics import (PROPENSITY_CONSTANTS, evaluate, inverse_propensity, label_average_precision,
                                     macro_map, precision_at_k, propensity, ranking_metrics, threshold_metrics,
                                     topk_from_scores, tune_thresholds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholded_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    Y = rng.random((60, 9)) < 0.25
    Y[:, 0] = False                      # a label without positives
    pred = rng.random((60, 9)) < 0.3
    pred[:, 1] = False                   # a label never predicted
    got = threshold_metrics(Y, pred)
    assert got["micro_f1"] == pytest.approx(sklearn_metrics.f1_score(Y, pred, average="micro", zero_division=0))
    assert got["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(Y, pred, average="macro", zero_division=0))
    assert got["hamming"] == pytest.approx(sklearn_metrics.hamming_loss(Y, pred))


@pytest.mark.parametrize("rounding", [None, 1])
def test_macro_map_matches_sklearn_including_ties(rounding):
    rng = np.random.default_rng(3)
    Y = rng.random((80, 7)) < 0.3
    S = rng.random((80, 7))
    if rounding is not None:
        S = np.round(S, rounding)        # many tied scores
    want = sklearn_metrics.average_precision_score(Y, S, average=None)
    np.testing.assert_allclose(label_average_precision(Y, S), want, rtol=1e-12)
    Y[:, 2] = False                      # labels without positives are left out of the mean
    keep = Y.any(0)
    assert macro_map(Y, S) == pytest.approx(sklearn_metrics.average_precision_score(Y[:, keep], S[:, keep]))
    assert np.isnan(label_average_precision(Y, S)[2])


def test_precision_at_k_by_hand():
    Y = np.array([[1, 0, 1, 0, 0, 0],
                  [0, 0, 0, 0, 0, 1],
                  [0, 0, 0, 0, 0, 0]], dtype=bool)
    S = np.array([[0.9, 0.8, 0.7, 0.1, 0.0, 0.2],   # top: 0 (hit), 1, 2 (hit), 5, 3
                  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],   # top: 5 (hit), 4, 3, 2, 1
                  [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    assert precision_at_k(Y, S, 1) == pytest.approx((1 + 1 + 0) / 3)
    assert precision_at_k(Y, S, 3) == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert precision_at_k(Y, S, 5) == pytest.approx((2 / 5 + 1 / 5 + 0) / 3)


def test_tuned_thresholds_pick_best_validation_f1():
    Y = np.array([[1, 0], [1, 0], [0, 0], [0, 1]], dtype=bool)
    S = np.array([[0.3, 0.9], [0.25, 0.1], [0.1, 0.2], [0.2, 0.6]])
    thr = tune_thresholds(Y, S)
    # label 0: positives at .3/.25, negatives at .1/.2 -> any threshold in (0.2, 0.25] is perfect;
    # of the grid points 0.25 is the only one (ties go to the point closest to 0.5)
    assert thr[0] == pytest.approx(0.25)
    # label 1: one positive at 0.6 and a negative at 0.9: F1 is best at thresholds <= 0.6
    # (1 TP + 1 FP, F1 2/3); the closest such grid point to 0.5 is 0.5
    assert thr[1] == pytest.approx(0.5)
    Y0 = np.zeros((3, 1), dtype=bool)
    assert tune_thresholds(Y0, np.array([[0.9], [0.1], [0.3]]))[0] == 0.5  # no validation positive


def test_evaluate_reports_all_metrics():
    rng = np.random.default_rng(0)
    Y = rng.random((30, 6)) < 0.3
    S = rng.random((30, 6))
    m = evaluate(Y, S, thresholds=np.full(6, 0.5))
    for key in ("micro_f1", "macro_f1", "hamming", "map", "p@1", "p@3", "p@5", "ndcg@1", "ndcg@3", "ndcg@5"):
        assert 0 <= m[key] <= 1
    assert m["macro_f1_tuned"] == pytest.approx(m["macro_f1"])  # same thresholds, same numbers
    low = evaluate(Y, S, thresholds=np.full(6, 0.05))
    assert low["hamming_tuned"] > m["hamming"]
    assert "psp@1" not in m
    w = inverse_propensity(rng.random((50, 6)) < 0.2)
    ps = evaluate(sp.csr_matrix(Y), S, inv_propensity=w)
    for k in (1, 3, 5):
        assert 0 <= ps[f"psp@{k}"] <= 1 and 0 <= ps[f"psndcg@{k}"] <= 1
        assert ps[f"psp@{k}_raw"] > 0 and ps[f"p@{k}"] == m[f"p@{k}"]


# ----------------------------------------------------------------------------------------------
# Top-k and ranking metrics (P@k, nDCG@k, PSP@k, PSnDCG@k)

def stable_topk(S, k):
    """The reference order: a full stable descending sort of each row."""
    return np.argsort(-S, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("decimals", [None, 1])
def test_topk_matches_a_full_stable_sort(decimals):
    rng = np.random.default_rng(4)
    S = rng.random((57, 23))
    if decimals is not None:
        S = np.round(S, decimals)       # ties at the k-th place: the lower label index goes first
    S[3] = 0.5                          # a row of equal scores
    S[4, 2] = np.nan                    # NaN ranks last
    for k in (1, 5, 23, 40):
        for chunk in (1, 23 * 5, 10 ** 6):
            idx, val = topk_from_scores(S, k, chunk_elements=chunk)
            want = stable_topk(np.where(np.isnan(S), -np.inf, S), k)
            np.testing.assert_array_equal(idx, want)
            np.testing.assert_array_equal(val, np.take_along_axis(np.where(np.isnan(S), -np.inf, S), want, 1))
    blocks = (S[s:s + 10] for s in range(0, 57, 10))    # row blocks, as a model's batches come
    np.testing.assert_array_equal(topk_from_scores(blocks, 5)[0], stable_topk(np.nan_to_num(S, nan=-np.inf), 5))


def test_topk_of_a_sparse_score_matrix_pads_unscored_slots():
    S = sp.csr_matrix(np.array([[0.0, 0.3, 0.0, 0.9, 0.3],     # stored: 0.3 (1), 0.9 (3), 0.3 (4)
                                [0.0, 0.0, 0.0, 0.0, 0.0],     # nothing stored
                                [0.2, 0.0, 0.0, 0.0, 0.0]]))
    idx, val = topk_from_scores(S, 2)
    assert idx.tolist() == [[3, 1], [-1, -1], [0, -1]]       # 0.9, then the tie 0.3/0.3 -> lower index
    assert val.tolist() == [[0.9, 0.3], [-np.inf, -np.inf], [0.2, -np.inf]]


def test_ranking_metrics_by_hand():
    # truth: row 0 {0, 2}, row 1 {3}, row 2 no positive; inverse propensities w = (1, 2, 4, 8, 1, 1)
    Y = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]]))
    top = np.array([[1, 2, 0],          # miss, hit (w 4), hit (w 1)
                    [3, 5, 4],          # hit (w 8), miss, miss
                    [0, 1, 2]])         # no positive: every metric counts 0 for this row
    w = np.array([1.0, 2, 4, 8, 1, 1])
    m = ranking_metrics(Y, top, (1, 3), inv_propensity=w)
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)        # discounts of ranks 2 and 3 (0.6309, 0.5)
    assert m["p@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["p@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["ndcg@1"] == pytest.approx((0 + 1 + 0) / 3)
    # row 0: DCG@3 = d2 + d3 = 1.1309, IDCG@3 with 2 positives = 1 + d2 = 1.6309 -> 0.6934; row 1: 1
    assert m["ndcg@3"] == pytest.approx(((d2 + d3) / (1 + d2) + 1 + 0) / 3)
    assert m["ndcg@3"] == pytest.approx(0.564475, abs=1e-6)
    # unnormalised (Jain et al.): PSP@k = mean over rows of (1/k) Σ w of the hits in the top k
    assert m["psp@1_raw"] == pytest.approx((0 + 8 + 0) / 3)
    assert m["psp@3_raw"] == pytest.approx(((4 + 1) / 3 + 8 / 3 + 0) / 3)                 # 13/9
    # normalised: divided by the best ranking, rows' positives by decreasing w: row 0 (4, 1), row 1 (8)
    assert m["psp@1"] == pytest.approx((0 + 8) / (4 + 8))                                 # 2/3
    assert m["psp@3"] == pytest.approx((4 + 1 + 8) / (4 + 1 + 8))                         # 1: all found
    # PSnDCG@3 (raw): row 0 (4·d2 + 1·d3) / (1 + d2) = 1.8540, row 1 8 / 1, row 2 0
    assert m["psndcg@3_raw"] == pytest.approx(((4 * d2 + d3) / (1 + d2) + 8 + 0) / 3)
    assert m["psndcg@3_raw"] == pytest.approx(3.284662, abs=1e-6)
    # normalised: best row 0 (4·1 + 1·d2) / (1 + d2) = 2.8394, best row 1 8 -> 9.8540 / 10.8394
    assert m["psndcg@3"] == pytest.approx(((4 * d2 + d3) / (1 + d2) + 8) / ((4 + d2) / (1 + d2) + 8))
    assert m["psndcg@3"] == pytest.approx(0.909086, abs=1e-6)
    assert m["psndcg@1"] == pytest.approx((0 + 8) / (4 + 8))
    # unsorted top-k with their scores are put in order first; -1 is an empty slot
    shuffled = np.array([[0, 1, 2], [4, 3, 5], [2, 0, 1]])
    scores = np.array([[0.1, 0.9, 0.5], [0.1, 0.9, 0.2], [0.1, 0.9, 0.5]])
    assert ranking_metrics(Y, shuffled, (1, 3), scores=scores, inv_propensity=w) == pytest.approx(m)
    short = ranking_metrics(Y, np.array([[2, -1], [-1, -1], [0, 1]]), (1, 3))
    assert short["p@1"] == pytest.approx(1 / 3) and short["p@3"] == pytest.approx(1 / 9)  # ranks past m miss


def test_inverse_propensity_by_hand():
    # N = 20 rows; label 0 never, label 1 in 4 rows, label 2 in all; defaults A = 0.55, B = 1.5
    Y = np.zeros((20, 3), dtype=bool)
    Y[:4, 1] = True
    Y[:, 2] = True
    # C = (ln 20 - 1) (1.5 + 1)^0.55 = 1.995732 × 1.655263 = 3.303462
    # 1/p = 1 + C (N_l + 1.5)^-0.55: N_l = 0: 1 + 3.303462 × 0.800110 = 3.643133
    #                               N_l = 4: 1 + 3.303462 × 0.391562 = 2.293510
    #                               N_l = 20: 1 + 3.303462 × 0.184995 = 1.611122
    np.testing.assert_allclose(inverse_propensity(sp.csr_matrix(Y)), [3.643133, 2.293510, 1.611122], atol=2e-6)
    np.testing.assert_allclose(propensity(Y), 1 / np.array([3.643133, 2.293510, 1.611122]), rtol=1e-6)
    # Wikipedia constants A = 0.5, B = 0.4: C = 1.995732 × 1.4^0.5 = 1.995732 × 1.183216 = 2.361382;
    # N_l = 4: 1 + C / 4.4^0.5 = 1 + 2.361382 / 2.097618 = 2.125745
    A, B = PROPENSITY_CONSTANTS["wikipedia"]
    assert inverse_propensity(Y, A, B)[1] == pytest.approx(2.125745, abs=1e-6)
    assert PROPENSITY_CONSTANTS["amazon"] == (0.6, 2.6) and PROPENSITY_CONSTANTS["default"] == (0.55, 1.5)
    with pytest.raises(ValueError, match="at least 3 training rows"):
        inverse_propensity(Y[:2])
    with pytest.raises(ValueError, match="B > 0"):
        inverse_propensity(Y, 0.55, 0.0)


def dense_reference(Y, S, w, k):
    """The definitions written out row by row, on dense arrays."""
    Y = np.asarray(Y, dtype=bool)
    best = np.argsort(-S, axis=1, kind="stable")[:, :k]
    p, nd, psp, psnd, best_psp, best_psnd = ([] for _ in range(6))
    for i in range(Y.shape[0]):
        hits = Y[i, best[i]]
        disc = 1 / np.log2(np.arange(2, hits.size + 2))
        pos = np.flatnonzero(Y[i])
        idcg = disc[:min(k, pos.size)].sum()
        ideal = np.sort(w[pos])[::-1][:k]
        p.append(hits.sum() / k)
        psp.append((hits * w[best[i]]).sum() / k)
        best_psp.append(ideal.sum() / k)
        nd.append((hits * disc).sum() / idcg if pos.size else 0.0)
        psnd.append((hits * w[best[i]] * disc).sum() / idcg if pos.size else 0.0)
        best_psnd.append((ideal * disc[:ideal.size]).sum() / idcg if pos.size else 0.0)
    return {f"p@{k}": np.mean(p), f"ndcg@{k}": np.mean(nd), f"psp@{k}_raw": np.mean(psp),
            f"psndcg@{k}_raw": np.mean(psnd), f"psp@{k}": np.sum(psp) / np.sum(best_psp),
            f"psndcg@{k}": np.sum(psnd) / np.sum(best_psnd)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_match_a_dense_reference(seed):
    rng = np.random.default_rng(seed)
    n, L = 300, 40
    Y = rng.random((n, L)) < rng.uniform(0.01, 0.2, size=L)   # labels of unequal frequency
    Y[:7] = False                                              # rows without a positive
    S = np.round(rng.random((n, L)) + 0.5 * Y, 2)              # informative, with ties
    w = inverse_propensity(rng.random((1000, L)) < rng.uniform(0.001, 0.3, size=L))
    top, _ = topk_from_scores(S, 5, chunk_elements=97)
    got = ranking_metrics(sp.csr_matrix(Y), top, (1, 2, 3, 4, 5), inv_propensity=w)
    for k in (1, 2, 3, 4, 5):
        want = dense_reference(Y, S, w, k)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-12), key
        assert 0 < got[f"psp@{k}"] <= 1 and 0 < got[f"psndcg@{k}"] <= 1


def test_ranking_metrics_match_napkinxc():
    nx = pytest.importorskip("napkinxc.metrics")
    rng = np.random.default_rng(5)
    n, L = 400, 60
    Y = sp.csr_matrix(rng.random((n, L)) < rng.uniform(0.005, 0.15, size=L))
    Y_train = sp.csr_matrix(rng.random((2000, L)) < rng.uniform(0.0005, 0.05, size=L))
    for A, B in PROPENSITY_CONSTANTS.values():
        np.testing.assert_allclose(inverse_propensity(Y_train, A, B),
                                   nx.Jain_et_al_inverse_propensity(Y_train.astype(np.float64), A, B), rtol=1e-12)
    w = inverse_propensity(Y_train)
    top, _ = topk_from_scores(rng.random((n, L)), 5)
    got = ranking_metrics(Y, top, (1, 2, 3, 4, 5), inv_propensity=w)
    truth, ranks = [list(Y[i].indices) for i in range(n)], top.tolist()
    for name, want in (("p", nx.precision_at_k(truth, ranks, 5)), ("ndcg", nx.ndcg_at_k(truth, ranks, 5)),
                       ("psp", nx.psprecision_at_k(truth, ranks, w, 5)),
                       ("psndcg", nx.psndcg_at_k(truth, ranks, w, 5)),
                       ("psp_raw", nx.psprecision_at_k(truth, ranks, w, 5, normalize=False)),
                       ("psndcg_raw", nx.psndcg_at_k(truth, ranks, w, 5, normalize=False))):
        base, raw = name.removesuffix("_raw"), name.endswith("_raw")
        np.testing.assert_allclose([got[f"{base}@{k}" + ("_raw" if raw else "")] for k in range(1, 6)], want,
                                   rtol=1e-10, err_msg=name)


def test_a_million_labels_in_top_k_memory():
    L, n, block = 1_000_000, 48, 4
    rng = np.random.default_rng(6)
    blocks_seen = []

    def blocks():                        # the model's batches: the [n, L] matrix never exists
        for _ in range(n // block):
            b = rng.random((block, L), dtype=np.float32)
            blocks_seen.append((b.max(axis=1), np.partition(b, L - 5, axis=1)[:, L - 5:].copy()))
            yield b

    tracemalloc.start()
    idx, val = topk_from_scores(blocks(), 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dense_bytes = n * L * 4
    assert peak < dense_bytes / 3, f"peak {peak / 2**20:.0f} MiB for a {dense_bytes / 2**20:.0f} MiB score matrix"
    assert idx.shape == (n, 5) and (np.diff(val, axis=1) <= 0).all()
    best5 = np.concatenate([np.sort(p, axis=1)[:, ::-1] for _, p in blocks_seen])
    np.testing.assert_array_equal(val, best5)
    # sparse truth over a million labels; the top-1 label of rows 0..11 is one of their positives
    rows = np.repeat(np.arange(n), 3)
    cols = rng.integers(0, L, size=3 * n)
    cols[0:36:3] = idx[:12, 0]
    Y = sp.csr_matrix((np.ones(3 * n, np.int8), (rows, cols)), shape=(n, L))
    m = ranking_metrics(Y, idx, (1,), inv_propensity=np.ones(L))
    assert m["p@1"] == pytest.approx(12 / n) and m["psp@1_raw"] == pytest.approx(12 / n)


def test_ranking_metric_errors():
    Y = sp.csr_matrix(np.eye(3, dtype=np.int8))
    with pytest.raises(ValueError, match="topk: expected \\[n, m\\] label indices with n = 3"):
        ranking_metrics(Y, np.zeros((2, 1), dtype=int))
    with pytest.raises(ValueError, match="must be in \\[0, 3\\)"):
        ranking_metrics(Y, np.array([[0], [1], [3]]))
    with pytest.raises(ValueError, match="inv_propensity: expected 3 weights"):
        ranking_metrics(Y, np.array([[0], [1], [2]]), inv_propensity=np.ones(4))
    with pytest.raises(ValueError, match="k: expected an integer >= 1"):
        topk_from_scores(np.zeros((2, 2)), 0)


def test_train_reports_ranking_metrics_and_the_split(tmp_path):
    """`mlcl-fast train` (api.train) writes P@k, nDCG@k, PSP@k and PSnDCG@k to metrics.json, with
    propensities from the training labels, and which validation split it used."""
    pytest.importorskip("matplotlib")
    from mlcl_fast.train import from_arrays, train
    from mlcl_fast.train.protocols import Batches, predict

    rng = np.random.default_rng(7)
    X = rng.normal(size=(120, 6))
    Y = np.stack([X[:, 0] > 0, X[:, 1] > 0.5, X[:, 2] > 1.0, X[:, 0] + X[:, 3] > 1.5], 1).astype(int)
    ds = from_arrays(X, Y, seed=0)
    kw = dict(loss="bce", epochs=1, min_steps=1, warmup_steps=0, hidden=8, batch_size=32, plot=False)
    result = train(ds, out=str(tmp_path / "run"), **kw)
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["val_split"] == "random" and rec["propensity"] == {"A": 0.55, "B": 1.5, "train_rows": 90}
    for part in ("test", "val"):
        for k in (1, 3, 5):
            for key in (f"p@{k}", f"ndcg@{k}", f"psp@{k}", f"psndcg@{k}"):
                assert 0 <= rec[part][key] <= 1, (part, key)
            assert rec[part][f"psp@{k}_raw"] >= 0
    # the same numbers from the model's scores' top-k and from the propensities of ds.Y_train
    from mlcl_fast.train.data import prepare_split
    split = prepare_split(ds, 0.15, 0)
    scores = predict(result.parts.backbone, result.parts.classifier, Batches(split.X_test, split.Y_test, 1024, "cpu"))
    top, _ = topk_from_scores(scores, 5)
    want = ranking_metrics(split.Y_test, top, (1, 3, 5), inv_propensity=inverse_propensity(ds.Y_train))
    assert {k: rec["test"][k] for k in want} == pytest.approx(want)
    assert rec["test"]["p@1"] == pytest.approx(want["p@1"])   # evaluate's dense path agrees
    other = train(ds, propensity_a=0.6, propensity_b=2.6, **kw)     # the Amazon constants: other weights
    assert other.test["p@3"] == rec["test"]["p@3"]
    assert abs(other.test["psp@3_raw"] - rec["test"]["psp@3_raw"]) > 1e-3

