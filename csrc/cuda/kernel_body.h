// The per-thread code of the CUDA kernels, __host__ __device__.
//
// nvcc compiles it into the __global__ kernels of dropout_kernels.cu; g++
// compiles the same lines into the host driver (csrc/cuda_host), which runs
// every block and thread of a launch on the CPU. So the host build needs no
// CUDA header: the few device-only operations (128-bit loads, half/bfloat16
// conversions, 64-bit multiply-high, bit casts) have a host twin with the
// same result, bit for bit.
//
// A kernel is a struct with Params, a Shared block, kPhases, kBlocksPerSm
// (kernel_args.h) and phase<k>(params, idx, shared): the phases are the
// code between __syncthreads(), so the host runs phase k of every thread of
// a block before phase k + 1, as the GPU's barrier orders them.
//
// Each thread step handles a unit of 16 bytes per tensor (4 float, 8 half
// or bfloat16, 4 double as two 16-byte halves), so a unit of a flat walk
// starts on a Philox group boundary and one Philox call serves four
// elements. Keep bits live in a register bitmask, and in memory only in the
// packed mask mode (MaskBits, kernel_args.h), one bit per element. Math is
// float32 (float64 for double) with one rounding on store; nvcc runs with
// --fmad=false and g++ with -ffp-contract=off so the activations round
// exactly as activations.h says on both.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "../activations.h"
#include "../philox.h"
#include "kernel_args.h"

namespace dropout_ext {
namespace cuda {

// blockIdx.x/y, threadIdx.x, gridDim.x/y of one thread of a launch.
struct Idx {
  uint32_t block_x;
  uint32_t block_y;
  uint32_t thread;
  uint32_t grid_x;
  uint32_t grid_y;
};

// --- storage types and their conversions ------------------------------------

// 16-bit floats as their bits, the same type on host and device.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

#if !defined(__CUDA_ARCH__)
// IEEE binary16 <-> binary32 in integer arithmetic, round to nearest even:
// the results of cvt.f32.f16 / cvt.rn.f16.f32 and of c10::Half.
inline float half_to_float_host(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bit_cast<float>(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * 0x1p-24f;  // exact: m < 2**10
    return bit_cast<float>(sign | bit_cast<uint32_t>(v));
  }
  return bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t float_to_half_host(float f) {
  const uint32_t x = bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to Inf
  if (ax >= 0x38800000u) {  // normal: drop 13 mantissa bits, rebias 127 -> 15
    const uint32_t r = ax + 0xFFFu + ((ax >> 13) & 1u) - 0x38000000u;
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2**-25: ties to even zero
  // Subnormal result: |f| / 2**-24 rounded to an integer (0x400 is the
  // smallest normal, which the encoding then reads correctly).
  const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - (ax >> 23);  // in [14, 24]
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1u);
  q += (rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u;
  return static_cast<uint16_t>(sign | q);
}

// Round to nearest even, NaN as 0x7FC0: c10::BFloat16's bits.
inline uint16_t float_to_bfloat16_host(float f) {
  const uint32_t b = bit_cast<uint32_t>(f);
  if (f != f) return 0x7FC0u;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
#endif

template <typename T>
struct Num;

template <>
struct Num<float> {
  using acc = float;
  static constexpr DType kDType = DType::kFloat;
  DX_HD static float load(float v) { return v; }
  DX_HD static float store(float v) { return v; }
};

template <>
struct Num<double> {
  using acc = double;
  static constexpr DType kDType = DType::kDouble;
  DX_HD static double load(double v) { return v; }
  DX_HD static double store(double v) { return v; }
};

template <>
struct Num<Half> {
  using acc = float;
  static constexpr DType kDType = DType::kHalf;
  DX_HD static float load(Half v) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v.bits));
#else
    return half_to_float_host(v.bits);
#endif
  }
  DX_HD static Half store(float v) {
#if defined(__CUDA_ARCH__)
    return Half{__half_as_ushort(__float2half_rn(v))};
#else
    return Half{float_to_half_host(v)};
#endif
  }
};

template <>
struct Num<BFloat16> {
  using acc = float;
  static constexpr DType kDType = DType::kBFloat16;
  DX_HD static float load(BFloat16 v) { return bit_cast<float>(static_cast<uint32_t>(v.bits) << 16); }
  DX_HD static BFloat16 store(float v) {
#if defined(__CUDA_ARCH__)
    return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
    return BFloat16{float_to_bfloat16_host(v)};
#endif
  }
};

template <typename F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kDouble: return f(double{});
    case DType::kHalf: return f(Half{});
    case DType::kBFloat16: return f(BFloat16{});
    case DType::kFloat:
    default: return f(float{});
  }
}

// --- memory access ------------------------------------------------------------

struct alignas(16) Bits128 {
  uint32_t w[4];
};

// One 128-bit read-only load (LDG.E.128.CONSTANT) or store (STG.E.128);
// memcpy on the host.
DX_HD Bits128 load16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(static_cast<const uint4*>(p));
  return Bits128{{v.x, v.y, v.z, v.w}};
#else
  Bits128 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

DX_HD void store16(void* p, const Bits128& v) {
#if defined(__CUDA_ARCH__)
  *static_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(p, &v, sizeof(v));
#endif
}

template <typename T>
struct Unit {
  static constexpr int kElems = sizeof(T) == 2 ? 8 : 4;
  static constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
};

