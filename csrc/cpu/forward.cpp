// Forward: per-anchor normalisers and validity from the labels, then one streaming pass over
// column tiles per block of valid anchors with an online log-sum-exp. Only per-anchor
// statistics leave the kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "blocks.h"
#include "closed.h"
#include "kernels.h"
#include "tile_math.h"

namespace mlcl_fast {

namespace {

// Normaliser and validity of every anchor; returns the valid anchors in ascending order.
std::vector<int64_t> anchor_normalizers(const LabelContext& labels, const LossOptions& opt, const int64_t* self,
                                        int64_t anchors, int64_t width, double* norm, bool* valid) {
  const int64_t threads = thread_count();
#pragma omp parallel num_threads(threads)
  {
    PositiveFinder finder(labels, opt);
#pragma omp for schedule(dynamic, 64)
    for (int64_t i = 0; i < anchors; ++i) valid[i] = finder.normalizer(i, self[i], norm + i * width);
  }
  std::vector<int64_t> active;
  for (int64_t i = 0; i < anchors; ++i) {
    if (valid[i]) active.push_back(i);
  }
  return active;
}

// |s_ij| <= |x_i| max_j |x_j| / tau bounds every logit, so when that range (and the spread of
// log beta_j) fits the exponent range, a fixed per-anchor shift replaces the running maximum
// (one pass over each tile, and sums from different tiles add without rescaling).
template <typename T>
struct FixedShifts {
  double col_norm = 0.0;
  double log_beta_hi = -std::numeric_limits<double>::infinity(), log_beta_lo = -log_beta_hi;
  double temperature;

  FixedShifts(const T* cols, int64_t dim, const LabelContext& labels, const LossOptions& opt)
      : temperature(opt.temperature) {
    for (int64_t j = labels.first_col; j < labels.num_cols; ++j) {
      double sq = 0.0;
      for (int64_t e = 0; e < dim; ++e) sq += static_cast<double>(cols[j * dim + e]) * cols[j * dim + e];
      col_norm = std::max(col_norm, std::sqrt(sq));
    }
    for (const ColumnTile& tile : column_tiles(opt, labels.num_cols)) {
      log_beta_hi = std::max(log_beta_hi, tile.log_beta);
      log_beta_lo = std::min(log_beta_lo, tile.log_beta);
    }
  }

  // The row's shift (its bound on s_ij + log beta_j), or -inf where it needs a running maximum.
  double of(const T* row, int64_t dim) const {
    double sq = 0.0;
    for (int64_t e = 0; e < dim; ++e) sq += static_cast<double>(row[e]) * row[e];
    const double bound = std::sqrt(sq) * col_norm / temperature;
    const double range = std::is_same_v<T, float> ? 50.0 : 600.0;
    return 2.0 * bound + (log_beta_hi - log_beta_lo) <= range ? bound + log_beta_hi
                                                              : -std::numeric_limits<double>::infinity();
  }
};

template <typename T>
void stream_blocks(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LabelContext& labels,
                   const LossOptions& opt, int64_t width, const std::vector<int64_t>& active, const double* norm,
                   T* loss, double* lse, double* total_weight) {
  const std::vector<ColumnTile> tiles = column_tiles(opt, labels.num_cols);
  const int64_t blocks = (static_cast<int64_t>(active.size()) + kRowBlock - 1) / kRowBlock;
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const FixedShifts<T> shifts(cols, dim, labels, opt);
  const double log_beta_samples = opt.beta > 0.0 ? std::log(opt.beta) : 0.0;
  const int64_t threads = thread_count();
#pragma omp parallel num_threads(threads)
  {
    PositiveFinder finder(labels, opt);
    BlockPositives pos;
    std::vector<T> block_rows(kRowBlock * dim), sim(kRowBlock * kColTile);
    std::vector<double> run_max(kRowBlock), run_sum(kRowBlock);
    std::vector<char> fixed_shift(kRowBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t* ids = active.data() + b * kRowBlock;
      const int64_t nb = std::min<int64_t>(kRowBlock, static_cast<int64_t>(active.size()) - b * kRowBlock);
      pos.reset(nb);
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t i = ids[r];
        std::copy(rows + i * dim, rows + (i + 1) * dim, block_rows.data() + r * dim);
        total_weight[i] = finder.positives(i, self[i], norm + i * width, pos.col, pos.w);
        pos.close_anchor();
        run_max[r] = shifts.of(rows + i * dim, dim);
        fixed_shift[r] = run_max[r] > neg_inf;
        run_sum[r] = 0.0;
      }
      pos.rewind();
      for (const ColumnTile& tile : tiles) {
        const int64_t n = tile.end - tile.begin;
        gemm_abt<T>(nb, n, dim, inv_tau, block_rows.data(), dim, cols + tile.begin * dim, dim, sim.data(), n);
        for (int64_t r = 0; r < nb; ++r) {
          T* s = sim.data() + r * n;
          const auto [p0, p1] = pos.advance(r, tile.end);
          for (int64_t p = p0; p < p1; ++p) pos.s[p] = static_cast<double>(s[pos.col[p] - tile.begin]);
          const int64_t own = self[ids[r]] - tile.begin;
          if (own >= 0 && own < n) s[own] = -std::numeric_limits<T>::infinity();
          if (fixed_shift[r]) {
            run_sum[r] += static_cast<double>(sum_exp(s, n, static_cast<T>(run_max[r] - tile.log_beta)));
            continue;
          }
          const T tile_max = row_max(s, n);
          if (!(tile_max > -std::numeric_limits<T>::infinity())) continue;
          // running max of s_ij + log beta_j, rescaling the running sum when it grows
          const double candidate = static_cast<double>(tile_max) + tile.log_beta;
          if (candidate > run_max[r]) {
            run_sum[r] *= std::exp(run_max[r] - candidate);
            run_max[r] = candidate;
          }
          run_sum[r] += static_cast<double>(sum_exp(s, n, static_cast<T>(run_max[r] - tile.log_beta)));
        }
      }
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t i = ids[r];
        const double log_d = run_max[r] + std::log(run_sum[r]);
        double value = total_weight[i] * log_d;
        for (int64_t p = pos.start[r]; p < pos.start[r + 1]; ++p) {
          value -= pos.w[p] * pos.s[p];
          if (opt.reg) {
            // r_ij = max(p_ij - w_ij, 0) on positives, a constant; the value includes -r_ij s_ij
            const double log_beta = pos.col[p] < opt.num_sample_cols ? log_beta_samples : 0.0;
            const double prob = static_cast<double>(exp_tile(static_cast<T>(pos.s[p] + log_beta - log_d)));
            value -= std::max(prob - pos.w[p], 0.0) * pos.s[p];
          }
        }
        lse[i] = log_d;
        loss[i] = static_cast<T>(value);
      }
    }
  }
}

