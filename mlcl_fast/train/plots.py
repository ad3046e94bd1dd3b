"""Figures: training curves of one run, and Macro-F1 against the number of labels across datasets."""
from __future__ import annotations

from pathlib import Path

from .files import save_figure

# the end-to-end baselines (protocols.BASELINES), drawn as solid lines in every panel
BASELINE_COLOURS = {"bce": "black", "zlpr": "grey", "asl": "tab:brown"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def training_curves(stages: list[dict], path: Path, title: str = "") -> Path:
    """One panel per stage: training loss and the validation score it early-stops on."""
    plt = _pyplot()
    cols = min(3, len(stages))
    rows = -(-len(stages) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.set_visible(False)
    for ax, st in zip(axes.flat, stages):
        epochs = range(1, len(st["train_loss"]) + 1)
        ax.plot(epochs, st["train_loss"], color="tab:blue", label="train loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss", color="tab:blue")
        ax2 = ax.twinx()
        what = ("−val contrastive loss" if st["name"].endswith("pretrain") else
                "−val BCE (best per label)" if st["name"].endswith("probe") else "val macro AP")
        ax2.plot(epochs, st["val_score"], color="tab:orange", label=what)
        ax2.set_ylabel(what, color="tab:orange")
        if st.get("best_epoch"):
            ax.axvline(st["best_epoch"], color="grey", ls=":", lw=1)
        ax.set_title(st["name"])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def f1_vs_labels(summary: list[dict], path: Path, metric: str = "macro_f1", label: str = "Macro-F1") -> Path:
    """summary rows: {dataset, num_labels, method, <metric>_mean, <metric>_std}. One panel per
    protocol (probe, finetune, joint), one line per loss, the baselines bce, zlpr, asl in every panel; datasets
    evenly spaced in order of their number of labels."""
    plt = _pyplot()
    names = sorted({(r["num_labels"], r["dataset"]) for r in summary})
    xpos = {d: i for i, (_, d) in enumerate(names)}
    protocols = [p for p in ("probe", "finetune", "joint") if any(r["method"].endswith("/" + p) for r in summary)]
    protocols = protocols or ["baselines"]
    losses = sorted({r["method"].split("/")[0] for r in summary if "/" in r["method"]})
    colours = {loss: plt.get_cmap("tab10")(i % 10) for i, loss in enumerate(losses)}
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.6 * len(protocols), 4.2), sharey=True, squeeze=False)
    for ax, proto in zip(axes[0], protocols):
        methods = list(BASELINE_COLOURS) + [f"{loss}/{proto}" for loss in losses]
        for m in methods:
            pts = sorted((xpos[r["dataset"]], r[f"{metric}_mean"], r[f"{metric}_std"] or 0.0)
                         for r in summary if r["method"] == m and r.get(f"{metric}_mean") is not None)
            if not pts:
                continue
            base, loss = m in BASELINE_COLOURS, m.split("/")[0]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=3,
                        capsize=2, label=m if loss in BASELINE_COLOURS else loss, lw=2.4 if base else 1.3,
                        ls="-" if base else "--", color=BASELINE_COLOURS.get(m, colours.get(loss)))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([f"{d}\n({n})" for n, d in names], fontsize=7, rotation=35)
        ax.set_title(f"protocol: {proto}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test {label}, mean ± std")
    axes[0][0].legend(fontsize=7, loc="best")  # the probe panel has every loss
    fig.supxlabel("dataset (number of labels), ordered by number of labels", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
