// The elementwise CPU kernels: y = residual + dropout(act(x + bias)), its
// backward, and the keep mask (the ops are in elementwise.cpp).
//
// One pass over memory: the keep bits come from Philox in registers and are
// never stored. Loops are written so the compiler vectorises them in each
// ISA build (isa.h).
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../activations.h"
#include "../index_map.h"
#include "../philox.h"
#include "isa.h"
#include "philox_cpu.h"

namespace dropout_ext {
namespace cpu {

// Elements per task of at::parallel_for (whole rows of it for the norm ops).
constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t>
struct KernelArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = nullptr;     // forward input (backward: the saved input)
  const scalar_t* g = nullptr;     // backward: incoming gradient
  const scalar_t* bias = nullptr;
  const scalar_t* res = nullptr;
  scalar_t* out = nullptr;
  int64_t H = 1;                   // last dimension (bias length)
  MaskParams mp{};
  // Where each element draws its keep bit: its global index (a shard), or
  // its own index (the identity map).
  IndexMap map{};
  acc_t scale = acc_t(1);
  // structured masks: a precomputed keep mask indexed through mstride
  const bool* mask = nullptr;
  int64_t ndim = 0;
  const int64_t* sizes = nullptr;
  const int64_t* mstride = nullptr;
  // packed mask mode: the keep bits read instead of drawn, or written as
  // drawn (element i at bit i % 8 of byte i / 8)
  const uint8_t* bits_in = nullptr;
  uint8_t* bits_out = nullptr;
};

// Keep bits from a structured mask for the elements [pos, pos + len) of one
// row, whose first element has mask index mbase.
template <typename scalar_t>
DX_INLINE void struct_keep(const KernelArgs<scalar_t>& a, int64_t mbase, int64_t len, uint32_t* keep) {
  const int64_t ms = a.mstride[a.ndim - 1];
  for (int64_t j = 0; j < len; ++j) keep[j] = a.mask[mbase + j * ms] ? ~0u : kDropMask;
}

// Keep bits from the packed mask: a set bit gives all ones, a clear one the
// sign bit alone (as philox_keep). Byte-aligned runs (every chunk of a flat
// walk) take whole bytes with constant shifts, which the compiler vectorises.
DX_INLINE uint32_t keep_of_bit(uint32_t byte, int64_t t) { return kDropMask | (0u - ((byte >> t) & 1u)); }

DX_INLINE void bits_keep(const uint8_t* bits, int64_t pos, int64_t len, uint32_t* keep) {
  int64_t j = 0;
  for (; j < len && ((pos + j) & 7) != 0; ++j) keep[j] = keep_of_bit(bits[(pos + j) >> 3], (pos + j) & 7);
  for (; j + 8 <= len; j += 8) {
    const uint32_t byte = bits[(pos + j) >> 3];
    for (int t = 0; t < 8; ++t) keep[j + t] = keep_of_bit(byte, t);
  }
  for (; j < len; ++j) keep[j] = keep_of_bit(bits[(pos + j) >> 3], (pos + j) & 7);
}

// Writes the keep bits of [pos, pos + len); a byte shared with the previous
// chunk (rows not a multiple of 8 long) is finished here, on the same
// thread, since a thread's range starts on a byte boundary.
DX_INLINE void pack_keep(const uint32_t* keep, int64_t pos, int64_t len, uint8_t* bits) {
  int64_t j = 0;
  for (; j < len && ((pos + j) & 7) != 0; ++j) {
    const int64_t i = pos + j;
    bits[i >> 3] = static_cast<uint8_t>(bits[i >> 3] | ((keep[j] & 1u) << (i & 7)));
  }
  for (; j + 8 <= len; j += 8) {
    uint32_t b = 0;
    for (int t = 0; t < 8; ++t) b |= (keep[j + t] & 1u) << t;
    bits[(pos + j) >> 3] = static_cast<uint8_t>(b);
  }
  if (j < len) {
    uint32_t b = 0;
    for (int t = 0; j + t < len; ++t) b |= (keep[j + t] & 1u) << t;
    bits[(pos + j) >> 3] = static_cast<uint8_t>(b);
  }
}

// Mask index of the first element of the row that holds element pos.
DX_INLINE int64_t mask_row_base(int64_t pos, int64_t ndim, const int64_t* sizes,
                                const int64_t* mstride) {
  int64_t rem = pos / sizes[ndim - 1];
  int64_t base = 0;
  for (int64_t d = ndim - 2; d >= 0; --d) {
    const int64_t idx = rem % sizes[d];
    rem /= sizes[d];
    base += idx * mstride[d];
  }
  return base + (pos % sizes[ndim - 1]) * mstride[ndim - 1];
}

template <typename acc_t>
DX_INLINE acc_t select_kept(acc_t v, uint32_t keep) {
  if constexpr (sizeof(acc_t) == 4) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b &= keep;
    std::memcpy(&v, &b, 4);
  } else {
    uint64_t b;
    std::memcpy(&b, &v, 8);
    const uint32_t low = keep == ~0u ? ~0u : 0u;
    b &= (static_cast<uint64_t>(keep) << 32) | low;
    std::memcpy(&v, &b, 8);
  }
  return v;
}

