"""End to end: the CLI trains on a few dozen rows and writes its results; seeds are reproducible."""
import json
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mlcl_fast.cli import cmd_bench, main
from mlcl_fast.train import from_arrays, train

FAST = ["--epochs", "1", "--probe-epochs", "1", "--min-steps", "1", "--warmup-steps", "0", "--hidden", "16", "--proj-dim", "8",
        "--batch-size", "16", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    arrays = {}
    for part, n in (("train", 48), ("test", 20)):
        X = rng.normal(size=(n, 5)).astype(np.float32)
        Y = np.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 2] > 0.5], 1)
        rows, cols = np.nonzero(Y)
        ptr = np.concatenate([[0], np.cumsum(Y.sum(1))])
        arrays.update({f"X_{part}": X, f"Y_{part}_indices": cols.astype(np.int32), f"Y_{part}_indptr": ptr,
                       f"Y_{part}_shape": np.array(Y.shape)})
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("loss, protocol, method", [("reg", "probe", "reg/probe"), ("msc", "finetune", "msc/finetune"),
                                                    ("supcon_any", "joint", "supcon_any/joint"), ("reg", None, "reg/probe"),
                                                    ("bce", None, "bce"), ("zlpr", "end2end", "zlpr"),
                                                    ("bce", "probe", "bce/probe"), ("asl", None, "asl"),
                                                    ("asl", "probe", "asl/probe")])
def test_cli_train_writes_json_and_prints_macro_f1(tiny_npz, tmp_path, capsys, loss, protocol, method):
    out = tmp_path / "out"
    chosen = [] if protocol is None else ["--protocol", protocol]
    rc = main(["train", "--dataset", str(tiny_npz), "--loss", loss, *chosen, "--out", str(out), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert any(line.startswith("Micro-F1") and "Macro-F1" in line for line in printed.splitlines())
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["dataset"] == "tiny" and rec["num_labels"] == 3
    assert rec["method"] == method
    names = [st["name"] for st in rec["stages"]]
    assert (names[-1] == "probe") == method.endswith("/probe")
    if method in ("bce/probe", "asl/probe"):  # the end-to-end stage, then the probe refitted on its frozen backbone
        assert len(names) == 2 and names[0] != "probe"

    for key in ("micro_f1", "macro_f1", "hamming", "map", "p@1", "p@3", "p@5", "macro_f1_tuned"):
        assert 0.0 <= rec["test"][key] <= 1.0
    assert len(rec["thresholds"]) == 3
    assert (out / "model.pt").exists() and (out / "curves.png").stat().st_size > 0
    assert f"Macro-F1 {rec['test']['macro_f1']:.4f}" in printed


@pytest.mark.parametrize("loss, protocol", [("bce", "finetune"), ("zlpr", "joint"), ("reg", "end2end"),
                                            ("asl", "finetune"), ("asl", "joint")])
def test_protocol_must_suit_the_loss(loss, protocol):
    from mlcl_fast.train.api import config_from
    with pytest.raises(ValueError, match="protocol"):
        config_from(loss=loss, protocol=protocol)


def test_asl_is_a_baseline_trained_with_the_asymmetric_loss(monkeypatch):
    """`--loss asl` trains its classifier with mlcl_fast.asl_loss at the paper's defaults (and only
    asl does), on one view, under the end-to-end default protocol; the CLI offers what the
    protocols know."""
    import mlcl_fast
    from mlcl_fast import cli
    from mlcl_fast.train import protocols
    from mlcl_fast.train.api import config_from

    assert cli.BASELINES == protocols.BASELINES and "asl" in protocols.BASELINES
    assert config_from(loss="asl").protocol == "end2end" and config_from(loss="asl").method == "asl"
    with pytest.raises(ValueError, match="^views: asl trains on one view"):
        config_from(loss="asl", views=2)
    calls = []

    def spy(logits, labels, *args, **kwargs):
        calls.append((args, kwargs))
        return mlcl_fast.asl_loss(logits, labels, *args, **kwargs)

    assert protocols.SUPERVISED_LOSSES["asl"] is mlcl_fast.asl_loss
    monkeypatch.setitem(protocols.SUPERVISED_LOSSES, "asl", spy)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 4))
    ds = from_arrays(X, np.stack([X[:, 0] > 0, X[:, 1] > 0], 1).astype(int), seed=0)
    kw = dict(epochs=1, min_steps=1, hidden=8, batch_size=16, warmup_steps=0)
    asl = train(ds, loss="asl", **kw)
    assert calls and all(c == ((), {}) for c in calls)  # the defaults: gamma_pos=0, gamma_neg=4, clip=0.05
    assert asl.to_json()["method"] == "asl" and asl.backend == "-"
    calls.clear()
    bce = train(ds, loss="bce", **kw)
    assert not calls  # the other baselines and fine-tuning keep their own losses
    # same seed and data, another loss: ASL's mean is far below BCE's (easy negatives are down-weighted)
    assert asl.stages[0]["train_loss"][0] < bce.stages[0]["train_loss"][0]


