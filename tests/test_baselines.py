"""zlpr_loss and bce_loss against direct float64 formulas, torch's BCE, every label form, and
extreme logits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mlcl_fast
from cases import fresh_seed, label_forms, random_labels

pytestmark = pytest.mark.usefixtures("single_thread")

B, L = 7, 6


def sample(seed, scale=3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, L, generator=gen, dtype=torch.float64)).to(dtype)
    labels = random_labels(gen, B, L, density=0.4, empty_rows=1)
    labels[0] = True  # a row with every label (no negatives)
    return logits, labels


def zlpr_formula(logits, labels):
    """log(1 + sum_{pos} e^{-x}) + log(1 + sum_{neg} e^{x}) per sample, plain float64 math."""
    out = []
    for x, y in zip(logits.double().tolist(), labels.tolist()):
        pos = sum(math.exp(-v) for v, t in zip(x, y) if t)
        neg = sum(math.exp(v) for v, t in zip(x, y) if not t)
        out.append(math.log1p(pos) + math.log1p(neg))
    return torch.tensor(out, dtype=torch.float64)


def bce_formula(logits, labels):
    """-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))) per entry, plain float64 math."""
    rows = []
    for x, y in zip(logits.double().tolist(), labels.tolist()):
        rows.append([-(math.log(1 / (1 + math.exp(-v))) if t else math.log(1 - 1 / (1 + math.exp(-v))))
                     for v, t in zip(x, y)])
    return torch.tensor(rows, dtype=torch.float64)


def test_zlpr_matches_formula():
    logits, labels = sample(fresh_seed("zlpr"))
    expected = zlpr_formula(logits, labels)
    per_sample = mlcl_fast.zlpr_loss(logits, labels, reduction="none")
    assert per_sample.shape == (B,)
    assert torch.allclose(per_sample, expected, rtol=1e-12, atol=0)
    assert torch.allclose(mlcl_fast.zlpr_loss(logits, labels), expected.mean(), rtol=1e-12, atol=0)
    assert float(per_sample[0]) == pytest.approx(math.log1p(sum(math.exp(-v) for v in logits[0].tolist())), rel=1e-12)


def test_zlpr_gradient():
    logits, labels = sample(fresh_seed("zlpr-grad"), scale=1.0)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mlcl_fast.zlpr_loss(t, labels, reduction="none"), (x,))
    mlcl_fast.zlpr_loss(x, labels).backward()
    # d/dx_k for a positive k: -e^{-x_k} / (1 + sum_pos e^{-x}); for a negative: e^{x_k} / (1 + sum_neg e^{x})
    pos = torch.where(labels, torch.exp(-logits), torch.zeros_like(logits))
    neg = torch.where(labels, torch.zeros_like(logits), torch.exp(logits))
    expected = (-pos / (1 + pos.sum(1, keepdim=True)) + neg / (1 + neg.sum(1, keepdim=True))) / B
    assert torch.allclose(x.grad, expected, rtol=1e-12, atol=1e-15)


def test_bce_matches_formula_and_torch():
    logits, labels = sample(fresh_seed("bce"))
    expected = bce_formula(logits, labels)
    none = mlcl_fast.bce_loss(logits, labels, reduction="none")
    assert none.shape == (B, L)
    assert torch.allclose(none, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(mlcl_fast.bce_loss(logits, labels), expected.mean(), rtol=1e-10, atol=0)
    torch_bce = F.binary_cross_entropy_with_logits(logits, labels.double())
    assert torch.equal(mlcl_fast.bce_loss(logits, labels), torch_bce)
    assert mlcl_fast.bce_with_logits_loss is mlcl_fast.bce_loss


@pytest.mark.parametrize("form", list(label_forms(torch.eye(3, dtype=torch.bool))))
@pytest.mark.parametrize("fn", [mlcl_fast.zlpr_loss, mlcl_fast.bce_loss], ids=["zlpr", "bce"])
def test_every_label_form(fn, form):
    seed = fresh_seed("baseline-forms", form)
    logits, labels = sample(seed)
    labels[:, -1] = False  # the width must come from the logits, not from the largest index
    converted = label_forms(labels, seed)[form]
    assert torch.equal(fn(logits, converted, reduction="none"),
                       fn(logits, labels, reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    """Logits of +-1e4: finite values equal to the formula's limits, finite gradients."""
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logits = torch.tensor([[1e4, 1e4, -1e4, -1e4],      # all right, confidently: loss ~ 0
                           [-1e4, 1e4, 1e4, -1e4],      # one positive and one negative wrong by 1e4
                           [1e4, -1e4, -1e4, -1e4],     # no positives, one negative wrong
                           [-1e4, -1e4, 1e4, 1e4]], dtype=dtype)
    x = logits.clone().requires_grad_(True)
    zlpr = mlcl_fast.zlpr_loss(x, labels, reduction="none")
    assert torch.isfinite(zlpr).all()
    assert torch.allclose(zlpr.double(), torch.tensor([0.0, 2e4, 1e4, 1e4 + math.log(2)], dtype=torch.float64),
                          rtol=1e-6, atol=1e-6)
    zlpr.sum().backward()
    assert torch.isfinite(x.grad).all()
    x.grad = None
    bce = mlcl_fast.bce_loss(x, labels, reduction="none")
    assert torch.isfinite(bce).all()
    wrong = (labels != (logits > 0)).double() * 1e4
    assert torch.allclose(bce.double(), wrong, rtol=1e-6, atol=1e-6)
    bce.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_half_precision_logits():
    logits, labels = sample(fresh_seed("baseline-half"), dtype=torch.float16)
    zlpr = mlcl_fast.zlpr_loss(logits, labels, reduction="none")
    assert torch.isfinite(zlpr).all()
    assert torch.allclose(zlpr.double(), zlpr_formula(logits, labels), rtol=1e-3, atol=1e-3)
    bce = mlcl_fast.bce_loss(logits, labels, reduction="none")
    assert torch.allclose(bce.double(), bce_formula(logits, labels), rtol=1e-2, atol=1e-2)
