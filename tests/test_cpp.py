"""The fused C++ CPU backend against the float64 reference: every preset and override, views,
anchor ranges, ragged shapes, label formats, both positive-enumeration strategies, large sparse
label spaces, half and non-contiguous inputs, determinism, op checks and torch.compile."""
from __future__ import annotations

import random

import pytest
import torch

from cases import (ALL_PRESET_IDS, ALL_PRESETS, assert_backend_matches, assert_matches_brute_force, fresh_seed,
                   label_forms, random_case, rel_err, uses_prototypes)
from mlcl_fast import multilabel_contrastive_loss, resolve_config
from mlcl_fast.backends import backend_status
from mlcl_fast.inputs import prepare
from mlcl_fast.problem import Problem

if backend_status()["cpp"] != "available":
    pytest.skip(f"cpp backend unavailable: {backend_status()['cpp']}", allow_module_level=True)

from mlcl_fast.backends import cpp, reference  # noqa: E402

FP64 = dict(rtol_loss=1e-10, rtol_grad=1e-9)
FP32 = dict(rtol_loss=1e-5, rtol_grad=1e-4)
STRATEGIES = ["sparse", "dense"]


@pytest.fixture(params=STRATEGIES)
def strategy(request, monkeypatch):
    """Both positive-pair enumerations (the op reads MLCL_FAST_CPU_POSITIVES at every call)."""
    monkeypatch.setenv("MLCL_FAST_CPU_POSITIVES", request.param)
    return request.param


def power_law_labels(gen: torch.Generator, batch: int, num_labels: int, mean_labels: float = 5.0,
                     exponent: float = 1.1) -> torch.Tensor:
    """Padded indices [batch, K]: label k drawn with probability ~ 1/(k+1)^exponent, 1 + Poisson
    labels per row (repeats collapse), so a few labels are frequent and most are rare or unused."""
    probs = torch.arange(1, num_labels + 1, dtype=torch.float64).pow(-exponent)
    width = int(3 * mean_labels) + 1
    index = torch.multinomial(probs, batch * width, replacement=True, generator=gen).reshape(batch, width)
    counts = 1 + torch.poisson(torch.full((batch,), mean_labels - 1, dtype=torch.float64), generator=gen).long()
    index[torch.arange(width).unsqueeze(0) >= counts.clamp(max=width).unsqueeze(1)] = -1
    return index


# ------------------------------------------------------------------------------ SPEC coverage
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_every_preset_fp64(preset, overrides, strategy):
    seed = fresh_seed("cpp-fp64", preset, sorted(overrides.items()), strategy)
    rng = random.Random(seed)
    case = random_case(seed, preset, overrides, B=rng.randint(2, 12), V=rng.choice([1, 2, 3]), d=rng.randint(2, 9),
                       L=rng.randint(1, 8), density=rng.uniform(0.1, 0.5), empty_rows=rng.randint(0, 2),
                       temperature=rng.choice([0.05, 0.1, 0.5]))
    assert_backend_matches("cpp", case, **FP64)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS[2::5], ids=ALL_PRESET_IDS[2::5])
def test_matches_brute_force(preset, overrides):
    """Against the independent loop-by-loop oracle as well (not only the reference backend)."""
    seed = fresh_seed("cpp-brute", preset, sorted(overrides.items()))
    case = random_case(seed, preset, overrides, B=5, V=2, d=4, L=4, density=0.4, empty_rows=1)
    assert_matches_brute_force("cpp", case, 1e-10, 1e-9)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS[::4], ids=ALL_PRESET_IDS[::4])
def test_several_tiles_fp64(preset, overrides, strategy):
    """More anchors than one row block and more columns than one tile, with ragged tails."""
    seed = fresh_seed("cpp-tiles", preset, sorted(overrides.items()), strategy)
    case = random_case(seed, preset, overrides, B=139, V=2, d=19, L=37, density=0.08, empty_rows=5)
    assert_backend_matches("cpp", case, **FP64)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS[1::3], ids=ALL_PRESET_IDS[1::3])
def test_fp32(preset, overrides):
    seed = fresh_seed("cpp-fp32", preset, sorted(overrides.items()))
    case = random_case(seed, preset, overrides, B=70, V=2, d=32, L=12, density=0.2, dtype=torch.float32,
                       temperature=0.2)
    assert_backend_matches("cpp", case, **FP32)


@pytest.mark.parametrize("B,V,d,L", [(1, 1, 1, 1), (1, 2, 3, 1), (3, 1, 4, 1), (5, 3, 7, 2), (128, 1, 8, 3),
                                     (129, 2, 5, 300), (257, 1, 3, 4), (40, 1, 300, 9)])
