"""The C++/CUDA backend against the float64 reference, on a CUDA device.

Every test is marked `gpu` and skipped unless the backend is available (CUDA build of torch,
mlcl_fast._C compiled with CUDA, a device). Run them on a GPU machine with
    MLCL_FAST_REQUIRE_CUDA=1 python -m pytest -q -m gpu tests/test_cuda.py
Shapes are ragged on purpose: anchors, columns and dimensions cross the kernels' 32-wide tiles
and chunks. Tolerances are SPEC's: fp32 1e-3, fp16/bf16 2e-2 (fp64 inputs are computed in fp32).
"""
from __future__ import annotations

import os

import pytest
import torch

import cases
from cases import ALL_PRESET_IDS, ALL_PRESETS, assert_backend_matches, fresh_seed, random_case, rel_err
from mlcl_fast import as_label_sets, multilabel_contrastive_loss, reference, resolve_config
from mlcl_fast.backends import cuda as backend
from mlcl_fast.problem import Problem

AVAILABLE, REASON = backend.is_available()
# On a GPU machine a skipped module would look like success: MLCL_FAST_REQUIRE_CUDA=1 makes an
# unavailable backend (e.g. an extension built without CUDA) an error instead.
if not AVAILABLE and os.environ.get("MLCL_FAST_REQUIRE_CUDA", "0") == "1":
    pytest.fail(f"MLCL_FAST_REQUIRE_CUDA=1 but the CUDA backend is unavailable: {REASON}", pytrace=False)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=f"CUDA backend unavailable: {REASON}")]

FP32 = dict(rtol_loss=1e-3, rtol_grad=1e-3)
HALF = dict(rtol_loss=2e-2, rtol_grad=2e-2)
DTYPES = {torch.float32: FP32, torch.float16: HALF, torch.bfloat16: HALF}


def _case(key, preset="reg", overrides=None, **kw):
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("device", "cuda")
    return random_case(fresh_seed("cuda", key, preset, repr(overrides), repr(sorted(kw.items()))), preset,
                       overrides, **kw)


# ----------------------------------------------------------------------------- presets, dtypes
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_every_preset_and_override(preset, overrides, dtype):
    case = _case("preset", preset, overrides, B=37, V=2, d=45, L=11, empty_rows=2, dtype=dtype)
    assert_backend_matches("cuda", case, **DTYPES[dtype])


@pytest.mark.parametrize("B,V,d,L", [(1, 1, 3, 1), (5, 3, 20, 1), (32, 1, 32, 4), (33, 1, 64, 9), (40, 2, 33, 70),
                                     (7, 1, 5, 40), (130, 1, 130, 17)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc", "jaccard"])
def test_shapes(B, V, d, L, preset):
    case = _case("shapes", preset, None, B=B, V=V, d=d, L=L)
    assert_backend_matches("cuda", case, **FP32)


@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("supcon_any", {}), ("msc", {"reg": True}),
                                              ("jaccard", {"prototype_mode": "rows", "beta": 0.0})])
def test_small_temperature(preset, overrides):
    case = _case("tau", preset, overrides, B=48, d=24, L=7, temperature=0.01)
    assert_backend_matches("cuda", case, **FP32)


@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("mulsupcon", {"f": "union"}), ("supcon_all", {}),
                                              ("msc", {"f": "overlap", "alpha": 0.5})])
def test_large_label_space(preset, overrides):
    """Many labels per sample: long merges and many Z_ik slots per anchor."""
    case = _case("labels", preset, overrides, B=96, d=40, L=400, density=0.04)
    assert_backend_matches("cuda", case, **FP32)


def test_float64_inputs_are_computed_in_fp32():
    case = _case("fp64", "reg", None, B=40, d=30, L=8, dtype=torch.float64)
    assert_backend_matches("cuda", case, **FP32)


@pytest.mark.parametrize("index", range(18))
def test_spec_vectors(spec_vectors, index):
    from test_vectors import load_case

    case, loss, grad_f, grad_p = load_case(spec_vectors, index)
    value, gf, gp = cases.run_loss("cuda", case, dtype=torch.float32, device="cuda")
    assert abs(float(value) - loss) <= 1e-3 * max(abs(loss), 1.0)
    assert rel_err(gf, grad_f, 1e-6) <= 1e-3
    if grad_p is not None:
        assert rel_err(gp, grad_p, 1e-6) <= 1e-3


