"""Providers: the things a sweep point times. Each one turns the point's inputs into two callables.

    provider.setup(inputs) -> Runner(forward() -> loss, backward(loss))

- one provider per mlcl_fast backend usable on the device (`mlcl_fast.available_backends`), so a
  new backend is benchmarked as soon as it registers, through the public API;
- `compile(reference)`: torch.compile of the reference backend's tensor program;
- `published`: the dense M x M x L formulation of the authors' REG code (bench/published.py).

Each provider also predicts its peak working memory, so the sweep can refuse a point that would
not fit instead of bringing the machine down.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import mlcl_fast
from mlcl_fast import memory, reference
from mlcl_fast.inputs import l2_normalize
from mlcl_fast.labels import LabelSets
from mlcl_fast.presets import LossConfig, resolve_config
from mlcl_fast.problem import Problem
from mlcl_fast.reduction import mean_loss

from . import published



@dataclass
class Inputs:
    features: Tensor                 # [N, d], requires grad
    prototypes: Optional[Tensor]     # [L, d], requires grad, when the preset uses prototypes
    labels: LabelSets
    preset: str
    temperature: float = 0.1

    @property
    def config(self) -> LossConfig:
        return resolve_config(self.preset)


@dataclass
class Runner:
    forward: Callable[[], Tensor]
    backward: Callable[[Tensor], None]

    def full(self) -> None:
        self.backward(self.forward())


@dataclass(frozen=True)
class Shape:
    """What a memory prediction needs to know about a point, before anything is built."""
    preset: str
    N: int
    L: int
    d: int
    K: int
    itemsize: int = 4

    @property
    def config(self) -> LossConfig:
        return resolve_config(self.preset)

    @property
    def anchors(self) -> int:
        return self.N + (self.L if self.config.prototype_mode == "rows" else 0)

    @property
    def columns(self) -> int:
        return self.N + (self.L if self.config.uses_prototypes else 0)


def useful_flops(shape: Shape, mode: str, anchors: Optional[int] = None) -> float:
    """Matrix FLOPs a fused kernel cannot avoid: 2·R·|C|·d per pass over the logits.

    forward: logits (1 pass); backward: recomputed logits + gradients of rows and columns (3);
    forward+backward: 4 passes, i.e. 8·R·|C|·d. R is every anchor unless `anchors` gives the
    valid ones (with a positive), the only rows a backend that skips the others must compute."""
    passes = {"fwd": 1, "bwd": 3, "full": 4}[mode]
    rows = shape.anchors if anchors is None else anchors
    return 2.0 * passes * rows * shape.columns * shape.d


def _backward(inputs: Inputs) -> Callable[[Tensor], None]:
    leaves = [t for t in (inputs.features, inputs.prototypes) if t is not None]

    def backward(loss: Tensor) -> None:
        for t in leaves:
            t.grad = None
        loss.backward()
    return backward


class Provider:
    name: str = ""
    backend: str = ""

    def supports(self, cfg: LossConfig) -> bool:
        return True

    def predict_bytes(self, shape: Shape) -> int:
        raise NotImplementedError

    def setup(self, inputs: Inputs) -> Runner:
        raise NotImplementedError


def _fused_bytes(shape: Shape) -> int:
    return memory.fused_bytes(shape.N, shape.L, shape.d, shape.K)


def _reference_bytes(shape: Shape) -> int:
    return memory.reference_bytes(shape.anchors, shape.columns, shape.N, shape.L, shape.d, shape.K)


class BackendProvider(Provider):
    """An mlcl_fast backend through the public functional API."""

    def __init__(self, backend: str):
        self.name = self.backend = backend

    def predict_bytes(self, shape: Shape) -> int:
        return _reference_bytes(shape) if self.backend == "reference" else _fused_bytes(shape)

    def setup(self, inputs: Inputs) -> Runner:
        def forward() -> Tensor:
            return mlcl_fast.multilabel_contrastive_loss(
                inputs.features, inputs.labels, inputs.prototypes, preset=inputs.preset,
                temperature=inputs.temperature, backend=self.backend)
        return Runner(forward, _backward(inputs))


def reference_program(inputs: Inputs) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """The reference loss as one tensor program (normalise, anchor losses, mean reduction).

    The public API's input checks read tensor values on the host, which would split a compiled
    graph; they are left out here (the inputs are valid by construction)."""
    cfg, labels, temperature = inputs.config, inputs.labels, inputs.temperature

    def program(features: Tensor, prototypes: Optional[Tensor]) -> Tensor:
        rows = l2_normalize(features)
        protos = None if prototypes is None else l2_normalize(prototypes)
        problem = Problem(rows, protos, labels, cfg, temperature)
        return mean_loss(problem, *reference.anchor_losses(problem))
    return program


class CompiledReference(Provider):
    """torch.compile of the reference program; `compile=False` runs the same program eagerly."""

    name = "compile(reference)"
    backend = "reference"

    def __init__(self, compile: bool = True):
        self.compile = compile

    def predict_bytes(self, shape: Shape) -> int:
        return _reference_bytes(shape)

    def setup(self, inputs: Inputs) -> Runner:
        program = reference_program(inputs)
        if self.compile:
            # in-process sweeps (CUDA) compile one shape per point: start from an empty cache, or
            # dynamo's recompile limit would silently fall back to eager after a few points
            torch._dynamo.reset()
            program = torch.compile(program, dynamic=False, options=reference.COMPILE_OPTIONS)
        return Runner(lambda: program(inputs.features, inputs.prototypes), _backward(inputs))


class PublishedProvider(Provider):
    """The authors' dense formulation of REG (presets of the REG family only)."""

    name = "published"
    backend = "-"

    def supports(self, cfg: LossConfig) -> bool:
        return published.supports(cfg)

    def predict_bytes(self, shape: Shape) -> int:
        m = shape.N + shape.L
        return (published.weight_tensor_bytes(shape.N, shape.L) + 14 * m * m * 4
                + 4 * m * shape.L * 4 + _fused_bytes(shape))

    def setup(self, inputs: Inputs) -> Runner:
        cfg = inputs.config
        if not self.supports(cfg):
            raise ValueError(f"preset: 'published' covers the REG family only, got {inputs.preset!r}")
        return Runner(lambda: published.published_loss(inputs.features, inputs.labels, inputs.prototypes, cfg,
                                                       inputs.temperature), _backward(inputs))


EXTRA_PROVIDERS = ("compile(reference)", "published")


def provider_names(device: str) -> list[str]:
    """Every provider for `device`: the usable backends (discovered now), then the extras."""
    return list(mlcl_fast.available_backends(device)) + list(EXTRA_PROVIDERS)


def get_provider(name: str) -> Provider:
    if name == CompiledReference.name:
        return CompiledReference()
    if name == PublishedProvider.name:
        return PublishedProvider()
    if name in mlcl_fast.backends.BACKENDS:
        return BackendProvider(name)
    raise ValueError(f"provider: expected one of {list(mlcl_fast.backends.BACKENDS) + list(EXTRA_PROVIDERS)}, "
                     f"got {name!r}")
