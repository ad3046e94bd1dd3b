"""MultiLabelContrastiveLoss: prototype ownership and initialisation, agreement with the functional
loss, training, state_dict, reduction='none'."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import mlcl_fast
from cases import PRESET_NAMES, fresh_seed, random_case, to_padded
from mlcl_fast import MultiLabelContrastiveLoss, multilabel_contrastive_loss

pytestmark = pytest.mark.usefixtures("single_thread")

L, D = 5, 6


def make(preset, **kwargs):
    kwargs.setdefault("backend", "reference")
    return MultiLabelContrastiveLoss(preset, num_labels=L, dim=D, **kwargs)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_owns_prototypes_only_when_used(preset):
    module = make(preset)
    uses = mlcl_fast.resolve_config(preset).uses_prototypes
    params = dict(module.named_parameters())
    if uses:
        assert isinstance(module.prototypes, torch.nn.Parameter)
        assert module.prototypes.shape == (L, D) and module.prototypes.requires_grad
        assert list(params) == ["prototypes"]
    else:
        assert module.prototypes is None and params == {}
        # num_labels and dim are optional then
        assert MultiLabelContrastiveLoss(preset).prototypes is None


def test_prototypes_follow_overrides():
    module = MultiLabelContrastiveLoss("supcon_any", num_labels=L, dim=D, prototype_mode="rows")
    assert module.prototypes.shape == (L, D)
    assert MultiLabelContrastiveLoss("reg", prototype_mode="none").prototypes is None


def test_xavier_uniform_init():
    torch.manual_seed(fresh_seed("xavier") % 2**31)
    num_labels, dim = 300, 200
    protos = MultiLabelContrastiveLoss("reg", num_labels=num_labels, dim=dim).prototypes.detach()
    bound = math.sqrt(6.0 / (num_labels + dim))
    assert protos.abs().max() <= bound
    assert protos.abs().max() > 0.95 * bound
    assert abs(float(protos.std()) - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)
    assert abs(float(protos.mean())) < 0.01 * bound


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_functional(preset, reduction):
    module = make(preset, temperature=0.2, reduction=reduction, alpha=0.5)
    case = random_case(fresh_seed("module", preset), preset, B=6, V=2, d=D, L=L, dtype=torch.float32)
    feats = case.features.clone().requires_grad_(True)
    out = module(feats, case.labels)
    protos = None if module.prototypes is None else module.prototypes.detach().clone().requires_grad_(True)
    expected = multilabel_contrastive_loss(feats, case.labels, protos, preset=preset, temperature=0.2,
                                           reduction=reduction, backend="reference", alpha=0.5)
    assert torch.equal(out, expected)
    n_anchors = 12 + (L if mlcl_fast.resolve_config(preset).prototype_mode == "rows" else 0)
    assert out.shape == (() if reduction != "none" else (n_anchors,))
    out.sum().backward()
    if protos is not None:
        expected.sum().backward()
        assert torch.allclose(module.prototypes.grad, protos.grad)


def test_module_with_padded_labels_and_label_sets():
    module = make("reg")
    case = random_case(fresh_seed("module-padded"), "reg", B=6, d=D, L=L, dtype=torch.float32)
    case.labels[:, -1] = False  # L must come from the module, not from the largest index
    dense = module(case.features, case.labels)
    assert torch.equal(module(case.features, to_padded(case.labels, 3)), dense)
    assert torch.equal(module(case.features, mlcl_fast.as_label_sets(case.labels, 6)), dense)


def toy_problem(seed):
    """Four clusters of inputs; samples of a cluster share labels, clusters overlap in labels."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 10, generator=gen)
    cluster = torch.arange(32) % 4
    inputs = centers[cluster] + 0.8 * torch.randn(32, 10, generator=gen)
    label_table = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    return inputs, label_table[cluster]


