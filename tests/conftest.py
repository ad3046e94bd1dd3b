"""Shared test setup: importable helpers (cases, brute_force), the random seed, the SPEC vectors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `import cases` / `import brute_force` under any import mode
    sys.path.insert(0, str(TESTS_DIR))

import cases  # noqa: E402

VECTORS_DIR = Path(os.environ.get("MLCL_SPEC_VECTORS", TESTS_DIR.parent.parent / "shared" / "vectors"))


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support is in beta state:UserWarning")


def pytest_report_header(config):
    return f"mlcl_fast random inputs: MLCL_TEST_SEED={cases.BASE_SEED} (set it to replay this run)"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if terminalreporter.stats.get("failed"):
        terminalreporter.write_line(f"random inputs of this run: replay with MLCL_TEST_SEED={cases.BASE_SEED}")


@pytest.fixture(scope="session")
def spec_vectors():
    """(meta list, npz arrays) of ../shared/vectors; the test is skipped when they are absent."""
    meta_path, data_path = VECTORS_DIR / "spec_vectors.json", VECTORS_DIR / "spec_vectors.npz"
    if not (meta_path.is_file() and data_path.is_file()):
        pytest.skip(f"SPEC vectors not found in {VECTORS_DIR}")
    import numpy as np

    with open(meta_path) as fh:
        meta = json.load(fh)
    with np.load(data_path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return meta, arrays


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add scheduling cost (20x on a busy 2-core machine).
    Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
