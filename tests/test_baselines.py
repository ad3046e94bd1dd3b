"""zlpr_loss, bce_loss and asl_loss against direct float64 formulas, torch's BCE, every label form,
extreme logits, and their reductions ("mean", "sum", "none")."""
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
@pytest.mark.parametrize("fn", [mlcl_fast.zlpr_loss, mlcl_fast.bce_loss, mlcl_fast.asl_loss], ids=["zlpr", "bce", "asl"])
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


# ---------------------------------------------------------------------------------- reductions
BASELINES = {"zlpr": mlcl_fast.zlpr_loss, "bce": mlcl_fast.bce_loss, "asl": mlcl_fast.asl_loss}


@pytest.mark.parametrize("name", list(BASELINES))
def test_sum_is_the_sum_of_none_and_mean_times_the_count(name):
    """"sum" adds what "mean" averages: the B samples of ZLPR, the B*L entries of BCE and ASL.
    Values and gradients, in float64."""
    fn = BASELINES[name]
    logits, labels = sample(fresh_seed("baseline-sum", name))
    x = logits.clone().requires_grad_(True)
    none = fn(x, labels, reduction="none")
    count = B if name == "zlpr" else B * L
    assert none.shape == ((B,) if name == "zlpr" else (B, L))
    total = fn(x, labels, reduction="sum")
    mean = fn(x, labels, reduction="mean")
    assert total.shape == () and total.dtype == torch.float64
    assert torch.allclose(total, none.sum(), rtol=1e-13, atol=0)
    assert torch.allclose(total, mean * count, rtol=1e-13, atol=0)
    (g_sum,) = torch.autograd.grad(total, x)
    (g_none,) = torch.autograd.grad(none.sum(), x)
    (g_mean,) = torch.autograd.grad(mean, x)
    assert torch.allclose(g_sum, g_none, rtol=1e-13, atol=1e-15)
    assert torch.allclose(g_sum, g_mean * count, rtol=1e-12, atol=1e-15)
    assert total.item() > mean.item() > 0  # a sum, not another mean: count > 1, positive terms


def test_bce_and_zlpr_sum_match_the_formulas():
    logits, labels = sample(fresh_seed("baseline-sum-formula"))
    assert mlcl_fast.bce_loss(logits, labels, reduction="sum").item() == pytest.approx(
        float(bce_formula(logits, labels).sum()), rel=1e-10)
    assert mlcl_fast.zlpr_loss(logits, labels, reduction="sum").item() == pytest.approx(
        float(zlpr_formula(logits, labels).sum()), rel=1e-12)


