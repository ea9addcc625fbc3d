"""The ops of every backend: one schema table, one registration.

Each backend is an op family ``torch.ops.dropout_ext.{prefix}fused_dropout``,
``{prefix}fused_dropout_backward`` and ``{prefix}dropout_mask``, defined in
C++ from the same schemas (``TORCH_LIBRARY`` in csrc/ops.cpp) with the same
autograd (csrc/autograd.cpp); here every family gets the same fake kernels,
and the Python kernels are registered:

- ``""``: the C++ kernels, CPU and CUDA dispatch keys (registered by ``_C``
  beside them, csrc/cpu and csrc/cuda);
- ``"cuda_host_"``: the CUDA kernels executed on the host, every block and
  thread, on CPU tensors (csrc/cuda_host): the CUDA backend's interpreter;
- ``"triton_"``: the Triton kernels (``triton_kernels``), CUDA key, and CPU
  under ``TRITON_INTERPRET=1``;
- ``"reference_"``: the pure-PyTorch reference, any device.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import NamedTuple

import torch

from . import _validate

try:
    from . import _C  # noqa: F401  (the schemas, the autograd, the C++ kernels)
except ImportError as exc:  # a source tree where the extension was never built
    raise ImportError(
        f"dropout_ext: its compiled extension dropout_ext._C cannot be loaded ({exc}). Build it with "
        "`pip install --no-build-isolation .` (or `python setup.py build_ext --inplace` in a source tree), "
        "against the torch that imports it.") from exc

NAMES = ("fused_dropout", "fused_dropout_backward", "dropout_mask", "dropout_add_norm",
         "dropout_add_norm_backward")
PREFIXES = ("", "cuda_host_", "triton_", "reference_")

_lib = torch.library.Library("dropout_ext", "IMPL")


class OpSet(NamedTuple):
    """One backend's ops, in the order of NAMES."""

    forward: object
    backward: object
    mask: object
    norm: object
    norm_backward: object


def op_set(prefix: str) -> OpSet:
    ns = torch.ops.dropout_ext
    return OpSet(*(getattr(ns, prefix + name).default for name in NAMES))


def mask_bits_like(input, state, mask_shape, pack_mask, place=None):
    """The forward's second output: the packed keep mask when asked for and
    packable, else an empty uint8 tensor (as csrc/op_common.h allocates it)."""
    pack = pack_mask and _validate.packable(input, state, mask_shape, place)
    return input.new_empty((_validate.mask_bits_size(input.numel()) if pack else 0,), dtype=torch.uint8)


def drawn_state_like(input, p):
    """The forward's last output: the state it drew (given p), else empty."""
    return input.new_empty((3 if p is not None else 0,), dtype=torch.int64)


def _fake_forward(input, bias, residual, state, activation, mask_shape, mask_bits=None, pack_mask=False, p=None,
                  generator=None, place=None):
    present = state if p is None else drawn_state_like(input, p)
    return (torch.empty_like(input), mask_bits_like(input, present, mask_shape, pack_mask, place),
            drawn_state_like(input, p))


def _fake_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits=None, place=None):
    return torch.empty_like(grad), grad.new_empty((grad.shape[-1],) if bias_grad else (0,))


def _fake_mask(state, shape, place=None):
    return state.new_empty(shape, dtype=torch.bool)


def _fake_norm(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p=None, generator=None,
               place=None):
    h_dtype, stat_dtype = _validate.norm_dtypes(input.dtype, residual_in_fp32)
    rows = math.prod(input.shape[:-1])
    return (input.new_empty(input.shape), input.new_empty(input.shape, dtype=h_dtype),
            input.new_empty((rows if norm == "layer" else 0,), dtype=stat_dtype),
            input.new_empty((rows,), dtype=stat_dtype), drawn_state_like(input, p))


def _fake_draw_state(input, p, generator=None):
    return drawn_state_like(input, p)


def _fake_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask, place=None):
    shapes = (grad.shape, h.shape, (h.shape[-1],), (h.shape[-1],))
    dtypes = (grad.dtype, h.dtype, rstd.dtype, rstd.dtype)
    return tuple(grad.new_empty(shape if need else (0,), dtype=dtype)
                 for shape, dtype, need in zip(shapes, dtypes, output_mask))


_FAKES = {"fused_dropout": _fake_forward, "fused_dropout_backward": _fake_backward, "dropout_mask": _fake_mask,
          "dropout_add_norm": _fake_norm, "dropout_add_norm_backward": _fake_norm_backward}

for _prefix in PREFIXES:
    for _name in NAMES:
        torch.library.register_fake(f"dropout_ext::{_prefix}{_name}", _FAKES[_name], lib=_lib)
torch.library.register_fake("dropout_ext::draw_state", _fake_draw_state, lib=_lib)


# --- the Python kernels --------------------------------------------------------

def _check_map(shape, place) -> None:
    """A place's map as the C++ ops build it (csrc/op_common.h, index_map),
    refused where they refuse it (more strided dimensions than a kernel
    takes), so every backend takes the same places."""
    if place is not None:
        torch.ops.dropout_ext.index_map(list(shape), list(place))


