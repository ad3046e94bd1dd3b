// CUDA implementations of the mlcl_fast ops (schemas: csrc/cpu/ops.cpp, documented in
// csrc/README.md). Validates the tensors, converts labels to the kernels' int32 form, builds the
// inverted label index, and runs the passes of kernels.h on the current CUDA stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "cpu/options.h"
#include "cuda/kernels.h"
#include "cuda/prepare.h"

namespace mlcl_fast {
namespace {

int32_t scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return mlcl_cuda::kFloat32;
    case at::kHalf:
      return mlcl_cuda::kFloat16;
    case at::kBFloat16:
      return mlcl_cuda::kBFloat16;
    case at::kDouble:
      return mlcl_cuda::kFloat64;
    default:
      TORCH_CHECK(false, "rows: expected float32, float16, bfloat16 or float64, got ", t);
  }
}

void check_cuda_result(cudaError_t err, const char* pass) {
  TORCH_CHECK(err == cudaSuccess, "mlcl_fast CUDA ", pass, " failed: ", cudaGetErrorString(err));
}

void check_on(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, ": expected a tensor on ", device, " (where rows are), got ", t.device());
}

void check_cuda_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                  const at::Tensor& col_labels, const at::Tensor& self_col, const LossOptions& opt) {
  TORCH_CHECK(rows.is_cuda(), "rows: expected a CUDA tensor, got device ", rows.device());
  const at::Device device = rows.device();
  check_on(cols, "cols", device);
  check_on(row_labels, "row_labels", device);
  check_on(col_labels, "col_labels", device);
  check_on(self_col, "self_col", device);
  TORCH_CHECK(rows.dim() == 2, "rows: expected shape [R, d], got ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2, "cols: expected shape [C, d], got ", cols.sizes());
  scalar_kind(rows.scalar_type());
  TORCH_CHECK(cols.scalar_type() == rows.scalar_type(), "cols: dtype ", cols.scalar_type(), " differs from rows' dtype ",
              rows.scalar_type());
  TORCH_CHECK(cols.size(1) == rows.size(1), "cols: dimension ", cols.size(1), " differs from rows' ", rows.size(1));
  TORCH_CHECK(cols.size(0) < std::numeric_limits<int32_t>::max(), "cols: at most 2^31-2 columns, got ", cols.size(0));
  TORCH_CHECK(opt.num_sample_cols <= cols.size(0), "num_sample_cols: ", opt.num_sample_cols, " exceeds the ",
              cols.size(0), " columns");
  for (const auto& [t, name, n] : {std::tuple<const at::Tensor&, const char*, int64_t>{row_labels, "row_labels", rows.size(0)},
                                   {col_labels, "col_labels", cols.size(0)}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n, name, ": expected shape [", n, ", K] (padded sorted label ids), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong, name, ": expected int64, got ", t.scalar_type());
    TORCH_CHECK(t.size(1) < std::numeric_limits<int32_t>::max(), name, ": too many label slots");
  }
  TORCH_CHECK(col_labels.numel() < std::numeric_limits<int32_t>::max(), "col_labels: at most 2^31-2 entries, got ",
              col_labels.numel());
  TORCH_CHECK(self_col.dim() == 1 && self_col.size(0) == rows.size(0), "self_col: expected shape [", rows.size(0),
              "], got ", self_col.sizes());
  TORCH_CHECK(self_col.scalar_type() == at::kLong, "self_col: expected int64, got ", self_col.scalar_type());

  // One device-to-host copy for every value check.
  const at::Tensor self_bad = ((self_col < 0) | (self_col >= cols.size(0))).sum();
  const at::Tensor counts =
      at::stack({cuda_prep::label_violations(row_labels, opt.num_labels),
                 cuda_prep::label_violations(col_labels, opt.num_labels), self_bad})
          .cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0, "row_labels: ", c[0], " entries are not sorted ascending, unique label ids in [0, ",
              opt.num_labels, ") padded with -1 at the end");
  TORCH_CHECK(c[1] == 0, "col_labels: ", c[1], " entries are not sorted ascending, unique label ids in [0, ",
              opt.num_labels, ") padded with -1 at the end");
  TORCH_CHECK(c[2] == 0, "self_col: ", c[2], " entries do not index the ", cols.size(0), " columns");
}

// Everything the kernels read, kept alive for the duration of one op.
struct Prepared {
  at::Tensor rows, cols, row_labels, row_count, col_labels, col_count, self_col, label_ptr, label_cols;
  mlcl_cuda::LossProblem problem{};
};

Prepared prepare(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                 const at::Tensor& col_labels, const at::Tensor& self_col, const LossOptions& opt) {
  Prepared out;
  out.rows = rows.contiguous();
  out.cols = cols.contiguous();
  out.row_labels = row_labels.to(at::kInt).contiguous();
  out.col_labels = col_labels.to(at::kInt).contiguous();
  out.row_count = cuda_prep::label_counts(row_labels);
  out.col_count = cuda_prep::label_counts(col_labels);
  out.self_col = self_col.contiguous();
  const cuda_prep::LabelIndex index = cuda_prep::column_label_index(col_labels, opt.num_labels);
  out.label_ptr = index.ptr;
  out.label_cols = index.cols;

  mlcl_cuda::LossProblem& p = out.problem;
  p.rows = out.rows.data_ptr();
  p.cols = out.cols.data_ptr();
  p.dtype = scalar_kind(rows.scalar_type());
  p.num_rows = rows.size(0);
  p.num_cols = cols.size(0);
  p.num_sample_cols = opt.num_sample_cols;
  p.dim = rows.size(1);
  p.row_labels = out.row_labels.data_ptr<int32_t>();
  p.row_count = out.row_count.data_ptr<int32_t>();
  p.row_width = static_cast<int32_t>(row_labels.size(1));
  p.col_labels = out.col_labels.data_ptr<int32_t>();
  p.col_count = out.col_count.data_ptr<int32_t>();
  p.col_width = static_cast<int32_t>(col_labels.size(1));
  p.self_col = out.self_col.data_ptr<int64_t>();
  p.label_ptr = out.label_ptr.data_ptr<int32_t>();
  p.label_cols = out.label_cols.data_ptr<int32_t>();
  p.num_labels = opt.num_labels;
  switch (opt.weighting) {
    case Weighting::Any:
      p.weighting = mlcl_cuda::kWeightAny;
      break;
    case Weighting::All:
      p.weighting = mlcl_cuda::kWeightAll;
      break;
    case Weighting::Jaccard:
      p.weighting = mlcl_cuda::kWeightJaccard;
      break;
    case Weighting::Label:
      p.weighting = mlcl_cuda::kWeightLabel;
      break;
  }
  switch (opt.factor) {
    case PairFactor::One:
      p.factor = mlcl_cuda::kFactorOne;
      break;
    case PairFactor::Union:
      p.factor = mlcl_cuda::kFactorUnion;
      break;
    case PairFactor::Overlap:
      p.factor = mlcl_cuda::kFactorOverlap;
      break;
  }
  p.alpha = static_cast<float>(opt.alpha);
  p.beta = static_cast<float>(opt.beta);
  p.log_beta_samples = opt.beta > 0.0 ? static_cast<float>(std::log(opt.beta)) : 0.0f;
  p.inv_temperature = static_cast<float>(1.0 / opt.temperature);
  p.reg = opt.reg;
  return out;
}

float* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// Half inputs give an fp32 loss (computed in fp32); float64 inputs get float64 outputs.
at::ScalarType loss_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> anchor_loss_forward_cuda(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels, const at::Tensor& col_labels,
    const at::Tensor& self_col, int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
    c10::string_view weighting, c10::string_view pair_factor, double alpha, bool reg) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_cuda_inputs(rows, cols, row_labels, col_labels, self_col, opt);
  const c10::cuda::CUDAGuard guard(rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
  const Prepared prep = prepare(rows, cols, row_labels, col_labels, self_col, opt);

  const int64_t anchors = rows.size(0);
  const auto f32 = rows.options().dtype(at::kFloat);
  const at::Tensor slot = at::empty({anchors, row_labels.size(1)}, f32);
  const at::Tensor omega = at::zeros({anchors}, f32);
  const at::Tensor total_weight = at::empty({anchors}, f32);
  const at::Tensor lse = at::empty({anchors}, f32);
  const at::Tensor weighted = at::empty({anchors}, f32);
  const at::Tensor reg_logit = at::empty({anchors}, f32);
  const at::Tensor loss = at::empty({anchors}, f32);
  const at::Tensor valid = at::empty({anchors}, rows.options().dtype(at::kBool));
  const mlcl_cuda::AnchorState st{ptr(slot), ptr(omega), ptr(total_weight), ptr(lse), ptr(weighted), ptr(reg_logit)};

  check_cuda_result(mlcl_cuda::launch_normaliser(prep.problem, st, stream), "normaliser");
  check_cuda_result(mlcl_cuda::launch_log_denominator(prep.problem, st, stream), "log-denominator");
  check_cuda_result(mlcl_cuda::launch_anchor_loss(prep.problem, st, ptr(loss),
                                                  anchors ? reinterpret_cast<uint8_t*>(valid.data_ptr<bool>()) : nullptr,
                                                  stream),
                    "anchor loss");
  // The saved statistics travel as float64, as from the CPU ops (one schema, one fake kernel).
  const at::Tensor normalizer = opt.label_centric() ? slot : omega.unsqueeze(1);
  return {loss.to(loss_dtype(rows.scalar_type())), valid, lse.to(at::kDouble), total_weight.to(at::kDouble),
          normalizer.to(at::kDouble)};
}

std::tuple<at::Tensor, at::Tensor> anchor_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
    const at::Tensor& col_labels, const at::Tensor& self_col, const at::Tensor& lse, const at::Tensor& total_weight,
    const at::Tensor& normalizer, int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
    c10::string_view weighting, c10::string_view pair_factor, double alpha, bool reg) {
  const LossOptions opt = parse_options(num_sample_cols, num_labels, temperature, beta, std::string(weighting),
                                        std::string(pair_factor), alpha, reg);
  check_cuda_inputs(rows, cols, row_labels, col_labels, self_col, opt);
  const int64_t anchors = rows.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == anchors, "grad_loss: expected shape [", anchors, "], got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "grad_loss: expected a floating-point tensor, got ", grad_loss.scalar_type());
  check_on(grad_loss, "grad_loss", rows.device());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse, "lse"}, {total_weight, "total_weight"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == anchors && t.scalar_type() == at::kDouble, name,
                ": expected a float64 tensor of shape [", anchors, "] from anchor_loss_forward, got ", t.scalar_type(),
                " ", t.sizes());
    check_on(t, name, rows.device());
  }
  const int64_t width = normalizer_width(opt, row_labels);
  TORCH_CHECK(normalizer.dim() == 2 && normalizer.size(0) == anchors && normalizer.size(1) == width &&
                  normalizer.scalar_type() == at::kDouble,
              "normalizer: expected a float64 tensor of shape [", anchors, ", ", width,
              "] from anchor_loss_forward, got ", normalizer.scalar_type(), " ", normalizer.sizes());
  check_on(normalizer, "normalizer", rows.device());

  const c10::cuda::CUDAGuard guard(rows.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
  const Prepared prep = prepare(rows, cols, row_labels, col_labels, self_col, opt);
  const at::Tensor norm = normalizer.to(at::kFloat).contiguous();
  const at::Tensor tw = total_weight.to(at::kFloat).contiguous();
  const at::Tensor ld = lse.to(at::kFloat).contiguous();
  const at::Tensor g = grad_loss.to(at::kFloat).contiguous();
  // The gradient pass only reads the state (see kernels.h).
  const mlcl_cuda::AnchorState st{opt.label_centric() ? ptr(norm) : nullptr, opt.label_centric() ? nullptr : ptr(norm),
                                  ptr(tw), ptr(ld), nullptr, nullptr};
  const auto f32 = rows.options().dtype(at::kFloat);
  const at::Tensor grad_rows = at::empty({anchors, rows.size(1)}, f32);
  const at::Tensor grad_cols = at::empty({cols.size(0), cols.size(1)}, f32);
  check_cuda_result(mlcl_cuda::launch_gradients(prep.problem, st, ptr(g), ptr(grad_rows), ptr(grad_cols), stream),
                    "gradient");
  return {grad_rows.to(rows.scalar_type()), grad_cols.to(cols.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcl_fast, CUDA, m) {
  m.impl("anchor_loss_forward", &anchor_loss_forward_cuda);
  m.impl("anchor_loss_backward", &anchor_loss_backward_cuda);
}

}  // namespace mlcl_fast
