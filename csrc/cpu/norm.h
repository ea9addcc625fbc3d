// The CPU kernels of dropout + residual + LayerNorm/RMSNorm
// (dropout_add_norm) and its backward (the ops are in norm.cpp). They draw
// and apply keep bits as the elementwise kernels do.
//
// One row at a time, each row walked several times while it is in cache:
// h (drawn, rounded once, stored) and its sum, then the squared deviations
// from the mean, then y. The backward recomputes xhat from the stored h and
// the saved statistics, so nothing per element but h is kept.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../philox.h"
#include "elementwise.h"
#include "isa.h"
#include "philox_cpu.h"

namespace dropout_ext {
namespace cpu {

// Row sums in fixed lanes: element k of a row goes to lane k % (2 * kWidth)
// (a row is walked in chunks of kChunk, a multiple of the lanes, zero-padded
// at the end of the row) and the lanes are added in one fixed order, so a
// sum depends on the data alone, not on the build (each keeps the vectors in
// registers of its own width) nor on the thread count. Two accumulators halve
// the chain of dependent adds a row waits for.
template <typename acc_t>
struct LaneSum {
  static constexpr int kWidth = 64 / sizeof(acc_t);
  typedef acc_t Vec __attribute__((vector_size(64)));
  static constexpr int64_t kStep = 2 * kWidth;
  Vec s0 = {};
  Vec s1 = {};

  // Adds v[0, len) and leaves v zero-padded to a whole step. Adding a +0.0
  // pad changes no lane: a lane starts at +0.0 and never holds -0.0.
  DX_INLINE void add(acc_t* v, int64_t len) {
    const int64_t n = (len + kStep - 1) / kStep * kStep;
    for (int64_t j = len; j < n; ++j) v[j] = acc_t(0);
    for (int64_t j = 0; j < n; j += kStep) {
      Vec a, b;
      std::memcpy(&a, v + j, sizeof(Vec));
      std::memcpy(&b, v + j + kWidth, sizeof(Vec));
      s0 += a;
      s1 += b;
    }
  }

