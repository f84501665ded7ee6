// Voxels in vector lanes, what the window kernels share: channel-major packs and a running
// (max, argmax) per lane.
//
// A channel-major pack is a buffer x[c][j] (channel c of column j at x + c * stride + j) in the
// accumulation type, one voxel per column: a vector load then reads one channel of VS consecutive
// voxels, so a micro-kernel can put voxels, not channels, in its lanes and needs no horizontal
// reduction. Packing converts the input dtype, normalises each column
//   x_hat_j = x_j / max(||x_j||, 1e-12)
// and flags the columns whose x_hat holds an Inf or NaN (see pixels.h for what they resolve to).
// ||x_j||^2 is one FMA chain per column in ascending channel order, the same chain wherever the
// column sits in a buffer, so a voxel's x_hat does not depend on the kernel or the blocking that
// packed it (a 2D map and the same slice of a volume give the same bits).
//
// A running best per lane keeps, for each lane, the largest value seen and the id of the first
// candidate that gave it: candidates are folded in ascending id and replace the best only when
// strictly greater, so ties keep the lowest id, and NaN (ordered compares are false) never wins.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/pixels.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace salign {
namespace CPU_CAPABILITY {

// Candidate ids as lanes as wide as the accumulation type's, so one compare mask selects both.
template <typename acc_t>
using lane_index_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;

// A zero-initialised buffer whose data start on a 64-byte boundary (aligned vector loads of packed
// rows and columns never straddle a cache line).
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;  // data_ points into raw_
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  void assign(int64_t n, T value) {
    raw_.assign(n + kPad, value);
    const auto address = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((64 - address % 64) % 64) / sizeof(T);
    size_ = n;
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  static constexpr int64_t kPad = 64 / sizeof(T);
  std::vector<T> raw_;
  T* data_ = nullptr;
  int64_t size_ = 0;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------

// dst[k] = src[k] for k < len, converted to acc_t; may also copy k in [len, room) when whole
// vectors are cheaper (the caller guarantees src and dst hold `room` values).
template <typename scalar_t, typename acc_t>
inline void copy_run(const scalar_t* src, acc_t* dst, int64_t len, int64_t room) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // Whole (or masked) vectors: the runs of a partition tile are shorter than the loop a
    // compiler would vectorise.
    using Vec = Vectorized<acc_t>;
    constexpr int64_t VS = Vec::size();
    int64_t k = 0;
    for (; k < len && k + VS <= room; k += VS) Vec::loadu(src + k).store(dst + k);
    if (k < len) Vec::loadu(src + k, len - k).store(dst + k, len - k);
  } else {
    for (int64_t k = 0; k < len; ++k) dst[k] = static_cast<acc_t>(src[k]);
  }
}

// Copies `len` voxels of sample b that are consecutive along w, starting at (z, y, x0), into
// columns 0..len-1 of dst (channel stride dst_stride), converted to acc_t. `room` >= len: the
// voxels the row holds from x0 on and the columns dst may take, both; the copy may write columns
// len..room-1 (with whatever follows the run in the row) when whole vectors are cheaper.
template <typename scalar_t, typename acc_t>
void load_run(const Features& f, int64_t b, int64_t z, int64_t y, int64_t x0, int64_t len, int64_t room,
              int64_t C, acc_t* dst, int64_t dst_stride) {
  const scalar_t* src = static_cast<const scalar_t*>(f.data) + b * f.stride_b + z * f.stride_d + y * f.stride_h +
                        x0 * f.stride_w;
  if (f.stride_w == 1) {  // (B, C, ...) contiguous rows: each channel is a contiguous run
    for (int64_t c = 0; c < C; ++c) copy_run(src + c * f.stride_c, dst + c * dst_stride, len, room);
  } else if (f.stride_c == 1) {  // channels-last: each voxel is a contiguous run
    for (int64_t k = 0; k < len; ++k) {
      const scalar_t* s = src + k * f.stride_w;
      for (int64_t c = 0; c < C; ++c) dst[c * dst_stride + k] = static_cast<acc_t>(s[c]);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < len; ++k) dst[c * dst_stride + k] = static_cast<acc_t>(src[c * f.stride_c + k * f.stride_w]);
    }
  }
}

// Software prefetch of the input a kernel will pack next. A pack reads a row as C runs of W
// values a whole channel plane apart (NCHW) or as one run (channels-last): too many concurrent
// streams for the hardware prefetchers, so while the current rows are being matched, the next
// rows' cache lines are requested into L2. One job is C lines in arithmetic progression (line l
// of every channel's run, or C consecutive lines), issued one per channel step of a micro-kernel,
// so the requests trickle out at the rate memory serves them instead of stalling in a burst.
struct PrefetchJob {
  const char* base;  // line c of the job: base + c * stride
  int64_t stride;
};

