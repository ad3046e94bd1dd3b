"""Every accepted label form gives the same loss; views are rows carrying their sample's labels."""
from __future__ import annotations

import pytest
import torch

import mlcl_fast
from cases import fresh_seed, label_forms, random_case, run_loss, to_padded

pytestmark = pytest.mark.usefixtures("single_thread")

FORM_PRESETS = [("reg", {}), ("msc", {}), ("mulsupcon", {}), ("supcon_all", {}), ("jaccard", {"reg": True})]
FORMS = list(label_forms(torch.eye(3, dtype=torch.bool)))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("preset,overrides", FORM_PRESETS, ids=[p for p, _ in FORM_PRESETS])
def test_label_forms_identical_loss(preset, overrides, form):
    seed = fresh_seed("forms", preset, form)
    case = random_case(seed, preset, overrides, B=7, V=2, d=5, L=6, empty_rows=2)
    case.labels[:, -1] = False  # the last label unused: L must still come from the prototypes / num_labels
    labels = label_forms(case.labels, seed)[form]
    weights = torch.rand(7 * 2 + (6 if preset.startswith("reg") else 0), dtype=torch.float64)
    expected = run_loss("reference", case)
    got = run_loss("reference", case, labels=labels)
    expected_none = run_loss("reference", case, reduction="none", weights=weights)
    got_none = run_loss("reference", case, labels=labels, reduction="none", weights=weights)
    for e, g in zip(expected + expected_none, got + got_none):
        assert (e is None and g is None) or torch.equal(e, g), form


@pytest.mark.parametrize("form", FORMS)
def test_label_forms_canonical(form):
    labels = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    sets = mlcl_fast.as_label_sets(label_forms(labels, 3)[form], 4, 5)
    assert sets.index.dtype == torch.int64 and sets.num_labels == 5
    assert sets.index.tolist() == [[1, 3, 4], [-1, -1, -1], [0, -1, -1], [2, 4, -1]]
    assert sets.count.tolist() == [3, 0, 1, 2]
    assert torch.equal(sets.dense(), labels)


def test_padded_indices_all_orders():
    """Duplicates, any order, -1 anywhere (also first), a row of only padding."""
    labels = torch.tensor([[-1, 4, 2, 4, -1, 2], [-1, -1, -1, -1, -1, -1], [0, -1, 0, 0, 3, 1]])
    sets = mlcl_fast.as_label_sets(labels, 3, 6)
    assert sets.index.tolist() == [[2, 4, -1], [-1, -1, -1], [0, 1, 3]]
    assert sets.count.tolist() == [2, 0, 3]
    assert sets.dense().tolist() == [[False, False, True, False, True, False], [False] * 6,
                                     [True, True, False, True, False, False]]


def test_padded_indices_without_padding_need_label_format():
    """A [B, K] integer matrix of 0/1 indices without -1 reads as multi-hot unless told otherwise."""
    idx = torch.tensor([[0, 1], [1, 1], [0, 0]])
    assert mlcl_fast.as_label_sets(idx, 3).dense().tolist() == [[False, True], [True, True], [False, False]]
    as_indices = mlcl_fast.as_label_sets(idx, 3, 4, label_format="indices")
    assert as_indices.dense().tolist() == [[True, True, False, False], [False, True, False, False],
                                           [True, False, False, False]]


def test_padded_width_larger_than_label_space():
    """K may exceed L (duplicates): indices, not multi-hot, because values exceed 1."""
    case = random_case(fresh_seed("wide"), "reg", B=5, L=2)
    padded = to_padded(case.labels, 0, extra=4)
    assert padded.shape[1] > 2
    assert torch.equal(run_loss("reference", case, labels=padded)[0], run_loss("reference", case)[0])


