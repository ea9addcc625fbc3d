// CUDA kernels for y = residual + dropout(act(x + bias)), its backward and
// the keep mask, under the contract of docs/RNG.md.
//
// Each thread handles units of 16 bytes per tensor (4 float, 8 half or
// bfloat16, 4 double as two 16-byte halves), so every unit starts on a Philox
// group boundary and one Philox call serves four elements. Loads and stores
// are 128-bit where the pointers allow it; the last, partial unit and
// misaligned views take the scalar path. Keep bits live in registers only.
// Math is float32 (float64 for double) with one rounding on store; nvcc runs
// with --fmad=false so the activations round exactly as activations.h says.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../activations.h"
#include "../philox.h"
#include "dropout_kernels.h"

namespace dropout_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 2048 / kThreads;

template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};

template <>
struct Num<__half> {
  using acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

template <>
struct Num<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  // Round to nearest even in integer arithmetic, NaN as 0x7FC0: the same
  // bits as c10::BFloat16 on the CPU and the Triton kernel.
  __device__ static __nv_bfloat16 store(float v) {
    const uint32_t b = __float_as_uint(v);
    const uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
    return __ushort_as_bfloat16(static_cast<unsigned short>(v != v ? 0x7FC0u : r));
  }
};

template <typename T>
struct Unit {
  static constexpr int kElems = sizeof(T) == 2 ? 8 : 4;
  static constexpr int kVec16 = kElems * static_cast<int>(sizeof(T)) / 16;
};

// A dropped element keeps only the sign bit of its value: x * 0 for finite
// x, as in nn.Dropout, and a zero for NaN and Inf too.
__device__ __forceinline__ float drop_value(float v, bool keep) {
  return keep ? v : __uint_as_float(__float_as_uint(v) & 0x80000000u);
}

__device__ __forceinline__ double drop_value(double v, bool keep) {
  return keep ? v
              : __longlong_as_double(__double_as_longlong(v) &
                                     static_cast<long long>(0x8000000000000000ull));
}

// p carried in device memory, clamped as the host would have refused it:
// NaN and negatives mean 0, anything from 1 up means drop everything.
__device__ __forceinline__ double device_p(const RngArgs& r) {
  const double p = __longlong_as_double(static_cast<long long>(r.seed_offset[2]));
  return p >= 0.0 ? (p < 1.0 ? p : 1.0) : 0.0;
}

__device__ __forceinline__ MaskParams load_params(const RngArgs& r) {
  const uint64_t seed = static_cast<uint64_t>(r.seed_offset[0]);
  const uint64_t offset = static_cast<uint64_t>(r.seed_offset[1]);
  MaskParams m;
  m.key0 = static_cast<uint32_t>(seed);
  m.key1 = static_cast<uint32_t>(seed >> 32);
  m.offset_lo = static_cast<uint32_t>(offset);
  m.offset_hi = static_cast<uint32_t>(offset >> 32);
  m.threshold = r.threshold;
  m.drop_all = r.drop_all;
  if (r.p_on_device) {
    // make_mask_params's arithmetic: floor(p * 2**32) in double.
    const double p = device_p(r);
    m.drop_all = p >= 1.0;
    m.threshold = m.drop_all ? 0u : static_cast<uint32_t>(p * 4294967296.0);
  }
  return m;
}

// The kept-value scale, 1 / (1 - p) in double rounded once to the math type.
template <typename acc_t>
__device__ __forceinline__ acc_t load_scale(const RngArgs& r, double host_scale) {
  if (!r.p_on_device) return static_cast<acc_t>(host_scale);
  const double p = device_p(r);
  return static_cast<acc_t>(p < 1.0 ? 1.0 / (1.0 - p) : 0.0);
}

// Keep bit of element i from a structured mask: its row-major index in the
// input, mapped through the mask's strides.
__device__ __forceinline__ bool structured_keep(const StructuredMask& sm, int64_t i) {
  int64_t m = 0;
  for (int d = sm.ndim - 1; d >= 0; --d) {
    const int64_t s = sm.sizes[d];
    const int64_t q = i / s;
    m += (i - q * s) * sm.strides[d];
    i = q;
  }
  return sm.keep[m];
}

