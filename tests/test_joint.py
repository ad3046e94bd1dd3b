"""The joint protocol (BCE + λ·contrastive from scratch) keeps its balance across label-space sizes:
with hundreds of labels it still predicts labels, and with a few it stays level with BCE."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

pytest.importorskip("sklearn")

from mlcl_fast.baselines import bce_loss
from mlcl_fast.train import from_arrays, train
from mlcl_fast.train import protocols

pytestmark = pytest.mark.usefixtures("single_thread")

# small networks and a few hundred steps: long enough for BCE to push frequent labels past 0.5
FAST = dict(hidden=64, proj_dim=32, batch_size=64, epochs=30, min_steps=300, warmup_steps=30, val_split="random")


def topic_set(n: int, topics: int, per_topic: int, d: int = 32, seed: int = 0):
    """Rows drawn around one of `topics` centres; each carries its topic's first label with
    probability 0.8 and each other label of the topic with 0.35: L = topics × per_topic labels,
    a few per row, the frequent ones predictable from the features."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(topics, d)) * 1.5
    t = rng.integers(0, topics, n)
    chance = np.array([0.8] + [0.35] * (per_topic - 1))
    Y = np.zeros((n, topics * per_topic), dtype=np.int8)
    for i in range(n):
        Y[i, t[i] * per_topic + np.flatnonzero(rng.random(per_topic) < chance)] = 1
    X = centre[t] + rng.normal(size=(n, d))
    return from_arrays(X.astype(np.float32), Y, seed=seed)


def _test_metrics(ds, **options) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn / iterstrat warnings about labels absent from a split
        return train(ds, **FAST, **options).test


@pytest.fixture(scope="module")
def many_labels():
    return topic_set(800, topics=30, per_topic=10)   # 300 labels, ~4 per row, 600 training rows


@pytest.fixture(scope="module")
def few_labels():
    return topic_set(600, topics=2, per_topic=3)     # 6 labels


@pytest.fixture(scope="module")
def bce_many(many_labels):
    return _test_metrics(many_labels, loss="bce")


@pytest.mark.parametrize("loss, views", [("reg", 1), ("supcon_any", 1), ("reg", 2)])
def test_joint_predicts_labels_with_hundreds_of_labels(many_labels, bce_many, loss, views):
    """With the BCE averaged over 300 labels the contrastive term ran the shared backbone and the
    classifier stayed at the label priors: Micro-F1 at 0.5 was 0.000-0.036 here while BCE alone
    reached 0.36."""
    m = _test_metrics(many_labels, loss=loss, protocol="joint", views=views)
    assert bce_many["micro_f1"] > 0.25                     # the set is learnable at threshold 0.5
    assert m["micro_f1"] > 0.15 and m["macro_f1"] > 0.05
    assert m["micro_f1"] > 0.6 * bce_many["micro_f1"]


@pytest.mark.parametrize("loss", ["reg", "supcon_any"])
def test_joint_stays_level_with_bce_on_few_labels(few_labels, loss, monkeypatch):
    """On 6 labels the joint model is within seed noise of BCE, and of the same objective with the
    BCE as a plain mean over labels (where the two terms were already balanced)."""
    bce = _test_metrics(few_labels, loss="bce")
    joint = _test_metrics(few_labels, loss=loss, protocol="joint")
    monkeypatch.setattr(protocols, "joint_bce_scale", lambda Y: 1.0)
    plain_mean = _test_metrics(few_labels, loss=loss, protocol="joint")
    for key in ("micro_f1", "map"):
        assert joint[key] > bce[key] - 0.05, key
        assert joint[key] > plain_mean[key] - 0.05, key


def test_joint_bce_does_not_shrink_with_unused_labels():
    """The joint BCE is summed over labels and divided by the label cardinality: labels that no row
    carries and the classifier scores far below 0 leave it unchanged, where a mean over labels
    would divide it by the size of the label space."""
    from mlcl_fast.train.protocols import joint_bce_scale

    rng = np.random.default_rng(0)
    Y = (rng.random((50, 8)) < 0.3).astype(np.int8)
    Y[Y.sum(1) == 0, 0] = 1
    logits = torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32))
    y = torch.from_numpy(Y.astype(bool))
    cardinality = Y.sum() / 50
    base = joint_bce_scale(sp.csr_matrix(Y)) * bce_loss(logits, y)
    assert joint_bce_scale(sp.csr_matrix(Y)) == pytest.approx(8 / cardinality)
    assert float(base) == pytest.approx(float(bce_loss(logits, y, reduction="sum")) / 50 / cardinality, rel=1e-5)
    for extra in (92, 992):
        Yp = np.hstack([Y, np.zeros((50, extra), dtype=np.int8)])
        lp = torch.cat([logits, torch.full((50, extra), -30.0)], 1)
        padded = joint_bce_scale(sp.csr_matrix(Yp)) * bce_loss(lp, torch.from_numpy(Yp.astype(bool)))
        assert float(padded) == pytest.approx(float(base), rel=1e-4)
    # rows without labels do not make the BCE outweigh its per-row sum
    assert joint_bce_scale(sp.csr_matrix((10, 40), dtype=np.int8)) == 40.0
    sparse_rows = np.zeros((10, 40), dtype=np.int8)
    sparse_rows[0, :3] = 1
    assert joint_bce_scale(sp.csr_matrix(sparse_rows)) == 40.0
