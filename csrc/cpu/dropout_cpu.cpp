// Fused CPU kernels for y = residual + dropout(act(x + bias)), its backward
// and the keep mask, registered for the CPU dispatch key.
//
// One pass over memory: the keep bits come from Philox in registers (one call
// per four elements) and are never stored. Loops are written so the compiler
// vectorises them; each loop is built for the baseline x86-64, AVX2 and
// AVX-512 and the best one the CPU has is chosen at run time, so a
// distributed build needs no -march flag.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../activations.h"
#include "../op_common.h"
#include "../philox.h"

namespace dropout_ext {
namespace {

#define DX_INLINE inline __attribute__((always_inline))

// The instruction sets each loop is built for. Every build of a loop derives
// the same bits (the tests run the suite on each), so the choice is speed only.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Elements handled per inner step: kChunk / 4 Philox groups, whose words
// stay in L1 between the draw and the element loop.
constexpr int64_t kChunk = 256;
constexpr int64_t kGrain = 1 << 15;
constexpr uint32_t kDropMask = 0x80000000u;

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

DX_INLINE void philox_words_scalar(const MaskParams& mp, uint64_t g0, int64_t ngroups, uint32_t* w) {
  for (int64_t j = 0; j < ngroups; ++j) philox_group(mp, g0 + static_cast<uint64_t>(j), w + 4 * j);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DX_HAVE_X86_BUILDS 1
#define DX_TARGET_AVX2 __attribute__((target("avx2")))
// BW, DQ and VL come with every AVX-512 CPU since Skylake-SP; asking for them
// lets the compiler use byte/word and 256-bit EVEX forms in the element loops.
#define DX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
// Philox groups in AVX2 registers, each counter word held in the low half of
// a 64-bit lane: vpmuludq then yields the whole 64-bit product, so a round
// costs two multiplies, two shifts and four xors per four groups (no blends);
// the high halves carry garbage that vpmuludq ignores and the final pack
// drops. kLanes independent chains of four groups run interleaved to hide
// the multiply latency. Words land in element order (group g at w[4g..4g+3]).
constexpr int kLanes = 4;
constexpr int64_t kGroupsPerStep = 4 * kLanes;

// The key schedule (k0, k1 of rounds 0..9, interleaved), computed once per
// range; each SIMD build broadcasts these words into its registers.
struct RoundKeys {
  uint32_t k[20];
  explicit RoundKeys(const MaskParams& mp) {
    uint32_t k0 = mp.key0, k1 = mp.key1;
    for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
      k[2 * r] = k0;
      k[2 * r + 1] = k1;
    }
  }
};

DX_TARGET_AVX2 inline void philox_step_avx2(uint64_t g, __m256i c2v, __m256i c3v, const __m256i* keys,
                                            uint32_t* w) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0);
  const __m256i m1 = _mm256_set1_epi64x(kPhiloxM1);
  __m256i c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    // 64-bit group numbers, split into counter words; a step may cross a
    // 2**32 boundary of the group number.
    const int64_t base = static_cast<int64_t>(g) + 4 * l;
    c0[l] = _mm256_add_epi64(_mm256_set1_epi64x(base), _mm256_setr_epi64x(0, 1, 2, 3));
    c1[l] = _mm256_srli_epi64(c0[l], 32);
    c2[l] = c2v;
    c3[l] = c3v;
  }
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      const __m256i p0 = _mm256_mul_epu32(c0[l], m0);
      const __m256i p1 = _mm256_mul_epu32(c2[l], m1);
      c0[l] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[l]), keys[2 * r]);
      c2[l] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[l]), keys[2 * r + 1]);
      c1[l] = p1;
      c3[l] = p0;
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    // (w0, w1) and (w2, w3) of four groups as 32-bit pairs, then group order.
    const __m256i a = _mm256_blend_epi32(c0[l], _mm256_slli_epi64(c1[l], 32), 0xAA);
    const __m256i b = _mm256_blend_epi32(c2[l], _mm256_slli_epi64(c3[l], 32), 0xAA);
    const __m256i g02 = _mm256_unpacklo_epi64(a, b);
    const __m256i g13 = _mm256_unpackhi_epi64(a, b);
    __m256i* out = reinterpret_cast<__m256i*>(w + 16 * l);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(g02, g13, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(g02, g13, 0x31));
  }
}

