"""Random SPEC cases, label-format converters and the backend-vs-reference check.

Shared by every backend's tests:

    from cases import ALL_PRESETS, random_case, assert_backend_matches
    case = random_case(seed, "reg", {"alpha": 0.5}, B=16, V=2, dtype=torch.float32, device="cuda")
    assert_backend_matches("triton", case, rtol_loss=1e-3, rtol_grad=1e-3)

Seeds: `fresh_seed(*parts)` mixes the session's base seed (env MLCL_TEST_SEED, otherwise drawn
at random and printed in pytest's header) with the test's own parts, so every run sees new
inputs and any failure replays with MLCL_TEST_SEED=<seed>.
"""
from __future__ import annotations

import os
import random
import warnings
import zlib
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

import brute_force

PRESET_NAMES = ("supcon_any", "supcon_all", "jaccard", "mulsupcon", "msc", "proto", "reg_noreg", "reg")

# Every preset as it is, then overrides that together reach every value of every SPEC field:
# weighting any/all/jaccard/label, f one/union/overlap, alpha 0/0.5/2/-1, prototype_mode
# none/columns/rows, beta 0/0.1/1/2.5, reg on and off for every weighting, anchor_weight
# uniform/labels, and their crossings with prototypes as columns and as anchors.
ALL_PRESETS: list[tuple[str, dict]] = [(name, {}) for name in PRESET_NAMES] + [
    # pair-centric weightings with prototypes
    ("supcon_any", {"prototype_mode": "columns"}),
    ("supcon_any", {"prototype_mode": "rows"}),
    ("supcon_all", {"prototype_mode": "rows"}),
    ("jaccard", {"prototype_mode": "columns"}),
    ("jaccard", {"prototype_mode": "rows", "beta": 0.0}),
    # pair factors
    ("mulsupcon", {"f": "union"}),
    ("mulsupcon", {"f": "overlap", "alpha": 0.5}),
    ("mulsupcon", {"f": "overlap", "alpha": -1.0}),
    ("mulsupcon", {"prototype_mode": "rows"}),
    ("msc", {"f": "one"}),
    ("msc", {"f": "overlap", "alpha": 2.0}),
    ("msc", {"prototype_mode": "rows"}),
    ("reg", {"f": "union"}),
    ("reg", {"f": "one"}),
    # alpha
    ("reg", {"alpha": 0.5}),
    ("reg", {"alpha": 2.0}),
    ("reg", {"alpha": -1.0}),
    ("reg_noreg", {"alpha": 0.5}),
    ("reg_noreg", {"alpha": 2.0}),
    ("reg_noreg", {"alpha": -1.0}),
    # prototype_mode
    ("reg", {"prototype_mode": "none"}),
    ("reg", {"prototype_mode": "columns"}),
    ("proto", {"prototype_mode": "rows"}),
    # beta
    ("reg", {"beta": 0.0}),
    ("reg", {"beta": 0.1}),
    ("reg", {"beta": 2.5}),
    ("msc", {"beta": 1.0}),
    ("msc", {"beta": 2.5}),
    ("supcon_any", {"beta": 2.5}),
    ("supcon_any", {"prototype_mode": "columns", "beta": 0.1}),
    # the regulariser with every weighting (reg=False is covered by the presets themselves)
    ("supcon_any", {"reg": True}),
    ("supcon_all", {"reg": True}),
    ("jaccard", {"reg": True}),
    ("jaccard", {"reg": True, "prototype_mode": "rows"}),
    ("mulsupcon", {"reg": True}),
    ("msc", {"reg": True}),
    ("proto", {"reg": True}),
    ("reg", {"reg": True, "alpha": -1.0, "beta": 0.1}),
    # anchor weighting
    ("supcon_any", {"anchor_weight": "labels"}),
    ("mulsupcon", {"anchor_weight": "uniform"}),
    ("msc", {"anchor_weight": "labels"}),
    ("reg", {"anchor_weight": "labels"}),
    ("jaccard", {"anchor_weight": "labels", "reg": True}),
]


def preset_id(preset: str, overrides: dict) -> str:
    """A readable pytest id: 'reg[alpha=0.5]'."""
    if not overrides:
        return preset
    return preset + "[" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + "]"


ALL_PRESET_IDS = [preset_id(p, o) for p, o in ALL_PRESETS]


