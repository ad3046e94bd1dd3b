"""Training throughput: samples/s and peak memory of one training step, REG vs BCE vs ZLPR heads.

    python -m bench.train_throughput                    # L = 10^4, 10^5, 10^6 (minutes to tens of minutes)
    python -m bench.train_throughput --quick            # small sizes, seconds
    python -m bench.train_throughput --labels 100000 --heads bce reg --steps 5 --out results/train.csv

One step is what `mlcl-fast train` does per batch: a batch of sparse bag-of-words rows (a
synthetic Amazon-670K-like set with L labels, mlcl_fast.data_synth) goes through the MLP backbone
(mlcl_fast.train.models.Backbone, SparseRows input), then through the head, the loss, backward and
an AdamW update of every parameter:

* `bce`, `zlpr`: a linear classifier [L, hidden] and mlcl_fast.bce_loss / zlpr_loss (labels as
  LabelSets, expanded by the loss to a [batch, L] target);
* `reg`: the projection head and MultiLabelContrastiveLoss("reg") with its [L, proj_dim]
  prototypes (backend auto: cpp on a CPU), labels as LabelSets.

Each (head, L) runs in its own forked process, so its peak resident memory (VmHWM) is its own:
`peak_MB` is that process's peak over set-up and the timed steps (model, optimiser state, data,
activations), `step_MB` the part above the resident memory before the first step. `ms` is the
median of `--steps` timed steps after one warm-up step; samples/s = batch / median step time.

A row is not run, and says why, when its predicted memory (parameters with AdamW state, 16 bytes
each, plus the [batch, L] activations of the head) exceeds `--mem-budget-gb` (default: 70% of the
memory available now): "skipped: memory (...)". A row that runs past `--timeout` seconds is
stopped: "timeout". Nothing is extrapolated: every number printed was measured.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from mlcl_fast.memory import available_memory_bytes, peak_rss_bytes, rss_bytes

HEADS = ("reg", "bce", "zlpr")
FULL = dict(labels=(10_000, 100_000, 1_000_000), batch=256, hidden=256, proj_dim=128, features=135_909, steps=5,
            timeout=900.0)
QUICK = dict(labels=(1_000, 10_000), batch=64, hidden=64, proj_dim=32, features=5_000, steps=2, timeout=120.0)
# What a step holds beyond the parameters, per (batch row × label) of the head, for the memory
# check only (the numbers reported are measured): fp32 logits, their gradient, the dense target and
# the loss's intermediates for bce / zlpr, the anchor-to-prototype blocks for reg. Measured on
# this CPU at L = 10^6 (step_MB less the parameters' gradient and AdamW state): about 14 (bce),
# 16 (zlpr) and 10 (reg) bytes; the check uses these upper estimates. Plus the sparse first
# layer's transposed weight and its gradient (2 × features × hidden × 4 bytes).
ACTIVATION_BYTES = {"bce": 16, "zlpr": 24, "reg": 16}
FIELDS = ("head", "labels", "batch", "hidden", "proj_dim", "features", "backend", "threads", "status", "steps",
          "ms", "ms_p20", "ms_p80", "samples_per_s", "peak_MB", "step_MB", "predicted_MB")


def predicted_bytes(head: str, L: int, batch: int, hidden: int, proj_dim: int, features: int) -> int:
    """Parameters (with gradient and AdamW's two moments: 16 bytes each), the head's [batch, L]
    activations and the first layer's transients; the backbone's [features, hidden] layer counts."""
    backbone = features * hidden + hidden * hidden
    head_params = L * hidden if head in ("bce", "zlpr") else hidden * hidden + hidden * proj_dim + L * proj_dim
    return 16 * (backbone + head_params) + ACTIVATION_BYTES[head] * batch * L + 8 * features * hidden


def measure(head: str, L: int, batch: int, hidden: int, proj_dim: int, features: int, steps: int,
            threads: Optional[int], seed: int = 0) -> dict:
    """One row, in the calling process: build the data and model, one warm-up step, `steps` timed ones."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    from mlcl_fast import MultiLabelContrastiveLoss, bce_loss, zlpr_loss
    from mlcl_fast.backends import resolve_backend
    from mlcl_fast.data_synth import generate, make_config
    from mlcl_fast.train.models import Backbone, ProjectionHead
    from mlcl_fast.train.protocols import adam, label_sets, sparse_rows

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rows = batch * (steps + 1)
    data = generate(make_config("amazon670k", train=rows, test=1, labels=L, features=features, seed=seed)).train
    X = sp.csr_matrix((data.x_data, data.x_indices, data.x_indptr), shape=(rows, features))
    Y = sp.csr_matrix((np.ones(len(data.y_indices), np.int8), data.y_indices, data.y_indptr), shape=(rows, L))
    Y.sum_duplicates()
    backbone = Backbone(features, hidden, 2, 0.1)
    backend = "-"
    if head == "reg":
        proj = ProjectionHead(hidden, proj_dim)
        crit = MultiLabelContrastiveLoss("reg", num_labels=L, dim=proj_dim, backend="auto")
        backend = resolve_backend("auto", torch.device("cpu"))[0]
        modules = [backbone, proj, crit]
        step_loss = lambda x, y: crit(proj(backbone(x)), y)
    else:
        classifier = torch.nn.Linear(hidden, L)
        loss_fn = bce_loss if head == "bce" else zlpr_loss
        modules = [backbone, classifier]
        step_loss = lambda x, y: loss_fn(classifier(backbone(x)), y)
    opt = adam([p for m in modules for p in m.parameters()], 1e-3, weight_decay=0.01)  # the training's optimiser

    def step(k: int) -> float:
        idx = np.arange(k * batch, (k + 1) * batch)
        t = time.perf_counter()
        x, y = sparse_rows(X, idx), label_sets(Y, idx)     # batch assembly is part of a step
        loss = step_loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        float(loss.detach())                                # waits for the device
        return (time.perf_counter() - t) * 1000

    before = rss_bytes()
    step(0)                                                 # warm-up: optimiser state, allocator, kernels
    times = [step(k) for k in range(1, steps + 1)]
    peak = peak_rss_bytes()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    ms = statistics.median(times)
    return {"backend": backend, "threads": torch.get_num_threads(), "status": "ok", "steps": steps,
            "ms": round(ms, 2), "ms_p20": round(q[0], 2), "ms_p80": round(q[-1], 2),
            "samples_per_s": round(batch / (ms / 1000), 1),
            "peak_MB": None if peak is None else round(peak / 2**20, 1),
            "step_MB": None if peak is None or before is None else round((peak - before) / 2**20, 1)}


def _warm_up() -> None:
    """Imports and first-call set-up that every forked row would otherwise repeat (the first
    optimiser step imports torch._dynamo and sympy: about a second), on tensors too small to start
    torch's thread pool: a process forked after the pool has run can deadlock in it."""
    import torch

    import mlcl_fast.train.protocols
    from mlcl_fast.backends import resolve_backend

    p = torch.nn.Parameter(torch.zeros(2))
    opt = mlcl_fast.train.protocols.adam([p], 1e-3, weight_decay=0.01)
    p.grad = torch.ones(2)
    opt.step()
    resolve_backend("auto", torch.device("cpu"))


def _child(conn, args: tuple) -> None:
    try:
        conn.send(measure(*args))
    except BaseException as err:  # reported as the row's status
        conn.send({"status": f"error: {type(err).__name__}: {err}"[:300]})
    finally:
        conn.close()


def run_row(head: str, L: int, opts: argparse.Namespace, budget: Optional[int]) -> dict:
    row = {"head": head, "labels": L, "batch": opts.batch, "hidden": opts.hidden, "proj_dim": opts.proj_dim,
           "features": opts.features, "backend": "", "threads": opts.threads or "", "steps": ""}
    need = predicted_bytes(head, L, opts.batch, opts.hidden, opts.proj_dim, opts.features)
    row["predicted_MB"] = round(need / 2**20, 1)
    if budget is not None and need > budget:
        row["status"] = f"skipped: memory (predicted {need / 2**30:.1f} GB > budget {budget / 2**30:.1f} GB)"
        return row
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, (head, L, opts.batch, opts.hidden, opts.proj_dim, opts.features,
                                                   opts.steps, opts.threads)))
    proc.start()
    send.close()
    timed_out = not recv.poll(opts.timeout)   # True also when the worker dies: its end of the pipe closes
    result = None
    if not timed_out:
        try:
            result = recv.recv()
        except EOFError:
            pass
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        if timed_out:
            status = f"timeout (> {opts.timeout:g} s)"
        elif proc.exitcode == -9:
            status = "killed (signal 9; out of memory?)"
        else:
            status = f"error: the worker exited with status {proc.exitcode}"
        result = {"status": status}
    row.update(result)
    return row


