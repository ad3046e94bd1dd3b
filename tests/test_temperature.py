"""A temperature tensor that requires grad (learnable, CLIP-style) gets its gradient on every
backend: against central finite differences of the float64 reference (presets without the
regulariser, whose value's derivative is the gradient) and, every preset, against the reference's
autograd in float64 (reg's r_ij is a constant of the gradient, as SPEC defines it for the
embeddings). The loss value and the embedding gradients equal those of the float temperature."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

if not torch.cuda.is_available() and "triton" not in sys.modules:  # as tests/test_triton.py: the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import mlcl_fast  # noqa: E402
from cases import ALL_PRESET_IDS, ALL_PRESETS, cpu_backends, fresh_seed, random_case, rel_err  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
TAU = 0.2
BACKENDS = cpu_backends()


def _loss(case, temperature, backend, dtype=None):
    c = case if dtype is None else case.to(dtype=dtype)
    x = c.features.detach().clone().requires_grad_(True)
    p = None if c.prototypes is None else c.prototypes.detach().clone().requires_grad_(True)
    loss = mlcl_fast.multilabel_contrastive_loss(x, c.labels, p, preset=c.preset, temperature=temperature,
                                                 backend=backend, **c.overrides)
    return loss, x, p


def _case(preset, overrides):
    return random_case(fresh_seed("temperature", preset, repr(overrides)), preset, overrides, B=7, V=2, d=5, L=4,
                       density=0.4, empty_rows=1)


@pytest.mark.parametrize("preset,overrides", [(p, o) for p, o in ALL_PRESETS if not mlcl_fast.resolve_config(p, **o).reg],
                         ids=[i for (p, o), i in zip(ALL_PRESETS, ALL_PRESET_IDS) if not mlcl_fast.resolve_config(p, **o).reg])
def test_gradient_matches_finite_differences(preset, overrides):
    case = _case(preset, overrides)
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    loss, _, _ = _loss(case, tau, "reference")
    (grad,) = torch.autograd.grad(loss, tau)
    h = 1e-6
    diff = (_loss(case, TAU + h, "reference")[0] - _loss(case, TAU - h, "reference")[0]) / (2 * h)
    assert abs(float(diff.detach())) > 1e-3, "a case whose loss does not depend on the temperature tests nothing"
    assert rel_err(grad, diff.detach(), 1e-3) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_every_backend_matches_the_reference(preset, overrides, backend):
    case = _case(preset, overrides)
    tau64 = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    ref, rx, rp = _loss(case, tau64, "reference")
    ref_grads = torch.autograd.grad(ref, [tau64, rx] + ([rp] if rp is not None else []))
    dtype = torch.float64 if backend == "reference" else torch.float32
    tau = torch.tensor(TAU, dtype=dtype, requires_grad=True)
    loss, x, p = _loss(case, tau, backend, dtype)
    grads = torch.autograd.grad(loss, [tau, x] + ([p] if p is not None else []))
    tol = 1e-10 if backend == "reference" else 1e-4
    assert rel_err(grads[0], ref_grads[0], 1e-3) < tol, (float(grads[0]), float(ref_grads[0]))
    # the value and the embeddings' gradients are those of the float temperature
    plain, px, pp = _loss(case, float(tau.detach()), backend, dtype)  # the tensor's value: 0.2 rounded to its dtype
    plain_grads = torch.autograd.grad(plain, [px] + ([pp] if pp is not None else []))
    assert torch.equal(loss.detach(), plain.detach())
    close = dict(rtol=1e-10, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)  # summation order
    for a, b in zip(grads[1:], plain_grads):
        assert torch.allclose(a, b, **close)


def test_module_learns_a_parameter_temperature():
    case = _case("reg", {})
    tau = nn.Parameter(torch.tensor(TAU, dtype=torch.float64))
    module = mlcl_fast.MultiLabelContrastiveLoss("reg", num_labels=case.num_labels, dim=case.features.shape[-1],
                                                 temperature=tau, backend="reference").double()
    assert any(q is tau for q in module.parameters()), "the temperature must reach the optimiser"
    module(case.features, case.labels).backward()
    assert tau.grad is not None and float(tau.grad) != 0.0
    with pytest.raises(ValueError, match="^temperature"):
        mlcl_fast.MultiLabelContrastiveLoss("supcon_any", temperature=torch.tensor(0.1, requires_grad=True))
    fixed = mlcl_fast.MultiLabelContrastiveLoss("supcon_any", temperature=torch.tensor(0.1))
    assert isinstance(fixed.temperature, float)


@pytest.mark.parametrize("bad,exc", [(torch.tensor(-0.1, requires_grad=True), ValueError),
                                     (torch.tensor(1e-9, requires_grad=True), ValueError),
                                     (torch.tensor(1, dtype=torch.int64), TypeError),
                                     (torch.tensor([0.1, 0.2], requires_grad=True), TypeError)])
def test_bad_temperature_tensors(bad, exc):
    x = torch.randn(4, 3)
    with pytest.raises(exc, match="^temperature"):
        mlcl_fast.multilabel_contrastive_loss(x, torch.eye(4, dtype=torch.bool), preset="supcon_any", temperature=bad,
                                              backend="reference")
