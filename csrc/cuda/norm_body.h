// The per-thread code of the dropout_add_norm kernels, __host__ __device__
// like kernel_body.h, whose storage types, loads, keep bits and launch
// conventions it uses: nvcc compiles it into the GPU's kernels and g++ into
// the host driver, which runs every block, round, phase and thread.
//
// A block normalises one row at a time (rows blockIdx.x, + gridDim.x, ...:
// a round each, see has_local). Thread t owns the row's runs of N
// elements (a unit: 8 half/bfloat16, 4 float/double) at run indices t,
// t + 256, ...; a run starting at local element e draws its keep bits
// with philox_keep from e's global index (map_global), so element (r, j)
// has the contract's bit of flat index r * H + j (of the global tensor, for
// a shard: its rows are whole, so a row is consecutive there too). While a
// row has at most R runs per thread they stay in the thread's registers
// between the passes over the row; a longer row is read again from global
// memory (the forward re-reads the h it wrote, each thread its own
// elements, so no barrier is needed for that).
//
// Row sums go through shared memory in a fixed order (fold_partials), so
// the host driver reproduces the GPU's statistics bit for bit: no warp
// shuffles, whose order the host would have to imitate, and no atomics.
// Math is float32 (float64 for double) with one rounding on store; rstd is
// 1 / sqrt(var + eps) with a correctly rounded division and square root on
// both sides, not rsqrtf (within 2 ulp on the GPU, so not the host's).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernel_body.h"

#if defined(__CUDA_ARCH__)
#define DX_UNROLL _Pragma("unroll")
#define DX_NO_UNROLL _Pragma("unroll 1")
#else
#define DX_UNROLL
#define DX_NO_UNROLL
#endif

namespace dropout_ext {
namespace cuda {

// Correctly rounded whatever nvcc's -prec-div and -prec-sqrt say.
DX_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DX_HD double div_rn(double a, double b) { return a / b; }
DX_HD float sqrt_rn(float v) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(v);
#else
  return std::sqrt(v);
#endif
}
DX_HD double sqrt_rn(double v) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(v);
#else
  return std::sqrt(v);
#endif
}

// A run of S values widened to the math type A (zeros past len).
template <typename S, int N, typename A>
DX_HD void load_wide(const S* p, int64_t e0, int len, bool vec, A (&out)[N]) {
  S v[N];
  load_unit(p, e0, len, vec, v);
  DX_UNROLL
  for (int j = 0; j < N; ++j) out[j] = static_cast<A>(Num<S>::load(v[j]));
}

template <typename S, int N, typename A>
DX_HD void store_narrow(void* p, int64_t e0, int len, bool vec, const A (&in)[N]) {
  S v[N];
  DX_UNROLL
  for (int j = 0; j < N; ++j) v[j] = Num<S>::store(static_cast<typename Num<S>::acc>(in[j]));
  store_unit(static_cast<S*>(p), e0, len, vec, v);
}

// A run this kernel stored (the forward's h, read again for a long row):
// plain loads, not load16's read-only path, whose cache need not see the
// kernel's own stores.
template <typename S, int N, typename A>
DX_HD void load_stored(const S* p, int64_t e0, int len, bool vec, A (&out)[N]) {
  S v[N];
  if (vec) {
#if defined(__CUDA_ARCH__)
    DX_UNROLL
    for (int k = 0; k < N * static_cast<int>(sizeof(S)) / 16; ++k) {
      const uint4 w = *reinterpret_cast<const uint4*>(p + e0 + k * Unit<S>::kPer16);
      std::memcpy(reinterpret_cast<char*>(v) + 16 * k, &w, sizeof(w));
    }
#else
    std::memcpy(v, p + e0, sizeof(v));
#endif
  } else {
    DX_UNROLL
    for (int j = 0; j < N; ++j) v[j] = j < len ? p[e0 + j] : S{};
  }
  DX_UNROLL
  for (int j = 0; j < N; ++j) out[j] = static_cast<A>(Num<S>::load(v[j]));
}