template <typename scalar_t, Act A, bool BIAS>
DX_INLINE void fwd_chunk(const KernelArgs<scalar_t>& a, int64_t pos, int64_t len, int64_t h,
                         const uint32_t* keep, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x + pos;
  const acc_t scale = a.scale;
  if (a.res != nullptr) {
    const scalar_t* r = a.res + pos;
    for (int64_t j = 0; j < len; ++j) {
      acc_t v = static_cast<acc_t>(x[j]);
      if constexpr (BIAS) v = v + static_cast<acc_t>(a.bias[h + j]);
      const acc_t kept = ActOps<A>::fwd(v) * scale;
      y[j] = static_cast<scalar_t>(static_cast<acc_t>(r[j]) + select_kept(kept, keep[j]));
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      acc_t v = static_cast<acc_t>(x[j]);
      if constexpr (BIAS) v = v + static_cast<acc_t>(a.bias[h + j]);
      const acc_t kept = ActOps<A>::fwd(v) * scale;
      y[j] = static_cast<scalar_t>(select_kept(kept, keep[j]));
    }
  }
}

template <typename scalar_t, Act A, bool BIAS>
DX_INLINE void bwd_chunk(const KernelArgs<scalar_t>& a, int64_t pos, int64_t len, int64_t h,
                         const uint32_t* keep, at::opmath_type<scalar_t>* partial, scalar_t* dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = a.g + pos;
  const acc_t scale = a.scale;
  acc_t tmp[kChunk];
  for (int64_t j = 0; j < len; ++j) {
    const acc_t gs = static_cast<acc_t>(g[j]) * scale;
    acc_t d = gs;
    if constexpr (A != Act::kIdentity) {
      acc_t v = static_cast<acc_t>(a.x[pos + j]);
      if constexpr (BIAS) v = v + static_cast<acc_t>(a.bias[h + j]);
      d = act_backward<A, acc_t>(gs, v);
    }
    tmp[j] = select_kept(d, keep[j]);
    dx[j] = static_cast<scalar_t>(tmp[j]);
  }
  if (partial != nullptr) {
    for (int64_t j = 0; j < len; ++j) partial[h + j] += tmp[j];
  }
}

// Input streams are prefetched this far ahead of the chunk being worked on.
// The hardware prefetchers stop at each 4 KiB page and, with the Philox work
// between one chunk's loads and the next's, never get ahead again, so without
// this every page of a large input starts with misses that nothing overlaps
// (measured: float32 forward of 2**24 elements on two cores, 1.26x the time
// of clone() without, about 1.1x with, AVX-512).
constexpr int64_t kPrefetchBytes = 2048;

template <typename scalar_t>
DX_INLINE void prefetch_ahead(const scalar_t* p, int64_t pos, int64_t len, int64_t end) {
  if (p == nullptr) return;
  constexpr int64_t size = sizeof(scalar_t);
  const int64_t from = pos + kPrefetchBytes / size;
  const int64_t to = std::min(end, from + len);
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = from * size; b < to * size; b += 64) __builtin_prefetch(bytes + b);
}

// The elements of a chunk from local element pos: at most `most`, ending on
// a local group boundary (chunks of a flat walk are whole groups, and start
// on a byte of the packed mask), and consecutive in the global index (a
// shard's chunk ends with its run). A shard whose run starts inside a
// Philox group draws one group more per chunk (philox_keep takes any start)
// rather than cutting its chunks short. Returns pos's global index.
DX_INLINE int64_t chunk_at(const IndexMap& map, int64_t pos, int64_t& most) {
  most = map.run_from(pos, std::min<int64_t>(most, kChunk - (pos & 3)));
  return map.global(pos);
}

