"""Where the time of a GPU target point goes: device time per kernel (torch.profiler), the sum of
the kernels against the step's wall time, and the host's share, with and without the public
call's host-side label checks (check_values).

    python -m bench.gpu_profile [--points triton:T1:heavy:16384:1,cuda:T1:heavy:16384:1,...] [--top 12]

A point is PROVIDER:TARGET:REGIME:L:CHECK (CHECK 1 = check_values=True, the default of the public
call; 0 = False: no host reads), on bench.gpu_targets' inputs (N = 16384, d = 256, bf16 for T1;
N = 1024, d = 128 for T3). Per point it prints the median step time (CUDA events, 5 steps after
2 warm-ups), the host time to issue one step with the GPU idle, the device time of the profiled
steps summed over kernels, and the `--top` kernels by device time. A GPU only.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import gpu_targets
from .profile import host_ms, median_ms

DEFAULT_POINTS = ("triton:T1:heavy:16384:1,triton:T1:heavy:16384:0,cuda:T1:heavy:16384:1,"
                  "triton:T1:heavy:262144:0,triton:T3:heavy:128:0")


def parse_point(text: str) -> tuple[str, gpu_targets.Point, bool]:
    try:
        provider, target, regime, L, check = text.split(":")
    except ValueError:
        raise ValueError(f"--points: expected PROVIDER:TARGET:REGIME:L:CHECK, got {text!r}") from None
    if target not in ("T1", "T3"):
        raise ValueError(f"--points: target must be T1 or T3, got {target!r}")
    if regime not in gpu_targets.REGIMES:
        raise ValueError(f"--points: regime must be one of {list(gpu_targets.REGIMES)}, got {regime!r}")
    if check not in ("0", "1"):
        raise ValueError(f"--points: CHECK must be 0 or 1, got {check!r}")
    N, d = (16384, 256) if target == "T1" else (1024, 128)
    return provider, gpu_targets.Point(target, regime, N, int(L), d, "bfloat16"), check == "1"


def step_fn(provider: str, point: gpu_targets.Point, check: bool):
    return gpu_targets.public_step(provider, gpu_targets.build(point, "cuda"), check)


def profile_point(provider: str, point: gpu_targets.Point, check: bool, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step = step_fn(provider, point, check)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    step_ms, host = median_ms(step, 5), host_ms(step, 3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 3e3
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"## {provider} {point.target} {point.regime} L={point.L} check_values={check}: "
             f"step {step_ms:.3f} ms (median of 5), host issue {host:.3f} ms, "
             f"kernels {total:.3f} ms per step"]
    for e in events[:top]:
        lines.append(f"  {e.self_device_time_total / 3e3:9.3f} ms  {e.count // 3:5d}x  {e.key[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=DEFAULT_POINTS)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    points = [parse_point(p) for p in args.points.split(",") if p]
    if not torch.cuda.is_available():
        print("bench.gpu_profile needs a CUDA device", file=sys.stderr)
        return 2
    for provider, point, check in points:
        try:
            print(profile_point(provider, point, check, args.top), flush=True)
        except Exception as err:  # one failed point must not end the run
            print(f"## {provider} {point.target} L={point.L}: error {type(err).__name__}: {err}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
