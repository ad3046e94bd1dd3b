"""Plots of one sweep run: time and peak memory against N and against L, log-log, one panel per preset.

    python -m bench.plots bench/results/sweep_cpu_quick.csv [--run RUN_ID] [--outdir DIR]

Lines join the measured points of a provider (forward+backward solid, forward dashed in the time
plots). Memory plots also show refused points as hollow markers at their predicted size, so the
cost of the dense formulations stays visible where they cannot run.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from mlcl_fast.train.files import save_figure  # noqa: E402

from .records import number, read_rows, status_kind  # noqa: E402

PRESET_ORDER = ("reg", "msc", "jaccard", "mulsupcon")
REGIME_MARKERS = {"few": "o", "powerlaw": "s", "bibtex": "^", "delicious": "v"}  # legend in the suptitle


def _colors(providers):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {p: cycle[i % len(cycle)] for i, p in enumerate(sorted(providers))}


def plot_run(csv_path, run_id: str = "latest", outdir=None) -> list[Path]:
    """Write the four PNGs of one run next to the CSV (or in outdir); returns their paths."""
    csv_path = Path(csv_path)
    rows = read_rows(csv_path, run_id)
    if not rows:
        return []
    outdir = Path(outdir) if outdir else csv_path.parent
    outdir.mkdir(parents=True, exist_ok=True)
    colors = _colors({r["provider"] for r in rows})
    stem = csv_path.stem
    written = []
    for axis in ("N", "L"):
        series = [r for r in rows if r["series"] == axis]
        if not any(status_kind(r["status"]) == "ok" for r in series):
            continue  # e.g. a run narrowed to the other series: its points are all timeouts
        for metric in ("time", "memory"):
            path = outdir / f"{stem}_{metric}_vs_{axis}.png"
            _figure(series, axis, metric, colors, path, rows[0])
            written.append(path)
    return written


def _figure(rows, axis, metric, colors, path, first):
    presets = [p for p in PRESET_ORDER if any(r["preset"] == p for r in rows)]
    presets += sorted({r["preset"] for r in rows} - set(presets))
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.8), squeeze=False)
    fixed = "L" if axis == "N" else "N"
    for ax, preset in zip(axes[0], presets):
        sub = [r for r in rows if r["preset"] == preset]
        _panel(ax, sub, axis, metric, colors)
        fixed_values = sorted({r[fixed] for r in sub}, key=float)
        ax.set_title(f"{preset}  ({fixed}={','.join(fixed_values)}, d={sub[0]['d']})", fontsize=9)
        ax.set_xlabel(axis)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = sorted({float(r[axis]) for r in sub})
        ax.set_xticks(xs, [_tick(x) for x in xs], fontsize=7, rotation=45 if len(xs) > 5 else 0)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median time (ms)" if metric == "time" else "peak memory (MB, above inputs)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    markers = "  markers: o few, s power law, ^ bibtex, v delicious" if axis == "L" else ""
    fig.suptitle(f"{metric} vs {axis} — {first['device_name']} ({first['device']}), torch {first['torch']}, "
                 f"{first['threads']} threads, {first['date']}, commit {first['git_commit']}\n{markers.strip()}", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    save_figure(fig, path, dpi=110)  # written whole or not at all
    plt.close(fig)


def _tick(x: float) -> str:
    """1000 -> '1000', 100000 -> '1e5', 30000 -> '3e4', 16384 -> '16384'."""
    short = f"{x:.0e}".replace("e+0", "e").replace("e+", "e")
    return short if x >= 1e4 and float(short) == x else f"{x:.0f}"


def _panel(ax, rows, axis, metric, colors):
    modes = ("full", "fwd") if metric == "time" else ("full",)
    lines = defaultdict(list)   # (provider, mode) -> [(x, y, regime)]
    refused = defaultdict(list)
    for r in rows:
        if r["mode"] not in modes:
            continue
        x = number(r, axis)
        if status_kind(r["status"]) == "ok":
            y = number(r, "median_ms" if metric == "time" else "peak_MB")
            if y is not None and y > 0:
                lines[(r["provider"], r["mode"])].append((x, y, r["regime"]))
        elif metric == "memory" and r["status"].startswith("oom (predicted") and number(r, "pred_MB"):
            refused[r["provider"]].append((x, number(r, "pred_MB")))
    for (provider, mode), pts in sorted(lines.items()):
        pts.sort()
        style = "-" if mode == "full" else "--"
        label = provider if mode == "full" else f"{provider} (fwd)"
        # along L the regimes differ from point to point: the marker says which
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[provider], label=label,
                linewidth=1.5 if mode == "full" else 1.0)
        for x, y, regime in pts:
            ax.plot([x], [y], REGIME_MARKERS.get(regime, "o"), color=colors[provider], markersize=4)
    for provider, pts in refused.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", markerfacecolor="none", color=colors[provider],
                markersize=6, label=f"{provider}: refused, predicted")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--run", default="latest", help="run_id to plot (default: the last run in the file)")
    ap.add_argument("--outdir", type=Path)
    args = ap.parse_args(argv)
    for path in plot_run(args.csv, args.run, args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def plot_targets(csv_path, out_png=None) -> Path | None:
    """One PNG of a bench.gpu_targets CSV: forward + backward time (log) and the share of the
    valid-anchor 4-GEMM limit of each provider at the T1 and T2 points (default settings only),
    grouped by point. Returns its path (None without such rows)."""
    import csv

    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["target"] in ("T1", "T2") and r["grad"] == "default"
                and not r.get("tile") and number(r, "median_ms") is not None]
    if not rows:
        return None
    points = sorted({(int(r["L"]), r["regime"]) for r in rows})
    providers = sorted({r["provider"] for r in rows})
    colors = _colors(providers)
    width = 0.8 / len(providers)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, name in enumerate(providers):
        by_point = {(int(r["L"]), r["regime"]): r for r in rows if r["provider"] == name}
        xs = [i + k * width for i, p in enumerate(points) if p in by_point]
        for ax, field in zip(axes, ("median_ms", "limit_share")):
            ys = [number(by_point[p], field) * (100 if field == "limit_share" else 1) for p in points if p in by_point]
            ax.bar(xs, ys, width, label=name, color=colors[name])
    labels = [f"L={L:,}\n{regime}" for L, regime in points]
    for ax, title in zip(axes, ("forward + backward, ms (log)", "share of the 4-GEMM limit, %")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(points))], labels, fontsize=8)
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{csv_path.name}: reg, bf16, N = 16384, d = 256")
    fig.tight_layout()
    out = Path(out_png) if out_png else csv_path.with_suffix(".png")
    save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out

