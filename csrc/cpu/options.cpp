#include "options.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace mlcl_fast {

LossOptions parse_options(int64_t num_sample_cols, int64_t num_labels, double temperature, double beta,
                          const std::string& weighting, const std::string& pair_factor, double alpha, bool reg) {
  LossOptions opt;
  if (weighting == "any") {
    opt.weighting = Weighting::Any;
  } else if (weighting == "all") {
    opt.weighting = Weighting::All;
  } else if (weighting == "jaccard") {
    opt.weighting = Weighting::Jaccard;
  } else if (weighting == "label") {
    opt.weighting = Weighting::Label;
  } else {
    TORCH_CHECK(false, "weighting: expected 'any', 'all', 'jaccard' or 'label', got '", weighting, "'");
  }
  if (pair_factor == "one") {
    opt.factor = PairFactor::One;
  } else if (pair_factor == "union") {
    opt.factor = PairFactor::Union;
  } else if (pair_factor == "overlap") {
    opt.factor = PairFactor::Overlap;
  } else {
    TORCH_CHECK(false, "pair_factor: expected 'one', 'union' or 'overlap', got '", pair_factor, "'");
  }
  TORCH_CHECK(std::isfinite(alpha), "alpha: expected a finite number, got ", alpha);
  TORCH_CHECK(std::isfinite(beta) && beta >= 0.0, "beta: expected a finite number >= 0, got ", beta);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "temperature: expected a finite number > 0, got ",
              temperature);
  TORCH_CHECK(num_sample_cols >= 0, "num_sample_cols: expected >= 0, got ", num_sample_cols);
  TORCH_CHECK(num_labels >= 0 && num_labels < std::numeric_limits<int32_t>::max(),
              "num_labels: expected 0 <= num_labels < 2^31-1, got ", num_labels);
  opt.alpha = alpha;
  opt.beta = beta;
  opt.temperature = temperature;
  opt.reg = reg;
  opt.num_sample_cols = num_sample_cols;
  opt.num_labels = num_labels;
  return opt;
}

// Entries of a [rows, K] int64 label matrix that break the canonical form (-1 <= k < num_labels,
// ascending without duplicates, -1 only as padding at the end), counted with ATen ops on the
// tensor's own device: a 0-dim int64 tensor.
static at::Tensor label_violations(const at::Tensor& labels, int64_t num_labels) {
  at::Tensor bad = ((labels < -1) | (labels >= num_labels)).sum();
  if (labels.size(1) > 1) {
    const at::Tensor a = labels.slice(1, 0, labels.size(1) - 1), b = labels.slice(1, 1);
    bad = bad + (~((b == -1) | ((a != -1) & (b > a)))).sum();
  }
  return bad;
}

static void check_label_shape(const at::Tensor& labels, const char* name, int64_t rows, const at::Device& device) {
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == rows, name, ": expected shape [", rows,
              ", K] (padded sorted label ids), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, name, ": expected int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == device, name, ": expected a tensor on ", device, " (where rows are), got ",
              labels.device());
  TORCH_CHECK(labels.size(1) < std::numeric_limits<int32_t>::max(), name, ": too many label slots");
}

// CPU tensors: a scan that names the first bad row.
static void check_label_values_cpu(const at::Tensor& labels, const char* name, int64_t num_labels) {
  if (labels.numel() == 0) return;
  const auto lab = labels.contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  const int64_t rows = lab.size(0), width = lab.size(1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = p + r * width;
    int64_t prev = -1;
    bool padding = false;
    for (int64_t t = 0; t < width; ++t) {
      const int64_t k = row[t];
      if (k < 0) {
        TORCH_CHECK(k == -1, name, ": row ", r, " holds ", k, "; only -1 may pad a row");
        padding = true;
        continue;
      }
      TORCH_CHECK(!padding, name, ": row ", r, " has a label after -1 padding (pad at the end)");
      TORCH_CHECK(k < num_labels, name, ": label ", k, " in row ", r, " is out of range for num_labels=", num_labels);
      TORCH_CHECK(k > prev, name, ": row ", r, " is not sorted ascending without duplicates");
      prev = k;
    }
  }
}