// weight and bias: in the input's type T, or float32.
template <typename T, int N, typename A>
DX_HD void load_param(const void* p, bool f32, int64_t c0, int len, bool vec, A (&out)[N]) {
  if (f32) {
    load_wide(static_cast<const float*>(p), c0, len, vec, out);
  } else {
    load_wide(static_cast<const T*>(p), c0, len, vec, out);
  }
}

// A block's sum of one value per thread, in one order wherever it runs:
// each thread parks its value in part[thread]; after a barrier, thread
// i < 16 adds part[16 i .. 16 i + 15] into part2[i] (fold_partials); after
// another, every thread adds part2[0 .. 15] (folded_total).
constexpr int kFanIn = 16;
static_assert(kFanIn * kFanIn == kThreads, "two levels of 16 cover a block");

template <typename A>
DX_HD void fold_partials(const A* part, A* part2, uint32_t t) {
  if (t >= static_cast<uint32_t>(kFanIn)) return;
  A s = A(0);
  DX_UNROLL
  for (int i = 0; i < kFanIn; ++i) s += part[t * kFanIn + i];
  part2[t] = s;
}

template <typename A>
DX_HD A folded_total(const A* part2) {
  A s = A(0);
  DX_UNROLL
  for (int i = 0; i < kFanIn; ++i) s += part2[i];
  return s;
}

// Runs K::run<kPhase, Cached>(params, local, step, run, slot) for thread
// t's runs of a row: Cached is std::true_type when every run of the row
// fits K::R per thread, and slot is then the run's register slot (the loop
// unrolled and run forced inline, so the slots stay registers); else
// std::false_type and slot 0, unused.
template <int kPhase, class K, class Step>
DX_HD void for_thread_runs(const typename K::Params& p, typename K::Local& l, Step& s, uint32_t t) {
  if (p.runs <= static_cast<int64_t>(K::R) * kThreads) {
    DX_UNROLL
    for (int k = 0; k < K::R; ++k) {
      const int64_t u = static_cast<int64_t>(t) + static_cast<int64_t>(k) * kThreads;
      if (u < p.runs) K::template run<kPhase, std::true_type>(p, l, s, u, k);
    }
  } else {
    // Not unrolled: an unrolled runtime loop divides for its trip count.
    DX_NO_UNROLL
    for (int64_t u = t; u < p.runs; u += kThreads) K::template run<kPhase, std::false_type>(p, l, s, u, 0);
  }
}

template <typename T>
struct NormShape {
  using acc_t = typename Num<T>::acc;
  static constexpr int N = Unit<T>::kElems;
  DX_HD static int64_t runs(int64_t H) { return (H + N - 1) / N; }
  DX_HD static int run_len(int64_t H, int64_t c0) { return H - c0 < N ? static_cast<int>(H - c0) : N; }
};

// The lanes of a norm launch: each row's runs over a block's threads.
inline void norm_lanes(LaunchFacts& f, int64_t rows, int64_t runs) {
  const int64_t steps = (runs + kThreads - 1) / kThreads;
  f.lane_slots = rows * steps * kThreads;
  f.busy_slots = rows * runs;
}

inline int64_t param_bytes(const NormArgs& a) { return a.param_f32 ? 4 : dtype_bytes(a.dtype); }

// Rounds of a block: its rows blockIdx.x, + gridDim.x, ... below rows.
DX_HD int64_t norm_rounds(const NormArgs& a, const FastDiv& blocks, const Idx& idx) {
  return static_cast<int64_t>(fast_div(static_cast<uint64_t>(a.rows - idx.block_x + blocks.divisor - 1), blocks));
}

