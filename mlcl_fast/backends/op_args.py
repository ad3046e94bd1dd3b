"""Arguments of the shared C++ ops (torch.ops.mlcl_fast.anchor_loss_forward) for a Problem;
the cpp and cuda backends register kernels for the same schema (csrc/README.md)."""
from __future__ import annotations

from ..problem import Problem


def op_inputs(problem: Problem, dtype=None) -> tuple:
    """Forward op arguments; embeddings in `dtype` (default: as prepared by mlcl_fast.inputs)."""
    cfg = problem.config
    rows, cols = problem.embeddings(dtype)
    return (rows, cols, problem.anchor_labels().index, problem.column_labels().index, problem.anchor_columns(),
            problem.num_samples, problem.labels.num_labels, problem.temperature, cfg.beta, cfg.weighting, cfg.f,
            cfg.alpha, cfg.reg)
