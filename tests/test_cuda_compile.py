"""Every CUDA source compiles with nvcc for Ampere (sm_80) and Hopper (sm_90)
with warnings as errors, on any machine with nvcc, GPU or not, and the code
ptxas makes of the kernels is checked: no stack frame or spills, each grid
planned for exactly the blocks per SM that the kernels' registers and shared
memory (ptxas's figures) and the GPUs' limits allow, 128-bit loads and
stores in the streaming kernels, and no call to the 64-bit integer division
routine (the kernels divide by launch constants with a multiply and a
shift). The kernels include no torch header, so compiling them needs only
the CUDA toolkit; the launch plans come from the extension's host driver.
Without nvcc these checks skip, unless CI is set.

The torch-facing glue (csrc/cuda/dropout_cuda.cpp) needs a CUDA build of
torch to compile; its launch discipline (device guard, current stream, every
launch checked, no host copy or sync) is checked here on its source, and its
op bodies (csrc/cuda/ops_impl.h) run in tests/test_cuda_host.py."""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

# The occupancy rules, ptxas's report and the toolkit's lookup are the
# static GPU model's (tools/gpu_model.py): one reading of each.
from gpu_model import demangle as _demangle
from gpu_model import nvcc as _nvcc
from gpu_model import ptxas_figures as _ptxas_figures
from gpu_model import resident_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
ARCHS = ["sm_80", "sm_90"]
# The routines nvcc calls for a 64-bit integer / or %.
DIV64_ROUTINES = ("__cuda_sm20_div_s64", "__cuda_sm20_div_u64", "__cuda_sm20_rem_s64", "__cuda_sm20_rem_u64")
ACTIVATIONS = ["identity", "relu", "gelu", "gelu_tanh", "silu"]  # by Act id
MASK_BITS = ["draw", "pack", "read"]  # by MaskBits id (kernel_args.h)
# Kernels per architecture: the elementwise kernels per dtype (4) and
# activation (5), forward in 3 mask modes and backward in 2 (draw, read);
# the bias-gradient kernel in 2; the bias reduction per dtype; the mask;
# the store of a drawn state, by value and under graph capture.
STREAMING_KERNELS = 4 * 5 * (3 + 2) + 4 * 5 * 2
# dropout_add_norm, the forward and the backward's short-row and long-row
# kernels, per (input dtype, h dtype): four dtypes with h in their own, and
# float16/bfloat16 with a float32 h.
NORM_KERNELS = 3 * (4 + 2)
KERNELS = STREAMING_KERNELS + 4 + 1 + 2 + NORM_KERNELS


KERNEL_DTYPES = {"float": "float32", "double": "float64", "Half": "float16", "BFloat16": "bfloat16"}


def _plan_launch(kernel, backward, mask_bits):
    """(op, with the bias gradient, launch index) of the launch plan that
    runs a kernel, for torch.ops.dropout_ext_testing.cuda_launch_plan; None
    for the forward that reads packed bits, which that hook does not plan,
    and for the one-block store of a drawn state, which has no plan."""
    if kernel == "ElementwiseKernel":
        op = {(False, "draw"): "forward", (False, "pack"): "forward_packed", (True, "draw"): "backward",
              (True, "read"): "backward_read"}.get((backward, mask_bits))
        return (op, False, 0) if op else None
    return {"BiasGradKernel": ("backward_read" if mask_bits == "read" else "backward", True, 0),
            "BiasReduceKernel": ("backward", True, 1), "MaskKernel": ("mask", False, 0),
            "NormForwardKernel": ("norm_forward", False, 0), "NormBackwardKernel": ("norm_backward", False, 0)}.get(kernel)


def declared_blocks_per_sm(kernel, dtype, activation, backward, mask_bits="draw"):
    """The blocks per SM that the launch plan (csrc/cuda/kernel_args.h, as
    the host driver runs it) gives a kernel's grid, the number its
    __launch_bounds__ carry too; test_grids_are_planned_for_the_blocks_an_sm_holds
    holds it to ptxas's figures and the GPUs' limits. None where no plan
    reaches the kernel."""
    import torch

    import dropout_ext  # noqa: F401  (registers the testing ops)

    launch = _plan_launch(kernel, backward, mask_bits)
    if launch is None:
        return None
    op, bias_grad, index = launch
    dtype = getattr(torch, KERNEL_DTYPES.get(dtype, "float32"))
    plan = torch.ops.dropout_ext_testing.cuda_launch_plan(op, 2 ** 30, 1024, dtype, activation or "identity",
                                                          bias_grad, 132)
    return plan[3 * index + 2]


