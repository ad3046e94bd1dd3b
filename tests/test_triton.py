"""The Triton backend against the float64 reference.

Without CUDA, the kernels run on CPU tensors under the Triton interpreter (fp32 and fp16, small
shapes, the small fixed tile configuration so that shapes cross tile boundaries). Triton reads
TRITON_INTERPRET when it is first imported, so this module sets it, for the rest of the test
process, before anything imports triton (when something already has, without it, these tests
are skipped). With CUDA the interpreter stays off, these tests step aside and the `gpu` tests
below run instead (all dtypes, large shapes, torch.compile).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import cases  # noqa: E402
from cases import ALL_PRESET_IDS, ALL_PRESETS, assert_backend_matches, fresh_seed, random_case, rel_err  # noqa: E402

triton = pytest.importorskip("triton")

from mlcl_fast import LabelSets, as_label_sets, multilabel_contrastive_loss, reference, resolve_config  # noqa: E402
from mlcl_fast.backends import triton as backend  # noqa: E402
from mlcl_fast.problem import Problem  # noqa: E402

FP32 = dict(rtol_loss=1e-5, rtol_grad=1e-4)
REGIMES = ("bits", "gather", "list", "pairs")


@pytest.fixture(autouse=True)
def _no_forced_settings(monkeypatch):
    monkeypatch.delenv("MLCL_FAST_TRITON_LABELS", raising=False)
    monkeypatch.delenv("MLCL_FAST_TRITON_GRAD", raising=False)


cpu_only = pytest.mark.skipif(HAS_CUDA or not backend.kernels_interpreted(),
                              reason="interpreter tests run where there is no CUDA, in a process whose triton "
                                     "was first imported with TRITON_INTERPRET=1")


def _case(key, preset="reg", overrides=None, **kw):
    kw.setdefault("dtype", torch.float32)
    return random_case(fresh_seed("triton", key, preset, repr(overrides), repr(sorted(kw.items()))), preset,
                       overrides, **kw)


# ------------------------------------------------------------------------------------- presets
@cpu_only
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
def test_every_preset_and_override(preset, overrides):
    """Small L: in-register bitsets (the default regime); one ragged tile (the shape tests cross tiles)."""
    case = _case("preset", preset, overrides, B=9, d=12, L=6, empty_rows=1)
    assert_backend_matches("triton", case, **FP32)


# Without prototypes over L = 70 labels (three bitset words; labels 31 and 63 set the sign bit of
# their word); with prototypes over L = 20 (every prototype is a column, so L adds tiles).
REGIME_CONFIGS = [("supcon_any", {}, 70), ("supcon_all", {"reg": True}, 70), ("jaccard", {}, 70),
                  ("mulsupcon", {}, 70), ("mulsupcon", {"f": "union", "reg": True}, 70),
                  ("reg", {"prototype_mode": "none", "alpha": 0.5}, 70),
                  ("reg", {"prototype_mode": "none", "alpha": -1.0}, 70),
                  ("msc", {}, 20), ("proto", {"reg": True}, 20), ("reg", {}, 20),
                  ("reg", {"alpha": 2.0, "beta": 0.1}, 20), ("jaccard", {"prototype_mode": "rows", "beta": 0.0}, 20)]


@cpu_only
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("preset,overrides,L", REGIME_CONFIGS, ids=[cases.preset_id(p, o) for p, o, _ in REGIME_CONFIGS])
def test_label_regimes(monkeypatch, regime, preset, overrides, L):
    """Every label regime, forced, with sparse labels (some rows share none)."""
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    B = 13 if L > 32 else 7
    case = _case("regime", preset, overrides, B=B, d=10, L=L, density=0.05, empty_rows=1)
    for label in (31, 63):
        if label < L:
            case.labels[:, label] |= torch.arange(B) % 3 == 0
    assert_backend_matches("triton", case, check_none=regime == "pairs", **FP32)


DENSE_CONFIGS = [(p, o, L) for p, o, L in REGIME_CONFIGS if L <= 64] + \
    [("supcon_any", {}, 64), ("jaccard", {}, 64), ("supcon_all", {"reg": True}, 40), ("msc", {"alpha": 0.5, "f": "overlap"}, 64),
     ("reg", {"prototype_mode": "none", "alpha": -1.0}, 40), ("mulsupcon", {"f": "union", "reg": True}, 40)]


@cpu_only
@pytest.mark.parametrize("preset,overrides,L", DENSE_CONFIGS, ids=[cases.preset_id(p, o) + f"-L{L}" for p, o, L in DENSE_CONFIGS])
def test_dense_label_regime(monkeypatch, preset, overrides, L):
    """L <= 64: 0/1 fp16 label rows, overlaps as one tl.dot per tile (the default for L <= 64
    outside the closed form): forced here, with label 31 and 63 in many rows."""
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "dense")
    B = 13
    case = _case("dense_regime", preset, overrides, B=B, d=10, L=L, density=0.08, empty_rows=1)
    for label in (31, 63):
        if label < L:
            case.labels[:, label] |= torch.arange(B) % 3 == 0
    assert_backend_matches("triton", case, check_none=False, **FP32)


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("jaccard", {"reg": True}), ("msc", {}),
                                              ("msc", {"f": "overlap", "alpha": 0.5, "reg": True}),
                                              ("reg", {"prototype_mode": "none", "alpha": -1.0})])
def test_dense_column_gradient_is_transposed(monkeypatch, preset, overrides):
    """d within one feature chunk: the dense mode's column gradient runs the transposed kernel
    (owned columns as the M dimension of every product, label dots included)."""
    from mlcl_fast.triton import recording

    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "dense")
    case = _case("dense_cols", preset, overrides, B=11, d=12, L=20, density=0.2, empty_rows=1)
    names = []
    with recording.recording(lambda kernel, grid, args, meta: names.append(kernel.__name__)):
        cases.run_loss("triton", case)
    assert "cols_dense_kernel" in names and "cols_kernel" not in names
    assert_backend_matches("triton", case, check_none=False, **FP32)


@cpu_only
@pytest.mark.parametrize("regime", ["bits", "gather", "dense"])
@pytest.mark.parametrize("preset,overrides", [("jaccard", {}), ("supcon_all", {}), ("mulsupcon", {"f": "union"}),
                                              ("reg", {"prototype_mode": "none", "alpha": 0.5})])
def test_dense_label_sets(monkeypatch, regime, preset, overrides):
    """Rows with dozens of labels: overlaps up to 40 (every bit of a word set, both signs)."""
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = _case("dense", preset, overrides, B=9, d=6, L=64, density=0.75, repeat_prob=0.4)
    case.labels[::2, :32] = True
    assert_backend_matches("triton", case, check_none=False, **FP32)


# The pairs regime: a head of the columns' most frequent labels in the sweeps (the dense label
# mode), the pairs sharing another label listed and corrected.
HEAD_CONFIGS = [("supcon_any", {}), ("supcon_all", {}), ("jaccard", {}), ("supcon_any", {"reg": True}),
                ("jaccard", {"reg": True, "beta": 0.1}), ("supcon_all", {"reg": True, "prototype_mode": "rows"}),
                ("jaccard", {"prototype_mode": "rows", "beta": 0.0}),
                # label-centric weights whose factor depends on the overlap: the head labels' sums
                # are corrected on the listed pairs, the tail labels' come from the triples
                ("msc", {}), ("msc", {"reg": True, "beta": 0.1}), ("mulsupcon", {"f": "union", "reg": True}),
                ("reg", {"prototype_mode": "none", "alpha": 0.5}), ("reg", {"prototype_mode": "none", "alpha": -1.0}),
                ("reg", {"alpha": 2.0, "reg": True})]


@cpu_only
@pytest.mark.parametrize("preset,overrides", HEAD_CONFIGS, ids=[cases.preset_id(p, o) for p, o in HEAD_CONFIGS])
def test_pairs_regime_head_and_tail(monkeypatch, preset, overrides):
    """A 16-label head out of 40 labels, dense label sets: many pairs share labels of both parts
    (so their weights come from the head overlap plus a correction), some only head labels."""
    from mlcl_fast.triton import configs, pairs

    monkeypatch.setattr(configs, "PAIRS_HEAD_LABELS", 16)
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "pairs")
    widths = []
    original = pairs.head_split
    monkeypatch.setattr(pairs, "head_split", lambda *a: widths.append(a[-1]) or original(*a))
    case = _case("pairs_head", preset, overrides, B=13, d=10, L=40, density=0.3, empty_rows=1)
    case.labels[::3, :4] = True   # frequent labels: in the head
    case.labels[1::4, 30] = True  # a tail label shared by several rows
    assert_backend_matches("triton", case, check_none=False, **FP32)
    assert widths and set(widths) == {16}


@cpu_only
@pytest.mark.parametrize("check_values", [True, False])
def test_pair_centric_large_label_space_takes_the_head(monkeypatch, check_values):
    """L > 64, pair-centric weights, few positive pairs: the default regime is pairs with a head
    (sweeps on the dense mode's tiles); without a host read of the labels the in-tile modes."""
    from mlcl_fast.triton import configs, pairs, recording

    monkeypatch.delenv("MLCL_FAST_TRITON_LABELS", raising=False)
    case = _case("head_default", "jaccard", None, B=13, d=8, L=300, density=0.01)
    case.labels[::2, 7] = True
    widths, modes = [], []
    original = pairs.head_split
    monkeypatch.setattr(pairs, "head_split", lambda *a: widths.append(a[-1]) or original(*a))
    feats = case.features.clone().requires_grad_(True)
    with recording.recording(lambda kernel, grid, args, meta: modes.append(meta.get("MODE"))):
        multilabel_contrastive_loss(feats, as_label_sets(case.labels, 13, case.num_labels), case.prototypes, backend="triton",
                                    check_values=check_values, **case.loss_kwargs()).backward()
    if check_values:
        assert widths == [64] and set(modes) - {None} == {configs.MODE_DENSE}
    else:
        assert not widths and configs.MODE_DENSE not in modes
    assert_backend_matches("triton", case, check_none=False, **FP32)


@cpu_only
@pytest.mark.parametrize("regime", ["dense", "bits", "list", "pairs"])
@pytest.mark.parametrize("preset,overrides", [("reg", {"alpha": 0.5}), ("jaccard", {"prototype_mode": "rows"}),
                                              ("msc", {"prototype_mode": "rows", "reg": True}),
                                              ("jaccard", {"prototype_mode": "rows", "beta": 0.0})])
def test_anchors_without_a_positive_are_not_swept(monkeypatch, regime, preset, overrides):
    """Prototypes as anchors over a label space few rows use: the sweeps visit only the anchors
    that share a label with another column (Problem.candidate_anchors, labels.visiting_order),
    and the skipped ones still get exactly zero loss and gradient."""
    from mlcl_fast.triton import labels as tl_labels

    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = _case("visit", preset, overrides, B=9, d=8, L=40, density=0.05, empty_rows=1)
    counts = []
    original = tl_labels.visiting_order
    monkeypatch.setattr(tl_labels, "visiting_order",
                        lambda mask: counts.append((mask.shape[0], int(mask.sum()), original(mask))) or counts[-1][2])
    assert_backend_matches("triton", case, check_none=False, **FP32)
    anchors, candidates, (order, live) = counts[0]
    # every candidate is visited and nothing else; the prototypes of the labels no row carries
    # (about half of the 40 at this density: a random draw, so no fixed count) are skipped
    absent = 40 - int((case.labels.sum(0) > 0).sum())
    assert int(live) == candidates <= anchors - absent and absent > 0
    assert sorted(order.tolist()) == list(range(anchors))


# ------------------------------------------------------------------------ closed-form regime
# Label-centric weights with f = 1 on positives, with and without the regulariser: every
# prototype mode, beta, anchor weight; L up to 300 over sparse labels (the compact label space is
# smaller than L, and the head tile of the regulariser holds at most HEAD_LABELS of them). reg with
# prototypes takes L = 150: every prototype carries its label, so 86 labels lie outside a 64-label
# head, and the interpreter runs one tail program per column (L = 300 took 45 s a case).
CLOSED_CONFIGS = [("mulsupcon", {}, 70), ("mulsupcon", {"prototype_mode": "rows"}, 20), ("proto", {}, 20),
                  ("reg_noreg", {}, 20), ("reg_noreg", {"beta": 0.0}, 20),
                  ("reg_noreg", {"beta": 0.1, "anchor_weight": "labels"}, 20), ("msc", {"f": "one"}, 20),
                  ("mulsupcon", {"f": "overlap", "alpha": 0.0}, 300), ("reg", {}, 20), ("reg", {"beta": 0.1}, 20),
                  ("reg", {"beta": 0.0}, 20), ("mulsupcon", {"reg": True}, 70), ("proto", {"reg": True}, 20),
                  ("reg", {"prototype_mode": "none"}, 300), ("reg", {}, 150)]


@cpu_only
@pytest.mark.parametrize("V,head", [(1, 64), (2, 16)], ids=["head64", "views_head16"])
@pytest.mark.parametrize("preset,overrides,L", CLOSED_CONFIGS, ids=[cases.preset_id(p, o) for p, o, _ in CLOSED_CONFIGS])
def test_closed_form_regime(monkeypatch, preset, overrides, L, V, head):
    """The default regime of these configurations (no forcing): checked against the reference
    and the fp64 brute force, and seen to run through closed.py. With a 16-label head tile the
    regularised cases with L > 16 also take the tail-pair correction."""
    from mlcl_fast.triton import configs, prep

    monkeypatch.setattr(configs, "HEAD_LABELS", head)
    monkeypatch.setattr(configs, "HEAD_LABELS_WIDE", min(head, configs.HEAD_LABELS_WIDE))

    calls = []
    original = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda *a: calls.append(1) or original(*a))
    B = (13 if L > 32 else 9) if V == 1 else 7
    case = _case("closed", preset, overrides, B=B, V=V, d=10, L=L, density=0.05 if L > 32 else 0.3, empty_rows=1)
    assert_backend_matches("triton", case, **FP32)
    assert calls, "the closed-form regime was not chosen"


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("mulsupcon", {"f": "union"}), ("reg", {"alpha": 0.5}),
                                              ("reg_noreg", {"alpha": -1.0}), ("supcon_any", {})])
