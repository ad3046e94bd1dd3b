// The blocked algorithm's loop (device-agnostic ATen) and its CPU block kernels. See blocked.h.
#include "blocked.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace mlcl_fast {

using mlcl_block::AnchorStats;
using mlcl_block::Block;
using mlcl_block::BlockProblem;

namespace {

constexpr int64_t kDefaultWorkspaceMiB = 512;

int64_t workspace_bytes() {
  const char* env = std::getenv("MLCL_FAST_BLOCK_WORKSPACE_MB");
  if (env == nullptr || *env == '\0') return kDefaultWorkspaceMiB << 20;
  char* end = nullptr;
  const double mib = std::strtod(env, &end);
  TORCH_CHECK(end != env && *end == '\0' && mib > 0.0 && mib < 1e9,
              "MLCL_FAST_BLOCK_WORKSPACE_MB: expected a positive number of MiB, got '", env, "'");
  return std::max<int64_t>(1, static_cast<int64_t>(mib * 1048576.0));
}

// The label inputs of the block kernels, packed into one int32 tensor (the forward returns it
// and the backward reuses it: the preparation, a sort among it, runs once per forward +
// backward): [label_ptr (L + 1) | label_cols (C * Kc) | row_count (R) | col_count (C) |
// row_labels (R * Kr)].
int64_t prep_size(int64_t R, int64_t C, int64_t row_width, int64_t col_width, int64_t num_labels) {
  return num_labels + 1 + C * col_width + R + C + R * row_width;
}

// |y| per row as int32.
at::Tensor label_counts(const at::Tensor& labels) {
  return (labels >= 0).sum({1}, /*keepdim=*/false, at::kInt);
}

// The columns' inverted label index (label k: columns cols[ptr[k] .. ptr[k+1]), ascending): the
// operator mlcl_fast::column_label_index, whose one implementation (mlcl_fast/label_index.py, shared
// with the Triton backend) `import mlcl_fast` registers. Called through the dispatcher, it runs
// on the labels' device with no host synchronisation.
std::tuple<at::Tensor, at::Tensor> column_label_index(const at::Tensor& col_labels, int64_t num_labels) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlcl_fast::column_label_index", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, bool)>();
  TORCH_CHECK(op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd),
              "mlcl_fast::column_label_index has no implementation: it is registered in Python by "
              "`import mlcl_fast` (mlcl_fast/backends/native_ops.py)");
  // check_values=false: the op's check_inputs has checked (or asserted) these labels already.
  return op.call(col_labels, num_labels, /*col_lo=*/0, /*check_values=*/false);
}

at::Tensor prepare_labels(const at::Tensor& row_labels, const at::Tensor& col_labels, int64_t num_labels) {
  const auto [ptr, cols] = column_label_index(col_labels, num_labels);
  return at::cat({ptr.to(at::kInt), cols.to(at::kInt), label_counts(row_labels), label_counts(col_labels),
                  row_labels.to(at::kInt).reshape({-1})});
}

// The problem that points into a packed preparation (and the self columns).
struct Prepared {
  at::Tensor packed, self_col;
  BlockProblem problem{};
};

