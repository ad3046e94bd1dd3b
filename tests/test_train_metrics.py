"""Metrics against scikit-learn and hand-computed values; threshold tuning."""
import numpy as np
import pytest

sklearn_metrics = pytest.importorskip("sklearn.metrics")

from mlcl_fast.train.metrics import (evaluate, label_average_precision, macro_map, precision_at_k,
                                     threshold_metrics, tune_thresholds)


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
    for key in ("micro_f1", "macro_f1", "hamming", "map", "p@1", "p@3", "p@5"):
        assert 0 <= m[key] <= 1
    assert m["macro_f1_tuned"] == pytest.approx(m["macro_f1"])  # same thresholds, same numbers
    low = evaluate(Y, S, thresholds=np.full(6, 0.05))
    assert low["hamming_tuned"] > m["hamming"]