def norm_declared_blocks_per_sm(name):
    """The blocks per SM the norm launch plan (plan_norm) gives the norm
    kernel ``name`` (demangled): a row its plan reaches, 1024 elements, or
    for the backward's long-row kernel the longest row it keeps in registers
    (8192 elements, 4096 float64); with a float32 h for the kernels of one."""
    import torch

    import dropout_ext  # noqa: F401  (registers the testing ops)

    m = re.search(r"(NormForwardKernel|NormBackwardKernel)<([^,>]+),\s*([^,>]+)(?:,\s*(\w+))?>", name)
    assert m, name
    kernel, t, hd, long_rows = m.group(1), m.group(2).split("::")[-1], m.group(3).split("::")[-1], m.group(4)
    dtype = getattr(torch, KERNEL_DTYPES[t])
    H = (4096 if t == "double" else 8192) if long_rows == "true" else 1024
    parts = ["h_f32"] if hd == "float" and t != "float" else []
    op = "norm_forward" if kernel == "NormForwardKernel" else "norm_backward"
    names, ints = torch.ops.dropout_ext_testing.cuda_launch_facts(op, [64, H], dtype, "identity", parts, 132)
    assert kernel in names[0], (names, name)
    return ints[2]


def _disassembler():
    """(tool, argv prefix) listing a cubin's SASS per function: nvdisasm (names
    call targets) or cuobjdump, from PATH, the toolkit, or Triton's bundle."""
    dirs = [os.path.dirname(os.path.realpath(p)) for p in filter(None, [_nvcc()])]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "bin"))
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        dirs.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin"))
    for name, args in (("nvdisasm", ["-c"]), ("cuobjdump", ["-sass"])):
        for path in [shutil.which(name)] + [os.path.join(d, name) for d in dirs]:
            if path and os.path.isfile(path) and os.access(path, os.X_OK):
                return name, [path] + args
    return None, None


def _need(tool, what):
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the CUDA kernels, but {what} was not found")
        pytest.skip(f"{what} not found (set CUDA_HOME); CI runs this check")


def _compile(nvcc, source, arch, out_dir):
    keep = os.path.join(out_dir, f"{os.path.basename(source)}.{arch}")
    os.makedirs(keep, exist_ok=True)
    out = os.path.join(keep, "out.o")
    cmd = [nvcc, "-std=c++17", "-O3", "--fmad=false", f"-arch={arch}", "-Werror", "all-warnings",
           "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v", "--keep", "--keep-dir", keep,
           "-c", source, "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cubins = glob.glob(os.path.join(keep, f"*{arch}*.cubin")) or glob.glob(os.path.join(keep, "*.cubin"))
    return cmd, proc, cubins[0] if cubins else None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """{(source, arch): (cmd, process, cubin)}, each compiled once."""
    nvcc = _nvcc()
    _need(nvcc, "nvcc")
    out = str(tmp_path_factory.mktemp("nvcc"))
    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    workers = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), workers))) as pool:
        results = list(pool.map(lambda j: _compile(nvcc, j[0], j[1], out), jobs))
    return dict(zip(jobs, results))


def _ptxas_report(stderr):
    """{kernel (demangled): (registers, stack bytes, spill stores, spill loads)} from -Xptxas -v."""
    return {name: figures[:4] for name, figures in _ptxas_figures(stderr).items()}


def _launch_bounds(ptx):
    """{kernel (demangled): (.maxntid x, .minnctapersm)} of a PTX file: the
    __launch_bounds__ as ptxas received them."""
    with open(ptx) as f:
        text = f.read()
    found = {}
    for name, directives in re.findall(r"\.entry (\S+)\(.*?\)\s*((?:\.\w+[^\n{]*\s*)*)\{", text, re.S):
        maxntid = re.search(r"\.maxntid (\d+)", directives)
        minblocks = re.search(r"\.minnctapersm (\d+)", directives)
        found[name] = (int(maxntid.group(1)) if maxntid else None, int(minblocks.group(1)) if minblocks else None)
    return dict(zip(_demangle(list(found)), found.values()))


def _kernel_key(name):
    """(kernel, dtype, activation, backward, mask mode) of a demangled kernel_entry name."""
    m = re.search(r"kernel_entry<dropout_ext::cuda::(\w+)(?:<([^>]*)>)?", name)
    assert m, name
    kernel, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
    dtype = args[0].split("::")[-1] if args else None
    act = re.search(r"\(dropout_ext::Act\)(\d+)", name)
    direction = re.search(r"\(dropout_ext::cuda::Dir\)(\d+)", name)
    bits = re.search(r"\(dropout_ext::cuda::MaskBits\)(\d+)", name)
    return (kernel, dtype, ACTIVATIONS[int(act.group(1))] if act else None,
            bool(int(direction.group(1))) if direction else False, MASK_BITS[int(bits.group(1))] if bits else None)


