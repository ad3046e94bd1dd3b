"""pytest-benchmark microbenchmarks: forward, backward and forward+backward of every available backend.

    pytest bench/ --benchmark-only                      # all
    pytest bench/ --benchmark-only -k "cpp and full"    # a subset

Backends are discovered with mlcl_fast.available_backends(device) when the module is collected,
so a new backend shows up here without a change. Benchmarks of one shape and mode share a group,
which puts the backends side by side in pytest-benchmark's table. Not part of `pytest tests`.
"""
from __future__ import annotations

import pytest
import torch

import mlcl_fast
from bench.providers import BackendProvider
from bench.worker import build_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in mlcl_fast.available_backends(device)]
SHAPES = {
    "reg-few-N512-L64": dict(preset="reg", regime="few", N=512, L=64, d=64),
    "msc-powerlaw-N512-L4096": dict(preset="msc", regime="powerlaw", N=512, L=4096, d=64),
    "jaccard-powerlaw-N1024-L10000": dict(preset="jaccard", regime="powerlaw", N=1024, L=10_000, d=64),
}


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device,backend", CASES, ids=[f"{d}-{b}" for d, b in CASES])
def test_loss(benchmark, device, backend, shape, mode):
    spec = dict(SHAPES[shape], device=device, dtype="float32", seed=0)
    runner = BackendProvider(backend).setup(build_inputs(spec))
    sync = _sync(device)
    runner.full()  # warm-up: lazy initialisation, kernel compilation
    sync()
    benchmark.group = f"{shape} {mode} ({device})"
    benchmark.extra_info.update(spec, backend=backend, mode=mode)

    if mode == "fwd":
        def forward():
            loss = runner.forward()
            sync()
            return loss
        loss = benchmark(forward)
    elif mode == "bwd":
        def backward(loss):
            runner.backward(loss)
            sync()
        benchmark.pedantic(backward, setup=lambda: ((runner.forward(),), {}), rounds=10, warmup_rounds=1)
        loss = runner.forward()
    else:
        def full():
            runner.full()
            sync()
        benchmark(full)
        loss = runner.forward()
    assert torch.isfinite(loss).all()
