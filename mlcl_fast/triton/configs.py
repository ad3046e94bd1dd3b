"""Launch configurations, label regimes and the switches of the Triton backend.

One fixed configuration per regime is the default (reproducible, no warm-up cost); setting
MLCL_FAST_AUTOTUNE=1 lets Triton pick among a few candidates per shape instead. Every number
below that concerns speed is a starting point still to be measured on a GPU (see README.md).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

# How a tile learns whether column j carries anchor i's t-th label (a `tl.constexpr` of the kernels).
MODE_NONE = 0    # no labels in the dense kernels: positive pairs are handled outside (regime "pairs")
MODE_BITS = 1    # column label bitsets of at most BITS_MAX_WORDS int32 words, selected in registers
MODE_GATHER = 2  # column label bitsets of any width, one gathered word per (anchor, column, slot)
MODE_LIST = 3    # sorted padded column label lists, compared entry by entry

REGIMES = {"bits": MODE_BITS, "gather": MODE_GATHER, "list": MODE_LIST, "pairs": MODE_NONE}

# Weighting and pair-factor codes shared by the kernels.
WEIGHTING_CODES = {"any": 0, "all": 1, "jaccard": 2, "label": 3}
FACTOR_CODES = {"one": 0, "union": 1, "overlap": 2}

# Regime thresholds (to be measured on a GPU). A bitset word select costs about one ALU op per
# (anchor, column, slot, word); a list costs one compare per (anchor, column, slot, column label);
# a gathered word costs one L1 load per (anchor, column, slot).
BITS_MAX_WORDS = 4          # L <= 128: bitsets live in registers
GATHER_MAX_WORDS = 64       # L <= 2048: gathered bitsets (memory C*L/32 words) ...
GATHER_MIN_LIST_WIDTH = 4   # ... when columns carry enough labels that a list scan costs more
# The pairs regime holds O(T) integers, T = sum over anchor labels of the columns carrying them
# (positive pairs with multiplicity). It is used when T is below this many entries per row of
# the O((|A|+|C|)(d+K)) working set, and a small part of the |A| x |C| tile work.
PAIRS_MAX_PER_ROW = 4
PAIRS_MAX_DENSITY = 0.25

GRAD_MODES = ("forward", "recompute")


@dataclass(frozen=True)
class TileConfig:
    block_m: int      # anchors per tile
    block_n: int      # columns per tile
    block_k: int      # feature chunk of the logit dot
    block_d: int      # feature chunk of a gradient output (one program per chunk)
    num_warps: int = 4
    num_stages: int = 2


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


OWNERS = ("anchors", "columns")


def tile_config(dim: int, interpret: bool, owner: str = "anchors") -> TileConfig:
    """The fixed configuration for feature dimension `dim` and a kernel whose programs own anchor
    blocks (stats, rows) or column blocks (cols). MLCL_FAST_TRITON_TILE overrides it."""
    if owner not in OWNERS:
        raise ValueError(f"owner: expected one of {list(OWNERS)}, got {owner!r}")
    forced = forced_tile(dim)
    if forced is not None:
        return forced
    if interpret:
        # Small tiles so that the CPU tests cross tile, chunk and padding boundaries.
        return TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_warps=1, num_stages=1)
    # The logit chunk covers d up to 128 in one step (the anchor tile then stays in registers);
    # gradient outputs are split into 128-wide chunks, each program recomputing its logits.
    block_k = max(16, min(_pow2(dim), 128))
    block_d = max(16, min(_pow2(dim), 128))
    # One program per owned block and nothing else to spread over the GPU: small owned blocks give
    # enough programs, and 64 x 64 tiles spill registers. Measured per kernel on an H100 for reg,
    # N=4096, d=128 (bench/RESULTS.md): anchor-owned kernels fastest at 16 x 64, the column-owned
    # kernel at 32 x 32.
    if owner == "columns":
        return TileConfig(block_m=32, block_n=32, block_k=block_k, block_d=block_d, num_warps=4, num_stages=2)
    return TileConfig(block_m=16, block_n=64, block_k=block_k, block_d=block_d, num_warps=4, num_stages=2)


def forced_tile(dim: int) -> TileConfig | None:
    """MLCL_FAST_TRITON_TILE="BLOCK_M,BLOCK_N,num_warps,num_stages" fixes the anchor and column
    tile (for measurements: bench/profile.py); the feature chunks stay as for `dim`."""
    text = os.environ.get("MLCL_FAST_TRITON_TILE")
    if not text:
        return None
    try:
        bm, bn, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"MLCL_FAST_TRITON_TILE: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages', got {text!r}")
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("num_warps", warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"MLCL_FAST_TRITON_TILE: {name} must be a power of two, got {v}")
    chunk = max(16, min(_pow2(dim), 128))
    return TileConfig(block_m=max(bm, 16), block_n=max(bn, 16), block_k=chunk, block_d=chunk,
                      num_warps=warps, num_stages=max(stages, 1))


def autotune_enabled() -> bool:
    return os.environ.get("MLCL_FAST_AUTOTUNE", "0") == "1"


def autotune_candidates(dim: int) -> list[TileConfig]:
    """Candidates tried per (|A|, |C|, d) when MLCL_FAST_AUTOTUNE=1."""
    out = []
    for bm, bn, warps in ((32, 64, 4), (64, 64, 4), (16, 64, 4), (32, 32, 4), (64, 32, 4)):
        for stages in (2, 3):
            base = tile_config(dim, interpret=False)
            out.append(TileConfig(bm, bn, base.block_k, base.block_d, warps, stages))
    return out


def grad_mode() -> str:
    """MLCL_FAST_TRITON_GRAD: 'forward' (default: when a gradient will be needed, the forward's
    second sweep also produces the anchor-row gradient; the backward runs the column kernel only)
    or 'recompute' (the backward re-derives everything from the forward statistics). README.md
    compares their costs."""
    mode = os.environ.get("MLCL_FAST_TRITON_GRAD", "forward")
    if mode not in GRAD_MODES:
        raise ValueError(f"MLCL_FAST_TRITON_GRAD: expected one of {list(GRAD_MODES)}, got {mode!r}")
    return mode


def forced_regime() -> str | None:
    """MLCL_FAST_TRITON_LABELS forces a label regime (for tests and measurements)."""
    regime = os.environ.get("MLCL_FAST_TRITON_LABELS")
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"MLCL_FAST_TRITON_LABELS: expected one of {list(REGIMES)}, got {regime!r}")
    return regime


def choose_regime(num_labels: int, anchor_width: int, column_width: int, num_anchors: int, num_columns: int,
                  dim: int, triples: int | None) -> str:
    """The label regime for one call. `triples` (positive (anchor, label, column) triples) is
    None when it is unknown, e.g. while torch.compile traces: then only the static rules apply."""
    words = -(-num_labels // 32)
    if words <= BITS_MAX_WORDS:
        return "bits"
    if triples is not None:
        budget = PAIRS_MAX_PER_ROW * (num_anchors + num_columns) * (dim + max(anchor_width, column_width))
        if triples <= budget and triples <= PAIRS_MAX_DENSITY * num_anchors * num_columns:
            return "pairs"
    if words <= GATHER_MAX_WORDS and column_width >= GATHER_MIN_LIST_WIDTH:
        return "gather"
    return "list"
