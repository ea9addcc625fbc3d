"""A real model: Hugging Face GPT-2 built from a small config (no weights),
every dropout swapped for dropout_ext's, trained a few steps: it learns as
the nn.Dropout run does, and its dropout layers do what a dropout of their p
does (training_checks.DropoutRecorder: the dropped fraction, the 1/(1 - p) scale,
independent masks across the batch), as nn.Dropout's do; a deliberately
broken dropout fails that check. Needs ``transformers`` (installed by
requirements-test.txt; missing, the module fails to import)."""

from unittest import mock

import pytest
import torch
import transformers

import dropout_ext
from dropout_ext import modules
from training_checks import BrokenDropout, DropoutRecorder


def _train(swap, seed, steps=12):
    """(dropouts swapped, per-step losses, the dropout layers' record) of
    GPT-2 trained on one batch; ``swap``: None keeps nn.Dropout, "ext"
    swaps in dropout_ext's, a BrokenDropout kind swaps in that."""
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(1000 + seed)  # the same weights and data for every run of a seed
    model = transformers.GPT2LMHeadModel(cfg)
    data = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    if swap == "ext":
        swapped = dropout_ext.replace_dropout(model)
    elif swap is not None:
        # replace_dropout's own swap, with the broken dropout as nn.Dropout's twin
        with mock.patch.dict(modules._SWAPS, {torch.nn.Dropout: lambda p, inplace: BrokenDropout(p, swap)}):
            swapped = dropout_ext.replace_dropout(model)
    else:
        swapped = 0
    recorder = DropoutRecorder()
    recorder.attach(model)
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
    return swapped, losses, recorder


def _check(losses, recorder):
    """A run's dropout layers behave as a dropout of their p, and it learns
    (12 steps on one batch take the loss of 4.8 below 3.5, with either
    dropout)."""
    recorder.check()
    assert losses[-1] < losses[0] - 0.5, losses


def test_gpt2_swapped_trains_like_nn_dropout():
    for seed in range(3):
        n0, l_nn, r_nn = _train(None, seed)
        n1, l_ext, r_ext = _train("ext", seed)
        assert n0 == 0 and n1 >= 2 * 2 + 1  # embeddings + (resid, mlp) per layer at least
        _check(l_nn, r_nn)  # the check holds for PyTorch's own dropout
        _check(l_ext, r_ext)


# The message of training_checks.DropoutRecorder.check each broken dropout fails with.
CAUGHT_BY = {"p ignored": "dropped fraction", "half p": "dropped fraction", "no scale": "not input \\* 1/\\(1 - p\\)",
             "shared mask": "the rows share masks"}


@pytest.mark.parametrize("kind", BrokenDropout.KINDS)
def test_the_check_fails_for_a_broken_dropout(kind):
    """The training check against a broken dropout, on two steps: it fails,
    on the statistic that the mistake moves."""
    swapped, losses, recorder = _train(kind, 0, steps=2)
    assert swapped >= 5
    with pytest.raises(AssertionError, match=CAUGHT_BY[kind]):
        _check(losses, recorder)


def test_gpt2_eval_output_is_unchanged_by_the_swap():
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 16))
    before = model(input_ids=ids).logits
    assert dropout_ext.replace_dropout(model) > 0
    assert torch.equal(model(input_ids=ids).logits, before)
