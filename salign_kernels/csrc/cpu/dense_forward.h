// Dense matching: every voxel of b is a candidate of every voxel of a, on the flat voxel axis (2D
// and 3D alike). A register-blocked micro-kernel over packed panels keeps a running (max, argmax)
// per query; candidates are visited in ascending q and a running best is replaced only by a
// strictly larger value, so ties keep the lowest index without extra work.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "cpu/pixels.h"

namespace salign {
namespace CPU_CAPABILITY {

template <typename acc_t>
struct Tile {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t VS = Vec::size();
  static constexpr int64_t MR = 6;  // query rows per micro-tile
  // Candidate vectors per micro-tile: 6 x 4 accumulators of the 32 AVX-512 registers, 6 x 2 of 16.
  static constexpr int64_t NV = (VS * sizeof(acc_t) >= 64) ? 4 : 2;
  static constexpr int64_t NR = NV * VS;  // candidates per panel
  static constexpr int64_t kAllLanes = (int64_t{1} << VS) - 1;
};

// Valid candidates of one set, packed in ascending flat index, NR to a panel laid out [C][NR]
// (channel k of the panel's NR candidates is NV contiguous vectors), normalised.
template <typename acc_t>
struct Panels {
  int64_t count = 0;
  int64_t panels = 0;
  std::vector<acc_t> data;       // panels * C * NR
  std::vector<acc_t> bias;       // panels * NR: 0 for a candidate, -inf for a padding lane
  std::vector<int64_t> index;    // count: flat index of each packed candidate
  std::vector<uint8_t> bad;      // count: 1 where the normalised feature is not finite
  int64_t first_bad = -1;

  Candidates view() const { return {count, index.data(), first_bad, bad.data()}; }
};

// Packs the candidates listed in `out.index` (ascending) of sample b of map f, normalised.
template <typename scalar_t, typename acc_t>
void pack_panels(const Features& f, int64_t b, const Geometry& geo, bool normalize, Panels<acc_t>& out,
                 std::vector<acc_t>& row) {
  using T = Tile<acc_t>;
  const int64_t C = geo.C;
  out.count = static_cast<int64_t>(out.index.size());
  out.panels = (out.count + T::NR - 1) / T::NR;
  out.data.assign(out.panels * C * T::NR, acc_t(0));
  out.bias.assign(out.panels * T::NR, kNegInf<acc_t>);
  out.bad.assign(out.count, 0);
  out.first_bad = -1;
  row.resize(C);
  for (int64_t i = 0; i < out.count; ++i) {
    const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, b, out.index[i], geo), f.stride_c, C, normalize, row.data());
    acc_t* dst = out.data.data() + (i / T::NR) * C * T::NR + (i % T::NR);
    for (int64_t k = 0; k < C; ++k) dst[k * T::NR] = row[k];
    out.bias[i] = 0;
    if (!loaded.finite) {
      out.bad[i] = 1;
      if (out.first_bad < 0) out.first_bad = i;
    }
  }
}

// Packs `rows` query pixels (listed in `index`) of sample b of map f into micro-tiles
// [groups][C][MR], normalised; padding rows are 0. bad[i] records a non-finite row.
template <typename scalar_t, typename acc_t>
void pack_queries(const Features& f, int64_t b, const Geometry& geo, bool normalize, const int64_t* index,
                  int64_t rows, std::vector<acc_t>& out, uint8_t* bad, std::vector<acc_t>& row) {
  using T = Tile<acc_t>;
  const int64_t C = geo.C;
  const int64_t groups = (rows + T::MR - 1) / T::MR;
  out.assign(groups * C * T::MR, acc_t(0));
  row.resize(C);
  for (int64_t i = 0; i < rows; ++i) {
    const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, b, index[i], geo), f.stride_c, C, normalize, row.data());
    bad[i] = !loaded.finite;
    acc_t* dst = out.data() + (i / T::MR) * C * T::MR + (i % T::MR);
    for (int64_t k = 0; k < C; ++k) dst[k * T::MR] = row[k];
  }
}

