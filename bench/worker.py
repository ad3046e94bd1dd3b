"""Measures one sweep point for one provider: peak memory and time of fwd, bwd and fwd+bwd.

On a CPU the sweep runs each point in its own process: forked from a server that has imported
torch (`forked_worker`, records sent through a pipe), or a fresh interpreter
    python -m bench.worker '<json spec>'
which prints one `ROW {json}` line per mode. Either way a mode is reported as soon as it is
measured, so a point killed at its timeout keeps the modes it finished. On CUDA the sweep calls
`measure()` in-process.

Optional spec keys (bench/cpu_targets.py uses them): `modes` (a subset of MODES), `views` (N rows
are N / views samples, each repeated as consecutive rows, as features [B, V, d] flatten),
`label_sizes` ([min, max] labels per power-law sample), `threads`, and `matmul_shapes`
([[m, n, k], ...]: the matmul rate measured in this process before the provider's setup and
after the last mode's timing, with the same threads, reported as [median, best] GFLOP/s).

Order inside the process: build inputs, set up the provider and run forward+backward once
(compilation, lazy initialisation: `setup_s`), then one memory pass over the three modes, then
the timing pass. A mode's `peak_MB` is its peak resident (CPU) or allocated (CUDA) bytes above
those in use just before it, i.e. with the inputs built and the provider warm; `total_MB` is the
absolute peak.
"""
from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from typing import Callable

import torch

from mlcl_fast import memory

from . import timing
from .labels import make_labels, to_label_sets
from .providers import Inputs, Runner, get_provider

MODES = ("fwd", "bwd", "full")
MiB = 1 << 20
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_inputs(spec: dict) -> Inputs:
    device = spec["device"]
    views = spec.get("views", 1)
    if spec["N"] % views:
        raise ValueError(f"views: N = {spec['N']} rows are not a whole number of samples of {views} views")
    sizes = spec.get("label_sizes")
    index, num_labels = make_labels(spec["regime"], spec["N"] // views, spec["L"], seed=spec.get("seed", 0),
                                    sizes=tuple(sizes) if sizes else None)
    labels = to_label_sets(index, num_labels, device).repeat_views(views)
    gen = torch.Generator(device="cpu").manual_seed(spec.get("seed", 0) + 7)
    dtype = DTYPES[spec["dtype"]]

    def leaf(rows: int) -> torch.Tensor:
        return torch.randn(rows, spec["d"], generator=gen).to(device=device, dtype=dtype).requires_grad_(True)

    features = leaf(spec["N"])
    from mlcl_fast.presets import resolve_config
    prototypes = leaf(num_labels) if resolve_config(spec["preset"]).uses_prototypes else None
    return Inputs(features, prototypes, labels, spec["preset"], spec.get("temperature", 0.1))


def classify_error(err: BaseException) -> str:
    """Status text for a failed point: 'oom (...)' for allocation failures, else 'error (...)'."""
    text = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or \
        "out of memory" in text.lower() or "can't allocate memory" in text.lower()
    return f"{'oom' if oom else 'error'} ({text})"


