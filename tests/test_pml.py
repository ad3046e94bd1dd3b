"""mlcl_fast.pml.MultiLabelSupConLoss: pytorch-metric-learning's call convention.

- single-label data against pytorch-metric-learning's own SupConLoss (an implementation we did not
  write): value and gradient in float64, several temperatures, with and without ref_emb, with mined
  indices_tuples, and inside their CrossBatchMemory / SelfSupervisedLoss wrappers;
- multi-label data against mlcl_fast.multilabel_contrastive_loss and a loop oracle for ref_emb;
- argument errors, and the module working without pytorch-metric-learning installed.
Tests that need pytorch-metric-learning are skipped without it (pip install pytorch-metric-learning).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mlcl_fast
from cases import PRESET_NAMES, fresh_seed, random_labels, to_padded
from mlcl_fast import multilabel_contrastive_loss
from mlcl_fast.pml import MultiLabelSupConLoss

pytestmark = pytest.mark.usefixtures("single_thread")

D = 6
TEMPERATURES = (0.05, 0.1, 0.5, 1.0)
RTOL, ATOL = 1e-10, 1e-12  # float64, two formulations of the same formula


@pytest.fixture(scope="module")
def pml():
    return pytest.importorskip("pytorch_metric_learning")


def _grads(value, tensors):
    got = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, tensors)]


def assert_same(ours, theirs, tensors, rtol=RTOL, atol=ATOL):
    ours_t, theirs_t = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    torch.testing.assert_close(ours_t.detach(), theirs_t.detach(), rtol=rtol, atol=atol)
    if ours_t.dim():  # per-anchor losses: the gradient of a weighted sum, each anchor its own weight
        # at most 1: their per-anchor loss divides by (#positives + the smallest normal number), so
        # an anchor without positives has a finite gradient (0) only for a coefficient <= 1
        coeffs = torch.linspace(0.5, 1.0, ours_t.numel(), dtype=torch.float64).reshape(ours_t.shape)
        ours_t, theirs_t = (ours_t * coeffs).sum(), (theirs_t * coeffs).sum()
    if ours_t.requires_grad or theirs_t.requires_grad:
        g_ours = _grads(ours_t, tensors) if ours_t.requires_grad else [torch.zeros_like(t) for t in tensors]
        g_theirs = _grads(theirs_t, tensors) if theirs_t.requires_grad else [torch.zeros_like(t) for t in tensors]
        for a, b in zip(g_ours, g_theirs):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def leaf(gen, *shape):
    scale = torch.empty(shape[0], 1, dtype=torch.float64).uniform_(0.5, 2.0, generator=gen)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


# Single-label batches: classes with one member (anchors without positives), one class of many
# members among singletons, and random draws with both.
SINGLE_LABEL = {
    "singletons": [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6],
    "one_big_class": [7, 7, 7, 7, 7, 1, 2, 3],
    "random": None,
}


def single_labels(kind, gen):
    if SINGLE_LABEL[kind] is not None:
        return torch.tensor(SINGLE_LABEL[kind])
    return torch.randint(0, 6, (14,), generator=gen)


def ref_variant(variant, E, y, gen):
    """(ref_emb, ref_labels, tensors to differentiate) for each way pytorch-metric-learning can be called."""
    if variant == "none":
        return None, None, [E]
    if variant == "distinct":  # other rows, some with a class no anchor has, some anchors' classes absent
        M = 9
        R = leaf(gen, M, D)
        ry = torch.cat([y[:4], torch.tensor([99, 99]), torch.randint(0, 6, (M - 6,), generator=gen)])
        return R, ry, [E, R]
    if variant == "self_same_labels":  # ref_emb is embeddings, ref_labels is labels: as without ref_emb
        return E, y, [E]
    if variant == "self_cloned_labels":  # a different labels object: the self pair is a positive
        return E, y.clone(), [E]
    if variant == "other_rows_same_labels":  # same labels object: the (i, i) pair is left out
        R = leaf(gen, E.shape[0], D)
        return R, y, [E, R]
    raise AssertionError(variant)


REF_VARIANTS = ("none", "distinct", "self_same_labels", "self_cloned_labels", "other_rows_same_labels")


@pytest.mark.parametrize("variant", REF_VARIANTS)
@pytest.mark.parametrize("kind", sorted(SINGLE_LABEL))
def test_single_label_matches_pml_supcon(pml, kind, variant):
    """supcon_all and supcon_any coincide on single-label data and equal their SupConLoss, the
    mean and the per-anchor losses (their DoNothingReducer, our reduction="none")."""
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.reducers import DoNothingReducer

    gen = torch.Generator().manual_seed(fresh_seed("pml", kind, variant))
    y = single_labels(kind, gen)
    E = leaf(gen, y.shape[0], D)
    R, ry, tensors = ref_variant(variant, E, y, gen)
    kwargs = {} if R is None else dict(ref_emb=R, ref_labels=ry)
    fused = variant in ("none", "self_same_labels")
    for tau in TEMPERATURES:
        theirs = SupConLoss(temperature=tau)(E, y, **kwargs)
        assert float(theirs.detach()) > 0
        theirs_each = SupConLoss(temperature=tau, reducer=DoNothingReducer())(E, y, **kwargs)["loss"]["losses"]
        for preset in ("supcon_all", "supcon_any"):
            for backend in (("reference", "auto") if fused else ("reference",)):
                ours = MultiLabelSupConLoss(preset, temperature=tau, backend=backend)(E, y, **kwargs)
                assert ours.dtype == torch.float64
                assert_same(ours, theirs, tensors)
                each = MultiLabelSupConLoss(preset, temperature=tau, backend=backend, reduction="none")(E, y, **kwargs)
                assert_same(each, theirs_each, tensors)


def test_single_label_class_ids_are_arbitrary_integers(pml):
    """1-D class ids need not be 0..C-1 (negative and large ids, int32), as for their losses."""
    from pytorch_metric_learning.losses import SupConLoss

    gen = torch.Generator().manual_seed(fresh_seed("pml-ids"))
    y = torch.tensor([-5, -5, 10**9, 10**9, 3, -5, 0, 3], dtype=torch.int64)
    E = leaf(gen, y.shape[0], D)
    R, ry = leaf(gen, 5, D), torch.tensor([3, 3, -5, 12, 10**9])
    for labels, ref_labels in ((y, ry), (y.int(), ry.int())):
        assert_same(MultiLabelSupConLoss(backend="reference")(E, labels), SupConLoss()(E, y), [E])
        assert_same(MultiLabelSupConLoss()(E, labels, ref_emb=R, ref_labels=ref_labels),
                    SupConLoss()(E, y, ref_emb=R, ref_labels=ry), [E, R])


def test_where_pml_supcon_differs(pml):
    """Documented differences. Their SupConLoss is 0 when the batch has no negative pair at all
    (every row one class), and its mean leaves out anchors whose loss is exactly 0; ours is SPEC's
    mean over the anchors that have a positive, as the library's."""
    from pytorch_metric_learning.losses import SupConLoss

    gen = torch.Generator().manual_seed(fresh_seed("pml-one-class"))
    E = leaf(gen, 6, D)
    y = torch.full((6,), 3)
    assert float(SupConLoss()(E, y).detach()) == 0.0
    ours = MultiLabelSupConLoss()(E, y)
    expected = multilabel_contrastive_loss(E, torch.zeros(6, 1, dtype=torch.bool) | True, preset="supcon_any")
    assert float(ours.detach()) > 0
    assert_same(ours, expected, [E])
    # An anchor whose columns are a single positive has loss exactly 0: their AvgNonZeroReducer
    # leaves it out of the mean, ours counts it (it has a positive)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    tuple_ = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2]), torch.tensor([0]))
    ours, theirs = MultiLabelSupConLoss()(E, y, tuple_), SupConLoss()(E, y, tuple_)
    ours_each = MultiLabelSupConLoss(reduction="none")(E, y, tuple_)
    assert float(ours_each[0].detach()) == 0.0 and float(ours_each[2].detach()) > 0
    assert_same(theirs, ours_each[2], [E])
    assert_same(ours, ours_each[2] / 2, [E])
    # No positive pair anywhere: both 0
    assert float(MultiLabelSupConLoss()(E, torch.arange(6)).detach()) == 0.0 == float(SupConLoss()(E, torch.arange(6)).detach())


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("miner_name", ["TripletMarginMiner", "PairMarginMiner", "MultiSimilarityMiner"])
def test_mined_indices_tuple_matches_pml(pml, miner_name, with_ref):
    """indices_tuple from their miners (triplets and pairs), with and without ref_emb."""
    from pytorch_metric_learning import miners
    from pytorch_metric_learning.losses import SupConLoss
    from pytorch_metric_learning.reducers import DoNothingReducer

    miner = {"TripletMarginMiner": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
             "PairMarginMiner": lambda: miners.PairMarginMiner(pos_margin=0.8, neg_margin=1.2),
             "MultiSimilarityMiner": lambda: miners.MultiSimilarityMiner(epsilon=0.3)}[miner_name]()
    gen = torch.Generator().manual_seed(fresh_seed("pml-miner", miner_name, with_ref))
    y = torch.randint(0, 4, (16,), generator=gen)
    E = leaf(gen, 16, D)
    R, ry = (leaf(gen, 10, D), torch.randint(0, 4, (10,), generator=gen)) if with_ref else (None, None)
    kwargs = dict(ref_emb=R, ref_labels=ry) if with_ref else {}
    tuple_ = miner(E, y, R, ry) if with_ref else miner(E, y)
    assert all(len(t) > 1 for t in tuple_)
    tensors = [E] + ([R] if with_ref else [])
    valid = torch.zeros(16, dtype=torch.bool)
    valid[tuple_[0]] = True  # anchors with a listed positive
    for tau in (0.1, 0.5):
        theirs = SupConLoss(temperature=tau)(E, y, tuple_, **kwargs)
        theirs_each = SupConLoss(temperature=tau, reducer=DoNothingReducer())(E, y, tuple_, **kwargs)["loss"]["losses"]
        for preset in ("supcon_any", "supcon_all"):
            ours = MultiLabelSupConLoss(preset, temperature=tau)(E, y, tuple_, **kwargs)
            ours_each = MultiLabelSupConLoss(preset, temperature=tau, reduction="none")(E, y, tuple_, **kwargs)
            assert_same(ours_each, theirs_each, tensors)
            assert_same(ours, ours_each.sum() / valid.sum(), tensors)
            # Their AvgNonZeroReducer averages over anchors whose loss is > 0: it leaves out an anchor
            # whose listed columns are a single positive (loss exactly 0); ours counts it (SPEC).
            nonzero = theirs_each.detach() > 0
            assert bool((nonzero <= valid).all())
            assert_same(ours * valid.sum() / nonzero.sum(), theirs, tensors)