// Forward: h = residual + drop(x * scale) rounded to Hd, stored; mean and
// var from h as stored; y = (h - mean) * rstd * weight + bias rounded to T.
// Phases: 0 h and its partial sum; 1 fold; 2 mean and the partial sum of
// squared deviations; 3 fold; 4 rstd and y.
template <typename T, typename Hd>
struct NormForwardKernel {
  using acc_t = typename Num<T>::acc;
  static_assert(std::is_same<acc_t, typename Num<Hd>::acc>::value, "h and the input share the math type");
  static constexpr int N = NormShape<T>::N;
  // Runs per thread kept in registers: rows up to 8192 float32 or 16-bit
  // elements, 4096 float64.
  static constexpr int R = (sizeof(acc_t) == 8 ? 16 : 32) / N;
  struct Params {
    NormArgs a;
    int64_t runs;  // per row
    FastDiv blocks;
    bool vec;      // every pointer 16-byte aligned and H % N == 0
  };
  struct Shared {
    acc_t part[kThreads];
    acc_t part2[kFanIn];
  };
  struct Local {
    acc_t h[R][N];
    acc_t mean;
  };
  static constexpr int kPhases = 5;
  static constexpr int kBlocksPerSm = kNormBlocksPerSm;

  static bool vec_ok(const NormArgs& a) {
    return a.H % N == 0 && aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) && aligned16(a.bias) &&
           aligned16(a.y) && aligned16(a.h);
  }

  // A row longer than the registers hold reads its h twice more; a thread
  // has one run of x (and the residual) in flight.
  static LaunchFacts facts(const Params& p, Grid2) {
    const NormArgs& a = p.a;
    const int64_t n = a.rows * a.H;
    const bool cached = p.runs <= static_cast<int64_t>(R) * kThreads;
    const int64_t t = sizeof(T), hd = sizeof(Hd), acc = sizeof(acc_t);
    LaunchFacts f;
    f.bytes_read = n * t + (a.residual != nullptr ? n * hd : 0) + (cached ? 0 : 2 * n * hd) +
                   ((a.weight != nullptr) + (a.bias != nullptr)) * a.H * param_bytes(a);
    f.bytes_written = n * (t + hd) + a.rows * acc * (a.mean != nullptr ? 2 : 1);
    f.inflight_bytes_per_thread = N * (t + (a.residual != nullptr ? hd : 0));
    norm_lanes(f, a.rows, p.runs);
    return f;
  }

  DX_HD static int64_t rounds(const Params& p, const Idx& idx) { return norm_rounds(p.a, p.blocks, idx); }

  // h of the run at e0: stores it and returns it as stored, widened.
  DX_HD static void h_run(const NormArgs& a, const MaskParams& mp, acc_t scale, int64_t e0, int len, bool vec,
                          acc_t (&hv)[N]) {
    acc_t x[N];
    load_wide(static_cast<const T*>(a.x), e0, len, vec, x);
    acc_t r[N] = {};
    if (a.residual != nullptr) load_wide(static_cast<const Hd*>(a.residual), e0, len, vec, r);
    const uint32_t keep = philox_keep<N>(mp, map_global(a.map, e0), len);
    Hd out[N];
    DX_UNROLL
    for (int j = 0; j < N; ++j) {
      acc_t v = drop_value(x[j] * scale, (keep >> j) & 1u);
      if (a.residual != nullptr) v = r[j] + v;
      out[j] = Num<Hd>::store(v);
      hv[j] = j < len ? Num<Hd>::load(out[j]) : acc_t(0);
    }
    store_unit(static_cast<Hd*>(a.h), e0, len, vec, out);
  }

  // The run's h: from the registers, or read again from global memory.
  template <typename Cached>
  DX_HD static void h_again(const NormArgs& a, const Local& l, int k, int64_t e0, int len, bool vec,
                            acc_t (&hv)[N]) {
    if constexpr (Cached::value) {
      DX_UNROLL
      for (int j = 0; j < N; ++j) hv[j] = l.h[k][j];
    } else {
      load_stored(static_cast<const Hd*>(a.h), e0, len, vec, hv);
    }
  }

  // What a phase's runs share: the row, the keep-bit parameters, the
  // row's statistics, and the thread's running sum.
  struct Step {
    int64_t e_row = 0;
    MaskParams mp;
    acc_t scale = acc_t(0);
    acc_t mean = acc_t(0);
    acc_t rstd = acc_t(0);
    acc_t sum = acc_t(0);
  };

  // Phase kPhase's work on run u of the row (slot k when Cached).
  template <int kPhase, class Cached>
  DX_HD static void run(const Params& p, Local& l, Step& s, int64_t u, [[maybe_unused]] int k) {
    const NormArgs& a = p.a;
    const int64_t c0 = u * N;
    const int len = NormShape<T>::run_len(a.H, c0);
    const bool vec = p.vec && len == N;
    acc_t hv[N];
    if constexpr (kPhase == 0) {
      h_run(a, s.mp, s.scale, s.e_row + c0, len, vec, hv);
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        if (j < len) s.sum += hv[j];
        if constexpr (Cached::value) l.h[k][j] = hv[j];
      }
    } else if constexpr (kPhase == 2) {
      h_again<Cached>(a, l, k, s.e_row + c0, len, vec, hv);
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        const acc_t d = hv[j] - s.mean;
        if (j < len) s.sum += d * d;
      }
    } else {
      static_assert(kPhase == 4, "runs in phases 0, 2 and 4");
      h_again<Cached>(a, l, k, s.e_row + c0, len, vec, hv);
      acc_t w[N] = {}, b[N] = {};
      if (a.weight != nullptr) load_param<T>(a.weight, a.param_f32, c0, len, vec, w);
      if (a.bias != nullptr) load_param<T>(a.bias, a.param_f32, c0, len, vec, b);
      acc_t y[N];
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        y[j] = (hv[j] - s.mean) * s.rstd;
        if (a.weight != nullptr) y[j] = y[j] * w[j];
        if (a.bias != nullptr) y[j] = y[j] + b[j];
      }
      store_narrow<T>(a.y, s.e_row + c0, len, vec, y);
    }
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const uint32_t t = idx.thread;
    if constexpr (kPhase == 1 || kPhase == 3) {
      fold_partials(sh.part, sh.part2, t);
    } else {
      const int64_t row = static_cast<int64_t>(idx.block_x) + round * static_cast<int64_t>(idx.grid_x);
      Step s;
      s.e_row = row * a.H;
      if constexpr (kPhase == 0) {
        s.mp = state_params(a.state, row == 0 && t == 0);
        s.scale = static_cast<acc_t>(s.mp.scale);
      } else if constexpr (kPhase == 2) {
        // rms: a mean of 0, and h - 0 is h exactly.
        s.mean = a.rms ? acc_t(0) : div_rn(folded_total(sh.part2), static_cast<acc_t>(a.H));
        l.mean = s.mean;
      } else {
        const acc_t var = div_rn(folded_total(sh.part2), static_cast<acc_t>(a.H));
        s.rstd = div_rn(acc_t(1), sqrt_rn(var + static_cast<acc_t>(a.eps)));
        s.mean = l.mean;
        if (t == 0) {
          if (a.mean != nullptr) static_cast<acc_t*>(a.mean)[row] = s.mean;
          static_cast<acc_t*>(a.rstd)[row] = s.rstd;
        }
      }
      for_thread_runs<kPhase, NormForwardKernel>(p, l, s, t);
      if constexpr (kPhase != 4) sh.part[t] = s.sum;
    }
  }
};

