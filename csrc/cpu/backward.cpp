// Backward: recompute each similarity tile from the saved per-anchor statistics, turn it into
// G_ij = g_i (W_i p_ij - w_ij - r_ij) in place, and push it through two GEMMs. Row gradients
// belong to one block; column gradients are summed per partition of blocks into separate
// buffers and reduced in partition order, so results are deterministic for a thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <limits>
#include <vector>

#include "blocks.h"
#include "kernels.h"
#include "tile_math.h"

namespace mlcl_fast {

namespace {

template <typename T>
void backward_typed(const T* grad_loss, const T* rows, const T* cols, int64_t dim, const int64_t* self,
                    const LabelContext& labels, const LossOptions& opt, const double* lse,
                    const double* total_weight, const double* norm, int64_t width, T* grad_rows, T* grad_cols) {
  const int64_t anchors = labels.row_sets.rows();
  const int64_t num_cols = labels.num_cols;
  std::vector<int64_t> active;  // anchors whose loss has a gradient
  for (int64_t i = 0; i < anchors; ++i) {
    if (total_weight[i] > 0.0 && grad_loss[i] != T(0)) active.push_back(i);
  }
  const std::vector<ColumnTile> tiles = column_tiles(opt, num_cols);
  const int64_t blocks = (static_cast<int64_t>(active.size()) + kRowBlock - 1) / kRowBlock;
  // Partitions are contiguous runs of blocks, each summed by one thread into its own C x d
  // column-gradient buffer. Two per thread, taken dynamically, keep a thread slowed by other load
  // from holding up the rest; their number is capped so that the buffers take at most
  // max(1 GiB, 4 buffers).
  const int64_t threads = thread_count();
  const double buffer_bytes = static_cast<double>(num_cols) * dim * sizeof(T);
  const double budget = std::max(double(1 << 30), 4.0 * buffer_bytes);
  const int64_t max_parts = 1 + static_cast<int64_t>(budget / std::max(buffer_bytes, 1.0));
  const int64_t parts = std::max<int64_t>(1, std::min({threads == 1 ? 1 : 2 * threads, blocks, max_parts}));
  // Partition 0 accumulates straight into grad_cols; the others into their own buffers.
  std::vector<T> partial(static_cast<size_t>((parts - 1) * num_cols * dim), T(0));
  const T inv_tau = static_cast<T>(1.0 / opt.temperature);

#pragma omp parallel num_threads(std::min(threads, parts))
  {
    PositiveFinder finder(labels, opt);
    BlockPositives pos;
    std::vector<T> block_rows(kRowBlock * dim), block_grad(kRowBlock * dim), sim(kRowBlock * kColTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t part = 0; part < parts; ++part) {
      T* gcols = part == 0 ? grad_cols : partial.data() + (part - 1) * num_cols * dim;
      for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
        const int64_t* ids = active.data() + b * kRowBlock;
        const int64_t nb = std::min<int64_t>(kRowBlock, static_cast<int64_t>(active.size()) - b * kRowBlock);
        pos.reset(nb);
        for (int64_t r = 0; r < nb; ++r) {
          const int64_t i = ids[r];
          std::copy(rows + i * dim, rows + (i + 1) * dim, block_rows.data() + r * dim);
          finder.positives(i, self[i], norm + i * width, pos.col, pos.w);
          pos.close_anchor();
        }
        pos.rewind();
        std::fill(block_grad.begin(), block_grad.begin() + nb * dim, T(0));
        for (const ColumnTile& tile : tiles) {
          const int64_t n = tile.end - tile.begin;
          gemm_abt<T>(nb, n, dim, inv_tau, block_rows.data(), dim, cols + tile.begin * dim, dim, sim.data(), n);
          for (int64_t r = 0; r < nb; ++r) {
            const int64_t i = ids[r];
            T* s = sim.data() + r * n;
            const double g = static_cast<double>(grad_loss[i]);
            // log p_ij = s_ij + log beta_j - lse_i
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
            const int64_t own = self[i] - tile.begin;
            if (own >= 0 && own < n) s[own] = T(0);
            for (int64_t p = p0; p < p1; ++p) s[pos.col[p] - tile.begin] -= static_cast<T>(pos.s[p]);
          }
          gemm_ab_acc<T>(nb, dim, n, inv_tau, sim.data(), n, cols + tile.begin * dim, dim, block_grad.data(), dim);
          gemm_atb_acc<T>(n, dim, nb, inv_tau, sim.data(), n, block_rows.data(), dim, gcols + tile.begin * dim, dim);
        }
        for (int64_t r = 0; r < nb; ++r) {
          std::copy(block_grad.data() + r * dim, block_grad.data() + (r + 1) * dim, grad_rows + ids[r] * dim);
        }
      }
    }
  }
  if (parts > 1) {
    const int64_t total = num_cols * dim;
    at::parallel_for(0, total, 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t part = 1; part < parts; ++part) {
        const T* src = partial.data() + (part - 1) * total;
        for (int64_t e = lo; e < hi; ++e) grad_cols[e] += src[e];
      }
    });
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_loss, const at::Tensor& rows,
                                               const at::Tensor& cols, const at::Tensor& self_col,
                                               const LabelContext& labels, const LossOptions& opt,
                                               const at::Tensor& lse, const at::Tensor& total_weight,
                                               const at::Tensor& normalizer) {
  auto grad_rows = at::zeros_like(rows);
  auto grad_cols = at::zeros_like(cols);
  if (rows.size(0) == 0 || cols.size(0) == 0) return {grad_rows, grad_cols};
  const auto g = grad_loss.to(rows.scalar_type()).contiguous();
  const int64_t width = normalizer.size(1);
  if (rows.scalar_type() == at::kFloat) {
    backward_typed<float>(g.data_ptr<float>(), rows.data_ptr<float>(), cols.data_ptr<float>(), rows.size(1),
                          self_col.data_ptr<int64_t>(), labels, opt, lse.data_ptr<double>(),
                          total_weight.data_ptr<double>(), normalizer.data_ptr<double>(), width,
                          grad_rows.data_ptr<float>(), grad_cols.data_ptr<float>());
  } else {
    backward_typed<double>(g.data_ptr<double>(), rows.data_ptr<double>(), cols.data_ptr<double>(), rows.size(1),
                           self_col.data_ptr<int64_t>(), labels, opt, lse.data_ptr<double>(),
                           total_weight.data_ptr<double>(), normalizer.data_ptr<double>(), width,
                           grad_rows.data_ptr<double>(), grad_cols.data_ptr<double>());
  }
  return {grad_rows, grad_cols};
}

}  // namespace mlcl_fast
