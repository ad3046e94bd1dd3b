"""From a Problem to the custom operators: anchor and column matrices, label tensors, regime.

The operators' value checks (checks.py) are left out here (`validated=True`): the Problem's labels
were canonicalised and checked by mlcl_fast.labels (on the host, or by device-side assertions with
check_values=False) and its anchor columns come from its own ranges, so checking them again would
only add device operations to every call."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..problem import Problem
from . import closed, configs, labels, launch, ops, pairs

_HALF = (torch.float16, torch.bfloat16)


def _allow_tf32(device: torch.device) -> bool:
    """fp32 dots may use tf32 when torch's matmul setting allows it (read through the newer
    fp32_precision setting first: reading allow_tf32 raises once that one was used)."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def anchor_losses(problem: Problem, regime: str | None = None, grad_mode: str | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Per-anchor losses [|A|] (fp32, 0 when invalid) and validity. `regime` and `grad_mode`
    override the label regime and gradient strategy (configs.REGIMES, configs.GRAD_MODES)."""
    cfg = problem.config
    x = problem.samples
    if x.dtype not in _HALF + (torch.float32,):
        # The kernels accumulate in fp32; a float64 request keeps its precision on the reference.
        return reference.anchor_losses(problem)
    plo, phi = problem.prototype_anchors
    # Anchor rows (the anchored samples, then the anchored prototypes) and columns (samples, keys,
    # prototypes), cut from the same embeddings: q[i] == k[self_col[i]], the closed form's
    # symmetric contract. The kernels treat every column below `n` (here N + M) as a sample
    # column (beta, f='union' as for samples) and take anchors' own columns from self_col, so
    # keys are sample columns that no anchor owns.
    q, k = problem.embeddings()
    if launch.INTERPRETED and x.dtype == torch.bfloat16:
        # The Triton interpreter's bf16 tl.dot gives wrong results (values ~1e10): there, bf16 rows
        # are computed in fp32 (exact upcast; gradients flow back in bf16). Compiled kernels take
        # bf16 as it is.
        q, k = q.float(), k.float()
    q, k = q.contiguous(), k.contiguous()

    n = problem.num_sample_columns
    col_lo = n if cfg.beta == 0 else 0
    log_beta = math.log(cfg.beta) if cfg.beta > 0 else 0.0
    anchor_sets, column_sets = problem.anchor_labels(), problem.column_labels()
    self_col = problem.anchor_columns(torch.int32)
    fp32 = configs.fp32_precision(_allow_tf32(x.device))
    weighting = configs.WEIGHTING_CODES[cfg.weighting]
    factor = configs.FACTOR_CODES[cfg.f]

    closed_ok = configs.closed_form(weighting, factor, float(cfg.alpha))
    regime = regime or configs.forced_regime()
    # Values may be read on the host (one synchronisation) only when the caller allows it.
    may_read = problem.check_values and not torch.compiler.is_compiling()
    # The closed form's kernels read the canonical int64 labels and counts as they are.
    c_index = labels.padded_index(column_sets, torch.int64) if closed_ok else column_sets.index
    head_width = configs.pairs_head_width(anchor_sets.num_labels)
    if regime is None:
        triples = None
        head = anchor_sets.num_labels > configs.DENSE_MAX_LABELS
        if not closed_ok and may_read and \
                (head or -(-anchor_sets.num_labels // 32) > configs.BITS_MAX_WORDS):
            triples = labels.positive_triples(anchor_sets, column_sets, col_lo, skip_most_frequent=head_width)
        regime = configs.choose_regime(anchor_sets.num_labels, anchor_sets.width, column_sets.width,
                                       q.shape[0], k.shape[0], q.shape[1], triples, closed_ok, head)
    if regime not in configs.REGIMES:
        raise ValueError(f"regime: expected one of {list(configs.REGIMES)}, got {regime!r}")
    if regime == "closed" and not closed_ok:
        raise ValueError("regime: 'closed' needs label-centric weights with f=1 on positives (f='one', or "
                         "f='overlap' with alpha=0)")
    if regime == "dense" and anchor_sets.num_labels > configs.DENSE_MAX_LABELS:
        raise ValueError(f"regime: 'dense' holds at most {configs.DENSE_MAX_LABELS} labels, got "
                         f"{anchor_sets.num_labels}; use 'bits', 'gather', 'list' or 'pairs'")
    if regime == "bits" and anchor_sets.num_labels > 32 * configs.BITS_MAX_WORDS:
        raise ValueError(f"regime: 'bits' holds at most {32 * configs.BITS_MAX_WORDS} labels, "
                         f"got {anchor_sets.num_labels}; use 'gather', 'list' or 'pairs'")

    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    grad_mode = grad_mode or configs.grad_mode()
    if grad_mode not in configs.GRAD_MODES:
        raise ValueError(f"grad_mode: expected one of {list(configs.GRAD_MODES)}, got {grad_mode!r}")
    if regime == "closed":
        a_long, num_labels = labels.padded_index(anchor_sets, torch.int64), anchor_sets.num_labels
        a_count, c_count = anchor_sets.count, column_sets.count
        inv_tau = 1.0 / problem.temperature
        out = closed.closed_forward(q, k, self_col, a_long, a_count, c_index, c_count, n, col_lo, num_labels,
                                    inv_tau, log_beta, cfg.reg, fp32, grad_mode == "forward" and need_grad,
                                    validated=True, symmetric=grad_mode == "symmetric")
        loss, w_tot = out[0], out[1]
        return loss, w_tot > 0

    a_index = labels.padded_index(anchor_sets)
    a_count = anchor_sets.count.to(torch.int32)
    c_count = column_sets.count.to(torch.int32)
    visit = {}
    if phi > plo:
        # Prototypes as anchors: of a large label space most share no label with another column.
        # The sweeps visit the anchors that may have a positive only (sample anchors nearly all do,
        # so without prototype anchors the order is not worth its device operations).
        order, live = labels.visiting_order(problem.candidate_anchors())
        visit = dict(order=order, live=live)
    if regime == "pairs":
        loss, w_tot, *_ = pairs.pairs_forward(q, k, self_col, a_index.long(), a_count, column_sets.index, c_count, n,
                                              col_lo, anchor_sets.num_labels, 1.0 / problem.temperature, log_beta,
                                              float(cfg.alpha), weighting, factor, cfg.reg, head_width, fp32,
                                              **visit, validated=True)
        return loss, w_tot > 0

    mode = configs.REGIMES[regime]
    table = labels.column_table(column_sets, mode)
    # Anchor bitsets serve the popcount overlaps of MODE_BITS, 0/1 rows the dot overlaps of MODE_DENSE.
    if mode == configs.MODE_BITS:
        a_bits = labels.bitsets(anchor_sets)
    elif mode == configs.MODE_DENSE:
        a_bits = labels.dense_rows(anchor_sets)
    else:
        a_bits = torch.zeros_like(a_index[:, :1])
    loss, w_tot, *_ = ops.dense_forward(q, k, self_col, a_index, a_bits, a_count, table, c_count, n, col_lo,
                                        1.0 / problem.temperature, log_beta, float(cfg.alpha), mode, weighting,
                                        factor, cfg.reg, fp32, grad_mode == "forward" and need_grad, **visit,
                                        validated=True)
    return loss, w_tot > 0
