// Fused CPU kernels for y = residual + dropout(act(x + bias)), its backward,
// the keep mask, and dropout + residual + LayerNorm/RMSNorm
// (dropout_add_norm) with its backward, registered for the CPU dispatch key.
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
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
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

// philox_keep's buffer: a chunk of up to kChunk elements spans kChunk / 4
// groups, one more where it starts inside a group (as the rows of the norm
// kernels do); the AVX2 generator rounds that up to whole steps of 16
// groups, the AVX-512 one to a multiple of 8.
constexpr int64_t kKeepWords = kChunk + 4 + 64;
static_assert(4 * ((kChunk / 4 + 1 + kGroupsPerStep - 1) / kGroupsPerStep * kGroupsPerStep) <= kKeepWords,
              "the AVX2 generator's last step must fit philox_keep's buffer");
static_assert(4 * ((kChunk / 4 + 1 + 7) / 8 * 8) <= kKeepWords,
              "the AVX-512 generator's last steps must fit philox_keep's buffer");
#else
constexpr int64_t kKeepWords = kChunk + 4;
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
  uint32_t w[kKeepWords];
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

// --- dropout_add_norm ---------------------------------------------------------------
//
// One row at a time, each row walked several times while it is in cache:
// h (drawn, rounded once, stored) and its sum, then the squared deviations
// from the mean, then y. The backward recomputes xhat from the stored h and
// the saved statistics, so nothing per element but h is kept.

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

// Rows [r0, r1). Element j of row r is the contract's element r * H + j, so
// h is fused_dropout(x, residual)'s output bit for bit.
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
      h_t* __restrict__ hr = a.h_out + base;
      LaneSum<acc_t> sum;
      for (int64_t j0 = 0; j0 < H; j0 += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, H - j0);
        const int64_t pos = base + j0;
        prefetch_ahead(a.x, pos, len, end);
        if constexpr (RES) prefetch_ahead(a.res, pos, len, end);
        philox_keep<I>(a.mp, pos, len, keep);
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
          philox_keep<I>(a.mp, pos, len, keep);
          scalar_t* __restrict__ dx = a.dx + pos;
          for (int64_t j = 0; j < len; ++j) dx[j] = static_cast<scalar_t>(select_kept(t1[j] * scale, keep[j]));
        }
      }
    }
  }
};

// The same loops built once per instruction set: K::run<I> (always inline,
// with everything it calls) is compiled into one entry point per target and
// vectorised for it; nothing else in the file assumes more than the baseline.
// run_isa (below) calls the entry point of the build in force.
template <typename K, typename... Args>
void run_baseline(Args... args) {
  K::template run<Isa::kBaseline>(args...);
}

#ifdef DX_HAVE_X86_BUILDS
template <typename K, typename... Args>
DX_TARGET_AVX2 void run_avx2(Args... args) {
  K::template run<Isa::kAvx2>(args...);
}
template <typename K, typename... Args>
DX_TARGET_AVX512 void run_avx512(Args... args) {
  K::template run<Isa::kAvx512>(args...);
}
#endif

template <typename scalar_t, Act A, bool BIAS, bool BWD>
struct Walk {
  template <Isa I>
  static DX_INLINE void run(const KernelArgs<scalar_t>* a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
    walk_range<scalar_t, A, BIAS, BWD, I>(*a, b, e, part);
  }
};

struct MaskFill {
  template <Isa I>
  static DX_INLINE void run(const MaskParams* mp, bool* out, int64_t b, int64_t e) {
    mask_range<I>(*mp, out, b, e);
  }
};

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

template <typename K, typename... Args>
void run_isa(Args... args) {
  switch (isa_in_force().load(std::memory_order_relaxed)) {
#ifdef DX_HAVE_X86_BUILDS
    case Isa::kAvx512: return run_avx512<K>(args...);
    case Isa::kAvx2: return run_avx2<K>(args...);
#endif
    default: return run_baseline<K>(args...);
  }
}