# ------------------------------------------------------------------------------- anchor ranges
def _problem(case: cases.Case, sample_anchors, prototype_anchors, dtype, device):
    from mlcl_fast.inputs import prepare

    cfg = resolve_config(case.preset, **case.overrides)
    feats = case.features.to(device, dtype).detach().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.to(device, dtype).detach().requires_grad_(True)
    base = prepare(feats, case.labels.to(device), protos, cfg, case.temperature, native_half=True)
    problem = Problem(base.samples, base.prototypes, base.labels, cfg, base.temperature, sample_anchors,
                      prototype_anchors)
    return problem, [t for t in (feats, protos) if t is not None]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors",
                         [("reg", (3, 41), (2, 9)), ("reg", (0, 0), (1, 6)), ("supcon_any", (4, 57), None),
                          ("msc", (17, 18), None), ("mulsupcon", (5, 5), None), ("reg", (50, 70), (0, 0))])
def test_anchor_ranges(preset, sample_anchors, prototype_anchors, dtype):
    """A process's share of anchors: per-anchor losses and their gradients (weighted randomly)."""
    case = _case("ranges", preset, None, B=70, d=37, L=9, dtype=torch.float64)
    problem, inputs = _problem(case, sample_anchors, prototype_anchors, dtype, "cuda")
    losses, valid = backend.anchor_losses(problem)
    ref_problem, ref_inputs = _problem(case.to(dtype=dtype), sample_anchors, prototype_anchors, torch.float64, "cpu")
    ref_losses, ref_valid = reference.anchor_losses(ref_problem)
    assert losses.shape == ref_losses.shape and torch.equal(valid.cpu(), ref_valid)
    assert losses.dtype == torch.float32
    tol = DTYPES[dtype]
    assert rel_err(losses, ref_losses, 1.0) <= tol["rtol_loss"]
    weights = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    if losses.numel() and bool(valid.any()):
        grads = torch.autograd.grad((losses * weights.to(losses)).sum(), inputs, allow_unused=True)
        ref_grads = torch.autograd.grad((ref_losses * weights).sum(), ref_inputs, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            g = torch.zeros_like(r) if g is None else g
            r = torch.zeros_like(g) if r is None else r
            assert rel_err(g, r, 1e-6) <= tol["rtol_grad"]


# ------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "mulsupcon", "proto"])
def test_no_valid_anchor_gives_exact_zeros(preset):
    """Every label set empty (K = 0): no positives anywhere (a prototype's label is carried by no
    other column either) -> loss 0, per-anchor losses 0 and gradients exactly 0."""
    case = _case("empty", preset, None, B=45, d=6, L=5, empty_rows=45)
    assert not case.labels.any()
    feats = case.features.clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.clone().requires_grad_(True)
    labels = torch.full((45, 0), -1, dtype=torch.int64, device="cuda")
    loss = multilabel_contrastive_loss(feats, labels, protos, backend="cuda", num_labels=5, **case.loss_kwargs())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(feats.grad) == 0
    if protos is not None:
        assert torch.count_nonzero(protos.grad) == 0
    losses = multilabel_contrastive_loss(case.features, labels, case.prototypes, backend="cuda", num_labels=5,
                                         reduction="none", **case.loss_kwargs())
    assert torch.count_nonzero(losses) == 0


def test_batch_of_one_is_finite():
    case = _case("one", "supcon_any", None, B=1, d=4, L=3)
    value, gf, _ = cases.run_loss("cuda", case)
    assert value.item() == 0.0 and torch.count_nonzero(gf) == 0


# ------------------------------------------------------------------------ determinism, streams
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("supcon_any", {}), ("msc", {"reg": True}),
                                              ("jaccard", {})])
def test_deterministic(preset, overrides):
    case = _case("determinism", preset, overrides, B=300, d=96, L=40, density=0.1)
    runs = [cases.run_loss("cuda", case) for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_runs_on_the_current_stream():
    case = _case("stream", "reg", None, B=200, d=64, L=20)
    expected = cases.run_loss("cuda", case)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cases.run_loss("cuda", case)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("workspace_mib", [64, None])
def test_memory_is_the_workspace_cap_plus_linear_terms(workspace_mib, monkeypatch):
    """|A| = |C| = 16384 rows: the fp32 |A| x |C| logits alone would be 1 GiB (2 GiB with the
    overlap counts supcon_any needs); the blocks stay within MLCL_FAST_BLOCK_WORKSPACE_MB
    (default 512 MiB), the rest is O((|A| + |C|)(d + K))."""
    if workspace_mib is not None:
        monkeypatch.setenv("MLCL_FAST_BLOCK_WORKSPACE_MB", str(workspace_mib))
    cap = (workspace_mib or 512) * 2**20
    case = _case("memory", "supcon_any", None, B=16384, d=64, L=64, density=0.05)
    feats = case.features.detach().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = multilabel_contrastive_loss(feats, case.labels, backend="cuda", preset="supcon_any", num_labels=64)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < cap + 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset,overrides", [("reg", None), ("msc", None), ("jaccard", None),
                                              ("reg", dict(alpha=0.5)), ("supcon_all", None)])
