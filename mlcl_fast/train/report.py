"""Plain-text / Markdown tables of metrics, single runs and mean ± std over seeds."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from .metrics import METRIC_LABELS

TABLE_METRICS = ("micro_f1", "macro_f1", "macro_f1_tuned", "hamming", "map", "p@1", "p@3", "p@5")


def fmt(value, std=None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3f}" if std is None else f"{value:.3f} ± {std:.3f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def metrics_table(results: list[dict], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """One row per run: method, then test metrics (the JSON dicts of RunResult.to_json())."""
    header = ["method"] + [METRIC_LABELS[m] for m in metrics] + ["seconds"]
    rows = [[r["method"]] + [fmt(r["test"].get(m)) for m in metrics] + [f"{r['seconds']:.1f}"] for r in results]
    return markdown_table(header, rows)