class Prefetcher {
 public:
  // Jobs past the queued ones read a line that is already in L1.
  Prefetcher() : idle_{reinterpret_cast<const char*>(&idle_line_), 0} {}

  void clear() {
    jobs_.clear();
    next_ = 0;
  }
  // Queues row (z, y) of sample b of f: W voxels of C channels.
  template <typename scalar_t>
  void add_row(const Features& f, int64_t b, int64_t z, int64_t y, int64_t x0, int64_t W, int64_t C) {
    constexpr int64_t kLine = 64, kSize = sizeof(scalar_t);
    const char* base = reinterpret_cast<const char*>(static_cast<const scalar_t*>(f.data) + b * f.stride_b +
                                                     z * f.stride_d + y * f.stride_h + x0 * f.stride_w);
    if (f.stride_w == 1) {
      const auto first = reinterpret_cast<uintptr_t>(base) & ~uintptr_t(kLine - 1);
      const auto last = reinterpret_cast<uintptr_t>(base + W * kSize - 1) & ~uintptr_t(kLine - 1);
      for (uintptr_t line = first; line <= last; line += kLine) {
        jobs_.push_back({reinterpret_cast<const char*>(line), f.stride_c * kSize});
      }
    } else if (f.stride_c == 1 && f.stride_w == C) {
      const int64_t lines = (W * C * kSize + kLine - 1) / kLine + 1;
      for (int64_t l = 0; l < lines; l += C) jobs_.push_back({base + l * kLine, kLine});
    }
  }
  int64_t pending() const { return static_cast<int64_t>(jobs_.size()) - next_; }
  const PrefetchJob& next() { return next_ < static_cast<int64_t>(jobs_.size()) ? jobs_[next_++] : idle_; }

 private:
  std::vector<PrefetchJob> jobs_;
  int64_t next_ = 0;
  alignas(64) char idle_line_[64] = {};
  PrefetchJob idle_;
};

// Whether column j of x (C channels, channel stride `stride`) holds a non-finite value.
template <typename acc_t>
bool column_not_finite(const acc_t* x, int64_t stride, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(x[c * stride])) return true;
  }
  return false;
}

// U vectors of columns at once: U independent FMA chains hide the FMA latency.
template <typename acc_t, int U>
inline void normalise_vectors(acc_t* x, int64_t stride, int64_t C, bool normalize, uint8_t* bad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t VS = Vec::size();
  Vec sum[U];
  for (int u = 0; u < U; ++u) sum[u] = Vec(acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* row = x + c * stride;
    for (int u = 0; u < U; ++u) {
      const Vec v = Vec::loadu(row + u * VS);
      sum[u] = at::vec::fmadd(v, v, sum[u]);
    }
  }
  // A finite sum of squares means finite columns; a non-finite one is an Inf or NaN, or an
  // overflow of finite values (rare): look at those columns one by one.
  alignas(64) acc_t sums[U * VS];
  for (int u = 0; u < U; ++u) sum[u].store(sums + u * VS);
  bool overflow = false;  // finite columns whose squares overflow (|x| >~ 1.8e19 in float)
  for (int64_t j = 0; j < U * VS; ++j) {
    bad[j] = std::isfinite(sums[j]) ? 0 : column_not_finite(x + j, stride, C);
    overflow |= !std::isfinite(sums[j]) && !bad[j];
  }
  if (!normalize) return;
  constexpr acc_t kEps = acc_t(1e-12);  // the eps of torch.nn.functional.normalize
  Vec scale[U];
  for (int u = 0; u < U; ++u) {
    // NaN stays NaN (maximum propagates it); an Inf norm gives 0 and then NaN at the Inf.
    scale[u] = Vec(acc_t(1)) / at::vec::maximum(sum[u].sqrt(), Vec(kEps));
  }
  alignas(64) acc_t scales[U * VS];
  if (overflow) {  // rare: leave those columns to the scaled norm below
    for (int u = 0; u < U; ++u) scale[u].store(scales + u * VS);
    for (int64_t j = 0; j < U * VS; ++j) {
      if (!std::isfinite(sums[j]) && !bad[j]) scales[j] = acc_t(1);
    }
    for (int u = 0; u < U; ++u) scale[u] = Vec::loadu(scales + u * VS);
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = x + c * stride;
    for (int u = 0; u < U; ++u) (Vec::loadu(row + u * VS) * scale[u]).store(row + u * VS);
  }
  if (overflow) {
    for (int64_t j = 0; j < U * VS; ++j) {
      if (!std::isfinite(sums[j]) && !bad[j]) normalize_overflowing(x + j, stride, C);
    }
  }
}