def test_indices_tuple_must_agree_with_labels():
    E = torch.randn(6, D, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = MultiLabelSupConLoss()
    a, p, n = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 4])
    loss(E, y, (a, p, n))  # consistent
    with pytest.raises(ValueError, match=r"^indices_tuple: pair \(anchor 0, column 4\) is listed as a positive"):
        loss(E, y, (a, torch.tensor([4, 3]), n))
    with pytest.raises(ValueError, match=r"^indices_tuple: pair \(anchor 2, column 3\) is listed as a negative"):
        loss(E, y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.tensor([3])))
    with pytest.raises(ValueError, match=r"^indices_tuple: pair \(anchor 0, column 1\) is listed both"):
        loss(E, y, (a, p, a, p))


@pytest.mark.parametrize("preset", ["reg", "msc", "proto", "reg_noreg"])
def test_indices_tuple_with_prototypes_not_implemented(preset):
    loss = MultiLabelSupConLoss(preset, num_labels=3, dim=D)
    y = torch.tensor([0, 0, 1, 2])
    with pytest.raises(NotImplementedError, match="^indices_tuple: not supported with prototypes"):
        loss(torch.randn(4, D), y, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))


# ------------------------------------------------------------------------------ multi-label data

def multilabel_case(seed, B=10, L=5):
    gen = torch.Generator().manual_seed(seed)
    labels = random_labels(gen, B, L, density=0.35, empty_rows=1)
    return gen, leaf(gen, B, D), labels