// The E elements at p + e0 (a unit, or a norm kernel's run of another
// type): len valid elements (the rest read as zero); vec means all E are
// there and 16-byte aligned.
template <typename T, int E>
DX_HD void load_unit(const T* p, int64_t e0, int len, bool vec, T (&v)[E]) {
  constexpr int kVec16 = E * static_cast<int>(sizeof(T)) / 16;
  static_assert(E * sizeof(T) % 16 == 0, "whole 16-byte accesses");
  if (vec) {
    Bits128 raw[kVec16];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kVec16; ++k) raw[k] = load16(p + e0 + k * Unit<T>::kPer16);
    std::memcpy(v, raw, sizeof(raw));
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < E; ++j) v[j] = j < len ? p[e0 + j] : T{};
  }
}

template <typename T, int E>
DX_HD void store_unit(T* p, int64_t e0, int len, bool vec, const T (&v)[E]) {
  constexpr int kVec16 = E * static_cast<int>(sizeof(T)) / 16;
  static_assert(E * sizeof(T) % 16 == 0, "whole 16-byte accesses");
  if (vec) {
    Bits128 raw[kVec16];
    std::memcpy(raw, v, sizeof(raw));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < kVec16; ++k) store16(p + e0 + k * Unit<T>::kPer16, raw[k]);
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < E; ++j) {
      if (j < len) p[e0 + j] = v[j];
    }
  }
}

// --- index arithmetic -----------------------------------------------------------

DX_HD uint64_t umulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// floor(n / d) for 0 <= n < 2**63, by FastDiv's multiply and shift.
DX_HD uint64_t fast_div(uint64_t n, const FastDiv& d) {
  return d.divisor == 1 ? n : umulhi64(n, d.magic) >> d.shift;
}

DX_HD int64_t fast_mod(int64_t n, const FastDiv& d) {
  const uint64_t q = fast_div(static_cast<uint64_t>(n), d);
  return static_cast<int64_t>(static_cast<uint64_t>(n) - q * d.divisor);
}

// Where row-major element e of a tensor whose rows lie `rows` elements apart
// sits: e itself for a row-major one (rows 0), else by row and column. A
// unit lies in one row (row_stride), so its elements follow e.
DX_HD int64_t row_at(int64_t e, const FastDiv& H, int64_t rows) {
  if (rows == 0) return e;
  const int64_t r = static_cast<int64_t>(fast_div(static_cast<uint64_t>(e), H));
  return r * rows + (e - r * static_cast<int64_t>(H.divisor));
}

// Global index of local element i under a strided map (ndims >= 1), and in
// left how many elements from i on are consecutive there too (to its run's
// end). Unrolled over kMaxMapDims as structured_index is; the outermost
// dimension's digit is the quotient left, with no division.
DX_HD int64_t strided_global(const ShardMap& m, int64_t i, int64_t& left) {
  uint64_t q = fast_div(static_cast<uint64_t>(i), m.run);
  const int64_t in_run = static_cast<int64_t>(static_cast<uint64_t>(i) - q * m.run.divisor);
  left = static_cast<int64_t>(m.run.divisor) - in_run;
  int64_t g = m.base + in_run;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < kMaxMapDims; ++k) {
    if (k == m.ndims - 1) {
      g += static_cast<int64_t>(q) * m.stride[k];
    } else if (k < m.ndims) {
      const uint64_t next = fast_div(q, m.size[k]);
      g += static_cast<int64_t>(q - next * m.size[k].divisor) * m.stride[k];
      q = next;
    }
  }
  return g;
}

// Global index of local element i: base + i for the identity (one uniform
// branch, no division), else strided_global's.
DX_HD int64_t map_global(const ShardMap& m, int64_t i) {
  if (m.ndims == 0) return m.base + i;
  int64_t unused;
  return strided_global(m, i, unused);
}

// --- keep bits --------------------------------------------------------------------

// Mask index of element e (local row-major index) of a structured mask, and
// its digit in the innermost collapsed dimension. Unrolled over kMaxDims so
// every size and stride is a constant-indexed kernel parameter.
DX_HD int64_t structured_index(const StructuredMask& sm, int64_t e, int64_t& inner_digit) {
  uint64_t q = static_cast<uint64_t>(e);
  int64_t m = 0;
  inner_digit = e;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int d = 0; d < kMaxDims; ++d) {
    if (d < sm.ndim) {
      if (d == sm.ndim - 1) {  // the outermost: q is already its digit
        if (d == 0) inner_digit = static_cast<int64_t>(q);
        m += static_cast<int64_t>(q) * sm.stride[d];
      } else {
        const uint64_t next = fast_div(q, sm.size[d]);
        const int64_t digit = static_cast<int64_t>(q - next * sm.size[d].divisor);
        if (d == 0) inner_digit = digit;
        m += digit * sm.stride[d];
        q = next;
      }
    }
  }
  return m;
}

// Keep bits of the structured-mask unit at local element e0 (bit j:
// element e0 + j). One index computation per unit; elements step by the
// innermost stride unless the unit crosses the end of an innermost run.
template <int E>
DX_HD uint32_t structured_keep(const StructuredMask& sm, int64_t e0, int len) {
  int64_t digit;
  const int64_t m0 = structured_index(sm, e0, digit);
  uint32_t bits = 0;
  if (digit + len <= static_cast<int64_t>(sm.size[0].divisor)) {
    const int64_t step = sm.stride[0];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < E; ++j) {
      if (j < len) bits |= static_cast<uint32_t>(sm.keep[m0 + j * step]) << j;
    }
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
    for (int j = 0; j < len; ++j) {
      int64_t unused;
      bits |= static_cast<uint32_t>(sm.keep[structured_index(sm, e0 + j, unused)]) << j;
    }
  }
  return bits;
}

