"""Argument checks of the Triton backend (kernels under the Triton interpreter, as in
tests/test_triton.py, which explains the TRITON_INTERPRET setting below).

- Every custom operator (dense, closed-form and pair-list forwards and backwards)
  refuses each bad argument with an error whose message starts with the argument's name: wrong
  dtype, shape, device or strides of every tensor, an out-of-range value of every scalar
  (checked on the host), and out-of-range or non-canonical values of the index tensors (device-side
  assertions, which raise at once on the CPU). The valid arguments are those the public call
  hands to the operators, recorded on the way.
- A corrupt hand-made LabelSets gives one error, the same on every backend.
- bfloat16 features under the interpreter (whose bf16 tl.dot is broken) match the reference.
"""
from __future__ import annotations

import importlib
import math
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import cases  # noqa: E402
from cases import assert_backend_matches, fresh_seed, random_case  # noqa: E402

pytest.importorskip("triton")

from mlcl_fast import LabelSets, as_label_sets, multilabel_contrastive_loss  # noqa: E402
from mlcl_fast.backends import available_backends  # noqa: E402
from mlcl_fast.backends import triton as backend  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(HAS_CUDA or not backend.kernels_interpreted(),
                                 reason="interpreter tests run where there is no CUDA, in a process whose triton "
                                        "was first imported with TRITON_INTERPRET=1")]

# ------------------------------------------------------------------------ the operators' arguments
# (module attribute holding the operator, recording configuration); the backward operators are
# called by the forwards' autograd registrations through the same module attributes.
OPS = {
    "dense_forward": ("ops", "bits"), "dense_backward": ("ops", "bits"),
    "closed_forward": ("closed", "closed"), "closed_backward": ("closed", "closed"),
    "pairs_forward": ("pairs", "pairs"), "pairs_backward": ("pairs", "pairs"),
}
# (preset, forced regime) of the public calls whose operator arguments are recorded. "closed": reg
# over 20 labels with a 16-label head, so the regulariser also takes the tail kernels; "pairs":
# jaccard with a 2-label head, so pairs sharing one of the other labels are listed.
CONFIGS = {"bits": ("supcon_any", "bits"), "list": ("supcon_any", "list"), "dense": ("msc", "dense"),
           "closed": ("reg", None), "pairs": ("jaccard", "pairs")}


def _module(name: str):
    return importlib.import_module(f"mlcl_fast.triton.{name}")


def _op(name: str):
    return getattr(_module(OPS[name][0]), name)


# Each operator's arguments as registered: (name, type: 'Tensor', 'int', 'float', 'bool' or 'str').
SCHEMAS = {name: [(a.name, str(a.type)) for a in _op(name)._opoverload._schema.arguments] for name in OPS}


def _by_name(name: str, args: tuple, kwargs: dict) -> dict:
    return {**dict(zip([n for n, _ in SCHEMAS[name]], args)), **kwargs}


@pytest.fixture(scope="module")
def recorded() -> dict:
    """From one public forward + backward per configuration (small shapes: the interpreter is
    slow): "args", {(operator, configuration): its arguments by name}; "value_checks", the
    arguments whose values the operators checked on the way (device operations, which the public
    call should not issue again for values mlcl_fast.labels checked)."""
    from mlcl_fast.triton import checks, configs

    out, value_checks = {}, []
    for config, (preset, regime) in CONFIGS.items():
        with pytest.MonkeyPatch.context() as mp:
            assert_values = checks.Arguments.assert_values
            mp.setattr(checks.Arguments, "assert_values",
                       lambda self, name, *rest: value_checks.append(name) or assert_values(self, name, *rest))
            mp.setattr(configs, "HEAD_LABELS", 16)
            mp.setattr(configs, "HEAD_LABELS_WIDE", 16)
            mp.setattr(configs, "PAIRS_HEAD_LABELS", 2)  # the pairs regime's head and tail both used
            mp.delenv("MLCL_FAST_TRITON_GRAD", raising=False)
            if regime is None:
                mp.delenv("MLCL_FAST_TRITON_LABELS", raising=False)
            else:
                mp.setenv("MLCL_FAST_TRITON_LABELS", regime)
            for name, (module, _) in OPS.items():
                original = getattr(_module(module), name)

                def record(*args, _name=name, _original=original, **kwargs):
                    out[(_name, config)] = {key: value.detach().clone() if isinstance(value, torch.Tensor) else value
                                            for key, value in _by_name(_name, args, kwargs).items()}
                    return _original(*args, **kwargs)

                mp.setattr(_module(module), name, record)
            L = 20 if config == "closed" else 6
            case = random_case(fresh_seed("op_args", config), preset, None, B=10, d=6, L=L, density=0.3,
                               dtype=torch.float32)
            cases.run_loss("triton", case)
    return {"args": out, "value_checks": value_checks}


