"""Sharded training gets the single-process masks: two CPU processes on gloo
train a Megatron-style tensor-parallel MLP block with plain local tensors
and ``place=``, and a model made data-parallel with ``data_parallel`` under
DistributedDataParallel; each step's keep masks equal the single process's
bit for bit, and the losses and weights agree within float32 tolerance."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dropout_ext
from dropout_ext import functional as F
from conftest import leave_process_group

WORLD = 2
STEPS = 3
TRAIN_SEED = 1234  # every rank's generator, and the single process's, before training
LR = 0.1
RTOL, ATOL = 1e-5, 1e-6


def _rank_main(rank, work, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.save(work(rank), os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group(rank, WORLD, out_dir)
    finally:
        dist.destroy_process_group()  # on an error: leave_process_group never returns


def _on_ranks(work, tmp_path):
    """``work(rank)`` on every rank of a gloo group; the ranks' results."""
    mp.spawn(_rank_main, args=(work, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _keep(out, inp):
    """The keep mask of a dropout, read exactly from its output: a kept
    element is its nonzero input scaled, so the input must have no zero."""
    assert bool((inp != 0).all()), "a zero input hides its keep bit"
    return out != 0


def _assert_same_mask(actual, expected, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    differ = int((actual != expected).sum())
    assert differ == 0, f"{what}: {differ} of {expected.numel()} keep bits differ"


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


# --- tensor parallel ---------------------------------------------------------
# x -> column-parallel Linear (W1 split by rows) -> bias + GELU + dropout,
# fused, on each rank's columns of the hidden layer -> row-parallel Linear
# (W2 split by columns), partial products summed -> + b2, residual x,
# dropout + LayerNorm (replicated).

B, S, H, FFN = 2, 3, 8, 16
P_FFN, P_OUT = 0.25, 0.1


def _tp_data():
    """The block's full parameters (W1, b1, W2, b2, LayerNorm weight and
    bias), its input and the target, alike in every process."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(FFN, H, generator=g) * 0.3, torch.randn(FFN, generator=g) * 0.1,
              torch.randn(H, FFN, generator=g) * 0.3, torch.randn(H, generator=g) * 0.1,
              1 + torch.randn(H, generator=g) * 0.1, torch.randn(H, generator=g) * 0.1]
    return params, torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)


def _column_block(rank):
    return slice(rank * FFN // WORLD, (rank + 1) * FFN // WORLD)


def _tp_shard(params, rank):
    """This rank's parameters: W1's rows and b1's entries of its hidden
    columns, W2's matching columns; b2 and the LayerNorm whole."""
    w1, b1, w2, b2, ln_w, ln_b = params
    cols = _column_block(rank)
    return [w1[cols], b1[cols], w2[:, cols], b2, ln_w, ln_b]


class _ReduceSum(torch.autograd.Function):
    """The row-parallel Linear's sum of the ranks' partial products. Its
    backward is the identity: everything after the sum is replicated, so each
    rank already holds the whole gradient of the sum
    (torch.distributed.nn.functional.all_reduce sums the replicas' gradients
    too, doubling it)."""

    @staticmethod
    def forward(ctx, partial):
        total = partial.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


def _tp_train(params, x, target, seeded, place=None, reduce=None):
    """``STEPS`` of SGD on the block, on the full parameters (no place) or a
    rank's shard (its place among the hidden columns, and the reduce of the
    partial products); the keep masks of the hidden dropout and the losses
    of every step, and the trained parameters. Without ``seeded`` the
    dropouts draw from the default generator."""
    params = [t.clone().requires_grad_() for t in params]
    w1, b1, w2, b2, ln_w, ln_b = params
    opt = torch.optim.SGD(params, lr=LR)
    torch.manual_seed(TRAIN_SEED)
    keeps, losses = [], []
    for step in range(STEPS):
        seeds = [{"seed": 7, "offset": 2 * step + k} if seeded else {} for k in range(2)]
        opt.zero_grad()
        pre = x @ w1.T
        hidden = F.fused_dropout(pre, P_FFN, bias=b1, activation="gelu", place=place, **seeds[0])
        keeps.append(_keep(hidden, nn.functional.gelu(pre + b1)))
        partial = hidden @ w2.T
        out = (reduce(partial) if reduce is not None else partial) + b2
        y = F.dropout_add_norm(out, x, ln_w, ln_b, P_OUT, **seeds[1])
        loss = (y - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return {"keeps": torch.stack(keeps), "losses": torch.stack(losses), "params": [t.detach() for t in params]}


def _tp_rank(rank):
    params, x, target = _tp_data()
    place = dropout_ext.Split(-1, rank, WORLD)
    return {mode: _tp_train(_tp_shard(params, rank), x, target, mode == "seed", place, _ReduceSum.apply)
            for mode in ("generator", "seed")}


def test_tensor_parallel_mlp_block_trains_as_one_process(tmp_path):
    ranks = _on_ranks(_tp_rank, tmp_path)
    params, x, target = _tp_data()
    for mode in ("generator", "seed"):
        with torch.random.fork_rng():
            ref = _tp_train(params, x, target, mode == "seed")
        r0, r1 = (r[mode] for r in ranks)
        # each rank's columns of the hidden layer, side by side: the single-process masks
        _assert_same_mask(torch.cat([r0["keeps"], r1["keeps"]], dim=-1), ref["keeps"], mode)
        # the place matters: at local indices both ranks would draw one mask
        assert not torch.equal(r0["keeps"], r1["keeps"]), mode
        assert torch.equal(r0["losses"], r1["losses"]), mode
        _assert_close(r0["losses"], ref["losses"])
        w1, b1, w2, b2, ln_w, ln_b = ref["params"]
        for r, got in enumerate((r0["params"], r1["params"])):
            cols = _column_block(r)
            for actual, expected in zip(got, (w1[cols], b1[cols], w2[:, cols], b2, ln_w, ln_b)):
                _assert_close(actual, expected)
        # training moved the weights, so their agreement says something
        assert not torch.allclose(ref["params"][0], params[0])


# --- data parallel -----------------------------------------------------------

GLOBAL_BATCH, IN = 8, 6
LOCAL_BATCH = GLOBAL_BATCH // WORLD


def _dp_model():
    """The model, its global batch and targets, alike in every process. GELU
    (not ReLU) before the dropout: a zero input would hide its keep bit."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Dropout(0.3),
                              nn.Linear(16, 1))
        return model, torch.randn(GLOBAL_BATCH, IN), torch.randn(GLOBAL_BATCH, 1)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _watch(model):
    """A list that each forward of ``model`` fills with its dropouts' keep masks."""
    keeps = []
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.register_forward_hook(lambda mod, args, out: keeps.append(_keep(out, args[0])))
    return keeps


def _dp_train(model, forward, x, target):
    """``STEPS`` of SGD; every step's dropout keep masks (one list per step),
    the losses and the trained weights."""
    keeps = _watch(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(TRAIN_SEED)
    steps, losses = [], []
    for _ in range(STEPS):
        keeps.clear()
        opt.zero_grad()
        loss = (forward(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        steps.append(list(keeps))
        losses.append(loss.detach())
    return {"keeps": steps, "losses": torch.stack(losses), "weights": _weights(model)}


def _dp_rank(rank):
    model, x, target = _dp_model()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    dropout_ext.data_parallel(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    out = _dp_train(model, ddp, x[rows], target[rows])
    # The first step's masks once more, each dropout without its place: what
    # replace_dropout alone would draw on this rank.
    keeps = _watch(model)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.place = None
    torch.manual_seed(TRAIN_SEED)
    with torch.no_grad():
        model(x[rows])
    out["unplaced"] = keeps
    return out


def test_data_parallel_gets_the_global_batch_masks(tmp_path):
    ranks = _on_ranks(_dp_rank, tmp_path)
    model, x, target = _dp_model()
    assert dropout_ext.replace_dropout(model) == 2
    initial = _weights(model)
    with torch.random.fork_rng():
        ref = _dp_train(model, model, x, target)
    for r, got in enumerate(ranks):
        rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        for step in range(STEPS):
            assert len(got["keeps"][step]) == len(ref["keeps"][step]) == 2
            for local, full in zip(got["keeps"][step], ref["keeps"][step]):
                _assert_same_mask(local, full[rows], f"rank {r}, step {step}")
    # Without a place every rank draws the global batch's first rows, which
    # are not rank 1's: the place is what gives each rank its own rows.
    for got in ranks:
        assert len(got["unplaced"]) == 2
        for local, full in zip(got["unplaced"], ref["keeps"][0]):
            _assert_same_mask(local, full[:LOCAL_BATCH], "without a place")
    for step in range(STEPS):
        for local0, local1 in zip(ranks[0]["keeps"][step], ranks[1]["keeps"][step]):
            assert not torch.equal(local0, local1), step
    # equal halves of the batch: the mean of the ranks' mean losses is the global mean
    _assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / WORLD, ref["losses"])
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    _assert_close(ranks[0]["weights"], ref["weights"])
    assert not torch.allclose(ref["weights"], initial)
