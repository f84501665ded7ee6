// Partition-window matching, 2D (D = 1, window depth 1) and 3D: the maps are cut into tiles of
// (kd, kh, kw) voxels from the origin (smaller at the far edges), and each query p of a tile
// matches the candidates q of b in the same tile:
//   value[p] = max_q <xa_hat_p, xb_hat_q>,   index[p] = the lowest q attaining it.
// A tile is a small dense problem (the similarity matrix is block-diagonal), solved whole.
//
// Buffers, per tile: the valid voxels of a and of b, each in ascending flat index, packed
// channel-major [C][stride] (lanes.h), normalised; a padding candidate and a non-finite one are
// zero with a bias of -inf, so neither ever wins, and a tile's first non-finite candidate is
// remembered for finish_query.
// Reading the input: a tile row is a run of kw voxels per channel, and channel planes are often a
// power of two apart, so the C runs of one row fall into the same cache sets. A tile is copied
// channel by channel (the runs of one channel lie in distinct sets) rather than run by run, and
// the next tile's lines are prefetched while this one is matched, a few per channel step.
// Blocking (tile_kernel): queries in the lanes of NV vectors, candidates broadcast MR at a time:
// MR x NV accumulators, NV vector loads and MR broadcasts per channel for MR * NV FMAs. With the
// queries in lanes each accumulator is one candidate against NV * VS queries, folded straight
// into a running best per lane (lanes.h) in ascending candidate order: no horizontal reduction
// and no scalar scan, which a dense-style kernel (candidates in lanes) would pay per query on
// tiles this small. (MR, NV) is chosen per tile among (9, 3), (6, 4), (12, 2) to compute the fewest
// padded similarities (k = 15: 225 queries fill 15 vectors of 16, 225 candidates 25 groups of 9;
// k = 7: 49 queries, 4 vectors; k = 5: 25 queries, 2 vectors).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu/lanes.h"