// Keep bits of len elements from logical index i0, which need not start a
// Philox group (the bias-gradient kernel's rows when H % 4 != 0): one draw
// per group the unit touches.
template <int E>
DX_HD uint32_t ungrouped_keep(const MaskParams& mp, int64_t i0, int len) {
  uint32_t bits = 0;
  const uint64_t g_end = static_cast<uint64_t>(i0 + len - 1) >> 2;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
  for (uint64_t g = static_cast<uint64_t>(i0) >> 2; g <= g_end; ++g) {
    uint32_t w[4];
    philox_group(mp, g, w);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) {
      const int64_t j = static_cast<int64_t>(g * 4 + static_cast<uint64_t>(k)) - i0;
      if (j >= 0 && j < len) bits |= static_cast<uint32_t>(keep_word(mp, w[k])) << j;
    }
  }
  return bits;
}

// Keep bits drawn by Philox for len elements from logical index i0.
// keep_all and drop_all are uniform branches: no Philox runs for them.
template <int E>
DX_HD uint32_t philox_keep(const MaskParams& mp, int64_t i0, int len) {
  if (mp.keep_all) return (1u << E) - 1u;
  if (mp.drop_all) return 0u;
  if ((i0 & 3) != 0) return ungrouped_keep<E>(mp, i0, len);
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int q = 0; q < E / 4; ++q) {
    uint32_t w[4];
    philox_group(mp, (static_cast<uint64_t>(i0) >> 2) + static_cast<uint64_t>(q), w);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) bits |= static_cast<uint32_t>(keep_word(mp, w[k])) << (4 * q + k);
  }
  return bits;
}

// Keep bits of len elements from local element e0, each drawn at its index
// under the map: one range for an unsharded tensor (the identity) and for a
// shard that is one run of the global tensor; else one range per run the
// elements cross (a shard's run ends where its slice of a row does).
// keep_all and drop_all are uniform branches, as in philox_keep.
template <int E>
DX_HD uint32_t mapped_keep(const MaskParams& mp, const ShardMap& map, int64_t e0, int len) {
  if (map.ndims == 0) return philox_keep<E>(mp, map.base + e0, len);
  if (mp.keep_all) return (1u << E) - 1u;
  if (mp.drop_all) return 0u;
  uint32_t bits = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
  for (int j = 0; j < len;) {
    int64_t left;
    const int64_t g = strided_global(map, e0 + j, left);
    const int run = left < len - j ? static_cast<int>(left) : len - j;
    bits |= ungrouped_keep<E>(mp, g, run) << j;
    j += run;
  }
  return bits;
}

// Keep bits of the unit at local element e0: from the structured mask when
// there is one (it was drawn with these MaskParams, so keep_all still means
// every bit set).
template <int E>
DX_HD uint32_t unit_keep(const MaskParams& mp, const StructuredMask& sm, const ShardMap& map, int64_t e0, int len) {
  if (mp.keep_all) return (1u << E) - 1u;
  if (sm.keep != nullptr) return structured_keep<E>(sm, e0, len);
  return mapped_keep<E>(mp, map, e0, len);
}

// One byte of the packed mask: a read-only load on the device.
DX_HD uint32_t load_byte(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Keep bits of len <= 8 elements from local element e0, read from the
// packed mask: one byte, or two where the elements straddle a byte boundary
// (the bias-gradient kernel's rows when H % 8 != 0); never the byte after
// the last element's, so never past the mask.
DX_HD uint32_t packed_keep(const uint8_t* bits, int64_t e0, int len) {
  const uint8_t* b = bits + (e0 >> 3);
  const int shift = static_cast<int>(e0 & 7);
  uint32_t v = load_byte(b);
  if (shift + len > 8) v |= load_byte(b + 1) << 8;
  return v >> shift;
}

// Keep bits of len elements from local element e0 in mask mode M. A packed
// mask is a full one, so packing draws from Philox with no structured path;
// reading draws nothing and ignores p's keep-all and drop-all: the bits say
// what is kept, p only gives the scale.
template <int E, MaskBits M>
DX_HD uint32_t mode_keep(const MaskParams& mp, const DropoutArgs& a, int64_t e0, int len) {
  if constexpr (M == MaskBits::kRead) {
    return packed_keep(a.bits_in, e0, len);
  } else if constexpr (M == MaskBits::kPack) {
    return mapped_keep<E>(mp, a.map, e0, len);
  } else {
    return unit_keep<E>(mp, a.mask, a.map, e0, len);
  }
}

// A dropped element keeps only the sign bit of its value: x * 0 for finite
// x, as in nn.Dropout, and a zero for NaN and Inf too.
DX_HD float drop_value(float v, bool keep) { return keep ? v : bit_cast<float>(bit_cast<uint32_t>(v) & 0x80000000u); }

DX_HD double drop_value(double v, bool keep) {
  return keep ? v : bit_cast<double>(bit_cast<uint64_t>(v) & 0x8000000000000000ull);
}

// --- one unit, either direction ---------------------------------------------------

enum class Dir : int { kForward = 0, kBackward = 1 };

// What every thread derives once from the arguments.
template <typename T>
struct ThreadCtx {
  using acc_t = typename Num<T>::acc;
  MaskParams mp;
  acc_t scale;
  const T* in;     // forward: x; backward: grad
  const T* aux;    // forward: residual; backward: saved x
  int64_t in_rows;   // their row strides (0: row-major)
  int64_t aux_rows;
  const T* bias;
  T* out;
};

template <typename T, Dir D>
DX_HD ThreadCtx<T> thread_ctx(const DropoutArgs& a, bool first) {
  ThreadCtx<T> c;
  c.mp = state_params(a.state, first);
  c.scale = static_cast<typename Num<T>::acc>(c.mp.scale);
  c.in = static_cast<const T*>(D == Dir::kForward ? a.x : a.grad);
  c.aux = static_cast<const T*>(D == Dir::kForward ? a.residual : a.x);
  c.in_rows = D == Dir::kForward ? a.x_rows : a.grad_rows;
  c.aux_rows = D == Dir::kForward ? a.residual_rows : a.x_rows;
  c.bias = static_cast<const T*>(a.bias);
  c.out = static_cast<T*>(a.out);
  return c;
}

// The loaded tensors of one unit: in (forward: x; backward: grad) and aux
// (forward: the residual; backward: the saved x), zeros where not read.
template <typename T>
struct UnitIn {
  T in[Unit<T>::kElems];
  T aux[Unit<T>::kElems];
};

// Loads the unit at local element e0 (len elements; vec: all of them, 16-byte
// aligned), each tensor at its own row stride. Apart from unit_math so a
// kernel can issue several units' loads before any of their keep bits and math.
template <typename T, Act A, Dir D>
DX_HD void unit_load(const ThreadCtx<T>& c, int64_t e0, int len, bool vec, const FastDiv& H, UnitIn<T>& u) {
  const bool with_aux = D == Dir::kForward ? c.aux != nullptr : A != Act::kIdentity;
  load_unit(c.in, row_at(e0, H, c.in_rows), len, vec, u.in);
  if (with_aux) {
    load_unit(c.aux, row_at(e0, H, c.aux_rows), len, vec, u.aux);
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < Unit<T>::kElems; ++j) u.aux[j] = T{};
  }
}