@pytest.mark.parametrize("preset", ["reg", "supcon_any", "jaccard", "msc", "mulsupcon", "supcon_all"])
def test_views_equal_duplicated_rows(preset):
    """[B, V, d] equals [B*V, d] with each sample's labels repeated V times (row b*V + v)."""
    seed = fresh_seed("views", preset)
    V = 3
    case = random_case(seed, preset, B=5, V=V, d=4, L=4, empty_rows=1)
    flat = random_case(seed, preset, B=5, V=V, d=4, L=4, empty_rows=1)
    flat.features = case.features.reshape(5 * V, 4)
    flat.labels = case.labels.repeat_interleave(V, 0)
    views, flat_run = run_loss("reference", case), run_loss("reference", flat)
    assert torch.allclose(views[0], flat_run[0], rtol=1e-13, atol=0)
    assert torch.allclose(views[1].reshape(5 * V, 4), flat_run[1], rtol=1e-12, atol=1e-15)
    if views[2] is not None:
        assert torch.allclose(views[2], flat_run[2], rtol=1e-12, atol=1e-15)
    n_anchors = 5 * V + (4 if preset == "reg" else 0)
    weights = torch.rand(n_anchors, dtype=torch.float64)
    per_view = run_loss("reference", case, reduction="none", weights=weights)[0]
    per_row = run_loss("reference", flat, reduction="none", weights=weights)[0]
    assert torch.allclose(per_view, per_row, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("preset", ["reg", "jaccard", "mulsupcon"])
def test_views_row_order_does_not_change_the_loss(preset):
    """The same rows in v-major order (labels tiled instead of interleaved): the same mean loss,
    per-anchor losses permuted accordingly."""
    seed = fresh_seed("view-order", preset)
    B, V, d, L = 4, 2, 5, 3
    case = random_case(seed, preset, B=B, V=V, d=d, L=L)
    vmajor = random_case(seed, preset, B=B, V=V, d=d, L=L)
    vmajor.features = case.features.transpose(0, 1).reshape(V * B, d)
    vmajor.labels = case.labels.repeat(V, 1)
    assert torch.allclose(run_loss("reference", case)[0], run_loss("reference", vmajor)[0], rtol=1e-12, atol=0)
    ones = torch.ones(B * V + (L if preset == "reg" else 0), dtype=torch.float64)
    bmajor_losses = run_loss("reference", case, reduction="none", weights=ones)[0]
    vmajor_losses = run_loss("reference", vmajor, reduction="none", weights=ones)[0]
    perm = torch.arange(B * V).reshape(B, V).T.reshape(-1)  # v-major row r is b-major row perm[r]
    assert torch.allclose(vmajor_losses[: B * V], bmajor_losses[perm], rtol=1e-12, atol=1e-15)
    assert torch.allclose(vmajor_losses[B * V:], bmajor_losses[B * V:], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- hand-made LabelSets
SETS_ROWS = [[0, 2, -1], [1, -1, -1], [-1, -1, -1], [1, 2, 3]]


def _sets(rows=SETS_ROWS, count=None, num_labels=4, dtype=torch.int64) -> mlcl_fast.LabelSets:
    index = torch.tensor(rows, dtype=dtype)
    count = (index >= 0).sum(1) if count is None else torch.tensor(count)
    return mlcl_fast.LabelSets(index, count, num_labels)


def _row(r: int, row: list) -> list:
    return [row if i == r else old for i, old in enumerate(SETS_ROWS)]


# corruption: (LabelSets, the row at fault)
SPOILED_SETS = {
    "label_out_of_range": (_sets(_row(3, [1, 2, 4])), 3),
    "pad_below_minus_one": (_sets(_row(1, [1, -2, -1])), 1),
    "unsorted": (_sets(_row(0, [2, 0, -1])), 0),
    "repeated": (_sets(_row(3, [1, 1, 3])), 3),
    "pad_before_a_label": (_sets(_row(0, [-1, 0, 2])), 0),
    "count_too_high": (_sets(count=[2, 1, 1, 3]), 2),
    "count_too_low": (_sets(count=[2, 1, 0, 2]), 3),
}


@pytest.mark.parametrize("corruption", SPOILED_SETS)
def test_spoiled_label_sets_are_refused(corruption):
    """A LabelSets is checked like any other label input: on the host a ValueError naming
    `labels` and the row at fault, with check_values=False a device-side assertion (which raises
    at once on the CPU) whose message starts with `labels`."""
    sets, row = SPOILED_SETS[corruption]
    with pytest.raises(ValueError, match=rf"^labels: LabelSets row {row} has"):
        mlcl_fast.as_label_sets(sets, 4, 4)
    with pytest.raises(RuntimeError, match=r"^labels: a LabelSets row has"):
        mlcl_fast.as_label_sets(sets, 4, 4, check_values=False)


BAD_SETS_METADATA = {
    "float_index": (mlcl_fast.LabelSets(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64), 4), TypeError),
    "float_count": (mlcl_fast.LabelSets(_sets().index, _sets().count.float(), 4), TypeError),
    "index_1d": (mlcl_fast.LabelSets(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 4),
                 ValueError),
    "count_shape": (mlcl_fast.LabelSets(_sets().index, _sets().count[:3], 4), ValueError),
    "count_device": (mlcl_fast.LabelSets(_sets().index, _sets().count.to("meta"), 4), ValueError),
    "num_labels_negative": (mlcl_fast.LabelSets(_sets().index, _sets().count, -1), ValueError),
    "index_not_a_tensor": (mlcl_fast.LabelSets(SETS_ROWS, _sets().count, 4), TypeError),
}


@pytest.mark.parametrize("name", BAD_SETS_METADATA)
def test_label_sets_metadata_is_checked(name):
    sets, error = BAD_SETS_METADATA[name]
    for check_values in (True, False):
        with pytest.raises(error, match=r"^labels\b"):
            mlcl_fast.as_label_sets(sets, 4, check_values=check_values)


def test_valid_label_sets_are_read_as_int64():
    """A canonical LabelSets passes both ways and comes back as contiguous int64 (what the fused
    backends read), whatever integer dtype it was made with; empty label spaces and rows too."""
    for check_values in (True, False):
        out = mlcl_fast.as_label_sets(_sets(dtype=torch.int32), 4, 4, check_values=check_values)
        assert out.index.dtype == out.count.dtype == torch.int64 and out.index.is_contiguous()
        assert out.index.tolist() == SETS_ROWS and out.count.tolist() == [2, 1, 0, 3]
        empty = mlcl_fast.as_label_sets(_sets([[-1], [-1]], num_labels=0), 2, check_values=check_values)
        assert empty.count.tolist() == [0, 0]