Prepared prepare(const at::Tensor& packed, const at::Tensor& row_labels, const at::Tensor& col_labels,
                 const at::Tensor& self_col, int64_t num_rows, int64_t num_cols, const LossOptions& opt) {
  Prepared out;
  out.packed = packed.contiguous();
  out.self_col = self_col.contiguous();
  int32_t* base = out.packed.data_ptr<int32_t>();
  const int64_t L = opt.num_labels;
  BlockProblem& p = out.problem;
  p.label_ptr = base;
  p.label_cols = base + L + 1;
  p.row_count = p.label_cols + num_cols * col_labels.size(1);
  p.col_count = p.row_count + num_rows;
  p.row_labels = p.col_count + num_cols;
  p.num_rows = num_rows;
  p.num_cols = num_cols;
  p.num_sample_cols = opt.num_sample_cols;
  p.row_width = static_cast<int32_t>(row_labels.size(1));
  p.self_col = out.self_col.data_ptr<int64_t>();
  // The enums of options.h are declared in the order of the option codes (tests/test_triton.py).
  p.weighting = static_cast<int32_t>(opt.weighting);
  p.factor = static_cast<int32_t>(opt.factor);
  p.alpha = static_cast<float>(opt.alpha);
  p.beta = static_cast<float>(opt.beta);
  p.log_beta_samples = opt.beta > 0.0 ? static_cast<float>(std::log(opt.beta)) : 0.0f;
  p.inv_temperature = static_cast<float>(1.0 / opt.temperature);
  p.reg = opt.reg;
  p.needs_counts = !opt.label_centric() || opt.factor == PairFactor::Union ||
                   (opt.factor == PairFactor::Overlap && opt.alpha != 0.0);
  return out;
}

// The products run in the inputs' dtype with fp32 results: fp16/bf16 on the tensor cores
// (cuBLAS, fp32 accumulation), fp32 as torch's matmul precision allows. fp64 inputs are
// computed in fp32 (as every GPU path of this project).
at::Tensor compute_operand(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  return (half ? t : t.to(at::kFloat)).contiguous();
}