def make_loss(preset, L, **kwargs):
    kwargs.setdefault("backend", "reference")
    loss = MultiLabelSupConLoss(preset, num_labels=L, dim=D, **kwargs).double()
    return loss


PRESETS_AND_OVERRIDES = [(p, {}) for p in PRESET_NAMES] + [
    ("reg", {"prototype_mode": "columns"}), ("msc", {"prototype_mode": "rows"}), ("reg", {"alpha": -1.0}),
    ("jaccard", {"prototype_mode": "rows", "beta": 0.0}), ("mulsupcon", {"f": "union"}),
]


@pytest.mark.parametrize("preset,overrides", PRESETS_AND_OVERRIDES,
                         ids=[p + "".join(f"-{k}={v}" for k, v in o.items()) for p, o in PRESETS_AND_OVERRIDES])
def test_multilabel_matches_library(preset, overrides):
    """Without ref_emb: the library's own loss (fused path); with ref_emb = another tensor holding
    the same rows and ref_labels = labels (their rule leaves (i, i) out): the unfused path must give
    the same value and, summed over both uses of the rows, the same gradient."""
    gen, E, labels = multilabel_case(fresh_seed("pml-ml", preset, str(overrides)))
    L = labels.shape[1]
    for form in (labels, to_padded(labels, seed=1)):
        for reduction in ("mean", "sum", "none"):
            loss = make_loss(preset, L, reduction=reduction, **overrides)
            expected = multilabel_contrastive_loss(E, form, loss.prototypes, preset=preset, backend="reference",
                                                   reduction=reduction, num_labels=L, **overrides)
            tensors = [E] + ([loss.prototypes] if loss.prototypes is not None else [])
            assert_same(loss(E, form), expected, tensors)
            unfused = loss(E, form, ref_emb=E * 1.0, ref_labels=form)
            assert unfused.shape == expected.shape
            assert_same(unfused, expected, tensors)


