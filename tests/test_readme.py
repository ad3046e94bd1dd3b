"""The README's usage example runs as written (on the CPU backends available here)."""
from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_usage_example_runs():
    text = README.read_text()
    usage = text.split("\n## Usage\n", 1)[1].split("\n## ", 1)[0]
    block = usage.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, f"{README}:Usage", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert float(namespace["loss"]) >= 0.0 and namespace["features"].grad is not None