// Keep bit of one element drawn on its own: the rare shapes whose rows do not
// start on a group boundary. Out of line so it does not cost the common
// path registers.
__device__ __noinline__ bool keep_one(const MaskParams& mp, const StructuredMask& sm, int64_t i) {
  if (sm.keep != nullptr) return structured_keep(sm, i);
  uint32_t w[4];
  philox_group(mp, static_cast<uint64_t>(i) >> 2, w);
  const int k = static_cast<int>(i & 3);  // selects, not an indexed (local-memory) load
  return keep_word(mp, k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3]);
}

// Keep bits of the unit starting at element e0 (a multiple of 4).
template <int E>
__device__ __forceinline__ void unit_keep(const MaskParams& mp, const StructuredMask& sm, int64_t e0,
                                          int64_t n, bool (&keep)[E]) {
  if (sm.keep != nullptr) {
#pragma unroll
    for (int j = 0; j < E; ++j) keep[j] = e0 + j < n && structured_keep(sm, e0 + j);
    return;
  }
#pragma unroll
  for (int q = 0; q < E / 4; ++q) {
    uint32_t w[4];
    philox_group(mp, static_cast<uint64_t>(e0 >> 2) + static_cast<uint64_t>(q), w);
#pragma unroll
    for (int k = 0; k < 4; ++k) keep[4 * q + k] = keep_word(mp, w[k]);
  }
}

template <typename T>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, int64_t e0, int64_t n, bool vec,
                                          T (&v)[Unit<T>::kElems]) {
  constexpr int E = Unit<T>::kElems;
  if (vec && e0 + E <= n) {
    const uint4* src = reinterpret_cast<const uint4*>(p + e0);
    uint4 raw[Unit<T>::kVec16];
#pragma unroll
    for (int k = 0; k < Unit<T>::kVec16; ++k) raw[k] = __ldg(src + k);
    memcpy(v, raw, sizeof(raw));
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) v[j] = e0 + j < n ? p[e0 + j] : T{};
  }
}

template <typename T>
__device__ __forceinline__ void store_unit(T* __restrict__ p, int64_t e0, int64_t n, bool vec,
                                           const T (&v)[Unit<T>::kElems]) {
  constexpr int E = Unit<T>::kElems;
  if (vec && e0 + E <= n) {
    uint4 raw[Unit<T>::kVec16];
    memcpy(raw, v, sizeof(raw));
    uint4* dst = reinterpret_cast<uint4*>(p + e0);
#pragma unroll
    for (int k = 0; k < Unit<T>::kVec16; ++k) dst[k] = raw[k];
  } else {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (e0 + j < n) p[e0 + j] = v[j];
    }
  }
}

template <typename T, Act A>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs a, const bool vec) {
  using acc_t = typename Num<T>::acc;
  constexpr int E = Unit<T>::kElems;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  const T* __restrict__ res = static_cast<const T*>(a.residual);
  T* __restrict__ out = static_cast<T*>(a.out);
  const MaskParams mp = load_params(a.rng);
  const acc_t scale = load_scale<acc_t>(a.rng, a.scale);
  const int64_t units = (a.n + E - 1) / E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t e0 = u * E;
    T xv[E];
    T rv[E];
    T ov[E];
    bool keep[E];
    load_unit(x, e0, a.n, vec, xv);
    if (res != nullptr) load_unit(res, e0, a.n, vec, rv);
    unit_keep(mp, a.mask, e0, a.n, keep);
    int64_t col = bias != nullptr ? e0 % a.H : 0;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      acc_t v = Num<T>::load(xv[j]);
      if (bias != nullptr) {
        v = v + Num<T>::load(bias[col]);
        col = col + 1 == a.H ? 0 : col + 1;
      }
      acc_t y = drop_value(ActOps<A>::fwd(v) * scale, keep[j]);
      if (res != nullptr) y = Num<T>::load(rv[j]) + y;
      ov[j] = Num<T>::store(y);
    }
    store_unit(out, e0, a.n, vec, ov);
  }
}

