"""Argument validation and preparation shared by every backend: errors name the argument."""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Optional

import torch
from torch import Tensor

from .labels import LabelSets, as_label_sets, check_padded_indices, from_indices_on_device, label_errors_named
from .presets import LossConfig
from .problem import Problem

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
NORM_EPS = 1e-12
# Below this the logits s/tau (|s| <= 1) and their gradients, which carry 1/tau, lose every digit of
# fp32 precision and, for tau near fp32's smallest normal numbers, overflow to inf/NaN.
MIN_TEMPERATURE = 1e-6


def _check_values() -> bool:
    """Checks that read tensor values (finiteness) need a host sync; under torch.compile they
    would break the graph, so there only shapes, dtypes and devices are checked."""
    return not torch.compiler.is_compiling()


def check_temperature(temperature) -> float:
    """The temperature's value as a float. A one-element tensor is read (a host read on a GPU); its
    gradient, when it requires one, flows through `temperature_scale` in `prepare`."""
    if isinstance(temperature, Tensor) and temperature.numel() == 1:
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature: expected a floating-point tensor, got {temperature.dtype}")
        temperature = float(temperature.detach())
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature: expected a positive number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature: {temperature} is below the smallest supported temperature {MIN_TEMPERATURE} "
                         "(the logits s/temperature would not stay finite and accurate in fp32)")
    return float(temperature)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


def _check_finite(x: Tensor, name: str, check_values: bool) -> None:
    if check_values and _check_values() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")


def _check_embedding_rows(x, name: str, rows: str, check_values: bool) -> Tensor:
    """A float [n, d] or [n, V, d] tensor with every dimension at least 1 (and, `check_values`,
    finite): the checks features and keys share. `rows` names n in the messages (B, M)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected shape [{rows}, d] or [{rows}, V, d], got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[-1] < 1 or (x.dim() == 3 and x.shape[1] < 1):
        raise ValueError(f"{name}: every dimension must be at least 1, got shape {tuple(x.shape)}")
    _check_finite(x, name, check_values)
    return x


def check_features(features, check_values: bool = True) -> Tensor:
    return _check_embedding_rows(features, "features", "B", check_values)


def check_prototypes(prototypes, cfg: LossConfig, dim: int, num_labels: Optional[int], device,
                     check_values: bool = True) -> Optional[Tensor]:
    if not cfg.uses_prototypes:
        if prototypes is not None:
            raise ValueError("prototypes: given, but prototype_mode='none' does not use prototypes "
                             "(choose a preset with prototypes or override prototype_mode)")
        return None
    if prototypes is None:
        raise ValueError(f"prototypes: required for prototype_mode={cfg.prototype_mode!r}; pass a [L, d] tensor")
    if not isinstance(prototypes, Tensor):
        raise TypeError(f"prototypes: expected a tensor, got {type(prototypes).__name__}")
    if prototypes.dtype not in FLOAT_DTYPES:
        raise TypeError(f"prototypes: expected a float tensor, got {prototypes.dtype}")
    if prototypes.dim() != 2 or prototypes.shape[1] != dim or prototypes.shape[0] < 1:
        raise ValueError(f"prototypes: expected shape [L, {dim}] with L >= 1, got {tuple(prototypes.shape)}")
    if num_labels is not None and prototypes.shape[0] != num_labels:
        raise ValueError(f"prototypes: {prototypes.shape[0]} prototypes for num_labels={num_labels}")
    if prototypes.device != device:
        raise ValueError(f"prototypes: on device {prototypes.device}, but features are on {device}")
    _check_finite(prototypes, "prototypes", check_values)
    return prototypes


def check_keys(keys, key_labels, dim: int, num_labels: int, device, label_format: str = "auto",
               check_values: bool = True) -> tuple[Optional[Tensor], Optional[LabelSets]]:
    """Extra columns ("keys", never anchors): [M, d] or [M, V, d] embeddings (views flattened like
    the features', row m*V + v) and their label sets (M rows, in any label format, in the label space
    of `labels`). Returns (keys [M*V, d] unnormalised, canonical label sets repeated over views),
    or (None, None). Errors name `keys` or `key_labels`."""
    if keys is None:
        if key_labels is not None:
            raise ValueError("key_labels: given without keys; pass keys=[M, d] embeddings with them")
        return None, None
    _check_embedding_rows(keys, "keys", "M", check_values=False)
    if keys.shape[-1] != dim:
        raise ValueError(f"keys: embedding dimension {keys.shape[-1]} does not match the features' {dim}")
    if keys.device != torch.device(device):
        raise ValueError(f"keys: on device {keys.device}, but features are on {device}")
    _check_finite(keys, "keys", check_values)
    if key_labels is None:
        raise ValueError("key_labels: required with keys (the label sets of the M keys)")
    count = keys.shape[0]
    rows = (key_labels.index.shape[0] if isinstance(key_labels, LabelSets) and isinstance(key_labels.index, Tensor)
            and key_labels.index.dim() >= 1 else
            key_labels.shape[0] if isinstance(key_labels, Tensor) and key_labels.dim() >= 1 else None)
    if rows is not None and rows != count:
        raise ValueError(f"key_labels: {rows} label sets for {count} keys (keys have shape {tuple(keys.shape)})")
    # An integer matrix is read as padded indices when the labels' format says so (or must be:
    # check_values=False); otherwise key_labels' own format is detected.
    integer = (isinstance(key_labels, Tensor) and key_labels.layout == torch.strided
               and not (key_labels.dtype.is_floating_point or key_labels.dtype == torch.bool))
    fmt = "indices" if integer and (label_format == "indices" or not check_values) else "auto"
    with label_errors_named("key_labels"):
        sets = as_label_sets(key_labels, count, num_labels, fmt, device=device, check_values=check_values)
    views = keys.shape[1] if keys.dim() == 3 else 1
    return keys.reshape(count * views, dim), sets.repeat_views(views)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs are computed in fp32; fp32 and fp64 keep their precision."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _UnitRows(torch.autograd.Function):
    """x / max(||x||, NORM_EPS) per row for fp16/bf16/fp32 x, in `out_dtype`. The norm is taken
    in fp64, whose range holds the squares of every such number: in fp32 the norm of a row of
    1e20s is inf and the row becomes zeros. The backward is the closed form
    (g - y (y.g)) / ||x|| (g / NORM_EPS where the floor applies) in a few operations, where
    F.normalize's autograd takes fifteen: each is host time on a GPU."""

    @staticmethod
    def forward(ctx, x: Tensor, out_dtype: torch.dtype) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float64)
        denom = norm.clamp_min(NORM_EPS)
        y = (x / denom).to(out_dtype)
        ctx.save_for_backward(y, norm, denom)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        y, norm, denom = ctx.saved_tensors
        along = (y * g).sum(-1, keepdim=True) * (norm >= NORM_EPS)  # no radial part below the floor
        return ((g - y * along) / denom).to(ctx.x_dtype), None


