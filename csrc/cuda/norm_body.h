// The per-thread code of the dropout_add_norm kernels, __host__ __device__
// like kernel_body.h, whose storage types, loads, keep bits and launch
// conventions it uses: nvcc compiles it into the GPU's kernels and g++ into
// the host driver, which runs every block, round, phase and thread.
//
// plan_norm (kernel_args.h) splits a row over 2**shift threads (a warp to
// the whole block) and a block takes 256 >> shift rows at a time (a round
// each, see has_local): rows (blockIdx.x + round * gridDim.x) * (256 >>
// shift) + thread >> shift. A row's thread owns its runs of N elements (a
// unit: 8 half/bfloat16, 4 float/double) at run indices lane, lane +
// 2**shift, ...; a run starting at local element e draws its keep bits with
// philox_keep from e's global index (map_global), so element (r, j) has the
// contract's bit of flat index r * H + j (of the global tensor, for a
// shard: its rows are whole, so a row is consecutive there too). While a
// row has at most R runs per thread they stay in the thread's registers
// between the passes over the row, loaded together before any is used; a
// longer row is read again from global memory (the forward re-reads the h
// it wrote, each thread its own elements, so no barrier is needed for that).
//
// Row sums go through shared memory in a fixed order (fold_partials,
// row_total), so the host driver reproduces the GPU's statistics bit for
// bit: no warp shuffles, whose order the host would have to imitate, and no
// atomics. Math is float32 (float64 for double) with one rounding on store;
// rstd is 1 / sqrt(var + eps) with a correctly rounded division and square
// root on both sides, not rsqrtf (within 2 ulp on the GPU, so not the host's).
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

// A row's sum of one value per thread, in one order wherever it runs: each
// thread parks its value in part[thread]; after a barrier, thread i < 16
// adds part[16 i .. 16 i + 15] into part2[i] (fold_partials); after
// another, every thread of a row adds the row's entries of part2 in order
// (row_total). A row's threads are whole warps from a multiple of 32, so a
// chunk of 16 never spans two rows.
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
DX_HD A row_total(const A* part2, uint32_t group, int shift) {
  const int chunks = (1 << shift) / kFanIn;
  A s = A(0);
  DX_UNROLL
  for (int i = 0; i < kFanIn; ++i) {
    if (i < chunks) s += part2[static_cast<int>(group) * chunks + i];
  }
  return s;
}

// A row's runs and their registers as a thread keeps them: S values in
// 32-bit words, so 16-bit values stay packed two to a register.
template <typename S, int N>
struct Packed {
  static_assert(N * sizeof(S) % 4 == 0, "whole words");
  uint32_t w[N * sizeof(S) / 4];
};

template <typename S, int N>
DX_HD void pack(const S (&v)[N], Packed<S, N>& out) {
  std::memcpy(out.w, v, sizeof(v));
}

template <typename S, int N, typename A>
DX_HD void unpack_wide(const Packed<S, N>& in, A (&out)[N]) {
  S v[N];
  std::memcpy(v, in.w, sizeof(v));
  DX_UNROLL
  for (int j = 0; j < N; ++j) out[j] = static_cast<A>(Num<S>::load(v[j]));
}

// Which row a thread works on in a round, and where in it: the block's
// rows (blockIdx.x + round * gridDim.x) * (256 >> shift) + group, group =
// thread >> shift, each split over its 2**shift threads by lane.
struct RowSlot {
  int64_t row;
  uint32_t lane;
  uint32_t group;
  bool live;  // row < rows: the block's last step of rows may be short
  bool last;  // the block's last round
};

DX_HD RowSlot row_slot(int64_t rows, int64_t groups, int shift, const Idx& idx, int64_t round) {
  RowSlot s;
  s.lane = idx.thread & ((1u << shift) - 1u);
  s.group = idx.thread >> shift;
  const int64_t step = static_cast<int64_t>(idx.block_x) + round * static_cast<int64_t>(idx.grid_x);
  s.row = step * (kThreads >> shift) + s.group;
  s.live = s.row < rows;
  s.last = step + static_cast<int64_t>(idx.grid_x) >= groups;
  return s;
}

