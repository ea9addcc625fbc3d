"""Build dropout_ext._C: the C++ CPU kernels always, the CUDA kernels where
torch is a CUDA build and a CUDA toolkit is found.

Install with ``pip install --no-build-isolation .``: the extension must be
compiled against the torch that is already installed, which an isolated
build environment would not see (it would download another torch).

Environment (see README.md, "Build notes"):
  DROPOUT_EXT_NO_CUDA=1     build the CPU kernels only.
  DROPOUT_EXT_FORCE_CUDA=1  fail the install, with the reason, when the CUDA
                            kernels cannot be built (instead of building the
                            CPU kernels only).
  CUDA_HOME / CUDA_PATH     the CUDA toolkit to use; otherwise it is found
                            from `nvcc` on PATH.
  TORCH_CUDA_ARCH_LIST      GPU architectures; default: the visible GPUs, or
                            "8.0;9.0" when none is visible.
"""

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from setuptools import find_packages, setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# Ampere and Hopper: the GPUs the kernels are written and tuned for.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"

# No FMA contraction and no reassociation: the activations are specified as
# exact IEEE operation sequences that every backend reproduces bit for bit.
# -fno-trapping-math lets GCC turn the selects into vector blends; it changes
# no result.
# -fopenmp: at::parallel_for is an inline template over OpenMP, so without it
# the kernels silently run on one thread.
# The C++ standard is left to torch.utils.cpp_extension, which picks the one
# the installed torch's headers need.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
# --fmad=false: the CUDA kernels round the activations exactly as the CPU
# does; the host half of each .cu file follows the C++ rule above.
NVCC_FLAGS = ["-O3", "--fmad=false", "-Xcompiler=-ffp-contract=off"]


def _log(message: str) -> None:
    # pip shows a build's output only with -v or when it fails; the prefix
    # makes these lines easy to find in either.
    print(f"dropout_ext: {message}", flush=True)


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        sys.exit(f"dropout_ext: {name} must be 0 or 1, got {value!r}")
    return value == "1"


def _rel(paths) -> List[str]:
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _sources(*patterns: str) -> List[str]:
    return _rel(p for pattern in patterns for p in glob.glob(os.path.join(HERE, *pattern.split("/"))))


# --- finding the CUDA toolkit ------------------------------------------------

