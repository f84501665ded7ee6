// Matching kernels, forward and backward. This header is compiled once per CPU capability:
// setup.py builds match_<capability>.cpp with that capability's compiler flags and
// -DCPU_CAPABILITY=<capability>, the macro that also names the inline namespace of at::vec, so the
// variants never collide at link time. match_cpu.cpp picks one at run time.
//
// Notation: features x[b][c][h][w] in any memory layout (read through their strides), pixels
// p = h * W + w, N = H * W. With normalisation x_hat_p = x_p / max(||x_p||, 1e-12), the formula of
// torch.nn.functional.normalize, else x_hat_p = x_p; the similarity is s(p, q) = <xa_hat_p, xb_hat_q>.
// Every kernel normalises while it packs float copies of the pixels it reads, so normalisation costs
// no pass of its own.
//
// Forward: for each valid query p, value = max over valid candidates q of s(p, q), index = the
// lowest q attaining it. Candidates are visited in ascending q and a running best is replaced only
// by a strictly larger value, so ties keep the lowest index without extra work.
//
// Non-finite input: a pixel whose normalised feature vector holds an Inf or NaN has a NaN
// similarity with every pixel (normalising such a vector gives NaN). The fast paths ignore NaN
// (ordered compares are false) and each query is resolved afterwards, as torch.max does: a NaN
// query takes its first candidate, otherwise the first non-finite candidate, with value NaN.
//
// Backward. value[p] = <xa_hat_p, xb_hat_q> with q = index[p] and upstream gradient g_p, so
//   d/dxa_hat_p = g_p xb_hat_q          d/dxb_hat_q = G_q = sum_{p -> q} g_p xa_hat_p,
// and through the normalisation (r = 1 / ||x||, when ||x|| >= eps; x_hat = x / eps below, r = 1/eps):
//   d/dx = r (d/dx_hat - x_hat <x_hat, d/dx_hat>)
// which is, with <xa_hat_p, xb_hat_q> = value[p] and <xb_hat_q, G_q> = S_q = sum_{p -> q} g_p value[p],
//   d/dxa_p = r_a g_p (xb_hat_q - value[p] xa_hat_p)      d/dxb_q = r_b (G_q - S_q xb_hat_q).
// The sums over "every p that chose q" run over an inverse index built by a counting sort, in
// ascending p, so the result is the same whatever the number of threads (deterministic).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/match_kernels.h"

namespace salign {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Loading features
// ---------------------------------------------------------------------------------------------

// Whether every x[k] is finite: no exponent field is all ones. Integer min-reduction, which the
// compiler vectorises (a floating-point probe would be a sequential sum).
template <typename acc_t>
inline bool all_finite(const acc_t* x, int64_t n) {
  using U = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  constexpr U kExponent = sizeof(acc_t) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U smallest = ~U(0);
  for (int64_t k = 0; k < n; ++k) {
    U bits;
    std::memcpy(&bits, x + k, sizeof(bits));
    smallest = std::min<U>(smallest, (bits & kExponent) ^ kExponent);  // 0 for Inf and NaN
  }
  return smallest != 0;
}

// The first element of pixel p of sample b.
template <typename scalar_t>
inline const scalar_t* pixel_ptr(const Features& f, int64_t b, int64_t p, int64_t W) {
  return static_cast<const scalar_t*>(f.data) + b * f.stride_b + (p / W) * f.stride_h + (p % W) * f.stride_w;
}

template <typename scalar_t>
inline scalar_t* pixel_ptr(const FeatureGrad& f, int64_t b, int64_t p, int64_t W) {
  return static_cast<scalar_t*>(f.data) + b * f.stride_b + (p / W) * f.stride_h + (p % W) * f.stride_w;
}

template <typename acc_t>
struct Loaded {
  acc_t scale;   // 1 / max(||x||, eps), or 1 without normalisation
  bool clamped;  // ||x|| < eps: the norm was replaced by eps (no gradient through it)
  bool finite;   // every element of x_hat is finite
};

// dst[k] = x_hat[k] for the C channels of one pixel (stride_c apart), in the accumulation type.
template <typename scalar_t, typename acc_t>
inline Loaded<acc_t> load_pixel(const scalar_t* src, int64_t stride_c, int64_t C, bool normalize, acc_t* dst);

// <a, b> over C channels, vectorised.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t C) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  Vec s0(0), s1(0);
  int64_t k = 0;
  for (; k + 2 * VS <= C; k += 2 * VS) {
    s0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + k + VS), Vec::loadu(b + k + VS), s1);
  }
  if (k + VS <= C) {
    s0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), s0);
    k += VS;
  }
  if (k < C) {  // the tail, zero-filled by the partial loads
    s1 = at::vec::fmadd(Vec::loadu(a + k, C - k), Vec::loadu(b + k, C - k), s1);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, s0 + s1);
}

