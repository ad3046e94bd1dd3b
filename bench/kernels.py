"""Static kernel report: what the Triton kernels compile to on a Hopper GPU, without one.

    python -m bench.kernels [--preset reg] [--dtype bfloat16] [--dim 256] [--labels 16384] [--samples 4096]

Runs the Triton backend's forward and backward for one point on CPU tensors with every launch
recorded instead of run (mlcl_fast.triton.recording), then compiles exactly the recorded
kernels, arguments and meta-parameters ahead of time for sm_90 and reads the cubin with the
cuobjdump that ships inside the triton wheel: registers, stack (spilled registers), shared
memory, and counts of HGMMA (wgmma: Hopper tensor cores), HMMA (mma.sync: pre-Hopper tensor
cores) and FFMA (fp32 FMA, no tensor cores) instructions. Needs triton (not a GPU) and must run
without TRITON_INTERPRET. tests/test_kernel_report.py asserts wgmma and no spills from it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch

ARCH = 90  # sm_90: H100 / H200
SASS_OPS = ("HGMMA", "HMMA", "FFMA")


@dataclass(frozen=True)
class KernelReport:
    kernel: str
    meta: str           # tile and mode constexprs that tell the compiled variants apart
    registers: int
    stack: int          # bytes of local stack per thread: > 0 means spilled registers
    shared: int         # bytes of static shared memory per program (as the cubin declares it)
    warps: int
    dots: int           # tl.dot calls in the kernel source (0: a kernel that needs no tensor cores)
    counts: dict        # SASS instruction name -> count

    def passes(self) -> bool:
        """No spilled registers, and every kernel with a tl.dot on wgmma only (no mma.sync)."""
        return self.stack == 0 and (self.dots == 0 or (self.counts.get("HGMMA", 0) > 0
                                                       and self.counts.get("HMMA", 0) == 0))

    def row(self) -> str:
        ops = " ".join(f"{op} {self.counts.get(op, 0)}" for op in SASS_OPS)
        return (f"{self.kernel:<20} {self.meta:<44} regs {self.registers:>3}  stack {self.stack:>4} B  "
                f"shared {self.shared:>6} B  warps {self.warps}  dots {self.dots}  {ops}")


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})")
    return path


def gpu_target():
    """The compilation target of every tool here that compiles without a GPU: sm_90, warps of 32."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, 32)