template <typename T, Act A>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs a, const bool vec) {
  using acc_t = typename Num<T>::acc;
  constexpr int E = Unit<T>::kElems;
  const T* __restrict__ g = static_cast<const T*>(a.grad);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  const MaskParams mp = load_params(a.rng);
  const acc_t scale = load_scale<acc_t>(a.rng, a.scale);
  const int64_t units = (a.n + E - 1) / E;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    const int64_t e0 = u * E;
    T gv[E];
    T xv[E];
    T ov[E];
    bool keep[E];
    load_unit(g, e0, a.n, vec, gv);
    if constexpr (A != Act::kIdentity) load_unit(x, e0, a.n, vec, xv);
    unit_keep(mp, a.mask, e0, a.n, keep);
    int64_t col = (A != Act::kIdentity && bias != nullptr) ? e0 % a.H : 0;
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const acc_t gs = Num<T>::load(gv[j]) * scale;
      acc_t d = gs;
      if constexpr (A != Act::kIdentity) {
        acc_t v = Num<T>::load(xv[j]);
        if (bias != nullptr) {
          v = v + Num<T>::load(bias[col]);
          col = col + 1 == a.H ? 0 : col + 1;
        }
        d = act_backward<A, acc_t>(gs, v);
      }
      ov[j] = Num<T>::store(drop_value(d, keep[j]));
    }
    store_unit(dx, e0, a.n, vec, ov);
  }
}

// Backward with the bias gradient. Thread t of the x-grid owns E adjacent
// columns and walks the rows of its row block (blockIdx.y), summing the
// unrounded dx in registers; the per-block sums go to a partial buffer that
// the glue sums over blocks in a fixed order, so the bias gradient is the
// same on every run (no atomics).
template <typename T, Act A>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(const BackwardArgs a, const bool vec) {
  using acc_t = typename Num<T>::acc;
  constexpr int E = Unit<T>::kElems;
  const T* __restrict__ g = static_cast<const T*>(a.grad);
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ bias = static_cast<const T*>(a.bias);
  T* __restrict__ dx = static_cast<T*>(a.dx);
  acc_t* __restrict__ partial = static_cast<acc_t*>(a.partial);
  const MaskParams mp = load_params(a.rng);
  const acc_t scale = load_scale<acc_t>(a.rng, a.scale);
  const int64_t H = a.H;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * E;
  if (c0 >= H) return;
  const int64_t rows = a.n / H;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * a.rows_per_block;
  const int64_t r1 = r0 + a.rows_per_block < rows ? r0 + a.rows_per_block : rows;
  // Rows start on a Philox group boundary only when H % 4 == 0; otherwise
  // each element draws its own group (four times the Philox work, rare shapes).
  const bool grouped = (H & 3) == 0 && a.mask.keep == nullptr;
  acc_t bv[E];
#pragma unroll
  for (int j = 0; j < E; ++j) {
    bv[j] = (bias != nullptr && c0 + j < H) ? Num<T>::load(bias[c0 + j]) : acc_t(0);
  }
  acc_t acc[E];
#pragma unroll
  for (int j = 0; j < E; ++j) acc[j] = acc_t(0);
  const bool row_vec = vec && (H % E) == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t e0 = r * H + c0;
    const int64_t end = r * H + H;  // this row's elements only
    T gv[E];
    T xv[E];
    T ov[E];
    bool keep[E];
    load_unit(g, e0, end, row_vec, gv);
    if constexpr (A != Act::kIdentity) load_unit(x, e0, end, row_vec, xv);
    if (grouped) {
      unit_keep(mp, a.mask, e0, end, keep);
    } else {
      for (int j = 0; j < E; ++j) keep[j] = e0 + j < end && keep_one(mp, a.mask, e0 + j);
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const acc_t gs = Num<T>::load(gv[j]) * scale;
      acc_t d = gs;
      if constexpr (A != Act::kIdentity) d = act_backward<A, acc_t>(gs, Num<T>::load(xv[j]) + bv[j]);
      d = drop_value(d, keep[j]);
      ov[j] = Num<T>::store(d);
      if (e0 + j < end) acc[j] += d;
    }
    store_unit(dx, e0, end, row_vec, ov);
  }
