"""Extra columns ("keys", SPEC "Keys"): every CPU backend (reference, cpp, triton under the
interpreter) against the float64 brute force with keys, for every preset, views on features and
on keys, keys with and without grad, every label format of key_labels, empty key label sets,
M = 1, keys sharing no label, check_values=False and every reduction; and the argument errors."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton kernels on CPU tensors (as tests/test_triton.py)

import brute_force  # noqa: E402
from cases import (ALL_PRESET_IDS, ALL_PRESETS, LOSS_FLOOR, GRAD_FLOOR, GRAD_SCALE_FLOOR, anchor_weights,  # noqa: E402
                   cpu_backends, fresh_seed, label_forms, random_case, random_labels, rel_err, to_padded)

import mlcl_fast  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = cpu_backends()
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4)}
MAX_FP32_CONDITION = 30.0  # as tests/test_reference.py: redraw fp32 cases whose gradient cancels more


@pytest.fixture(autouse=True)
def _no_forced_settings(monkeypatch):
    monkeypatch.delenv("MLCL_FAST_TRITON_LABELS", raising=False)
    monkeypatch.delenv("MLCL_FAST_TRITON_GRAD", raising=False)


def backend_dtype(backend: str) -> torch.dtype:
    """The reference is checked in fp64 (to 1e-10); the fused backends compute in fp32."""
    return torch.float64 if backend == "reference" else torch.float32


class KeyCase:
    """A random cases.Case plus keys [M, d] or [M, Vk, d] and their dense label sets [M, L]."""

    def __init__(self, seed, preset="reg", overrides=None, *, B=6, V=1, M=4, key_views=1, d=6, L=5,
                 density=0.35, key_density=0.35, empty_rows=0, empty_keys=0, temperature=0.2,
                 key_labels=None, dtype=torch.float64):
        self.case = random_case(seed, preset, overrides, B=B, V=V, d=d, L=L, density=density,
                                empty_rows=empty_rows, temperature=temperature)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = (M, key_views, d) if key_views > 1 else (M, d)
        self.keys = torch.randn(shape, generator=gen, dtype=torch.float64) * \
            torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
        self.key_labels = key_labels if key_labels is not None else \
            random_labels(gen, M, L, key_density, empty_keys)
        self.seed = seed
        self.dtype = dtype

    def key_sets(self):
        return [set(torch.nonzero(row).flatten().tolist()) for row in self.key_labels]

    def oracle(self) -> brute_force.BruteForceResult:
        c = self.case
        return brute_force.evaluate(c.features, c.label_sets(), c.prototypes, preset=c.preset,
                                    temperature=c.temperature, num_labels=c.num_labels, keys=self.keys,
                                    key_label_sets=self.key_sets(), **c.overrides)

    def run(self, backend, reduction="mean", weights=None, key_labels=None, keys_grad=True, labels=None,
            **kwargs):
        """(value, grad features, grad prototypes or None, grad keys or None) of `backend`."""
        c = self.case
        feats = c.features.to(self.dtype).requires_grad_(True)
        protos = None if c.prototypes is None else c.prototypes.to(self.dtype).requires_grad_(True)
        keys = self.keys.to(self.dtype).requires_grad_(keys_grad)
        out = mlcl_fast.multilabel_contrastive_loss(
            feats, c.labels if labels is None else labels, protos, backend=backend, reduction=reduction,
            keys=keys, key_labels=self.key_labels if key_labels is None else key_labels, **c.loss_kwargs(), **kwargs)
        if reduction == "none":
            target = (out * weights.to(out.dtype)).sum()
        else:
            target = out
        inputs = [t for t in (feats, protos, keys) if t is not None and t.requires_grad]
        grads = list(torch.autograd.grad(target, inputs, allow_unused=True)) if target.requires_grad \
            else [None] * len(inputs)
        result = []
        for t in (feats, protos, keys):
            if t is None or not t.requires_grad:
                result.append(None)
            else:
                g = grads.pop(0)
                result.append(torch.zeros_like(t) if g is None else g)
        if not keys_grad:
            assert keys.grad is None
        return (out.detach(),) + tuple(result)


def draw(backend, seed_parts, make):
    """A KeyCase from make(seed, rng); fp32 cases whose gradient cancels too much are redrawn."""
    for attempt in range(20):
        seed = fresh_seed("keys", *seed_parts, attempt)
        kc = make(seed, random.Random(seed))
        kc.dtype = backend_dtype(backend)
        oracle = kc.oracle()
        if kc.dtype == torch.float64 or max(oracle.condition(), oracle.condition(
                anchor_weights(seed, len(oracle.valid)))) <= MAX_FP32_CONDITION:
            return kc, oracle
    return kc, oracle


def _floors(oracle, coeffs=None):
    scale_f, scale_p = oracle.grad_scale(coeffs)
    scale_k = oracle.key_grad_scale(coeffs)
    return tuple(max(GRAD_FLOOR, GRAD_SCALE_FLOOR * s) for s in (scale_f, scale_p, scale_k))


def assert_keys_match(backend, kc: KeyCase, oracle=None, reductions=("mean", "sum", "none"), keys_grad=True,
                      key_labels=None, labels=None, **kwargs):
    """`backend` on `kc` against the brute force: value and gradients (features, prototypes, keys)
    of each reduction ('none': the per-anchor losses, exactly 0 for invalid anchors, and the
    gradients of a positive weighting of them)."""
    oracle = kc.oracle() if oracle is None else oracle
    rtol_loss, rtol_grad = TOLERANCES[kc.dtype]
    n_valid = sum(oracle.valid)
    normaliser = {"uniform": n_valid, "labels": None}
    errors = {}
    for reduction in reductions:
        if reduction == "none":
            weights = anchor_weights(kc.seed, len(oracle.valid))
            coeffs = weights.tolist()
            ref_value = oracle.anchor_losses
        else:
            weights = None
            scale = 1.0
            if reduction == "sum":  # the mean times its normaliser M
                cfg = brute_force.spec_config(kc.case.preset, **kc.case.overrides)
                if cfg["anchor_weight"] == "uniform":
                    scale = max(n_valid, 1)
                else:
                    scale = max(sum(len(s) for s in kc.case.label_sets()) * _views(kc.case.features)
                                + (kc.case.num_labels if cfg["prototype_mode"] == "rows" else 0), 1)
            coeffs = [c * scale for c in oracle.coeffs]
            ref_value = torch.tensor(oracle.loss * scale, dtype=torch.float64)
        value, gf, gp, gk = kc.run(backend, reduction, weights, key_labels=key_labels, keys_grad=keys_grad,
                                   labels=labels, **kwargs)
        ref_f, ref_p, ref_k = oracle.all_grads(coeffs)
        floor_f, floor_p, floor_k = _floors(oracle, coeffs)
        if reduction == "none":
            assert value.shape == (len(oracle.valid),)
            invalid = ~torch.tensor(oracle.valid, dtype=torch.bool)
            assert (value[invalid] == 0).all(), "invalid anchors must have loss exactly 0"
        else:
            assert value.dim() == 0
        assert bool(torch.isfinite(value).all())
        errors[f"{reduction}:loss"] = rel_err(value, ref_value, LOSS_FLOOR)
        errors[f"{reduction}:grad_features"] = rel_err(gf, ref_f, floor_f)
        assert (gp is None) == (ref_p is None)
        if gp is not None:
            errors[f"{reduction}:grad_prototypes"] = rel_err(gp, ref_p, floor_p)
        if keys_grad:
            errors[f"{reduction}:grad_keys"] = rel_err(gk, ref_k, floor_k)
        else:
            assert gk is None
    bad = {k: v for k, v in errors.items() if not v <= (rtol_loss if k.endswith(":loss") else rtol_grad)}
    assert not bad, f"{backend} with keys differs from the brute force (seed {kc.seed}, " \
                    f"{kc.case!r}, keys {tuple(kc.keys.shape)}): {bad}; all errors {errors}"
    return errors


def _views(features):
    return features.shape[1] if features.dim() == 3 else 1


# ------------------------------------------------------------------------------ the oracle itself
def test_brute_force_keys_are_extra_columns():
    """The oracle's keys: a key with the label set and embedding of a sample row is, for every
    other anchor, exactly a copy of that row's column; so adding as keys copies of every row equals
    the loss of the batch duplicated, restricted to the first copy's anchors (no prototypes)."""
    case = random_case(fresh_seed("keys-oracle"), "supcon_any", B=5, d=4, L=4)
    sets = case.label_sets()
    with_keys = brute_force.evaluate(case.features, sets, None, preset="supcon_any", num_labels=4,
                                     keys=case.features, key_label_sets=sets)
    doubled = brute_force.evaluate(torch.cat([case.features, case.features]), sets + sets, None,
                                   preset="supcon_any", num_labels=4)
    assert len(with_keys.valid) == 5
    assert torch.allclose(with_keys.anchor_losses, doubled.anchor_losses[:5], rtol=1e-12, atol=1e-12)
    without = brute_force.evaluate(case.features, sets, None, preset="supcon_any", num_labels=4)
    assert not torch.allclose(with_keys.anchor_losses, without.anchor_losses)