def test_same_seed_same_result():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 4))
    ds = from_arrays(X, np.stack([X[:, 0] > 0, X[:, 1] > 0], 1).astype(int), seed=0)
    kw = dict(loss="reg", protocol="finetune", epochs=2, probe_epochs=2, min_steps=1, hidden=16, proj_dim=8,
              batch_size=16)
    a, b = train(ds, seed=3, **kw), train(ds, seed=3, **kw)
    assert a.test == b.test and a.stages[0]["train_loss"] == b.stages[0]["train_loss"]
    c = train(ds, seed=4, **kw)
    assert c.stages[0]["train_loss"] != a.stages[0]["train_loss"]


def test_two_augmented_views():
    import torch
    from mlcl_fast.train.models import make_views

    x = torch.ones(4, 10)
    v = make_views(x, 2, 0.5, 0.0, torch.Generator().manual_seed(0))
    assert v.shape == (4, 2, 10) and not torch.equal(v[:, 0], v[:, 1])
    assert set(v.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept with inverted scaling
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 4))
    ds = from_arrays(X, np.stack([X[:, 0] > 0, X[:, 1] > 0], 1).astype(int), seed=0)
    r = train(ds, loss="supcon_any", protocol="joint", views=2, epochs=1, min_steps=1, hidden=8, proj_dim=4,
              batch_size=16)
    assert 0 <= r.test["macro_f1"] <= 1


def test_momentum_queue_pretraining():
    """--queue: a key encoder that follows the online one by momentum after every step, and a
    queue of its keys and their labels that the loss sees as keys; in-batch training without."""
    import torch

    from mlcl_fast.train.data import prepare_split
    from mlcl_fast.train.models import Backbone, ProjectionHead
    from mlcl_fast.train.protocols import TrainConfig, _contrastive_module, _momentum_queue

    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 4))
    ds = from_arrays(X, np.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 2] > 0.5], 1).astype(int), seed=0)
    split = prepare_split(ds, 0.2, 0)
    cfg = TrainConfig(loss="mulsupcon", queue=24, momentum=0.9, hidden=8, proj_dim=4).check()
    torch.manual_seed(0)
    backbone = Backbone(split.num_features, 8, 2, 0.0)
    head = ProjectionHead(backbone.out_dim, 4)
    crit = _contrastive_module(cfg, split.num_labels)
    step, after_step = _momentum_queue(split, cfg, backbone, head, crit, torch.Generator().manual_seed(0), False)
    key_backbone, _ = step.key_encoder
    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.5)
    x, y = torch.tensor(split.X_train[:16], dtype=torch.float32), torch.tensor(split.Y_train[:16].toarray())
    before = [k.clone() for k in key_backbone.parameters()]
    loss = step(x, y)
    assert len(step.queue) == 16 and step.queue.key_labels().num_labels == 3
    with_queue_only_batch = crit(head(backbone(x)), y)
    assert not torch.isclose(loss, with_queue_only_batch), "the keys must enter the loss"
    opt.zero_grad()
    loss.backward()
    opt.step()
    after_step()
    for k0, k1, q in zip(before, key_backbone.parameters(), backbone.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * q.detach())
    step(x, y)
    assert len(step.queue) == 24  # full: 32 rows offered
    r = train(ds, loss="mulsupcon", queue=24, epochs=1, probe_epochs=1, min_steps=1, hidden=8, proj_dim=4,
              batch_size=16)
    assert r.config["queue"] == 24 and 0 <= r.test["macro_f1"] <= 1
    for bad, name in ((dict(queue=-1), "queue"), (dict(momentum=1.0), "momentum"),
                      (dict(queue=8, protocol="joint"), "queue"), (dict(loss="bce", queue=8), "queue")):
        with pytest.raises(ValueError, match=f"^{name}"):
            TrainConfig(**{"loss": "mulsupcon", **bad}).check()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--dataset", str(tmp_path / "none.npz"), "--quiet"]) == 2
    assert "none.npz: no such file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="epochs: expected an integer >= 1"):
        train("emotions", loss="bce", epochs=0)
    with pytest.raises(ValueError, match="nosuch: unknown training option"):
        train("emotions", nosuch=1)