// Calls f(u, k, cached) for a thread's runs u = lane, lane + 2**shift, ...
// of a row: cached is std::true_type when the row fits R runs per thread,
// and k is then the run's register slot (the loop unrolled, so the slots
// stay registers); else std::false_type and k 0, unused.
template <int R, class F>
DX_HD void each_run(int64_t runs, int shift, bool cached, uint32_t lane, F&& f) {
  if (cached) {
    DX_UNROLL
    for (int k = 0; k < R; ++k) {
      const int64_t u = static_cast<int64_t>(lane) + (static_cast<int64_t>(k) << shift);
      if (u < runs) f(u, k, std::true_type{});
    }
  } else {
    // Not unrolled: an unrolled runtime loop divides for its trip count.
    DX_NO_UNROLL
    for (int64_t u = lane; u < runs; u += static_cast<int64_t>(1) << shift) f(u, 0, std::false_type{});
  }
}

template <typename T>
struct NormShape {
  using acc_t = typename Num<T>::acc;
  static constexpr int N = Unit<T>::kElems;
  DX_HD static int64_t runs(int64_t H) { return (H + N - 1) / N; }
  DX_HD static int run_len(int64_t H, int64_t c0) { return H - c0 < N ? static_cast<int>(H - c0) : N; }
};

// What both kernels take: the plan (plan_norm) and the row's geometry.
struct NormParams {
  NormArgs a;
  int64_t runs;  // per row
  int shift;     // log2 threads per row
  bool cached;
  int64_t groups;
  FastDiv blocks;
  bool vec;  // every pointer 16-byte aligned and H % N == 0
};

// Column c0's run: its length and whether it takes 16-byte accesses.
struct RunAt {
  int64_t c0;
  int len;
  bool vec;
};

template <typename T>
DX_HD RunAt run_at(const NormParams& p, int64_t u) {
  RunAt r;
  r.c0 = u * NormShape<T>::N;
  r.len = NormShape<T>::run_len(p.a.H, r.c0);
  r.vec = p.vec && r.len == NormShape<T>::N;
  return r;
}

// The lanes of a norm launch: each step of rows is 256 threads, each
// row's runs over its threads (a cached row's every run at once, a longer
// row's a block's width at a time).
inline void norm_lanes(LaunchFacts& f, const NormParams& p) {
  const int64_t per_row = int64_t{1} << p.shift;
  const int64_t steps = (p.runs + per_row - 1) / per_row;
  f.lane_slots = p.groups * kThreads * steps;
  f.busy_slots = p.a.rows * p.runs;
}

// What one thread asks for before it first waits: a cached row's runs are
// loaded together.
inline int64_t norm_inflight(const NormParams& p, int64_t bytes_per_run) {
  const int64_t per_row = int64_t{1} << p.shift;
  return (p.cached ? (p.runs + per_row - 1) / per_row : 1) * bytes_per_run;
}

inline int64_t param_bytes(const NormArgs& a) { return a.param_f32 ? 4 : dtype_bytes(a.dtype); }

