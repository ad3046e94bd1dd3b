"""The loss over the batches of every process of a torch.distributed group (gather="all").

Each rank gathers the features (with autograd) and the canonical label sets of all ranks,
anchors only its own rows (and its contiguous share of the prototype anchors) against every
column, and (reduction="mean") divides by the global valid-anchor count (or the global sum of
a_i). With "mean" and "sum" the value returned on every rank is the global loss; its gradient is
world_size times this rank's share of it, so DDP's 1/world_size averaging of parameter gradients
yields exactly the gradients of one process on the concatenated batch. See docs/DISTRIBUTED.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import FLOAT_DTYPES, prepare
from .labels import LabelSets, _detect_format
from .reduction import mean_terms

GATHER_MODES = (None, "all")

# Fields of the per-rank description exchanged before anything else.
_OK, _BATCH, _VIEWS, _DIM, _WIDTH, _NUM_LABELS, _LABELS_FIXED, _DTYPE, _GRAD = range(9)


def _dist():
    import torch.distributed as dist  # imported lazily: some torch builds lack it
    return dist


def check_gather(gather, group=None) -> Optional[str]:
    """Validate the option values (not whether a process group exists yet)."""
    if gather not in GATHER_MODES:
        raise ValueError(f"gather: expected None or 'all', got {gather!r}")
    if gather is None and group is not None:
        raise ValueError("group: a process group is only used with gather='all'")
    return gather


def require_process_group(group=None) -> None:
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gather: gather='all' needs an initialised torch.distributed process group; "
                           "call torch.distributed.init_process_group(...) first (torchrun sets up its "
                           "environment), or use gather=None")
    if group is not None and dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the given process group")


def prototype_share(num_prototypes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous range of prototype anchors owned by `rank` (every prototype on exactly one rank)."""
    return rank * num_prototypes // world_size, (rank + 1) * num_prototypes // world_size


def gathered_loss(features, labels, prototypes, cfg, temperature: float, reduction: str, impl,
                  num_labels: Optional[int], label_format: str, group=None) -> Tensor:
    """multilabel_contrastive_loss with gather='all' (arguments already resolved by the caller)."""
    require_process_group(group)
    dist = _dist()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    native_half = getattr(impl, "NATIVE_HALF", False)

    # Validate locally first; a rank that fails must still take part in the first exchange, or
    # the other ranks would wait for it forever.
    try:
        local = prepare(features, labels, prototypes, cfg, temperature, num_labels, label_format,
                        native_half=native_half, unit_rows=getattr(impl, "unit_rows", None))
        error = None
    except (TypeError, ValueError) as err:
        local, error = None, err
    device = features.device if isinstance(features, Tensor) else _fallback_device(group)
    info = _all_gather_same(_describe(local, features, labels, num_labels, label_format, cfg, device), group)
    if error is not None:
        raise error
    _check_consistent(info)

    batches, views = info[:, _BATCH].tolist(), info[:, _VIEWS].tolist()
    rows_per_rank = [b * v for b, v in zip(batches, views)]
    total_labels = int(info[:, _NUM_LABELS].max())
    dim = features.shape[-1]

    rows = gather_rows(features.reshape(rows_per_rank[rank], dim), rows_per_rank, group)
    label_sets = _gather_labels(local.labels, views[rank], batches, views, int(info[:, _WIDTH].max()),
                                total_labels, group)

    problem = prepare(rows, label_sets, prototypes, cfg, temperature, total_labels, native_half=native_half,
                      unit_rows=getattr(impl, "unit_rows", None))
    lo = sum(rows_per_rank[:rank])
    protos = (0, 0)
    if cfg.prototype_mode == "rows":
        protos = prototype_share(problem.prototypes.shape[0], rank, world)
    problem = dataclasses.replace(problem, sample_anchors=(lo, lo + rows_per_rank[rank]), prototype_anchors=protos)

    losses, valid = impl.anchor_losses(problem)
    if reduction == "none":
        return losses
    numerator, denominator = mean_terms(problem, losses, valid)
    totals = torch.stack([numerator.detach(), denominator.detach()])
    dist.all_reduce(totals, group=group)
    if reduction == "sum":  # global Σ c_i l_i; this rank's share is its own numerator
        total, share = totals[0], numerator
    else:
        denominator = totals[1].clamp(min=1)
        total, share = totals[0] / denominator, numerator / denominator
    # Value: the global loss, identical on every rank. Gradient: world * this rank's share, which
    # DDP's averaging over ranks turns into the gradient of the global loss.
    return total + world * (share - share.detach())


def gather_rows(rows: Tensor, rows_per_rank: list[int], group=None) -> Tensor:
    """Concatenate every rank's [n_r, d] rows in rank order, differentiably (see _GatherRows)."""
    return _GatherRows.apply(rows, rows_per_rank, group)


