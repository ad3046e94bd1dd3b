// The blocked algorithm's label inputs (int32 counts, the columns' inverted label index), with
// device-agnostic ATen ops only: the same code prepares CPU and CUDA tensors. No host
// synchronisation in here.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace mlcl_fast {
namespace label_index {

// |y| per row as int32.
inline at::Tensor label_counts(const at::Tensor& labels) {
  return (labels >= 0).sum({1}, /*keepdim=*/false, at::kInt).contiguous();
}

// Inverted index of the columns' labels: label k is carried by columns
// cols[ptr[k] .. ptr[k+1]), ascending; both int32. Sorting the flat [C, K] entries by label, with
// padding keyed as num_labels so it sorts last, needs no host synchronisation; the sort is stable,
// so each label's columns stay in order. Flat entry e lies in column e / K.
struct LabelIndex {
  at::Tensor ptr;   // [num_labels + 1]
  at::Tensor cols;  // [C * K], entries past ptr[num_labels] are padding
};

inline LabelIndex column_label_index(const at::Tensor& col_labels, int64_t num_labels) {
  const int64_t width = col_labels.size(1);
  // 32-bit keys where the labels fit: a GPU radix sort then makes half the passes.
  const auto key_type = num_labels < std::numeric_limits<int32_t>::max() ? at::kInt : at::kLong;
  const at::Tensor keys =
      at::where(col_labels < 0, at::full({}, num_labels, col_labels.options()), col_labels).reshape({-1}).to(key_type);
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  LabelIndex index;
  index.cols = at::div(std::get<1>(sorted), std::max<int64_t>(width, 1), "floor").to(at::kInt).contiguous();
  index.ptr = at::searchsorted(std::get<0>(sorted), at::arange(num_labels + 1, keys.options()), /*out_int32=*/true)
                  .contiguous();
  return index;
}

}  // namespace label_index
}  // namespace mlcl_fast
