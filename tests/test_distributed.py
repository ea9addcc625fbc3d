"""dropout_ext under DistributedDataParallel: two CPU processes on gloo train
a model with dropout_ext dropout. Ranks seeded differently draw different
masks, ranks seeded alike draw the same, and ``seed=`` gives identical masks
on every rank (tensor-parallel style)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from conftest import leave_process_group

WORLD = 2


def _worker(rank, init_file, same_seed, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        import dropout_ext
        from dropout_ext import functional as F

        torch.manual_seed(0)  # identical initial weights on both ranks
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), dropout_ext.Dropout(0.5), nn.Linear(64, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(1234 if same_seed else 1234 + rank)
        x = torch.ones(16, 32)
        masks = []
        for _ in range(3):
            opt.zero_grad()
            h = model[1](model[0](x))
            masks.append((model[2](h) != 0) | (h == 0))
            ddp(x).pow(2).mean().backward()
            opt.step()
        tp_mask = F.dropout(torch.ones(1000), 0.5, seed=99, offset=rank * 0) != 0
        # gradients are all-reduced: the weights stay equal across ranks
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"masks": torch.stack(masks), "tp": tp_mask, "weights": weights},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group(rank, WORLD, out_dir)
    finally:
        dist.destroy_process_group()  # on an error: leave_process_group never returns


@pytest.mark.parametrize("same_seed", [False, True])
def test_ddp_masks_across_ranks(tmp_path, same_seed):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(init_file, same_seed, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    assert torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["tp"], r1["tp"])
    assert torch.equal(r0["masks"], r1["masks"]) == same_seed
    # successive steps draw fresh masks on each rank
    assert not torch.equal(r0["masks"][0], r0["masks"][1])
