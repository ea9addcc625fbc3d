"""DTensor inputs draw the single-device mask on any layout (docs/RNG.md,
"Sharded tensors"): CPU processes on gloo, 2 and 4 of them, on 1-D and 2x2
meshes. For every public function and module, each placement (Shard of the
first, a middle and the last dimension, uneven down to an empty shard,
Replicate, Partial, two mesh dimensions on one tensor dimension), with
``seed=`` and with the default generator seeded alike on every rank,
``full_tensor()`` of the output and of the input's gradient equal the
single-process call on the global tensor bit for bit, and a DTensor bias's
gradient (a reduction across ranks) to rounding. A Partial output is
the ranks' sum: there a dropped element is the sum of the ranks' signed
zeros, so it equals the single-process zero in value, not always in sign.

The ranks run every case in one spawn per mesh and save their results; the
parent runs the same cases on plain tensors and compares."""

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dropout_ext
from dropout_ext import functional as F
from conftest import leave_process_group

P = 0.4
SEED = 0xF123456789ABCDEF


@dataclass(frozen=True)
class Case:
    """call(x, bias, residual, seed or None) -> a tensor or a tuple; the
    bias, residual and norm weight exist for every case (unused ones are
    ignored). ``seeds``: takes ``seed=``; ``whole_last``: the last dimension
    must not be sharded."""

    shape: tuple
    call: Callable
    seeds: bool = True
    whole_last: bool = False


def _kw(seed):
    return {} if seed is None else {"seed": seed, "offset": 3}


def _module(make):
    """A module case: made afresh for each call (same parameters every time)."""
    def call(x, b, r, seed):
        torch.manual_seed(99)
        m = make()
        torch.manual_seed(1234)
        return m(x, r) if isinstance(m, dropout_ext.modules._DropoutAddNorm) else \
            m(x, b, r) if isinstance(m, dropout_ext.FusedDropout) else m(x)
    return call


CASES = {
    "dropout": Case((5, 6, 7), lambda x, b, r, s: F.dropout(x, P, **_kw(s))),
    "dropout_shared": Case((5, 6, 7), lambda x, b, r, s: F.dropout(x, P, broadcast_dims=(1,), **_kw(s))),
    "fused_dropout": Case((5, 6, 7), lambda x, b, r, s: F.fused_dropout(x, P, bias=b, residual=r,
                                                                         activation="gelu", **_kw(s))),
    "dropout1d": Case((5, 6, 7), lambda x, b, r, s: F.dropout1d(x, P, **_kw(s))),
    "dropout2d": Case((5, 6, 3, 4), lambda x, b, r, s: F.dropout2d(x, P, **_kw(s))),
    "dropout3d": Case((5, 6, 2, 3, 2), lambda x, b, r, s: F.dropout3d(x, P, **_kw(s))),
    "alpha_dropout": Case((5, 6, 7), lambda x, b, r, s: F.alpha_dropout(x, P, True, **_kw(s))),
    "feature_alpha_dropout": Case((5, 6, 3, 4), lambda x, b, r, s: F.feature_alpha_dropout(x, P, True, **_kw(s))),
    "dropout_add_norm": Case((5, 6, 7), lambda x, b, r, s: F.dropout_add_norm(
        x, r, torch.linspace(0.5, 1.5, 7), b, P, prenorm=True, **_kw(s)), whole_last=True),
    "dropout_add_rms": Case((5, 6, 7), lambda x, b, r, s: F.dropout_add_norm(
        x, r, None, None, P, norm="rms", **_kw(s)), whole_last=True),
    "Dropout": Case((5, 6, 7), _module(lambda: dropout_ext.Dropout(P)), seeds=False),
    "Dropout1d": Case((5, 6, 7), _module(lambda: dropout_ext.Dropout1d(P)), seeds=False),
    "Dropout2d": Case((5, 6, 3, 4), _module(lambda: dropout_ext.Dropout2d(P)), seeds=False),
    "Dropout3d": Case((5, 6, 2, 3, 2), _module(lambda: dropout_ext.Dropout3d(P)), seeds=False),
    "AlphaDropout": Case((5, 6, 7), _module(lambda: dropout_ext.AlphaDropout(P)), seeds=False),
    "FeatureAlphaDropout": Case((5, 6, 3, 4), _module(lambda: dropout_ext.FeatureAlphaDropout(P)), seeds=False),
    "LockedDropout": Case((5, 6, 7), _module(lambda: dropout_ext.LockedDropout(P)), seeds=False),
    "DropPath": Case((5, 6, 7), _module(lambda: dropout_ext.DropPath(P)), seeds=False),
    "FusedDropout": Case((5, 6, 7), _module(lambda: dropout_ext.FusedDropout(P, "relu")), seeds=False),
    "DropoutAddLayerNorm": Case((5, 6, 7), _module(lambda: dropout_ext.DropoutAddLayerNorm(7, P, prenorm=True)),
                                seeds=False, whole_last=True),
    "DropoutAddRMSNorm": Case((5, 6, 7), _module(lambda: dropout_ext.DropoutAddRMSNorm(7, P)), seeds=False,
                              whole_last=True),
}

