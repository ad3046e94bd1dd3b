#include "positives.h"

#include "closed.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

namespace mlcl_fast {

namespace {

// Above this label-space size bitsets cost more memory than O((N + L) K) allows for.
constexpr int64_t kMaxDenseLabels = 1024;
// Relative cost of one dense (anchor, column, word) step against one sparse inverted-list visit.
constexpr double kDenseStepCost = 0.25;

}  // namespace

LabelLists LabelLists::from_padded(const at::Tensor& padded) {
  const auto lab = padded.contiguous();
  const int64_t rows = lab.size(0), width = lab.size(1);
  const int64_t* p = lab.data_ptr<int64_t>();
  LabelLists out;
  out.start.assign(rows + 1, 0);
  out.label.reserve(static_cast<size_t>(lab.numel()));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < width && p[r * width + t] >= 0; ++t) {
      out.label.push_back(static_cast<int32_t>(p[r * width + t]));
    }
    out.start[r + 1] = static_cast<int64_t>(out.label.size());
  }
  return out;
}

std::string positives_strategy_from_env() {
  const char* env = std::getenv("MLCL_FAST_CPU_POSITIVES");
  std::string value = env ? env : "auto";
  TORCH_CHECK(value == "auto" || value == "sparse" || value == "dense",
              "MLCL_FAST_CPU_POSITIVES: expected 'auto', 'sparse' or 'dense', got '", value, "'");
  return value;
}

static void fill_bits(const LabelLists& sets, int64_t words, std::vector<uint64_t>& bits) {
  bits.assign(static_cast<size_t>(sets.rows() * words), 0);
  for (int64_t r = 0; r < sets.rows(); ++r) {
    const int32_t* labs = sets.begin(r);
    for (int32_t t = 0; t < sets.count(r); ++t) {
      bits[r * words + labs[t] / 64] |= uint64_t{1} << (labs[t] % 64);
    }
  }
}

LabelContext build_label_context(const at::Tensor& row_labels, const at::Tensor& col_labels, const LossOptions& opt,
                                 int64_t num_cols, const std::string& strategy) {
  LabelContext ctx;
  ctx.row_sets = LabelLists::from_padded(row_labels);
  ctx.col_sets = LabelLists::from_padded(col_labels);
  ctx.first_col = opt.first_column();
  ctx.num_cols = num_cols;
  ctx.num_labels = opt.num_labels;
  ctx.closed = closed_form_applies(opt);

  // Counting sort of the (column, label) incidences by label keeps each list ascending in column.
  ctx.inv_start.assign(ctx.num_labels + 1, 0);
  for (int64_t j = ctx.first_col; j < num_cols; ++j) {
    for (int32_t t = 0; t < ctx.col_sets.count(j); ++t) ++ctx.inv_start[ctx.col_sets.begin(j)[t] + 1];
  }
  for (int64_t k = 0; k < ctx.num_labels; ++k) ctx.inv_start[k + 1] += ctx.inv_start[k];
  ctx.inv_col.resize(static_cast<size_t>(ctx.inv_start[ctx.num_labels]));
  std::vector<int64_t> fill(ctx.inv_start.begin(), ctx.inv_start.end() - 1);
  for (int64_t j = ctx.first_col; j < num_cols; ++j) {
    for (int32_t t = 0; t < ctx.col_sets.count(j); ++t) {
      ctx.inv_col[fill[ctx.col_sets.begin(j)[t]]++] = static_cast<int32_t>(j);
    }
  }

  bool dense = false;
  if (strategy == "dense") {
    dense = true;
  } else if (strategy == "auto" && !ctx.closed && ctx.num_labels <= kMaxDenseLabels) {
    // Work of each enumeration: every (anchor label, column carrying it) visit for the inverted
    // index, against every (anchor, column, word) step for bitsets.
    double sparse_work = 0.0;
    for (int32_t k : ctx.row_sets.label) sparse_work += static_cast<double>(ctx.frequency(k));
    const int64_t words = (ctx.num_labels + 63) / 64;
    const double dense_work = kDenseStepCost * static_cast<double>(ctx.row_sets.rows()) *
                              static_cast<double>(num_cols - ctx.first_col) * static_cast<double>(words + 1);
    dense = dense_work < sparse_work;
  }
  if (dense && ctx.num_labels > 0) {
    ctx.strategy = Strategy::Dense;
    ctx.words = (ctx.num_labels + 63) / 64;
    fill_bits(ctx.row_sets, ctx.words, ctx.row_bits);
    fill_bits(ctx.col_sets, ctx.words, ctx.col_bits);
  }
  return ctx;
}