@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_any", "jaccard", "proto"])
def test_ragged_shapes(B, V, d, L, preset):
    seed = fresh_seed("cpp-shapes", B, V, d, L, preset)
    case = random_case(seed, preset, B=B, V=V, d=d, L=L, density=min(0.5, 3.0 / L) if L > 3 else 0.4)
    assert_backend_matches("cpp", case, **FP64)


@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_all", "mulsupcon", "proto"])
def test_all_label_sets_empty(preset, strategy):
    """K = 0: no anchor is valid, so the loss and every gradient are exactly zero."""
    case = random_case(fresh_seed("cpp-empty", preset), preset, B=6, V=2, d=5, L=4)
    case.labels[:] = False  # prototype anchors have no positive either: no sample carries their label
    feats = case.features.clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.clone().requires_grad_(True)
    for reduction in ("mean", "none"):
        out = multilabel_contrastive_loss(feats, case.labels, protos, backend="cpp", reduction=reduction,
                                          **case.loss_kwargs())
        assert bool((out == 0).all()), out
        inputs = [feats] if protos is None else [feats, protos]
        grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)


def test_small_temperature_and_half_inputs():
    for preset in ("reg", "msc", "supcon_any"):
        seed = fresh_seed("cpp-tau", preset)
        case = random_case(seed, preset, B=24, V=2, d=16, L=5, density=0.3, temperature=0.01, dtype=torch.float32)
        assert_backend_matches("cpp", case, **FP32)
        for half in (torch.float16, torch.bfloat16):
            # the reference sees the same half-rounded inputs in fp64; only the gradient's own
            # rounding to half precision remains
            h = random_case(seed, preset, B=24, V=2, d=16, L=5, density=0.3, dtype=half)
            assert_backend_matches("cpp", h, rtol_loss=1e-5, rtol_grad=1e-2)


@pytest.mark.parametrize("dtype,temperature,beta", [(torch.float64, 0.002, 1.0), (torch.float32, 0.1, 1e-12),
                                                     (torch.float64, 0.05, 1e-300), (torch.float32, 0.5, 1e8)])
def test_softmax_shift_paths(dtype, temperature, beta):
    """The softmax sums use a fixed per-anchor shift when the logit range (2/tau plus the spread
    of log beta) fits the dtype's exponent range, else a running maximum: both sides of that
    switch, in both dtypes."""
    seed = fresh_seed("cpp-shift", str(dtype), temperature, beta)
    case = random_case(seed, "reg", {"beta": beta}, B=40, V=2, d=12, L=6, density=0.3, temperature=temperature,
                       dtype=dtype)
    assert_backend_matches("cpp", case, **(FP64 if dtype == torch.float64 else FP32))


def test_label_formats_agree():
    seed = fresh_seed("cpp-formats")
    case = random_case(seed, "reg", B=20, V=2, d=6, L=7, density=0.3, empty_rows=1)
    assert_backend_matches("cpp", case, **FP64)
    expected = multilabel_contrastive_loss(case.features, case.labels, case.prototypes, backend="cpp",
                                           reduction="none", **case.loss_kwargs())
    for name, labels in label_forms(case.labels, seed).items():
        got = multilabel_contrastive_loss(case.features, labels, case.prototypes, backend="cpp", reduction="none",
                                          num_labels=case.num_labels, **case.loss_kwargs())
        assert torch.equal(got, expected), name


def test_non_contiguous_inputs():
    seed = fresh_seed("cpp-strided")
    case = random_case(seed, "reg", B=33, V=2, d=10, L=6, density=0.3)
    feats = case.features.transpose(0, 1).contiguous().transpose(0, 1)
    protos = case.prototypes.T.contiguous().T
    assert not feats.is_contiguous() and not protos.is_contiguous()
    out = multilabel_contrastive_loss(feats, case.labels, protos, backend="cpp", **case.loss_kwargs())
    ref = multilabel_contrastive_loss(case.features, case.labels, case.prototypes, backend="reference",
                                      **case.loss_kwargs())
    assert rel_err(out, ref, 1.0) < 1e-12
    # the op itself, with strided rows, columns and labels
    problem = _problem(case)
    args = list(_op_args(problem))
    args[0] = args[0].T.contiguous().T
    args[1] = torch.cat([args[1], args[1]], dim=1)[:, : args[1].shape[1]]
    args[2] = torch.cat([args[2], args[2]], dim=1)[:, : args[2].shape[1]]
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or args[2].is_contiguous())
    strided = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    dense = torch.ops.mlcl_fast.anchor_loss_forward(*_op_args(problem))
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- anchor ranges
def _problem(case, sample_anchors=None, prototype_anchors=None, dtype=None) -> Problem:
    cfg = resolve_config(case.preset, **case.overrides)
    base = prepare(case.features if dtype is None else case.features.to(dtype), case.labels,
                   None if case.prototypes is None else (case.prototypes if dtype is None else case.prototypes.to(dtype)),
                   cfg, case.temperature)
    return Problem(base.samples, base.prototypes, base.labels, cfg, base.temperature, sample_anchors,
                   prototype_anchors)