def _has_toolkit(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


def _nvcc_top(nvcc: str) -> Optional[str]:
    """The toolkit folder that `nvcc` really runs from. The nvcc on PATH can be
    a wrapper script or a symlink whose own parent folder holds no headers
    (which is what torch guesses); the driver's dry run names the folder it
    resolved itself to (TOP=...). The probe file is never read."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([nvcc, "-dryrun", "-c", os.path.join(tmp, "probe.cu"),
                                   "-o", os.path.join(tmp, "probe.o")],
                                  capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
    for line in (proc.stdout + proc.stderr).splitlines():
        match = re.match(r"#\$ TOP=(.+)$", line.strip())
        if match:
            return os.path.normpath(match.group(1).strip().strip('"'))
    return None


def find_cuda_home() -> Tuple[Optional[str], str]:
    """(toolkit folder or None, how it was found or why none was)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            # The user's choice wins, even a wrong one: the checks that follow
            # then say what is missing from it.
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates = [(_nvcc_top(nvcc), f"the toolkit that {nvcc} runs (nvcc -dryrun)"),
                      (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"{nvcc} resolved"),
                      (os.path.dirname(os.path.dirname(nvcc)), f"the parent of {nvcc}'s folder")]
        for home, how in candidates:
            if _has_toolkit(home):
                return os.path.normpath(home), how
        return None, (f"{nvcc} is on PATH but no folder it leads to has bin/nvcc and "
                      "include/cuda_runtime_api.h; set CUDA_HOME")
    if _has_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", "the default location"
    return None, "nvcc is not on PATH and neither CUDA_HOME nor CUDA_PATH is set"


def _nvcc_release(home: str) -> str:
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else "unknown"


def _nvidia_wheel_include_dirs() -> List[str]:
    """Include folders of the nvidia-* wheels that a pip-installed CUDA torch
    depends on (site-packages/nvidia/<lib>/include). torch's CUDA headers
    include cuSPARSE, cuBLAS and cuSOLVER headers that a minimal toolkit
    lacks and the wheels ship; torch.utils.cpp_extension does not add them."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d)})


@dataclass
class CudaPlan:
    build: bool
    reason: str
    home: Optional[str] = None
    home_found_by: str = ""
    nvcc_release: str = ""
    arch_list: Optional[str] = None      # None: torch reads the visible GPUs
    arch_list_source: str = ""
    extra_include_dirs: List[str] = field(default_factory=list)


def plan_cuda() -> CudaPlan:
    """Whether to build the CUDA kernels, and with what. Reads the environment
    and probes the toolkit; changes nothing."""
    if _env_flag("DROPOUT_EXT_NO_CUDA"):
        return CudaPlan(False, "DROPOUT_EXT_NO_CUDA=1")
    if getattr(torch.version, "hip", None):
        return CudaPlan(False, f"torch is a ROCm build ({torch.version.hip}); only CUDA kernels exist")
    if torch.version.cuda is None:
        return CudaPlan(False, f"torch {torch.__version__} is a CPU-only build")
    home, how = find_cuda_home()
    if home is None:
        return CudaPlan(False, how)
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return CudaPlan(False, f"no bin/nvcc in CUDA_HOME={home} ({how})")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        arch_list, arch_source = os.environ["TORCH_CUDA_ARCH_LIST"], "$TORCH_CUDA_ARCH_LIST"
    elif torch.cuda.is_available():
        arch_list, arch_source = None, "the visible GPUs"
    else:
        arch_list, arch_source = DEFAULT_CUDA_ARCH_LIST, "default, no GPU visible"
    return CudaPlan(True, f"torch {torch.__version__} (CUDA {torch.version.cuda})", home=home,
                    home_found_by=how, nvcc_release=_nvcc_release(home), arch_list=arch_list,
                    arch_list_source=arch_source, extra_include_dirs=_nvidia_wheel_include_dirs())


def _check_flags() -> None:
    if _env_flag("DROPOUT_EXT_FORCE_CUDA") and _env_flag("DROPOUT_EXT_NO_CUDA"):
        sys.exit("dropout_ext: DROPOUT_EXT_FORCE_CUDA=1 and DROPOUT_EXT_NO_CUDA=1 contradict each other")


def _prepare_environment(plan: CudaPlan) -> None:
    """torch.utils.cpp_extension fixes its CUDA_HOME when first imported,
    from the environment or nvcc's parent folder (wrong for a wrapper), and
    reads TORCH_CUDA_ARCH_LIST from the environment when it compiles."""
    if plan.build:
        os.environ["CUDA_HOME"] = plan.home
        if plan.arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list


def extensions(plan: CudaPlan, cpp_extension):
    # The host driver of the CUDA kernels (csrc/cuda_host) is plain C++ and
    # runs them on the CPU, so it is part of every build.
    cpp_sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/cuda_host/*.cpp")
    if not plan.build:
        _log(f"building the CPU kernels only ({plan.reason})")
        return [cpp_extension.CppExtension("dropout_ext._C", cpp_sources, extra_compile_args={"cxx": CXX_FLAGS},
                                           extra_link_args=LINK_FLAGS)]

    # Something may have imported cpp_extension before the environment was set.
    cpp_extension.CUDA_HOME = plan.home
    _log(f"building the CPU and CUDA kernels with {plan.reason}")
    _log(f"CUDA_HOME={plan.home} ({plan.home_found_by}), nvcc {plan.nvcc_release}")
    _log(f"TORCH_CUDA_ARCH_LIST={plan.arch_list or '(from the GPUs)'} ({plan.arch_list_source})")
    _log("include folders of the nvidia wheels: " + (", ".join(plan.extra_include_dirs) or "none found"))
    # -isystem, not -I: searched after the toolkit's own include folder, so
    # the wheels only supply the headers the toolkit lacks.
    include_flags = [flag for d in plan.extra_include_dirs for flag in ("-isystem", d)]
    cuda_sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    return [cpp_extension.CUDAExtension(
        "dropout_ext._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": CXX_FLAGS + include_flags, "nvcc": NVCC_FLAGS + include_flags},
        extra_link_args=LINK_FLAGS,
    )]


_check_flags()
PLAN = plan_cuda()
if _env_flag("DROPOUT_EXT_FORCE_CUDA") and not PLAN.build:
    sys.exit(f"dropout_ext: DROPOUT_EXT_FORCE_CUDA=1 but the CUDA kernels cannot be built: {PLAN.reason}")
_prepare_environment(PLAN)
from torch.utils import cpp_extension  # noqa: E402  (after _prepare_environment, see there)

setup(
    name="dropout_ext",
    version="0.1.0",
    description="Fused dropout kernels for PyTorch (CPU, CUDA, Triton) under one RNG contract",
    packages=find_packages(include=["dropout_ext", "dropout_ext.*"]),
    ext_modules=extensions(PLAN, cpp_extension),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    # The oldest Python the supported torch releases are built for.
    python_requires=">=3.10",
    # The torch releases the build and the suite are tested with (README.md,
    # "Tests"); .ci/run tests the lower bound, so it names a full release.
    install_requires=["torch>=2.11.0,<2.15"],
    zip_safe=False,
)
