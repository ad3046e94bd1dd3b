"""The blocked algorithm (csrc/cpu/blocked.h: BLAS products on bounded anchor blocks, per-block
label and softmax kernels) that the CUDA backend runs, here on the CPU through the cpp ops
(MLCL_FAST_CPU_ALGORITHM=blocked, read at every call), against the float64 reference and the
brute force: every preset and override, one anchor per block up to all anchors in one block,
ragged shapes, views, tau = 0.01, empty label sets, no valid anchor, anchor ranges, a large
sparse label space, the op's fake kernel (opcheck), determinism, bad settings. It computes in
fp32 (as on the GPU), so tolerances are fp32's.

What this does not check: the CUDA kernels' warp and block reductions and the cuBLAS calls
with half operands (tests/test_cuda.py does, on a GPU)."""
from __future__ import annotations

import pytest
import torch

from cases import (ALL_PRESET_IDS, ALL_PRESETS, assert_backend_matches, assert_matches_brute_force, fresh_seed,
                   random_case, rel_err, to_padded)
from mlcl_fast import multilabel_contrastive_loss, resolve_config
from mlcl_fast.backends import backend_status
from mlcl_fast.inputs import prepare
from mlcl_fast.problem import Problem

if backend_status()["cpp"] != "available":
    pytest.skip(f"cpp backend unavailable: {backend_status()['cpp']}", allow_module_level=True)

from mlcl_fast.backends import cpp, reference  # noqa: E402
from mlcl_fast.backends.native_ops import op_inputs  # noqa: E402

FP32 = dict(rtol_loss=2e-5, rtol_grad=2e-4)
# MiB of workspace: one anchor per block (tiny), a few anchors per block, everything in one block.
WORKSPACES = {"one_row": "1e-6", "few_rows": "0.002", "default": ""}


@pytest.fixture(autouse=True)
def blocked(monkeypatch):
    monkeypatch.setenv("MLCL_FAST_CPU_ALGORITHM", "blocked")


@pytest.fixture(params=list(WORKSPACES))
def workspace(request, monkeypatch):
    monkeypatch.setenv("MLCL_FAST_BLOCK_WORKSPACE_MB", WORKSPACES[request.param])
    return request.param


def _case(key, preset, overrides=None, **kw):
    kw.setdefault("dtype", torch.float32)
    return random_case(fresh_seed("blocked", key, preset, repr(overrides), repr(sorted(kw.items()))), preset,
                       overrides, **kw)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_every_preset_and_override(preset, overrides, workspace):
    assert_backend_matches("cpp", _case("preset", preset, overrides, B=23, V=2, d=9, L=7, empty_rows=2), **FP32)


@pytest.mark.parametrize("preset,overrides", ALL_PRESETS[1::4], ids=ALL_PRESET_IDS[1::4])
def test_matches_brute_force(preset, overrides, monkeypatch):
    monkeypatch.setenv("MLCL_FAST_BLOCK_WORKSPACE_MB", WORKSPACES["few_rows"])
    assert_matches_brute_force("cpp", _case("brute", preset, overrides, B=11, V=2, d=6, L=5, empty_rows=1), **FP32)


@pytest.mark.parametrize("B,V,d,L", [(1, 1, 1, 1), (1, 2, 3, 1), (3, 1, 4, 1), (5, 3, 7, 2), (70, 1, 5, 3),
                                     (33, 2, 65, 9)])
@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_any", "jaccard", "proto"])
def test_ragged_shapes(B, V, d, L, preset, workspace):
    assert_backend_matches("cpp", _case("ragged", preset, None, B=B, V=V, d=d, L=L), **FP32)


@pytest.mark.parametrize("preset,overrides", [("reg", None), ("msc", None), ("supcon_all", None),
                                              ("reg", dict(alpha=0.5)), ("jaccard", dict(prototype_mode="columns", beta=0.0))])
def test_small_temperature(preset, overrides, workspace):
    case = _case("tau", preset, overrides, B=19, V=2, d=12, L=6, temperature=0.01, empty_rows=1)
    assert_backend_matches("cpp", case, rtol_loss=1e-4, rtol_grad=1e-3)


@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_all", "mulsupcon", "proto"])
def test_no_valid_anchor_gives_exact_zeros(preset, workspace):
    """All label sets empty: every anchor is invalid, loss and gradients are exact zeros."""
    case = _case("empty", preset, None, B=9, d=5, L=4, empty_rows=9)
    x = case.features.detach().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.detach().requires_grad_(True)
    losses = multilabel_contrastive_loss(x, case.labels, protos, backend="cpp", num_labels=case.num_labels,
                                         reduction="none", **case.loss_kwargs())
    assert torch.equal(losses, torch.zeros_like(losses))
    losses.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def _problem(case, sample_anchors=None, prototype_anchors=None) -> Problem:
    cfg = resolve_config(case.preset, **case.overrides)
    base = prepare(case.features, case.labels, case.prototypes, cfg, case.temperature)
    return Problem(base.samples, base.prototypes, base.labels, cfg, base.temperature, sample_anchors,
                   prototype_anchors)