def _arguments(recorded, name: str, config: str | None = None) -> dict:
    """A fresh copy of the recorded arguments, with the value checks on."""
    config = config or OPS[name][1]
    assert (name, config) in recorded["args"], f"{name} was not called in configuration {config}"
    args = {key: value.clone() if isinstance(value, torch.Tensor) else value
            for key, value in recorded["args"][(name, config)].items()}
    args["validated"] = False
    return args


def _call(name: str, args: dict):
    return _op(name)(**args)


def _raises(argument: str, fn):
    """ValueError / TypeError (metadata) or RuntimeError (a device-side assertion), the message
    starting with the argument's name."""
    with pytest.raises((ValueError, TypeError, RuntimeError), match=rf"^{argument}\b"):
        fn()


@pytest.mark.parametrize("name,config", [(n, c) for n, (_, c) in OPS.items()] +
                         [("dense_forward", "list"), ("dense_forward", "dense"), ("dense_backward", "dense")])
def test_recorded_arguments_pass_every_check(recorded, name, config):
    """The arguments the public call passes pass every check, the value assertions included, and
    give the same outputs as with the checks left out: each error below comes from the one
    argument spoiled there."""
    args = _arguments(recorded, name, config)
    checked = _call(name, args)
    trusted = _call(name, dict(args, validated=True))
    for a, b in zip(checked, trusted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_public_call_leaves_the_value_checks_to_the_labels(recorded):
    """The driver and the autograd backwards pass validated=True: the public call issues no
    device operation for the operators' value checks (its labels were checked by
    mlcl_fast.labels; tests/test_triton.py counts the rest)."""
    assert {name for name, _ in recorded["args"]} == set(OPS) and recorded["value_checks"] == []


def _tensor_cases():
    for name in OPS:
        for argument, kind in SCHEMAS[name]:
            if kind == "Tensor":
                for spoil in ("dtype", "ndim", "device", "strides"):
                    if not (spoil == "strides" and argument == "live"):  # one element: strides do not matter
                        yield name, argument, spoil


def _spoil_tensor(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "dtype":  # a float where an integer is expected, float64 where a float
        return t.to(torch.float64 if t.is_floating_point() else torch.float32)
    if how == "ndim":
        return t.unsqueeze(0)
    if how == "device":  # a second device always exists: 'meta'
        return t.to("meta")
    spoiled = torch.stack([t, t], dim=-1)[..., 0]  # the same values every other element
    assert not spoiled.is_contiguous()
    return spoiled


@pytest.mark.parametrize("name,argument,how", list(_tensor_cases()))
def test_every_tensor_argument_is_checked(recorded, name, argument, how):
    """dtype, number of dimensions, device and strides of every tensor argument of every operator."""
    args = _arguments(recorded, name)
    args[argument] = _spoil_tensor(args[argument], how)
    _raises(argument, lambda: _call(name, args))


def _scalar_cases():
    for name in OPS:
        for argument, kind in SCHEMAS[name]:
            if kind in ("int", "float", "str"):
                yield name, argument


@pytest.mark.parametrize("name,argument", list(_scalar_cases()))
def test_every_scalar_argument_is_checked(recorded, name, argument):
    """Every integer argument is refused at -1 (counts, column numbers, option codes), every
    float at NaN, every string (the fp32 dot precision) at a name that is not an option."""
    args = _arguments(recorded, name)
    value = args[argument]
    args[argument] = -1 if isinstance(value, int) else ("tf16" if isinstance(value, str) else math.nan)
    _raises(argument, lambda: _call(name, args))


def _set(key: str, index, value):
    """Spoil one entry of a tensor argument; `value` may depend on the arguments (a callable)."""
    def spoil(args):
        args[key][index] = value(args) if callable(value) else value
    return spoil


def _replace(key: str, fn):
    def spoil(args):
        args[key] = fn(args)
    return spoil


def _unsort(key: str):
    """Swap the first two labels of the first row that has two: not sorted ascending."""
    def spoil(args):
        t = args[key]
        rows = torch.nonzero(t[:, 1] >= 0).flatten()
        assert rows.numel(), f"no row of {key} holds two labels"
        r = int(rows[0])
        t[r, 0], t[r, 1] = t[r, 1].clone(), t[r, 0].clone()
    return spoil


def _pad_first(key: str):
    """-1 in the first slot of the first row with two labels: padding before a label."""
    def spoil(args):
        t = args[key]
        rows = torch.nonzero(t[:, 1] >= 0).flatten()
        assert rows.numel(), f"no row of {key} holds two labels"
        t[int(rows[0]), 0] = -1
    return spoil


C = lambda args: args["k"].shape[0]  # noqa: E731
M = lambda args: args["q"].shape[0]  # noqa: E731

# (operator, configuration, argument, what is wrong, spoil(args)): the values the kernels address
# memory with, and the shapes that tie the arguments together.
VALUE_CASES = [
    ("dense_forward", "bits", "k", "fewer features", _replace("k", lambda a: a["k"][:, :-1].contiguous())),
    ("dense_forward", "bits", "self_col", "column C", _set("self_col", 0, C)),
    ("dense_forward", "bits", "self_col", "below -1", _set("self_col", 0, -2)),
    ("dense_forward", "bits", "col_lo", "past the columns", _replace("col_lo", lambda a: C(a) + 1)),
    ("dense_forward", "bits", "num_samples", "past the columns", _replace("num_samples", lambda a: C(a) + 1)),
    ("dense_forward", "bits", "inv_tau", "zero", _replace("inv_tau", lambda a: 0.0)),
    ("dense_forward", "bits", "a_index", "a label past the bitsets",
     _set("a_index", (slice(None), -1), lambda a: 32 * a["table"].shape[1])),
    ("dense_forward", "bits", "a_index", "a pad other than -1", _set("a_index", (0, -1), -3)),
    ("dense_forward", "bits", "a_index", "unsorted", _unsort("a_index")),
    ("dense_forward", "bits", "a_count", "a wrong count", _set("a_count", 0, lambda a: a["a_count"][0] + 1)),
    ("dense_forward", "bits", "a_bits", "other words than the table",
     _replace("a_bits", lambda a: torch.cat([a["a_bits"], a["a_bits"]], 1))),
    ("dense_forward", "list", "table", "unsorted", _unsort("table")),
    ("dense_forward", "list", "table", "padding before a label", _pad_first("table")),
    ("dense_forward", "list", "c_count", "a wrong count", _set("c_count", 0, lambda a: a["c_count"][0] + 1)),
    ("dense_forward", "dense", "table", "width not a power of two",
     _replace("table", lambda a: a["table"][:, :-1].contiguous())),
    ("dense_forward", "dense", "a_index", "a label past the label rows",
     _set("a_index", (slice(None), -1), lambda a: a["table"].shape[1])),
    ("dense_backward", "bits", "inv_z", "other slots", _replace("inv_z", lambda a: torch.cat([a["inv_z"]] * 2, 1))),
    ("dense_backward", "bits", "dq_unit", "other rows", _replace("dq_unit", lambda a: a["dq_unit"][:-1].contiguous())),
    ("dense_backward", "bits", "g_up", "other rows", _replace("g_up", lambda a: a["g_up"][:-1].contiguous())),
    ("dense_backward", "bits", "self_col", "column C", _set("self_col", 0, C)),
    ("closed_forward", "closed", "self_col", "column C", _set("self_col", 0, C)),
    ("closed_forward", "closed", "a_index", "label num_labels",
     _set("a_index", (slice(None), -1), lambda a: a["num_labels"])),
    ("closed_forward", "closed", "c_index", "a pad other than -1", _set("c_index", (0, -1), -3)),
    ("closed_forward", "closed", "c_index", "unsorted", _unsort("c_index")),
    ("closed_forward", "closed", "a_count", "a wrong count", _set("a_count", 0, lambda a: a["a_count"][0] + 1)),
    ("closed_forward", "closed", "c_count", "a wrong count", _set("c_count", -1, lambda a: a["c_count"][-1] + 1)),
    ("closed_forward", "closed", "col_lo", "past the columns", _replace("col_lo", lambda a: C(a) + 1)),
    ("closed_backward", "closed", "order", "anchor M", _set("order", 0, M)),
    ("closed_backward", "closed", "live", "more than M anchors", _set("live", 0, lambda a: M(a) + 1)),
    ("closed_backward", "closed", "col_cid", "compact id U",
     _set("col_cid", (0, 0), lambda a: a["slot_ptr"].numel() - 1)),
    ("closed_backward", "closed", "slot_ptr", "past the slots",
     _set("slot_ptr", -1, lambda a: a["slot_sorted"].numel() + 1)),
    ("closed_backward", "closed", "slot_ptr", "decreasing", _set("slot_ptr", 1, lambda a: a["slot_ptr"][2] + 1)),
    ("closed_backward", "closed", "slot_sorted", "a negative slot", _set("slot_sorted", 0, -1)),
    ("closed_backward", "closed", "slot_sorted", "slot M * Ka", _set("slot_sorted", 0, lambda a: a["slot_sorted"].numel())),
    ("closed_backward", "closed", "col_owner", "anchor M", _set("col_owner", 0, M)),
    ("closed_backward", "closed", "head_u", "not 2 x a power of two",
     _replace("head_u", lambda a: a["head_u"][:, :-2].contiguous())),
    ("closed_backward", "closed", "head_y", "another head width",
     _replace("head_y", lambda a: torch.cat([a["head_y"]] * 2, 1))),
    ("closed_backward", "closed", "v_tail", "fewer features",
     _replace("v_tail", lambda a: a["v_tail"][:, 1:].contiguous())),
    ("closed_backward", "closed", "a_index", "unsorted", _unsort("a_index")),
    ("closed_backward", "closed", "c_index", "other label slots",
     _replace("c_index", lambda a: torch.cat([a["c_index"]] * 2, 1))),
    ("closed_backward", "closed", "a_cid", "compact id U",
     _set("a_cid", (0, 0), lambda a: a["col_ptr"].numel() - 1)),
    ("closed_backward", "closed", "col_ptr", "past the list",
     _set("col_ptr", -1, lambda a: a["col_sorted"].numel() + 1)),
    ("closed_backward", "closed", "col_ptr", "decreasing", _set("col_ptr", 1, lambda a: a["col_ptr"][2] + 1)),
    ("closed_backward", "closed", "col_sorted", "column C", _set("col_sorted", 0, C)),
    ("closed_backward", "closed", "col_sorted", "-1 inside the list", _set("col_sorted", 0, -1)),
    ("closed_backward", "closed", "top", "compact id U", _set("top", 0, lambda a: a["slot_ptr"].numel() - 1)),
    ("closed_backward", "closed", "top", "another head width",
     _replace("top", lambda a: a["top"][:-1].contiguous())),
    ("pairs_forward", "pairs", "self_col", "below -1", _set("self_col", 0, -2)),
    ("pairs_forward", "pairs", "a_index", "label num_labels",
     _set("a_index", (slice(None), -1), lambda a: a["num_labels"])),
    ("pairs_forward", "pairs", "c_index", "label num_labels",
     _set("c_index", (slice(None), -1), lambda a: a["num_labels"])),
    ("pairs_forward", "pairs", "c_count", "a wrong count", _set("c_count", 0, lambda a: a["c_count"][0] + 1)),
    ("pairs_backward", "pairs", "pi", "anchor M", _set("pi", -1, M)),
    ("pairs_backward", "pairs", "pi", "unsorted", _replace("pi", lambda a: a["pi"].flip(0).contiguous())),
    ("pairs_backward", "pairs", "pj", "column C", _set("pj", 0, C)),
    ("pairs_backward", "pairs", "coef", "another length", _replace("coef", lambda a: a["coef"][:-1].contiguous())),
]


@pytest.mark.parametrize("name,config,argument,what,spoil", VALUE_CASES,
                         ids=[f"{n}-{c}-{a}-{w.replace(' ', '_')}" for n, c, a, w, _ in VALUE_CASES])
def test_bad_values_and_shapes_are_refused_by_name(recorded, name, config, argument, what, spoil):
    args = _arguments(recorded, name, config)
    spoil(args)
    _raises(argument, lambda: _call(name, args))


def test_checks_hold_under_fake_tensors(recorded):
    """Under FakeTensorMode (how torch.compile traces the operators) the metadata checks still
    raise by name, and the value assertions of valid arguments read nothing back to the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mlcl_fast.triton import recording

    args = _arguments(recorded, "closed_forward")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {key: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for key, v in args.items()}
        with recording.recording(lambda *launch: None):
            _call("closed_forward", fake)  # value assertions included: no DataDependentOutputException
            fake["a_count"] = fake["a_count"][:-1]
            _raises("a_count", lambda: _call("closed_forward", fake))


def test_bfloat16_operands_are_refused_under_the_interpreter(recorded):
    """The interpreter's bf16 tl.dot is wrong: an operator given bf16 there refuses it by name
    (the driver computes bf16 rows in fp32 instead, below)."""
    args = _arguments(recorded, "dense_forward")
    args["q"], args["k"] = args["q"].bfloat16(), args["k"].bfloat16()
    with pytest.raises(TypeError, match=r"^q: bfloat16 does not run under the Triton interpreter"):
        _call("dense_forward", args)


# ------------------------------------------------------------------------------ bfloat16 features
@pytest.mark.parametrize("preset,regime", [("reg", None), ("supcon_any", "bits"), ("msc", "pairs")],
                         ids=["closed", "bits", "pairs"])
def test_bfloat16_features_match_the_reference(monkeypatch, preset, regime):
    """bf16 features under the interpreter: computed in fp32 from the bf16 rows (documented in
    mlcl_fast/triton/README.md), within bf16 tolerances of the fp64 reference; gradients in bf16."""
    monkeypatch.delenv("MLCL_FAST_TRITON_GRAD", raising=False)
    if regime is None:
        monkeypatch.delenv("MLCL_FAST_TRITON_LABELS", raising=False)
    else:
        monkeypatch.setenv("MLCL_FAST_TRITON_LABELS", regime)
    case = random_case(fresh_seed("bf16", preset), preset, None, B=10, d=12, L=5, dtype=torch.bfloat16)
    assert_backend_matches("triton", case, rtol_loss=2e-2, rtol_grad=2e-2, check_none=False)


# ------------------------------------------------------------------------------- LabelSets
LABEL_ROWS = [[0, 2, -1], [1, -1, -1], [0, 1, 3], [-1, -1, -1], [2, 3, -1]]


def _label_sets(rows=LABEL_ROWS, count=None) -> LabelSets:
    index = torch.tensor(rows)
    return LabelSets(index, (index >= 0).sum(1) if count is None else torch.tensor(count), 4)


def _with_row(r: int, row: list) -> list:
    return [row if i == r else old for i, old in enumerate(LABEL_ROWS)]


# corruption: (LabelSets, the row at fault)
SPOILED_LABEL_SETS = {
    "label_out_of_range": (_label_sets(_with_row(2, [0, 1, 4])), 2),
    "pad_below_minus_one": (_label_sets(_with_row(1, [1, -2, -1])), 1),
    "unsorted": (_label_sets(_with_row(4, [3, 2, -1])), 4),
    "repeated": (_label_sets(_with_row(0, [2, 2, -1])), 0),
    "pad_before_a_label": (_label_sets(_with_row(1, [-1, 1, -1])), 1),
    "wrong_count": (_label_sets(count=[2, 1, 3, 0, 3]), 4),
}


@pytest.mark.parametrize("check_values", [True, False])
@pytest.mark.parametrize("corruption", SPOILED_LABEL_SETS)
def test_spoiled_label_sets_fail_alike_on_every_backend(corruption, check_values):
    """A hand-made LabelSets is validated like any other label input: the same error type and
    message on every backend (ValueError naming the row with check_values=True, a device-side
    assertion with check_values=False), never a value or an IndexError."""
    sets, row = SPOILED_LABEL_SETS[corruption]
    gen = torch.Generator().manual_seed(fresh_seed("spoiled", corruption))
    feats, protos = torch.randn(5, 2, 6, generator=gen), torch.randn(4, 6, generator=gen)
    outcomes = {}
    for name in [b for b in ("reference", "cpp", "triton") if b in available_backends()]:
        with pytest.raises((ValueError, RuntimeError), match=r"^labels\b") as info:
            multilabel_contrastive_loss(feats, sets, protos, preset="reg", backend=name, check_values=check_values)
        outcomes[name] = (type(info.value), str(info.value))
    assert "triton" in outcomes and len(set(outcomes.values())) == 1, outcomes
    kind, message = outcomes["reference"]
    assert kind is (ValueError if check_values else RuntimeError)
    if check_values:
        assert f"row {row} " in message, message


def test_valid_hand_made_label_sets_give_the_padded_indices_loss():
    """The checks accept a canonical LabelSets (here with int32 tensors, read as int64)."""
    sets = _label_sets()
    narrow = LabelSets(sets.index.int(), sets.count.int(), 4)
    feats = torch.randn(5, 6)
    protos = torch.randn(4, 6)
    kwargs = dict(preset="reg", backend="triton")
    expected = multilabel_contrastive_loss(feats, sets.index, protos, label_format="indices", **kwargs)
    for labels, check in ((narrow, True), (narrow, False), (as_label_sets(sets.index, 5, 4, "indices"), True)):
        torch.testing.assert_close(multilabel_contrastive_loss(feats, labels, protos, check_values=check, **kwargs),
                                   expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dense_forward", "dense_backward", "pairs_forward", "pairs_backward"])
def test_visiting_order_arguments_are_checked(recorded, name):
    """The optional visiting order of the in-tile and pairs operators: order and live come
    together, as int32 [M] anchor indices and a [1] count of at most M."""
    args = _arguments(recorded, name)
    M = args["q"].shape[0]
    order, live = torch.arange(M, dtype=torch.int32), torch.tensor([M], dtype=torch.int32)
    _raises("live", lambda: _call(name, dict(args, order=order)))
    _raises("order", lambda: _call(name, dict(args, live=live)))
    _raises("order", lambda: _call(name, dict(args, order=order[:-1], live=live)))
    _raises("order", lambda: _call(name, dict(args, order=order + 1, live=live)))
    _raises("live", lambda: _call(name, dict(args, order=order, live=live + 1)))
    _raises("live", lambda: _call(name, dict(args, order=order, live=live.long())))
    _call(name, dict(args, order=order, live=live))  # a full visit is accepted
