"""Trace the Triton backend's public call under torch.compile(fullgraph=True) without a GPU.

    python -m bench.compile_trace [--case PRESET:L[:GRAD[:FORM]]] ...   (default: a few cases)

Dynamo and AOT autograd trace the forward and the backward of `multilabel_contrastive_loss(...,
backend="triton", check_values=False)` with padded indices (FORM `call`, the default) or of the
backend's driver on a Problem with canonical label sets, rows normalised by torch (FORM `driver`:
what tests/test_triton.py's GPU compile tests compile) on CPU tensors: the triton_op bodies
are traced into their kernels (`wrap_triton`), and torch's analysis of which arguments each kernel
mutates compiles the kernels' TTIR for a stand-in sm_90 target (no driver is needed for that).
The compiled graphs are never run (no kernel can run without a GPU): the AOT compiler returns
zeros of the traced output shapes, enough to trace the backward. So this finds what breaks
tracing (a graph break, a host read, a data-dependent shape, an op without a fake kernel) on any
machine; what only inductor's code generation or a real run shows stays for the GPU tests.

`--inductor` goes one step further: the default backend (inductor) compiles each case, forward
then backward, and every Triton kernel it builds, the user kernels among them as inductor
re-generates them, is compiled for sm_90 (inductor would target the CPU tensors' device); the
stand-in driver loads nothing and its launches do nothing, so the "outputs" hold no values and
only the compilation is checked. This is where torch.compile used to fail on a GPU: inductor
passes Python float arguments as fp64 (triton's launcher: fp32), and a kernel mixing them into
fp32 loop-carried values did not compile.

Run it in its own process without TRITON_INTERPRET (the kernels must be JIT functions). The
operators' CPU-tensor check is opened as under the interpreter, so the tiles are the
interpreter's small ones; the graph has the same operators and kernels as on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from .kernels import ARCH, gpu_target

DEFAULT_CASES = ("reg:12", "reg:300", "reg:300:symmetric", "reg_noreg:12", "msc:12", "reg:12::driver",
                 "msc:12:recompute:driver")


class _StandInDriver:
    """Triton's active driver as far as compiling needs one: the target (torch's kernel-mutation
    analysis), device properties, and (`--inductor`) loading and launching, which do nothing."""

    class utils:  # noqa: N801 - the driver attribute triton reads
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                    "sm_clock_rate": 1980000, "mem_clock_rate": 3200000, "mem_bus_width": 6144}

        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads

        @staticmethod
        def unload_module(module):
            pass

    def get_current_target(self):
        return gpu_target()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None  # nothing runs here


COMPILED: list[str] = []  # the kernels compiled for sm_90 in --inductor mode, in order


def _compile_for_gpu(original):
    """triton.compile with inductor's CPU target replaced by sm_90 (the CPU options dropped)."""

    def compile_for_gpu(src, target=None, options=None, **kwargs):
        if target is not None and target.backend == "cpu":
            target = gpu_target()
            options = {k: v for k, v in (options or {}).items() if k in ("num_warps", "num_stages", "debug")}
        out = original(src, target=target, options=options, **kwargs)
        COMPILED.append(getattr(src, "name", "?"))
        return out

    return compile_for_gpu


def _aot_backend(graphs: list):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        graphs.append(gm)
        outputs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
        values = [o.meta["val"] if hasattr(o, "meta") else o for o in outputs]

        def stand_in(*args):  # zeros of the traced outputs: the kernels cannot run here
            return [torch.zeros(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v for v in values]

        return make_boxed_func(stand_in)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def trace_case(preset: str, num_labels: int, grad: str | None = None, check_values: bool = False,
               form: str = "call", inductor: bool = False) -> list:
    """The traced forward and backward graphs of one case (raises what tracing raised), or with
    `inductor` none: the case compiled by inductor (COMPILED lists its kernels).
    `check_values=True` makes the call read label values on the host: tracing must fail."""
    import torch.nn.functional as F

    from mlcl_fast import as_label_sets, multilabel_contrastive_loss
    from mlcl_fast.presets import resolve_config
    from mlcl_fast.problem import Problem
    from mlcl_fast.triton import driver

    if grad:
        os.environ["MLCL_FAST_TRITON_GRAD"] = grad
    else:
        os.environ.pop("MLCL_FAST_TRITON_GRAD", None)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    B, V, d = 16, 2, 64
    cfg = resolve_config(preset)
    feats = torch.randn(B, V, d, generator=gen).requires_grad_(True)
    protos = torch.randn(num_labels, d, generator=gen).requires_grad_(True) if cfg.uses_prototypes else None
    index = torch.randint(-1, num_labels, (B, 3), generator=gen)
    if form == "call":
        kwargs = dict(preset=preset, num_labels=num_labels, label_format="indices", backend="triton",
                      check_values=check_values)

        def loss_fn(f, p):
            return multilabel_contrastive_loss(f, index, p, **kwargs)
    elif form == "driver":
        label_sets = as_label_sets(index, B, num_labels, "indices").repeat_views(V)

        def loss_fn(f, p):
            rows = F.normalize(f.flatten(0, 1), dim=-1)
            p = None if p is None else F.normalize(p, dim=-1)
            losses, valid = driver.anchor_losses(Problem(rows, p, label_sets, cfg, 0.1))
            return losses.sum() / valid.sum().clamp(min=1)
    else:
        raise ValueError(f"form: expected 'call' or 'driver', got {form!r}")
    graphs: list = []
    backend = "inductor" if inductor else _aot_backend(graphs)
    torch.compile(loss_fn, fullgraph=True, backend=backend)(feats, protos).backward()
    return graphs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="PRESET:L[:GRAD[:FORM]] (repeatable)")
    ap.add_argument("--inductor", action="store_true",
                    help="compile with inductor, every Triton kernel for sm_90 (launches do nothing)")
    ap.add_argument("--check-values", action="store_true",
                    help="trace the call with check_values=True, which reads label values on the host (fails)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        print("compile_trace: run without TRITON_INTERPRET (the kernels must be JIT functions)", file=sys.stderr)
        return 2
    import triton

    from mlcl_fast.triton import launch

    triton.runtime.driver.set_active(_StandInDriver())
    launch.INTERPRETED = True  # the operators then take CPU tensors; nothing is launched
    if args.inductor:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # compile in this process, through the wrapper below
        inductor_config.force_disable_caches = True  # compile every kernel, every time
        triton.compile = _compile_for_gpu(triton.compile)
        # the kernels' outputs hold no values here, so an assertion on them would fail spuriously;
        # dynamo inlines this Python stand-in, so the graphs carry no device-side assertion
        torch._assert_async = lambda *args, **kwargs: None
    ok = True
    for case in args.case or DEFAULT_CASES:
        preset, labels, grad, form = (case.split(":") + ["", ""])[:4]
        start = len(COMPILED)
        try:
            graphs = trace_case(preset, int(labels), grad or None, args.check_values, form or "call", args.inductor)
            if args.inductor:
                kernels = COMPILED[start:]
                print(f"{case}: compiled by inductor, {len(kernels)} Triton kernels for sm_{ARCH}: "
                      f"{', '.join(kernels)}")
                ok &= len(kernels) > 0
            else:
                kernels = sum(1 for g in graphs for n in g.graph.nodes if "triton_kernel_wrapper" in str(n.target))
                print(f"{case}: traced, {len(graphs)} graphs (forward, backward), {kernels} Triton kernel calls")
                ok &= len(graphs) == 2 and kernels > 0
        except Exception:
            ok = False
            print(f"{case}: FAILED")
            traceback.print_exc()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
