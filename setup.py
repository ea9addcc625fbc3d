"""Build dropout_ext._C: the C++ CPU kernels always, the CUDA kernels where
torch is a CUDA build and nvcc is found.

Install with ``pip install --no-build-isolation .``: the extension must be
compiled against the torch that is already installed, which an isolated
build environment would not see (it would download another torch).
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))

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
# --fmad=false: the CUDA kernels round the activations exactly as the CPU does.
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda():
    force = os.environ.get("DROPOUT_EXT_FORCE_CUDA", "0") == "1"
    if os.environ.get("DROPOUT_EXT_NO_CUDA", "0") == "1":
        return False, "DROPOUT_EXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    if not force and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU to read the architecture from: build for Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True, f"CUDA {torch.version.cuda}, nvcc {nvcc}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}"


def extensions():
    cpu_sources = _rel([os.path.join(HERE, "csrc", "ops.cpp")] + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    use_cuda, why = _want_cuda()
    if use_cuda:
        cuda_sources = _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")) +
                            glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        print(f"dropout_ext: building CPU and CUDA kernels ({why})")
        return [
            CUDAExtension(
                "dropout_ext._C",
                cpu_sources + cuda_sources,
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                extra_link_args=LINK_FLAGS,
            )
        ]
    print(f"dropout_ext: building the CPU kernels only ({why})")
    return [CppExtension("dropout_ext._C", cpu_sources, extra_compile_args={"cxx": CXX_FLAGS},
                         extra_link_args=LINK_FLAGS)]


setup(
    name="dropout_ext",
    version="0.1.0",
    description="Fused dropout kernels for PyTorch (CPU, CUDA, Triton) under one RNG contract",
    packages=find_packages(include=["dropout_ext", "dropout_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