// The loaded unit at local element e0: keep bits, col = the bias column of
// element e0. Stores the rounded results and returns the unrounded ones in
// d (the bias gradient sums those).
//   forward:  y  = residual + drop(act(x + bias) * scale)
//   backward: dx = drop(act'(x + bias) * grad * scale)
template <typename T, Act A, Dir D>
DX_HD void unit_math(const ThreadCtx<T>& c, const UnitIn<T>& u, int64_t e0, int len, bool vec, uint32_t keep,
                     int64_t col, const FastDiv& H, typename Num<T>::acc (&d)[Unit<T>::kElems]) {
  using acc_t = typename Num<T>::acc;
  constexpr int E = Unit<T>::kElems;
  constexpr bool kNeedsX = D == Dir::kForward || A != Act::kIdentity;
  const bool with_aux = D == Dir::kForward ? c.aux != nullptr : A != Act::kIdentity;
  const bool with_bias = kNeedsX && c.bias != nullptr;
  const int64_t h = static_cast<int64_t>(H.divisor);
  T out[E];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < E; ++j) {
    const bool kept = (keep >> j) & 1u;
    acc_t v = acc_t(0);
    if constexpr (kNeedsX) {
      v = Num<T>::load(D == Dir::kForward ? u.in[j] : u.aux[j]);
      if (with_bias) {
        v = v + Num<T>::load(c.bias[col]);
        col = col + 1 == h ? 0 : col + 1;
      }
    }
    acc_t y;
    if constexpr (D == Dir::kForward) {
      y = drop_value(ActOps<A>::fwd(v) * c.scale, kept);
      d[j] = y;
      if (with_aux) y = Num<T>::load(u.aux[j]) + y;
    } else {
      const acc_t gs = Num<T>::load(u.in[j]) * c.scale;
      y = drop_value(act_backward<A, acc_t>(gs, v), kept);
      d[j] = y;
    }
    out[j] = Num<T>::store(y);
  }
  store_unit(c.out, e0, len, vec, out);
}

// --- the kernels --------------------------------------------------------------------

// The bytes of a structured mask's small keep mask (none for a full mask):
// the product of its kept dimensions, read once from DRAM whatever the
// threads that share its entries.
inline int64_t structured_mask_bytes(const StructuredMask& sm) {
  if (sm.keep == nullptr) return 0;
  int64_t bytes = 1;
  for (int d = 0; d < sm.ndim; ++d) {
    if (sm.stride[d] != 0) bytes *= static_cast<int64_t>(sm.size[d].divisor);
  }
  return bytes;
}

struct NoShared {};

// The static shared memory of K's blocks: none for NoShared, which the GPU
// does not allocate.
template <class K>
constexpr size_t shared_bytes() {
  return std::is_empty<typename K::Shared>::value ? 0 : sizeof(typename K::Shared);
}

// A kernel whose threads keep state across its barriers (a row's cached
// values, running sums) declares Local, which lives in registers on the
// GPU and once per thread in the host driver, and rounds(params, idx), the
// same for every thread of a block: its phases then run that many rounds,
// with a barrier between any two phases, and take (params, idx, shared,
// local, round).
template <class K, class = void>
struct has_local : std::false_type {};
template <class K>
struct has_local<K, std::void_t<typename K::Local>> : std::true_type {};

