"""A real model: Hugging Face GPT-2 built from a small config (no weights),
every dropout swapped for dropout_ext's, trained a few steps; its losses
match the nn.Dropout run's within sampling noise. Needs ``transformers``
(installed by requirements-test.txt); without it the test skips."""

import statistics

import pytest
import torch

import dropout_ext

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _train(swap, seed, steps=12):
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(1000 + seed)  # the same weights and data for both runs of a seed
    model = transformers.GPT2LMHeadModel(cfg)
    data = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    swapped = dropout_ext.replace_dropout(model) if swap else 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return swapped, losses


def test_gpt2_swapped_trains_like_nn_dropout():
    nn_final, ext_final = [], []
    for seed in range(3):
        n0, l_nn = _train(False, seed)
        n1, l_ext = _train(True, seed)
        assert n0 == 0 and n1 >= 2 * 2 + 1  # embeddings + (resid, mlp) per layer at least
        assert l_ext[-1] < l_ext[0] - 0.5 and l_nn[-1] < l_nn[0] - 0.5  # both learn
        assert abs(l_ext[0] - l_nn[0]) < 0.05  # the same start; only the masks differ
        nn_final.append(l_nn[-1])
        ext_final.append(l_ext[-1])
    diffs = [a - b for a, b in zip(nn_final, ext_final)]
    spread = statistics.pstdev(nn_final + ext_final)
    assert abs(statistics.mean(diffs)) < 4 * spread + 0.1, (nn_final, ext_final)


def test_gpt2_eval_output_is_unchanged_by_the_swap():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    before = model(input_ids=ids).logits
    assert dropout_ext.replace_dropout(model) > 0
    assert torch.equal(model(input_ids=ids).logits, before)
