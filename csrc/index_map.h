// The global index map of a shard (docs/RNG.md, "Sharded tensors").
//
// The contract draws element i's keep bit at i, its row-major index in the
// tensor. A local tensor that is a block of a global one (a shard of a
// tensor-, sequence- or data-parallel layout) draws each element at its
// index in the global tensor instead, so any layout gives the single-device
// mask. The map from a local row-major index to that global index is affine
// in the local coordinates; merging the dimensions along which it stays
// consecutive leaves a run (consecutive in both indices) and at most
// kMaxMapDims strided dimensions above it. An unsharded call has no strided
// dimension and base 0: its map is the identity, and a kernel that asks
// contiguous() first does no per-element work for it.
//
// No torch includes: the CUDA kernels compile this header for the device.
#pragma once

#include <cstdint>

#include "philox.h"

namespace dropout_ext {

constexpr int kMaxMapDims = 4;

struct IndexMap {
  int64_t base = 0;  // global index of local element 0
  int64_t run = 1;   // local elements per run (strided maps only)
  int ndims = 0;     // strided dimensions above the run, innermost first
  int64_t size[kMaxMapDims] = {};
  int64_t stride[kMaxMapDims] = {};

  // Local element i sits at global index base + i.
  DX_HD bool contiguous() const { return ndims == 0; }

  // Global index of local row-major element i.
  DX_HD int64_t global(int64_t i) const {
    if (ndims == 0) return base + i;
    int64_t q = i / run;
    int64_t g = base + (i - q * run);
    for (int k = 0; k < kMaxMapDims; ++k) {
      if (k < ndims) {
        const int64_t next = q / size[k];
        g += (q - next * size[k]) * stride[k];
        q = next;
      }
    }
    return g;
  }

  // How many local elements from i on are consecutive in the global index
  // too (at least 1): a kernel draws that many from global(i) in one range.
  DX_HD int64_t run_from(int64_t i, int64_t most) const {
    if (ndims == 0) return most;
    const int64_t left = run - i % run;
    return left < most ? left : most;
  }
};

}  // namespace dropout_ext
