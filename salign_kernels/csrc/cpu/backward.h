// Backward of every matching (dense and windowed): gather for a, scatter for b through an inverse
// index of the saved indices, O(B N C).
//
// value[p] = <xa_hat_p, xb_hat_q> with q = index[p] and upstream gradient g_p, so
//   d/dxa_hat_p = g_p xb_hat_q          d/dxb_hat_q = G_q = sum_{p -> q} g_p xa_hat_p,
// and through the normalisation (r = 1 / ||x||, when ||x|| >= eps; x_hat = x / eps below, r = 1/eps):
//   d/dx = r (d/dx_hat - x_hat <x_hat, d/dx_hat>)
// which is, with <xa_hat_p, xb_hat_q> = value[p] and <xb_hat_q, G_q> = S_q = sum_{p -> q} g_p value[p],
//   d/dxa_p = r_a g_p (xb_hat_q - value[p] xa_hat_p)      d/dxb_q = r_b (G_q - S_q xb_hat_q).
// The sums over "every p that chose q" run over an inverse index built by a counting sort, in
// ascending p, so the result is the same whatever the number of threads (deterministic).
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "cpu/pixels.h"

namespace salign {
namespace CPU_CAPABILITY {

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

template <typename scalar_t, typename acc_t>
void backward_impl(const BackwardArgs& args) {
  const Geometry& geo = args.geo;
  const int64_t B = geo.B, N = geo.voxels(), C = geo.C;
  const bool normalize = args.normalize;
  const auto* g = static_cast<const acc_t*>(args.grad_values);
  const int64_t* idx = args.indices;
  const VoxelMajor<scalar_t, acc_t> fa(args.a, geo, normalize), fb(args.b, geo, normalize);

  // a: gather. d/dxa_p = r_a g_p (xb_hat_q - value_p xa_hat_p), with value_p recomputed here;
  // unnormalised: g_p xb_q. Keeps value_p for b's sums.
  std::vector<acc_t> value(B * N, acc_t(0));
  at::parallel_for(0, B * N, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / N, q = idx[i];
      scalar_t* out = pixel_ptr<scalar_t>(args.grad_a, b, i % N, geo);
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
      scalar_t* out = pixel_ptr<scalar_t>(args.grad_b, j / N, j % N, geo);
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

}  // namespace CPU_CAPABILITY
}  // namespace salign
