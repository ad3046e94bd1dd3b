// Positive pairs and their weights w_ij, computed from sorted label lists only (never an L-wide
// product). Two enumeration strategies give identical sets:
//   sparse: an inverted index (label -> sorted columns carrying it) visits exactly the pairs that
//           share a label, which is a small fraction of |A|x|C| in large, power-law label spaces;
//   dense:  bitsets over the label space, one AND+popcount per (anchor, column), for small L with
//           many labels per row, where most pairs share a label anyway.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "options.h"

namespace mlcl_fast {

// Sorted label ids of each row in CSR form.
struct LabelLists {
  std::vector<int64_t> start;  // [rows + 1]
  std::vector<int32_t> label;

  static LabelLists from_padded(const at::Tensor& padded);
  int64_t rows() const { return static_cast<int64_t>(start.size()) - 1; }
  int32_t count(int64_t r) const { return static_cast<int32_t>(start[r + 1] - start[r]); }
  const int32_t* begin(int64_t r) const { return label.data() + start[r]; }
};

enum class Strategy { Sparse, Dense };

// Everything about the labels that the kernels share across threads (read-only once built).
struct LabelContext {
  LabelLists row_sets, col_sets;
  int64_t first_col = 0, num_cols = 0, num_labels = 0;
  Strategy strategy = Strategy::Sparse;
  // The weights have a closed form (closed.h): no positive pair is ever listed.
  bool closed = false;
  // sparse: label -> columns in [first_col, num_cols) carrying it, ascending
  std::vector<int64_t> inv_start;
  std::vector<int32_t> inv_col;
  // dense: one bitset of `words` 64-bit words per row and per column
  int64_t words = 0;
  std::vector<uint64_t> row_bits, col_bits;

  int64_t frequency(int32_t k) const { return inv_start[k + 1] - inv_start[k]; }
  // Whether column `col` carries label k (its sorted list).
  bool carries(int64_t col, int32_t k) const {
    const int32_t* b = col_sets.begin(col);
    return std::binary_search(b, b + col_sets.count(col), k);
  }
};

// `strategy`: "auto" picks from label statistics (estimated work of each enumeration).
LabelContext build_label_context(const at::Tensor& row_labels, const at::Tensor& col_labels, const LossOptions& opt,
                                 int64_t num_cols, const std::string& strategy);

// MLCL_FAST_CPU_POSITIVES = auto | sparse | dense (default auto), read at every op call.
std::string positives_strategy_from_env();

// Per-thread scratch (O(|C| + L)) for one anchor at a time.
class PositiveFinder {
 public:
  PositiveFinder(const LabelContext& ctx, const LossOptions& opt);

  // Writes anchor i's normaliser (Z_ik per label slot, or the sum of omega in norm[0]) and
  // returns whether the anchor is valid (some positive weight).
  bool normalizer(int64_t i, int64_t self, double* norm);

  // Appends anchor i's positives with w_ij > 0 in ascending column order, given its normaliser;
  // returns W_i = sum_j w_ij. With a closed form (ctx.closed) it lists none and returns W_i.
  double positives(int64_t i, int64_t self, const double* norm, std::vector<int32_t>& pos_col,
                   std::vector<double>& pos_w);

 private:
  template <class F>
  void for_each_shared(int64_t i, int64_t self, F&& visit);
  void count_shared(int64_t i, int64_t self);
  int64_t slot_columns(int64_t i, int64_t self, int32_t slot) const;
  double omega(int32_t c, int32_t ai, int32_t aj) const;
  double factor(int32_t c, int32_t ai, int32_t aj, int64_t j) const;
  void touch(int32_t j);
  void sort_touched();
  void clear();

  const LabelContext& ctx_;
  const LossOptions& opt_;
  std::vector<int32_t> count_;    // c_ij of the current anchor, by column (0 = untouched)
  std::vector<double> acc_;       // per-column accumulator of the current anchor
  std::vector<int32_t> touched_;  // columns with count_ > 0
  std::vector<uint64_t> seen_;    // bitmap of touched_, for listing many of them in column order
  std::vector<int32_t> slot_of_;  // dense strategy: label -> slot in the anchor's list, or -1
};

}  // namespace mlcl_fast