// Forward, or backward without the bias gradient: a grid-stride walk over
// the steps of the flat tensor (step_elems: a unit each, or in the pack
// mode the units of one byte of the packed mask, whose thread draws the
// byte's 8 keep bits and stores it). A thread takes K steps at once, a
// block's chunk of kThreads x K steps per round (walk_lanes), thread t its
// steps t, t + kThreads, ...: each load instruction of a warp reads 512
// consecutive bytes, and a thread has all K steps' loads in flight before
// its first Philox round.
template <typename T, Act A, Dir D, MaskBits M>
struct ElementwiseKernel {
  static_assert(D == Dir::kForward || M != MaskBits::kPack, "only the forward packs the mask");
  static constexpr int E = Unit<T>::kElems;
  static constexpr int S = step_elems(Num<T>::kDType, M);
  static constexpr int U = S / E;  // units per step
  static constexpr int K = elementwise_steps_per_thread(Num<T>::kDType, A, D == Dir::kBackward, M);
  static_assert(S % E == 0 && (M != MaskBits::kPack || S == 8), "a step is whole units; a pack step one byte");
  struct Params {
    DropoutArgs a;
    bool vec;  // every streamed pointer 16-byte aligned
  };
  using Shared = NoShared;
  static constexpr int kPhases = 1;
  static constexpr int kBlocksPerSm = elementwise_blocks_per_sm(Num<T>::kDType, A, D == Dir::kBackward);

  // The steps of n elements, and the launch plan's work items: a thread's K.
  DX_HD static int64_t steps(int64_t n) { return (n + S - 1) / S; }
  static int64_t thread_items(int64_t n) { return (steps(n) + K - 1) / K; }

  // Each tensor streamed once; a thread has K steps of each in flight (and
  // in the read mode their mask bytes).
  static LaunchFacts facts(const Params& p, Grid2) {
    const DropoutArgs& a = p.a;
    const bool aux = D == Dir::kForward ? a.residual != nullptr : A != Act::kIdentity;
    const int64_t streams = 1 + (aux ? 1 : 0);
    const bool bias = a.bias != nullptr && (D == Dir::kForward || A != Act::kIdentity);
    LaunchFacts f;
    f.bytes_read = a.n * static_cast<int64_t>(sizeof(T)) * streams +
                   (bias ? static_cast<int64_t>(a.H.divisor * sizeof(T)) : 0) +
                   (M == MaskBits::kRead ? (a.n + 7) / 8 : 0) + structured_mask_bytes(a.mask);
    f.bytes_written = a.n * static_cast<int64_t>(sizeof(T)) + (M == MaskBits::kPack ? (a.n + 7) / 8 : 0);
    f.inflight_bytes_per_thread =
        K * (S * static_cast<int64_t>(sizeof(T)) * streams + (M == MaskBits::kRead ? (S + 7) / 8 : 0));
    walk_lanes(f, steps(a.n), K);
    return f;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared&) {
    const DropoutArgs& a = p.a;
    const int64_t steps_n = steps(a.n);
    constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * K;
    int64_t u = static_cast<int64_t>(idx.block_x) * kChunk + idx.thread;
    if (u >= steps_n) return;
    const int64_t stride = static_cast<int64_t>(idx.grid_x) * kChunk;
    const ThreadCtx<T> c = thread_ctx<T, D>(a, u == 0);
    const bool bias_cols = c.bias != nullptr && (D == Dir::kForward || A != Act::kIdentity);
    const bool plain_draw = M != MaskBits::kRead && !c.mp.keep_all && a.mask.keep == nullptr && a.map.ndims == 0;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
    for (; u < steps_n; u += stride) {
      // Step k: elements e0 + k * kThreads * S, of which len[k] (<= 0: none).
      const int64_t e0 = u * S;
      int len[K];
      uint32_t keep[K];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < K; ++k) {
        const int64_t ek = e0 + k * static_cast<int64_t>(kThreads) * S;
        len[k] = a.n - ek < S ? static_cast<int>(a.n - ek) : S;
        // The index arithmetic of a structured mask or a strided map runs
        // before the loads, so their registers are free for it.
        if (!plain_draw && M != MaskBits::kRead && len[k] > 0) keep[k] = mode_keep<S, M>(c.mp, a, ek, len[k]);
      }
      UnitIn<T> in[K][U];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < K; ++k) {
        const int64_t ek = e0 + k * static_cast<int64_t>(kThreads) * S;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int v = 0; v < U; ++v) {
          const int sub = len[k] - v * E < E ? len[k] - v * E : E;
          if (sub > 0) unit_load<T, A, D>(c, ek + v * E, sub, p.vec && sub == E, a.H, in[k][v]);
        }
        // The packed bits are a load too: in flight with the units'.
        if constexpr (M == MaskBits::kRead) {
          if (len[k] > 0) keep[k] = mode_keep<S, M>(c.mp, a, ek, len[k]);
        }
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < K; ++k) {
        if (len[k] <= 0) continue;
        const int64_t ek = e0 + k * static_cast<int64_t>(kThreads) * S;
        // Philox alone (mode_keep's path for a full mask under the identity
        // map) while the loads are in flight.
        if (plain_draw) keep[k] = philox_keep<S>(c.mp, a.map.base + ek, len[k]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
        for (int v = 0; v < U; ++v) {
          const int sub = len[k] - v * E < E ? len[k] - v * E : E;
          if (sub <= 0) break;
          const int64_t col = bias_cols ? fast_mod(ek + v * E, a.H) : 0;
          typename Num<T>::acc d[E];
          unit_math<T, A, D>(c, in[k][v], ek + v * E, sub, p.vec && sub == E, keep[k] >> (v * E), col, a.H, d);
        }
        if constexpr (M == MaskBits::kPack) {
          // Byte ek / 8 is this step's alone; the bits past n are zero.
          a.bits_out[ek >> 3] = static_cast<uint8_t>(keep[k] & ((1u << len[k]) - 1u));
        }
      }
    }
  }
};