# Placements per mesh, written with the tensor's last dimension as -1.
LAYOUTS = {
    (2,): [("S0",), ("S1",), ("S-1",), ("R",), ("P",)],
    (4,): [("S0",), ("S1",), ("S-1",), ("R",), ("P",)],
    (2, 2): [("S0", "S-1"), ("S1", "S0"), ("S0", "S0"), ("R", "S1"), ("P", "S0")],
}


def _placements(layout, ndim):
    from torch.distributed.tensor import Partial, Replicate, Shard

    made = {"R": Replicate(), "P": Partial()}
    return tuple(made[p] if p in made else Shard(int(p[1:]) % ndim) for p in layout)


def _inputs(case):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(case.shape, generator=g)
    return x, torch.randn(case.shape[-1], generator=g), torch.randn(case.shape, generator=g)


def _grads(outs):
    g = torch.Generator().manual_seed(6)
    return [torch.randn(o.shape, generator=g) for o in outs]


def _keys(mesh_shape):
    for name, case in CASES.items():
        for layout in LAYOUTS[mesh_shape]:
            if case.whole_last and "S-1" in layout:
                continue
            for seed in (SEED, None) if case.seeds else (None,):
                yield name, layout, seed


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _run(case, x, b, r, seed):
    """(outputs..., the input's gradient, the bias's gradient or None) of
    one call, full tensors."""
    torch.manual_seed(1234)  # every rank alike: the default generator's draws agree
    out = case.call(x, b, r, seed)
    outs = out if isinstance(out, tuple) else (out,)
    full = [_full(o) for o in outs]
    sum((f * g).sum() for f, g in zip(full, _grads(full))).backward()
    return [f.detach() for f in full] + [_full(x.grad), None if b.grad is None else _full(b.grad)]


def _distribute(t, mesh, placements, leaf=True):
    """t as a DTensor of ``placements``: a Partial mesh dimension holds t at
    coordinate 0 and zeros elsewhere (the sum is t exactly)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    plain = tuple(Replicate() if p.is_partial() else p for p in placements)
    local = distribute_tensor(t, mesh, plain).to_local()
    coords = mesh.get_coordinate()
    if any(p.is_partial() and c != 0 for p, c in zip(placements, coords)):
        local = torch.zeros_like(local)
    d = DTensor.from_local(local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())
    return d.detach().requires_grad_(leaf)


def _worker(rank, world, mesh_shape, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, distribute_tensor

        mesh = init_device_mesh("cpu", mesh_shape)
        results = {}
        for name, layout, seed in _keys(mesh_shape):
            case = CASES[name]
            x, b, r = _inputs(case)
            placements = _placements(layout, len(case.shape))
            xd = _distribute(x, mesh, placements)
            bd = distribute_tensor(b, mesh, [Replicate()] * mesh.ndim).requires_grad_()
            rd = _distribute(r, mesh, tuple(Replicate() if p.is_partial() else p for p in placements), leaf=False)
            results[(name, layout, seed)] = _run(case, xd, bd, rd, seed)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
        leave_process_group(rank, world, out_dir)
    finally:
        dist.destroy_process_group()  # on an error: leave_process_group never returns


def _same(a, b, partial) -> bool:
    """Bit for bit (a Partial layout: in value, signed zeros alike)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) if partial else torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("world, mesh_shape", [(2, (2,)), (4, (4,)), (4, (2, 2))], ids=["2", "4", "2x2"])
def test_dtensor_equals_single_process(tmp_path, world, mesh_shape):
    mp.spawn(_worker, args=(world, mesh_shape, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = torch.load(tmp_path / "results.pt")
    assert set(results) == set(_keys(mesh_shape))
    wrong = []
    for (name, layout, seed), got in results.items():
        case = CASES[name]
        x, b, r = _inputs(case)
        want = _run(case, x.requires_grad_(), b.requires_grad_(), r, seed)
        partial = "P" in layout
        # The bias's gradient sums rows in another order across ranks: to rounding.
        (*got, got_db), (*want, want_db) = got, want
        same = len(got) == len(want) and all(_same(g, w, partial) for g, w in zip(got, want))
        if not same or (want_db is None) != (got_db is None) or (
                want_db is not None and not torch.allclose(got_db, want_db, rtol=1e-5, atol=1e-5)):
            wrong.append((name, layout, "seed=" if seed is not None else "generator"))
    assert not wrong, f"sharded results differ from the single-process call: {wrong}"
