"""Training at large label spaces: no [rows, labels] array anywhere (labels, scores, metrics,
thresholds), XMC metrics beside Macro-F1, step time and peak memory in the log and metrics.json,
and the training-throughput benchmark."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mlcl_fast.cli import main
from mlcl_fast.labels import LabelSets
from mlcl_fast.train import metrics
from mlcl_fast.train.metrics import ScoreStream, evaluate

REPO = Path(__file__).resolve().parents[1]
BATCH = 32
FAST = ["--epochs", "1", "--probe-epochs", "1", "--min-steps", "1", "--warmup-steps", "0", "--hidden", "16",
        "--proj-dim", "8", "--batch-size", str(BATCH), "--threads", "1", "--quiet"]


def synth(labels: int, train: int, test: int, features: int = 2000) -> str:
    return f"synth:amazon670k?train={train}&test={test}&labels={labels}&features={features}"


@pytest.fixture
def no_split_sized_label_matrix(monkeypatch):
    """Fail any densification of more than a batch of rows: scipy's toarray/todense and LabelSets.dense.
    Score blocks are capped at BATCH rows too (EVAL_BLOCK_ELEMENTS), so that every legitimate dense
    array in a run is at most a batch; a split part of the tests below has several times that."""
    from scipy.sparse._compressed import _cs_matrix

    seen = []

    def guard(original):
        def wrapped(self, *args, **kwargs):
            rows = self.shape[0] if not isinstance(self, LabelSets) else self.batch_size
            if rows > BATCH + 1:   # a last batch of one row is folded into the one before
                raise AssertionError(f"densified {rows} rows of a matrix with {self.shape[1] if hasattr(self, 'shape') else self.num_labels} columns")
            seen.append(rows)
            return original(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(_cs_matrix, "toarray", guard(_cs_matrix.toarray))
    monkeypatch.setattr(_cs_matrix, "todense", guard(_cs_matrix.todense))
    monkeypatch.setattr(LabelSets, "dense", guard(LabelSets.dense))
    monkeypatch.setattr(metrics, "EVAL_BLOCK_ELEMENTS", BATCH * 20_000)
    return seen


@pytest.mark.parametrize("loss, protocol", [("bce", None), ("reg", "probe")])
def test_many_labels_train_reports_xmc_metrics_step_time_and_memory(tmp_path, capsys, no_split_sized_label_matrix,
                                                                    loss, protocol):
    """20,000 labels, a few hundred rows, one epoch: the run completes under the guard, reports
    P@k, nDCG@k, PSP@k beside Macro-F1 and mAP, and logs ms per step and peak memory per stage."""
    out = tmp_path / "run"
    chosen = [] if protocol is None else ["--protocol", protocol]
    # a random validation split: iterative stratification works on a dense [rows, labels] matrix
    # (bounded by data.STRATIFY_MAX_WORK, and off at this size for real data sets of many rows)
    rc = main(["train", "--dataset", synth(20_000, 400, 200), "--loss", loss, *chosen, "--out", str(out),
               "--val-split", "random", *FAST])
    assert rc == 0
    assert no_split_sized_label_matrix and max(no_split_sized_label_matrix) <= BATCH + 1   # the guard was exercised
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["num_labels"] == 20_000 and len(rec["thresholds"]) == 20_000
    for part in ("test", "val"):
        for key in ("macro_f1", "macro_f1_tuned", "micro_f1", "map", "p@1", "p@3", "p@5", "ndcg@5", "psp@1",
                    "psp@5", "psndcg@5"):
            assert 0.0 <= rec[part][key] <= 1.0, (part, key)
    assert rec["test"]["p@1"] > 0          # the data are learnable: one epoch already ranks some labels right
    printed = capsys.readouterr().out
    for stage in rec["stages"]:
        assert stage["steps"] >= 1 and len(stage["step_ms"]) == len(stage["train_loss"])
        assert stage["ms_per_step"] > 0 and stage["peak_rss_mb"] > 0
        assert f"{stage['name']}: {len(stage['train_loss'])} epochs, {stage['steps']} steps" in printed
    assert rec["resources"]["peak_rss_mb"] >= max(s["peak_rss_mb"] for s in rec["stages"])
    assert "ms/step" in printed and "peak RSS" in printed


def test_peak_memory_stays_below_one_dense_score_matrix(tmp_path):
    """3,000 test rows × 100,000 labels: the [rows, labels] float32 score matrix alone is 1.2 GB
    (the float64 one that evaluation used to build, 2.4 GB). The whole training process, Python
    and torch included, stays below the float32 one."""
    n_test, L = 3000, 100_000
    out = tmp_path / "big"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "mlcl_fast.cli", "train", "--dataset", synth(L, 300, n_test),
                           "--loss", "bce", "--out", str(out), "--val-split", "random", *FAST],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["n_test"] == n_test and rec["num_labels"] == L
    dense_mb = n_test * L * 4 / 2**20
    assert rec["resources"]["peak_rss_mb"] < dense_mb, (rec["resources"], dense_mb)
    assert 0 <= rec["test"]["p@5"] <= 1 and 0 <= rec["test"]["macro_f1"] <= 1


def test_score_stream_is_independent_of_the_blocks_and_matches_the_dense_evaluation():
    """Scores fed in uneven float32 blocks give the numbers of one dense float64 evaluation, the
    tuned thresholds included; a second pass that is short or missing is an error, not a number."""
    rng = np.random.default_rng(5)
    n, L = 70, 300
    Y = sp.csr_matrix(rng.random((n, L)) < 0.03)
    S = np.round(rng.random((n, L)), 2).astype(np.float32)      # many ties, on grid points too
    thr = metrics.tune_thresholds(Y, S.astype(np.float64))
    want = evaluate(Y, S.astype(np.float64), thr, inv_propensity=np.ones(L))
    stream = ScoreStream(Y, tune=True)
    cuts = [0, 1, 2, 30, 31, 70]
    for a, b in zip(cuts, cuts[1:]):
        stream.add(S[a:b])
    with pytest.raises(ValueError, match="second pass"):
        stream.macro_map()
    for a, b in zip(cuts, cuts[1:]):
        stream.add_again(S[a:b])
    np.testing.assert_array_equal(stream.tuned_thresholds(), thr)
    got = stream.metrics(thr, inv_propensity=np.ones(L))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    with pytest.raises(ValueError, match="more rows"):
        stream.add(S[:1])
    with pytest.raises(ValueError, match="thresholds: counted only"):   # 0.37 is not a grid point
        stream.thresholded(np.full(L, 0.37))


def test_study_at_many_labels_names_its_folders_after_the_dataset(tmp_path, capsys):
    """`mlcl-fast study` on a synthetic 20,000-label set: the spec becomes a folder name without
    '?', '&' or ':'; the log line and results.csv carry ms per step and peak memory."""
    out = tmp_path / "study"
    name = synth(20_000, 300, 100)
    assert main(["study", "--datasets", name, "--methods", "bce", "--seeds", "0", "--out", str(out), *FAST]) == 0
    cells = list((out / "runs").rglob("seed0.json"))
    assert len(cells) == 1 and not set("?&:") & set(cells[0].relative_to(out).as_posix())
    assert json.loads(cells[0].read_text())["dataset"] == name
    printed = capsys.readouterr().out
    assert "ms/step, peak RSS" in printed and "P@1" in printed
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "peak_rss_mb" in header and "ms_per_step" in header and "test_psp@5" in header


def test_train_throughput_benchmark_quick(tmp_path):
    """bench/train_throughput.py --quick measures every head at two label-space sizes; a budget
    too small for a row skips it with a 'skipped: memory' line instead of a number."""
    csv_path = tmp_path / "tt.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--labels", "1000", "5000",
                           "--threads", "1", "--out", str(csv_path)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import csv
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["head"], r["labels"]) for r in rows] == [(h, L) for L in ("1000", "5000") for h in ("reg", "bce", "zlpr")]
    for r in rows:
        assert r["status"] == "ok" and float(r["samples_per_s"]) > 0 and float(r["peak_MB"]) > 0, r
    assert rows[0]["backend"] in ("cpp", "reference")
    assert proc.stdout.count("samples/s") == 6
    proc = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--quick", "--labels", "1000", "--heads",
                           "bce", "--mem-budget-gb", "0.001", "--out", str(csv_path)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "skipped: memory" in proc.stdout and "samples/s" not in proc.stdout
    assert list(csv.DictReader(csv_path.open()))[0]["samples_per_s"] == ""


def test_adam_is_fused_where_torch_can_and_updates_as_the_plain_one():
    """protocols.adam: torch's fused Adam/AdamW for floating parameters on one CPU or CUDA device
    (the 100,000-label model's update in one pass per tensor), the same update as the unfused
    optimiser up to rounding; mixed devices or dtypes it cannot fuse keep the default."""
    import torch

    from mlcl_fast.train.protocols import adam

    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(50, 8, generator=gen), torch.randn(8, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(10)]
    for decay in (None, 0.05):
        fused = [t.clone().requires_grad_(True) for t in start]
        plain = [t.clone().requires_grad_(True) for t in start]
        opt = adam(fused, 1e-2, decay)
        assert opt.defaults["fused"] is True
        assert isinstance(opt, torch.optim.AdamW if decay is not None else torch.optim.Adam)
        ref = (torch.optim.Adam(plain, lr=1e-2) if decay is None
               else torch.optim.AdamW(plain, lr=1e-2, weight_decay=decay))
        for step in grads:
            for params, o in ((fused, opt), (plain, ref)):
                for p, g in zip(params, step):
                    p.grad = g.clone()
                o.step()
        for a, b, s in zip(fused, plain, start):
            assert (b - s).abs().max() > 1e-2                     # the parameters moved
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    groups = [{"params": [torch.zeros(3, requires_grad=True)]}, {"params": [torch.zeros(2, requires_grad=True)]}]
    assert adam(groups, 1e-3, 0.01).defaults["fused"] is True
    assert not adam([torch.zeros(2, dtype=torch.float64, device="meta", requires_grad=True)], 1e-3).defaults["fused"]