// The symmetric anchors (blocks.h) swept against each other once per unordered pair of blocks:
// one tile gives the softmax sums of its rows and, transposed, of its columns' anchors (s_ij =
// s_ji), and the positives' logits of both. Only with fixed shifts (every logit range fits the
// exponent range, as stream_blocks decides per anchor), so sums from different tiles add without
// rescaling; the sums are kept per partition of row blocks and added in partition order
// (deterministic per thread count). Returns false (nothing written) where it does not apply.
template <typename T>
bool stream_symmetric(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LabelContext& labels,
                      const LossOptions& opt, int64_t width, const std::vector<int64_t>& active, const double* norm,
                      T* loss, double* lse, double* total_weight) {
  if (!symmetric_enabled()) return false;
  const int64_t num_cols = labels.num_cols;
  SymmetricSplit split = split_symmetric<T>(rows, cols, dim, self, opt, num_cols, active);
  const std::vector<int64_t>& sym = split.sym;
  const int64_t m = static_cast<int64_t>(sym.size());
  if (m < kMinSymmetric) return false;
  const int64_t n_samples = opt.num_sample_cols;
  const double log_beta_samples = opt.beta > 0.0 ? std::log(opt.beta) : 0.0;
  auto col_lb = [&](int64_t j) { return j < n_samples ? log_beta_samples : 0.0; };
  const FixedShifts<T> shifts(cols, dim, labels, opt);
  std::vector<double> shift(m);
  for (int64_t p = 0; p < m; ++p) {
    shift[p] = shifts.of(rows + sym[p] * dim, dim);
    if (shift[p] == -std::numeric_limits<double>::infinity()) return false;  // a running maximum is needed
  }
  PositiveLists rest_l(m), own_l(m);
  split_positives(labels, opt, self, norm, width, sym, split.sym_at, split.rest_at, rest_l, own_l);
  std::vector<std::vector<double>> rest_s(m), own_s(m);
  for (int64_t p = 0; p < m; ++p) {
    rest_s[p].resize(rest_l.col[p].size());
    own_s[p].resize(own_l.col[p].size());
  }
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const int64_t threads = thread_count();
  std::vector<T> x(static_cast<size_t>(m * dim));
  std::vector<T> lb(m);
  for (int64_t p = 0; p < m; ++p) {
    std::copy(rows + sym[p] * dim, rows + (sym[p] + 1) * dim, x.data() + p * dim);
    lb[p] = static_cast<T>(col_lb(self[sym[p]]));
  }

  // (a) the symmetric anchors against the columns no symmetric anchor owns
  std::vector<double> rest_sum(m, 0.0);
  const std::vector<int64_t>& rest = split.rest;
  const int64_t nr = static_cast<int64_t>(rest.size());
  if (nr > 0) {
    std::vector<T> gathered(static_cast<size_t>(nr * dim));
    for (int64_t t = 0; t < nr; ++t) std::copy(cols + rest[t] * dim, cols + (rest[t] + 1) * dim, gathered.data() + t * dim);
    std::vector<ColumnTile> tiles;
    const int64_t cut = std::lower_bound(rest.begin(), rest.end(), n_samples) - rest.begin();
    for (int64_t c = 0; c < cut; c += kColTile) tiles.push_back({c, std::min(cut, c + kColTile), log_beta_samples});
    for (int64_t c = cut; c < nr; c += kColTile) tiles.push_back({c, std::min(nr, c + kColTile), 0.0});
    const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
#pragma omp parallel num_threads(threads)
    {
      std::vector<T> sim(kRowBlock * kColTile);
      std::vector<size_t> cursor(kRowBlock);
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t p0 = b * kRowBlock, nb = std::min<int64_t>(kRowBlock, m - p0);
        std::fill(cursor.begin(), cursor.end(), 0);
        for (const ColumnTile& tile : tiles) {
          const int64_t n = tile.end - tile.begin;
          gemm_abt<T>(nb, n, dim, inv_tau, x.data() + p0 * dim, dim, gathered.data() + tile.begin * dim, dim,
                      sim.data(), n);
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t p = p0 + r;
            const T* srow = sim.data() + r * n;
            const std::vector<int32_t>& cl = rest_l.col[p];
            size_t& q = cursor[r];
            for (; q < cl.size() && cl[q] < tile.end; ++q) rest_s[p][q] = static_cast<double>(srow[cl[q] - tile.begin]);
            rest_sum[p] += static_cast<double>(sum_exp(srow, n, static_cast<T>(shift[p] - tile.log_beta)));
          }
        }
      }
    }
  }

  // (b) pairs of symmetric blocks
  const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
  const int64_t parts = partition_count(blocks, static_cast<double>(m) * sizeof(double));
  const std::vector<int64_t> bound = pair_partitions(blocks, parts);
  std::vector<double> acc(static_cast<size_t>(parts * m), 0.0);
  std::vector<T> shift_t(m);
  for (int64_t p = 0; p < m; ++p) shift_t[p] = static_cast<T>(shift[p]);