void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& row_labels,
                  const at::Tensor& col_labels, const at::Tensor& self_col, const LossOptions& opt, bool check_values,
                  bool half_ok) {
  TORCH_CHECK(rows.dim() == 2, "rows: expected shape [R, d], got ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2, "cols: expected shape [C, d], got ", cols.sizes());
  const at::Device device = rows.device();
  TORCH_CHECK(cols.device() == device, "cols: expected a tensor on ", device, " (where rows are), got ", cols.device());
  TORCH_CHECK(self_col.device() == device, "self_col: expected a tensor on ", device, " (where rows are), got ",
              self_col.device());
  const at::ScalarType t = rows.scalar_type();
  const bool half = t == at::kHalf || t == at::kBFloat16;
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || (half_ok && half), "rows: expected float32 or float64",
              half_ok ? ", float16 or bfloat16" : " (upcast half inputs first)", ", got ", t);
  TORCH_CHECK(cols.scalar_type() == t, "cols: dtype ", cols.scalar_type(), " differs from rows' dtype ", t);
  TORCH_CHECK(cols.size(1) == rows.size(1), "cols: dimension ", cols.size(1), " differs from rows' ", rows.size(1));
  TORCH_CHECK(cols.size(0) < std::numeric_limits<int32_t>::max(), "cols: at most 2^31-2 columns, got ", cols.size(0));
  TORCH_CHECK(opt.num_sample_cols <= cols.size(0), "num_sample_cols: ", opt.num_sample_cols, " exceeds the ",
              cols.size(0), " columns");
  TORCH_CHECK(self_col.dim() == 1 && self_col.size(0) == rows.size(0), "self_col: expected shape [",
              rows.size(0), "], got ", self_col.sizes());
  TORCH_CHECK(self_col.scalar_type() == at::kLong, "self_col: expected int64, got ", self_col.scalar_type());
  check_label_shape(row_labels, "row_labels", rows.size(0), device);
  check_label_shape(col_labels, "col_labels", cols.size(0), device);
  TORCH_CHECK(col_labels.numel() < std::numeric_limits<int32_t>::max(), "col_labels: at most 2^31-2 entries, got ",
              col_labels.numel());
  if (!check_values) {
    assert_values_on_device(row_labels, col_labels, self_col, cols.size(0), opt);
    return;
  }
  if (device.is_cpu()) {
    const auto self = self_col.contiguous();
    const int64_t* s = self.data_ptr<int64_t>();
    for (int64_t i = 0; i < self.numel(); ++i) {
      TORCH_CHECK(s[i] >= 0 && s[i] < cols.size(0), "self_col: entry ", i, " is ", s[i],
                  ", not a column index in [0, ", cols.size(0), ")");
    }
    check_label_values_cpu(row_labels, "row_labels", opt.num_labels);
    check_label_values_cpu(col_labels, "col_labels", opt.num_labels);
    return;
  }
  check_values_by_count(row_labels, col_labels, self_col, cols.size(0), opt);
}

void check_values_by_count(const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& self_col,
                           int64_t num_cols, const LossOptions& opt) {
  const at::Tensor counts =
      at::stack({label_violations(row_labels, opt.num_labels), label_violations(col_labels, opt.num_labels),
                 ((self_col < 0) | (self_col >= num_cols)).sum()})
          .cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0, "row_labels: ", c[0], " entries are not sorted ascending, unique label ids in [0, ",
              opt.num_labels, ") padded with -1 at the end");
  TORCH_CHECK(c[1] == 0, "col_labels: ", c[1], " entries are not sorted ascending, unique label ids in [0, ",
              opt.num_labels, ") padded with -1 at the end");
  TORCH_CHECK(c[2] == 0, "self_col: ", c[2], " entries do not index the ", num_cols, " columns");
}

void assert_values_on_device(const at::Tensor& row_labels, const at::Tensor& col_labels, const at::Tensor& self_col,
                             int64_t num_cols, const LossOptions& opt) {
  const std::string labels_expected =
      " entries are not sorted ascending, unique label ids in [0, " + std::to_string(opt.num_labels) +
      ") padded with -1 at the end";
  at::_assert_async(label_violations(row_labels, opt.num_labels) == 0, "row_labels: some" + labels_expected);
  at::_assert_async(label_violations(col_labels, opt.num_labels) == 0, "col_labels: some" + labels_expected);
  at::_assert_async(((self_col < 0) | (self_col >= num_cols)).sum() == 0,
                    "self_col: some entries do not index the " + std::to_string(num_cols) + " columns");
}

void check_saved(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& total_weight,
                 const at::Tensor& normalizer, const at::Tensor& rows, const at::Tensor& row_labels,
                 const LossOptions& opt, at::ScalarType stats_dtype) {
  const int64_t anchors = rows.size(0);
  const at::Device device = rows.device();
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == anchors, "grad_loss: expected shape [", anchors, "], got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "grad_loss: expected a floating-point tensor, got ",
              grad_loss.scalar_type());
  TORCH_CHECK(grad_loss.device() == device, "grad_loss: expected a tensor on ", device, " (where rows are), got ",
              grad_loss.device());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse, "lse"}, {total_weight, "total_weight"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == anchors && t.scalar_type() == stats_dtype && t.device() == device, name,
                ": expected a ", stats_dtype, " tensor of shape [", anchors, "] on ", device,
                " from anchor_loss_forward, got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  const int64_t width = normalizer_width(opt, row_labels);
  TORCH_CHECK(normalizer.dim() == 2 && normalizer.size(0) == anchors && normalizer.size(1) == width &&
                  normalizer.scalar_type() == stats_dtype && normalizer.device() == device,
              "normalizer: expected a ", stats_dtype, " tensor of shape [", anchors, ", ", width, "] on ", device,
              " from anchor_loss_forward, got ", normalizer.scalar_type(), " ", normalizer.sizes(), " on ",
              normalizer.device());
}

}  // namespace mlcl_fast