def l2_normalize(x: Tensor, out_dtype: Optional[torch.dtype] = None, unit_rows: Optional[Callable] = None
                 ) -> Tensor:
    """x / max(||x||, NORM_EPS) per row (the last dimension) in `out_dtype` (default: fp32 for half
    rows, else x's dtype), for any finite x: the sum of squares neither overflows nor underflows.
    fp16, bf16 and fp32 rows: `unit_rows([x], out_dtype)` when a backend provides one (its own
    kernels, e.g. the triton backend's two launches), else _UnitRows (the norm in fp64). fp64 rows are first rescaled by a
    power of two so that their largest entry lies in [0.5, 1), which is exact: where nothing
    overflows the result is F.normalize's to the last bit, gradient included (the float64 oracle's
    own formulation)."""
    out_dtype = out_dtype or compute_dtype(x.dtype)
    if x.dtype != torch.float64:
        if unit_rows is not None and x.dim() == 2:
            return unit_rows([x], out_dtype)
        return _UnitRows.apply(x, out_dtype)
    scale = torch.ldexp(torch.ones_like(x[..., :1]), -torch.frexp(x.detach().abs().amax(-1, keepdim=True))[1])
    scaled = x * scale
    return (scaled / torch.maximum(scaled.norm(dim=-1, keepdim=True), NORM_EPS * scale)).to(out_dtype)


def temperature_scale(temperature, value: float, device) -> Optional[Tensor]:
    """For a temperature tensor that requires grad (learnable, CLIP-style): sqrt(value / temperature),
    a 0-dim tensor equal to 1 to the last bit (value is the tensor's own value), else None. The
    normalised embeddings are multiplied by it, so every logit <x_i, x_j> / value becomes
    <x_i, x_j> / temperature: the backends compute with the float `value` as always, and autograd
    forms d loss / d temperature = -(1 / 2 temperature) sum_e <dL/de, e> over every embedding e from
    the gradients the backends' sweeps already give (no kernel changes)."""
    if not (isinstance(temperature, Tensor) and temperature.requires_grad):
        return None
    if temperature.device != torch.device(device):
        raise ValueError(f"temperature: on device {temperature.device}, but features are on {device}")
    return torch.sqrt(value / temperature.reshape(()))


