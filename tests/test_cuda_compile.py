"""Checks of the CUDA backend that need no GPU.

1. The kernel sources compile with the local nvcc for sm_90 (no torch headers involved).
2. The host model (csrc/cuda/testing/host_model.cpp) runs the per-pair and per-anchor formulas the
   kernels execute (csrc/cuda/pair_math.cuh) in plain loops; it must match the reference backend on
   every preset and override, anchor ranges and edge cases, value and gradient.
What neither checks: the kernels' tiling, shared memory, shuffles and barriers (tests/test_cuda.py
does, on a GPU).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mlcl_fast.labels import as_label_sets
from mlcl_fast.presets import resolve_config
from mlcl_fast.problem import Problem
from mlcl_fast.reference import anchor_losses

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
CXX = shutil.which("g++") or shutil.which("c++")

WEIGHTING = {"any": 0, "all": 1, "jaccard": 2, "label": 3}
FACTOR = {"one": 0, "union": 1, "overlap": 2}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_kernels_compile_for_sm90(tmp_path):
    cmd = [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
           "-c", str(CUDA_DIR / "kernels.cu"), "-o", str(tmp_path / "kernels.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"nvcc failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "kernels.o").stat().st_size > 0


@pytest.fixture(scope="module")
def host_model(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("host_model") / "host_model.so"
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-I", str(CUDA_DIR),
           str(CUDA_DIR / "testing" / "host_model.cpp"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"host model does not compile:\n{out.stderr}"
    fn = ctypes.CDLL(str(lib)).mlcl_host_model
    P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    fn.argtypes = [P, P, I64, I64, I64, I64, P, P, I32, P, P, I32, P, I64, I32, I32, F32, F32, F32, I32,
                   P, P, P, P, P, P]
    fn.restype = ctypes.c_int
    return fn


def run_host_model(fn, problem: Problem, grad_loss: torch.Tensor):
    """(loss, valid, grad of the samples, grad of the prototypes) from the host model."""
    cfg = problem.config
    x = problem.samples.detach().float()
    protos = problem.prototypes.detach().float() if cfg.uses_prototypes else None
    lo, hi = problem.sample_anchors
    plo, phi = problem.prototype_anchors
    rows = torch.cat([x[lo:hi], protos[plo:phi]]) if phi > plo else x[lo:hi].clone()
    cols = torch.cat([x, protos]) if protos is not None else x.clone()
    row_sets, col_sets = problem.anchor_labels(), problem.column_labels()
    row_lab, row_cnt = row_sets.index.int().contiguous(), row_sets.count.int().contiguous()
    col_lab, col_cnt = col_sets.index.int().contiguous(), col_sets.count.int().contiguous()
    self_col = problem.anchor_columns().contiguous()
    m, d = rows.shape[0], x.shape[1]
    g = grad_loss.float().contiguous()
    loss = torch.zeros(m)
    valid = torch.zeros(m, dtype=torch.uint8)
    log_denom = torch.zeros(m)
    grad_rows = torch.zeros(m, d)
    grad_cols = torch.zeros(cols.shape[0], d)
    rows, cols = rows.contiguous(), cols.contiguous()
    rc = fn(rows.data_ptr(), cols.data_ptr(), m, cols.shape[0], x.shape[0], d,
            row_lab.data_ptr(), row_cnt.data_ptr(), row_lab.shape[1], col_lab.data_ptr(), col_cnt.data_ptr(),
            col_lab.shape[1], self_col.data_ptr(), problem.labels.num_labels, WEIGHTING[cfg.weighting],
            FACTOR[cfg.f], cfg.alpha, cfg.beta, problem.temperature, int(cfg.reg), g.data_ptr(),
            loss.data_ptr(), valid.data_ptr(), log_denom.data_ptr(), grad_rows.data_ptr(), grad_cols.data_ptr())
    assert rc == 0
    n = x.shape[0]
    grad_x = grad_cols[:n].clone()
    grad_x[lo:hi] += grad_rows[: hi - lo]
    grad_p = None
    if protos is not None:
        grad_p = grad_cols[n:].clone()
        grad_p[plo:phi] += grad_rows[hi - lo:]
    return loss, valid.bool(), grad_x, grad_p


def make_problem(preset, batch=7, dim=5, num_labels=6, views=1, temperature=0.1, seed=0, empty_rows=(),
                 sample_anchors=None, prototype_anchors=None, **overrides) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    cfg = resolve_config(preset, **overrides)
    dense = torch.rand(batch, num_labels, generator=gen) < 0.35
    dense[1::3] = dense[0:-1:3][: len(dense[1::3])]  # repeated label sets, so "all" has positives
    for r in empty_rows:
        dense[r] = False
    labels = as_label_sets(dense, batch, num_labels).repeat_views(views)
    n = batch * views
    x = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
    protos = None
    if cfg.uses_prototypes:
        protos = torch.nn.functional.normalize(torch.randn(num_labels, dim, generator=gen, dtype=torch.float64), dim=1)
    return Problem(x, protos, labels, cfg, temperature, sample_anchors, prototype_anchors)


def reference_with_grads(problem: Problem, grad_loss: torch.Tensor):
    x = problem.samples.detach().clone().requires_grad_(True)
    protos = problem.prototypes.detach().clone().requires_grad_(True) if problem.prototypes is not None else None
    ref = Problem(x, protos, problem.labels, problem.config, problem.temperature, problem.sample_anchors,
                  problem.prototype_anchors)
    loss, valid = anchor_losses(ref)
    inputs = [x] if protos is None else [x, protos]
    grads = torch.autograd.grad((loss * grad_loss.double()).sum(), inputs, allow_unused=True)
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    gp = None
    if protos is not None:
        gp = grads[1] if grads[1] is not None else torch.zeros_like(protos)
    return loss.detach(), valid, gx, gp


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def check_against_reference(fn, problem: Problem, seed=1):
    grad_loss = torch.rand(problem.num_anchors, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    loss, valid, gx, gp = run_host_model(fn, problem, grad_loss)
    ref_loss, ref_valid, ref_gx, ref_gp = reference_with_grads(problem, grad_loss)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    if ref_gx.norm() > 0:
        assert rel(gx, ref_gx) < 1e-4
    else:
        assert gx.abs().max() == 0
    if ref_gp is not None:
        if ref_gp.norm() > 0:
            assert rel(gp, ref_gp) < 1e-4
        else:
            assert gp.abs().max() == 0
    return loss, valid


PRESETS = ["supcon_any", "supcon_all", "jaccard", "mulsupcon", "msc", "proto", "reg_noreg", "reg"]


@pytest.mark.parametrize("preset", PRESETS)
def test_host_model_presets(host_model, preset):
    loss, valid = check_against_reference(host_model, make_problem(preset, seed=3))
    assert valid.any()  # the case exercises real positives


OVERRIDES = [
    ("reg", dict(alpha=0.5)),
    ("reg", dict(alpha=-1.0)),
    ("reg", dict(f="union")),
    ("reg", dict(f="one", beta=0.3)),
    ("reg", dict(beta=0.0)),
    ("reg", dict(prototype_mode="columns")),
    ("reg", dict(weighting="jaccard")),
    ("reg", dict(weighting="any", prototype_mode="none")),
    ("reg", dict(weighting="all", beta=2.0)),
    ("msc", dict(prototype_mode="rows", f="overlap", alpha=2.0)),
    ("msc", dict(beta=0.0)),
    ("supcon_all", dict(prototype_mode="rows", reg=True)),
    ("jaccard", dict(prototype_mode="columns", beta=0.0)),
    ("mulsupcon", dict(reg=True)),
]


@pytest.mark.parametrize("preset,overrides", OVERRIDES, ids=[f"{p}-{o}" for p, o in OVERRIDES])
def test_host_model_overrides(host_model, preset, overrides):
    check_against_reference(host_model, make_problem(preset, seed=5, **overrides))


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_host_model_views_small_temperature_empty_sets(host_model, preset):
    problem = make_problem(preset, batch=5, views=2, temperature=0.01, empty_rows=(0, 3), seed=7)
    loss, valid = check_against_reference(host_model, problem)
    assert not valid[0] and not valid[1] and not valid[6]  # rows of empty label sets
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors", [
    ("reg", (2, 6), (1, 4)), ("reg", (3, 3), (2, 3)), ("reg", (0, 8), (0, 0)),
    ("jaccard", (2, 6), None), ("proto", (5, 8), None)])
def test_host_model_anchor_ranges(host_model, preset, sample_anchors, prototype_anchors):
    problem = make_problem(preset, batch=8, seed=11, sample_anchors=sample_anchors,
                           prototype_anchors=prototype_anchors)
    check_against_reference(host_model, problem)


def test_host_model_no_valid_anchor_is_zero(host_model):
    problem = make_problem("supcon_all", batch=4, seed=2, empty_rows=(0, 1, 2, 3))
    grad_loss = torch.ones(problem.num_anchors, dtype=torch.float64)
    loss, valid, gx, _ = run_host_model(host_model, problem, grad_loss)
    assert not valid.any() and loss.abs().max() == 0 and gx.abs().max() == 0


def test_host_model_detects_a_wrong_formula(host_model):
    """The comparison has teeth: the reference under another config disagrees with the model."""
    problem = make_problem("reg", seed=3)
    other = Problem(problem.samples, problem.prototypes, problem.labels, resolve_config("reg", alpha=0.5),
                    problem.temperature)
    grad_loss = torch.ones(problem.num_anchors, dtype=torch.float64)
    loss, *_ = run_host_model(host_model, other, grad_loss)
    ref_loss, *_ = reference_with_grads(problem, grad_loss)
    assert not torch.allclose(loss.double(), ref_loss, rtol=1e-3, atol=1e-3)
