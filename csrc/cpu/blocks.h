// The tiling shared by the forward and backward kernels: blocks of anchors (one per task) stream
// over column tiles; positives are kept per block as sorted (column, w) lists.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "options.h"
#include "positives.h"

namespace mlcl_fast {

// Anchors per block and columns per tile: a [kRowBlock x kColTile] fp32 similarity tile (256 KiB)
// stays in L2, and kRowBlock is deep enough for the column-gradient GEMM (inner dimension
// kRowBlock). Measured here: 128 x 512 is a few percent faster than 128 x 256 or 256 x 256.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kColTile = 512;

struct ColumnTile {
  int64_t begin, end;
  double log_beta;  // log beta_j for every column of the tile
};

// Column tiles over the softmax columns; no tile straddles the sample/prototype boundary, so
// beta is uniform inside a tile.
inline std::vector<ColumnTile> column_tiles(const LossOptions& opt, int64_t num_cols) {
  std::vector<ColumnTile> tiles;
  const int64_t n = opt.num_sample_cols;
  auto add = [&](int64_t lo, int64_t hi, double log_beta) {
    for (int64_t c = lo; c < hi; c += kColTile) tiles.push_back({c, std::min(hi, c + kColTile), log_beta});
  };
  if (opt.beta > 0.0) add(0, n, std::log(opt.beta));
  add(n, num_cols, 0.0);
  return tiles;
}

// Positives of the anchors of one block, with a cursor per anchor that walks the column tiles.
struct BlockPositives {
  std::vector<int64_t> start;  // [anchors + 1]
  std::vector<int32_t> col;
  std::vector<double> w;
  std::vector<double> s;       // s_ij of each positive, gathered from the tiles
  std::vector<int64_t> cursor;

  void reset(int64_t anchors) {
    start.assign(1, 0);
    col.clear();
    w.clear();
    cursor.assign(anchors, 0);
  }
  void close_anchor() { start.push_back(static_cast<int64_t>(col.size())); }
  void rewind() {
    for (size_t r = 0; r + 1 < start.size(); ++r) cursor[r] = start[r];
    s.assign(col.size(), 0.0);
  }
  // Positions [first, last) of anchor r's positives inside the tile ending at column `end`.
  std::pair<int64_t, int64_t> advance(int64_t r, int64_t end) {
    const int64_t first = cursor[r];
    int64_t last = first;
    while (last < start[r + 1] && col[last] < end) ++last;
    cursor[r] = last;
    return {first, last};
  }
};

inline int64_t thread_count() { return std::max<int64_t>(1, at::get_num_threads()); }

}  // namespace mlcl_fast