def test_closed_regime_refuses_other_weights(monkeypatch, preset, overrides):
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "closed")
    case = _case("closed_bad", preset, overrides, B=6, d=4, L=5)
    with pytest.raises(ValueError, match="regime: 'closed' needs"):
        cases.run_loss("triton", case)


@cpu_only
@pytest.mark.parametrize("reg,grad_in_forward,symmetric", [(False, False, False), (True, True, False),
                                                            (True, False, False), (True, False, True),
                                                            (False, False, True)])
def test_closed_form_driver_path_is_sync_free_with_few_launches(reg, grad_in_forward, symmetric):
    """Forward and backward of the closed form under FakeTensorMode, with the kernels recorded
    instead of run: any read of a tensor's values on the host (.item(), nonzero, unique, a
    data-dependent size) raises there. The launches per forward+backward are counted. (The
    columns carry at most 30 labels: the regulariser's head tile holds them all, no tail.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mlcl_fast.triton import closed, recording

    gen = torch.Generator().manual_seed(fresh_seed("closed_fake"))
    M, C, d, L = 10, 14, 8, 30
    a_index = torch.randint(-1, L, (M, 3), generator=gen)
    c_index = torch.randint(-1, L, (C, 3), generator=gen)
    self_col = torch.arange(M, dtype=torch.int32)
    counts = [(x >= 0).sum(1).to(torch.int32) for x in (a_index, c_index)]
    launched = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q = mode.from_tensor(torch.randn(M, d)).requires_grad_(True)
        k = mode.from_tensor(torch.randn(C, d)).requires_grad_(True)
        with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)):
            assert not closed.has_tail(c_index, L, d)
            out = closed.closed_forward(q, k, self_col, a_index, counts[0], c_index, counts[1], C, 0, L, 10.0, 0.0,
                                        reg, "ieee", grad_in_forward, symmetric=symmetric)
            out[0].sum().backward()
        assert q.grad.shape == (M, d) and k.grad.shape == (C, d)
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

        with pytest.raises(DynamicOutputShapeException):
            torch.nonzero(out[0])  # the mode does catch synchronising calls
        with pytest.raises(DataDependentOutputException):
            float(out[0].sum())
    prep = ["label_keys_kernel", "label_runs_kernel", "head_prep_kernel"]
    assert launched[:len(prep)] == prep, launched
    sweeps = [name for name in launched if name in ("stats_kernel", "rows_kernel", "cols_free_kernel")]
    # The regulariser's value needs a second sweep in the forward; without the gradient in it the
    # backward sweeps the rows again.
    rows = ["rows_kernel"] * (2 if reg and not grad_in_forward else 1)
    assert sweeps == ["stats_kernel", *rows, "cols_free_kernel"], launched
    # Symmetric: the same launches (the anchor rows sweep the gathered columns, the column kernel
    # also covers the owners' rows); the gathered column list is built without a host read.
    # Nothing else: the label sums E_k come with the last preparation kernel's launch, the
    # anchors' V_i with the statistics sweep's.
    assert len(launched) == len(prep) + len(sweeps), launched


class _DeviceOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch operations that would launch device work (not views, not metadata),
    inside the backend's custom operators too."""

    VIEWS = {"view", "slice", "expand", "unsqueeze", "detach", "as_strided", "t", "permute", "select", "squeeze",
             "alias", "reshape", "_unsafe_view", "unbind", "split", "transpose", "lift_fresh", "empty", "empty_strided",
             "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "dim", "flatten", "to",
             "new_empty", "empty_like", "contiguous"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import OPDEFS

        kwargs = kwargs or {}
        name = func.name().split(".")[0]
        if name.startswith("mlcl_fast::"):
            with self:
                return OPDEFS[name]._init_fn(*args, **kwargs)
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **kwargs)


@cpu_only
@pytest.mark.parametrize("preset,L,limit,kernels,form", [("reg_noreg", 300, 40, 10, "indices"),
                                                         ("reg", 20, 39, 8, "indices"),
                                                         ("reg", 200, 41, 12, "indices"),
                                                         ("mulsupcon", 50, 35, 8, "indices"),
                                                         ("reg", 20, 56, 8, "sets")])
def test_public_call_device_operations_are_counted(monkeypatch, preset, L, limit, kernels, form):
    """The whole public call (check_values=False, padded indices or LabelSets), forward and
    backward, issues at most `limit` torch operations that launch device work besides the
    `kernels` Triton launches: each one is host time on a GPU. The limits are today's counts
    (README.md, host path); LabelSets are checked for the canonical form by torch operations on
    the device."""
    from mlcl_fast.triton import launch, recording

    monkeypatch.setattr(launch, "POISON", False)  # as compiled: outputs are not filled before the kernels
    gen = torch.Generator().manual_seed(fresh_seed("device_ops", preset))
    B, V, d = 16, 2, 16
    index = torch.randint(-1, L, (B, 5), generator=gen)
    labels = index if form == "indices" else as_label_sets(index, B, L, "indices")
    feats = torch.randn(B, V, d, generator=gen).requires_grad_(True)
    protos = torch.randn(L, d, generator=gen).requires_grad_(True) if cases.uses_prototypes(preset) else None
    launched = []
    counter = _DeviceOps()
    with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)), counter:
        loss = multilabel_contrastive_loss(feats, labels, protos, preset=preset, num_labels=L, label_format="indices",
                                           backend="triton", check_values=False)
        loss.backward()
    assert "stats_kernel" in launched and "sort" in counter.ops  # the counter sees inside the operators (prep)
    # The rows (features and prototypes together) are normalised by the backend's kernels, not by
    # torch operations, into one tensor that is the columns (no concatenation to undo): forward in
    # the first launch, with the padded indices' canonicaliser (prologue.py).
    first = "prologue_kernel" if form == "indices" else "unit_rows_kernel"
    assert launched[0] == first and launched.count(first) == 1 and launched.count("unit_rows_backward_kernel") == 1
    assert "linalg_vector_norm" not in counter.ops and "slice_backward" not in counter.ops
    assert len(launched) == kernels, launched
    # The padded indices are canonicalised by the backend's kernel, not by torch sorts.
    assert "canonical_rows_kernel" not in launched and ("unit_rows_kernel" in launched) == (form == "sets")
    assert len(counter.ops) <= limit, (len(counter.ops), sorted(counter.ops))


# ------------------------------------------------------------------- the label canonicaliser
@cpu_only
@pytest.mark.parametrize("K,dtype", [(K, dtype) for K in (1, 2, 5, 16, 17)
                                     for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)]
                         + [(64, torch.int64)])
def test_canonical_kernel_matches_the_torch_formulation(K, dtype):
    """canonical.canonical_indices against labels.from_indices_on_device (itself tested against
    the host path in tests/test_labels.py): random rows with repeats, padding anywhere, empty and
    full rows, a row of one label repeated, strided input; every width up to MAX_WIDTH."""
    from mlcl_fast.labels import from_indices_on_device
    from mlcl_fast.triton import canonical

    gen = torch.Generator().manual_seed(fresh_seed("canonical", str(K), str(dtype)))
    L = 300 if dtype == torch.uint8 else 1000   # uint8 rows hold 0..255, all labels here
    low = 0 if dtype == torch.uint8 else -1  # uint8 holds no padding value
    # one program per row at K = 64 (the interpreter's cost): fewer rows there
    for B in ((1, 37) if K < 64 else (1, 9)):
        raw = torch.randint(low, min(L, 12), (B, K), generator=gen)   # few labels: many repeats
        raw[B // 2] = low
        raw[-1] = raw[-1, 0]
        wide = torch.randint(low, L, (B, K), generator=gen)
        for x in (raw, wide):
            x = x.to(dtype)
            expected = from_indices_on_device(x, L)
            for inp in (x, x.t().contiguous().t()):                      # row and column strides
                got = canonical.canonical_indices(inp, L)
                assert got.index.dtype == got.count.dtype == torch.int64 and got.num_labels == L
                assert torch.equal(got.index, expected.index) and torch.equal(got.count, expected.count), (x, got.index)
    # mutation check: the comparison above sees a wrong repeat rule
    one = torch.tensor([[3, 3, -1, 2]], dtype=torch.int64)
    assert canonical.canonical_indices(one, 5).index.tolist() == [[2, 3, -1, -1]]


@cpu_only
def test_canonical_kernel_refuses_out_of_range_values_and_keeps_wide_inputs_on_torch():
    from mlcl_fast.labels import INDEX_RANGE_MESSAGE
    from mlcl_fast.triton import canonical, recording

    for bad in ([[0, 9]], [[-2, 1]], [[1, 2], [3, 9]]):
        with pytest.raises(RuntimeError, match=re.escape(INDEX_RANGE_MESSAGE)):
            canonical.canonical_indices(torch.tensor(bad), 9)
    index, count = canonical.canonical_index_rows(torch.tensor([[1, 2], [3, 9]]), 9)
    assert count.tolist() == [2, -1]                                     # the row at fault is marked
    launched = []
    with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)):
        canonical.canonical_indices(torch.tensor([[0, 1]]), 9)
        canonical.canonical_indices(torch.zeros(3, canonical.MAX_WIDTH + 1, dtype=torch.int64), 9)
        canonical.canonical_indices(torch.zeros(3, 0, dtype=torch.int64), 9)
    assert launched == ["canonical_rows_kernel"]                         # wider and empty inputs: torch
    empty = canonical.canonical_indices(torch.zeros(0, 4, dtype=torch.int64), 9)
    assert empty.index.shape == (0, 4) and empty.count.shape == (0,)
    for wrong in (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, dtype=torch.int64)):
        with pytest.raises((TypeError, ValueError), match="^labels"):
            canonical.canonical_indices(wrong, 9)


