"""Checks of the CUDA backend that need no GPU.

1. The block kernels (csrc/cuda/block_kernels.cu) compile with the local nvcc for sm_90 (no torch
   headers involved) without register spills, and the launcher (ops_cuda.cpp) passes a C++ syntax
   check against the installed torch headers.
2. The backend module: availability reasons, and the op arguments it builds (run through the CPU
   kernels of the same ops). The value checks the CUDA ops run (check_values_by_count) on CPU
   tensors (slow: it builds an extension). The label index the CUDA ops use is the Python one
   (mlcl_fast/label_index.py, tests/test_label_index.py).
The algorithm itself (the block loop and the formulas the CUDA kernels share, csrc/cpu/block_math.h)
runs on the CPU in tests/test_blocked.py. What none of these checks: the kernels' warp and block
reductions and the cuBLAS calls with half operands (tests/test_cuda.py does, on a GPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from mlcl_fast.labels import as_label_sets
from mlcl_fast.presets import resolve_config
from mlcl_fast.problem import Problem
from mlcl_fast.reference import anchor_losses

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
CXX = shutil.which("g++") or shutil.which("c++")



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
            [NVCC, "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings", "-Xptxas", "-v",
             "-DMLCL_FAST_WITH_CUDA", f"-I{ROOT / 'csrc'}"] + torch_flags
            + ["-c", str(CUDA_DIR / "block_kernels.cu"), "-o", str(tmp / "block_kernels.o")],
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
    assert (tmp / "block_kernels.o").stat().st_size > 0
    entries = re.findall(r"Compiling entry function '(\w+)'", out)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    assert len(entries) == 5 and len(spills) == len(entries), out  # positives, row stats, 3 gradient dtypes
    assert all(a == b == "0" for a, b in spills), f"register spills:\n{out}"


def test_launcher_compiles_against_torch_headers(compile_jobs):
    _, jobs = compile_jobs
    if "launcher" not in jobs:
        pytest.skip("no C++ compiler or CUDA headers")
    rc, out = _wait(jobs["launcher"])
    assert rc == 0, f"ops_cuda.cpp does not compile:\n{out}"


# ------------------------------------------------------------------------------------- helpers
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
#include "cpu/options.h"
void check_by_count(at::Tensor row_labels, at::Tensor col_labels, at::Tensor self_col, int64_t num_cols,
                    int64_t num_labels) {
  const auto opt = mlcl_fast::parse_options(0, num_labels, 0.1, 1.0, "any", "one", 0.0, false);
  mlcl_fast::check_values_by_count(row_labels, col_labels, self_col, num_cols, opt);
}
"""


@pytest.fixture(scope="module")
def prepare_ops(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    build = tmp_path_factory.mktemp("prepare_build")
    # options.cpp includes its header by its own directory; here it is compiled from a temporary one
    options_cpp = (ROOT / "csrc" / "cpu" / "options.cpp").read_text()
    options_cpp = options_cpp.replace('#include "options.h"', '#include "cpu/options.h"')
    return cpp_extension.load_inline("mlcl_cuda_prepare_check", cpp_sources=[options_cpp, PREPARE_BINDINGS],
                                     functions=["check_by_count"],
                                     extra_include_paths=[str(ROOT / "csrc")], build_directory=str(build),
                                     extra_cflags=["-O0"], verbose=False)


@pytest.mark.slow
def test_value_checks_of_the_cuda_ops_on_cpu(prepare_ops):
    """check_values_by_count, the value checks the CUDA ops run (counted on the device, one copy),
    accepts canonical labels and names the argument of every kind of bad entry."""
    good = torch.tensor([[0, 2, 5], [1, -1, -1], [-1, -1, -1]])
    self_col = torch.tensor([0, 1, 2])
    prepare_ops.check_by_count(good, good, self_col, 3, 6)
    for bad in ([[0, 2, 6]], [[2, 0, -1]], [[1, 1, -1]], [[-1, 3, -1]], [[0, -2, -1]]):
        bad_rows = torch.cat([torch.tensor(bad), good[1:]])
        with pytest.raises(RuntimeError, match="row_labels"):
            prepare_ops.check_by_count(bad_rows, good, self_col, 3, 6)
        with pytest.raises(RuntimeError, match="col_labels"):
            prepare_ops.check_by_count(good, bad_rows, self_col, 3, 6)
    for bad_self in ([0, 1, 3], [-1, 1, 2]):
        with pytest.raises(RuntimeError, match="self_col"):
            prepare_ops.check_by_count(good, good, torch.tensor(bad_self), 3, 6)
