"""Backend choice: a table from (backend, device type) to the op family that
runs it; automatic per device, overridable per call (``backend=``) and by the
environment variable ``DROPOUT_EXT_BACKEND``."""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import _ops

BACKENDS = ("cpu", "cuda", "triton", "reference")

# The CUDA kernels on CPU tensors, executed block by block on the host: the
# CUDA backend's interpreter, as TRITON_INTERPRET=1 is Triton's.
CUDA_INTERPRET = os.environ.get("DROPOUT_EXT_CUDA_INTERPRET", "0") == "1"
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _table() -> Dict[Tuple[str, str], str]:
    """(backend, device type) -> op prefix, for what is available here, in
    order of preference per device."""
    t = {("cpu", "cpu"): ""}
    if _ops.HAS_CUDA_KERNELS:
        t["cuda", "cuda"] = ""
    if CUDA_INTERPRET and _ops.HAS_CUDA_HOST_KERNELS:
        t["cuda", "cpu"] = "cuda_host_"
    if _HAS_TRITON:
        t["triton", "cuda"] = "triton_"
        if _ops.TRITON_INTERPRET:
            t["triton", "cpu"] = "triton_"
    for device_type in ("cpu", "cuda"):
        t["reference", device_type] = "reference_"
    return t


_TABLE = _table()
_WHY = {
    "cpu": "it runs on CPU tensors, from the compiled extension",
    "cuda": "it needs a CUDA tensor and an extension built with the CUDA kernels",
    "triton": "it needs a CUDA tensor and Triton",
}


def available_backends(device="cpu") -> List[str]:
    """The backends that can run on ``device`` here, fastest first."""
    device_type = torch.device(device).type
    return [b for b in BACKENDS if (b, device_type) in _TABLE]


def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend's name, checked: ``backend``, else the environment's, else
    the fastest available for ``device``."""
    name = backend if backend is not None else os.environ.get("DROPOUT_EXT_BACKEND") or None
    if name is None:
        return available_backends(device)[0]
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if (name, device.type) not in _TABLE:
        why = _WHY.get(name, "")
        raise ValueError(f"backend {name!r} is not available for a tensor on {device}: {why}; "
                         f"available: {available_backends(device)}")
    return name


def ops_for(backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None) -> _ops.OpSet:
    """The op family that runs ``backend`` (see ``resolve``) on ``device``."""
    key = (backend, os.environ.get("DROPOUT_EXT_BACKEND"), device.type, dtype == torch.float64)
    ops = _CHOSEN.get(key)
    if ops is None:
        name = resolve(backend, device)
        prefix = _TABLE[name, device.type]
        if name == "triton" and dtype == torch.float64:
            # No Triton kernel takes float64: the CUDA kernels do where they are built.
            prefix = _TABLE.get(("cuda", device.type), "reference_")
        ops = _CHOSEN[key] = _OPS[prefix]
    return ops


# What the backward reads by default, per device type (README, "Mask
# modes"): on the CPU the AVX-512 and AVX2 Philox builds draw the mask again
# as fast as the packed bits are read (measured, BENCHMARKS.md), so nothing
# per element is saved; on a GPU Philox is free against memory bandwidth.
DEFAULT_MASK_MODE = {"cpu": "regenerate", "cuda": "regenerate"}


def default_mask_mode(device: torch.device) -> str:
    return DEFAULT_MASK_MODE.get(device.type, "regenerate")


# Answers of ops_for: the table never changes after import, and the lookup
# runs on every call.
_CHOSEN: Dict[tuple, _ops.OpSet] = {}
_OPS = {prefix: _ops.op_set(prefix) for prefix in _ops.PREFIXES}