PositiveFinder::PositiveFinder(const LabelContext& ctx, const LossOptions& opt)
    : ctx_(ctx), opt_(opt), count_(ctx.num_cols, 0), acc_(ctx.num_cols, 0.0), seen_((ctx.num_cols + 63) / 64, 0) {
  if (ctx.strategy == Strategy::Dense) slot_of_.assign(ctx.num_labels, -1);
}

template <class F>
void PositiveFinder::for_each_shared(int64_t i, int64_t self, F&& visit) {
  const int32_t ai = ctx_.row_sets.count(i);
  const int32_t* labs = ctx_.row_sets.begin(i);
  if (ctx_.strategy == Strategy::Sparse) {
    for (int32_t t = 0; t < ai; ++t) {
      const int32_t* col = ctx_.inv_col.data() + ctx_.inv_start[labs[t]];
      const int32_t* end = ctx_.inv_col.data() + ctx_.inv_start[labs[t] + 1];
      for (; col != end; ++col) {
        if (*col != self) visit(*col, t);
      }
    }
    return;
  }
  if (ai == 0) return;
  for (int32_t t = 0; t < ai; ++t) slot_of_[labs[t]] = t;
  const int64_t words = ctx_.words;
  const uint64_t* bi = ctx_.row_bits.data() + i * words;
  for (int64_t j = ctx_.first_col; j < ctx_.num_cols; ++j) {
    if (j == self) continue;
    const uint64_t* bj = ctx_.col_bits.data() + j * words;
    for (int64_t w = 0; w < words; ++w) {
      for (uint64_t m = bi[w] & bj[w]; m != 0; m &= m - 1) {
        visit(static_cast<int32_t>(j), slot_of_[w * 64 + __builtin_ctzll(m)]);
      }
    }
  }
  for (int32_t t = 0; t < ai; ++t) slot_of_[labs[t]] = -1;
}

void PositiveFinder::count_shared(int64_t i, int64_t self) {
  if (ctx_.strategy == Strategy::Dense) {
    if (ctx_.row_sets.count(i) == 0) return;
    const int64_t words = ctx_.words;
    const uint64_t* bi = ctx_.row_bits.data() + i * words;
    for (int64_t j = ctx_.first_col; j < ctx_.num_cols; ++j) {
      if (j == self) continue;
      const uint64_t* bj = ctx_.col_bits.data() + j * words;
      int32_t c = 0;
      for (int64_t w = 0; w < words; ++w) c += __builtin_popcountll(bi[w] & bj[w]);
      if (c > 0) {
        count_[j] = c;
        touched_.push_back(static_cast<int32_t>(j));  // ascending: the dense strategy needs no sort
      }
    }
    return;
  }
  for_each_shared(i, self, [&](int32_t j, int32_t) {
    if (count_[j]++ == 0) touch(j);
  });
}

void PositiveFinder::touch(int32_t j) {
  touched_.push_back(j);
  seen_[j >> 6] |= uint64_t{1} << (j & 63);
}

int64_t PositiveFinder::slot_columns(int64_t i, int64_t self, int32_t slot) const {
  const int32_t k = ctx_.row_sets.begin(i)[slot];
  int64_t n = ctx_.frequency(k);
  if (self >= ctx_.first_col && ctx_.carries(self, k)) --n;
  return n;
}

double PositiveFinder::omega(int32_t c, int32_t ai, int32_t aj) const {
  switch (opt_.weighting) {
    case Weighting::Any:
      return c > 0 ? 1.0 : 0.0;
    case Weighting::All:
      return (c > 0 && c == ai && c == aj) ? 1.0 : 0.0;
    default:  // Jaccard
      return static_cast<double>(c) / static_cast<double>(ai + aj - c);
  }
}

