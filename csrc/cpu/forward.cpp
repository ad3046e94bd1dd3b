// Forward: per-anchor normalisers and validity from the labels, then one streaming pass over
// column tiles per block of valid anchors with an online log-sum-exp. Only per-anchor
// statistics leave the kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "blocks.h"
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

template <typename T>
void stream_blocks(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LabelContext& labels,
                   const LossOptions& opt, int64_t width, const std::vector<int64_t>& active, const double* norm,
                   T* loss, double* lse, double* total_weight) {
  const std::vector<ColumnTile> tiles = column_tiles(opt, labels.num_cols);
  const int64_t blocks = (static_cast<int64_t>(active.size()) + kRowBlock - 1) / kRowBlock;
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // |s_ij| <= |x_i| max_j |x_j| / tau bounds every logit, so when that range fits the exponent
  // range a fixed per-anchor shift replaces the running maximum (one pass over each tile).
  double col_norm = 0.0;
  for (int64_t j = labels.first_col; j < labels.num_cols; ++j) {
    double sq = 0.0;
    for (int64_t e = 0; e < dim; ++e) sq += static_cast<double>(cols[j * dim + e]) * cols[j * dim + e];
    col_norm = std::max(col_norm, std::sqrt(sq));
  }
  double log_beta_hi = neg_inf, log_beta_lo = -neg_inf;
  for (const ColumnTile& tile : tiles) {
    log_beta_hi = std::max(log_beta_hi, tile.log_beta);
    log_beta_lo = std::min(log_beta_lo, tile.log_beta);
  }
  const double shift_range = std::is_same_v<T, float> ? 50.0 : 600.0;
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
        double sq = 0.0;
        for (int64_t e = 0; e < dim; ++e) sq += static_cast<double>(rows[i * dim + e]) * rows[i * dim + e];
        const double bound = std::sqrt(sq) * col_norm / opt.temperature;
        fixed_shift[r] = 2.0 * bound + (log_beta_hi - log_beta_lo) <= shift_range;
        run_max[r] = fixed_shift[r] ? bound + log_beta_hi : neg_inf;
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

template <typename T>
void forward_typed(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& self_col,
                   const LabelContext& labels, const LossOptions& opt, int64_t width, ForwardResult& out) {
  const int64_t anchors = rows.size(0);
  const int64_t* self = self_col.data_ptr<int64_t>();
  double* norm = out.normalizer.data_ptr<double>();
  bool* valid = out.valid.data_ptr<bool>();
  const std::vector<int64_t> active = anchor_normalizers(labels, opt, self, anchors, width, norm, valid);
  stream_blocks<T>(rows.data_ptr<T>(), cols.data_ptr<T>(), rows.size(1), self, labels, opt, width, active, norm,
                   out.loss.data_ptr<T>(), out.lse.data_ptr<double>(), out.total_weight.data_ptr<double>());
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