def cpu_backends() -> list[str]:
    """The backends that run on CPU tensors here: reference, cpp when built, and triton through its
    interpreter (which `auto` never picks). Call it after the test module has set
    TRITON_INTERPRET (as tests/test_triton.py does), never at this module's import."""
    import mlcl_fast
    from mlcl_fast.backends import triton as triton_backend

    names = [b for b in ("reference", "cpp") if b in mlcl_fast.available_backends("cpu")]
    if triton_backend.is_available()[0] and triton_backend.kernels_interpreted() and not torch.cuda.is_available():
        names.append("triton")
    return names


def uses_prototypes(preset: str, overrides: Optional[dict] = None) -> bool:
    return brute_force.spec_config(preset, **(overrides or {}))["prototype_mode"] != "none"


# ----------------------------------------------------------------------------------------- seeds
def _initial_base_seed() -> int:
    env = os.environ.get("MLCL_TEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)


BASE_SEED = _initial_base_seed()


def fresh_seed(*parts) -> int:
    """A seed from the session's base seed and the caller's parts (stable across processes)."""
    return zlib.crc32(repr((BASE_SEED,) + parts).encode()) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    features: torch.Tensor                 # [B, d] or [B, V, d]
    labels: torch.Tensor                   # dense bool [B, L]
    prototypes: Optional[torch.Tensor]     # [L, d] or None
    preset: str = "reg"
    overrides: dict = field(default_factory=dict)
    temperature: float = 0.1
    seed: int = 0

    @property
    def num_labels(self) -> int:
        return self.labels.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        return self.features.device

    def label_sets(self) -> list:
        """Python sets of label ids, one per sample (the oracle's input)."""
        return [set(torch.nonzero(row).flatten().tolist()) for row in self.labels.cpu()]

    def loss_kwargs(self) -> dict:
        return dict(preset=self.preset, temperature=self.temperature, **self.overrides)

    def to(self, device=None, dtype=None) -> "Case":
        """Same case on another device and/or with features and prototypes in another dtype."""
        move = lambda t: None if t is None else t.to(device=device or t.device, dtype=dtype or t.dtype)
        return replace(self, features=move(self.features), prototypes=move(self.prototypes),
                       labels=self.labels.to(device or self.labels.device))

    def brute_force(self) -> brute_force.BruteForceResult:
        return brute_force.evaluate(self.features, self.label_sets(), self.prototypes, preset=self.preset,
                                    temperature=self.temperature, num_labels=self.num_labels, **self.overrides)

    def __repr__(self) -> str:
        return (f"Case(seed={self.seed}, {preset_id(self.preset, self.overrides)}, "
                f"features={tuple(self.features.shape)} {self.features.dtype}, L={self.num_labels}, "
                f"prototypes={self.prototypes is not None}, tau={self.temperature}; MLCL_TEST_SEED={BASE_SEED})")


def random_labels(gen: torch.Generator, B: int, L: int, density: float = 0.3, empty_rows: int = 0,
                  repeat_prob: float = 0.3) -> torch.Tensor:
    """Dense bool [B, L]: Bernoulli(density) rows, each non-empty, some copied from earlier rows (so
    identical label sets occur, which 'all' weighting needs), then `empty_rows` rows emptied."""
    labels = torch.rand(B, L, generator=gen, dtype=torch.float64) < density
    for b in range(B):
        if b > 0 and float(torch.rand(1, generator=gen)) < repeat_prob:
            labels[b] = labels[int(torch.randint(0, b, (1,), generator=gen))]
        if not labels[b].any():
            labels[b, int(torch.randint(0, L, (1,), generator=gen))] = True
    if empty_rows:
        empty = torch.randperm(B, generator=gen)[: min(empty_rows, B)]
        labels[empty] = False
    return labels


def random_case(seed: int, preset: str = "reg", overrides: Optional[dict] = None, *, B: int = 8, V: int = 1,
                d: int = 8, L: int = 6, density: float = 0.3, empty_rows: int = 0,
                dtype: torch.dtype = torch.float64, with_prototypes: Optional[bool] = None,
                temperature: float = 0.1, device="cpu", repeat_prob: float = 0.3) -> Case:
    """A random case. Features have random norms (the loss normalises them); V > 1 gives [B, V, d].
    Prototypes come when the configuration uses them (with_prototypes=None) or as forced."""
    overrides = dict(overrides or {})
    gen = torch.Generator().manual_seed(seed)
    shape = (B, V, d) if V > 1 else (B, d)
    scale = torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    features = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    labels = random_labels(gen, B, L, density, empty_rows, repeat_prob)
    if with_prototypes is None:
        with_prototypes = uses_prototypes(preset, overrides)
    prototypes = torch.randn(L, d, generator=gen, dtype=torch.float64) * 0.7 if with_prototypes else None
    case = Case(features, labels, prototypes, preset, overrides, float(temperature), seed)
    return case.to(device=torch.device(device), dtype=dtype)


# ---------------------------------------------------------------------------- label conversions
def to_dense(labels: torch.Tensor, dtype=torch.bool) -> torch.Tensor:
    return labels.to(dtype)


def to_padded(labels: torch.Tensor, seed: int = 0, duplicates: bool = True, shuffle: bool = True,
              extra: int = 2, dtype=torch.int64) -> torch.Tensor:
    """Padded indices [B, K]: every row's labels (some repeated when `duplicates`), -1 padding
    (at least one -1 per matrix, so an all-0/1 matrix is never mistaken for multi-hot), in a
    random order with -1 anywhere in the row when `shuffle`."""
    rng = random.Random(seed)
    rows = []
    for row in labels.cpu():
        ids = torch.nonzero(row).flatten().tolist()
        if duplicates and ids:
            ids += rng.choices(ids, k=rng.randint(0, 2))
        rows.append(ids)
    width = max(len(r) for r in rows) + extra
    out = []
    for ids in rows:
        ids = ids + [-1] * (width - len(ids))
        if shuffle:
            rng.shuffle(ids)
        out.append(ids)
    return torch.tensor(out, dtype=dtype, device=labels.device).reshape(labels.shape[0], width)


def to_csr(labels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta")
        return labels.to(dtype).to_sparse_csr()


def to_coo(labels: torch.Tensor, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Uncoalesced COO with its entries in random order."""
    idx = torch.nonzero(labels).T
    perm = torch.randperm(idx.shape[1], generator=torch.Generator().manual_seed(seed)).to(idx.device)
    idx = idx[:, perm]
    values = torch.ones(idx.shape[1], dtype=dtype, device=labels.device)
    return torch.sparse_coo_tensor(idx, values, tuple(labels.shape), check_invariants=True)


def to_label_sets(labels: torch.Tensor):
    """mlcl_fast.LabelSets built by hand (sorted, unique, -1 padded at the end)."""
    from mlcl_fast import LabelSets

    ids = [torch.nonzero(row).flatten().tolist() for row in labels.cpu()]
    width = max([len(r) for r in ids] + [0])
    index = torch.tensor([r + [-1] * (width - len(r)) for r in ids], dtype=torch.int64).reshape(len(ids), width)
    count = torch.tensor([len(r) for r in ids], dtype=torch.int64)
    return LabelSets(index.to(labels.device), count.to(labels.device), labels.shape[1])


def label_forms(labels: torch.Tensor, seed: int = 0) -> dict:
    """The same label sets in every accepted input form."""
    return {
        "dense_bool": to_dense(labels, torch.bool),
        "dense_uint8": to_dense(labels, torch.uint8),
        "dense_int32": to_dense(labels, torch.int32),
        "dense_int64": to_dense(labels, torch.int64),
        "dense_float16": to_dense(labels, torch.float16),
        "dense_float32": to_dense(labels, torch.float32),
        "dense_float64": to_dense(labels, torch.float64),
        "padded": to_padded(labels, seed),
        "padded_sorted_no_duplicates": to_padded(labels, seed, duplicates=False, shuffle=False, extra=1),
        "padded_int32": to_padded(labels, seed + 1, dtype=torch.int32),
        "csr": to_csr(labels),
        "csr_bool": to_csr(labels, torch.bool),
        "coo": to_coo(labels, seed),
        "coo_coalesced": to_coo(labels, seed).coalesce(),
        "label_sets": to_label_sets(labels),
    }


# --------------------------------------------------------------------------------- comparisons
def _as_f64(x) -> torch.Tensor:
    if isinstance(x, (int, float)):
        return torch.tensor(float(x), dtype=torch.float64)
    return x.detach().to("cpu", torch.float64)


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float) -> float:
    """||x - ref|| / max(||ref||, floor), computed in float64 on the CPU."""
    x, ref = _as_f64(x), _as_f64(ref)
    return float((x - ref).norm()) / max(float(ref.norm()), floor)


# Losses are compared relative to max(|loss*|, 1): log-softmax terms are of order one, and the
# regulariser can move a loss value through zero, where a pure relative error means nothing.
LOSS_FLOOR = 1.0
# Gradients are compared relative to max(||g*||, floor). A gradient can vanish by cancellation
# (e.g. a lone positive with p = 1: W p - w = 0), where a pure relative error only measures
# rounding noise. The floor is GRAD_SCALE_FLOOR times the size of what the gradient sums
# (BruteForceResult.grad_scale) when the oracle is cheap enough to ask, never below
# GRAD_FLOOR: so up to a cancellation of 1e4 the comparison stays purely relative.
GRAD_FLOOR = 1e-6
GRAD_SCALE_FLOOR = 1e-4
ORACLE_MAX_PAIRS = 5000  # anchors x columns up to which assert_backend_matches asks the oracle for the scale


def grad_floors(oracle: "brute_force.BruteForceResult", coeffs=None,
                scale_floor: float = GRAD_SCALE_FLOOR) -> tuple[float, float]:
    """(features, prototypes) gradient floors for the loss sum_a coeffs[a] l_a (default: the mean)."""
    scale_f, scale_p = oracle.grad_scale(coeffs)
    return max(GRAD_FLOOR, scale_floor * scale_f), max(GRAD_FLOOR, scale_floor * scale_p)


def run_loss(backend: str, case: Case, labels=None, reduction: str = "mean", dtype=None, device=None,
             weights: Optional[torch.Tensor] = None):
    """(value, grad features, grad prototypes) of `backend` on `case`. The backward pass is of the
    loss itself ("mean"), or of sum(weights * losses) ("none")."""
    import mlcl_fast

    case = case.to(device=device, dtype=dtype)
    feats = case.features.detach().clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.detach().clone().requires_grad_(True)
    out = mlcl_fast.multilabel_contrastive_loss(feats, case.labels if labels is None else labels, protos,
                                                reduction=reduction, backend=backend, **case.loss_kwargs())
    target = out if reduction == "mean" else (out * weights.to(out.device, out.dtype)).sum()
    inputs = [feats] if protos is None else [feats, protos]
    if target.requires_grad:
        grads = torch.autograd.grad(target, inputs, allow_unused=True)
    else:
        grads = [None] * len(inputs)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return out.detach(), grads[0], (grads[1] if protos is not None else None)


def assert_backend_matches(backend_name: str, case: Case, rtol_loss: float = 1e-5, rtol_grad: float = 1e-4,
                           device=None, labels=None, check_none: bool = True,
                           scale_floor: float = GRAD_SCALE_FLOOR) -> dict:
    """Compare `backend_name` on `case` (its dtype, on `device` or the case's) to the reference
    backend in float64 on the CPU: the reduced loss, the per-anchor losses of reduction='none',
    and the gradients of features and prototypes of both (for 'none', of a random weighting of
    the anchors). Losses are compared as |l - l*| / max(|l*|, LOSS_FLOOR), gradients as
    ||g - g*|| / max(||g*||, floor) with the floors of `grad_floors` (GRAD_FLOOR for cases too
    large for the oracle; `scale_floor` replaces GRAD_SCALE_FLOOR). Returns the errors."""
    ref_case = case.to(device="cpu", dtype=torch.float64)
    n_rows = ref_case.features.shape[0] * (ref_case.features.shape[1] if ref_case.features.dim() == 3 else 1)
    cfg = brute_force.spec_config(case.preset, **case.overrides)
    n_anchors = n_rows + (case.num_labels if cfg["prototype_mode"] == "rows" else 0)
    n_columns = n_rows + (case.num_labels if cfg["prototype_mode"] != "none" else 0)
    weights = anchor_weights(case.seed, n_anchors)
    oracle = ref_case.brute_force() if n_anchors * n_columns <= ORACLE_MAX_PAIRS else None
    floors = ((lambda coeffs=None: grad_floors(oracle, coeffs, scale_floor)) if oracle
              else (lambda coeffs=None: (GRAD_FLOOR,) * 2))

    errors = {}
    value, gf, gp = run_loss(backend_name, case, labels, device=device)
    ref_value, ref_gf, ref_gp = run_loss("reference", ref_case)
    _check_output(backend_name, case, value, gf, gp)
    floor_f, floor_p = floors()
    errors["loss"] = rel_err(value, ref_value, LOSS_FLOOR)
    errors["grad_features"] = rel_err(gf, ref_gf, floor_f)
    if ref_gp is not None:
        errors["grad_prototypes"] = rel_err(gp, ref_gp, floor_p)
    if check_none:
        losses, nf, np_ = run_loss(backend_name, case, labels, "none", device=device, weights=weights)
        ref_losses, ref_nf, ref_np = run_loss("reference", ref_case, None, "none", weights=weights)
        assert losses.shape == ref_losses.shape, f"{backend_name}: reduction='none' shape {tuple(losses.shape)}, " \
                                                 f"expected {tuple(ref_losses.shape)}"
        floor_f, floor_p = floors(weights.tolist())
        errors["anchor_losses"] = rel_err(losses, ref_losses, LOSS_FLOOR)
        errors["none_grad_features"] = rel_err(nf, ref_nf, floor_f)
        if ref_np is not None:
            errors["none_grad_prototypes"] = rel_err(np_, ref_np, floor_p)
    bad = {k: v for k, v in errors.items()
           if not v <= (rtol_loss if k in ("loss", "anchor_losses") else rtol_grad)}
    assert not bad, f"{backend_name} differs from the fp64 reference on {case}: {bad} " \
                    f"(rtol_loss={rtol_loss}, rtol_grad={rtol_grad}; all errors {errors})"
    return errors


def _check_output(backend: str, case: Case, value, gf, gp) -> None:
    assert value.dim() == 0, f"{backend}: loss should be a scalar, got shape {tuple(value.shape)}"
    half = case.dtype in (torch.float16, torch.bfloat16)
    expected = torch.float32 if half else case.dtype
    assert value.dtype == expected, f"{backend}: loss dtype {value.dtype}, expected {expected}"
    assert gf.dtype == case.dtype, f"{backend}: features' gradient dtype {gf.dtype}, expected {case.dtype}"
    assert bool(torch.isfinite(value)), f"{backend}: non-finite loss {value} on {case}"
    assert bool(torch.isfinite(gf).all()), f"{backend}: non-finite features gradient on {case}"
    if gp is not None:
        assert bool(torch.isfinite(gp).all()), f"{backend}: non-finite prototypes gradient on {case}"


def anchor_weights(seed: int, n: int) -> torch.Tensor:
    """Positive per-anchor weights for checking the gradient of reduction='none'."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def assert_matches_brute_force(backend: str, case: Case, rtol_loss: float, rtol_grad: float, oracle=None,
                               labels=None) -> "brute_force.BruteForceResult":
    """`backend` against the float64 oracle: the reduced loss and its gradients, the per-anchor
    losses of reduction='none' (exactly 0 for invalid anchors) and the gradients of a positive
    weighting of them."""
    oracle = case.brute_force() if oracle is None else oracle
    value, gf, gp = run_loss(backend, case, labels)
    _check_output(backend, case, value, gf, gp)
    ref_gf, ref_gp = oracle.grads()
    floor_f, floor_p = grad_floors(oracle)
    errors = {"loss": rel_err(value, oracle.loss, LOSS_FLOOR), "grad_features": rel_err(gf, ref_gf, floor_f)}
    assert (gp is None) == (ref_gp is None)
    if gp is not None:
        errors["grad_prototypes"] = rel_err(gp, ref_gp, floor_p)

    weights = anchor_weights(case.seed, len(oracle.valid))
    losses, nf, np_ = run_loss(backend, case, labels, reduction="none", weights=weights)
    assert losses.shape == (len(oracle.valid),), f"reduction='none' shape {tuple(losses.shape)}"
    invalid = ~torch.tensor(oracle.valid, dtype=torch.bool)
    assert (losses.cpu()[invalid] == 0).all(), "invalid anchors must have loss exactly 0"
    ref_nf, ref_np = oracle.grads(weights.tolist())
    floor_f, floor_p = grad_floors(oracle, weights.tolist())
    errors["anchor_losses"] = rel_err(losses, oracle.anchor_losses, LOSS_FLOOR)
    errors["none_grad_features"] = rel_err(nf, ref_nf, floor_f)
    if np_ is not None:
        errors["none_grad_prototypes"] = rel_err(np_, ref_np, floor_p)
    bad = {k: v for k, v in errors.items()
           if not v <= (rtol_loss if k in ("loss", "anchor_losses") else rtol_grad)}
    assert not bad, f"{backend} differs from the brute-force oracle on {case}: {bad} " \
                    f"(rtol_loss={rtol_loss}, rtol_grad={rtol_grad}; all errors {errors})"
    return oracle