double PositiveFinder::factor(int32_t c, int32_t ai, int32_t aj, int64_t j) const {
  switch (opt_.factor) {
    case PairFactor::One:
      return 1.0;
    case PairFactor::Union:
      return j >= opt_.num_sample_cols ? 1.0 : 1.0 / static_cast<double>(ai + aj - c);
    default:  // Overlap
      if (opt_.alpha < 0) return c == aj ? 1.0 : 0.0;
      if (opt_.alpha == 0) return 1.0;
      return std::pow(static_cast<double>(c) / static_cast<double>(aj), opt_.alpha);
  }
}

void PositiveFinder::sort_touched() {
  if (ctx_.strategy == Strategy::Dense) return;  // visited in column order already
  const int64_t span = ctx_.num_cols - ctx_.first_col;
  if (static_cast<int64_t>(touched_.size()) * 16 > span) {
    // Most columns are positives: reading the bitmap in order beats sorting.
    touched_.clear();
    for (int64_t w = ctx_.first_col >> 6; w < static_cast<int64_t>(seen_.size()); ++w) {
      for (uint64_t m = seen_[w]; m != 0; m &= m - 1) {
        touched_.push_back(static_cast<int32_t>(w * 64 + __builtin_ctzll(m)));
      }
    }
  } else {
    std::sort(touched_.begin(), touched_.end());
  }
}

void PositiveFinder::clear() {
  for (int32_t j : touched_) {
    count_[j] = 0;
    acc_[j] = 0.0;
    seen_[j >> 6] = 0;
  }
  touched_.clear();
}

bool PositiveFinder::normalizer(int64_t i, int64_t self, double* norm) {
  const int32_t ai = ctx_.row_sets.count(i);
  if (ai == 0) return false;
  if (opt_.label_centric()) {
    bool valid = false;
    if (opt_.unit_factor()) {
      for (int32_t t = 0; t < ai; ++t) norm[t] = static_cast<double>(slot_columns(i, self, t));
    } else {
      count_shared(i, self);
      for (int32_t t = 0; t < ai; ++t) norm[t] = 0.0;
      for_each_shared(i, self, [&](int32_t j, int32_t t) {
        norm[t] += factor(count_[j], ai, ctx_.col_sets.count(j), j);
      });
      clear();
    }
    for (int32_t t = 0; t < ai; ++t) valid = valid || norm[t] > 0.0;
    return valid;
  }
  count_shared(i, self);
  double total = 0.0;
  for (int32_t j : touched_) total += omega(count_[j], ai, ctx_.col_sets.count(j));
  clear();
  norm[0] = total;
  return total > 0.0;
}

double PositiveFinder::positives(int64_t i, int64_t self, const double* norm, std::vector<int32_t>& pos_col,
                                 std::vector<double>& pos_w) {
  const int32_t ai = ctx_.row_sets.count(i);
  if (ai == 0) return 0.0;
  if (ctx_.closed) return closed_total_weight(ctx_, i, norm);
  double total = 0.0;
  if (opt_.label_centric()) {
    const bool unit = opt_.unit_factor();
    if (!unit) count_shared(i, self);
    double inv_z[64];
    std::vector<double> inv_z_heap;
    double* iz = inv_z;
    if (ai > 64) {
      inv_z_heap.resize(ai);
      iz = inv_z_heap.data();
    }
    for (int32_t t = 0; t < ai; ++t) iz[t] = norm[t] > 0.0 ? 1.0 / norm[t] : 0.0;
    for_each_shared(i, self, [&](int32_t j, int32_t t) {
      if (unit && count_[j] == 0) {
        count_[j] = 1;  // marks the column as touched; f needs no overlap count here
        touch(j);
      }
      acc_[j] += iz[t];
    });
    sort_touched();
    const double inv_a = 1.0 / static_cast<double>(ai);
    for (int32_t j : touched_) {
      const double f = unit ? 1.0 : factor(count_[j], ai, ctx_.col_sets.count(j), j);
      const double w = f * acc_[j] * inv_a;
      if (w > 0.0) {
        pos_col.push_back(j);
        pos_w.push_back(w);
        total += w;
      }
    }
  } else {
    count_shared(i, self);
    sort_touched();
    for (int32_t j : touched_) {
      const double om = omega(count_[j], ai, ctx_.col_sets.count(j));
      if (om > 0.0) {
        const double w = om / norm[0];
        pos_col.push_back(j);
        pos_w.push_back(w);
        total += w;
      }
    }
  }
  clear();
  return total;
}

}  // namespace mlcl_fast
