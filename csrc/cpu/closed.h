// The closed form of the label weights where the pair factor is 1 on every positive and there is
// no regulariser (label-centric weighting, f = 1: presets mulsupcon, proto, reg_noreg): the
// weights then need no per-pair work at all.
//
// With f = 1, w_ij = sum_{k in y_i ∩ y_j} u_ik with u_ik = 1 / (a_i Z_ik), and Z_ik is a column
// count (the softmax columns carrying k, less the anchor's own column where it carries k). So
//   W_i          = |{k in y_i : Z_ik > 0}| / a_i
//   sum_j w_ij x_j = V_i = sum_{k in y_i} u_ik (E_k - [own column o is a softmax column carrying k] x_o)
// with E_k = sum of the softmax columns carrying k: O(nnz * d) work in place of every positive
// pair. The sweeps then run label-free (the positive lists stay empty, PositiveFinder), and
//   loss_i  = W_i lse_i - <q_i, V_i> / tau
//   dq_i   -= G_i V_i / tau
//   dk_j   -= (sum_{k in y_j} F_k) / tau,  F_k = sum_{anchors i carrying k} G_i u_ik q_i
//   dk_o   += G_i ubar_i q_i / tau  for anchor i's own softmax column o (ubar_i: its u over the
//             labels o carries)
// Every sum is owned by one label, anchor or column (fixed order): deterministic for any number
// of threads. MLCL_FAST_CPU_CLOSED = auto | off (default auto): off enumerates the positives.
#pragma once

#include <cstdint>
#include <vector>

#include "options.h"
#include "positives.h"

namespace mlcl_fast {

// Whether the closed form applies to `opt` and is not switched off (read at every op call).
bool closed_form_applies(const LossOptions& opt);

// W_i of anchor i from its normaliser (Z_ik per label slot).
double closed_total_weight(const LabelContext& labels, int64_t i, const double* norm_i);

// dot[i] = <q_i, V_i> (fp64) for every anchor in `anchors`.
template <typename T>
void closed_dots(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LabelContext& labels,
                 const double* norm, int64_t width, const std::vector<int64_t>& anchors, double* dot);

// Adds the weights' part of the gradient (the sweeps gave the label-free part) to grad_rows and
// grad_cols, for the per-anchor gradient grad_loss.
template <typename T>
void closed_backward(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                     const LabelContext& labels, const LossOptions& opt, const double* norm, int64_t width,
                     const double* total_weight, T* grad_rows, T* grad_cols);

}  // namespace mlcl_fast