// Rounds of a block: its steps of rows blockIdx.x, + gridDim.x, ... below groups.
DX_HD int64_t norm_rounds(const NormParams& p, const Idx& idx) {
  return static_cast<int64_t>(
      fast_div(static_cast<uint64_t>(p.groups - idx.block_x + p.blocks.divisor - 1), p.blocks));
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
  static constexpr int R = norm_forward_runs(Num<T>::kDType);
  // Its own type, so each kernel's entry names its kernel.
  struct Params : NormParams {};
  struct Shared {
    acc_t part[kThreads];
    acc_t part2[kFanIn];
  };
  struct Local {
    Packed<Hd, N> h[R];
    acc_t mean;
  };
  static constexpr int kPhases = 5;
  static constexpr int kBlocksPerSm = norm_forward_blocks_per_sm(Num<T>::kDType, Num<Hd>::kDType);

  static bool vec_ok(const NormArgs& a) {
    return a.H % N == 0 && aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) && aligned16(a.bias) &&
           aligned16(a.y) && aligned16(a.h);
  }

  // A row longer than the registers hold reads its h twice more.
  static LaunchFacts facts(const Params& p, Grid2) {
    const NormArgs& a = p.a;
    const int64_t n = a.rows * a.H;
    const int64_t t = sizeof(T), hd = sizeof(Hd), acc = sizeof(acc_t);
    const int64_t res = a.residual != nullptr ? hd : 0;
    LaunchFacts f;
    f.bytes_read = n * (t + res) + (p.cached ? 0 : 2 * n * hd) +
                   ((a.weight != nullptr) + (a.bias != nullptr)) * a.H * param_bytes(a);
    f.bytes_written = n * (t + hd) + a.rows * acc * (a.mean != nullptr ? 2 : 1);
    f.inflight_bytes_per_thread = norm_inflight(p, N * (t + res));
    norm_lanes(f, p);
    return f;
  }

  DX_HD static int64_t rounds(const Params& p, const Idx& idx) { return norm_rounds(p, idx); }

  // The run at element e0 of row `row`: a tensor whose rows lie apart has
  // it that much further on, (stride - H) elements a row.
  DX_HD static void load_inputs(const NormArgs& a, int64_t row, int64_t e0, const RunAt& r, T (&x)[N],
                                Hd (&res)[N]) {
    const int64_t xe = a.x_rows == 0 ? e0 : e0 + row * (a.x_rows - a.H);
    load_unit(static_cast<const T*>(a.x), xe, r.len, r.vec, x);
    if (a.residual != nullptr) {
      const int64_t re = a.residual_rows == 0 ? e0 : e0 + row * (a.residual_rows - a.H);
      load_unit(static_cast<const Hd*>(a.residual), re, r.len, r.vec, res);
    }
  }

  // h of the run at e0 from its inputs: stores it and returns it as stored.
  DX_HD static void make_h(const NormArgs& a, const MaskParams& mp, acc_t scale, int64_t e0, const RunAt& r,
                           const T (&xs)[N], const Hd (&rs)[N], Hd (&out)[N]) {
    const uint32_t keep = philox_keep<N>(mp, map_global(a.map, e0), r.len);
    DX_UNROLL
    for (int j = 0; j < N; ++j) {
      acc_t v = drop_value(static_cast<acc_t>(Num<T>::load(xs[j])) * scale, (keep >> j) & 1u);
      if (a.residual != nullptr) v = static_cast<acc_t>(Num<Hd>::load(rs[j])) + v;
      out[j] = j < r.len ? Num<Hd>::store(v) : Hd{};
    }
    store_unit(static_cast<Hd*>(a.h), e0, r.len, r.vec, out);
  }

  // The run's h: from the registers, or read again from global memory.
  template <class Cached>
  DX_HD static void h_again(const NormArgs& a, const Local& l, int k, int64_t e0, const RunAt& r,
                            acc_t (&hv)[N]) {
    if constexpr (Cached::value) {
      unpack_wide(l.h[k], hv);
    } else {
      load_stored(static_cast<const Hd*>(a.h), e0, r.len, r.vec, hv);
    }
  }

  // Phase 0 of a row: every cached run's x and residual are loaded before
  // the first Philox draw, so the loads are in flight together.
  DX_HD static acc_t h_phase(const Params& p, Local& l, const RowSlot& rs, int64_t e_row) {
    const NormArgs& a = p.a;
    const MaskParams mp = state_params(a.state, rs.row == 0 && rs.lane == 0);
    const acc_t scale = static_cast<acc_t>(mp.scale);
    acc_t sum = acc_t(0);
    auto add = [&](const RunAt& r, const Hd (&out)[N]) {
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        if (j < r.len) sum += static_cast<acc_t>(Num<Hd>::load(out[j]));
      }
    };
    if (p.cached) {
      T xs[R][N] = {};
      Hd rsd[R][N] = {};
      each_run<R>(p.runs, p.shift, true, rs.lane, [&](int64_t u, int k, auto) {
        load_inputs(a, rs.row, e_row + u * N, run_at<T>(p, u), xs[k], rsd[k]);
      });
      each_run<R>(p.runs, p.shift, true, rs.lane, [&](int64_t u, int k, auto) {
        const RunAt r = run_at<T>(p, u);
        Hd out[N];
        make_h(a, mp, scale, e_row + r.c0, r, xs[k], rsd[k], out);
        pack(out, l.h[k]);
        add(r, out);
      });
    } else {
      each_run<R>(p.runs, p.shift, false, rs.lane, [&](int64_t u, int, auto) {
        const RunAt r = run_at<T>(p, u);
        T xs[N] = {};
        Hd rsd[N] = {};
        load_inputs(a, rs.row, e_row + r.c0, r, xs, rsd);
        Hd out[N];
        make_h(a, mp, scale, e_row + r.c0, r, xs, rsd, out);
        add(r, out);
      });
    }
    return sum;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const uint32_t t = idx.thread;
    if constexpr (kPhase == 1 || kPhase == 3) {
      fold_partials(sh.part, sh.part2, t);
    } else {
      const RowSlot rs = row_slot(a.rows, p.groups, p.shift, idx, round);
      acc_t sum = acc_t(0);
      if (rs.live) {
        const int64_t e_row = rs.row * a.H;
        if constexpr (kPhase == 0) {
          sum = h_phase(p, l, rs, e_row);
        } else if constexpr (kPhase == 2) {
          // rms: a mean of 0, and h - 0 is h exactly.
          const acc_t mean =
              a.rms ? acc_t(0) : div_rn(row_total(sh.part2, rs.group, p.shift), static_cast<acc_t>(a.H));
          l.mean = mean;
          each_run<R>(p.runs, p.shift, p.cached, rs.lane, [&](int64_t u, int k, auto cached) {
            const RunAt r = run_at<T>(p, u);
            acc_t hv[N];
            h_again<decltype(cached)>(a, l, k, e_row + r.c0, r, hv);
            DX_UNROLL
            for (int j = 0; j < N; ++j) {
              const acc_t d = hv[j] - mean;
              if (j < r.len) sum += d * d;
            }
          });
        } else {
          static_assert(kPhase == 4, "five phases");
          const acc_t var = div_rn(row_total(sh.part2, rs.group, p.shift), static_cast<acc_t>(a.H));
          const acc_t rstd = div_rn(acc_t(1), sqrt_rn(var + static_cast<acc_t>(a.eps)));
          const acc_t mean = l.mean;
          if (rs.lane == 0) {
            if (a.mean != nullptr) static_cast<acc_t*>(a.mean)[rs.row] = mean;
            static_cast<acc_t*>(a.rstd)[rs.row] = rstd;
          }
          each_run<R>(p.runs, p.shift, p.cached, rs.lane, [&](int64_t u, int k, auto cached) {
            const RunAt r = run_at<T>(p, u);
            acc_t hv[N];
            h_again<decltype(cached)>(a, l, k, e_row + r.c0, r, hv);
            acc_t w[N] = {}, b[N] = {};
            if (a.weight != nullptr) load_param<T>(a.weight, a.param_f32, r.c0, r.len, r.vec, w);
            if (a.bias != nullptr) load_param<T>(a.bias, a.param_f32, r.c0, r.len, r.vec, b);
            acc_t y[N];
            DX_UNROLL
            for (int j = 0; j < N; ++j) {
              y[j] = (hv[j] - mean) * rstd;
              if (a.weight != nullptr) y[j] = y[j] * w[j];
              if (a.bias != nullptr) y[j] = y[j] + b[j];
            }
            store_narrow<T>(a.y, e_row + r.c0, r.len, r.vec, y);
          });
        }
      }
      if constexpr (kPhase != 4) sh.part[t] = sum;
    }
  }
};