@cpu_only
def test_canonical_operator_schema():
    from mlcl_fast.triton import canonical

    torch.library.opcheck(canonical.canonical_index_rows, (torch.tensor([[2, -1, 2], [0, 1, -1]]), 4),
                          test_utils=("test_schema",))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_canonical_kernel_matches_the_torch_formulation_and_compiles():
    """On the device: the kernel against labels.from_indices_on_device for widths up to
    MAX_WIDTH, and under torch.compile(fullgraph=True)."""
    from mlcl_fast.labels import from_indices_on_device
    from mlcl_fast.triton import canonical

    gen = torch.Generator().manual_seed(fresh_seed("canonical_gpu"))
    for K in (1, 3, 16, 33, 64):
        raw = torch.randint(-1, 50, (300, K), generator=gen).cuda()
        got, want = canonical.canonical_indices(raw, 50), from_indices_on_device(raw, 50)
        assert torch.equal(got.index, want.index) and torch.equal(got.count, want.count)
    compiled = torch.compile(lambda x: canonical.canonical_index_rows(x, 50), fullgraph=True)
    raw = torch.randint(-1, 50, (64, 7), generator=gen).cuda()
    assert torch.equal(compiled(raw)[0], from_indices_on_device(raw, 50).index)


@cpu_only
def test_public_call_canonicalises_with_the_kernel_only_without_host_checks():
    from mlcl_fast.triton import recording

    index = torch.tensor([[0, 2, 2, -1], [1, -1, -1, -1], [2, 0, 1, 1]])
    feats = torch.randn(3, 2, 8)
    for check_values in (False, True):
        launched = []
        with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)):
            multilabel_contrastive_loss(feats, index, preset="supcon_any", num_labels=3, label_format="indices",
                                        backend="triton", check_values=check_values)
        # (with the rows' normaliser in one launch)
        assert ("prologue_kernel" in launched) == (not check_values)
        assert ("unit_rows_kernel" in launched) == check_values and "canonical_rows_kernel" not in launched
    a = multilabel_contrastive_loss(feats, index, preset="supcon_any", num_labels=3, label_format="indices",
                                    backend="triton", check_values=False)
    b = multilabel_contrastive_loss(feats, index, preset="supcon_any", num_labels=3, label_format="indices",
                                    backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cpu_only
@pytest.mark.parametrize("labels,error,match", [
    (torch.zeros(4, 2), TypeError, "labels: padded label indices must be an integer tensor"),
    (torch.zeros(4, dtype=torch.int64), ValueError, "labels: expected padded label indices of shape"),
    (torch.zeros(4, 2, dtype=torch.bool), TypeError, "labels: padded label indices must be an integer tensor")])
def test_public_call_refuses_bad_padded_indices_before_the_prologue(labels, error, match):
    """check_values=False with padded indices: the labels the prologue would take later are checked
    where the canonicaliser would have checked them (labels.check_padded_indices), same errors."""
    for backend_name in ("triton", "reference"):
        with pytest.raises(error, match=match):
            multilabel_contrastive_loss(torch.randn(4, 2, 8), labels, preset="supcon_any", num_labels=3,
                                        label_format="indices", backend=backend_name, check_values=False)


@cpu_only
def test_public_call_canonicalises_fp64_rows_apart():
    """fp64 rows go to the reference (the kernels accumulate in fp32), so there is no row
    normaliser to share a launch with: the padded indices take the canonicaliser's own kernel,
    and the loss and gradients are the reference's."""
    gen = torch.Generator().manual_seed(fresh_seed("fp64_canonical"))
    index = torch.randint(-1, 6, (8, 3), generator=gen)
    runs = []
    for backend_name in ("triton", "reference"):
        x = torch.randn(8, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with _observed_launches() as launched:
            loss = multilabel_contrastive_loss(x, index, preset="supcon_any", num_labels=6, label_format="indices",
                                               backend=backend_name, check_values=backend_name == "reference")
            loss.backward()
        runs.append((loss, x.grad, launched))
    assert runs[0][2] == ["canonical_rows_kernel"] and runs[1][2] == []
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ the row normaliser
@contextlib.contextmanager
def _observed_launches():
    """The names of the kernels launched inside the block (which do run: not recorded)."""
    from mlcl_fast.triton import recording

    launched, run = [], recording.launch

    def observe(kernel, grid, args, meta, wrap=None):
        launched.append(kernel.__name__)
        run(kernel, grid, args, meta, wrap)

    recording.launch = observe
    try:
        yield launched
    finally:
        recording.launch = run


@cpu_only
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "fp16_to_fp32", "fp16", "bf16"])
def test_unit_rows_kernels_match_the_fp64_formulation(dtype, out_dtype):
    """normalize.unit_rows against x / max(||x||, eps) in fp64, value and gradient, on rows that
    overflow or underflow a naive fp32 sum of squares, rows below the floor, zero rows, and a
    width that crosses feature blocks; strided rows too."""
    from mlcl_fast.inputs import NORM_EPS
    from mlcl_fast.triton import normalize

    gen = torch.Generator().manual_seed(fresh_seed("unit_rows", str(dtype), str(out_dtype)))
    big = torch.finfo(dtype).max
    x = torch.randn(21, 37, generator=gen)
    x[1] *= big / 8            # ||x||^2 overflows fp32 (and the row's norm exceeds the range for fp32 rows)
    x[2] *= 1e-3 if dtype != torch.float32 else 1e-25   # squares underflow in fp32
    x[3] = 0.0                 # zero row
    x[4] *= 1e-14 if dtype == torch.float32 else 0.0    # below the floor
    x[5, :] = 0.0
    x[5, 7] = -3.0             # one nonzero entry
    x = x.to(dtype)
    wide = torch.zeros(21, 74, dtype=dtype)
    wide[:, ::2] = x
    strided = wide[:, ::2]     # the same values, row stride 74, column stride 2
    g = torch.randn(21, 37, generator=gen)

    for inp in (x, strided):
        leaf = inp.detach().clone().requires_grad_(True) if inp.is_contiguous() else \
            wide.detach().clone().requires_grad_(True)
        rows = leaf if inp.is_contiguous() else leaf[:, ::2]
        y = normalize.unit_rows([rows], out_dtype)
        assert y.dtype == out_dtype and torch.isfinite(y).all()
        (y.float() * g).sum().backward()
        x64 = inp.detach().double().requires_grad_(True)
        y64 = x64 / torch.clamp(torch.linalg.vector_norm(x64, dim=1, keepdim=True), min=NORM_EPS)
        (y64 * g.double()).sum().backward()
        tol = dict(rtol=1e-5, atol=1e-6) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(y.double(), y64.detach(), **tol)
        grad = leaf.grad if inp.is_contiguous() else leaf.grad[:, ::2]
        scale = x64.grad.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
        # Rows whose gradient the input dtype holds as normal numbers with 8 bits to spare (below
        # the floor it is g / 1e-12, beyond fp16/bf16 range; a huge row's is near or below the
        # subnormal range there, its smaller entries with a few bits in any formulation: a bf16
        # row of norm 1.7e38 has a largest entry just above the smallest normal), relative to
        # each row's largest entry.
        info = torch.finfo(dtype)
        held = ((scale < info.max / 4) & (scale > info.tiny * 256)).flatten()
        assert held.sum() >= 17
        torch.testing.assert_close((grad.double() / scale)[held], (x64.grad / scale)[held], rtol=0,
                                   atol=2e-2 if dtype != torch.float32 else 1e-5)
        assert torch.isfinite(grad[held]).all()


@cpu_only
@pytest.mark.parametrize("d", [2, 7, 40])
def test_unit_rows_backward_keeps_a_nearly_radial_gradient_exact(d):
    """bf16 rows whose incoming gradient is nearly along the output row (50 times its tangential
    part): the backward's tangential difference g - y (y . g) is formed from the direction
    recomputed in fp32, so it carries the output's bf16 rounding only, not 50 times the bf16
    rounding of y (about 10 % of it with y read back in bf16)."""
    from mlcl_fast.triton import normalize

    gen = torch.Generator().manual_seed(fresh_seed("unit_rows_radial", d))
    x = torch.randn(48, d, generator=gen).to(torch.bfloat16).requires_grad_(True)
    y64 = torch.nn.functional.normalize(x.detach().double(), dim=1)
    t = torch.randn(48, d, generator=gen, dtype=torch.float64)
    t = t - y64 * (y64 * t).sum(1, keepdim=True)  # tangential
    # the incoming gradient as it reaches the kernel: in the rows' dtype (exact here)
    g = (50 * y64 + t / t.norm(dim=1, keepdim=True)).to(torch.bfloat16).double()
    y = normalize.unit_rows([x], torch.bfloat16)
    (y.double() * g).sum().backward()
    expect = (g - y64 * (y64 * g).sum(1, keepdim=True)) / x.detach().double().norm(dim=1, keepdim=True)
    err = ((x.grad.double() - expect).norm(dim=1) / expect.norm(dim=1)).max()
    assert err < 1e-2, err


@cpu_only
@pytest.mark.parametrize("dtypes,sizes", [((torch.float32, None, torch.float32), (19, 0, 35)),
                                          ((torch.float16, torch.float16, torch.float32), (19, 5, 35)),
                                          ((torch.float32, torch.float32, torch.float16), (3, 17, 16)),
                                          ((torch.float32, torch.float32, torch.float32), (16, 0, 1))],
                         ids=["two", "three", "mixed", "empty"])
def test_unit_rows_of_several_tensors_in_one_launch(dtypes, sizes):
    """normalize.unit_rows([features, keys, prototypes]): one launch each way, the rows stacked in
    order; equal to the tensors normalised one by one (value and each tensor's gradient, in its
    own dtype), whatever the row counts (ragged blocks, an empty set)."""
    from mlcl_fast.triton import normalize

    gen = torch.Generator().manual_seed(fresh_seed("unit_rows_joint", repr(dtypes), repr(sizes)))
    parts = [torch.randn(r, 24, generator=gen).to(dt).requires_grad_(True) for r, dt in zip(sizes, dtypes)
             if dt is not None]
    out_dtype = torch.float16 if dtypes[0] == torch.float16 else torch.float32
    with _observed_launches() as launched:
        y = normalize.unit_rows(parts, out_dtype)
        g = torch.randn(y.shape, generator=gen)
        (y.float() * g).sum().backward()
    assert launched == ["unit_rows_kernel", "unit_rows_backward_kernel"]
    assert y.shape == (sum(sizes), 24) and y.dtype == out_dtype
    first = 0
    tol = dict(rtol=1e-5, atol=1e-6) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for t in parts:
        alone = t.detach().clone().requires_grad_(True)
        y1 = normalize.unit_rows([alone], out_dtype)
        (y1.float() * g[first:first + t.shape[0]]).sum().backward()
        torch.testing.assert_close(y[first:first + t.shape[0]], y1, **tol)
        assert t.grad.dtype == t.dtype
        torch.testing.assert_close(t.grad, alone.grad, **tol)
        first += t.shape[0]


# ------------------------------------------------------------------------------- the prologue
@cpu_only
@pytest.mark.parametrize("B,K,sizes,dtypes", [(9, 5, (18, 0, 7), (torch.float32, None, torch.float32)),
                                              (4, 17, (4, 3, 40), (torch.float16, torch.float16, torch.float32)),
                                              (0, 3, (16, 0, 0), (torch.float32, None, None)),
                                              (5, 64, (0, 0, 5), (None, None, torch.float32))],
                         ids=["samples_prototypes", "keys_mixed", "no_label_rows", "wide_rows_one_set"])
