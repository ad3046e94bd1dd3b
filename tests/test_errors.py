"""Every bad input raises ValueError/TypeError whose message starts with the argument's name."""
from __future__ import annotations

import math

import pytest
import torch

import mlcl_fast
from mlcl_fast import MultiLabelContrastiveLoss, multilabel_contrastive_loss

pytestmark = pytest.mark.usefixtures("single_thread")

B, L, D = 4, 3, 5
LABELS = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)


def feats(*shape):
    return torch.randn(*(shape or (B, D)))


def protos(*shape):
    return torch.randn(*(shape or (L, D)))


def call(features=None, labels=None, prototypes="auto", **kwargs):
    """The loss with valid defaults for everything not given (preset 'reg' needs prototypes)."""
    kwargs.setdefault("backend", "reference")
    if prototypes == "auto":
        preset = mlcl_fast.resolve_config(kwargs.get("preset", "reg"))
        prototypes = protos() if preset.uses_prototypes else None
    return multilabel_contrastive_loss(feats() if features is None else features,
                                       LABELS if labels is None else labels, prototypes, **kwargs)


def raises(argument: str, fn, exc=(ValueError, TypeError)):
    with pytest.raises(exc, match=rf"^{argument}\b") as info:
        fn()
    return info


def test_valid_call_works():
    """The defaults used below are valid: each error comes from the one bad argument."""
    assert torch.isfinite(call())
    assert torch.isfinite(call(preset="supcon_any"))


BAD_FEATURES = {
    "1d": torch.randn(B),
    "4d": torch.randn(B, 2, 1, D),
    "empty_batch": torch.randn(0, D),
    "empty_dim": torch.randn(B, 0),
    "zero_views": torch.randn(B, 0, D),
    "integer": torch.ones(B, D, dtype=torch.int64),
    "complex": torch.ones(B, D, dtype=torch.complex64),
    "nan": torch.randn(B, D).index_fill_(1, torch.tensor([2]), math.nan),
    "inf": torch.randn(B, D).index_fill_(0, torch.tensor([1]), math.inf),
    "neg_inf_view": torch.randn(B, 2, D).index_fill_(1, torch.tensor([1]), -math.inf),
}


@pytest.mark.parametrize("name", BAD_FEATURES)
def test_bad_features(name):
    raises("features", lambda: call(BAD_FEATURES[name], preset="supcon_any"))


def test_features_not_a_tensor():
    raises("features", lambda: call(feats().tolist(), preset="supcon_any"))


def test_batch_mismatch():
    raises("labels", lambda: call(feats(B + 1, D), preset="supcon_any"))
    raises("labels", lambda: call(feats(B - 1, 2, D)))
    raises("labels", lambda: call(labels=torch.tensor([[0, 2], [1, -1]]), preset="supcon_any"))


