"""Row normalisation x / max(||x||, NORM_EPS) as two kernels (forward, backward), the triton
backend's form of inputs.l2_normalize for fp16/bf16/fp32 rows: one launch each way for the
features, keys and prototypes together, written into one stacked tensor (the Problem's columns,
so no concatenation follows), where the torch formulation issues four operations forward and
eight backward per tensor (each is host time on a GPU; tests/test_triton.py counts them).

No overflow or underflow for any finite row: the sum of squares is taken of x / m, m the row's
largest magnitude (every term <= 1; both in one pass over the row, rescaled as m grows), and y = (x / m) / max(r, NORM_EPS / m) with r = ||x / m||, so
neither the norm m r (which may exceed the fp32 range) nor its square is ever formed. The sums are
fp32 (the torch formulation's are fp64): the rows agree to a few fp32 ulps. The backward is the
closed form dx = (g - y (y . g) [||x|| >= NORM_EPS]) / max(||x||, NORM_EPS), with y recomputed in
fp32 from x (the saved inputs), not read back from a half-precision output.

`unit_rows` is a triton_op (torch.compile sees the kernels) with register_autograd."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..inputs import NORM_EPS
from . import launch, recording

_HALF_OR_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _block(ptr, rows, rmask, cols, d, stride):
    """[BLOCK_R, BLOCK_D] of rows `rows`, columns `cols` (zeros outside), as fp32."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & (cols < d)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _unit_block(x_ptr, y_ptr, inv_ptr, radial_ptr, first, R, out_row, d, stride_x, stride_y, eps,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [first, first + BLOCK_R) of x ([R, d]) into rows out_row + ... of y, inv, radial."""
    rows = first + tl.arange(0, BLOCK_R)
    rmask = rows < R
    out = out_row + rows
    offs = tl.arange(0, BLOCK_D)
    # One pass for the largest magnitude m and the sum of squares of x / m: as m grows, the sum so
    # far is rescaled by (m_old / m_new)^2 (every term stays <= 1, as in an online log-sum-exp).
    m = tl.zeros([BLOCK_R], dtype=tl.float32)
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        x = _block(x_ptr, rows, rmask, start + offs, d, stride_x)
        m_new = tl.maximum(m, tl.max(tl.abs(x), axis=1))
        safe_new = tl.where(m_new > 0, m_new, 1.0)
        u = x / safe_new[:, None]
        shrink = m / safe_new
        ss = ss * shrink * shrink + tl.sum(u * u, axis=1)
        m = m_new
    safe = tl.where(m > 0, m, 1.0)
    r = tl.sqrt(ss)
    floor = eps / safe                      # ||x|| >= eps  <=>  r >= eps / m
    radial = (r >= floor) & (m > 0)
    unit = tl.maximum(r, floor)             # max(||x||, eps) / m
    for start in range(0, d, BLOCK_D):
        cols = start + offs
        x = _block(x_ptr, rows, rmask, cols, d, stride_x)
        y = (x / safe[:, None]) / unit[:, None]
        tl.store(y_ptr + out[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < d)[None, :])
    # 1 / max(||x||, eps) = (1 / m) / unit: tiny (even subnormal) for huge rows, never inf or nan.
    tl.store(inv_ptr + out, (1.0 / safe) / unit, mask=rmask)
    tl.store(radial_ptr + out, radial.to(tl.float32), mask=rmask)


