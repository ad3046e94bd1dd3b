"""The Triton backend's GPU targets T1-T4 (mlcl_fast/triton/README.md), one row per measurement.

    python -m bench.gpu_targets [--targets T1,T2,T3,T4] [--providers triton,cuda,compile(reference),reference]
                                [--tiles SPEC|SPEC...] [--out DIR] [--budget-s 420] [--smoke]
    python -m bench.gpu_targets --table CSV | --plot CSV

T1  N = 16384 (B = 8192, V = 2), d = 256, L = 16384 and 262144, 2-20 labels per sample, reg,
    bf16, forward + backward, two label regimes: heavy head (Zipf 1.1: the top label in most
    samples) and XMC-like (Zipf 0.5: the top label in a few per cent of them). Reported: the
    median time (triton.testing.do_bench), peak memory above the inputs, and the share of the
    valid-anchor 4-GEMM limit, 8 R_valid |C| d FLOPs at the bf16 matmul rate measured first.
T2  the same at L = 10^6 (heavy head).
T3  N = 1024, d = 128, L = 128, fp32 and bf16, against torch.compile(reference).
T4  host time of one forward + backward beyond the kernels (wall time to issue the call with
    the GPU idle), and whether it synchronises (torch.cuda.set_sync_debug_mode("error")), both
    for the public call with check_values=False (no host reads of label values; the default
    True reads them by design); the median time is the default call's, as at T1-T3.
Then, for the Triton provider only, T1 and T3 (bf16) again with MLCL_FAST_TRITON_GRAD=symmetric
(the `grad` column), to choose the default gradient strategy from the measurement.

--tiles: a tile search for the Triton provider at T1 (heavy head, L = 16384 and 262144): one
point per MLCL_FAST_TRITON_TILE value (mlcl_fast/triton/configs.forced_tile; per kernel family,
e.g. "free:anchors=128,64,8,2"), the `tile` column, besides the default tiles.

The providers are measured one after the other in the order given (the first one's points all
come first, so a short budget measures it fully), each provider's points from the smallest to the
largest, the strategy and tile variants last. Points a provider cannot hold (its memory
prediction above the free memory) are recorded as "skip (memory)"; a point whose predicted time
(the provider's last measured step, scaled by the number of logits) would not fit in what is left
of the budget as "skip (time)"; a step longer than SLOW_STEP_S is timed once instead of by
do_bench. Every point is written as soon as it is measured: `targets.csv` and `targets.log` in
--out. --smoke runs tiny shapes (the plumbing, on a GPU or, with the reference provider only, on
a CPU).
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
from mlcl_fast.backends import BACKENDS

from .providers import Inputs, Shape, get_provider

FIELDS = ("target", "provider", "regime", "N", "L", "d", "dtype", "fp32", "grad", "tile", "valid_anchors", "columns",
          "status", "median_ms", "peak_MB", "limit_share", "host_ms", "syncs")
SLOW_STEP_S = 2.0   # a step this long is timed once: do_bench would repeat it for seconds
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
    tile: str = ""       # MLCL_FAST_TRITON_TILE of the Triton kernels ("": the default tiles)

    @property
    def variant(self) -> bool:
        """A setting of the Triton kernels' own (precision, strategy, tile), not a target point."""
        return self.fp32 != "auto" or self.grad != "default" or bool(self.tile)

    @property
    def logits(self) -> int:
        """A proxy of the logits one step computes, before the labels are drawn: N rows and at
        most N * 10 present labels (2-20 labels per sample) as anchors, N + L columns."""
        return (self.N + min(self.L, 10 * self.N)) * (self.N + self.L)


