// Backward: recompute each similarity tile from the saved per-anchor statistics, turn it into
// G_ij = g_i (W_i p_ij - w_ij - r_ij) in place, and push it through two GEMMs. Row gradients
// belong to one block; column gradients are summed per partition of blocks into separate
// buffers and reduced in partition order, so results are deterministic for a thread count.
//
// With `combine_self` (the caller needs only grad_rows[i] + grad_cols[self_col[i]]: row i and its
// own column are the same embedding), the anchors whose own column is a softmax column holding
// their row ("symmetric" anchors, S) are swept against each other once per unordered pair of
// blocks: one tile S_IJ gives G_IJ and G_JI (s_ij = s_ji), and H = G_IJ + G_JI^T feeds
// dx_I += H x_J and dx_J += H^T x_I: 3 products per pair of blocks instead of 6. The other
// columns (and anchors outside S) take the one-directional sweep above.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "closed.h"
#include "kernels.h"
#include "tile_math.h"

namespace mlcl_fast {

namespace {

// One-directional sweep of `anchors` against the columns `ids` (ascending): row gradients added
// into grad_rows, column gradients added into grad_cols at `ids`.
template <typename T>
void sweep_columns(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                   const LabelContext& labels, const LossOptions& opt, const double* lse, const double* total_weight,
                   const double* norm, int64_t width, const std::vector<int64_t>& anchors,
                   const std::vector<int64_t>& ids, T* grad_rows, T* grad_cols,
                   const PositiveLists* lists = nullptr) {
  const int64_t m = static_cast<int64_t>(ids.size());
  if (anchors.empty() || m == 0) return;
  const int64_t num_cols = labels.num_cols;
  std::vector<int32_t> where(num_cols, -1);
  std::vector<T> gathered(static_cast<size_t>(m * dim));
  for (int64_t t = 0; t < m; ++t) {
    where[ids[t]] = static_cast<int32_t>(t);
    std::copy(cols + ids[t] * dim, cols + (ids[t] + 1) * dim, gathered.data() + t * dim);
  }
  // tiles of the gathered columns; beta is uniform inside a tile (ids < n are sample columns)
  std::vector<ColumnTile> tiles;
  const int64_t split = std::lower_bound(ids.begin(), ids.end(), opt.num_sample_cols) - ids.begin();
  const double log_beta_samples = opt.beta > 0.0 ? std::log(opt.beta) : 0.0;
  for (int64_t c = 0; c < split; c += kColTile) tiles.push_back({c, std::min(split, c + kColTile), log_beta_samples});
  for (int64_t c = split; c < m; c += kColTile) tiles.push_back({c, std::min(m, c + kColTile), 0.0});

  const int64_t blocks = (static_cast<int64_t>(anchors.size()) + kRowBlock - 1) / kRowBlock;
  const int64_t parts = partition_count(blocks, static_cast<double>(m) * dim * sizeof(T));
  std::vector<T> partial(static_cast<size_t>(parts * m * dim), T(0));
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const int64_t threads = thread_count();
#pragma omp parallel num_threads(std::min(threads, parts))
  {
    PositiveFinder finder(labels, opt);
    BlockPositives pos;
    std::vector<int32_t> all_col;
    std::vector<double> all_w;
    std::vector<T> block_rows(kRowBlock * dim), block_grad(kRowBlock * dim), sim(kRowBlock * kColTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t part = 0; part < parts; ++part) {
      T* gcols = partial.data() + part * m * dim;
      for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
        const int64_t* idx = anchors.data() + b * kRowBlock;
        const int64_t nb = std::min<int64_t>(kRowBlock, static_cast<int64_t>(anchors.size()) - b * kRowBlock);
        pos.reset(nb);
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t i = idx[r];
          std::copy(rows + i * dim, rows + (i + 1) * dim, block_rows.data() + r * dim);
          if (lists != nullptr) {  // positions in `ids` already
            const int64_t k = b * kRowBlock + r;
            pos.col.insert(pos.col.end(), lists->col[k].begin(), lists->col[k].end());
            pos.w.insert(pos.w.end(), lists->w[k].begin(), lists->w[k].end());
          } else {
            all_col.clear();
            all_w.clear();
            finder.positives(i, self[i], norm + i * width, all_col, all_w);
            for (size_t p = 0; p < all_col.size(); ++p) {
              const int32_t at = where[all_col[p]];
              if (at >= 0) {
                pos.col.push_back(at);
                pos.w.push_back(all_w[p]);
              }
            }
          }
          pos.close_anchor();
        }
        pos.rewind();
        std::fill(block_grad.begin(), block_grad.begin() + nb * dim, T(0));
        for (const ColumnTile& tile : tiles) {
          const int64_t n = tile.end - tile.begin;
          gemm_abt<T>(nb, n, dim, inv_tau, block_rows.data(), dim, gathered.data() + tile.begin * dim, dim,
                      sim.data(), n);
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t i = idx[r];
            T* s = sim.data() + r * n;
            const double g = static_cast<double>(grad_loss[i]);
            const double shift = lse[i] - tile.log_beta;
            const auto [p0, p1] = pos.advance(r, tile.end);
            for (int64_t p = p0; p < p1; ++p) {
              double delta = pos.w[p];
              if (opt.reg) {
                const double prob =
                    static_cast<double>(exp_tile(static_cast<T>(s[pos.col[p] - tile.begin] - shift)));
                delta += std::max(prob - pos.w[p], 0.0);
              }
              pos.s[p] = g * delta;
            }
            scaled_exp(s, n, static_cast<T>(shift), static_cast<T>(g * total_weight[i]));
            const int64_t own = (self[i] >= 0 && self[i] < num_cols ? where[self[i]] : -1) - tile.begin;
            if (own >= 0 && own < n) s[own] = T(0);
            for (int64_t p = p0; p < p1; ++p) s[pos.col[p] - tile.begin] -= static_cast<T>(pos.s[p]);
          }
          gemm_ab_acc<T>(nb, dim, n, inv_tau, sim.data(), n, gathered.data() + tile.begin * dim, dim,
                         block_grad.data(), dim);
          gemm_atb_acc<T>(n, dim, nb, inv_tau, sim.data(), n, block_rows.data(), dim, gcols + tile.begin * dim, dim);
        }
        for (int64_t r = 0; r < nb; ++r) {
          T* out = grad_rows + idx[r] * dim;
          const T* add = block_grad.data() + r * dim;
          for (int64_t e = 0; e < dim; ++e) out[e] += add[e];
        }
      }
    }
  }
  add_partitions(partial, parts, m, dim, ids, grad_cols);
}