// Backward, one pass over the rows: xhat = (h - mean) * rstd, gw = grad *
// weight; dh = (gw - xhat * mean(gw * xhat) - mean(gw)) * rstd + grad_h
// (rms: no mean(gw)); grad_residual = dh rounded to Hd; grad_input =
// drop(dh * scale) rounded to T. Each thread sums grad * xhat and grad per
// column over its rows of the block: in registers while the row is cached,
// and at the block's last round the block's rows' sums are added in row
// order within the block (the first rows' threads take the others' through
// shared memory) into the block's row of partial_w / partial_b; a longer
// row's threads add into that row in global memory row after row.
// BiasReduceKernel then adds the blocks' rows in block order. Phases: 0 the
// row's grad and h (a cached row's every run loaded together; the
// short-row kernel of 16-bit grad and h loads the block's next round's row
// too, kAhead), its terms and their partial sums; 1 fold; 2 dh and its
// stores (the last round: the column sums parked); 3 the last round: the
// block's column sums stored.
template <typename T, typename Hd, bool kLong>
struct NormBackwardKernel {
  using acc_t = typename Num<T>::acc;
  static_assert(std::is_same<acc_t, typename Num<Hd>::acc>::value, "h and the input share the math type");
  static constexpr int N = NormShape<T>::N;
  static constexpr int R = norm_backward_runs(Num<T>::kDType, kLong);
  // The long-row kernel has a row per block (256 threads), nothing to park.
  static constexpr int kParked = kLong ? 1 : R * N;
  static constexpr int kParkers = kThreads - 32;
  // A 16-bit row's cached runs are too few bytes to cover the memory
  // latency at a block per SM, so its threads load the next round's row
  // while they reduce this one: two rows in flight, in registers the block
  // per SM leaves free. float32 and float64 rows have the bytes in flight
  // without it; a float h beside 16-bit grad keeps one row.
  static constexpr bool kAhead = !kLong && sizeof(T) == 2 && std::is_same<T, Hd>::value;
  // Its own type, so each kernel's entry names its kernel.
  struct Params : NormParams {};
  struct Shared {
    acc_t part[2][kThreads];
    acc_t part2[2][kFanIn];
    acc_t park_w[kParked * kParkers];  // [slot][thread - threads per row]
    acc_t park_b[kParked * kParkers];
  };
  struct Local {
    Packed<T, N> g[R];
    Packed<Hd, N> h[R];
    Packed<T, N> next_g[kAhead ? R : 1];  // kAhead: the next round's row, loaded a round early
    Packed<Hd, N> next_h[kAhead ? R : 1];
    acc_t dw[R][N];
    acc_t db[R][N];
  };
  static constexpr int kPhases = 4;
  static constexpr int kBlocksPerSm = kNormBackwardBlocksPerSm;