// Backward, one pass over the rows: xhat = (h - mean) * rstd, gw = grad *
// weight; dh = (gw - xhat * mean(gw * xhat) - mean(gw)) * rstd + grad_h
// (rms: no mean(gw)); grad_residual = dh rounded to Hd; grad_input =
// drop(dh * scale) rounded to T. Each thread sums grad * xhat and grad per
// column over the block's rows (registers while the row fits, else its own
// columns of the block's partial-sum row), and the block's row of
// partial_w / partial_b gets them; BiasReduceKernel then adds the blocks'
// rows in block order. Phases: 0 the run's terms and their partial sums;
// 1 fold; 2 dh and its stores.
template <typename T, typename Hd>
struct NormBackwardKernel {
  using acc_t = typename Num<T>::acc;
  static_assert(std::is_same<acc_t, typename Num<Hd>::acc>::value, "h and the input share the math type");
  static constexpr int N = NormShape<T>::N;
  // Four values per cached element (xhat, gw and two column sums), within 2
  // blocks' 128 registers unspilled (ptxas, sm_80 and sm_90): rows up to
  // 4096 float32, 2048 16-bit or 1024 float64 elements in registers (two
  // runs of 16-bit or float64 spilled).
  static constexpr int R = sizeof(acc_t) == 8 || N == 8 ? 1 : 16 / N;
  struct Params {
    NormArgs a;
    int64_t runs;
    FastDiv blocks;
    bool vec;  // every pointer 16-byte aligned and H % N == 0
  };
  struct Shared {
    acc_t part[2][kThreads];
    acc_t part2[2][kFanIn];
  };
  struct Local {
    acc_t xhat[R][N];
    acc_t gw[R][N];
    acc_t dw[R][N];
    acc_t db[R][N];
  };
  static constexpr int kPhases = 3;
  static constexpr int kBlocksPerSm = kNormBlocksPerSm;

