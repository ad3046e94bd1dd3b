"""The study: a grid of datasets × methods × seeds, written incrementally and resumable.

Layout of the output folder (<dataset>: the name as given, or for a path or a synth: spec the
name with '/', '?', '&', ':' ... replaced by '_', files.dataset_key):
  runs/<dataset>/<method>/seed<k>.json   one finished cell (skipped when present)
  cache/<dataset>/<preset>/seed<k>.pt    a contrastive pre-training, shared by probe and finetune
  results.csv                            every finished cell, one row each
  summary.csv, summary.json, summary.md  mean ± std over seeds per (dataset, method)
  macro_f1_vs_labels.png, curves_<dataset>.png
Every file is written atomically (files.py); a damaged cell or cache file is named in a warning
and computed again.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import tuning
from .api import config_from, progress_bar, seed_everything
from .data import load_dataset, prepare_split
from .files import (atomic_open, dataset_key, ensure_output_folder, load_record, read_cached, torch_save, write_json,
                    write_text)
from .metrics import METRIC_LABELS
from .models import Backbone
from .plots import f1_vs_labels, training_curves
from .protocols import BASELINES, StageLog, TrainConfig, pretrain, run
from .report import TABLE_METRICS, XMC_LABELS, XMC_TABLE_METRICS, fmt, fmt_number, markdown_table

STUDY_DATASETS = ("emotions", "scene", "yeast", "medical", "genbase", "bibtex", "tmc2007_500", "delicious")
STUDY_PRESETS = ("reg", "reg_noreg", "msc", "mulsupcon", "jaccard", "supcon_any")
STUDY_METHODS = ("bce", "zlpr", "bce/probe") + tuple(f"{p}/{proto}" for p in STUDY_PRESETS for proto in ("probe", "finetune")) \
    + ("reg/joint", "supcon_any/joint")
# training rows kept for the two large sets, so that the grid fits its compute budget
STUDY_MAX_TRAIN = {"tmc2007_500": 3000, "delicious": 3000}


def parse_method(method: str) -> tuple[str, str]:
    if method in BASELINES:
        return method, "end2end"
    loss, _, protocol = method.partition("/")
    if not protocol:
        raise ValueError(f"methods: {method!r} needs a protocol, e.g. {method}/probe (or use {' / '.join(BASELINES)})")
    return loss, protocol


def cell_path(out: Path, dataset: str, method: str, seed: int) -> Path:
    return out / "runs" / dataset_key(dataset) / method.replace("/", "__") / f"seed{seed}.json"


def run_study(out: str, datasets: Sequence[str] = STUDY_DATASETS, methods: Sequence[str] = STUDY_METHODS,
              seeds: Sequence[int] = (0, 1, 2), data_dir: Optional[str] = None,
              max_train: Optional[dict] = None, val_fraction: float = 0.15, quiet: bool = True,
              tune: bool = False, log=print, **options) -> list[dict]:
    """Run every missing cell (seed-major, so that every dataset gets a first seed early), then
    rewrite the summary tables and plots from all finished cells. With `tune`, every (dataset,
    method) first chooses its options on validation (tuning.py) and all its seeds use them."""
    out = ensure_output_folder(out)
    max_train = STUDY_MAX_TRAIN if max_train is None else max_train
    specs = [parse_method(m) for m in methods]
    for loss, protocol in specs:
        config_from(loss=loss, protocol=protocol, **options)  # fail before any training
    loaded = {}

    def split_for(name, seed):
        if name not in loaded:
            loaded[name] = load_dataset(name, data_dir)
        seed_everything(seed)
        # random validation splits: the study's cells, caches and tuning choices (and docs/STUDY.md)
        # were made with them and do not record the split, so a stratified study would mix the two
        return prepare_split(loaded[name], val_fraction, seed, max_train.get(name), val_split="random")

    choices = _tune(out, datasets, methods, split_for, quiet, log, options) if tune else {}
    for seed in seeds:
        for name in datasets:
            todo = [m for m in methods if _read_cell(cell_path(out, name, m, seed)) is None]
            if not todo:
                continue
            split = split_for(name, seed)
            for method in todo:
                chosen = choices.get(name, {}).get(method, {})
                reuse = tuning.candidate_path(out, name, method, chosen) if tune and seed == 0 else None
                record = read_cached(reuse, load_record, "tuning candidate") if reuse is not None else None
                if record is None:  # else the chosen candidate is this very cell
                    record = _train_cell(out, name, split, method, seed, {**options, **chosen}, quiet)
                write_json(cell_path(out, name, method, seed), record)
                log(f"{time.strftime('%H:%M:%S')} {name:12s} {method:22s} seed {seed}: Macro-F1 {record['test']['macro_f1']:.3f} "
                    f"(tuned {record['test']['macro_f1_tuned']:.3f}), mAP {record['test']['map']:.3f}, "
                    f"P@1 {record['test']['p@1']:.3f}, {record['wall_s']:.1f}s, {_step_times(record)}, "
                    f"peak RSS {fmt_number((record.get('resources') or {}).get('peak_rss_mb'), 0)} MB")
        summarise(out, datasets, methods, seeds)
    return summarise(out, datasets, methods, seeds)


def _choices_markdown(out: Path, datasets: Sequence[str], methods: Sequence[str]) -> str:
    """The options a tuned study chose (empty for an untuned one); also written to tuning/choices.md."""
    choices = tuning.read_choices(out)
    if not choices:
        return ""
    table = tuning.choices_table(choices, datasets, methods)
    write_text(out / "tuning" / "choices.md", table + "\n")
    return "\n\n## Options chosen on validation\n\n" + table


def _tune(out: Path, datasets, methods, split_for, quiet: bool, log, options: dict) -> dict:
    choices = tuning.read_choices(out)
    for name in datasets:
        todo = [m for m in methods if m not in choices.get(name, {})]
        if not todo:
            continue
        split = split_for(name, 0)
        for method in todo:
            loss, protocol = parse_method(method)

            def train_candidate(opts, method=method):
                return _train_cell(out, name, split, method, 0, {**options, **opts}, quiet)

            chosen = tuning.tune_method(out, name, method, loss, protocol, train_candidate)
            choices.setdefault(name, {})[method] = chosen
            tuning.write_choices(out, choices)
            log(f"{time.strftime('%H:%M:%S')} {name:12s} {method:22s} tuned: {tuning.candidate_key(chosen)}")
    return choices


def _train_cell(out: Path, name: str, split, method: str, seed: int, options: dict, quiet: bool) -> dict:
    loss, protocol = parse_method(method)
    cfg = config_from(loss=loss, protocol=protocol, seed=seed, **options)
    t0 = time.perf_counter()
    bar = progress_bar(quiet, f"{name} {method} s{seed}")
    try:
        pre = _cached_pretraining(out, name, split, cfg, bar) if protocol in ("probe", "finetune") \
            and loss not in BASELINES else None
        result = run(split, cfg, pretrained=pre, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    record = result.to_json()
    record.update(dataset=name, num_labels=split.num_labels, seed=seed, wall_s=time.perf_counter() - t0,
                  n_train=split.Y_train.shape[0], n_val=split.Y_val.shape[0], n_test=split.Y_test.shape[0])
    return record


# Options that change a contrastive pre-training; the cache keys on those that differ from the
# defaults, so that a study with other options (or a tuning candidate) never reuses another's.
PRETRAIN_FIELDS = ("epochs", "patience", "min_steps", "batch_size", "lr", "weight_decay", "hidden", "layers",
                   "dropout", "proj_dim", "temperature", "views", "queue", "momentum", "aug_drop", "aug_noise",
                   "device")


def _pretraining_key(cfg: TrainConfig) -> str:
    default = TrainConfig(loss=cfg.loss)
    changed = [(f, getattr(cfg, f)) for f in PRETRAIN_FIELDS if getattr(cfg, f) != getattr(default, f)]
    return "_".join(f"{f}={v}" for f, v in changed) or "default"


def pretraining_path(out: Path, dataset: str, cfg: TrainConfig) -> Path:
    key = _pretraining_key(cfg)
    folder = Path(out) / "cache" / dataset_key(dataset) / cfg.loss
    return folder / f"seed{cfg.seed}.pt" if key == "default" else folder / key / f"seed{cfg.seed}.pt"


def _cached_pretraining(out: Path, dataset: str, split, cfg: TrainConfig, bar):
    """The cached pre-training of these options, else (absent or damaged) a new one, cached."""
    path = pretraining_path(out, dataset, cfg)

    def load(p):
        blob = torch.load(p, weights_only=True)
        backbone = Backbone(split.num_features, cfg.hidden, cfg.layers, cfg.dropout)
        backbone.load_state_dict(blob["backbone"])  # strict: a mismatched file is an error too
        return backbone, StageLog(**blob["log"])

    cached = read_cached(path, load, "pre-training cache")
    if cached is not None:
        return cached
    backbone, log = pretrain(split, cfg, bar)
    torch_save({"backbone": backbone.state_dict(), "log": log.__dict__}, path)
    return backbone, log


def against_baseline_markdown(summary: list[dict], datasets: Sequence[str], methods: Sequence[str], metric: str,
                              baseline: str = "bce") -> str:
    """One row per method: mean difference of `metric` to `baseline` over the datasets both
    finished, on how many it is above, and on how many the difference exceeds the sum of the two
    seed stds (either way)."""
    by = {(r["dataset"], r["method"]): r for r in summary}
    rows = []
    for method in methods:
        if method == baseline:
            continue
        diffs, clear_up, clear_down = [], 0, 0
        for d in datasets:
            a, b = by.get((d, method)), by.get((d, baseline))
            if not a or not b or a[f"{metric}_mean"] is None or b[f"{metric}_mean"] is None:
                continue
            diff = a[f"{metric}_mean"] - b[f"{metric}_mean"]
            noise = (a[f"{metric}_std"] or 0.0) + (b[f"{metric}_std"] or 0.0)
            diffs.append(diff)
            clear_up += diff > noise
            clear_down += -diff > noise
        if diffs:
            above = sum(x > 0 for x in diffs)
            rows.append([method, f"{np.mean(diffs):+.4f}", f"{above}/{len(diffs)}", str(clear_up), str(clear_down)])
    header = ["method", f"mean difference to {baseline.upper()}", f"datasets above {baseline.upper()}",
              "clearly above (by more than the two stds)", "clearly below"]
    return markdown_table(header, rows)


def _read_cell(path: Path) -> Optional[dict]:
    return read_cached(path, load_record, "study cell")


def load_cells(out: Path) -> list[dict]:
    """Every readable finished cell (a damaged one is named in a warning and left out)."""
    cells = (_read_cell(p) for p in sorted((out / "runs").glob("*/*/seed*.json")))
    return [c for c in cells if c is not None]


def summarise(out, datasets: Sequence[str] = (), methods: Sequence[str] = (), seeds: Sequence[int] = ()) -> list[dict]:
    """Aggregate every finished cell into summary.{csv,json,md} and the plots."""
    out = Path(out)
    cells = load_cells(out)
    if not cells:
        return []
    _write_csv(out / "results.csv", [_flat(c) for c in cells])
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault((c["dataset"], c["method"]), []).append(c)
    summary = []
    for (dataset, method), cs in groups.items():
        row = {"dataset": dataset, "method": method, "num_labels": cs[0]["num_labels"], "seeds": len(cs),
               "n_train": cs[0].get("n_train"), "seconds_mean": float(np.mean([c["wall_s"] for c in cs]))}
        peaks = [(c.get("resources") or {}).get("peak_rss_mb") for c in cs]
        row["peak_rss_mb_max"] = max((p for p in peaks if p is not None), default=None)
        for m in dict.fromkeys(TABLE_METRICS + XMC_TABLE_METRICS + ("micro_f1_tuned", "hamming_tuned")):
            vals = [c["test"][m] for c in cs if c["test"].get(m) is not None and not math.isnan(c["test"][m])]
            row[f"{m}_mean"] = float(np.mean(vals)) if vals else None
            row[f"{m}_std"] = float(np.std(vals)) if vals else None
        summary.append(row)
    all_datasets = list(datasets) + sorted({r["dataset"] for r in summary} - set(datasets))
    all_methods = list(methods) + sorted({r["method"] for r in summary} - set(methods))
    summary.sort(key=lambda r: (all_datasets.index(r["dataset"]), all_methods.index(r["method"])))
    _write_csv(out / "summary.csv", summary)
    write_json(out / "summary.json", summary)
    n_seeds = len(seeds) or None
    write_text(
        out / "summary.md",
        "## Each method against BCE\n\nTest Macro-F1 with tuned thresholds:\n\n"
        + against_baseline_markdown(summary, all_datasets, all_methods, "macro_f1_tuned")
        + "\n\nTest Macro-F1 at threshold 0.5:\n\n"
        + against_baseline_markdown(summary, all_datasets, all_methods, "macro_f1")
        + "\n\n## Macro-F1 at threshold 0.5\n\n" + overview_markdown(summary, all_datasets, all_methods, "macro_f1", n_seeds)
        + "\n\n## Macro-F1 with per-label thresholds tuned on validation\n\n"
        + overview_markdown(summary, all_datasets, all_methods, "macro_f1_tuned", n_seeds)
        + "\n\n## Micro-F1 at threshold 0.5\n\n" + overview_markdown(summary, all_datasets, all_methods, "micro_f1", n_seeds)
        + "\n\n## macro mAP\n\n" + overview_markdown(summary, all_datasets, all_methods, "map", n_seeds)
        + _ranking_markdown(summary, all_datasets, all_methods, n_seeds)
        + "\n\n## Per dataset\n\n" + summary_markdown(summary, all_datasets, all_methods, n_seeds)
        + _choices_markdown(out, all_datasets, all_methods))
    f1_vs_labels(summary, out / "macro_f1_vs_labels.png")
    f1_vs_labels(summary, out / "macro_f1_tuned_vs_labels.png", "macro_f1_tuned", "Macro-F1, tuned thresholds")
    for dataset in {c["dataset"] for c in cells}:
        shown = [c for c in cells if c["dataset"] == dataset and c["seed"] == min(x["seed"] for x in cells)
                 and c["method"] in ("bce", "reg/probe", "reg/finetune", "reg/joint")]
        shown.sort(key=lambda c: ("bce", "reg/finetune", "reg/probe", "reg/joint").index(c["method"]))
        stages = [dict(s, name=f"{c['method']}: {s['name']}") for c in shown for s in c["stages"]
                  if not (c["method"] == "reg/probe" and s["name"] == "pretrain")]  # shared with reg/finetune
        if stages:
            training_curves(stages, out / f"curves_{dataset_key(dataset)}.png", f"{dataset}, seed {shown[0]['seed']}")
    return summary


def _ranking_markdown(summary: list[dict], datasets, methods, n_seeds: Optional[int]) -> str:
    """Extreme classification's ranking metrics, for the datasets with at least XMC_LABELS labels
    (report.table_metrics says why): empty when there are none."""
    xmc = [d for d in datasets if any(r["dataset"] == d and r["num_labels"] >= XMC_LABELS for r in summary)]
    if not xmc:
        return ""
    return "".join(f"\n\n## {METRIC_LABELS[m]} (data sets with {XMC_LABELS:,}+ labels)\n\n"
                   + overview_markdown(summary, xmc, methods, m, n_seeds)
                   for m in ("p@1", "p@5", "ndcg@5", "psp@1", "psp@5"))


def overview_markdown(summary: list[dict], datasets, methods, metric: str, n_seeds: Optional[int]) -> str:
    """Methods × datasets for one metric (mean ± std over seeds); the best mean per dataset in bold,
    '(k seeds)' where fewer seeds than planned finished, 'missing' where none did."""
    by = {(r["dataset"], r["method"]): r for r in summary}
    lower_better = metric.startswith("hamming")
    header = ["method"] + [f"{d} ({next((r['num_labels'] for r in summary if r['dataset'] == d), '?')})"
                           for d in datasets]
    best = {}
    for d in datasets:
        vals = [by[(d, m)][f"{metric}_mean"] for m in methods if (d, m) in by and by[(d, m)][f"{metric}_mean"] is not None]
        if vals:
            best[d] = min(vals) if lower_better else max(vals)
    rows = []
    for m in methods:
        row = [m]
        for d in datasets:
            r = by.get((d, m))
            if r is None or r[f"{metric}_mean"] is None:
                row.append("missing")
                continue
            cell = fmt(r[f"{metric}_mean"], r[f"{metric}_std"] if r["seeds"] > 1 else None)
            if abs(r[f"{metric}_mean"] - best[d]) < 5e-4:
                cell = f"**{cell}**"
            if n_seeds is not None and r["seeds"] < n_seeds:
                cell += f" ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
            row.append(cell)
        rows.append(row)
    return markdown_table(header, rows)


def summary_markdown(summary: list[dict], datasets, methods, n_seeds: Optional[int]) -> str:
    """Per dataset, one table: methods × headline metrics (mean ± std); the best mean in bold;
    a method without finished cells is listed as missing."""
    by = {(r["dataset"], r["method"]): r for r in summary}
    metrics = ("micro_f1", "macro_f1", "macro_f1_tuned", "hamming", "map", "p@1")
    parts = []
    for d in datasets:
        rows = [by.get((d, m)) for m in methods]
        if not any(rows):
            parts.append(f"### {d}\n\nnot run yet (missing)\n")
            continue
        first = next(r for r in rows if r)
        best = {}
        for m in metrics:
            vals = [r[f"{m}_mean"] for r in rows if r and r[f"{m}_mean"] is not None]
            if vals:
                best[m] = min(vals) if m == "hamming" else max(vals)
        table = []
        for method, r in zip(methods, rows):
            if r is None:
                table.append([method] + ["missing"] * len(metrics) + ["0", "—"])
                continue
            cells = []
            for m in metrics:
                s = fmt(r[f"{m}_mean"], r[f"{m}_std"] if r["seeds"] > 1 else None)
                cells.append(f"**{s}**" if r[f"{m}_mean"] is not None and abs(r[f"{m}_mean"] - best[m]) < 5e-4 else s)
            seeds = str(r["seeds"]) + ("" if n_seeds is None or r["seeds"] >= n_seeds else f" of {n_seeds}")
            table.append([method] + cells + [seeds, f"{r['seconds_mean']:.0f}"])
        header = ["method"] + [METRIC_LABELS[m] for m in metrics] + ["seeds", "s/run"]
        parts.append(f"### {d} ({first['num_labels']} labels, {first['n_train']} training rows)\n\n"
                     + markdown_table(header, table) + "\n")
    return "\n".join(parts)


def _step_times(cell: dict) -> str:
    """ms per optimiser step of each stage, e.g. "pretrain 41.2 + probe 8.0 ms/step"."""
    return " + ".join(f"{s['name']} {fmt_number(s.get('ms_per_step'))}" for s in cell["stages"]) + " ms/step"


def _flat(cell: dict) -> dict:
    row = {k: cell[k] for k in ("dataset", "method", "seed", "num_labels", "n_train", "n_val", "n_test", "wall_s",
                                "backend")}
    row.update({f"test_{k}": v for k, v in cell["test"].items()})
    row.update({f"val_{k}": v for k, v in cell["val"].items()})
    row["epochs"] = "+".join(str(len(s["train_loss"])) for s in cell["stages"])
    # cells written before step times and memory were recorded leave these empty
    row["ms_per_step"] = "+".join(fmt_number(s.get("ms_per_step")) for s in cell["stages"])
    row["peak_rss_mb"] = (cell.get("resources") or {}).get("peak_rss_mb")
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
