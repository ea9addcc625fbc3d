// The arguments and the launch geometry of the CUDA kernels.
//
// Plain C++, no CUDA and no torch header: the CUDA launchers
// (dropout_kernels.cu), the torch glue (ops_impl.h) and the host driver that
// runs the same kernels on the CPU (csrc/cuda_host/driver.cpp, built by g++
// where no CUDA toolkit exists) all include it, so a grid is computed by one
// function whichever of them launches it.
#pragma once

#include <cstdint>

namespace dropout_ext {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

constexpr int kThreads = 256;                 // threads per block, every kernel
constexpr int kBlocksPerSm = 2048 / kThreads;  // a full SM's worth of resident threads
constexpr int kMaxDims = 8;                   // collapsed dimensions of a structured mask
// The SM count the host driver launches for: an H100 SXM's, so the host runs
// the grid an H100 runs (and so the bias gradient's summation order too).
constexpr int kHostSmCount = 132;

// Elements per thread step: 16 bytes of the tensor (two 16-byte halves for
// double), always a whole number of Philox groups.
constexpr int unit_elems(DType t) { return (t == DType::kHalf || t == DType::kBFloat16) ? 8 : 4; }

// Division by a divisor fixed for the launch, without the 64-bit division
// routine: floor(n / d) = umulhi(n, magic) >> shift for every 0 <= n < 2**63
// (Granlund and Montgomery, "Division by invariant integers using
// multiplication", theorem 4.2, with N = 63 and l = ceil(log2 d): the magic
// ceil(2**(63+l) / d) then fits 64 bits). d == 1 is special-cased by the user.
struct FastDiv {
  uint64_t divisor = 1;
  uint64_t magic = 0;
  uint32_t shift = 0;
};

inline FastDiv make_fast_div(uint64_t d) {
  FastDiv f;
  f.divisor = d;
  if (d <= 1) return f;
  uint32_t l = 0;
  while (l < 64 && (uint64_t{1} << l) < d) ++l;  // ceil(log2 d), in [1, 64]
  const unsigned __int128 num = static_cast<unsigned __int128>(1) << (63 + l);
  f.magic = static_cast<uint64_t>((num + d - 1) / d);
  f.shift = l - 1;
  return f;
}

// A structured (broadcast) mask: the small keep mask, read through the
// input's dimensions collapsed on the host (size-1 dimensions dropped,
// neighbours merged where the mask index is linear across them), innermost
// first. Element e's mask index is sum(digit_d(e) * stride[d]) with e's
// mixed-radix digits in size[]; stride 0 along broadcast dimensions.
struct StructuredMask {
  const bool* keep = nullptr;  // nullptr: one Philox draw per element
  int ndim = 0;
  FastDiv size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
};

// Arguments of the forward and backward kernels: the two directions share
// the kernel body, so they share one argument block.
struct DropoutArgs {
  DType dtype = DType::kFloat;
  int act = 0;                     // dropout_ext::Act
  const void* x = nullptr;         // forward: the input; backward: the saved input (activations only)
  const void* grad = nullptr;      // backward: the incoming gradient
  const void* residual = nullptr;  // forward, like x, or nullptr
  const void* bias = nullptr;      // [H], or nullptr
  void* out = nullptr;             // forward: y; backward: dx
  int64_t n = 0;
  FastDiv H;  // the last dimension (the bias length)
  // [seed, offset, p bits] in memory the kernel reads (device memory on a
  // GPU, so graph replays see fresh draws and nothing syncs), or nullptr for
  // no dropout.
  const int64_t* state = nullptr;
  // Logical index of element 0: 0 in every real call. Tests set it (a
  // multiple of 16) to run the index arithmetic of elements past 2**31 and
  // 2**32 without allocating them.
  int64_t base = 0;
  StructuredMask mask;
  // Backward with the bias gradient: per-row-block column sums of the
  // unrounded dx in the math type, [row_blocks, H], then dbias [H].
  void* partial = nullptr;
  void* dbias = nullptr;
};

struct MaskArgs {
  bool* out = nullptr;
  int64_t n = 0;
  const int64_t* state = nullptr;
  int64_t base = 0;  // as DropoutArgs::base
};

struct Grid2 {
  uint32_t x = 1;
  uint32_t y = 1;
};

// Grid-stride kernels: enough blocks to fill the GPU, no more.
inline uint32_t flat_blocks(int64_t work_items, int sm_count) {
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  return static_cast<uint32_t>(want < 1 ? 1 : (want < cap ? want : cap));
}

// The bias-gradient kernel's layout. A block owns a tile of col_units column
// units (unit_elems columns each) and a block of rows; its 256 threads are
// row_lanes x col_units: lane (r, c) walks rows r, r + row_lanes, ... of the
// row block in column unit c, so every thread works whenever the row has at
// least 32 units or the tile is narrower. The lanes' sums are then added in
// lane order in shared memory, and the row blocks' in block order by a
// second kernel: the summation order depends on the shape and the SM count
// only.
struct BiasGradPlan {
  int col_units = 1;  // power of two, <= 32
  int col_shift = 0;  // log2(col_units)
  int row_lanes = kThreads;
  int64_t rows = 0;
  int64_t rows_per_block = 1;
  int64_t row_blocks = 1;
  Grid2 grid;        // (column tiles, row blocks)
  uint32_t reduce_blocks = 1;
};

inline BiasGradPlan plan_bias_grad(int64_t rows, int64_t H, int elems, int sm_count) {
  BiasGradPlan g;
  const int64_t units = (H + elems - 1) / elems;
  while (g.col_units < 32 && g.col_units < units) {
    g.col_units *= 2;
    ++g.col_shift;
  }
  g.row_lanes = kThreads / g.col_units;
  const int64_t col_tiles = (units + g.col_units - 1) / g.col_units;
  g.rows = rows;
  const int64_t want = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  int64_t row_blocks = want / col_tiles;
  const int64_t lane_limited = (rows + g.row_lanes - 1) / g.row_lanes;  // a row per lane at least
  if (row_blocks > lane_limited) row_blocks = lane_limited;
  if (row_blocks < 1) row_blocks = 1;
  int64_t per = (rows + row_blocks - 1) / row_blocks;
  const int64_t min_per = (rows + 65534) / 65535;  // gridDim.y limit
  if (per < min_per) per = min_per;
  if (per < 1) per = 1;
  g.rows_per_block = per;
  g.row_blocks = rows > 0 ? (rows + per - 1) / per : 1;
  g.grid.x = static_cast<uint32_t>(col_tiles);
  g.grid.y = static_cast<uint32_t>(g.row_blocks);
  g.reduce_blocks = flat_blocks(H, sm_count);
  return g;
}

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Whether the elementwise kernels may use 16-byte accesses for every tensor
// they stream.
inline bool forward_vec(const DropoutArgs& a) { return aligned16(a.x) && aligned16(a.residual) && aligned16(a.out); }
inline bool backward_vec(const DropoutArgs& a) { return aligned16(a.grad) && aligned16(a.x) && aligned16(a.out); }

}  // namespace cuda
}  // namespace dropout_ext
