"""A static performance model of the GPU backends, read without a GPU.

For every launch of every op, direction and dtype, at the benchmark's GPU
sizes and at rows x H for the hidden sizes of most transformers, on the
launch plans of an H100 (132 SMs, sm_90), it prints (and with ``--json FILE``
writes) one row:

  bytes_moved            global memory the launch reads and writes (partial
                         sums, temporaries and extra passes included)
  bytes_min              the op's minimal bytes (benchmarks/cases.py), per call
  call_bytes_ratio       the call's launches' bytes over bytes_min
  threads_per_sm         resident threads: the fewest of the plan's blocks
                         per SM, what ptxas's registers and shared memory let
                         an SM hold, and the grid's blocks per SM
  bytes_in_flight_per_sm threads_per_sm x the bytes a thread has asked for
                         before it first waits (Little's law: HBM3 needs
                         about 3.35 TB/s x 0.7 us / 132 SMs = 18 KB per SM)
  working_lanes          the fraction of issued lanes that hold work
  dependent_loads        the longest serial walk of global loads in a thread
                         that feed one reduction result (a serial tail)
  launches_per_call      the call's launches

What each launch moves, keeps in flight and walks is stated by its kernel
beside its code: the CUDA kernels' ``facts`` (csrc/cuda/kernel_args.h,
``LaunchFacts``), recorded by the host driver's planner
(``dropout_ext_testing.cuda_launch_facts``); the Triton kernels' fact
functions, recorded by ``triton_kernels.recording()`` on meta tensors.
Registers and shared memory come from ptxas: nvcc over csrc/cuda for the CUDA
kernels, Triton's own compiler for each Triton variant a plan launches. The
occupancy rules (``resident_blocks``) are the CUDA occupancy calculator's.

Usage: python tools/gpu_model.py [--backend cuda|triton|all] [--json FILE]
       [--markdown] [--check]
--check exits 1 when a row misses a target (TARGETS) and lists them.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# --- the GPU ----------------------------------------------------------------------

# Per SM, what bounds the blocks resident at once (the CUDA programming
# guide's table per compute capability, applied as the occupancy calculator
# cuda_occupancy.h does): registers, allocated per warp in units of 256 from
# 4 equal sub-partitions; threads, as whole warps; blocks; shared memory,
# allocated per block in units of 128 bytes with 1 KiB reserved per block.
GPU_LIMITS = {
    "sm_80": {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 * 1024},  # A100
    "sm_90": {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 * 1024},  # H100
}
REGISTER_UNIT, SUB_PARTITIONS = 256, 4
SHARED_UNIT, SHARED_RESERVED = 128, 1024
ARCH = "sm_90"
SMS = 132  # an H100 SXM's; the host driver plans for the same (kHostSmCount)


def resident_blocks(arch: str, threads: int, registers: int, shared_bytes: int) -> int:
    """Blocks of ``threads`` threads that one SM of ``arch`` holds at once,
    with ``registers`` per thread and ``shared_bytes`` of shared memory per
    block."""
    limits = GPU_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = limits["registers"] // SUB_PARTITIONS // per_warp * SUB_PARTITIONS // warps
    shared = -(-(shared_bytes + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    return min(by_registers, limits["threads"] // 32 // warps, limits["blocks"], limits["shared"] // shared)


# --- targets ------------------------------------------------------------------------

TARGETS = {
    # bytes moved / minimal bytes, per call, at every size above 2**20 elements
    "elementwise_bytes_ratio": 1.05,
    # dropout_add_norm's forward and backward together, parameter-gradient partials included
    "norm_fb_bytes_ratio": 1.10,
    # every streaming launch (one that reads at least the input's bytes) above 2**20 elements
    "bytes_in_flight_per_sm": 32 * 1024,
    "working_lanes": 0.90,
    # every launch
    "dependent_loads": 32,
    # compiled variants per Triton kernel and dtype over 50 random row counts in [1, 2**20]
    "triton_variants": 4,
}
MIN_NUMEL = 1 << 20

# --- the calls modelled ----------------------------------------------------------------

HIDDEN_SIZES = (768, 1024, 4096, 8192)
ROWS = (4096, 32768)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Call:
    """One op call: op (benchmarks/cases.py's names, plus channel_dropout),
    direction (forward or backward), dtype, shape, mask mode (regenerate or
    packed; the packed mode's forward stores the bits its backward reads)."""
    op: str
    direction: str
    dtype: str
    shape: Tuple[int, ...]
    mask: str = "regenerate"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def calls() -> List[Call]:
    from benchmarks import cases

    shapes = [(n // cases.HIDDEN, cases.HIDDEN) for n in (1 << 20, 1 << 24, 1 << 28)]
    shapes += [(r, h) for h in HIDDEN_SIZES for r in ROWS]
    shapes = sorted(set(shapes), key=lambda s: (s[1], s[0]))
    out = []
    for op in list(cases.OPS) + list(cases.NORM_OPS):
        for direction in ("forward", "backward"):
            for dtype in DTYPES:
                for shape in shapes:
                    out.append(Call(op, direction, dtype, shape))
                    if op == "dropout":
                        out.append(Call(op, direction, dtype, shape, "packed"))
    # Channel dropout (Dropout2d): a small mask read through broadcast strides.
    for direction in ("forward", "backward"):
        for dtype in DTYPES:
            out.append(Call("channel_dropout", direction, dtype, (32, 256, 64, 64)))
    return out


def minimal_bytes(call: Call) -> int:
    from benchmarks import cases

    elem = _torch_dtype(call.dtype).itemsize
    op = "dropout" if call.op == "channel_dropout" else call.op
    return cases.minimal_bytes(op, call.direction, call.numel, elem)


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _call_parts(call: Call) -> Tuple[str, str, List[str]]:
    """(cuda_launch_facts op, activation, parts) of a call: what the call's
    tensors are, as the benchmark's input sets give them (a backward asks for
    every input's gradient)."""
    from benchmarks import cases

    if call.op in cases.NORM_OPS:
        rms = cases.NORM_OPS[call.op] == "rms"
        parts = ["residual", "weight"] + ([] if rms else ["norm_bias"]) + (["rms"] if rms else [])
        if call.direction == "backward":
            parts += ["grad_input", "grad_residual"]
        return "norm_" + call.direction, "identity", parts
    if call.op == "channel_dropout":
        return call.direction, "identity", ["structured"]
    act, bias, res = cases.OPS[call.op]
    parts = (["bias"] if bias else []) + (["residual"] if res else [])
    if call.direction == "backward" and bias:
        parts.append("bias_grad")
    op = call.direction
    if call.mask == "packed":
        op = "forward_packed" if call.direction == "forward" else "backward_read"
    return op, act, parts


# --- launches -----------------------------------------------------------------------------

FIELDS = ("grid_x", "grid_y", "plan_blocks_per_sm", "shared_bytes", "bytes_read", "bytes_written",
          "inflight_bytes_per_thread", "lane_slots", "busy_slots", "dependent_loads")


@dataclass
class Launch:
    kernel: str        # the kernel's name as its backend knows it
    key: str           # what its registers are looked up by
    threads: int       # per block (program)
    blocks: int        # in the grid
    plan_blocks_per_sm: Optional[int]
    shared_bytes: int
    bytes_read: int
    bytes_written: int
    inflight_bytes_per_thread: int
    lane_slots: int
    busy_slots: int
    dependent_loads: int
    extra: Dict = field(default_factory=dict)


def cuda_launches(call: Call, sms: int = SMS) -> List[Launch]:
    import torch

    import dropout_ext  # noqa: F401  (registers the testing ops)

    op, act, parts = _call_parts(call)
    names, ints = torch.ops.dropout_ext_testing.cuda_launch_facts(op, list(call.shape), _torch_dtype(call.dtype),
                                                                  act, parts, sms)
    out = []
    for i, name in enumerate(names):
        f = dict(zip(FIELDS, ints[len(FIELDS) * i:len(FIELDS) * (i + 1)]))
        short = re.sub(r"dropout_ext::(cuda::)?", "", name)
        out.append(Launch(short, _normal(name), 256, f["grid_x"] * f["grid_y"], f["plan_blocks_per_sm"],
                          f["shared_bytes"], f["bytes_read"], f["bytes_written"], f["inflight_bytes_per_thread"],
                          f["lane_slots"], f["busy_slots"], f["dependent_loads"]))
    return out


def _normal(name: str) -> str:
    return re.sub(r"\s+", "", name)


# --- ptxas figures of the CUDA kernels ---------------------------------------------------------

def nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def demangle(names: Sequence[str]) -> List[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else list(names)


def ptxas_figures(stderr: str) -> Dict[str, Tuple[int, int, int, int, int]]:
    """{kernel (demangled): (registers, stack bytes, spill stores, spill loads,
    static shared memory bytes)} from nvcc's -Xptxas -v."""
    entries, cur, frame = {}, None, (0, 0, 0)
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur, frame = m.group(1), (0, 0, 0)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            frame = tuple(int(v) for v in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            smem = re.search(r"(\d+) bytes smem", line)
            entries[cur] = (int(m.group(1)),) + frame + (int(smem.group(1)) if smem else 0,)
            cur = None
    return dict(zip(demangle(list(entries)), entries.values()))


def _cuda_sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if path.endswith((".h", ".cu")):
            with open(path, "rb") as f:
                h.update(path.encode() + f.read())
    return h.hexdigest()[:16]


def cuda_registers(arch: str = ARCH) -> Dict[str, Tuple[int, int]]:
    """{kernel struct (normalised name): (registers, static shared bytes)} of
    every CUDA kernel, from ptxas on csrc/cuda/dropout_kernels.cu (cached by
    the sources' digest)."""
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dropout_ext")
    cache = os.path.join(cache_dir, f"ptxas-{arch}-{_cuda_sources_digest()}.txt")
    if os.path.exists(cache):
        with open(cache) as f:
            report = f.read()
    else:
        compiler = nvcc()
        if compiler is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME): the CUDA kernels' registers come from ptxas")
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([compiler, "-std=c++17", "-O3", "--fmad=false", f"-arch={arch}", "-Xptxas", "-v",
                                   "-cubin", os.path.join(ROOT, "csrc", "cuda", "dropout_kernels.cu"),
                                   "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
        report = proc.stderr
        os.makedirs(cache_dir, exist_ok=True)
        with open(cache, "w") as f:
            f.write(report)
    out = {}
    for name, (regs, _, _, _, smem) in ptxas_figures(report).items():
        m = re.search(r"kernel_entry<(.*)>\s*\((.*)::Params\)", name)
        if m:
            out[_normal(m.group(2))] = (regs, smem)
    return out


# --- Triton ------------------------------------------------------------------------------------

def triton_launches(call: Call, sms: int = SMS) -> List[Launch]:
    """The Triton backend's launches of a call, recorded on meta tensors."""
    import torch

    from dropout_ext import triton_kernels as K

    records = _triton_records(call, sms)
    out = []
    for r in records:
        warps = r.get("num_warps", 0)
        grid = r.get("grid", (1,))
        blocks = math.prod(grid)
        key = _triton_key(r)
        out.append(Launch(r["kernel"], key, 32 * warps if warps else 0, blocks, None, 0, r["bytes_read"],
                          r["bytes_written"], r["inflight_bytes_per_thread"], r["lane_slots"], r["busy_slots"],
                          r["dependent_loads"], extra={"record": r}))
    del torch, K
    return out


def _triton_key(r: Dict) -> str:
    consts = r.get("constexprs", {})
    return json.dumps([r["kernel"], r.get("num_warps"), sorted((k, repr(v)) for k, v in consts.items()),
                       r.get("signature"), r.get("divisible")], sort_keys=True)


def _triton_records(call: Call, sms: int) -> List[Dict]:
    import torch

    from benchmarks import cases
    from dropout_ext import triton_kernels as K

    dtype = _torch_dtype(call.dtype)
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(call.shape, **meta)
    H = call.shape[-1]
    state = torch.empty(3, dtype=torch.int64, device="meta")
    with K.recording(sm_count=sms) as records:
        if call.op in cases.NORM_OPS:
            norm = cases.NORM_OPS[call.op]
            w = torch.empty(H, **meta)
            b = torch.empty(H, **meta) if norm == "layer" else None
            if call.direction == "forward":
                K.dropout_add_norm(x, torch.empty(call.shape, **meta), w, b, state, norm, cases.EPS, False)
            else:
                rows = math.prod(call.shape[:-1])
                stats = torch.empty(rows, device="meta", dtype=torch.float32)
                K.dropout_add_norm_backward(x, None, torch.empty(call.shape, **meta), w, stats, stats, state, norm,
                                            [True, True, True, norm == "layer"])
        else:
            if call.op == "channel_dropout":
                act, bias, res = "identity", False, False
                mask_shape = list(call.shape[:-2]) + [1, 1]
            else:
                act, bias, res = cases.OPS[call.op]
                mask_shape = []
            b = torch.empty(H, **meta) if bias else None
            packed = call.mask == "packed"
            if call.direction == "forward":
                K.fused_dropout(x, b, torch.empty(call.shape, **meta) if res else None, state, act, mask_shape,
                                None, packed)
            else:
                bits = torch.empty((call.numel + 7) // 8, dtype=torch.uint8, device="meta") if packed else None
                K.fused_dropout_backward(x, x if act != "identity" else None, b, state, act, mask_shape, bias, bits)
    return list(records)


def triton_registers(record: Dict, arch: str = ARCH) -> Tuple[int, int]:
    """(registers, shared bytes) of the variant a record launches, compiled
    ahead of time for ``arch`` by Triton (no GPU needed)."""
    key = _triton_key(record) + arch
    if key in _TRITON_CACHE:
        return _TRITON_CACHE[key]
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dropout_ext import triton_kernels as K

    fn = getattr(K, record["kernel"])
    signature = record["signature"]
    # Pointers 16-byte aligned, as the caching allocator gives them, and the
    # integers a launch specialises as multiples of 16.
    divisible = set(record.get("divisible", ()))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, t) in enumerate(signature.items())
             if (isinstance(t, str) and t.startswith("*")) or name in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=record["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch.split("_")[1]), 32),
                              options={"num_warps": record["num_warps"]})
    regs = cubin_resource_usage(compiled.asm["cubin"])["REG"]
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    _TRITON_CACHE[key] = (regs, shared)
    return regs, shared


_TRITON_CACHE: Dict[str, Tuple[int, int]] = {}


def cubin_resource_usage(cubin: bytes) -> Dict[str, int]:
    """{"REG": registers per thread, "STACK": ..., "LOCAL": ...} of a Triton
    cubin, read by the cuobjdump that Triton ships (the count a launch would
    report as n_regs, which needs a GPU to read)."""
    import triton

    cuobjdump = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = cuobjdump.path if cuobjdump is not None else os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        f = os.path.join(tmp, "kernel.cubin")
        with open(f, "wb") as out:
            out.write(cubin)
        text = subprocess.run([path, "--dump-resource-usage", f], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    assert "REG" in usage, text
    return {key: int(value) for key, value in usage.items()}


# --- rows ---------------------------------------------------------------------------------------

def _streaming(launch: Launch, call: Call) -> bool:
    """A launch that streams the tensors: it reads at least the input's bytes."""
    return launch.bytes_read >= call.numel * _torch_dtype(call.dtype).itemsize


def rows_for(backend: str, sms: int = SMS, arch: str = ARCH, only: Optional[Sequence[Call]] = None) -> List[Dict]:
    regs = cuda_registers(arch) if backend == "cuda" else None
    out = []
    for call in (only or calls()):
        launches = cuda_launches(call, sms) if backend == "cuda" else triton_launches(call, sms)
        bmin = minimal_bytes(call)
        moved = sum(l.bytes_read + l.bytes_written for l in launches)
        for l in launches:
            if backend == "cuda":
                if l.key not in regs:
                    raise KeyError(f"no ptxas figures for {l.kernel}")
                registers, shared = regs[l.key]
                shared = max(shared, l.shared_bytes)
            else:
                registers, shared = triton_registers(l.extra["record"], arch) if l.threads else (0, 0)
            fits = resident_blocks(arch, l.threads, registers, shared) if l.threads else 0
            per_sm = min(fits, l.plan_blocks_per_sm or fits, -(-l.blocks // sms))
            threads = per_sm * l.threads
            out.append({
                "op": call.op, "direction": call.direction, "dtype": call.dtype, "shape": list(call.shape),
                "mask": call.mask, "backend": backend, "kernel": l.kernel, "blocks": l.blocks,
                "threads_per_block": l.threads, "registers": registers, "shared_bytes": shared,
                "bytes_moved": l.bytes_read + l.bytes_written, "bytes_min": bmin, "call_bytes_moved": moved,
                "call_bytes_ratio": round(moved / bmin, 4), "threads_per_sm": threads,
                "bytes_in_flight_per_sm": threads * l.inflight_bytes_per_thread,
                "working_lanes": round(l.busy_slots / l.lane_slots, 4) if l.lane_slots else 1.0,
                "dependent_loads": l.dependent_loads, "launches_per_call": len(launches),
                "streaming": _streaming(l, call),
            })
    return out


def _call_key(r: Dict) -> Tuple:
    return (r["backend"], r["op"], r["direction"], r["dtype"], tuple(r["shape"]), r["mask"])


def norm_fb_ratios(rows: Sequence[Dict]) -> Dict[Tuple, float]:
    """{(backend, op, dtype, shape, mask): bytes moved / minimal bytes} of
    each dropout_add_norm forward and backward together, the pair the target
    speaks of (the forward alone must also write h, which its own minimum
    leaves out)."""
    from benchmarks import cases

    acc: Dict[Tuple, Dict[str, int]] = {}
    seen = set()
    for r in rows:
        call = _call_key(r)
        if r["op"] not in cases.NORM_OPS or call in seen:
            continue
        seen.add(call)
        a = acc.setdefault(call[:2] + call[3:], {"moved": 0, "min": 0, "dirs": 0})
        a["moved"] += r["call_bytes_moved"]
        a["min"] += r["bytes_min"]
        a["dirs"] += 1
    out = {}
    for key, a in acc.items():
        if a["dirs"] == 2:
            h_write = math.prod(key[3]) * _torch_dtype(key[2]).itemsize
            out[key] = a["moved"] / (a["min"] + h_write)
    return out


@dataclass(frozen=True)
class Miss:
    """A target a row misses: where (the call, or the kernel of a launch),
    which target, and the row's figure."""
    backend: str
    kernel: str  # the kernel's name without template arguments; "" for a call's bytes
    target: str  # a TARGETS key
    value: float
    where: str

    def __str__(self) -> str:
        return f"{self.where}: {self.target} {self.value:g} (target {TARGETS[self.target]:g})"


def miss_list(rows: Sequence[Dict]) -> List[Miss]:
    """Each target a row misses; empty when every target holds."""
    from benchmarks import cases

    bad = []
    seen_calls = set()
    for r in rows:
        where = f"{r['backend']} {r['op']} {r['direction']} {r['dtype']} {tuple(r['shape'])} {r['mask']} {r['kernel']}"
        kernel = re.sub(r"<.*", "", r["kernel"])
        call = _call_key(r)
        if r["op"] not in cases.NORM_OPS and call not in seen_calls and math.prod(r["shape"]) > MIN_NUMEL and \
                r["call_bytes_ratio"] > TARGETS["elementwise_bytes_ratio"]:
            bad.append(Miss(r["backend"], "", "elementwise_bytes_ratio", r["call_bytes_ratio"], where))
        seen_calls.add(call)
        # A launch of 2**20 elements or fewer has less than a wave of blocks
        # and the tensor sits in the L2 cache: latency-bound whatever it keeps
        # in flight, so the bandwidth targets start above it.
        if r["streaming"] and math.prod(r["shape"]) > MIN_NUMEL:
            for target in ("bytes_in_flight_per_sm", "working_lanes"):
                if r[target] < TARGETS[target]:
                    bad.append(Miss(r["backend"], kernel, target, r[target], where))
        if r["dependent_loads"] > TARGETS["dependent_loads"]:
            bad.append(Miss(r["backend"], kernel, "dependent_loads", r["dependent_loads"], where))
    for key, ratio in norm_fb_ratios(rows).items():
        if math.prod(key[3]) > MIN_NUMEL and ratio > TARGETS["norm_fb_bytes_ratio"]:
            where = f"{key[0]} {key[1]} forward+backward {key[2]} {key[3]} {key[4]}"
            bad.append(Miss(key[0], "", "norm_fb_bytes_ratio", round(ratio, 4), where))
    return bad


def misses(rows: Sequence[Dict]) -> List[str]:
    """Each target a row misses, as a line."""
    return [str(m) for m in miss_list(rows)]


def worst_misses(rows: Sequence[Dict]) -> Dict[Tuple[str, str, str], float]:
    """{(backend, kernel, target): the worst figure} of the targets missed:
    the lowest where the target is a floor, the highest where a ceiling."""
    out: Dict[Tuple[str, str, str], float] = {}
    for m in miss_list(rows):
        key = (m.backend, m.kernel, m.target)
        floor = m.target in ("bytes_in_flight_per_sm", "working_lanes")
        out[key] = m.value if key not in out else (min if floor else max)(out[key], m.value)
    return out


def triton_variants(H: int, dtype: str = "bfloat16", counts: int = 50, seed: int = 0) -> Dict[str, int]:
    """{kernel and argument types: compiled variants} the Triton plans of
    every op launch over ``counts`` random row counts in [1, 2**20] at hidden
    size H: the distinct (constexprs, warps) each kernel is launched with
    for each set of argument dtypes."""
    import random

    from benchmarks import cases

    rng = random.Random(seed)
    variants: Dict[str, set] = {}
    for _ in range(counts):
        rows = rng.randint(1, 1 << 20)
        for op in ("dropout", "bias_gelu_dropout", "dropout_residual") + tuple(cases.NORM_OPS):
            for direction in ("forward", "backward"):
                for r in _triton_records(Call(op, direction, dtype, (rows, H)), SMS):
                    if r["kernel"].startswith("torch."):
                        continue
                    # per kernel and argument types (its dtypes): the constexpr sets it compiles
                    types = json.dumps(r["signature"], sort_keys=True)
                    consts = json.dumps([r["num_warps"], sorted((k, repr(v)) for k, v in r["constexprs"].items())])
                    variants.setdefault(f"{r['kernel']} {types}", set()).add(consts)
    return {k: len(v) for k, v in variants.items()}


# --- output ------------------------------------------------------------------------------------

COLUMNS = ("backend", "op", "direction", "dtype", "shape", "kernel", "call_bytes_ratio", "threads_per_sm",
           "bytes_in_flight_per_sm", "working_lanes", "dependent_loads", "launches_per_call")


def markdown(rows: Sequence[Dict]) -> str:
    """The streaming launches and the reductions, one line each, at the
    listed hidden sizes (rows x H with 32768 rows), bfloat16."""
    lines = ["| backend | op | dir | shape | kernel | bytes / min | threads/SM | KiB in flight/SM | lanes | "
             "serial loads | launches |", "|" + "---|" * 11]
    for r in rows:
        if r["dtype"] != "bfloat16" or r["shape"][0] != ROWS[-1] or r["mask"] != "regenerate":
            continue
        kernel = re.sub(r"<.*", "", r["kernel"])
        lines.append(f"| {r['backend']} | {r['op']} | {r['direction']} | {r['shape'][0]}x{r['shape'][1]} | "
                     f"{kernel} | {r['call_bytes_ratio']:.3f} | {r['threads_per_sm']} | "
                     f"{r['bytes_in_flight_per_sm'] / 1024:.0f} | {r['working_lanes']:.0%} | "
                     f"{r['dependent_loads']} | {r['launches_per_call']} |")
    return "\n".join(lines)


def summary(rows: Sequence[Dict]) -> str:
    """BENCHMARKS.md's table: per backend, op family, direction and kernel,
    the worst figure over every dtype and size modelled (bytes over the
    minimum, in flight and lanes: calls above 2**20 elements, as the
    targets; bytes: the norm's forward and backward together; in flight and
    lanes: streaming launches)."""
    from benchmarks import cases

    groups: Dict[Tuple, Dict] = {}
    fb = norm_fb_ratios(rows)
    for r in rows:
        family = "norm" if r["op"] in cases.NORM_OPS else ("channel" if r["op"] == "channel_dropout" else "elementwise")
        key = (r["backend"], family, r["direction"], re.sub(r"<.*", "", r["kernel"]))
        g = groups.setdefault(key, {"ratio": 0.0, "inflight": None, "lanes": None, "serial": 0, "launches": 0})
        if math.prod(r["shape"]) > MIN_NUMEL:
            key = _call_key(r)
            ratio = fb.get(key[:2] + key[3:], 0.0) if family == "norm" else r["call_bytes_ratio"]
            g["ratio"] = max(g["ratio"], ratio)
        if r["streaming"] and math.prod(r["shape"]) > MIN_NUMEL:
            k = r["bytes_in_flight_per_sm"] / 1024
            g["inflight"] = k if g["inflight"] is None else min(g["inflight"], k)
            g["lanes"] = r["working_lanes"] if g["lanes"] is None else min(g["lanes"], r["working_lanes"])
        g["serial"] = max(g["serial"], r["dependent_loads"])
        g["launches"] = max(g["launches"], r["launches_per_call"])
    lines = ["| backend | ops | direction | kernel | bytes / min (max) | KiB in flight / SM (min) | "
             "lanes with work (min) | serial loads (max) | launches / call (max) |", "|" + "---|" * 9]
    for (backend, family, direction, kernel), g in groups.items():
        inflight = "-" if g["inflight"] is None else f"{g['inflight']:.0f}"
        lanes = "-" if g["lanes"] is None else f"{g['lanes']:.0%}"
        lines.append(f"| {backend} | {family} | {direction} | {kernel} | {g['ratio']:.3f} | {inflight} | {lanes} | "
                     f"{g['serial']} | {g['launches']} |")
    return "\n".join(lines)


# --- prediction: the model against a GPU's measurements ---------------------------------------

# Assumptions of the time a launch takes, stated once: a DRAM round trip
# (the figure of the Little's-law target), and a launch's fixed cost
# between back-to-back kernels on one stream.
LATENCY_S = 0.7e-6
LAUNCH_S = 2e-6


def launch_time(row: Dict, bandwidth: float, sms: int = SMS) -> float:
    """Seconds one launch takes on the model: its bytes at the bandwidth its
    bytes in flight sustain (Little's law, at most the device's), plus its
    serial loads' round trips, plus the launch."""
    busy_sms = min(sms, row["blocks"])
    sustained = busy_sms * row["bytes_in_flight_per_sm"] / LATENCY_S if row["bytes_in_flight_per_sm"] else bandwidth
    return row["bytes_moved"] / min(bandwidth, sustained) + row["dependent_loads"] * LATENCY_S + LAUNCH_S


def load_rows(paths: Sequence[str]) -> List[Dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += json.load(f)["rows"]
    return rows


def predict(bench: Dict, rows: Sequence[Dict]) -> List[Dict]:
    """Each dropout_ext row of a GPU benchmark run beside the model's time for
    it, at the bandwidth that run's clone() reached (copy_bytes / copy_time_s):
    so the model's bytes, in-flight and serial-load figures are what is
    checked, not the device's peak."""
    from benchmarks import cases

    by_call: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        by_call.setdefault((r["backend"], r["op"], r["direction"], r["dtype"], tuple(r["shape"]), r["mask"]),
                           []).append(r)
    out = []
    for b in bench["rows"]:
        m = re.fullmatch(r"dropout_ext\[(cuda|triton)(?:/(\w+))?\]", b.get("impl", ""))
        if not m or not b.get("copy_time_s") or b["numel"] % cases.HIDDEN:
            continue
        backend, mask = m.group(1), m.group(2) or "regenerate"
        shape = (b["numel"] // cases.HIDDEN, cases.HIDDEN)
        directions = ("forward", "backward") if b["direction"] == "forward_backward" else (b["direction"],)
        launches = []
        for d in directions:
            launches += by_call.get((backend, b["op"], d, b["dtype"], shape, mask), [])
        if not launches:
            continue
        bandwidth = b["copy_bytes"] / b["copy_time_s"]
        t = sum(launch_time(r, bandwidth) for r in launches)
        out.append({"op": b["op"], "direction": b["direction"], "dtype": b["dtype"], "numel": b["numel"],
                    "impl": b["impl"], "measured_s": b["time_s"], "model_s": t,
                    "measured_over_model": b["time_s"] / t, "launches": len(launches)})
    return out


def environment() -> Dict[str, str]:
    import datetime

    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "date": datetime.date.today().isoformat()}


def write_json(path: str, rows: Sequence[Dict], sms: int = SMS) -> None:
    """The rows, one per line, under what they were computed for and with."""
    head = {"gpu": f"H100 launch plan ({sms} SMs, {ARCH}); registers from ptxas", **environment(),
            "targets": TARGETS}
    with open(path, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "rows": [\n')
        f.write(",\n".join(json.dumps(r) for r in rows))
        f.write("\n]}\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("cuda", "triton", "all"), default="all")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="print the bfloat16 table of BENCHMARKS.md")
    ap.add_argument("--summary", action="store_true", help="print BENCHMARKS.md's summary table")
    ap.add_argument("--check", action="store_true", help="exit 1 when a row misses a target")
    ap.add_argument("--sms", type=int, default=SMS)
    ap.add_argument("--predict", metavar="BENCH_JSON", help="a GPU benchmark run's JSON: print each dropout_ext "
                    "case's time beside the model's")
    ap.add_argument("--rows", metavar="MODEL_JSON", nargs="+", default=None,
                    help="model rows written by --json, read instead of computed (for --predict, default: the "
                    "committed benchmarks/results/gpu-model/*.json)")
    args = ap.parse_args(argv)
    if args.predict:
        paths = args.rows or sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "gpu-model", "*.json")))
        with open(args.predict) as f:
            bench = json.load(f)
        print(f"{'case':58} {'impl':32} {'measured us':>12} {'model us':>9} {'ratio':>6}")
        for p in predict(bench, load_rows(paths)):
            case = f"{p['op']}-{p['direction']}-{p['dtype']}-{p['numel']}"
            print(f"{case:58} {p['impl']:32} {p['measured_s'] * 1e6:12.1f} {p['model_s'] * 1e6:9.1f} "
                  f"{p['measured_over_model']:6.2f}")
        return 0
    backends = ("cuda", "triton") if args.backend == "all" else (args.backend,)
    if args.rows:  # rows written before (e.g. the kernels before a change)
        rows = [r for r in load_rows(args.rows) if r["backend"] in backends]
    else:
        rows = []
        for b in backends:
            rows += rows_for(b, args.sms)
    if args.json:
        write_json(args.json, rows, args.sms)
    if args.summary:
        print(summary(rows))
    elif args.markdown:
        print(markdown(rows))
    else:
        for r in rows:
            print(json.dumps({k: r[k] for k in COLUMNS}))
    bad = misses(rows)
    if bad:
        print(f"\n{len(bad)} target(s) missed:", file=sys.stderr)
        for line in bad:
            print("  " + line, file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
