"""Launch configurations, label regimes and the switches of the Triton backend.

One fixed configuration per regime is the default (reproducible, no warm-up cost); setting
MLCL_FAST_AUTOTUNE=1 lets Triton pick among a few candidates per shape instead. Every number
below that concerns speed is a starting point still to be measured on a GPU (see README.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# How a tile learns whether column j carries anchor i's t-th label (a `tl.constexpr` of the kernels).
MODE_NONE = 0    # no labels in the dense kernels: positive pairs are handled outside (regime "pairs")
MODE_BITS = 1    # column label bitsets of at most BITS_MAX_WORDS int32 words, selected in registers
MODE_GATHER = 2  # column label bitsets of any width, one gathered word per (anchor, column, slot)
MODE_LIST = 3    # sorted padded column label lists, compared entry by entry
MODE_HEAD = 4    # label-free sweeps plus one dense tile of the most frequent ("head") labels, for the
                 # regulariser of the closed form (closed.py): w_ij of the head labels is a small tl.dot
MODE_DENSE = 5   # L <= DENSE_MAX_LABELS: 0/1 fp16 label rows, overlaps c_ij as one tl.dot per tile
IN_TILE_MODES = (MODE_BITS, MODE_GATHER, MODE_LIST, MODE_DENSE)
DENSE_MAX_LABELS = 64

REGIMES = {"bits": MODE_BITS, "gather": MODE_GATHER, "list": MODE_LIST, "pairs": MODE_NONE, "closed": MODE_NONE,
           "dense": MODE_DENSE}

# Weighting and pair-factor codes shared by the kernels (one definition, in presets.py).
from ..presets import FACTOR_CODES, WEIGHTING_CODES  # noqa: E402

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
# The pairs regime: the columns' most frequent labels form a head of dense 0/1 tiles (at most
# DENSE_MAX_LABELS, the dense mode's width that compiles to wgmma without spills), so the sweeps
# weigh every pair by its head labels and only pairs sharing a rarer label are listed (pairs.py);
# T then counts the tail labels only.
PAIRS_HEAD_LABELS = DENSE_MAX_LABELS

# Head labels of the closed form: the columns' most frequent labels, as a dense [columns, HB]
# 0/1 tile (HB <= HEAD_LABELS, or HEAD_LABELS_WIDE for d > 128, where the 256-wide gradient
# accumulator leaves no registers for a 64-wide head: the static report shows spills); the other
# labels go through the closed form and, for the regulariser, tail.py's pair kernels.
HEAD_LABELS = 64
HEAD_LABELS_WIDE = 32

# The kernels' logits are in base 2 (exp2 per pair): one definition of the conversions.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

GRAD_MODES = ("forward", "recompute", "symmetric")

# How fp32 operands enter the kernels' tl.dot: "ieee" (FFMA, no tensor cores, exact fp32 products),
# "tf32" (tensor cores, operands rounded to a 10-bit mantissa) or "tf32x3" (three tf32 products per
# dot, each operand split into a tf32 high part and the rest: about fp32 accuracy on tensor cores
# at three times the MMA work). By default torch's matmul setting decides between tf32 and ieee;
# MLCL_FAST_TRITON_FP32 chooses explicitly. Half operands go to the MMA as they are.
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
FP32_PRECISION_ENV = "MLCL_FAST_TRITON_FP32"


@dataclass(frozen=True)
class TileConfig:
    block_m: int      # anchors per tile
    block_n: int      # columns per tile
    block_k: int      # feature chunk of the logit dot
    block_d: int      # feature chunk of a gradient output (one program per chunk)
    num_warps: int = 4
    num_stages: int = 2


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tile widths and tl.arange sizes."""
    return 1 << max(0, (int(n) - 1).bit_length())


def block_width(n: int, cap: int, interpret: bool) -> int:
    """A block over n features (or entries) of the row-gathering kernels: pow2(n) within [16, cap];
    16 under the interpreter, so that small test shapes cross block boundaries."""
    return 16 if interpret else max(16, min(pow2(n), cap))


OWNERS = ("anchors", "columns", "symmetric")


# The widest feature dimension held resident (one chunk) by the label-free kernels: an anchor or
# column block of up to 256 features stays in registers/shared memory for a whole sweep, so
# d = 256 costs one logit GEMM per tile instead of one per 128-wide chunk.
FREE_MAX_CHUNK = 256
# The in-tile label modes keep their 128-wide chunks: their label work already fills the registers.
LABEL_MAX_CHUNK = 128


TILE_KINDS = ("in_tile", "free", "head", "dense", "dense_label")
DENSE_RESIDENT_KINDS = ("dense", "dense_label")


