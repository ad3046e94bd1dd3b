"""The benchmark harness itself: label generators, the published provider, CSV schema, failure statuses."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mlcl_fast
from bench import grid as grid_mod
from bench import labels as bl
from bench import providers, published, records, sweep, timing, worker
from mlcl_fast import memory
from mlcl_fast.presets import resolve_config

SHARED = Path(__file__).resolve().parents[2] / "shared"


def assert_canonical(index: torch.Tensor, num_labels: int):
    assert index.dtype == torch.int64 and index.dim() == 2
    valid = index >= 0
    # padding only at the end of a row, labels in range, strictly ascending
    assert not (~valid[:, :-1] & valid[:, 1:]).any()
    assert int(index.max()) < num_labels
    both = valid[:, 1:] & valid[:, :-1]
    assert (index[:, 1:][both] > index[:, :-1][both]).all()


# ---------------------------------------------------------------- label generators

def test_powerlaw_labels_are_canonical_sized_and_seeded():
    index = bl.powerlaw_labels(3000, 1000, seed=5)
    assert_canonical(index, 1000)
    sizes = (index >= 0).sum(1)
    assert sizes.min() == 2 and sizes.max() == 20 and index.shape[1] == 20
    assert 9 < sizes.float().mean() < 13                       # uniform over 2..20: mean 11
    assert torch.equal(index, bl.powerlaw_labels(3000, 1000, seed=5))
    assert not torch.equal(index, bl.powerlaw_labels(3000, 1000, seed=6))


def test_powerlaw_label_frequencies_follow_zipf():
    index = bl.powerlaw_labels(20000, 2000, seed=1)
    freq = torch.bincount(index[index >= 0], minlength=2000).sort(descending=True).values.double()
    ranks = torch.arange(10, 400, dtype=torch.float64)
    slope = np.polyfit(np.log(ranks.numpy()), np.log(freq[10:400].numpy()), 1)[0]
    assert -1.3 < slope < -0.85, slope                         # exponent 1.1 (the head flattens a little)
    # frequent labels are spread over the id space, not the smallest ids
    top = torch.bincount(index[index >= 0], minlength=2000).topk(20).indices
    assert top.max() > 200


def test_powerlaw_labels_small_label_space_caps_sizes():
    index = bl.powerlaw_labels(500, 5, seed=0)
    assert_canonical(index, 5)
    assert index.shape[1] == 5 and ((index >= 0).sum(1) >= 2).all()


def test_powerlaw_labels_scale_to_a_million_labels():
    t0 = time.perf_counter()
    index = bl.powerlaw_labels(16384, 1_000_000, seed=0)
    elapsed = time.perf_counter() - t0
    assert index.shape == (16384, 20)                          # padded indices, not a dense [N, L]
    assert_canonical(index, 1_000_000)
    assert elapsed < 20, f"{elapsed:.1f} s"                    # about 1 s unloaded


def test_few_labels_are_uniform_with_dense_overlaps():
    index = bl.few_labels(4000, 64, seed=2)
    assert_canonical(index, 64)
    sizes = (index >= 0).sum(1)
    assert sizes.min() == 1 and sizes.max() == bl.FEW_MAX_SIZE
    freq = torch.bincount(index[index >= 0], minlength=64).double()
    assert (freq / freq.mean()).sub(1).abs().max() < 0.2
    dense = bl.to_label_sets(index[:200], 64).dense(torch.float32)
    share = ((dense @ dense.T) > 0).float().mean()
    assert share > 0.2                                         # "dense overlaps"
    with pytest.raises(ValueError, match="num_labels"):
        bl.few_labels(10, 1000)


def test_make_labels_rejects_unknown_regime():
    with pytest.raises(ValueError, match="regime"):
        bl.make_labels("zipf", 10, 100)


def _load_npz_module():
    path = SHARED / "data" / "load_npz.py"
    spec = importlib.util.spec_from_file_location("shared_load_npz", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", bl.REAL_DATASETS)
def test_real_labels_are_rows_of_the_training_matrix(name):
    if bl.find_dataset(name) is None or not (SHARED / "data" / "load_npz.py").exists():
        pytest.skip(f"{name}.npz or load_npz.py not present")
    _, y_train, _, _ = _load_npz_module().load_npz(str(bl.find_dataset(name)))
    rows = {tuple(sorted(y_train.indices[y_train.indptr[i]:y_train.indptr[i + 1]].tolist()))
            for i in range(y_train.shape[0])}
    index, num_labels = bl.real_labels(name, 300, seed=3)
    assert num_labels == y_train.shape[1] == grid_mod.REAL_L[name]
    assert_canonical(index, num_labels)
    for row in index.tolist():
        assert tuple(v for v in row if v >= 0) in rows
    assert bl.REAL_MAX_LABELS[name] == int(np.diff(y_train.indptr).max())
    big, _ = bl.real_labels(name, y_train.shape[0] + 10, seed=0)   # more rows than the data: with replacement
    assert big.shape[0] == y_train.shape[0] + 10


# ---------------------------------------------------------------- the published (dense) formulation

def _random_problem(n, num_labels, d, seed, empty_rows=(), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    index = bl.powerlaw_labels(n, num_labels, exponent=0.5, min_size=1, max_size=4, seed=seed)
    for r in empty_rows:
        index[r] = -1
    labels = bl.to_label_sets(index, num_labels)
    x = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    p = torch.randn(num_labels, d, generator=gen, dtype=dtype, requires_grad=True)
    return x, labels, p


@pytest.mark.parametrize("overrides", [{}, {"reg": False}, {"alpha": 0.5}, {"alpha": -1.0}, {"beta": 0.25}],
                         ids=["reg", "noreg", "alpha0.5", "subset", "beta0.25"])
@pytest.mark.parametrize("seed", [0, 1])
def test_published_equals_reference(overrides, seed):
    x, labels, p = _random_problem(14, 9, 6, seed, empty_rows=(3,))
    temperature = 0.2 if seed else 0.05
    ref = mlcl_fast.multilabel_contrastive_loss(x, labels, p, preset="reg", temperature=temperature,
                                                backend="reference", **overrides)
    ref_grads = torch.autograd.grad(ref, (x, p))
    out = published.published_loss(x, labels, p, resolve_config("reg", **overrides), temperature)
    grads = torch.autograd.grad(out, (x, p))
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_published_single_sample_and_no_labels():
    x, labels, p = _random_problem(1, 3, 4, 0, empty_rows=(0,))
    ref = mlcl_fast.multilabel_contrastive_loss(x, labels, p, preset="reg", backend="reference")
    out = published.published_loss(x, labels, p, resolve_config("reg"), 0.1)
    assert torch.isfinite(out) and torch.allclose(out, ref, atol=1e-12)


def test_published_matches_spec_vectors():
    path = SHARED / "vectors" / "spec_vectors.json"
    if not path.exists():
        pytest.skip("SPEC vectors not present")
    cases = json.loads(path.read_text())
    cases = cases["cases"] if isinstance(cases, dict) else cases
    arrays = np.load(SHARED / "vectors" / "spec_vectors.npz")
    checked = 0
    for case in cases:
        cfg = resolve_config(case["preset"], **case.get("overrides", {}))
        if not published.supports(cfg) or case.get("views", 1) != 1:
            continue
        key = case["key"]
        x = torch.tensor(arrays[f"{key}_features"], requires_grad=True)
        p = torch.tensor(arrays[f"{key}_prototypes"], requires_grad=True)
        labels = mlcl_fast.as_label_sets(torch.tensor(arrays[f"{key}_labels"]).bool(), x.shape[0], p.shape[0])
        out = published.published_loss(x, labels, p, cfg, case["temperature"])
        gx, gp = torch.autograd.grad(out, (x, p))
        assert abs(out.item() - case["loss"]) < 1e-10 * max(1.0, abs(case["loss"]))
        assert np.allclose(gx.numpy(), arrays[f"{key}_grad_features"], atol=1e-10)
        assert np.allclose(gp.numpy(), arrays[f"{key}_grad_prototypes"], atol=1e-10)
        checked += 1
    assert checked >= 1


def test_published_covers_the_reg_family_only():
    assert published.supports(resolve_config("reg")) and published.supports(resolve_config("reg_noreg"))
    for preset in ("msc", "jaccard", "mulsupcon"):
        assert not published.supports(resolve_config(preset))
    x, labels, p = _random_problem(4, 3, 2, 0)
    with pytest.raises(ValueError, match="cfg"):
        published.published_loss(x, labels, p, resolve_config("msc"), 0.1)
    # SPEC: "at B=256 that is 6 GB at L=1000 and 40 GB at L=2000" (fp32)
    assert 6e9 < published.weight_tensor_bytes(256, 1000) < 7e9
    assert 40e9 < published.weight_tensor_bytes(256, 2000) < 42e9


# ---------------------------------------------------------------- providers

@pytest.mark.parametrize("preset", grid_mod.PRESETS)
def test_reference_program_equals_public_api(preset):
    x, labels, p = _random_problem(10, 6, 5, 4)
    protos = p if resolve_config(preset).uses_prototypes else None
    inputs = providers.Inputs(x, protos, labels, preset, 0.1)
    out = providers.reference_program(inputs)(x, protos)
    ref = mlcl_fast.multilabel_contrastive_loss(x, labels, protos, preset=preset, backend="reference")
    assert torch.allclose(out, ref, rtol=1e-12)
    runner = providers.CompiledReference(compile=False).setup(inputs)
    runner.full()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.slow
def test_compiled_reference_equals_public_api():
    x, labels, p = _random_problem(10, 6, 5, 4, dtype=torch.float32)
    inputs = providers.Inputs(x, p, labels, "reg", 0.1)
    out = providers.CompiledReference().setup(inputs).forward()
    ref = mlcl_fast.multilabel_contrastive_loss(x, labels, p, preset="reg", backend="reference")
    assert torch.allclose(out, ref, rtol=1e-5)


def test_backends_are_discovered_dynamically(monkeypatch):
    assert providers.provider_names("cpu")[: len(mlcl_fast.available_backends("cpu"))] == \
        mlcl_fast.available_backends("cpu")
    monkeypatch.setattr(providers.mlcl_fast, "available_backends", lambda device: ["cpp", "reference"])
    names = providers.provider_names("cpu")
    assert names == ["cpp", "reference", "compile(reference)", "published"]
    assert isinstance(providers.get_provider("cpp"), providers.BackendProvider)
    with pytest.raises(ValueError, match="provider"):
        providers.get_provider("nope")


def test_useful_flops_and_shapes():
    s = providers.Shape("reg", N=4, L=2, d=3, K=2)
    assert (s.anchors, s.columns) == (6, 6)
    assert providers.useful_flops(s, "full") == 8 * 6 * 6 * 3
    assert providers.useful_flops(s, "fwd") == 2 * 6 * 6 * 3
    m = providers.Shape("msc", N=4, L=2, d=3, K=2)
    assert (m.anchors, m.columns) == (4, 6)
    j = providers.Shape("jaccard", N=4, L=2, d=3, K=2)
    assert (j.anchors, j.columns) == (4, 4)


# ---------------------------------------------------------------- CSV schema

def test_csv_appends_rows_under_one_header(tmp_path):
    path = tmp_path / "r.csv"
    records.append_rows(path, [{"run_id": "a", "mode": "fwd", "status": "ok", "median_ms": 1.5}])
    records.append_rows(path, [{"run_id": "b", "mode": "fwd", "status": "oom (predicted 9 GB)"}])
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == records.COLUMNS and len(lines) == 3
    assert [r["run_id"] for r in records.read_rows(path)] == ["b"]
    assert len(records.read_rows(path, None)) == 2
    for col in ("backend", "provider", "preset", "mode", "N", "L", "d", "K", "dtype", "device_name", "median_ms",
                "p20_ms", "p80_ms", "peak_MB", "status", "git_commit", "date", "roofline_frac"):
        assert col in records.COLUMNS


def test_csv_rejects_bad_rows_and_foreign_files(tmp_path):
    path = tmp_path / "r.csv"
    with pytest.raises(ValueError, match="unknown columns"):
        records.append_rows(path, [{"status": "ok", "speed": 3}])
    with pytest.raises(ValueError, match="status"):
        records.append_rows(path, [{"status": "skipped"}])
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="column layout"):
        records.append_rows(other, [{"status": "ok"}])


def test_csv_append_is_all_or_nothing(tmp_path):
    """A batch that fails part-way (a bad row, a crash) leaves the CSV as it was: no torn rows."""
    path = tmp_path / "r.csv"
    records.append_rows(path, [{"run_id": "a", "mode": "fwd", "status": "ok"}])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="status"):
        records.append_rows(path, [{"run_id": "b", "mode": "fwd", "status": "ok"}, {"status": "skipped"}])
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name != "r.csv"], "a temporary file was left behind"


# ---------------------------------------------------------------- failures become statuses

def _ctx(budget=10 ** 12):
    g = grid_mod.get_grid("cpu", "quick")
    return sweep.Context("cpu", g, budget, {"run_id": "t", "device": "cpu"}, matmul={"float32": 10.0})


def _never(spec, timeout_s):
    raise AssertionError("a refused point must not run")


def test_predicted_oom_is_recorded_not_run():
    point = grid_mod.Point("L", "reg", "powerlaw", 256, 1000, 16)
    task = sweep.Task(point, "published", providers.PublishedProvider().predict_bytes(sweep.point_shape(point)))
    rows = sweep.visit(task, _ctx(budget=10 ** 9), _never, deadline=math.inf)
    assert [r["mode"] for r in rows] == list(worker.MODES)
    assert all(r["status"].startswith("oom (predicted") for r in rows)
    assert rows[0]["pred_MB"] > 6000


def test_timeout_is_recorded_and_skips_larger_points_of_the_series():
    ctx = _ctx()
    small = grid_mod.Point("N", "jaccard", "few", 64, 16, 8)
    large = grid_mod.Point("N", "jaccard", "few", 128, 16, 8)
    spec_seen = []

    def slow(spec, timeout_s):
        spec_seen.append(spec)
        return sweep.run_subprocess(spec, timeout_s=0.3)  # the worker cannot even import torch in 0.3 s
    rows = sweep.visit(sweep.Task(small, "reference", 1), ctx, slow, deadline=math.inf)
    assert len(spec_seen) == 1 and all(r["status"].startswith("timeout (>") for r in rows)
    rows = sweep.visit(sweep.Task(large, "reference", 1), ctx, _never, deadline=math.inf)
    assert all(r["status"].startswith("timeout (not run") for r in rows)
    rows = sweep.visit(sweep.Task(large, "reference", 1), _ctx(), _never, deadline=-math.inf)
    assert all(r["status"] == "timeout (sweep time budget spent)" for r in rows)


def test_errors_and_ooms_inside_a_point_become_statuses():
    spec = dict(provider="published", preset="msc", regime="few", N=8, L=4, d=4, dtype="float32", device="cpu")
    rows = sweep.run_in_process(spec)
    assert [r["mode"] for r in rows] == list(worker.MODES)
    assert all(r["status"].startswith("error (ValueError: preset") for r in rows)
    assert worker.classify_error(MemoryError()).startswith("oom")
    assert worker.classify_error(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: "
                                              "can't allocate memory: you tried to allocate 1 bytes")).startswith("oom")
    assert worker.classify_error(KeyError("x")).startswith("error")


def test_predicted_time_over_the_timeout_is_recorded_not_run():
    point = grid_mod.Point("L", "reg", "powerlaw", 256, 100_000, 64)
    task = sweep.Task(point, "cpp", 1)
    ctx = _ctx()                                                # matmul rate 10 GFLOP/s
    assert sweep.predicted_seconds(task, ctx) > ctx.grid.timeout_s
    rows = sweep.visit(task, ctx, _never, deadline=math.inf)
    assert all(r["status"].startswith("timeout (predicted >=") for r in rows)


def _check_ok_rows(rows):
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    for r in rows:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["repeats"] >= 3
        assert r["total_MB"] > r["peak_MB"] >= 0
        assert r["peak_MB"] <= r["pred_MB"]                    # the prediction is an upper bound here
        assert r["K"] <= bl.FEW_MAX_SIZE and r["gflop"] > 0 and r["roofline_frac"] > 0


def test_a_point_in_a_fresh_interpreter(tmp_path):
    point = grid_mod.Point("N", "reg", "few", 96, 16, 16)
    task = sweep.Task(point, "reference", providers.get_provider("reference").predict_bytes(sweep.point_shape(point)))
    runner = lambda spec, timeout_s: sweep.run_subprocess(spec, timeout_s=120)  # noqa: E731
    rows = sweep.visit(task, _ctx(), runner, deadline=math.inf)
    _check_ok_rows(rows)
    records.append_rows(tmp_path / "r.csv", rows)
    assert len(records.read_rows(tmp_path / "r.csv")) == 3


def test_points_in_forked_processes():
    runner = sweep.ForkRunner()
    point = grid_mod.Point("N", "jaccard", "few", 80, 16, 16)
    task = sweep.Task(point, "reference", providers.get_provider("reference").predict_bytes(sweep.point_shape(point)))
    _check_ok_rows(sweep.visit(task, _ctx(), runner, deadline=math.inf))
    # a point that cannot finish in time is killed and recorded
    spec = dict(provider="reference", preset="reg", regime="few", N=3000, L=64, d=64, dtype="float32", device="cpu")
    t0 = time.monotonic()
    rows = runner(spec, 1.0)
    assert time.monotonic() - t0 < 10
    assert all(r["status"] == "timeout (> 1 s)" for r in rows)
    # an error inside the child becomes a status too
    rows = runner(dict(spec, provider="published", preset="msc", N=8), 60)
    assert all(r["status"].startswith("error (ValueError") for r in rows)


def test_memory_pass_sees_a_large_temporary():
    """The RSS peak of a mode must include memory that was allocated and freed inside the call."""
    memory.exact_malloc()
    try:
        def forward():
            big = torch.ones(64 * 2 ** 20 // 4)               # 64 MiB, freed before returning
            return big.sum()
        runner = providers.Runner(forward, lambda loss: None)
        out = worker._memory_pass(runner, cuda=False)
    finally:
        memory.steady_malloc()
    if not out["fwd"]:
        pytest.skip("no /proc peak-RSS here")
    assert 60 < out["fwd"]["peak_MB"] < 200
    assert out["bwd"]["peak_MB"] < 30


# ---------------------------------------------------------------- timing, grid, command line, plots

def test_quantiles_and_repeat_bounds():
    assert timing.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert timing.quantile([0.0, 10.0], 0.2) == pytest.approx(2.0)
    calls = []
    t = timing.time_cpu(lambda: calls.append(1), warmup=2, min_repeats=4, max_repeats=6, budget_s=0.0)
    assert t.repeats == 4 and len(calls) == 6
    t = timing.time_cpu(lambda: time.sleep(0.002), warmup=0, min_repeats=1, max_repeats=5, budget_s=10)
    assert t.repeats == 5 and t.p20_ms <= t.median_ms <= t.p80_ms and t.median_ms >= 2


def test_grids_cover_the_issue():
    for (device, variant), g in grid_mod.GRIDS.items():
        assert {p.preset for p in g.points} == set(grid_mod.PRESETS)
        assert {p.regime for p in g.points} == {"few", "powerlaw", *bl.REAL_DATASETS}
        largest_l = max(p.L for p in g.points)
        assert largest_l == (10 ** 6 if device == "cuda" else 10 ** 5)
        assert all(p.L <= 128 for p in g.points if p.regime == "few")
        # inside one series sizes only grow (the skip-after-timeout rule relies on it)
        last = {}
        for p in g.points:
            size = p.N if p.series == "N" else p.L
            assert size >= last.get(p.key, 0)
            last[p.key] = size


def test_dry_run_plans_a_gpu_sweep_without_a_gpu(capsys):
    assert sweep.main(["--quick", "--device", "cuda", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "L=1000000" in out and "published" in out and "refuse (oom predicted)" in out
    assert sweep.main(["--quick", "--device", "cpu", "--dry-run", "--providers", "nope"]) == 2


def test_plots_and_report_from_a_csv(tmp_path):
    from bench import plots, report
    path = tmp_path / "sweep_cpu_test.csv"
    rows = []
    for series, axis_values in (("N", (64, 128, 256)), ("L", (100, 1000))):
        for v in axis_values:
            for provider, status in (("reference", "ok"), ("published", "oom (predicted 9 GB > budget 4 GB)")):
                for mode in worker.MODES:
                    rows.append(dict(run_id="r1", date="2026-01-01", git_commit="abc", device="cpu",
                                     device_name="cpu", torch="2", threads=2, provider=provider, preset="reg",
                                     regime="few" if series == "N" else "powerlaw", series=series, mode=mode,
                                     N=v if series == "N" else 64, L=16 if series == "N" else v, d=8, K=3,
                                     dtype="float32", median_ms=float(v) if status == "ok" else None,
                                     p20_ms=float(v) if status == "ok" else None,
                                     p80_ms=float(v) if status == "ok" else None,
                                     peak_MB=v / 10 if status == "ok" else None, pred_MB=v, status=status,
                                     roofline_frac=0.01 if status == "ok" else None))
    records.append_rows(path, rows)
    written = plots.plot_run(path)
    assert sorted(p.name for p in written) == sorted(f"sweep_cpu_test_{m}_vs_{a}.png"
                                                     for m in ("time", "memory") for a in ("N", "L"))
    assert all(p.stat().st_size > 1000 for p in written)
    text = report.tables(records.read_rows(path))
    assert "### N grows" in text and "oom (predicted 9 GB" in text and "| reg | few | 64 |" in text
    # a run narrowed to one series (the other's points all timed out) plots only that series
    narrowed = [dict(r, run_id="r2", status="timeout (sweep time budget spent)", median_ms=None)
                if r["series"] == "L" else dict(r, run_id="r2") for r in rows]
    records.append_rows(path, narrowed)
    assert sorted(p.name for p in plots.plot_run(path, "r2", tmp_path / "r2")) == \
        sorted(f"sweep_cpu_test_{m}_vs_N.png" for m in ("time", "memory"))


def test_gpu_targets_table(tmp_path, capsys):
    """The short table gpu.sh prints last: one line per CSV row, the header first."""
    import csv as csv_module
    from bench import gpu_targets
    path = tmp_path / "targets.csv"
    with open(path, "w", newline="") as f:
        writer = csv_module.DictWriter(f, gpu_targets.FIELDS)
        writer.writeheader()
        writer.writerow(dict(target="rate", provider="torch.matmul bf16", status="790 TFLOP/s"))
        writer.writerow(dict(target="T1", provider="triton", regime="heavy", L=16384, status="ok", median_ms=12.5,
                             tile="free:anchors=128,64,8,2"))
    assert gpu_targets.main(["--table", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["target", "provider", "regime"]
    assert "790 TFLOP/s" in lines[1] and "12.5" in lines[2] and "free:anchors=128,64,8,2" in lines[2]
    # The plot takes the default-setting T1/T2 rows only: none here (the one T1 row has a tile)
    assert gpu_targets.main(["--plot", str(path)]) == 0 and "plot: None" in capsys.readouterr().out
    with open(path, "a", newline="") as f:
        writer = csv_module.DictWriter(f, gpu_targets.FIELDS)
        for provider, ms in (("triton", 44.5), ("cuda", 41.3)):
            writer.writerow(dict(target="T1", provider=provider, regime="heavy", L=16384, grad="default",
                                 status="ok", median_ms=ms, limit_share=0.05))
    assert gpu_targets.main(["--plot", str(path)]) == 0
    assert "targets.png" in capsys.readouterr().out and (tmp_path / "targets.png").stat().st_size > 0


def test_gpu_profile_points():
    """bench.gpu_profile's point syntax: the target's shape, the check flag, errors naming --points."""
    from bench import gpu_profile
    provider, point, check = gpu_profile.parse_point("triton:T1:xmc:262144:0")
    assert (provider, point.N, point.L, point.d, point.regime, check) == ("triton", 16384, 262144, 256, "xmc", False)
    assert gpu_profile.parse_point("cuda:T3:heavy:128:1")[1:] == (gpu_profile.gpu_targets.Point(
        "T3", "heavy", 1024, 128, 128, "bfloat16"), True)
    for bad in ("triton:T1:heavy:16384", "triton:T9:heavy:1:1", "triton:T1:flat:1:1", "triton:T1:heavy:1:yes"):
        with pytest.raises(ValueError, match="--points"):
            gpu_profile.parse_point(bad)
    assert [gpu_profile.parse_point(p)[0] for p in gpu_profile.DEFAULT_POINTS.split(",")][0] == "triton"


def test_gpu_script_lists_every_triton_gpu_test():
    """bench/gpu.sh runs the Triton GPU tests by name, in a priority order: every GPU test function
    of tests/test_triton.py is in its list once, and nothing else."""
    import re
    root = Path(__file__).resolve().parents[1]
    script = (root / "bench" / "gpu.sh").read_text()
    loop = re.search(r"for name in (.*?); do", script, re.S).group(1)
    listed = ["test_gpu_" + n for n in loop.replace("\\", " ").split()]
    defined = re.findall(r"^def (test_gpu_\w+)\(", (root / "tests" / "test_triton.py").read_text(), re.M)
    assert len(listed) == len(set(listed)) and sorted(listed) == sorted(defined)


def test_gpu_script_dry_run(tmp_path):
    """bench/gpu.sh's CPU side: stage bookkeeping, logging into $OUT, the sweep's CUDA plan."""
    import os
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), MLCL_GPU_STAGES="build sweep")
    done = subprocess.run(["bash", str(script), "quick", "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "gpu.log").read_text()
    assert "== cuda chain: not run (dry run): 1 step(s)" in log and "== sweep: ok" in log
    assert "plan:" in log and "on cuda (quick)" in log and "L=1000000" in log
    assert "tests-gpu" not in log                       # not selected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.log"]
    done = subprocess.run(["bash", str(script), "sideways"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


def test_gpu_targets_points_and_valid_anchor_count():
    """bench.gpu_targets: the T1-T4 points, and the valid-anchor count its 4-GEMM limit uses
    agrees with the reference's validity on a small point of each label regime."""
    from bench import gpu_targets
    from mlcl_fast import reference
    from mlcl_fast.inputs import prepare

    full = gpu_targets.points(["T1", "T2", "T3", "T4"], smoke=False)
    assert {(p.target, p.N, p.L, p.d) for p in full if p.target == "T1"} == \
        {("T1", 16384, 16384, 256), ("T1", 16384, 262144, 256)}
    assert [p.L for p in full if p.target == "T2"] == [1_000_000]
    assert {p.dtype for p in full if p.target == "T3"} == {"float32", "bfloat16"}
    from mlcl_fast.triton.configs import FP32_PRECISIONS
    assert {p.fp32 for p in full if p.dtype == "float32"} == {"auto", *FP32_PRECISIONS}
    # The symmetric backward is measured at every T1 point and at T3 (bf16) beside the default.
    sym = {(p.target, p.regime, p.L) for p in full if p.grad == "symmetric"}
    assert {(p.target, p.regime, p.L) for p in full if p.target == "T1"} <= sym and \
        ("T3", "heavy", 128) in sym
    # Smallest first, the Triton-only variants (precision, strategy, tiles) after every target point.
    variants = [p.variant for p in full]
    assert variants == sorted(variants) and variants.count(False) == 4 + 1 + 2 + 1
    plain = [p.logits for p in full if not p.variant]
    assert plain == sorted(plain) and full[0].target == "T3" and full[variants.index(True) - 1].target == "T2"
    tiles = gpu_targets.points(["T1"], smoke=False, tiles=("free:anchors=128,64,8,2", "64,64,8,3"))
    searched = [(p.tile, p.L) for p in tiles if p.tile]
    assert sorted(searched) == sorted((t, L) for t in ("free:anchors=128,64,8,2", "64,64,8,3") for L in (16384, 262144))
    assert all(p.regime == "heavy" and p.grad == "default" for p in tiles if p.tile)
    assert gpu_targets.points(["none"], smoke=False) == []
    # T4's public call without host reads: one forward + backward that leaves both gradients
    inputs = gpu_targets.build(gpu_targets.Point("T4", "heavy", 32, 40, 8, "float32"), "cpu")
    gpu_targets.public_step("reference", inputs, check_values=False)()
    assert inputs.features.grad is not None and inputs.prototypes.grad.abs().sum() > 0
    for regime in gpu_targets.REGIMES:
        point = gpu_targets.Point("T1", regime, 64, 300, 8, "float32")
        inputs = gpu_targets.build(point, "cpu")
        problem = prepare(inputs.features, inputs.labels, inputs.prototypes, inputs.config, 0.1)
        _, valid = reference.anchor_losses(problem)
        assert gpu_targets.valid_anchors(inputs) == int(valid.sum())