// Backward with the bias gradient (see BiasGradPlan). Phase 0: each thread
// walks its rows in its column unit, R at a time, stores dx and sums the
// unrounded dx per column in registers, row after row, then parks the sums
// in shared memory. Phase 1: a thread per column of the tile adds the row
// lanes' sums in lane order and writes the block's partial sum.
template <typename T, Act A, MaskBits M>
struct BiasGradKernel {
  static_assert(M != MaskBits::kPack, "only the forward packs the mask");
  using acc_t = typename Num<T>::acc;
  static constexpr int E = Unit<T>::kElems;
  struct Params {
    DropoutArgs a;
    BiasGradPlan plan;
    bool vec;  // every streamed pointer 16-byte aligned and H % E == 0
  };
  struct Shared {
    acc_t sums[kThreads * E];  // [row lane][column of the tile]
  };
  static constexpr int kPhases = 2;
  static constexpr int kBlocksPerSm = bias_grad_blocks_per_sm(Num<T>::kDType, A);
  static constexpr int R = bias_grad_rows_per_lane(Num<T>::kDType, A);

  // As the elementwise backward, plus the row blocks' partial sums written;
  // a lane has R rows' units in flight (and in the read mode their bits).
  static LaunchFacts facts(const Params& p, Grid2 grid) {
    const DropoutArgs& a = p.a;
    const BiasGradPlan& g = p.plan;
    const int64_t H = static_cast<int64_t>(a.H.divisor);
    const int64_t streams = A != Act::kIdentity ? 2 : 1;
    LaunchFacts f;
    f.bytes_read = a.n * static_cast<int64_t>(sizeof(T)) * streams +
                   (a.bias != nullptr && A != Act::kIdentity ? H * static_cast<int64_t>(sizeof(T)) : 0) +
                   (M == MaskBits::kRead ? (a.n + 7) / 8 : 0) + structured_mask_bytes(a.mask);
    f.bytes_written = a.n * static_cast<int64_t>(sizeof(T)) + g.row_blocks * H * static_cast<int64_t>(sizeof(acc_t));
    f.inflight_bytes_per_thread = R * (E * static_cast<int64_t>(sizeof(T)) * streams + (M == MaskBits::kRead ? 1 : 0));
    // The row blocks' row steps, kThreads lanes each: a lane without a row
    // skips it, so only the last row block's short last step is part idle.
    const int64_t units = (H + E - 1) / E;
    const int64_t last = g.rows - (g.row_blocks - 1) * g.rows_per_block;
    const int64_t steps = (g.row_blocks - 1) * ((g.rows_per_block + g.row_lanes - 1) / g.row_lanes) +
                          (last + g.row_lanes - 1) / g.row_lanes;
    f.lane_slots = grid.x * kThreads * steps;
    f.busy_slots = g.rows * units;
    return f;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh) {
    const DropoutArgs& a = p.a;
    const BiasGradPlan& g = p.plan;
    const int64_t H = static_cast<int64_t>(a.H.divisor);
    const int tile_cols = g.col_units * E;
    if constexpr (kPhase == 0) {
      const int lane_c = static_cast<int>(idx.thread) & (g.col_units - 1);
      const int lane_r = static_cast<int>(idx.thread) >> g.col_shift;
      const int64_t c0 = (static_cast<int64_t>(idx.block_x) * g.col_units + lane_c) * E;
      acc_t acc[E];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < E; ++j) acc[j] = acc_t(0);
      if (c0 < H) {
        const ThreadCtx<T> c = thread_ctx<T, Dir::kBackward>(a, false);
        const int len = H - c0 < E ? static_cast<int>(H - c0) : E;
        const bool vec = p.vec && len == E;
        const int64_t r0 = static_cast<int64_t>(idx.block_y) * g.rows_per_block;
        const int64_t r1 = r0 + g.rows_per_block < g.rows ? r0 + g.rows_per_block : g.rows;
        // R of the lane's rows at once, all their loads issued before any of
        // their keep bits and math, then summed in row order.
        for (int64_t r = r0 + lane_r; r < r1; r += R * g.row_lanes) {
          UnitIn<T> u[R];
          uint32_t keep[R] = {};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int k = 0; k < R; ++k) {
            const int64_t e0 = (r + k * g.row_lanes) * H + c0;
            if (r + k * g.row_lanes < r1) {
              unit_load<T, A, Dir::kBackward>(c, e0, len, vec, a.H, u[k]);
              // The packed bits are a load too: in flight with the units'.
              if constexpr (M == MaskBits::kRead) keep[k] = mode_keep<E, M>(c.mp, a, e0, len);
            }
          }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int k = 0; k < R; ++k) {
            if (r + k * g.row_lanes >= r1) break;
            const int64_t e0 = (r + k * g.row_lanes) * H + c0;
            if constexpr (M != MaskBits::kRead) keep[k] = mode_keep<E, M>(c.mp, a, e0, len);
            acc_t d[E];
            unit_math<T, A, Dir::kBackward>(c, u[k], e0, len, vec, keep[k], c0, a.H, d);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
            for (int j = 0; j < E; ++j) {
              if (j < len) acc[j] += d[j];
            }
          }
        }
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < E; ++j) sh.sums[idx.thread * E + j] = acc[j];
    } else {
      const int t = static_cast<int>(idx.thread);
      if (t >= tile_cols) return;
      const int64_t col = static_cast<int64_t>(idx.block_x) * tile_cols + t;
      if (col >= H) return;
      acc_t s = acc_t(0);
      for (int lane = 0; lane < g.row_lanes; ++lane) s += sh.sums[lane * tile_cols + t];
      static_cast<acc_t*>(a.partial)[static_cast<int64_t>(idx.block_y) * H + col] = s;
    }
  }
};

