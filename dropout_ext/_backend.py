"""Backend choice: a table from (backend, device, float64 or not) to the op
family that runs it, complete at import; automatic per device, overridable
per call (``backend=``) and for every call by ``DEFAULT_BACKEND`` (the
environment variable ``DROPOUT_EXT_BACKEND``, read once at import)."""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import _ops

BACKENDS = ("cpu", "cuda", "triton", "reference")

# The backend of every call without backend= (None: the fastest available
# for the input's device), from the environment once, at import: the lookup
# runs on every call, and a compiled graph guards on this value and on table
# entries that no call changes. Set it in-process by assignment; a name is
# checked where a call meets it, as backend= is.
DEFAULT_BACKEND: Optional[str] = os.environ.get("DROPOUT_EXT_BACKEND") or None

_HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE_TYPES = ("cpu", "cuda")
# The CUDA devices that ops_for finds by the device itself, which hashes in a
# few nanoseconds (torch.device.type builds a new string on every read); a
# tensor on a higher index is found by its device type, a little slower.
_CUDA_INDICES = 64
_DEVICES = {"cpu": [torch.device("cpu")],
            "cuda": [torch.device("cuda")] + [torch.device("cuda", i) for i in range(_CUDA_INDICES)]}
_Families = Dict[Optional[str], Dict[torch.device, Tuple[_ops.OpSet, _ops.OpSet]]]


def _table(cuda_interpret: bool) -> Dict[Tuple[str, str], str]:
    """(backend, device type) -> op prefix, for what is available here.
    ``cuda_interpret``: the CUDA kernels run CPU tensors, executed block by
    block on the host (the CUDA backend's interpreter, as TRITON_INTERPRET=1
    is Triton's)."""
    t = {("cpu", "cpu"): ""}
    if _ops.HAS_CUDA_KERNELS:
        t["cuda", "cuda"] = ""
    if cuda_interpret and _ops.HAS_CUDA_HOST_KERNELS:
        t["cuda", "cpu"] = "cuda_host_"
    if _HAS_TRITON:
        t["triton", "cuda"] = "triton_"
        if _ops.TRITON_INTERPRET:
            t["triton", "cpu"] = "triton_"
    for device_type in DEVICE_TYPES:
        t["reference", device_type] = "reference_"
    return t


def _families(cuda_interpret: bool) -> _Families:
    """``ops_for``'s table, complete: backend (None: the first of BACKENDS
    available on the device, the fastest) -> device (each device type
    without an index, and by index) -> (the op family for every dtype but
    float64, the one for float64)."""
    table = _table(cuda_interpret)
    ops = {prefix: _ops.op_set(prefix) for prefix in _ops.PREFIXES}
    by_type: Dict[Optional[str], Dict[str, Tuple[_ops.OpSet, _ops.OpSet]]] = {}
    for (name, device_type), prefix in table.items():
        # No Triton kernel takes float64: the CUDA kernels do where they are built.
        f64 = table.get(("cuda", device_type), "reference_") if name == "triton" else prefix
        by_type.setdefault(name, {})[device_type] = (ops[prefix], ops[f64])
    for device_type in DEVICE_TYPES:
        fastest = next(name for name in BACKENDS if (name, device_type) in table)
        by_type.setdefault(None, {})[device_type] = by_type[fastest][device_type]
    return {name: {device: pair for device_type, pair in per_type.items() for device in _DEVICES[device_type]}
            for name, per_type in by_type.items()}


_FAMILIES = _families(os.environ.get("DROPOUT_EXT_CUDA_INTERPRET", "0") == "1")
_F64 = torch.float64
_WHY = {
    "cpu": "it runs on CPU tensors, from the compiled extension",
    "cuda": "it needs a CUDA tensor and an extension built with the CUDA kernels",
    "triton": "it needs a CUDA tensor and Triton",
}


def available_backends(device="cpu") -> List[str]:
    """The backends that can run on ``device`` here, fastest first."""
    any_index = torch.device(torch.device(device).type)
    return [b for b in BACKENDS if any_index in _FAMILIES.get(b, ())]


def ops_for(backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None) -> _ops.OpSet:
    """The op family that runs ``backend`` (None: ``DEFAULT_BACKEND``) on
    ``device`` for ``dtype``: one lookup in a table that no call changes."""
    name = DEFAULT_BACKEND if backend is None else backend
    try:
        pair = _FAMILIES[name][device]
    except (KeyError, TypeError):
        pair = _pair_by_type(name, device)
    # A branch, not pair[dtype is _F64]: torch 2.11's Dynamo takes no bool as
    # a tuple index, and every compiled call traces this lookup.
    return pair[1] if dtype is _F64 else pair[0]


def _pair_by_type(name, device: torch.device) -> Tuple[_ops.OpSet, _ops.OpSet]:
    """``ops_for``'s pair for a device that is not a key of the table: found
    by its type, or the error that says why none runs it."""
    try:
        return _FAMILIES[name][torch.device(device.type)]
    except (KeyError, TypeError):
        raise _unavailable(name, device) from None


def _unavailable(name, device: torch.device) -> ValueError:
    """Why ``ops_for`` found no op family for ``name`` on ``device``."""
    if name is None:
        return ValueError(f"no backend runs tensors on {device}: the backends run on {DEVICE_TYPES}")
    if not isinstance(name, str) or name not in BACKENDS:
        return ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return ValueError(f"backend {name!r} is not available for a tensor on {device}: {_WHY.get(name, '')}; "
                      f"available: {available_backends(device)}")


# What the backward reads by default, per device type (README, "Mask
# modes"): on the CPU the AVX-512 and AVX2 Philox builds draw the mask again
# as fast as the packed bits are read (measured, BENCHMARKS.md), so nothing
# per element is saved; on a GPU Philox is free against memory bandwidth.
DEFAULT_MASK_MODE = {"cpu": "regenerate", "cuda": "regenerate"}


# Keyed by device as ops_for's table is: read on every call that records a graph.
_MASK_MODE_BY_DEVICE = {device: mode for device_type, mode in DEFAULT_MASK_MODE.items()
                        for device in _DEVICES[device_type]}


def default_mask_mode(device: torch.device) -> str:
    mode = _MASK_MODE_BY_DEVICE.get(device)
    return mode if mode is not None else DEFAULT_MASK_MODE.get(device.type, "regenerate")