bool is_half(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// mm / addmm with an fp32 result for fp16/bf16 operands (cuBLAS, fp32 accumulation) since torch 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define MLCL_FAST_HAVE_MM_DTYPE 1
#else
#define MLCL_FAST_HAVE_MM_DTYPE 0
#endif

// out = a @ b (fp32), or out = out + a @ b with `accumulate`.
void product(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (!MLCL_FAST_HAVE_MM_DTYPE && is_half(a)) {  // older torch: the same products in fp32
    product(out, a.to(at::kFloat), b.to(at::kFloat), accumulate);
    return;
  }
  if (!is_half(a)) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
#if MLCL_FAST_HAVE_MM_DTYPE
  if (accumulate) {
    at::addmm_out(out, out, a, b, at::kFloat);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
#endif
}

struct Workspace {
  at::Tensor logits, counts, inv_z, coef;
  int64_t rows = 0;
};

int64_t bytes_per_pair(const BlockProblem& p, bool half, bool backward) {
  return 4 + (p.needs_counts ? 4 : 0) + (mlcl_block::label_centric(p) ? 4 : 0) + (backward && half ? 2 : 0);
}

Workspace make_workspace(const BlockProblem& p, const at::Tensor& q, bool backward) {
  Workspace ws;
  const int64_t C = p.num_cols;
  ws.rows = block_rows(p.num_rows, C, bytes_per_pair(p, is_half(q), backward));
  const auto f32 = q.options().dtype(at::kFloat);
  ws.logits = at::empty({ws.rows, C}, f32);
  ws.counts = p.needs_counts ? at::empty({ws.rows, C}, f32) : at::empty({0}, f32);
  ws.inv_z = mlcl_block::label_centric(p) ? at::empty({ws.rows, C}, f32) : at::empty({0}, f32);
  // fp32 coefficients overwrite the logits they come from; half ones need their own buffer.
  ws.coef = backward && is_half(q) ? at::empty({ws.rows, C}, q.options()) : ws.logits;
  return ws;
}

// Computes the block's logits and label buffers; returns the block.
Block fill_block(const BlockProblem& p, const AnchorStats& st, Workspace& ws, const at::Tensor& q,
                 const at::Tensor& kt, int64_t r0, int64_t n, const BlockKernels& kernels, bool compute_z) {
  at::Tensor logits = ws.logits.narrow(0, 0, n);
  product(logits, q.narrow(0, r0, n), kt, /*accumulate=*/false);
  Block b{r0, n, logits.data_ptr<float>(), nullptr, nullptr};
  if (p.needs_counts) {
    at::Tensor c = ws.counts.narrow(0, 0, n);
    c.zero_();
    b.counts = c.data_ptr<float>();
  }
  if (mlcl_block::label_centric(p)) {
    at::Tensor z = ws.inv_z.narrow(0, 0, n);
    z.zero_();
    b.inv_z = z.data_ptr<float>();
  }
  kernels.positives(p, st, b, compute_z);
  return b;
}

at::ScalarType loss_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ------------------------------------------------------------------------------- CPU kernels
struct CpuBlockKernels final : BlockKernels {
  void positives(const BlockProblem& p, const AnchorStats& st, const Block& b, bool compute_z) const override {
    const bool label = mlcl_block::label_centric(p);
    at::parallel_for(0, b.rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t row = b.row0 + i;
        const int32_t ai = p.row_count[row];
        const int32_t* labels = p.row_labels + row * p.row_width;
        if (p.needs_counts) {
          float* counts = b.counts + i * p.num_cols;
          for (int32_t t = 0; t < ai; ++t) {
            for (int32_t e = p.label_ptr[labels[t]]; e < p.label_ptr[labels[t] + 1]; ++e) counts[p.label_cols[e]] += 1.0f;
          }
        }
        if (!label) continue;
        float* z = st.normaliser + row * p.row_width;
        float* inv_z = b.inv_z + i * p.num_cols;
        for (int32_t t = 0; t < ai; ++t) {
          const int32_t lo_e = p.label_ptr[labels[t]], hi_e = p.label_ptr[labels[t] + 1];
          if (compute_z) {
            float sum = 0.0f;
            for (int32_t e = lo_e; e < hi_e; ++e) {
              const int64_t j = p.label_cols[e];
              if (mlcl_block::in_softmax(p, row, j)) sum += mlcl_block::block_factor(p, b, i, j);
            }
            z[t] = sum;
          }
          if (z[t] > 0.0f) {
            const float inv = 1.0f / z[t];
            for (int32_t e = lo_e; e < hi_e; ++e) inv_z[p.label_cols[e]] += inv;
          }
        }
        if (compute_z) {
          for (int32_t t = ai; t < p.row_width; ++t) z[t] = 0.0f;
          st.total_weight[row] = mlcl_block::label_total_weight(p, st.normaliser, row);
        }
      }
    });
  }

  void row_stats(const BlockProblem& p, const AnchorStats& st, const Block& b) const override {
    const bool label = mlcl_block::label_centric(p);
    at::parallel_for(0, b.rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t row = b.row0 + i;
        const float* dots = b.logits + i * p.num_cols;
        float m = -std::numeric_limits<float>::infinity(), l = 0.0f, weighted = 0.0f, omega = 0.0f;
        for (int64_t j = 0; j < p.num_cols; ++j) {
          if (!mlcl_block::in_softmax(p, row, j)) continue;
          const float x = mlcl_block::softmax_logit(p, dots[j], j);
          if (x > m) {
            l = l * std::exp(m - x) + 1.0f;
            m = x;
          } else {
            l += std::exp(x - m);
          }
          const float s = dots[j] * p.inv_temperature;
          if (label) {
            weighted += mlcl_block::label_weight(p, b, i, j) * s;
          } else {
            const float w = mlcl_block::block_omega(p, b, i, j);
            omega += w;
            weighted += w * s;
          }
        }
        if (!label) {
          st.normaliser[row] = omega;
          st.total_weight[row] = omega > 0.0f ? 1.0f : 0.0f;
          weighted = omega > 0.0f ? weighted / omega : 0.0f;
        }
        const float lse = l > 0.0f ? m + std::log(l) : 0.0f;
        float regulariser = 0.0f;
        if (p.reg && st.total_weight[row] > 0.0f) {
          for (int64_t j = 0; j < p.num_cols; ++j) {
            if (!mlcl_block::in_softmax(p, row, j)) continue;
            const float w = mlcl_block::block_weight(p, st, b, i, j);
            const float prob = std::exp(mlcl_block::softmax_logit(p, dots[j], j) - lse);
            regulariser += mlcl_block::reg_term(p, prob, w) * dots[j] * p.inv_temperature;
          }
        }
        mlcl_block::finish_anchor(st, row, lse, weighted, regulariser);
      }
    });
  }

  void gradient(const BlockProblem& p, const AnchorStats& st, const Block& b, const float* grad_loss, void* out,
                mlcl_block::CoefKind kind) const override {
    TORCH_CHECK(kind == mlcl_block::kCoefFloat32, "blocked CPU kernels: fp32 coefficients only");
    float* g = static_cast<float*>(out);
    at::parallel_for(0, b.rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        for (int64_t j = 0; j < p.num_cols; ++j) g[i * p.num_cols + j] = mlcl_block::pair_grad(p, st, b, grad_loss, i, j);
      }
    });
  }
};

}  // namespace