def _op_args(problem: Problem) -> tuple:
    cfg = problem.config
    x = problem.samples
    lo, hi = problem.sample_anchors
    plo, phi = problem.prototype_anchors
    rows = torch.cat([x[lo:hi], problem.prototypes[plo:phi]]) if phi > plo else x[lo:hi]
    cols = torch.cat([x, problem.prototypes]) if cfg.uses_prototypes else x
    return (rows, cols, problem.anchor_labels().index, problem.column_labels().index, problem.anchor_columns(),
            problem.num_samples, problem.labels.num_labels, problem.temperature, cfg.beta, cfg.weighting, cfg.f,
            cfg.alpha, cfg.reg)


@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors", [
    ("reg", (0, 0), (2, 9)), ("reg", (5, 17), (0, 0)), ("reg", (3, 40), (1, 4)), ("reg_noreg", (39, 40), (8, 9)),
    ("supcon_any", (7, 31), None), ("supcon_any", (4, 4), None), ("msc", (0, 40), None),
    ("proto", (12, 13), None)])
def test_anchor_ranges(preset, sample_anchors, prototype_anchors):
    case = random_case(fresh_seed("cpp-ranges", preset, sample_anchors), preset, B=20, V=2, d=6, L=9, density=0.25)
    coeffs = None
    results = []
    for backend in (cpp, reference):
        problem = _problem(case, sample_anchors, prototype_anchors)
        samples = problem.samples.detach().requires_grad_(True)
        protos = None if problem.prototypes is None else problem.prototypes.detach().requires_grad_(True)
        problem.samples, problem.prototypes = samples, protos
        loss, valid = backend.anchor_losses(problem)
        if coeffs is None:
            coeffs = torch.rand(loss.shape[0], dtype=loss.dtype, generator=torch.Generator().manual_seed(1)) + 0.5
        inputs = [samples] if protos is None else [samples, protos]
        grads = torch.autograd.grad((loss * coeffs).sum(), inputs, allow_unused=True)
        results.append((loss.detach(), valid, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]))
    (loss, valid, grads), (ref_loss, ref_valid, ref_grads) = results
    assert torch.equal(valid, ref_valid)
    assert rel_err(loss, ref_loss, 1.0) < 1e-10
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref, 1e-6) < 1e-9


# ------------------------------------------------------------------------- large label spaces
@pytest.mark.parametrize("preset,overrides", [("supcon_any", {}), ("jaccard", {}), ("mulsupcon", {}),
                                              ("reg", {"prototype_mode": "none"}),
                                              ("reg", {"prototype_mode": "none", "alpha": 0.5})])
def test_large_sparse_label_space(preset, overrides):
    """L = 50,000 with power-law labels: the inverted-index enumeration (the only one used above
    1024 labels) against the reference, which stays affordable without prototype columns."""
    seed = fresh_seed("cpp-sparse-L", preset, sorted(overrides.items()))
    gen = torch.Generator().manual_seed(seed)
    labels = power_law_labels(gen, 96, 50_000)
    features = torch.randn(96, 2, 24, generator=gen, dtype=torch.float64)
    out = {}
    for backend in ("cpp", "reference"):
        x = features.clone().requires_grad_(True)
        loss = multilabel_contrastive_loss(x, labels, preset=preset, backend=backend, num_labels=50_000, **overrides)
        out[backend] = (loss.detach(), torch.autograd.grad(loss, x)[0])
    assert rel_err(out["cpp"][0], out["reference"][0], 1.0) < 1e-10
    assert rel_err(out["cpp"][1], out["reference"][1], 1e-6) < 1e-9