DX_TARGET_AVX2 inline void philox_words_avx2(const MaskParams& mp, uint64_t g0, int64_t ngroups, uint32_t* w) {
  const RoundKeys rk(mp);
  __m256i keys[20];
  for (int i = 0; i < 20; ++i) keys[i] = _mm256_set1_epi64x(rk.k[i]);
  const __m256i c2 = _mm256_set1_epi64x(mp.offset_lo);
  const __m256i c3 = _mm256_set1_epi64x(mp.offset_hi);
  for (int64_t j = 0; j < ngroups; j += kGroupsPerStep) {
    philox_step_avx2(g0 + static_cast<uint64_t>(j), c2, c3, keys, w + 4 * j);
  }
}

// The same scheme in AVX-512 registers: eight groups per register, and each
// three-way xor one vpternlogq, so a round is six instructions per eight
// groups. Four chains (32 groups) use 16 of the 32 registers for the state, so
// nothing spills, and give the multiply-shift-xor dependency of a round
// enough independent work to hide its latency: the rounds then run at the
// throughput of the vector units (on Zen 4 five or six chains are no faster,
// and the final permutes and the threshold compare cost nothing measurable).
// Words land in element order, exactly as in the AVX2 version, so the
// threshold compare is philox_keep's shared loop, 16 words per instruction in
// this build.
constexpr int kChains512 = 4;
constexpr int64_t kGroupsPerStep512 = 8 * kChains512;

// GCC 12's AVX-512 intrinsics pass a self-initialised "undefined" vector as
// the unused merge source, which -Wmaybe-uninitialized reports (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int kChains>
DX_TARGET_AVX512 inline void philox_step_avx512(uint64_t g, __m512i c2v, __m512i c3v, const __m512i* keys,
                                                uint32_t* w) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0);
  const __m512i m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  for (int l = 0; l < kChains; ++l) {
    // 64-bit group numbers, split into counter words; a step may cross a
    // 2**32 boundary of the group number.
    c0[l] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(g + 8 * l)), lane);
    c1[l] = _mm512_srli_epi64(c0[l], 32);
    c2[l] = c2v;
    c3[l] = c3v;
  }
  constexpr int kXor3 = 0x96;  // vpternlogq truth table of a ^ b ^ c
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < kChains; ++l) {
      const __m512i p0 = _mm512_mul_epu32(c0[l], m0);
      const __m512i p1 = _mm512_mul_epu32(c2[l], m1);
      c0[l] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p1, 32), c1[l], keys[2 * r], kXor3);
      c2[l] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(p0, 32), c3[l], keys[2 * r + 1], kXor3);
      c1[l] = p1;
      c3[l] = p0;
    }
  }
  // (w0, w1) and (w2, w3) of eight groups as 32-bit pairs, one two-source
  // permute each (the low halves only), then the pairs in group order.
  const __m512i pairs = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
  const __m512i first4 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i last4 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int l = 0; l < kChains; ++l) {
    const __m512i a = _mm512_permutex2var_epi32(c0[l], pairs, c1[l]);
    const __m512i b = _mm512_permutex2var_epi32(c2[l], pairs, c3[l]);
    _mm512_storeu_si512(w + 32 * l, _mm512_permutex2var_epi64(a, first4, b));
    _mm512_storeu_si512(w + 32 * l + 16, _mm512_permutex2var_epi64(a, last4, b));
  }
}

DX_TARGET_AVX512 inline void philox_words_avx512(const MaskParams& mp, uint64_t g0, int64_t ngroups,
                                                 uint32_t* w) {
  const RoundKeys rk(mp);
  __m512i keys[20];
  for (int i = 0; i < 20; ++i) keys[i] = _mm512_set1_epi64(rk.k[i]);
  const __m512i c2 = _mm512_set1_epi64(mp.offset_lo);
  const __m512i c3 = _mm512_set1_epi64(mp.offset_hi);
  int64_t j = 0;
  for (; j + kGroupsPerStep512 <= ngroups; j += kGroupsPerStep512) {
    philox_step_avx512<kChains512>(g0 + static_cast<uint64_t>(j), c2, c3, keys, w + 4 * j);
  }
  // A short range (a row of a few elements) draws eight groups at a time,
  // not a whole step of 32.
  for (; j < ngroups; j += 8) {
    philox_step_avx512<1>(g0 + static_cast<uint64_t>(j), c2, c3, keys, w + 4 * j);
  }
}
#pragma GCC diagnostic pop

