"""gather="all": the loss over several processes equals one process on the concatenated batch.

Processes are spawned once per world size (2 and 3, gloo on CPU, a file store in a temporary
folder); each runs every job of the list below and saves its measurements; the tests then read
them. Every job draws the global batch from one seed, so each rank can also compute the
single-process result on the concatenated batch itself.

Convention checked (docs/DISTRIBUTED.md): with reduction="mean" or "sum" every rank returns the
global loss, its features' gradient is world_size times the single-process one, and the average
over ranks of the prototypes' gradient (what DDP does) is the single-process one. With
reduction="none" the rank's anchors' losses come back unscaled, and the plain sum over ranks of
the prototypes' gradient is the single-process one.
"""
from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mlcl_fast
from mlcl_fast import MultiLabelContrastiveLoss, multilabel_contrastive_loss
from mlcl_fast.distributed import prototype_share

import brute_force
from cases import GRAD_FLOOR, LOSS_FLOOR, fresh_seed, random_labels, rel_err, to_coo, to_csr, to_padded

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")

FP64 = dict(loss=1e-12, grad=1e-10)


# ------------------------------------------------------------------------------------ the jobs
def _compare(name, preset, batches, views, formats, overrides=None, reduction="mean", dtype=torch.float64,
             backend="reference", L=6, d=5, empty_rows=0, tol=FP64):
    return dict(kind="compare", name=name, preset=preset, overrides=overrides or {}, batches=batches,
                views=views, formats=formats, reduction=reduction, dtype=dtype, backend=backend, L=L, d=d,
                empty_rows=empty_rows, tol=tol)