  DX_INLINE acc_t total() const {
    const Vec s = s0 + s1;
    acc_t t[kWidth];
    std::memcpy(t, &s, sizeof(Vec));
    for (int w = kWidth / 2; w >= 1; w /= 2) {
      for (int l = 0; l < w; ++l) t[l] += t[l + w];
    }
    return t[0];
  }
};
static_assert(kChunk % LaneSum<float>::kStep == 0 && kChunk % LaneSum<double>::kStep == 0,
              "every chunk of a row but its last must fill whole lane steps");

// h is x's dtype or float32 (residual_in_fp32); weight and bias come in the
// math type, ones and -0.0 where absent (v * 1 and v + -0.0 are v for every
// v, signed zeros and NaN included), so one loop serves every combination.
template <typename scalar_t, typename h_t>
struct NormArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t H = 0;
  MaskParams mp{};
  IndexMap map{};  // where each row draws its keep bits (a shard's global rows)
  acc_t scale = acc_t(1);
  bool layer = true;
  const acc_t* w = nullptr;
  // forward
  const scalar_t* x = nullptr;
  const h_t* res = nullptr;
  const acc_t* b = nullptr;
  acc_t eps = acc_t(0);
  h_t* h_out = nullptr;
  scalar_t* y = nullptr;
  acc_t* mean_out = nullptr;  // layer only
  acc_t* rstd_out = nullptr;
  // backward
  const scalar_t* g = nullptr;
  const h_t* gh = nullptr;
  const h_t* h = nullptr;
  const acc_t* mean = nullptr;  // layer only
  const acc_t* rstd = nullptr;
  scalar_t* dx = nullptr;    // grad_input, where asked for
  h_t* dres = nullptr;       // grad_residual, where asked for
};

// Rows [r0, r1). Element j of row r is the contract's element r * H + j (of
// the global tensor, for a shard), so h is fused_dropout(x, residual)'s
// output bit for bit.
template <typename scalar_t, typename h_t, bool RES>
struct NormForward {
  template <Isa I>
  static DX_INLINE void run(const NormArgs<scalar_t, h_t>* args, int64_t r0, int64_t r1) {
    using acc_t = at::opmath_type<scalar_t>;
    const NormArgs<scalar_t, h_t>& a = *args;
    const int64_t H = a.H;
    const int64_t end = r1 * H;
    const acc_t scale = a.scale;
    alignas(64) uint32_t keep[kChunk];
    alignas(64) acc_t t[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * H;
      const int64_t grow = a.map.global(base);  // a row is consecutive in the global index too
      h_t* __restrict__ hr = a.h_out + base;
      LaneSum<acc_t> sum;
      for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, H - j0);
        const int64_t pos = base + j0;
        prefetch_ahead(a.x, pos, len, end);
        if constexpr (RES) prefetch_ahead(a.res, pos, len, end);
        philox_keep<I>(a.mp, grow + j0, len, keep);
        const scalar_t* __restrict__ x = a.x + pos;
        for (int64_t j = 0; j < len; ++j) {
          acc_t v = select_kept(static_cast<acc_t>(x[j]) * scale, keep[j]);
          if constexpr (RES) v = static_cast<acc_t>(a.res[pos + j]) + v;
          const h_t hv = static_cast<h_t>(v);
          hr[j0 + j] = hv;
          t[j] = static_cast<acc_t>(hv);
        }
        if (a.layer) sum.add(t, len);
      }
      // Two passes over the row: the deviations from the mean, not the
      // moments, so a large offset or a constant row loses nothing.
      const acc_t mean = a.layer ? sum.total() / static_cast<acc_t>(H) : acc_t(0);
      LaneSum<acc_t> sq;
      for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, H - j0);
        for (int64_t j = 0; j < len; ++j) {
          const acc_t d = static_cast<acc_t>(hr[j0 + j]) - mean;
          t[j] = d * d;
        }
        sq.add(t, len);
      }
      const acc_t rstd = acc_t(1) / std::sqrt(sq.total() / static_cast<acc_t>(H) + a.eps);
      if (a.mean_out != nullptr) a.mean_out[r] = mean;
      a.rstd_out[r] = rstd;
      scalar_t* __restrict__ y = a.y + base;
      const acc_t* __restrict__ w = a.w;
      const acc_t* __restrict__ b = a.b;
      for (int64_t j = 0; j < H; ++j) {
        y[j] = static_cast<scalar_t>(((static_cast<acc_t>(hr[j]) - mean) * rstd) * w[j] + b[j]);
      }
    }
  }
};