@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors", [
    ("reg", (0, 0), (2, 9)), ("reg", (5, 17), (0, 0)), ("reg", (3, 40), (1, 4)), ("supcon_any", (7, 31), None),
    ("msc", (0, 40), None), ("proto", (12, 13), None)])
def test_anchor_ranges(preset, sample_anchors, prototype_anchors, workspace):
    """Anchor ranges (the API anchors everything; the op takes any): per-anchor losses and the
    gradients of a random weighting of them, against the reference on the same Problem."""
    case = _case("ranges", preset, None, B=20, V=2, d=6, L=9, density=0.25)
    coeffs = None
    results = []
    for backend in (cpp, reference):
        problem = _problem(case, sample_anchors, prototype_anchors)
        samples = problem.samples.detach().requires_grad_(True)
        protos = None if problem.prototypes is None else problem.prototypes.detach().requires_grad_(True)
        problem.samples, problem.prototypes = samples, protos
        loss, valid = backend.anchor_losses(problem)
        if coeffs is None:
            coeffs = torch.rand(loss.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
        inputs = [samples] if protos is None else [samples, protos]
        grads = torch.autograd.grad((loss * coeffs).sum(), inputs, allow_unused=True)
        results.append((loss.detach(), valid, [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]))
    (loss, valid, grads), (ref_loss, ref_valid, ref_grads) = results
    assert valid.any() and torch.equal(valid, ref_valid)
    assert rel_err(loss, ref_loss, 1.0) < 2e-5
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref, 1e-3) < 2e-4


@pytest.mark.parametrize("preset,overrides", [("supcon_any", None), ("jaccard", None), ("msc", None),
                                              ("reg", None), ("reg", dict(f="union"))])
def test_large_sparse_label_space(preset, overrides):
    case = _case("sparse", preset, overrides, B=48, V=2, d=16, L=3000, density=0.002)
    assert_backend_matches("cpp", case, **FP32)


def test_float64_inputs_are_computed_in_fp32():
    case = _case("fp64", "reg", None, B=21, V=2, d=7, L=6, dtype=torch.float64)
    assert_backend_matches("cpp", case, **FP32)
    loss = multilabel_contrastive_loss(case.features, case.labels, case.prototypes, backend="cpp",
                                       num_labels=case.num_labels, **case.loss_kwargs())
    assert loss.dtype == torch.float64