#pragma omp parallel num_threads(std::min(threads, parts))
  {
    std::vector<T> sim(kRowBlock * kRowBlock), colsum(kRowBlock);
#pragma omp for schedule(dynamic, 1)
    for (int64_t part = 0; part < parts; ++part) {
      double* sums = acc.data() + part * m;
      for (int64_t bi = bound[part]; bi < bound[part + 1]; ++bi) {
        const int64_t i0 = bi * kRowBlock, ni = std::min<int64_t>(kRowBlock, m - i0);
        for (int64_t bj = bi; bj < blocks; ++bj) {
          const int64_t j0 = bj * kRowBlock, nj = std::min<int64_t>(kRowBlock, m - j0);
          const bool diagonal = bi == bj;
          gemm_abt<T>(ni, nj, dim, inv_tau, x.data() + i0 * dim, dim, x.data() + j0 * dim, dim, sim.data(), nj);
          if (diagonal) {
            for (int64_t r = 0; r < ni; ++r) sim[r * nj + r] = -std::numeric_limits<T>::infinity();  // own column
          }
          std::fill(colsum.begin(), colsum.begin() + nj, T(0));
          for (int64_t r = 0; r < ni; ++r) {
            // row i0 + r against the columns of J; on a diagonal block that covers both roles
            sums[i0 + r] += static_cast<double>(pair_sums<T>(sim.data() + r * nj, lb.data() + j0, shift_t.data() + j0,
                                                             diagonal ? nullptr : colsum.data(), nj, shift_t[i0 + r],
                                                             lb[i0 + r]));
          }
          if (!diagonal) {
            for (int64_t c = 0; c < nj; ++c) sums[j0 + c] += static_cast<double>(colsum[c]);
          }
          // the positives' logits: rows of I among the columns of J, and rows of J among those of I
          auto record = [&](int64_t a, int64_t lo, int64_t hi, bool rows_side) {
            const std::vector<int32_t>& cl = own_l.col[a];
            auto it = std::lower_bound(cl.begin(), cl.end(), static_cast<int32_t>(lo));
            for (size_t q = it - cl.begin(); q < cl.size() && cl[q] < hi; ++q) {
              const int64_t r = rows_side ? a - i0 : cl[q] - i0;
              const int64_t c = rows_side ? cl[q] - j0 : a - j0;
              own_s[a][q] = static_cast<double>(sim[r * nj + c]);
            }
          };
          for (int64_t r = 0; r < ni; ++r) record(i0 + r, j0, j0 + nj, true);
          if (!diagonal) {
            for (int64_t c = 0; c < nj; ++c) record(j0 + c, i0, i0 + ni, false);
          }
        }
      }
    }
  }

  // (c) per anchor: log D_i, W_i and the loss, as stream_blocks finishes them
  at::parallel_for(0, m, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const int64_t i = sym[p];
      double run = rest_sum[p];
      for (int64_t part = 0; part < parts; ++part) run += acc[part * m + p];
      const double log_d = shift[p] + std::log(run);
      double w_total = 0.0, value = 0.0;
      auto add = [&](const std::vector<int32_t>& cl, const std::vector<double>& wl, const std::vector<double>& sl,
                     bool own) {
        for (size_t q = 0; q < cl.size(); ++q) {
          w_total += wl[q];
          value -= wl[q] * sl[q];
          if (opt.reg) {
            const int64_t col = own ? self[sym[cl[q]]] : rest[cl[q]];
            const double prob = static_cast<double>(exp_tile(static_cast<T>(sl[q] + col_lb(col) - log_d)));
            value -= std::max(prob - wl[q], 0.0) * sl[q];
          }
        }
      };
      add(rest_l.col[p], rest_l.w[p], rest_s[p], false);
      add(own_l.col[p], own_l.w[p], own_s[p], true);
      value += w_total * log_d;
      total_weight[i] = w_total;
      lse[i] = log_d;
      loss[i] = static_cast<T>(value);
    }
  });
  // the anchors that do not pair: the one-directional sweep
  if (!split.others.empty()) {
    stream_blocks<T>(rows, cols, dim, self, labels, opt, width, split.others, norm, loss, lse, total_weight);
  }
  return true;
}

