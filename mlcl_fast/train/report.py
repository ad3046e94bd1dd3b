"""Plain-text / Markdown tables of metrics, single runs and mean ± std over seeds."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from .metrics import METRIC_LABELS

TABLE_METRICS = ("micro_f1", "macro_f1", "macro_f1_tuned", "hamming", "map", "p@1", "p@3", "p@5")
# Label spaces from this size on are read as extreme classification does: ranking metrics first
# (with thousands of rare labels, Macro-F1 at threshold 0.5 and the Hamming loss are close to 0 for
# every method and say little), propensity-scored ones for the tail.
XMC_LABELS = 1000
XMC_TABLE_METRICS = ("p@1", "p@3", "p@5", "ndcg@5", "psp@1", "psp@5", "map", "micro_f1", "macro_f1_tuned")


def table_metrics(num_labels: int) -> tuple[tuple[str, ...], str]:
    """(the metrics of a results table, the headline one that names the best run)."""
    return (XMC_TABLE_METRICS, "p@1") if num_labels >= XMC_LABELS else (TABLE_METRICS, "macro_f1")


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


def training_log(record: dict) -> str:
    """The training log of one run (RunResult.to_json()): per stage its epochs, optimiser steps,
    mean ms per step and the process's peak resident memory at its end; then the evaluation."""
    lines = []
    for st in record["stages"]:
        cuda = "" if st.get("peak_cuda_mb") is None else f", peak CUDA {st['peak_cuda_mb']:.0f} MB"
        lines.append(f"{record['method']} {st['name']}: {len(st['train_loss'])} epochs, {st.get('steps', 0)} steps, "
                     f"{fmt_number(st.get('ms_per_step'))} ms/step, {st['seconds']:.1f} s, "
                     f"peak RSS {fmt_number(st.get('peak_rss_mb'), 0)} MB{cuda}")
    res = record.get("resources") or {}
    if res:
        cuda = "" if res.get("peak_cuda_mb") is None else f", peak CUDA {res['peak_cuda_mb']:.0f} MB"
        lines.append(f"{record['method']} evaluation: {fmt_number(res.get('eval_seconds'))} s; "
                     f"peak RSS {fmt_number(res.get('peak_rss_mb'), 0)} MB{cuda}")
    return "\n".join(lines)


def fmt_number(value, decimals: int = 1) -> str:
    return "—" if value is None else f"{value:.{decimals}f}"
