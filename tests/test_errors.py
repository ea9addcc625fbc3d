"""Bad input gets a clear error naming the argument and changes nothing."""

import math

import pytest
import torch

import dropout_ext
from dropout_ext import functional as F

ops = torch.ops.dropout_ext


def _unchanged(*tensors):
    snap = [(t.clone(), t._version) for t in tensors]

    def check():
        for t, (c, v) in zip(tensors, snap):
            assert torch.equal(t, c) and t._version == v

    return check


@pytest.mark.parametrize("p", [-0.1, 1.1, math.nan, math.inf])
def test_bad_p(p):
    x = torch.randn(4)
    check = _unchanged(x)
    with pytest.raises(ValueError, match=f"dropout probability has to be between 0 and 1, but got {p}"):
        F.dropout(x, p, inplace=True)
    with pytest.raises(ValueError, match="dropout probability"):
        F.fused_dropout(x, p)
    with pytest.raises(ValueError, match="dropout probability"):
        ops.fused_dropout(x, None, None, torch.tensor([0, 0]), p, "identity", [])
    check()


def test_p_wrong_type():
    with pytest.raises(TypeError, match="p must be a real number"):
        F.dropout(torch.randn(3), "0.5")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_input(dtype):
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(TypeError, match="input must be float16, bfloat16, float32 or float64"):
        F.dropout(x, 0.5)
    with pytest.raises(TypeError, match="input must be"):
        ops.fused_dropout(x, None, None, torch.tensor([0, 0]), 0.5, "identity", [])


def test_bias_errors():
    x = torch.randn(3, 5)
    check = _unchanged(x)
    with pytest.raises(ValueError, match="bias must be 1-D with the size of input's last dimension"):
        F.fused_dropout(x, bias=torch.randn(4))
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        F.fused_dropout(x, bias=torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias must be"):
        ops.fused_dropout(x, torch.randn(4), None, torch.tensor([0, 0]), 0.5, "identity", [])
    check()


def test_residual_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="residual must have input's shape"):
        F.fused_dropout(x, residual=torch.randn(5))
    with pytest.raises(TypeError, match="residual has dtype"):
        F.fused_dropout(x, residual=torch.randn(3, 5).half())


def test_unknown_activation_and_backend():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="activation must be one of"):
        F.fused_dropout(x, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.fused_dropout(x, None, None, torch.tensor([0, 0]), 0.5, "tanh", [])
    with pytest.raises(ValueError, match="backend must be one of"):
        F.dropout(x, backend="metal")
    with pytest.raises(ValueError, match="backend 'cuda' is not available"):
        F.dropout(x, backend="cuda")


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("DROPOUT_EXT_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        F.dropout(torch.randn(3))


def test_seed_errors():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        F.dropout(x, seed=2**64)
    with pytest.raises(TypeError, match="seed must be an int"):
        F.dropout(x, seed=1.5)
    with pytest.raises(ValueError, match="either seed= or generator="):
        F.dropout(x, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="offset is only meaningful"):
        F.dropout(x, offset=3)


def test_mask_shape_errors():
    with pytest.raises(ValueError, match="mask_shape must have input's rank"):
        F.fused_dropout(torch.randn(2, 3), mask_shape=(2, 2))


def test_rng_tensor_errors():
    with pytest.raises(ValueError, match="rng must be an int64 tensor"):
        ops.fused_dropout(torch.randn(3), None, None, torch.tensor([0.0, 0.0]), 0.5, "identity", [])


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        F.dropout([1.0, 2.0])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dropout_ext.replace_dropout("model")


def test_empty_and_zero_dim_work():
    for x in (torch.randn(0), torch.randn(2, 0, 3), torch.tensor(1.5)):
        y = F.dropout(x, 0.5)
        assert y.shape == x.shape
    y = F.fused_dropout(torch.randn(0, 4), 0.5, bias=torch.randn(4), activation="gelu")
    assert y.shape == (0, 4)