// A chunk spans at most kChunk / 4 groups, which the AVX-512 generator
// rounds up to a multiple of 8: it never writes past philox_keep's buffer.
static_assert((kChunk / 4) % 8 == 0, "a chunk's groups must be a multiple of the AVX-512 tail step");
#endif

// Keep bits for logical elements [pos, pos + len), len <= kChunk, as 32-bit
// and-masks: all ones to keep, the sign bit alone to drop. The and turns a
// dropped value into a zero of its own sign, which is what x * 0 gives in
// nn.Dropout for finite x, and into a zero for NaN and Inf too, without a
// branch, so the element loops vectorise. Philox lanes are independent and vectorise too.
template <Isa I>
DX_INLINE void philox_keep(const MaskParams& mp, int64_t pos, int64_t len, uint32_t* keep) {
  if (mp.keep_all) {  // p == 0 or no state: no word is needed
    std::fill(keep, keep + len, ~0u);
    return;
  }
  uint32_t w[kChunk + 4 + 64];  // room for a last, partly used step of 16 groups
  const uint64_t g0 = static_cast<uint64_t>(pos) >> 2;
  const int64_t ngroups = ((pos + len - 1) >> 2) - static_cast<int64_t>(g0) + 1;
#ifdef DX_HAVE_X86_BUILDS
  if constexpr (I == Isa::kAvx512) {
    philox_words_avx512(mp, g0, ngroups, w);
  } else if constexpr (I == Isa::kAvx2) {
    philox_words_avx2(mp, g0, ngroups, w);
  } else
#endif
  {
    philox_words_scalar(mp, g0, ngroups, w);
  }
  const int64_t first = pos & 3;
  const uint32_t t = mp.threshold;
  const uint32_t any = mp.drop_all ? kDropMask : ~0u;
  for (int64_t j = 0; j < len; ++j) keep[j] = (w[first + j] >= t ? ~0u : kDropMask) & any;
}

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
    int64_t len = std::min<int64_t>(end - pos, kChunk - (pos & 3));
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
      philox_keep<I>(a.mp, pos, len, keep);
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
DX_INLINE void mask_range(const MaskParams& mp, bool* out, int64_t begin, int64_t end) {
  uint32_t keep[kChunk];
  int64_t pos = begin;
  while (pos < end) {
    const int64_t len = std::min<int64_t>(end - pos, kChunk - (pos & 3));
    philox_keep<I>(mp, pos, len, keep);
    bool* o = out + (pos - begin);
    for (int64_t j = 0; j < len; ++j) o[j] = keep[j] == ~0u;
    pos += len;
  }
}

// The same loops built once per instruction set. Each entry point is compiled
// for its target, and the loop bodies inline into it and are vectorised for
// it; nothing else in the file assumes more than the baseline.
template <typename scalar_t, Act A, bool BIAS, bool BWD>
void walk_baseline(const KernelArgs<scalar_t>& a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
  walk_range<scalar_t, A, BIAS, BWD, Isa::kBaseline>(a, b, e, part);
}
void mask_baseline(const MaskParams& mp, bool* out, int64_t b, int64_t e) {
  mask_range<Isa::kBaseline>(mp, out, b, e);
}

#ifdef DX_HAVE_X86_BUILDS
template <typename scalar_t, Act A, bool BIAS, bool BWD>
DX_TARGET_AVX2 void walk_avx2(const KernelArgs<scalar_t>& a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
  walk_range<scalar_t, A, BIAS, BWD, Isa::kAvx2>(a, b, e, part);
}
DX_TARGET_AVX2 void mask_avx2(const MaskParams& mp, bool* out, int64_t b, int64_t e) {
  mask_range<Isa::kAvx2>(mp, out, b, e);
}
template <typename scalar_t, Act A, bool BIAS, bool BWD>
DX_TARGET_AVX512 void walk_avx512(const KernelArgs<scalar_t>& a, int64_t b, int64_t e,
                                  at::opmath_type<scalar_t>* part) {
  walk_range<scalar_t, A, BIAS, BWD, Isa::kAvx512>(a, b, e, part);
}
DX_TARGET_AVX512 void mask_avx512(const MaskParams& mp, bool* out, int64_t b, int64_t e) {
  mask_range<Isa::kAvx512>(mp, out, b, e);
}
#endif