def test_prologue_is_the_canonicaliser_and_the_normaliser_in_one_launch(B, K, sizes, dtypes):
    """prologue.prologue: the canonical labels and the normalised rows (and the rows' gradients)
    of canonical.canonical_indices and normalize.unit_rows, bit for bit, from one launch forward
    (one backward); labels the kernel does not take (wider than MAX_WIDTH) take the two paths."""
    from mlcl_fast.triton import canonical, normalize, prologue, recording

    gen = torch.Generator().manual_seed(fresh_seed("prologue", B, K, repr(sizes)))
    L = 40
    labels = torch.randint(-1, 12, (B, K), generator=gen)
    labels[::3] = torch.randint(-1, L, labels[::3].shape, generator=gen)
    labels = labels.t().contiguous().t()  # column-major: strides are the kernel's arguments
    parts = [torch.randn(r, 12, generator=gen).to(dt) for r, dt in zip(sizes, dtypes) if dt is not None]
    out_dtype = parts[0].dtype
    runs = []
    for joint in (True, False):
        inputs = [t.clone().requires_grad_(True) for t in parts]
        with _observed_launches() as launched:
            if joint:
                sets, y = prologue.prologue(labels, L, inputs, out_dtype)
            else:
                sets, y = canonical.canonical_indices(labels, L), normalize.unit_rows(inputs, out_dtype)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            (y.float() * g).sum().backward()
        runs.append((sets, y, [t.grad for t in inputs], launched))
    (sets, y, grads, launched), (sets2, y2, grads2, launched2) = runs
    assert launched == ["prologue_kernel", "unit_rows_backward_kernel"], launched
    assert launched2 == ["canonical_rows_kernel", "unit_rows_kernel", "unit_rows_backward_kernel"][0 if B else 1:]
    assert sets.num_labels == L and torch.equal(sets.index, sets2.index) and torch.equal(sets.count, sets2.count)
    assert y.dtype == out_dtype and torch.equal(y, y2)
    for a, b in zip(grads, grads2):
        assert a is not None and a.dtype == b.dtype and torch.equal(a, b)
    # wider than the kernel's label width: the torch canonicaliser and the normaliser's own launch
    wide = torch.randint(-1, L, (3, canonical.MAX_WIDTH + 1), generator=gen)
    launched = []
    with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)):
        prologue.prologue(wide, L, [torch.randn(3, 12)], torch.float32)
    assert launched == ["unit_rows_kernel"]


@cpu_only
def test_prologue_checks_its_labels_and_operator_schema():
    """A label outside [-1, L) fails the device-side assertion (the canonicaliser's message); bad
    arguments of the operator raise naming them; opcheck's schema and autograd checks pass."""
    from mlcl_fast.labels import INDEX_RANGE_MESSAGE
    from mlcl_fast.triton import prologue

    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=re.escape(INDEX_RANGE_MESSAGE)):
        prologue.prologue(torch.tensor([[0, 1], [2, 9]]), 9, [x], torch.float32)
    for labels, match in ((torch.zeros(2, 2), "labels: expected a 2-D integer"),
                          (torch.zeros(2, 65, dtype=torch.int64), "labels: the kernel takes at most 64")):
        with pytest.raises(ValueError, match=match):
            prologue.prologue_op(labels, 3, x, None, None, torch.float32)
    with pytest.raises(ValueError, match="x1: expected"):
        prologue.prologue_op(torch.zeros(2, 2, dtype=torch.int64), 3, x, torch.randn(2, 5), None, torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        prologue.prologue_op(torch.zeros(2, 2, dtype=torch.int64), 3, x, None, None, torch.int32)
    torch.library.opcheck(prologue.prologue_op,
                          (torch.tensor([[2, -1, 2], [0, 1, -1]]), 4, torch.randn(5, 6, requires_grad=True), None,
                           torch.randn(3, 6, requires_grad=True), torch.float32),
                          test_utils=("test_schema", "test_autograd_registration"))  # fake tracing: compiled only


# ----------------------------------------------------------------------------- shapes and edges
@cpu_only
@pytest.mark.parametrize("B,V,d,L", [(1, 1, 3, 1), (5, 3, 20, 1), (16, 1, 16, 4), (9, 2, 33, 5), (7, 1, 5, 8)],
                         ids=["one_sample", "views_L1", "exact_tiles", "ragged_views", "small_d"])
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_shapes(B, V, d, L, preset):
    """Batch of one, views, N a multiple of the tile or not, d below / across feature chunks, L = 1."""
    case = _case("shape", preset, None, B=B, V=V, d=d, L=L, density=0.4)
    assert_backend_matches("triton", case, **FP32)


@cpu_only
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "mulsupcon"])
def test_no_valid_anchor_gives_exact_zeros(monkeypatch, regime, preset):
    """Every label set empty (K = 0): no positives anywhere -> loss 0 and gradients exactly 0."""
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = _case("empty", preset, None, B=9, d=6, L=5, empty_rows=9)
    assert not case.labels.any()
    feats = case.features.clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.clone().requires_grad_(True)
    labels = torch.full((9, 0), -1, dtype=torch.int64)  # padded indices with K = 0
    loss = multilabel_contrastive_loss(feats, labels, protos, backend="triton", num_labels=5, **case.loss_kwargs())
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(feats.grad) == 0
    if protos is not None:  # a prototype's label is carried by no other column either
        assert torch.count_nonzero(protos.grad) == 0


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("supcon_any", {}), ("msc", {"reg": True}),
                                              ("jaccard", {"prototype_mode": "rows", "beta": 0.0})])
def test_small_temperature(preset, overrides):
    case = _case("tau", preset, overrides, B=12, d=8, L=5, temperature=0.01)
    assert_backend_matches("triton", case, **FP32)


@cpu_only
@pytest.mark.parametrize("grad_mode", ["recompute", "forward", "symmetric"])
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("supcon_any", {}), ("msc", {"f": "overlap", "alpha": 2.0})])
def test_gradient_strategies(monkeypatch, grad_mode, preset, overrides):
    """MLCL_FAST_TRITON_GRAD: the backward recomputes logits, or the forward's second sweep
    already produced the anchor-row gradient, or (closed form) the symmetric backward; the other
    regimes take 'symmetric' as 'recompute': the same launches."""
    from mlcl_fast.triton import recording

    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    if grad_mode == "symmetric" and preset != "reg":
        case = _case("grad", preset, overrides, B=11, d=9, L=5)
        runs = {}
        for mode in ("recompute", "symmetric"):
            monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", mode)
            launched = []
            with recording.recording(lambda kernel, grid, args, meta: launched.append((kernel.__name__, meta))):
                cases.run_loss("triton", case)
            runs[mode] = launched
        assert runs["symmetric"] == runs["recompute"]
        return
    case = _case("grad", preset, overrides, B=11, d=9, L=5)
    assert_backend_matches("triton", case, **FP32)


@cpu_only
@pytest.mark.parametrize("regime", ["bits", "pairs", "dense"])
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_fp16_features(monkeypatch, regime, preset):
    """Half features are read as they are (NATIVE_HALF). The interpreter's fp16 dots work; its
    bf16 tl.dot does not (wrong results even for a bare 16x16 product), so bf16 runs in the gpu
    tests only."""
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = _case("fp16", preset, None, B=10, d=12, L=5, dtype=torch.float16)
    assert_backend_matches("triton", case, rtol_loss=2e-2, rtol_grad=2e-2, check_none=False)


# --------------------------------------------------------------------------------- anchor ranges
def _problem(case: cases.Case, sample_anchors, prototype_anchors, dtype):
    from mlcl_fast.inputs import prepare

    cfg = resolve_config(case.preset, **case.overrides)
    feats = case.features.to(dtype).detach().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.to(dtype).detach().requires_grad_(True)
    base = prepare(feats, case.labels, protos, cfg, case.temperature, native_half=True)
    problem = Problem(base.samples, base.prototypes, base.labels, cfg, base.temperature, sample_anchors,
                      prototype_anchors)
    return problem, [t for t in (feats, protos) if t is not None]


@cpu_only
@pytest.mark.parametrize("regime", ["bits", "pairs"])
@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors",
                         [("reg", (3, 11), (2, 5)), ("reg", (0, 0), (1, 6)), ("supcon_any", (4, 17), None),
                          ("msc", (17, 18), None), ("mulsupcon", (5, 5), None)])
def test_anchor_ranges(regime, preset, sample_anchors, prototype_anchors):
    """A process's share of anchors: per-anchor losses and their gradients (weighted randomly)."""
    from mlcl_fast.triton import driver

    case = _case("ranges", preset, None, B=18, d=7, L=6)
    problem, inputs = _problem(case, sample_anchors, prototype_anchors, torch.float32)
    losses, valid = driver.anchor_losses(problem, regime=regime)
    ref_problem, ref_inputs = _problem(case, sample_anchors, prototype_anchors, torch.float64)
    ref_losses, ref_valid = reference.anchor_losses(ref_problem)
    assert losses.shape == ref_losses.shape and torch.equal(valid, ref_valid)
    assert losses.dtype == torch.float32
    assert rel_err(losses, ref_losses, 1.0) <= 1e-5
    weights = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    if losses.numel() and bool(valid.any()):
        grads = torch.autograd.grad((losses * weights.float()).sum(), inputs, allow_unused=True)
        ref_grads = torch.autograd.grad((ref_losses * weights).sum(), ref_inputs, allow_unused=True)
        for g, r in zip(grads, ref_grads):
            g = torch.zeros_like(r) if g is None else g
            r = torch.zeros_like(g) if r is None else r
            assert rel_err(g, r, 1e-6) <= 1e-4


@cpu_only
@pytest.mark.parametrize("grad_mode", ["forward", "symmetric"])
@pytest.mark.parametrize("preset,sample_anchors,prototype_anchors",
                         [("reg", (3, 11), (2, 5)), ("reg", (0, 0), (1, 6)), ("reg", (0, 18), (0, 6)),
                          ("mulsupcon", (4, 17), None)])
def test_closed_form_anchor_ranges(monkeypatch, grad_mode, preset, sample_anchors, prototype_anchors):
    """The closed form on a process's share of anchors, with randomly weighted per-anchor losses
    (so G_i differs between anchors: the symmetric backward mixes the column owners' G_o into the
    columns' tiles), against the reference; only some columns are anchors' own."""
    from mlcl_fast.triton import driver

    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    case = _case("closed_ranges", preset, None, B=18, d=7, L=6)
    problem, inputs = _problem(case, sample_anchors, prototype_anchors, torch.float32)
    losses, valid = driver.anchor_losses(problem, regime="closed")
    ref_problem, ref_inputs = _problem(case, sample_anchors, prototype_anchors, torch.float64)
    ref_losses, ref_valid = reference.anchor_losses(ref_problem)
    assert torch.equal(valid, ref_valid) and bool(valid.any())
    assert rel_err(losses, ref_losses, 1.0) <= 1e-5
    weights = torch.rand(losses.shape[0], generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    grads = torch.autograd.grad((losses * weights.float()).sum(), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad((ref_losses * weights).sum(), ref_inputs, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        g = torch.zeros_like(r) if g is None else g
        assert rel_err(g, r, 1e-6) <= 1e-4


@cpu_only
@pytest.mark.parametrize("grad_mode", ["forward", "recompute", "symmetric"])
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("mulsupcon", {}), ("reg_noreg", {"beta": 0.0})])
def test_closed_form_on_unnormalised_rows(monkeypatch, grad_mode, preset, overrides):
    """The closed form's operators on rows of random norms (a Problem built from them, as a direct
    caller may): the gradients keep their components along the rows, which the public call's
    normalisation projects out (e.g. the anchor's own-column term of V^T_i, parallel to q_i), so
    only here does every term of dq and dk show. Labels outside a 16-label head: the tail sums
    run. Against the reference on the same rows in fp64."""
    from mlcl_fast.triton import closed, configs, driver

    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    monkeypatch.setattr(configs, "HEAD_LABELS", 16)
    monkeypatch.setattr(configs, "HEAD_LABELS_WIDE", 16)
    case = _shared_tail_case(B=10, L=24)
    case = cases.replace(case, preset=preset, overrides=overrides,
                         prototypes=case.prototypes if cases.uses_prototypes(preset, overrides) else None)
    cfg = resolve_config(preset, **overrides)
    gen = torch.Generator().manual_seed(case.seed)
    feats = case.features.reshape(case.features.shape[0], -1, case.features.shape[-1])
    label_sets = as_label_sets(case.labels, feats.shape[0], case.num_labels).repeat_views(feats.shape[1])
    assert closed.has_tail(label_sets.index, case.num_labels, 10)
    runs = []
    rows64 = feats.flatten(0, 1).double()
    rows64 = rows64 * (0.5 + torch.rand(rows64.shape[0], 1, generator=gen, dtype=torch.float64))
    protos64 = None if case.prototypes is None else \
        case.prototypes.double() * (0.5 + torch.rand(case.prototypes.shape[0], 1, generator=gen, dtype=torch.float64))
    weights64 = None
    for dtype in (torch.float32, torch.float64):
        rows = rows64.to(dtype).requires_grad_(True)
        protos = None if protos64 is None else protos64.to(dtype).requires_grad_(True)
        problem = Problem(rows, protos, label_sets, cfg, case.temperature)
        losses, valid = (driver.anchor_losses(problem, regime="closed") if dtype == torch.float32
                         else reference.anchor_losses(problem))
        if weights64 is None:  # G_i differs between anchors
            weights64 = torch.rand(losses.shape[0], generator=gen, dtype=torch.float64)
        inputs = [t for t in (rows, protos) if t is not None]
        runs.append((losses, valid, torch.autograd.grad((losses * weights64.to(dtype)).sum(), inputs)))
    (losses, valid, grads), (ref_losses, ref_valid, ref_grads) = runs
    assert torch.equal(valid, ref_valid) and bool(valid.any())
    # Rows of norm up to 1.5 make logits up to 2.25 / tau: the fp32 log-sum-exp and the weighted
    # logit sum it cancels against carry 2.25x the rounding of unit rows (up to 2.9e-5 seen in
    # 12 random draws; unit rows stay under the 1e-5 of FP32). The gradients keep 1e-4.
    assert rel_err(losses, ref_losses, 1.0) <= 1e-4
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r, 1e-6) <= 1e-4


