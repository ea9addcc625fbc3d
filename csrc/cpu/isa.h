// The instruction-set builds of the CPU kernels and the choice between them.
//
// Each kernel loop is built for the baseline x86-64, AVX2 and AVX-512 and the
// best one the CPU has is chosen at run time, so a distributed build needs no
// -march flag. A kernel is a struct K with an always-inline
// `template <Isa I> static void run(...)`; IsaBuild<I>::run<K> is its entry
// point for build I: K::run<I>, with everything it calls, is compiled into
// it and vectorised for that target. The entry points and the hand-written
// Philox generators (philox_cpu.h, which call nothing from torch) are the
// only functions with a target attribute, and no file is compiled with a
// -m flag, so no inline function of a torch header is ever compiled for
// AVX-512 (the linker keeps one copy of each, and an AVX-512 copy would
// crash a CPU without it).
//
// The entry points are defined and instantiated for every kernel the ops
// use in one translation unit per op family and ISA
// (elementwise_<isa>.cpp, norm_<isa>.cpp); the ops call them through
// run_isa, which picks the build in force.
#pragma once

#include <atomic>

namespace dropout_ext {
namespace cpu {

#define DX_INLINE inline __attribute__((always_inline))

// The instruction sets each loop is built for. Every build of a loop derives
// the same bits (the tests run the suite on each), so the choice is speed only.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#define DX_HAVE_X86_BUILDS 1
#define DX_TARGET_AVX2 __attribute__((target("avx2")))
// BW, DQ and VL come with every AVX-512 CPU since Skylake-SP; asking for them
// lets the compiler use byte/word and 256-bit EVEX forms in the element loops.
#define DX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#endif

// One explicitly specialized class per build: GCC 12 silently drops a
// target attribute on an explicit specialization of a member template of a
// class template (the loops then come out baseline, with the same bits),
// not on a member template of a class; isa_build.inc checks that the
// attribute took.
template <Isa I>
struct IsaBuild;

template <>
struct IsaBuild<Isa::kBaseline> {
  template <typename K, typename... Args>
  static void run(Args... args);
};

#ifdef DX_HAVE_X86_BUILDS
template <>
struct IsaBuild<Isa::kAvx2> {
  template <typename K, typename... Args>
  DX_TARGET_AVX2 static void run(Args... args);
};

template <>
struct IsaBuild<Isa::kAvx512> {
  template <typename K, typename... Args>
  DX_TARGET_AVX512 static void run(Args... args);
};
#endif

// The ISA in force: the environment's choice (DROPOUT_EXT_CPU_ISA, or the
// best the CPU has), decided at the first kernel call; the test hook
// cpu_isa can change it. Atomic, as kernels read it from worker threads; a
// change mid-call would only mix builds that give the same bits.
std::atomic<Isa>& isa_in_force();

template <typename K, typename... Args>
void run_isa(Args... args) {
  switch (isa_in_force().load(std::memory_order_relaxed)) {
#ifdef DX_HAVE_X86_BUILDS
    case Isa::kAvx512: return IsaBuild<Isa::kAvx512>::run<K>(args...);
    case Isa::kAvx2: return IsaBuild<Isa::kAvx2>::run<K>(args...);
#endif
    default: return IsaBuild<Isa::kBaseline>::run<K>(args...);
  }
}

}  // namespace cpu
}  // namespace dropout_ext