  static bool vec_ok(const NormArgs& a) {
    return a.H % N == 0 && aligned16(a.grad) && aligned16(a.grad_h) && aligned16(a.saved_h) &&
           aligned16(a.weight) && aligned16(a.grad_input) && aligned16(a.grad_residual);
  }

  // A row longer than the registers hold reads grad and h again in its
  // second pass, and its column sums go to the block's partial rows in
  // global memory row after row (read and written back each row);
  // a cached row's sums stay in registers until the block's last row.
  static LaunchFacts facts(const Params& p, Grid2 grid) {
    const NormArgs& a = p.a;
    const int64_t n = a.rows * a.H;
    const bool cached = p.runs <= static_cast<int64_t>(R) * kThreads;
    const int64_t t = sizeof(T), hd = sizeof(Hd), acc = sizeof(acc_t);
    const int64_t sums = (a.partial_w != nullptr) + (a.partial_b != nullptr);
    LaunchFacts f;
    f.bytes_read = n * (t + hd) + (a.grad_h != nullptr ? n * hd : 0) + (cached ? 0 : n * (t + hd)) +
                   (a.weight != nullptr ? a.H * param_bytes(a) : 0) + a.rows * acc * (a.rms ? 1 : 2) +
                   (cached ? 0 : sums * (a.rows - grid.x) * a.H * acc);
    f.bytes_written = (a.grad_input != nullptr ? n * t : 0) + (a.grad_residual != nullptr ? n * hd : 0) +
                      sums * (cached ? grid.x : a.rows) * a.H * acc;
    f.inflight_bytes_per_thread = N * (t + hd);
    norm_lanes(f, a.rows, p.runs);
    return f;
  }

  DX_HD static int64_t rounds(const Params& p, const Idx& idx) { return norm_rounds(p.a, p.blocks, idx); }

  // grad, xhat and gw of the run at column c0 of the row at e_row.
  DX_HD static void terms(const NormArgs& a, int64_t e_row, int64_t c0, int len, bool vec, acc_t mean, acc_t rstd,
                          acc_t (&g)[N], acc_t (&xh)[N], acc_t (&gw)[N]) {
    load_wide(static_cast<const T*>(a.grad), e_row + c0, len, vec, g);
    acc_t hv[N];
    load_wide(static_cast<const Hd*>(a.saved_h), e_row + c0, len, vec, hv);
    acc_t w[N] = {};
    if (a.weight != nullptr) load_param<T>(a.weight, a.param_f32, c0, len, vec, w);
    DX_UNROLL
    for (int j = 0; j < N; ++j) {
      xh[j] = (hv[j] - mean) * rstd;
      gw[j] = a.weight != nullptr ? g[j] * w[j] : g[j];
    }
  }

  // The block's row in this round and what every phase reads of it.
  struct Row {
    int64_t row;
    int64_t e_row;  // its first element
    acc_t mean;
    acc_t rstd;
    acc_t* pw;  // the block's partial-sum rows, or nullptr
    acc_t* pb;
  };

