"""The cpp backend's closed form (csrc/cpu/closed.h) against its listed positives, A/B.

At bench.cpu_targets' point (N = 4096 rows, d = 256, L = 4000 power-law labels, 2 views), for each
preset the weights' closed form applies to, one process times cpp's forward + backward with
MLCL_FAST_CPU_CLOSED=auto and =off in alternation (the variable is read at every op call), so both
see the same load on a shared machine; it reports the median and the fastest call of each, and
checks that both give the same loss and gradients (fp32 rounding apart).

    python -m bench.closed_form                      # mulsupcon, reg_noreg, proto; 2 threads
    python -m bench.closed_form --quick --json       # tiny sizes: the plumbing, in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import timing
from .cpu_targets import POINT, QUICK, THREADS
from .providers import get_provider
from .worker import build_inputs

PRESETS = ("mulsupcon", "reg_noreg", "proto")
MODES = ("auto", "off")
ENV = "MLCL_FAST_CPU_CLOSED"


def _grads(inputs) -> torch.Tensor:
    leaves = [inputs.features] + ([inputs.prototypes] if inputs.prototypes is not None else [])
    return torch.cat([t.grad.detach().flatten().double() for t in leaves])


def measure(preset: str, point: dict, rounds: int) -> dict:
    inputs = build_inputs(dict(point, preset=preset))
    runner = get_provider("cpp").setup(inputs)  # its backward sets the leaves' gradients afresh
    samples = {mode: [] for mode in MODES}
    results = {}
    previous = os.environ.get(ENV)
    try:
        for r in range(rounds + 1):  # round 0 warms up and keeps each mode's loss and gradients
            for mode in MODES:
                os.environ[ENV] = mode
                t0 = time.perf_counter()
                loss = runner.forward()
                runner.backward(loss)
                ms = (time.perf_counter() - t0) * 1e3
                if r == 0:
                    results[mode] = (float(loss.detach()), _grads(inputs))
                else:
                    samples[mode].append(ms)
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
    (loss_a, grad_a), (loss_b, grad_b) = results["auto"], results["off"]
    out = {"preset": preset}
    for mode in MODES:
        t = timing.summarize(samples[mode])
        out[mode] = {"median_ms": t.median_ms, "quietest_ms": t.min_ms, "runs_ms": list(t.samples_ms)}
    out["loss_rel_diff"] = abs(loss_a - loss_b) / max(abs(loss_b), 1e-30)
    out["grad_rel_diff"] = float((grad_a - grad_b).norm() / grad_b.norm().clamp_min(1e-30))
    return out


def report(res: dict) -> str:
    p = res["point"]
    lines = [f"point: N={p['N']} ({p['views']} views), d={p['d']}, L={p['L']} power-law labels, {p['threads']} threads; "
             f"{p['rounds']} alternating rounds; cpp forward+backward, ms",
             f"{'preset':12s} {'closed median':>13s} {'closed best':>11s} {'lists median':>12s} {'lists best':>10s} "
             f"{'speedup':>8s}  loss/grad rel. diff"]
    for r in res["presets"]:
        a, b = r["auto"], r["off"]
        lines.append(f"{r['preset']:12s} {a['median_ms']:13.1f} {a['quietest_ms']:11.1f} {b['median_ms']:12.1f} "
                     f"{b['quietest_ms']:10.1f} {b['median_ms'] / a['median_ms']:7.2f}x  "
                     f"{r['loss_rel_diff']:.1e} / {r['grad_rel_diff']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each mode, alternating")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the plumbing, not the numbers)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    point = QUICK if args.quick else POINT
    res = {"point": {"N": point["N"], "views": point["views"], "d": point["d"], "L": point["L"],
                     "threads": args.threads, "rounds": args.rounds},
           "presets": [measure(p, point, args.rounds) for p in args.presets.split(",")]}
    print(json.dumps(res, indent=1) if args.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
