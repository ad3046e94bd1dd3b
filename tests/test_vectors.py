"""The 18 fixed float64 SPEC vectors (../shared/vectors): the reference backend and the oracle."""
from __future__ import annotations

import pytest
import torch

import brute_force
from cases import Case, rel_err, run_loss

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_VECTORS = 18
TOL = 1e-10


def load_case(spec_vectors, index: int):
    meta, arrays = spec_vectors
    entry = meta[index]
    key = entry["key"]
    protos = arrays.get(f"{key}_prototypes")
    case = Case(features=torch.from_numpy(arrays[f"{key}_features"]).double(),
                labels=torch.from_numpy(arrays[f"{key}_labels"]) != 0,
                prototypes=None if protos is None else torch.from_numpy(protos).double(),
                preset=entry["preset"], overrides=dict(entry["overrides"]), temperature=entry["temperature"])
    assert case.features.dim() == (3 if entry["views"] > 1 else 2)
    expected_gp = arrays.get(f"{key}_grad_prototypes")
    return case, entry["loss"], torch.from_numpy(arrays[f"{key}_grad_features"]), \
        None if expected_gp is None else torch.from_numpy(expected_gp)


def test_vector_count(spec_vectors):
    assert len(spec_vectors[0]) == NUM_VECTORS


@pytest.mark.parametrize("index", range(NUM_VECTORS))
def test_reference_matches_vector(spec_vectors, index):
    case, loss, grad_f, grad_p = load_case(spec_vectors, index)
    value, gf, gp = run_loss("reference", case)
    assert value.dtype == torch.float64
    assert abs(float(value) - loss) <= TOL * abs(loss)
    assert rel_err(gf, grad_f, 1e-300) <= TOL
    assert (gp is None) == (grad_p is None)
    if grad_p is not None:
        assert rel_err(gp, grad_p, 1e-300) <= TOL


@pytest.mark.parametrize("index", range(NUM_VECTORS))
def test_brute_force_matches_vector(spec_vectors, index):
    """The oracle itself agrees with the independently computed vectors."""
    case, loss, grad_f, grad_p = load_case(spec_vectors, index)
    out = brute_force.evaluate(case.features, case.label_sets(), case.prototypes, preset=case.preset,
                               temperature=case.temperature, **case.overrides)
    gf, gp = out.grads()
    assert abs(out.loss - loss) <= TOL * abs(loss)
    assert rel_err(gf, grad_f, 1e-300) <= TOL
    if grad_p is not None:
        assert rel_err(gp, grad_p, 1e-300) <= TOL