  DX_HD static Row row_of(const NormArgs& a, const Idx& idx, int64_t round) {
    Row r;
    r.row = static_cast<int64_t>(idx.block_x) + round * static_cast<int64_t>(idx.grid_x);
    r.e_row = r.row * a.H;
    r.rstd = static_cast<const acc_t*>(a.saved_rstd)[r.row];
    r.mean = a.rms ? acc_t(0) : static_cast<const acc_t*>(a.saved_mean)[r.row];
    const int64_t prow = static_cast<int64_t>(idx.block_x) * a.H;
    r.pw = a.partial_w == nullptr ? nullptr : static_cast<acc_t*>(a.partial_w) + prow;
    r.pb = a.partial_b == nullptr ? nullptr : static_cast<acc_t*>(a.partial_b) + prow;
    return r;
  }

  struct Step {
    Row r;
    MaskParams mp;
    acc_t scale = acc_t(0);
    acc_t proj = acc_t(0);     // mean(gw * xhat)
    acc_t mean_gw = acc_t(0);  // mean(gw); 0 for rms, and dh - 0 is dh exactly
    bool first = false;        // the block's first row: the column sums start
    bool last = false;         // its last row: the column sums are stored
    acc_t s1 = acc_t(0);       // the thread's sums of gw * xhat and gw
    acc_t s2 = acc_t(0);
  };

  template <int kPhase, class Cached>
  DX_HD static void run(const Params& p, Local& l, Step& s, int64_t u, [[maybe_unused]] int k) {
    const NormArgs& a = p.a;
    const Row& r = s.r;
    const int64_t c0 = u * N;
    const int len = NormShape<T>::run_len(a.H, c0);
    const bool vec = p.vec && len == N;
    if constexpr (kPhase == 0) {
      acc_t g[N], xh[N], gw[N];
      terms(a, r.e_row, c0, len, vec, r.mean, r.rstd, g, xh, gw);
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        if (j < len) {
          s.s1 += gw[j] * xh[j];
          s.s2 += gw[j];
        }
        if constexpr (Cached::value) {
          l.xhat[k][j] = xh[j];
          l.gw[k][j] = gw[j];
          l.dw[k][j] = (s.first ? acc_t(0) : l.dw[k][j]) + g[j] * xh[j];
          l.db[k][j] = (s.first ? acc_t(0) : l.db[k][j]) + g[j];
        } else if (j < len) {
          if (r.pw != nullptr) r.pw[c0 + j] = (s.first ? acc_t(0) : r.pw[c0 + j]) + g[j] * xh[j];
          if (r.pb != nullptr) r.pb[c0 + j] = (s.first ? acc_t(0) : r.pb[c0 + j]) + g[j];
        }
      }
    } else {
      static_assert(kPhase == 2, "runs in phases 0 and 2");
      acc_t xh[N], gw[N];
      if constexpr (Cached::value) {
        DX_UNROLL
        for (int j = 0; j < N; ++j) {
          xh[j] = l.xhat[k][j];
          gw[j] = l.gw[k][j];
        }
      } else {
        acc_t g[N];
        terms(a, r.e_row, c0, len, vec, r.mean, r.rstd, g, xh, gw);
      }
      acc_t gh[N] = {};
      if (a.grad_h != nullptr) load_wide(static_cast<const Hd*>(a.grad_h), r.e_row + c0, len, vec, gh);
      acc_t dh[N];
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        dh[j] = ((gw[j] - xh[j] * s.proj) - s.mean_gw) * r.rstd;
        if (a.grad_h != nullptr) dh[j] = dh[j] + gh[j];
      }
      if (a.grad_residual != nullptr) store_narrow<Hd>(a.grad_residual, r.e_row + c0, len, vec, dh);
      if (a.grad_input != nullptr) {
        const uint32_t keep = philox_keep<N>(s.mp, map_global(a.map, r.e_row + c0), len);
        acc_t gi[N];
        DX_UNROLL
        for (int j = 0; j < N; ++j) gi[j] = drop_value(dh[j] * s.scale, (keep >> j) & 1u);
        store_narrow<T>(a.grad_input, r.e_row + c0, len, vec, gi);
      }
      if constexpr (Cached::value) {
        if (s.last) {
          DX_UNROLL
          for (int j = 0; j < N; ++j) {
            if (j < len && r.pw != nullptr) r.pw[c0 + j] = l.dw[k][j];
            if (j < len && r.pb != nullptr) r.pb[c0 + j] = l.db[k][j];
          }
        }
      }
    }
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const uint32_t t = idx.thread;
    if constexpr (kPhase == 1) {
      fold_partials(sh.part[0], sh.part2[0], t);
      fold_partials(sh.part[1], sh.part2[1], t);
    } else {
      Step s;
      s.r = row_of(a, idx, round);
      if constexpr (kPhase == 0) {
        s.first = round == 0;
        for_thread_runs<0, NormBackwardKernel>(p, l, s, t);
        sh.part[0][t] = s.s1;
        sh.part[1][t] = s.s2;
      } else {
        static_assert(kPhase == 2, "three phases");
        const acc_t Hf = static_cast<acc_t>(a.H);
        s.proj = div_rn(folded_total(sh.part2[0]), Hf);
        s.mean_gw = a.rms ? acc_t(0) : div_rn(folded_total(sh.part2[1]), Hf);
        s.mp = state_params(a.state, false);
        s.scale = static_cast<acc_t>(s.mp.scale);
        s.last = s.r.row + static_cast<int64_t>(idx.grid_x) >= a.rows;
        for_thread_runs<2, NormBackwardKernel>(p, l, s, t);
      }
    }
  }
};