def test_large_sparse_label_space_with_prototypes():
    """L = 1,100 prototypes as anchors and columns (past the bitset limit: sparse path), against
    the reference."""
    seed = fresh_seed("cpp-sparse-protos")
    gen = torch.Generator().manual_seed(seed)
    L = 1100
    labels = power_law_labels(gen, 64, L)
    features = torch.randn(64, 2, 16, generator=gen, dtype=torch.float64)
    protos = torch.randn(L, 16, generator=gen, dtype=torch.float64)
    for preset, overrides in (("reg", {}), ("msc", {"alpha": 0.5, "f": "overlap"})):
        out = {}
        for backend in ("cpp", "reference"):
            x, p = features.clone().requires_grad_(True), protos.clone().requires_grad_(True)
            loss = multilabel_contrastive_loss(x, labels, p, preset=preset, backend=backend, **overrides)
            out[backend] = (loss.detach(), *torch.autograd.grad(loss, [x, p]))
        assert rel_err(out["cpp"][0], out["reference"][0], 1.0) < 1e-10, preset
        for g, ref in zip(out["cpp"][1:], out["reference"][1:]):
            assert rel_err(g, ref, 1e-6) < 1e-9, preset


def test_huge_label_space_runs_in_fp32():
    """REG with 50,000 prototype anchors and columns at N = 128 (too large for the reference's
    dense label matrix): finite, and the fp32 kernels agree with the fp64 ones."""
    gen = torch.Generator().manual_seed(fresh_seed("cpp-huge-L"))
    L = 50_000
    labels = power_law_labels(gen, 64, L)
    features = torch.randn(64, 2, 16, generator=gen, dtype=torch.float64)
    protos = torch.randn(L, 16, generator=gen, dtype=torch.float64)
    out = {}
    for dtype in (torch.float32, torch.float64):
        x, p = features.to(dtype).requires_grad_(True), protos.to(dtype).requires_grad_(True)
        loss = multilabel_contrastive_loss(x, labels, p, preset="reg", backend="cpp")
        out[dtype] = (loss.detach(), *torch.autograd.grad(loss, [x, p]))
        assert all(bool(torch.isfinite(t).all()) for t in out[dtype])
    assert rel_err(out[torch.float32][0], out[torch.float64][0], 1.0) < 1e-5
    for g, ref in zip(out[torch.float32][1:], out[torch.float64][1:]):
        assert rel_err(g, ref, 1e-6) < 1e-4


# -------------------------------------------------------------------- strategies and kernels
def test_strategies_and_gemm_paths_agree(monkeypatch):
    case = random_case(fresh_seed("cpp-paths"), "reg", {"alpha": 0.5}, B=150, V=2, d=12, L=20, density=0.15)
    results = {}
    for positives in ("sparse", "dense", "auto"):
        for gemm in ("blas", "aten"):
            monkeypatch.setenv("MLCL_FAST_CPU_POSITIVES", positives)
            monkeypatch.setenv("MLCL_FAST_CPU_GEMM", gemm)
            results[positives, gemm] = multilabel_contrastive_loss(case.features, case.labels, case.prototypes,
                                                                   backend="cpp", reduction="none",
                                                                   **case.loss_kwargs())
    ref = multilabel_contrastive_loss(case.features, case.labels, case.prototypes, backend="reference",
                                      reduction="none", **case.loss_kwargs())
    for key, value in results.items():
        assert rel_err(value, ref, 1.0) < 1e-10, key


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_deterministic(threads):
    """Bitwise repeatable for a thread count (column gradients reduce per partition of blocks, in
    order), and within fp32 rounding of the single-thread result."""
    case = random_case(fresh_seed("cpp-determinism"), "reg", B=300, V=2, d=48, L=30, density=0.1,
                       dtype=torch.float32)
    before = torch.get_num_threads()
    runs = []
    try:
        for count in (threads, threads, 1):
            torch.set_num_threads(count)
            x = case.features.clone().requires_grad_(True)
            p = case.prototypes.clone().requires_grad_(True)
            loss = multilabel_contrastive_loss(x, case.labels, p, backend="cpp")
            runs.append((loss.detach(), *torch.autograd.grad(loss, [x, p])))
    finally:
        torch.set_num_threads(before)
    for a, b, single in zip(*runs):
        assert torch.equal(a, b)
        assert rel_err(a, single, 1e-6) < 1e-5