def _jobs(world: int, backends: list[str]) -> list[dict]:
    """The checks run by a group of `world` processes (per-rank lists are cut to the world size)."""
    cut = lambda xs: (list(xs) * world)[:world]
    jobs = [
        _compare("reg", "reg", cut([3, 5, 2]), cut([2, 2, 2]), cut(["dense", "padded", "csr"])),
        _compare("reg_alpha-1", "reg", cut([4, 1, 3]), cut([1, 1, 1]), cut(["padded", "coo", "dense"]),
                 {"alpha": -1.0}),
        _compare("reg_none", "reg", cut([2, 4, 3]), cut([2, 2, 2]), cut(["dense", "dense", "csr"]), reduction="none"),
        _compare("msc", "msc", cut([5, 2, 4]), cut([1, 1, 1]), cut(["padded", "dense", "coo"])),
        _compare("msc_views", "msc", cut([2, 3, 1]), cut([3, 3, 3]), cut(["csr", "padded", "dense"])),
        _compare("mulsupcon", "mulsupcon", cut([3, 6, 2]), cut([2, 2, 2]), cut(["csr", "dense", "padded"]),
                 empty_rows=2),
        _compare("mulsupcon_none", "mulsupcon", cut([4, 2, 3]), cut([1, 1, 1]), cut(["dense", "padded", "dense"]),
                 reduction="none"),
        _compare("supcon_any", "supcon_any", cut([1, 4, 3]), cut([2, 2, 2]), cut(["dense", "csr", "padded"]),
                 empty_rows=2),
        _compare("supcon_all", "supcon_all", cut([3, 3, 2]), cut([1, 1, 1]), cut(["dense", "dense", "dense"])),
        _compare("jaccard", "jaccard", cut([2, 5, 4]), cut([2, 2, 2]), cut(["coo", "padded", "dense"])),
        _compare("proto_rows", "proto", cut([3, 2, 2]), cut([2, 2, 2]), cut(["dense", "dense", "dense"]),
                 {"prototype_mode": "rows"}),
        # fewer prototypes than ranks: some ranks own no prototype anchor
        _compare("reg_tiny_label_space", "reg", cut([3, 2, 2]), cut([1, 1, 1]), cut(["dense", "dense", "dense"]),
                 L=2),
        # ranks with different numbers of views
        _compare("reg_mixed_views", "reg", cut([3, 2, 4]), cut([2, 1, 3]), cut(["dense", "padded", "dense"])),
        # padded indices with the label space inferred per rank (the ranks see different largest ids)
        _compare("supcon_any_inferred_L", "supcon_any", cut([4, 3, 3]), cut([1, 1, 1]),
                 cut(["padded_inferred", "padded_inferred", "padded_inferred"]), L=9),
        # no valid anchor anywhere: loss 0, gradients 0
        _compare("no_valid_anchor", "supcon_any", cut([2, 3, 2]), cut([2, 2, 2]), cut(["dense", "dense", "dense"]),
                 empty_rows=100),
        _compare("reg_bf16", "reg", cut([4, 3, 2]), cut([2, 2, 2]), cut(["dense", "dense", "dense"]),
                 dtype=torch.bfloat16, tol=dict(loss=1e-5, grad=2e-2)),
        # reduction="sum": the global Σ c_i l_i on every rank, uniform and label anchor weights
        _compare("reg_sum", "reg", cut([3, 5, 2]), cut([2, 1, 2]), cut(["dense", "padded", "csr"]), reduction="sum"),
        _compare("mulsupcon_sum", "mulsupcon", cut([4, 2, 3]), cut([2, 2, 2]), cut(["padded", "dense", "coo"]),
                 reduction="sum", empty_rows=2),
        _compare("no_valid_anchor_sum", "supcon_any", cut([2, 3, 2]), cut([1, 1, 1]), cut(["dense", "dense", "dense"]),
                 reduction="sum", empty_rows=100),
    ]
    for backend in backends:
        fp32 = dict(loss=1e-5, grad=1e-4)
        jobs += [_compare(f"{backend}_reg_fp32", "reg", cut([5, 3, 4]), cut([2, 2, 2]), cut(["dense", "padded", "csr"]),
                          dtype=torch.float32, backend=backend, L=7, d=8, tol=fp32),
                 _compare(f"{backend}_msc_none_fp32", "msc", cut([2, 6, 3]), cut([1, 1, 1]),
                          cut(["padded", "dense", "dense"]), reduction="none", dtype=torch.float32, backend=backend,
                          L=5, d=8, tol=fp32),
                 _compare(f"{backend}_mulsupcon_fp32", "mulsupcon", cut([3, 4, 5]), cut([2, 2, 2]),
                          cut(["dense", "coo", "dense"]), dtype=torch.float32, backend=backend, L=8, d=8, tol=fp32),
                 _compare(f"{backend}_reg_sum_fp32", "reg", cut([4, 2, 5]), cut([2, 2, 1]),
                          cut(["csr", "dense", "padded"]), reduction="sum", dtype=torch.float32, backend=backend, L=6,
                          d=8, tol=fp32)]
    jobs += [dict(kind="ddp", name="ddp_reg", preset="reg", batches=cut([3, 5, 4]), views=2),
             dict(kind="ddp", name="ddp_mulsupcon", preset="mulsupcon", batches=cut([4, 2, 3]), views=2),
             dict(kind="ddp", name="ddp_reg_sum", preset="reg", batches=cut([2, 4, 3]), views=2, reduction="sum")]
    jobs += [dict(kind="queue", name="queue_gather")]
    # Rejected inputs: every rank must raise (none may hang), and the group must stay usable.
    jobs += [dict(kind="error", name=n) for n in ("bad_labels_on_rank0", "dim_mismatch", "dtype_mismatch",
                                                  "requires_grad_mismatch", "label_space_mismatch")]
    jobs += [_compare("after_errors", "reg", cut([2, 3, 2]), cut([2, 2, 2]), cut(["dense", "dense", "dense"]))]
    return jobs


