"""The reference backend against the brute-force oracle, on fresh random inputs for every preset
and override combination; autograd's gradient against finite differences where SPEC's gradient
is the derivative of the value (no regulariser)."""
from __future__ import annotations

import random

import pytest
import torch

import brute_force
import mlcl_fast
from cases import (ALL_PRESET_IDS, ALL_PRESETS, anchor_weights, assert_matches_brute_force, fresh_seed, preset_id,
                   random_case, rel_err, uses_prototypes)

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
    """With reg=True the gradient is SPEC's W p - w - r with r held constant (the oracle's, checked
    here to 1e-10). It must then differ from the derivative of the value, which also moves r, on
    a case where some r_ij > 0 (a positive with p_ij > w_ij: dense labels, small temperature)."""
    for attempt in range(50):
        seed = fresh_seed("reg-gradient", preset, sorted(overrides.items()), attempt)
        case = random_case(seed, preset, overrides, B=5, V=2, d=3, L=3, density=0.6, temperature=0.05)
        oracle = assert_matches_brute_force("reference", case, 1e-10, 1e-10)
        plain = brute_force.evaluate(case.features, case.label_sets(), case.prototypes, preset=case.preset,
                                     temperature=case.temperature, **dict(case.overrides, reg=False))
        if oracle.dl_ds != plain.dl_ds:
            break
    else:
        raise AssertionError("no case with some r_ij > 0 found")

    protos = case.prototypes

    def value(x):
        return mlcl_fast.multilabel_contrastive_loss(x, case.labels, protos, backend="reference",
                                                     **case.loss_kwargs())

    feats = case.features.clone().requires_grad_(True)
    grad = torch.autograd.grad(value(feats), feats)[0]
    numeric = torch.zeros_like(grad)
    eps = 1e-6
    for idx in range(grad.numel()):
        step = torch.zeros(grad.numel(), dtype=torch.float64)
        step[idx] = eps
        step = step.reshape(grad.shape)
        numeric.view(-1)[idx] = (value(case.features + step) - value(case.features - step)) / (2 * eps)
    assert rel_err(grad, numeric, 1e-6) > 1e-4, \
        "the gradient equals the derivative of the value: r is not treated as a constant"


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_uses_prototypes_agrees_with_spec(preset):
    assert mlcl_fast.resolve_config(preset).uses_prototypes == uses_prototypes(preset)