def test_bad_arguments_are_named():
    case = random_case(fresh_seed("cpp-errors"), "reg", B=6, d=4, L=3, density=0.5)
    args = _op_args(_problem(case))
    out_of_range = args[2].clone()
    out_of_range[0, 0] = args[6]  # label id == num_labels
    unsorted = torch.nn.functional.pad(args[3], (0, 1), value=-1)
    unsorted[0, :2] = torch.tensor([1, 0])
    bad = [(1, args[1].float(), "cols"), (2, out_of_range, "row_labels"), (3, unsorted, "col_labels"),
           (4, args[4] + 1000, "self_col"), (7, 0.0, "temperature"), (8, -1.0, "beta"), (9, "cosine", "weighting"),
           (10, "square", "pair_factor"), (2, args[2][:-1], "row_labels")]
    for position, value, name in bad:
        trial = list(args)
        trial[position] = value
        with pytest.raises(RuntimeError, match=name):
            torch.ops.mlcl_fast.anchor_loss_forward(*trial)
        # check_values=False (what the public API passes): the value checks are the device-side
        # assertions the CUDA ops make without a host synchronisation (on the CPU they raise at
        # once); shape, dtype and option checks stay host-side
        value_check = position in (2, 3, 4) and value.shape == args[position].shape
        with pytest.raises(RuntimeError, match=f"{name}: some entries" if value_check else name):
            torch.ops.mlcl_fast.anchor_loss_forward(*trial, check_values=False)


def test_device_side_value_checks_give_the_same_results():
    case = random_case(fresh_seed("cpp-check-values"), "reg", B=9, V=2, d=4, L=5, density=0.4)
    args = _op_args(_problem(case))
    for exact, asserted in zip(torch.ops.mlcl_fast.anchor_loss_forward(*args, check_values=True),
                               torch.ops.mlcl_fast.anchor_loss_forward(*args, check_values=False)):
        assert torch.equal(exact, asserted)


@pytest.mark.parametrize("preset,B,V,L,density", [("reg", 150, 2, 40, 0.1), ("supcon_any", 220, 2, 12, 0.2),
                                                   ("msc", 450, 1, 30, 0.1), ("jaccard", 220, 2, 25, 0.15)])
def test_combined_backward_gives_the_same_embedding_gradients(preset, B, V, L, density):
    """combine_self=True (anchors and their own columns are one embedding): the backward sweeps
    the anchor x anchor block once per pair of blocks (csrc/cpu/backward.cpp) and may return an
    anchor's gradient and its column's in one place. Per embedding, grad_rows[i] +
    grad_cols[self_col[i]] (and every other column's gradient) must equal the one-directional
    backward's, in float64 to rounding; with more than 256 valid anchors, so the pairing runs."""
    case = random_case(fresh_seed("cpp-combined", preset), preset, B=B, V=V, d=7, L=L, density=density)
    problem = _problem(case)
    args = _op_args(problem)
    outputs = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    grad = torch.rand(args[0].shape[0], dtype=args[0].dtype, generator=torch.Generator().manual_seed(1))
    grad[::5] = 0.0                                   # anchors without a gradient are skipped either way
    assert int((outputs[1] & (grad != 0)).sum()) >= 256  # enough anchors for the pairing (2 blocks)
    bwd = (grad, args[0], args[1], *args[2:5], *outputs[2:5], *args[5:])
    split_rows, split_cols = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=False)
    rows, cols = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=True)
    self_col = args[4]

    def per_embedding(g_rows, g_cols):
        return g_cols.clone().index_add_(0, self_col, g_rows)

    expected = per_embedding(split_rows, split_cols)
    torch.testing.assert_close(per_embedding(rows, cols), expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    # the pairing did run: the own columns of the anchors with a gradient received nothing there
    paired = self_col[outputs[1] & (grad != 0)]
    assert float(cols[paired].abs().max()) == 0.0 and float(split_cols[paired].abs().max()) > 0.0
    # MLCL_FAST_CPU_SYMMETRIC=off keeps the one-directional backward
    import os
    os.environ["MLCL_FAST_CPU_SYMMETRIC"] = "off"
    try:
        off_rows, off_cols = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=True)
    finally:
        del os.environ["MLCL_FAST_CPU_SYMMETRIC"]
    assert torch.equal(off_rows, split_rows) and torch.equal(off_cols, split_cols)


@pytest.mark.parametrize("preset,overrides,B,V,L,density,dtype,tau,pairs",
                         [("reg", {}, 150, 2, 40, 0.1, torch.float64, 0.1, True),
                          ("reg", {"beta": 0.3}, 150, 2, 40, 0.1, torch.float32, 0.1, True),
                          ("supcon_any", {}, 220, 2, 12, 0.2, torch.float64, 0.1, True),
                          ("jaccard", {}, 220, 2, 25, 0.15, torch.float64, 0.01, True),
                          # sample columns outside the softmax: only the 30 prototypes could pair
                          ("msc", {"beta": 0.0, "prototype_mode": "rows"}, 300, 1, 30, 0.1, torch.float64, 0.1, False),
                          # fp32 at tau = 0.01: logits span more than the fixed shift allows
                          ("jaccard", {}, 220, 2, 25, 0.15, torch.float32, 0.01, False)])