# --------------------------------------------------------------------------- in each process
def _labels_as(dense: torch.Tensor, fmt: str, seed: int):
    if fmt == "dense":
        return dense
    if fmt in ("padded", "padded_inferred"):
        return to_padded(dense, seed)
    if fmt == "csr":
        return to_csr(dense)
    if fmt == "coo":
        return to_coo(dense, seed)
    raise AssertionError(fmt)


def _global_batch(job, seed):
    """Every rank's features (shape [B_r, V_r, d], or [B_r, d] when V_r = 1), the dense labels of
    all samples, and the prototypes when the configuration uses them."""
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for b, v in zip(job["batches"], job["views"]):
        shape = (b, v, job["d"]) if v > 1 else (b, job["d"])
        scale = torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
        feats.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(job["dtype"]))
    labels = random_labels(gen, sum(job["batches"]), job["L"], empty_rows=job["empty_rows"])
    protos = None
    if brute_force.spec_config(job["preset"], **job["overrides"])["prototype_mode"] != "none":
        protos = (torch.randn(job["L"], job["d"], generator=gen, dtype=torch.float64) * 0.7).to(job["dtype"])
    return feats, labels, protos


def _run_compare(job, rank, world, seed):
    feats, labels, protos = _global_batch(job, seed)
    kwargs = dict(preset=job["preset"], backend=job["backend"], reduction=job["reduction"], **job["overrides"])
    starts = [sum(job["batches"][:r]) for r in range(world + 1)]
    fmt = job["formats"][rank]
    num_labels = None if fmt == "padded_inferred" or protos is not None else job["L"]

    x = feats[rank].clone().requires_grad_(True)
    p = None if protos is None else protos.clone().requires_grad_(True)
    my_labels = _labels_as(labels[starts[rank]:starts[rank + 1]], fmt, seed + rank)
    out = multilabel_contrastive_loss(x, my_labels, p, gather="all", num_labels=num_labels, **kwargs)

    # One process, the concatenated batch: rows flattened in rank order, each with its sample's labels.
    rows = [f.detach().reshape(-1, job["d"]) for f in feats]
    row_labels = torch.cat([labels[starts[r]:starts[r + 1]].repeat_interleave(v, 0)
                            for r, v in enumerate(job["views"])])
    rx = torch.cat(rows).requires_grad_(True)
    rp = None if protos is None else protos.clone().requires_grad_(True)
    ref = multilabel_contrastive_loss(rx, row_labels, rp, num_labels=job["L"], **kwargs)

    lo = sum(r.shape[0] for r in rows[:rank])
    hi = lo + rows[rank].shape[0]
    result = {}
    if job["reduction"] == "none":
        n = rx.shape[0]
        plo, phi = prototype_share(job["L"], rank, world) if ref.shape[0] > n else (0, 0)
        mine = torch.cat([torch.arange(lo, hi), n + torch.arange(plo, phi)])
        weights = torch.rand(ref.shape[0], generator=torch.Generator().manual_seed(seed + 99), dtype=torch.float64)
        result["value"] = rel_err(out.detach(), ref.detach()[mine], LOSS_FLOOR)
        (out * weights[mine].to(out.dtype)).sum().backward()
        (ref * weights.to(ref.dtype)).sum().backward()
        feature_scale, prototype_op = 1.0, "sum"
    else:
        every = torch.zeros(world, dtype=torch.float64)
        every[rank] = float(out.detach())
        dist.all_reduce(every)
        result["same_value_on_every_rank"] = bool((every == every[0]).all())
        result["value"] = rel_err(out.detach(), ref.detach(), LOSS_FLOOR)
        out.backward()
        ref.backward()
        feature_scale, prototype_op = float(world), "mean"
    result["grad_features"] = rel_err(x.grad.double().reshape(-1, job["d"]) / feature_scale, rx.grad[lo:hi],
                                      GRAD_FLOOR)
    if p is not None:
        g = p.grad.detach().double().clone()
        dist.all_reduce(g)
        if prototype_op == "mean":
            g /= world
        result["grad_prototypes"] = rel_err(g, rp.grad, GRAD_FLOOR)
    result["grad_dtype_kept"] = x.grad.dtype == x.dtype
    return result


