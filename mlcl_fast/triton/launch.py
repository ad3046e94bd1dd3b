"""Kernel launches: grids, meta-parameters, fixed or autotuned configurations.

`labels` is the tuple (self_col [M], a_index [M, KA], a_bits [M, W], a_count [M], table [C, *],
c_count [C]) of int32 tensors, in the kernels' argument order.

`wrap` is torch.library.wrap_triton inside triton_op bodies (so torch.compile sees the kernels)
and the identity inside opaque custom ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import triton
from torch import Tensor
from triton.runtime.jit import JITFunction

from . import backward, configs, forward, recording
from .configs import MODE_BITS, TileConfig

INTERPRETED = not isinstance(forward.stats_kernel, JITFunction)
if INTERPRETED == isinstance(triton.language.zeros, JITFunction):
    raise ImportError("mlcl_fast.triton: TRITON_INTERPRET changed after triton was imported; set it (or not) "
                      "before the first import of triton")


@dataclass(frozen=True)
class Geometry:
    """Everything scalar a launch needs, besides the tensors."""
    num_anchors: int       # M
    num_columns: int       # C
    num_samples: int       # N: columns >= N are prototypes
    col_lo: int            # first softmax column (N when beta = 0)
    dim: int
    anchor_width: int      # KA (>= 1)
    slots: int             # power of two >= KA: width of the label-centric normaliser arrays
    table_width: int       # columns of the column label table
    inv_tau: float
    log_beta: float
    alpha: float
    mode: int
    weighting: int
    factor: int
    hard: bool
    reg: bool
    precision: str         # tl.dot input_precision of fp32 operands (configs.FP32_PRECISIONS; moot for halves)
    half: bool             # fp16/bf16 operands

    @property
    def labels(self) -> bool:
        """Label work inside the tiles (bits / gather / list / dense): the kernels' LABELS switch."""
        return self.mode in configs.IN_TILE_MODES

    @property
    def head(self) -> bool:
        return self.mode == configs.MODE_HEAD

    @property
    def ieee(self) -> bool:
        """fp32 operands whose dots run as IEEE fp32 (FFMA, no tensor cores)."""
        return self.precision == "ieee" and not self.half

    @property
    def tile_kind(self) -> str:
        """configs.tile_config's `kind`: the label work of the sweeps."""
        if self.mode == configs.MODE_DENSE:  # overlaps (and label sums) as dots: no per-slot label loops
            return "dense_label" if self.weighting == configs.WEIGHTING_CODES["label"] else "dense"
        return "in_tile" if self.labels else ("head" if self.head else "free")

    @property
    def scale2(self) -> float:
        """log2(e) / tau: the kernels' logits are in base-2 units (exp2 per pair)."""
        return self.inv_tau * configs.LOG2E

    @property
    def log2_beta(self) -> float:
        return self.log_beta * configs.LOG2E

    @property
    def words(self) -> int:
        return self.table_width if self.mode in (MODE_BITS, configs.MODE_HEAD, configs.MODE_DENSE) else 1


def label_free(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, num_samples: int,
               col_lo: int, inv_tau: float, log_beta: float, fp32_precision: str) -> tuple[tuple, Geometry]:
    """(label tuple, geometry) of the dense kernels without positives (configs.MODE_NONE), for the
    regimes that add the positives' part outside the sweeps (closed.py, pairs.py)."""
    # MODE_NONE reads no anchor or column labels: [M, 1] and [C, 1] views stand in for them.
    none_a, none_c = self_col.view(-1, 1), c_count.view(-1, 1)
    labels = (self_col, none_a, none_a, a_count, none_c, c_count)
    return labels, geometry(q, k, labels, num_samples, col_lo, inv_tau, log_beta, 0.0, configs.MODE_NONE, 0, 0,
                            False, fp32_precision)


