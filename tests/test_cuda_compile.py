"""Checks of the CUDA backend that need no GPU.

1. The kernel sources compile with the local nvcc for sm_90 (no torch headers involved), and the
   launcher (ops_cuda.cpp) passes a C++ syntax check against the installed torch headers.
2. The host model (csrc/cuda/testing/host_model.cpp) runs the per-pair and per-anchor formulas the
   kernels execute (csrc/cuda/pair_math.cuh) in plain loops; it must match the reference backend on
   every preset and override, anchor ranges and edge cases, value and gradient.
3. The backend module: availability reasons, and the op arguments it builds (run through the CPU
   kernels of the same ops). The launcher's label preparation (prepare.h) on CPU tensors (slow).
What none of these checks: the kernels' tiling, shared memory, shuffles and barriers, and the
launcher at run time (tests/test_cuda.py does, on a GPU).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from mlcl_fast.labels import LabelSets, as_label_sets
from mlcl_fast.presets import resolve_config
from mlcl_fast.problem import Problem
from mlcl_fast.reference import anchor_losses

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
CXX = shutil.which("g++") or shutil.which("c++")

WEIGHTING = {"any": 0, "all": 1, "jaccard": 2, "label": 3}
FACTOR = {"one": 0, "union": 1, "overlap": 2}


def _cuda_include():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def compile_jobs(tmp_path_factory):
    """Starts both compilations at once (they are the slow part); each test waits for its own."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    jobs = {}
    if NVCC is not None:
        # setup.py's nvcc flags plus the ones torch's CUDAExtension adds to every nvcc call
        torch_flags = list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))
        jobs["nvcc"] = subprocess.Popen(
            [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
             "-DMLCL_FAST_WITH_CUDA"] + torch_flags + ["-c", str(CUDA_DIR / "kernels.cu"), "-o", str(tmp / "kernels.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cuda_include = _cuda_include()
    if CXX is not None and cuda_include is not None:
        # CPU wheels of torch ship the c10/cuda headers but not this one generated file.
        shim = tmp / "shim" / "c10" / "cuda" / "impl"
        shim.mkdir(parents=True)
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        include = [str(tmp / "shim")] + [str(p) for p in cpp_extension.include_paths()] + [str(cuda_include),
                                                                                         str(ROOT / "csrc")]
        jobs["launcher"] = subprocess.Popen(
            [CXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-Wno-c++20-extensions",
             "-DMLCL_FAST_WITH_CUDA"] + [f"-I{p}" for p in include] + [str(CUDA_DIR / "ops_cuda.cpp")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield tmp, jobs
    for job in jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


def _wait(job, timeout=300):
    out, _ = job.communicate(timeout=timeout)
    return job.returncode, out


def test_kernels_compile_for_sm90(compile_jobs):
    tmp, jobs = compile_jobs
    if "nvcc" not in jobs:
        pytest.skip("nvcc not found")
    rc, out = _wait(jobs["nvcc"])
    assert rc == 0, f"nvcc failed:\n{out}"
    assert (tmp / "kernels.o").stat().st_size > 0


def test_launcher_compiles_against_torch_headers(compile_jobs):
    _, jobs = compile_jobs
    if "launcher" not in jobs:
        pytest.skip("no C++ compiler or CUDA headers")
    rc, out = _wait(jobs["launcher"])
    assert rc == 0, f"ops_cuda.cpp does not compile:\n{out}"


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


# ----------------------------------------------------------------- backend module, label preparation
def test_backend_reports_why_it_is_unavailable():
    from mlcl_fast.backends import backend_status, cuda

    ok, reason = cuda.is_available()
    if ok:
        pytest.skip("the CUDA backend is available here (tests/test_cuda.py covers it)")
    assert reason and backend_status()["cuda"] == reason
    if torch.version.cuda is None:
        assert "CPU-only" in reason
    assert cuda.supports("cuda:0") and not cuda.supports("cpu")


def _cpu_ops_or_skip():
    from mlcl_fast.backends import cpp

    ok, reason = cpp.is_available()
    if not ok:
        pytest.skip(f"CPU ops unavailable: {reason}")


@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors", [
    ("reg", None, None), ("reg", (1, 5), (2, 4)), ("msc", (0, 3), None), ("supcon_any", (2, 7), None)])
def test_op_inputs_through_the_cpu_ops(preset, sample_anchors, prototype_anchors):
    """cuda.op_inputs builds the shared ops' arguments: the CPU kernels of the same ops, fed with
    them, give the reference's per-anchor losses and gradients."""
    _cpu_ops_or_skip()
    from mlcl_fast.backends import cuda

    problem = make_problem(preset, batch=8, seed=13, sample_anchors=sample_anchors, prototype_anchors=prototype_anchors)
    x = problem.samples.detach().clone().requires_grad_(True)
    protos = problem.prototypes.detach().clone().requires_grad_(True) if problem.prototypes is not None else None
    mine = Problem(x, protos, problem.labels, problem.config, problem.temperature, problem.sample_anchors,
                   problem.prototype_anchors)
    loss, valid, *_ = torch.ops.mlcl_fast.anchor_loss_forward(*cuda.op_inputs(mine))
    grad_loss = torch.rand(problem.num_anchors, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    inputs = [x] if protos is None else [x, protos]
    grads = torch.autograd.grad((loss * grad_loss).sum(), inputs, allow_unused=True)
    ref_loss, ref_valid, ref_gx, ref_gp = reference_with_grads(problem, grad_loss)
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_gx, rtol=1e-8, atol=1e-10)
    if protos is not None:
        torch.testing.assert_close(grads[1], ref_gp, rtol=1e-8, atol=1e-10)


PREPARE_BINDINGS = """
#include "cuda/prepare.h"
std::vector<at::Tensor> label_index(at::Tensor col_labels, int64_t num_labels) {
  const auto index = mlcl_fast::cuda_prep::column_label_index(col_labels, num_labels);
  return {index.ptr, index.cols};
}
at::Tensor violations(at::Tensor labels, int64_t num_labels) {
  return mlcl_fast::cuda_prep::label_violations(labels, num_labels);
}
at::Tensor counts(at::Tensor labels) { return mlcl_fast::cuda_prep::label_counts(labels); }
"""


@pytest.fixture(scope="module")
def prepare_ops(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("prepare_build")
    return cpp_extension.load_inline("mlcl_cuda_prepare_check", cpp_sources=[PREPARE_BINDINGS],
                                     functions=["label_index", "violations", "counts"],
                                     extra_include_paths=[str(ROOT / "csrc")], build_directory=str(build),
                                     extra_cflags=["-O0"], verbose=False)


@pytest.mark.slow
def test_prepare_label_index_on_cpu(prepare_ops):
    gen = torch.Generator().manual_seed(4)
    num_labels = 9
    dense = torch.rand(20, num_labels, generator=gen) < 0.3
    dense[3] = False
    sets = as_label_sets(dense, 20, num_labels).concat(LabelSets.singletons(num_labels))
    ptr, cols = prepare_ops.label_index(sets.index, num_labels)
    assert ptr.dtype == torch.int32 and cols.dtype == torch.int32
    for k in range(num_labels):
        expected = torch.nonzero((sets.index == k).any(dim=1)).flatten().int()
        assert torch.equal(cols[ptr[k]:ptr[k + 1]], expected), k
    assert int(ptr[-1]) == int(sets.count.sum())
    assert torch.equal(prepare_ops.counts(sets.index), sets.count.int())
    empty = torch.full((4, 0), -1, dtype=torch.int64)
    ptr0, cols0 = prepare_ops.label_index(empty, 3)
    assert ptr0.tolist() == [0, 0, 0, 0] and cols0.numel() == 0


@pytest.mark.slow
def test_prepare_label_violations_on_cpu(prepare_ops):
    good = torch.tensor([[0, 2, 5], [1, -1, -1], [-1, -1, -1]])
    assert int(prepare_ops.violations(good, 6)) == 0
    for bad in ([[0, 2, 6]], [[2, 0, -1]], [[1, 1, -1]], [[-1, 3, -1]], [[0, -2, -1]]):
        assert int(prepare_ops.violations(torch.tensor(bad), 6)) > 0, bad