# ------------------------------------------------------------------------------------------ ASL
def asl_formula(logits, labels, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8):
    """The paper's per-entry ASL (Ridnik et al., ICCV 2021, eqs. for L+ and L- with the shifted
    probability p_m = max(p - m, 0)), with the probabilities floored at eps inside the logs; plain
    float64 math, one entry at a time."""
    rows = []
    for xs, ys in zip(logits.double().tolist(), labels.tolist()):
        row = []
        for v, t in zip(xs, ys):
            p = 1.0 / (1.0 + math.exp(-v))
            if t:
                row.append(-((1.0 - p) ** gamma_pos) * math.log(max(p, eps)))
            else:
                pm = max(p - clip, 0.0)
                row.append(-(pm ** gamma_neg) * math.log(max(1.0 - pm, eps)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def asl_gradient_formula(logits, labels, gamma_pos, gamma_neg, clip):
    """dL/dx per entry from the paper's gradient analysis (p = sigmoid(x), dp/dx = p(1 - p)):
    positive: gamma+ p (1-p)^gamma+ log p - (1-p)^(gamma+ + 1);
    negative with p > m: p(1-p) [p_m^gamma- / (1 - p_m) - gamma- p_m^(gamma- - 1) log(1 - p_m)], else 0.
    For logits where no eps floor applies (|x| small)."""
    rows = []
    for xs, ys in zip(logits.double().tolist(), labels.tolist()):
        row = []
        for v, t in zip(xs, ys):
            p = 1.0 / (1.0 + math.exp(-v))
            if t:
                row.append(gamma_pos * p * (1 - p) ** gamma_pos * math.log(p) - (1 - p) ** (gamma_pos + 1))
            else:
                pm = p - clip
                row.append(0.0 if pm <= 0 else p * (1 - p) * (pm ** gamma_neg / (1 - pm)
                                                              - gamma_neg * pm ** (gamma_neg - 1) * math.log(1 - pm)))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


ASL_SETTINGS = [dict(), dict(gamma_pos=1.0, gamma_neg=4.0, clip=0.05), dict(gamma_pos=0.5, gamma_neg=2.5, clip=0.2),
                dict(gamma_pos=2.0, gamma_neg=1.0, clip=0.0), dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.1),
                dict(gamma_pos=0.0, gamma_neg=4.0, clip=1.0)]
ASL_IDS = ["defaults", "authors_class_defaults", "fractional", "no_clip", "clip_only", "clip_1"]


@pytest.mark.parametrize("settings", ASL_SETTINGS, ids=ASL_IDS)
def test_asl_matches_formula(settings):
    logits, labels = sample(fresh_seed("asl", repr(settings)))
    logits[1, :2] = torch.tensor([-25.0, 25.0])  # saturated entries: the eps floor of a positive
    labels[1, :2] = True
    expected = asl_formula(logits, labels, **settings)
    none = mlcl_fast.asl_loss(logits, labels, reduction="none", **settings)
    assert none.shape == (B, L) and none.dtype == torch.float64
    assert torch.allclose(none, expected, rtol=1e-10, atol=1e-14)
    mean = mlcl_fast.asl_loss(logits, labels, **settings)  # default reduction: the mean over B*L entries
    assert torch.allclose(mean, expected.mean(), rtol=1e-10, atol=0)
    # "sum": the authors' AsymmetricLoss value (the negated sum of the weighted log-likelihoods)
    total = mlcl_fast.asl_loss(logits, labels, reduction="sum", **settings)
    assert torch.allclose(total, expected.sum(), rtol=1e-10, atol=0)
    assert float(none[1, 0]) == pytest.approx(-math.log(1e-8) * (1 - 1 / (1 + math.exp(25.0))) ** settings.get(
        "gamma_pos", 0.0), rel=1e-10)


def test_asl_defaults_are_the_papers():
    logits, labels = sample(fresh_seed("asl-defaults"))
    expected = asl_formula(logits, labels, gamma_pos=0.0, gamma_neg=4.0, clip=0.05, eps=1e-8)
    assert torch.allclose(mlcl_fast.asl_loss(logits, labels, reduction="none"), expected, rtol=1e-10, atol=1e-14)
    # the defaults matter: other settings give other values
    assert not torch.allclose(mlcl_fast.asl_loss(logits, labels, gamma_neg=2.0, reduction="none"), expected)
    assert not torch.allclose(mlcl_fast.asl_loss(logits, labels, clip=0.0, reduction="none"), expected)


@pytest.mark.parametrize("settings", ASL_SETTINGS, ids=ASL_IDS)
def test_asl_gradient(settings):
    """gradcheck in float64 (logits kept off the kinks p = clip and the eps floor), and the
    paper's closed-form gradient."""
    logits, labels = sample(fresh_seed("asl-grad", repr(settings)), scale=1.5)
    clip = settings.get("clip", 0.05)
    if 0 < clip < 1:  # move logits away from p = clip, where the negatives' loss has a kink
        p = torch.sigmoid(logits)
        near = (p - clip).abs() < 0.02
        logits = torch.where(near, logits + 0.5, logits)
    x = logits.clone().requires_grad_(True)
    fn = lambda reduction: (lambda t: mlcl_fast.asl_loss(t, labels, reduction=reduction, **settings))  # noqa: E731
    assert torch.autograd.gradcheck(fn("none"), (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradcheck(fn("mean"), (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    mlcl_fast.asl_loss(x, labels, reduction="sum", **settings).backward()
    expected = asl_gradient_formula(logits, labels, settings.get("gamma_pos", 0.0), settings.get("gamma_neg", 4.0),
                                    clip)
    assert torch.allclose(x.grad, expected, rtol=1e-10, atol=1e-14)


def test_asl_without_focusing_or_clipping_is_bce():
    logits, labels = sample(fresh_seed("asl-bce"))
    plain = dict(gamma_pos=0.0, gamma_neg=0.0, clip=0.0)
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    for reduction in ("none", "mean", "sum"):
        asl = mlcl_fast.asl_loss(x, labels, reduction=reduction, **plain)
        bce = mlcl_fast.bce_loss(y, labels, reduction=reduction)
        assert torch.allclose(asl, bce, rtol=1e-12, atol=1e-15), reduction
        (ga,) = torch.autograd.grad(asl.sum(), x)
        (gb,) = torch.autograd.grad(bce.sum(), y)
        assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-15), reduction
    # the eps floor caps each entry at -log(eps); eps=0 removes it: BCE even at |x| = 50
    far = torch.tensor([[-50.0, 50.0, 3.0]], dtype=torch.float64)
    truth = torch.tensor([[True, False, True]])
    capped = mlcl_fast.asl_loss(far, truth, reduction="none", **plain)
    assert torch.allclose(capped, torch.minimum(mlcl_fast.bce_loss(far, truth, reduction="none"),
                                                torch.tensor(-math.log(1e-8), dtype=torch.float64)), rtol=1e-12)
    assert torch.allclose(mlcl_fast.asl_loss(far, truth, reduction="none", eps=0.0, **plain),
                          mlcl_fast.bce_loss(far, truth, reduction="none"), rtol=1e-12, atol=0)


def test_asl_focusing_and_clipping_act_on_the_negatives():
    """gamma_neg down-weights easy negatives, clip zeroes negatives with p <= clip; positives are
    untouched by both (gamma_pos=0)."""
    logits = torch.tensor([[-4.0, -1.0, 0.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([[False, False, False, True]])
    bce = mlcl_fast.bce_loss(logits, labels, reduction="none")
    asl = mlcl_fast.asl_loss(logits, labels, reduction="none")
    p = torch.sigmoid(logits[0, :3])
    assert float(asl[0, 0]) == 0.0  # p = 0.018 <= 0.05: discarded
    assert torch.all(asl[0, 1:3] < bce[0, 1:3])
    assert float(asl[0, 3]) == pytest.approx(float(bce[0, 3]), rel=1e-14)
    pm = (p[1:] - 0.05)
    assert torch.allclose(asl[0, 1:3], -pm ** 4 * torch.log1p(-pm), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("settings", ASL_SETTINGS, ids=ASL_IDS)
def test_asl_extreme_logits(dtype, settings):
    """Logits of +-1e4: finite values (each entry at most -log(eps)), finite gradients, also
    with fractional gammas (whose powers have unbounded derivatives at 0)."""
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    logits = torch.tensor([[1e4, -1e4, -1e4, 1e4], [-1e4, -1e4, 1e4, 1e4]], dtype=dtype)
    x = logits.clone().requires_grad_(True)
    asl = mlcl_fast.asl_loss(x, labels, reduction="none", **settings)
    assert torch.isfinite(asl).all() and (asl >= 0).all() and (asl <= -math.log(1e-8) + 1e-4).all()
    asl.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert float(asl[0, 0].detach()) == 0.0 and float(asl[0, 2].detach()) == 0.0  # right, confidently


def test_asl_half_precision_logits():
    logits, labels = sample(fresh_seed("asl-half"), dtype=torch.float16)
    asl = mlcl_fast.asl_loss(logits, labels, reduction="none")
    assert asl.dtype == torch.float32 and torch.isfinite(asl).all()
    assert torch.allclose(asl.double(), asl_formula(logits, labels), rtol=1e-3, atol=1e-3)
    assert mlcl_fast.asl_loss(logits.bfloat16(), labels).dtype == torch.float32