class _GatherRows(torch.autograd.Function):
    """All-gather of rows of unequal count (padded to the largest). Backward: the gradient of
    rank r's rows is the sum over ranks of their gradients for those rows, since every rank's
    loss uses every row."""

    @staticmethod
    def forward(ctx, rows, rows_per_rank, group):
        dist = _dist()
        width = max(rows_per_rank)
        padded = F.pad(rows.contiguous(), (0, 0, 0, width - rows.shape[0]))
        out = rows.new_empty(len(rows_per_rank) * width, rows.shape[1])
        _all_gather_into(out, padded, group)
        ctx.rows_per_rank, ctx.group, ctx.rank = rows_per_rank, group, dist.get_rank(group)
        out = out.view(len(rows_per_rank), width, rows.shape[1])
        return torch.cat([out[r, :n] for r, n in enumerate(rows_per_rank)])

    @staticmethod
    def backward(ctx, grad):
        dist = _dist()
        counts, width = ctx.rows_per_rank, max(ctx.rows_per_rank)
        padded = torch.stack([F.pad(g, (0, 0, 0, width - g.shape[0])) for g in grad.split(counts)])
        if _has_reduce_scatter(ctx.group, grad.device):
            mine = grad.new_empty(width, grad.shape[1])
            _reduce_scatter_into(mine, padded.view(-1, grad.shape[1]), ctx.group)
        else:  # gloo and others: a full all-reduce, then keep this rank's block
            dist.all_reduce(padded, group=ctx.group)
            mine = padded[ctx.rank]
        return mine[: counts[ctx.rank]], None, None


def _gather_labels(rows: LabelSets, own_views: int, batches: list[int], views: list[int], width: int,
                   num_labels: int, group) -> LabelSets:
    """Every rank's canonical label sets, repeated over that rank's views, in rank order. `width`
    is the largest canonical width of any rank: that of the concatenated batch."""
    index = rows.index[::own_views]  # one row per sample; views are repeated after the exchange
    shared = torch.full((max(batches), max(width, 1)), -1, dtype=torch.int64, device=index.device)
    shared[: index.shape[0], : index.shape[1]] = index
    every = _all_gather_same(shared, group)
    index = torch.cat([every[r, :b, :width].repeat_interleave(v, 0)
                       for r, (b, v) in enumerate(zip(batches, views))])
    return LabelSets(index.contiguous(), (index >= 0).sum(1), num_labels)


def _describe(local, features, labels, num_labels, label_format, cfg, device) -> Tensor:
    info = torch.zeros(9, dtype=torch.int64, device=device)
    if local is None:
        return info
    views = features.shape[1] if features.dim() == 3 else 1
    info[_OK] = 1
    info[_BATCH], info[_VIEWS], info[_DIM] = features.shape[0], views, features.shape[-1]
    info[_WIDTH] = local.labels.width
    info[_NUM_LABELS] = local.labels.num_labels
    info[_LABELS_FIXED] = int(not _label_space_inferred(labels, num_labels, label_format, cfg))
    info[_DTYPE] = FLOAT_DTYPES.index(features.dtype)
    info[_GRAD] = int(features.requires_grad)
    return info


def _label_space_inferred(labels, num_labels, label_format, cfg) -> bool:
    """True when L came from the largest index in this rank's padded indices (so may be smaller
    than on other ranks without being wrong)."""
    if num_labels is not None or cfg.uses_prototypes or not isinstance(labels, Tensor):
        return False
    fmt = _detect_format(labels, num_labels) if label_format == "auto" else label_format
    return fmt == "indices"


def _check_consistent(info: Tensor) -> None:
    failed = (info[:, _OK] == 0).nonzero().flatten().tolist()
    if failed:
        raise RuntimeError(f"gather: rank(s) {failed} of the process group rejected their inputs "
                           "(see the error raised there)")
    dims = info[:, _DIM].tolist()
    if len(set(dims)) > 1:
        raise ValueError(f"features: the feature dimension differs across ranks: {dims}")
    dtypes = [FLOAT_DTYPES[i] for i in info[:, _DTYPE].tolist()]
    if len(set(dtypes)) > 1:
        raise TypeError(f"features: the dtype differs across ranks: {dtypes}")
    grads = info[:, _GRAD].tolist()
    if len(set(grads)) > 1:
        raise ValueError(f"features: requires_grad differs across ranks ({[bool(g) for g in grads]}); "
                         "the backward pass of gather='all' is collective, so all ranks or none must need it")
    sizes = info[:, _NUM_LABELS]
    fixed = info[:, _LABELS_FIXED].bool()
    if bool((fixed & (sizes != sizes.max())).any()):
        raise ValueError(f"labels: the ranks disagree on the label space size L: {sizes.tolist()}; "
                         "pass num_labels (or dense labels of the same width on every rank)")


def _all_gather_same(tensor: Tensor, group) -> Tensor:
    """[world, *tensor.shape]: equal-shaped tensors of every rank (no autograd)."""
    dist = _dist()
    world = dist.get_world_size(group)
    out = tensor.new_empty(world * tensor.shape[0], *tensor.shape[1:])
    _all_gather_into(out, tensor.contiguous(), group)
    return out.view(world, *tensor.shape)


def _all_gather_into(out: Tensor, tensor: Tensor, group) -> None:
    dist = _dist()
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, tensor, group=group)


def _reduce_scatter_into(out: Tensor, tensor: Tensor, group) -> None:
    dist = _dist()
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, tensor, group=group)


def _has_reduce_scatter(group, device: torch.device) -> bool:
    """NCCL (and XCCL) reduce-scatter natively; elsewhere an all-reduce is the portable choice."""
    backend = str(_dist().get_backend(group)).lower()
    return device.type != "cpu" and ("nccl" in backend or "xccl" in backend)


def _fallback_device(group) -> torch.device:
    """Where the description goes when this rank's features are not even a tensor."""
    backend = str(_dist().get_backend(group)).lower()
    if torch.cuda.is_available() and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
