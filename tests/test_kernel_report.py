"""The static kernel report (bench/kernels.py): the Triton kernels of the default preset (and of
the dense label regime, and of pair-centric weights over a large label space), compiled ahead of
time for sm_90 (Hopper) on this CPU, use wgmma tensor-core instructions in every matrix product
and spill no registers, for bf16 and fp16 features at d = 128 and d = 256.

The report compiles for a GPU, so it runs in its own process without TRITON_INTERPRET (the
interpreter tests of this suite set it for theirs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

# Not imported here: test_triton.py must be the first to import triton in this process (it
# sets TRITON_INTERPRET first); the report itself runs in a subprocess.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

REPO = Path(__file__).resolve().parents[1]


def _report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MLCL_FAST_TRITON_TILE",
                                                              "MLCL_FAST_TRITON_LABELS", "MLCL_FAST_AUTOTUNE")}
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--json", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1200)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no report rows (exit {out.returncode}): {out.stderr[-2000:]}"
    return rows


@pytest.fixture(scope="module")
def reg_report():
    return _report("--preset", "reg", "--dtype", "bfloat16", "--dtype", "float16", "--dim", "128", "--dim", "256")


def test_every_matrix_kernel_uses_wgmma_and_none_spills(reg_report):
    points = {(r["dtype"], r["dim"]) for r in reg_report}
    assert points == {(dt, d) for dt in ("bfloat16", "float16") for d in (128, 256)}
    for r in reg_report:
        where = f"{r['kernel']} [{r['meta']}] {r['dtype']} d={r['dim']}"
        assert r["stack"] == 0, f"{where}: {r['stack']} bytes of spilled registers"
        if r["dots"]:
            assert r["counts"]["HMMA"] == 0 and r["counts"]["HGMMA"] > 0, f"{where}: {r['counts']}"
    # The three sweeps of the loss are there, each with its products on tensor cores.
    for dt in ("bfloat16", "float16"):
        for d in (128, 256):
            names = {r["kernel"] for r in reg_report if r["dtype"] == dt and r["dim"] == d and r["dots"]}
            assert {"stats_kernel", "rows_kernel", "cols_free_kernel"} <= names, names


def test_dense_label_regime_uses_wgmma_and_none_spills():
    """Weights other than the closed form's over at most 64 labels (the dense regime): overlaps
    from one fp16 dot per tile, label-centric sums as split dots, and the column gradient
    transposed (cols_dense_kernel), so these kernels are on wgmma too."""
    rows = _report("--preset", "supcon_any", "--preset", "jaccard", "--preset", "msc", "--labels", "50",
                   "--dim", "128", "--dim", "256")
    assert {r["preset"] for r in rows} == {"supcon_any", "jaccard", "msc"}
    assert all("MODE=5" in r["meta"] for r in rows if r["kernel"] in ("stats_kernel", "rows_kernel"))
    assert {(r["preset"], r["dim"]) for r in rows if r["kernel"] == "cols_dense_kernel"} == \
        {(p, d) for p in ("supcon_any", "jaccard", "msc") for d in (128, 256)}
    bad = [f"{r['kernel']} [{r['meta']}] d={r['dim']}: {r['stack']} B, {r['counts']}" for r in rows if not r["passes"]]
    assert not bad, bad


def test_large_label_space_pairs_regime_uses_wgmma_and_none_spills():
    """Weights outside the closed form over 16384 power-law labels (pair-centric, and msc's
    label-centric ones): the default is the pairs regime with a 64-label head, whose sweeps are
    the dense label mode's kernels (wgmma, no spills); the listed pairs' kernels have no tl.dot."""
    presets = ("supcon_any", "jaccard", "msc")
    rows = _report(*[a for p in presets for a in ("--preset", p)], "--dim", "128", "--dim", "256")
    points = {(p, d) for p in presets for d in (128, 256)}
    sweeps = [r for r in rows if r["kernel"] in ("stats_kernel", "rows_kernel")]
    assert {(r["preset"], r["dim"]) for r in sweeps} == points
    assert all("MODE=5" in r["meta"] for r in sweeps), [r["meta"] for r in sweeps]
    assert {(r["preset"], r["dim"]) for r in rows if r["kernel"] == "cols_dense_kernel"} == points
    assert any(r["kernel"] == "pair_dots_kernel" for r in rows)  # the tail's pair list
    bad = [f"{r['kernel']} [{r['meta']}] d={r['dim']}: {r['stack']} B, {r['counts']}" for r in rows if not r["passes"]]
    assert not bad, bad


def test_tf32x3_sweeps_use_wgmma_and_none_spills():
    """fp32 features with MLCL_FAST_TRITON_FP32=tf32x3: the anchor-owned sweeps (statistics, rows)
    run their three tf32 products per dot on wgmma without spills at d = 128 and 256 (64-feature
    chunks); the setting reaches the kernels."""
    rows = _report("--dtype", "float32", "--fp32", "tf32x3", "--samples", "1024", "--labels", "4096")
    sweeps = [r for r in rows if r["kernel"] in ("stats_kernel", "rows_kernel")]
    assert {(r["kernel"], r["dim"]) for r in sweeps} == {(k, d) for k in ("stats_kernel", "rows_kernel")
                                                          for d in (128, 256)}
    for r in sweeps:
        assert "PRECISION=tf32x3" in r["meta"] and "K=64" in r["meta"], r["meta"]
        assert r["passes"], f"{r['kernel']} [{r['meta']}] d={r['dim']}: {r['stack']} B, {r['counts']}"


def test_symmetric_backward_uses_wgmma_and_none_spills():
    """MLCL_FAST_TRITON_GRAD=symmetric (reg and mulsupcon): the symmetric column kernel (a second
    set of pair tiles and two more head dots per tile) and the anchor rows' sweep over the gathered
    columns compile to wgmma without spills, bf16 and fp16 at d = 128 and 256."""
    rows = _report("--preset", "reg", "--preset", "mulsupcon", "--dtype", "bfloat16", "--dtype", "float16",
                   "--dim", "128", "--dim", "256", "--grad", "symmetric", "--samples", "1024", "--labels", "4096")
    points = {(p, dt, d) for p in ("reg", "mulsupcon") for dt in ("bfloat16", "float16") for d in (128, 256)}
    for kernel, flag in (("cols_free_kernel", "SYM=1"), ("rows_kernel", "GATHER=1")):
        assert {(r["preset"], r["dtype"], r["dim"]) for r in rows if r["kernel"] == kernel and flag in r["meta"]} \
            == points, kernel
    bad = [f"{r['kernel']} [{r['meta']}] {r['dtype']} d={r['dim']}: {r['stack']} B, {r['counts']}"
           for r in rows if not r["passes"]]
    assert not bad, bad


def test_report_tells_mma_sync_and_spills_apart():
    """The same checks fail where they should: the in-tile label modes still compile to the
    older mma.sync (HMMA) on their small tiles, and a 64 x 64 tile with label loops spills."""
    in_tile = _report("--preset", "supcon_any", "--dim", "128", "--regime", "list")
    assert any(r["dots"] and r["counts"]["HMMA"] > 0 and not r["passes"] for r in in_tile)
    env_tile = dict(os.environ, MLCL_FAST_TRITON_TILE="64,64,4,2")
    env_tile.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "bench.kernels", "--json", "--preset", "supcon_any", "--dim", "128",
                          "--regime", "list"], cwd=REPO, env=env_tile, capture_output=True, text=True, timeout=1200)
    spilled = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 1 and any(r["stack"] > 0 for r in spilled)