@pytest.mark.parametrize("preset", ["supcon_any", "supcon_all", "jaccard", "mulsupcon"])
def test_multilabel_all_pairs_tuple_equals_no_tuple(preset):
    """A tuple listing every other row, positives as the labels say: the library's loss."""
    gen, E, labels = multilabel_case(fresh_seed("pml-tuple", preset))
    B = E.shape[0]
    common = labels.double() @ labels.double().T
    same = (labels[:, None, :] == labels[None, :, :]).all(-1)
    positive = (common > 0) & same if preset == "supcon_all" else common > 0
    off = ~torch.eye(B, dtype=torch.bool)
    a1, p = torch.nonzero(positive & off, as_tuple=True)
    a2, n = torch.nonzero(~positive & off, as_tuple=True)
    loss = make_loss(preset, labels.shape[1])
    expected = multilabel_contrastive_loss(E, labels, preset=preset, backend="reference")
    assert_same(loss(E, labels, (a1, p, a2, n)), expected, [E])


def brute_force_ref(E, ys, R, rys, weighting, tau, exclude_self):
    """SPEC's pair-centric (any/all/jaccard) and mulsupcon losses with anchors E and columns R only,
    written as loops (anchor weights: uniform over valid anchors; labels for mulsupcon)."""
    e, r = F.normalize(E, dim=1), F.normalize(R, dim=1)
    losses, weights = [], []
    for i, yi in enumerate(ys):
        cols = [j for j in range(len(rys)) if not (exclude_self and j == i)]
        s = {j: (e[i] @ r[j]) / tau for j in cols}
        log_d = torch.logsumexp(torch.stack([s[j] for j in cols]), 0)
        w = {}
        if weighting == "label":
            for k in yi:
                carriers = [j for j in cols if k in rys[j]]
                for j in carriers:
                    w[j] = w.get(j, 0.0) + 1.0 / (len(yi) * len(carriers))
        else:
            for j in cols:
                inter, union = len(yi & rys[j]), len(yi | rys[j])
                omega = {"any": float(inter > 0), "all": float(inter > 0 and yi == rys[j]),
                         "jaccard": inter / union if inter else 0.0}[weighting]
                if omega:
                    w[j] = omega
            total = sum(w.values())
            w = {j: v / total for j, v in w.items()}
        loss_i = -sum(v * (s[j] - log_d) for j, v in w.items()) if w else torch.zeros((), dtype=E.dtype)
        losses.append(loss_i)
        weights.append((len(yi) if weighting == "label" else 1.0) if w else 0.0)
    if weighting == "label":
        return sum(c * l for c, l in zip(weights, losses)) / max(sum(len(y) for y in ys), 1)
    return sum(c * l for c, l in zip(weights, losses)) / max(sum(weights), 1)


