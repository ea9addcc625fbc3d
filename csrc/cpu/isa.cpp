// Which ISA build of the CPU kernels runs (isa.h): the best the CPU has,
// or DROPOUT_EXT_CPU_ISA's choice, and the test ops that choose and list them.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "isa.h"

namespace dropout_ext {
namespace cpu {
namespace {

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

}  // namespace

std::atomic<Isa>& isa_in_force() {
  static std::atomic<Isa> isa{isa_from_environment()};
  return isa;
}

namespace {

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

}  // namespace
}  // namespace cpu

// Test-only ops (the namespace of csrc/cuda_host/driver.cpp's): choose the
// CPU kernels' ISA and list the ones this CPU has.
TORCH_LIBRARY_FRAGMENT(dropout_ext_testing, m) {
  m.def("cpu_isa(str isa) -> str");
  m.def("cpu_isas() -> str[]");
}

TORCH_LIBRARY_IMPL(dropout_ext_testing, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu::test_cpu_isa);
  m.impl("cpu_isas", &cpu::test_cpu_isas);
}

}  // namespace dropout_ext