# IEEE fp32 dots (fp32 features while torch disallows tf32) run on FFMA with both operand tiles
# in registers: chunks of IEEE_CHUNK features and small tiles keep them there.
IEEE_CHUNK = 32
IEEE_TILE = (32, 32, 4)
# tf32x3 also holds each operand tile as its high and low tf32 parts: 64-feature chunks keep the
# anchor-owned sweeps on wgmma without spills (static report; the column gradient then takes the
# chunked column kernel, on mma.sync).
X3_CHUNK = 64


def tile_config(dim: int, interpret: bool, owner: str = "anchors", kind: str = "in_tile",
                ieee: bool = False, fp32: bool = False, x3: bool = False) -> TileConfig:
    """The fixed configuration for feature dimension `dim`, a kernel whose programs own anchor
    blocks (stats, rows) or column blocks (cols; "symmetric": the symmetric backward's column
    kernel), and its label work (`kind`): "in_tile" (the
    bits / gather / list modes, and dense with label-centric weights), "free" (MODE_NONE: none),
    "head" (MODE_HEAD: the head-label tiles of the closed form), "dense" (MODE_DENSE with
    pair-centric weights: one overlap dot per tile) or "dense_label" (MODE_DENSE, label-centric:
    also label-indexed sums as split dots). `ieee`: fp32 operands without tf32 (no tensor cores);
    `fp32`: fp32 operands (as tf32 when not `ieee`: twice the bytes of a half tile); `x3`: fp32
    operands as tf32x3 (each operand tile also held as its high and low tf32 parts).
    MLCL_FAST_TRITON_TILE overrides the tile."""
    if owner not in OWNERS:
        raise ValueError(f"owner: expected one of {list(OWNERS)}, got {owner!r}")
    if kind not in TILE_KINDS:
        raise ValueError(f"kind: expected one of {list(TILE_KINDS)}, got {kind!r}")
    if interpret:
        # Small tiles so that the CPU tests cross tile, chunk and padding boundaries.
        return TileConfig(block_m=16, block_n=16, block_k=16, block_d=16, num_warps=1, num_stages=1)
    # The dense label mode's transposed column kernel (backward.cols_dense_kernel) keeps its column
    # block resident at d <= 256 like the label-free kernels.
    resident = kind not in ("in_tile", "dense", "dense_label") or (owner == "columns" and kind in DENSE_RESIDENT_KINDS)
    chunk = max(16, min(pow2(dim), FREE_MAX_CHUNK if resident else LABEL_MAX_CHUNK))
    if ieee:
        chunk = min(chunk, IEEE_CHUNK)
    elif fp32:
        chunk = min(chunk, X3_CHUNK if x3 else LABEL_MAX_CHUNK)  # 256 fp32 features resident spill (static report)
    forced = forced_tile(chunk, owner, kind)
    if forced is not None:
        return forced
    if ieee:
        bm, bn, warps = IEEE_TILE
        return TileConfig(block_m=bm, block_n=bn, block_k=chunk, block_d=chunk, num_warps=warps, num_stages=2)
    if kind == "dense":
        # Overlap dot + pair weights per tile: 64 x 64 over 8 warps for both kernel families; the
        # transposed column kernel with 256 features resident sweeps 32 anchors (64 spill: static
        # report).
        block_m = 32 if owner == "columns" and chunk > LABEL_MAX_CHUNK else 64
        return TileConfig(block_m=block_m, block_n=64, block_k=chunk, block_d=chunk, num_warps=8, num_stages=2)
    if kind == "dense_label":
        # Two [BLOCK_M, 64] label-sum accumulators besides the tile: the swept side halves. The
        # transposed column kernel owns 64 columns (the M of its products) and sweeps 32 anchors,
        # 16 with 256 features resident (32 spill there: static report).
        if owner == "columns":
            return TileConfig(block_m=16 if chunk > LABEL_MAX_CHUNK else 32, block_n=64, block_k=chunk,
                              block_d=chunk, num_warps=8, num_stages=2)
        return TileConfig(block_m=64, block_n=32, block_k=chunk, block_d=chunk, num_warps=8, num_stages=2)
    if kind != "in_tile":
        # Label-free sweeps (a logit GEMM, one exp2 per pair, a gradient GEMM; "head" adds two
        # fp16 dots of HEAD_LABELS): wgmma needs 64 rows per warpgroup in the M dimension of
        # both products. Anchor-owned kernels put the anchor block there, the transposed column
        # kernel the column block. Chosen from the static report (python -m bench.kernels) as the
        # largest tiles that compile to wgmma without spills at d = 128 and 256; the 256-wide
        # gradient accumulator takes half the registers of 8 warps, so d > 128 (and the head
        # tiles) halve the swept side.
        wide = chunk > 128 or fp32
        if owner == "symmetric":
            # The symmetric column kernel (backward.cols_free_kernel with SYM) holds a second
            # set of pair tiles (the owners' probabilities and head weights): 128 owned columns
            # over 32 anchors (16 when wide) is the largest that compiles without spills (static
            # report, bf16 and fp16, d = 128 and 256).
            return TileConfig(block_m=16 if wide else 32, block_n=128, block_k=chunk, block_d=chunk, num_warps=8,
                              num_stages=2)
        if owner == "columns":
            block_m = 32 if wide and kind == "head" else 64
            return TileConfig(block_m=block_m, block_n=64 if wide else 128, block_k=chunk, block_d=chunk,
                              num_warps=8, num_stages=2)
        if wide:
            block_n = 32 if kind == "head" else 64
            # The head tiles' second sweep (rows_kernel) with half operands pipelines 3 stages deep:
            # 7 % faster at T1 (L = 262144, bf16, d = 256) on an H200, 96 KB of shared memory, no
            # spills; 3 stages in the other families measured no gain (bench/RESULTS.md).
            stages = 3 if kind == "head" and not fp32 else 2
            return TileConfig(block_m=64, block_n=block_n, block_k=chunk, block_d=chunk, num_warps=8,
                              num_stages=stages)
        return TileConfig(block_m=64 if kind == "head" else 128, block_n=64, block_k=chunk, block_d=chunk,
                          num_warps=8, num_stages=2)
    # In-tile label work: small owned blocks (64 x 64 tiles spill registers with the label loops).
    # Measured per kernel on an H100 for reg, N=4096, d=128 (bench/RESULTS.md): anchor-owned
    # kernels fastest at 16 x 64, the column-owned kernel at 32 x 32.
    if owner == "columns":
        return TileConfig(block_m=32, block_n=32, block_k=chunk, block_d=chunk, num_warps=4, num_stages=2)
    return TileConfig(block_m=16, block_n=64, block_k=chunk, block_d=chunk, num_warps=4, num_stages=2)