def points(targets: list[str], smoke: bool, tiles: tuple[str, ...] = ()) -> list[Point]:
    """The points of `targets`, smallest first, the Triton-only variants last."""
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
    out += [Point("T1", "heavy", 16384 // s, L // s, 256, "bfloat16", tile=t) for t in tiles for L in (16384, 262144)]
    return sorted(out, key=lambda p: (p.variant, p.tile, p.logits))


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


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy rate of a 4 GiB buffer, bytes read plus written per second."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=100)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def measure(point: Point, provider_name: str, device: str, rate: float) -> dict:
    from triton.testing import do_bench

    inputs = build(point, device)
    provider = get_provider(provider_name)
    row = dict(target=point.target, provider=provider_name, regime=point.regime, N=point.N, L=point.L, d=point.d,
               dtype=point.dtype, fp32=point.fp32, grad=point.grad, tile=point.tile)
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
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    if once_ms > SLOW_STEP_S * 1e3:
        ms, status = once_ms, "ok (one step)"
    else:
        ms, status = do_bench(step, warmup=3, rep=200 if point.N <= 4096 else 1000), "ok"
    limit_ms = 8 * R * C * point.d / rate * 1e3
    row.update(status=status, median_ms=round(ms, 3), peak_MB=round(peak, 1), limit_share=round(limit_ms / ms, 3))
    if point.target == "T4":
        unchecked = public_step(provider_name, inputs, check_values=False) if provider_name in BACKENDS else step
        row.update(host_issue(unchecked))
    return row


def public_step(backend: str, inputs: Inputs, check_values: bool):
    """One forward + backward of the public call on `inputs` with the given check_values."""
    import mlcl_fast

    def step():
        loss = mlcl_fast.multilabel_contrastive_loss(inputs.features, inputs.labels, inputs.prototypes,
                                                     preset=inputs.preset, temperature=inputs.temperature,
                                                     backend=backend, check_values=check_values)
        inputs.features.grad = None
        inputs.prototypes.grad = None
        loss.backward()
    return step


def host_issue(step) -> dict:
    """Median wall time to issue one forward+backward with the GPU idle (the host's share), and
    whether the call synchronises (sync debug mode 'error' raises on a synchronising call)."""
    from .profile import host_ms

    host = host_ms(step, 20)
    syncs = "none"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as err:
        syncs = f"yes ({str(err).splitlines()[0][:120]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return dict(host_ms=round(host, 3), syncs=syncs)


def table(path: str) -> str:
    """A short fixed-width table of a targets.csv: one line per row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = ("target", "provider", "regime", "L", "dtype", "fp32", "grad", "tile", "status", "median_ms", "peak_MB",
            "limit_share", "host_ms", "syncs")
    cells = [[str(r.get(c) or "") for c in cols] for r in rows]
    widths = [min(40, max([len(c)] + [len(row[i]) for row in cells])) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v[:w].ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="T1,T2,T3,T4")
    # compile(reference) before the eager reference: T3's comparison is with it, and the eager
    # reference's T1 points take most of a short budget (1.2 s a step on an H200)
    ap.add_argument("--providers", default="triton,cuda,compile(reference),reference")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/targets"))
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--tiles", default="", help="'|'-separated MLCL_FAST_TRITON_TILE values to search at T1")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--table", metavar="CSV", help="print a short table of a targets.csv and exit")
    ap.add_argument("--plot", metavar="CSV", help="plot the T1 and T2 rows of a targets.csv next to it and exit")
    args = ap.parse_args(argv)
    if args.table or args.plot:
        if args.table:
            print(table(args.table))
        if args.plot:
            from .plots import plot_targets
            print("plot:", plot_targets(args.plot))
        return 0
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
    emit(dict(target="rate", provider="copy d2d", status=f"{copy_bandwidth('cuda') / 1e12:.2f} TB/s"))
    torch.cuda.empty_cache()
    tiles = tuple(t for t in args.tiles.split("|") if t.strip()) if args.tiles else ()
    todo = points(args.targets.split(","), args.smoke, tiles)
    for name in args.providers.split(","):
        last = None  # (logits, seconds per step) of this provider's last measured point
        for point in todo:
            if point.target == "T2" and name in ("reference", "compile(reference)"):
                continue  # |A| x |C| = 10^12 logits: nothing to measure
            if point.variant and name != "triton":
                continue  # the precision, gradient and tile settings are the Triton kernels' own
            left = args.budget_s - (time.monotonic() - start)
            head = dict(target=point.target, provider=name, regime=point.regime, N=point.N, L=point.L, d=point.d,
                        dtype=point.dtype, fp32=point.fp32, grad=point.grad, tile=point.tile)
            if left <= 0:
                emit(dict(head, status="not run (time budget)"))
                continue
            if last is not None:
                # the warm-up and the timed step of a slow step; with do_bench, also its first
                # estimate (5 steps) and its repeats (about a second)
                per_step = last[1] * point.logits / last[0]
                predicted = 2 * per_step if per_step > SLOW_STEP_S else 9 * per_step + 1
                if predicted > left:
                    emit(dict(head, status=f"skip (time: ~{predicted:.0f} s predicted, {left:.0f} s left)"))
                    continue
            os.environ["MLCL_FAST_TRITON_FP32"] = point.fp32
            for var, value in (("MLCL_FAST_TRITON_GRAD", point.grad != "default" and point.grad),
                               ("MLCL_FAST_TRITON_TILE", point.tile)):
                if value:
                    os.environ[var] = value
                else:
                    os.environ.pop(var, None)
            try:
                row = measure(point, name, "cuda", rate)
                emit(row)
                if row.get("median_ms") and not point.variant:
                    last = (point.logits, row["median_ms"] * 1e-3)
            except Exception as err:  # one failed point must not end the run
                emit(dict(head, status=f"error ({type(err).__name__}: {str(err).splitlines()[0][:200]})"))
            torch.cuda.empty_cache()
    for var in ("MLCL_FAST_TRITON_GRAD", "MLCL_FAST_TRITON_TILE"):
        os.environ.pop(var, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
