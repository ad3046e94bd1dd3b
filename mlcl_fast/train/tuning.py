"""Per-method hyper-parameter selection on validation (`mlcl-fast study --tune`).

For every (dataset, method), each candidate of the method's grid trains once with seed 0; the
candidate with the best validation Macro-F1 at tuned thresholds (ties: validation mAP) is the
method's setting for every seed of the study. Test metrics play no part in the choice.

Layout under the study's output folder:
  tuning/<dataset>/<method>/<candidate>.json   one trained candidate (skipped when present)
  tuning/choices.json                          the chosen options per dataset and method
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Sequence

from .files import dataset_key, load_json_object, load_record, read_cached, write_json
from .protocols import BASELINES

# What each protocol family searches. Every stage trained with BCE gets the same learning rates
# as the BCE baseline (lr, or finetune_lr after pre-training), so no method is compared at a
# fixed rate against a tuned one. Fine-tuning shares its pre-trainings (lr 1e-3, each temperature)
# with the probe's candidates through the pre-training cache. The baselines (bce, zlpr, asl), end to
# end or probed, search the learning rate of their end-to-end stage.
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
GRIDS: dict[str, dict[str, tuple]] = {
    "end2end": {"lr": LEARNING_RATES},
    "probe": {"lr": LEARNING_RATES, "temperature": (0.05, 0.1, 0.3)},
    "finetune": {"finetune_lr": LEARNING_RATES, "temperature": (0.05, 0.1, 0.3)},
    "joint": {"lr": LEARNING_RATES, "joint_lambda": (0.03, 0.1, 0.3)},
}


def grid_for(loss: str, protocol: str) -> dict[str, tuple]:
    return GRIDS["end2end" if loss in BASELINES else protocol]


def candidates(loss: str, protocol: str) -> list[dict]:
    grid = grid_for(loss, protocol)
    names = sorted(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def candidate_key(options: dict) -> str:
    return "_".join(f"{k}={options[k]:g}" for k in sorted(options))


def score(record: dict) -> tuple:
    """Validation only: Macro-F1 at tuned thresholds, then mAP."""
    return record["val"]["macro_f1_tuned"], record["val"]["map"]


def candidate_path(out: Path, dataset: str, method: str, options: dict) -> Path:
    return Path(out) / "tuning" / dataset_key(dataset) / method.replace("/", "__") / f"{candidate_key(options)}.json"


def tune_method(out: Path, dataset: str, method: str, loss: str, protocol: str,
                train_candidate: Callable[[dict], dict]) -> dict:
    """Train (or read back) every candidate of one (dataset, method) and return the chosen options.
    `train_candidate(options)` trains seed 0 with those options and returns its record."""
    best, best_score = None, None
    for options in candidates(loss, protocol):
        path = candidate_path(out, dataset, method, options)
        record = read_cached(path, load_record, "tuning candidate")
        if record is None:
            record = train_candidate(options)
            write_json(path, record)
        s = score(record)
        if best_score is None or s > best_score:
            best, best_score = options, s
    return best


def read_choices(out: Path) -> dict:
    """The choices made so far; a damaged choices.json is chosen again (from the kept candidates)."""
    return read_cached(Path(out) / "tuning" / "choices.json", load_json_object, "tuning choices") or {}


def write_choices(out: Path, choices: dict) -> None:
    write_json(out / "tuning" / "choices.json", choices)


def choices_table(choices: dict, datasets: Sequence[str], methods: Sequence[str]) -> str:
    """Markdown: the chosen options of every method on every dataset."""
    shown = [d for d in datasets if d in choices]
    lines = ["| method | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for method in methods:
        cells = []
        for d in shown:
            opts = choices[d].get(method)
            cells.append("—" if opts is None else ", ".join(f"{_short(k)} {v:g}" for k, v in sorted(opts.items())))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _short(name: str) -> str:
    return {"temperature": "τ", "joint_lambda": "λ", "finetune_lr": "ft lr"}.get(name, name)
