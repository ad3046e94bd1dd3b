"""Timers (wall clock on the CPU, CUDA events on the GPU) and the matmul rate.

CPU memory (resident set, its resettable peak, glibc's allocator settings for the memory pass)
is read through mlcl_fast.memory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MiB = 1 << 20


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: Optional[int]  # None where the timer does not report it (do_bench)
    # The fastest sample: on a shared machine, the run least disturbed by other work.
    min_ms: Optional[float] = None
    samples_ms: tuple = ()


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of a non-empty list."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    return Timing(quantile(samples_ms, 0.5), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8), len(samples_ms),
                  min(samples_ms), tuple(samples_ms))


def time_cpu(fn: Callable[[], object], prepare: Optional[Callable[[], object]] = None, *, warmup: int = 1,
             min_repeats: int = 3, max_repeats: int = 20, budget_s: float = 1.0) -> Timing:
    """Wall-clock samples of fn(prepare()) (prepare's result passed in, its time not counted).

    Repeats until `budget_s` of measured time is spent, within [min_repeats, max_repeats]."""
    call = (lambda: fn(prepare())) if prepare is not None else fn
    for _ in range(warmup):
        call()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_repeats and (len(samples) < min_repeats or spent < budget_s):
        arg = prepare() if prepare is not None else None
        t0 = time.perf_counter()
        fn(arg) if prepare is not None else fn()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        spent += dt
    return summarize(samples)


def time_cuda(fn: Callable[[], object], prepare: Optional[Callable[[], object]] = None, *, warmup: int = 3,
              min_repeats: int = 5, max_repeats: int = 100, budget_s: float = 0.5) -> Timing:
    """CUDA-event samples of fn(prepare()); the L2 cache is flushed before each sample.

    Without `prepare`, triton.testing.do_bench does the work when Triton is importable."""
    if prepare is None:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            med, p20, p80 = do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1e3)), quantiles=[0.5, 0.2, 0.8])
            return Timing(med, p20, p80, None)
    flush = torch.empty(256 * MiB // 4, dtype=torch.int32, device="cuda")
    call = (lambda: fn(prepare())) if prepare is not None else fn
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_repeats and (len(samples) < min_repeats or spent < budget_s):
        arg = prepare() if prepare is not None else None
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg) if prepare is not None else fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        samples.append(ms)
        spent += ms / 1e3
    return summarize(samples)


# ---------------------------------------------------------------- matmul rate (the roofline's ceiling)

def matmul_rates(device: str, shapes, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Measured dense matmul rate in GFLOP/s over products [m, k] @ [k, n] for (m, n, k) in `shapes`:
    (the highest rate at each product's median time, the highest at its fastest sample).

    Several shapes, because the fastest one differs between machines and thread counts (a square
    product against a similarity-shaped one with a short k); the faster is the fairer ceiling.
    fp32 on CUDA is measured with TF32 allowed: the fused GPU backends may use it (SPEC)."""
    cuda = device.startswith("cuda")
    median_rate = best_rate = 0.0
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        if cuda:
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                t = time_cuda(lambda: a @ b, budget_s=0.3)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            t = time_cpu(lambda: a @ b, warmup=2, min_repeats=5, max_repeats=20, budget_s=0.5)
        flops = 2.0 * m * n * k
        median_rate = max(median_rate, flops / (t.median_ms * 1e-3) / 1e9)
        fastest = t.min_ms if t.min_ms is not None else t.median_ms  # do_bench reports no fastest sample
        best_rate = max(best_rate, flops / (fastest * 1e-3) / 1e9)
    return median_rate, best_rate


def matmul_rate(device: str, dtype: torch.dtype = torch.float32, size: Optional[int] = None) -> float:
    """The median-time rate of one square n×n product, GFLOP/s (the sweep's roofline ceiling)."""
    n = size or (8192 if device.startswith("cuda") else 1024)
    return matmul_rates(device, [(n, n, n)], dtype)[0]