# ---------------------------------------------------------------- bench.cpu_targets and the pieces it shares

def test_matmul_rates_report_median_and_fastest():
    median, best = timing.matmul_rates("cpu", [(96, 96, 32), (64, 64, 64)])
    assert 0 < median <= best
    assert timing.matmul_rate("cpu", size=64) > 0
    t = timing.time_cpu(lambda: time.sleep(0.001), warmup=0, min_repeats=3, max_repeats=3, budget_s=0)
    assert len(t.samples_ms) == 3 and t.min_ms == min(t.samples_ms) <= t.p20_ms <= t.median_ms


def test_useful_flops_of_the_valid_anchors_only():
    s = providers.Shape("reg", N=4, L=2, d=3, K=2)
    assert providers.useful_flops(s, "full", anchors=5) == 8 * 5 * 6 * 3
    assert providers.useful_flops(s, "full", anchors=None) == providers.useful_flops(s, "full")


def test_worker_views_label_sizes_and_a_subset_of_modes():
    spec = dict(provider="reference", preset="reg", regime="powerlaw", N=24, L=50, d=8, views=2, label_sizes=[2, 3],
                dtype="float32", device="cpu", min_repeats=2, max_repeats=2, mode_budget_s=0, modes=["full"],
                threads=1, matmul_shapes=[[16, 16, 8]])
    inputs = worker.build_inputs(spec)
    assert inputs.features.shape == (24, 8) and inputs.labels.batch_size == 24
    sizes = inputs.labels.count
    assert torch.equal(inputs.labels.index[0::2], inputs.labels.index[1::2])   # row b*V + v: sample b's labels
    assert sizes.min() >= 2 and sizes.max() <= 3
    rows = sweep.run_in_process(spec)
    assert [r["mode"] for r in rows] == ["full"] and rows[0]["status"] == "ok", rows
    r = rows[0]
    assert len(r["samples_ms"]) == 2 and r["min_ms"] == min(r["samples_ms"]) and r["threads"] == 1
    for key in ("matmul_before", "matmul_after"):
        assert len(r[key]) == 2 and 0 < r[key][0] <= r[key][1]
    # a worker that dies reports only the modes it was asked for
    assert [m["mode"] for m in sweep._complete([], False, 1.0, 1, "boom", ("full",))] == ["full"]
    with pytest.raises(ValueError, match="views"):
        worker.build_inputs(dict(spec, N=25))
    with pytest.raises(ValueError, match="sizes"):
        bl.make_labels("few", 10, 16, sizes=(1, 2))