int64_t block_rows(int64_t num_rows, int64_t num_cols, int64_t bytes_per_pair) {
  const int64_t per_row = std::max<int64_t>(1, num_cols * bytes_per_pair);
  int64_t rows = std::max<int64_t>(1, workspace_bytes() / per_row);
  if (rows >= 64) rows -= rows % 64;  // whole tensor-core tiles
  return std::max<int64_t>(1, std::min(rows, num_rows));
}

const BlockKernels& cpu_block_kernels() {
  static const CpuBlockKernels kernels;
  return kernels;
}

bool cpu_blocked_requested() {
  const char* env = std::getenv("MLCL_FAST_CPU_ALGORITHM");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "fused") == 0) return false;
  TORCH_CHECK(std::strcmp(env, "blocked") == 0, "MLCL_FAST_CPU_ALGORITHM: expected 'fused' or 'blocked', got '",
              env, "'");
  return true;
}

at::Tensor checked_label_prep(const std::optional<at::Tensor>& given, const at::Tensor& rows,
                              const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
                              const LossOptions& opt, bool check_values) {
  if (!given.has_value() || given->numel() == 0) return at::empty({0}, rows.options().dtype(at::kInt));
  const at::Tensor& label_prep = *given;
  const int64_t size = prep_size(rows.size(0), cols.size(0), row_labels.size(1), col_labels.size(1), opt.num_labels);
  TORCH_CHECK(label_prep.dim() == 1 && label_prep.size(0) == size && label_prep.scalar_type() == at::kInt &&
                  label_prep.device() == rows.device(),
              "label_prep: expected anchor_loss_forward's int32 tensor of shape [", size, "] on ", rows.device(),
              " (or an empty one), got ", label_prep.scalar_type(), " ", label_prep.sizes(), " on ",
              label_prep.device());
  if (check_values) {  // exact: it must be what the forward made of these labels (one host read)
    TORCH_CHECK(at::equal(label_prep, prepare_labels(row_labels, col_labels, opt.num_labels)),
                "label_prep: not anchor_loss_forward's preparation of these row_labels and col_labels");
  }
  return label_prep;
}

