"""bench/compile_trace.py: the Triton backend's public call traces under
torch.compile(fullgraph=True) (dynamo and AOT autograd, forward and backward) on a machine without
a GPU, the tool does fail where tracing breaks (check_values=True reads label values on the
host), and inductor compiles every kernel of it for sm_90. Each run is its own process without TRITON_INTERPRET (the kernels must be JIT functions;
test_triton.py sets the interpreter for this process)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[1]


def _trace(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLCL_FAST_TRITON_GRAD",
                                                              "MLCL_FAST_TRITON_LABELS", "MLCL_FAST_TRITON_TILE")}
    return subprocess.run([sys.executable, "-m", "bench.compile_trace", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_public_call_traces_forward_and_backward():
    out = _trace()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if ": traced" in line]
    # every default case: the closed form (with and without tail labels, the symmetric backward)
    # and an in-tile regime, through the public call and the driver, each with both graphs and
    # its kernels inside them
    assert len(lines) == 7 and all("2 graphs" in line for line in lines), out.stdout
    kernels = {line.split(": traced")[0]: int(line.split(", ")[-1].split()[0]) for line in lines}
    assert kernels["reg:300"] > kernels["reg:12"] > 0  # the tail kernels join with labels outside the head


def test_a_host_read_fails_the_trace():
    out = _trace("--case", "reg:12", "--check-values")
    assert out.returncode == 1 and "reg:12: FAILED" in out.stdout, out.stdout[-2000:]
    assert "data-dependent" in out.stderr + out.stdout


def test_inductor_compiles_every_kernel_for_sm90():
    """Inductor compiles the call and the driver path, forward and backward, every Triton kernel
    for sm_90 (the user kernels as inductor re-generates them, Python floats passed as fp64):
    what failed on the H200 before the kernels cast their float scalars to fp32."""
    out = _trace("--inductor", "--case", "reg:300:symmetric", "--case", "msc:12", "--case", "reg:12::driver")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {line.split(": compiled")[0]: line for line in out.stdout.splitlines() if ": compiled by inductor" in line}
    assert set(lines) == {"reg:300:symmetric", "msc:12", "reg:12::driver"}, out.stdout
    for kernel in ("stats_kernel", "rows_kernel", "tail_anchor_kernel", "tail_column_kernel", "prologue_kernel"):
        assert kernel in lines["reg:300:symmetric"], (kernel, lines["reg:300:symmetric"])
