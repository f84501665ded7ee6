// Windowed matching, sliding and partition, in 2D (D = 1, window depth 1) and 3D: per query, one
// vectorised dot product with each candidate of its window, in ascending flat index.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/pixels.h"

namespace salign {
namespace CPU_CAPABILITY {

// The candidate range [lo, hi) of coordinate x on an axis of size X: the centred neighbourhood of
// size k (sliding, odd k, clipped to the map) or x's tile of size k from the origin (partition).
struct AxisRange {
  int64_t lo, hi;
};

inline AxisRange axis_range(int64_t x, int64_t X, int64_t k, bool sliding) {
  if (sliding) return {std::max<int64_t>(0, x - k / 2), std::min(X, x + k / 2 + 1)};
  const int64_t lo = (x / k) * k;
  return {lo, std::min(X, lo + k)};
}

template <typename scalar_t, typename acc_t>
void window_forward(const MatchArgs& args) {
  const Geometry& geo = args.geo;
  const int64_t B = geo.B, D = geo.D, H = geo.H, W = geo.W, N = geo.voxels(), C = geo.C;
  const Window k = args.window;
  const bool sliding = args.mode == WindowMode::Sliding;
  auto* values = static_cast<acc_t*>(args.values_ab);
  int64_t* indices = args.indices_ab;

  // Normalised, voxel-major float copies of both maps (each candidate is read by up to
  // prod(window) queries).
  const VoxelMajor<scalar_t, acc_t> fa(args.a, geo, args.normalize), fb(args.b, geo, args.normalize);

  at::parallel_for(0, B * D * H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / (D * H), d = (row / H) % D, h = row % H;
      const AxisRange zr = axis_range(d, D, k.d, sliding), yr = axis_range(h, H, k.h, sliding);
      const bool* mb = args.mask_b ? args.mask_b + b * N : nullptr;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t p = b * N + (d * H + h) * W + w;
        values[p] = 0;
        indices[p] = -1;
        if (args.mask_a && !args.mask_a[p]) continue;
        const AxisRange xr = axis_range(w, W, k.w, sliding);
        const acc_t* query = fa.row(p);
        acc_t best = kNegInf<acc_t>;
        int64_t best_q = -1, first = -1, first_bad = -1;
        for (int64_t z = zr.lo; z < zr.hi; ++z) {
          for (int64_t y = yr.lo; y < yr.hi; ++y) {
            for (int64_t x = xr.lo; x < xr.hi; ++x) {
              const int64_t q = (z * H + y) * W + x;
              if (mb && !mb[q]) continue;
              if (first < 0) first = q;
              if (fb.bad[b * N + q]) {
                if (first_bad < 0) first_bad = q;
                continue;
              }
              const acc_t s = dot(query, fb.row(b * N + q), C);
              if (s > best) {
                best = s;
                best_q = q;
              }
            }
          }
        }
        // Resolve like finish_query, with flat indices in place of positions.
        if (first < 0) continue;
        if (fa.bad[p]) {
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

}  // namespace CPU_CAPABILITY
}  // namespace salign