def _sass_by_function(cubin):
    """{function (demangled): SASS text}."""
    tool, argv = _disassembler()
    _need(tool, "nvdisasm or cuobjdump")
    text = subprocess.run(argv + [cubin], capture_output=True, text=True).stdout
    header = r"^\.text\.(\S+):" if tool == "nvdisasm" else r"^\s*Function : (\S+)"
    parts, cur = {}, None
    for line in text.splitlines():
        m = re.match(header, line)
        if m:
            cur = m.group(1)
            parts[cur] = []
        elif cur:
            parts[cur].append(line)
    names = list(parts)
    return {d: "\n".join(parts[n]) for d, n in zip(_demangle(names), names)}


def _ok(builds):
    failures = [f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}" for cmd, proc, _ in builds.values()
                if proc.returncode != 0]
    assert not failures, "\n\n".join(failures)


def _libm_kernel(name):
    """float64 gelu, gelu_tanh and silu call the C library's erf/exp/tanh,
    whose device versions may use a stack of their own."""
    return "<double, (dropout_ext::Act)" in name and any(f"Act){k}" in name for k in (2, 3, 4))


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu files found under csrc/cuda"


def test_cuda_sources_compile_with_warnings_as_errors(builds):
    _ok(builds)


def test_no_stack_frame_or_spills(builds):
    _ok(builds)
    bad = []
    for (src, arch), (_, proc, _) in builds.items():
        report = _ptxas_report(proc.stderr)
        assert report, f"no ptxas report for {src} {arch}"
        for name, (regs, stack, spill_st, spill_ld) in report.items():
            if (stack or spill_st or spill_ld) and not _libm_kernel(name):
                bad.append(f"{arch} {name}: {regs} registers, {stack} bytes stack, {spill_st}/{spill_ld} spill")
    assert not bad, "\n".join(bad)


def test_grids_are_planned_for_the_blocks_an_sm_holds(builds):
    """A grid-stride launch is one wave of the blocks an SM holds, and the
    bias gradient's row blocks one wave without a tail, only if the planner's
    blocks per SM is what the kernel's registers and shared memory, as
    ptxas reports them, and the GPU's limits allow: more and the grid runs
    in waves, the last one part empty; fewer and the GPU is left part idle.
    The planner gives one number to a kernel in every mask mode (so the
    packed and the regenerated bias gradients sum in one order) and on both
    GPUs, so that number must be the fewest blocks any of them holds. Each
    kernel is built for the number its plan launches it with
    (__launch_bounds__'s minimum, which ptxas fits the registers to), with
    nothing spilled to fit (the C library's float64 functions included)."""
    _ok(builds)
    table, bad = [], []
    holds, built_for = {}, {}
    for (src, arch), (_, proc, cubin) in builds.items():
        ptx = glob.glob(os.path.join(os.path.dirname(cubin), "*.ptx"))
        assert len(ptx) == 1, ptx
        bounds = _launch_bounds(ptx[0])
        figures = _ptxas_figures(proc.stderr)
        assert set(bounds) == set(figures) and len(figures) == KERNELS, (sorted(bounds), sorted(figures))
        for name, (regs, _, spill_st, spill_ld, smem) in figures.items():
            threads, blocks = bounds[name]
            key = _kernel_key(name)
            kernel, dtype, activation, backward, bits = key
            args = [a for a in (dtype, activation) if a] + (["backward" if backward else "forward"]
                                                           if kernel == "ElementwiseKernel" else [])
            args += [bits] if bits else []
            if kernel.startswith("Norm"):  # each (h dtype, row length) instance has its own residency
                args = [a.strip().split("::")[-1] for a in
                        re.search(r"Kernel<(.*?)>", name).group(1).split(",")]
            if threads is None or blocks is None:
                bad.append(f"{arch} {kernel}<{', '.join(args)}>: no __launch_bounds__ with a minimum of blocks")
                continue
            resident = resident_blocks(arch, threads, regs, smem)
            table.append(f"{arch} {kernel}<{', '.join(args)}>: {regs} registers, {smem} B shared, {resident} "
                         f"resident, built for {blocks}")
            group = f"{kernel}<{', '.join(args[:-1] if bits else args)}>"  # every mask mode
            holds.setdefault(group, []).append((resident, f"{arch} {bits or ''}".strip()))
            built_for.setdefault(group, set()).add(blocks)
            planned = (norm_declared_blocks_per_sm(name) if kernel.startswith("Norm")
                       else declared_blocks_per_sm(*key))
            if planned is not None and planned != blocks:
                bad.append(f"{table[-1]}: its grid is planned for {planned}")
            if spill_st or spill_ld:
                bad.append(f"{table[-1]}: {spill_st}/{spill_ld} bytes spilled to fit")
    for group, resident in sorted(holds.items()):
        fewest = min(r for r, _ in resident)
        if built_for[group] != {fewest}:
            where = ", ".join(f"{w}: {r}" for r, w in resident)
            bad.append(f"{group}: planned for {sorted(built_for[group])} blocks per SM, the GPUs hold {fewest} "
                       f"({where})")
    print("\n".join(sorted(table)))
    assert not bad, "\n".join(bad)