# ------------------------------------------------------------------------------ fixed vectors
@cpu_only
@pytest.mark.parametrize("index", range(18))
def test_spec_vectors_in_fp32(spec_vectors, index):
    from test_vectors import load_case

    case, loss, grad_f, grad_p = load_case(spec_vectors, index)
    value, gf, gp = cases.run_loss("triton", case, dtype=torch.float32)
    assert abs(float(value) - loss) <= 1e-5 * max(abs(loss), 1.0)
    assert rel_err(gf, grad_f, 1e-6) <= 1e-4
    if grad_p is not None:
        assert rel_err(gp, grad_p, 1e-6) <= 1e-4


# ------------------------------------------------------------------------------ custom operators
def _op_args(case: cases.Case, regime: str, head_width: int = 0):
    """Arguments of the custom operator of `regime` for `case` (every anchor); `head_width`: the
    pairs operator's head."""
    from mlcl_fast.triton import configs, labels as tl_labels

    problem, _ = _problem(case, None, None, torch.float32)
    cfg = problem.config
    q = problem.samples.detach().requires_grad_(True)
    k = problem.samples.detach().requires_grad_(True)
    a, col = problem.anchor_labels(), problem.column_labels()
    head = (q, k, problem.anchor_columns().to(torch.int32))
    codes = (configs.WEIGHTING_CODES[cfg.weighting], configs.FACTOR_CODES[cfg.f], cfg.reg, "ieee")
    if regime == "pairs":
        return head + (tl_labels.padded_index(a).long(), a.count.to(torch.int32), col.index,
                       col.count.to(torch.int32), problem.num_samples, 0, a.num_labels, 10.0, 0.0, cfg.alpha) + \
            codes[:3] + (head_width,) + codes[3:]
    mode = configs.REGIMES[regime]
    return head + (tl_labels.padded_index(a), tl_labels.bitsets(a), a.count.to(torch.int32),
                   tl_labels.column_table(col, mode), col.count.to(torch.int32), problem.num_samples, 0, 10.0, 0.0,
                   cfg.alpha, mode, *codes[:2], cfg.reg, "ieee", True)


@cpu_only
def test_pairs_operator_passes_opcheck():
    """The sparse regime's operator (opaque, data-dependent output sizes): schema, autograd
    registration, fake implementation and AOT tracing with dynamic shapes."""
    from mlcl_fast.triton import pairs

    case = _case("opcheck", "reg", {"prototype_mode": "none"}, B=7, d=6, L=8)
    torch.library.opcheck(pairs.pairs_forward, _op_args(case, "pairs"))
    # Pair-centric weights with a head of 16 labels out of 40: both parts of the regime.
    case = _case("opcheck_head", "jaccard", {"reg": True}, B=7, d=6, L=40, density=0.3)
    torch.library.opcheck(pairs.pairs_forward, _op_args(case, "pairs", head_width=16))


@cpu_only
def test_dense_operator_schema_and_autograd():
    """The triton_op's schema and autograd registration (its fake tracing needs compiled kernels:
    the gpu compile test covers it)."""
    from mlcl_fast.triton import ops

    case = _case("opcheck", "mulsupcon", {"f": "union", "reg": True}, B=7, d=6, L=8)
    torch.library.opcheck(ops.dense_forward, _op_args(case, "bits"),
                          test_utils=("test_schema", "test_autograd_registration"))


# ----------------------------------------------------------------------------- label helpers
def test_bitsets_and_triples():
    from mlcl_fast.triton import labels as tl_labels

    sets = LabelSets(torch.tensor([[0, 31, 63, 64], [5, -1, -1, -1], [-1, -1, -1, -1]]), torch.tensor([4, 1, 0]), 70)
    bits = tl_labels.bitsets(sets)
    assert bits.dtype == torch.int32 and bits.shape == (3, 3)
    words = bits.to(torch.int64) & 0xFFFFFFFF
    assert words[0].tolist() == [1 | (1 << 31), 1 << 31, 1] and words[1].tolist() == [1 << 5, 0, 0]
    assert words[2].tolist() == [0, 0, 0]
    # (anchor, label, column) triples over columns >= 1: label 5 in column 1 once; labels 0/31/63/64 nowhere else
    assert tl_labels.positive_triples(sets, sets, col_lo=1) == 1
    assert tl_labels.positive_triples(sets, sets, col_lo=0) == 4 + 1


def test_regime_choice_thresholds():
    from mlcl_fast.triton import configs

    assert configs.choose_regime(128, 8, 8, 256, 384, 128, None) == "bits"
    assert configs.choose_regime(64, 8, 8, 256, 384, 128, None) == "dense"
    assert configs.choose_regime(64, 8, 8, 256, 384, 128, None, closed=True) == "closed"
    assert configs.choose_regime(1000, 8, 8, 256, 256, 128, 5000) == "pairs"
    assert configs.choose_regime(1000, 8, 8, 256, 256, 128, None) == "gather"
    assert configs.choose_regime(1000, 8, 2, 256, 256, 128, None) == "list"
    assert configs.choose_regime(100000, 8, 8, 256, 256, 128, 256 * 256) == "list"


def test_tile_configs_per_kernel_family(monkeypatch):
    from mlcl_fast.triton import configs

    monkeypatch.delenv("MLCL_FAST_TRITON_TILE", raising=False)
    anchors, columns = configs.tile_config(128, False), configs.tile_config(128, False, "columns")
    assert (anchors.block_m, anchors.block_n) == (16, 64) and (columns.block_m, columns.block_n) == (32, 32)
    assert configs.tile_config(300, False).block_k == 128 and configs.tile_config(20, False).block_k == 32
    assert configs.tile_config(128, True, "columns").block_m == 16
    with pytest.raises(ValueError, match="owner"):
        configs.tile_config(128, False, "rows")
    with pytest.raises(ValueError, match="kind"):
        configs.tile_config(128, False, kind="sparse")
    # Label-free and head sweeps: >= 64 rows in each product's M dimension (wgmma), d <= 256
    # resident; the column kernel's M dimension is its owned column block.
    free, free_c = configs.tile_config(128, False, kind="free"), configs.tile_config(128, False, "columns", "free")
    assert (free.block_m, free.block_n, free.num_warps, free.block_k) == (128, 64, 8, 128)
    assert (free_c.block_m, free_c.block_n) == (64, 128)
    wide, wide_c = configs.tile_config(256, False, kind="head"), configs.tile_config(256, False, "columns", "head")
    assert (wide.block_m, wide.block_n, wide.block_k, wide.block_d, wide.num_stages) == (64, 32, 256, 256, 3)
    assert configs.tile_config(256, False, kind="head", fp32=True).num_stages == 2
    assert configs.tile_config(128, False, kind="head").num_stages == 2
    assert (wide_c.block_m, wide_c.block_n) == (32, 64)
    ieee = configs.tile_config(256, False, kind="free", ieee=True, fp32=True)
    assert (ieee.block_m, ieee.block_n, ieee.block_k) == (32, 32, configs.IEEE_CHUNK)
    assert configs.tile_config(256, False, kind="free", fp32=True).block_k == 128
    assert configs.tile_config(256, False, kind="free", fp32=True, x3=True).block_k == configs.X3_CHUNK
    dense = configs.tile_config(256, False, "columns", "dense")  # the transposed column kernel: d resident
    assert (dense.block_m, dense.block_n, dense.num_warps, dense.block_k) == (32, 64, 8, 256)
    dense = configs.tile_config(256, False, "anchors", "dense")
    assert (dense.block_m, dense.block_n, dense.num_warps, dense.block_k) == (64, 64, 8, 128)
    dense = configs.tile_config(256, False, "columns", "dense_label")
    assert (dense.block_m, dense.block_n, dense.block_k) == (16, 64, 256)
    monkeypatch.setenv("MLCL_FAST_TRITON_TILE", "32,128,8,3")
    forced = configs.tile_config(64, False, "columns")
    assert (forced.block_m, forced.block_n, forced.num_warps, forced.num_stages, forced.block_k) == (32, 128, 8, 3, 64)
    for bad, match in (("32,64,4", "expected"), ("24,64,4,2", "BLOCK_M must be a power of two"),
                       ("32,64,3,2", "num_warps")):
        monkeypatch.setenv("MLCL_FAST_TRITON_TILE", bad)
        with pytest.raises(ValueError, match=match):
            configs.tile_config(64, False)
    # Per kernel family: the first matching entry wins, families without one keep their defaults.
    monkeypatch.setenv("MLCL_FAST_TRITON_TILE", "free:anchors=128,64,8,3; head:*=32,32,4,2;*:columns=16,128,8,4")
    stats = configs.tile_config(256, False, "anchors", "free")
    assert (stats.block_m, stats.block_n, stats.num_warps, stats.num_stages, stats.block_k) == (128, 64, 8, 3, 256)
    for owner in configs.OWNERS:
        head = configs.tile_config(256, False, owner, "head")
        assert (head.block_m, head.block_n, head.num_warps, head.num_stages) == (32, 32, 4, 2)
    cols = configs.tile_config(256, False, "columns", "free")
    assert (cols.block_m, cols.block_n, cols.num_stages) == (16, 128, 4)
    monkeypatch.delenv("MLCL_FAST_TRITON_TILE")
    default = configs.tile_config(256, False, "symmetric", "free")
    monkeypatch.setenv("MLCL_FAST_TRITON_TILE", "free:anchors=128,64,8,3")
    assert configs.tile_config(256, False, "symmetric", "free") == default
    for bad, match in (("free=64,64,4,2", "KIND:OWNER"), ("sparse:anchors=64,64,4,2", "kind must be"),
                       ("free:rows=64,64,4,2", "owner must be"), ("head:*=64,64,4,2;free:*=64,48,4,2", "BLOCK_N"),
                       ("free:*=64,64", "expected")):
        monkeypatch.setenv("MLCL_FAST_TRITON_TILE", bad)
        with pytest.raises(ValueError, match=match):
            configs.tile_config(64, False, "anchors", "head")