// dbias[h] = the sum of the partial rows' column h, rounded once, in a fixed
// order that depends on their number only. A block per tile of kReduceCols
// columns (grid-stride over the tiles, a round each): warp w's lane c sums
// column c of the partial rows b with b % kReduceSlots == j * kRowLanes + w
// in its accumulator j, all kReduceAcc rows of a slot group in flight at
// once, so a thread waits on at most ceil(rows / kReduceSlots) loads in a
// row; then a thread per column adds the kReduceSlots sums in slot order.
template <typename T>
struct BiasReduceKernel {
  using acc_t = typename Num<T>::acc;
  static constexpr int kRowLanes = kThreads / kReduceCols;  // a warp each
  static_assert(kReduceCols == 32 && kRowLanes * kReduceAcc == kReduceSlots, "a warp per row lane");
  struct Params {
    const acc_t* partial;  // [rows, H]
    T* dbias;
    int64_t H;
    int64_t rows;
  };
  struct Shared {
    acc_t sums[kReduceSlots * kReduceCols];  // [slot][column of the tile]
  };
  struct Local {};
  static constexpr int kPhases = 2;
  static constexpr int kBlocksPerSm = kReduceBlocksPerSm;

  // The tiles of this block: block_x, + grid_x, ... The tile count fits 32
  // bits (H < 2**36 columns), so this is a 32-bit division, not the 64-bit
  // routine.
  DX_HD static int64_t rounds(const Params& p, const Idx& idx) {
    const uint32_t tiles = static_cast<uint32_t>((p.H + kReduceCols - 1) / kReduceCols);
    return tiles > idx.block_x ? (tiles - idx.block_x - 1) / idx.grid_x + 1 : 0;
  }

  // Each partial row read once by one warp: its 32 lanes' columns of the
  // tile, so only the last tile's lanes past H have none.
  static LaunchFacts facts(const Params& p, Grid2) {
    LaunchFacts f;
    f.bytes_read = p.rows * p.H * static_cast<int64_t>(sizeof(acc_t));
    f.bytes_written = p.H * static_cast<int64_t>(sizeof(T));
    // A lane's loads of one pass: kReduceAcc rows, fewer when there are not
    // that many rows per lane.
    const int64_t per_lane = (p.rows + kRowLanes - 1) / kRowLanes;
    f.inflight_bytes_per_thread =
        (per_lane < kReduceAcc ? per_lane : kReduceAcc) * static_cast<int64_t>(sizeof(acc_t));
    f.lane_slots = p.rows * ((p.H + kReduceCols - 1) / kReduceCols) * kReduceCols;
    f.busy_slots = p.rows * p.H;
    f.dependent_loads = reduce_chain(p.rows);
    return f;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared& sh, Local&, int64_t round) {
    const int c = static_cast<int>(idx.thread) % kReduceCols;
    const int64_t col = (static_cast<int64_t>(idx.block_x) + round * idx.grid_x) * kReduceCols + c;
    if constexpr (kPhase == 0) {
      const int w = static_cast<int>(idx.thread) / kReduceCols;
      acc_t s[kReduceAcc];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < kReduceAcc; ++j) s[j] = acc_t(0);
      if (col < p.H) {
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
        for (int64_t b0 = w; b0 < p.rows; b0 += kReduceSlots) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
          for (int j = 0; j < kReduceAcc; ++j) {
            const int64_t b = b0 + j * kRowLanes;
            if (b < p.rows) s[j] += p.partial[b * p.H + col];
          }
        }
      }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int j = 0; j < kReduceAcc; ++j) sh.sums[(j * kRowLanes + w) * kReduceCols + c] = s[j];
    } else {
      if (idx.thread >= static_cast<uint32_t>(kReduceCols) || col >= p.H) return;
      acc_t s = acc_t(0);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < kReduceSlots; ++k) s += sh.sums[k * kReduceCols + c];
      p.dbias[col] = Num<T>::store(s);
    }
  }
};

// The keep mask, one Philox group (four bytes) per thread step.
struct MaskKernel {
  struct Params {
    MaskArgs a;
    bool aligned;  // out is 4-byte aligned
  };
  using Shared = NoShared;
  static constexpr int kPhases = 1;
  static constexpr int kBlocksPerSm = kMaskBlocksPerSm;