def test_streaming_kernels_use_128_bit_accesses(builds):
    """In every mask mode; and each mode's byte accesses are there: the
    structured mask's loads (draw), the packed bits' stores (pack) or loads
    (read)."""
    _ok(builds)
    byte_access = {"draw": r"LDG\.E\.(S8|U8)", "pack": r"STG\.E\.(S8|U8)", "read": r"LDG\.E\.(S8|U8)"}
    for (src, arch), (_, _, cubin) in builds.items():
        sass = _sass_by_function(cubin)
        kernels = {n: s for n, s in sass.items() if "ElementwiseKernel" in n or "BiasGradKernel" in n}
        assert len(kernels) == STREAMING_KERNELS, sorted(sass)
        for name, code in kernels.items():
            bits = _kernel_key(name)[4]
            assert re.search(r"LDG\.E\.128", code), f"{arch} {name}: no 128-bit load"
            assert re.search(r"STG\.E\.128", code), f"{arch} {name}: no 128-bit store"
            assert re.search(byte_access[bits], code), f"{arch} {name}: no byte access of its mask mode"
            if bits == "pack":  # a byte of bits has one writer: no atomic
                assert not re.search(r"ATOM|RED\.", code), f"{arch} {name}: an atomic in the pack kernel"


def test_no_64_bit_division_routine(builds):
    """Structured masks, bias columns and grid-stride loops divide by launch
    constants; a 64-bit / or % would call a ~70-instruction routine per use
    (the structured path used to, per dimension per element)."""
    _ok(builds)
    for (src, arch), (_, _, cubin) in builds.items():
        with open(cubin, "rb") as f:
            symbols = f.read()
        found = [r for r in DIV64_ROUTINES if r.encode() in symbols]
        if found:
            tool, _ = _disassembler()
            where = []
            if tool == "nvdisasm":
                where = [n for n, code in _sass_by_function(cubin).items() if any(r in code for r in found)]
            pytest.fail(f"{arch}: {found} called by {where or 'some kernel'}")


# --- the CUDA glue, checked on its source -------------------------------------

def _source(name):
    with open(os.path.join(CUDA_DIR, name)) as f:
        return re.sub(r"//[^\n]*", "", f.read())  # code only


def test_every_launch_is_on_the_current_stream_and_checked():
    kernels = _source("dropout_kernels.cu")
    launches = re.findall(r"<<<(.*?)>>>\((.*?)\);\s*\n\s*(.*?)\n", kernels, re.S)
    assert launches, "no kernel launch found in dropout_kernels.cu"
    for config, _, after in launches:
        args = [a.strip() for a in config.split(",")] if "dim3" not in config else \
            re.split(r",\s*(?![^()]*\))", config)
        assert len(args) == 4 and args[3].strip() == "stream", f"launch <<<{config}>>> not on the given stream"
        assert "cudaGetLastError()" in after, f"launch <<<{config}>>> not followed by cudaGetLastError()"
    glue = _source("dropout_cuda.cpp")
    assert "c10::cuda::CUDAGuard" in glue, "no device guard"
    assert "getCurrentCUDAStream" in glue, "not on the current stream"
    calls = re.findall(r"[^\n]*cuda::launch_\w+\(", glue)
    # The five op launchers and the two stores of a drawn state.
    assert len(calls) == 7 and all("C10_CUDA_CHECK(" in c for c in calls), calls


def test_cuda_glue_neither_copies_to_the_device_nor_syncs():
    """A state in device memory is read by the kernels there; a CPU state's
    words are read on the host and passed by value, never copied over; and
    nothing waits for the GPU."""
    for name in ("dropout_cuda.cpp", "ops_impl.h", "dropout_kernels.cu"):
        code = _source(name)
        for banned in (".to(", ".cpu(", ".item(", ".tolist(", "cudaMemcpy", "ynchronize", ".sum(", "pin_memory"):
            assert banned not in code, f"{name} uses {banned!r}"
        # The host reads a state's words only where they are host memory.
        for line in re.findall(r"[^\n]*host_mask_params\([^\n]*", code):
            assert "is_cpu()" in line, f"{name} reads a state on the host unguarded: {line.strip()}"
    impl = _source("ops_impl.h")
    for check in ("check_forward(", "check_backward(", "check_mask_args(", "check_norm_forward(",
                  "check_norm_backward("):
        assert check in impl, f"ops_impl.h does not call {check}"