def test_agrees_with_the_fused_cpu_kernels(monkeypatch, workspace):
    """The two CPU algorithms on one fp32 case: per-anchor losses and gradients agree to fp32."""
    case = _case("fused", "reg", None, B=30, V=2, d=10, L=8, empty_rows=2)
    out = {}
    for algorithm in ("blocked", "fused"):
        monkeypatch.setenv("MLCL_FAST_CPU_ALGORITHM", algorithm)
        x = case.features.detach().clone().requires_grad_(True)
        p = case.prototypes.detach().clone().requires_grad_(True)
        loss = multilabel_contrastive_loss(x, case.labels, p, backend="cpp", num_labels=case.num_labels,
                                           reduction="none", **case.loss_kwargs())
        loss.sum().backward()
        out[algorithm] = (loss.detach(), x.grad, p.grad)
    for a, b in zip(out["blocked"], out["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deterministic(workspace):
    case = _case("det", "msc", None, B=40, V=2, d=12, L=9)
    runs = []
    for _ in range(2):
        x = case.features.detach().clone().requires_grad_(True)
        p = case.prototypes.detach().clone().requires_grad_(True)
        loss = multilabel_contrastive_loss(x, case.labels, p, backend="cpp", num_labels=case.num_labels,
                                           **case.loss_kwargs())
        loss.backward()
        runs.append((loss.detach(), x.grad, p.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_opcheck(preset):
    """The shared fake kernel and autograd registration (native_ops.py) describe the blocked path."""
    case = _case("opcheck", preset, None, B=10, d=6, L=5)
    torch.library.opcheck(torch.ops.mlcl_fast.anchor_loss_forward, op_inputs(_problem(case)),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_backward_reuses_the_forward_label_preparation(preset, monkeypatch):
    """The forward returns its label preparation (label_prep: the columns' inverted label index,
    label counts, int32 row labels) and the backward reads it instead of preparing again: with
    the forward's it equals the backward that prepares for itself, bit for bit; given another
    label set's preparation (check_values=False: not compared) it computes that set's gradient,
    so the backward does read what it is given. The fake kernel knows its size; opcheck covers
    the backward with it."""
    from mlcl_fast.backends import native_ops

    monkeypatch.setenv("MLCL_FAST_BLOCK_WORKSPACE_MB", WORKSPACES["few_rows"])
    case = _case("prep", preset, None, B=12, V=2, d=6, L=7, density=0.4)
    args = op_inputs(_problem(case))
    rows, cols, row_labels, col_labels = args[:4]
    out = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    prep = out[5]
    assert prep.dtype == torch.int32
    assert prep.numel() == native_ops.label_prep_size(rows, cols, row_labels, col_labels, case.num_labels) > 0
    grad = torch.rand(rows.shape[0], generator=torch.Generator().manual_seed(3))
    bwd = (grad, rows, cols, *args[2:5], *out[2:5], *args[5:])
    fresh = torch.ops.mlcl_fast.anchor_loss_backward(*bwd)
    reused = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, label_prep=prep)
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))
    torch.library.opcheck(torch.ops.mlcl_fast.anchor_loss_backward.default, bwd, {"label_prep": prep},
                          test_utils=("test_schema", "test_faketensor"))
    # Another label set of the same shapes: its preparation drives the backward.
    other = torch.roll(row_labels, 1, 0), torch.roll(col_labels, 1, 0)
    other_prep = torch.ops.mlcl_fast.anchor_loss_forward(rows, cols, *other, *args[4:])[5]
    assert not torch.equal(other_prep, prep)
    expect = torch.ops.mlcl_fast.anchor_loss_backward(grad, rows, cols, *other, *bwd[5:])
    given = torch.ops.mlcl_fast.anchor_loss_backward(*bwd, label_prep=other_prep)  # check_values=False
    assert all(torch.equal(a, b) for a, b in zip(expect, given))
    assert not torch.equal(given[0], fresh[0])


def test_label_prep_errors_name_the_argument():
    """A label preparation of the wrong dtype, size or device, or (check_values=True) not the
    forward's for these labels, is refused with an error naming label_prep."""
    case = _case("prep_errors", "reg", None, B=8, V=2, d=4, L=5)
    args = op_inputs(_problem(case))
    out = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    bwd = (torch.ones(args[0].shape[0]), *args[:2], *args[2:5], *out[2:5], *args[5:-2])
    prep = out[5]
    for bad in (prep.long(), prep[:-1], prep.view(1, -1)):
        with pytest.raises(RuntimeError, match="label_prep: expected"):
            torch.ops.mlcl_fast.anchor_loss_backward(*bwd, check_values=True, label_prep=bad)
    wrong = prep.clone()
    wrong[-1] += 1  # an int32 row label of the last anchor
    with pytest.raises(RuntimeError, match="label_prep: not anchor_loss_forward's"):
        torch.ops.mlcl_fast.anchor_loss_backward(*bwd, check_values=True, label_prep=wrong)


@pytest.mark.parametrize("name,value", [("MLCL_FAST_CPU_ALGORITHM", "tiles"), ("MLCL_FAST_BLOCK_WORKSPACE_MB", "-1"),
                                        ("MLCL_FAST_BLOCK_WORKSPACE_MB", "lots")])
def test_bad_settings_are_named(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    case = _case("settings", "supcon_any", None, B=6, d=4, L=3)
    with pytest.raises(RuntimeError, match=name):
        multilabel_contrastive_loss(case.features, case.labels, backend="cpp", num_labels=case.num_labels,
                                    **case.loss_kwargs())


# ------------------------------------------------------------------- anchors left out of the ops
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_left_out_anchors_are_never_valid(preset, overrides):
    """Problem.candidate_anchors keeps every valid anchor (a sparse label space, so many anchors,
    prototypes above all, share no label with any other column), and the losses with the others
    left out of the op equal the op's over every anchor."""
    from mlcl_fast.backends import native_ops

    case = _case("candidates", preset, overrides, B=14, V=2, d=6, L=40, density=0.04, empty_rows=2)
    problem = _problem(case)
    every_loss, every_valid = torch.ops.mlcl_fast.anchor_loss_forward(*op_inputs(problem))[:2]
    candidate = problem.candidate_anchors()
    assert not bool((every_valid & ~candidate).any()), "a valid anchor was left out"
    assert bool((~candidate).any()), "nothing to leave out: the case does not test the compaction"
    loss, valid = native_ops.anchor_losses(problem)
    assert torch.equal(valid, every_valid)
    torch.testing.assert_close(loss, every_loss, rtol=1e-6, atol=1e-7)


def test_left_out_anchors_reach_no_op(monkeypatch):
    """reg with most labels absent from the batch: the op sees only the candidate anchors (with
    check_values=True), every anchor when the caller forbids host reads; same loss and gradients."""
    from mlcl_fast.backends import native_ops

    case = _case("compaction", "reg", None, B=6, V=2, d=8, L=50, density=0.05)
    seen = []
    forward = torch.ops.mlcl_fast.anchor_loss_forward

    def counting(*args, **kwargs):
        seen.append(args[0].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(native_ops.torch.ops.mlcl_fast, "anchor_loss_forward", counting)
    results = []
    for check_values in (True, False):
        x = case.features.detach().clone().requires_grad_(True)
        p = case.prototypes.detach().clone().requires_grad_(True)
        loss = multilabel_contrastive_loss(x, to_padded(case.labels, case.seed), p, preset="reg", backend="cpp",
                                           check_values=check_values, label_format="indices", num_labels=50)
        results.append((loss.detach(), *torch.autograd.grad(loss, [x, p])))
    assert seen[0] < 12 + 50 and seen[-1] == 12 + 50, seen
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