def test_cpu_targets_valid_anchor_count_agrees_with_the_reference():
    """The count the 4-GEMM limit of bench.cpu_targets uses (the one bench.gpu_targets uses too)
    is the reference's validity at a small point built as the target point is (views, 2..8 labels)."""
    from bench import cpu_targets, gpu_targets
    from mlcl_fast import reference
    from mlcl_fast.inputs import prepare

    inputs = worker.build_inputs(cpu_targets.QUICK)
    problem = prepare(inputs.features, inputs.labels, inputs.prototypes, inputs.config, inputs.temperature)
    with torch.no_grad():
        _, valid = reference.anchor_losses(problem)
    assert gpu_targets.valid_anchors(inputs) == int(valid.sum())
    assert 0 < int(valid.sum()) < problem.num_anchors        # absent labels' prototypes are not valid


def _fake_record(median_ms, min_ms, peak_mb=1.0, **extra):
    return dict(mode="full", status="ok", median_ms=median_ms, min_ms=min_ms, samples_ms=[min_ms, median_ms],
                peak_MB=peak_mb, total_MB=100.0, threads=2, **extra)


def test_cpu_targets_figures_pair_medians_and_fastest_runs():
    """Each target compares medians with medians and fastest runs with fastest runs, against the
    higher of the before/after matmul rates; pass, miss and 'partly' follow the table."""
    from bench import cpu_targets as ct

    runs = {"cpp": _fake_record(100.0, 50.0, matmul_before=[10.0, 40.0], matmul_after=[20.0, 30.0]),
            "cpp, 1 thread": _fake_record(190.0, 80.0, matmul_before=[5.0, 6.0], matmul_after=[5.0, 6.0]),
            "reference": _fake_record(2500.0, 900.0, peak_mb=20.0),
            "compile(reference)": _fake_record(300.0, 250.0)}
    large = _fake_record(1000.0, 1000.0, peak_mb=500.0)
    res = ct.summarize(ct.QUICK, ct.QUICK_LARGE, [[1, 1, 1]], 2, runs, large)
    t = res["targets"]
    assert set(t) == set(ct.TARGETS)
    flops = res["limit_gflop"] * 1e9
    assert t["limit_share"]["figures"]["median"] == pytest.approx(flops / 20e9 / 0.1)
    assert t["limit_share"]["figures"]["quietest"] == pytest.approx(flops / 40e9 / 0.05)
    assert t["speedup_reference"]["figures"] == pytest.approx({"median": 25.0, "quietest": 18.0})
    assert t["speedup_reference"]["status"] == "partly (median only)"
    assert t["speedup_compiled"]["figures"] == pytest.approx({"median": 3.0, "quietest": 5.0})
    assert t["speedup_compiled"]["status"] == "partly (quietest only)"
    assert t["thread_scaling"]["figures"] == pytest.approx({"median": 1.9, "quietest": 1.6})
    assert t["memory_vs_reference"]["figures"] == pytest.approx({"one call": 0.05})
    assert t["memory_vs_reference"]["status"] == "pass"
    assert t["large_peak_GB"]["status"] == "pass"
    assert res["point"]["valid_anchors"] < res["point"]["anchors"]
    # the 4-GEMM limit counts the valid anchors only
    shape = providers.Shape("reg", ct.QUICK["N"], ct.QUICK["L"], ct.QUICK["d"], 8)
    assert flops == providers.useful_flops(shape, "full", anchors=res["point"]["valid_anchors"]) < \
        providers.useful_flops(shape, "full")
    # what was not measured says so
    res = ct.summarize(ct.QUICK, ct.QUICK_LARGE, [[1, 1, 1]], 2, {"cpp": runs["cpp"]}, None)
    assert res["large"] is None
    for key in ("speedup_reference", "speedup_compiled", "thread_scaling", "memory_vs_reference", "large_peak_GB"):
        assert res["targets"][key]["status"] == "not measured" and res["targets"][key]["figures"] == {}
    bad = ct._check("speedup_reference", {"median": 2.0, "quietest": 3.0})
    assert bad["status"] == "miss" and bad["pass"] == {"median": False, "quietest": False}