// Rows [r0, r1): dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + grad_h
// with g = dy * weight (rms: no mean(g) term), then grad_residual = dh and
// grad_input = dropout(dh) with the forward's mask. dw and db, where not
// null, are this row block's partial sums of dy * xhat and dy.
template <typename scalar_t, typename h_t, bool GH>
struct NormBackward {
  template <Isa I>
  static DX_INLINE void run(const NormArgs<scalar_t, h_t>* args, int64_t r0, int64_t r1,
                            at::opmath_type<scalar_t>* dw, at::opmath_type<scalar_t>* db) {
    using acc_t = at::opmath_type<scalar_t>;
    const NormArgs<scalar_t, h_t>& a = *args;
    const int64_t H = a.H;
    const int64_t end = r1 * H;
    const acc_t scale = a.scale;
    const bool dh_wanted = a.dx != nullptr || a.dres != nullptr;
    const acc_t* __restrict__ w = a.w;
    alignas(64) uint32_t keep[kChunk];
    alignas(64) acc_t gs[kChunk];
    alignas(64) acc_t xs[kChunk];
    alignas(64) acc_t t1[kChunk];
    alignas(64) acc_t t2[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * H;
      const int64_t grow = a.map.global(base);  // a row is consecutive in the global index too
      const scalar_t* __restrict__ g = a.g + base;
      const h_t* __restrict__ h = a.h + base;
      const acc_t mean = a.layer ? a.mean[r] : acc_t(0);
      const acc_t rstd = a.rstd[r];
      LaneSum<acc_t> sum_g, sum_gx;
      for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, H - j0);
        prefetch_ahead(a.g, base + j0, len, end);
        prefetch_ahead(a.h, base + j0, len, end);
        for (int64_t j = 0; j < len; ++j) {
          gs[j] = static_cast<acc_t>(g[j0 + j]);
          xs[j] = (static_cast<acc_t>(h[j0 + j]) - mean) * rstd;
        }
        if (dw != nullptr) {
          for (int64_t j = 0; j < len; ++j) dw[j0 + j] += gs[j] * xs[j];
        }
        if (db != nullptr) {
          for (int64_t j = 0; j < len; ++j) db[j0 + j] += gs[j];
        }
        if (!dh_wanted) continue;
        for (int64_t j = 0; j < len; ++j) {
          const acc_t gw = gs[j] * w[j0 + j];
          t1[j] = gw;
          t2[j] = gw * xs[j];
        }
        if (a.layer) sum_g.add(t1, len);
        sum_gx.add(t2, len);
      }
      if (!dh_wanted) continue;
      const acc_t mean_g = a.layer ? sum_g.total() / static_cast<acc_t>(H) : acc_t(0);
      const acc_t proj = sum_gx.total() / static_cast<acc_t>(H);
      for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, H - j0);
        const int64_t pos = base + j0;
        if constexpr (GH) prefetch_ahead(a.gh, pos, len, end);
        for (int64_t j = 0; j < len; ++j) {
          const acc_t xhat = (static_cast<acc_t>(h[j0 + j]) - mean) * rstd;
          const acc_t gw = static_cast<acc_t>(g[j0 + j]) * w[j0 + j];
          acc_t d = ((gw - xhat * proj) - mean_g) * rstd;
          if constexpr (GH) d = d + static_cast<acc_t>(a.gh[pos + j]);
          t1[j] = d;
        }
        if (a.dres != nullptr) {
          h_t* __restrict__ dres = a.dres + pos;
          for (int64_t j = 0; j < len; ++j) dres[j] = static_cast<h_t>(t1[j]);
        }
        if (a.dx != nullptr) {
          philox_keep<I>(a.mp, grow + j0, len, keep);
          scalar_t* __restrict__ dx = a.dx + pos;
          for (int64_t j = 0; j < len; ++j) dx[j] = static_cast<scalar_t>(select_kept(t1[j] * scale, keep[j]));
        }
      }
    }
  }
};

// Every (x dtype, h dtype) the ops call the kernels with, as X(scalar_t, h_t):
// each dtype with h in its own, and float16/bfloat16 with a float32 h
// (residual_in_fp32). Each ISA build instantiates NormForward and
// NormBackward for these (norm_isa.inc).
#define DX_NORM_TYPES(X) \
  X(double, double) X(float, float) X(c10::Half, c10::Half) X(c10::BFloat16, c10::BFloat16) X(c10::Half, float) \
  X(c10::BFloat16, float)

// The entry points the ops call, with the argument types the ISA builds are
// instantiated for.
template <typename scalar_t, typename h_t, bool RES>
void norm_forward(const NormArgs<scalar_t, h_t>& a, int64_t r0, int64_t r1) {
  run_isa<NormForward<scalar_t, h_t, RES>>(&a, r0, r1);
}

template <typename scalar_t, typename h_t, bool GH>
void norm_backward(const NormArgs<scalar_t, h_t>& a, int64_t r0, int64_t r1, at::opmath_type<scalar_t>* dw,
                   at::opmath_type<scalar_t>* db) {
  run_isa<NormBackward<scalar_t, h_t, GH>>(&a, r0, r1, dw, db);
}

}  // namespace cpu
}  // namespace dropout_ext
