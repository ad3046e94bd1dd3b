"""The results CSV: one row per (point, provider, mode), appended and flushed row by row."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable

from mlcl_fast.train.files import atomic_open

COLUMNS = (
    "run_id", "date", "git_commit", "device", "device_name", "torch", "threads",
    "backend", "provider", "preset", "regime", "series", "mode",
    "N", "L", "d", "K", "dtype",
    "median_ms", "p20_ms", "p80_ms", "repeats",
    "peak_MB", "total_MB", "pred_MB", "setup_s",
    "gflop", "gflops_s", "matmul_gflops_s", "roofline_frac",
    "status",
)
STATUS_KINDS = ("ok", "oom", "timeout", "error")


def status_kind(status: str) -> str:
    """'oom (predicted 6.1 GB)' -> 'oom'."""
    return status.split(" ", 1)[0] if status else ""


def append_rows(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows (missing columns left empty); writes the header for a new file.

    An existing file with another header is an error: mixing schemas would corrupt both."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"out: {path} has another column layout; write to a new file (--out)")
    # the old rows and the new ones go to a temporary file that replaces the CSV: a crash leaves the
    # previous CSV whole, never a torn last row
    previous = b"" if new else path.read_bytes()
    with atomic_open(path, "w", newline="") as f:
        f.write(previous.decode())
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            unknown = set(row) - set(COLUMNS)
            if unknown:
                raise ValueError(f"row: unknown columns {sorted(unknown)}")
            kind = status_kind(row.get("status", ""))
            if kind not in STATUS_KINDS:
                raise ValueError(f"row: status must start with one of {STATUS_KINDS}, got {row.get('status')!r}")
            writer.writerow({k: _fmt(row.get(k, "")) for k in COLUMNS})


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def read_rows(path: str | Path, run_id: str | None = "latest") -> list[dict]:
    """Rows of one run (`latest`: the last run in the file; None: every run)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if run_id is None or not rows:
        return rows
    if run_id == "latest":
        run_id = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def number(row: dict, key: str) -> float | None:
    value = row.get(key, "")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