def head_overlaps(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, a_head: Tensor,
                  c_head: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float, weighting: int,
                  factor: int, alpha: float, reg: bool, fp32_precision: str) -> tuple[tuple, Geometry]:
    """(label tuple, geometry) of the dense label mode over head-label rows (pairs.py with a head):
    weights from the head overlap c^H_ij with the true label counts a_i, a_j (label-centric ones
    over the head labels' normalisers); the anchors' label lists are not read (an [M, 1] view
    stands in for them)."""
    labels = (self_col, self_col.view(-1, 1), a_head, a_count, c_head, c_count)
    return labels, geometry(q, k, labels, num_samples, col_lo, inv_tau, log_beta, alpha, configs.MODE_DENSE,
                            weighting, factor, reg, fp32_precision)


def head_tiles(q: Tensor, k: Tensor, self_col: Tensor, a_count: Tensor, c_count: Tensor, head_u: Tensor,
               head_y: Tensor, num_samples: int, col_lo: int, inv_tau: float, log_beta: float, reg: bool,
               fp32_precision: str) -> tuple[tuple, Geometry]:
    """(label tuple, geometry) of the closed form's second sweeps with its head-label tiles
    (configs.MODE_HEAD): head_u [M, 2*HB] fp16 rides in the anchor bitset slot, head_y [C, HB]
    fp16 in the column table slot."""
    # MODE_HEAD reads no anchor label lists: an [M, 1] view stands in for them.
    labels = (self_col, self_col.view(-1, 1), head_u, a_count, head_y, c_count)
    return labels, geometry(q, k, labels, num_samples, col_lo, inv_tau, log_beta, 0.0, configs.MODE_HEAD, 0, 0,
                            reg, fp32_precision)


def geometry(q: Tensor, k: Tensor, labels: tuple, num_samples: int, col_lo: int,
             inv_tau: float, log_beta: float, alpha: float, mode: int, weighting: int, factor: int,
             reg: bool, fp32_precision: str) -> Geometry:
    a_index, table = labels[1], labels[4]
    half = q.dtype in (torch.float16, torch.bfloat16)
    # The dense mode's label-centric sums are label-indexed: one slot per column of its label rows.
    dense_label = mode == configs.MODE_DENSE and weighting == configs.WEIGHTING_CODES["label"]
    slots = table.shape[1] if dense_label else configs.pow2(a_index.shape[1])
    return Geometry(q.shape[0], k.shape[0], num_samples, col_lo, q.shape[1], a_index.shape[1],
                    slots, table.shape[1], inv_tau, log_beta, alpha, mode, weighting, factor,
                    alpha < 0, reg, "tf32" if half else fp32_precision, half)


def _tile(g: Geometry, owner: str = "anchors") -> TileConfig:
    return configs.tile_config(g.dim, INTERPRETED, owner, g.tile_kind, ieee=g.ieee,
                               x3=g.precision == "tf32x3" and not g.half,
                               fp32=not g.half)


def _common(g: Geometry) -> dict:
    return dict(LABELS=g.labels, MODE=g.mode, WORDS=g.words, WEIGHTING=g.weighting, FACTOR=g.factor,
                HARD=g.hard, NATIVE=not INTERPRETED, PRECISION=g.precision)


_tuned: dict = {}


def _kernel(fn, name: str, dim: int, kind: str):
    """`fn`, or its autotuned form (over BLOCK_M, BLOCK_N, warps, stages) when MLCL_FAST_AUTOTUNE=1."""
    if INTERPRETED or not configs.autotune_enabled():
        return fn
    key = (name, dim, kind)
    if key not in _tuned:
        cands = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                               num_stages=c.num_stages) for c in configs.autotune_candidates(dim, kind)]
        # Label work differs by mode and weighting, so each gets its own tuned configuration.
        keys = [a for a in ("M", "C", "d", "MODE", "WEIGHTING", "FACTOR") if a in fn.arg_names]
        _tuned[key] = triton.autotune(configs=cands, key=keys)(fn)
    return _tuned[key]


