"""Training protocols of the study, on a prepared `Split`:

* `bce`, `zlpr`, `asl` (protocol `end2end`): backbone + linear classifier trained end to end with
  that loss (`asl`: mlcl_fast.asl_loss with the paper's gamma_pos=0, gamma_neg=4, clip=0.05);
  `bce/probe`, `zlpr/probe`, `asl/probe`: the same, then the backbone is frozen and the linear
  probe below is fitted on it (separates the backbone's features from how its classifier was
  trained);
* contrastive presets, after `pretrain` (backbone + projection head [+ prototypes] with
  mlcl_fast.MultiLabelContrastiveLoss):
  - `probe`: the backbone is frozen and per-label linear classifiers (BCE) are trained on its
    standardised features; each label keeps the L2 strength and epoch with the lowest validation BCE;
  - `finetune`: a linear classifier is put on the pre-trained backbone and everything is trained
    with BCE;
  - `joint`: no pre-training; backbone + head + classifier trained on BCE + λ·contrastive, the
    BCE summed over labels and divided by the mean label count of a training row
    (`joint_bce_scale`), so that the balance λ sets does not depend on the number of labels.

Every stage keeps the epoch with the best validation score (contrastive loss for pre-training,
per-label BCE for the probe, macro AP with ties broken by validation loss for trained classifiers,
whose bias starts at the label prior) and stops after `patience`
epochs without improvement. Per-label thresholds
are tuned on validation; metrics are reported on test.

Nothing holds a [rows, L] array: batches carry label sets (padded label ids) and sparse feature
rows as they are, the BCE / ZLPR / ASL heads and the probe expand a batch's labels to a
[batch, L] target, and models are scored a block of rows at a time into `metrics.ScoreStream`
(top-k, per-label counts, exact macro AP). Memory is O(rows·k + nnz) for data and predictions
plus O(L·d) for classifiers, prototypes and their optimiser state; every stage records its ms per
step and the process's peak memory (StageLog).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..baselines import asl_loss, bce_loss, zlpr_loss
from ..labels import LabelSets
from ..loss import MultiLabelContrastiveLoss
from ..memory import peak_memory_mb
from ..presets import PRESETS
from .data import Split
from .metrics import ScoreStream, block_rows, truth_csr
from .models import Backbone, ProjectionHead, SparseRows, make_views

BASELINES = ("bce", "zlpr", "asl")
# the loss each baseline trains its classifier with (every other classifier stage uses BCE)
SUPERVISED_LOSSES = {"bce": bce_loss, "zlpr": zlpr_loss, "asl": asl_loss}
PROTOCOLS = ("probe", "finetune", "joint")
BASELINE_PROTOCOLS = ("end2end", "probe")
PROBE_L2 = (1e-5, 1e-4, 1e-3)


@dataclass
class TrainConfig:
    loss: str = "reg"                 # a contrastive preset, or bce / zlpr / asl
    protocol: Optional[str] = None    # presets: probe (default) | finetune | joint; bce/zlpr/asl: end2end (default) | probe
    epochs: int = 30                  # most epochs of each stage (early stopping may end it sooner)
    probe_epochs: int = 40
    patience: int = 5
    min_steps: int = 300              # small sets get more epochs so every stage takes >= this many steps
    warmup_steps: int = 100           # classifier stages: no epoch before this many steps is selected
    batch_size: int = 256
    lr: float = 1e-3
    finetune_lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.1
    proj_dim: int = 128
    temperature: float = 0.1
    joint_lambda: float = 0.1         # weight of the contrastive term against the BCE of joint_bce_scale
    views: int = 1
    queue: int = 0                    # contrastive pre-training: a MoCo-style queue of this many keys (0: in-batch only)
    momentum: float = 0.999           # the key encoder's momentum (with queue > 0)
    aug_drop: float = 0.2
    aug_noise: float = 0.1
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"

    def __post_init__(self):
        if self.protocol is None:
            self.protocol = "end2end" if self.loss in BASELINES else "probe"

    def check(self) -> "TrainConfig":
        if self.loss not in BASELINES and self.loss not in PRESETS:
            raise ValueError(f"loss: expected one of {list(BASELINES)} or a preset {sorted(PRESETS)}, got {self.loss!r}")
        if self.loss not in BASELINES and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {list(PROTOCOLS)} for a contrastive preset, got {self.protocol!r}")
        if self.loss in BASELINES and self.protocol not in BASELINE_PROTOCOLS:
            raise ValueError(f"protocol: expected one of {list(BASELINE_PROTOCOLS)} for {self.loss}, got {self.protocol!r}")
        for name in ("epochs", "probe_epochs", "batch_size", "hidden", "layers", "proj_dim", "views", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.queue < 0:
            raise ValueError(f"queue: expected an integer >= 0 (0: no queue), got {self.queue}")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"momentum: expected a number in (0, 1), got {self.momentum}")
        if self.queue and (self.loss in BASELINES or self.protocol == "joint"):
            raise ValueError(f"queue: a key queue serves the contrastive pre-training (protocols probe and finetune), "
                             f"not {self.method}")
        if self.views > 1 and self.loss in BASELINES:
            raise ValueError(f"views: {self.loss} trains on one view, as every baseline ({', '.join(BASELINES)}); "
                             "use --views 1")
        return self

    @property
    def method(self) -> str:
        return self.loss if self.protocol == "end2end" else f"{self.loss}/{self.protocol}"


# ----------------------------------------------------------------------------------------------
# Batching

class Batches:
    """Mini-batches of (features, label sets) from one split part: features as a dense tensor, or
    as `SparseRows` for sparse data; labels as a LabelSets (sorted label ids padded with -1),
    never as a dense [rows, L] matrix. The contrastive losses read label sets as they are; the
    BCE / ZLPR / ASL heads expand them to a [batch, L] target, batch-sized."""

    def __init__(self, X, Y: sp.csr_matrix, batch_size: int, device: str):
        self.X, self.Y, self.bs, self.device = X, truth_csr(Y), batch_size, device
        self.n = Y.shape[0]
        self._dense_x = None if sp.issparse(X) else torch.from_numpy(np.ascontiguousarray(X))
        self._sparse_x = sp.csr_matrix(X) if sp.issparse(X) else None

    def rows(self, idx: np.ndarray) -> tuple["Tensor | SparseRows", LabelSets]:
        x = self._dense_x[idx] if self._dense_x is not None else sparse_rows(self._sparse_x, idx)
        return x.to(self.device), label_sets(self.Y, idx).to(self.device)

    def _starts(self) -> list:
        # a last batch of one row gives contrastive anchors no partner; fold it into the previous one
        starts = list(range(0, self.n, self.bs))
        if len(starts) > 1 and self.n - starts[-1] < 2:
            starts.pop()
        return starts

    def epoch(self, generator: Optional[torch.Generator]):
        order = torch.randperm(self.n, generator=generator).numpy() if generator is not None else np.arange(self.n)
        starts = self._starts()
        for k, s in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else self.n
            yield self.rows(order[s:e])

    def __len__(self) -> int:
        return len(self._starts())


def label_sets(Y: sp.csr_matrix, rows) -> LabelSets:
    """The label sets of `rows` of a canonical CSR label matrix, as padded indices [b, K] (K the
    largest label count among them): O(b·K), whatever the number of labels."""
    part = Y[rows]
    count = np.diff(part.indptr).astype(np.int64)
    width = int(count.max()) if part.nnz else 0
    index = np.full((len(count), width), -1, dtype=np.int64)
    row = np.repeat(np.arange(len(count)), count)
    index[row, np.arange(part.nnz) - part.indptr[row]] = part.indices
    return LabelSets(torch.from_numpy(index), torch.from_numpy(count), Y.shape[1])


def dense_targets(Y: sp.csr_matrix, rows, device: str = "cpu") -> Tensor:
    """Multi-hot float32 targets [b, L] of `rows` only (the linear probe's BCE needs them dense)."""
    return torch.from_numpy(Y[rows].toarray().astype(np.float32)).to(device)


def sparse_rows(X: sp.csr_matrix, rows) -> SparseRows:
    part = X[rows]
    return SparseRows(torch.from_numpy(part.indices.astype(np.int64)), torch.from_numpy(part.indptr[:-1].astype(np.int64)),
                      torch.from_numpy(part.data.astype(np.float32, copy=False)), part.shape)


# ----------------------------------------------------------------------------------------------
# Generic early-stopped loop

@dataclass
class StageLog:
    name: str
    train_loss: list = field(default_factory=list)
    val_score: list = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    steps: int = 0                                  # optimiser steps taken
    step_ms: list = field(default_factory=list)     # per epoch: mean ms of a step (batch, forward, backward, update)
    ms_per_step: Optional[float] = None             # the mean of step_ms (validation excluded)
    peak_rss_mb: Optional[float] = None             # the process's peak resident memory at the end of the stage
    peak_cuda_mb: Optional[float] = None            # with a CUDA device: peak allocated device memory

    def finish(self, t0: float, device: str) -> "StageLog":
        self.seconds = time.perf_counter() - t0
        self.ms_per_step = round(float(np.mean(self.step_ms)), 2) if self.step_ms else None
        self.peak_rss_mb, self.peak_cuda_mb = peak_memory_mb(device)
        return self


def stage_epochs(cfg: TrainConfig, batches_per_epoch: int, epochs: Optional[int] = None) -> tuple[int, int]:
    """(most epochs, patience) of a stage: at least `min_steps` optimiser steps, with the patience
    scaled by the same factor, so that tiny training sets are not stopped after a few steps."""
    epochs = cfg.epochs if epochs is None else epochs
    scale = max(1.0, cfg.min_steps / max(1, batches_per_epoch * epochs))
    return int(math.ceil(epochs * scale)), int(math.ceil(cfg.patience * scale))


def _start_bar(progress, name: str, total: int) -> None:
    if progress is not None:
        progress.reset(total=total)
        progress.set_description(name)


def adam(params, lr: float, weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """AdamW (with `weight_decay`) or Adam over `params` (tensors or parameter groups): torch's
    fused implementation where it has one for them (floating tensors all on one CPU or CUDA
    device), which updates each tensor in one pass instead of a dozen elementwise ones: 0.49 ->
    0.064 s per step for the 60 M parameters of a 100,000-label model on 2 CPU threads
    (docs/TRAINING.md). The same update up to rounding."""
    params = list(params)
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    devices = {t.device for t in tensors}
    fused = (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
             and all(t.is_floating_point() for t in tensors)) or None
    if weight_decay is None:
        return torch.optim.Adam(params, lr=lr, fused=fused)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def run_stage(name: str, modules: list[nn.Module], params, step_loss: Callable[[Tensor, Tensor], Tensor],
              val_score: Callable[[], "float | tuple"], batches: Batches, cfg: TrainConfig, lr: float,
              generator: torch.Generator, progress=None, warmup_steps: int = 0,
              after_step: Optional[Callable[[], None]] = None) -> StageLog:
    """Train with AdamW; keep the epoch with the best `val_score` (higher is better; tuples
    compare in order, the first entry is what the log keeps). Epochs that end before
    `warmup_steps` optimiser steps are neither selected nor counted toward the patience.
    `after_step` runs after every optimiser step (a momentum encoder's update)."""
    log = StageLog(name)
    opt = adam(params, lr, cfg.weight_decay)
    best, best_state, stale = (-math.inf,), None, 0
    t0 = time.perf_counter()
    max_epochs, patience = stage_epochs(cfg, len(batches))
    steps = 0
    _start_bar(progress, name, max_epochs)
    for epoch in range(1, max_epochs + 1):
        for m in modules:
            m.train()
        total, count, epoch_steps = 0.0, 0, 0
        t_epoch = time.perf_counter()
        for x, y in batches.epoch(generator):
            steps += 1
            epoch_steps += 1
            loss = step_loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += float(loss.detach()) * x.shape[0]   # float(): waits for the device, so the time is real
            count += x.shape[0]
        log.step_ms.append(1000 * (time.perf_counter() - t_epoch) / max(epoch_steps, 1))
        log.steps = steps
        for m in modules:
            m.eval()
        with torch.no_grad():
            key = val_score()
        key = tuple(float(k) for k in key) if isinstance(key, tuple) else (float(key),)
        score = key[0]
        log.train_loss.append(total / max(count, 1))
        log.val_score.append(score)
        if progress is not None:
            progress.set_postfix_str(f"loss {log.train_loss[-1]:.4f} val {score:.4f} {log.step_ms[-1]:.0f} ms/step",
                                     refresh=False)
            progress.update(1)
        if steps < warmup_steps:
            continue
        if key > best:
            best, stale, log.best_epoch = key, 0, epoch
            best_state = [copy.deepcopy(m.state_dict()) for m in modules]
        else:
            stale += 1
            if stale >= patience:
                break
    if best_state is not None:
        for m, s in zip(modules, best_state):
            m.load_state_dict(s)
    return log.finish(t0, cfg.device)


# ----------------------------------------------------------------------------------------------
# Scores for early stopping and per-label model choice

@torch.no_grad()
def score_blocks(backbone: nn.Module, classifier: nn.Module, batches: Batches,
                 losses: Optional[list] = None, loss_fn: Optional[Callable] = None) -> Iterator[np.ndarray]:
    """Sigmoid scores of the rows of `batches`, in row order, one float32 [b, L] block per batch
    (the [n, L] matrix is never formed). With `loss_fn`, appends loss_fn(logits, labels) × b of
    every batch to `losses`."""
    backbone.eval()
    classifier.eval()
    for x, y in batches.epoch(None):
        logits = classifier(backbone(x))
        if loss_fn is not None:
            losses.append(float(loss_fn(logits, y)) * x.shape[0])
        yield torch.sigmoid(logits).cpu().numpy()


def predict(backbone: nn.Module, classifier: nn.Module, batches: Batches) -> np.ndarray:
    """Dense [n, L] float64 scores: for small label spaces (and inspection); training and
    evaluation go through `score_model`, which never forms this matrix."""
    return np.concatenate(list(score_blocks(backbone, classifier, batches))).astype(np.float64)


def score_model(backbone: nn.Module, classifier: nn.Module, X, Y: sp.csr_matrix, cfg: TrainConfig, most: int,
                *, tune: bool = False, thresholds=None, loss_fn: Optional[Callable] = None
                ) -> tuple[ScoreStream, Optional[float]]:
    """Score the rows of (X, Y) in blocks of `most` rows (fewer at large L, `block_rows`) and
    reduce them to every metric (`ScoreStream`, its two passes); with `loss_fn`, also the mean of
    that loss over the rows. `tune`: keep the counts that choose per-label thresholds."""
    batches = Batches(X, Y, block_rows(Y.shape[1], most), cfg.device)
    stream = ScoreStream(Y, tune=tune, thresholds=thresholds)
    losses: list = []
    for block in score_blocks(backbone, classifier, batches, losses, loss_fn):
        stream.add(block)
    for block in score_blocks(backbone, classifier, batches):
        stream.add_again(block)
    return stream, (sum(losses) / max(batches.n, 1) if loss_fn is not None else None)


# ----------------------------------------------------------------------------------------------
# Protocols

class Parts(nn.Module):
    """Everything a protocol trains, saved as one checkpoint."""

    def __init__(self, backbone: Backbone, head: Optional[nn.Module], classifier: nn.Module,
                 contrastive: Optional[nn.Module]):
        super().__init__()
        self.backbone, self.head, self.classifier, self.contrastive = backbone, head, classifier, contrastive


def _contrastive_module(cfg: TrainConfig, num_labels: int) -> MultiLabelContrastiveLoss:
    return MultiLabelContrastiveLoss(cfg.loss, num_labels=num_labels, dim=cfg.proj_dim,
                                     temperature=cfg.temperature, backend=cfg.backend).to(cfg.device)


def _contrastive_features(backbone, head, x: Tensor, cfg: TrainConfig, gen: torch.Generator, sparse: bool) -> Tensor:
    if cfg.views == 1:
        return head(backbone(x))
    dense = x.to_dense() if isinstance(x, SparseRows) else x   # augmentation works on dense rows (batch-sized)
    v = make_views(dense.cpu(), cfg.views, cfg.aug_drop, 0.0 if sparse else cfg.aug_noise, gen).to(dense.device)
    B, V, d = v.shape
    return head(backbone(v.reshape(B * V, d))).reshape(B, V, -1)


def pretrain(split: Split, cfg: TrainConfig, progress=None) -> tuple[Backbone, StageLog]:
    """Contrastive pre-training of backbone + projection head (+ prototypes)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    backbone = Backbone(split.num_features, cfg.hidden, cfg.layers, cfg.dropout).to(cfg.device)
    head = ProjectionHead(backbone.out_dim, cfg.proj_dim).to(cfg.device)
    crit = _contrastive_module(cfg, split.num_labels)
    sparse = sp.issparse(split.X_train)
    train = Batches(split.X_train, split.Y_train, cfg.batch_size, cfg.device)
    val = Batches(split.X_val, split.Y_val, cfg.batch_size, cfg.device)

    def val_score() -> float:
        losses = [float(crit(head(backbone(x)), y)) * x.shape[0] for x, y in val.epoch(None)]
        return -sum(losses) / max(val.n, 1)

    step, after_step = (lambda x, y: crit(_contrastive_features(backbone, head, x, cfg, gen, sparse), y)), None
    if cfg.queue:
        step, after_step = _momentum_queue(split, cfg, backbone, head, crit, gen, sparse)
    log = run_stage("pretrain", [backbone, head, crit], list(backbone.parameters()) + list(head.parameters())
                    + list(crit.parameters()), step, val_score, train, cfg, cfg.lr, gen, progress,
                    after_step=after_step)
    return backbone, log


def _momentum_queue(split: Split, cfg: TrainConfig, backbone, head, crit, gen, sparse):
    """MoCo-style pre-training (as MulSupCon's authors train it): a key encoder, a copy of backbone
    and head that follows them by momentum (k <- m k + (1 - m) q after every step), embeds each
    batch without gradient; its keys and their label sets enter a LabelQueue of cfg.queue
    entries, and every step contrasts the batch's features against the batch and the queue
    (keys=, the current batch's keys included). Validation stays in-batch."""
    from ..queue import LabelQueue

    key_backbone, key_head = copy.deepcopy(backbone), copy.deepcopy(head)
    for p in list(key_backbone.parameters()) + list(key_head.parameters()):
        p.requires_grad_(False)
    max_labels = max(1, int(np.diff(split.Y_train.indptr).max())) if split.Y_train.shape[0] else 1
    queue = LabelQueue(cfg.queue, cfg.proj_dim, split.num_labels, max_labels, device=cfg.device)

    def step(x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            key_backbone.train(backbone.training)
            key_head.train(head.training)
            queue.enqueue(key_head(key_backbone(x)), y)
        features = _contrastive_features(backbone, head, x, cfg, gen, sparse)
        return crit(features, y, queue.keys(), queue.key_labels())

    @torch.no_grad()
    def after_step() -> None:
        for online, key in ((backbone, key_backbone), (head, key_head)):
            for p, k in zip(online.parameters(), key.parameters()):
                k.mul_(cfg.momentum).add_(p.detach(), alpha=1.0 - cfg.momentum)

    step.queue, step.key_encoder = queue, (key_backbone, key_head)  # for inspection (tests)
    return step, after_step


def train_supervised(split: Split, cfg: TrainConfig, backbone: Optional[Backbone] = None,
                     progress=None) -> tuple[Parts, StageLog]:
    """bce / zlpr / asl end to end, BCE fine-tuning of a pre-trained backbone, or the joint objective."""
    torch.manual_seed(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    finetune = backbone is not None
    if backbone is None:
        backbone = Backbone(split.num_features, cfg.hidden, cfg.layers, cfg.dropout).to(cfg.device)
    classifier = nn.Linear(backbone.out_dim, split.num_labels).to(cfg.device)
    with torch.no_grad():
        classifier.bias.copy_(prior_logits(split.Y_train).to(cfg.device))
    head = crit = None
    joint = cfg.loss not in BASELINES and cfg.protocol == "joint"
    if joint:
        head = ProjectionHead(backbone.out_dim, cfg.proj_dim).to(cfg.device)
        crit = _contrastive_module(cfg, split.num_labels)
    supervised = SUPERVISED_LOSSES.get(cfg.loss, bce_loss)
    bce_scale = joint_bce_scale(split.Y_train) if joint else 1.0
    sparse = sp.issparse(split.X_train)
    train = Batches(split.X_train, split.Y_train, cfg.batch_size, cfg.device)

    def step(x: Tensor, y: Tensor) -> Tensor:
        if not joint:
            return supervised(classifier(backbone(x)), y)
        if cfg.views == 1:
            h = backbone(x)
            return bce_scale * supervised(classifier(h), y) + cfg.joint_lambda * crit(head(h), y)
        return bce_scale * supervised(classifier(backbone(x)), y) + \
            cfg.joint_lambda * crit(_contrastive_features(backbone, head, x, cfg, gen, sparse), y)

    modules = [m for m in (backbone, classifier, head, crit) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    name = "finetune" if finetune else ("joint" if joint else cfg.loss)
    def val_score() -> tuple:
        # macro AP (3 decimals), ties broken by the validation loss. AP alone is threshold-free and
        # smooth but saturates on easy sets while a fresh head is still uncalibrated; validation
        # loss alone stops BCE on rare-label data long before its ranking and F1 peak; validation
        # F1 is too noisy on small validation slices.
        stream, loss = score_model(backbone, classifier, split.X_val, split.Y_val, cfg, cfg.batch_size,
                                   loss_fn=supervised)
        return round(stream.macro_map(), 3), -loss

    # a fresh head on a tiny validation slice can score its best AP after a handful of steps,
    # while its probabilities still sit at the label priors: hence the warm-up
    log = run_stage(name, modules, params, step, val_score, train, cfg, cfg.finetune_lr if finetune else cfg.lr,
                    gen, progress, warmup_steps=cfg.warmup_steps)
    return Parts(backbone, head, classifier, crit), log


def joint_bce_scale(Y: sp.csr_matrix) -> float:
    """The factor that turns bce_loss (a mean over rows and labels) into the BCE of the joint
    objective: summed over the L labels, averaged over rows, and divided by the mean number of
    labels of a training row (at least 1), i.e. L / max(1, cardinality).

    Why: the backbone is shared by both terms and a mean over labels shrinks the BCE's gradient
    as ~cardinality / L, while the contrastive loss is an average over anchors whose size does
    not grow with L. With the plain mean, the contrastive gradient on the backbone was 0.03-0.5x
    the BCE's on 6-14 labels but 15-115x on 45-983 labels, and at 374 labels the classifier
    stayed at the label priors (no prediction reached 0.5). Summed over labels, the BCE grows
    with the cardinality instead (the positives carry most of its gradient), hence the division:
    with it the ratio stayed within 0.01-0.5 from 6 to 983 labels at λ = 0.1. Adam is invariant to
    the scale of a loss it trains alone, so only the balance between the two terms changes."""
    n, L = Y.shape
    cardinality = float(Y.sum()) / max(n, 1)
    return L / max(cardinality, 1.0)


def prior_logits(Y: sp.csr_matrix) -> Tensor:
    """logit of each label's training frequency: the starting bias of every classifier, so that
    training does not spend its first epochs learning that most labels are rare."""
    freq = np.asarray(Y.sum(axis=0)).ravel() / max(Y.shape[0], 1)
    freq = np.clip(freq, 1e-3, 1 - 1e-3)
    return torch.from_numpy(np.log(freq / (1 - freq)).astype(np.float32))


@torch.no_grad()
def _frozen_features(backbone: nn.Module, X, cfg: TrainConfig) -> Tensor:
    backbone.eval()
    b = Batches(X, sp.csr_matrix((X.shape[0], 1), dtype=np.int8), 1024, cfg.device)
    return torch.cat([backbone(x) for x, _ in b.epoch(None)])


def linear_probe(split: Split, cfg: TrainConfig, backbone: Backbone, progress=None) -> tuple[Parts, StageLog]:
    """Per-label logistic regressions on frozen, standardised backbone features. Several L2
    strengths are trained at once; each label keeps the (strength, epoch) with its lowest
    validation BCE, as the paper chose probe settings per label on validation. (Validation AP
    would stop rare labels while their probabilities are still near the prior, leaving the 0.5
    threshold meaningless.)

    All L labels of a strength are one [D, L] weight tensor trained by matrix products (no loop
    over labels), one tensor per strength (slices of one [G, D, L] tensor would cost a zero-filled
    [G, D, L] gradient per slice in every backward: 40% of a step at L = 31K); the per-label
    choice is a masked copy into one [D, L] tensor. Targets are made dense a batch at a time and
    validation is scored in blocks of rows, so memory is O(G·D·L) for the weights and their Adam
    state plus a batch's [batch, L] activations."""
    torch.manual_seed(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    F_tr, F_val = _frozen_features(backbone, split.X_train, cfg), _frozen_features(backbone, split.X_val, cfg)
    mu, sd = F_tr.mean(0), F_tr.std(0).clamp(min=1e-6)
    F_tr, F_val = (F_tr - mu) / sd, (F_val - mu) / sd
    Y_tr, Y_val = truth_csr(split.Y_train), truth_csr(split.Y_val)
    G, D, L = len(PROBE_L2), F_tr.shape[1], split.num_labels
    W = [torch.zeros(D, L, device=cfg.device, requires_grad=True) for _ in range(G)]
    prior = prior_logits(split.Y_train).to(cfg.device).reshape(1, L)
    b = [prior.clone().requires_grad_(True) for _ in range(G)]
    opt = adam([*W, *b], 1e-2)
    best_score = np.full((G, L), -np.inf)                                       # -validation BCE
    # each label's weights at its best (strength, epoch) so far: the label's final choice is the
    # argmax over strengths of their best scores, and a strength's best score only rises, so the
    # final choice was the argmax when its weights were last improved; [D, L] instead of [G, D, L]
    best_W, best_b = torch.zeros(D, L, device=cfg.device), prior[0].clone()
    labels = np.arange(L)
    log = StageLog("probe")
    t0, stale, best_mean = time.perf_counter(), 0, -math.inf
    n, n_val = F_tr.shape[0], F_val.shape[0]
    val_rows = block_rows(L, max(n_val, 1))              # validation logits are [rows, L]
    max_epochs, patience = stage_epochs(cfg, math.ceil(n / cfg.batch_size), cfg.probe_epochs)
    _start_bar(progress, "probe", max_epochs)
    for epoch in range(1, max_epochs + 1):
        total, epoch_steps = 0.0, 0
        t_epoch = time.perf_counter()
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            target = dense_targets(Y_tr, idx.numpy(), cfg.device)
            features = F_tr[idx]
            opt.zero_grad(set_to_none=True)
            # one L2 strength at a time: the G losses are independent, and [batch, L] activations
            # instead of [G, batch, L] cut the step's peak memory by G
            for g in range(G):
                logits = features @ W[g] + b[g]
                loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(idx) \
                    + PROBE_L2[g] * W[g].pow(2).sum()
                loss.backward()
                total += float(loss.detach()) * len(idx) / G
            opt.step()
            epoch_steps += 1
        log.step_ms.append(1000 * (time.perf_counter() - t_epoch) / max(epoch_steps, 1))
        log.steps += epoch_steps
        with torch.no_grad():
            bce = torch.zeros(G, L, device=cfg.device)
            for s in range(0, n_val, val_rows):
                target = dense_targets(Y_val, np.arange(s, min(s + val_rows, n_val)), cfg.device)
                for g in range(G):
                    val_logits = F_val[s:s + val_rows] @ W[g] + b[g]
                    bce[g] += F.binary_cross_entropy_with_logits(val_logits, target, reduction="none").sum(0)
            score = (-bce / n_val).cpu().numpy()
        better = score > best_score + 1e-9
        if better.any():
            best_score = np.where(better, score, best_score)
            choice = best_score.argmax(axis=0)
            now = np.flatnonzero(better[choice, labels])        # labels whose best is this epoch's weights
            for g in np.unique(choice[now]):
                l_t = torch.from_numpy(now[choice[now] == g]).to(cfg.device)
                best_W[:, l_t] = W[g].detach()[:, l_t]
                best_b[l_t] = b[g].detach()[0, l_t]
        mean_best = float(best_score.max(axis=0).mean())
        log.train_loss.append(total / n)
        log.val_score.append(mean_best)
        if progress is not None:
            progress.set_postfix_str(f"val loss {-mean_best:.4f} {log.step_ms[-1]:.0f} ms/step", refresh=False)
            progress.update(1)
        if mean_best > best_mean + 1e-6:
            best_mean, stale, log.best_epoch = mean_best, 0, epoch
        else:
            stale += 1
            if stale >= patience:
                break
    W_lab, b_lab = best_W.T, best_b                                                # [L, D], [L]
    # fold the feature standardisation into one linear layer on the raw backbone output
    classifier = nn.Linear(D, L).to(cfg.device)
    with torch.no_grad():
        classifier.weight.copy_(W_lab / sd[None, :])
        classifier.bias.copy_(b_lab - (W_lab * (mu / sd)[None, :]).sum(1))
    for p in backbone.parameters():
        p.requires_grad_(False)
    return Parts(backbone, None, classifier, None), log.finish(t0, cfg.device)


# ----------------------------------------------------------------------------------------------
# One full run

@dataclass
class RunResult:
    config: dict
    test: dict
    val: dict
    thresholds: list
    stages: list
    seconds: float
    backend: str
    resources: dict = field(default_factory=dict)   # peak memory after evaluation, evaluation seconds
    parts: Optional[Parts] = None

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "parts"}
        d["method"] = TrainConfig(**self.config).method
        return d


def run(split: Split, cfg: TrainConfig, pretrained: Optional[tuple[Backbone, StageLog]] = None,
        progress=None) -> RunResult:
    """Train `cfg.method` on `split` and evaluate it; `pretrained` reuses a `pretrain` result
    (the study shares one pre-training between the probe and fine-tuning protocols)."""
    cfg.check()
    t0 = time.perf_counter()
    stages = []
    if cfg.loss in BASELINES or cfg.protocol == "joint":
        parts, log = train_supervised(split, cfg, progress=progress)
        if cfg.protocol == "probe":  # bce/probe, zlpr/probe, asl/probe: refit a linear probe on the frozen backbone
            stages.append(log)
            parts, log = linear_probe(split, cfg, copy.deepcopy(parts.backbone), progress)
    else:
        backbone, pre_log = pretrained if pretrained is not None else pretrain(split, cfg, progress)
        backbone = copy.deepcopy(backbone)
        stages.append(pre_log)
        if cfg.protocol == "probe":
            parts, log = linear_probe(split, cfg, backbone, progress)
        else:
            for p in backbone.parameters():
                p.requires_grad_(True)
            parts, log = train_supervised(split, cfg, backbone, progress)
    stages.append(log)
    # validation and test scored a block at a time (1024 rows, fewer at large L); the per-label
    # thresholds come from validation counts, and the validation metrics at them from the same counts
    t_eval = time.perf_counter()
    val_s, _ = score_model(parts.backbone, parts.classifier, split.X_val, split.Y_val, cfg, 1024, tune=True)
    thr = val_s.tuned_thresholds()
    test_s, _ = score_model(parts.backbone, parts.classifier, split.X_test, split.Y_test, cfg, 1024, thresholds=thr)
    test_m = test_s.metrics(thr, inv_propensity=split.inv_propensity)
    val_m = val_s.metrics(thr, inv_propensity=split.inv_propensity)
    eval_seconds = time.perf_counter() - t_eval
    peak_rss, peak_cuda = peak_memory_mb(cfg.device)
    resources = {"peak_rss_mb": peak_rss, "eval_seconds": round(eval_seconds, 3)}
    if peak_cuda is not None:
        resources["peak_cuda_mb"] = peak_cuda
    return RunResult(asdict(cfg), test_m, val_m, thr.tolist(), [asdict(s) for s in stages],
                     time.perf_counter() - t0, _backend_name(cfg), resources, parts)


def _backend_name(cfg: TrainConfig) -> str:
    if cfg.loss in BASELINES:
        return "-"
    from ..backends import resolve_backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_backend(cfg.backend, torch.device(cfg.device))[0]