// --- which build runs -----------------------------------------------------------

constexpr const char* kIsaEnv = "DROPOUT_EXT_CPU_ISA";
constexpr Isa kIsas[] = {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512};

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kBaseline:
    default: return "baseline";
  }
}

// Asks the CPU (and, through libgcc, the OS: AVX-512 counts only when the
// kernel saves its registers).
bool isa_supported(Isa isa) {
#ifdef DX_HAVE_X86_BUILDS
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    case Isa::kAvx2: return __builtin_cpu_supports("avx2");
    case Isa::kBaseline:
    default: return true;
  }
#else
  return isa == Isa::kBaseline;
#endif
}

std::string supported_isa_names() {
  std::string names;
  for (Isa isa : kIsas) {
    if (isa_supported(isa)) names += std::string(names.empty() ? "" : ", ") + isa_name(isa);
  }
  return names;
}

// An ISA by name, for the environment variable and the test hook (`who`
// names which, so the error says what to fix).
Isa parse_isa(c10::string_view name, const char* who) {
  for (Isa isa : kIsas) {
    if (name == isa_name(isa)) {
      TORCH_CHECK(isa_supported(isa), who, "=", std::string(name), ": this CPU does not support ", isa_name(isa),
                  " (it supports: ", supported_isa_names(), ")");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, who, " must be one of 'baseline', 'avx2', 'avx512', got '", std::string(name), "'");
}

Isa isa_from_environment() {
  const char* value = std::getenv(kIsaEnv);
  if (value != nullptr && *value != '\0') return parse_isa(value, kIsaEnv);
  Isa best = Isa::kBaseline;
  for (Isa isa : kIsas) {
    if (isa_supported(isa)) best = isa;
  }
  return best;
}

// The ISA in force: the environment's choice (or the best the CPU has),
// decided at the first kernel call; the test hook can change it. Atomic, as
// kernels read it from worker threads; a change mid-call would only mix
// builds that give the same bits.
std::atomic<Isa>& isa_in_force() {
  static std::atomic<Isa> isa{isa_from_environment()};
  return isa;
}

template <typename scalar_t, Act A, bool BIAS, bool BWD>
void walk(const KernelArgs<scalar_t>& a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
  switch (isa_in_force().load(std::memory_order_relaxed)) {
#ifdef DX_HAVE_X86_BUILDS
    case Isa::kAvx512: return walk_avx512<scalar_t, A, BIAS, BWD>(a, b, e, part);
    case Isa::kAvx2: return walk_avx2<scalar_t, A, BIAS, BWD>(a, b, e, part);
#endif
    default: return walk_baseline<scalar_t, A, BIAS, BWD>(a, b, e, part);
  }
}

void mask_fill(const MaskParams& mp, bool* out, int64_t b, int64_t e) {
  switch (isa_in_force().load(std::memory_order_relaxed)) {
#ifdef DX_HAVE_X86_BUILDS
    case Isa::kAvx512: return mask_avx512(mp, out, b, e);
    case Isa::kAvx2: return mask_avx2(mp, out, b, e);
#endif
    default: return mask_baseline(mp, out, b, e);
  }
}

// The keep mask of a (small) structured mask shape, materialised once.
at::Tensor keep_mask_cpu(const MaskParams& mp, at::IntArrayRef shape) {
  at::Tensor m = at::empty(shape, at::TensorOptions().dtype(at::kBool));
  bool* out = m.data_ptr<bool>();
  at::parallel_for(0, m.numel(), kGrain, [&](int64_t b, int64_t e) { mask_fill(mp, out + b, b, e); });
  return m;
}

struct Layout {
  std::vector<int64_t> mshape;
  std::vector<int64_t> sizes;
  std::vector<int64_t> mstride;
  at::Tensor mask;  // defined for structured masks only
};

template <typename scalar_t>
void fill_common(KernelArgs<scalar_t>& a, Layout& lay, const at::Tensor& input, const MaskParams& mp) {
  using acc_t = at::opmath_type<scalar_t>;
  a.mp = mp;
  a.scale = static_cast<acc_t>(mp.scale);
  a.H = input.dim() >= 1 ? std::max<int64_t>(input.size(-1), 1) : 1;
  if (lay.mask.defined()) {
    a.mask = lay.mask.const_data_ptr<bool>();
    a.ndim = input.dim();
    a.sizes = lay.sizes.data();
    a.mstride = lay.mstride.data();
  }
}

// A structured mask is drawn once at its own small shape and read through
// strides; no state means nothing is dropped, so no mask is drawn at all.
Layout make_layout(const at::Tensor& input, at::IntArrayRef mask_shape, const MaskParams& mp) {
  Layout lay;
  lay.mshape = resolve_mask_shape(input, mask_shape);
  if (!is_full_mask(input, lay.mshape) && !mp.keep_all) {
    lay.sizes = input.sizes().vec();
    lay.mstride = mask_strides(input, lay.mshape);
    lay.mask = keep_mask_cpu(mp, lay.mshape);
  }
  return lay;
}

// Threads take ranges of whole bytes of the packed mask, so no two write one byte.
template <typename F>
void parallel_bytes(int64_t n, const F& f) {
  at::parallel_for(0, mask_bits_size(n), kGrain / 8,
                   [&](int64_t b0, int64_t b1) { f(b0 * 8, std::min(b1 * 8, n)); });
}

std::tuple<at::Tensor, at::Tensor> fused_dropout_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    const std::optional<at::Tensor>& mask_bits, bool pack_mask) {
  const Act act = check_forward(input, bias, residual, state, activation, mask_shape, mask_bits, pack_mask);
  at::Tensor bits = mask_bits_output(input, state, mask_shape, pack_mask);
  const MaskParams mp = host_mask_params(state);
  Layout lay = make_layout(input, mask_shape, mp);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return {like_input(input, out), bits};
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bits.has_value() ? mask_bits->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_dropout_cpu", [&] {
    KernelArgs<scalar_t> a;
    fill_common(a, lay, x, mp);
    a.x = x.const_data_ptr<scalar_t>();
    a.out = out.data_ptr<scalar_t>();
    if (b.defined()) a.bias = b.const_data_ptr<scalar_t>();
    if (r.defined()) a.res = r.const_data_ptr<scalar_t>();
    if (mb.defined()) a.bits_in = mb.const_data_ptr<uint8_t>();
    if (bits.numel() > 0) a.bits_out = bits.data_ptr<uint8_t>();
    dispatch_act(act, [&](auto act_c) {
      constexpr Act A = decltype(act_c)::value;
      parallel_bytes(n, [&](int64_t lo, int64_t hi) {
        if (a.bias != nullptr) {
          walk<scalar_t, A, true, false>(a, lo, hi, nullptr);
        } else {
          walk<scalar_t, A, false, false>(a, lo, hi, nullptr);
        }
      });
    });
  });
  return {like_input(input, out), bits};
}

