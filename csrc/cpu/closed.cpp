#include "closed.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>

namespace mlcl_fast {

bool closed_form_applies(const LossOptions& opt) {
  if (!(opt.label_centric() && opt.unit_factor() && !opt.reg)) return false;
  const char* env = std::getenv("MLCL_FAST_CPU_CLOSED");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return true;
  TORCH_CHECK(std::string(env) == "off", "MLCL_FAST_CPU_CLOSED: expected auto or off, got ", env);
  return false;
}

double closed_total_weight(const LabelContext& labels, int64_t i, const double* norm_i) {
  const int32_t a = labels.row_sets.count(i);
  int32_t carried = 0;
  for (int32_t t = 0; t < a; ++t) carried += norm_i[t] > 0.0;
  return a > 0 ? static_cast<double>(carried) / static_cast<double>(a) : 0.0;
}

namespace {

constexpr int64_t kGrain = 16;

// The anchor's own column o, when it is a softmax column (else -1).
int64_t own_softmax_column(const LabelContext& labels, int64_t self) {
  return self >= labels.first_col && self < labels.num_cols ? self : -1;
}

// u_ik per label slot of anchor i (0 where Z_ik = 0) and ubar_i (the u of the labels its own
// softmax column carries); returns the own softmax column or -1.
int64_t anchor_weights(const LabelContext& labels, int64_t i, int64_t self, const double* norm_i, double* u,
                       double& ubar) {
  const int32_t a = labels.row_sets.count(i);
  const int32_t* labs = labels.row_sets.begin(i);
  const int64_t own = own_softmax_column(labels, self);
  ubar = 0.0;
  for (int32_t t = 0; t < a; ++t) {
    u[t] = norm_i[t] > 0.0 ? 1.0 / (static_cast<double>(a) * norm_i[t]) : 0.0;
    if (own >= 0 && u[t] > 0.0 && labels.carries(own, labs[t])) ubar += u[t];
  }
  return own;
}

// Compact ids of the labels some anchor weights (u_ik > 0), and the per-label column sums E_k
// over those, in fp64: [U, dim].
struct LabelSums {
  std::vector<int32_t> id;      // [L]: compact id, or -1
  std::vector<int32_t> label;   // [U]: the label of each compact id
  std::vector<double> sums;     // [U, dim]
};

template <typename T>
LabelSums label_sums(const T* cols, int64_t dim, const LabelContext& labels, const double* norm, int64_t width,
                     int64_t anchors) {
  LabelSums out;
  out.id.assign(static_cast<size_t>(labels.num_labels), -1);
  for (int64_t i = 0; i < anchors; ++i) {
    const int32_t* labs = labels.row_sets.begin(i);
    for (int32_t t = 0; t < labels.row_sets.count(i); ++t) {
      if (norm[i * width + t] > 0.0 && out.id[labs[t]] < 0) out.id[labs[t]] = 0;  // marked
    }
  }
  for (int64_t k = 0; k < labels.num_labels; ++k) {
    if (out.id[k] == 0) {
      out.id[k] = static_cast<int32_t>(out.label.size());
      out.label.push_back(static_cast<int32_t>(k));
    }
  }
  const int64_t U = static_cast<int64_t>(out.label.size());
  out.sums.assign(static_cast<size_t>(U * dim), 0.0);
  at::parallel_for(0, U, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int32_t k = out.label[c];
      double* e = out.sums.data() + c * dim;
      for (int64_t p = labels.inv_start[k]; p < labels.inv_start[k + 1]; ++p) {
        const T* x = cols + static_cast<int64_t>(labels.inv_col[p]) * dim;
        for (int64_t d = 0; d < dim; ++d) e[d] += static_cast<double>(x[d]);
      }
    }
  });
  return out;
}