def _check_forward(input, bias, residual, state, activation, mask_shape, mask_bits=None, pack_mask=False, p=None,
                   generator=None, place=None):
    _validate.check_fused_args(input, bias, residual, activation, mask_shape, place)
    _check_map(input.shape, place)
    _validate.check_state(state, input.device)
    _validate.check_mask_bits(input, state, mask_shape, mask_bits, place)
    if pack_mask and mask_bits is not None:
        raise ValueError("pack_mask and mask_bits exclude each other")
    _check_draw(state, p, generator)


def _check_draw(state, p, generator):
    if state is not None and p is not None:
        raise ValueError("state and p exclude each other: p asks the op to draw its state")
    if p is None and generator is not None:
        raise ValueError("generator needs p: it is what a drawn state comes from")
    if p is not None:
        _validate.check_p(p)


def _check_backward(grad, input, bias, state, activation, mask_shape, bias_grad, mask_bits=None, place=None):
    _validate.check_tensor(grad, "grad")
    _validate.check_activation(activation)
    if input is None and activation != "identity":
        raise ValueError(f"the backward of activation {activation!r} needs the saved input")
    if input is not None:
        _validate.check_fused_args(input, bias, None, activation, mask_shape, place)
    _validate.check_mask_shape(grad, mask_shape, _validate.check_place(grad.shape, place))
    _check_map(grad.shape, place)
    _validate.check_state(state, grad.device)
    _validate.check_mask_bits(grad, state, mask_shape, mask_bits, place)


def _check_mask(state, shape, place=None):
    _validate.check_state(state, state.device)
    _validate.check_place(_validate.check_shape(shape), place)
    _check_map(shape, place)


def _check_norm(input, residual, weight, bias, state, norm, eps, residual_in_fp32, p=None, generator=None,
                place=None):
    _validate.check_norm_args(input, residual, weight, bias, norm, eps, residual_in_fp32)
    _validate.check_norm_place(input.shape, _validate.check_place(input.shape, place))
    _check_map(input.shape, place)
    _validate.check_state(state, input.device)
    _check_draw(state, p, generator)


def _check_norm_backward(grad, grad_h, h, weight, mean, rstd, state, norm, output_mask, place=None):
    _validate.check_norm_backward_args(grad, grad_h, h, weight, mean, rstd, norm, output_mask)
    _validate.check_norm_place(grad.shape, _validate.check_place(grad.shape, place))
    _check_map(grad.shape, place)
    _validate.check_state(state, grad.device)


_CHECKS = {"fused_dropout": _check_forward, "fused_dropout_backward": _check_backward, "dropout_mask": _check_mask,
           "dropout_add_norm": _check_norm, "dropout_add_norm_backward": _check_norm_backward}


# The forward ops that take (p, generator): given p they draw their state,
# and return it last.
_DRAWING = {"fused_dropout": 3, "dropout_add_norm": 4}  # the state's position


def _python_kernel(module: str, name: str):
    """The kernel ``name`` of ``dropout_ext.<module>`` (its ``KERNELS``
    table), imported on first use
    (Triton is imported only when a Triton kernel runs), behind the argument
    checks every direct call gets. A Python kernel cannot draw inside its
    launch: a forward given p takes its state from ``draw_state``, the words
    the C++ kernels draw for the same generator state, and returns it."""
    check = _CHECKS[name]
    at = _DRAWING.get(name)
    names = _schema_args[name]

    def kernel(*args):
        check(*args)
        run = importlib.import_module(f"{__package__}.{module}").KERNELS[name]
        if at is None:
            return run(*args)
        args = list(args) + [None] * (len(names) - len(args))
        i = names.index("p")
        p, generator = args[i], args[i + 1]
        args = args[:i] + args[i + 2:]  # the kernel's own arguments: (p, generator) become its state
        if p is not None:
            args[at] = torch.ops.dropout_ext.draw_state(args[0], p, generator)
        return (*run(*args), args[at] if p is not None else drawn_state_like(args[0], None))

    kernel.__name__ = f"{module}_{name}"
    return kernel


# Argument names per op, from the schema: a Python kernel's call may leave
# the trailing defaults out.
_schema_args = {name: [a.name for a in getattr(torch.ops.dropout_ext, name).default._schema.arguments]
                for name in NAMES}

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_PYTHON_KERNELS = {
    "reference_": ("reference", ("CPU", "CUDA")),
    # Under Triton's interpreter the kernels run on CPU tensors, its debugging mode.
    "triton_": ("triton_kernels", ("CUDA", "CPU") if TRITON_INTERPRET else ("CUDA",)),
}
for _prefix, (_module, _keys) in _PYTHON_KERNELS.items():
    for _name in NAMES:
        for _key in _keys:
            _lib.impl(_prefix + _name, _python_kernel(_module, _name), _key)


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dropout_ext::{op}", key)


# Read once here: the dispatcher query is not traceable, and a call under
# torch.compile must find the answer as a constant.
HAS_CUDA_KERNELS = _has_kernel("fused_dropout", "CUDA")
HAS_CUDA_HOST_KERNELS = _has_kernel("cuda_host_fused_dropout", "CPU")