std::tuple<at::Tensor, at::Tensor> fused_dropout_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& state, c10::string_view activation, at::IntArrayRef mask_shape,
    bool bias_grad, const std::optional<at::Tensor>& mask_bits) {
  const Act act = check_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits);
  const MaskParams mp = host_mask_params(state);
  Layout lay = make_layout(grad, mask_shape, mp);
  const at::Tensor g = grad.contiguous();
  const at::Tensor x = input.has_value() ? input->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor mb = mask_bits.has_value() ? mask_bits->contiguous() : at::Tensor();
  at::Tensor dx, dbias;
  std::tie(dx, dbias) = backward_outputs(g, bias_grad);
  const int64_t n = g.numel();
  if (n == 0) return {like_input(grad, dx), dbias};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fused_dropout_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    KernelArgs<scalar_t> a;
    fill_common(a, lay, g, mp);
    a.g = g.const_data_ptr<scalar_t>();
    a.out = dx.data_ptr<scalar_t>();
    if (x.defined()) a.x = x.const_data_ptr<scalar_t>();
    if (b.defined()) a.bias = b.const_data_ptr<scalar_t>();
    if (mb.defined()) a.bits_in = mb.const_data_ptr<uint8_t>();
    dispatch_act(act, [&](auto act_c) {
      constexpr Act A = decltype(act_c)::value;
      auto run = [&](int64_t lo, int64_t hi, acc_t* part) {
        if (a.bias != nullptr && A != Act::kIdentity) {
          walk<scalar_t, A, true, true>(a, lo, hi, part);
        } else {
          walk<scalar_t, A, false, true>(a, lo, hi, part);
        }
      };
      if (!bias_grad) {
        parallel_bytes(n, [&](int64_t lo, int64_t hi) { run(lo, hi, nullptr); });
        return;
      }
      // Deterministic bias reduction: row blocks fixed by the shape alone,
      // partial sums per block, then one ordered pass over the blocks.
      const int64_t H = a.H;
      const int64_t rows = n / H;
      const int64_t rows_per_block = std::max<int64_t>(1, (rows + 255) / 256);
      const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
      std::vector<acc_t> partial(static_cast<size_t>(blocks * H), acc_t(0));
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * rows_per_block;
          const int64_t r1 = std::min(rows, r0 + rows_per_block);
          run(r0 * H, r1 * H, partial.data() + blk * H);
        }
      });
      scalar_t* db = dbias.data_ptr<scalar_t>();
      at::parallel_for(0, H, 1024, [&](int64_t h0, int64_t h1) {
        for (int64_t hh = h0; hh < h1; ++hh) {
          acc_t s = acc_t(0);
          for (int64_t blk = 0; blk < blocks; ++blk) s += partial[blk * H + hh];
          db[hh] = static_cast<scalar_t>(s);
        }
      });
    });
  });
  return {like_input(grad, dx), dbias};
}