def forced_tile(chunk: int, owner: str = "anchors", kind: str = "in_tile") -> TileConfig | None:
    """MLCL_FAST_TRITON_TILE fixes tiles for measurements (bench/profile.py, bench/gpu_targets.py);
    the feature chunk stays `chunk`. Either "BLOCK_M,BLOCK_N,num_warps,num_stages" for every
    kernel, or ";"-separated entries "KIND:OWNER=BLOCK_M,BLOCK_N,num_warps,num_stages" (KIND one of
    TILE_KINDS, OWNER one of OWNERS, either may be "*") for the kernel families they match, the
    first match winning: one kernel's tile changes while the others keep the defaults, which a
    single tile for all cannot do without spilling some of them (static report)."""
    text = os.environ.get("MLCL_FAST_TRITON_TILE")
    if not text:
        return None
    name = "MLCL_FAST_TRITON_TILE"
    if "=" not in text:
        return _parse_tile(name, text, chunk)
    chosen = None
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        family, sep, value = entry.partition("=")
        want_kind, colon, want_owner = family.strip().partition(":")
        if not sep or not colon:
            raise ValueError(f"{name}: expected entries 'KIND:OWNER=BLOCK_M,BLOCK_N,num_warps,num_stages', got {entry!r}")
        if want_kind not in TILE_KINDS + ("*",):
            raise ValueError(f"{name}: kind must be one of {list(TILE_KINDS)} or '*', got {want_kind!r}")
        if want_owner not in OWNERS + ("*",):
            raise ValueError(f"{name}: owner must be one of {list(OWNERS)} or '*', got {want_owner!r}")
        tile = _parse_tile(name, value, chunk)  # every entry is checked, matching or not
        if chosen is None and want_kind in ("*", kind) and want_owner in ("*", owner):
            chosen = tile
    return chosen


def _parse_tile(name: str, text: str, chunk: int) -> TileConfig:
    try:
        bm, bn, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{name}: expected 'BLOCK_M,BLOCK_N,num_warps,num_stages', got {text!r}") from None
    for what, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("num_warps", warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}: {what} must be a power of two, got {v}")
    return TileConfig(block_m=max(bm, 16), block_n=max(bn, 16), block_k=chunk, block_d=chunk,
                      num_warps=warps, num_stages=max(stages, 1))


def autotune_enabled() -> bool:
    return os.environ.get("MLCL_FAST_AUTOTUNE", "0") == "1"


