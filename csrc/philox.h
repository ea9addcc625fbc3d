// Philox4x32-10 and the dropout_ext mask contract (docs/RNG.md).
//
// One header for the CPU and CUDA kernels: the same code runs on the host and
// the device, so both backends derive every keep bit from the same function.
// No torch includes: the CUDA kernels that use this header are compiled
// without torch's headers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DX_HD __host__ __device__ __forceinline__
#else
#define DX_HD inline
#endif

namespace dropout_ext {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DX_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(prod);
  hi = static_cast<uint32_t>(prod >> 32);
#endif
}

// Random123's Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1).
DX_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                         uint32_t k0, uint32_t k1, uint32_t out[4]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The contract's parameters. They derive from the dropout state
// [seed, offset, p bits] (docs/RNG.md) by this one function on every backend
// and device, so no caller re-derives the threshold or the scale.
struct MaskParams {
  uint32_t key0;       // low 32 bits of the seed
  uint32_t key1;       // high 32 bits of the seed
  uint32_t offset_lo;  // counter word 2
  uint32_t offset_hi;  // counter word 3
  uint32_t threshold;  // keep iff word >= threshold
  bool drop_all;       // p == 1: floor(p * 2**32) does not fit 32 bits
  bool keep_all;       // p == 0 or no state: nothing is drawn
  double scale;        // 1 / (1 - p) in double, rounded once to the math type by the kernels
};

// The one reinterpretation of a value's bits as another type, for the host
// and the device (a fixed-size memcpy compiles to a register move on both).
template <typename To, typename From>
DX_HD To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

DX_HD double p_from_bits(int64_t bits) { return bit_cast<double>(bits); }
DX_HD int64_t p_to_bits(double p) { return bit_cast<int64_t>(p); }

// p as data (a device word nobody validated on the host) is sanitised the
// way the host would have refused it: NaN and negatives keep everything,
// anything from 1 up drops everything.
DX_HD MaskParams make_mask_params(uint64_t seed, uint64_t offset, double p) {
  MaskParams m;
  m.key0 = static_cast<uint32_t>(seed);
  m.key1 = static_cast<uint32_t>(seed >> 32);
  m.offset_lo = static_cast<uint32_t>(offset);
  m.offset_hi = static_cast<uint32_t>(offset >> 32);
  p = p >= 0.0 ? p : 0.0;
  m.drop_all = p >= 1.0;
  // floor(p * 2**32) for p < 1 is at most 2**32 - 1: it fits the word.
  m.threshold = m.drop_all ? 0u : static_cast<uint32_t>(p * 4294967296.0);
  m.keep_all = !m.drop_all && m.threshold == 0u;
  m.scale = m.drop_all ? 0.0 : 1.0 / (1.0 - p);
  return m;
}

// No state: no dropout (eval mode, or p == 0 known on the host).
DX_HD MaskParams keep_all_params() { return make_mask_params(0, 0, 0.0); }

// state is [seed, offset, p bits] in memory this code can read (host memory
// for the CPU kernels, device memory for the CUDA kernels), or nullptr.
DX_HD MaskParams mask_params_from_state(const int64_t* state) {
  if (state == nullptr) return keep_all_params();
  return make_mask_params(static_cast<uint64_t>(state[0]), static_cast<uint64_t>(state[1]),
                          p_from_bits(state[2]));
}

// A generator's draw for one call (docs/RNG.md, "Where (seed, offset) come
// from"): the generator reserved the four words at its counter
// (gen_offset / 4, 0, 0, 0) under its key gen_seed, which no other op reads,
// and they become the state's seed and offset. Keyed by those random words,
// the call's own stream shares no counter with PyTorch's ops on the same
// generator.
DX_HD void drawn_words(uint64_t gen_seed, uint64_t gen_offset, int64_t& seed, int64_t& offset) {
  uint32_t w[4];
  const uint64_t c = gen_offset / 4;
  philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u, 0u, static_cast<uint32_t>(gen_seed),
                static_cast<uint32_t>(gen_seed >> 32), w);
  seed = static_cast<int64_t>(w[0] | (static_cast<uint64_t>(w[1]) << 32));
  offset = static_cast<int64_t>(w[2] | (static_cast<uint64_t>(w[3]) << 32));
}

// Where a kernel finds a call's state [seed, offset, p bits]: nowhere (no
// dropout); in memory it reads (the input's device); or by value (a state
// the host holds, or drew). A state drawn by value is also stored at `out`
// by the launch's first thread: the op returns it, the backward reads it.
struct StateRef {
  enum Kind : int { kNone = 0, kMemory = 1, kValue = 2 };
  int kind = kNone;
  const int64_t* words = nullptr;  // kMemory
  int64_t value[3] = {0, 0, 0};    // kValue
  int64_t* out = nullptr;          // kValue, drawn
};

// The contract's parameters of the call. `first`: this is the launch's
// first thread, which stores a drawn state.
DX_HD MaskParams state_params(const StateRef& s, bool first) {
  if (s.kind == StateRef::kNone) return keep_all_params();
  const bool mem = s.kind == StateRef::kMemory;
  const int64_t seed = mem ? s.words[0] : s.value[0];
  const int64_t offset = mem ? s.words[1] : s.value[1];
  const int64_t bits = mem ? s.words[2] : s.value[2];
  if (first && s.out != nullptr) {
    s.out[0] = seed;
    s.out[1] = offset;
    s.out[2] = bits;
  }
  return make_mask_params(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), p_from_bits(bits));
}

// A draw under CUDA-graph capture: the generator's seed and offset live in
// device memory that every replay rewrites (PyTorch's PhiloxCudaState), so
// one thread turns them into the state at `out` on the device, afresh in
// each replay, and the kernels read it there.
struct GraphDraw {
  const int64_t* gen_seed = nullptr;
  const int64_t* gen_offset = nullptr;
  uint64_t gen_offset_intragraph = 0;
  int64_t p_bits = 0;
  int64_t* out = nullptr;
};

DX_HD void store_graph_draw(const GraphDraw& d) {
  drawn_words(static_cast<uint64_t>(*d.gen_seed), static_cast<uint64_t>(*d.gen_offset) + d.gen_offset_intragraph,
              d.out[0], d.out[1]);
  d.out[2] = d.p_bits;
}

// The four words of the group that holds logical elements 4g .. 4g+3.
DX_HD void philox_group(const MaskParams& m, uint64_t group, uint32_t out[4]) {
  philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                m.offset_lo, m.offset_hi, m.key0, m.key1, out);
}

DX_HD bool keep_word(const MaskParams& m, uint32_t word) {
  return !m.drop_all && word >= m.threshold;
}

// Keep bit of logical element i (one Philox call; kernels that walk whole
// groups call philox_group once per four elements instead).
DX_HD bool keep_element(const MaskParams& m, uint64_t i) {
  uint32_t w[4];
  philox_group(m, i >> 2, w);
  return keep_word(m, w[i & 3]);
}

}  // namespace dropout_ext