template <typename scalar_t, typename acc_t>
inline Loaded<acc_t> load_pixel(const scalar_t* src, int64_t stride_c, int64_t C, bool normalize, acc_t* dst) {
  constexpr acc_t kEps = acc_t(1e-12);  // the eps of torch.nn.functional.normalize
  if (stride_c == 1) {
    for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<acc_t>(src[k]);
  } else {
    for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<acc_t>(src[k * stride_c]);
  }
  Loaded<acc_t> out{acc_t(1), false, true};
  if (normalize) {
    const acc_t norm = std::sqrt(dot(dst, dst, C));
    out.clamped = norm < kEps;
    out.scale = acc_t(1) / (out.clamped ? kEps : norm);  // NaN stays NaN; Inf gives 0, then NaN below
    for (int64_t k = 0; k < C; ++k) dst[k] *= out.scale;
  }
  out.finite = all_finite(dst, C);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Resolving a query once its best candidate is known
// ---------------------------------------------------------------------------------------------

// The candidates of a query, in ascending flat index.
struct Candidates {
  int64_t count;          // 0: the query has no candidate
  const int64_t* index;   // flat index of each candidate
  int64_t first_bad;      // position of the first non-finite candidate, -1 if none
};

template <typename acc_t>
inline void finish_query(acc_t best, int64_t best_pos, bool query_bad, const Candidates& cand,
                         acc_t& value, int64_t& index) {
  if (cand.count == 0) {
    value = 0;
    index = -1;
  } else if (query_bad) {
    value = kNaN<acc_t>;
    index = cand.index[0];
  } else if (cand.first_bad >= 0) {
    value = kNaN<acc_t>;
    index = cand.index[cand.first_bad];
  } else if (best_pos < 0) {  // every similarity was -inf (possible without normalisation)
    value = kNegInf<acc_t>;
    index = cand.index[0];
  } else {
    value = best;
    index = cand.index[best_pos];
  }
}

// ---------------------------------------------------------------------------------------------
// Dense matching: a register-blocked micro-kernel over packed panels
// ---------------------------------------------------------------------------------------------

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

  Candidates view() const { return {count, index.data(), first_bad}; }
};