class _Net(nn.Module):
    """A linear embedding followed by the loss module (which owns the prototypes)."""

    def __init__(self, preset, gather, reduction="mean"):
        super().__init__()
        self.body = nn.Linear(7, 6)
        self.loss = MultiLabelContrastiveLoss(preset, num_labels=5, dim=6, backend="reference", gather=gather,
                                              reduction=reduction)

    def forward(self, x, labels):
        return self.loss(self.body(x), labels)


def _run_ddp(job, rank, world, seed):
    from torch.nn.parallel import DistributedDataParallel

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(job["batches"]), job["views"], 7, generator=gen, dtype=torch.float64)
    labels = random_labels(gen, x.shape[0], 5)
    starts = [sum(job["batches"][:r]) for r in range(world + 1)]

    torch.manual_seed(seed)
    reduction = job.get("reduction", "mean")
    model = DistributedDataParallel(_Net(job["preset"], "all", reduction).double())
    torch.manual_seed(seed)
    single = _Net(job["preset"], None, reduction).double()

    out = model(x[starts[rank]:starts[rank + 1]], labels[starts[rank]:starts[rank + 1]])
    out.backward()
    ref = single(x, labels)
    ref.backward()
    result = {"value": rel_err(out.detach(), ref.detach(), LOSS_FLOOR)}
    for (name, p), (_, q) in zip(model.module.named_parameters(), single.named_parameters()):
        result[f"grad_{name}"] = rel_err(p.grad, q.grad, GRAD_FLOOR)
    return result


def _run_error(job, rank, world, seed):
    """The message each rank raises (None when it raised nothing)."""
    x = torch.randn(3, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 2], [1, -1], [3, -1]])
    kwargs = dict(preset="supcon_any", backend="reference", gather="all")
    if job["name"] == "bad_labels_on_rank0":
        if rank == 0:
            labels = torch.tensor([[0, 9], [1, -1], [3, -1]])
        call = lambda: multilabel_contrastive_loss(x, labels, num_labels=4, **kwargs)
    elif job["name"] == "dim_mismatch":
        call = lambda: multilabel_contrastive_loss(torch.randn(3, 4 + rank), labels, num_labels=4, **kwargs)
    elif job["name"] == "dtype_mismatch":
        call = lambda: multilabel_contrastive_loss(x.to(torch.float32 if rank else torch.float64), labels,
                                                   num_labels=4, **kwargs)
    elif job["name"] == "requires_grad_mismatch":
        call = lambda: multilabel_contrastive_loss(x.requires_grad_(rank == 0), labels, num_labels=4, **kwargs)
    else:  # label_space_mismatch: dense labels of different widths
        dense = torch.zeros(3, 4 + rank, dtype=torch.bool)
        dense[:, 0] = True
        call = lambda: multilabel_contrastive_loss(x, dense, **kwargs)
    try:
        call()
    except Exception as err:  # noqa: BLE001 - the test inspects whatever was raised
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def _run_queue(job, rank, world, seed):
    """Every rank enqueues its own rows with gather=True, twice (the second wraps the queue): the
    queues of all ranks must hold the rows of all ranks, in rank order."""
    from mlcl_fast import LabelQueue

    queue = LabelQueue(capacity=10, dim=3, num_labels=6, max_labels=6, dtype=torch.float64)
    everyone = []
    for step in range(2):
        per_rank = [(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed + 10 * step + r),
                                 dtype=torch.float64),
                     random_labels(torch.Generator().manual_seed(seed + 10 * step + r), 3, 6)) for r in range(world)]
        queue.enqueue(*per_rank[rank], gather=True)
        everyone += per_rank
    rows = torch.cat([x for x, _ in everyone])[-10:]
    labels = torch.cat([y for _, y in everyone])[-10:]
    # slot of the i-th newest row: the queue wrote rows in order, position = rows written mod capacity
    order = [(queue.position - 1 - i) % 10 for i in range(rows.shape[0])][::-1]
    got_labels = queue.key_labels().dense()[order]
    return {"rows": bool(torch.equal(queue.keys()[order], rows)), "labels": bool(torch.equal(got_labels, labels)),
            "filled": queue.filled, "keys": queue.keys().clone()}


