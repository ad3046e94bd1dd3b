"""Python API behind `mlcl-fast train` / `run`: one dataset, one method, results written to a folder."""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch

from .data import Dataset, load_dataset, prepare_split
from .files import ensure_output_folder, torch_save, write_json
from .metrics import PROPENSITY_A, PROPENSITY_B
from .plots import training_curves
from .protocols import RunResult, TrainConfig, run


def config_from(**options) -> TrainConfig:
    """A TrainConfig from keyword options; unknown names are an error naming them."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown training option; known: {sorted(names)}")
    return TrainConfig(**options).check()


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on CPU: seeds torch and asks for deterministic kernels."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def progress_bar(quiet: bool, desc: str):
    """A tqdm bar on a terminal; None (no bar) when quiet or when stderr is not a TTY."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=1, desc=desc, leave=False, dynamic_ncols=True)


def train(dataset: "str | Dataset" = "emotions", *, out: Optional[str] = None, data_dir: Optional[str] = None,
          test_file: Optional[str] = None, labels: Optional[str] = None, test_size: float = 0.25,
          val_fraction: float = 0.15, max_train: Optional[int] = None, val_split: str = "auto",
          propensity_a: float = PROPENSITY_A, propensity_b: float = PROPENSITY_B, quiet: bool = True,
          plot: bool = True, **options) -> RunResult:
    """Train one method (options: TrainConfig fields, e.g. loss="reg", protocol="probe", epochs=30)
    and evaluate it on the test split. With `out`, writes metrics.json, model.pt and curves.png.

    `val_split`: how the validation part is drawn (data.prepare_split: auto, stratified, random).
    Test and validation metrics include the propensity-scored ranking metrics (psp@k, psndcg@k),
    with propensities from the labels of the training file (validation rows included) and Jain et
    al.'s constants A, B (`propensity_a`, `propensity_b`; metrics.py lists the published
    per-dataset values)."""
    cfg = config_from(**options)
    if out is not None:
        ensure_output_folder(out)
    seed_everything(cfg.seed)
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(
        dataset, data_dir, test_file=test_file, labels=labels, test_size=test_size, seed=cfg.seed)
    split = prepare_split(ds, val_fraction, cfg.seed, max_train, val_split=val_split,
                          propensity=(propensity_a, propensity_b))
    bar = progress_bar(quiet, f"{ds.name} {cfg.method}")
    try:
        result = run(split, cfg, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    extra = {"val_split": split.val_split}
    if split.inv_propensity is not None:
        extra["propensity"] = {"A": propensity_a, "B": propensity_b, "train_rows": ds.Y_train.shape[0]}
    if out is not None:
        save(result, Path(out), ds, split_sizes=(split.Y_train.shape[0], split.Y_val.shape[0], split.Y_test.shape[0]),
             plot=plot, extra=extra)
    return result


def save(result: RunResult, out: Path, ds: Dataset, split_sizes=None, plot: bool = True,
         extra: Optional[dict] = None) -> dict:
    """Write metrics.json (plus model.pt and curves.png); `extra` adds top-level keys to the record."""
    out.mkdir(parents=True, exist_ok=True)
    record = result.to_json()
    record["dataset"] = ds.name
    record["num_labels"] = ds.num_labels
    if split_sizes:
        record["n_train"], record["n_val"], record["n_test"] = split_sizes
    record.update(extra or {})
    write_json(out / "metrics.json", record)
    if result.parts is not None:
        torch_save({"config": result.config, "state_dict": result.parts.state_dict(),
                    "thresholds": result.thresholds, "num_features": ds.num_features,
                    "label_names": ds.label_names}, out / "model.pt")
    if plot:
        training_curves(record["stages"], out / "curves.png", f"{ds.name}: {record['method']}")
    return record
