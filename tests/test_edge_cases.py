"""Edge cases: each checks that everything is finite AND equals the oracle (or the exact value)."""
from __future__ import annotations

import pytest
import torch

import mlcl_fast
from cases import (ALL_PRESET_IDS, ALL_PRESETS, PRESET_NAMES, assert_matches_brute_force, fresh_seed, random_case,
                   rel_err, run_loss, to_padded)

pytestmark = pytest.mark.usefixtures("single_thread")

FP64 = (1e-10, 1e-10)


def n_anchors(case):
    rows = case.features.shape[0] * (case.features.shape[1] if case.features.dim() == 3 else 1)
    cfg = mlcl_fast.resolve_config(case.preset, **case.overrides)
    return rows + (case.num_labels if cfg.prototype_mode == "rows" else 0)


def assert_exact_zero(case, labels=None):
    """Loss exactly 0 and every gradient exactly 0 (mean and 'none')."""
    value, gf, gp = run_loss("reference", case, labels)
    assert value.item() == 0.0 and not value.isnan()
    assert torch.equal(gf, torch.zeros_like(gf))
    if gp is not None:
        assert torch.equal(gp, torch.zeros_like(gp))
    losses, gf, gp = run_loss("reference", case, labels, reduction="none",
                              weights=torch.ones(n_anchors(case), dtype=torch.float64))
    assert torch.equal(losses, torch.zeros_like(losses))
    assert torch.equal(gf, torch.zeros_like(gf))
    if gp is not None:
        assert torch.equal(gp, torch.zeros_like(gp))


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("empty_rows", [1, 3])
def test_some_empty_label_sets(preset, empty_rows):
    case = random_case(fresh_seed("some-empty", preset, empty_rows), preset, B=6, V=2, d=5, L=4,
                       empty_rows=empty_rows)
    assert (case.labels.sum(1) == 0).sum() == empty_rows
    oracle = assert_matches_brute_force("reference", case, *FP64)
    assert not all(oracle.valid) and any(oracle.valid)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_all_label_sets_empty(preset, overrides):
    """No anchor has a positive (prototype anchors neither: no row carries their label)."""
    case = random_case(fresh_seed("all-empty", preset), preset, overrides, B=5, V=2, d=4, L=3, empty_rows=5)
    assert not case.labels.any()
    assert_exact_zero(case)
    assert_exact_zero(case, labels=to_padded(case.labels, 1))


@pytest.mark.parametrize("preset", ["supcon_any", "supcon_all", "jaccard", "mulsupcon"])
def test_no_shared_label(preset):
    """Distinct singleton labels, one view: every anchor is invalid, the loss is exactly 0."""
    case = random_case(fresh_seed("disjoint", preset), preset, B=4, d=3, L=4)
    case.labels = torch.eye(4, dtype=torch.bool)
    assert_exact_zero(case)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("views", [1, 2, 3])
def test_batch_of_one(preset, views):
    case = random_case(fresh_seed("b1", preset, views), preset, B=1, V=views, d=4, L=3)
    if views == 1 and not mlcl_fast.resolve_config(preset).uses_prototypes:
        assert_exact_zero(case)  # the single row is its own only column
        return
    oracle = assert_matches_brute_force("reference", case, *FP64)
    assert any(oracle.valid)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_batch_of_one_with_forced_prototypes(preset):
    """B=1 with prototype columns even for pair-centric weightings."""
    overrides = {} if mlcl_fast.resolve_config(preset).uses_prototypes else {"prototype_mode": "columns"}
    case = random_case(fresh_seed("b1p", preset), preset, overrides, B=1, d=4, L=3)
    if preset == "supcon_all":  # a prototype {k} is a positive only of the anchor whose set is {k}
        case.labels[0] = torch.tensor([False, True, False])
    oracle = assert_matches_brute_force("reference", case, *FP64)
    assert oracle.valid[0]


