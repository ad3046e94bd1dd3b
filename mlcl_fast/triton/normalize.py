"""Row normalisation x / max(||x||, NORM_EPS) as two kernels (forward, backward), the triton
backend's form of inputs.l2_normalize for fp16/bf16/fp32 rows: one launch each way per tensor
where the torch formulation issues four operations forward and eight backward (each is host time
on a GPU; tests/test_triton.py counts them).

No overflow or underflow for any finite row: the sum of squares is taken of x / m, m the row's
largest magnitude (every term <= 1; both in one pass over the row, rescaled as m grows), and y = (x / m) / max(r, NORM_EPS / m) with r = ||x / m||, so
neither the norm m r (which may exceed the fp32 range) nor its square is ever formed. The sums are
fp32 (the torch formulation's are fp64): the rows agree to a few fp32 ulps. The backward is the
closed form dx = (g - y (y . g) [||x|| >= NORM_EPS]) / max(||x||, NORM_EPS).

`unit_rows` is a triton_op (torch.compile sees the kernels) with register_autograd."""
from __future__ import annotations

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
def unit_rows_kernel(x_ptr, y_ptr, inv_ptr, radial_ptr, R, d, stride_x, stride_y, eps,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
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
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < d)[None, :])
    # 1 / max(||x||, eps) = (1 / m) / unit: tiny (even subnormal) for huge rows, never inf or nan.
    tl.store(inv_ptr + rows, (1.0 / safe) / unit, mask=rmask)
    tl.store(radial_ptr + rows, radial.to(tl.float32), mask=rmask)


@triton.jit
def unit_rows_backward_kernel(g_ptr, y_ptr, inv_ptr, radial_ptr, dx_ptr, R, d, stride_g, stride_y, stride_dx,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    offs = tl.arange(0, BLOCK_D)
    along = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + offs
        along += tl.sum(_block(y_ptr, rows, rmask, cols, d, stride_y) * _block(g_ptr, rows, rmask, cols, d, stride_g),
                        axis=1)
    # Below the floor the map is x / eps: no radial part.
    along = along * tl.load(radial_ptr + rows, mask=rmask, other=0.0)
    inv = tl.load(inv_ptr + rows, mask=rmask, other=0.0)
    for start in range(0, d, BLOCK_D):
        cols = start + offs
        g = _block(g_ptr, rows, rmask, cols, d, stride_g)
        y = _block(y_ptr, rows, rmask, cols, d, stride_y)
        dx = (g - y * along[:, None]) * inv[:, None]
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (cols < d)[None, :])


def _blocks(d: int) -> tuple[int, int]:
    if launch.INTERPRETED:
        return 16, 16  # small blocks: the CPU tests cross block boundaries
    return 8, max(16, min(triton.next_power_of_2(max(d, 1)), 256))


def _check(name: str, t: Tensor) -> None:
    if t.dtype not in _HALF_OR_SINGLE:
        raise TypeError(f"{name}: expected one of {list(_HALF_OR_SINGLE)}, got {t.dtype}")
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name}: expected a 2-D tensor with unit stride along its rows, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")


@triton_op("mlcl_fast::triton_unit_rows", mutates_args=())
def unit_rows_forward(x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(y [R, d] in out_dtype, 1 / max(||x||, eps) [R] fp32, [||x|| >= eps] [R] fp32)."""
    _check("x", x)
    if out_dtype not in _HALF_OR_SINGLE:
        raise TypeError(f"out_dtype: expected one of {list(_HALF_OR_SINGLE)}, got {out_dtype}")
    R, d = x.shape
    y = torch.empty(R, d, dtype=out_dtype, device=x.device)
    inv = torch.empty(R, dtype=torch.float32, device=x.device)
    radial = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        br, bd = _blocks(d)
        recording.launch(unit_rows_kernel, (triton.cdiv(R, br),),
                         (x, y, inv, radial, R, d, x.stride(0), y.stride(0), NORM_EPS), dict(BLOCK_R=br, BLOCK_D=bd),
                         wrap_triton)
    return y, inv, radial


@triton_op("mlcl_fast::triton_unit_rows_backward", mutates_args=())
def unit_rows_backward(g: Tensor, y: Tensor, inv: Tensor, radial: Tensor, x_dtype: torch.dtype) -> Tensor:
    for name, t in (("g", g), ("y", y)):
        _check(name, t)
    if g.shape != y.shape:
        raise ValueError(f"g: expected the shape of y {tuple(y.shape)}, got {tuple(g.shape)}")
    R, d = y.shape
    for name, t in (("inv", inv), ("radial", radial)):
        if t.dtype != torch.float32 or t.shape != (R,):
            raise ValueError(f"{name}: expected float32 of shape ({R},), got {t.dtype} of shape {tuple(t.shape)}")
    dx = torch.empty(R, d, dtype=x_dtype, device=y.device)
    if R:
        br, bd = _blocks(d)
        recording.launch(unit_rows_backward_kernel, (triton.cdiv(R, br),),
                         (g, y, inv, radial, dx, R, d, g.stride(0), y.stride(0), dx.stride(0)),
                         dict(BLOCK_R=br, BLOCK_D=bd), wrap_triton)
    return dx


def _setup_context(ctx, inputs, output):
    x, _ = inputs
    y, inv, radial = output
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(y, inv, radial)


def _backward(ctx, g_y, *_unused):
    y, inv, radial = ctx.saved_tensors
    g = g_y if g_y.stride(-1) == 1 else g_y.contiguous()
    return unit_rows_backward(g, y, inv, radial, ctx.x_dtype), None


unit_rows_forward.register_autograd(_backward, setup_context=_setup_context)


def unit_rows(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x / max(||x||, NORM_EPS) per row of a 2-D fp16/bf16/fp32 x, in out_dtype (the inputs'
    normaliser hook, see inputs.prepare)."""
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return unit_rows_forward(x, out_dtype)[0]