def _launch(fn, name: str, g: Geometry, cfg: TileConfig, grid_fn, wrap, args: tuple, meta: dict):
    kernel = _kernel(fn, name, g.dim, g.tile_kind)
    if kernel is fn:
        meta = dict(meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
        grid = grid_fn({"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n})
    else:
        grid = grid_fn
    recording.launch(kernel, grid, args, meta, wrap)


def visiting(num_anchors: int, device, visit: tuple | None = None) -> tuple[Tensor, Tensor]:
    """(order [M] int32, live [1] int32): the kernels visit anchors order[0..live) and skip the
    rest (whose outputs stay 0). Default: every anchor in its own order."""
    if visit is not None:
        return visit
    return (torch.arange(num_anchors, dtype=torch.int32, device=device),
            torch.full((1,), num_anchors, dtype=torch.int32, device=device))


# Under the interpreter the kernels' outputs start as +inf (POISON), so that the CPU tests see
# any element a kernel leaves unwritten (inf passes `> 0` tests and spreads through arithmetic,
# where NaN would fail both silently); compiled kernels get them uninitialised.
POISON = INTERPRETED


def _unfilled(*shape, device) -> Tensor:
    """An fp32 output every element of which a kernel writes (+inf first when POISON)."""
    if POISON:
        return torch.full(shape, float("inf"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def stats(q, k, labels: tuple, g: Geometry, wrap, visit: tuple | None = None, sums: tuple | None = None):
    """Forward sweep: (lse2 [M] = lse * log2(e), Z-or-Omega [M, slots], S-or-T [M, slots]), fp32
    (0 for anchors that `visit` skips). `sums` (the closed form's a_cid [M, Ka], u, u^T [M, Ka],
    ubar, ubar^T, W [M], E [U, d]): the same programs also give (forward.anchor_sums) the loss
    without the regulariser [M] and V^T [M, d], appended to the result."""
    M, dev = g.num_anchors, q.device
    # The kernel writes every anchor's outputs (zeros for those `visit` skips): no zero fill.
    lse = _unfilled(M, device=dev)
    acc_z = _unfilled(M, g.slots, device=dev)
    acc_s = _unfilled(M, g.slots, device=dev)
    out = (lse, acc_z, acc_s)
    if sums is not None:
        a_cid, u, u_tail, ubar, ubar_tail, w_tot, e = sums
        base, v_tail = _unfilled(M, device=dev), _unfilled(M, g.dim, device=dev)
        out += (base, v_tail)
        sum_args = (a_cid, u, u_tail, ubar, ubar_tail, w_tot, e, base, v_tail)
        sum_scalars = (a_cid.shape[1], g.inv_tau, e.stride(0), v_tail.stride(0))
    else:
        sum_args, sum_scalars = (lse,) * 9, (0, g.inv_tau, 0, 0)  # not read without SUMS
    if M == 0:
        return out
    cfg = _tile(g)
    block_k = cfg.block_k
    args = (q, k, *labels, *visiting(M, dev, visit), lse, acc_z, acc_s, *sum_args,
            M, g.num_columns, g.num_samples, g.col_lo, g.dim, g.anchor_width, g.slots, g.table_width,
            q.stride(0), k.stride(0), g.scale2, g.log2_beta, g.alpha, *sum_scalars)
    # The sums' [BLOCK_M, BLOCK_DS] tiles: 8 elements a thread (with their 64-bit addresses). At 4K
    # elements a tile the sweep took 124 registers (92 before the sums) and the fp32 IEEE one, on
    # 4 warps, spilled 40 bytes; at 8 a thread 94 / 96 (88), no spills (static report). The IEEE
    # sweep still spilled 16 bytes under Triton 3.6 (the H200 machine's): 4 a thread there, 80-84
    # registers under 3.6 and 3.9, no spills.
    block_ds = configs.block_width(g.dim, max(16, (128 if g.ieee else 256) * cfg.num_warps // cfg.block_m), INTERPRETED)
    meta = dict(_common(g), SLOTS=g.slots, BLOCK_K=block_k, Q_RESIDENT=g.dim <= block_k, SUMS=sums is not None,
                BLOCK_DS=block_ds)
    _launch(forward.stats_kernel, "stats", g, cfg, lambda m: (triton.cdiv(M, m["BLOCK_M"]),), wrap, args, meta)
    return out


def rows(q, k, labels: tuple, lse, w_tot, scale, inv_z, g_up, g: Geometry, wrap, reg_value: bool, grad: bool,
         visit: tuple | None = None, columns: tuple | None = None):
    """Anchor-owned second sweep: (dq [M, d] fp32 or None, sum_j r_ij s_ij [M] or None).
    `columns`: (list [n] int64, count [1] int32): sweep only col_list[0 .. count) (the symmetric
    backward's complement, symmetric_columns) instead of [col_lo, C)."""
    M, dev = g.num_anchors, q.device
    # The kernel writes the visited anchors' outputs; those `visit` skips stay zero. (Writing
    # their zeros in the kernel, as the statistics sweep does, costs registers this kernel does not
    # have: 8-32 spilled bytes in the static report.)
    alloc = _unfilled if visit is None else partial(torch.zeros, dtype=torch.float32)
    dq = alloc(M if grad else 0, g.dim, device=dev)
    reg = alloc(M if reg_value else 0, device=dev)
    if M == 0 or not (grad or reg_value):
        return (dq if grad else None), (reg if reg_value else None)
    cfg = _tile(g)
    # Without a gradient to produce, one program per anchor block covers the whole of d.
    block_d = cfg.block_d if grad else 16
    d_chunks = triton.cdiv(g.dim, block_d) if grad else 1
    col_list, col_count = columns if columns is not None else (labels[0], labels[0])  # unread without GATHER
    args = (q, k, *labels, *visiting(M, dev, visit), col_list, col_count, lse, w_tot, scale, inv_z,
            g_up, dq if grad else lse, reg if reg_value else lse,
            M, g.num_columns, g.num_samples, g.col_lo, g.dim, g.anchor_width, g.slots, g.table_width,
            q.stride(0), k.stride(0), g.dim, g.scale2, g.log2_beta, g.alpha)
    meta = dict(_common(g), REG=g.reg, REG_VALUE=reg_value, GRAD=grad, BLOCK_K=cfg.block_k, BLOCK_D=block_d,
                Q_RESIDENT=g.dim <= cfg.block_k, GATHER=columns is not None)
    _launch(backward.rows_kernel, "rows", g, cfg, lambda m: (triton.cdiv(M, m["BLOCK_M"]), d_chunks), wrap, args, meta)
    return (dq if grad else None), (reg if reg_value else None)


def symmetric_applies(g: Geometry) -> bool:
    """Whether the symmetric backward (backward.cols_free_kernel with SYM) can run: the label-free
    transposed column kernel (d within its resident block) over every column (col_lo = 0, so every
    anchor's own column is swept)."""
    return not g.labels and g.col_lo == 0 and g.dim <= _tile(g, "columns").block_k


def symmetric_columns(col_owner: Tensor, w_tot: Tensor) -> tuple[Tensor, Tensor]:
    """(list [C] int64, count [1] int32): the columns that no anchor with a positive owns, first, in
    ascending order; the symmetric backward's anchor-row sweep covers them (the owned ones come
    with their owner's column block). Static shapes, no host read."""
    own = col_owner.long()
    # Owners lie in [-1, M); the upper bound only keeps a recorded call (no kernel ran, so the
    # owners hold no values: recording.py) in range.
    owned = (own >= 0) & (w_tot[own.clamp(0, max(w_tot.numel() - 1, 0))] > 0)
    col_list = torch.sort(owned.to(torch.uint8), stable=True).indices
    return col_list, (~owned).sum(dtype=torch.int32).view(1)


def cols(q, k, labels: tuple, lse, w_tot, scale, inv_z, g_up, g: Geometry, wrap, visit: tuple | None = None,
         owners: Tensor | None = None):
    """Column-owned gradient: dk [C, d] fp32 (zero for columns outside the softmax range).
    `owners` (col_owner [C] int32, only where symmetric_applies): the symmetric backward, which
    also returns in dk_j the anchor-row gradient of the anchor owning column j over the columns
    that visited anchors own (backward.cols_free_kernel)."""
    C, dev = g.num_columns, q.device
    width = C - g.col_lo
    # Every kernel below writes each column of [col_lo, C); the columns before it (beta = 0: in
    # no softmax) get no gradient.
    dk = _unfilled(C, g.dim, device=dev) if g.col_lo == 0 and g.num_anchors else \
        torch.zeros(C, g.dim, dtype=torch.float32, device=dev)
    if g.num_anchors == 0 or width <= 0:
        return dk
    if owners is not None and not symmetric_applies(g):
        raise ValueError("owners: the symmetric backward needs the label-free column kernel and col_lo = 0")
    cfg = _tile(g, "columns" if owners is None else "symmetric")
    if not g.labels and g.dim <= cfg.block_k:
        # Label-free and the column block fits: the transposed kernel, one program per column block.
        # MODE_HEAD: labels[2] / labels[4] / scale are the head tiles (head_u, head_y, row scales).
        head = g.head
        args = (q, k, labels[0], labels[0] if owners is None else owners, *visiting(g.num_anchors, dev, visit), lse,
                w_tot, g_up, labels[2], labels[4], scale, dk, g.num_anchors, C,
                g.num_samples, g.col_lo, g.dim, q.stride(0), k.stride(0), g.dim, g.scale2, g.log2_beta)
        meta = dict(HEAD=head, REG=g.reg, SYM=owners is not None, HB=g.words if head else 16, BLOCK_K=cfg.block_k,
                    PRECISION=g.precision)
        _launch(backward.cols_free_kernel, "cols_free" if owners is None else "cols_sym", g, cfg,
                lambda m: (triton.cdiv(width, m["BLOCK_N"]),), wrap, args, meta)
        return dk
    if g.mode == configs.MODE_DENSE and g.dim <= cfg.block_k:
        # The dense label mode, transposed as above: its label dots also have the owned columns as M.
        self_col, _, a_bits, a_count, table, c_count = labels
        args = (q, k, self_col, a_bits, a_count, table, c_count, *visiting(g.num_anchors, dev, visit), lse, w_tot,
                scale, inv_z, g_up, dk, g.num_anchors, C, g.num_samples, g.col_lo, g.dim, g.slots, q.stride(0),
                k.stride(0), g.dim, g.scale2, g.log2_beta, g.alpha)
        meta = dict(WORDS=g.words, WEIGHTING=g.weighting, FACTOR=g.factor, HARD=g.hard, REG=g.reg,
                    BLOCK_K=cfg.block_k, PRECISION=g.precision)
        _launch(backward.cols_dense_kernel, "cols_dense", g, cfg, lambda m: (triton.cdiv(width, m["BLOCK_N"]),),
                wrap, args, meta)
        return dk
    args = (q, k, *labels, *visiting(g.num_anchors, dev, visit), lse, w_tot, scale, inv_z, g_up, dk,
            g.num_anchors, C, g.num_samples, g.col_lo, g.dim, g.anchor_width, g.slots, g.table_width,
            q.stride(0), k.stride(0), g.dim, g.scale2, g.log2_beta, g.alpha)
    meta = dict(_common(g), REG=g.reg, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, K_RESIDENT=g.dim <= cfg.block_k)
    d_chunks = triton.cdiv(g.dim, cfg.block_d)
    _launch(backward.cols_kernel, "cols", g, cfg, lambda m: (triton.cdiv(width, m["BLOCK_N"]), d_chunks), wrap, args,
            meta)
    return dk