  static bool vec_ok(const NormArgs& a) {
    return a.H % N == 0 && aligned16(a.grad) && aligned16(a.grad_h) && aligned16(a.saved_h) &&
           aligned16(a.weight) && aligned16(a.grad_input) && aligned16(a.grad_residual);
  }

  // A row longer than the registers hold reads grad and h again in its
  // second pass, and its column sums go to the block's partial rows in
  // global memory row after row (read and written back each row); a
  // cached row's sums are written once per block.
  static LaunchFacts facts(const Params& p, Grid2 grid) {
    const NormArgs& a = p.a;
    const int64_t n = a.rows * a.H;
    const int64_t t = sizeof(T), hd = sizeof(Hd), acc = sizeof(acc_t);
    const int64_t sums = (a.partial_w != nullptr) + (a.partial_b != nullptr);
    LaunchFacts f;
    f.bytes_read = n * (t + hd) + (a.grad_h != nullptr ? n * hd : 0) + (p.cached ? 0 : n * (t + hd)) +
                   (a.weight != nullptr ? a.H * param_bytes(a) : 0) + a.rows * acc * (a.rms ? 1 : 2) +
                   (p.cached ? 0 : sums * (a.rows - grid.x) * a.H * acc);
    f.bytes_written = (a.grad_input != nullptr ? n * t : 0) + (a.grad_residual != nullptr ? n * hd : 0) +
                      sums * (p.cached ? grid.x : a.rows) * a.H * acc;
    // A block of more than one round has the next row's loads in flight beside this one's.
    const int64_t rows_in_flight = kAhead && p.cached && p.groups > grid.x ? 2 : 1;
    f.inflight_bytes_per_thread = rows_in_flight * norm_inflight(p, N * (t + hd));
    norm_lanes(f, p);
    return f;
  }

  DX_HD static int64_t rounds(const Params& p, const Idx& idx) { return norm_rounds(p, idx); }

