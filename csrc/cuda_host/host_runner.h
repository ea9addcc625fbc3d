// The host driver's kernel runner (driver.cpp). A launch takes the grid the
// launches of kernel_body.h and norm_body.h plan, as the CUDA launcher does,
// refuses what a GPU would refuse, and runs every block, in order, each from
// poisoned shared memory, and in each block phase by phase (the code between
// __syncthreads()) every thread, in order.
//
// The launches of each op (kernel_body.h, norm_body.h) are instantiated for
// this runner once, in launch_elementwise.cpp and launch_norm.cpp, so the
// translation units compile in parallel.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Type.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cuda/kernel_body.h"
#include "../cuda/norm_body.h"

namespace dropout_ext {
namespace cuda {

// A kernel that states its cost (LaunchFacts, kernel_args.h).
template <class K, class = void>
struct has_facts : std::false_type {};
template <class K>
struct has_facts<K, std::void_t<decltype(K::facts(std::declval<const typename K::Params&>(), Grid2{}))>>
    : std::true_type {};

// One launch as the planner records it.
struct PlannedLaunch {
  std::string kernel;  // the kernel struct's name, with its template arguments
  Grid2 grid;
  int blocks_per_sm = 0;
  int64_t shared_bytes = 0;
  LaunchFacts facts;
};

struct HostRunner {
  // Set: plan the launches without running them, recording grid.x, grid.y
  // and the blocks per SM of each.
  std::vector<int64_t>* plan = nullptr;
  // Set: plan them, recording each launch with its stated cost.
  std::vector<PlannedLaunch>* planned = nullptr;

  template <typename K, int kPhase>
  static void run_phase(const typename K::Params& p, const Idx& block, typename K::Shared& shared) {
    Idx idx = block;
    for (uint32_t t = 0; t < static_cast<uint32_t>(kThreads); ++t) {
      idx.thread = t;
      K::template phase<kPhase>(p, idx, shared);
    }
  }

  template <typename K>
  bool launch(const typename K::Params& p, Grid2 grid) {
    const char* refusal = launch_refusal(grid, kThreads, shared_bytes<K>());
    TORCH_CHECK(refusal == nullptr, "a GPU would refuse this launch: ", refusal, "; got grid (", grid.x, ", ",
                grid.y, "), ", kThreads, " threads per block, ", shared_bytes<K>(), " bytes of shared memory");
    if (plan != nullptr) {
      plan->insert(plan->end(), {grid.x, grid.y, static_cast<int64_t>(K::kBlocksPerSm)});
      return true;
    }
    if (planned != nullptr) {
      if constexpr (has_facts<K>::value) {
        planned->push_back(PlannedLaunch{std::string(c10::demangle_type<K>()), grid, K::kBlocksPerSm,
                                         static_cast<int64_t>(shared_bytes<K>()), K::facts(p, grid)});
        return true;
      } else {
        TORCH_CHECK(false, c10::demangle_type<K>(), " states no LaunchFacts");
      }
    }
    using Shared = typename K::Shared;
    static_assert(std::is_trivially_default_constructible<Shared>::value && std::is_trivially_copyable<Shared>::value,
                  "shared memory is raw bytes on the GPU");
    // One block's shared memory, reused block after block as a GPU reuses
    // it, and never zeroed: a GPU block starts with whatever was there.
    const std::unique_ptr<Shared> shared(new Shared);
    const uint32_t gx = static_cast<uint32_t>(grid.x);
    const uint32_t gy = static_cast<uint32_t>(grid.y);
    for (uint32_t by = 0; by < gy; ++by) {
      for (uint32_t bx = 0; bx < gx; ++bx) {
        // All-one bytes (NaN as float or double) at every block's start, so
        // a read before the block's own write shows in the results instead
        // of finding zeros or the previous block's values, which a GPU
        // would not guarantee.
        std::memset(static_cast<void*>(shared.get()), 0xFF, sizeof(Shared));
        const Idx block{bx, by, 0, gx, gy};
        if constexpr (has_local<K>::value) {
          run_rounds<K>(p, block, *shared);
        } else {
          run_phase<K, 0>(p, block, *shared);
          if constexpr (K::kPhases > 1) run_phase<K, 1>(p, block, *shared);
          static_assert(K::kPhases <= 2, "add the phases here");
        }
      }
    }
    return true;
  }

  // A kernel with per-thread Local state (has_local): each thread's Local
  // poisoned as the shared memory is (a GPU's registers start undefined),
  // then every round, and in each phase by phase every thread in order.
  template <typename K, int... kPhase>
  static void run_round(const typename K::Params& p, const Idx& block, typename K::Shared& shared,
                        typename K::Local* locals, int64_t round, std::integer_sequence<int, kPhase...>) {
    auto one = [&](auto which) {
      Idx idx = block;
      for (uint32_t t = 0; t < static_cast<uint32_t>(kThreads); ++t) {
        idx.thread = t;
        K::template phase<decltype(which)::value>(p, idx, shared, locals[t], round);
      }
    };
    (one(std::integral_constant<int, kPhase>{}), ...);
  }

  template <typename K>
  static void run_rounds(const typename K::Params& p, const Idx& block, typename K::Shared& shared) {
    using Local = typename K::Local;
    static_assert(std::is_trivially_default_constructible<Local>::value && std::is_trivially_copyable<Local>::value,
                  "a thread's Local is registers on the GPU");
    const std::unique_ptr<Local[]> locals(new Local[kThreads]);
    std::memset(static_cast<void*>(locals.get()), 0xFF, sizeof(Local) * kThreads);
    const int64_t rounds = K::rounds(p, block);
    for (int64_t round = 0; round < rounds; ++round) {
      run_round<K>(p, block, shared, locals.get(), round, std::make_integer_sequence<int, K::kPhases>{});
    }
  }
};

extern template bool run_forward<HostRunner>(HostRunner&, const DropoutArgs&, int);
extern template bool run_backward<HostRunner>(HostRunner&, const DropoutArgs&, int);
extern template bool run_mask<HostRunner>(HostRunner&, const MaskArgs&, int);
extern template bool run_norm_forward<HostRunner>(HostRunner&, const NormArgs&, int);
extern template bool run_norm_backward<HostRunner>(HostRunner&, const NormArgs&, int);

}  // namespace cuda
}  // namespace dropout_ext
