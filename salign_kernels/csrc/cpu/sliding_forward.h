// Sliding-window matching, 2D (D = 1, window depth 1) and 3D: for each query voxel p = (z, y, w)
// of a, over the candidates q = (z + dz, y + dy, w + dx) of b inside the map, |dz| <= kd / 2,
// |dy| <= kh / 2, |dx| <= kw / 2 (and mask_b),
//   value[p] = max_q <xa_hat_p, xb_hat_q>,   index[p] = the lowest q attaining it.
//
// Queries sit in vector lanes along w: a row segment of VS queries (w0 .. w0 + VS - 1) against the
// offset (dz, dy, dx) has as candidates the VS consecutive voxels w0 + dx .. of row (z + dz, y + dy),
// one unaligned load from that row's pack. Buffers:
//   query row   [C][Wp]                   x_hat of a's row, Wp = W rounded up to VS
//   candidate   [C][L + Wp + L] + bias    x_hat of b's row, column w at L + w, zero outside the
//                                         map and at masked or non-finite voxels, whose bias is
//                                         -inf (0 elsewhere) so they never win
//   best, index [rows][Wp]                running best per query, index as the relative flat offset
//                                         q - p = (dz * H + dy) * W + dx (ascending in q)
// Blocking (slide_kernel): R query rows x KX offsets dx in registers. One candidate row serves R
// query rows at once (row y + i sees it as offset dy - i), so per channel the kernel loads R query
// vectors and KX candidate vectors for R * KX FMAs; R * KX + R + 1 <= 26 of the 32 AVX-512
// registers (KX = 7: R = 3, KX = 5: R = 4). Windows wider than 7 go in chunks of at most 7
// offsets. Candidate rows are visited in ascending (dz, y + dy), chunks and offsets in ascending
// dx, so every query folds its candidates in ascending flat index.
//
// Each task (a sample, a slab of planes, a band of rows) packs the candidate rows it needs once,
// as it sweeps (a cache of packed rows: a ring of the band's rows per plane of the window when it
// fits, else the rows of one block of query rows), so packing costs one pass over b while the
// working set stays in L2, and every row of a is packed once.
//
// Non-finite voxels stay off the vector path: their bias is -inf; a query whose window holds one
// (flagged per packed row), a non-finite query, and a query left without a finite candidate are
// resolved afterwards by a scalar scan of the window, as finish_query resolves them (with
// normalisation) or finish_query_raw (raw products, IEEE).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/lanes.h"