#pragma unroll
  for (int j = 0; j < E; ++j) {
    if (c0 + j < H) partial[static_cast<int64_t>(blockIdx.y) * H + c0 + j] = acc[j];
  }
}

__global__ void __launch_bounds__(kThreads) mask_kernel(bool* __restrict__ out, const int64_t n, const RngArgs r) {
  const MaskParams mp = load_params(r);
  const int64_t groups = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool aligned = (reinterpret_cast<uintptr_t>(out) & 3) == 0;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups; grp += stride) {
    uint32_t w[4];
    philox_group(mp, static_cast<uint64_t>(grp), w);
    const int64_t e0 = grp * 4;
    if (aligned && e0 + 4 <= n) {
      uchar4 v;
      v.x = keep_word(mp, w[0]);
      v.y = keep_word(mp, w[1]);
      v.z = keep_word(mp, w[2]);
      v.w = keep_word(mp, w[3]);
      *reinterpret_cast<uchar4*>(out + e0) = v;
    } else {
      for (int k = 0; k < 4 && e0 + k < n; ++k) out[e0 + k] = keep_word(mp, w[k]);
    }
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int grid_for(int64_t work_items, int sm_count) {
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

template <typename F>
cudaError_t dispatch_act(int act, F&& f) {
  switch (static_cast<Act>(act)) {
    case Act::kIdentity: return f(std::integral_constant<Act, Act::kIdentity>{});
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kDouble: return f(double{});
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t bias_grad_rows_per_block(int64_t rows, int64_t H, int sm_count) {
  const int64_t col_blocks = ((H + 3) / 4 + kThreads - 1) / kThreads;
  const int64_t want_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  int64_t row_blocks = want_blocks / (col_blocks > 0 ? col_blocks : 1);
  if (row_blocks < 1) row_blocks = 1;
  if (row_blocks > rows) row_blocks = rows > 0 ? rows : 1;
  int64_t per = (rows + row_blocks - 1) / row_blocks;
  const int64_t min_per = (rows + 65534) / 65535;  // gridDim.y limit
  if (per < min_per) per = min_per;
  return per < 1 ? 1 : per;
}

cudaError_t launch_forward(const ForwardArgs& a, int sm_count, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    const bool vec = aligned16(a.x) && aligned16(a.out) && aligned16(a.residual);
    const int blocks = grid_for((a.n + Unit<T>::kElems - 1) / Unit<T>::kElems, sm_count);
    return dispatch_act(a.act, [&](auto act) {
      forward_kernel<T, decltype(act)::value><<<blocks, kThreads, 0, stream>>>(a, vec);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_backward(const BackwardArgs& a, int sm_count, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int E = Unit<T>::kElems;
    const bool vec = aligned16(a.grad) && aligned16(a.x) && aligned16(a.dx);
    return dispatch_act(a.act, [&](auto act) {
      constexpr Act A = decltype(act)::value;
      if (a.partial != nullptr) {
        const int64_t rows = a.n / a.H;
        const int64_t row_blocks = (rows + a.rows_per_block - 1) / a.rows_per_block;
        const dim3 grid(static_cast<unsigned>(((a.H + E - 1) / E + kThreads - 1) / kThreads),
                        static_cast<unsigned>(row_blocks));
        backward_rows_kernel<T, A><<<grid, kThreads, 0, stream>>>(a, vec);
      } else {
        const int blocks = grid_for((a.n + E - 1) / E, sm_count);
        backward_kernel<T, A><<<blocks, kThreads, 0, stream>>>(a, vec);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_mask(bool* out, int64_t n, const RngArgs& rng, int sm_count, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  mask_kernel<<<grid_for((n + 3) / 4, sm_count), kThreads, 0, stream>>>(out, n, rng);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dropout_ext
