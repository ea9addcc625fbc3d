"""DTensor inputs draw the single-device mask on any layout (docs/RNG.md,
"Sharded tensors"): CPU processes on gloo, 2 and 4 of them, on 1-D and 2x2
meshes. For every public function and module, each placement (Shard of the
first, a middle and the last dimension, uneven down to an empty shard,
Replicate, Partial, two mesh dimensions on one tensor dimension), with
``seed=`` and with the default generator seeded alike on every rank,
``full_tensor()`` of the output and of the input's gradient equal the
single-process call on the global tensor bit for bit, and a DTensor bias's
gradient (a reduction across ranks) to rounding. The ranks lay their inputs
out and save their pieces without a gather (each holds the global tensors),
so what runs collectives is the code under test. A Partial output is
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


def _run(case, x, b, r, seed):
    """(outputs..., the input's gradient, the bias's gradient or None) of
    one call on plain tensors: the single-process side."""
    torch.manual_seed(1234)
    out = case.call(x, b, r, seed)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o * g).sum() for o, g in zip(outs, _grads(outs))).backward()
    return [o.detach() for o in outs] + [x.grad, b.grad]


def _block(t, mesh, placements):
    """This rank's block of the global ``t`` under ``placements`` (a Partial
    mesh dimension as Replicate) and its offsets, cut here: every rank holds
    t, so no collective is needed to lay out the inputs or read the results."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    plain = tuple(Replicate() if p.is_partial() else p for p in placements)
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, plain)
    return t[tuple(slice(o, o + n) for o, n in zip(offset, shape))], tuple(offset)


def _distribute(t, mesh, placements, leaf=True):
    """t as a DTensor of ``placements``: a Partial mesh dimension holds t at
    coordinate 0 and zeros elsewhere (the sum is t exactly)."""
    from torch.distributed.tensor import DTensor

    local = _block(t, mesh, placements)[0].clone()
    if any(p.is_partial() and c != 0 for p, c in zip(placements, mesh.get_coordinate())):
        local = torch.zeros_like(local)
    d = DTensor.from_local(local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())
    return d.detach().requires_grad_(leaf)


def _piece(d, mesh):
    """A DTensor's local piece as the parent assembles it: (local tensor,
    offsets, each mesh dimension's kind, this rank's coordinates)."""
    kinds = tuple("P" if p.is_partial() else "R" if p.is_replicate() else "S" for p in d.placements)
    offset = _block(torch.empty(d.shape), mesh, d.placements)[1]
    return d.to_local().detach().clone(), offset, kinds, tuple(mesh.get_coordinate())


def _run_sharded(case, x, b, r, seed, mesh):
    """The pieces of the outputs and of the input's gradient on this rank,
    and the bias's (reduced, whole) gradient: the loss is each rank's own
    outputs against their block of the global output gradient, so the
    backward gives each shard its gradient with no gather."""
    torch.manual_seed(1234)  # every rank alike: the default generator's draws agree
    out = case.call(x, b, r, seed)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o.to_local() * _block(g, mesh, o.placements)[0]).sum() for o, g in zip(outs, _grads(outs))).backward()
    return [_piece(o, mesh) for o in outs] + [_piece(x.grad, mesh), None if b.grad is None else b.grad.to_local()]


def _worker(rank, world, mesh_shape, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate

        mesh = init_device_mesh("cpu", mesh_shape)
        results = {}
        for name, layout, seed in _keys(mesh_shape):
            case = CASES[name]
            x, b, r = _inputs(case)
            placements = _placements(layout, len(case.shape))
            xd = _distribute(x, mesh, placements)
            bd = DTensor.from_local(b.clone(), mesh, [Replicate()] * mesh.ndim, run_check=False).requires_grad_()
            rd = _distribute(r, mesh, tuple(Replicate() if p.is_partial() else p for p in placements), leaf=False)
            results[(name, layout, seed)] = _run_sharded(case, xd, bd, rd, seed, mesh)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group(rank, world, out_dir)
    finally:
        dist.destroy_process_group()  # on an error: leave_process_group never returns


def _assemble(pieces, like):
    """The global tensor from every rank's piece: shards at their offsets,
    one copy of each replicated block, Partial terms summed."""
    full = torch.zeros_like(like)
    for local, offset, kinds, coord in pieces:
        if any(k == "R" and c != 0 for k, c in zip(kinds, coord)):
            continue
        block = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        if "P" in kinds:
            full[block] += local
        else:
            full[block] = local
    return full


def _same(a, b, partial) -> bool:
    """Bit for bit (a Partial layout: in value, signed zeros alike)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) if partial else torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("world, mesh_shape", [(2, (2,)), (4, (4,)), (4, (2, 2))], ids=["2", "4", "2x2"])
def test_dtensor_equals_single_process(tmp_path, world, mesh_shape):
    mp.spawn(_worker, args=(world, mesh_shape, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert set(ranks[0]) == set(_keys(mesh_shape))
    wrong = []
    for key in ranks[0]:
        name, layout, seed = key
        case = CASES[name]
        x, b, r = _inputs(case)
        *want, want_db = _run(case, x.requires_grad_(), b.requires_grad_(), r, seed)
        *pieces, got_db = zip(*(rank[key] for rank in ranks))
        got = [_assemble(p, w) for p, w in zip(pieces, want)]
        partial = "P" in layout
        same = len(got) == len(want) and all(_same(g, w, partial) for g, w in zip(got, want))
        # The bias's gradient sums rows in another order across ranks: to rounding.
        db = got_db[0]
        if not same or (want_db is None) != (db is None) or (
                want_db is not None and not torch.allclose(db, want_db, rtol=1e-5, atol=1e-5)):
            wrong.append((name, layout, "seed=" if seed is not None else "generator"))
    assert not wrong, f"sharded results differ from the single-process call: {wrong}"
