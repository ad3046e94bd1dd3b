"""Benchmark sweep: time and peak memory of every provider over the grid of bench/grid.py.

    python -m bench.sweep --quick --device cpu
    python -m bench.sweep --full --device cuda --out bench/results/h100.csv

Rows are appended to the CSV as each point finishes (a killed sweep keeps what it measured);
plots of the run are written next to the CSV at the end. See bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from mlcl_fast.memory import available_memory_bytes
from mlcl_fast.presets import resolve_config

from . import grid as grid_mod
from . import timing
from .labels import find_dataset, max_labels, REAL_DATASETS
from .providers import CompiledReference, Shape, get_provider, provider_names, useful_flops
from .records import append_rows, status_kind
from .worker import DTYPES, MODES, forked_worker, measure, spec_modes

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GB = 1e9


# ---------------------------------------------------------------- the machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    if os.environ.get("MLCL_BENCH_COMMIT"):
        return os.environ["MLCL_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mlcl_fast", "csrc", "bench"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def memory_budget_bytes(device: str, requested_gb: Optional[float], grid: grid_mod.Grid) -> int:
    """Points predicted above this are refused: the flag, else the grid's default, else a share of what is free."""
    gb = requested_gb if requested_gb is not None else grid.mem_budget_gb
    if gb and gb > 0:
        return int(gb * GB)
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(0.85 * free)
        return int(70 * GB)  # planning without a GPU (--dry-run): an 80 GB card
    avail = available_memory_bytes()
    return int(0.5 * avail) if avail else int(4 * GB)


# ---------------------------------------------------------------- the plan

@dataclass
class Task:
    point: grid_mod.Point
    provider: str
    pred_bytes: int


@dataclass
class Context:
    device: str
    grid: grid_mod.Grid
    budget: int
    run_fields: dict
    matmul: dict = field(default_factory=dict)      # dtype -> GFLOP/s
    skip: dict = field(default_factory=dict)        # (provider, series key) -> status for larger points


def plan(grid: grid_mod.Grid, device: str, providers: list[str], presets=None, series=None) -> list[Task]:
    """Every (point, provider) the sweep will visit, in order, with its predicted memory."""
    tasks = []
    compiled: dict[tuple, int] = {}
    for point in grid.points:
        if (presets and point.preset not in presets) or (series and point.series not in series):
            continue
        if point.regime in REAL_DATASETS and find_dataset(point.regime) is None:
            continue  # announced once by main()
        for name in providers:
            provider = get_provider(name)
            if not provider.supports(resolve_config(point.preset)):
                continue
            if isinstance(provider, CompiledReference):
                if point.preset not in grid.compile_presets or point.series not in grid.compile_series:
                    continue
                key = (point.series, point.preset, point.dtype)
                if compiled.get(key, 0) >= grid.compile_points:
                    continue
                compiled[key] = compiled.get(key, 0) + 1
            shape = point_shape(point)
            tasks.append(Task(point, name, provider.predict_bytes(shape)))
    return tasks


def point_shape(point: grid_mod.Point, K: Optional[int] = None) -> Shape:
    itemsize = 4 if point.dtype == "float32" else DTYPES[point.dtype].itemsize
    return Shape(point.preset, point.N, point.L, point.d, K if K is not None else max_labels(point.regime, point.L),
                 itemsize)


# ---------------------------------------------------------------- running one task

def spec_of(task: Task, ctx: Context) -> dict:
    p = task.point
    g = ctx.grid
    return {"provider": task.provider, "preset": p.preset, "regime": p.regime, "N": p.N, "L": p.L, "d": p.d,
            "dtype": p.dtype, "device": ctx.device, "seed": 0, "temperature": 0.1,
            "mode_budget_s": g.mode_budget_s, "min_repeats": g.min_repeats, "max_repeats": g.max_repeats,
            "threads": ctx.run_fields.get("threads")}