namespace salign {
namespace CPU_CAPABILITY {

// The candidate range [lo, hi) of coordinate x on an axis of size X: the centred neighbourhood
// of size k (odd), clipped to the map.
struct AxisRange {
  int64_t lo, hi;
};

inline AxisRange sliding_range(int64_t x, int64_t X, int64_t k) {
  return {std::max<int64_t>(0, x - k / 2), std::min(X, x + k / 2 + 1)};
}

// Query rows per block for a chunk of KX offsets: R * KX accumulators, R query vectors and one
// candidate vector within the register file. Chunks have 1, 3, 5 or 7 offsets (the whole window,
// 2r + 1 <= 7), or 4 to 7 (near-equal chunks of wider ones), never 2. The same blocks serve AVX2
// builds (16 registers): blocks sized for 16 registers (chunks of at most 5) measured up to 20%
// slower there for k = 7, the spilled accumulators staying in L1.
constexpr int slide_rows(int kx) {
  return kx == 1 ? 8 : kx == 2 ? 0 : kx == 3 ? 6 : kx == 4 ? 5 : kx == 5 ? 4 : kx == 6 ? 4 : 3;
}
constexpr int kMaxChunk = 7;
constexpr int kMaxSlideRows = 8;

template <typename acc_t>
struct SlideCall {
  using idx_t = lane_index_t<acc_t>;
  const acc_t* query;  // row i, channel c: query + i * query_row + c * query_c
  int64_t query_row, query_c;
  const acc_t* cand;   // offset dx0 + j, channel c: cand + c * cand_c + j
  int64_t cand_c;
  const acc_t* bias;   // bias + j
  int64_t C;
  acc_t* best;         // row i: best + i * state_row, index + i * state_row
  idx_t* index;
  int64_t state_row;
  idx_t offset;        // relative offset of (row 0, offset dx0); row i, offset j: offset - i * W + j
  idx_t W;
  PrefetchJob prefetch;  // one line per channel step
};

template <typename acc_t, int R, int KX>
void slide_kernel(const SlideCall<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  using idx_t = lane_index_t<acc_t>;
  using IVec = Vectorized<idx_t>;
  Vec acc[R][KX];
#pragma GCC unroll 8
  for (int j = 0; j < KX; ++j) {
    const Vec init = Vec::loadu(s.bias + j);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i][j] = init;
  }
  const acc_t* q = s.query;
  const acc_t* k = s.cand;
  const char* pf = s.prefetch.base;
  for (int64_t c = 0; c < s.C; ++c, q += s.query_c, k += s.cand_c, pf += s.prefetch.stride) {
    __builtin_prefetch(pf, 0, 2);
    Vec qv[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) qv[i] = Vec::loadu(q + i * s.query_row);
#pragma GCC unroll 8
    for (int j = 0; j < KX; ++j) {
      const Vec kv = in_register(Vec::loadu(k + j));
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc[i][j] = at::vec::fmadd(qv[i], kv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    Vec best = Vec::loadu(s.best + i * s.state_row);
    IVec index = IVec::loadu(s.index + i * s.state_row);
    const idx_t offset = s.offset - idx_t(i) * s.W;
#pragma GCC unroll 8
    for (int j = 0; j < KX; ++j) fold_greater<acc_t>(acc[i][j], IVec(offset + idx_t(j)), best, index);
    best.store(s.best + i * s.state_row);
    index.store(s.index + i * s.state_row);
  }
}

template <typename acc_t>
using SlideKernel = void (*)(const SlideCall<acc_t>&);

template <typename acc_t, int KX, int... R>
constexpr std::array<SlideKernel<acc_t>, kMaxSlideRows + 1> slide_row_table(std::integer_sequence<int, R...>) {
  return {nullptr, (R + 1 <= slide_rows(KX) ? &slide_kernel<acc_t, std::min(R + 1, slide_rows(KX)), KX> : nullptr)...};
}

// slide_kernels<acc_t>()[kx][r]: the kernel for r query rows and a chunk of kx offsets.
template <typename acc_t>
const std::array<std::array<SlideKernel<acc_t>, kMaxSlideRows + 1>, kMaxChunk + 1>& slide_kernels() {
  using Rows = std::make_integer_sequence<int, kMaxSlideRows>;
  static const std::array<std::array<SlideKernel<acc_t>, kMaxSlideRows + 1>, kMaxChunk + 1> table{{
      {},
      slide_row_table<acc_t, 1>(Rows{}),
      {},
      slide_row_table<acc_t, 3>(Rows{}),
      slide_row_table<acc_t, 4>(Rows{}),
      slide_row_table<acc_t, 5>(Rows{}),
      slide_row_table<acc_t, 6>(Rows{}),
      slide_row_table<acc_t, 7>(Rows{}),
  }};
  return table;
}

// A packed row of b.
template <typename acc_t>
struct CandidateRow {
  const acc_t* data;    // [C][stride], column w at `margin + w`
  const acc_t* bias;    // [stride]
  const uint8_t* bad;   // [W]: a candidate (mask_b) whose x_hat is not finite
  bool any_candidate;   // some voxel of the row passes mask_b
  bool any_bad;
};

// Packed rows of b, kept while the sweep of a task still needs them. Slot of row (z, y):
// (z mod planes) * rows + (y mod rows), where `planes` consecutive planes and `rows` consecutive
// rows are what a block of queries needs at once, so those never evict each other.
template <typename scalar_t, typename acc_t>
class RowCache {
 public:
  RowCache(const MatchArgs& args, int64_t margin, int64_t planes, int64_t rows)
      : args_(args), geo_(args.geo), margin_(margin), planes_(planes), rows_(rows) {
    constexpr int64_t VS = Vectorized<acc_t>::size();
    padded_ = round_up(geo_.W, VS);
    stride_ = margin + padded_ + margin;
    const int64_t slots = planes * rows;
    data_.assign(slots * geo_.C * stride_, acc_t(0));
    bias_.assign(slots * stride_, kNegInf<acc_t>);
    bad_.assign(slots * padded_, 0);
    key_.assign(slots, -1);
    flags_.assign(slots, 0);
  }

  int64_t stride() const { return stride_; }

  bool holds(int64_t b, int64_t z, int64_t y) const { return key_[slot_of(z, y)] == key_of(b, z, y); }

  CandidateRow<acc_t> get(int64_t b, int64_t z, int64_t y) {
    const int64_t slot = slot_of(z, y);
    const int64_t key = key_of(b, z, y);
    if (key_[slot] != key) {
      pack(slot, b, z, y);
      key_[slot] = key;
    }
    const uint8_t flags = flags_[slot];
    return {data_.data() + slot * geo_.C * stride_, bias_.data() + slot * stride_, bad_.data() + slot * padded_,
            (flags & kAnyCandidate) != 0, (flags & kAnyBad) != 0};
  }

 private:
  static constexpr uint8_t kAnyCandidate = 1, kAnyBad = 2;

  int64_t slot_of(int64_t z, int64_t y) const { return (z % planes_) * rows_ + (y % rows_); }
  int64_t key_of(int64_t b, int64_t z, int64_t y) const { return (b * geo_.D + z) * geo_.H + y; }

  void pack(int64_t slot, int64_t b, int64_t z, int64_t y) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t VS = Vec::size();
    const int64_t C = geo_.C, W = geo_.W;
    acc_t* data = data_.data() + slot * C * stride_ + margin_;
    acc_t* bias = bias_.data() + slot * stride_ + margin_;
    uint8_t* bad = bad_.data() + slot * padded_;
    load_run<scalar_t, acc_t>(args_.b, b, z, y, 0, W, W, C, data, stride_);
    normalise_columns(data, stride_, C, padded_, args_.normalize, bad);
    const bool* mask = args_.mask_b ? args_.mask_b + b * geo_.voxels() + (z * geo_.H + y) * W : nullptr;
    bool any_candidate = false, any_bad = false, any_excluded = false;
    for (int64_t w = 0; w < W; ++w) {
      const bool candidate = mask == nullptr || mask[w];
      bad[w] = candidate && bad[w];
      const bool usable = candidate && !bad[w];
      bias[w] = usable ? acc_t(0) : kNegInf<acc_t>;
      any_candidate |= candidate;
      any_bad |= bad[w] != 0;
      any_excluded |= !usable;
    }
    if (any_excluded) {  // zero the excluded columns: -inf + 0 stays -inf for any finite query
      for (int64_t w0 = 0; w0 < padded_; w0 += VS) {
        const Vec keep = Vec::loadu(bias + w0) == Vec(acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          acc_t* row = data + c * stride_ + w0;
          Vec::blendv(Vec(acc_t(0)), Vec::loadu(row), keep).store(row);
        }
      }
    }
    flags_[slot] = (any_candidate ? kAnyCandidate : 0) | (any_bad ? kAnyBad : 0);
  }

  const MatchArgs& args_;
  const Geometry& geo_;
  int64_t margin_, planes_, rows_, padded_, stride_;
  AlignedBuffer<acc_t> data_, bias_;
  std::vector<uint8_t> bad_;
  std::vector<int64_t> key_;
  std::vector<uint8_t> flags_;
};

// Splits the offsets -r..r into near-equal chunks of at most kMaxChunk.
struct Chunk {
  int64_t dx0;
  int kx;
};

inline std::vector<Chunk> offset_chunks(int64_t r) {
  const int64_t width = 2 * r + 1;
  const int64_t count = (width + kMaxChunk - 1) / kMaxChunk;
  std::vector<Chunk> chunks;
  int64_t dx = -r;
  for (int64_t i = 0; i < count; ++i) {
    const int kx = static_cast<int>(width / count + (i < width % count ? 1 : 0));
    chunks.push_back({dx, kx});
    dx += kx;
  }
  return chunks;
}

template <typename scalar_t, typename acc_t>
void sliding_forward(const MatchArgs& args) {
  using Vec = Vectorized<acc_t>;
  using idx_t = lane_index_t<acc_t>;
  constexpr int64_t VS = Vec::size();
  constexpr idx_t kNone = std::numeric_limits<idx_t>::min();
  constexpr idx_t kNoBad = std::numeric_limits<idx_t>::max();
  const Geometry& geo = args.geo;
  const int64_t B = geo.B, D = geo.D, H = geo.H, W = geo.W, N = geo.voxels(), C = geo.C;
  auto* values = static_cast<acc_t*>(args.values_ab);
  int64_t* indices = args.indices_ab;

  // Offsets that reach past the map on an axis reach no voxel: clip the radii.
  const int64_t rd = std::min(args.window.d / 2, D - 1), rh = std::min(args.window.h / 2, H - 1),
                rw = std::min(args.window.w / 2, W - 1);
  const int64_t kd = 2 * rd + 1, kh = 2 * rh + 1;
  const std::vector<Chunk> chunks = offset_chunks(rw);
  int rows = kMaxSlideRows;
  for (const Chunk& chunk : chunks) rows = std::min(rows, slide_rows(chunk.kx));
  const int64_t Wp = round_up(W, VS), segments = Wp / VS;
  const int64_t margin = round_up(rw, VS);

  // Tasks: samples, split into slabs of planes and bands of rows when there are fewer samples
  // than threads (the result does not depend on the split: each query's arithmetic is the same).
  const int64_t threads = at::get_num_threads();
  const int64_t pieces = (threads + B - 1) / B;
  const int64_t slabs = std::min(D, pieces);
  const int64_t bands = std::min((H + rows - 1) / rows, (pieces + slabs - 1) / slabs);
  const int64_t slab = (D + slabs - 1) / slabs, band = round_up((H + bands - 1) / bands, rows);
  const int64_t tasks_per_sample = ((D + slab - 1) / slab) * ((H + band - 1) / band);

  // Cache shape: with depth, keep the band's rows of every plane of the window (each row of b is
  // then packed once per task); else, or when that is too large, the rows of one block of queries.
  const int64_t row_bytes = (C + 1) * (2 * margin + Wp) * int64_t(sizeof(acc_t));
  const int64_t band_rows = std::min(H, band + 2 * rh), block_rows = std::min(H, rows + kh - 1);
  constexpr int64_t kCacheBytes = int64_t{32} << 20;
  const int64_t cache_rows = (kd > 1 && kd * band_rows * row_bytes <= kCacheBytes) ? band_rows : block_rows;

  at::parallel_for(0, B * tasks_per_sample, 1, [&](int64_t t0, int64_t t1) {
    RowCache<scalar_t, acc_t> cache(args, margin, kd, cache_rows);
    const auto& kernels = slide_kernels<acc_t>();
    AlignedBuffer<acc_t> queries, best;
    AlignedBuffer<idx_t> index;
    queries.assign(rows * C * Wp, acc_t(0));
    best.assign(rows * Wp, acc_t(0));
    index.assign(rows * Wp, idx_t(0));
    std::vector<idx_t> first_bad(rows * Wp);
    std::vector<uint8_t> query_bad(rows * Wp);

    struct Entry {
      CandidateRow<acc_t> row;
      int64_t i0, i1;  // the block's query rows that see this candidate row
      idx_t offset;    // relative offset of (query row 0, dx = 0)
    };
    std::vector<Entry> entries;
    std::vector<int64_t> window;  // the scalar resolution's candidates, without normalisation
    std::vector<uint8_t> window_bad;
    Prefetcher prefetch;

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tasks_per_sample, piece = t % tasks_per_sample;
      const int64_t bands_here = (H + band - 1) / band;
      const int64_t z0 = (piece / bands_here) * slab, z1 = std::min(D, z0 + slab);
      const int64_t y0 = (piece % bands_here) * band, y1 = std::min(H, y0 + band);
      const bool* mask_a = args.mask_a ? args.mask_a + b * N : nullptr;
      const bool* mask_b = args.mask_b ? args.mask_b + b * N : nullptr;

      for (int64_t z = z0; z < z1; ++z) {
        for (int64_t y = y0; y < y1; y += rows) {
          const int64_t R = std::min<int64_t>(rows, y1 - y);
          const int64_t p0 = (z * H + y) * W;  // flat index of the block's first query
          bool any_query = false;
          for (int64_t i = 0; i < R * W && !any_query; ++i) any_query = mask_a == nullptr || mask_a[p0 + i];
          if (!any_query) {
            std::fill(values + b * N + p0, values + b * N + p0 + R * W, acc_t(0));
            std::fill(indices + b * N + p0, indices + b * N + p0 + R * W, int64_t{-1});
            continue;
          }
          for (int64_t i = 0; i < R; ++i) {
            acc_t* q = queries.data() + i * C * Wp;
            load_run<scalar_t, acc_t>(args.a, b, z, y + i, 0, W, W, C, q, Wp);
            normalise_columns(q, Wp, C, Wp, args.normalize, query_bad.data() + i * Wp);
          }
          std::fill(best.data(), best.data() + R * Wp, kNegInf<acc_t>);
          std::fill(index.data(), index.data() + R * Wp, kNone);
          std::fill(first_bad.begin(), first_bad.begin() + R * Wp, kNoBad);

          // The candidate rows of the block, in ascending (z, y).
          entries.clear();
          for (int64_t dz = -std::min(rd, z); dz <= std::min(rd, D - 1 - z); ++dz) {
            for (int64_t yc = std::max<int64_t>(0, y - rh); yc <= std::min(H - 1, y + R - 1 + rh); ++yc) {
              const CandidateRow<acc_t> row = cache.get(b, z + dz, yc);
              if (!row.any_candidate) continue;
              Entry e{row, std::max<int64_t>(0, yc - rh - y), std::min<int64_t>(R, yc + rh - y + 1),
                      static_cast<idx_t>((dz * H + yc - y) * W)};
              entries.push_back(e);
              if (!row.any_bad) continue;
              // The first non-finite candidate of each query in this row (rows come in ascending
              // order and offsets here too, so the first found is the lowest).
              for (int64_t i = e.i0; i < e.i1; ++i) {
                for (int64_t w = 0; w < W; ++w) {
                  idx_t& fb = first_bad[i * Wp + w];
                  if (fb != kNoBad) continue;
                  for (int64_t x = std::max<int64_t>(0, w - rw); x <= std::min(W - 1, w + rw); ++x) {
                    if (row.bad[x]) {
                      fb = e.offset - idx_t(i * W) + idx_t(x - w);
                      break;
                    }
                  }
                }
              }
            }
          }

          // Request the rows the next block will pack while this one is matched.
          prefetch.clear();
          {
            int64_t zn = z, yn = y + rows;
            if (yn >= y1) {
              zn = z + 1;
              yn = y0;
            }
            if (zn < z1) {
              const int64_t Rn = std::min<int64_t>(rows, y1 - yn);
              for (int64_t i = 0; i < Rn; ++i) prefetch.add_row<scalar_t>(args.a, b, zn, yn + i, 0, W, C);
              for (int64_t dz = -std::min(rd, zn); dz <= std::min(rd, D - 1 - zn); ++dz) {
                for (int64_t yc = std::max<int64_t>(0, yn - rh); yc <= std::min(H - 1, yn + Rn - 1 + rh); ++yc) {
                  if (!cache.holds(b, zn + dz, yc)) prefetch.add_row<scalar_t>(args.b, b, zn + dz, yc, 0, W, C);
                }
              }
            }
          }

          for (int64_t m = 0; m < segments; ++m) {
            for (const Entry& e : entries) {
              SlideCall<acc_t> call;
              call.query = queries.data() + e.i0 * C * Wp + m * VS;
              call.query_row = C * Wp;
              call.query_c = Wp;
              call.cand_c = cache.stride();
              call.C = C;
              call.best = best.data() + e.i0 * Wp + m * VS;
              call.index = index.data() + e.i0 * Wp + m * VS;
              call.state_row = Wp;
              call.W = static_cast<idx_t>(W);
              for (const Chunk& chunk : chunks) {
                call.cand = e.row.data + margin + m * VS + chunk.dx0;
                call.bias = e.row.bias + margin + m * VS + chunk.dx0;
                call.offset = e.offset - idx_t(e.i0 * W) + idx_t(chunk.dx0);
                call.prefetch = prefetch.next();
                kernels[chunk.kx][e.i1 - e.i0](call);
              }
            }
          }

          // Results, and the scalar resolution of the queries the vector path cannot settle.
          for (int64_t i = 0; i < R; ++i) {
            for (int64_t w = 0; w < W; ++w) {
              const int64_t p = p0 + i * W + w, out = b * N + p;
              if (mask_a != nullptr && !mask_a[p]) {
                values[out] = 0;
                indices[out] = -1;
                continue;
              }
              const int64_t s = i * Wp + w;
              const bool bad_query = query_bad[s] != 0;
              if (!bad_query && index[s] != kNone && first_bad[s] == kNoBad) {
                values[out] = best[s];
                indices[out] = p + index[s];
                continue;
              }
              // The first candidate in flat order, if any.
              int64_t first = -1;
              const AxisRange zr = sliding_range(z, D, 2 * rd + 1), yr = sliding_range(y + i, H, kh),
                              xr = sliding_range(w, W, 2 * rw + 1);
              for (int64_t zc = zr.lo; zc < zr.hi && first < 0; ++zc) {
                for (int64_t yc = yr.lo; yc < yr.hi && first < 0; ++yc) {
                  for (int64_t x = xr.lo; x < xr.hi; ++x) {
                    const int64_t q = (zc * H + yc) * W + x;
                    if (mask_b == nullptr || mask_b[q]) {
                      first = q;
                      break;
                    }
                  }
                }
              }
              if (first >= 0 && !args.normalize) {  // raw products: IEEE, as settled in finish_query_raw
                window.clear();
                window_bad.clear();
                int64_t pos = -1;
                for (int64_t zc = zr.lo; zc < zr.hi; ++zc) {
                  for (int64_t yc = yr.lo; yc < yr.hi; ++yc) {
                    for (int64_t x = xr.lo; x < xr.hi; ++x) {
                      const int64_t q = (zc * H + yc) * W + x;
                      if (mask_b != nullptr && !mask_b[q]) continue;
                      if (index[s] != kNone && q == p + index[s]) pos = static_cast<int64_t>(window.size());
                      window.push_back(q);
                      window_bad.push_back(!voxel_finite<scalar_t>(args.b, b, q, geo));
                    }
                  }
                }
                const Candidates view{static_cast<int64_t>(window.size()), window.data(), -1, window_bad.data()};
                finish_query_raw<scalar_t, acc_t>(args.a, args.b, b, p, geo, best[s], pos, bad_query, view,
                                                  values[out], indices[out]);
              } else if (first < 0) {
                values[out] = 0;
                indices[out] = -1;
              } else if (bad_query) {
                values[out] = kNaN<acc_t>;
                indices[out] = first;
              } else if (first_bad[s] != kNoBad) {
                values[out] = kNaN<acc_t>;
                indices[out] = p + first_bad[s];
              } else {  // every similarity was -inf or NaN
                values[out] = kNegInf<acc_t>;
                indices[out] = first;
              }
            }
          }
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace salign
