"""The sweep grid, in one place: which (preset, labels, N, L, d) points each variant measures.

Two series per variant:
- series "N": N grows at fixed L and d (label regime `few`, dense overlaps);
- series "L": L grows at fixed N and d (power-law labels), plus the real label matrices and the
  `few` regime at the same N, so label spaces from 10s to 10^5 (CPU) or 10^6 (GPU) line up.
Within a series, points are in increasing size: a provider that times out or runs out of memory
at one point is not run at the larger points of the same series (they are recorded as such).
"""
from __future__ import annotations

from dataclasses import dataclass

from .labels import REAL_DATASETS

PRESETS = ("reg", "msc", "jaccard", "mulsupcon")


@dataclass(frozen=True)
class Point:
    series: str       # "N" or "L"
    preset: str
    regime: str       # few | powerlaw | bibtex | delicious
    N: int
    L: int            # label space (for real data: the dataset's own L)
    d: int
    dtype: str = "float32"

    @property
    def key(self) -> tuple:
        """Points of one series differ only in size: this is what they share."""
        return (self.series, self.preset, self.regime if self.series == "N" else "-", self.d, self.dtype)


@dataclass(frozen=True)
class Grid:
    name: str
    points: tuple[Point, ...]
    timeout_s: float            # per point (CPU: the worker subprocess's whole life)
    mode_budget_s: float        # measured time per mode before repeats stop
    min_repeats: int
    max_repeats: int
    mem_budget_gb: float        # default memory budget (0: a share of the memory available)
    compile_points: int         # torch.compile points: the first few of each series ...
    compile_presets: tuple[str, ...] = PRESETS  # ... of these presets (compiling costs 10-60 s a point on a CPU)
    compile_series: tuple[str, ...] = ("N", "L")
    time_budget_s: float = float("inf")         # the sweep stops starting points after this long
    compile_timeout_s: float = 600.0            # per torch.compile point (compilation included)


REAL_L = {"bibtex": 159, "delicious": 983}


def _series(presets, d, n_values, n_fixed_l, l_values, l_fixed_n, few_l=None, dtypes=("float32",)) -> tuple[Point, ...]:
    """Series N (few labels, L = n_fixed_l) and series L (N = l_fixed_n: the `few` regime at few_l
    when given, the real data sets, power-law labels at l_values), for every preset and dtype.

    Size-major order (every preset at one size, then the next size), so a sweep that runs out
    of time loses the largest points of every preset rather than whole presets."""
    pts: list[Point] = []
    ls = ([("few", few_l)] if few_l else []) + [(name, REAL_L[name]) for name in REAL_DATASETS] + \
        [("powerlaw", L) for L in l_values]
    for dtype in dtypes:
        pts += [Point("N", preset, "few", n, n_fixed_l, d, dtype) for n in n_values for preset in presets]
        pts += [Point("L", preset, regime, l_fixed_n, L, d, dtype)
                for regime, L in sorted(ls, key=lambda r: r[1]) for preset in presets]
    return tuple(pts)


GRIDS = {
    # Small enough to finish in under 5 minutes on 2 busy cores: a time lower bound and a 1 GB
    # memory budget refuse the points that could not (they stay in the CSV as refusals).
    ("cpu", "quick"): Grid(
        "quick", _series(PRESETS, d=64, n_values=(128, 512, 1024), n_fixed_l=32,
                         l_values=(10_000, 100_000), l_fixed_n=256),
        timeout_s=20, mode_budget_s=0.1, min_repeats=3, max_repeats=10, mem_budget_gb=1.0, compile_points=1,
        compile_presets=("reg",), compile_series=("N",), time_budget_s=245, compile_timeout_s=120),
    ("cpu", "full"): Grid(
        "full", _series(PRESETS, d=128, n_values=(256, 512, 1024, 2048, 4096, 8192, 16384), n_fixed_l=128,
                        l_values=(1_000, 3_000, 10_000, 30_000, 100_000), l_fixed_n=1024, few_l=128),
        timeout_s=600, mode_budget_s=2.0, min_repeats=5, max_repeats=30, mem_budget_gb=0.0, compile_points=99),
    ("cuda", "quick"): Grid(
        "quick", _series(PRESETS, d=128, n_values=(1024, 4096, 16384), n_fixed_l=128,
                         l_values=(1_000, 10_000, 100_000, 1_000_000), l_fixed_n=4096),
        timeout_s=60, mode_budget_s=0.2, min_repeats=5, max_repeats=50, mem_budget_gb=0.0, compile_points=1,
        compile_presets=("reg",), compile_timeout_s=120),
    ("cuda", "full"): Grid(
        "full", _series(PRESETS, d=128, n_values=(1024, 2048, 4096, 8192, 16384, 32768, 65536), n_fixed_l=128,
                        l_values=(1_000, 10_000, 100_000, 1_000_000), l_fixed_n=8192, few_l=128,
                        dtypes=("float32", "bfloat16")),
        timeout_s=120, mode_budget_s=0.5, min_repeats=10, max_repeats=100, mem_budget_gb=0.0, compile_points=99),
}


def get_grid(device: str, variant: str) -> Grid:
    try:
        return GRIDS[("cuda" if device.startswith("cuda") else "cpu", variant)]
    except KeyError:
        raise ValueError(f"variant: expected 'quick' or 'full', got {variant!r}") from None