def test_bench_without_bench_folder(tmp_path, capsys):
    assert cmd_bench(["--quick"], root=tmp_path) == 2
    assert "bench/sweep.py" in capsys.readouterr().err


def test_study_grid_is_resumable(tiny_npz, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["study", "--datasets", "tiny", "--data-dir", str(tiny_npz.parent), "--methods", "bce", "reg/probe",
            "reg/finetune", "--seeds", "0", "1", "--out", str(out), *FAST]
    assert main(args) == 0
    cells = sorted(p.relative_to(out).as_posix() for p in (out / "runs").rglob("*.json"))
    # one pre-training per seed, shared by probe and finetune, cached under the options it used
    assert len(cells) == 6 and len(list((out / "cache" / "tiny" / "reg").rglob("seed0.pt"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary} == {"bce", "reg/probe", "reg/finetune"}
    assert all(r["seeds"] == 2 and r["macro_f1_std"] is not None for r in summary)
    assert (out / "results.csv").read_text().count("\n") == 7
    assert (out / "macro_f1_vs_labels.png").exists() and "### tiny" in (out / "summary.md").read_text()
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    capsys.readouterr()
    assert main(args) == 0  # everything finished: nothing is retrained
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}


def test_study_tune_chooses_on_validation_and_uses_the_choice_for_every_seed(tiny_npz, tmp_path, monkeypatch):
    from mlcl_fast.train import tuning
    monkeypatch.setitem(tuning.GRIDS, "end2end", {"lr": (1e-3, 3e-2)})
    monkeypatch.setitem(tuning.GRIDS, "probe", {"temperature": (0.1, 0.5)})
    out = tmp_path / "tuned"
    args = ["study", "--tune", "--datasets", "tiny", "--data-dir", str(tiny_npz.parent), "--methods", "bce",
            "reg/probe", "--seeds", "0", "1", "--out", str(out), *FAST]
    assert main(args) == 0
    choices = json.loads((out / "tuning" / "choices.json").read_text())
    for method, loss, protocol, key in (("bce", "bce", "end2end", "lr"), ("reg/probe", "reg", "probe", "temperature")):
        tried = [json.loads(tuning.candidate_path(out, "tiny", method, o).read_text())
                 for o in tuning.candidates(loss, protocol)]
        assert len(tried) == 2 and tried[0]["config"][key] != tried[1]["config"][key]
        best = max(tried, key=tuning.score)  # validation scores only
        assert choices["tiny"][method] == {key: best["config"][key]}
        folder = out / "runs" / "tiny" / method.replace("/", "__")
        cells = [json.loads((folder / f"seed{s}.json").read_text()) for s in (0, 1)]
        assert all(c["config"][key] == best["config"][key] for c in cells)
        assert cells[0]["test"] == best["test"] and cells[1]["seed"] == 1  # seed 0 is the chosen candidate itself
    # the two temperatures pre-trained separately (the cache keys on them)
    assert len(list((out / "cache" / "tiny" / "reg").rglob("seed0.pt"))) == 2
    assert "τ" in (out / "tuning" / "choices.md").read_text()
    assert "## Options chosen on validation" in (out / "summary.md").read_text()
    trained = lambda: {p: p.stat().st_mtime_ns for d in ("runs", "tuning") for p in (out / d).rglob("*.json")}  # noqa: E731
    stamp = trained()
    assert main(args) == 0  # resumable: nothing is retrained or re-chosen
    assert stamp == trained()



def test_against_baseline_counts_clear_differences():
    from mlcl_fast.train.study import against_baseline_markdown

    def row(dataset, method, mean, std):
        return {"dataset": dataset, "method": method, "macro_f1_mean": mean, "macro_f1_std": std}

    summary = [row("a", "bce", 0.50, 0.01), row("a", "m", 0.60, 0.02),   # +0.10, clearly above
               row("b", "bce", 0.50, 0.05), row("b", "m", 0.52, 0.05),   # +0.02, within noise
               row("c", "bce", 0.50, 0.00), row("c", "m", 0.40, 0.01),   # -0.10, clearly below
               row("d", "m", 0.90, 0.00)]                               # no baseline: left out
    text = against_baseline_markdown(summary, ["a", "b", "c", "d"], ["bce", "m"], "macro_f1")
    line = next(x for x in text.splitlines() if x.startswith("| m "))
    assert [c.strip() for c in line.strip("|").split("|")] == ["m", "+0.0067", "2/3", "1", "1"]
    assert "| bce " not in text


# ---------------------------------------------------------------------------------------------
# Files the CLI writes: atomic writes, damaged caches, the output folder

class Crash(BaseException):
    """A crash in the middle of a write (not an Exception, so nothing on the way catches it)."""


def _writers():
    import torch
    from mlcl_fast.train import files, plots, study

    stage = {"name": "end2end", "train_loss": [1.0, 0.5], "val_score": [0.1, 0.2], "best_epoch": 2}
    return {"json": lambda p: files.write_json(p, {"new": 1}), "text": lambda p: files.write_text(p, "new"),
            "csv": lambda p: study._write_csv(p, [{"new": 1}]),
            "torch": lambda p: files.torch_save({"w": torch.ones(3)}, p),
            "figure": lambda p: plots.training_curves([stage], p)}


@pytest.mark.parametrize("kind", ["json", "text", "csv", "torch", "figure"])
def test_a_crash_before_the_rename_leaves_the_previous_file(tmp_path, monkeypatch, kind):
    import os

    suffix = {"figure": "png", "torch": "pt"}.get(kind, kind)
    path = tmp_path / f"result.{suffix}"
    path.write_bytes(b"previous")

    def crash(fd):
        raise Crash()

    monkeypatch.setattr(os, "fsync", crash)  # every byte is written, the rename has not happened
    with pytest.raises(Crash):
        _writers()[kind](path)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    _writers()[kind](path)
    assert path.read_bytes() != b"previous" and [p.name for p in tmp_path.iterdir()] == [path.name]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as plain open() would leave it


def test_a_crash_in_the_middle_of_a_write_leaves_the_previous_file(tmp_path):
    import torch
    from mlcl_fast.train.files import atomic_open, torch_save

    path = tmp_path / "cache.pt"
    torch_save({"w": torch.zeros(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # pickling fails after the tensor's bytes went out
        torch_save({"w": torch.ones(10_000), "z": lambda: None}, path)
    with pytest.raises(Crash):
        with atomic_open(path, "wb") as f:
            f.write(b"half of it")
            raise Crash()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_a_killed_writer_leaves_the_previous_file_and_a_hidden_temporary(tmp_path):
    import subprocess
    import sys
    from mlcl_fast.train import files

    path = tmp_path / "seed0.json"
    path.write_text('{"old": 1}')
    script = (f"import importlib.util, os, signal\n"  # files.py alone: no torch import in the child
              f"spec = importlib.util.spec_from_file_location('files', {files.__file__!r})\n"
              f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              f"with m.atomic_open({str(path)!r}) as f:\n"
              f"    f.write('{{\"new\": '); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode != 0
    assert json.loads(path.read_text()) == {"old": 1}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[1:] == ["seed0.json"] and left[0].startswith(".seed0.json.") and left[0].endswith(".tmp")
    assert sorted(tmp_path.glob("seed*.json")) == [path]  # the study's globs never see the temporary


def _study(tiny_npz, out, *methods):
    return ["study", "--datasets", "tiny", "--data-dir", str(tiny_npz.parent), "--methods", *methods,
            "--seeds", "0", "--out", str(out), *FAST]


def test_a_crash_while_caching_a_pretraining_does_not_block_the_resume(tiny_npz, tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def partial_save(obj, f):
        handle = open(f, "wb") if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__") else f
        handle.write(b"PK\x03\x04 the first bytes")
        handle.flush()
        raise Crash()

    out = tmp_path / "study"
    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(Crash):
        main(_study(tiny_npz, out, "reg/probe"))
    monkeypatch.setattr(torch, "save", real_save)
    assert list((out / "cache").rglob("*.pt")) == []  # nothing partial under a final name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resuming finds nothing damaged
        assert main(_study(tiny_npz, out, "reg/probe")) == 0
    assert (out / "runs" / "tiny" / "reg__probe" / "seed0.json").exists()


def test_damaged_cache_and_cells_are_named_and_computed_again(tiny_npz, tmp_path, capsys):
    import torch
    from mlcl_fast.train.study import cell_path

    out = tmp_path / "study"
    assert main(_study(tiny_npz, out, "bce", "reg/probe")) == 0
    cache = next((out / "cache").rglob("seed0.pt"))
    cache.write_bytes(cache.read_bytes()[:100])  # a cut-off pre-training
    probe, bce = cell_path(out, "tiny", "reg/probe", 0), cell_path(out, "tiny", "bce", 0)
    probe.unlink()
    bce.write_text(bce.read_text()[:50])  # a cut-off cell
    stamp = bce.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.warns(RuntimeWarning) as caught:
        assert main(_study(tiny_npz, out, "bce", "reg/probe")) == 0
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{cache}: unreadable pre-training cache") for m in messages), messages
    assert any(m.startswith(f"{bce}: unreadable study cell") for m in messages), messages
    assert "computing it again" in messages[0]
    blob = torch.load(cache, weights_only=True)  # rewritten whole
    assert set(blob) == {"backbone", "log"}
    assert json.loads(bce.read_text())["method"] == "bce" and bce.stat().st_mtime_ns != stamp
    assert json.loads(probe.read_text())["method"] == "reg/probe"
    assert {r["method"] for r in json.loads((out / "summary.json").read_text())} == {"bce", "reg/probe"}


def test_damaged_tuning_files_are_chosen_again(tmp_path, monkeypatch):
    from mlcl_fast.train import tuning

    monkeypatch.setitem(tuning.GRIDS, "end2end", {"lr": (1e-3, 1e-2)})
    trained = []

    def train_candidate(opts):
        trained.append(opts["lr"])
        return {"dataset": "d", "method": "bce", "seed": 0, "num_labels": 2, "wall_s": 0.0, "config": opts,
                "test": {}, "val": {"macro_f1_tuned": opts["lr"], "map": 0.0}, "stages": []}

    assert tuning.tune_method(tmp_path, "d", "bce", "bce", "end2end", train_candidate) == {"lr": 1e-2}
    damaged = tuning.candidate_path(tmp_path, "d", "bce", {"lr": 1e-2})
    damaged.write_text('{"dataset": "d"')
    (tmp_path / "tuning").mkdir(exist_ok=True)
    (tmp_path / "tuning" / "choices.json").write_text("[1, 2")
    with pytest.warns(RuntimeWarning, match="choices.json: unreadable tuning choices"):
        assert tuning.read_choices(tmp_path) == {}
    with pytest.warns(RuntimeWarning, match=r"lr=0\.01\.json: unreadable tuning candidate"):
        assert tuning.tune_method(tmp_path, "d", "bce", "bce", "end2end", train_candidate) == {"lr": 1e-2}
    assert trained == [1e-3, 1e-2, 1e-2]  # only the damaged candidate trained again


def _forbid_training(monkeypatch):
    from mlcl_fast.train import api, protocols, study

    def trained(*args, **kwargs):
        raise AssertionError("training started")

    for module in (api, protocols, study):
        for name in ("run", "pretrain"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, trained)


@pytest.mark.parametrize("command", ["train", "run", "study"])
def test_an_unusable_out_fails_before_any_training(tiny_npz, tmp_path, monkeypatch, capsys, command):
    _forbid_training(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder cannot be made below a regular file, not even by root
    out = blocker / "out"
    args = {"train": ["train", "--dataset", str(tiny_npz), "--loss", "bce"],
            "run": ["run", "--dataset", str(tiny_npz), "--methods", "bce"],
            "study": ["study", "--datasets", "tiny", "--data-dir", str(tiny_npz.parent), "--methods", "bce"]}[command]
    assert main([*args, "--out", str(out), *FAST]) == 2
    assert f"{out}: cannot create or write the output folder" in capsys.readouterr().err


def test_a_read_only_out_fails_before_any_training(tiny_npz, tmp_path, monkeypatch, capsys):
    import os

    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("permission bits do not stop this user (root) from writing; see the test above")
        _forbid_training(monkeypatch)
        assert main(["train", "--dataset", str(tiny_npz), "--loss", "bce", "--out", str(out), *FAST]) == 2
        assert f"{out}: cannot create or write the output folder (Permission denied" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


def test_cli_rejects_out_of_range_labels_before_training(tmp_path, monkeypatch, capsys):
    _forbid_training(monkeypatch)
    rng = np.random.default_rng(0)
    arrays = {}
    for part in ("train", "test"):
        arrays.update({f"X_{part}": rng.normal(size=(6, 3)).astype(np.float32),
                       f"Y_{part}_indices": np.array([0, -1, 2, 0, 1, 2], np.int32),
                       f"Y_{part}_indptr": np.arange(7), f"Y_{part}_shape": np.array([6, 3])})
    np.savez(tmp_path / "bad.npz", **arrays)
    assert main(["train", "--dataset", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "bad.npz: Y_train_indices[1] (row 1) is -1; expected a column index in [0, 3)" in capsys.readouterr().err


def test_main_job_trains_then_measures_the_loss_alone(tmp_path, capsys):
    """`run` (the main job) on its default kind of data, a synthetic XMC-like set: the ranking
    table of extreme classification, then the loss-alone table, where the reference runs at the
    small L (measured, within its predicted need) and is refused at the large one, with why."""
    out = tmp_path / "main"
    assert main(["run", "--dataset", "synth:eurlex4k?scale=0.02", "--methods", "bce", "reg/probe",
                 "--loss-labels", "40", "5000", "--loss-budget-gb", "1", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "| method" in text and "| PSP@5" in text and "nDCG@5" in text  # >= 1000 labels: XMC metrics
    assert "best P@1: " in text
    for method in ("bce", "reg__probe"):
        assert (out / method / "metrics.json").exists()
    steps = json.loads((out / "loss_scale.json").read_text())
    assert [(s["labels"], s["backend"]) for s in steps] == [(40, "cpp"), (40, "reference"), (5000, "cpp"),
                                                            (5000, "reference")]
    small_ref, big_ref = steps[1], steps[3]
    assert small_ref["status"] == "measured" and small_ref["ms"] > 0
    assert big_ref["ms"] is None and big_ref["status"].startswith("not run: predicted")
    assert big_ref["predicted_mb"] > 1024 > small_ref["predicted_mb"]  # 5,512 x 5,512 pairs: ~1.7 GB
    assert steps[2]["status"] == "measured" and steps[2]["ms"] > 0
    assert "not run: predicted" in text and "| 5,000 |" in text


def test_study_summary_adds_ranking_tables_for_many_label_sets():
    """summary.md carries P@k, nDCG@5 and PSP@k tables for the data sets with XMC_LABELS labels
    or more (and only those), from the cells' means."""
    from mlcl_fast.train.report import XMC_LABELS
    from mlcl_fast.train.study import _ranking_markdown

    def row(dataset, L, method, p1):
        r = {"dataset": dataset, "method": method, "num_labels": L, "seeds": 1}
        for m in ("p@1", "p@5", "ndcg@5", "psp@1", "psp@5"):
            r[f"{m}_mean"], r[f"{m}_std"] = (p1 if m == "p@1" else 0.1), 0.0
        return r

    summary = [row("small", 10, "bce", 0.5), row("big", XMC_LABELS, "bce", 0.25), row("big", XMC_LABELS, "zlpr", 0.75)]
    text = _ranking_markdown(summary, ["small", "big"], ["bce", "zlpr"], 1)
    assert text.count("## ") == 5 and "## P@1 (data sets with 1,000+ labels)" in text
    assert "big (1000)" in text and "small" not in text
    assert "| **0.750** " in text and "| 0.250 " in text
    assert _ranking_markdown([row("small", 10, "bce", 0.5)], ["small"], ["bce"], 1) == ""
