"""The cpp backend's CPU targets, measured with the sweep's providers, worker and timers.

The point: N = 4096 rows (B = 2048 samples, 2 views), d = 256, L = 4000 power-law labels (2..8
per sample, about 5), preset "reg", forward + backward, 2 threads. Every measurement is one
bench.worker run in a process of its own (the sweep's runners: forked from a server that has
imported torch, or with --isolation exec a fresh interpreter), so each provider's peak memory is
its own and each thread count is set (torch.set_num_threads) before anything runs:
  - cpp, reference and compile(reference) (bench/providers.py): the median and the fastest of
    the timed repeats, and the peak RSS of one call above the RSS just before it;
  - cpp with 1 thread, for the thread scaling;
  - the fp32 matmul rate inside each cpp process, before its setup and after its timing (the
    best of a similarity-shaped [N, d] @ [d, N] and a square 2048³ product);
  - N = 8192 with L = 100,000 labels: whether its peak RSS stays within 24 GB.

Every target (TARGETS) is reported twice: "median" compares medians of the repeats, "quietest"
compares the fastest repeats (the runs least disturbed by other work on a shared machine; the
matmul rate then is its fastest sample too).

    python -m bench.cpu_targets                          # everything (the references take minutes)
    python -m bench.cpu_targets --skip-reference --skip-large
    python -m bench.cpu_targets --quick --json           # tiny sizes: the plumbing, in seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Optional

from .gpu_targets import valid_anchors
from .providers import Shape, useful_flops
from .sweep import ForkRunner, run_subprocess
from .worker import build_inputs

POINT = dict(provider="cpp", preset="reg", regime="powerlaw", N=4096, L=4000, d=256, views=2, label_sizes=[2, 8],
             dtype="float32", device="cpu", seed=0, temperature=0.1, modes=["full"])
LARGE = dict(POINT, N=8192, L=100_000)
SQUARE = 2048
# --quick: the same program at sizes that take a fraction of a second per call.
QUICK = dict(POINT, N=192, L=300, d=32)
QUICK_LARGE = dict(POINT, N=256, L=3000, d=32)
QUICK_SQUARE = 256
THREADS = 2
STATS = ("median", "quietest")


@dataclass(frozen=True)
class Target:
    op: str        # ">=" or "<="
    bound: float
    text: str

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


TARGETS = {
    "limit_share": Target(">=", 1.0, "cpp's share of the valid-anchor 4-GEMM limit "
                                     "(8·R_valid·|C|·d FLOPs at the best fp32 matmul rate)"),
    "speedup_compiled": Target(">=", 4.0, "cpp's speed-up over torch.compile(reference)"),
    "speedup_reference": Target(">=", 20.0, "cpp's speed-up over the reference"),
    "thread_scaling": Target(">=", 1.8, "cpp's speed-up from 1 thread to --threads (2)"),
    "memory_vs_reference": Target("<=", 0.1, "cpp's peak working memory over the reference's"),
    "large_peak_GB": Target("<=", 24.0, "peak RSS of cpp at N = 8192, L = 100,000, GB"),
}


# ---------------------------------------------------------------- measuring

def run(runner, spec: dict, timeout_s: float, label: str) -> dict:
    """One worker process; its forward+backward record (status "ok", or why it failed)."""
    print(f"# {label}: N={spec['N']} L={spec['L']} d={spec['d']}, {spec['threads']} thread(s), "
          f"{spec['min_repeats']} timed run(s) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    records = runner(spec, timeout_s)
    record = next(r for r in records if r["mode"] == "full")
    print(f"#   {record['status']} after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return record


def _spec(base: dict, provider: str, threads: int, repeats: int, **extra) -> dict:
    # a fixed number of timed runs, whatever they cost: the targets compare like with like
    return dict(base, provider=provider, threads=threads, min_repeats=repeats, max_repeats=repeats,
                mode_budget_s=0.0, **extra)


def measure_all(args) -> dict:
    point, large, square = (QUICK, QUICK_LARGE, QUICK_SQUARE) if args.quick else (POINT, LARGE, SQUARE)
    shapes = [[point["N"], point["N"], point["d"]], [square] * 3]
    if args.isolation == "fork":
        runner = ForkRunner(args.threads)
    else:
        runner = lambda spec, timeout: run_subprocess(spec, timeout, spec["threads"])  # noqa: E731
    runs = {"cpp": run(runner, _spec(point, "cpp", args.threads, args.repeats, matmul_shapes=shapes),
                       args.timeout, "cpp")}
    if args.threads > 1:
        runs["cpp, 1 thread"] = run(runner, _spec(point, "cpp", 1, args.repeats, matmul_shapes=shapes),
                                    args.timeout, "cpp, 1 thread")
    if not args.skip_reference:
        for name in ("reference", "compile(reference)"):
            runs[name] = run(runner, _spec(point, name, args.threads, args.reference_repeats), args.timeout, name)
    large_run = None if args.skip_large else run(runner, _spec(large, "cpp", args.threads, 1), args.timeout,
                                                 "cpp, large")
    return summarize(point, large, shapes, args.threads, runs, large_run)


# ---------------------------------------------------------------- figures and targets

def _times_s(record: Optional[dict]) -> Optional[dict]:
    if not record or record.get("status") != "ok":
        return None
    return {"median": record["median_ms"] / 1e3, "quietest": record["min_ms"] / 1e3}


def _rates(record: dict) -> Optional[dict]:
    """The matmul rate the limit uses, at the median and at the fastest sample: the higher of before
    and after, so load that slowed one of the two measurements cannot raise cpp's share."""
    if record.get("status") != "ok":
        return None
    before, after = record["matmul_before"], record["matmul_after"]
    return {"before": dict(zip(STATS, before)), "after": dict(zip(STATS, after)),
            "used": {s: max(before[i], after[i]) for i, s in enumerate(STATS)}}


