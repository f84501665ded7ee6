// Loading and normalising voxels, and resolving a query once its best candidate is known: what
// every kernel shares. Compiled once per CPU capability (see variant.h).
//
// Notation: features x[b][c][d][h][w] in any memory layout (read through their strides), voxels
// p = (d * H + h) * W + w, N = D * H * W (2D maps: D = 1). With normalisation
// x_hat_p = x_p / max(||x_p||, 1e-12), the formula of torch.nn.functional.normalize, else
// x_hat_p = x_p; the similarity is s(p, q) = <xa_hat_p, xb_hat_q>. Every kernel normalises while it
// packs float copies of the voxels it reads, so normalisation costs no pass of its own.
//
// Non-finite input: with normalisation a voxel holding an Inf or NaN has a NaN similarity with
// every voxel (normalising such a vector gives NaN). The fast paths leave such voxels out and each
// query is resolved afterwards, as torch.max does: a NaN query takes its first candidate, otherwise
// the first non-finite candidate, with value NaN. Without normalisation raw products follow IEEE
// (finish_query_raw). Finite voxels whose squares overflow are normalised through a power-of-two
// scale (normalize_overflowing), so huge features still give cosines.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"

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

// The offset of the first element (channel 0) of flat voxel p = (d * H + h) * W + w of sample b.
template <typename F>
inline int64_t voxel_offset(const F& f, int64_t b, int64_t p, const Geometry& geo) {
  const int64_t w = p % geo.W, dh = p / geo.W;
  return b * f.stride_b + (dh / geo.H) * f.stride_d + (dh % geo.H) * f.stride_h + w * f.stride_w;
}

template <typename scalar_t>
inline const scalar_t* pixel_ptr(const Features& f, int64_t b, int64_t p, const Geometry& geo) {
  return static_cast<const scalar_t*>(f.data) + voxel_offset(f, b, p, geo);
}