// The one-directional backward: every anchor with a gradient against every softmax column.
template <typename T>
void backward_typed(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                    const LabelContext& labels, const LossOptions& opt, const double* lse,
                    const double* total_weight, const double* norm, int64_t width, T* grad_rows, T* grad_cols) {
  std::vector<int64_t> active, ids;  // anchors whose loss has a gradient; the softmax columns
  for (int64_t i = 0; i < labels.row_sets.rows(); ++i) {
    if (total_weight[i] > 0.0 && grad_loss[i] != T(0)) active.push_back(i);
  }
  for (int64_t j = 0; j < labels.num_cols; ++j) {
    if (j >= opt.num_sample_cols || opt.beta > 0.0) ids.push_back(j);
  }
  sweep_columns<T>(grad_loss, rows, cols, dim, self, labels, opt, lse, total_weight, norm, width, active, ids,
                   grad_rows, grad_cols);
}

// The symmetric anchors against each other: unordered pairs of blocks (I <= J); the combined
// gradient of each symmetric anchor lands in grad_rows.
template <typename T>
void sweep_symmetric(const T* grad_loss, const T* rows, int64_t dim, const int64_t* self, const LossOptions& opt,
                     const double* lse, const double* total_weight,
                     const std::vector<int64_t>& sym, const PositiveLists& own, T* grad_rows) {
  const int64_t m = static_cast<int64_t>(sym.size());
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const double log_beta_samples = opt.beta > 0.0 ? std::log(opt.beta) : 0.0;
  std::vector<T> x(static_cast<size_t>(m * dim));
  std::vector<double> lb(m);
  for (int64_t p = 0; p < m; ++p) {
    std::copy(rows + sym[p] * dim, rows + (sym[p] + 1) * dim, x.data() + p * dim);
    lb[p] = self[sym[p]] < opt.num_sample_cols ? log_beta_samples : 0.0;
  }
  const std::vector<std::vector<int32_t>>& pcol = own.col;
  const std::vector<std::vector<double>>& pw = own.w;
  const int64_t threads = thread_count();
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  // Row block I pairs with the blocks J >= I: partitions of contiguous I with equal work.
  const int64_t parts = partition_count(blocks, static_cast<double>(m) * dim * sizeof(T));
  const std::vector<int64_t> bound = pair_partitions(blocks, parts);
  std::vector<T> partial(static_cast<size_t>(parts * m * dim), T(0));
#pragma omp parallel num_threads(std::min(threads, parts))
  {
    std::vector<T> sim(kRowBlock * kRowBlock), h(kRowBlock * kRowBlock);
    std::vector<T> lb_j(kRowBlock), lse_j(kRowBlock), coef_j(kRowBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t part = 0; part < parts; ++part) {
      T* dx = partial.data() + part * m * dim;
      for (int64_t bi = bound[part]; bi < bound[part + 1]; ++bi) {
        const int64_t i0 = bi * kRowBlock, ni = std::min<int64_t>(kRowBlock, m - i0);
        for (int64_t bj = bi; bj < blocks; ++bj) {
          const int64_t j0 = bj * kRowBlock, nj = std::min<int64_t>(kRowBlock, m - j0);
          gemm_abt<T>(ni, nj, dim, inv_tau, x.data() + i0 * dim, dim, x.data() + j0 * dim, dim, sim.data(), nj);
          for (int64_t c = 0; c < nj; ++c) {
            const int64_t j = sym[j0 + c];
            lb_j[c] = static_cast<T>(lb[j0 + c]);
            lse_j[c] = static_cast<T>(lse[j]);
            coef_j[c] = static_cast<T>(static_cast<double>(grad_loss[j]) * total_weight[j]);
          }
          // H = G_IJ + G_JI^T: p_ic = beta_c exp(s - lse_i), p_cr = beta_r exp(s - lse_c)
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t i = sym[i0 + r];
            pair_exp<T>(sim.data() + r * nj, lb_j.data(), lse_j.data(), coef_j.data(), h.data() + r * nj, nj,
                        static_cast<T>(static_cast<double>(grad_loss[i]) * total_weight[i]), static_cast<T>(lse[i]),
                        static_cast<T>(lb[i0 + r]));
          }
          if (bi == bj) {
            for (int64_t r = 0; r < ni; ++r) h[r * nj + r] = T(0);  // s_ii is in no softmax
          }
          // positives: rows I against the columns of J, and rows J against the columns of I
          auto correct = [&](int64_t a, int64_t lo, int64_t hi, bool rows_side) {
            const int64_t i = sym[a];
            const double g = static_cast<double>(grad_loss[i]);
            const std::vector<int32_t>& cl = pcol[a];
            const std::vector<double>& wl = pw[a];
            auto it = std::lower_bound(cl.begin(), cl.end(), static_cast<int32_t>(lo));
            for (size_t q = it - cl.begin(); q < cl.size() && cl[q] < hi; ++q) {
              const int64_t r = rows_side ? a - i0 : cl[q] - i0;
              const int64_t c = rows_side ? cl[q] - j0 : a - j0;
              double delta = wl[q];
              if (opt.reg) {
                const double prob =
                    static_cast<double>(exp_tile(static_cast<T>(sim[r * nj + c] - static_cast<T>(lse[i] - lb[cl[q]]))));
                delta += std::max(prob - wl[q], 0.0);
              }
              h[r * nj + c] -= static_cast<T>(g * delta);
            }
          };
          // (on a diagonal block both loops are needed too: H[r][c] holds G_rc and G_cr)
          for (int64_t r = 0; r < ni; ++r) correct(i0 + r, j0, j0 + nj, true);
          for (int64_t c = 0; c < nj; ++c) correct(j0 + c, i0, i0 + ni, false);
          gemm_ab_acc<T>(ni, dim, nj, inv_tau, h.data(), nj, x.data() + j0 * dim, dim, dx + i0 * dim, dim);
          if (bi != bj) {
            gemm_atb_acc<T>(nj, dim, ni, inv_tau, h.data(), nj, x.data() + i0 * dim, dim, dx + j0 * dim, dim);
          }
        }
      }
    }
  }
  add_partitions(partial, parts, m, dim, sym, grad_rows);
}

