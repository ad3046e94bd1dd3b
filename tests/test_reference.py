"""The reference backend against the brute-force oracle, on fresh random inputs for every preset
and override combination; autograd's gradient against finite differences where SPEC's gradient
is the derivative of the value (no regulariser)."""
from __future__ import annotations

import random

import pytest
import torch

import mlcl_fast
from cases import (ALL_PRESET_IDS, ALL_PRESETS, anchor_weights, assert_matches_brute_force, fresh_seed, preset_id,
                   random_case, uses_prototypes)

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}


# fp32 cases whose SPEC gradient cancels more than this (BruteForceResult.condition) are redrawn:
# there even exact fp32 arithmetic misses 1e-4 (e.g. every anchor's positive at p = 1 - 1e-4).
MAX_FP32_CONDITION = 30.0


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_reference_matches_brute_force(preset, overrides, dtype, views):
    for attempt in range(20):
        seed = fresh_seed("reference", preset, sorted(overrides.items()), str(dtype), views, attempt)
        rng = random.Random(seed)
        case = random_case(seed, preset, overrides, B=rng.randint(2, 9), V=views, d=rng.randint(3, 8),
                           L=rng.randint(2, 7), density=rng.uniform(0.15, 0.5), empty_rows=rng.randint(0, 2),
                           temperature=rng.choice([0.05, 0.1, 0.1, 0.5]), dtype=dtype)
        oracle = case.brute_force()
        if dtype == torch.float64 or max(oracle.condition(), oracle.condition(
                anchor_weights(case.seed, len(oracle.valid)))) <= MAX_FP32_CONDITION:
            break
    assert_matches_brute_force("reference", case, *TOLERANCES[dtype], oracle=oracle)
    assert len(oracle.valid) == case.features.shape[0] * views + (
        case.num_labels if mlcl_fast.resolve_config(preset, **overrides).prototype_mode == "rows" else 0)


NO_REG_PRESETS = [(p, o) for p, o in ALL_PRESETS if not mlcl_fast.resolve_config(p, **o).reg]


@pytest.mark.parametrize("preset,overrides", NO_REG_PRESETS, ids=[preset_id(p, o) for p, o in NO_REG_PRESETS])
def test_gradcheck(preset, overrides):
    """Without the regulariser SPEC's gradient is the derivative of the value: finite differences."""
    seed = fresh_seed("gradcheck", preset, sorted(overrides.items()))
    views = 1 + seed % 2
    case = random_case(seed, preset, overrides, B=4, V=views, d=3, L=3, density=0.5, temperature=0.5)
    inputs = [case.features.clone().requires_grad_(True)]
    if case.prototypes is not None:
        inputs.append(case.prototypes.clone().requires_grad_(True))

    def loss(reduction):
        def fn(*xs):
            protos = xs[1] if len(xs) > 1 else None
            return mlcl_fast.multilabel_contrastive_loss(xs[0], case.labels, protos, backend="reference",
                                                         reduction=reduction, **case.loss_kwargs())
        return fn

    assert torch.autograd.gradcheck(loss("mean"), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(loss("none"), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


REG_PRESETS = [(p, o) for p, o in ALL_PRESETS if mlcl_fast.resolve_config(p, **o).reg]


@pytest.mark.parametrize("preset,overrides", REG_PRESETS, ids=[preset_id(p, o) for p, o in REG_PRESETS])
def test_regulariser_gradient(preset, overrides):
    """With reg=True the gradient is SPEC's W p - w - r with r held constant: the oracle's, to
    1e-10. It is then not the derivative of the value (which also moves r): on some case with
    r_ij > 0 away from saturation a directional finite difference of the value disagrees."""
    for attempt in range(30):
        seed = fresh_seed("reg-gradient", preset, sorted(overrides.items()), attempt)
        case = random_case(seed, preset, overrides, B=5, V=2, d=3, L=3, density=0.6, temperature=0.2)
        assert_matches_brute_force("reference", case, 1e-10, 1e-10)
        if _directional_gap(case, seed) > 1e-5:
            return
    raise AssertionError("the gradient equals the derivative of the value on every case: "
                         "r is not treated as a constant")


def _directional_gap(case, seed):
    """|finite difference of the value - autograd gradient| along a random direction of
    (features, prototypes), relative to the gradient's size."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [case.features] + ([case.prototypes] if case.prototypes is not None else [])
    directions = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in inputs]

    def value(xs):
        protos = xs[1] if len(xs) > 1 else None
        return mlcl_fast.multilabel_contrastive_loss(xs[0], case.labels, protos, backend="reference",
                                                     **case.loss_kwargs())

    leaves = [x.clone().requires_grad_(True) for x in inputs]
    grads = torch.autograd.grad(value(leaves), leaves)
    analytic = sum(float((g * v).sum()) for g, v in zip(grads, directions))
    eps = 1e-6
    plus = value([x + eps * v for x, v in zip(inputs, directions)])
    minus = value([x - eps * v for x, v in zip(inputs, directions)])
    numeric = float(plus - minus) / (2 * eps)
    size = sum(float(g.norm() * v.norm()) for g, v in zip(grads, directions))
    return abs(numeric - analytic) / max(size, 1e-12)


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_uses_prototypes_agrees_with_spec(preset):
    assert mlcl_fast.resolve_config(preset).uses_prototypes == uses_prototypes(preset)