namespace salign {
namespace CPU_CAPABILITY {

template <typename acc_t>
struct TileCall {
  using idx_t = lane_index_t<acc_t>;
  const acc_t* query;  // lanes of vector v, channel c: query + c * query_c + v * VS
  int64_t query_c;
  const acc_t* cand;   // candidate j, channel c: cand + c * cand_c + j
  int64_t cand_c;
  const acc_t* bias;   // bias[j]: 0, or -inf for a candidate that must not win
  int64_t groups;      // candidates in groups of MR
  int64_t C;
  acc_t* best;         // NV * VS lanes: running best and the position of its candidate
  idx_t* index;
  const PrefetchJob* prefetch;  // one job per group, one line per channel step
};

template <typename acc_t, int MR, int NV>
void tile_kernel(const TileCall<acc_t>& t) {
  using Vec = Vectorized<acc_t>;
  using idx_t = lane_index_t<acc_t>;
  using IVec = Vectorized<idx_t>;
  constexpr int64_t VS = Vec::size();
  for (int64_t g = 0; g < t.groups; ++g) {
    Vec acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec init(t.bias[g * MR + r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = init;
    }
    const acc_t* q = t.query;
    const acc_t* k = t.cand + g * MR;
    const char* pf = t.prefetch[g].base;
    const int64_t pf_stride = t.prefetch[g].stride;
    for (int64_t c = 0; c < t.C; ++c, q += t.query_c, k += t.cand_c, pf += pf_stride) {
      __builtin_prefetch(pf, 0, 2);
      Vec qv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) qv[v] = Vec::loadu(q + v * VS);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const Vec kv(k[r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(kv, qv[v], acc[r][v]);
      }
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      Vec best = Vec::loadu(t.best + v * VS);
      IVec index = IVec::loadu(t.index + v * VS);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) fold_greater<acc_t>(acc[r][v], IVec(idx_t(g * MR + r)), best, index);
      best.store(t.best + v * VS);
      index.store(t.index + v * VS);
    }
  }
}

// The valid voxels of one map in one tile, packed.
template <typename acc_t>
struct TilePack {
  AlignedBuffer<acc_t> data;     // [C][stride]
  int64_t stride = 0;
  std::vector<int64_t> index;    // flat index of each packed voxel, ascending
  std::vector<uint8_t> bad;      // x_hat not finite
  int64_t count() const { return static_cast<int64_t>(index.size()); }
};

struct Box {
  int64_t z0, z1, y0, y1, x0, x1;
};

// Lists the voxels of `box` that pass `mask` (nullptr: all), ascending.
inline void list_voxels(const Box& box, const Geometry& geo, const bool* mask, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t z = box.z0; z < box.z1; ++z) {
    for (int64_t y = box.y0; y < box.y1; ++y) {
      const int64_t row = (z * geo.H + y) * geo.W;
      for (int64_t x = box.x0; x < box.x1; ++x) {
        if (mask == nullptr || mask[row + x]) out.push_back(row + x);
      }
    }
  }
}

// Sizes `pack` for its listed voxels: stride columns, of which those past the voxels are padding.
template <typename acc_t>
void size_pack(int64_t C, int64_t stride, TilePack<acc_t>& pack) {
  if (pack.data.size() < C * stride) pack.data.assign(C * stride, acc_t(0));
  pack.stride = stride;
  pack.bad.assign(stride, 0);
}

// Copies the listed voxels of sample b of f into columns 0.. of their packs, by runs of voxels
// consecutive along w: channel by channel, and within a channel the runs in flat order.
template <typename scalar_t, typename acc_t>
void pack_runs(const Features& f, int64_t b, const Geometry& geo, const std::vector<TilePack<acc_t>*>& packs) {
  struct Run {
    int64_t voxel, offset, len, room;
    acc_t* dst;
    int64_t stride;
  };
  std::vector<Run> runs;
  for (TilePack<acc_t>* pack : packs) {
    const int64_t n = pack->count();
    for (int64_t i = 0; i < n;) {
      const int64_t q = pack->index[i];
      const int64_t x = q % geo.W, zy = q / geo.W;
      int64_t len = 1;
      while (i + len < n && pack->index[i + len] == q + len && x + len < geo.W) ++len;
      // A run may spill up to the row's end or the pack's: the next run of the tile (later in
      // flat order) overwrites the spill, and padding columns are cleared afterwards.
      const int64_t room = std::min(geo.W - x, pack->stride - i);
      const int64_t offset = (zy / geo.H) * f.stride_d + (zy % geo.H) * f.stride_h + x * f.stride_w;
      runs.push_back({q, offset, len, room, pack->data.data() + i, pack->stride});
      i += len;
    }
  }
  std::sort(runs.begin(), runs.end(), [](const Run& l, const Run& r) { return l.voxel < r.voxel; });
  const scalar_t* sample = static_cast<const scalar_t*>(f.data) + b * f.stride_b;
  if (f.stride_w == 1) {
    for (int64_t c = 0; c < geo.C; ++c) {
      const scalar_t* plane = sample + c * f.stride_c;
      for (const Run& run : runs) copy_run(plane + run.offset, run.dst + c * run.stride, run.len, run.room);
    }
  } else {  // channels-last or strided: voxel by voxel
    for (const Run& run : runs) {
      const int64_t zy = run.voxel / geo.W;
      load_run<scalar_t, acc_t>(f, b, zy / geo.H, zy % geo.H, run.voxel % geo.W, run.len, run.len, geo.C, run.dst,
                                run.stride);
    }
  }
}

// Clears the padding columns of a copied pack and normalises its voxels.
template <typename acc_t>
void finish_pack(int64_t C, bool normalize, TilePack<acc_t>& pack) {
  const int64_t n = pack.count(), stride = pack.stride;
  for (int64_t c = 0; c < C; ++c) std::fill(pack.data.data() + c * stride + n, pack.data.data() + (c + 1) * stride, acc_t(0));
  normalise_columns(pack.data.data(), stride, C, round_up(n, Vectorized<acc_t>::size()), normalize, pack.bad.data());
}

template <typename acc_t>
using TileKernel = void (*)(const TileCall<acc_t>&);

struct TileShape {
  int mr, nv;
};
constexpr TileShape kTileShapes[] = {{9, 3}, {6, 4}, {12, 2}};
constexpr int kTileShapeCount = 3;

template <typename acc_t>
TileKernel<acc_t> tile_kernel_for(int shape) {
  constexpr TileShape s0 = kTileShapes[0], s1 = kTileShapes[1], s2 = kTileShapes[2];
  switch (shape) {
    case 0: return &tile_kernel<acc_t, s0.mr, s0.nv>;
    case 1: return &tile_kernel<acc_t, s1.mr, s1.nv>;
    default: return &tile_kernel<acc_t, s2.mr, s2.nv>;
  }
}

// The shape that computes the fewest padded similarities for nq queries and nc candidates.
inline int tile_shape_for(int64_t nq, int64_t nc, int64_t VS) {
  int chosen = 0;
  int64_t cheapest = std::numeric_limits<int64_t>::max();
  for (int s = 0; s < kTileShapeCount; ++s) {
    const int64_t lanes = kTileShapes[s].nv * VS;
    const int64_t cost = round_up(nq, lanes) * round_up(nc, kTileShapes[s].mr);
    if (cost < cheapest) {
      cheapest = cost;
      chosen = s;
    }
  }
  return chosen;
}

template <typename scalar_t, typename acc_t>
void partition_forward(const MatchArgs& args) {
  using Vec = Vectorized<acc_t>;
  using idx_t = lane_index_t<acc_t>;
  constexpr int64_t VS = Vec::size();
  constexpr idx_t kNone = std::numeric_limits<idx_t>::min();
  const Geometry& geo = args.geo;
  const int64_t B = geo.B, D = geo.D, H = geo.H, W = geo.W, N = geo.voxels(), C = geo.C;
  const Window k = args.window;
  const int64_t tz = (D + k.d - 1) / k.d, ty = (H + k.h - 1) / k.h, tx = (W + k.w - 1) / k.w;
  auto* values = static_cast<acc_t*>(args.values_ab);
  int64_t* indices = args.indices_ab;

  const int64_t tiles = tz * ty * tx;
  const auto box_of = [&](int64_t tile) {
    const int64_t iz = tile / (ty * tx), iy = (tile / tx) % ty, ix = tile % tx;
    return Box{iz * k.d, std::min(D, (iz + 1) * k.d), iy * k.h, std::min(H, (iy + 1) * k.h),
               ix * k.w, std::min(W, (ix + 1) * k.w)};
  };

  at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
    Prefetcher prefetch;
    std::vector<PrefetchJob> jobs;
    TilePack<acc_t> queries, cands;
    std::vector<TilePack<acc_t>*> query_pack{&queries}, cand_pack{&cands};
    std::vector<acc_t> bias;
    AlignedBuffer<acc_t> best;
    AlignedBuffer<idx_t> index;
    std::vector<int64_t> box_voxels;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles;
      const Box box = box_of(t % tiles);
      const bool* mask_a = args.mask_a ? args.mask_a + b * N : nullptr;
      const bool* mask_b = args.mask_b ? args.mask_b + b * N : nullptr;
      if (mask_a != nullptr) {  // queries left out of the matching
        list_voxels(box, geo, nullptr, box_voxels);
        for (const int64_t p : box_voxels) {
          if (!mask_a[p]) {
            values[b * N + p] = 0;
            indices[b * N + p] = -1;
          }
        }
      }
      list_voxels(box, geo, mask_a, queries.index);
      list_voxels(box, geo, mask_b, cands.index);
      const int64_t nq = queries.count(), nc = cands.count();
      if (nq == 0) continue;
      if (nc == 0) {
        for (const int64_t p : queries.index) {
          values[b * N + p] = 0;
          indices[b * N + p] = -1;
        }
        continue;
      }
      const int shape = tile_shape_for(nq, nc, VS);
      const int64_t mr = kTileShapes[shape].mr, lanes = kTileShapes[shape].nv * VS;
      size_pack(C, round_up(nq, lanes), queries);
      size_pack(C, round_up(round_up(nc, mr), VS), cands);
      pack_runs<scalar_t, acc_t>(args.a, b, geo, query_pack);
      pack_runs<scalar_t, acc_t>(args.b, b, geo, cand_pack);
      finish_pack(C, args.normalize, queries);
      finish_pack(C, args.normalize, cands);
      // Padding and non-finite candidates: zero, bias -inf.
      const int64_t groups = (nc + mr - 1) / mr;
      bias.assign(groups * mr, kNegInf<acc_t>);
      int64_t first_bad = -1;
      for (int64_t j = 0; j < nc; ++j) {
        if (!cands.bad[j]) {
          bias[j] = 0;
          continue;
        }
        if (first_bad < 0) first_bad = j;
        for (int64_t c = 0; c < C; ++c) cands.data[c * cands.stride + j] = 0;
      }
      best.assign(queries.stride, kNegInf<acc_t>);
      index.assign(queries.stride, kNone);

      // Request the next tile's rows while this one is matched.
      prefetch.clear();
      if (t + 1 < t1) {
        const int64_t bn = (t + 1) / tiles;
        const Box next = box_of((t + 1) % tiles);
        for (int64_t z = next.z0; z < next.z1; ++z) {
          for (int64_t y = next.y0; y < next.y1; ++y) {
            prefetch.add_row<scalar_t>(args.a, bn, z, y, next.x0, next.x1 - next.x0, C);
            prefetch.add_row<scalar_t>(args.b, bn, z, y, next.x0, next.x1 - next.x0, C);
          }
        }
      }
      const int64_t panels = (nq + lanes - 1) / lanes;
      jobs.resize(panels * groups);
      for (auto& job : jobs) job = prefetch.next();

      TileCall<acc_t> call;
      call.query_c = queries.stride;
      call.cand = cands.data.data();
      call.cand_c = cands.stride;
      call.bias = bias.data();
      call.groups = groups;
      call.C = C;
      const TileKernel<acc_t> kernel = tile_kernel_for<acc_t>(shape);
      for (int64_t panel = 0; panel < panels; ++panel) {
        call.query = queries.data.data() + panel * lanes;
        call.best = best.data() + panel * lanes;
        call.index = index.data() + panel * lanes;
        call.prefetch = jobs.data() + panel * groups;
        kernel(call);
      }

      const Candidates view{nc, cands.index.data(), first_bad, cands.bad.data()};
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t p = queries.index[i];
        const int64_t pos = index[i] == kNone ? -1 : static_cast<int64_t>(index[i]);
        const bool query_is_bad = queries.bad[i] != 0;
        if (args.normalize || (!query_is_bad && first_bad < 0)) {
          finish_query(best[i], pos, query_is_bad, view, values[b * N + p], indices[b * N + p]);
        } else {
          finish_query_raw<scalar_t, acc_t>(args.a, args.b, b, p, geo, best[i], pos, query_is_bad, view,
                                            values[b * N + p], indices[b * N + p]);
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace salign