def test_symmetric_forward_gives_the_same_statistics(monkeypatch, preset, overrides, B, V, L, density, dtype, tau,
                                                      pairs):
    """The forward's pairing of symmetric anchor blocks (forward.cpp: fixed shifts only) against
    the one-directional sweep (MLCL_FAST_CPU_SYMMETRIC=off): loss, validity, lse, W_i and
    normalisers to rounding, with per-column beta (0.3 on sample columns); where it cannot pair
    (too few symmetric anchors, no fixed shift) the results are the same bits."""
    case = random_case(fresh_seed("cpp-symmetric-forward", preset), preset, overrides, B=B, V=V, d=7, L=L,
                       density=density, dtype=dtype, temperature=tau)
    args = _op_args(_problem(case))
    monkeypatch.setenv("MLCL_FAST_CPU_SYMMETRIC", "off")
    ref = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    monkeypatch.setenv("MLCL_FAST_CPU_SYMMETRIC", "auto")
    got = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    assert int(ref[1].sum()) >= 256
    assert torch.equal(ref[1], got[1])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b in zip(ref[:1] + ref[2:], got[:1] + got[2:]):
        torch.testing.assert_close(b, a, **tol)
    # where the pairing ran, the sums were added in another order
    assert torch.equal(ref[2], got[2]) != pairs


@pytest.mark.parametrize("preset", ["reg", "mulsupcon"])  # mulsupcon: the closed form's sums too
def test_combined_backward_is_deterministic_per_thread_count(preset):
    case = random_case(fresh_seed("cpp-combined-det", preset), preset, B=200, V=2, d=9, L=30, density=0.1,
                       dtype=torch.float32)
    problem = _problem(case)
    args = _op_args(problem)
    outputs = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    grad = torch.ones(args[0].shape[0])
    bwd = (grad, args[0], args[1], *args[2:5], *outputs[2:5], *args[5:])
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            first = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=True)
            again = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=True)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("preset,overrides,B,anchors,odd_self", [
    ("mulsupcon", {}, 40, None, False),
    ("mulsupcon", {"V": 1, "L": 200, "density": 0.02}, 40, None, False),               # labels no other column carries (Z_ik = 0)
    ("mulsupcon", {"prototype_mode": "rows"}, 40, None, True),
    ("proto", {}, 40, None, False),                                  # beta = 0: samples outside the softmax
    ("proto", {"prototype_mode": "rows"}, 40, ((3, 30), (1, 5)), False),
    ("reg_noreg", {}, 40, None, True),
    ("reg_noreg", {"beta": 0.3}, 40, ((0, 25), (2, 9)), False),
    ("msc", {"f": "one"}, 40, None, False),
    ("reg_noreg", {}, 150, None, False),                             # > 256 valid anchors: the pairing runs
])
def test_closed_form_matches_the_listed_positives(monkeypatch, preset, overrides, B, anchors, odd_self):
    """Label-centric weights with f = 1 and no regulariser take the closed form
    (csrc/cpu/closed.h: W_i, sum_j w_ij s_ij and the weights' gradient from per-label sums of
    embeddings; the sweeps label-free). Against the same ops with the positives listed
    (MLCL_FAST_CPU_CLOSED=off), in float64: every forward output and the per-embedding
    gradients, with and without combine_self, to rounding. odd_self: own columns that carry other
    labels than their anchor, and two anchors sharing one (a direct op call allows both)."""
    shape = dict(V=2, L=9, density=0.3)
    overrides = dict(overrides)
    shape.update({k: overrides.pop(k) for k in shape if k in overrides})
    case = random_case(fresh_seed("cpp-closed", preset, B, shape["V"]), preset, overrides, B=B, d=7, **shape)
    args = list(_op_args(_problem(case, *(anchors or (None, None)))))
    if odd_self:
        self_col = args[4].clone()
        self_col[0] = self_col[1]
        self_col[2] = (self_col[2] + 5) % args[1].shape[0]
        args[4] = self_col
    grad = torch.rand(args[0].shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad[::7] = 0.0

    def run():
        out = torch.ops.mlcl_fast.anchor_loss_forward(*args)
        bwd = (grad, args[0], args[1], *args[2:5], *out[2:5], *args[5:])
        per_embedding = []
        for combine in ((False,) if odd_self else (False, True)):
            g_rows, g_cols = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, combine_self=combine)
            per_embedding.append((g_cols.clone().index_add_(0, args[4], g_rows), g_rows if not combine else None))
        return out, per_embedding

    monkeypatch.setenv("MLCL_FAST_CPU_CLOSED", "off")
    listed, listed_grads = run()
    monkeypatch.setenv("MLCL_FAST_CPU_CLOSED", "auto")
    closed, closed_grads = run()
    assert int(listed[1].sum()) > (256 if B > 100 else 10)
    assert torch.equal(listed[1], closed[1])
    if shape["V"] == 1:  # some valid anchor carries a label no other softmax column carries
        z = listed[4]
        assert bool(((z == 0) & (args[2] >= 0) & listed[1][:, None]).any())
    for a, b in zip(listed[:1] + listed[2:5], closed[:1] + closed[2:5]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * (1.0 + float(a.abs().max())))
    # the closed form ran: its loss sums came in another order
    assert not torch.equal(listed[0], closed[0])
    for (want, want_rows), (got, got_rows) in zip(listed_grads, closed_grads):
        tol = 1e-12 * float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=tol)
        if want_rows is not None:  # without combine_self the rows' own part is separate too
            torch.testing.assert_close(got_rows, want_rows, rtol=1e-10, atol=tol)