// acc[r][v] = bias[v] + sum_k a[k][r] * b[k][v]: an MR x NR block of similarities.
template <typename acc_t>
inline void micro_kernel(const acc_t* a, const acc_t* b, const acc_t* bias, int64_t C,
                         Vectorized<acc_t> (&acc)[Tile<acc_t>::MR][Tile<acc_t>::NV]) {
  using T = Tile<acc_t>;
  using Vec = Vectorized<acc_t>;
#pragma GCC unroll 8
  for (int64_t v = 0; v < T::NV; ++v) {
    const Vec init = Vec::loadu(bias + v * T::VS);
#pragma GCC unroll 8
    for (int64_t r = 0; r < T::MR; ++r) acc[r][v] = init;
  }
  for (int64_t k = 0; k < C; ++k) {
    Vec bv[T::NV];
#pragma GCC unroll 8
    for (int64_t v = 0; v < T::NV; ++v) bv[v] = Vec::loadu(b + k * T::NR + v * T::VS);
#pragma GCC unroll 8
    for (int64_t r = 0; r < T::MR; ++r) {
      const Vec av(a[k * T::MR + r]);
#pragma GCC unroll 8
      for (int64_t v = 0; v < T::NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
}

// The slow path of a row update: some lane beat the row's best; scan the NR lanes in order.
template <typename acc_t>
__attribute__((noinline)) void resolve_row(const Vectorized<acc_t>* lanes, int64_t pos0,
                                           acc_t& best, int64_t& best_pos) {
  using T = Tile<acc_t>;
  alignas(64) acc_t vals[T::NR];
  for (int64_t v = 0; v < T::NV; ++v) lanes[v].store(vals + v * T::VS);
  for (int64_t j = 0; j < T::NR; ++j) {
    if (vals[j] > best) {
      best = vals[j];
      best_pos = pos0 + j;
    }
  }
}

// The slow path of a column update: column lanes of vector v beat their best; scan rows in order.
template <typename acc_t>
__attribute__((noinline)) void resolve_columns(
    const Vectorized<acc_t> (&acc)[Tile<acc_t>::MR][Tile<acc_t>::NV], int64_t v, int64_t rows,
    int64_t row_pos0, acc_t* col_best, int64_t* col_pos) {
  using T = Tile<acc_t>;
  alignas(64) acc_t vals[T::MR][T::VS];
  for (int64_t r = 0; r < rows; ++r) acc[r][v].store(vals[r]);
  for (int64_t j = 0; j < T::VS; ++j) {
    for (int64_t r = 0; r < rows; ++r) {
      if (vals[r][j] > col_best[j]) {
        col_best[j] = vals[r][j];
        col_pos[j] = row_pos0 + r;
      }
    }
  }
}

// Matches `rows` packed query rows against every panel of `cand`. best/best_pos (>= groups * MR
// entries) receive each row's best similarity and its position in `cand`. When col_best is given
// (one entry per panel lane), each candidate's best row over these rows is folded in as well
// (positions row_pos0 + row): the reverse direction from the same similarities.
template <typename acc_t>
void match_rows(const acc_t* queries, int64_t rows, const Panels<acc_t>& cand, int64_t C,
                acc_t* best, int64_t* best_pos, acc_t* col_best, int64_t* col_pos,
                int64_t row_pos0) {
  using T = Tile<acc_t>;
  using Vec = Vectorized<acc_t>;
  const int64_t groups = (rows + T::MR - 1) / T::MR;
  std::fill(best, best + groups * T::MR, kNegInf<acc_t>);
  std::fill(best_pos, best_pos + groups * T::MR, int64_t{-1});
  // Panels per block: the block stays in L2 while every micro-tile of queries streams over it.
  constexpr int64_t kBlockBytes = 512 * 1024;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (C * T::NR * int64_t(sizeof(acc_t))));
  for (int64_t p0 = 0; p0 < cand.panels; p0 += block) {
    const int64_t p1 = std::min(p0 + block, cand.panels);
    for (int64_t g = 0; g < groups; ++g) {
      const acc_t* a = queries + g * C * T::MR;
      const int64_t grows = std::min(T::MR, rows - g * T::MR);
      acc_t* gbest = best + g * T::MR;
      int64_t* gpos = best_pos + g * T::MR;
      for (int64_t panel = p0; panel < p1; ++panel) {
        Vec acc[T::MR][T::NV];
        micro_kernel<acc_t>(a, cand.data.data() + panel * C * T::NR,
                            cand.bias.data() + panel * T::NR, C, acc);
        // Rows: compare the lane-wise max with the running best; scan lanes only if it moved.
#pragma GCC unroll 8
        for (int64_t r = 0; r < T::MR; ++r) {
          Vec m = acc[r][0];
#pragma GCC unroll 8
          for (int64_t v = 1; v < T::NV; ++v) m = at::vec::clamp_min(m, acc[r][v]);
          if ((m > Vec(gbest[r])).zero_mask() != T::kAllLanes) {
            resolve_row<acc_t>(acc[r], panel * T::NR, gbest[r], gpos[r]);
          }
        }
        if (col_best != nullptr) {
          acc_t* cb = col_best + panel * T::NR;
          int64_t* cp = col_pos + panel * T::NR;
#pragma GCC unroll 8
          for (int64_t v = 0; v < T::NV; ++v) {
            Vec m = acc[0][v];
#pragma GCC unroll 8
            for (int64_t r = 1; r < T::MR; ++r) {
              if (r < grows) m = at::vec::clamp_min(m, acc[r][v]);
            }
            if ((m > Vec::loadu(cb + v * T::VS)).zero_mask() != T::kAllLanes) {
              resolve_columns<acc_t>(acc, v, grows, row_pos0 + g * T::MR, cb + v * T::VS,
                                     cp + v * T::VS);
            }
          }
        }
      }
    }
  }
}

// Flat indices of the valid pixels of one map (all of them without a mask), ascending.
inline void valid_pixels(const bool* mask, int64_t N, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t p = 0; p < N; ++p) {
    if (mask == nullptr || mask[p]) out.push_back(p);
  }
}

template <typename scalar_t, typename acc_t>
void dense_forward(const MatchArgs& args) {
  using T = Tile<acc_t>;
  const Geometry& geo = args.geo;
  const int64_t B = geo.B, N = geo.voxels(), C = geo.C;
  auto* values_ab = static_cast<acc_t*>(args.values_ab);
  auto* values_ba = static_cast<acc_t*>(args.values_ba);
  const bool both = values_ba != nullptr;
  constexpr int64_t kTileRows = 16 * T::MR;  // query rows per task

  // Valid queries of a and packed candidates of b, per sample.
  std::vector<std::vector<int64_t>> queries(B);
  std::vector<std::vector<uint8_t>> query_bad(B);
  std::vector<Panels<acc_t>> cands(B);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> row;
    for (int64_t b = b0; b < b1; ++b) {
      valid_pixels(args.mask_a ? args.mask_a + b * N : nullptr, N, queries[b]);
      query_bad[b].assign(queries[b].size(), 0);
      valid_pixels(args.mask_b ? args.mask_b + b * N : nullptr, N, cands[b].index);
      pack_panels<scalar_t, acc_t>(args.b, b, geo, args.normalize, cands[b], row);
    }
  });

  struct Task { int64_t b, start; };
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < int64_t(queries[b].size()); s += kTileRows) tasks.push_back({b, s});
  }
  // Reverse direction: per-thread running best of every packed candidate column.
  std::vector<int64_t> col_offset(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) col_offset[b + 1] = col_offset[b] + cands[b].panels * T::NR;
  const int64_t threads = both ? at::get_num_threads() : 0;
  std::vector<acc_t> col_best(threads * col_offset[B], kNegInf<acc_t>);
  std::vector<int64_t> col_pos(threads * col_offset[B], -1);

  std::fill(values_ab, values_ab + B * N, acc_t(0));
  std::fill(args.indices_ab, args.indices_ab + B * N, int64_t{-1});
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> packed, row;
    std::vector<acc_t> best(kTileRows + T::MR);
    std::vector<int64_t> best_pos(kTileRows + T::MR);
    const int64_t tid = both ? at::get_thread_num() : 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = tasks[t].b, start = tasks[t].start;
      const int64_t rows = std::min<int64_t>(kTileRows, int64_t(queries[b].size()) - start);
      const int64_t* index = queries[b].data() + start;
      uint8_t* bad = query_bad[b].data() + start;
      pack_queries<scalar_t, acc_t>(args.a, b, geo, args.normalize, index, rows, packed, bad, row);
      acc_t* cb = both ? col_best.data() + tid * col_offset[B] + col_offset[b] : nullptr;
      int64_t* cp = both ? col_pos.data() + tid * col_offset[B] + col_offset[b] : nullptr;
      match_rows<acc_t>(packed.data(), rows, cands[b], C, best.data(), best_pos.data(), cb, cp, start);
      const Candidates view = cands[b].view();
      for (int64_t i = 0; i < rows; ++i) {
        acc_t& value = values_ab[b * N + index[i]];
        int64_t& found = args.indices_ab[b * N + index[i]];
        if (args.normalize || (bad[i] == 0 && view.first_bad < 0)) {
          finish_query(best[i], best_pos[i], bad[i] != 0, view, value, found);
        } else {
          finish_query_raw<scalar_t, acc_t>(args.a, args.b, b, index[i], geo, best[i], best_pos[i], bad[i] != 0, view,
                                            value, found);
        }
      }
    }
  });
  if (!both) return;

  // b -> a: queries are b's valid pixels, candidates a's; merge the threads' partial maxima
  // (larger value wins, ties the lower row: each thread saw its rows in ascending order).
  std::fill(values_ba, values_ba + B * N, acc_t(0));
  std::fill(args.indices_ba, args.indices_ba + B * N, int64_t{-1});
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const auto& rows = queries[b];
      int64_t first_bad = -1;
      for (int64_t i = 0; i < int64_t(rows.size()) && first_bad < 0; ++i) {
        if (query_bad[b][i]) first_bad = i;
      }
      const Candidates view{int64_t(rows.size()), rows.data(), first_bad, query_bad[b].data()};
      for (int64_t j = 0; j < cands[b].count; ++j) {
        acc_t best = kNegInf<acc_t>;
        int64_t pos = -1;
        for (int64_t t = 0; t < threads; ++t) {
          const int64_t at = t * col_offset[B] + col_offset[b] + j;
          const int64_t cpos = col_pos[at];
          if (cpos < 0) continue;
          if (pos < 0 || col_best[at] > best || (col_best[at] == best && cpos < pos)) {
            best = col_best[at];
            pos = cpos;
          }
        }
        const int64_t q = cands[b].index[j];
        const bool query_is_bad = cands[b].bad[j] != 0;
        if (args.normalize || (!query_is_bad && first_bad < 0)) {
          finish_query(best, pos, query_is_bad, view, values_ba[b * N + q], args.indices_ba[b * N + q]);
        } else {
          finish_query_raw<scalar_t, acc_t>(args.b, args.a, b, q, geo, best, pos, query_is_bad, view,
                                            values_ba[b * N + q], args.indices_ba[b * N + q]);
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace salign
