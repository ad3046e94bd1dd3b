// The tiling shared by the forward and backward kernels: blocks of anchors (one per task) stream
// over column tiles; positives are kept per block as sorted (column, w) lists.
#pragma once

#include <ATen/Parallel.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
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

// Partitions of `blocks` consecutive tasks, 2 per thread (1 with one thread), taken dynamically
// so that a thread slowed by other load holds nobody up; their number is capped so that their
// buffers (`buffer_bytes` each) take at most max(1 GiB, 4 buffers).
inline int64_t partition_count(int64_t blocks, double buffer_bytes) {
  const int64_t threads = thread_count();
  const double budget = std::max(double(1 << 30), 4.0 * buffer_bytes);
  const int64_t max_parts = 1 + static_cast<int64_t>(budget / std::max(buffer_bytes, 1.0));
  return std::max<int64_t>(1, std::min({threads == 1 ? 1 : 2 * threads, blocks, max_parts}));
}

// Boundaries [parts + 1] of contiguous runs of row blocks with about equal numbers of block
// pairs (I, J >= I): the symmetric sweeps' partitions.
inline std::vector<int64_t> pair_partitions(int64_t blocks, int64_t parts) {
  std::vector<int64_t> bound(parts + 1, blocks);
  const double total = 0.5 * static_cast<double>(blocks) * (blocks + 1);
  double done = 0.0;
  int64_t part = 1;
  bound[0] = 0;
  for (int64_t b = 0; b < blocks && part < parts; ++b) {
    done += static_cast<double>(blocks - b);
    while (part < parts && done >= total * part / parts) bound[part++] = b + 1;
  }
  return bound;
}

// out[ids[t]] += partial[part][t] for every part in partition order (deterministic), rows of `dim`.
template <typename T>
void add_partitions(const std::vector<T>& partial, int64_t parts, int64_t rows, int64_t dim,
                    const std::vector<int64_t>& ids, T* out) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      T* o = out + ids[t] * dim;
      for (int64_t part = 0; part < parts; ++part) {
        const T* src = partial.data() + (part * rows + t) * dim;
        for (int64_t e = 0; e < dim; ++e) o[e] += src[e];
      }
    }
  });
}

// Per-anchor positives (column positions in some column list, ascending; weights).
struct PositiveLists {
  std::vector<std::vector<int32_t>> col;
  std::vector<std::vector<double>> w;
  explicit PositiveLists(size_t anchors) : col(anchors), w(anchors) {}
};

// The symmetric anchors' positives, once: split into those among the other columns (`rest_at`:
// column -> position in the rest list) and those among the symmetric anchors' own columns
// (`sym_at`: column -> position in `sym`).
inline void split_positives(const LabelContext& labels, const LossOptions& opt, const int64_t* self,
                            const double* norm, int64_t width, const std::vector<int64_t>& sym,
                            const std::vector<int32_t>& sym_at, const std::vector<int32_t>& rest_at,
                            PositiveLists& rest, PositiveLists& own) {
  const int64_t m = static_cast<int64_t>(sym.size());
#pragma omp parallel num_threads(thread_count())
  {
    PositiveFinder finder(labels, opt);
    std::vector<int32_t> all_col;
    std::vector<double> all_w;
#pragma omp for schedule(dynamic, 64)
    for (int64_t p = 0; p < m; ++p) {
      const int64_t i = sym[p];
      all_col.clear();
      all_w.clear();
      finder.positives(i, self[i], norm + i * width, all_col, all_w);
      own.col[p].reserve(all_col.size());
      own.w[p].reserve(all_col.size());
      for (size_t q = 0; q < all_col.size(); ++q) {
        const int32_t s = sym_at[all_col[q]], r = rest_at[all_col[q]];
        if (s >= 0) {
          own.col[p].push_back(s);
          own.w[p].push_back(all_w[q]);
        } else if (r >= 0) {
          rest.col[p].push_back(r);
          rest.w[p].push_back(all_w[q]);
        }
      }
    }
  }
}

// The symmetric anchors of `candidates` (ascending): those whose own column is a softmax column
// holding their row, each column claimed once, sorted by that column; `sym_at` maps a column to
// its anchor's position in `sym` (or -1). The softmax columns no symmetric anchor owns are `rest`
// (ascending, `rest_at` likewise); the other candidates are `others`.
struct SymmetricSplit {
  std::vector<int64_t> sym, others, rest, softmax;
  std::vector<int32_t> sym_at, rest_at;
};

template <typename T>
SymmetricSplit split_symmetric(const T* rows, const T* cols, int64_t dim, const int64_t* self, const LossOptions& opt,
                               int64_t num_cols, const std::vector<int64_t>& candidates) {
  SymmetricSplit out;
  auto in_softmax = [&](int64_t j) { return j >= opt.num_sample_cols || opt.beta > 0.0; };
  out.sym_at.assign(num_cols, -1);
  out.rest_at.assign(num_cols, -1);
  for (int64_t i : candidates) {
    const int64_t c = self[i];
    if (c >= 0 && c < num_cols && in_softmax(c) && out.sym_at[c] < 0 &&
        std::equal(rows + i * dim, rows + (i + 1) * dim, cols + c * dim)) {
      out.sym_at[c] = 0;  // claimed; positions below, in column order
      out.sym.push_back(i);
    } else {
      out.others.push_back(i);
    }
  }
  std::sort(out.sym.begin(), out.sym.end(), [&](int64_t a, int64_t b) { return self[a] < self[b]; });
  for (size_t p = 0; p < out.sym.size(); ++p) out.sym_at[self[out.sym[p]]] = static_cast<int32_t>(p);
  for (int64_t j = 0; j < num_cols; ++j) {
    if (!in_softmax(j)) continue;
    out.softmax.push_back(j);
    if (out.sym_at[j] < 0) {
      out.rest_at[j] = static_cast<int32_t>(out.rest.size());
      out.rest.push_back(j);
    }
  }
  return out;
}

// MLCL_FAST_CPU_SYMMETRIC = auto | off (default auto): off keeps the one-directional sweeps of
// the forward and backward (for measurements and tests).
inline bool symmetric_enabled() {
  const char* env = std::getenv("MLCL_FAST_CPU_SYMMETRIC");
  if (env == nullptr || std::string(env).empty() || std::string(env) == "auto") return true;
  TORCH_CHECK(std::string(env) == "off", "MLCL_FAST_CPU_SYMMETRIC: expected auto or off, got ", env);
  return false;
}

// Fewer symmetric anchors than this: the pairing does not pay (one block pairs with itself only).
constexpr int64_t kMinSymmetric = 2 * kRowBlock;

}  // namespace mlcl_fast