def test_closed_form_switch_is_checked(monkeypatch):
    case = random_case(fresh_seed("cpp-closed-env"), "mulsupcon", B=6, V=2, d=4, L=4)
    args = _op_args(_problem(case))
    monkeypatch.setenv("MLCL_FAST_CPU_CLOSED", "sometimes")
    with pytest.raises(RuntimeError, match="MLCL_FAST_CPU_CLOSED"):
        torch.ops.mlcl_fast.anchor_loss_forward(*args)


# ----------------------------------------------------------------- torch.library integration
def test_opcheck():
    case = random_case(fresh_seed("cpp-opcheck"), "reg", B=10, V=2, d=6, L=5, density=0.3)
    problem = _problem(case)
    args = list(_op_args(problem))
    args[0] = args[0].detach().requires_grad_(True)
    args[1] = args[1].detach().requires_grad_(True)
    torch.library.opcheck(torch.ops.mlcl_fast.anchor_loss_forward.default, tuple(args))
    outputs = torch.ops.mlcl_fast.anchor_loss_forward(*[a.detach() if torch.is_tensor(a) else a for a in args])
    grad = torch.rand(args[0].shape[0], dtype=args[0].dtype)
    bwd_args = (grad, args[0].detach(), args[1].detach(), *args[2:5], *outputs[2:5], *args[5:])
    torch.library.opcheck(torch.ops.mlcl_fast.anchor_loss_backward.default, bwd_args)