@pytest.mark.parametrize("preset", ["reg", "msc", "supcon_any", "mulsupcon"])
def test_training_decreases_the_loss(preset):
    """A few SGD steps on encoder and prototypes lower the loss. For 'reg' the value is measured
    without the regulariser: its gradient is not the derivative of its own value (r is held
    constant), so the regularised value itself need not fall; the contrastive loss does."""
    seed = fresh_seed("train", preset)
    torch.manual_seed(seed % 2**31)
    inputs, labels = toy_problem(seed)
    encoder = torch.nn.Linear(10, D)
    criterion = make(preset)
    optimiser = torch.optim.SGD(list(encoder.parameters()) + list(criterion.parameters()), lr=0.2)
    monitored = "reg_noreg" if preset == "reg" else preset

    def monitor():
        with torch.no_grad():
            return float(multilabel_contrastive_loss(encoder(inputs), labels, criterion.prototypes, preset=monitored,
                                                     backend="reference"))

    before = monitor()
    for _ in range(40):
        optimiser.zero_grad()
        loss = criterion(encoder(inputs), labels)
        loss.backward()
        optimiser.step()
        assert math.isfinite(float(loss.detach()))
    if criterion.prototypes is not None:
        assert criterion.prototypes.grad is not None and criterion.prototypes.grad.abs().sum() > 0
    after = monitor()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("preset", ["reg", "supcon_any"])
def test_state_dict_round_trip(preset):
    module = make(preset, temperature=0.3)
    with torch.no_grad():
        if module.prototypes is not None:
            module.prototypes.mul_(3.0).add_(1.0)
    state = module.state_dict()
    assert set(state) == ({"prototypes"} if module.prototypes is not None else set())
    restored = make(preset, temperature=0.3)
    restored.load_state_dict(state)
    case = random_case(fresh_seed("state", preset), preset, B=5, d=D, L=L, dtype=torch.float32)
    assert torch.equal(restored(case.features, case.labels), module(case.features, case.labels))
    if module.prototypes is not None:
        assert torch.equal(restored.prototypes, module.prototypes)
        with pytest.raises(RuntimeError):
            make(preset, temperature=0.3).load_state_dict({})


def test_module_half_precision_features():
    """fp16 features with the fp32 prototype parameter: loss in fp32, gradients in each dtype."""
    module = make("reg")
    case = random_case(fresh_seed("module-half"), "reg", B=8, V=2, d=D, L=L, dtype=torch.float16)
    feats = case.features.clone().requires_grad_(True)
    loss = module(feats, case.labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert feats.grad.dtype == torch.float16 and torch.isfinite(feats.grad).all()
    assert module.prototypes.grad.dtype == torch.float32 and torch.isfinite(module.prototypes.grad).all()
    reference = multilabel_contrastive_loss(case.features.double(), case.labels, module.prototypes.detach().double(),
                                            backend="reference")
    assert abs(float(loss.detach()) - float(reference)) <= 2e-2 * max(1.0, abs(float(reference)))


def test_module_float64():
    module = make("msc").double()
    case = random_case(fresh_seed("module-f64"), "msc", B=5, d=D, L=L)
    loss = module(case.features, case.labels)
    assert loss.dtype == torch.float64
    expected = multilabel_contrastive_loss(case.features, case.labels, module.prototypes, preset="msc",
                                           backend="reference")
    assert torch.equal(loss, expected)


def test_module_checks_label_space():
    module = make("supcon_any")
    with pytest.raises(ValueError, match=r"^labels\b"):
        module(torch.randn(4, D), torch.zeros(4, L + 1, dtype=torch.bool))


def test_extra_repr_names_the_configuration():
    text = repr(make("reg", alpha=0.5, temperature=0.07))
    for part in ("weighting=label", "f=overlap", "alpha=0.5", "prototype_mode=rows", "reg=True", "temperature=0.07"):
        assert part in text, part


def test_default_backend_agrees_with_reference():
    """The module's default backend ('auto': the fastest available here) gives the reference's loss."""
    module = MultiLabelContrastiveLoss("reg", num_labels=L, dim=D)
    case = random_case(fresh_seed("module-auto"), "reg", B=8, V=2, d=D, L=L, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice when no fused backend is built
        value = module(case.features, case.labels)
    expected = multilabel_contrastive_loss(case.features.double(), case.labels, module.prototypes.detach().double(),
                                           backend="reference")
    assert abs(float(value.detach()) - float(expected)) <= 1e-5 * max(1.0, abs(float(expected)))