@pytest.mark.parametrize("preset,weighting", [("supcon_any", "any"), ("supcon_all", "all"),
                                              ("jaccard", "jaccard"), ("mulsupcon", "label")])
def test_multilabel_ref_emb_matches_loop_oracle(preset, weighting):
    gen, E, labels = multilabel_case(fresh_seed("pml-ref", preset))
    L = labels.shape[1]
    M = 7
    R = leaf(gen, M, D)
    ref_labels = random_labels(gen, M, L, density=0.35, empty_rows=1)
    ref_labels[0] = labels[0]  # an identical label set, for "all"
    sets = lambda t: [set(torch.nonzero(row).flatten().tolist()) for row in t]
    for tau in (0.1, 0.7):
        loss = make_loss(preset, L, temperature=tau)
        expected = brute_force_ref(E, sets(labels), R, sets(ref_labels), weighting, tau, exclude_self=False)
        assert_same(loss(E, labels, ref_emb=R, ref_labels=ref_labels), expected, [E, R])
        # padded indices of different widths for the two sides; and the self rule with the same labels object
        assert_same(loss(E, to_padded(labels, seed=2), ref_emb=R, ref_labels=to_padded(ref_labels, seed=3)),
                    expected, [E, R])
        R2 = leaf(gen, E.shape[0], D)
        expected_self = brute_force_ref(E, sets(labels), R2, sets(labels), weighting, tau, exclude_self=True)
        assert_same(loss(E, labels, ref_emb=R2, ref_labels=labels), expected_self, [E, R2])


def test_prototype_only_softmax_ignores_ref_rows():
    """proto (beta=0): the columns are the prototypes only, so ref_emb changes nothing."""
    gen, E, labels = multilabel_case(fresh_seed("pml-proto"))
    loss = make_loss("proto", labels.shape[1])
    R = leaf(gen, 4, D)
    expected = multilabel_contrastive_loss(E, labels, loss.prototypes, preset="proto", backend="reference")
    ours = loss(E, labels, ref_emb=R, ref_labels=labels[:4].clone())
    assert_same(ours, expected, [E, loss.prototypes])
    assert torch.count_nonzero(_grads(ours, [R])[0]) == 0


def test_learnable_temperature_on_both_paths():
    gen, E, labels = multilabel_case(fresh_seed("pml-tau"))
    tau = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    loss = MultiLabelSupConLoss("supcon_any", temperature=tau, backend="reference")
    assert any(p is tau for p in loss.parameters())
    expected = multilabel_contrastive_loss(E, labels, preset="supcon_any", temperature=tau, backend="reference")
    assert_same(loss(E, labels), expected, [E, tau])
    assert_same(loss(E, labels, ref_emb=E * 1.0, ref_labels=labels), expected, [E, tau])