def test_cpu_targets_quick_end_to_end():
    """--quick runs every measurement through the providers and the worker and reports every target."""
    import subprocess
    import sys
    from bench import cpu_targets as ct
    from bench import gpu_targets

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "bench.cpu_targets", "--quick", "--json", "--repeats", "2",
                           "--reference-repeats", "1"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    assert list(res["providers"]) == ["cpp", "cpp, 1 thread", "reference", "compile(reference)"]
    for name, r in res["providers"].items():
        assert r["status"] == "ok", (name, r)
        assert 0 < r["quietest_s"] <= r["median_s"] and r["peak_MiB"] >= 0
        assert len(r["runs_s"]) == (2 if name.startswith("cpp") else 1)
    assert res["providers"]["cpp"]["threads"] == 2 and res["providers"]["cpp, 1 thread"]["threads"] == 1
    for name in ("cpp", "cpp, 1 thread"):
        rates = res["matmul_gflops_s"][name]
        for when in ("before", "after"):
            assert 0 < rates[when]["median"] <= rates[when]["quietest"]
    point = res["point"]
    assert (point["N"], point["views"], point["threads"]) == (ct.QUICK["N"], 2, 2)
    assert point["valid_anchors"] == gpu_targets.valid_anchors(worker.build_inputs(ct.QUICK))
    assert res["large"]["status"] == "ok" and res["large"]["peak_GB"] > 0
    assert set(res["targets"]) == set(ct.TARGETS)
    for key, t in res["targets"].items():
        assert t["status"] in ("pass", "miss") or t["status"].startswith("partly"), (key, t)
        stats = set(ct.STATS) if key in ("limit_share", "speedup_compiled", "speedup_reference",
                                         "thread_scaling") else {"one call"}
        assert set(t["figures"]) == stats == set(t["pass"]), (key, t)
        assert all(v > 0 for v in t["figures"].values())
    cpp, ref = res["providers"]["cpp"], res["providers"]["reference"]
    assert res["targets"]["speedup_reference"]["figures"]["median"] == pytest.approx(ref["median_s"] / cpp["median_s"])
    text = ct.report(res)
    assert "'median' = median of the timed repeats" in text and "'quietest' = the fastest timed repeat" in text
    for key in ct.TARGETS:
        assert key in text



def test_closed_form_ab_quick():
    """bench.closed_form --quick: both modes timed for every preset it names, and the closed form
    gives the listed positives' loss and gradients to fp32 rounding."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "bench.closed_form", "--quick", "--json", "--rounds", "2"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout)
    assert [r["preset"] for r in res["presets"]] == ["mulsupcon", "reg_noreg", "proto"]
    for r in res["presets"]:
        for mode in ("auto", "off"):
            assert len(r[mode]["runs_ms"]) == 2 and 0 < r[mode]["quietest_ms"] <= r[mode]["median_ms"]
        assert r["loss_rel_diff"] < 1e-5 and r["grad_rel_diff"] < 1e-4
