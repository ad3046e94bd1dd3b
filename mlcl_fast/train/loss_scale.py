"""The loss alone at a large label space: the second table of the main job (`mlcl-fast run`).

One forward + backward of the loss (preset reg: the label prototypes are anchors and columns
beside the samples) on a batch of `batch` samples x `views` views, d features, about `per_sample`
power-law labels per sample out of L, the prototypes learnable: time (median of a few calls after
a warm-up) and peak memory above what the process held before the call. It is measured for the
fused backend that `auto` picks and for the reference (readable PyTorch, dense |A| x |C|
matrices) at each L where the reference's predicted need (mlcl_fast.memory.reference_bytes) fits
in the memory available; where it does not, that prediction is printed instead and the call is
not made. At the small L both are measured, so the prediction can be read beside a measurement.

CPU memory is the resident set's peak (Linux; "not measured" elsewhere), with glibc told to
return freed blocks at once during the memory pass, so memory allocated and freed inside the call
counts; CUDA memory is the allocator's peak.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .. import memory
from ..loss import multilabel_contrastive_loss
from ..presets import resolve_config

BATCH, VIEWS, DIM, PER_SAMPLE, EXPONENT = 256, 2, 128, 5, 1.1
PRESET = "reg"
TEMPERATURE = 0.1
# The reference runs only where its predicted need is below this share of the available memory.
BUDGET_SHARE = 0.5


@dataclass
class LossStep:
    labels: int
    backend: str
    anchors: int
    columns: int
    status: str                    # "measured", or why the call was not made
    ms: Optional[float] = None
    peak_mb: Optional[float] = None
    predicted_mb: Optional[float] = None


def power_law_labels(batch: int, num_labels: int, per_sample: int, exponent: float,
                     gen: torch.Generator) -> torch.Tensor:
    """[batch, per_sample] padded label indices: each slot draws a label with probability
    proportional to rank**-exponent over a random order of the labels (a repeat within a row is
    padding after canonicalisation, so rows hold up to `per_sample` labels)."""
    weights = torch.arange(1, num_labels + 1, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(weights, batch * per_sample, replacement=True, generator=gen)
    order = torch.randperm(num_labels, generator=gen)
    return order[ranks].view(batch, per_sample)


def _call(backend: str, features, labels, prototypes, num_labels: int) -> None:
    for t in (features, prototypes):
        t.grad = None
    loss = multilabel_contrastive_loss(features, labels, prototypes, preset=PRESET, num_labels=num_labels,
                                       label_format="indices", temperature=TEMPERATURE, backend=backend)
    loss.backward()


def _measure(backend: str, features, labels, prototypes, num_labels: int, repeats: int) -> tuple[float, Optional[float]]:
    """(median ms, peak MB above the memory held before the call). The memory pass is the warm-up."""
    device = features.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _call(backend, features, labels, prototypes, num_labels)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        exact = memory.exact_malloc()
        try:
            base = memory.rss_bytes() if memory.reset_peak_rss() else None
            _call(backend, features, labels, prototypes, num_labels)
            top = memory.peak_rss_bytes()
        finally:
            if exact:
                memory.steady_malloc()
        peak = None if base is None or top is None or not exact else max(top - base, 0) / 2**20
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _call(backend, features, labels, prototypes, num_labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), peak


def loss_steps(labels: Sequence[int], *, batch: int = BATCH, views: int = VIEWS, dim: int = DIM,
               per_sample: int = PER_SAMPLE, repeats: int = 3, device: str = "cpu", backend: str = "auto",
               seed: int = 0, budget_bytes: Optional[int] = None) -> list[LossStep]:
    """Per L: the fused backend's row, then the reference's (measured, or its predicted need)."""
    from ..backends import resolve_backend

    fused, _ = resolve_backend(backend, torch.device(device))
    if budget_bytes is None:
        if torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            budget_bytes = int(BUDGET_SHARE * free)
        else:
            avail = memory.available_memory_bytes()
            budget_bytes = int(BUDGET_SHARE * avail) if avail is not None else 0
    cfg = resolve_config(PRESET)
    rows = []
    for L in labels:
        gen = torch.Generator().manual_seed(seed + L)
        N = batch * views
        anchors = N + (L if cfg.prototype_mode == "rows" else 0)
        columns = N + (L if cfg.uses_prototypes else 0)
        index = power_law_labels(batch, L, per_sample, EXPONENT, gen).to(device)
        features = torch.randn(batch, views, dim, generator=gen).to(device).requires_grad_(True)
        prototypes = torch.randn(L, dim, generator=gen).to(device).requires_grad_(True)
        fused_pred = memory.fused_bytes(N, L, dim, per_sample) / 2**20
        ref_pred = memory.reference_bytes(anchors, columns, N, L, dim, per_sample) / 2**20
        for name, pred in ((fused, fused_pred), ("reference", ref_pred)):
            row = LossStep(L, name, anchors, columns, "measured", predicted_mb=round(pred, 1))
            if pred * 2**20 > budget_bytes:
                row.status = f"not run: predicted {_size(pred)} > {_size(budget_bytes / 2**20)} available to it"
            else:
                ms, peak = _measure(name, features, index, prototypes, L, repeats)
                row.ms, row.peak_mb = round(ms, 1), None if peak is None else round(peak, 1)
            rows.append(row)
    return rows


def _size(mb: float) -> str:
    return f"{mb / 1024:,.1f} GB" if mb >= 1024 else f"{mb:,.0f} MB"


def loss_steps_table(rows: Sequence[LossStep]) -> str:
    lines = ["| labels L | anchors x columns | backend | ms per call | peak memory | predicted need |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r.ms:,.1f}" if r.ms is not None else r.status
        peak = _size(r.peak_mb) if r.peak_mb is not None else ("not measured" if r.ms is not None else "-")
        lines.append(f"| {r.labels:,} | {r.anchors:,} x {r.columns:,} | {r.backend} | {ms} | {peak} | "
                     f"{_size(r.predicted_mb)} |")
    return "\n".join(lines)


def describe(batch: int = BATCH, views: int = VIEWS, dim: int = DIM, per_sample: int = PER_SAMPLE) -> str:
    return (f"the loss alone, one forward + backward: preset {PRESET} (L prototypes as anchors and columns), "
            f"{batch} samples x {views} views, d = {dim}, up to {per_sample} power-law labels per sample; "
            f"memory above what the process held before the call")