def format_row(r: dict) -> str:
    head = f"{r['head']:5s} L={r['labels']:>9,}"
    if r["status"] != "ok":
        return f"{head}  {r['status']}"
    return (f"{head}  {r['samples_per_s']:>9,.1f} samples/s  {r['ms']:>9,.1f} ms/step "
            f"({r['ms_p20']:,.0f}-{r['ms_p80']:,.0f})  peak {r['peak_MB']:>8,.0f} MB  "
            f"(step {r['step_MB']:,.0f} MB)  backend {r['backend']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label-space sizes (default: 10^4 10^5 10^6)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None, help="backbone width (the classifier is [L, hidden])")
    p.add_argument("--proj-dim", type=int, default=None, help="REG: projection and prototype size")
    p.add_argument("--features", type=int, default=None, help="bag-of-words features of the synthetic input")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per row before it is stopped")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="rows predicted to need more are skipped (default: 70%% of the available memory)")
    p.add_argument("--out", default="bench/results/train_throughput.csv", help="CSV file written")
    opts = p.parse_args(argv)
    base = QUICK if opts.quick else FULL
    for key in ("batch", "hidden", "proj_dim", "features", "steps", "timeout"):
        if getattr(opts, key) is None:
            setattr(opts, key, base[key])
    labels = opts.labels or list(base["labels"])
    if opts.mem_budget_gb is not None:
        budget = int(opts.mem_budget_gb * 2**30)
    else:
        avail = available_memory_bytes()
        budget = None if avail is None else int(0.7 * avail)
    print(f"one training step (batch {opts.batch}, backbone {opts.features:,} sparse features -> {opts.hidden} x 2, "
          f"AdamW); median of {opts.steps} steps; memory budget "
          f"{'none' if budget is None else f'{budget / 2**30:.1f} GB'}", flush=True)
    _warm_up()
    rows = []
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for L in labels:
        for head in opts.heads:
            row = run_row(head, L, opts, budget)
            rows.append(row)
            print(format_row(row), flush=True)
            with open(out, "w", newline="") as f:   # rewritten after every row: a stopped run keeps its rows
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
    print(f"wrote {out}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