template <typename T>
void forward_typed(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& self_col,
                   const LabelContext& labels, const LossOptions& opt, int64_t width, ForwardResult& out) {
  const int64_t anchors = rows.size(0);
  const int64_t* self = self_col.data_ptr<int64_t>();
  double* norm = out.normalizer.data_ptr<double>();
  bool* valid = out.valid.data_ptr<bool>();
  const std::vector<int64_t> active = anchor_normalizers(labels, opt, self, anchors, width, norm, valid);
  if (!stream_symmetric<T>(rows.data_ptr<T>(), cols.data_ptr<T>(), rows.size(1), self, labels, opt, width, active,
                           norm, out.loss.data_ptr<T>(), out.lse.data_ptr<double>(),
                           out.total_weight.data_ptr<double>())) {
    stream_blocks<T>(rows.data_ptr<T>(), cols.data_ptr<T>(), rows.size(1), self, labels, opt, width, active, norm,
                     out.loss.data_ptr<T>(), out.lse.data_ptr<double>(), out.total_weight.data_ptr<double>());
  }
  if (labels.closed) {  // the sweeps listed no positive: W_i and sum_j w_ij s_ij from the closed form
    std::vector<double> dot(static_cast<size_t>(anchors), 0.0);
    closed_dots<T>(rows.data_ptr<T>(), cols.data_ptr<T>(), rows.size(1), self, labels, norm, width, active,
                   dot.data());
    T* loss = out.loss.data_ptr<T>();
    const double* lse = out.lse.data_ptr<double>();
    double* total_weight = out.total_weight.data_ptr<double>();
    for (int64_t i : active) {
      total_weight[i] = closed_total_weight(labels, i, norm + i * width);
      loss[i] = static_cast<T>(total_weight[i] * lse[i] - dot[i] / opt.temperature);
    }
  }
}

}  // namespace

ForwardResult forward_cpu(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& self_col,
                          const LabelContext& labels, const LossOptions& opt, int64_t normalizer_width) {
  const int64_t anchors = rows.size(0);
  const auto f64 = rows.options().dtype(at::kDouble);
  ForwardResult out;
  out.loss = at::zeros({anchors}, rows.options());
  out.valid = at::zeros({anchors}, rows.options().dtype(at::kBool));
  out.lse = at::zeros({anchors}, f64);
  out.total_weight = at::zeros({anchors}, f64);
  out.normalizer = at::zeros({anchors, normalizer_width}, f64);
  if (anchors == 0) return out;
  if (rows.scalar_type() == at::kFloat) {
    forward_typed<float>(rows, cols, self_col, labels, opt, normalizer_width, out);
  } else {
    forward_typed<double>(rows, cols, self_col, labels, opt, normalizer_width, out);
  }
  return out;
}

}  // namespace mlcl_fast