def spec_modes(spec: dict) -> tuple[str, ...]:
    modes = tuple(spec.get("modes") or MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: expected a subset of {list(MODES)}, got {unknown}")
    return modes


def measure(spec: dict, emit: Callable[[dict], None]) -> None:
    """Measure the point described by `spec`; call emit(record) once per mode."""
    cuda = spec["device"].startswith("cuda")
    modes = spec_modes(spec)
    done: set[str] = set()

    def report(mode: str, **fields) -> None:
        done.add(mode)
        emit({"mode": mode, **fields})

    try:
        _measure(spec, cuda, report)
    except BaseException as err:  # every failure becomes a status, for the modes not yet reported
        if isinstance(err, KeyboardInterrupt):
            raise
        status = classify_error(err)
        if spec.get("verbose"):
            traceback.print_exc(file=sys.stderr)
        for mode in modes:
            if mode not in done:
                emit({"mode": mode, "status": status})
    finally:
        if cuda:
            torch.cuda.empty_cache()


def _measure(spec: dict, cuda: bool, report) -> None:
    modes = spec_modes(spec)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    shapes = [tuple(s) for s in spec.get("matmul_shapes") or ()]
    common = {"threads": torch.get_num_threads()}
    if shapes:  # before anything of the point is allocated; the heap stays in its usual state for it
        common["matmul_before"] = list(timing.matmul_rates(spec["device"], shapes, DTYPES[spec["dtype"]]))
    if not cuda:
        memory.exact_malloc()
    inputs = build_inputs(spec)
    common["K"] = inputs.labels.width
    t0 = time.perf_counter()
    runner = get_provider(spec["provider"]).setup(inputs)
    runner.full()  # compilation and lazy initialisation happen here, outside every measurement
    if cuda:
        torch.cuda.synchronize()
    common["setup_s"] = round(time.perf_counter() - t0, 3)
    if common["setup_s"] > spec.get("soft_timeout_s", float("inf")):
        for mode in modes:  # one call already took longer than the whole point may (in-process runs)
            report(mode, status=f"timeout (first call {common['setup_s']:.0f} s)", **common)
        return

    peaks = _memory_pass(runner, cuda, modes)
    if not cuda:
        memory.steady_malloc()
    for mode in modes:
        t = _time_mode(runner, mode, cuda, spec)
        extra = {}
        if shapes and mode == modes[-1]:
            # the same machine state as the provider's timing, so the two can be compared
            extra["matmul_after"] = list(timing.matmul_rates(spec["device"], shapes, DTYPES[spec["dtype"]]))
        report(mode, status="ok", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, repeats=t.repeats,
               min_ms=t.min_ms, samples_ms=list(t.samples_ms), **peaks[mode], **common, **extra)


def _memory_pass(runner: Runner, cuda: bool, modes=MODES) -> dict[str, dict]:
    """Peak working memory of each mode, one call each, above the memory in use just before the
    mode (bwd: its forward runs first, so the peak includes the live autograd graph)."""
    out = {}
    if not cuda and (memory.rss_bytes() is None or not memory.reset_peak_rss()):
        return {mode: {} for mode in modes}  # no /proc here: time only
    for mode in modes:
        gc.collect()
        base = _current(cuda)
        loss = runner.forward() if mode == "bwd" else None
        _reset_peak(cuda)
        if mode == "fwd":
            loss = runner.forward()
        elif mode == "bwd":
            runner.backward(loss)
        else:
            runner.full()
        peak = _peak(cuda)
        del loss
        # RSS moves by a few pages on its own (heap trimming): no negative working memory
        out[mode] = {"peak_MB": round(max(peak - base, 0) / MiB, 2), "total_MB": round(peak / MiB, 2)}
    gc.collect()
    return out


def _current(cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return memory.rss_bytes()


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        memory.reset_peak_rss()


def _peak(cuda: bool):
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return memory.peak_rss_bytes()


def _time_mode(runner: Runner, mode: str, cuda: bool, spec: dict) -> timing.Timing:
    kw = dict(min_repeats=spec.get("min_repeats", 3), max_repeats=spec.get("max_repeats", 20),
              budget_s=spec.get("mode_budget_s", 1.0))
    if not cuda:
        kw["warmup"] = 0  # the setup call and the memory pass have warmed this process up
    timer = timing.time_cuda if cuda else timing.time_cpu
    if mode == "fwd":
        return timer(runner.forward, **kw)
    if mode == "bwd":
        return timer(runner.backward, prepare=runner.forward, **kw)
    return timer(runner.full, **kw)


def forked_worker(spec: dict, conn) -> None:
    """Entry point of a process forked by the sweep's fork server: records go back through conn."""
    import os
    os.setsid()  # its own process group: a timeout kills any compiler processes with it
    try:
        measure(spec, conn.send)
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.worker '<json spec>'", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])

    def emit(record: dict) -> None:
        print("ROW " + json.dumps(record), flush=True)

    measure(spec, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
