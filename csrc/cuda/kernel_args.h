// The arguments and the launch geometry of the CUDA kernels.
//
// Plain C++, no CUDA and no torch header: the CUDA launchers
// (dropout_kernels.cu), the torch glue (ops_impl.h) and the host driver that
// runs the same kernels on the CPU (csrc/cuda_host, built by g++ where no
// CUDA toolkit exists) all include it, so a grid is computed by one
// function whichever of them launches it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../activation_constants.h"
#include "../index_map.h"
#include "../philox.h"

namespace dropout_ext {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kMaxDims = 8;    // collapsed dimensions of a structured mask
// The SM count the host driver launches for: an H100 SXM's, so the host runs
// the grid an H100 runs (and so the bias gradient's summation order too).
constexpr int kHostSmCount = 132;

// Elements per thread step: 16 bytes of the tensor (two 16-byte halves for
// double), always a whole number of Philox groups.
constexpr int unit_elems(DType t) { return (t == DType::kHalf || t == DType::kBFloat16) ? 8 : 4; }

// Where a kernel's keep bits come from and go (the packed mask mode,
// docs/RNG.md): drawn (Philox, or a structured mask) and used only; drawn
// and also stored packed, 8 elements per byte (the forward of a full mask);
// or read from packed bits instead of drawn. A template parameter of the
// kernels, so the plain kernels carry none of the other modes' code.
enum class MaskBits : int { kDraw = 0, kPack = 1, kRead = 2 };

// Elements per step of the elementwise kernels: a unit, or in the pack mode
// the 8 elements of one byte of the packed mask (two units of float or
// double), so that every byte has a single writer and none is shared between
// threads: no atomics, no second pass.
constexpr int step_elems(DType t, MaskBits m) { return m == MaskBits::kPack ? 8 : unit_elems(t); }

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

// A shard's index map (index_map.h's IndexMap) as the kernels take it: its
// divisors as FastDiv, so a strided map costs no 64-bit division routine.
// ndims == 0 is the identity shifted by base, every unsharded call's map.
struct ShardMap {
  int64_t base = 0;
  FastDiv run;
  int ndims = 0;
  FastDiv size[kMaxMapDims] = {};
  int64_t stride[kMaxMapDims] = {};
};

// The kernels' form of map, its global indices shifted by `shift` (the host
// driver's tests).
inline ShardMap shard_map(const IndexMap& map, int64_t shift = 0) {
  ShardMap m;
  m.base = map.base + shift;
  m.run = make_fast_div(static_cast<uint64_t>(map.run));
  m.ndims = map.ndims;
  for (int k = 0; k < map.ndims; ++k) {
    m.size[k] = make_fast_div(static_cast<uint64_t>(map.size[k]));
    m.stride[k] = map.stride[k];
  }
  return m;
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
  // Where the rows (H elements each) of x, grad and the residual start: 0
  // for a row-major tensor, else row r at r * stride, a slice read in place
  // (op_common.h, row_stride: H and the stride whole units). out is row-major.
  int64_t x_rows = 0;
  int64_t grad_rows = 0;
  int64_t residual_rows = 0;
  int64_t n = 0;
  FastDiv H;  // the last dimension (the bias length)
  // The dropout state, wherever it lives (philox.h, StateRef); none for no
  // dropout.
  StateRef state;
  // Where each element draws its keep bit (index_map.h): the identity for
  // an unsharded tensor, a shard's global indices under `place`. The host
  // driver's tests also shift its base (a multiple of 16) to run the index
  // arithmetic of elements past 2**31 and 2**32 without allocating them.
  ShardMap map;
  StructuredMask mask;
  // The packed keep mask of a full mask: element e (the local element,
  // whatever the map) at bit e % 8 of byte e / 8. bits_in: read instead of
  // drawing the mask (either direction); bits_out: the forward stores the
  // bits it draws, the ones past n zero. At most one is set.
  const uint8_t* bits_in = nullptr;
  uint8_t* bits_out = nullptr;
  // Backward with the bias gradient: per-row-block column sums of the
  // unrounded dx in the math type, [row_blocks, H], then dbias [H].
  void* partial = nullptr;
  void* dbias = nullptr;
};

struct MaskArgs {
  bool* out = nullptr;
  int64_t n = 0;
  StateRef state;
  ShardMap map;      // as DropoutArgs::map
};

// What one launch costs, as the static performance model (tools/gpu_model.py)
// reads it: each kernel states its own (K::facts(params, grid), beside its
// code), and the host driver's planner records them without running
// anything. Bytes are global memory traffic as DRAM sees it: every byte a
// launch must read or write, once (a kernel's own re-read of what it just
// wrote within a block counts again only where the block cannot keep it).
struct LaunchFacts {
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  // Global bytes one thread has asked for before it first waits on a load:
  // with the resident threads, what covers the memory latency.
  int64_t inflight_bytes_per_thread = 0;
  // Thread-steps the launch issues in its main loop (threads x steps), and
  // those that hold work: their ratio is the fraction of lanes with work.
  int64_t lane_slots = 0;
  int64_t busy_slots = 0;
  // The longest serial walk of global loads one thread makes whose values
  // feed one reduction result, each waiting on the previous (a reduction's
  // tail); a streaming step counts 1, its latency covered by the other
  // resident threads.
  int64_t dependent_loads = 1;
};

// The lanes of a walk of `items` work items in chunks of kThreads x per
// items, a chunk per block and round (block b's round j: chunk j * blocks
// + b), thread t taking items t, t + kThreads, ... of its chunk: a warp
// steps while any of its lanes has an item, so only the last chunk has
// lanes without one.
inline void walk_lanes(LaunchFacts& f, int64_t items, int per = 1) {
  const int64_t chunk = static_cast<int64_t>(kThreads) * per;
  const int64_t full = items / chunk;
  const int64_t rest = items - full * chunk;  // the last chunk's items
  f.lane_slots += full * chunk;
  // The last chunk's step k holds its items k * kThreads, ...: a warp with
  // none of them skips that step.
  for (int k = 0; k < per; ++k) {
    int64_t left = rest - static_cast<int64_t>(k) * kThreads;
    left = left < 0 ? 0 : (left > kThreads ? kThreads : left);
    f.lane_slots += (left + 31) / 32 * 32;
  }
  f.busy_slots += items;
}

constexpr int64_t dtype_bytes(DType t) {
  return t == DType::kDouble ? 8 : (t == DType::kFloat ? 4 : 2);
}

// 64-bit, so a plan past a launch limit reaches launch_refusal intact
// instead of wrapping to a grid that looks valid.
struct Grid2 {
  int64_t x = 1;
  int64_t y = 1;
};

// What a GPU refuses to launch (the same on compute capability 8.x and 9.x):
// nullptr when the launch is valid, else the broken limit. Both launchers
// ask first, so the host driver fails where the GPU would.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridY = 65535;
constexpr int kMaxBlockThreads = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;
static_assert(kThreads <= kMaxBlockThreads && kThreads % 32 == 0, "a block of whole warps, at most 1024 threads");

inline const char* launch_refusal(Grid2 grid, int threads, size_t static_shared_bytes) {
  if (grid.x < 1 || grid.x > kMaxGridX) return "gridDim.x must be in [1, 2**31 - 1]";
  if (grid.y < 1 || grid.y > kMaxGridY) return "gridDim.y must be in [1, 65535]";
  if (threads < 1 || threads > kMaxBlockThreads) return "a block must have 1 to 1024 threads";
  if (static_shared_bytes > kMaxStaticShared) return "static shared memory must be at most 48 KiB per block";
  return nullptr;
}

// Resident blocks of kThreads per SM that each kernel is built for: its
// __launch_bounds__ minimum, so ptxas fits its registers to it, and the
// blocks per SM its grid is planned with, so a grid-stride launch is one
// wave of resident blocks and a bias-gradient launch has no tail wave. The
// host driver plans with the same numbers, so it runs the GPU's grid. Each
// number is what the kernel holds in every mask mode on sm_80 and sm_90
// with the registers ptxas gives it at that bound, unspilled
// (tests/test_cuda_compile.py checks it against ptxas's figures and prints
// them): 2 for the elementwise kernels, whose K steps in flight
// (elementwise_steps_per_thread) need up to 2 blocks' 128 registers, but 3
// for float64's backward of relu, gelu_tanh and silu, one 64-byte step each
// within 80, and 1 for float64 gelu's, whose C library erf takes more than
// 128 beside the steps; 4 for the mask kernel; 2 for the bias gradient,
// whose rows in flight (bias_grad_rows_per_lane) spill at 3 blocks' 80
// registers, but 1 for float64 gelu's; a full SM's 2048 threads for the
// bias reduction.
constexpr int kMaskBlocksPerSm = 4;
constexpr int kReduceBlocksPerSm = 2048 / kThreads;

// The bias reduction (BiasReduceKernel): a block per tile of kReduceCols
// columns, a warp's lanes on one 128-byte line of each float32 partial row;
// each thread keeps kReduceAcc rows' loads in flight, so a block has
// kReduceSlots rows in flight per column and a thread's serial chain of
// loads is reduce_chain(rows).
constexpr int kReduceCols = 32;
constexpr int kReduceAcc = 4;
constexpr int kReduceSlots = kThreads / kReduceCols * kReduceAcc;
constexpr int64_t reduce_chain(int64_t rows) { return (rows + kReduceSlots - 1) / kReduceSlots; }
// The most partial rows a bias-gradient plan makes: a chain of at most 32 loads.
constexpr int64_t kMaxPartialRows = 32 * kReduceSlots;

// The bias reduction's grid: a block per column tile, up to one wave of
// resident blocks (more tiles: grid-stride).
inline int64_t bias_reduce_blocks(int64_t H, int sm_count) {
  const int64_t tiles = (H + kReduceCols - 1) / kReduceCols;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * kReduceBlocksPerSm;
  return tiles < 1 ? 1 : (tiles < cap ? tiles : cap);
}

constexpr int elementwise_blocks_per_sm(DType t, Act a, bool backward) {
  if (t == DType::kDouble && a == Act::kGelu) return 1;
  return t == DType::kDouble && backward && a != Act::kIdentity ? 3 : 2;
}

constexpr int bias_grad_blocks_per_sm(DType t, Act a) {
  return t == DType::kDouble && a == Act::kGelu ? 1 : 2;
}

// Global bytes a streaming kernel keeps in flight per SM: with an H100's
// memory latency, what its bandwidth needs (Little's law, with margin).
constexpr int64_t kInflightPerSm = 32 * 1024;

// Steps (step_elems) an elementwise kernel's thread takes at once, all of
// their loads issued before any of their keep bits and math: enough that
// its resident threads have kInflightPerSm bytes in flight when it streams
// the fewest tensors it can (one, but for an activation's backward the
// gradient and the saved input).
constexpr int elementwise_steps_per_thread(DType t, Act a, bool backward, MaskBits m) {
  const int64_t streams = backward && a != Act::kIdentity ? 2 : 1;
  const int64_t step_bytes = step_elems(t, m) * dtype_bytes(t) * streams;
  const int64_t per_thread = kInflightPerSm / (kThreads * elementwise_blocks_per_sm(t, a, backward));
  const int64_t k = (per_thread + step_bytes - 1) / step_bytes;
  return k < 1 ? 1 : static_cast<int>(k);
}

// Rows a bias-gradient lane takes at once, all their loads issued before
// any of their keep bits and math: kInflightPerSm bytes in flight for the
// resident threads, as elementwise_steps_per_thread.
constexpr int bias_grad_rows_per_lane(DType t, Act a) {
  const int64_t row_bytes = unit_elems(t) * dtype_bytes(t) * (a != Act::kIdentity ? 2 : 1);
  const int64_t per_thread = kInflightPerSm / (kThreads * bias_grad_blocks_per_sm(t, a));
  const int64_t k = (per_thread + row_bytes - 1) / row_bytes;
  return k < 1 ? 1 : static_cast<int>(k);
}

// Grid-stride kernels: enough blocks to fill the GPU, no more.
inline int64_t flat_blocks(int64_t work_items, int sm_count, int blocks_per_sm) {
  const int64_t want = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * blocks_per_sm;
  return want < 1 ? 1 : (want < cap ? want : cap);
}

// The bias-gradient kernel's layout. A block owns a tile of col_units column
// units (unit_elems columns each) and a block of rows; its 256 threads are
// row_lanes x col_units: lane (r, c) walks rows r, r + row_lanes, ... of the
// row block in column unit c, so every thread works whenever the row has at
// least 32 units or the tile is narrower. The lanes' sums are then added in
// lane order in shared memory, and the row blocks' by a second kernel in
// BiasReduceKernel's order: the summation order depends on the shape and the
// SM count only.
struct BiasGradPlan {
  int col_units = 1;  // power of two, <= 32
  int col_shift = 0;  // log2(col_units)
  int row_lanes = kThreads;
  int64_t rows = 0;
  int64_t rows_per_block = 1;
  int64_t row_blocks = 1;
  Grid2 grid;        // (column tiles, row blocks)
  int64_t reduce_blocks = 1;
};

// The one plan of a bias-gradient launch: the glue sizes the partial sums
// by it and the launcher launches it.
inline BiasGradPlan plan_bias_grad(int64_t rows, int64_t H, DType dtype, Act act, int sm_count) {
  BiasGradPlan g;
  const int elems = unit_elems(dtype);
  const int64_t units = (H + elems - 1) / elems;
  while (g.col_units < 32 && g.col_units < units) {
    g.col_units *= 2;
    ++g.col_shift;
  }
  g.row_lanes = kThreads / g.col_units;
  const int64_t col_tiles = (units + g.col_units - 1) / g.col_units;
  g.rows = rows;
  const int64_t want = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * bias_grad_blocks_per_sm(dtype, act);
  int64_t row_blocks = want / col_tiles;
  const int64_t lane_limited = (rows + g.row_lanes - 1) / g.row_lanes;  // a row per lane at least
  if (row_blocks > lane_limited) row_blocks = lane_limited;
  if (row_blocks > kMaxPartialRows) row_blocks = kMaxPartialRows;
  // A row block's partial row, written in the math type and read back once,
  // costs at most 1/40 of the bytes the block streams (grad and dx, and x
  // for an activation).
  const int64_t streamed = dtype_bytes(dtype) * (act != Act::kIdentity ? 3 : 2);
  const int64_t min_rows = (80 * (dtype == DType::kDouble ? 8 : 4) + streamed - 1) / streamed;
  if (row_blocks > rows / min_rows) row_blocks = rows / min_rows;
  if (row_blocks < 1) row_blocks = 1;
  int64_t per = (rows + row_blocks - 1) / row_blocks;
  const int64_t min_per = (rows + 65534) / 65535;  // gridDim.y limit
  if (per < min_per) per = min_per;
  if (per < 1) per = 1;
  // Whole row steps of the block's lanes: only the last row block has lanes
  // without a row.
  per = (per + g.row_lanes - 1) / g.row_lanes * g.row_lanes;
  g.rows_per_block = per;
  g.row_blocks = rows > 0 ? (rows + per - 1) / per : 1;
  g.grid.x = col_tiles;
  g.grid.y = g.row_blocks;
  g.reduce_blocks = bias_reduce_blocks(H, sm_count);
  return g;
}

// Arguments of the dropout_add_norm kernels (forward and backward), laid
// out by plan_norm. A pointer left nullptr is an input that is None or an output nobody asked for.
struct NormArgs {
  DType dtype = DType::kFloat;    // input, y, grad, grad_input
  DType h_dtype = DType::kFloat;  // h, residual, grad_h, grad_residual: dtype, or float32 for 16-bit inputs
  bool param_f32 = false;         // weight and bias in float32 (else in dtype)
  bool rms = false;               // RMSNorm: no mean
  int64_t rows = 0;
  int64_t H = 0;
  double eps = 0.0;
  StateRef state;                  // as DropoutArgs::state
  ShardMap map;                    // as DropoutArgs::map; a row is one run of it
  const void* weight = nullptr;
  // forward
  const void* x = nullptr;
  const void* residual = nullptr;
  // Their row strides: 0 for row-major, else row r at r * stride (as
  // DropoutArgs's). y and h are row-major.
  int64_t x_rows = 0;
  int64_t residual_rows = 0;
  const void* bias = nullptr;
  void* y = nullptr;
  void* h = nullptr;
  void* mean = nullptr;  // statistics' dtype (the math type), [rows]; nullptr for rms
  void* rstd = nullptr;
  // backward
  const void* grad = nullptr;
  const void* grad_h = nullptr;
  const void* saved_h = nullptr;
  const void* saved_mean = nullptr;
  const void* saved_rstd = nullptr;
  void* grad_input = nullptr;
  void* grad_residual = nullptr;
  // Per-block column sums [plan_norm's blocks, H] in the math type, then their
  // ordered sums [H] (the statistics' dtype).
  void* partial_w = nullptr;
  void* partial_b = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
};

// The norm kernels' layout. A row is split over 2**shift threads (a warp
// to a block), each holding its runs (unit_elems each) t, t + 2**shift, ...
// of the row, and a block takes 256 >> shift rows at a time: the fewest
// threads whose registers hold the row, so a short row fills whole warps
// instead of leaving most of a block idle. What a thread keeps is what the
// registers of the blocks per SM below hold unspilled (ptxas, sm_80 and
// sm_90; tests/test_cuda_compile.py): the forward a row's h, its runs of x
// and the residual loaded together; the backward a row's grad and h (16-bit
// grad and h: the next round's row's too, loaded a round early), and its
// columns' weight and bias sums across the block's rows. The forward of a
// 16-bit h holds its 32 values per thread at 2 blocks per SM; a float h's,
// and the backward's sums, spill at 2 blocks' 128 registers, so they run at
// 1. The backward has a short-row kernel, whose threads past a row's hand
// their sums to the first row's through shared memory (at most 24 values
// each, so the block's fit its 48 KiB), and a long-row one, a row per block
// of 32 values per thread. A longer row is read again from global memory,
// a block per row.
constexpr int norm_forward_blocks_per_sm(DType t, DType hd) {
  return (t == DType::kHalf || t == DType::kBFloat16) && hd == t ? 2 : 1;
}
constexpr int kNormBackwardBlocksPerSm = 1;

constexpr int norm_forward_runs(DType t) { return t == DType::kDouble ? 4 : 32 / unit_elems(t); }
constexpr int norm_backward_runs(DType t, bool long_rows) {
  if (long_rows) return t == DType::kDouble ? 4 : 32 / unit_elems(t);
  return t == DType::kFloat ? 6 : 3;
}

struct NormPlan {
  int shift = 8;           // log2 of the threads per row
  bool cached = true;      // the row stays in registers
  bool long_rows = false;  // the backward's long-row kernel
  int64_t groups = 1;      // the blocks' steps of 256 >> shift rows
  int64_t blocks = 1;      // one wave, never more than groups; the backward's partial rows
};

// The one plan of a norm launch: the glue sizes the backward's partial rows
// by it and the launchers launch it.
inline NormPlan plan_norm(DType t, DType hd, int64_t rows, int64_t H, bool backward, int sm_count) {
  NormPlan g;
  const int64_t runs = (H + unit_elems(t) - 1) / unit_elems(t);
  int per_thread = backward ? norm_backward_runs(t, false) : norm_forward_runs(t);
  if (backward && runs > (static_cast<int64_t>(per_thread) << 8) &&
      runs <= (static_cast<int64_t>(norm_backward_runs(t, true)) << 8)) {
    g.long_rows = true;
    per_thread = norm_backward_runs(t, true);
  }
  g.cached = runs <= (static_cast<int64_t>(per_thread) << 8);
  g.shift = 5;
  while (g.shift < 8 && runs > (static_cast<int64_t>(per_thread) << g.shift)) ++g.shift;
  // The long-row kernel parks no column sums between a block's rows: a row
  // per block, whatever the runs per thread.
  if (g.long_rows) g.shift = 8;
  const int64_t per_block = kThreads >> g.shift;
  g.groups = rows < 1 ? 1 : (rows + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) *
                      (backward ? kNormBackwardBlocksPerSm : norm_forward_blocks_per_sm(t, hd));
  g.blocks = g.groups < cap ? g.groups : cap;
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