def test_float32_unfused_path_matches_fused():
    gen, E, labels = multilabel_case(fresh_seed("pml-f32"))
    E = E.detach().float().requires_grad_()
    loss = MultiLabelSupConLoss("mulsupcon")
    assert_same(loss(E, labels, ref_emb=E * 1.0, ref_labels=labels), loss(E, labels), [E], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------- errors

def test_argument_errors_name_the_argument():
    E = torch.randn(4, D)
    y = torch.tensor([0, 0, 1, 1])
    loss = MultiLabelSupConLoss()
    cases = [
        (TypeError, "embeddings:", lambda: loss([[1.0]], y)),
        (ValueError, "embeddings:", lambda: loss(torch.randn(4, 2, D), y)),
        (ValueError, "embeddings:", lambda: loss(torch.full((4, D), float("nan")), y)),
        (TypeError, "embeddings:", lambda: loss(torch.ones(4, D, dtype=torch.int64), y)),
        (ValueError, "labels:", lambda: loss(E, None)),
        (ValueError, "labels:", lambda: loss(E, torch.tensor([0, 1, 2]))),
        (TypeError, "labels:", lambda: loss(E, torch.tensor([0.0, 1.0, 0.0, 1.0]))),
        (ValueError, "labels:", lambda: loss(E, torch.ones(3, 5, dtype=torch.bool))),
        (ValueError, "ref_labels:", lambda: loss(E, y, ref_labels=y)),
        (ValueError, "ref_labels:", lambda: loss(E, y, ref_emb=torch.randn(3, D))),
        (ValueError, "ref_labels:", lambda: loss(E, y, ref_emb=torch.randn(3, D), ref_labels=torch.tensor([0, 1]))),
        (ValueError, "ref_labels:", lambda: loss(E, y, ref_emb=torch.randn(3, D), ref_labels=y)),
        (ValueError, "ref_labels:", lambda: loss(E, y, ref_emb=torch.randn(3, D),
                                                 ref_labels=torch.ones(3, 2, dtype=torch.bool))),
        (ValueError, "ref_labels:", lambda: loss(E, torch.ones(4, 3, dtype=torch.bool), ref_emb=torch.randn(3, D),
                                                 ref_labels=torch.ones(3, 2, dtype=torch.bool))),
        (ValueError, "ref_labels:", lambda: loss(E, torch.ones(4, 3, dtype=torch.bool), ref_emb=torch.randn(2, D),
                                                 ref_labels=torch.ones(3, 3, dtype=torch.bool))),
        (TypeError, "ref_emb:", lambda: loss(E, y, ref_emb="x", ref_labels=y)),
        (ValueError, "ref_emb:", lambda: loss(E, y, ref_emb=torch.randn(3, D + 1), ref_labels=y[:3])),
        (ValueError, "ref_emb:", lambda: loss(E, y, ref_emb=torch.randn(3, D, dtype=torch.float64), ref_labels=y[:3])),
        (ValueError, "indices_tuple:", lambda: loss(E, y, (torch.tensor([0]), torch.tensor([1])))),
        (TypeError, "indices_tuple:", lambda: loss(E, y, ([0], [1], [2]))),
        (ValueError, "indices_tuple:", lambda: loss(E, y, (torch.tensor([0]), torch.tensor([9]), torch.tensor([2])))),
        (ValueError, "indices_tuple:", lambda: loss(E, y, (torch.tensor([0, 1]), torch.tensor([1]),
                                                           torch.tensor([2]), torch.tensor([3])))),
        (ValueError, "preset:", lambda: MultiLabelSupConLoss("nope")),
        (ValueError, "temperature:", lambda: MultiLabelSupConLoss(temperature=0.0)),
        (ValueError, "distance:", lambda: MultiLabelSupConLoss(distance=None)),  # their kwargs are not ours
        (ValueError, "reducer:", lambda: MultiLabelSupConLoss(reducer=None)),
        (ValueError, "num_labels:", lambda: MultiLabelSupConLoss("reg", dim=D)),
        (ValueError, "label_format:", lambda: MultiLabelSupConLoss(label_format="csv")),
        (ValueError, "labels:", lambda: MultiLabelSupConLoss("reg", num_labels=2, dim=D)(E, y + 1)),
        (ValueError, "ref_labels:", lambda: MultiLabelSupConLoss("reg", num_labels=2, dim=D)(
            E, y, ref_emb=E * 1, ref_labels=y + 5)),
    ]
    for exc, prefix, call in cases:
        with pytest.raises(exc) as info:
            call()
        assert str(info.value).startswith(prefix), (prefix, str(info.value))


# ----------------------------------------------------------- pytorch-metric-learning's wrappers

def _open(wrapper_cls):
    """Their wrapper with its loss-name allow-list extended by our class (the check is by name)."""
    class Open(wrapper_cls):
        @staticmethod
        def supported_losses():
            return wrapper_cls.supported_losses() + ["MultiLabelSupConLoss"]
    return Open


def test_cross_batch_memory_refuses_by_class_name(pml):
    from pytorch_metric_learning.losses import CrossBatchMemory, SelfSupervisedLoss

    with pytest.raises(Exception, match="CrossBatchMemory not supported for MultiLabelSupConLoss"):
        CrossBatchMemory(MultiLabelSupConLoss(), embedding_size=D)
    with pytest.raises(Exception, match="SelfSupervisedLoss not supported for MultiLabelSupConLoss"):
        SelfSupervisedLoss(MultiLabelSupConLoss())


def test_cross_batch_memory_single_label_matches_supcon(pml):
    """Past the name check, CrossBatchMemory hands the loss (embeddings, labels, its all-pairs
    indices_tuple without self comparisons, memory, memory labels): with 1-D labels that is
    exactly their SupConLoss, step after step as the queue fills and wraps, with enqueue_mask too."""
    from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

    gen = torch.Generator().manual_seed(fresh_seed("pml-cbm"))
    theirs = CrossBatchMemory(SupConLoss(temperature=0.2), embedding_size=D, memory_size=20)
    ours = _open(CrossBatchMemory)(MultiLabelSupConLoss(temperature=0.2), embedding_size=D, memory_size=20)
    for step in range(6):
        E = leaf(gen, 8, D)
        y = torch.randint(0, 5, (8,), generator=gen)
        mask = torch.arange(8) % 3 == 0 if step == 5 else None
        kwargs = {} if mask is None else dict(enqueue_mask=mask)
        assert_same(ours(E, y, **kwargs), theirs(E, y, **kwargs), [E])
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["multi_hot", "padded"])
def test_cross_batch_memory_cannot_hold_multilabel_labels(pml, form):
    """Its label memory is a 1-D buffer [memory_size]: 2-D labels fail when queued."""
    from pytorch_metric_learning.losses import CrossBatchMemory

    gen = torch.Generator().manual_seed(fresh_seed("pml-cbm-ml", form))
    labels = random_labels(gen, 8, 5)
    labels = labels.long() if form == "multi_hot" else to_padded(labels, seed=0)
    cbm = _open(CrossBatchMemory)(MultiLabelSupConLoss(), embedding_size=D, memory_size=32)
    with pytest.raises(RuntimeError):
        cbm(leaf(gen, 8, D), labels)


