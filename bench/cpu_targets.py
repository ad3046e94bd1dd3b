"""The cpp backend's CPU targets, measured on this machine.

At N = 4096 rows (B = 2048, 2 views), d = 256, L = 4000 power-law labels (2..8 per sample, about
5), preset "reg", forward + backward:
  - median wall time of cpp, reference and torch.compile(reference);
  - peak extra memory of each (RSS high-water mark above the RSS before the timed runs, each
    provider in a fresh subprocess);
  - the sgemm rate of this machine in the same run, and cpp's fraction of the 4-GEMM limit
    (8·R·|C|·d FLOPs at that rate);
and whether N = 8192 with L = 100,000 power-law labels runs within 24 GB (time, peak RSS).

    python -m bench.cpu_targets                        # everything (the references take minutes)
    python -m bench.cpu_targets --skip-reference --skip-large

Timings on a shared machine are noisy: every figure is a median of repeats, and the sgemm rate
is measured before and after the providers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

MAIN = dict(B=2048, V=2, d=256, L=4000)
LARGE = dict(B=4096, V=2, d=256, L=100_000)
PRESET, TEMPERATURE, SEED = "reg", 0.1, 0
GIB = 1024 ** 3
TARGETS = {"speedup_reference": 3.0, "speedup_compiled": 1.5, "memory_fraction": 0.1, "gemm_fraction": 0.5}


# ------------------------------------------------------------------------------------ worker
def _inputs(B: int, V: int, d: int, L: int):
    from bench.labels import powerlaw_labels
    from mlcl_fast.labels import as_label_sets

    labels = as_label_sets(powerlaw_labels(B, L, min_size=2, max_size=8, seed=SEED), B, L, "indices")
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(B, V, d, generator=gen), labels, torch.randn(L, d, generator=gen)


def _program(provider: str, labels):
    import mlcl_fast
    from mlcl_fast import reference
    from mlcl_fast.inputs import l2_normalize
    from mlcl_fast.problem import Problem
    from mlcl_fast.reduction import mean_loss

    if provider in ("cpp", "reference"):
        return lambda x, p: mlcl_fast.multilabel_contrastive_loss(x, labels, p, preset=PRESET, temperature=TEMPERATURE,
                                                                  backend=provider)
    cfg = mlcl_fast.resolve_config(PRESET)

    def program(x, p):  # the API's host-side input checks left out, so the graph stays whole
        problem = Problem(l2_normalize(x.flatten(0, 1)), l2_normalize(p), labels.repeat_views(x.shape[1]),
                          cfg, TEMPERATURE)
        return mean_loss(problem, *reference.anchor_losses(problem))
    return torch.compile(program, dynamic=False, options=reference.COMPILE_OPTIONS)


def worker(provider: str, shape: dict, repeats: int, warmup: int) -> dict:
    from bench.timing import peak_rss_bytes, reset_peak_rss, rss_bytes
    from mlcl_fast import resolve_config
    from mlcl_fast.inputs import prepare

    features, labels, prototypes = _inputs(**shape)
    fn = _program(provider, labels)
    x = features.clone().requires_grad_(True)
    p = prototypes.clone().requires_grad_(True)

    def step():
        x.grad = p.grad = None
        loss = fn(x, p)
        loss.backward()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    x.grad = p.grad = None
    exact_peak = reset_peak_rss()
    base = rss_bytes()
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    problem = prepare(features, labels, prototypes, resolve_config(PRESET), TEMPERATURE)
    return dict(provider=provider, times_s=times, median_s=statistics.median(times), loss=value,
                extra_peak_bytes=peak - base, peak_rss_bytes=peak, exact_peak=exact_peak,
                anchors=problem.num_anchors, columns=problem.num_columns, threads=torch.get_num_threads())


# -------------------------------------------------------------------------------------- main
def sgemm_rate(repeats: int = 7) -> float:
    """GFLOP/s of torch's sgemm here: the higher of a similarity-shaped product [4096, 256] @
    [256, 4096] and a square 2048^3 one (median of repeats each), so the fraction of the 4-GEMM
    limit is measured against the faster of the two."""
    rates = []
    for m, n, k in ((4096, 4096, 256), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates.append(2.0 * m * n * k / statistics.median(times) / 1e9)
    return max(rates)


def run_worker(provider: str, shape: dict, repeats: int, warmup: int) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_targets", "--worker", provider, "--shape", json.dumps(shape),
           "--repeats", str(repeats), "--warmup", str(warmup)]
    print("$", " ".join(cmd[:3] + [f"'{c}'" if c.startswith("{") else c for c in cmd[3:]]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{provider} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def valid_anchors(shape: dict) -> int:
    import mlcl_fast
    from mlcl_fast.backends import cpp
    from mlcl_fast.inputs import prepare

    features, labels, prototypes = _inputs(**shape)
    problem = prepare(features, labels, prototypes, mlcl_fast.resolve_config(PRESET), TEMPERATURE)
    with torch.no_grad():
        return int(cpp.anchor_losses(problem)[1].sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of cpp")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of each reference")
    parser.add_argument("--skip-reference", action="store_true", help="time cpp only")
    parser.add_argument("--skip-large", action="store_true", help="skip N=8192, L=100,000")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.shape), args.repeats, args.warmup)))
        return 0

    rate_before = sgemm_rate()
    results = {"cpp": run_worker("cpp", MAIN, args.repeats, 1)}
    if not args.skip_reference:
        results["reference"] = run_worker("reference", MAIN, args.reference_repeats, 0)
        results["compile(reference)"] = run_worker("compiled", MAIN, args.reference_repeats, 1)
    rate_after = sgemm_rate()
    rate = statistics.median([rate_before, rate_after])
    large = None if args.skip_large else run_worker("cpp", LARGE, 1, 0)

    cpp = results["cpp"]
    n_valid = valid_anchors(MAIN)
    flops = 8.0 * cpp["anchors"] * cpp["columns"] * MAIN["d"]
    print(f"\nshape N={MAIN['B'] * MAIN['V']} (B={MAIN['B']}, V={MAIN['V']}), d={MAIN['d']}, L={MAIN['L']}, "
          f"preset={PRESET}, |A|={cpp['anchors']} ({n_valid} valid), |C|={cpp['columns']}, "
          f"threads={cpp['threads']}")
    print(f"sgemm rate (best of [4096,256]x[256,4096] and 2048^3; median of before/after): {rate:.1f} GFLOP/s "
          f"(before {rate_before:.1f}, after {rate_after:.1f})")
    print(f"{'provider':22s} {'median s':>9s} {'runs s':>28s} {'extra peak MiB':>15s}")
    for name, r in results.items():
        runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
        print(f"{name:22s} {r['median_s']:9.3f} {runs:>28s} {r['extra_peak_bytes'] / 2**20:15.1f}")
    gemm_time = flops / (rate * 1e9)
    fraction = gemm_time / cpp["median_s"]
    print(f"4-GEMM limit: 8*R*|C|*d = {flops / 1e9:.1f} GFLOP -> {gemm_time:.2f} s at the sgemm rate; "
          f"cpp reaches {fraction:.0%} of it (target >= {TARGETS['gemm_fraction']:.0%}); "
          f"counting only the {n_valid} valid anchors it computes: "
          f"{fraction * n_valid / cpp['anchors']:.0%}")
    if "reference" in results:
        for name, key in (("reference", "speedup_reference"), ("compile(reference)", "speedup_compiled")):
            speedup = results[name]["median_s"] / cpp["median_s"]
            print(f"speedup over {name}: {speedup:.1f}x (target >= {TARGETS[key]}x)")
        mem = cpp["extra_peak_bytes"] / max(results["reference"]["extra_peak_bytes"], 1)
        print(f"cpp extra peak memory / reference's: {mem:.3f} (target <= {TARGETS['memory_fraction']})")
        print("losses: " + ", ".join(f"{k}={v['loss']:.6f}" for k, v in results.items()))
    if large is not None:
        print(f"\nN={LARGE['B'] * LARGE['V']}, L={LARGE['L']} (|A|={large['anchors']}, |C|={large['columns']}): "
              f"forward+backward {large['median_s']:.1f} s, process peak RSS {large['peak_rss_bytes'] / GIB:.2f} GiB "
              f"(extra {large['extra_peak_bytes'] / GIB:.2f} GiB), within 24 GB: "
              f"{large['peak_rss_bytes'] < 24e9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