_KINDS = {"compare": _run_compare, "ddp": _run_ddp, "error": _run_error, "queue": _run_queue}


def _worker(rank, world, store, jobs, seed, out_dir):
    faulthandler.enable(all_threads=True)  # a native abort prints every thread's Python stack
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for i, job in enumerate(jobs):
            try:
                print(f"rank {rank}: job {job['name']}", file=sys.stderr, flush=True)  # shown when a rank dies
                results[job["name"]] = _KINDS[job["kind"]](job, rank, world, seed + 1000 * i)
            except Exception:  # noqa: BLE001 - reported by the test of this job
                results[job["name"]] = {"crash": traceback.format_exc()}
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    # Every result is saved: leave without tearing gloo down. A worker aborted now and then with
    # std::terminate ("terminate called without an active exception", about 1 run in 10-20 here,
    # also with a barrier before destroy_process_group), which points at gloo's teardown (its
    # threads' destructors), not at anything this test checks. Should an abort come before the
    # save, faulthandler and the job lines above say where.
    os._exit(0)


def _spawn(world: int):
    jobs = _jobs(world, _cpu_backends())
    seed = fresh_seed("distributed", world)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), jobs, seed, tmp), nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return {job["name"]: (job, [res[job["name"]] for res in per_rank]) for job in jobs}, seed


_RUNS: dict[int, tuple] = {}


def _results(world: int, name: str):
    if world not in _RUNS:
        _RUNS[world] = _spawn(world)
    runs, seed = _RUNS[world]
    if name not in runs:
        pytest.skip(f"{name} is not run with {world} processes")
    job, per_rank = runs[name]
    for rank, res in enumerate(per_rank):
        assert "crash" not in res, f"rank {rank} of {world} (seed {seed}) crashed:\n{res['crash']}"
    return job, per_rank, seed


# -------------------------------------------------------------------------------------- tests
def _cpu_backends() -> list[str]:
    """The backends besides the reference that the spawned (CPU, gloo) processes run jobs for."""
    return [b for b in mlcl_fast.available_backends("cpu") if b != "reference"]


COMPARE_NAMES = [j["name"] for j in _jobs(2, _cpu_backends()) if j["kind"] == "compare"]
WORLDS = [2, 3]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", COMPARE_NAMES)
def test_matches_single_process(world, name):
    job, per_rank, seed = _results(world, name)
    for rank, res in enumerate(per_rank):
        where = f"{name}, rank {rank} of {world}, batches {job['batches']}, views {job['views']}, seed {seed}"
        assert res["value"] <= job["tol"]["loss"], f"{where}: loss error {res['value']:.2e}"
        assert res["grad_features"] <= job["tol"]["grad"], f"{where}: feature gradient error {res['grad_features']:.2e}"
        if "grad_prototypes" in res:
            assert res["grad_prototypes"] <= job["tol"]["grad"], \
                f"{where}: prototype gradient error {res['grad_prototypes']:.2e}"
        if job["reduction"] != "none":
            assert res["same_value_on_every_rank"], f"{where}: ranks returned different loss values"
        assert res["grad_dtype_kept"], f"{where}: feature gradient not in the features' dtype"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["ddp_reg", "ddp_mulsupcon", "ddp_reg_sum"])