@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_loss_matches_supcon(pml, symmetric):
    """SelfSupervisedLoss, past its name check: symmetric concatenates the views; otherwise it
    passes ref_emb with ref_labels=labels.clone(), so each (i, i) pair is the positive."""
    from pytorch_metric_learning.losses import SelfSupervisedLoss, SupConLoss

    gen = torch.Generator().manual_seed(fresh_seed("pml-ssl", symmetric))
    E, R = leaf(gen, 7, D), leaf(gen, 7, D)
    theirs = SelfSupervisedLoss(SupConLoss(temperature=0.3), symmetric=symmetric)(E, R)
    ours = _open(SelfSupervisedLoss)(MultiLabelSupConLoss(temperature=0.3), symmetric=symmetric)(E, R)
    assert_same(ours, theirs, [E, R])


def test_works_without_pytorch_metric_learning():
    code = (
        "import sys; sys.modules['pytorch_metric_learning'] = None\n"
        "import torch\n"
        "from mlcl_fast.pml import MultiLabelSupConLoss, require_pml\n"
        "E = torch.randn(6, 4, requires_grad=True)\n"
        "y = torch.tensor([0, 0, 1, 1, 2, 2])\n"
        "MultiLabelSupConLoss()(E, y, ref_emb=E.detach(), ref_labels=y.clone()).backward()\n"
        "try:\n"
        "    require_pml('the test')\n"
        "except ImportError as err:\n"
        "    assert 'pytorch-metric-learning' in str(err), err\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_is_a_library_module():
    loss = MultiLabelSupConLoss("reg", num_labels=4, dim=D)
    assert isinstance(loss, mlcl_fast.MultiLabelContrastiveLoss)
    assert [n for n, _ in loss.named_parameters()] == ["prototypes"]
