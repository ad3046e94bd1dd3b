"""The public call's first launch: padded label indices canonicalised (canonical.py) and the
features, keys and prototypes normalised (normalize.py) by one kernel, whose first programs take
label rows and the rest row blocks. The two jobs share no data; together they save a launch (the
host time of one, on a GPU) on the check_values=False path, where both run on every call.

`prologue` is the backend's hook of inputs.prepare; `prologue_op` a triton_op (torch.compile
sees the kernel) with register_autograd: the rows' gradient goes through normalize's backward
kernel, the labels have none. Labels the canonicaliser's kernel does not take (wider than
canonical.MAX_WIDTH, no slot) keep the two separate paths.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..labels import LabelSets
from . import canonical, normalize, recording
from .canonical import canonical_block
from .normalize import unit_sets


@triton.jit
def prologue_kernel(lab_ptr, index_ptr, count_ptr, B, K, L, stride_r, stride_c,
                    x0, x1, x2, y_ptr, inv_ptr, radial_ptr, R0, R1, R2, d, stride0, stride1, stride2, stride_y, eps,
                    label_programs, BLOCK_L: tl.constexpr, KP: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    # float scalars as fp32: inductor passes Python floats as fp64 (README, torch.compile)
    eps = tl.cast(eps, tl.float32)
    pid = tl.program_id(0)
    if pid < label_programs:
        canonical_block(pid, lab_ptr, index_ptr, count_ptr, B, K, L, stride_r, stride_c, BLOCK_L, KP)
    else:
        unit_sets(pid - label_programs, x0, x1, x2, y_ptr, inv_ptr, radial_ptr, R0, R1, R2, d, stride0, stride1,
                  stride2, stride_y, eps, BLOCK_R, BLOCK_D)


@triton_op("mlcl_fast::triton_prologue", mutates_args=())
def prologue_op(labels: Tensor, num_labels: int, x: Tensor, x1: Optional[Tensor], x2: Optional[Tensor],
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(index, count) of canonical.canonical_index_rows(labels, num_labels) and (y, inv, radial)
    of normalize.unit_rows_forward(x, x1, x2, out_dtype), from one launch."""
    canonical.check_labels(labels)
    if labels.device != x.device:
        raise ValueError(f"labels: on device {labels.device}, but x is on {x.device}")
    sizes = normalize.check_parts(x, x1, x2, out_dtype)
    index, count = canonical.outputs(labels)
    y, inv, radial = normalize.outputs(x, sizes, out_dtype)
    B, K = labels.shape
    bl, kp = canonical.blocks(K)
    br, bd = normalize.blocks(x.shape[1])
    label_programs = triton.cdiv(B, bl)
    programs = label_programs + normalize.grid_size(sizes, br)
    if programs:
        recording.launch(prologue_kernel, (programs,),
                         (labels, index, count, B, K, num_labels, labels.stride(0), labels.stride(1),
                          *normalize.unit_args(x, x1, x2, sizes, y, inv, radial), label_programs),
                         dict(BLOCK_L=bl, KP=kp, BLOCK_R=br, BLOCK_D=bd), wrap_triton)
    return index, count, y, inv, radial


def _setup_context(ctx, inputs, output):
    normalize.save_context(ctx, inputs[2:5], output[2:])


def _backward(ctx, g_index, g_count, g_y, *_unused):
    return (None, None, *normalize.parts_backward(ctx, g_y), None)


prologue_op.register_autograd(_backward, setup_context=_setup_context)


def prologue(labels: Tensor, num_labels: int, parts: list[Tensor], out_dtype: torch.dtype
             ) -> tuple[LabelSets, Tensor]:
    """(canonical.canonical_indices(labels, num_labels), normalize.unit_rows(parts, out_dtype)),
    in one launch where the canonicaliser's kernel takes the labels."""
    if not canonical.takes(labels):
        return canonical.canonical_indices(labels, num_labels), normalize.unit_rows(parts, out_dtype)
    index, count, y, _, _ = prologue_op(labels, num_labels, *normalize.as_parts(parts), out_dtype)
    return canonical.checked(index, count, num_labels), y