def test_torch_compile_fullgraph():
    case = random_case(fresh_seed("cpp-compile"), "reg", B=12, V=2, d=8, L=5, density=0.3, dtype=torch.float32)
    base = _problem(case)
    labels = base.labels

    def losses(samples, prototypes):
        problem = Problem(samples, prototypes, labels, base.config, base.temperature)
        loss, valid = cpp.anchor_losses(problem)
        return loss.sum() / valid.sum().clamp(min=1)

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    out = {}
    for name, fn in (("eager", losses), ("compiled", compiled)):
        x = base.samples.detach().clone().requires_grad_(True)
        p = base.prototypes.detach().clone().requires_grad_(True)
        value = fn(x, p)
        out[name] = (value.detach(), *torch.autograd.grad(value, [x, p]))
    for a, b in zip(out["eager"], out["compiled"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_torch_compile_inductor():
    """The default inductor backend compiles around the ops (fake kernels, autograd) as well."""
    case = random_case(fresh_seed("cpp-inductor"), "msc", B=12, V=2, d=8, L=5, density=0.3, dtype=torch.float32)
    base = _problem(case)

    def losses(samples, prototypes):
        loss, valid = cpp.anchor_losses(Problem(samples, prototypes, base.labels, base.config, base.temperature))
        return loss.sum() / valid.sum().clamp(min=1)

    x = base.samples.detach().clone().requires_grad_(True)
    p = base.prototypes.detach().clone().requires_grad_(True)
    value = torch.compile(losses, fullgraph=True)(x, p)
    grads = torch.autograd.grad(value, [x, p])
    expected = losses(x, p)
    assert torch.allclose(value, expected, rtol=1e-6)
    for g, e in zip(grads, torch.autograd.grad(expected, [x, p])):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_any", "jaccard", "mulsupcon"])
def test_public_call_without_value_checks_makes_no_host_read(preset):
    """The native ops' driver path (backends/native_ops.py, shared by cpp and cuda): the public call
    with check_values=False and padded indices, forward and backward, under FakeTensorMode (the
    ops' fake kernels stand in for the devices' kernels, whose value checks are then device-side
    assertions): any read of a tensor's values on the host raises there."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    gen = torch.Generator().manual_seed(fresh_seed("cpp-api-fake", preset))
    B, V, d, L = 10, 2, 8, 40
    index = torch.randint(-1, L, (B, 4), generator=gen)
    protos = torch.randn(L, d, generator=gen)
    kwargs = dict(preset=preset, num_labels=L, label_format="indices", backend="cpp")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        feats = mode.from_tensor(torch.randn(B, V, d, generator=gen)).requires_grad_(True)
        p = mode.from_tensor(protos).requires_grad_(True)
        uses_p = uses_prototypes(preset)
        loss = multilabel_contrastive_loss(feats, index, p if uses_p else None, check_values=False, **kwargs)
        loss.backward()
        assert feats.grad.shape == feats.shape
        with pytest.raises(DataDependentOutputException):  # the host-side checks do read values
            multilabel_contrastive_loss(feats, index, p if uses_p else None, **kwargs)


# Symbols only libstdc++ itself defines: an extension that defines any of them carries a second,
# static copy of the library (how a direct op call with a bad label value crashed on an H200:
# setup.py's link flags).
LIBSTDCXX_OWN_SYMBOLS = ("_ZNSo9_M_insertIlEERSoT_",      # std::ostream::_M_insert<long>
                         "_ZNSt6locale7classicEv",         # std::locale::classic()
                         "_ZNSt8ios_base4InitC1Ev")        # std::ios_base::Init::Init()


def _static_libstdcxx_symbols(library: str) -> list[str]:
    import shutil
    import subprocess
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run(["nm", library], capture_output=True, text=True, check=True).stdout
    defined = {parts[2] for parts in (line.split() for line in listing.splitlines())
               if len(parts) == 3 and parts[1] in "TtWw"}
    return [s for s in LIBSTDCXX_OWN_SYMBOLS if s in defined]


def test_extension_uses_the_shared_libstdcxx():
    """The built extension (CPU or CUDA build) defines none of libstdc++'s own functions."""
    import mlcl_fast._C as ext
    assert _static_libstdcxx_symbols(ext.__file__) == []


@pytest.mark.slow
def test_a_static_libstdcxx_copy_breaks_check_messages_and_the_link_flag_prevents_it(tmp_path):
    """The crash's mechanism on a CPU: a torch extension linked with a static libstdc++ (what
    -static-libstdc++ forces) formats no integer in a TORCH_CHECK message (a truncated message
    here, a segmentation fault on the H200 machine's newer libstdc++); setup.py's
    -l:libstdc++.so.6 in front keeps the shared library even then."""
    import subprocess
    import sys
    import textwrap
    (tmp_path / "ext.cpp").write_text(textwrap.dedent("""
        #include <torch/extension.h>
        void check(int64_t v) { TORCH_CHECK(v < 3, "col_labels: value ", v, " out of range [0, ", 3, ")"); }
        PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check", &check); }
    """))
    script = textwrap.dedent("""
        import sys
        from torch.utils.cpp_extension import load
        flags = {"static": ["-static-libstdc++"], "fixed": ["-l:libstdc++.so.6", "-static-libstdc++"]}[sys.argv[1]]
        mod = load("libstdcxx_" + sys.argv[1], [sys.argv[2]], extra_ldflags=flags, build_directory=sys.argv[3])
        print("library:", mod.__file__)
        try:
            mod.check(5)
        except RuntimeError as err:
            print("message:", str(err).splitlines()[0])
    """)
    results = {}
    for variant in ("static", "fixed"):
        build = tmp_path / variant
        build.mkdir()
        done = subprocess.run([sys.executable, "-c", script, variant, str(tmp_path / "ext.cpp"), str(build)],
                              capture_output=True, text=True, timeout=600)
        lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
        results[variant] = (done.returncode, lines.get("message"), _static_libstdcxx_symbols(lines["library"]))
    rc, message, symbols = results["static"]
    assert symbols, "-static-libstdc++ put no libstdc++ copy into the test extension"
    assert rc != 0 or message != "col_labels: value 5 out of range [0, 3)"
    assert results["fixed"] == (0, "col_labels: value 5 out of range [0, 3)", [])