def test_fp32_precision_setting(monkeypatch):
    """MLCL_FAST_TRITON_FP32: 'auto' (default) follows torch's tf32 setting, an explicit precision
    wins, anything else is an error naming the variable."""
    from mlcl_fast.triton import configs

    monkeypatch.delenv(configs.FP32_PRECISION_ENV, raising=False)
    assert (configs.fp32_precision(True), configs.fp32_precision(False)) == ("tf32", "ieee")
    monkeypatch.setenv(configs.FP32_PRECISION_ENV, "auto")
    assert configs.fp32_precision(True) == "tf32"
    for explicit in configs.FP32_PRECISIONS:
        monkeypatch.setenv(configs.FP32_PRECISION_ENV, explicit)
        assert configs.fp32_precision(False) == configs.fp32_precision(True) == explicit
    monkeypatch.setenv(configs.FP32_PRECISION_ENV, "tf32x2")
    with pytest.raises(ValueError, match=configs.FP32_PRECISION_ENV):
        configs.fp32_precision(True)


@cpu_only
@pytest.mark.parametrize("preset", ["reg", "supcon_any"])
def test_fp32_precision_reaches_every_dot(monkeypatch, preset):
    """With MLCL_FAST_TRITON_FP32=tf32x3 every kernel with a tl.dot gets that precision (the
    interpreter computes fp32 products whatever it is told, so the values match as in IEEE mode)."""
    from mlcl_fast.triton import recording

    monkeypatch.setenv("MLCL_FAST_TRITON_FP32", "tf32x3")
    case = _case("x3", preset, None, B=10, d=8, L=6)
    precisions = []
    with recording.recording(lambda kernel, grid, args, meta: precisions.append(meta.get("PRECISION"))):
        cases.run_loss("triton", case)
    assert "tf32x3" in precisions and set(precisions) <= {"tf32x3", None}
    assert_backend_matches("triton", case, **FP32)


@pytest.mark.skipif(HAS_CUDA, reason="with CUDA the kernels are compiled, not interpreted")
def test_interpreter_tests_are_not_skipped_without_cuda():
    """Without CUDA every cpu_only test must run: something that imports triton before this
    module (at collection) would silently skip them all."""
    assert backend.kernels_interpreted(), "triton was imported without TRITON_INTERPRET before tests/test_triton.py"


def test_supports_only_cuda_or_interpreter():
    assert backend.supports("cpu") == backend.kernels_interpreted()
    assert backend.supports("cuda") == (HAS_CUDA and not backend.kernels_interpreted())
    assert backend.NATIVE_HALF is True


@cpu_only
def test_forced_regime_is_checked(monkeypatch):
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "bitset")
    case = _case("bad", "reg", None, B=4, d=4, L=3)
    with pytest.raises(ValueError, match="MLCL_FAST_TRITON_LABELS"):
        cases.run_loss("triton", case)
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "bits")
    case = _case("bad", "supcon_any", None, B=4, d=4, L=129)
    with pytest.raises(ValueError, match="at most 128 labels"):
        cases.run_loss("triton", case)
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", "dense")
    with pytest.raises(ValueError, match="at most 64 labels"):
        cases.run_loss("triton", case)


# ------------------------------------------------------------------------------------- GPU
GPU_DTYPES = {torch.float32: dict(rtol_loss=1e-3, rtol_grad=1e-3),
              torch.bfloat16: dict(rtol_loss=2e-2, rtol_grad=2e-2),
              torch.float16: dict(rtol_loss=2e-2, rtol_grad=2e-2)}


@pytest.mark.parametrize("dtype", list(GPU_DTYPES), ids=str)
@pytest.mark.parametrize("preset,overrides", ALL_PRESETS, ids=ALL_PRESET_IDS)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_presets(preset, overrides, dtype):
    case = _case("gpu", preset, overrides, B=200, V=2, d=96, L=20, dtype=dtype, device="cuda")
    assert_backend_matches("triton", case, **GPU_DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(GPU_DTYPES), ids=str)
@pytest.mark.parametrize("preset,overrides,L", [("msc", {}, 50), ("jaccard", {"reg": True}, 50),
                                                ("supcon_any", {}, 300), ("msc", {"reg": True}, 300)])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_dense_kernels_at_d256(dtype, preset, overrides, L):
    """d = 256: the dense mode's transposed column kernel with all 256 features resident (L = 50),
    and the pairs regime's head (L = 300, sparse labels): compiled, against the reference."""
    case = _case("gpu_dense256", preset, overrides, B=160, V=2, d=256, L=L, density=0.3 if L < 64 else 0.01,
                 dtype=dtype, device="cuda")
    assert_backend_matches("triton", case, **GPU_DTYPES[dtype])


@pytest.mark.parametrize("precision,tolerance", [("ieee", FP32), ("tf32x3", FP32),
                                                 ("tf32", dict(rtol_loss=5e-3, rtol_grad=5e-3))])
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_fp32_precisions(monkeypatch, preset, precision, tolerance):
    """fp32 features under each MLCL_FAST_TRITON_FP32 precision, d = 200 (several chunks):
    tf32x3 holds the fp32 tolerances on tensor cores, tf32 the looser ones."""
    monkeypatch.setenv("MLCL_FAST_TRITON_FP32", precision)
    case = _case("gpu_fp32", preset, None, B=200, V=2, d=200, L=20, dtype=torch.float32, device="cuda")
    assert_backend_matches("triton", case, **tolerance)


@pytest.mark.parametrize("regime", ["gather", "list", "pairs"])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES), ids=str)
@pytest.mark.parametrize("preset,overrides,_", REGIME_CONFIGS, ids=[cases.preset_id(p, o) for p, o, _ in REGIME_CONFIGS])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_regimes_large_label_space(monkeypatch, regime, dtype, preset, overrides, _):
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = _case("gpu_regime", preset, overrides, B=300, d=200, L=1500, density=0.004, dtype=dtype, device="cuda")
    assert_backend_matches("triton", case, check_none=False, **GPU_DTYPES[dtype])