def test_ddp_step_gives_single_process_gradients(world, name):
    job, per_rank, seed = _results(world, name)
    for rank, res in enumerate(per_rank):
        assert set(res) == {"value", "grad_body.weight", "grad_body.bias"} | (
            {"grad_loss.prototypes"} if job["preset"] == "reg" else set()), res
        for key, err in res.items():
            assert err <= 1e-10, f"{name}, rank {rank} of {world}, seed {seed}: {key} error {err:.2e}"


@pytest.mark.parametrize("world", WORLDS)
def test_label_queue_gathers_every_rank_in_rank_order(world):
    _, per_rank, seed = _results(world, "queue_gather")
    for rank, res in enumerate(per_rank):
        assert res["rows"] and res["labels"] and res["filled"] == 10, (rank, world, seed, res)
        assert torch.equal(res["keys"], per_rank[0]["keys"]), "the ranks' queues differ"


EXPECTED_ERRORS = {
    "dim_mismatch": "ValueError: features: the feature dimension differs across ranks",
    "dtype_mismatch": "TypeError: features: the dtype differs across ranks",
    "requires_grad_mismatch": "ValueError: features: requires_grad differs across ranks",
    "label_space_mismatch": "ValueError: labels: the ranks disagree on the label space size",
}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", ["bad_labels_on_rank0", *EXPECTED_ERRORS])
def test_rejected_inputs_raise_on_every_rank(world, name):
    _, per_rank, _ = _results(world, name)
    errors = [res["error"] for res in per_rank]
    if name == "bad_labels_on_rank0":
        assert errors[0].startswith("ValueError: labels: label index 9 is out of range"), errors
        for err in errors[1:]:
            assert err.startswith("RuntimeError: gather: rank(s) [0] of the process group rejected"), errors
    else:
        assert all(err is not None and err.startswith(EXPECTED_ERRORS[name]) for err in errors), errors


# ------------------------------------------------------------------- without a process group
def test_gather_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    x, labels = torch.randn(4, 3), torch.tensor([[0, 1], [1, -1], [2, -1], [0, -1]])
    with pytest.raises(RuntimeError, match=r"^gather: gather='all' needs an initialised torch.distributed"):
        multilabel_contrastive_loss(x, labels, preset="supcon_any", gather="all")
    module = MultiLabelContrastiveLoss("supcon_any", gather="all")  # constructing it needs no group yet
    with pytest.raises(RuntimeError, match=r"^gather: gather='all' needs an initialised"):
        module(x, labels)


@pytest.mark.parametrize("bad", ["world", "ALL", True, 1])
def test_gather_value_is_checked(bad):
    x, labels = torch.randn(4, 3), torch.tensor([[0, 1], [1, -1], [2, -1], [0, -1]])
    with pytest.raises(ValueError, match=r"^gather: expected None or 'all'"):
        multilabel_contrastive_loss(x, labels, preset="supcon_any", gather=bad)
    with pytest.raises(ValueError, match=r"^gather: expected None or 'all'"):
        MultiLabelContrastiveLoss("supcon_any", gather=bad)


def test_group_without_gather_is_rejected():
    x, labels = torch.randn(4, 3), torch.tensor([[0, 1], [1, -1], [2, -1], [0, -1]])
    with pytest.raises(ValueError, match=r"^group: a process group is only used with gather='all'"):
        multilabel_contrastive_loss(x, labels, preset="supcon_any", group=object())


def test_gather_none_is_the_single_process_loss():
    x, labels = torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([[0, 1], [1, -1], [2, -1], [0, -1], [2, 1]])
    plain = multilabel_contrastive_loss(x, labels, preset="supcon_any", backend="reference")
    assert torch.equal(plain, multilabel_contrastive_loss(x, labels, preset="supcon_any", backend="reference",
                                                          gather=None))


@pytest.mark.parametrize("num_prototypes", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_prototype_shares_cover_every_prototype_once(num_prototypes, world):
    shares = [prototype_share(num_prototypes, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == num_prototypes
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    sizes = [hi - lo for lo, hi in shares]
    assert max(sizes) - min(sizes) <= 1