// The kernels of a norm launch: T the input's type, Hd h's (T, or float
// for 16-bit inputs with residual_in_fp32).
template <typename F>
decltype(auto) dispatch_norm_types(const NormArgs& a, F&& f) {
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    if constexpr (sizeof(T) == 2) {
      if (a.h_dtype == DType::kFloat) return f(T{}, float{});
    }
    return f(T{}, T{});
  });
}

template <class Runner>
bool run_norm_forward(Runner& r, const NormArgs& a, int sm_count) {
  if (a.rows == 0) return true;
  return dispatch_norm_types(a, [&](auto t, auto hd) {
    using K = NormForwardKernel<decltype(t), decltype(hd)>;
    const int64_t blocks = norm_blocks(a.rows, sm_count);
    const typename K::Params p{a, NormShape<decltype(t)>::runs(a.H), make_fast_div(static_cast<uint64_t>(blocks)),
                               K::vec_ok(a)};
    return r.template launch<K>(p, Grid2{blocks, 1});
  });
}

// The backward kernel, then the ordered sums of the partial rows asked for.
template <class Runner>
bool run_norm_backward(Runner& r, const NormArgs& a, int sm_count) {
  if (a.rows == 0 || a.H == 0) return true;
  return dispatch_norm_types(a, [&](auto t, auto hd) {
    using K = NormBackwardKernel<decltype(t), decltype(hd)>;
    using acc_t = typename K::acc_t;
    const int64_t blocks = norm_blocks(a.rows, sm_count);
    const typename K::Params p{a, NormShape<decltype(t)>::runs(a.H), make_fast_div(static_cast<uint64_t>(blocks)),
                               K::vec_ok(a)};
    if (!r.template launch<K>(p, Grid2{blocks, 1})) return false;
    using S = BiasReduceKernel<acc_t>;
    const Grid2 grid{flat_blocks(a.H, sm_count, S::kBlocksPerSm), 1};
    if (a.dweight != nullptr &&
        !r.template launch<S>(typename S::Params{static_cast<const acc_t*>(a.partial_w),
                                                 static_cast<acc_t*>(a.dweight), a.H, blocks},
                              grid)) {
      return false;
    }
    return a.dbias == nullptr ||
           r.template launch<S>(
               typename S::Params{static_cast<const acc_t*>(a.partial_b), static_cast<acc_t*>(a.dbias), a.H, blocks},
               grid);
  });
}

}  // namespace cuda
}  // namespace dropout_ext