template <typename scalar_t, Act A, bool BIAS, bool BWD>
void walk(const KernelArgs<scalar_t>& a, int64_t b, int64_t e, at::opmath_type<scalar_t>* part) {
  run_isa<Walk<scalar_t, A, BIAS, BWD>>(&a, b, e, part);
}

void mask_fill(const MaskParams& mp, bool* out, int64_t b, int64_t e) { run_isa<MaskFill>(&mp, out, b, e); }

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

// --- dropout_add_norm: the ops ------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// h's element type: x's, or float for a float16/bfloat16 x with residual_in_fp32.
template <typename scalar_t, typename F>
void dispatch_h(at::ScalarType h_dtype, const F& f) {
  if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
    if (h_dtype == at::kFloat) return f(TypeTag<float>{});
  }
  f(TypeTag<scalar_t>{});
}

// weight or bias in the statistics' dtype, or `fill` where absent.
at::Tensor norm_param_as(const std::optional<at::Tensor>& t, int64_t H, at::ScalarType stat, double fill) {
  if (t.has_value()) return t->to(stat).contiguous();
  return at::full({H}, fill, at::TensorOptions().dtype(stat));
}

// Rows per task of at::parallel_for: enough elements to be worth a thread.
int64_t norm_row_grain(int64_t H) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(H, 1)); }

