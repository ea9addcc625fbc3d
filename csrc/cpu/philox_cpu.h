// Keep bits for the CPU kernels: Philox words drawn in registers (one call
// per four elements), never stored, in one generator per ISA build (the
// scalar one of csrc/philox.h, and AVX2 and AVX-512 versions of it that give
// the same words), and their threshold compare into and-masks.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "isa.h"

#ifdef DX_HAVE_X86_BUILDS
#include <immintrin.h>
#endif

namespace dropout_ext {
namespace cpu {

// Elements handled per inner step: kChunk / 4 Philox groups, whose words
// stay in L1 between the draw and the element loop.
constexpr int64_t kChunk = 256;
constexpr uint32_t kDropMask = 0x80000000u;

DX_INLINE void philox_words_scalar(const MaskParams& mp, uint64_t g0, int64_t ngroups, uint32_t* w) {
  for (int64_t j = 0; j < ngroups; ++j) philox_group(mp, g0 + static_cast<uint64_t>(j), w + 4 * j);
}

#ifdef DX_HAVE_X86_BUILDS
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

}  // namespace cpu
}  // namespace dropout_ext
