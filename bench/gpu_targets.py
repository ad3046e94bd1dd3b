"""The Triton backend's GPU targets T1-T4 (mlcl_fast/triton/README.md), one row per measurement.

    python -m bench.gpu_targets [--targets T1,T2,T3,T4] [--providers triton,cuda,reference,compile(reference)]
                                [--out DIR] [--budget-s 420] [--smoke]

T1  N = 16384 (B = 8192, V = 2), d = 256, L = 16384 and 262144, 2-20 labels per sample, reg,
    bf16, forward + backward, two label regimes: heavy head (Zipf 1.1: the top label in most
    samples) and XMC-like (Zipf 0.5: the top label in a few per cent of them). Reported: the
    median time (triton.testing.do_bench), peak memory above the inputs, and the share of the
    valid-anchor 4-GEMM limit, 8 R_valid |C| d FLOPs at the bf16 matmul rate measured first.
T2  the same at L = 10^6 (heavy head).
T3  N = 1024, d = 128, L = 128, fp32 and bf16, against torch.compile(reference).
T4  host time of one forward + backward beyond the kernels (wall time to issue the call with
    the GPU idle), and whether it synchronises (torch.cuda.set_sync_debug_mode("error")).
Then, for the Triton provider only, T1 and T3 (bf16) again with MLCL_FAST_TRITON_GRAD=symmetric
(the `grad` column), to choose the default gradient strategy from the measurement.

Points a provider cannot hold (its memory prediction above the free memory) are recorded as
"skip (memory)"; every point runs under the time budget and is written as soon as it is
measured: `targets.csv` and `targets.log` in --out. --smoke runs tiny shapes (the plumbing,
on a GPU or, with the reference provider only, on a CPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from . import labels as bench_labels
from .providers import Inputs, Shape, get_provider

FIELDS = ("target", "provider", "regime", "N", "L", "d", "dtype", "fp32", "grad", "valid_anchors", "columns", "status",
          "median_ms", "peak_MB", "limit_share", "host_ms", "syncs")
REGIMES = {"heavy": 1.1, "xmc": 0.5}   # Zipf exponent of the label frequencies


@dataclass(frozen=True)
class Point:
    target: str
    regime: str
    N: int
    L: int
    d: int
    dtype: str
    fp32: str = "auto"   # MLCL_FAST_TRITON_FP32 of the Triton kernels (fp32 points)
    grad: str = "default"  # MLCL_FAST_TRITON_GRAD of the Triton kernels ("default": unset)


def points(targets: list[str], smoke: bool) -> list[Point]:
    s = 16 if smoke else 1
    out = []
    if "T1" in targets:
        out += [Point("T1", r, 16384 // s, L // s, 256, "bfloat16") for L in (16384, 262144) for r in REGIMES]
    if "T2" in targets:
        out.append(Point("T2", "heavy", 16384 // s, 1_000_000 // s, 256, "bfloat16"))
    if "T3" in targets:
        out += [Point("T3", "heavy", 1024 // s, 128, 128, dt) for dt in ("float32", "bfloat16")]
        # The fp32 dot precisions of the Triton kernels (the option tf32x3 against tf32 and IEEE).
        out += [Point("T3", "heavy", 1024 // s, 128, 128, "float32", p) for p in ("ieee", "tf32", "tf32x3")]
    if "T4" in targets:
        out.append(Point("T4", "heavy", 1024 // s, 128, 128, "bfloat16"))
    # The symmetric backward beside the default strategy (mlcl_fast/triton/README.md), last so
    # that a short budget measures the targets first.
    if "T1" in targets:
        out += [Point("T1", r, 16384 // s, L // s, 256, "bfloat16", grad="symmetric")
                for L in (16384, 262144) for r in REGIMES]
    if "T3" in targets:
        out.append(Point("T3", "heavy", 1024 // s, 128, 128, "bfloat16", grad="symmetric"))
    return out


def build(point: Point, device: str) -> Inputs:
    index = bench_labels.powerlaw_labels(point.N // 2, point.L, exponent=REGIMES[point.regime], seed=0)
    sets = bench_labels.to_label_sets(index, point.L, device).repeat_views(2)
    gen = torch.Generator(device="cpu").manual_seed(7)
    dtype = getattr(torch, point.dtype)

    def leaf(rows):
        return torch.randn(rows, point.d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    return Inputs(leaf(point.N), leaf(point.L), sets, "reg", 0.1)


def valid_anchors(inputs: Inputs) -> int:
    """Anchors with a positive: the N rows that share a label with another column (every row with
    a label: its prototype is a column), and the prototypes of labels some row carries."""
    sets = inputs.labels
    rows = int((sets.count > 0).sum())
    present = int((sets.label_frequency() > 0).sum())
    return rows + present


def matmul_rate(dtype: torch.dtype, device: str) -> float:
    """Best bf16 (or fp32) matmul rate of a few large products, FLOP/s."""
    from triton.testing import do_bench

    best = 0.0
    for m, n, k in ((8192, 8192, 256), (16384, 8192, 256), (8192, 8192, 8192)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        ms = do_bench(lambda: a @ b, warmup=5, rep=50)
        best = max(best, 2 * m * n * k / (ms * 1e-3))
    return best


def measure(point: Point, provider_name: str, device: str, rate: float) -> dict:
    from triton.testing import do_bench

    inputs = build(point, device)
    provider = get_provider(provider_name)
    row = dict(target=point.target, provider=provider_name, regime=point.regime, N=point.N, L=point.L, d=point.d,
               dtype=point.dtype, fp32=point.fp32, grad=point.grad)
    shape = Shape("reg", point.N, point.L, point.d, inputs.labels.width, torch.finfo(getattr(torch, point.dtype)).bits // 8)
    R, C = valid_anchors(inputs), point.N + point.L
    row.update(valid_anchors=R, columns=C)
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 60
    if provider.predict_bytes(shape) > 0.9 * free:
        return dict(row, status=f"skip (memory: {provider.predict_bytes(shape) / 2**30:.0f} GiB predicted)")
    runner = provider.setup(inputs)

    def step():
        runner.full()
        inputs.features.grad = None
        inputs.prototypes.grad = None

    step()  # compile, warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, warmup=3, rep=200 if point.N <= 4096 else 1000)
    limit_ms = 8 * R * C * point.d / rate * 1e3
    row.update(status="ok", median_ms=round(ms, 3), peak_MB=round(peak, 1), limit_share=round(limit_ms / ms, 3))
    if point.target == "T4":
        row.update(host_issue(step))
    return row


def host_issue(step) -> dict:
    """Median wall time to issue one forward+backward with the GPU idle (the host's share), and
    whether the call synchronises (sync debug mode 'error' raises on a synchronising call)."""
    times = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    syncs = "none"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as err:
        syncs = f"yes ({str(err).splitlines()[0][:120]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    times.sort()
    return dict(host_ms=round(times[len(times) // 2], 3), syncs=syncs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="T1,T2,T3,T4")
    ap.add_argument("--providers", default="triton,cuda,reference,compile(reference)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/targets"))
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu_targets needs a CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    log = open(os.path.join(args.out, "targets.log"), "a")
    path = os.path.join(args.out, "targets.csv")
    new = not os.path.exists(path)
    sink = open(path, "a", newline="")
    writer = csv.DictWriter(sink, FIELDS)
    if new:
        writer.writeheader()

    def emit(row: dict) -> None:
        writer.writerow({k: row.get(k, "") for k in FIELDS})
        sink.flush()
        text = json.dumps(row)
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    rate = matmul_rate(torch.bfloat16, "cuda")
    emit(dict(target="rate", provider="torch.matmul bf16", status=f"{rate / 1e12:.0f} TFLOP/s"))
    for point in points(args.targets.split(","), args.smoke):
        for name in args.providers.split(","):
            if point.target == "T2" and name in ("reference", "compile(reference)"):
                continue  # |A| x |C| = 10^12 logits: nothing to measure
            if (point.fp32 != "auto" or point.grad != "default") and name != "triton":
                continue  # the precision and gradient settings are the Triton kernels' own
            if time.monotonic() - start > args.budget_s:
                emit(dict(target=point.target, provider=name, status="not run (time budget)"))
                continue
            os.environ["MLCL_FAST_TRITON_FP32"] = point.fp32
            if point.grad == "default":
                os.environ.pop("MLCL_FAST_TRITON_GRAD", None)
            else:
                os.environ["MLCL_FAST_TRITON_GRAD"] = point.grad
            try:
                emit(measure(point, name, "cuda", rate))
            except Exception as err:  # one failed point must not end the run
                emit(dict(target=point.target, provider=name, regime=point.regime, N=point.N, L=point.L,
                          status=f"error ({type(err).__name__}: {str(err).splitlines()[0][:200]})"))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
