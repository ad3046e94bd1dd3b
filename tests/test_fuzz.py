"""Property-based fuzzing (hypothesis) of the public loss API and the native ops: every call either
raises a clear exception (ValueError/TypeError from the API, RuntimeError from an op) whose
message starts with the name of the argument that was corrupted, or returns a finite result equal
to the float64 reference. Random presets and overrides, shapes, dtypes, label formats, reductions
and temperatures, on every backend available here (triton through its interpreter).

A few hundred cases run by default; the `slow` marker runs thousands (`pytest -m slow
tests/test_fuzz.py`). Hypothesis draws from the run's MLCL_TEST_SEED, so a failure replays."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:  # as tests/test_triton.py: the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mlcl_fast  # noqa: E402
from cases import (ALL_PRESETS, BASE_SEED, LOSS_FLOOR, assert_backend_matches, label_forms, random_case, rel_err,
                   to_label_sets, to_padded, uses_prototypes, cpu_backends)  # noqa: E402
from mlcl_fast import multilabel_contrastive_loss  # noqa: E402
from mlcl_fast.labels import LabelSets  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = cpu_backends()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# What fp32 and half precision can promise on every case the fuzz draws, which includes tau down
# to 0.01 and tiny degenerate cases (a lone positive with p = 1) whose true gradient cancels to
# exactly zero: there the backends' recomputed logits leave fp32 noise of ~1e-7 of the gradient's
# scale (GRAD_SCALE_FLOOR, 1e-4 of it, with rtol 1e-4 asks for 1e-8), hence a floor of 1e-2 of
# the scale. Half-precision rows carry a relative rounding of ~4e-3 into logits of size 1/tau: the
# SPEC's 2e-2 (tau ~ 0.1) grows as 0.1/tau below that. fp64 features go through the fp32 paths
# of cpp and triton.
SCALE_FLOOR = 1e-2


def _tolerances(case) -> dict:
    if case.features.dtype in (torch.float16, torch.bfloat16):
        # Half backends keep the unit rows in the input's dtype: each row is rounded by up to
        # u = 2^-12 (fp16) or 2^-9 (bf16), so a logit s_ij / tau moves by up to ~2u / tau, and a
        # softmax weight by about that relative amount (bf16 at tau = 0.01: 0.39).
        # A gradient is a sum of such weights times rows, so where its terms cancel (small true
        # gradient, e.g. every column a positive with p_ij near w_ij / W_i) the same rounding is
        # an absolute error of ~2u / tau of the terms' scale: the floor keeps that much allowed
        # (bf16 supcon_any at tau = 0.5, d = 2: 2.2e-2 of the gradient seen).
        u = 2.0 ** -9 if case.features.dtype == torch.bfloat16 else 2.0 ** -12
        rounding = 1.3 * 2 * u / case.temperature
        rtol = max(2e-2 * max(1.0, 0.1 / case.temperature), rounding)
        return dict(rtol_loss=rtol, rtol_grad=rtol, scale_floor=max(SCALE_FLOOR, rounding / rtol))
    # fp32: each logit s_ij / tau (up to 1/tau for unit rows) carries ~4 roundings of u = 2^-24
    # (normalisation, dot, scale), and the loss adds W_i lse_i, sum_j w_ij s_ij and the regulariser
    # on top: ~16-32 u / tau of absolute error (losses below 1 are compared absolutely), 2x that
    # as the bound; it takes over from 1e-4 below tau = 0.04 (reg at tau = 0.01: 1.9e-4 seen).
    return dict(rtol_loss=max(1e-4, 64 * 2.0 ** -24 / case.temperature), rtol_grad=1e-3, scale_floor=SCALE_FLOOR)


LABEL_FORMS = list(label_forms(torch.eye(2, dtype=torch.bool)))


def _fuzz_settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------- corruptions
# Each takes (features, labels, prototypes, kwargs, case) and returns them corrupted, with the name
# of the argument the error must start with (a|b: a corruption that makes two arguments disagree
# may be reported under either).
def _nan(x):
    x = x.clone()
    x.view(-1)[0] = math.nan
    return x


def _inf(x):
    x = x.clone()
    x.view(-1)[-1] = -math.inf
    return x


def _half_label(labels):
    y = labels.double()
    y[0, 0] = 0.5
    return y


def _labels_out_of_range(f, y, p, kw, case):
    idx = to_padded(case.labels, case.seed)
    idx[0, 0] = case.num_labels
    return f, idx, p, dict(kw, num_labels=case.num_labels, label_format="indices")


def _labels_negative(f, y, p, kw, case):
    idx = to_padded(case.labels, case.seed)
    idx[-1, -1] = -2
    return f, idx, p, dict(kw, num_labels=case.num_labels, label_format="indices")


def _label_sets_out_of_range(f, y, p, kw, case):
    sets = to_label_sets(case.labels)
    index = torch.nn.functional.pad(sets.index, (0, 1), value=-1)
    index[0, sets.count[0]] = case.num_labels + 3  # one id past the label space, in canonical order
    return f, LabelSets(index, sets.count.clone().index_fill_(0, torch.tensor([0]), int(sets.count[0]) + 1),
                        sets.num_labels), p, kw


def _prototypes_absent_or_extra(f, y, p, kw, case):
    return f, y, (None if p is not None else torch.randn(case.num_labels, f.shape[-1], dtype=f.dtype)), kw


CORRUPTIONS = {
    "features_nan": (lambda f, y, p, kw, c: (_nan(f), y, p, kw), "features"),
    "features_inf": (lambda f, y, p, kw, c: (_inf(f), y, p, kw), "features"),
    "features_int": (lambda f, y, p, kw, c: (f.to(torch.int64), y, p, kw), "features"),
    "features_4d": (lambda f, y, p, kw, c: (f.reshape(1, *f.shape) if f.dim() == 3 else f[None, None], y, p, kw),
                    "features"),
    "features_empty": (lambda f, y, p, kw, c: (f[:0], y, p, kw), "features"),
    "labels_rows": (lambda f, y, p, kw, c: (f, torch.cat([c.labels, c.labels[:1]]), p, kw), "labels|features"),
    "labels_not_binary": (lambda f, y, p, kw, c: (f, _half_label(c.labels), p, dict(kw, label_format="dense")),
                          "labels"),
    "labels_out_of_range": (_labels_out_of_range, "labels"),
    "labels_negative": (_labels_negative, "labels"),
    "label_sets_out_of_range": (_label_sets_out_of_range, "labels"),
    "prototypes_absent_or_extra": (_prototypes_absent_or_extra, "prototypes"),
    # too many prototypes contradict the labels' width: either argument may be named
    "prototypes_rows": (lambda f, y, p, kw, c: (f, y, torch.randn(c.num_labels + 1, f.shape[-1], dtype=f.dtype), kw),
                        "prototypes|labels|num_labels"),
    "prototypes_nan": (lambda f, y, p, kw, c: (f, y, None if p is None else _nan(p), kw), "prototypes"),
    "temperature_zero": (lambda f, y, p, kw, c: (f, y, p, dict(kw, temperature=0.0)), "temperature"),
    "temperature_nan": (lambda f, y, p, kw, c: (f, y, p, dict(kw, temperature=math.nan)), "temperature"),
    "temperature_tiny": (lambda f, y, p, kw, c: (f, y, p, dict(kw, temperature=1e-40)), "temperature"),
    "reduction": (lambda f, y, p, kw, c: (f, y, p, dict(kw, reduction="median")), "reduction"),
    "backend": (lambda f, y, p, kw, c: (f, y, p, dict(kw, backend="fastest")), "backend"),
    "label_format": (lambda f, y, p, kw, c: (f, y, p, dict(kw, label_format="bits")), "label_format"),
}


@st.composite
def api_calls(draw, backends):
    preset, overrides = draw(st.sampled_from(ALL_PRESETS))
    backend = draw(st.sampled_from(backends))
    dims = dict(B=draw(st.integers(1, 6)), V=draw(st.integers(1, 3)), d=draw(st.integers(1, 9)),
                L=draw(st.integers(1, 7)))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    case = random_case(draw(st.integers(0, 2**31 - 1)), preset, overrides, density=density,
                       empty_rows=draw(st.integers(0, dims["B"])), dtype=draw(st.sampled_from(DTYPES)),
                       temperature=draw(st.sampled_from([0.01, 0.07, 0.5, 2.0])), **dims)
    form = draw(st.sampled_from(LABEL_FORMS))
    # about a third of the calls valid, the rest spread over every corruption
    corruption = draw(st.sampled_from([None] * (len(CORRUPTIONS) // 2) + sorted(CORRUPTIONS)))
    return backend, case, form, corruption


def _check_api_call(backend: str, case, form: str, corruption):
    if corruption is None:
        labels = label_forms(case.labels, case.seed)[form]
        # integer 0/1 matrices read as multi-hot only with the label space's width known
        assert_backend_matches(backend, case, labels=labels, check_none=case.seed % 2 == 0, **_tolerances(case))
        return
    corrupt, argument = CORRUPTIONS[corruption]
    kwargs = dict(preset=case.preset, backend=backend, temperature=case.temperature, **case.overrides)
    if uses_prototypes(case.preset, case.overrides):
        kwargs.setdefault("num_labels", case.num_labels)
    features, labels, prototypes, kwargs = corrupt(case.features, case.labels, case.prototypes, kwargs, case)
    if corruption == "prototypes_nan" and prototypes is None:
        return  # nothing to corrupt
    with pytest.raises((ValueError, TypeError), match=rf"^({argument})\b"):
        multilabel_contrastive_loss(features, labels, prototypes, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_fuzz(backend):
    examples = {"triton": 40}.get(backend, 200)

    @seed(BASE_SEED)
    @_fuzz_settings(examples)
    @given(api_calls([backend]))
    def run(call):
        _check_api_call(*call)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_api_fuzz_long(backend):
    examples = {"triton": 300}.get(backend, 3000)

    @seed(BASE_SEED + 1)
    @_fuzz_settings(examples)
    @given(api_calls([backend]))
    def run(call):
        _check_api_call(*call)

    run()


# --------------------------------------------------------------------------------- native ops
def _op_args(case):
    from mlcl_fast.inputs import prepare
    from mlcl_fast.backends.native_ops import op_inputs

    cfg = mlcl_fast.resolve_config(case.preset, **case.overrides)
    problem = prepare(case.features, case.labels, case.prototypes, cfg, case.temperature, num_labels=case.num_labels)
    return list(op_inputs(problem, check_values=True))


# (argument position, name, corruption of the valid value given the args)
OP_CORRUPTIONS = [
    (0, "rows", lambda a: a[0][:, :-1] if a[0].shape[1] > 1 else a[0].to(torch.int32)),
    (0, "rows", lambda a: a[0].to(torch.int32)),
    (1, "cols", lambda a: a[1].to(torch.float16)),
    (1, "cols", lambda a: a[1][None]),
    (2, "row_labels", lambda a: a[2][:-1]),
    (2, "row_labels", lambda a: a[2].to(torch.int32)),
    (2, "row_labels", lambda a: torch.nn.functional.pad(a[2], (0, 1), value=a[6])),
    (3, "col_labels", lambda a: torch.nn.functional.pad(a[3], (1, 0), value=-1) if a[3].numel() else a[3][:-1]),
    (3, "col_labels", lambda a: torch.nn.functional.pad(a[3], (0, 1), value=-2)),
    (4, "self_col", lambda a: a[4] + a[1].shape[0]),
    (4, "self_col", lambda a: a[4] - a[4].max() - 1),
    (4, "self_col", lambda a: a[4][:-1]),
    (5, "num_sample_cols", lambda a: a[1].shape[0] + 1),
    (5, "num_sample_cols", lambda a: -1),
    (6, "num_labels", lambda a: -1),
    (7, "temperature", lambda a: 0.0),
    (7, "temperature", lambda a: math.inf),
    (8, "beta", lambda a: -0.5),
    (9, "weighting", lambda a: "some"),
    (10, "pair_factor", lambda a: "product"),
    (11, "alpha", lambda a: math.nan),
]


@st.composite
def op_calls(draw):
    preset, overrides = draw(st.sampled_from(ALL_PRESETS))
    case = random_case(draw(st.integers(0, 2**31 - 1)), preset, overrides, B=draw(st.integers(1, 5)),
                       V=draw(st.integers(1, 2)), d=draw(st.integers(1, 6)), L=draw(st.integers(1, 6)),
                       density=draw(st.sampled_from([0.0, 0.3, 0.8])), dtype=draw(st.sampled_from(DTYPES[:2])))
    which = draw(st.sampled_from([None] * (len(OP_CORRUPTIONS) // 2) + list(range(len(OP_CORRUPTIONS)))))
    check_values = draw(st.booleans())
    return case, which, check_values


def _check_op_call(case, which, check_values):
    args = _op_args(case)
    args[-1] = check_values
    if which is None:
        loss = torch.ops.mlcl_fast.anchor_loss_forward(*args)[0]
        f64 = case.to(dtype=torch.float64)
        expected = multilabel_contrastive_loss(f64.features, f64.labels, f64.prototypes, preset=case.preset,
                                               backend="reference", reduction="none", temperature=case.temperature,
                                               **case.overrides)
        assert bool(torch.isfinite(loss).all())
        # the loss is a difference of terms of the logits' size 1/tau: its fp32 rounding scales with it
        assert rel_err(loss, expected, max(LOSS_FLOOR, 1.0 / case.temperature)) < 1e-5
        return
    position, name, corrupt = OP_CORRUPTIONS[which]
    bad = corrupt(args)
    if isinstance(bad, torch.Tensor) and bad.shape == args[position].shape and torch.equal(bad, args[position]):
        return  # the corruption left this argument as it was (e.g. no label to shift)
    args[position] = bad
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.mlcl_fast.anchor_loss_forward(*args)


def _need_cpp():
    if "cpp" not in BACKENDS:
        pytest.skip("cpp backend unavailable")


def test_op_fuzz():
    _need_cpp()

    @seed(BASE_SEED + 2)
    @_fuzz_settings(200)
    @given(op_calls())
    def run(call):
        _check_op_call(*call)

    run()


@pytest.mark.slow
def test_op_fuzz_long():
    _need_cpp()

    @seed(BASE_SEED + 3)
    @_fuzz_settings(3000)
    @given(op_calls())
    def run(call):
        _check_op_call(*call)

    run()