GPU_CLOSED_CONFIGS = [c for c in CLOSED_CONFIGS if c[:2] in (("mulsupcon", {}), ("proto", {}), ("reg_noreg", {}),
                                                               ("reg", {}), ("reg", {"beta": 0.1}),
                                                               ("reg", {"prototype_mode": "none"}))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("preset,overrides,_", GPU_CLOSED_CONFIGS,
                         ids=[cases.preset_id(p, o) for p, o, _ in GPU_CLOSED_CONFIGS])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_closed_form_large_label_space(dtype, d, preset, overrides, _):
    """The closed form on the wgmma tiles (d = 128: 128-row tiles; d = 256 resident), L = 1500."""
    case = _case("gpu_closed", preset, overrides, B=300, V=2, d=d, L=1500, density=0.004, dtype=dtype, device="cuda")
    assert_backend_matches("triton", case, **GPU_DTYPES[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [128, 256])
@pytest.mark.parametrize("preset", ["reg", "mulsupcon"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_symmetric_backward(monkeypatch, dtype, d, preset):
    """MLCL_FAST_TRITON_GRAD=symmetric on the compiled tiles (the symmetric column kernel's own
    configuration; fp32 at d = 256 falls back to 'recompute'), L = 1500, against the reference."""
    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", "symmetric")
    case = _case("gpu_symmetric", preset, None, B=300, V=2, d=d, L=1500, density=0.004, dtype=dtype, device="cuda")
    assert_backend_matches("triton", case, **GPU_DTYPES[dtype])


def _compare_compiled_fullgraph(case, cfg, label_sets, rtol_loss: float, rtol_grad: float, backend="inductor"):
    """The backend's operators under torch.compile(fullgraph=True, backend=backend), from
    normalisation to the reduced loss (labels prepared outside): value and gradients as in eager
    mode."""
    import torch.nn.functional as F

    from mlcl_fast.triton import driver

    def loss_fn(feats, protos):
        rows = F.normalize(feats.flatten(0, 1).float(), dim=-1).to(feats.dtype)
        protos = None if protos is None else F.normalize(protos.float(), dim=-1).to(feats.dtype)
        losses, valid = driver.anchor_losses(Problem(rows, protos, label_sets, cfg, case.temperature))
        return losses.sum() / valid.sum().clamp(min=1)

    inputs = [t.detach().requires_grad_(True) for t in (case.features, case.prototypes) if t is not None]
    args = inputs + [None] * (2 - len(inputs))
    eager = loss_fn(*args)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)(*args)
    assert torch.allclose(eager, compiled, rtol=rtol_loss, atol=1e-6)
    for a, b in zip(torch.autograd.grad(eager, inputs), torch.autograd.grad(compiled, inputs)):
        assert torch.allclose(a.float(), b.float(), rtol=rtol_grad, atol=1e-6)


def _compile_case(preset):
    """(case, config, label sets) of the GPU compile tests: labels prepared outside the region."""
    from mlcl_fast import as_label_sets

    case = _case("compile", preset, None, B=128, V=2, d=64, L=12, device="cuda")
    cfg = resolve_config(case.preset, **case.overrides)
    return case, cfg, as_label_sets(case.labels, 128, case.num_labels).repeat_views(2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("preset", ["reg", "msc"])
def test_gpu_torch_compile_aot_eager(preset):
    """As test_gpu_torch_compile_fullgraph, compiled by dynamo and AOT autograd but run by eager
    kernels (backend 'aot_eager', no inductor): with the tracing itself checked on the CPU
    (bench/compile_trace.py, tests/test_compile_trace.py), this tells a failure of inductor's
    code generation from one of the traced graph."""
    _compare_compiled_fullgraph(*_compile_case(preset), rtol_loss=1e-5, rtol_grad=1e-4, backend="aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("grad_mode", ["forward", "recompute", "symmetric"])
@pytest.mark.parametrize("preset", ["reg", "supcon_any", "msc"])
def test_gpu_torch_compile_fullgraph(monkeypatch, preset, grad_mode):
    """The backend's operators under torch.compile(fullgraph=True): from normalisation to the
    reduced loss, with labels prepared outside (the public API validates inputs eagerly)."""
    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    _compare_compiled_fullgraph(*_compile_case(preset), rtol_loss=1e-5, rtol_grad=1e-4)


def _closed_gpu_case(preset, L=12):
    """A GPU case of the closed form: L=12, the columns carry few labels (no tail labels); L=300,
    reg also corrects the pairs that share labels outside the head (tail.py)."""
    case = _case("closed_gpu", preset, None, B=128, V=2, d=128, L=L, density=0.3 if L < 50 else 0.02,
                 dtype=torch.bfloat16, device="cuda")
    index = cases.to_padded(case.labels, seed=case.seed).cuda()
    return case, index


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("preset,L,grad_mode", [("reg", 12, "forward"), ("reg", 300, "forward"),
                                                ("reg_noreg", 12, "forward"), ("mulsupcon", 12, "forward"),
                                                ("reg", 300, "symmetric"), ("mulsupcon", 12, "symmetric")])
def test_gpu_closed_form_has_no_host_sync_and_replays_in_a_cuda_graph(monkeypatch, preset, L, grad_mode):
    """check_values=False with padded indices: no synchronising call (sync debug mode 'error'),
    and forward + backward captured in a CUDA graph replay to the eager values (the symmetric
    backward's gathered column list included)."""
    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)
    case, index = _closed_gpu_case(preset, L)
    feats = case.features.detach().clone().requires_grad_(True)
    protos = None if case.prototypes is None else case.prototypes.detach().clone().requires_grad_(True)
    kwargs = dict(preset=preset, num_labels=case.num_labels, label_format="indices", backend="triton",
                  check_values=False)

    def step():
        feats.grad = None
        if protos is not None:
            protos.grad = None
        loss = multilabel_contrastive_loss(feats, index, protos, **kwargs)
        loss.backward()
        return loss

    eager = step().detach().clone()
    eager_grad = feats.grad.detach().clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    feats.grad = None
    with torch.cuda.graph(graph):
        captured = multilabel_contrastive_loss(feats, index, protos, **kwargs)
        captured.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(captured, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(feats.grad, eager_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("preset,L", [("reg", 12), ("reg", 300), ("reg_noreg", 12), ("mulsupcon", 12)])
def test_gpu_closed_form_torch_compile_fullgraph(preset, L):
    """The closed form's triton_ops under torch.compile(fullgraph=True), labels prepared outside."""
    from mlcl_fast import as_label_sets

    case, index = _closed_gpu_case(preset, L)
    cfg = resolve_config(case.preset, **case.overrides)
    label_sets = as_label_sets(index, 128, case.num_labels, "indices").repeat_views(2)

    _compare_compiled_fullgraph(case, cfg, label_sets, rtol_loss=1e-4, rtol_grad=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("preset,L", [("reg", 12), ("reg", 300)])
def test_gpu_public_call_torch_compile_fullgraph_with_padded_indices(preset, L):
    """The whole public call with check_values=False and padded indices (the prologue's
    canonicaliser and normaliser, the preparation, the loss) under torch.compile(fullgraph=True):
    value and gradients as in eager mode."""
    case, index = _closed_gpu_case(preset, L)
    kwargs = dict(preset=preset, num_labels=case.num_labels, label_format="indices", backend="triton",
                  check_values=False)

    def loss_fn(feats, protos):
        return multilabel_contrastive_loss(feats, index, protos, **kwargs)

    inputs = [t.detach().clone().requires_grad_(True) for t in (case.features, case.prototypes) if t is not None]
    args = inputs + [None] * (2 - len(inputs))
    eager = loss_fn(*args)
    compiled = torch.compile(loss_fn, fullgraph=True)(*args)
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-6)  # bf16 rows: as the closed form's compile test
    for a, b in zip(torch.autograd.grad(eager, inputs), torch.autograd.grad(compiled, inputs)):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("regime", REGIMES + ("closed",))
def test_gpu_deterministic(monkeypatch, regime):
    monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    # reg at L = 100 > the 64-label head: the closed form also runs its tail kernels (tail.py).
    case = _case("determinism", "reg", None, B=512, d=128, L=100, density=0.03, device="cuda")
    runs = [cases.run_loss("triton", case) for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_memory_has_no_anchor_by_column_term():
    """|A| = |C| = 16384 rows: an fp32 |A| x |C| matrix alone would be 1 GiB."""
    case = _case("memory", "reg", {"prototype_mode": "none"}, B=16384, d=128, L=64, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    feats = case.features.detach().requires_grad_(True)
    loss = multilabel_contrastive_loss(feats, case.labels, backend="triton", num_labels=64, prototype_mode="none")
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_option_codes_have_one_definition_that_every_source_follows():
    """presets.WEIGHTING_CODES / FACTOR_CODES (positions in WEIGHTINGS / PAIR_FACTORS) are what
    the Triton launchers pass, what the kernels compare against (named constexprs, no bare
    numbers), and the order of the C++ enums and the CUDA kernels' integer codes."""
    import re
    from pathlib import Path

    from mlcl_fast import presets
    from mlcl_fast.triton import configs, tiles

    assert configs.WEIGHTING_CODES is presets.WEIGHTING_CODES and configs.FACTOR_CODES is presets.FACTOR_CODES
    assert [presets.WEIGHTING_CODES[w] for w in presets.WEIGHTINGS] == list(range(len(presets.WEIGHTINGS)))
    assert (tiles.W_ANY.value, tiles.W_ALL.value, tiles.W_LABEL.value) == \
        tuple(presets.WEIGHTING_CODES[w] for w in ("any", "all", "label"))
    assert (tiles.F_ONE.value, tiles.F_UNION.value) == tuple(presets.FACTOR_CODES[f] for f in ("one", "union"))
    root = Path(__file__).resolve().parents[1]
    options = (root / "csrc/cpu/options.h").read_text()
    weighting_enum = re.search(r"enum class Weighting \{([^}]*)\}", options).group(1)
    factor_enum = re.search(r"enum class PairFactor \{([^}]*)\}", options).group(1)
    assert [n.strip().lower() for n in weighting_enum.split(",")] == list(presets.WEIGHTINGS)
    assert [n.strip().lower() for n in factor_enum.split(",")] == list(presets.PAIR_FACTORS)
    cuda = (root / "csrc/cpu/block_math.h").read_text()
    for prefix, codes in (("kWeight", presets.WEIGHTING_CODES), ("kFactor", presets.FACTOR_CODES)):
        found = {m.group(1).lower(): int(m.group(2)) for m in re.finditer(prefix + r"(\w+) = (\d+)", cuda)}
        assert found == codes, (prefix, found)
    # The kernels compare option constexprs only with named codes.
    for module in ("tiles.py", "forward.py", "backward.py"):
        text = (root / "mlcl_fast/triton" / module).read_text()
        assert not re.search(r"\b(WEIGHTING|FACTOR) [!=]= \d", text), module


@cpu_only
@pytest.mark.parametrize("preset,L", [("reg_noreg", 300), ("reg", 20), ("reg", 300), ("mulsupcon", 50)])
def test_public_call_without_value_checks_makes_no_host_sync(preset, L):
    """multilabel_contrastive_loss(..., check_values=False) with padded indices: the whole call,
    from canonicalising the labels to the backward, under FakeTensorMode (kernels recorded, not
    run). With the value checks on, the same call does read values on the host."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from mlcl_fast.triton import recording

    gen = torch.Generator().manual_seed(fresh_seed("api_fake", preset))
    B, V, d = 12, 2, 16
    index = torch.randint(-1, L, (B, 5), generator=gen)
    protos = torch.randn(L, d, generator=gen) if cases.uses_prototypes(preset) else None
    launched = []
    kwargs = dict(preset=preset, num_labels=L, label_format="indices", backend="triton")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        feats = mode.from_tensor(torch.randn(B, V, d, generator=gen)).requires_grad_(True)
        p = None if protos is None else mode.from_tensor(protos).requires_grad_(True)
        with recording.recording(lambda kernel, grid, args, meta: launched.append(kernel.__name__)):
            loss = multilabel_contrastive_loss(feats, index, p, check_values=False, **kwargs)
            loss.backward()
            assert feats.grad.shape == feats.shape
            with pytest.raises(DataDependentOutputException):
                multilabel_contrastive_loss(feats, index, p, **kwargs)
    assert launched[0] == "prologue_kernel" and "stats_kernel" in launched and "cols_free_kernel" in launched


def test_padded_indices_canonicalised_on_the_device_match_the_host_path():
    from mlcl_fast.labels import as_label_sets

    gen = torch.Generator().manual_seed(fresh_seed("device_labels"))
    for _ in range(5):
        raw = torch.randint(-1, 9, (7, 6), generator=gen)
        raw[2] = -1                  # an empty row
        raw[3, :3] = raw[3, 0]       # repeats
        host = as_label_sets(raw, 7, 9, "indices")
        dev = as_label_sets(raw, 7, 9, "indices", check_values=False)
        assert torch.equal(dev.count, host.count) and dev.num_labels == 9 and dev.width == 6
        assert torch.equal(dev.index[:, :host.width], host.index) and bool((dev.index[:, host.width:] == -1).all())
    with pytest.raises(RuntimeError, match="num_labels"):
        as_label_sets(torch.tensor([[0, 9]]), 1, 9, "indices", check_values=False)  # the device assertion
    with pytest.raises(ValueError, match="check_values"):
        as_label_sets(torch.ones(2, 9, dtype=torch.bool), 2, 9, "dense", check_values=False)
    with pytest.raises(ValueError, match="check_values"):
        as_label_sets(torch.tensor([[0, 1]]), 1, None, "indices", check_values=False)


@cpu_only
@pytest.mark.parametrize("grad_mode,d", [("forward", 10), ("recompute", 10), ("symmetric", 10), ("recompute", 20)])
def test_closed_form_takes_any_number_of_tail_pairs(monkeypatch, grad_mode, d):
    """reg with labels outside the head: the closed form whatever the number of pairs sharing a
    tail label (its tail kernels keep no list: nothing to count or size), and the tail kernels
    contribute (their value is not 0 on this case: near-duplicate rows sharing tail labels),
    matching the reference and the fp64 oracle; the anchor-row gradient of those pairs comes from
    the forward (G = 1, scaled) or from the backward (MLCL_FAST_TRITON_GRAD=recompute). d = 10
    fits one feature block (the tail programs load each gathered row once, WHOLE); d = 20 takes
    two 16-wide blocks under the interpreter (chunked: as d > 256 on a GPU), with 'recompute',
    whose backward runs both tail kernels' chunked gradients."""
    from mlcl_fast.triton import configs, prep, tail

    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", grad_mode)

    monkeypatch.setattr(configs, "HEAD_LABELS", 16)
    monkeypatch.setattr(configs, "HEAD_LABELS_WIDE", 16)
    case = _shared_tail_case(d=d)
    # Near-duplicate rows: p_ij well above w_ij, so the tail labels change r on their pairs.
    gen = torch.Generator().manual_seed(case.seed)
    case.features[1:4] = case.features[0] + 0.01 * torch.randn(3, case.features.shape[1], generator=gen)
    case = cases.replace(case, temperature=0.05)
    calls, changes, blocks = [], [], []
    original, original_tail = prep.prepare, tail.add_anchor_terms

    def spy(*args, **kwargs):
        before = None if kwargs.get("value") is None else kwargs["value"].clone()
        original_tail(*args, **kwargs)
        if before is not None:
            changes.append(float((kwargs["value"] - before).abs().max()))
        blocks.append(configs.block_width(d, tail.TAIL_MAX_CHUNK, True) >= d)

    monkeypatch.setattr(prep, "prepare", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(tail, "add_anchor_terms", spy)
    assert_backend_matches("triton", case, **FP32)
    assert calls, "the closed form"
    assert changes and all(c > 0 for c in changes), "the tail kernels corrected some pair's value"
    assert set(blocks) == {d <= 16}, "the whole-row and the chunked tail programs are both covered"


def test_positive_triples_leave_out_the_head():
    """positive_triples(..., skip_most_frequent) counts the triples of anchor labels outside the
    head (ties to the smaller label, as the closed form and the pairs regime choose their heads):
    the exact length of the pairs regime's list."""
    from mlcl_fast.triton import labels as tl_labels

    gen = torch.Generator().manual_seed(fresh_seed("tail_count"))
    a_index = torch.randint(-1, 40, (30, 4), generator=gen)
    c_index = torch.randint(-1, 40, (50, 3), generator=gen)
    sets = [LabelSets(x, (x >= 0).sum(1), 40) for x in (a_index, c_index)]
    count = tl_labels.positive_triples(sets[0], sets[1], 5, skip_most_frequent=16)
    freq = torch.bincount(c_index[5:][c_index[5:] >= 0], minlength=40).tolist()
    head = sorted(range(40), key=lambda lab: (-freq[lab], lab))[:16]
    expected = sum(freq[lab] for lab in a_index.flatten().tolist() if lab >= 0 and lab not in head)
    assert count == expected and count > 0
    ties = torch.tensor([3, 5, 5, 1, 5])
    assert tl_labels.most_frequent(ties, 2).tolist() == [1, 2]


def _shared_tail_case(B=12, L=28, d=10):
    """Rows whose pairs share several labels outside a 16-label head (labels 0..15 in most rows,
    16..21 in many): a pair is listed once per tail label it shares."""
    case = _case("shared_tail", "reg", None, B=B, d=d, L=L, density=0.1)
    gen = torch.Generator().manual_seed(case.seed)
    case.labels[:, :16] = torch.rand(B, 16, generator=gen) < 0.85
    case.labels[:, 16:22] = torch.rand(B, 6, generator=gen) < 0.5
    return case


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("reg", {"beta": 0.0}), ("reg", {"beta": 0.3}),
                                              ("mulsupcon", {"reg": True, "beta": 0.5}), ("proto", {"reg": True})],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_closed_form_tail_pairs_across_options(monkeypatch, preset, overrides):
    """The tail kernels where the sample columns leave the softmax (beta = 0: the anchors' own
    columns out of range), weigh in with log beta, or are the only columns (no prototypes), on
    near-duplicate rows (non-zero corrections), against the reference and the fp64 oracle."""
    from mlcl_fast.triton import configs

    monkeypatch.setattr(configs, "HEAD_LABELS", 16)
    monkeypatch.setattr(configs, "HEAD_LABELS_WIDE", 16)
    case = _shared_tail_case(B=10, L=24)
    gen = torch.Generator().manual_seed(case.seed + 1)
    case.features[2:5] = case.features[1] + 0.02 * torch.randn(3, case.features.shape[1], generator=gen)
    case = cases.replace(case, preset=preset, overrides=overrides, temperature=0.05,
                         prototypes=case.prototypes if cases.uses_prototypes(preset, overrides) else None)
    assert_backend_matches("triton", case, **FP32)


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("mulsupcon", {"reg": True})])
def test_closed_form_tail_pairs_sharing_several_tail_labels(monkeypatch, preset, overrides):
    """The regulariser's tail pairs (several shared tail labels per pair: each pair corrected once)
    against the reference and the fp64 brute force, with and without check_values: the same values."""
    from mlcl_fast.triton import closed, configs

    monkeypatch.setattr(configs, "HEAD_LABELS", 16)
    monkeypatch.setattr(configs, "HEAD_LABELS_WIDE", 16)
    case = _shared_tail_case()
    case = cases.replace(case, preset=preset, overrides=overrides,
                         prototypes=case.prototypes if cases.uses_prototypes(preset, overrides) else None)
    assert_backend_matches("triton", case, **FP32)
    index = cases.to_padded(case.labels, seed=case.seed)
    assert closed.has_tail(index, case.num_labels, 10)
    runs = []
    for check in (True, False):
        feats = case.features.detach().clone().requires_grad_(True)
        protos = None if case.prototypes is None else case.prototypes.detach().clone().requires_grad_(True)
        loss = multilabel_contrastive_loss(feats, index, protos, preset=preset, num_labels=case.num_labels,
                                           label_format="indices", backend="triton", check_values=check,
                                           temperature=case.temperature, **overrides)
        loss.backward()
        runs.append((loss.detach(), feats.grad, None if protos is None else protos.grad))
    for a, b in zip(*runs):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@cpu_only
@pytest.mark.parametrize("col_lo,L,hb,padding", [(0, 40, 16, True), (5, 40, 16, True), (0, 9, 16, True),
                                                 (3, 200, 32, True), (0, 40, 16, False)],
                         ids=["all_columns", "beta0", "fewer_labels_than_head", "wide", "no_padding"])
def test_closed_form_preparation_kernels_match_a_plain_definition(col_lo, L, hb, padding, monkeypatch):
    """prep.prepare (three kernels, seven library calls) against the definitions written out in
    Python: compact label index, u, W, ubar, head tiles (ties to the smaller label), tail part,
    visiting order, the slots grouped by label, and the label sums E_k. Its first kernel writes
    the shared label index's sort keys (mlcl_fast.label_index.slot_keys), and its compact index
    is that index without the labels no softmax column carries."""
    from mlcl_fast import label_index
    from mlcl_fast.triton import prep

    sorted_keys = []
    original_sort = label_index.sort_slots
    monkeypatch.setattr(label_index, "sort_slots", lambda keys: sorted_keys.append(keys) or original_sort(keys))

    gen = torch.Generator().manual_seed(fresh_seed("prep", col_lo, L, hb))
    M, C, ka, kc = 11, 17, 4, 3
    a_index = torch.randint(-1, L, (M, ka), generator=gen)
    c_index = torch.randint(-1, L, (C, kc), generator=gen)
    c_index[::4, 0] = c_index[1, 1]            # ties and a frequent label
    if not padding:  # every column slot carries a label: no padding run after the labels' runs
        c_index = c_index.clamp(min=0)
    a_count = (a_index >= 0).sum(1).to(torch.int32)
    self_col = torch.randperm(C, generator=gen)[:M].to(torch.int32)
    k = torch.randn(C, 6, generator=gen)
    pre = prep.prepare(a_index, a_count, c_index, self_col, col_lo, L, hb, k, True, None)
    assert len(sorted_keys) == 1 and torch.equal(sorted_keys[0], label_index.slot_keys(c_index, L, col_lo))

    carried = {}
    for j in range(col_lo, C):
        for lab in c_index[j].tolist():
            if lab >= 0:
                carried.setdefault(lab, []).append(j)
    labels = sorted(carried)
    cid = {lab: n for n, lab in enumerate(labels)}
    U = max(1, min(L, C * kc))
    cnt = [len(carried[lab]) for lab in labels] + [0] * (U - len(labels))
    # the label sums E_k of the same launch: the carrying columns' rows, 0 past the carried labels
    expect_e = torch.zeros(U, k.shape[1])
    for lab in labels:
        expect_e[cid[lab]] = k[carried[lab]].sum(0)
    torch.testing.assert_close(pre.e, expect_e, rtol=1e-6, atol=1e-6)
    ptr = [0]
    for n in range(U):
        ptr.append(ptr[-1] + cnt[n])
    assert pre.col_ptr.tolist() == ptr
    flat_cols = [j for lab in labels for j in sorted(carried[lab])]
    assert pre.col_sorted.tolist() == flat_cols + [-1] * (C * kc - len(flat_cols))
    shared = label_index.column_label_index(c_index, L, col_lo)
    carried_ids = torch.nonzero(shared.ptr.diff()).flatten()
    assert carried_ids.tolist() == labels
    assert pre.col_sorted[:len(flat_cols)].tolist() == shared.cols[:int(shared.ptr[-1])].tolist()
    assert pre.col_ptr[1:len(labels) + 1].tolist() == shared.ptr[carried_ids + 1].tolist()
    expect_ccid = [[cid[lab] if lab >= 0 and j >= col_lo else -1 for lab in c_index[j].tolist()] for j in range(C)]
    assert pre.col_cid.tolist() == expect_ccid
    assert pre.a_cid.tolist() == [[cid.get(lab, -1) if lab >= 0 else -1 for lab in row] for row in a_index.tolist()]
    head = sorted(range(U), key=lambda n: (-cnt[n], n))[:min(hb, U)]
    for i in range(M):
        own = int(self_col[i]) >= col_lo
        a = max(int(a_count[i]), 1)
        u, uh, positives = [], [0.0] * hb, 0
        for lab in a_index[i].tolist():
            n = cid.get(lab, -1) if lab >= 0 else -1
            z = cnt[n] - own if n >= 0 else 0
            u.append(1.0 / (a * z) if z > 0 else 0.0)
            positives += z > 0
            if n in head:
                uh[head.index(n)] += u[-1]
        tail = [w if (cid.get(lab, -1) if lab >= 0 else -1) not in head else 0.0
                for w, lab in zip(u, a_index[i].tolist())]
        torch.testing.assert_close(pre.u[i], torch.tensor(u), rtol=1e-6, atol=0)
        torch.testing.assert_close(pre.u_tail[i], torch.tensor(tail), rtol=1e-6, atol=0)
        assert pre.w_tot[i].item() == pytest.approx(positives / a, rel=1e-6)
        assert pre.ubar[i].item() == pytest.approx(sum(u) if own else 0.0, rel=1e-6, abs=0)
        assert pre.ubar_tail[i].item() == pytest.approx(sum(tail) if own else 0.0, rel=1e-6, abs=1e-12)
        scale = max(uh) if max(uh) > 0 else 1.0
        assert pre.row_scale[i].item() == pytest.approx(scale, rel=1e-6)
        parts = pre.head_u[i].float()
        torch.testing.assert_close(parts[:hb] + parts[hb:], torch.tensor(uh) / scale, rtol=1e-6, atol=1e-7)
    expect_y = [[1.0 if h < len(head) and head[h] in expect_ccid[j] else 0.0 for h in range(hb)] for j in range(C)]
    assert pre.head_y.float().tolist() == expect_y
    valid = [i for i in range(M) if pre.w_tot[i] > 0]
    assert pre.order.tolist() == valid + [i for i in range(M) if i not in valid] and pre.live.tolist() == [len(valid)]
    slots = sorted((pre.a_cid.flatten()[s].item(), s // ka, s) for s in range(M * ka) if pre.a_cid.flatten()[s] >= 0)
    # the slots by compact label, each label's in slot order, then the padding slots in order
    padding = [s for s in range(M * ka) if pre.a_cid.flatten()[s] < 0]
    assert pre.slot_sorted.tolist() == [s for _, _, s in slots] + padding
    owner = [-1] * C
    for i, j in enumerate(self_col.tolist()):
        owner[j] = i
    assert pre.col_owner.tolist() == owner
    assert pre.slot_ptr.tolist() == [sum(1 for n, _, _ in slots if n < b) for b in range(U + 1)]


@cpu_only
@pytest.mark.parametrize("preset,overrides", [("reg", {}), ("reg", {"beta": 0.3}), ("reg_noreg", {}),
                                              ("mulsupcon", {"reg": True}), ("proto", {"reg": True}),
                                              ("proto", {"beta": 0.5}), ("reg", {"beta": 0.0})])
@pytest.mark.parametrize("L", [6, 40])
def test_symmetric_backward(monkeypatch, preset, overrides, L):
    """MLCL_FAST_TRITON_GRAD=symmetric: the closed form's column sweep also gives the anchor rows
    owning the swept columns their gradient (cols_free_kernel with SYM), and the anchor rows sweep
    only the columns that no anchor with a positive owns (rows_kernel with GATHER: prototypes of
    absent labels at L = 40). Near-duplicate rows at a small temperature make the regulariser
    active on head pairs. beta = 0 (proto's default) leaves the sample columns out of every
    softmax, so the symmetric sweep does not apply and the backward is 'recompute'."""
    from mlcl_fast.triton import recording

    monkeypatch.setenv("MLCL_FAST_TRITON_GRAD", "symmetric")
    case = _case("sym", preset, overrides, B=10, d=12, L=L, temperature=0.05)
    gen = torch.Generator().manual_seed(case.seed)
    case.features[1:4] = case.features[0] + 0.01 * torch.randn(3, *case.features.shape[1:], generator=gen)
    case.labels[1:4] = case.labels[0]
    launched, run = [], recording.launch

    def observe(kernel, grid, args, meta, wrap=None):
        launched.append((kernel.__name__, meta))
        run(kernel, grid, args, meta, wrap)

    monkeypatch.setattr(recording, "launch", observe)
    assert_backend_matches("triton", case, **FP32)
    sym = [m.get("SYM") for name, m in launched if name == "cols_free_kernel"]
    gather = [m.get("GATHER") for name, m in launched if name == "rows_kernel" and m.get("GRAD")]
    applies = resolve_config(preset, **overrides).beta != 0.0  # proto: beta = 0 by default
    assert sym and all(s == applies for s in sym), launched
    assert gather and all(g == applies for g in gather), launched


@cpu_only
@pytest.mark.parametrize("sample_anchors,prototype_anchors", [((3, 7), (2, 5)), ((0, 0), (1, 6)), ((0, 9), (0, 6)),
                                                              ((4, 9), (0, 6))])
def test_joint_columns_give_the_same_embeddings(sample_anchors, prototype_anchors):
    """A Problem whose columns come from the backend's joint normaliser (one stacked tensor) gives
    the same anchor rows and columns as one built from separate tensors, for any anchor ranges."""
    from mlcl_fast.inputs import prepare
    from mlcl_fast.triton import normalize

    case = _case("joint_columns", "reg", None, B=9, d=7, L=6)
    cfg = resolve_config("reg")
    joint = prepare(case.features, case.labels, case.prototypes, cfg, case.temperature, unit_rows=normalize.unit_rows)
    assert joint.columns is not None
    plain = Problem(joint.samples.clone(), joint.prototypes.clone(), joint.labels, cfg, joint.temperature,
                    sample_anchors, prototype_anchors)
    ranged = Problem(joint.samples, joint.prototypes, joint.labels, cfg, joint.temperature, sample_anchors,
                     prototype_anchors, columns=joint.columns)
    for a, b in zip(ranged.embeddings(), plain.embeddings()):
        assert torch.equal(a, b)