int64_t blocked_prep_size(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                          const at::Tensor& col_labels, int64_t num_labels) {
  return prep_size(rows.size(0), cols.size(0), row_labels.size(1), col_labels.size(1), num_labels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blocked_forward(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const at::Tensor& self_col, const LossOptions& opt, const BlockKernels& kernels) {
  const int64_t R = rows.size(0), C = cols.size(0);
  const at::Tensor packed = prepare_labels(row_labels, col_labels, opt.num_labels);
  Prepared prep = prepare(packed, row_labels, col_labels, self_col, R, C, opt);
  const BlockProblem& p = prep.problem;
  const auto f32 = rows.options().dtype(at::kFloat);
  at::Tensor normaliser = at::zeros({R, normalizer_width(opt, row_labels)}, f32);
  at::Tensor total_weight = at::zeros({R}, f32), lse = at::zeros({R}, f32), loss = at::zeros({R}, f32);
  at::Tensor valid = at::zeros({R}, rows.options().dtype(at::kBool));
  const AnchorStats st{normaliser.data_ptr<float>(), total_weight.data_ptr<float>(), lse.data_ptr<float>(),
                       loss.data_ptr<float>(), reinterpret_cast<uint8_t*>(valid.data_ptr<bool>())};
  if (R > 0) {
    const at::Tensor q = compute_operand(rows), kt = compute_operand(cols).t();
    Workspace ws = make_workspace(p, q, /*backward=*/false);
    for (int64_t r0 = 0; r0 < R; r0 += ws.rows) {
      const int64_t n = std::min(ws.rows, R - r0);
      const Block b = fill_block(p, st, ws, q, kt, r0, n, kernels, /*compute_z=*/true);
      kernels.row_stats(p, st, b);
    }
  }
  return {loss.to(loss_dtype(rows.scalar_type())), valid, lse, total_weight, normaliser, packed};
}

std::tuple<at::Tensor, at::Tensor> blocked_backward(const at::Tensor& grad_loss, const at::Tensor& rows,
                                                    const at::Tensor& cols, const at::Tensor& row_labels,
                                                    const at::Tensor& col_labels, const at::Tensor& self_col,
                                                    const at::Tensor& lse, const at::Tensor& total_weight,
                                                    const at::Tensor& normaliser, const at::Tensor& label_prep,
                                                    const LossOptions& opt, const BlockKernels& kernels) {
  const int64_t R = rows.size(0), C = cols.size(0), d = rows.size(1);
  const auto f32 = rows.options().dtype(at::kFloat);
  at::Tensor grad_rows = at::zeros({R, d}, f32), grad_cols = at::zeros({C, d}, f32);
  if (R > 0 && C > 0) {
    // The forward's preparation when given (checked by checked_label_prep), else made here.
    const at::Tensor packed =
        label_prep.numel() > 0 ? label_prep : prepare_labels(row_labels, col_labels, opt.num_labels);
    Prepared prep = prepare(packed, row_labels, col_labels, self_col, R, C, opt);
    const BlockProblem& p = prep.problem;
    // The backward's kernels read the statistics and write none of them.
    at::Tensor norm = normaliser.to(at::kFloat).contiguous(), tw = total_weight.to(at::kFloat).contiguous();
    at::Tensor ld = lse.to(at::kFloat).contiguous(), g = grad_loss.to(at::kFloat).contiguous();
    const AnchorStats st{norm.data_ptr<float>(), tw.data_ptr<float>(), ld.data_ptr<float>(), nullptr, nullptr};
    const at::Tensor q = compute_operand(rows), k = compute_operand(cols), kt = k.t();
    Workspace ws = make_workspace(p, q, /*backward=*/true);
    const mlcl_block::CoefKind kind = q.scalar_type() == at::kHalf       ? mlcl_block::kCoefFloat16
                                      : q.scalar_type() == at::kBFloat16 ? mlcl_block::kCoefBFloat16
                                                                         : mlcl_block::kCoefFloat32;
    for (int64_t r0 = 0; r0 < R; r0 += ws.rows) {
      const int64_t n = std::min(ws.rows, R - r0);
      const Block b = fill_block(p, st, ws, q, kt, r0, n, kernels, /*compute_z=*/false);
      at::Tensor coef = ws.coef.narrow(0, 0, n);
      kernels.gradient(p, st, b, g.data_ptr<float>(), coef.data_ptr(), kind);
      at::Tensor rows_part = grad_rows.narrow(0, r0, n);
      product(rows_part, coef, k, /*accumulate=*/false);
      product(grad_cols, coef.t(), q.narrow(0, r0, n), /*accumulate=*/true);
    }
  }
  return {grad_rows.to(rows.scalar_type()), grad_cols.to(cols.scalar_type())};
}

}  // namespace mlcl_fast