// The weight and bias gradients sum over row blocks fixed by the shape
// alone (not by the thread count), one partial row per block, then add the
// blocks in order: the same bits for any number of threads. The partials
// are bounded to about 2**21 per gradient unless that leaves fewer than 8
// blocks to share out. Returns the rows per block.
int64_t norm_param_block_rows(int64_t rows, int64_t H) {
  const int64_t cap = std::min<int64_t>(256, std::max<int64_t>(8, (int64_t{1} << 21) / std::max<int64_t>(H, 1)));
  return std::max<int64_t>(1, (rows + cap - 1) / cap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& state, c10::string_view norm,
    double eps, bool residual_in_fp32) {
  const Norm kind = check_norm_forward(input, residual, weight, bias, state, norm, eps, residual_in_fp32);
  const MaskParams mp = host_mask_params(state);
  at::Tensor y, h, mean, rstd;
  std::tie(y, h, mean, rstd) = norm_outputs(input, kind, residual_in_fp32);
  const int64_t rows = norm_rows(input);
  const int64_t H = input.size(-1);
  if (rows == 0) return {y, h, mean, rstd};
  const at::Tensor x = input.contiguous();
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::ScalarType stat = rstd.scalar_type();
  const at::Tensor w = norm_param_as(weight, H, stat, 1.0);
  const at::Tensor b = norm_param_as(bias, H, stat, -0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_add_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_h<scalar_t>(h.scalar_type(), [&](auto tag) {
      using h_t = typename decltype(tag)::type;
      NormArgs<scalar_t, h_t> a;
      a.H = H;
      a.mp = mp;
      a.scale = static_cast<acc_t>(mp.scale);
      a.layer = kind == Norm::kLayer;
      a.w = w.const_data_ptr<acc_t>();
      a.b = b.const_data_ptr<acc_t>();
      a.eps = static_cast<acc_t>(eps);
      a.x = x.const_data_ptr<scalar_t>();
      if (r.defined()) a.res = r.const_data_ptr<h_t>();
      a.h_out = h.data_ptr<h_t>();
      a.y = y.data_ptr<scalar_t>();
      if (a.layer) a.mean_out = mean.data_ptr<acc_t>();
      a.rstd_out = rstd.data_ptr<acc_t>();
      at::parallel_for(0, rows, norm_row_grain(H), [&](int64_t r0, int64_t r1) {
        if (a.res != nullptr) {
          run_isa<NormForward<scalar_t, h_t, true>>(&a, r0, r1);
        } else {
          run_isa<NormForward<scalar_t, h_t, false>>(&a, r0, r1);
        }
      });
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dropout_add_norm_backward_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& state, c10::string_view norm, std::array<bool, 4> output_mask) {
  const Norm kind = check_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask);
  const MaskParams mp = host_mask_params(state);
  at::Tensor dx, dres, dw, db;
  std::tie(dx, dres, dw, db) = norm_backward_outputs(grad, h, output_mask);
  if (grad.numel() == 0) return {dx, dres, dw, db};
  const int64_t rows = norm_rows(grad);
  const int64_t H = grad.size(-1);
  const at::Tensor g = grad.contiguous();
  const at::Tensor hc = h.contiguous();
  const at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  const at::ScalarType stat = rstd.scalar_type();
  const at::Tensor w = norm_param_as(weight, H, stat, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "dropout_add_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_h<scalar_t>(hc.scalar_type(), [&](auto tag) {
      using h_t = typename decltype(tag)::type;
      NormArgs<scalar_t, h_t> a;
      a.H = H;
      a.mp = mp;
      a.scale = static_cast<acc_t>(mp.scale);
      a.layer = kind == Norm::kLayer;
      a.w = w.const_data_ptr<acc_t>();
      a.g = g.const_data_ptr<scalar_t>();
      if (gh.defined()) a.gh = gh.const_data_ptr<h_t>();
      a.h = hc.const_data_ptr<h_t>();
      if (a.layer) a.mean = mc.const_data_ptr<acc_t>();
      a.rstd = rc.const_data_ptr<acc_t>();
      if (output_mask[0]) a.dx = dx.data_ptr<scalar_t>();
      if (output_mask[1]) a.dres = dres.data_ptr<h_t>();
      auto run = [&](int64_t r0, int64_t r1, acc_t* pw, acc_t* pb) {
        if (a.gh != nullptr) {
          run_isa<NormBackward<scalar_t, h_t, true>>(&a, r0, r1, pw, pb);
        } else {
          run_isa<NormBackward<scalar_t, h_t, false>>(&a, r0, r1, pw, pb);
        }
      };
      const bool want_w = output_mask[2], want_b = output_mask[3];
      if (!want_w && !want_b) {
        at::parallel_for(0, rows, norm_row_grain(H), [&](int64_t r0, int64_t r1) { run(r0, r1, nullptr, nullptr); });
        return;
      }
      const int64_t per_block = norm_param_block_rows(rows, H);
      const int64_t blocks = (rows + per_block - 1) / per_block;
      const int64_t nparts = int64_t{want_w} + int64_t{want_b};
      at::Tensor partial = at::empty({nparts, blocks, H}, rstd.options());
      acc_t* pw_all = want_w ? partial.data_ptr<acc_t>() : nullptr;
      acc_t* pb_all = want_b ? partial.data_ptr<acc_t>() + (want_w ? blocks * H : 0) : nullptr;
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          acc_t* pw = pw_all != nullptr ? pw_all + blk * H : nullptr;
          acc_t* pb = pb_all != nullptr ? pb_all + blk * H : nullptr;
          if (pw != nullptr) std::fill(pw, pw + H, acc_t(0));
          if (pb != nullptr) std::fill(pb, pb + H, acc_t(0));
          run(blk * per_block, std::min(rows, (blk + 1) * per_block), pw, pb);
        }
      });
      // The blocks in order, column by column.
      auto reduce = [&](const acc_t* parts, at::Tensor& out) {
        acc_t* o = out.data_ptr<acc_t>();
        at::parallel_for(0, H, 2048, [&](int64_t c0, int64_t c1) {
          std::fill(o + c0, o + c1, acc_t(0));
          for (int64_t blk = 0; blk < blocks; ++blk) {
            const acc_t* p = parts + blk * H;
            for (int64_t c = c0; c < c1; ++c) o[c] += p[c];
          }
        });
      };
      if (want_w) reduce(pw_all, dw);
      if (want_b) reduce(pb_all, db);
    });
  });
  return {dx, dres, dw, db};
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
  m.impl("dropout_add_norm", &dropout_add_norm_cpu);
  m.impl("dropout_add_norm_backward", &dropout_add_norm_backward_cpu);
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