// Walks logical elements [begin, end) in chunks that never cross a row when
// the chunk needs a row position (bias, structured mask).
template <typename scalar_t, Act A, bool BIAS, bool BWD, Isa I>
DX_INLINE void walk_range(const KernelArgs<scalar_t>& a, int64_t begin, int64_t end,
                          at::opmath_type<scalar_t>* partial) {
  const bool structured = a.mask != nullptr;
  const bool rowwise = BIAS || structured || partial != nullptr;
  uint32_t keep[kChunk];
  int64_t pos = begin;
  while (pos < end) {
    int64_t len = end - pos;
    const int64_t g = chunk_at(a.map, pos, len);
    int64_t h = 0;
    if (rowwise) {
      h = pos % a.H;
      len = std::min<int64_t>(len, a.H - h);
    }
    if constexpr (BWD) {
      prefetch_ahead(a.g, pos, len, end);
      if constexpr (A != Act::kIdentity) prefetch_ahead(a.x, pos, len, end);
    } else {
      prefetch_ahead(a.x, pos, len, end);
      prefetch_ahead(a.res, pos, len, end);
    }
    if (a.bits_in != nullptr) {
      bits_keep(a.bits_in, pos, len, keep);
    } else if (structured) {
      struct_keep(a, mask_row_base(pos, a.ndim, a.sizes, a.mstride), len, keep);
    } else {
      philox_keep<I>(a.mp, g, len, keep);
    }
    if (a.bits_out != nullptr) pack_keep(keep, pos, len, a.bits_out);
    scalar_t* dst = a.out + pos;
    if constexpr (BWD) {
      bwd_chunk<scalar_t, A, BIAS>(a, pos, len, h, keep, partial, dst);
    } else {
      fwd_chunk<scalar_t, A, BIAS>(a, pos, len, h, keep, dst);
    }
    pos += len;
  }
}

// Keep bits of logical elements [begin, end) into out[0, end - begin).
template <Isa I>
DX_INLINE void mask_range(const MaskParams& mp, const IndexMap& map, bool* out, int64_t begin, int64_t end) {
  uint32_t keep[kChunk];
  int64_t pos = begin;
  while (pos < end) {
    int64_t len = end - pos;
    const int64_t g = chunk_at(map, pos, len);
    philox_keep<I>(mp, g, len, keep);
    bool* o = out + (pos - begin);
    for (int64_t j = 0; j < len; ++j) o[j] = keep[j] == ~0u;
    pos += len;
  }
}

template <typename scalar_t, Act A, bool BIAS, bool BWD>
struct Walk {
  template <Isa I>
  static DX_INLINE void run(const KernelArgs<scalar_t>* a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
    walk_range<scalar_t, A, BIAS, BWD, I>(*a, b, e, part);
  }
};

struct MaskFill {
  template <Isa I>
  static DX_INLINE void run(const MaskParams* mp, const IndexMap* map, bool* out, int64_t b, int64_t e) {
    mask_range<I>(*mp, *map, out, b, e);
  }
};

// Every Walk the ops call, as X(scalar_t, A, BIAS, BWD): each dtype and
// activation, with and without bias, except the identity's backward with a
// bias (its gradient does not read x + bias). Each ISA build instantiates
// these (elementwise_isa.inc); a Walk missing here is an undefined symbol
// when the extension loads.
#define DX_WALK_ACTS(X, s, BIAS, BWD) \
  X(s, Act::kRelu, BIAS, BWD) X(s, Act::kGelu, BIAS, BWD) X(s, Act::kGeluTanh, BIAS, BWD) X(s, Act::kSilu, BIAS, BWD)
#define DX_WALKS_OF_TYPE(X, s)                                                                             \
  X(s, Act::kIdentity, false, false) X(s, Act::kIdentity, true, false) X(s, Act::kIdentity, false, true) \
  DX_WALK_ACTS(X, s, false, false) DX_WALK_ACTS(X, s, true, false) DX_WALK_ACTS(X, s, false, true)       \
  DX_WALK_ACTS(X, s, true, true)
#define DX_WALKS(X)                                                                     \
  DX_WALKS_OF_TYPE(X, double) DX_WALKS_OF_TYPE(X, float) DX_WALKS_OF_TYPE(X, c10::Half) \
  DX_WALKS_OF_TYPE(X, c10::BFloat16)

// The entry points the ops call, with the argument types the ISA builds are
// instantiated for.
template <typename scalar_t, Act A, bool BIAS, bool BWD>
void walk(const KernelArgs<scalar_t>& a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
  run_isa<Walk<scalar_t, A, BIAS, BWD>>(&a, b, e, part);
}

inline void mask_fill(const MaskParams& mp, const IndexMap& map, bool* out, int64_t b, int64_t e) {
  run_isa<MaskFill>(&mp, &map, out, b, e);
}

}  // namespace cpu
}  // namespace dropout_ext