def test_several_blocks(preset, overrides, dtype, monkeypatch):
    """A workspace of a few anchor rows: many blocks, partial last block, dK accumulated across them."""
    monkeypatch.setenv("MLCL_FAST_BLOCK_WORKSPACE_MB", "0.01")
    case = _case("blocks", preset, overrides, B=150, V=2, d=40, L=13, empty_rows=3, dtype=dtype)
    assert_backend_matches("cuda", case, **DTYPES[dtype])


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_opcheck(preset):
    """The shared op layer (backends/native_ops.py: schema, fake kernel with fp32 statistics on
    CUDA, autograd registration) describes the CUDA kernels."""
    case = _case("opcheck", preset, None, B=24, d=16, L=6)
    problem, _ = _problem(case, None, None, torch.float32, "cuda")
    args = backend.op_inputs(problem)
    torch.library.opcheck(torch.ops.mlcl_fast.anchor_loss_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    outputs = torch.ops.mlcl_fast.anchor_loss_forward(*args)
    assert [t.dtype for t in outputs[2:5]] == [torch.float32] * 3
    assert outputs[5].dtype == torch.int32 and outputs[5].numel() > 0  # the label preparation, reused by the backward
    # its head is the shared label index (mlcl_fast/label_index.py), made on the device
    col_labels, num_labels = args[3], args[6]
    ptr, cols = torch.ops.mlcl_fast.column_label_index(col_labels, num_labels)
    assert ptr.is_cuda and cols.is_cuda
    assert torch.equal(outputs[5][:num_labels + 1 + cols.numel()].long(), torch.cat([ptr, cols]))
    cpu = torch.ops.mlcl_fast.column_label_index(col_labels.cpu(), num_labels)
    assert torch.equal(ptr.cpu(), cpu[0]) and torch.equal(cols.cpu(), cpu[1])
    torch.library.opcheck(torch.ops.mlcl_fast.column_label_index.default, (col_labels, num_labels, 2),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_torch_compile_fullgraph(preset, dtype):
    """The shared fake kernels (backends/native_ops.py) describe the CUDA outputs: dtypes and shapes agree."""
    case = _case("compile", preset, None, B=96, d=48, L=12, dtype=dtype)
    feats = case.features.detach().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.detach().requires_grad_(True)
    # Label parsing reads values on the host, so labels enter the compiled region canonicalised.
    label_sets = as_label_sets(case.labels, feats.shape[0], case.num_labels).to(feats.device)
    fn = lambda f, p: multilabel_contrastive_loss(f, label_sets, p, backend="cuda",  # noqa: E731
                                                  num_labels=case.num_labels, **case.loss_kwargs())
    eager = fn(feats, protos)
    compiled = torch.compile(fn, fullgraph=True)(feats, protos)
    inputs = [t for t in (feats, protos) if t is not None]
    ge = torch.autograd.grad(eager, inputs)
    gc = torch.autograd.grad(compiled, inputs)
    assert compiled.dtype == eager.dtype == torch.float32
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)
    # bf16 gradients: the compiled graph rounds the normalisation's backward at other points than
    # eager mode, one bf16 unit (2^-8 relative) apart in places (seen on an H200 with rtol=1e-3)
    rtol = 1e-3 if dtype == torch.float32 else 2 ** -7
    for a, b in zip(ge, gc):
        assert a.dtype == b.dtype == dtype
        assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=1e-5)


# ------------------------------------------------------------------------------------ op errors
def _corrupt(args: list, which: str, num_labels: int) -> list:
    bad = list(args)
    if which == "row_labels":
        bad[2] = args[2].cpu()
    elif which == "col_labels":
        bad[3] = args[3].clone()
        bad[3][0, 0] = num_labels  # out of the label space
    else:
        bad[4] = args[4] + 1000
    return bad


@pytest.mark.parametrize("which", ["row_labels", "col_labels", "self_col"])
def test_op_errors_name_the_argument(which):
    case = _case("errors", "supcon_any", None, B=6, d=4, L=3)
    problem, _ = _problem(case, None, None, torch.float32, "cuda")
    # check_values=True: the exact host-side checks (False makes them device-side assertions,
    # which end the CUDA context; tests/test_cpp.py runs that path on the CPU)
    bad = _corrupt(list(backend.op_inputs(problem, check_values=True)), which, case.num_labels)
    with pytest.raises(RuntimeError, match=which):
        torch.ops.mlcl_fast.anchor_loss_forward(*bad)