// Packs the candidates listed in `out.index` (ascending) of sample b of map f, normalised.
template <typename scalar_t, typename acc_t>
void pack_panels(const Features& f, int64_t b, int64_t W, int64_t C, bool normalize, Panels<acc_t>& out,
                 std::vector<acc_t>& row) {
  using T = Tile<acc_t>;
  out.count = static_cast<int64_t>(out.index.size());
  out.panels = (out.count + T::NR - 1) / T::NR;
  out.data.assign(out.panels * C * T::NR, acc_t(0));
  out.bias.assign(out.panels * T::NR, kNegInf<acc_t>);
  out.bad.assign(out.count, 0);
  out.first_bad = -1;
  row.resize(C);
  for (int64_t i = 0; i < out.count; ++i) {
    const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, b, out.index[i], W), f.stride_c, C, normalize, row.data());
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
void pack_queries(const Features& f, int64_t b, int64_t W, int64_t C, bool normalize, const int64_t* index,
                  int64_t rows, std::vector<acc_t>& out, uint8_t* bad, std::vector<acc_t>& row) {
  using T = Tile<acc_t>;
  const int64_t groups = (rows + T::MR - 1) / T::MR;
  out.assign(groups * C * T::MR, acc_t(0));
  row.resize(C);
  for (int64_t i = 0; i < rows; ++i) {
    const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, b, index[i], W), f.stride_c, C, normalize, row.data());
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
  const int64_t B = args.B, W = args.W, N = args.H * args.W, C = args.C;
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
      pack_panels<scalar_t, acc_t>(args.b, b, W, C, args.normalize, cands[b], row);
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
      pack_queries<scalar_t, acc_t>(args.a, b, W, C, args.normalize, index, rows, packed, bad, row);
      acc_t* cb = both ? col_best.data() + tid * col_offset[B] + col_offset[b] : nullptr;
      int64_t* cp = both ? col_pos.data() + tid * col_offset[B] + col_offset[b] : nullptr;
      match_rows<acc_t>(packed.data(), rows, cands[b], C, best.data(), best_pos.data(), cb, cp, start);
      const Candidates view = cands[b].view();
      for (int64_t i = 0; i < rows; ++i) {
        finish_query(best[i], best_pos[i], bad[i] != 0, view, values_ab[b * N + index[i]],
                     args.indices_ab[b * N + index[i]]);
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
      const Candidates view{int64_t(rows.size()), rows.data(), first_bad};
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
        finish_query(best, pos, cands[b].bad[j] != 0, view, values_ba[b * N + q],
                     args.indices_ba[b * N + q]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Windowed matching: per query, a dot product with each candidate of its window
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
void window_forward(const MatchArgs& args) {
  const int64_t B = args.B, H = args.H, W = args.W, N = H * W, C = args.C, k = args.window;
  auto* values = static_cast<acc_t*>(args.values_ab);
  int64_t* indices = args.indices_ab;

  // Normalised, pixel-major float copies of both maps (each candidate is read by up to k * k queries).
  std::vector<acc_t> fa(B * N * C), fb(B * N * C);
  std::vector<uint8_t> bad_a(B * N), bad_b(B * N);
  at::parallel_for(0, B * N, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, p = i % N;
      bad_a[i] = !load_pixel(pixel_ptr<scalar_t>(args.a, b, p, W), args.a.stride_c, C, args.normalize,
                             fa.data() + i * C).finite;
      bad_b[i] = !load_pixel(pixel_ptr<scalar_t>(args.b, b, p, W), args.b.stride_c, C, args.normalize,
                             fb.data() + i * C).finite;
    }
  });

  const bool sliding = args.mode == WindowMode::Sliding;
  const int64_t radius = k / 2;
  at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t bh = r0; bh < r1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t top = sliding ? std::max<int64_t>(0, h - radius) : (h / k) * k;
      const int64_t bottom = sliding ? std::min(H, h + radius + 1) : std::min(H, top + k);
      const bool* mb = args.mask_b ? args.mask_b + b * N : nullptr;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t p = b * N + h * W + w;
        values[p] = 0;
        indices[p] = -1;
        if (args.mask_a && !args.mask_a[p]) continue;
        const int64_t left = sliding ? std::max<int64_t>(0, w - radius) : (w / k) * k;
        const int64_t right = sliding ? std::min(W, w + radius + 1) : std::min(W, left + k);
        const acc_t* query = fa.data() + p * C;
        acc_t best = kNegInf<acc_t>;
        int64_t best_q = -1, first = -1, first_bad = -1;
        for (int64_t y = top; y < bottom; ++y) {
          for (int64_t x = left; x < right; ++x) {
            const int64_t q = y * W + x;
            if (mb && !mb[q]) continue;
            if (first < 0) first = q;
            if (bad_b[b * N + q]) {
              if (first_bad < 0) first_bad = q;
              continue;
            }
            const acc_t s = dot(query, fb.data() + (b * N + q) * C, C);
            if (s > best) {
              best = s;
              best_q = q;
            }
          }
        }
        // Resolve like finish_query, with flat indices in place of positions.
        if (first < 0) continue;
        if (bad_a[p]) {
          values[p] = kNaN<acc_t>;
          indices[p] = first;
        } else if (first_bad >= 0) {
          values[p] = kNaN<acc_t>;
          indices[p] = first_bad;
        } else if (best_q < 0) {
          values[p] = kNegInf<acc_t>;
          indices[p] = first;
        } else {
          values[p] = best;
          indices[p] = best_q;
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_impl(const MatchArgs& args) {
  if (args.window == 0) {
    dense_forward<scalar_t, acc_t>(args);
  } else {
    window_forward<scalar_t, acc_t>(args);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: gather for a, scatter for b through an inverse index
// ---------------------------------------------------------------------------------------------

// Writes C values (stride_c apart) as scalar_t: dst[k] = coef * (x[k] - shift * y[k]).
template <typename scalar_t, typename acc_t>
inline void write_combination(scalar_t* dst, int64_t stride_c, int64_t C, acc_t coef, const acc_t* x, acc_t shift,
                              const acc_t* y) {
  for (int64_t k = 0; k < C; ++k) dst[k * stride_c] = static_cast<scalar_t>(coef * (x[k] - shift * y[k]));
}

template <typename scalar_t>
inline void write_zeros(scalar_t* dst, int64_t stride_c, int64_t C) {
  for (int64_t k = 0; k < C; ++k) dst[k * stride_c] = scalar_t(0);
}

// Normalised, pixel-major float copies of one map: the backward's gathers at arbitrary pixels then
// read C contiguous values instead of C values a whole map apart.
template <typename scalar_t, typename acc_t>
struct PixelMajor {
  std::vector<acc_t> x;        // (B * N, C)
  std::vector<acc_t> scale;    // (B * N): 1 / max(||x||, eps), or 1
  std::vector<uint8_t> clamped;
  int64_t channels;

  PixelMajor(const Features& f, int64_t B, int64_t N, int64_t W, int64_t C, bool normalize)
      : x(B * N * C), scale(B * N), clamped(B * N), channels(C) {
    at::parallel_for(0, B * N, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, i / N, i % N, W), f.stride_c, C, normalize,
                                       x.data() + i * C);
        scale[i] = loaded.scale;
        clamped[i] = loaded.clamped;
      }
    });
  }
  const acc_t* row(int64_t i) const { return x.data() + i * channels; }
};