at::Tensor dropout_mask_cpu(const at::Tensor& state, at::IntArrayRef shape) {
  check_mask_args(state, shape);
  return keep_mask_cpu(host_mask_params(state), shape);
}

// --- test hooks -------------------------------------------------------------------

// Sets the ISA of later calls ("" leaves it) and returns the one in force
// before, so a test can restore it.
std::string test_cpu_isa(c10::string_view isa) {
  std::atomic<Isa>& in_force = isa_in_force();
  if (isa.empty()) return isa_name(in_force.load());
  return isa_name(in_force.exchange(parse_isa(isa, "cpu_isa")));
}

std::vector<std::string> test_cpu_isas() {
  std::vector<std::string> names;
  for (Isa isa : kIsas) {
    if (isa_supported(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

// Keep bits of logical elements [start, start + length) of an unbounded
// tensor: group numbers past 2**32 (and up to 2**61) that no real tensor
// reaches, and a start at any element of a group.
at::Tensor test_cpu_mask_range(const at::Tensor& state, int64_t start, int64_t length) {
  check_mask_args(state, {length});
  TORCH_CHECK_VALUE(start >= 0 && start <= std::numeric_limits<int64_t>::max() - length,
                    "cpu_mask_range: [start, start + length) must lie in [0, 2**63)");
  const MaskParams mp = host_mask_params(state);
  at::Tensor m = at::empty({length}, at::TensorOptions().dtype(at::kBool));
  bool* out = m.data_ptr<bool>();
  at::parallel_for(0, length, kGrain, [&](int64_t b, int64_t e) { mask_fill(mp, out + b, start + b, start + e); });
  return m;
}

}  // namespace

TORCH_LIBRARY_IMPL(dropout_ext, CPU, m) {
  m.impl("fused_dropout", &fused_dropout_cpu);
  m.impl("fused_dropout_backward", &fused_dropout_backward_cpu);
  m.impl("dropout_mask", &dropout_mask_cpu);
}

// Test-only ops (the namespace of csrc/cuda_host/driver.cpp's): choose the
// CPU kernels' ISA, list the ones this CPU has, and draw keep bits anywhere
// in the 64-bit element space.
TORCH_LIBRARY_FRAGMENT(dropout_ext_testing, m) {
  m.def("cpu_isa(str isa) -> str");
  m.def("cpu_isas() -> str[]");
  m.def("cpu_mask_range(Tensor state, int start, int length) -> Tensor");
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &test_cpu_isa);
  m.impl("cpu_isas", &test_cpu_isas);
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CPU, m) {
  m.impl("cpu_mask_range", &test_cpu_mask_range);
}

}  // namespace dropout_ext