# ----------------------------------------------------------------------------- every preset
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_match_brute_force(backend, preset, overrides):
    def make(seed, rng):
        return KeyCase(seed, preset, overrides, B=rng.randint(2, 7), V=rng.choice([1, 2]), M=rng.randint(1, 6),
                       key_views=rng.choice([1, 2]), d=rng.randint(3, 8), L=rng.randint(2, 7),
                       density=rng.uniform(0.2, 0.5), key_density=rng.uniform(0.2, 0.5),
                       empty_rows=rng.randint(0, 1), empty_keys=rng.randint(0, 1),
                       temperature=rng.choice([0.1, 0.2, 0.5]))

    kc, oracle = draw(backend, (backend, preset, sorted(overrides.items())), make)
    assert_keys_match(backend, kc, oracle)


# ------------------------------------------------------------------------------------- views
@pytest.mark.parametrize("views,key_views", [(1, 2), (2, 1), (2, 3)])
@pytest.mark.parametrize("preset", ["reg", "msc", "jaccard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_views(backend, preset, views, key_views):
    kc, oracle = draw(backend, ("views", backend, preset, views, key_views),
                      lambda seed, rng: KeyCase(seed, preset, B=4, V=views, M=3, key_views=key_views))
    assert_keys_match(backend, kc, oracle, reductions=("mean", "none"))
    n = 4 * views + (kc.case.num_labels if preset == "reg" else 0)
    assert len(oracle.valid) == n  # keys are never anchors, whatever their views


# ---------------------------------------------------------------------------- keys without grad
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc", "mulsupcon"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_without_grad(backend, preset):
    """A queue of detached keys: the same value and feature/prototype gradients as keys that
    require grad, and no gradient for the keys."""
    kc, oracle = draw(backend, ("nograd", backend, preset), lambda seed, rng: KeyCase(seed, preset, M=5))
    assert_keys_match(backend, kc, oracle, keys_grad=False)
    with_grad = kc.run(backend)
    without = kc.run(backend, keys_grad=False)
    assert torch.equal(with_grad[0], without[0])
    assert torch.equal(with_grad[1], without[1])


# ---------------------------------------------------------------------------------- label formats
FORMS = list(label_forms(torch.zeros(2, 2, dtype=torch.bool)).keys())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_label_formats(backend, form):
    """key_labels in every label format, independently of the format of `labels` (dense here)."""
    kc, oracle = draw(backend, ("formats", backend, form), lambda seed, rng: KeyCase(seed, "reg", M=4, empty_keys=1))
    key_labels = label_forms(kc.key_labels, kc.seed)[form]
    assert_keys_match(backend, kc, oracle, reductions=("mean",), key_labels=key_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_indices_with_label_format_indices(backend):
    """label_format='indices' reads an integer key_labels matrix as padded indices even where it
    could pass for multi-hot (only 0/1, width L)."""
    L = 2
    key_labels = torch.tensor([[1, 0], [1, 1], [0, 0]])  # as indices: {0, 1}, {1}, {0}
    dense = torch.tensor([[True, True], [False, True], [True, False]])
    kc = KeyCase(fresh_seed("indices-format", backend), "reg", M=3, L=L, key_labels=dense)
    kc.dtype = backend_dtype(backend)
    labels = to_padded(kc.case.labels, kc.seed)
    assert_keys_match(backend, kc, reductions=("mean",), key_labels=key_labels, labels=labels,
                      label_format="indices", num_labels=L)


# ------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("preset", ["reg", "supcon_all", "msc", "mulsupcon"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_key_label_sets(backend, preset):
    """Keys without labels are negatives of every anchor (in every softmax, never positives); all
    keys empty, and some."""
    for empty in (3, 1):
        kc, oracle = draw(backend, ("empty", backend, preset, empty),
                          lambda seed, rng: KeyCase(seed, preset, M=3, empty_keys=empty))
        assert sum(1 for s in kc.key_sets() if not s) == empty
        assert_keys_match(backend, kc, oracle)


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "proto", "jaccard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key(backend, preset):
    kc, oracle = draw(backend, ("single", backend, preset), lambda seed, rng: KeyCase(seed, preset, M=1))
    assert_keys_match(backend, kc, oracle)


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_sharing_no_label(backend, preset):
    """Keys that share no label with any sample: pure negatives. They change the value (they are in
    every denominator unless beta = 0) and get a gradient."""
    L = 8

    def make(seed, rng):
        kc = KeyCase(seed, preset, B=5, M=3, L=L)
        kc.case.labels[:, 5:] = False  # samples use labels 0..4 only
        kc.case.labels[~kc.case.labels.any(1), 0] = True
        kc.key_labels = torch.zeros(3, L, dtype=torch.bool)
        kc.key_labels[:, 5:] = torch.rand(3, 3, generator=torch.Generator().manual_seed(seed)) < 0.6
        kc.key_labels[~kc.key_labels.any(1), 6] = True
        return kc

    kc, oracle = draw(backend, ("disjoint", backend, preset), make)
    assert_keys_match(backend, kc, oracle)
    c = kc.case
    protos = None if c.prototypes is None else c.prototypes.to(kc.dtype)
    plain = mlcl_fast.multilabel_contrastive_loss(c.features.to(kc.dtype), c.labels, protos, backend=backend,
                                                  **c.loss_kwargs())
    value, _, _, gk = kc.run(backend)
    plain = plain.detach()
    if brute_force.spec_config(preset)["beta"] > 0:
        assert abs(float(value) - float(plain)) > 1e-6
        assert float(gk.norm()) > 0


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc", "jaccard"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_values_false(backend, preset):
    """check_values=False with labels and key_labels as padded indices (label_format='indices',
    num_labels given)."""
    kc, oracle = draw(backend, ("unchecked", backend, preset), lambda seed, rng: KeyCase(seed, preset, M=4))
    labels = to_padded(kc.case.labels, kc.seed)
    key_labels = to_padded(kc.key_labels, kc.seed + 1)
    assert_keys_match(backend, kc, oracle, labels=labels, key_labels=key_labels, check_values=False,
                      label_format="indices", num_labels=kc.case.num_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_forward_with_keys(backend):
    """MultiLabelContrastiveLoss.forward(features, labels, keys, key_labels): its prototypes, as
    the functional loss with them."""
    torch.manual_seed(fresh_seed("module", backend) % 1000)
    module = mlcl_fast.MultiLabelContrastiveLoss("reg", num_labels=5, dim=6, temperature=0.2,
                                                 backend=backend).double()
    if backend != "reference":
        module = module.float()
    dtype = backend_dtype(backend)
    kc = KeyCase(fresh_seed("module-case", backend), "reg", M=4, dtype=dtype, temperature=0.2)
    kc.case.prototypes = module.prototypes.detach().to(torch.float64)
    feats = kc.case.features.to(dtype)
    keys = kc.keys.to(dtype).requires_grad_(True)
    value = module(feats, kc.case.labels, keys, kc.key_labels)
    value.backward()
    oracle = kc.oracle()
    assert abs(float(value.detach()) - oracle.loss) <= TOLERANCES[dtype][0] * max(1, abs(oracle.loss))
    ref_k = oracle.all_grads()[2]
    assert rel_err(keys.grad, ref_k, GRAD_FLOOR) <= TOLERANCES[dtype][1]
    assert module.prototypes.grad is not None


# ------------------------------------------------------------------------------------ triton regimes
TRITON_REGIMES = [("closed", "reg"), ("closed", "mulsupcon"), ("dense", "supcon_any"), ("dense", "msc"),
                  ("bits", "jaccard"), ("bits", "reg"), ("gather", "msc"), ("list", "reg"),
                  ("pairs", "supcon_all"), ("pairs", "reg")]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton does not run on CPU tensors here")
@pytest.mark.parametrize("grad_mode", ["forward", "recompute", "symmetric"])
@pytest.mark.parametrize("regime,preset", TRITON_REGIMES, ids=[f"{r}-{p}" for r, p in TRITON_REGIMES])
def test_triton_regimes_take_keys(monkeypatch, regime, preset, grad_mode):
    """Every label regime of the Triton driver takes keys as sample columns (the symmetric
    backward, the closed form's, with keys among the columns no anchor owns)."""
    if grad_mode == "symmetric" and regime != "closed":
        pytest.skip("other regimes run 'symmetric' as 'recompute'")
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    kc, oracle = draw("triton", ("regime", regime, preset, grad_mode),
                      lambda seed, rng: KeyCase(seed, preset, B=5, V=2, M=4, key_views=2, L=6))
    assert_keys_match("triton", kc, oracle, reductions=("mean", "none"))


# ------------------------------------------------------------------------------------------ errors
def _call(**kwargs):
    feats = torch.randn(4, 6)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    args = dict(keys=torch.randn(3, 6), key_labels=torch.ones(3, 3, dtype=torch.bool), preset="supcon_any",
                backend="reference")
    args.update(kwargs)
    return mlcl_fast.multilabel_contrastive_loss(feats, labels, **args)


BAD_ARGUMENTS = {
    "keys_not_tensor": (dict(keys=[[0.0] * 6] * 3), TypeError, "keys"),
    "keys_int_dtype": (dict(keys=torch.ones(3, 6, dtype=torch.int64)), TypeError, "keys"),
    "keys_1d": (dict(keys=torch.randn(6)), ValueError, "keys"),
    "keys_4d": (dict(keys=torch.randn(3, 1, 1, 6)), ValueError, "keys"),
    "keys_empty": (dict(keys=torch.randn(0, 6), key_labels=torch.ones(0, 3, dtype=torch.bool)), ValueError, "keys"),
    "keys_dim_mismatch": (dict(keys=torch.randn(3, 5)), ValueError, "keys"),
    "keys_views_dim_mismatch": (dict(keys=torch.randn(3, 2, 5)), ValueError, "keys"),
    "keys_device": (dict(keys=torch.randn(3, 6, device="meta")), ValueError, "keys"),
    "keys_nan": (dict(keys=torch.full((3, 6), float("nan"))), ValueError, "keys"),
    "keys_without_labels": (dict(key_labels=None), ValueError, "key_labels"),
    "labels_without_keys": (dict(keys=None), ValueError, "key_labels"),
    "key_labels_rows": (dict(key_labels=torch.ones(2, 3, dtype=torch.bool)), ValueError, "key_labels"),
    "key_labels_rows_indices": (dict(key_labels=torch.tensor([[0, -1]] * 4)), ValueError, "key_labels"),
    "key_labels_label_space_dense": (dict(key_labels=torch.ones(3, 4, dtype=torch.bool)), ValueError, "key_labels"),
    "key_labels_label_space_sparse": (dict(key_labels=torch.ones(3, 5).to_sparse_csr()), ValueError, "key_labels"),
    "key_labels_index_out_of_range": (dict(key_labels=torch.tensor([[0, 3], [1, -1], [2, -1]])), ValueError,
                                      "key_labels"),
    "key_labels_label_sets_space": (dict(key_labels=mlcl_fast.LabelSets(torch.tensor([[0], [1], [2]]),
                                                                        torch.ones(3, dtype=torch.int64), 4)),
                                    ValueError, "key_labels"),
    "key_labels_not_tensor": (dict(key_labels=[[0], [1], [2]]), TypeError, "key_labels"),
    "key_labels_device": (dict(key_labels=torch.ones(3, 3, dtype=torch.bool, device="meta")), ValueError,
                          "key_labels"),
    "key_labels_dense_unchecked": (dict(check_values=False), ValueError, "key_labels"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_key_arguments(name):
    kwargs, error, prefix = BAD_ARGUMENTS[name]
    if name == "key_labels_dense_unchecked":  # labels themselves fine for check_values=False
        feats = torch.randn(2, 6)
        with pytest.raises(error) as info:
            mlcl_fast.multilabel_contrastive_loss(feats, torch.tensor([[0, -1], [1, 2]]), keys=torch.randn(3, 6),
                                                  key_labels=torch.ones(3, 3, dtype=torch.bool), preset="supcon_any",
                                                  backend="reference", check_values=False, label_format="indices",
                                                  num_labels=3)
    else:
        with pytest.raises(error) as info:
            _call(**kwargs)
    assert str(info.value).startswith(prefix + ":"), str(info.value)


def test_keys_with_gather_raise():
    with pytest.raises(ValueError, match="^keys:"):
        _call(gather="all")


def test_keys_change_the_loss():
    """Keys are in every softmax: with them the value differs from the loss without them, and a
    key that copies a row (embedding and labels) is a positive of the same weight as that row."""
    case = random_case(fresh_seed("keys-change"), "supcon_any", B=5, d=4, L=4)
    feats, labels = case.features, case.labels
    plain = mlcl_fast.multilabel_contrastive_loss(feats, labels, preset="supcon_any", backend="reference")
    keyed = mlcl_fast.multilabel_contrastive_loss(feats, labels, preset="supcon_any", backend="reference",
                                                  keys=feats[:2] * 3.0, key_labels=labels[:2])
    assert abs(float(plain) - float(keyed)) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_features_with_keys(backend, dtype):
    """Half features with fp32 keys: the loss in fp32, each gradient in its input's dtype, the
    value within SPEC's half tolerance of the brute force (which sees the rounded inputs)."""
    kc = KeyCase(fresh_seed("half", backend, str(dtype)), "reg", M=4)
    kc.case.features = kc.case.features.to(dtype).double()  # the oracle sees what the backend sees
    feats = kc.case.features.to(dtype).requires_grad_(True)
    protos = kc.case.prototypes.float().requires_grad_(True)
    keys = kc.keys.float().requires_grad_(True)
    value = mlcl_fast.multilabel_contrastive_loss(feats, kc.case.labels, protos, backend=backend, keys=keys,
                                                  key_labels=kc.key_labels, **kc.case.loss_kwargs())
    value.backward()
    oracle = kc.oracle()
    assert value.dtype == torch.float32 and feats.grad.dtype == dtype and keys.grad.dtype == torch.float32
    assert abs(float(value.detach()) - oracle.loss) <= 2e-2 * max(1.0, abs(oracle.loss))
    assert rel_err(keys.grad, oracle.all_grads()[2], GRAD_FLOOR) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature_with_keys(backend):
    """A temperature that requires grad: its gradient counts the key columns' logits too (against
    the float64 reference's autograd, and differing from the gradient without keys)."""
    kc = KeyCase(fresh_seed("tau", backend), "reg", M=4)
    dtype = backend_dtype(backend)

    def tau_grad(name, dt, with_keys=True):
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        extra = dict(keys=kc.keys.to(dt), key_labels=kc.key_labels) if with_keys else {}
        loss = mlcl_fast.multilabel_contrastive_loss(kc.case.features.to(dt), kc.case.labels,
                                                     kc.case.prototypes.to(dt), backend=name, preset="reg",
                                                     temperature=tau, **extra)
        (g,) = torch.autograd.grad(loss, tau)
        return float(g)

    ref = tau_grad("reference", torch.float64)
    # SPEC: d loss / d tau = -(1/tau) sum_ij G_ij s_ij, from the brute force's G (keys included)
    kc.case.temperature = 0.2
    oracle = kc.oracle()
    emb = brute_force._normalised_embeddings(kc.case.features.double(), kc.case.prototypes.double(), kc.keys)
    s = emb[oracle._anchors] @ emb[oracle._columns].T / 0.2
    expected = -float((oracle._weighted(oracle.dl_ds, oracle.coeffs) * s).sum()) / 0.2
    assert abs(ref - expected) <= 1e-8 * max(1.0, abs(expected))
    assert abs(tau_grad(backend, dtype) - ref) <= 1e-4 * max(1.0, abs(ref))
    assert abs(tau_grad("reference", torch.float64, with_keys=False) - ref) > 1e-6


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("positives", ["sparse", "dense"])
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("msc", {}), ("supcon_all", {"reg": True}),
                                              ("jaccard", {"prototype_mode": "rows", "beta": 0.0}),
                                              ("mulsupcon", {"f": "overlap", "alpha": 0.5})],
                         ids=["reg", "msc", "supcon_all-reg", "jaccard-rows-beta0", "mulsupcon-overlap"])
@pytest.mark.parametrize("algorithm", ["fused", "blocked"])
def test_cpp_algorithms_take_keys(monkeypatch, algorithm, preset, overrides, positives):
    """The C++ ops' fused kernels and the blocked algorithm (the CUDA backend's, run with CPU block
    kernels), with either enumeration of positives, take keys as sample columns."""
    monkeypatch.setenv("MLCL_FAST_CPU_ALGORITHM", algorithm)
    monkeypatch.setenv("MLCL_FAST_CPU_POSITIVES", positives)
    kc, oracle = draw("cpp", ("cpp-algorithm", algorithm, preset, sorted(overrides.items()), positives),
                      lambda seed, rng: KeyCase(seed, preset, overrides, B=6, V=2, M=5, key_views=2, L=6,
                                                empty_keys=1))
    assert_keys_match("cpp", kc, oracle)