// Returns false (nothing written) where too few anchors are symmetric for the pairing to pay.
template <typename T>
bool backward_combined(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                       const LabelContext& labels, const LossOptions& opt, const double* lse,
                       const double* total_weight, const double* norm, int64_t width, T* grad_rows, T* grad_cols) {
  std::vector<int64_t> active;  // anchors whose loss has a gradient
  for (int64_t i = 0; i < labels.row_sets.rows(); ++i) {
    if (total_weight[i] > 0.0 && grad_loss[i] != T(0)) active.push_back(i);
  }
  const SymmetricSplit split = split_symmetric<T>(rows, cols, dim, self, opt, labels.num_cols, active);
  const std::vector<int64_t>& sym = split.sym;
  if (static_cast<int64_t>(sym.size()) < kMinSymmetric) return false;
  PositiveLists rest_lists(sym.size()), own_lists(sym.size());
  split_positives(labels, opt, self, norm, width, sym, split.sym_at, split.rest_at, rest_lists, own_lists);
  sweep_columns<T>(grad_loss, rows, cols, dim, self, labels, opt, lse, total_weight, norm, width, split.others,
                   split.softmax, grad_rows, grad_cols);
  sweep_columns<T>(grad_loss, rows, cols, dim, self, labels, opt, lse, total_weight, norm, width, sym, split.rest,
                   grad_rows, grad_cols, &rest_lists);
  sweep_symmetric<T>(grad_loss, rows, dim, self, opt, lse, total_weight, sym, own_lists, grad_rows);
  return true;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss, const at::Tensor& rows,
                                               const at::Tensor& cols, const at::Tensor& self_col,
                                               const LabelContext& labels, const LossOptions& opt,
                                               const at::Tensor& lse, const at::Tensor& total_weight,
                                               const at::Tensor& normalizer, bool combine_self) {
  auto grad_rows = at::zeros_like(rows);
  auto grad_cols = at::zeros_like(cols);
  if (rows.size(0) == 0 || cols.size(0) == 0) return {grad_rows, grad_cols};
  const auto g = grad_loss.to(rows.scalar_type()).contiguous();
  const int64_t width = normalizer.size(1);
  const bool combine = combine_self && symmetric_enabled();
  // With a closed form the sweeps below give the label-free part, closed_backward the weights'.
  auto closed_part = [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    if (!labels.closed) return;
    closed_backward<T>(g.data_ptr<T>(), rows.data_ptr<T>(), cols.data_ptr<T>(), rows.size(1),
                       self_col.data_ptr<int64_t>(), labels, opt, normalizer.data_ptr<double>(), width,
                       total_weight.data_ptr<double>(), grad_rows.data_ptr<T>(), grad_cols.data_ptr<T>());
  };
  if (rows.scalar_type() == at::kFloat) {
    closed_part(static_cast<float*>(nullptr));
    if (combine && backward_combined<float>(g.data_ptr<float>(), rows.data_ptr<float>(), cols.data_ptr<float>(),
                                            rows.size(1), self_col.data_ptr<int64_t>(), labels, opt,
                                            lse.data_ptr<double>(), total_weight.data_ptr<double>(),
                                            normalizer.data_ptr<double>(), width, grad_rows.data_ptr<float>(),
                                            grad_cols.data_ptr<float>())) {
      return {grad_rows, grad_cols};
    }
    backward_typed<float>(g.data_ptr<float>(), rows.data_ptr<float>(), cols.data_ptr<float>(), rows.size(1),
                          self_col.data_ptr<int64_t>(), labels, opt, lse.data_ptr<double>(),
                          total_weight.data_ptr<double>(), normalizer.data_ptr<double>(), width,
                          grad_rows.data_ptr<float>(), grad_cols.data_ptr<float>());
  } else {
    closed_part(static_cast<double*>(nullptr));
    if (combine && backward_combined<double>(g.data_ptr<double>(), rows.data_ptr<double>(),
                                             cols.data_ptr<double>(), rows.size(1), self_col.data_ptr<int64_t>(),
                                             labels, opt, lse.data_ptr<double>(), total_weight.data_ptr<double>(),
                                             normalizer.data_ptr<double>(), width, grad_rows.data_ptr<double>(),
                                             grad_cols.data_ptr<double>())) {
      return {grad_rows, grad_cols};
    }
    backward_typed<double>(g.data_ptr<double>(), rows.data_ptr<double>(), cols.data_ptr<double>(), rows.size(1),
                           self_col.data_ptr<int64_t>(), labels, opt, lse.data_ptr<double>(),
                           total_weight.data_ptr<double>(), normalizer.data_ptr<double>(), width,
                           grad_rows.data_ptr<double>(), grad_cols.data_ptr<double>());
  }
  return {grad_rows, grad_cols};
}

}  // namespace mlcl_fast