def run_subprocess(spec: dict, timeout_s: float, threads: Optional[int] = None) -> list[dict]:
    """Run bench.worker in a fresh process (own process group, killed whole at the timeout)."""
    env = dict(os.environ, **_worker_env(threads))
    proc = subprocess.Popen([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
        out, err = proc.communicate()
    except BaseException:  # the sweep itself is interrupted: take the worker down with it
        _kill_group(proc)
        raise
    records = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    return _complete(records, timed_out, timeout_s, proc.returncode, err, spec_modes(spec))


class ForkRunner:
    """Each point in a fresh process forked from a server that has imported torch once.

    A process per point isolates memory (its own peak RSS) and lets a hung point be killed,
    like `run_subprocess`, without paying the interpreter and torch start-up (seconds on a
    small, busy machine) at every point. The server only imports: no thread pool exists
    yet when it forks, so every child starts its own."""

    def __init__(self, threads: Optional[int] = None):
        import multiprocessing
        os.environ.update(_worker_env(threads))  # the server, started at the first point, inherits it
        self.mp = multiprocessing.get_context("forkserver")
        self.mp.set_forkserver_preload(["torch", "mlcl_fast", "bench.worker"])

    def __call__(self, spec: dict, timeout_s: float) -> list[dict]:
        recv, send = self.mp.Pipe(duplex=False)
        proc = self.mp.Process(target=forked_worker, args=(spec, send), daemon=True)
        proc.start()
        send.close()
        records: list[dict] = []
        deadline = time.monotonic() + timeout_s
        timed_out = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                if recv.poll(min(remaining, 0.5)):
                    try:
                        records.append(recv.recv())
                    except EOFError:  # the child is done (or died)
                        break
        finally:
            if timed_out or proc.is_alive():
                proc.join(timeout=0 if timed_out else 5)
            if proc.is_alive():
                _kill_pid_group(proc.pid)
                proc.join()
            recv.close()
        exitcode = proc.exitcode
        proc.close()
        return _complete(records, timed_out, timeout_s, exitcode, "", spec_modes(spec))


def _worker_env(threads: Optional[int]) -> dict:
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _complete(records: list[dict], timed_out: bool, timeout_s: float, returncode, stderr: str,
              modes=MODES) -> list[dict]:
    """Statuses for the modes a worker did not report: timeout, killed (likely oom), or error."""
    seen = {r["mode"] for r in records}
    missing = [m for m in modes if m not in seen]
    if missing:
        if timed_out:
            status = f"timeout (> {timeout_s:.0f} s)"
        elif returncode in (-signal.SIGKILL, 137):
            status = "oom (killed by SIGKILL: likely the kernel's out-of-memory killer)"
        else:
            last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
            status = f"error (exit {returncode}: {last})"
        records = records + [{"mode": m, "status": status} for m in missing]
    return records


def _kill_pid_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the worker and any compiler processes it started (its own process group)."""
    _kill_pid_group(proc.pid)


def run_in_process(spec: dict, timeout_s: float = float("inf")) -> list[dict]:
    """Measure in this process (CUDA): a first call slower than timeout_s ends the point."""
    spec = dict(spec, soft_timeout_s=timeout_s)
    records: list[dict] = []
    measure(spec, records.append)
    return records


def rows_for(task: Task, ctx: Context, records: list[dict]) -> list[dict]:
    p = task.point
    rows = []
    for rec in sorted(records, key=lambda r: MODES.index(r["mode"])):
        row = dict(ctx.run_fields)
        provider = get_provider(task.provider)
        row.update(backend=provider.backend, provider=task.provider, preset=p.preset, regime=p.regime,
                   series=p.series, mode=rec["mode"], N=p.N, L=p.L, d=p.d, dtype=p.dtype,
                   pred_MB=round(task.pred_bytes / 2 ** 20, 1), status=rec["status"])
        for key in ("K", "median_ms", "p20_ms", "p80_ms", "repeats", "peak_MB", "total_MB", "setup_s"):
            if key in rec:
                row[key] = rec[key]
        rate = ctx.matmul.get(p.dtype)
        if rate:
            row["matmul_gflops_s"] = round(rate, 1)
        if rec.get("median_ms"):
            flops = useful_flops(point_shape(p, rec.get("K")), rec["mode"])
            row["gflop"] = flops / 1e9
            row["gflops_s"] = flops / (rec["median_ms"] * 1e-3) / 1e9
            if rate:
                row["roofline_frac"] = row["gflops_s"] / rate
        rows.append(row)
    return rows


CALLS_PER_POINT = 10  # setup, memory pass and at least 3 timed calls per mode, in forward+backward units


def predicted_seconds(task: Task, ctx: Context) -> Optional[float]:
    """A lower bound on a point's run time: its calls' matrix FLOPs at the measured matmul rate."""
    rate = ctx.matmul.get(task.point.dtype)
    if not rate:
        return None
    return CALLS_PER_POINT * useful_flops(point_shape(task.point), "full") / (rate * 1e9)


def visit(task: Task, ctx: Context, runner: Callable[[dict, float], list[dict]], deadline: float) -> list[dict]:
    """Decide, run (or refuse) one task; returns its CSV rows and updates the series skips."""
    p = task.point
    skip_key = (task.provider, p.key)
    timeout = ctx.grid.compile_timeout_s if task.provider == CompiledReference.name else ctx.grid.timeout_s
    seconds = predicted_seconds(task, ctx)
    if task.pred_bytes > ctx.budget:
        status = f"oom (predicted {task.pred_bytes / GB:.3g} GB > budget {ctx.budget / GB:.3g} GB)"
        records = [{"mode": m, "status": status} for m in MODES]
    elif seconds is not None and seconds > timeout:
        status = f"timeout (predicted >= {seconds:.0f} s at the measured matmul rate > {timeout:.0f} s)"
        records = [{"mode": m, "status": status} for m in MODES]
    elif time.monotonic() > deadline:
        records = [{"mode": m, "status": "timeout (sweep time budget spent)"} for m in MODES]
    elif skip_key in ctx.skip:
        records = [{"mode": m, "status": ctx.skip[skip_key]} for m in MODES]
    else:
        records = runner(spec_of(task, ctx), timeout)
        kinds = {status_kind(r["status"]) for r in records}
        for kind in ("timeout", "oom"):
            if kind in kinds:
                ctx.skip[skip_key] = f"{kind} (not run: {kind} at a smaller point of this series)"
                break
    return rows_for(task, ctx, records)


# ---------------------------------------------------------------- command line

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_const", const="quick", dest="variant", help="small grid (minutes)")
    size.add_argument("--full", action="store_const", const="full", dest="variant", help="the whole grid")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--out", type=Path, help="CSV to append to (default bench/results/sweep_<device>_<variant>.csv)")
    ap.add_argument("--providers", help="comma-separated subset of providers (default: every one available)")
    ap.add_argument("--presets", help="comma-separated subset of " + ",".join(grid_mod.PRESETS))
    ap.add_argument("--series", help="N, L or N,L (default both)")
    ap.add_argument("--mem-budget-gb", type=float, help="refuse points predicted above this many GB")
    ap.add_argument("--timeout", type=float, help="seconds per point (default: the grid's)")
    ap.add_argument("--time-budget-s", type=float,
                    help="stop running points after this many seconds; the rest are recorded as timeouts "
                         "(default: the grid's, 280 s for cpu --quick, else none)")
    ap.add_argument("--threads", type=int, help="CPU threads per worker (default: torch's default)")
    ap.add_argument("--isolation", choices=("fork", "exec", "none"), default="fork",
                    help="CPU points: a process forked from a torch-preloaded server (default), a fresh "
                         "interpreter per point (exec), or this process (none)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and predictions, measure nothing")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        ap.error(f"--device: expected cpu or cuda, got {args.device!r}")
    return args


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _terminate(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_subprocess, which kills the running worker


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available() and not args.dry_run:
        print("bench.sweep: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    grid = grid_mod.get_grid(device, args.variant)
    if args.timeout:
        grid = grid_mod.Grid(**{**grid.__dict__, "timeout_s": args.timeout,
                                "compile_timeout_s": max(args.timeout, grid.compile_timeout_s)})
    all_providers = provider_names(device)
    providers = _split(args.providers) or all_providers
    unknown = [p for p in providers if p not in all_providers]
    if unknown:
        print(f"bench.sweep: --providers: {unknown} not available on {device}; available: {all_providers}",
              file=sys.stderr)
        return 2
    for name in REAL_DATASETS:
        if find_dataset(name) is None:
            print(f"bench.sweep: note: dataset {name} not found (set MLCL_FAST_DATA_DIR); its points are left out",
                  file=sys.stderr)
    tasks = plan(grid, device, providers, _split(args.presets), _split(args.series))
    budget = memory_budget_bytes(device, args.mem_budget_gb, grid)

    if args.dry_run:
        print(f"plan: {len(tasks)} tasks on {device} ({args.variant}), providers {providers}, "
              f"memory budget {budget / GB:.3g} GB")
        for t in tasks:
            p = t.point
            verdict = "refuse (oom predicted)" if t.pred_bytes > budget else "run"
            print(f"  {p.series} {p.preset:9s} {p.regime:9s} N={p.N:<6d} L={p.L:<8d} d={p.d} {p.dtype:8s} "
                  f"{t.provider:20s} pred {t.pred_bytes / 2**20:10.1f} MB  {verdict}")
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if cuda else cpu_model()
    run_fields = {
        "run_id": _dt.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(), "device": device, "device_name": name, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    ctx = Context(device, grid, budget, run_fields)
    for dtype in sorted({t.point.dtype for t in tasks}):
        try:
            ctx.matmul[dtype] = timing.matmul_rate(device, DTYPES[dtype])
        except Exception as err:  # the roofline column stays empty, the sweep goes on
            print(f"bench.sweep: matmul rate for {dtype} not measured: {err}", file=sys.stderr)
    out = args.out or RESULTS / f"sweep_{'cuda' if cuda else 'cpu'}_{args.variant}.csv"
    print(f"# {len(tasks)} tasks -> {out}; {name}, torch {torch.__version__}, {run_fields['threads']} threads, "
          f"matmul " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in ctx.matmul.items())
          + f", memory budget {budget / GB:.3g} GB", flush=True)

    signal.signal(signal.SIGTERM, _terminate)
    if cuda or args.isolation == "none":
        runner = run_in_process
    elif args.isolation == "fork":
        runner = ForkRunner(args.threads)
    else:
        runner = lambda spec, timeout: run_subprocess(spec, timeout, args.threads)  # noqa: E731
    start = time.monotonic()
    deadline = start + (args.time_budget_s if args.time_budget_s is not None else grid.time_budget_s)
    for i, task in enumerate(tasks, 1):
        rows = visit(task, ctx, runner, deadline)
        append_rows(out, rows)
        p = task.point
        summary = "  ".join(f"{r['mode']} {_cell(r)}" for r in rows)
        print(f"[{i}/{len(tasks)} {time.monotonic() - start:5.0f}s] {p.preset:9s} {p.regime:9s} N={p.N:<6d} "
              f"L={p.L:<8d} {task.provider:20s} {summary}", flush=True)

    if not args.no_plots:
        try:
            from .plots import plot_run
            for path in plot_run(out, run_fields["run_id"]):
                print(f"plot: {path}")
        except Exception as err:  # a plotting problem must not lose the measurements
            print(f"bench.sweep: plots failed: {type(err).__name__}: {err}", file=sys.stderr)
    return 0


def _cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    mem = f" {row['peak_MB']:.0f}MB" if "peak_MB" in row else ""
    return f"{row['median_ms']:.1f}ms{mem}"


if __name__ == "__main__":
    sys.exit(main())