@triton.jit
def unit_rows_kernel(x0, x1, x2, y_ptr, inv_ptr, radial_ptr, R0, R1, R2, d, stride0, stride1, stride2, stride_y, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Up to three row sets (x0, x1, x2: [R_s, d], any of fp16/bf16/fp32 each) normalised into one
    [R0 + R1 + R2, d] output, one launch (unit_sets)."""
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    eps = tl.cast(eps, tl.float32)
    unit_sets(tl.program_id(0), x0, x1, x2, y_ptr, inv_ptr, radial_ptr, R0, R1, R2, d, stride0, stride1, stride2,
              stride_y, eps, BLOCK_R, BLOCK_D)


@triton.jit
def unit_sets(pid, x0, x1, x2, y_ptr, inv_ptr, radial_ptr, R0, R1, R2, d, stride0, stride1, stride2, stride_y, eps,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program `pid` of the three row sets' cdiv(R0, BLOCK_R) + cdiv(R1, BLOCK_R) + cdiv(R2, BLOCK_R):
    the first take x0's rows, the next x1's, the rest x2's (also a role of
    prologue.prologue_kernel)."""
    b0 = tl.cdiv(R0, BLOCK_R)
    b1 = tl.cdiv(R1, BLOCK_R)
    if pid < b0:
        _unit_block(x0, y_ptr, inv_ptr, radial_ptr, pid * BLOCK_R, R0, 0, d, stride0, stride_y, eps,
                    BLOCK_R, BLOCK_D)
    elif pid < b0 + b1:
        _unit_block(x1, y_ptr, inv_ptr, radial_ptr, (pid - b0) * BLOCK_R, R1, R0, d, stride1, stride_y, eps,
                    BLOCK_R, BLOCK_D)
    else:
        _unit_block(x2, y_ptr, inv_ptr, radial_ptr, (pid - b0 - b1) * BLOCK_R, R2, R0 + R1, d, stride2, stride_y,
                    eps, BLOCK_R, BLOCK_D)


@triton.jit
def _unit_block_backward(g_ptr, x_ptr, inv_ptr, radial_ptr, dx_ptr, first, R, in_row, d, stride_g, stride_x,
                         stride_dx, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx rows [first, first + BLOCK_R) of one row set (x) from rows in_row + ... of g, inv, radial.
    The direction y = x / max(||x||, eps) is recomputed in fp32 from x, not read from the output:
    where the gradient is nearly along y its tangential part g - y (y . g) is a small difference,
    and a half-precision y (rounded by 2^-9 in bf16) would put its rounding into it (2.4 % of a
    bf16 gradient at d = 2 in the long fuzz)."""
    rows = first + tl.arange(0, BLOCK_R)
    rmask = rows < R
    src = in_row + rows
    offs = tl.arange(0, BLOCK_D)
    inv = tl.load(inv_ptr + src, mask=rmask, other=0.0)
    along = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + offs
        y = _block(x_ptr, rows, rmask, cols, d, stride_x) * inv[:, None]
        along += tl.sum(y * _block(g_ptr, src, rmask, cols, d, stride_g), axis=1)
    # Below the floor the map is x / eps: no radial part.
    along = along * tl.load(radial_ptr + src, mask=rmask, other=0.0)
    for start in range(0, d, BLOCK_D):
        cols = start + offs
        g = _block(g_ptr, src, rmask, cols, d, stride_g)
        y = _block(x_ptr, rows, rmask, cols, d, stride_x) * inv[:, None]
        dx = (g - y * along[:, None]) * inv[:, None]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < d)[None, :])


@triton.jit
def unit_rows_backward_kernel(g_ptr, x0, x1, x2, inv_ptr, radial_ptr, dx0, dx1, dx2, R0, R1, R2, d, stride_g,
                              sx0, sx1, sx2, stride0, stride1, stride2, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradients of unit_rows_kernel's row sets, each in its own dtype, one launch."""
    pid = tl.program_id(0)
    b0 = tl.cdiv(R0, BLOCK_R)
    b1 = tl.cdiv(R1, BLOCK_R)
    if pid < b0:
        _unit_block_backward(g_ptr, x0, inv_ptr, radial_ptr, dx0, pid * BLOCK_R, R0, 0, d, stride_g, sx0, stride0,
                             BLOCK_R, BLOCK_D)
    elif pid < b0 + b1:
        _unit_block_backward(g_ptr, x1, inv_ptr, radial_ptr, dx1, (pid - b0) * BLOCK_R, R1, R0, d, stride_g, sx1,
                             stride1, BLOCK_R, BLOCK_D)
    else:
        _unit_block_backward(g_ptr, x2, inv_ptr, radial_ptr, dx2, (pid - b0 - b1) * BLOCK_R, R2, R0 + R1, d,
                             stride_g, sx2, stride2, BLOCK_R, BLOCK_D)


def blocks(d: int) -> tuple[int, int]:
    if launch.INTERPRETED:
        return 16, 16  # small blocks: the CPU tests cross block boundaries
    return 8, max(16, min(triton.next_power_of_2(max(d, 1)), 256))


def _check(name: str, t: Tensor) -> None:
    if t.dtype not in _HALF_OR_SINGLE:
        raise TypeError(f"{name}: expected one of {list(_HALF_OR_SINGLE)}, got {t.dtype}")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a 2-D tensor with unit stride along its rows, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")


def grid_size(sizes, br: int) -> int:
    return sum(triton.cdiv(r, br) for r in sizes)


def check_parts(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], out_dtype: torch.dtype) -> list[int]:
    """The forward's arguments; returns the three row counts."""
    parts = [("x", x), ("x1", x1), ("x2", x2)]
    for name, t in parts:
        if t is not None:
            _check(name, t)
            if t.shape[1] != x.shape[1] or t.device != x.device:
                raise ValueError(f"{name}: expected [*, {x.shape[1]}] rows on {x.device}, got {tuple(t.shape)} on "
                                 f"{t.device}")
    if out_dtype not in _HALF_OR_SINGLE:
        raise TypeError(f"out_dtype: expected one of {list(_HALF_OR_SINGLE)}, got {out_dtype}")
    return [0 if t is None else t.shape[0] for _, t in parts]


def outputs(x: Tensor, sizes: list[int], out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(y [R, d] in out_dtype, inv [R], radial [R] fp32), unfilled: what the kernel writes."""
    R = sum(sizes)
    return (torch.empty(R, x.shape[1], dtype=out_dtype, device=x.device),
            torch.empty(R, dtype=torch.float32, device=x.device), torch.empty(R, dtype=torch.float32, device=x.device))


def _sets(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor]) -> list[Tensor]:
    """The three row sets as kernel arguments: an absent set has no rows, x stands in (never read)."""
    return [x if t is None else t for t in (x, x1, x2)]


def unit_args(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], sizes: list[int], y: Tensor, inv: Tensor,
              radial: Tensor) -> tuple:
    """unit_sets' tensor and scalar arguments."""
    src = _sets(x, x1, x2)
    return (*src, y, inv, radial, *sizes, x.shape[1], *(t.stride(0) for t in src), y.stride(0), NORM_EPS)


@triton_op("mlcl_fast::triton_unit_rows", mutates_args=())
def unit_rows_forward(x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], out_dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of x, then x1's, then x2's (each optional, [R_s, d]), normalised into one
    (y [R, d] in out_dtype, 1 / max(||x||, eps) [R] fp32, [||x|| >= eps] [R] fp32)."""
    sizes = check_parts(x, x1, x2, out_dtype)
    y, inv, radial = outputs(x, sizes, out_dtype)
    if sum(sizes):
        br, bd = blocks(x.shape[1])
        recording.launch(unit_rows_kernel, (grid_size(sizes, br),), unit_args(x, x1, x2, sizes, y, inv, radial),
                         dict(BLOCK_R=br, BLOCK_D=bd), wrap_triton)
    return y, inv, radial


@triton_op("mlcl_fast::triton_unit_rows_backward", mutates_args=())
def unit_rows_backward(g: Tensor, x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], inv: Tensor,
                       radial: Tensor) -> list[Tensor]:
    """dx of the three row sets of unit_rows_forward(x, x1, x2, ...) (each in its own dtype) from
    the gradient g of its stacked output and its inv, radial."""
    _check("g", g)
    sizes = check_parts(x, x1, x2, g.dtype)
    R, d = sum(sizes), x.shape[1]
    if g.shape != (R, d):
        raise ValueError(f"g: expected the stacked rows' shape {(R, d)}, got {tuple(g.shape)}")
    for name, t in (("inv", inv), ("radial", radial)):
        if t.dtype != torch.float32 or t.shape != (R,):
            raise ValueError(f"{name}: expected float32 of shape ({R},), got {t.dtype} of shape {tuple(t.shape)}")
    src = _sets(x, x1, x2)
    dx = [torch.empty(r, d, dtype=t.dtype, device=x.device) for r, t in zip(sizes, src)]
    if R:
        br, bd = blocks(d)
        recording.launch(unit_rows_backward_kernel, (grid_size(sizes, br),),
                         (g, *src, inv, radial, *dx, *sizes, d, g.stride(0), *(t.stride(0) for t in src),
                          *(t.stride(0) for t in dx)),
                         dict(BLOCK_R=br, BLOCK_D=bd), wrap_triton)
    return dx


def save_context(ctx, parts, output) -> None:
    """What the backward of a forward normalising `parts` (three, each optional) into `output`
    (y, inv, radial) needs: setup_context of unit_rows_forward and of prologue.prologue_op. The
    parts themselves, not y: the backward recomputes the direction in fp32."""
    _, inv, radial = output
    ctx.present = [t is not None for t in parts]
    ctx.set_materialize_grads(False)  # only y is differentiated: no zero gradients for the rest
    ctx.save_for_backward(*parts, inv, radial)


def parts_backward(ctx, g_y) -> tuple:
    """The gradients of the three parts saved by save_context (None for absent ones)."""
    if g_y is None:
        return None, None, None
    x, x1, x2, inv, radial = ctx.saved_tensors
    g = g_y if g_y.stride(-1) == 1 else g_y.contiguous()
    dx = unit_rows_backward(g, x, x1, x2, inv, radial)
    return tuple(d if present else None for d, present in zip(dx, ctx.present))


def _setup_context(ctx, inputs, output):
    save_context(ctx, inputs[:3], output)


def _backward(ctx, g_y, *_unused):
    return (*parts_backward(ctx, g_y), None)


unit_rows_forward.register_autograd(_backward, setup_context=_setup_context)


def as_parts(parts: list[Tensor]) -> list[Optional[Tensor]]:
    """One to three 2-D tensors as the forward's three parts (rows of unit stride, None for absent)."""
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"parts: expected one to three tensors, got {len(parts)}")
    parts = [t.contiguous() if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1 else t for t in parts]
    return parts + [None] * (3 - len(parts))


def unit_rows(parts: list[Tensor], out_dtype: torch.dtype) -> Tensor:
    """x / max(||x||, NORM_EPS) per row of each 2-D fp16/bf16/fp32 tensor of `parts` (one to
    three), stacked into one [sum of rows, d] tensor in out_dtype by one launch each way (the
    inputs' normaliser hook, see inputs.prepare)."""
    return unit_rows_forward(*as_parts(parts), out_dtype)[0]