template <typename scalar_t, typename acc_t>
void backward_impl(const BackwardArgs& args) {
  const int64_t B = args.B, W = args.W, N = args.H * args.W, C = args.C;
  const bool normalize = args.normalize;
  const auto* g = static_cast<const acc_t*>(args.grad_values);
  const int64_t* idx = args.indices;
  const PixelMajor<scalar_t, acc_t> fa(args.a, B, N, W, C, normalize), fb(args.b, B, N, W, C, normalize);

  // a: gather. d/dxa_p = r_a g_p (xb_hat_q - value_p xa_hat_p), with value_p recomputed here;
  // unnormalised: g_p xb_q. Keeps value_p for b's sums.
  std::vector<acc_t> value(B * N, acc_t(0));
  at::parallel_for(0, B * N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, q = idx[i];
      scalar_t* out = pixel_ptr<scalar_t>(args.grad_a, b, i % N, W);
      if (q < 0) {
        write_zeros(out, args.grad_a.stride_c, C);
        continue;
      }
      const acc_t* a_p = fa.row(i);
      const acc_t* b_q = fb.row(b * N + q);
      const acc_t v = dot(a_p, b_q, C);
      const acc_t project = (normalize && !fa.clamped[i]) ? v : acc_t(0);
      write_combination(out, args.grad_a.stride_c, C, g[i] * fa.scale[i], b_q, project, a_p);
      value[i] = v;
    }
  });

  // b: the queries that chose each q, in ascending p (a counting sort per sample).
  std::vector<int64_t> start(B * N + 1, 0), chosen_by(B * N);
  for (int64_t i = 0; i < B * N; ++i) {
    if (idx[i] >= 0) ++start[(i / N) * N + idx[i] + 1];
  }
  for (int64_t i = 0; i < B * N; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < B * N; ++i) {
      if (idx[i] >= 0) chosen_by[fill[(i / N) * N + idx[i]]++] = i;
    }
  }
  // d/dxb_q = r_b (G_q - S_q xb_hat_q), G_q = sum g_p xa_hat_p, S_q = sum g_p value_p.
  at::parallel_for(0, B * N, 64, [&](int64_t j0, int64_t j1) {
    std::vector<acc_t> sum(C);
    for (int64_t j = j0; j < j1; ++j) {
      scalar_t* out = pixel_ptr<scalar_t>(args.grad_b, j / N, j % N, W);
      if (start[j] == start[j + 1]) {  // chosen by no query
        write_zeros(out, args.grad_b.stride_c, C);
        continue;
      }
      std::fill(sum.begin(), sum.end(), acc_t(0));
      acc_t shift = 0;
      for (int64_t s = start[j]; s < start[j + 1]; ++s) {
        const int64_t i = chosen_by[s];
        const acc_t* a_p = fa.row(i);
        const acc_t w = g[i];
        for (int64_t k = 0; k < C; ++k) sum[k] += w * a_p[k];
        shift += w * value[i];
      }
      const acc_t project = (normalize && !fb.clamped[j]) ? shift : acc_t(0);
      write_combination(out, args.grad_b.stride_c, C, fb.scale[j], sum.data(), project, fb.row(j));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

inline void forward(const MatchArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return forward_impl<float, float>(args);
    case DType::Float64: return forward_impl<double, double>(args);
    case DType::Float16: return forward_impl<c10::Half, float>(args);
    case DType::BFloat16: return forward_impl<c10::BFloat16, float>(args);
  }
}

inline void backward(const BackwardArgs& args) {
  switch (args.dtype) {
    case DType::Float32: return backward_impl<float, float>(args);
    case DType::Float64: return backward_impl<double, double>(args);
    case DType::Float16: return backward_impl<c10::Half, float>(args);
    case DType::BFloat16: return backward_impl<c10::BFloat16, float>(args);
  }
}

#define SALIGN_STRINGIFY_(x) #x
#define SALIGN_STRINGIFY(x) SALIGN_STRINGIFY_(x)
const KernelTable kernels{SALIGN_STRINGIFY(CPU_CAPABILITY), &forward, &backward};

}  // namespace CPU_CAPABILITY
}  // namespace salign