def _check(key: str, figures: dict) -> dict:
    target = TARGETS[key]
    entry = {"target": f"{target.op} {target.bound:g}", "text": target.text, "figures": figures,
             "pass": {name: target.met(v) for name, v in figures.items()}}
    if not figures:
        entry["status"] = "not measured"
    elif all(entry["pass"].values()):
        entry["status"] = "pass"
    elif any(entry["pass"].values()):
        entry["status"] = "partly (" + ", ".join(n for n, ok in entry["pass"].items() if ok) + " only)"
    else:
        entry["status"] = "miss"
    return entry


def summarize(point: dict, large: dict, shapes: list, threads: int, runs: dict, large_run: Optional[dict]) -> dict:
    inputs = build_inputs(point)
    shape = Shape(point["preset"], point["N"], point["L"], point["d"], inputs.labels.width)
    n_valid = valid_anchors(inputs)
    flops = useful_flops(shape, "full", anchors=n_valid)
    times = {name: _times_s(r) for name, r in runs.items()}
    cpp = times["cpp"]

    providers = {}
    for name, r in runs.items():
        row = {"status": r["status"], "threads": r.get("threads")}
        if times[name]:
            row.update(median_s=times[name]["median"], quietest_s=times[name]["quietest"],
                       runs_s=[t / 1e3 for t in r["samples_ms"]], peak_MiB=r.get("peak_MB"),
                       total_MiB=r.get("total_MB"), setup_s=r.get("setup_s"))
        providers[name] = row

    rates = {name: _rates(runs[name]) for name in ("cpp", "cpp, 1 thread") if name in runs}
    targets = {}
    share = {}
    if cpp and rates["cpp"]:
        share = {s: flops / (rates["cpp"]["used"][s] * 1e9) / cpp[s] for s in STATS}
    targets["limit_share"] = _check("limit_share", share)
    for key, name in (("speedup_compiled", "compile(reference)"), ("speedup_reference", "reference")):
        other = times.get(name)
        targets[key] = _check(key, {s: other[s] / cpp[s] for s in STATS} if cpp and other else {})
    one = times.get("cpp, 1 thread")
    targets["thread_scaling"] = _check("thread_scaling", {s: one[s] / cpp[s] for s in STATS} if cpp and one else {})
    ref = runs.get("reference")
    memory = {}
    if cpp and times.get("reference") and runs["cpp"].get("peak_MB") is not None and ref.get("peak_MB"):
        memory = {"one call": runs["cpp"]["peak_MB"] / ref["peak_MB"]}
    targets["memory_vs_reference"] = _check("memory_vs_reference", memory)

    large_out = None
    if large_run is not None:
        large_out = {"N": large["N"], "L": large["L"], "d": large["d"], "status": large_run["status"]}
        if large_run["status"] == "ok" and large_run.get("total_MB") is not None:
            large_out.update(call_s=large_run["median_ms"] / 1e3, peak_GB=large_run["total_MB"] * 2**20 / 1e9,
                             extra_GB=large_run["peak_MB"] * 2**20 / 1e9)
    fits = {"one call": large_out["peak_GB"]} if large_out and "peak_GB" in large_out else {}
    targets["large_peak_GB"] = _check("large_peak_GB", fits)

    return {
        "point": {"N": point["N"], "B": point["N"] // point["views"], "views": point["views"], "d": point["d"],
                  "L": point["L"], "label_sizes": point["label_sizes"], "preset": point["preset"],
                  "threads": threads, "anchors": shape.anchors, "valid_anchors": n_valid,
                  "columns": shape.columns, "K": shape.K},
        "statistics": {"median": "median of the timed repeats (rates: of the matmul samples)",
                       "quietest": "the fastest timed repeat, least disturbed by other work (rates: the fastest "
                                   "matmul sample)"},
        "matmul_shapes": shapes,
        "matmul_gflops_s": rates,
        "limit_gflop": flops / 1e9,
        "providers": providers,
        "large": large_out,
        "targets": targets,
    }


