"""A pytorch-metric-learning style front end: `MultiLabelSupConLoss`, called as their losses are.

    loss_fn = MultiLabelSupConLoss(preset="supcon_any", temperature=0.1)
    loss = loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)

Nothing here imports pytorch-metric-learning: the loss is plain torch and works without it
(`require_pml()` is for callers that want the package itself; it raises an ImportError naming it).
See docs/PML.md for what maps to what.

Semantics, following pytorch-metric-learning 2.9 (losses/base_metric_loss_function.py
`BaseMetricLossFunction.forward`, utils/common_functions.py `set_ref_emb`,
losses/generic_pair_loss.py `GenericPairLoss.compute_loss`, utils/loss_and_miner_utils.py
`convert_to_pairs` / `get_matches_and_diffs`):

- anchors are the rows of `embeddings`; the columns are the rows of `ref_emb` when it is given,
  else of `embeddings` (then the library's own loss, every backend, fused);
- the column of an anchor's own index is left out exactly when `ref_labels is labels` (the same
  tensor object, which includes ref_emb=None): pytorch-metric-learning keys it on the identity of
  the label tensor, not of the embeddings;
- `indices_tuple` (pairs (a1, p, a2, n) or triplets (a, p, n), as their miners return): each
  anchor's softmax runs over the columns listed for it, as in their SupConLoss; the label-derived
  weights of the preset are kept and must agree with the tuple (`_check_tuple_labels`). Presets without
  prototypes only.

With ref_emb (other than embeddings itself with the same labels object) or indices_tuple the loss
is computed by an exact pure-PyTorch path built on the reference backend's weights
(`reference.positive_weights`): it materialises [B, B + M (+ L)] logits and is not fused.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .inputs import _check_embedding_rows, prepare
from .labels import LabelSets, _detect_format, as_label_sets, label_errors_named
from .loss import MultiLabelContrastiveLoss, multilabel_contrastive_loss
from .problem import Problem
from .reduction import reduce_anchor_losses
from .reference import positive_weights

PML_PACKAGE = "pytorch-metric-learning"

__all__ = ["MultiLabelSupConLoss", "require_pml"]


def require_pml(feature: str = "this feature"):
    """The pytorch_metric_learning module, or an ImportError naming the package to install."""
    try:
        import pytorch_metric_learning
    except ImportError as err:
        raise ImportError(f"{feature} needs the optional package {PML_PACKAGE}: pip install {PML_PACKAGE} "
                          f"(or pip install 'mlcl_fast[pml]')") from err
    return pytorch_metric_learning


class MultiLabelSupConLoss(MultiLabelContrastiveLoss):
    """mlcl_fast's losses with pytorch-metric-learning's call convention.

    preset, temperature, num_labels, dim, backend, reduction, **overrides: as
    `mlcl_fast.MultiLabelContrastiveLoss` (prototype presets own learnable prototypes
    [num_labels, dim]; add the module's parameters to the optimiser, as for their proxy losses).
    label_format: "auto", "dense", "indices" or "sparse", for 2-D labels (see README).

    forward(embeddings [B, d], labels, indices_tuple=None, ref_emb=None [M, d], ref_labels=None)
    labels / ref_labels: multi-hot [B, L], padded indices [B, K] (-1 = padding), sparse, a
    LabelSets, or 1-D class ids [B] (single-label data; any integers when the preset has no
    prototypes, else label ids in [0, num_labels)). 1-D and 2-D cannot be mixed.
    """

    def __init__(self, preset: str = "supcon_any", temperature: float = 0.1, num_labels: Optional[int] = None,
                 backend: str = "auto", dim: Optional[int] = None, reduction: str = "mean",
                 label_format: str = "auto", **overrides):
        super().__init__(preset=preset, num_labels=num_labels, dim=dim, temperature=temperature, backend=backend,
                         reduction=reduction, **overrides)
        if label_format not in ("auto", "dense", "indices", "sparse"):
            raise ValueError(f"label_format: expected one of ['auto', 'dense', 'indices', 'sparse'], got {label_format!r}")
        self.label_format = label_format

    def forward(self, embeddings: Tensor, labels=None, indices_tuple=None, ref_emb: Optional[Tensor] = None,
                ref_labels=None) -> Tensor:
        _check_embeddings("embeddings", embeddings)
        if labels is None:
            raise ValueError("labels: required (this loss takes its positives from the labels; "
                             "indices_tuple alone is not enough)")
        if ref_emb is None and ref_labels is not None:
            raise ValueError("ref_labels: given without ref_emb (pytorch-metric-learning would ignore it); pass both")
        exclude_self = ref_labels is labels or ref_emb is None  # their rule: identity of the label tensor
        if ref_emb is not None:
            _check_embeddings("ref_emb", ref_emb)
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(f"ref_emb: embedding size {ref_emb.shape[1]} differs from embeddings' {embeddings.shape[1]}")
            if ref_emb.dtype != embeddings.dtype or ref_emb.device != embeddings.device:
                raise ValueError(f"ref_emb: {ref_emb.dtype} on {ref_emb.device}, but embeddings are "
                                 f"{embeddings.dtype} on {embeddings.device}")
            if ref_labels is None:
                raise ValueError("ref_labels: required when ref_emb is given (the label sets of ref_emb's rows)")
            if ref_labels is labels and ref_emb.shape[0] != embeddings.shape[0]:
                raise ValueError(f"ref_labels: is labels (one row per embedding, {embeddings.shape[0]}), "
                                 f"but ref_emb has {ref_emb.shape[0]} rows")
        if indices_tuple is not None and self.config.uses_prototypes:
            raise NotImplementedError(f"indices_tuple: not supported with prototypes (prototype_mode="
                                      f"{self.config.prototype_mode!r}); use a preset without prototypes")
        fused = indices_tuple is None and (ref_emb is None or (ref_emb is embeddings and exclude_self))
        label_sets, ref_sets = self._label_sets(embeddings, labels, None if fused else (ref_emb, ref_labels, exclude_self))
        if fused:
            return multilabel_contrastive_loss(embeddings, label_sets, self.prototypes, preset=self.config,
                                               temperature=self.temperature, reduction=self.reduction,
                                               backend=self.backend, num_labels=label_sets.num_labels)
        if ref_emb is None:
            ref_emb, ref_sets = embeddings, label_sets
        columns, listed = _pair_masks(indices_tuple, embeddings.shape[0], ref_emb.shape[0], exclude_self,
                                      embeddings.device)
        return self._masked_loss(embeddings, label_sets, ref_emb, ref_sets, columns, listed)

    # -- labels -----------------------------------------------------------------------------

    def _label_sets(self, embeddings: Tensor, labels, ref) -> tuple[LabelSets, Optional[LabelSets]]:
        """Canonical label sets of the anchors and (ref given) of the columns, in one label space."""
        device, batch = embeddings.device, embeddings.shape[0]
        ref_emb, ref_labels, same = ref if ref is not None else (None, None, False)
        # to the embeddings' device, as pytorch-metric-learning does (the self rule was settled before)
        move = lambda t: t.to(device) if isinstance(t, (Tensor, LabelSets)) else t
        labels, ref_labels = move(labels), move(ref_labels)
        one_d = [isinstance(t, Tensor) and t.dim() == 1 for t in (labels, ref_labels)]
        if ref_labels is not None and one_d[0] != one_d[1]:
            raise ValueError(f"ref_labels: {'1-D class ids' if one_d[1] else 'label sets'} but labels are "
                             f"{'1-D class ids' if one_d[0] else 'label sets'}; give both in one form")
        if one_d[0]:
            return self._class_ids(labels, ref_labels, batch, None if ref_emb is None else ref_emb.shape[0])
        num_labels = self.num_labels
        # Each tensor's format is settled here, once: the library's "auto" rule depends on num_labels,
        # which the joint label space below may change.
        fmt, ref_fmt = (_format(t, self.label_format, num_labels) for t in (labels, ref_labels))
        if ref_labels is not None and not same and num_labels is None:  # one label space for both
            (kind, size), (ref_kind, ref_size) = (_label_space(t, f) for t, f in ((labels, fmt), (ref_labels, ref_fmt)))
            if size != ref_size and min(size, ref_size) >= 0:
                if kind == ref_kind == "indices":
                    num_labels = max(size, ref_size)
                elif kind == "indices" and size <= ref_size:
                    num_labels = ref_size
                elif ref_kind == "indices" and ref_size <= size:
                    num_labels = size
                # else: as_label_sets below names the mismatch
        sets = as_label_sets(labels, batch, num_labels, fmt, device=device)
        if ref_labels is None:
            return sets, None
        if same:
            return sets, sets
        with label_errors_named("ref_labels"):
            ref_sets = as_label_sets(ref_labels, ref_emb.shape[0], sets.num_labels, ref_fmt, device=device)
        return sets, ref_sets

    def _class_ids(self, labels: Tensor, ref_labels: Optional[Tensor], batch: int, ref_batch: Optional[int]):
        """1-D class ids -> one-label sets. Without prototypes any integer ids (compacted);
        with prototypes they are label ids in [0, num_labels)."""
        for name, t, n in (("labels", labels, batch), ("ref_labels", ref_labels, ref_batch)):
            if t is None:
                continue
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise TypeError(f"{name}: 1-D class ids must be an integer tensor, got {t.dtype}")
            if t.shape[0] != n:
                raise ValueError(f"{name}: {t.shape[0]} class ids for {n} rows of "
                                 f"{'embeddings' if name == 'labels' else 'ref_emb'}")
        ids = labels if ref_labels is None or ref_labels is labels else torch.cat([labels, ref_labels.to(labels.dtype)])
        if self.config.uses_prototypes:
            num_labels = self.num_labels
            for name, t in (("labels", labels), ("ref_labels", ref_labels)):
                if t is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_labels):
                    raise ValueError(f"{name}: class ids must lie in [0, num_labels={num_labels}) with prototypes, "
                                     f"got range [{int(t.min())}, {int(t.max())}]")
            compact = ids.long()
        else:
            uniq, compact = torch.unique(ids, return_inverse=True)
            num_labels = max(int(uniq.numel()), 1)
        sets = as_label_sets(compact[:batch, None], batch, num_labels, "indices")
        if ref_labels is None:
            return sets, None
        if ref_labels is labels:
            return sets, sets
        return sets, as_label_sets(compact[batch:, None], ref_batch, num_labels, "indices")

    # -- the exact, unfused path for ref_emb / indices_tuple -----------------------------------

    def _masked_loss(self, embeddings: Tensor, label_sets: LabelSets, ref_emb: Tensor, ref_sets: LabelSets,
                     columns: Tensor, listed) -> Tensor:
        """SPEC's loss with anchors = embeddings (+ prototypes for prototype_mode="rows") and
        columns = ref_emb (+ prototypes); `columns` [B, M] says which ref rows enter each
        embedding anchor's softmax. Prototype anchors see every ref row and every other prototype.
        Written as reference.anchor_losses with that column mask: the samples of the Problem are
        [embeddings; ref_emb], the embeddings' own columns masked out everywhere."""
        cfg = self.config
        batch, refs = embeddings.shape[0], ref_emb.shape[0]
        both = prepare(torch.cat([embeddings, ref_emb]), label_sets.concat(ref_sets), self.prototypes, cfg,
                       self.temperature, label_sets.num_labels)
        problem = Problem(both.samples, both.prototypes, both.labels, cfg, both.temperature, sample_anchors=(0, batch))
        n = batch + refs
        num_anchors, num_cols = problem.num_anchors, problem.num_columns
        in_softmax = torch.zeros(num_anchors, num_cols, dtype=torch.bool, device=embeddings.device)
        in_softmax[:batch, batch:n] = columns
        if cfg.uses_prototypes:
            num_protos = num_cols - n
            in_softmax[:, n:] = True
            if num_anchors > batch:  # prototype_mode="rows": the prototypes are anchors too
                in_softmax[batch:, batch:n] = True
                in_softmax[batch:, n:] = ~torch.eye(num_protos, dtype=torch.bool, device=embeddings.device)
        if cfg.beta == 0:
            in_softmax[:, :n] = False

        x = problem.samples
        rows, cols = problem.embeddings(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None)
        logits = rows @ cols.T / problem.temperature
        with torch.no_grad():
            weights = positive_weights(problem, in_softmax, logits.dtype)
            if listed is not None:
                _check_tuple_labels(listed, weights[:batch, batch:n], cfg)
        is_sample_column = torch.arange(num_cols, device=cols.device) < n
        log_beta = torch.zeros(num_cols, dtype=logits.dtype, device=cols.device)
        if cfg.beta > 0:
            log_beta = torch.where(is_sample_column, torch.tensor(cfg.beta, dtype=logits.dtype).log(), log_beta)
        has_column = in_softmax.any(dim=1, keepdim=True)
        masked = (logits + log_beta).masked_fill(~in_softmax, float("-inf"))
        masked = torch.where(has_column, masked, torch.zeros_like(masked))
        log_p = logits - torch.logsumexp(masked, dim=1, keepdim=True)
        valid = weights.sum(dim=1) > 0
        loss = -(weights * log_p).sum(dim=1)
        if cfg.reg:
            positive = weights > 0
            p = torch.exp(log_p.detach() + log_beta)
            r = torch.where(positive, (p - weights).clamp(min=0), torch.zeros_like(p))
            loss = loss - (r * logits).sum(dim=1)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        return reduce_anchor_losses(problem, loss, valid, self.reduction)


def _check_embeddings(name: str, x) -> None:
    """pytorch-metric-learning's embeddings are [batch, embedding_size]: the API's embedding checks
    (inputs._check_embedding_rows) for 2-D tensors."""
    if isinstance(x, Tensor) and x.dim() != 2:
        raise ValueError(f"{name}: expected shape [batch, embedding_size], got {tuple(x.shape)}")
    _check_embedding_rows(x, name, "batch", check_values=True)


def _format(labels, label_format: str, num_labels: Optional[int]) -> str:
    """The format as_label_sets would read `labels` in (the library's "auto" rule), made explicit."""
    if label_format != "auto" or not isinstance(labels, Tensor):
        return label_format
    try:
        return _detect_format(labels, num_labels)
    except (TypeError, ValueError):
        return label_format  # as_label_sets reports it


def _label_space(labels, fmt: str) -> tuple[str, int]:
    """(format, L) that as_label_sets reads from `labels` in format `fmt` without a given
    num_labels; L = -1 where it cannot tell (as_label_sets then reports the problem)."""
    if isinstance(labels, LabelSets):
        return "sets", labels.num_labels
    if not isinstance(labels, Tensor) or labels.dim() != 2:
        return "unknown", -1
    if fmt == "indices":
        return fmt, (int(labels.max()) + 1 if labels.numel() and not labels.dtype.is_floating_point else 0)
    return fmt, (labels.shape[1] if labels.dim() == 2 else -1)


def _index_vector(name: str, t, upper: int, device) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise TypeError(f"indices_tuple: {name} must be a 1-D integer tensor, got "
                        f"{type(t).__name__ if not isinstance(t, Tensor) else f'shape {tuple(t.shape)}'}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"indices_tuple: {name} must be an integer tensor, got {t.dtype}")
    t = t.to(device).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise ValueError(f"indices_tuple: {name} has indices outside [0, {upper})")
    return t


def _tuple_pairs(indices_tuple, batch: int, refs: int, device):
    """(a1, p, a2, n) of pairs or triplets, checked; triplets (a, p, n) become (a, p, a, n) as in
    pytorch-metric-learning's convert_to_pairs."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple: expected (anchors, positives, negatives) or (anchors1, positives, "
                         f"anchors2, negatives), got {type(indices_tuple).__name__}"
                         + (f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else ""))
    names = ("anchors", "positives", "negatives") if len(indices_tuple) == 3 else \
        ("anchors1", "positives", "anchors2", "negatives")
    uppers = (batch, refs, refs) if len(indices_tuple) == 3 else (batch, refs, batch, refs)
    parts = [_index_vector(nm, t, up, device) for nm, t, up in zip(names, indices_tuple, uppers)]
    if len(parts) == 3:
        parts = [parts[0], parts[1], parts[0], parts[2]]
    a1, p, a2, n = parts
    if a1.numel() != p.numel() or a2.numel() != n.numel():
        raise ValueError(f"indices_tuple: anchors and their positives / negatives differ in length "
                         f"({a1.numel()}, {p.numel()}, {a2.numel()}, {n.numel()})")
    return a1, p, a2, n


def _pair_masks(indices_tuple, batch: int, refs: int, exclude_self: bool, device):
    """([B, M] bool: the ref rows in each anchor's softmax, (positive, negative) [B, M] masks of the
    tuple or None). Without a tuple, every ref row except the anchor's own index when
    `exclude_self` (pytorch-metric-learning's get_matches_and_diffs clears the diagonal only when
    ref_labels is labels); with one, exactly the listed pairs (their GenericPairLoss.mat_based_loss
    and SupConLoss: keep_mask = pos_mask + neg_mask; no diagonal rule)."""
    if indices_tuple is None:
        mask = torch.ones(batch, refs, dtype=torch.bool, device=device)
        if exclude_self:
            mask.fill_diagonal_(False)
        return mask, None
    a1, p, a2, n = _tuple_pairs(indices_tuple, batch, refs, device)
    pos = torch.zeros(batch, refs, dtype=torch.bool, device=device)
    neg = torch.zeros_like(pos)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos | neg, (pos, neg)


def _check_tuple_labels(listed, weights: Tensor, cfg) -> None:
    """The tuple picks columns; the preset's weights (from the labels) pick the positives. They
    must agree, else the loss would silently differ from what the tuple says: every listed
    positive has weight > 0, every listed negative weight 0, and no pair is listed as both."""
    pos, neg = listed
    for bad, what in ((pos & neg, "is listed both as a positive and as a negative"),
                      (pos & (weights == 0), f"is listed as a positive, but its label sets make it no positive "
                                              f"(weighting={cfg.weighting!r})"),
                      (neg & (weights > 0), f"is listed as a negative, but its label sets make it a positive "
                                             f"(weighting={cfg.weighting!r})")):
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"indices_tuple: pair (anchor {i}, column {j}) {what}")
