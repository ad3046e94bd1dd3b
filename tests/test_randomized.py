"""Property-based shapes and labels (hypothesis): the reference equals the brute-force oracle on
any batch, view count, dimension, label space, label pattern, temperature and configuration, and
the loss does not depend on the label form."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import ALL_PRESETS, Case, assert_matches_brute_force, label_forms, run_loss, uses_prototypes

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def cases(draw):
    preset, overrides = draw(st.sampled_from(ALL_PRESETS))
    batch = draw(st.integers(1, 7))
    views = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 6))
    num_labels = draw(st.integers(1, 6))
    label_rows = draw(st.lists(st.sets(st.integers(0, num_labels - 1), max_size=num_labels),
                               min_size=batch, max_size=batch))
    labels = torch.zeros(batch, num_labels, dtype=torch.bool)
    for b, row in enumerate(label_rows):
        labels[b, sorted(row)] = True
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, views, dim) if views > 1 else (batch, dim)
    features = torch.randn(shape, generator=gen, dtype=torch.float64)
    if draw(st.booleans()) and batch > 1:  # exact duplicates and opposite rows
        features[1] = 3.0 * features[0]
        features[-1] = -features[0]
    prototypes = torch.randn(num_labels, dim, generator=gen, dtype=torch.float64) \
        if uses_prototypes(preset, overrides) else None
    temperature = draw(st.sampled_from([0.02, 0.07, 0.1, 0.3, 1.0, 2.0]))
    return Case(features, labels, prototypes, preset, dict(overrides), temperature, seed)


@SETTINGS
@given(case=cases())
def test_reference_equals_brute_force(case):
    # Gradients: rounding noise of the terms (of order 1 / tau each) passes through the
    # normalisation's backward, which divides by each row's norm; where the exact gradient
    # vanishes (d = 1: a unit row cannot move) only that noise remains, measured against the
    # comparison's floor. So the gradient tolerance grows with 1 / tau and 1 / ||x||.
    rows = [case.features.reshape(-1, case.features.shape[-1])]
    if case.prototypes is not None:
        rows.append(case.prototypes)
    smallest = min(float(r.norm(dim=1).min()) for r in rows if r.numel())
    rtol_grad = 1e-9 * max(1.0, 0.1 / case.temperature) * max(1.0, 1.0 / smallest)
    assert_matches_brute_force("reference", case, 1e-10, rtol_grad)


@SETTINGS
@given(case=cases(), form=st.sampled_from(list(label_forms(torch.eye(2, dtype=torch.bool)))))
def test_label_form_does_not_matter(case, form):
    expected = run_loss("reference", case)
    got = run_loss("reference", case, labels=label_forms(case.labels, case.seed)[form])
    for e, g in zip(expected, got):
        assert (e is None and g is None) or torch.equal(e, g)