  // xhat and gw of a run from its grad and h.
  DX_HD static void terms(const NormArgs& a, const RunAt& r, acc_t mean, acc_t rstd, const acc_t (&g)[N],
                          const acc_t (&hv)[N], acc_t (&xh)[N], acc_t (&gw)[N]) {
    acc_t w[N] = {};
    if (a.weight != nullptr) load_param<T>(a.weight, a.param_f32, r.c0, r.len, r.vec, w);
    DX_UNROLL
    for (int j = 0; j < N; ++j) {
      xh[j] = (hv[j] - mean) * rstd;
      gw[j] = a.weight != nullptr ? g[j] * w[j] : g[j];
    }
  }

  // A run's grad and h, widened: from the registers, or read from global memory.
  template <class Cached>
  DX_HD static void inputs(const NormArgs& a, const Local& l, int k, int64_t e0, const RunAt& r, acc_t (&g)[N],
                           acc_t (&hv)[N]) {
    if constexpr (Cached::value) {
      unpack_wide(l.g[k], g);
      unpack_wide(l.h[k], hv);
    } else {
      load_wide(static_cast<const T*>(a.grad), e0, r.len, r.vec, g);
      load_wide(static_cast<const Hd*>(a.saved_h), e0, r.len, r.vec, hv);
    }
  }

  // The thread's row in this round and what every phase reads of it.
  struct Row {
    RowSlot s;
    int64_t e_row;  // its first element
    acc_t mean;
    acc_t rstd;
  };

  DX_HD static Row row_of(const Params& p, const Idx& idx, int64_t round) {
    const NormArgs& a = p.a;
    Row r;
    r.s = row_slot(a.rows, p.groups, p.shift, idx, round);
    r.e_row = r.s.row * a.H;
    r.mean = acc_t(0);
    r.rstd = acc_t(0);
    if (r.s.live) {
      r.rstd = static_cast<const acc_t*>(a.saved_rstd)[r.s.row];
      r.mean = a.rms ? acc_t(0) : static_cast<const acc_t*>(a.saved_mean)[r.s.row];
    }
    return r;
  }

  DX_HD static acc_t* partial_row(void* partial, const Idx& idx, int64_t H) {
    return partial == nullptr ? nullptr : static_cast<acc_t*>(partial) + static_cast<int64_t>(idx.block_x) * H;
  }

