"""Kernels over positive-pair lists (the sparse regime): pair logits, and CSR segment sums and
products that replace scatter-adds, so every output row is summed by one program in a fixed
order (deterministic, no atomics)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import configs
from .recording import launch


@triton.jit
def pair_dots_kernel(q_ptr, k_ptr, pi, pj, out, P, d, stride_q, stride_k,
                     BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < P
    i = tl.load(pi + offs, mask=pmask, other=0)
    j = tl.load(pj + offs, mask=pmask, other=0)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = pmask[:, None] & (kk[None, :] < d)
        a = tl.load(q_ptr + i[:, None] * stride_q + kk[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(k_ptr + j[:, None] * stride_k + kk[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out + offs, acc, mask=pmask)


@triton.jit
def segment_sum_kernel(values, ptr, out, BLOCK: tl.constexpr):
    seg = tl.program_id(0)
    lo = tl.load(ptr + seg)
    hi = tl.load(ptr + seg + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(values + offs, mask=offs < hi, other=0.0)
    tl.store(out + seg, tl.sum(acc, axis=0))


@triton.jit
def csr_rows_kernel(ptr, idx, coef, x_ptr, out, d, stride_x, stride_o,
                    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[s, chunk] = sum_{p in [ptr[s], ptr[s+1])} coef[p] * x[idx[p], chunk]: csr_row_chunk
    for segment program_id(0) and feature chunk program_id(1)."""
    csr_row_chunk(tl.program_id(0), tl.program_id(1), ptr, idx, coef, x_ptr, out, d, stride_x, stride_o,
                  BLOCK_P, BLOCK_D, False)


@triton.jit
def csr_row_chunk(seg, chunk, ptr, idx, coef, x_ptr, out, d, stride_x, stride_o,
                  BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, UNIT: tl.constexpr):
    """One segment's sum over one feature chunk, in entry order: entries with idx[p] < 0 are
    skipped (no load), so padded slot lists cost no memory traffic; an empty segment writes 0.
    Also a role of prep.head_prep_kernel (the closed form's label sums E_k in that launch)."""
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    lo = tl.load(ptr + seg)
    hi = tl.load(ptr + seg + 1)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_P):
        offs = start + tl.arange(0, BLOCK_P)
        pmask = offs < hi
        j = tl.load(idx + offs, mask=pmask, other=-1)
        pmask = pmask & (j >= 0)
        if UNIT:
            c = pmask.to(tl.float32)
        else:
            c = tl.load(coef + offs, mask=pmask, other=0.0)
        x = tl.load(x_ptr + j[:, None] * stride_x + offs_d[None, :], mask=pmask[:, None] & dmask[None, :],
                    other=0.0).to(tl.float32)
        acc += c[:, None] * x
    tl.store(out + seg * stride_o + offs_d, tl.sum(acc, axis=0), mask=dmask)


def pair_dots(q: Tensor, k: Tensor, pi: Tensor, pj: Tensor, interpret: bool) -> Tensor:
    """<q[pi[p]], k[pj[p]]> in fp32."""
    P, d = pi.numel(), q.shape[1]
    out = torch.empty(P, dtype=torch.float32, device=q.device)
    if P:
        bp, bk = 16 if interpret else 128, configs.block_width(d, 64, interpret)
        launch(pair_dots_kernel, (triton.cdiv(P, bp),), (q, k, pi, pj, out, P, d, q.stride(0), k.stride(0)),
               dict(BLOCK_P=bp, BLOCK_K=bk))
    return out


def segment_sum(values: Tensor, ptr: Tensor, interpret: bool) -> Tensor:
    """[S] fp32: sums of values[ptr[s]:ptr[s+1]]."""
    segs = ptr.numel() - 1
    out = torch.empty(segs, dtype=torch.float32, device=values.device)
    if segs:
        values = values.to(torch.float32).contiguous()
        launch(segment_sum_kernel, (segs,), (values, ptr, out), dict(BLOCK=16 if interpret else 256))
    return out


def csr_blocks(d: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_D) of the segment-sum kernels (csr_row_chunk, closed.label_anchor_sums_kernel):
    entries per step, features per program."""
    return (16 if interpret else 32), configs.block_width(d, 128, interpret)


def csr_rows(ptr: Tensor, idx: Tensor, coef: Tensor, x: Tensor, interpret: bool) -> Tensor:
    """[S, d] fp32: row s = sum over its entries p of coef[p] * x[idx[p]] (idx < 0: skipped).
    (Unit coefficients, the closed form's E_k, run in prep.head_prep_kernel's launch.)"""
    segs, d = ptr.numel() - 1, x.shape[1]
    if not (segs and d and idx.numel()):
        return torch.zeros(segs, d, dtype=torch.float32, device=x.device)
    out = torch.empty(segs, d, dtype=torch.float32, device=x.device)
    bp, bd = csr_blocks(d, interpret)
    coef = coef.to(torch.float32).contiguous()
    launch(csr_rows_kernel, (segs, triton.cdiv(d, bd)), (ptr, idx, coef, x, out, d, x.stride(0), out.stride(0)),
           dict(BLOCK_P=bp, BLOCK_D=bd))
    return out


def offsets(keys: Tensor, segments: int) -> Tensor:
    """CSR offsets [segments + 1] of the segment ids `keys`, which must be sorted."""
    bounds = torch.arange(segments + 1, dtype=keys.dtype, device=keys.device)
    return torch.searchsorted(keys, bounds)