// Normalises columns 0..n-1 of x in place (n a multiple of VS; columns past the voxels must hold
// zeros, which stay zeros) and sets bad[j] for the columns whose x_hat is not finite.
template <typename acc_t>
void normalise_columns(acc_t* x, int64_t stride, int64_t C, int64_t n, bool normalize, uint8_t* bad) {
  constexpr int64_t VS = Vectorized<acc_t>::size();
  int64_t j = 0;
  for (; j + 4 * VS <= n; j += 4 * VS) normalise_vectors<acc_t, 4>(x + j, stride, C, normalize, bad + j);
  switch ((n - j) / VS) {
    case 3: normalise_vectors<acc_t, 3>(x + j, stride, C, normalize, bad + j); break;
    case 2: normalise_vectors<acc_t, 2>(x + j, stride, C, normalize, bad + j); break;
    case 1: normalise_vectors<acc_t, 1>(x + j, stride, C, normalize, bad + j); break;
    default: break;
  }
}

// v, pinned to a register: a vector several FMAs read is then loaded once, where a compiler may
// otherwise fold the load into each FMA (a memory operand per FMA, one load per FMA: load-bound).
template <typename acc_t>
inline Vectorized<acc_t> in_register(const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  using Raw = std::conditional_t<sizeof(acc_t) == 4, __m512, __m512d>;
#elif defined(CPU_CAPABILITY_AVX2)
  using Raw = std::conditional_t<sizeof(acc_t) == 4, __m256, __m256d>;
#endif
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  Raw raw = v;
  asm("" : "+v"(raw));
  return Vectorized<acc_t>(raw);
#else
  return v;
#endif
}

// ---------------------------------------------------------------------------------------------
// Running best per lane
// ---------------------------------------------------------------------------------------------

// best, index <- value, id in the lanes where value > best (ordered: NaN never replaces).
template <typename acc_t>
inline void fold_greater(const Vectorized<acc_t>& value, const Vectorized<lane_index_t<acc_t>>& id,
                         Vectorized<acc_t>& best, Vectorized<lane_index_t<acc_t>>& index) {
  using idx_t = lane_index_t<acc_t>;
  const Vectorized<acc_t> greater = value > best;
  best = Vectorized<acc_t>::blendv(best, value, greater);
  index = Vectorized<idx_t>::blendv(index, id, at::vec::cast<idx_t>(greater));
}

#if defined(CPU_CAPABILITY_AVX512)
// The generic form turns the compare's mask register into a vector and back (twice), and goes
// through memory to reinterpret the mask for the index lanes; AVX-512 selects with the mask itself.
template <>
inline void fold_greater<float>(const Vectorized<float>& value, const Vectorized<int32_t>& id,
                                Vectorized<float>& best, Vectorized<int32_t>& index) {
  const __mmask16 greater = _mm512_cmp_ps_mask(value, best, _CMP_GT_OQ);
  best = _mm512_mask_mov_ps(best, greater, value);
  index = _mm512_mask_mov_epi32(index, greater, id);
}

template <>
inline void fold_greater<double>(const Vectorized<double>& value, const Vectorized<int64_t>& id,
                                 Vectorized<double>& best, Vectorized<int64_t>& index) {
  const __mmask8 greater = _mm512_cmp_pd_mask(value, best, _CMP_GT_OQ);
  best = _mm512_mask_mov_pd(best, greater, value);
  index = _mm512_mask_mov_epi64(index, greater, id);
}
#elif defined(CPU_CAPABILITY_AVX2)
// One compare mask selects the values and, reinterpreted in place, the index lanes.
template <>
inline void fold_greater<float>(const Vectorized<float>& value, const Vectorized<int32_t>& id,
                                Vectorized<float>& best, Vectorized<int32_t>& index) {
  const __m256 greater = _mm256_cmp_ps(value, best, _CMP_GT_OQ);
  best = _mm256_blendv_ps(best, value, greater);
  index = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(index), _mm256_castsi256_ps(id), greater));
}

template <>
inline void fold_greater<double>(const Vectorized<double>& value, const Vectorized<int64_t>& id,
                                 Vectorized<double>& best, Vectorized<int64_t>& index) {
  const __m256d greater = _mm256_cmp_pd(value, best, _CMP_GT_OQ);
  best = _mm256_blendv_pd(best, value, greater);
  index = _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(index), _mm256_castsi256_pd(id), greater));
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace salign
