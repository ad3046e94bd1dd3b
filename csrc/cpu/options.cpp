#include "options.h"

#include <cmath>
#include <limits>

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

static void check_labels(const at::Tensor& labels, const char* name, int64_t rows, int64_t num_labels) {
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == rows, name, ": expected shape [", rows,
              ", K] (padded sorted label ids), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, name, ": expected int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device().is_cpu(), name, ": expected a CPU tensor, got device ", labels.device());
  if (labels.numel() == 0) return;
  const auto lab = labels.contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  const int64_t width = lab.size(1);
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
                  const at::Tensor& col_labels, const at::Tensor& self_col, const LossOptions& opt) {
  TORCH_CHECK(rows.dim() == 2, "rows: expected shape [R, d], got ", rows.sizes());
  TORCH_CHECK(cols.dim() == 2, "cols: expected shape [C, d], got ", cols.sizes());
  TORCH_CHECK(rows.device().is_cpu(), "rows: expected a CPU tensor, got device ", rows.device());
  TORCH_CHECK(cols.device().is_cpu(), "cols: expected a CPU tensor, got device ", cols.device());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "rows: expected float32 or float64 (upcast half inputs first), got ", rows.scalar_type());
  TORCH_CHECK(cols.scalar_type() == rows.scalar_type(), "cols: dtype ", cols.scalar_type(),
              " differs from rows' dtype ", rows.scalar_type());
  TORCH_CHECK(cols.size(1) == rows.size(1), "cols: dimension ", cols.size(1), " differs from rows' ", rows.size(1));
  TORCH_CHECK(cols.size(0) < std::numeric_limits<int32_t>::max(), "cols: at most 2^31-2 columns, got ", cols.size(0));
  TORCH_CHECK(opt.num_sample_cols <= cols.size(0), "num_sample_cols: ", opt.num_sample_cols, " exceeds the ",
              cols.size(0), " columns");
  TORCH_CHECK(self_col.dim() == 1 && self_col.size(0) == rows.size(0), "self_col: expected shape [",
              rows.size(0), "], got ", self_col.sizes());
  TORCH_CHECK(self_col.scalar_type() == at::kLong, "self_col: expected int64, got ", self_col.scalar_type());
  TORCH_CHECK(self_col.device().is_cpu(), "self_col: expected a CPU tensor, got device ", self_col.device());
  const auto self = self_col.contiguous();
  const int64_t* s = self.data_ptr<int64_t>();
  for (int64_t i = 0; i < self.numel(); ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < cols.size(0), "self_col: entry ", i, " is ", s[i], ", not a column index in [0, ",
                cols.size(0), ")");
  }
  check_labels(row_labels, "row_labels", rows.size(0), opt.num_labels);
  check_labels(col_labels, "col_labels", cols.size(0), opt.num_labels);
}

}  // namespace mlcl_fast
