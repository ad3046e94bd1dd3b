"""The native ops with and without the never-valid anchors left out (backends/native_ops.py).

With prototypes as anchors for every label of a large label space, most anchors are prototypes of
labels absent from the batch: they share no label with any column and can never be valid. The
op layer leaves them out of the kernels' rows when host reads are allowed (check_values=True);
with check_values=False every anchor is swept. The prediction is the ratio of anchors swept:
the blocked algorithm's work is (anchors x columns) products and per-pair passes.

    python -m bench.compaction                         # cpp, blocked algorithm (the CUDA backend's loop)
    python -m bench.compaction --algorithm fused       # cpp's fused kernels (skip invalid anchors already)
    python -m bench.compaction --device cuda --dtype bfloat16   # the cuda backend
"""
from __future__ import annotations

import argparse
import os

import torch

from bench.labels import powerlaw_labels
from bench.timing import time_cpu, time_cuda


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--labels", type=int, default=8192)
    ap.add_argument("--preset", default="reg")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--algorithm", choices=("blocked", "fused"), default="blocked",
                    help="cpp only: MLCL_FAST_CPU_ALGORITHM")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both modes")
    args = ap.parse_args(argv)
    os.environ["MLCL_FAST_CPU_ALGORITHM"] = args.algorithm

    import mlcl_fast
    from mlcl_fast.backends import native_ops
    from mlcl_fast.inputs import prepare

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backend = "cuda" if device.type == "cuda" else "cpp"
    gen = torch.Generator().manual_seed(0)
    index = powerlaw_labels(args.batch, args.labels, seed=0).to(device)
    x = torch.randn(args.batch, args.views, args.dim, generator=gen).to(device, dtype).requires_grad_(True)
    protos = torch.randn(args.labels, args.dim, generator=gen).to(device, dtype).requires_grad_(True)
    kw = dict(preset=args.preset, backend=backend, num_labels=args.labels, label_format="indices")
    problem = prepare(x, index, protos, mlcl_fast.resolve_config(args.preset), 0.1, num_labels=args.labels,
                      label_format="indices")
    kept = int(problem.candidate_anchors().sum())
    print(f"{backend} ({args.algorithm if backend == 'cpp' else 'blocked'}), {args.preset}, {args.dtype}, "
          f"N={args.batch * args.views}, d={args.dim}, L={args.labels}: anchors {problem.num_anchors}, "
          f"left in {kept}; predicted speed-up <= {problem.num_anchors / max(kept, 1):.1f}x")

    def step(check_values: bool):
        loss = mlcl_fast.multilabel_contrastive_loss(x, index, protos, check_values=check_values, **kw)
        loss.backward()
        x.grad = protos.grad = None
        return loss

    timer = time_cuda if device.type == "cuda" else time_cpu
    medians = {False: [], True: []}
    for _ in range(args.rounds):
        for check_values in (False, True):
            medians[check_values].append(timer(lambda: step(check_values), min_repeats=3, budget_s=2.0).median_ms)
    for check_values, label in ((False, "every anchor (check_values=False)"), (True, "candidates only")):
        runs = ", ".join(f"{m:.0f}" for m in medians[check_values])
        print(f"  {label:34s} fwd+bwd median per round: {runs} ms")
    print(f"  speed-up of the quietest rounds: {min(medians[False]) / min(medians[True]):.1f}x")


if __name__ == "__main__":
    main()
