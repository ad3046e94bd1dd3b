"""The columns' inverted label index (mlcl_fast/label_index.py): the one implementation that the
Triton backend and the C++/CUDA ops' blocked algorithm share. Against a brute-force definition,
without host synchronisation (it runs on fake tensors), and as the operator the C++ blocked
forward calls (its label preparation begins with it)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cases import fresh_seed
from mlcl_fast import label_index
from mlcl_fast.labels import LabelSets, as_label_sets
from mlcl_fast.backends import native_ops


def _labels(seed_key, C: int, L: int, density: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(fresh_seed("label_index", seed_key))
    dense = torch.rand(C, L, generator=gen) < density
    dense[C // 2] = False  # a column without labels
    return as_label_sets(dense, C, L).concat(LabelSets.singletons(L)).index


def _brute_force(col_labels: torch.Tensor, L: int, col_lo: int):
    ptr, cols = [0], []
    for k in range(L):
        carrying = [j for j in range(col_lo, col_labels.shape[0]) if k in col_labels[j].tolist()]
        cols += carrying
        ptr.append(len(cols))
    return ptr, cols


@pytest.mark.parametrize("col_lo", [0, 1, 9])
@pytest.mark.parametrize("L,density", [(1, 0.9), (7, 0.3), (40, 0.1)])
def test_matches_the_definition(col_lo, L, density):
    col_labels = _labels((col_lo, L), 12, L, density)
    index = label_index.column_label_index(col_labels, L, col_lo)
    ptr, cols = _brute_force(col_labels, L, col_lo)
    assert index.ptr.dtype == torch.int64 and index.cols.dtype == torch.int64
    assert index.ptr.tolist() == ptr
    assert index.cols[:ptr[-1]].tolist() == cols
    # the entries past ptr[L] are the padding slots' (and the left-out columns'), all of them
    assert index.cols.numel() == col_labels.numel()


def test_edge_shapes():
    no_slots = torch.full((4, 0), -1, dtype=torch.int64)
    index = label_index.column_label_index(no_slots, 3)
    assert index.ptr.tolist() == [0, 0, 0, 0] and index.cols.numel() == 0
    no_columns = torch.empty(0, 2, dtype=torch.int64)
    assert label_index.column_label_index(no_columns, 2).ptr.tolist() == [0, 0, 0]
    only_padding = torch.full((3, 2), -1)
    index = label_index.column_label_index(only_padding, 2)
    assert index.ptr.tolist() == [0, 0, 0] and index.cols.tolist() == [0, 0, 1, 1, 2, 2]
    assert label_index.column_label_index(torch.tensor([[0, 1]]), 2, col_lo=1).ptr.tolist() == [0, 0, 0]


def test_key_type():
    """32-bit keys while the labels and the padding key fit, 64-bit past them."""
    assert label_index.key_dtype(10**6) == torch.int32
    assert label_index.key_dtype(2**31 - 2) == torch.int32
    assert label_index.key_dtype(2**31 - 1) == torch.int64
    keys = label_index.slot_keys(torch.tensor([[3, -1], [0, 2]]), 5, col_lo=1)
    assert keys.dtype == torch.int32 and keys.tolist() == [5, 5, 0, 2]


def test_static_shapes_without_host_reads():
    """Every output's shape follows from the input shapes and no value is read on the host: the
    function runs on fake tensors (a data-dependent step would raise there)."""
    real = _labels("fake", 9, 6, 0.4)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        index = label_index.column_label_index(fake, 6, col_lo=2)
    assert tuple(index.ptr.shape) == (7,) and tuple(index.cols.shape) == (fake.numel(),)


needs_ops = pytest.mark.skipif(not native_ops.OPS_PRESENT, reason="mlcl_fast._C not built")


@needs_ops
def test_the_operator_is_the_function():
    col_labels = _labels("op", 10, 8, 0.3)
    op = torch.ops.mlcl_fast.column_label_index(col_labels, 8, 3)
    expect = label_index.column_label_index(col_labels, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(op, expect))
    torch.library.opcheck(torch.ops.mlcl_fast.column_label_index.default, (col_labels, 8, 3),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ops
def test_the_blocked_forward_prepares_its_labels_with_it(monkeypatch):
    """The C++ blocked forward (CUDA's algorithm, here on the CPU) calls the Python
    implementation through the operator, and its label preparation is [ptr | cols | row counts |
    column counts | row labels] in int32 with that index at its head."""
    from mlcl_fast.backends.native_ops import op_inputs
    from mlcl_fast.inputs import prepare
    from mlcl_fast.presets import resolve_config

    monkeypatch.setenv("MLCL_FAST_CPU_ALGORITHM", "blocked")
    calls = []
    original = label_index.column_label_index

    def counted(*args):
        calls.append(args[1:])
        return original(*args)

    monkeypatch.setattr(label_index, "column_label_index", counted)
    L = 6
    gen = torch.Generator().manual_seed(fresh_seed("label_index_blocked"))
    labels = torch.rand(10, L, generator=gen) < 0.4
    problem = prepare(torch.randn(10, 5, generator=gen), labels, torch.randn(L, 5, generator=gen), resolve_config("reg"), 0.1)
    args = op_inputs(problem)
    rows, cols, row_labels, col_labels = args[:4]
    prep = torch.ops.mlcl_fast.anchor_loss_forward(*args)[5]
    assert calls == [(L, 0)]
    index = original(col_labels, L)
    R, C = rows.shape[0], cols.shape[0]
    expect = torch.cat([index.ptr, index.cols, (row_labels >= 0).sum(1), (col_labels >= 0).sum(1),
                        row_labels.reshape(-1)]).int()
    assert prep.numel() == L + 1 + col_labels.numel() + R + C + row_labels.numel()
    assert torch.equal(prep, expect)


@needs_ops
@pytest.mark.parametrize("args,message", [
    ((torch.tensor([0, 1]), 3), "col_labels: expected a 2-D"),
    ((torch.tensor([[0.0, 1.0]]), 3), "col_labels: expected a 2-D int32 or int64"),
    ((torch.tensor([[0, 1]]), -1), "num_labels: expected >= 0"),
    ((torch.tensor([[0, 1]]), 3, 2), r"col_lo: expected a column in \[0, 1\]"),
    ((torch.tensor([[0, 1]]), 3, -1), "col_lo"),
    ((torch.tensor([[0, 3]]), 3), "col_labels: expected canonical"),
    ((torch.tensor([[0, -2]]), 3), "col_labels: expected canonical"),
    ((torch.tensor([[2, 1]]), 3), "col_labels: expected canonical"),
    ((torch.tensor([[1, 1]]), 3), "col_labels: expected canonical"),
    ((torch.tensor([[-1, 1]]), 3), "col_labels: expected canonical"),
], ids=["1d", "float", "num_labels", "col_lo_past", "col_lo_negative", "too_large", "below_padding",
        "descending", "repeat", "padding_first"])
def test_the_operator_names_a_bad_argument(args, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        torch.ops.mlcl_fast.column_label_index(*args)
    assert torch.ops.mlcl_fast.column_label_index(torch.tensor([[0, 2], [1, -1]]), 3)[0].tolist() == [0, 1, 2, 3]


@needs_ops
def test_check_values_false_skips_only_the_value_assertion():
    """check_values=False (what the blocked ops pass, having checked the labels themselves) leaves
    out the device-side assertion, not the argument checks."""
    bad_values = torch.tensor([[2, 1]])
    ptr, _ = torch.ops.mlcl_fast.column_label_index(bad_values, 3, 0, False)  # not asserted
    assert ptr.shape == (4,)
    with pytest.raises(ValueError, match="num_labels"):
        torch.ops.mlcl_fast.column_label_index(bad_values, -1, 0, False)
