"""Synthetic XMC-like data (mlcl_fast.data_synth): published statistics, determinism, the XMC files
and their loader, O(nnz) cost, learnability, the `synth:` data set names and `mlcl-fast data synth`."""
import json
import time
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

pytest.importorskip("sklearn")

from mlcl_fast import data_synth as ds
from mlcl_fast.cli import main
from mlcl_fast.train.data import DatasetError, load_dataset, load_svmlight

SMALL = {"eurlex4k": 1500, "wiki10-31k": 600, "amazoncat13k": 3000, "amazon670k": 3000, "delicious200k": 1500}


@pytest.fixture(scope="module")
def small_sets():
    return {p: ds.generate(ds.make_config(p, train=n, test=n // 4, seed=0)) for p, n in SMALL.items()}


def test_published_table_is_self_consistent():
    # the repository's points per label is points x labels per point / labels (train and test
    # points for EURLex-4K); a typo in the table would break this
    for key, p in ds.PUBLISHED.items():
        points = p.train + (p.test if p.points_per_label_counts_test else 0)
        assert points * p.labels_per_point / p.labels == pytest.approx(p.points_per_label, rel=2e-3), key
    assert ds.PUBLISHED["amazon670k"].labels == 670091 and ds.PUBLISHED["eurlex4k"].features == 5000


@pytest.mark.parametrize("preset", ds.PRESETS)
def test_statistics_match_the_targets_at_small_scale(small_sets, preset):
    data, pub, ass = small_sets[preset], ds.PUBLISHED[preset], ds.ASSUMED[preset]
    st = ds.stats(data)
    tr, te = st["train"], st["test"]
    assert (tr["rows"], te["rows"]) == (SMALL[preset], SMALL[preset] // 4)
    assert tr["features"] == te["features"] == pub.features and tr["labels"] == te["labels"] == pub.labels
    assert tr["labels_per_point"] == pytest.approx(pub.labels_per_point, rel=0.04)
    assert te["labels_per_point"] == pytest.approx(pub.labels_per_point, rel=0.08)
    assert tr["features_per_point"] == pytest.approx(ass.features_per_point, rel=0.05)
    assert tr["duplicate_label_draws_dropped"] <= 0.002 * SMALL[preset] * pub.labels_per_point
    # the splits are row samples of a full-size degree sequence with the published statistics
    full = st["full_scale"]
    assert full["labels_per_point"] == pytest.approx(pub.labels_per_point, rel=0.005)
    assert full["points_per_label"] == pytest.approx(pub.points_per_label, rel=0.005)
    assert data.full_scale_degrees.min() >= 1  # every label used at full size, as in the repository
    # a row sample of p rows carries each label's points with probability p / published rows
    d = data.full_scale_degrees
    counts = np.bincount(data.train.y_indices, minlength=pub.labels)
    head = np.argsort(d)[::-1][:20]
    expected = d[head] * SMALL[preset] / pub.train
    assert np.all(np.abs(counts[head] - expected) <= 5 * np.sqrt(expected) + 2)
    assert tr["top_label_share"] == pytest.approx(full["top_label_share"], rel=0.25, abs=0.005)


@pytest.mark.parametrize("preset", ["eurlex4k", "amazoncat13k", "delicious200k"])
def test_label_frequencies_follow_the_power_law(small_sets, preset):
    fit = ds.stats(small_sets[preset])["train"]["power_law_exponent_fit"]
    assert fit == pytest.approx(ds.ASSUMED[preset].alpha, abs=0.12)
    steeper = ds.generate(ds.make_config(preset, train=SMALL[preset], test=10, alpha=ds.ASSUMED[preset].alpha + 0.3))
    assert ds.stats(steeper)["train"]["power_law_exponent_fit"] > fit + 0.15


def test_full_scale_degrees_fit_their_exponent():
    for preset in ds.PRESETS:
        cfg = ds.make_config(preset)
        fit = ds.power_law_fit(ds.label_degrees(cfg, np.random.default_rng(0)), min_count=100)
        assert fit == pytest.approx(cfg.alpha, abs=0.05), preset


def arrays(split):
    return [split.x_indptr, split.x_indices, split.x_data, split.y_indptr, split.y_indices]


def test_deterministic_per_seed_and_different_across_seeds():
    cfg = ds.make_config("eurlex4k", train=300, test=80, seed=5)
    a, b = ds.generate(cfg), ds.generate(cfg)
    for part in ("train", "test"):
        for x, y in zip(arrays(getattr(a, part)), arrays(getattr(b, part))):
            np.testing.assert_array_equal(x, y)
    c = ds.generate(ds.make_config("eurlex4k", train=300, test=80, seed=6))
    assert not np.array_equal(a.train.y_indices[:50], c.train.y_indices[:50])
    assert not np.array_equal(a.train.x_indices[:50], c.train.x_indices[:50])
    # train and test are different draws, not copies
    assert not np.array_equal(a.train.y_indices[:50], a.test.y_indices[:50])


@pytest.mark.parametrize("values", ["tfidf", "counts"])
def test_files_round_trip_through_the_xmc_loader(tmp_path, values):
    # labels_per_point < 1 leaves rows without labels, which the format writes feature-first
    cfg = ds.make_config("amazoncat13k", train=400, test=100, labels=300, labels_per_point=0.7, values=values, seed=2)
    data = ds.generate(cfg)
    assert (np.diff(data.train.y_indptr) == 0).any()
    ds.write_synth(tmp_path, cfg)
    assert (tmp_path / "train.txt").read_text().splitlines()[0] == f"400 {cfg.features} 300"
    loaded = load_dataset(str(tmp_path / "train.txt"), test_file=str(tmp_path / "test.txt"))
    for X, Y, split in ((loaded.X_train, loaded.Y_train, data.train), (loaded.X_test, loaded.Y_test, data.test)):
        assert X.shape == (split.rows, cfg.features) and Y.shape == (split.rows, 300)
        assert (X != split.X()).nnz == 0  # bit for bit: the files carry the generated values exactly
        assert (Y != split.Y()).nnz == 0
    if values == "tfidf":
        norms = np.sqrt(np.asarray(loaded.X_train.multiply(loaded.X_train).sum(1)).ravel())
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    else:
        assert np.all(loaded.X_train.data == np.round(loaded.X_train.data)) and loaded.X_train.data.max() > 1
    st = json.loads((tmp_path / "stats.json").read_text())
    assert st["synthetic"] is True and st["train"]["rows"] == 400 and st["config"]["values"] == values


def test_synth_dataset_name_equals_the_files(tmp_path):
    spec = "synth:eurlex4k?train=200&test=60&labels=500&seed=3"
    from_name = load_dataset(spec)
    assert from_name.name == "synth-eurlex4k-train200-test60-labels500-seed3" and "synthetic" in from_name.source
    cfg = ds.parse_spec(spec)
    assert (cfg.train, cfg.test, cfg.labels, cfg.seed) == (200, 60, 500, 3)
    ds.write_synth(tmp_path, cfg)
    train = load_svmlight(tmp_path / "train.txt")
    assert (train.X_train != from_name.X_train).nnz == 0 and (train.Y_train != from_name.Y_train).nnz == 0
    assert from_name.X_test.shape == (60, 5000) and from_name.Y_train.dtype == np.int8
    other = load_dataset("synth:eurlex4k?train=200&test=60&labels=500&seed=4")
    assert (other.Y_train != from_name.Y_train).nnz > 0


@pytest.mark.parametrize("spec, named", [("synth:nope", "preset"), ("synth:eurlex4k?scale=abc", "scale"),
                                         ("synth:eurlex4k?scale=0", "scale"), ("synth:eurlex4k?bogus=1", "bogus=1"),
                                         ("synth:eurlex4k?seed=1&seed=2", "seed"), ("synth:eurlex4k?noise=1.5", "noise"),
                                         ("synth:eurlex4k?labels=10&labels_per_point=20", "labels_per_point")])
def test_synth_dataset_name_errors_name_the_key(spec, named):
    with pytest.raises(DatasetError, match=named) as err:
        load_dataset(spec)
    assert spec in str(err.value)


def test_synth_name_refuses_a_test_file():
    with pytest.raises(DatasetError, match="own test split"):
        load_dataset("synth:eurlex4k?train=20&test=5", test_file="x.txt")


def test_memory_and_time_grow_with_nnz_not_rows_times_labels():
    # 10^5 labels and 10^5 features: one dense [rows, labels] int8 array of 1000 rows would take
    # 95 MiB, a float32 [rows, features] one 380 MiB
    def run(rows):
        cfg = ds.make_config("amazon670k", labels=100_000, features=100_000, train=rows, test=rows // 4)
        tracemalloc.start()
        t0 = time.perf_counter()
        data = ds.generate(cfg)
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return len(data.train.x_indices) + len(data.test.x_indices), peak, seconds

    nnz1, peak1, t1 = run(1000)
    nnz4, peak4, t4 = run(4000)
    assert peak1 < 24 * 2 ** 20, f"{peak1 / 2 ** 20:.0f} MiB for {nnz1} stored entries"
    # the growth from 1000 to 4000 rows is paid per stored entry, at a fixed number of bytes each
    assert (peak4 - peak1) / (nnz4 - nnz1) < 250
    assert t4 < 10


def test_8000_rows_and_100000_labels_in_seconds(tmp_path):
    cfg = ds.make_config("amazon670k", labels=100_000, train=8000, test=2000)
    t0 = time.perf_counter()
    st = ds.write_synth(tmp_path, cfg)
    assert time.perf_counter() - t0 < 15
    assert st["train"]["rows"] == 8000 and st["train"]["labels"] == 100_000


def centroid_p_at_1(data) -> tuple[float, float]:
    """P@1 on test of a one-pass label-centroid scorer, and of always answering the most frequent
    training label (the prior)."""
    X, Y = data.train.X(), data.train.Y().astype(np.float32)
    C = (Y.T @ X).tocsr()  # sum of the rows of each label: sparse [labels, features]
    norm = np.sqrt(np.asarray(C.multiply(C).sum(1)).ravel())
    C = sp.diags(1.0 / np.maximum(norm, 1e-12)) @ C
    scores = (data.test.X() @ C.T).toarray()
    Yt = data.test.Y()
    top = scores.argmax(1)
    p1 = np.asarray(Yt[np.arange(Yt.shape[0]), top]).ravel().mean()
    prior = int(np.asarray(Y.sum(0)).ravel().argmax())
    return float(p1), float(Yt[:, prior].toarray().mean())


@pytest.mark.parametrize("preset", ["eurlex4k", "amazon670k"])
def test_labels_are_learnable_from_features(preset):
    kw = dict(train=2000, test=400, labels=2000 if preset == "amazon670k" else None)
    p1, prior = centroid_p_at_1(ds.generate(ds.make_config(preset, **kw)))
    assert p1 > prior + 0.3, (p1, prior)
    # the control: with only background words the same scorer does no better than the prior
    p1_noise, prior_noise = centroid_p_at_1(ds.generate(ds.make_config(preset, noise=1.0, **kw)))
    assert p1_noise < prior_noise + 0.05, (p1_noise, prior_noise)


def test_cli_writes_files_and_statistics(tmp_path, capsys):
    out = tmp_path / "eu"
    rc = main(["data", "synth", "--preset", "EURLex-4K", "--train", "300", "--test", "80", "--labels", "800",
               "--seed", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "EURLex-4K-like" in printed and "train: 300 rows" in printed and "stats.json" in printed
    st = json.loads((out / "stats.json").read_text())
    assert st["preset"] == "eurlex4k" and st["config"]["labels"] == 800 and st["config"]["seed"] == 1
    assert st["published"]["labels"] == 3993 and st["test"]["rows"] == 80
    for key in ("rows", "features", "labels", "labels_per_point", "points_per_label_used", "top_label_share",
                "power_law_exponent_fit", "features_per_point"):
        assert key in st["train"]
    train = load_svmlight(out / "train.txt")
    assert train.X_train.shape == (300, 5000) and train.num_labels == 800
    first = (out / "train.txt").read_bytes()
    assert main(["data", "synth", "--preset", "eurlex4k", "--train", "300", "--test", "80", "--labels", "800",
                 "--seed", "1", "--out", str(out)]) == 0
    assert (out / "train.txt").read_bytes() == first
    assert main(["data", "synth", "--preset", "eurlex4k", "--scale", "0.01", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "stats.json").read_text())["train"]["rows"] == 155  # round(0.01 x 15539)
    assert main(["data", "presets"]) == 0
    assert "Amazon-670K" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["--preset", "nope"], "--preset"), (["--scale", "-1"], "--scale"), (["--scale", "nan"], "--scale"),
    (["--train", "0"], "--train"), (["--test", "-3"], "--test"), (["--labels", "0"], "--labels"),
    (["--features", "0"], "--features"), (["--noise", "1.5"], "--noise"), (["--alpha", "-1"], "--alpha"),
    (["--labels", "10", "--labels-per-point", "20"], "--labels-per-point"),
    (["--features", "100", "--features-per-point", "500"], "--features-per-point"),
    (["--topic-terms", "0"], "--topic-terms"), (["--seed", "-1"], "--seed"),
])
def test_cli_errors_name_the_argument(tmp_path, capsys, argv, named):
    base = {"--preset": "eurlex4k", "--train": "20", "--test": "5", "--out": str(tmp_path / "o")}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    rc = main(["data", "synth", *[x for kv in base.items() for x in kv]])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: {named}:" in err, err
    assert not (tmp_path / "o" / "train.txt").exists()


def test_cli_parse_errors_name_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "synth", "--preset", "eurlex4k", "--train", "many", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--preset", "eurlex4k", "--values", "binary", "--out", str(tmp_path)])
    assert "--values" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["data", "synth", "--preset", "eurlex4k", "--train", "5", "--test", "2", "--out", str(blocker / "x")]) == 2
    assert str(blocker / "x") in capsys.readouterr().err


def test_cli_trains_on_a_synth_dataset_name(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "synth:eurlex4k?train=240&test=60&labels=40&features=300", "--loss", "bce",
               "--epochs", "1", "--min-steps", "1", "--warmup-steps", "0", "--hidden", "16", "--batch-size", "32",
               "--quiet", "--threads", "1", "--val-split", "random", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["dataset"] == "synth-eurlex4k-train240-test60-labels40-features300" and rec["num_labels"] == 40