@pytest.mark.parametrize("temperature", [0.01, 0.05, 1e-3])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_small_temperature(preset, temperature):
    """fp64 to 1e-10; fp32 finite (exp(s) alone would overflow fp32 at tau=0.01) and within SPEC's
    fp32 tolerance of the oracle at tau=0.01 and 0.05."""
    seed = fresh_seed("tau", preset, temperature)
    case = random_case(seed, preset, B=10, V=2, d=16, L=5, temperature=temperature, empty_rows=1)
    assert_matches_brute_force("reference", case, *FP64)
    fp32 = case.to(dtype=torch.float32)
    if temperature >= 0.01:
        assert_matches_brute_force("reference", fp32, 1e-5, 1e-4)
    else:
        value, gf, gp = run_loss("reference", fp32)
        assert torch.isfinite(value) and torch.isfinite(gf).all() and (gp is None or torch.isfinite(gp).all())


def test_near_duplicate_rows_at_small_temperature():
    """Logits of +-1/tau on a near-degenerate batch: finite and equal to the oracle."""
    case = random_case(fresh_seed("dup"), "reg", B=6, d=4, L=3, temperature=0.01)
    case.features[1] = case.features[0] * 2.0
    case.features[2] = -case.features[0]
    assert_matches_brute_force("reference", case, *FP64)


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_zero_feature_row(preset):
    """A zero row normalises to 0 (x / max(||x||, 1e-12)): logits 0, still finite."""
    case = random_case(fresh_seed("zero-row", preset), preset, B=5, d=4, L=3)
    case.features[2] = 0.0
    assert_matches_brute_force("reference", case, *FP64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("proto_dtype", ["same", "fp32"])
def test_half_precision_features(preset, dtype, proto_dtype):
    """Loss in fp32, gradients in the inputs' dtypes, within 2e-2 of the fp64 oracle (which sees
    the same rounded inputs)."""
    case = random_case(fresh_seed("half", preset, str(dtype)), preset, B=12, V=2, d=16, L=5, dtype=dtype)
    if proto_dtype == "fp32":
        if case.prototypes is None:
            pytest.skip("no prototypes")
        case.prototypes = case.prototypes.float()
    value, gf, gp = run_loss("reference", case)
    assert value.dtype == torch.float32
    assert gf.dtype == dtype and (gp is None or gp.dtype == case.prototypes.dtype)
    assert torch.isfinite(value) and torch.isfinite(gf).all() and (gp is None or torch.isfinite(gp).all())
    oracle = case.brute_force()
    ref_gf, ref_gp = oracle.grads()
    assert rel_err(value, oracle.loss, 1.0) <= 2e-2
    assert rel_err(gf, ref_gf, 1e-6) <= 2e-2
    if gp is not None:
        assert rel_err(gp, ref_gp, 1e-6) <= 2e-2
    losses = run_loss("reference", case, reduction="none", weights=torch.ones(n_anchors(case)))[0]
    assert losses.dtype == torch.float32 and rel_err(losses, oracle.anchor_losses, 1.0) <= 2e-2


@pytest.mark.parametrize("preset", ["reg", "msc", "mulsupcon", "supcon_all"])
def test_non_contiguous_inputs(preset):
    """Transposed and strided features, prototypes and labels give the contiguous result."""
    seed = fresh_seed("strided", preset)
    case = random_case(seed, preset, B=6, V=2, d=5, L=4)
    strided = random_case(seed, preset, B=6, V=2, d=5, L=4)
    # features [B, V, d] as a permuted view of a [d, V, B] buffer; prototypes every other column
    strided.features = case.features.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not strided.features.is_contiguous()
    if case.prototypes is not None:
        wide = torch.zeros(case.num_labels, 2 * 5, dtype=torch.float64)
        wide[:, ::2] = case.prototypes
        strided.prototypes = wide[:, ::2]
        assert not strided.prototypes.is_contiguous()
    dense_t = case.labels.T.contiguous().T
    padded = to_padded(case.labels, seed)
    padded_strided = torch.full((padded.shape[0], 2 * padded.shape[1]), 7)[:, ::2]
    padded_strided.copy_(padded)
    assert not dense_t.is_contiguous() and not padded_strided.is_contiguous()
    expected = run_loss("reference", case)
    for labels in (dense_t, padded_strided, dense_t.float()):
        got = run_loss("reference", strided, labels=labels)
        for e, g in zip(expected, got):
            assert (e is None and g is None) or torch.allclose(e, g.reshape(e.shape), rtol=1e-12, atol=1e-15)
    assert_matches_brute_force("reference", strided, *FP64, labels=dense_t)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_all_samples_share_one_label_set(preset, overrides):
    case = random_case(fresh_seed("same-labels", preset, sorted(overrides.items())), preset, overrides,
                       B=5, V=2, d=4, L=4)
    case.labels[:] = torch.tensor([True, False, True, False])
    assert_matches_brute_force("reference", case, *FP64)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_single_label_space(preset, overrides):
    """L = 1: every sample carries label 0 or nothing."""
    case = random_case(fresh_seed("L1", preset, sorted(overrides.items())), preset, overrides,
                       B=5, V=2, d=3, L=1, empty_rows=1)
    assert case.labels.shape == (5, 1)
    assert_matches_brute_force("reference", case, *FP64)


def test_supcon_all_with_identical_sets_weights_every_other_row():
    """Hand-checked value: identical label sets, supcon_all = mean over anchors of
    -(1/(N-1)) sum_j log softmax_j, with the softmax over the N-1 other rows."""
    case = random_case(fresh_seed("hand"), "supcon_all", B=4, d=3, L=2)
    case.labels[:] = torch.tensor([True, True])
    x = torch.nn.functional.normalize(case.features, dim=1)
    s = x @ x.T / case.temperature
    total = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        log_p = s[i, others] - torch.logsumexp(s[i, others], 0)
        total += float(-log_p.mean())
    value = run_loss("reference", case)[0]
    assert abs(float(value) - total / 4) <= 1e-12 * abs(total)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 3e37), (torch.float32, 1e-11),
                                         (torch.bfloat16, 1e36), (torch.float64, 1e300), (torch.float16, 6e4)],
                         ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_normalisation_is_scale_invariant(backend, dtype, scale):
    """Features and prototypes scaled by any factor that keeps them finite and their norms above
    the 1e-12 floor of the normalisation (SPEC: x / max(|x|, 1e-12)) give the same loss and the
    correspondingly scaled gradients: the sum of squares must not overflow (fp32 rows of 1e20s
    once became zeros)."""
    if backend not in mlcl_fast.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    case = random_case(fresh_seed("scale", repr(dtype), scale), "reg", B=5, V=2, d=6, L=4, dtype=torch.float64)
    # unit-scale rows whose largest entry is 1 (so every row's norm is >= 1: scaled by 1e-11 it stays
    # above the 1e-12 floor, which a row of small entries scaled by a global maximum could not),
    # and the scaled copy is exactly representable up to rounding
    feats = (case.features / case.features.abs().amax(-1, keepdim=True)).to(dtype)
    protos = (case.prototypes / case.prototypes.abs().amax(-1, keepdim=True)).to(dtype)
    values, grads = [], []
    for s in (1.0, scale):
        x = (feats.double() * s).to(dtype).requires_grad_(True)
        p = (protos.double() * s).to(dtype).requires_grad_(True)
        assert bool(torch.isfinite(x).all()) and bool((x != 0).any())
        loss = mlcl_fast.multilabel_contrastive_loss(x, case.labels, p, preset="reg", backend=backend)
        loss.backward()
        values.append(loss.double())
        grads.append((x.grad.double() * s, p.grad.double() * s))  # d loss / d(x s) = grad / s
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}[dtype]
    assert bool(torch.isfinite(values[1])) and rel_err(values[1], values[0], 1e-6) < tol
    for a, b in zip(grads[1], grads[0]):
        assert bool(torch.isfinite(a).all()) and rel_err(a, b, 1e-6) < 10 * tol