def _compile(fn, args: tuple, meta: dict):
    """Compile `fn` for sm_90 with the signature, specialisation and options the JIT would derive
    from these arguments on a GPU (triton's own binder, with the CUDA backend of the target)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = gpu_target()
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


# cuobjdump's reading of each distinct cubin (by content), for the rest of the process: points of
# one report share many kernels (the preparation's, the normaliser's), and reading one takes
# ~0.4 s, most of a point's time when triton's cache holds the compiled kernels.
_READ: dict[bytes, tuple[int, int, int, dict]] = {}


def _read_cubin(cubin: bytes, tmpdir: str, stem: str) -> tuple[int, int, int, dict]:
    digest = hashlib.sha256(cubin).digest()
    if digest not in _READ:
        path = os.path.join(tmpdir, stem + ".cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        # one call prints the resource usage, then the SASS
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", path], capture_output=True, text=True,
                             check=True).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
        if found is None:
            raise RuntimeError(f"cuobjdump -res-usage: no resource line in {out[:2000]!r}")
        counts = {op: len(re.findall(rf"\b{op}\b", out)) for op in SASS_OPS}
        regs, stack, shared = (int(v) for v in found.groups())
        _READ[digest] = regs, stack, shared, counts
    return _READ[digest]


def _inspect(compiled, tmpdir: str, stem: str) -> tuple[int, int, int, dict]:
    regs, stack, shared, counts = _read_cubin(compiled.asm["cubin"], tmpdir, stem)
    return regs, stack, max(shared, int(compiled.metadata.shared)), counts


def _dots_in_source(fn) -> int:
    """tl.dot calls of the kernel and of the device functions it calls (by source text)."""
    import inspect

    import triton

    seen, total, todo = set(), 0, [fn]
    while todo:
        f = todo.pop()
        if f.__name__ in seen:
            continue
        seen.add(f.__name__)
        src = inspect.getsource(f.fn if hasattr(f, "fn") else f)
        total += len(re.findall(r"\btl\.dot\(", src))
        module = sys.modules[(f.fn if hasattr(f, "fn") else f).__module__]
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\(", src):
            g = getattr(module, name, None)
            if isinstance(g, triton.runtime.jit.JITFunction):
                todo.append(g)
    return total


_META_SKIP = ("num_warps", "num_stages", "NATIVE", "PRECISION")


def _meta_text(meta: dict) -> str:
    keys = [k for k in meta if k.startswith("BLOCK") or k in ("MODE", "WEIGHTING", "FACTOR", "REG", "GRAD",
                                                                "REG_VALUE", "LABELS", "PRECISION", "SYM", "GATHER")]
    short = {"BLOCK_M": "M", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_D": "D", "BLOCK_P": "P", "BLOCK": "B"}
    return ",".join(f"{short.get(k, k)}={int(meta[k]) if isinstance(meta[k], bool) else meta[k]}" for k in keys)


def record_point(preset: str, dtype: torch.dtype, dim: int, num_labels: int, samples: int,
                 regime: str | None = None, seed: int = 0, fp32: str = "ieee", grad: str | None = None
                 ) -> list[tuple]:
    """(kernel, args, meta) of every launch of one forward+backward on CPU tensors, with power-law
    label sets (bench.labels: Zipf 1.1, 2 to 20 labels per sample). `fp32`: the precision of fp32
    dots (configs.FP32_PRECISIONS), as MLCL_FAST_TRITON_FP32 selects it on a GPU; `grad`: the
    gradient strategy (configs.GRAD_MODES, MLCL_FAST_TRITON_GRAD; default its default)."""
    from mlcl_fast.inputs import prepare
    from mlcl_fast.presets import resolve_config
    from mlcl_fast.reduction import mean_loss
    from mlcl_fast.triton import canonical, configs, driver, launch, normalize, prologue, recording

    if launch.INTERPRETED:
        raise RuntimeError("bench.kernels compiles for a GPU: run it without TRITON_INTERPRET")
    from .labels import powerlaw_labels

    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(samples, dim, generator=gen).to(dtype).requires_grad_(True)
    index = powerlaw_labels(samples, num_labels, seed=seed)
    cfg = resolve_config(preset)
    protos = torch.randn(num_labels, dim, generator=gen).to(dtype).requires_grad_(True) if cfg.uses_prototypes \
        else None
    launches = []
    settings = {"MLCL_FAST_TRITON_LABELS": regime, configs.FP32_PRECISION_ENV: fp32, "MLCL_FAST_TRITON_GRAD": grad}
    before = {name: os.environ.get(name) for name in settings}
    for name, value in settings.items():
        if value is not None:
            os.environ[name] = value
    try:
        with recording.recording(lambda kernel, grid, args, meta: launches.append((kernel, args, dict(meta)))):
            # The API's own preparation, then the Triton driver on CPU tensors (the public API
            # would refuse a GPU backend on the CPU).
            problem = prepare(feats, index, protos, cfg, 0.1, num_labels, "indices", native_half=True,
                              unit_rows=normalize.unit_rows)
            # The check_values=False path's first launch (labels canonicalised with the rows
            # normalised), and its canonicaliser alone (fp64 rows); the host path above reads
            # values instead: recorded here, their outputs unused.
            prologue.prologue_op(index, num_labels, feats, None, protos, feats.dtype)
            canonical.canonical_index_rows(index, num_labels)
            losses, valid = driver.anchor_losses(problem)
            mean_loss(problem, losses, valid).backward()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return launches


def report(launches: list[tuple]) -> list[KernelReport]:
    """Compile each distinct recorded launch once and read its cubin."""
    import tempfile

    from concurrent.futures import ThreadPoolExecutor

    distinct, seen = [], set()
    for kernel, args, meta in launches:
        arg_kinds = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)
        key = (kernel.__name__, arg_kinds, tuple(sorted(meta.items())))
        if key not in seen:
            seen.add(key)
            distinct.append((kernel, meta, _compile(kernel, args, meta)))
    # cuobjdump runs as a subprocess: threads read several cubins at once
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        reads = list(pool.map(lambda item: _inspect(item[1][2], tmp, f"k{item[0]}"), enumerate(distinct)))
    return [KernelReport(kernel.__name__, _meta_text(meta), regs, stack, shared, int(meta.get("num_warps", 4)),
                         _dots_in_source(kernel), counts)
            for (kernel, meta, _), (regs, stack, shared, counts) in zip(distinct, reads)]


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="preset (repeatable; default reg)")
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="repeatable; default bfloat16")
    ap.add_argument("--dim", action="append", type=int, help="repeatable; default 128 and 256")
    ap.add_argument("--labels", type=int, default=16384, help="L (default 16384)")
    ap.add_argument("--samples", type=int, default=4096, help="N (default 4096)")
    ap.add_argument("--regime", default=None, help="force a label regime (MLCL_FAST_TRITON_LABELS)")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    from mlcl_fast.triton.configs import FP32_PRECISIONS, GRAD_MODES

    ap.add_argument("--grad", default=None, choices=GRAD_MODES,
                    help="gradient strategy (MLCL_FAST_TRITON_GRAD; default: its default)")

    ap.add_argument("--fp32", default="ieee", choices=FP32_PRECISIONS,
                    help="precision of fp32 dots (MLCL_FAST_TRITON_FP32; tf32: what torch's allow_tf32 selects)")
    args = ap.parse_args(argv)
    ok = True
    for preset in args.preset or ["reg"]:
        for dtype in args.dtype or ["bfloat16"]:
            for dim in args.dim or [128, 256]:
                point = dict(preset=preset, dtype=dtype, dim=dim, labels=args.labels, samples=args.samples,
                             fp32=args.fp32, grad=args.grad)
                if not args.json:
                    print(f"# {preset} {dtype} d={dim} L={args.labels} N={args.samples} sm_{ARCH}"
                          + (f" regime={args.regime}" if args.regime else "") + (f" fp32={args.fp32}" if dtype == "float32" else "")
                          + (f" grad={args.grad}" if args.grad else ""))
                launches = record_point(preset, DTYPES[dtype], dim, args.labels, args.samples, args.regime,
                                        fp32=args.fp32, grad=args.grad)
                for r in report(launches):
                    print(json.dumps(dict(point, **asdict(r), passes=r.passes())) if args.json else r.row())
                    ok &= r.passes()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
