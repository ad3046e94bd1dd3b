"""reduction="sum" of the contrastive loss on every backend that runs on the CPU (reference; cpp;
triton under its interpreter), against the float64 brute-force oracle: Σ_i c_i ℓ_i with the
anchor weights of "mean" (c_i = 1 on valid anchors for anchor_weight="uniform", a_i for "labels"),
its gradients, and the identities sum = Σ c_i·none = mean × M within each backend.

As tests/test_triton.py, this module asks for the Triton interpreter before anything imports
triton; where triton was already imported without it (or CUDA is present), the triton cases
are skipped.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import brute_force  # noqa: E402
from cases import (GRAD_FLOOR, LOSS_FLOOR, fresh_seed, grad_floors, preset_id, random_case, rel_err,  # noqa: E402
                   run_loss)
from mlcl_fast import MultiLabelContrastiveLoss, multilabel_contrastive_loss  # noqa: E402
from mlcl_fast.backends import resolve_backend  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = {"reference": (torch.float64, dict(loss=1e-12, grad=1e-10)),
            "cpp": (torch.float32, dict(loss=1e-5, grad=1e-4)),
            "triton": (torch.float32, dict(loss=1e-5, grad=1e-4))}

# Both anchor weightings, prototypes as columns and as anchors, the regulariser, views, and
# anchors without positives (empty rows).
CONFIGS = [("supcon_any", {}, 1), ("mulsupcon", {}, 2), ("reg", {}, 2), ("msc", {"anchor_weight": "labels"}, 1),
           ("jaccard", {"prototype_mode": "rows", "anchor_weight": "labels"}, 1), ("supcon_all", {}, 2)]
CONFIG_IDS = [f"{preset_id(p, o)}-V{v}" for p, o, v in CONFIGS]


def _usable(backend: str) -> None:
    try:
        resolve_backend(backend, torch.device("cpu"))
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"{backend} does not run on the CPU here: {err}")


def sum_weights(case) -> torch.Tensor:
    """c_i of every anchor, from SPEC directly: 1 on valid anchors ("uniform"), or a_i = |y_i| for
    the B*V rows (b-major) and 1 for each prototype anchor ("labels")."""
    cfg = brute_force.spec_config(case.preset, **case.overrides)
    oracle = case.brute_force()
    if cfg["anchor_weight"] == "uniform":
        return torch.tensor(oracle.valid, dtype=torch.float64)
    views = case.features.shape[1] if case.features.dim() == 3 else 1
    counts = case.labels.sum(1).to(torch.float64).repeat_interleave(views)
    if cfg["prototype_mode"] == "rows":
        counts = torch.cat([counts, torch.ones(case.num_labels, dtype=torch.float64)])
    return counts


def _grads(out, case_inputs):
    grads = torch.autograd.grad(out, case_inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, case_inputs)]


@pytest.mark.parametrize("preset,overrides,views", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sum_matches_the_oracle(backend, preset, overrides, views):
    _usable(backend)
    dtype, tol = BACKENDS[backend]
    seed = fresh_seed("reduction-sum", backend, preset, repr(overrides), views)
    case = random_case(seed, preset, overrides, B=7, V=views, d=6, L=5, density=0.35, empty_rows=1,
                       temperature=0.3)
    oracle = case.brute_force()
    c = sum_weights(case)
    assert len(c) == len(oracle.valid)
    expected = float((c * oracle.anchor_losses).sum())

    value, gf, gp = run_loss(backend, case, reduction="none", dtype=dtype, weights=c)  # gradient of Σ c_i ℓ_i
    feats = case.features.to(dtype).detach().clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.to(dtype).detach().clone().requires_grad_(True)
    inputs = [feats] if protos is None else [feats, protos]
    total = multilabel_contrastive_loss(feats, case.labels, protos, reduction="sum", backend=backend,
                                        **case.loss_kwargs())
    assert total.dim() == 0 and total.dtype == dtype
    grads = _grads(total, inputs)

    # against the float64 oracle: value and gradients of Σ_i c_i ℓ_i
    ref_gf, ref_gp = oracle.grads(c.tolist())
    floor_f, floor_p = grad_floors(oracle, c.tolist())
    where = f"{backend} on {case}"
    assert rel_err(total, expected, LOSS_FLOOR) <= tol["loss"], f"{where}: sum {float(total)} != {expected}"
    assert rel_err(grads[0], ref_gf, floor_f) <= tol["grad"], f"{where}: features gradient"
    if protos is not None:
        assert rel_err(grads[1], ref_gp, floor_p) <= tol["grad"], f"{where}: prototypes gradient"

    # within the backend: sum = Σ c_i · none (value and gradient) = mean × M
    assert rel_err(total, (value.double() * c).sum(), LOSS_FLOOR) <= (1e-6 if dtype == torch.float32 else 1e-13)
    assert rel_err(grads[0], gf, max(GRAD_FLOOR, floor_f)) <= 1e-5
    mean = multilabel_contrastive_loss(feats, case.labels, protos, reduction="mean", backend=backend,
                                       **case.loss_kwargs())
    normaliser = max(float(c.sum()) if brute_force.spec_config(preset, **overrides)["anchor_weight"] == "labels"
                     else float(sum(oracle.valid)), 1.0)
    assert rel_err(total, mean.double() * normaliser, LOSS_FLOOR) <= 1e-6
    mean_grads = _grads(mean, inputs)
    for g_sum, g_mean in zip(grads, mean_grads):
        assert rel_err(g_sum, g_mean.double() * normaliser, max(GRAD_FLOOR, floor_f)) <= 1e-5
    assert normaliser > 1  # so that sum and mean differ

    # the module says the same
    module = MultiLabelContrastiveLoss(preset, num_labels=case.num_labels if protos is not None else None,
                                       dim=feats.shape[-1] if protos is not None else None, temperature=0.3,
                                       backend=backend, reduction="sum", **overrides).to(dtype)
    if protos is not None:
        with torch.no_grad():
            module.prototypes.copy_(protos)
    assert torch.allclose(module(feats, case.labels), total, rtol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("anchor_weight", ["uniform", "labels"])
def test_sum_without_a_valid_anchor_is_zero(backend, anchor_weight):
    """No anchor has a positive (every label set empty, no prototypes): 0 with zero gradients."""
    _usable(backend)
    dtype = BACKENDS[backend][0]
    case = random_case(fresh_seed("reduction-sum-empty", backend, anchor_weight), "supcon_any",
                       {"anchor_weight": anchor_weight}, B=5, d=4, L=3, empty_rows=5, dtype=dtype)
    feats = case.features.clone().requires_grad_(True)
    value = multilabel_contrastive_loss(feats, case.labels, reduction="sum", backend=backend, **case.loss_kwargs())
    assert value.dim() == 0 and float(value.detach()) == 0.0
    (gf,) = _grads(value, [feats]) if value.requires_grad else (torch.zeros_like(feats),)
    assert torch.isfinite(gf).all() and torch.equal(gf, torch.zeros_like(gf))


def test_sum_is_not_the_mean():
    """Guard: the default stays "mean"; "sum" differs from it by the normaliser."""
    case = random_case(fresh_seed("reduction-sum-default"), "supcon_any", B=6, d=4, L=3, density=0.5)
    kwargs = dict(backend="reference", **case.loss_kwargs())
    default = multilabel_contrastive_loss(case.features, case.labels, **kwargs)
    mean = multilabel_contrastive_loss(case.features, case.labels, reduction="mean", **kwargs)
    total = multilabel_contrastive_loss(case.features, case.labels, reduction="sum", **kwargs)
    valid = sum(case.brute_force().valid)
    assert torch.equal(default, mean) and valid > 1
    assert torch.allclose(total, mean * valid, rtol=1e-13)