def autotune_candidates(dim: int, kind: str = "in_tile") -> list[TileConfig]:
    """Candidates tried per (|A|, |C|, d) when MLCL_FAST_AUTOTUNE=1."""
    base = tile_config(dim, interpret=False, kind=kind)
    shapes = ((32, 64, 4), (64, 64, 4), (16, 64, 4), (32, 32, 4), (64, 32, 4)) if kind == "in_tile" else \
        ((64, 64, 8), (128, 64, 8), (64, 128, 8), (64, 32, 8), (32, 64, 8))
    return [TileConfig(bm, bn, base.block_k, base.block_d, warps, stages)
            for bm, bn, warps in shapes for stages in (2, 3)]


def grad_mode() -> str:
    """MLCL_FAST_TRITON_GRAD: 'forward' (default: when a gradient will be needed, the forward's
    second sweep also produces the anchor-row gradient; the backward runs the column kernel only)
    or 'recompute' (the backward re-derives everything from the forward statistics), or 'symmetric'
    (as 'recompute', and the closed form's backward sweeps each tile once for both the column
    gradient and the anchor rows owning those columns where launch.symmetric_applies; other regimes
    take 'recompute'). README.md compares their costs."""
    mode = os.environ.get("MLCL_FAST_TRITON_GRAD", "forward")
    if mode not in GRAD_MODES:
        raise ValueError(f"MLCL_FAST_TRITON_GRAD: expected one of {list(GRAD_MODES)}, got {mode!r}")
    return mode


def fp32_precision(torch_allows_tf32: bool) -> str:
    """The tl.dot precision of fp32 operands: MLCL_FAST_TRITON_FP32 (one of FP32_PRECISIONS, or
    "auto", the default: "tf32" when torch's matmul setting allows it, else "ieee")."""
    text = os.environ.get(FP32_PRECISION_ENV, "auto")
    if text == "auto":
        return "tf32" if torch_allows_tf32 else "ieee"
    if text not in FP32_PRECISIONS:
        raise ValueError(f"{FP32_PRECISION_ENV}: expected 'auto' or one of {list(FP32_PRECISIONS)}, got {text!r}")
    return text


def forced_regime() -> str | None:
    """MLCL_FAST_TRITON_LABELS forces a label regime (for tests and measurements)."""
    regime = os.environ.get("MLCL_FAST_TRITON_LABELS")
    if regime is not None and regime not in REGIMES:
        raise ValueError(f"MLCL_FAST_TRITON_LABELS: expected one of {list(REGIMES)}, got {regime!r}")
    return regime


def closed_form(weighting: int, factor: int, alpha: float) -> bool:
    """Whether the closed-form regime (closed.py) computes this configuration: label-centric
    weights whose pair factor is 1 on every positive (f=one, or f=overlap with alpha=0), with or
    without the regulariser."""
    one = factor == FACTOR_CODES["one"] or (factor == FACTOR_CODES["overlap"] and alpha == 0)
    return weighting == WEIGHTING_CODES["label"] and one


def pairs_head_width(num_labels: int) -> int:
    """Head labels of the pairs regime: PAIRS_HEAD_LABELS, at most L."""
    return min(PAIRS_HEAD_LABELS, num_labels)


def choose_regime(num_labels: int, anchor_width: int, column_width: int, num_anchors: int, num_columns: int,
                  dim: int, triples: int | None, closed: bool = False, head: bool = False) -> str:
    """The label regime for one call. `triples` (positive (anchor, label, column) triples; with a
    `head`, those of labels outside it) is None when it is unknown, e.g. while torch.compile
    traces: then only the static rules apply. `closed`: the configuration has a closed form
    (closed_form), which needs no label work in the sweeps, no host synchronisation and O(nnz d)
    label sums: always taken. `head`: the pairs regime sweeps on the dense label mode's tiles over
    a head of labels (wgmma) and is preferred to the in-tile modes whenever its list fits."""
    if closed:
        return "closed"
    if num_labels <= DENSE_MAX_LABELS:
        return "dense"
    words = -(-num_labels // 32)
    few = False
    if triples is not None:
        budget = PAIRS_MAX_PER_ROW * (num_anchors + num_columns) * (dim + max(anchor_width, column_width))
        few = triples <= budget and triples <= PAIRS_MAX_DENSITY * num_anchors * num_columns
    if few and head:
        return "pairs"
    if words <= BITS_MAX_WORDS:
        return "bits"
    if few:
        return "pairs"
    if words <= GATHER_MAX_WORDS and column_width >= GATHER_MIN_LIST_WIDTH:
        return "gather"
    return "list"