def prepare(features, labels, prototypes, cfg: LossConfig, temperature, num_labels: Optional[int] = None,
            label_format: str = "auto", native_half: bool = False, check_values: bool = True,
            keys=None, key_labels=None, unit_rows: Optional[Callable] = None,
            canonical_indices: Optional[Callable] = None, prologue: Optional[Callable] = None) -> Problem:
    """Validate everything and build the backend's Problem (normalised rows, canonical labels).
    `check_values=False`: no check reads tensor values on the host (labels.as_label_sets); a
    temperature given as a tensor is read all the same. A temperature tensor that requires grad
    gets its gradient through `temperature_scale`. `unit_rows`: the backend's row normaliser
    (unit_rows(parts, out_dtype) -> the parts' rows normalised and stacked): it normalises the
    features, keys and prototypes together into the Problem's `columns` (one launch, no
    concatenation later), fp64 aside; `canonical_indices`: its canonicaliser of padded indices
    (labels.as_label_sets); `prologue`: both at once where both run (prologue(labels, num_labels,
    parts, out_dtype) -> (LabelSets, the normalised rows stacked), one launch instead of two)."""
    learnable = temperature
    temperature = check_temperature(temperature)
    if not isinstance(check_values, bool):
        raise TypeError(f"check_values: expected True or False, got {check_values!r}")
    features = check_features(features, check_values)
    batch, dim = features.shape[0], features.shape[-1]
    views = features.shape[1] if features.dim() == 3 else 1
    if prototypes is not None and num_labels is None and isinstance(prototypes, Tensor) and prototypes.dim() == 2:
        num_labels = prototypes.shape[0]
    # With a prologue the canonicaliser's input is kept (as_label_sets checks the rest, on a
    # stand-in of the canonical form's shape) until the rows are normalised with it below.
    deferred = []

    def defer(raw: Tensor, labels_count: int) -> LabelSets:
        check_padded_indices(raw)  # the canonicaliser's errors, now
        deferred.append(raw)
        return LabelSets(torch.empty(raw.shape, dtype=torch.int64, device=raw.device),
                         torch.empty(raw.shape[0], dtype=torch.int64, device=raw.device), labels_count)

    label_sets = as_label_sets(labels, batch, num_labels, label_format, device=features.device,
                               check_values=check_values,
                               canonical_indices=defer if prologue is not None else canonical_indices)
    prototypes = check_prototypes(prototypes, cfg, dim, label_sets.num_labels, features.device, check_values)
    if cfg.uses_prototypes and label_sets.num_labels != prototypes.shape[0]:
        raise ValueError(f"labels: label space of size {label_sets.num_labels} but {prototypes.shape[0]} prototypes")
    keys, key_sets = check_keys(keys, key_labels, dim, label_sets.num_labels, features.device, label_format,
                                check_values)
    keep_half = native_half and features.dtype in (torch.float16, torch.bfloat16)
    flat = features.reshape(batch * views, dim)
    # Keys and prototypes are normalised in the rows' dtype (fp32 prototypes stay fp32 for half rows).
    row_dtype = features.dtype if keep_half else compute_dtype(features.dtype)
    parts = [t for t in (flat, keys, prototypes) if t is not None]
    scale = temperature_scale(learnable, temperature, features.device)
    columns = None
    joint = unit_rows is not None and all(t.dtype != torch.float64 for t in parts) and row_dtype != torch.float64
    if deferred and joint:
        label_sets, columns = prologue(deferred[0], label_sets.num_labels, parts, row_dtype)
    elif deferred:
        label_sets = (canonical_indices or from_indices_on_device)(deferred[0], label_sets.num_labels)
    if joint:
        # The columns in their order (samples, keys, prototypes) in one tensor; the parts are views.
        if columns is None:
            columns = unit_rows(parts, row_dtype)
        if scale is not None:
            columns = columns * scale.to(columns.dtype)
        n, m = flat.shape[0], 0 if keys is None else keys.shape[0]
        rows, keys = columns[:n], None if keys is None else columns[n:n + m]
        protos = None if prototypes is None else columns[n + m:]
    else:
        rows = l2_normalize(flat, row_dtype, unit_rows)
        protos = None if prototypes is None else l2_normalize(prototypes, rows.dtype, unit_rows)
        keys = None if keys is None else l2_normalize(keys, rows.dtype, unit_rows)
        if scale is not None:
            rows = rows * scale.to(rows.dtype)
            protos = None if protos is None else protos * scale.to(protos.dtype)
            keys = None if keys is None else keys * scale.to(keys.dtype)
    return Problem(rows, protos, label_sets.repeat_views(views), cfg, temperature, check_values=check_values,
                   keys=keys, key_labels=key_sets, columns=columns)


def anchor_label_counts(problem: Problem) -> Tensor:
    """a_i for every anchor: |y_i| for sample rows, 1 for prototype anchors."""
    return problem.anchor_labels().count