BAD_LABELS = {
    "index_out_of_range": (torch.tensor([[0, 3], [1, -1], [2, 2], [-1, -1]]), "reg"),
    "index_below_minus_one": (torch.tensor([[0, -2], [1, -1], [2, 2], [-1, -1]]), "supcon_any"),
    "dense_float_two": (torch.tensor([[2., 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]), "supcon_any"),
    "dense_float_half": (torch.tensor([[.5, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]), "supcon_any"),
    "dense_float_negative": (torch.tensor([[-1., 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]), "supcon_any"),
    "dense_float_nan": (torch.tensor([[math.nan, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]), "supcon_any"),
    "sparse_value_two": (torch.tensor([[2., 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]]).to_sparse(), "supcon_any"),
    "sparse_wrong_width": (torch.zeros(B, L + 1).to_sparse(), "reg"),
    "dense_wrong_width": (torch.zeros(B, L + 1, dtype=torch.bool), "reg"),
    "1d": (torch.tensor([0, 1, 2, 0]), "supcon_any"),
    "3d": (LABELS[None], "supcon_any"),
    "list": ([[0], [1], [0, 1], []], "supcon_any"),
    "complex": (LABELS.to(torch.complex64), "supcon_any"),
}


@pytest.mark.parametrize("name", BAD_LABELS)
def test_bad_labels(name):
    labels, preset = BAD_LABELS[name]
    raises("labels", lambda: call(labels=labels, preset=preset))


def test_label_sets_with_wrong_label_space():
    sets = mlcl_fast.as_label_sets(LABELS, B)
    wider = mlcl_fast.LabelSets(sets.index, sets.count, L + 2)
    raises("labels", lambda: call(labels=wider))


def test_out_of_range_with_num_labels():
    raises("labels", lambda: call(labels=torch.tensor([[0, 5], [1, -1], [2, 2], [-1, -1]]), preset="supcon_any",
                                  num_labels=5))


@pytest.mark.parametrize("temperature", [0, 0.0, -0.1, math.nan, math.inf, -math.inf])
def test_bad_temperature_value(temperature):
    raises("temperature", lambda: call(temperature=temperature), ValueError)
    raises("temperature", lambda: MultiLabelContrastiveLoss("supcon_any", temperature=temperature), ValueError)


def test_temperature_has_a_lower_bound():
    """Below MIN_TEMPERATURE the fp32 logits would not stay finite (1e-40 gave NaN); at it the loss
    and its gradient are finite."""
    from mlcl_fast.inputs import MIN_TEMPERATURE

    for temperature in (1e-40, MIN_TEMPERATURE / 2):
        raises("temperature", lambda: call(temperature=temperature), ValueError)
    x = torch.randn(B, D, requires_grad=True)
    loss = multilabel_contrastive_loss(x, LABELS, preset="supcon_any", temperature=MIN_TEMPERATURE)
    loss.backward()
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all())


@pytest.mark.parametrize("temperature", ["0.1", None, True, [0.1], torch.tensor([0.1, 0.2])], ids=repr)
def test_bad_temperature_type(temperature):
    raises("temperature", lambda: call(temperature=temperature), TypeError)


def test_unknown_preset():
    raises("preset", lambda: call(preset="supcon"), ValueError)
    raises("preset", lambda: MultiLabelContrastiveLoss("REG"), ValueError)
    raises("preset", lambda: call(preset=None), ValueError)


def test_unknown_override():
    raises("temp", lambda: call(temp=0.1), ValueError)
    raises("gamma", lambda: MultiLabelContrastiveLoss("supcon_any", gamma=2), ValueError)


BAD_OVERRIDES = [
    ("weighting", "union"), ("weighting", None), ("f", "two"), ("f", 1), ("prototype_mode", "anchors"),
    ("prototype_mode", None), ("anchor_weight", "count"), ("beta", -0.1), ("beta", math.nan), ("beta", math.inf),
    ("beta", "1"), ("alpha", math.nan), ("alpha", math.inf), ("alpha", "0.5"), ("alpha", None), ("reg", 1),
    ("reg", "yes"), ("reg", None),
]


@pytest.mark.parametrize("field,value", BAD_OVERRIDES, ids=[f"{f}={v!r}" for f, v in BAD_OVERRIDES])
def test_bad_override_value(field, value):
    raises(field, lambda: call(**{field: value}))
    raises(field, lambda: mlcl_fast.resolve_config("supcon_any", **{field: value}))
    raises(field, lambda: MultiLabelContrastiveLoss("reg", num_labels=L, dim=D, **{field: value}))


def test_beta_zero_needs_prototypes():
    raises("beta", lambda: call(preset="supcon_any", beta=0.0), ValueError)
    raises("beta", lambda: call(preset="reg", prototype_mode="none", beta=0))


def test_prototypes_missing():
    for preset in ("reg", "msc", "proto", "reg_noreg"):
        raises("prototypes", lambda: call(prototypes=None, preset=preset))
    raises("prototypes", lambda: call(prototypes=None, preset="supcon_any", prototype_mode="columns"))


BAD_PROTOTYPES = {
    "wrong_dim": torch.randn(L, D + 1),
    "1d": torch.randn(L),
    "3d": torch.randn(1, L, D),
    "integer": torch.ones(L, D, dtype=torch.int64),
    "nan": torch.randn(L, D).index_fill_(0, torch.tensor([1]), math.nan),
    "inf": torch.randn(L, D).index_fill_(1, torch.tensor([1]), math.inf),
    "not_a_tensor": [[0.0] * D] * L,
}


@pytest.mark.parametrize("name", BAD_PROTOTYPES)
def test_bad_prototypes(name):
    raises("prototypes", lambda: call(prototypes=BAD_PROTOTYPES[name]))


def test_prototypes_for_a_preset_without_prototypes():
    for preset in ("supcon_any", "supcon_all", "jaccard", "mulsupcon"):
        raises("prototypes", lambda: call(prototypes=protos(), preset=preset), ValueError)
    raises("prototypes", lambda: call(prototypes=protos(), preset="reg", prototype_mode="none"), ValueError)


def test_prototype_count_differs_from_label_space():
    """L prototypes, dense labels of another width: the label space disagrees."""
    with pytest.raises(ValueError, match=r"^(labels|prototypes)\b"):
        call(prototypes=protos(L + 1, D))
    with pytest.raises(ValueError, match=r"^(labels|prototypes)\b"):
        call(prototypes=protos(L - 1, D))


def test_num_labels_mismatch():
    with pytest.raises(ValueError, match=r"^(labels|prototypes|num_labels)\b"):
        call(num_labels=L + 1)
    with pytest.raises(ValueError, match=r"^(labels|num_labels)\b"):
        call(preset="supcon_any", num_labels=L - 1)
    with pytest.raises(ValueError, match=r"^(labels|num_labels)\b"):
        call(preset="supcon_any", labels=LABELS.to_sparse_csr(), num_labels=L + 1)


@pytest.mark.parametrize("num_labels", [-1, 2.0, "3", True])
def test_bad_num_labels(num_labels):
    raises("num_labels", lambda: call(preset="supcon_any", num_labels=num_labels))


def test_mixed_devices():
    """A second device ('meta' always exists) for labels or prototypes is refused by name."""
    meta = torch.device("meta")
    raises("prototypes", lambda: call(prototypes=protos().to(meta)), ValueError)
    raises("labels", lambda: call(labels=LABELS.to(meta), preset="supcon_any"), ValueError)
    raises("labels", lambda: call(labels=torch.tensor([[0, -1], [1, 2], [2, -1], [-1, -1]], device=meta)), ValueError)
    sets = mlcl_fast.as_label_sets(LABELS, B)
    raises("labels", lambda: call(labels=sets.to(meta)), ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_cpu_cuda():
    raises("prototypes", lambda: call(features=feats().cuda(), labels=LABELS.cuda(), prototypes=protos()))
    raises("labels", lambda: call(features=feats().cuda(), labels=LABELS), ValueError)


def test_unknown_backend():
    raises("backend", lambda: call(backend="gpu"), ValueError)
    raises("backend", lambda: call(backend=None), ValueError)
    raises("backend", lambda: MultiLabelContrastiveLoss("supcon_any", backend="fast")(feats(), LABELS), ValueError)


def test_unavailable_backend_names_backend():
    status = mlcl_fast.backend_status()
    for name, state in status.items():
        if state != "available":
            raises("backend", lambda: call(backend=name), (RuntimeError, ValueError))


@pytest.mark.parametrize("reduction", ["median", "", None, "MEAN", "Sum", "sum "])
def test_unknown_reduction(reduction):
    raises("reduction", lambda: call(reduction=reduction), ValueError)
    raises("reduction", lambda: MultiLabelContrastiveLoss("supcon_any", reduction=reduction), ValueError)


def test_unknown_label_format():
    raises("label_format", lambda: call(label_format="multihot"), ValueError)


@pytest.mark.parametrize("field", ["num_labels", "dim"])
@pytest.mark.parametrize("value", [None, 0, -3, 2.5, True])
def test_module_needs_num_labels_and_dim_with_prototypes(field, value):
    kwargs = {"num_labels": L, "dim": D, field: value}
    raises(field, lambda: MultiLabelContrastiveLoss("reg", **kwargs), ValueError)


@pytest.mark.parametrize("fn", [mlcl_fast.zlpr_loss, mlcl_fast.bce_loss, mlcl_fast.asl_loss], ids=["zlpr", "bce", "asl"])
def test_baseline_errors(fn):
    logits = torch.randn(B, L)
    raises("logits", lambda: fn(logits[0], LABELS))
    raises("logits", lambda: fn(logits.long(), LABELS))
    raises("logits", lambda: fn(logits.tolist(), LABELS))
    raises("labels", lambda: fn(logits, LABELS[:-1]))
    raises("labels", lambda: fn(logits, torch.zeros(B, L + 1, dtype=torch.bool)))
    raises("labels", lambda: fn(logits, torch.tensor([[0, 3], [1, -1], [2, 2], [-1, -1]])))
    raises("reduction", lambda: fn(logits, LABELS, reduction="median"))
    raises("reduction", lambda: fn(logits, LABELS, reduction=None))
    # empty shapes are refused, as the contrastive loss refuses them (no NaN from a mean over nothing)
    raises("logits", lambda: fn(torch.randn(0, L), torch.zeros(0, L, dtype=torch.bool)))
    raises("logits", lambda: fn(torch.randn(B, 0), torch.zeros(B, 0, dtype=torch.bool)))


BAD_ASL_ARGUMENTS = [("gamma_pos", -1.0), ("gamma_pos", math.inf), ("gamma_pos", math.nan), ("gamma_pos", "1"),
                     ("gamma_pos", True), ("gamma_neg", -0.5), ("gamma_neg", None), ("gamma_neg", math.inf),
                     ("clip", -0.01), ("clip", 1.5), ("clip", math.nan), ("clip", "0.05"), ("eps", -1e-8), ("eps", 1.0),
                     ("eps", math.nan), ("eps", None), ("eps", False)]


@pytest.mark.parametrize("name,value", BAD_ASL_ARGUMENTS, ids=[f"{n}={v!r}" for n, v in BAD_ASL_ARGUMENTS])
def test_asl_argument_errors(name, value):
    logits = torch.randn(B, L)
    raises(name, lambda: mlcl_fast.asl_loss(logits, LABELS, **{name: value}))


def test_asl_accepts_the_boundaries():
    logits = torch.randn(B, L)
    for kwargs in (dict(gamma_pos=0, gamma_neg=0), dict(clip=0), dict(clip=1), dict(clip=None), dict(eps=0),
                   dict(gamma_neg=torch.tensor(2.0)), dict(reduction="sum"), dict(reduction="none")):
        assert torch.isfinite(mlcl_fast.asl_loss(logits, LABELS, **kwargs)).all(), kwargs


def test_explicit_label_format_checks_the_values():
    """An integer matrix with a 2 reads as indices under 'auto'; said to be dense, it is refused."""
    ints = torch.tensor([[2, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    raises("labels", lambda: call(labels=ints, preset="supcon_any", label_format="dense"), ValueError)
    raises("labels", lambda: call(labels=LABELS.float(), preset="supcon_any", label_format="indices"), TypeError)
    raises("labels", lambda: call(labels=LABELS, preset="supcon_any", label_format="sparse"))


@pytest.mark.parametrize("fmt,labels", [("dense", LABELS.float().to_sparse()), ("indices", LABELS.long().to_sparse()),
                                        ("sparse", LABELS)], ids=["dense-of-coo", "indices-of-coo", "sparse-of-dense"])
def test_label_format_must_fit_the_layout(fmt, labels):
    raises("labels", lambda: call(labels=labels, preset="supcon_any", label_format=fmt), TypeError)