// V_i into v[dim]; u (scratch of the anchor's label count). Returns ubar_i and the own column.
template <typename T>
std::pair<double, int64_t> anchor_vector(const T* cols, int64_t dim, const LabelContext& labels, const LabelSums& e,
                                         int64_t i, int64_t self, const double* norm_i, std::vector<double>& u,
                                         double* v) {
  const int32_t a = labels.row_sets.count(i);
  u.resize(static_cast<size_t>(std::max<int32_t>(a, 1)));
  double ubar = 0.0;
  const int64_t own = anchor_weights(labels, i, self, norm_i, u.data(), ubar);
  std::fill(v, v + dim, 0.0);
  const int32_t* labs = labels.row_sets.begin(i);
  for (int32_t t = 0; t < a; ++t) {
    if (u[t] == 0.0) continue;
    const double* ek = e.sums.data() + static_cast<int64_t>(e.id[labs[t]]) * dim;
    for (int64_t d = 0; d < dim; ++d) v[d] += u[t] * ek[d];
  }
  if (ubar != 0.0) {
    const T* xo = cols + own * dim;
    for (int64_t d = 0; d < dim; ++d) v[d] -= ubar * static_cast<double>(xo[d]);
  }
  return {ubar, own};
}

}  // namespace

template <typename T>
void closed_dots(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LabelContext& labels,
                 const double* norm, int64_t width, const std::vector<int64_t>& anchors, double* dot) {
  const LabelSums e = label_sums<T>(cols, dim, labels, norm, width, labels.row_sets.rows());
  at::parallel_for(0, static_cast<int64_t>(anchors.size()), kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<double> u, v(static_cast<size_t>(dim));
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t i = anchors[p];
      anchor_vector<T>(cols, dim, labels, e, i, self[i], norm + i * width, u, v.data());
      const T* q = rows + i * dim;
      double s = 0.0;
      for (int64_t d = 0; d < dim; ++d) s += static_cast<double>(q[d]) * v[d];
      dot[i] = s;
    }
  });
}

