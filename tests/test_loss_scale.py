"""The main job's loss-alone table (mlcl_fast.train.loss_scale): what it measures and refuses."""
import pytest
import torch

from mlcl_fast import memory
from mlcl_fast.train import loss_scale


def test_power_law_labels_are_valid_and_skewed():
    gen = torch.Generator().manual_seed(3)
    idx = loss_scale.power_law_labels(2000, 500, 5, 1.1, gen)
    assert idx.shape == (2000, 5) and idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < 500
    counts = torch.bincount(idx.flatten(), minlength=500).sort(descending=True).values
    weights = torch.arange(1, 501, dtype=torch.float64).pow(-1.1)
    share = weights / weights.sum()   # rank**-1.1: the top label ~20% of the draws, rank 251 ~0.05%
    assert abs(counts[0] / idx.numel() - share[0]) < 0.02
    assert counts[250] / idx.numel() < 4 * share[250]


def test_both_backends_measured_where_the_reference_fits():
    rows = loss_scale.loss_steps([30], batch=12, views=2, dim=8, repeats=1, budget_bytes=1 << 40)
    assert [r.backend for r in rows] == ["cpp", "reference"]
    for r in rows:
        assert r.status == "measured" and r.ms > 0 and (r.anchors, r.columns) == (24 + 30, 24 + 30)
        if memory.peak_rss_bytes() is not None:
            assert r.peak_mb is not None and r.peak_mb < r.predicted_mb  # the prediction bounds the call
    assert rows[1].predicted_mb > rows[0].predicted_mb
    table = loss_scale.loss_steps_table(rows)
    assert table.count("\n") == 3 and "| 30 | 54 x 54 | reference |" in table


def test_the_reference_is_refused_above_the_budget_and_nothing_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(loss_scale, "_measure", lambda backend, *a: calls.append(backend) or (1.0, 1.0))
    budget = 100 * 2**20
    rows = loss_scale.loss_steps([30, 20000], batch=12, views=2, dim=8, repeats=1, budget_bytes=budget)
    assert calls == ["cpp", "reference", "cpp"]
    refused = rows[3]
    assert refused.ms is None and refused.peak_mb is None
    assert refused.predicted_mb * 2**20 > budget
    assert refused.status == f"not run: predicted {refused.predicted_mb / 1024:,.1f} GB > 100 MB available to it"
    assert "not run: predicted" in loss_scale.loss_steps_table(rows)


@pytest.mark.parametrize("anchors,columns", [(100, 100), (5000, 9000)])
def test_reference_prediction_grows_with_the_pairs(anchors, columns):
    base = memory.reference_bytes(anchors, columns, 64, 50, 16, 4)
    assert base > 14 * anchors * columns * 4
    assert memory.reference_bytes(2 * anchors, columns, 64, 50, 16, 4) - base >= 14 * anchors * columns * 4