# ---------------------------------------------------------------- report

def _fmt(key: str, value: float) -> str:
    if key == "limit_share":
        return f"{value:.0%}"
    if key == "memory_vs_reference":
        return f"{value:.3f}"
    if key == "large_peak_GB":
        return f"{value:.2f} GB"
    return f"{value:.2f}x"


def report(res: dict) -> str:
    p = res["point"]
    lines = [
        f"point: N={p['N']} (B={p['B']} x {p['views']} views), d={p['d']}, L={p['L']} power-law labels "
        f"({p['label_sizes'][0]}..{p['label_sizes'][1]} per sample), preset {p['preset']}, {p['threads']} threads; "
        f"|A|={p['anchors']} ({p['valid_anchors']} valid), |C|={p['columns']}, K={p['K']}",
        "figures: 'median' = " + res["statistics"]["median"] + "; 'quietest' = " + res["statistics"]["quietest"],
    ]
    m, k = res["matmul_shapes"][0][0], res["matmul_shapes"][0][2]
    sq = res["matmul_shapes"][1][0]
    for name, r in res["matmul_gflops_s"].items():
        if r:
            lines.append(f"fp32 matmul in the {name} process (best of [{m},{k}]x[{k},{m}] and {sq}^3), GFLOP/s: "
                         + "; ".join(f"{w} median {r[w]['median']:.1f} / quietest {r[w]['quietest']:.1f}"
                                     for w in ("before", "after"))
                         + (f"; limit at {r['used']['median']:.1f} / {r['used']['quietest']:.1f} (the higher)"
                            if name == "cpp" else ""))
    lines.append(f"valid-anchor 4-GEMM limit: 8*R_valid*|C|*d = {res['limit_gflop']:.2f} GFLOP")
    lines.append("")
    lines.append(f"{'provider':20s} {'threads':>7s} {'median s':>9s} {'quietest s':>10s} {'peak MiB':>9s}  runs s")
    for name, r in res["providers"].items():
        if "median_s" in r:
            peak = f"{r['peak_MiB']:9.1f}" if r.get("peak_MiB") is not None else f"{'-':>9s}"
            runs = ", ".join(f"{t:.3f}" for t in r["runs_s"])
            lines.append(f"{name:20s} {r['threads']!s:>7s} {r['median_s']:9.3f} {r['quietest_s']:10.3f} {peak}  {runs}")
        else:
            lines.append(f"{name:20s} {r['status']}")
    large = res["large"]
    if large:
        if "peak_GB" in large:
            lines.append(f"large N={large['N']}, L={large['L']}: forward+backward {large['call_s']:.2f} s, "
                         f"peak RSS {large['peak_GB']:.2f} GB "
                         f"({large['extra_GB']:.2f} GB above the RSS before the call)")
        else:
            lines.append(f"large N={large['N']}, L={large['L']}: {large['status']}")
    lines.append("")
    lines.append(f"{'target':26s} {'bound':>7s}  {'median':>16s}  {'quietest':>16s}  status")
    for key, t in res["targets"].items():
        target, cells = TARGETS[key], []
        for stat in STATS:
            value = t["figures"].get(stat, t["figures"].get("one call"))
            cells.append("-" if value is None else f"{_fmt(key, value)} {'pass' if target.met(value) else 'miss'}")
        bound = f"{target.op} {_fmt(key, target.bound)}"
        lines.append(f"{key:26s} {bound:>7s}  {cells[0]:>16s}  {cells[1]:>16s}  {t['status']}")
    lines.append("(memory and the large point are measured once: the same figure in both columns)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of cpp (each thread count)")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed runs of each reference")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads of the main point")
    parser.add_argument("--skip-reference", action="store_true", help="time cpp only")
    parser.add_argument("--skip-large", action="store_true", help="skip N=8192, L=100,000")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the plumbing, not the targets)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    parser.add_argument("--isolation", choices=("fork", "exec"), default="fork",
                        help="worker processes forked from a torch-preloaded server (default) or fresh "
                             "interpreters")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = parser.parse_args(argv)
    res = measure_all(args)
    print(json.dumps(res, indent=1) if args.json else report(res))
    failed = [name for name, r in res["providers"].items() if r["status"] != "ok"]
    if res["large"] and res["large"]["status"] != "ok":
        failed.append("large")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