template <typename T>
void closed_backward(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                     const LabelContext& labels, const LossOptions& opt, const double* norm, int64_t width,
                     const double* total_weight, T* grad_rows, T* grad_cols) {
  const int64_t anchors = labels.row_sets.rows();
  const double inv_tau = 1.0 / opt.temperature;
  std::vector<int64_t> active;  // anchors whose loss has a gradient
  for (int64_t i = 0; i < anchors; ++i) {
    if (total_weight[i] > 0.0 && grad_loss[i] != T(0)) active.push_back(i);
  }
  if (active.empty()) return;
  const LabelSums e = label_sums<T>(cols, dim, labels, norm, width, anchors);
  const int64_t U = static_cast<int64_t>(e.label.size());

  // rows: dq_i -= G_i V_i / tau; ubar_i and the own column kept for the columns below
  const int64_t m = static_cast<int64_t>(active.size());
  std::vector<double> ubar(static_cast<size_t>(m));
  std::vector<int64_t> own(static_cast<size_t>(m));
  at::parallel_for(0, m, kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<double> u, v(static_cast<size_t>(dim));
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t i = active[p];
      std::tie(ubar[p], own[p]) = anchor_vector<T>(cols, dim, labels, e, i, self[i], norm + i * width, u, v.data());
      const double g = static_cast<double>(grad_loss[i]) * inv_tau;
      T* out = grad_rows + i * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] -= static_cast<T>(g * v[d]);
    }
  });

  // F_k = sum_{anchors i carrying k} G_i u_ik q_i, each label's anchors in ascending order
  std::vector<int64_t> start(static_cast<size_t>(U + 1), 0);
  for (int64_t i : active) {
    const int32_t* labs = labels.row_sets.begin(i);
    for (int32_t t = 0; t < labels.row_sets.count(i); ++t) {
      if (norm[i * width + t] > 0.0) ++start[e.id[labs[t]] + 1];
    }
  }
  for (int64_t c = 0; c < U; ++c) start[c + 1] += start[c];
  std::vector<int64_t> member(static_cast<size_t>(start[U]));
  std::vector<double> coef(static_cast<size_t>(start[U]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i : active) {
      const int32_t a = labels.row_sets.count(i);
      const int32_t* labs = labels.row_sets.begin(i);
      for (int32_t t = 0; t < a; ++t) {
        const double z = norm[i * width + t];
        if (z <= 0.0) continue;
        const int64_t at = fill[e.id[labs[t]]]++;
        member[at] = i;
        coef[at] = static_cast<double>(grad_loss[i]) / (static_cast<double>(a) * z);
      }
    }
  }
  std::vector<double> f(static_cast<size_t>(U * dim), 0.0);
  at::parallel_for(0, U, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double* fc = f.data() + c * dim;
      for (int64_t p = start[c]; p < start[c + 1]; ++p) {
        const T* q = rows + member[p] * dim;
        for (int64_t d = 0; d < dim; ++d) fc[d] += coef[p] * static_cast<double>(q[d]);
      }
    }
  });

  // the anchors owning each softmax column (ubar_i != 0), ascending
  const int64_t span = labels.num_cols - labels.first_col;
  std::vector<int64_t> owner_start(static_cast<size_t>(span + 1), 0);
  for (int64_t p = 0; p < m; ++p) {
    if (ubar[p] != 0.0) ++owner_start[own[p] - labels.first_col + 1];
  }
  for (int64_t c = 0; c < span; ++c) owner_start[c + 1] += owner_start[c];
  std::vector<int64_t> owner(static_cast<size_t>(owner_start[span]));
  {
    std::vector<int64_t> fill(owner_start.begin(), owner_start.end() - 1);
    for (int64_t p = 0; p < m; ++p) {
      if (ubar[p] != 0.0) owner[fill[own[p] - labels.first_col]++] = p;
    }
  }
  // columns: dk_j -= (sum_{k in y_j} F_k - sum_{anchors i owning j} G_i ubar_i q_i) / tau
  at::parallel_for(labels.first_col, labels.num_cols, kGrain, [&](int64_t lo, int64_t hi) {
    std::vector<double> acc(static_cast<size_t>(dim));
    for (int64_t j = lo; j < hi; ++j) {
      const int32_t* labs = labels.col_sets.begin(j);
      bool any = false;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int32_t t = 0; t < labels.col_sets.count(j); ++t) {
        const int32_t c = e.id[labs[t]];
        if (c < 0) continue;
        any = true;
        const double* fc = f.data() + static_cast<int64_t>(c) * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += fc[d];
      }
      for (int64_t o = owner_start[j - labels.first_col]; o < owner_start[j - labels.first_col + 1]; ++o) {
        const int64_t p = owner[o], i = active[p];
        const double g = static_cast<double>(grad_loss[i]) * ubar[p];
        const T* q = rows + i * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] -= g * static_cast<double>(q[d]);
      }
      if (!any) continue;  // a column carrying no weighted label is owned by no anchor with ubar != 0
      T* out = grad_cols + j * dim;
      for (int64_t d = 0; d < dim; ++d) out[d] -= static_cast<T>(acc[d] * inv_tau);
    }
  });
}

template void closed_dots<float>(const float*, const float*, int64_t, const int64_t*, const LabelContext&,
                                 const double*, int64_t, const std::vector<int64_t>&, double*);
template void closed_dots<double>(const double*, const double*, int64_t, const int64_t*, const LabelContext&,
                                  const double*, int64_t, const std::vector<int64_t>&, double*);
template void closed_backward<float>(const float*, const float*, const float*, int64_t, const int64_t*,
                                     const LabelContext&, const LossOptions&, const double*, int64_t, const double*,
                                     float*, float*);
template void closed_backward<double>(const double*, const double*, const double*, int64_t, const int64_t*,
                                      const LabelContext&, const LossOptions&, const double*, int64_t, const double*,
                                      double*, double*);

}  // namespace mlcl_fast
