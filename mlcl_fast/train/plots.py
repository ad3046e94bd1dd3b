"""Figures: training curves of one run, and Macro-F1 against the number of labels across datasets."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def training_curves(stages: list[dict], path: Path, title: str = "") -> Path:
    """One panel per stage: training loss and the validation score it early-stops on."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages):
        epochs = range(1, len(st["train_loss"]) + 1)
        ax.plot(epochs, st["train_loss"], color="tab:blue", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss", color="tab:blue")
        ax2 = ax.twinx()
        what = "−val loss (best per label)" if st["name"].endswith("probe") else "−val loss"
        ax2.plot(epochs, st["val_score"], color="tab:orange", label=what)
        ax2.set_ylabel(what, color="tab:orange")
        if st.get("best_epoch"):
            ax.axvline(st["best_epoch"], color="grey", ls=":", lw=1)
        ax.set_title(st["name"])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def f1_vs_labels(summary: list[dict], path: Path, metric: str = "macro_f1", label: str = "Macro-F1") -> Path:
    """summary rows: {dataset, num_labels, method, <metric>_mean, <metric>_std}. One line per method,
    datasets ordered by their number of labels (log axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = sorted({r["method"] for r in summary}, key=lambda m: (m not in ("bce", "zlpr"), m))
    for m in methods:
        pts = sorted((r["num_labels"], r[f"{metric}_mean"], r[f"{metric}_std"], r["dataset"])
                     for r in summary if r["method"] == m and r.get(f"{metric}_mean") is not None)
        if not pts:
            continue
        xs, ys, es = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        style = dict(lw=2.2, color="black" if m == "bce" else ("dimgrey" if m == "zlpr" else None),
                     ls="-" if m in ("bce", "zlpr") else "--")
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=m, **style)
    names = sorted({(r["num_labels"], r["dataset"]) for r in summary})
    ax.set_xscale("log")
    ax.set_xticks([n for n, _ in names])
    ax.set_xticklabels([f"{d}\n({n})" for n, d in names], fontsize=7, rotation=30)
    ax.minorticks_off()
    ax.set_xlabel("dataset (number of labels)")
    ax.set_ylabel(f"test {label} (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