template <typename scalar_t>
inline scalar_t* pixel_ptr(const FeatureGrad& f, int64_t b, int64_t p, const Geometry& geo) {
  return static_cast<scalar_t*>(f.data) + voxel_offset(f, b, p, geo);
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

// x_hat in place for finite C values (stride apart) whose sum of squares overflows: scaled first by
// the power of two that brings the largest near 1 (exact), so the norm is computed without overflow.
// Returns 1 / ||x||, the normalisation's scale. Such a norm is far above eps: no clamp.
template <typename acc_t>
acc_t normalize_overflowing(acc_t* x, int64_t stride, int64_t C) {
  acc_t largest = 0;
  for (int64_t k = 0; k < C; ++k) largest = std::max(largest, std::abs(x[k * stride]));
  const int exponent = std::ilogb(largest);
  acc_t sum = 0;
  for (int64_t k = 0; k < C; ++k) {
    const acc_t v = std::ldexp(x[k * stride], -exponent);
    sum += v * v;
  }
  const acc_t scaled_norm = std::sqrt(sum);
  for (int64_t k = 0; k < C; ++k) x[k * stride] = std::ldexp(x[k * stride], -exponent) / scaled_norm;
  return std::ldexp(acc_t(1) / scaled_norm, -exponent);
}

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
    if (!std::isfinite(norm) && all_finite(dst, C)) {
      out.scale = normalize_overflowing(dst, 1, C);  // squares beyond the range: |x| >~ 1.8e19 in float
    } else {
      out.clamped = norm < kEps;
      out.scale = acc_t(1) / (out.clamped ? kEps : norm);  // NaN stays NaN; Inf gives 0, then NaN below
      for (int64_t k = 0; k < C; ++k) dst[k] *= out.scale;
    }
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
  const uint8_t* bad;     // per position: the candidate is non-finite (read without normalisation)
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

// Without normalisation a non-finite feature is no reason for NaN: raw products follow IEEE (+inf
// times a positive value is +inf, times 0 NaN), and the answer is torch.max's over them. The vector
// paths leave non-finite voxels out; this settles a query that has any: its similarities with them
// (all its candidates when the query itself is non-finite) are computed here as the vector paths
// compute every similarity, one fused multiply-add chain over ascending channels, and folded into
// the vector path's best: the first NaN wins, else the largest, the lowest position on ties; every
// candidate at -inf gives the first.
// Whether every channel of voxel q of sample b is finite.
template <typename scalar_t>
bool voxel_finite(const Features& f, int64_t b, int64_t q, const Geometry& geo) {
  const scalar_t* x = pixel_ptr<scalar_t>(f, b, q, geo);
  for (int64_t c = 0; c < geo.C; ++c) {
    if (!std::isfinite(static_cast<double>(x[c * f.stride_c]))) return false;
  }
  return true;
}

template <typename scalar_t, typename acc_t>
acc_t raw_similarity(const Features& fa, const Features& fb, int64_t b, int64_t p, int64_t q, const Geometry& geo) {
  const scalar_t* x = pixel_ptr<scalar_t>(fa, b, p, geo);
  const scalar_t* y = pixel_ptr<scalar_t>(fb, b, q, geo);
  acc_t s = 0;
  for (int64_t c = 0; c < geo.C; ++c) {
    s = std::fma(static_cast<acc_t>(x[c * fa.stride_c]), static_cast<acc_t>(y[c * fb.stride_c]), s);
  }
  return s;
}

template <typename scalar_t, typename acc_t>
void finish_query_raw(const Features& fa, const Features& fb, int64_t b, int64_t p, const Geometry& geo, acc_t best,
                      int64_t best_pos, bool query_bad, const Candidates& cand, acc_t& value, int64_t& index) {
  if (cand.count == 0) {
    value = 0;
    index = -1;
    return;
  }
  if (query_bad) best_pos = -1;
  int64_t nan_pos = -1;
  for (int64_t j = 0; j < cand.count && nan_pos < 0; ++j) {
    if (!query_bad && !cand.bad[j]) continue;
    const acc_t s = raw_similarity<scalar_t, acc_t>(fa, fb, b, p, cand.index[j], geo);
    if (std::isnan(s)) {
      nan_pos = j;  // positions ascend: the first NaN
    } else if (best_pos < 0 ? s > kNegInf<acc_t> : (s > best || (s == best && j < best_pos))) {
      best = s;
      best_pos = j;
    }
  }
  if (nan_pos >= 0) {
    value = kNaN<acc_t>;
    index = cand.index[nan_pos];
  } else if (best_pos < 0) {
    value = kNegInf<acc_t>;
    index = cand.index[0];
  } else {
    value = best;
    index = cand.index[best_pos];
  }
}

// ---------------------------------------------------------------------------------------------
// Normalised, voxel-major float copies of a whole map
// ---------------------------------------------------------------------------------------------

// Gathers at arbitrary voxels then read C contiguous values instead of C values a whole map apart.
template <typename scalar_t, typename acc_t>
struct VoxelMajor {
  std::vector<acc_t> x;        // (B * N, C): x_hat
  std::vector<acc_t> scale;    // (B * N): 1 / max(||x||, eps), or 1
  std::vector<uint8_t> clamped;
  std::vector<uint8_t> bad;    // x_hat holds an Inf or NaN
  int64_t channels;

  VoxelMajor(const Features& f, const Geometry& geo, bool normalize)
      : x(geo.B * geo.voxels() * geo.C), scale(geo.B * geo.voxels()), clamped(geo.B * geo.voxels()),
        bad(geo.B * geo.voxels()), channels(geo.C) {
    const int64_t N = geo.voxels(), C = geo.C;
    at::parallel_for(0, geo.B * N, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const auto loaded = load_pixel(pixel_ptr<scalar_t>(f, i / N, i % N, geo), f.stride_c, C, normalize,
                                       x.data() + i * C);
        scale[i] = loaded.scale;
        clamped[i] = loaded.clamped;
        bad[i] = !loaded.finite;
      }
    });
  }
  const acc_t* row(int64_t i) const { return x.data() + i * channels; }
};

}  // namespace CPU_CAPABILITY
}  // namespace salign