  // Writes only: a byte per element, four per thread step.
  static LaunchFacts facts(const Params& p, Grid2) {
    LaunchFacts f;
    f.bytes_written = p.a.n;
    walk_lanes(f, (p.a.n + 3) / 4);
    f.dependent_loads = 0;
    return f;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared&) {
    const MaskArgs& a = p.a;
    const int64_t groups = (a.n + 3) / 4;
    int64_t grp = static_cast<int64_t>(idx.block_x) * kThreads + idx.thread;
    if (grp >= groups) return;
    const int64_t stride = static_cast<int64_t>(idx.grid_x) * kThreads;
    const MaskParams mp = state_params(a.state, grp == 0);
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
    for (; grp < groups; grp += stride) {
      const int64_t e0 = grp * 4;
      const int len = a.n - e0 < 4 ? static_cast<int>(a.n - e0) : 4;
      const uint32_t bits = mapped_keep<4>(mp, a.map, e0, len);
      if (p.aligned && len == 4) {
        // Byte k of the word is element e0 + k (little-endian, as the GPU).
        const uint32_t word = (bits & 1u) | ((bits & 2u) << 7) | ((bits & 4u) << 14) | ((bits & 8u) << 21);
#if defined(__CUDA_ARCH__)
        *reinterpret_cast<uint32_t*>(a.out + e0) = word;
#else
        std::memcpy(a.out + e0, &word, sizeof(word));
#endif
      } else {
        for (int k = 0; k < len; ++k) a.out[e0 + k] = (bits >> k) & 1u;
      }
    }
  }
};

// The mask mode of a launch as a compile-time constant, from which of
// bits_in and bits_out the glue set; kPack only where the kernels can pack
// (the forward).
template <bool kCanPack, typename F>
decltype(auto) dispatch_mask_bits(const DropoutArgs& a, F&& f) {
  if (a.bits_in != nullptr) return f(std::integral_constant<MaskBits, MaskBits::kRead>{});
  if constexpr (kCanPack) {
    if (a.bits_out != nullptr) return f(std::integral_constant<MaskBits, MaskBits::kPack>{});
  }
  return f(std::integral_constant<MaskBits, MaskBits::kDraw>{});
}

// A drawn state stored alone by one thread (the draw_state op): a StateRef's
// words by value, or a draw under graph capture (GraphDraw).
DX_HD void store_drawn(const StateRef& s) { state_params(s, true); }
DX_HD void store_drawn(const GraphDraw& d) { store_graph_draw(d); }

template <typename D>
struct StoreStateKernel {
  struct Params {
    D d;
  };
  using Shared = NoShared;
  static constexpr int kPhases = 1;
  static constexpr int kBlocksPerSm = kReduceBlocksPerSm;  // as many blocks as an SM's threads allow

  static LaunchFacts facts(const Params&, Grid2) {
    LaunchFacts f;
    f.bytes_written = 3 * sizeof(int64_t);
    f.lane_slots = kThreads;
    f.busy_slots = 1;
    f.dependent_loads = 0;
    return f;
  }

  template <int kPhase>
  DX_HD static void phase(const Params& p, const Idx& idx, Shared&) {
    if (idx.block_x == 0 && idx.thread == 0) store_drawn(p.d);
  }
};

// The launches of each op, written once for the CUDA launchers and the host
// driver: which kernels, with which parameters, on which grid, in order.
// r.launch<K>(params, grid) runs kernel K and returns false (keeping the
// error) when it could not.
template <class Runner>
bool run_forward(Runner& r, const DropoutArgs& a, int sm_count) {
  if (a.n == 0) return true;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_act(static_cast<Act>(a.act), [&](auto act) {
      return dispatch_mask_bits<true>(a, [&](auto bits) {
        using K = ElementwiseKernel<T, decltype(act)::value, Dir::kForward, decltype(bits)::value>;
        const Grid2 grid{flat_blocks(K::thread_items(a.n), sm_count, K::kBlocksPerSm), 1};
        return r.template launch<K>(typename K::Params{a, forward_vec(a)}, grid);
      });
    });
  });
}

template <class Runner>
bool run_backward(Runner& r, const DropoutArgs& a, int sm_count) {
  if (a.n == 0) return true;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int E = Unit<T>::kElems;
    return dispatch_act(static_cast<Act>(a.act), [&](auto act) {
      constexpr Act A = decltype(act)::value;
      return dispatch_mask_bits<false>(a, [&](auto bits) {
        constexpr MaskBits M = decltype(bits)::value;
        if (a.partial == nullptr) {
          using K = ElementwiseKernel<T, A, Dir::kBackward, M>;
          const Grid2 grid{flat_blocks(K::thread_items(a.n), sm_count, K::kBlocksPerSm), 1};
          return r.template launch<K>(typename K::Params{a, backward_vec(a)}, grid);
        }
        const int64_t H = static_cast<int64_t>(a.H.divisor);
        const BiasGradPlan plan = plan_bias_grad(a.n / H, H, a.dtype, A, sm_count);
        using K = BiasGradKernel<T, A, M>;
        if (!r.template launch<K>(typename K::Params{a, plan, backward_vec(a) && H % E == 0}, plan.grid)) {
          return false;
        }
        using R = BiasReduceKernel<T>;
        const typename R::Params rp{static_cast<const typename R::acc_t*>(a.partial), static_cast<T*>(a.dbias),
                                    H, plan.row_blocks};
        return r.template launch<R>(rp, Grid2{plan.reduce_blocks, 1});
      });
    });
  });
}

template <class Runner, typename D>
bool run_store_state(Runner& r, const D& d) {
  using K = StoreStateKernel<D>;
  return r.template launch<K>(typename K::Params{d}, Grid2{1, 1});
}

template <class Runner>
bool run_mask(Runner& r, const MaskArgs& a, int sm_count) {
  if (a.n == 0) return true;
  const bool aligned = (reinterpret_cast<uintptr_t>(a.out) & 3) == 0;
  const Grid2 grid{flat_blocks((a.n + 3) / 4, sm_count, MaskKernel::kBlocksPerSm), 1};
  return r.template launch<MaskKernel>(MaskKernel::Params{a, aligned}, grid);
}

}  // namespace cuda
}  // namespace dropout_ext
