"""Where the time of one sweep point goes, per backend: wall time of forward and forward+backward,
the kernels under torch.profiler, and (Triton) registers and spills of the compiled kernels.

    python -m bench.profile --point reg:few:4096:128 --backends triton,cuda [--tiles 64,64,4,2 ...]

A point is PRESET:REGIME:N:L (regimes as in bench/labels.py). `--tiles` repeats the Triton rows
once per tile (MLCL_FAST_TRITON_TILE). Output goes to stdout (and --out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from .providers import BackendProvider
from .worker import build_inputs


def median_ms(fn, repeats: int) -> float:
    """Median device time of `fn` over `repeats` calls (CUDA events around each)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(fn, repeats: int) -> float:
    """Wall time of issuing `fn` without waiting for the device (host-side cost)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def _triton_kernels() -> list[str]:
    """n_regs / n_spills / shared memory of every compiled Triton kernel of the backend."""
    from mlcl_fast.triton import backward, forward, pairs
    out = []
    for mod in (forward, backward, pairs):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in caches.values():
                kernels = entry[0] if isinstance(entry, tuple) else entry
                for kernel in (kernels.values() if isinstance(kernels, dict) else ()):
                    try:
                        kernel._init_handles()
                        out.append(f"  {name}: regs {kernel.n_regs} spills {kernel.n_spills} "
                                   f"shared {kernel.metadata.shared} warps {kernel.metadata.num_warps}")
                    except Exception as err:  # older or newer Triton: report what is missing
                        out.append(f"  {name}: (no kernel metadata: {type(err).__name__})")
    return out


def profile_point(point: str, backend: str, tile: str | None, repeats: int, emit) -> None:
    preset, regime, n, num_labels = point.split(":")
    spec = {"preset": preset, "regime": regime, "N": int(n), "L": int(num_labels), "d": 128,
            "dtype": "float32", "device": "cuda", "seed": 0, "temperature": 0.1}
    if tile:
        os.environ["MLCL_FAST_TRITON_TILE"] = tile
    else:
        os.environ.pop("MLCL_FAST_TRITON_TILE", None)
    inputs = build_inputs(spec)
    runner = BackendProvider(backend).setup(inputs)

    def full():
        runner.full()
        inputs.features.grad = None
        if inputs.prototypes is not None:
            inputs.prototypes.grad = None

    t0 = time.perf_counter()
    full()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    full()
    fwd = median_ms(runner.forward, repeats)
    both = median_ms(full, repeats)
    host = host_ms(full, repeats)
    label = f"{point} {backend}" + (f" tile={tile}" if tile else "")
    emit(f"== {label}: first call {first_s:.1f} s (compile included), fwd {fwd:.2f} ms, "
         f"fwd+bwd {both:.2f} ms, host issue {host:.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            full()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60)
    emit(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", action="append", required=True, help="PRESET:REGIME:N:L (repeatable)")
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--tiles", nargs="*", default=[None], help="Triton tiles BLOCK_M,BLOCK_N,warps,stages")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tf32", action="store_true", help="allow tf32 for fp32 dots")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.profile needs a CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    sink = open(args.out, "a") if args.out else None

    def emit(text: str) -> None:
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()

    emit(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, tf32 {args.tf32}")
    for point in args.point:
        for backend in args.backends.split(","):
            tiles = args.tiles if backend == "triton" else [None]
            for tile in tiles:
                try:
                    profile_point(point, backend, tile, args.repeats, emit)
                except Exception as err:
                    emit(f"== {point} {backend} tile={tile}: {type(err).__name__}: {str(err)[:300]}")
                torch.cuda.empty_cache()
    if "triton" in args.backends:
        emit("# compiled Triton kernels")
        for line in _triton_kernels():
            emit(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