  DX_HD static void terms_phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const Row r = row_of(p, idx, round);
    const bool first = round == 0;
    if (p.cached && first) {
      DX_UNROLL
      for (int k = 0; k < R; ++k) {
        DX_UNROLL
        for (int j = 0; j < N; ++j) l.dw[k][j] = l.db[k][j] = acc_t(0);
      }
    }
    acc_t s1 = acc_t(0), s2 = acc_t(0);  // the thread's sums of gw * xhat and gw
    auto load_row = [&](int64_t e_row, Packed<T, N>(&gs)[R], Packed<Hd, N>(&hs)[R]) {
      each_run<R>(p.runs, p.shift, true, r.s.lane, [&](int64_t u, int k, auto) {
        const RunAt ru = run_at<T>(p, u);
        T g[N];
        Hd hv[N];
        load_unit(static_cast<const T*>(a.grad), e_row + ru.c0, ru.len, ru.vec, g);
        load_unit(static_cast<const Hd*>(a.saved_h), e_row + ru.c0, ru.len, ru.vec, hv);
        pack(g, gs[k]);
        pack(hv, hs[k]);
      });
    };
    if (p.cached && r.s.live) {
      if constexpr (kAhead) {
        if (first) {
          load_row(r.e_row, l.g, l.h);
        } else {  // the previous round loaded this row
          each_run<R>(p.runs, p.shift, true, r.s.lane, [&](int64_t, int k, auto) {
            l.g[k] = l.next_g[k];
            l.h[k] = l.next_h[k];
          });
        }
      } else {
        load_row(r.e_row, l.g, l.h);
      }
    }
    if constexpr (kAhead) {
      if (p.cached && !r.s.last) {
        const RowSlot next = row_slot(a.rows, p.groups, p.shift, idx, round + 1);
        if (next.live) load_row(next.row * a.H, l.next_g, l.next_h);
      }
    }
    if (r.s.live) {
      acc_t* pw = partial_row(a.partial_w, idx, a.H);
      acc_t* pb = partial_row(a.partial_b, idx, a.H);
      each_run<R>(p.runs, p.shift, p.cached, r.s.lane, [&](int64_t u, int k, auto cached) {
        const RunAt ru = run_at<T>(p, u);
        acc_t g[N], hv[N], xh[N], gw[N];
        inputs<decltype(cached)>(a, l, k, r.e_row + ru.c0, ru, g, hv);
        terms(a, ru, r.mean, r.rstd, g, hv, xh, gw);
        DX_UNROLL
        for (int j = 0; j < N; ++j) {
          if (j < ru.len) {
            s1 += gw[j] * xh[j];
            s2 += gw[j];
          }
          if constexpr (decltype(cached)::value) {
            l.dw[k][j] += g[j] * xh[j];
            l.db[k][j] += g[j];
          } else if (j < ru.len) {
            if (pw != nullptr) pw[ru.c0 + j] = (first ? acc_t(0) : pw[ru.c0 + j]) + g[j] * xh[j];
            if (pb != nullptr) pb[ru.c0 + j] = (first ? acc_t(0) : pb[ru.c0 + j]) + g[j];
          }
        }
      });
    }
    sh.part[0][idx.thread] = s1;
    sh.part[1][idx.thread] = s2;
  }

  DX_HD static void dh_phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const Row r = row_of(p, idx, round);
    if (r.s.live) {
      const acc_t Hf = static_cast<acc_t>(a.H);
      const acc_t proj = div_rn(row_total(sh.part2[0], r.s.group, p.shift), Hf);  // mean(gw * xhat)
      // mean(gw); 0 for rms, and dh - 0 is dh exactly
      const acc_t mean_gw = a.rms ? acc_t(0) : div_rn(row_total(sh.part2[1], r.s.group, p.shift), Hf);
      const MaskParams mp = state_params(a.state, false);
      const acc_t scale = static_cast<acc_t>(mp.scale);
      each_run<R>(p.runs, p.shift, p.cached, r.s.lane, [&](int64_t u, int k, auto cached) {
        const RunAt ru = run_at<T>(p, u);
        const int64_t e0 = r.e_row + ru.c0;
        acc_t g[N], hv[N], xh[N], gw[N];
        inputs<decltype(cached)>(a, l, k, e0, ru, g, hv);
        terms(a, ru, r.mean, r.rstd, g, hv, xh, gw);
        acc_t gh[N] = {};
        if (a.grad_h != nullptr) load_wide(static_cast<const Hd*>(a.grad_h), e0, ru.len, ru.vec, gh);
        acc_t dh[N];
        DX_UNROLL
        for (int j = 0; j < N; ++j) {
          dh[j] = ((gw[j] - xh[j] * proj) - mean_gw) * r.rstd;
          if (a.grad_h != nullptr) dh[j] = dh[j] + gh[j];
        }
        if (a.grad_residual != nullptr) store_narrow<Hd>(a.grad_residual, e0, ru.len, ru.vec, dh);
        if (a.grad_input != nullptr) {
          const uint32_t keep = philox_keep<N>(mp, map_global(a.map, e0), ru.len);
          acc_t gi[N];
          DX_UNROLL
          for (int j = 0; j < N; ++j) gi[j] = drop_value(dh[j] * scale, (keep >> j) & 1u);
          store_narrow<T>(a.grad_input, e0, ru.len, ru.vec, gi);
        }
      });
    }
    if constexpr (kLong) return;  // a row per block
    if (p.cached && r.s.last && r.s.group != 0) {
      const uint32_t at = idx.thread - (1u << p.shift);
      each_run<R>(p.runs, p.shift, true, r.s.lane, [&](int64_t, int k, auto) {
        DX_UNROLL
        for (int j = 0; j < N; ++j) {
          sh.park_w[(k * N + j) * kParkers + at] = l.dw[k][j];
          sh.park_b[(k * N + j) * kParkers + at] = l.db[k][j];
        }
      });
    }
  }

  // The block's column sums, rows in block order: the first rows' threads
  // add the parked sums of the block's other rows' threads to their own.
  DX_HD static void store_sums(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    const NormArgs& a = p.a;
    const RowSlot rs = row_slot(a.rows, p.groups, p.shift, idx, round);
    if (!p.cached || !rs.last || rs.group != 0) return;
    acc_t* pw = partial_row(a.partial_w, idx, a.H);
    acc_t* pb = partial_row(a.partial_b, idx, a.H);
    const int per_row = 1 << p.shift;
    const int rows_per_block = kThreads >> p.shift;
    each_run<R>(p.runs, p.shift, true, rs.lane, [&](int64_t u, int k, auto) {
      const RunAt ru = run_at<T>(p, u);
      DX_UNROLL
      for (int j = 0; j < N; ++j) {
        acc_t w = l.dw[k][j], b = l.db[k][j];
        for (int g = 1; !kLong && g < rows_per_block; ++g) {
          const int at = (k * N + j) * kParkers + (g - 1) * per_row + static_cast<int>(rs.lane);
          w += sh.park_w[at];
          b += sh.park_b[at];
        }
        if (j < ru.len) {
          if (pw != nullptr) pw[ru.c0 + j] = w;
          if (pb != nullptr) pb[ru.c0 + j] = b;
        }
      }
    });
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh, Local& l, int64_t round) {
    if constexpr (kPhase == 0) {
      terms_phase(p, idx, sh, l, round);
    } else if constexpr (kPhase == 1) {
      fold_partials(sh.part[0], sh.part2[0], idx.thread);
      fold_partials(sh.part[1], sh.part2[1], idx.thread);
    } else if constexpr (kPhase == 2) {
      dh_phase(p, idx, sh, l, round);
    } else {
      static_assert(kPhase == 3, "four phases");
      store_sums(p, idx, sh, l, round);
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

template <typename T>
NormParams norm_params(const NormArgs& a, const NormPlan& g, bool vec) {
  return NormParams{a, NormShape<T>::runs(a.H), g.shift, g.cached, g.groups,
                    make_fast_div(static_cast<uint64_t>(g.blocks)), vec};
}

template <class Runner>
bool run_norm_forward(Runner& r, const NormArgs& a, int sm_count) {
  if (a.rows == 0) return true;
  return dispatch_norm_types(a, [&](auto t, auto hd) {
    using T = decltype(t);
    using K = NormForwardKernel<T, decltype(hd)>;
    const NormPlan g = plan_norm(a.dtype, a.h_dtype, a.rows, a.H, false, sm_count);
    return r.template launch<K>(typename K::Params{norm_params<T>(a, g, K::vec_ok(a))}, Grid2{g.blocks, 1});
  });
}

// The backward kernel, then the ordered sums of the partial rows asked for.
template <class Runner>
bool run_norm_backward(Runner& r, const NormArgs& a, int sm_count) {
  if (a.rows == 0 || a.H == 0) return true;
  return dispatch_norm_types(a, [&](auto t, auto hd) {
    using T = decltype(t);
    using acc_t = typename Num<T>::acc;
    const NormPlan g = plan_norm(a.dtype, a.h_dtype, a.rows, a.H, true, sm_count);
    if (g.long_rows) {
      using K = NormBackwardKernel<T, decltype(hd), true>;
      if (!r.template launch<K>(typename K::Params{norm_params<T>(a, g, K::vec_ok(a))}, Grid2{g.blocks, 1})) {
        return false;
      }
    } else {
      using K = NormBackwardKernel<T, decltype(hd), false>;
      if (!r.template launch<K>(typename K::Params{norm_params<T>(a, g, K::vec_ok(a))}, Grid2{g.blocks, 1})) {
        return false;
      }
    }
    using S = BiasReduceKernel<acc_t>;
    const Grid2 grid{bias_reduce_blocks(a.H, sm_count), 1};
    if (a.dweight != nullptr &&
        !r.template launch<S>(typename S::Params{static_cast<const acc_t*>(a.partial_w),
                                                 static_cast<acc_t*>(a.dweight), a.H, g.blocks},
                              grid)) {
      return false;
    }
    return a.dbias == nullptr ||
           r.template launch<S>(
               typename S::Params{static_cast<const acc_t*>(a.partial_b), static_cast<acc_t*>(a.dbias), a.H, g.blocks},
               grid);
  });
}

}  // namespace cuda
}  // namespace dropout_ext
