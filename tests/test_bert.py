"""A real model with fused norms: Hugging Face BERT built from a small config
(no weights), its BertSelfOutput and BertOutput blocks (Linear -> Dropout ->
LayerNorm(. + input)) rewritten by ``fuse_dropout`` into
DropoutAddLayerNorm. With dropout_ext's Dropout in the unfused copy, both
draw the same masks from the same generator state, so training losses
match step by step (to float32 rounding, p = 0 and p > 0 alike) and eval
outputs agree within float32 tolerance; a fused block whose dropout has a
wrong p, no 1/(1 - p) or one mask for every row fails that match. Needs
``transformers`` (installed by requirements-test.txt; missing, the module
fails to import)."""

import copy
import math

import pytest
import torch
import transformers

import dropout_ext
from training_checks import BrokenDropout


def _models(p):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=p,
                                  attention_probs_dropout_prob=p)
    torch.manual_seed(0)
    unfused = transformers.BertForMaskedLM(cfg)
    dropout_ext.replace_dropout(unfused)
    fused = copy.deepcopy(unfused)
    blocks = 0
    for layer in fused.bert.encoder.layer:
        layer.attention.output = dropout_ext.fuse_dropout(layer.attention.output)
        layer.output = dropout_ext.fuse_dropout(layer.output)
        blocks += 2
    norms = [m for m in fused.modules() if isinstance(m, dropout_ext.DropoutAddLayerNorm)]
    assert len(norms) == blocks == 2 * cfg.num_hidden_layers
    assert all(n.p == p and n.eps == cfg.layer_norm_eps for n in norms)
    return unfused, fused


def _train(model, data, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    torch.manual_seed(11)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _check(got, expected):
    """The fused run's loss at every step within 2 float32 ulps of the
    unfused run's. The two differ only in the norms' rounding (each norm
    output within error_bounds.norm_bounds of the exact one), which moves the
    loss by less than one of its own ulps: measured, the losses
    are equal at every step, p = 0 and 0.1 alike. (This is a measured
    margin, not a bound: the first-order worst case, the norms' bounds
    weighted by |dloss/dy|, is some 90 ulps at step 0.) A dropout with a
    wrong p, a lost 1/(1 - p) or a mask shared by the rows moves some step's
    loss by 250 ulps or more (test_the_check_fails_for_a_broken_fused_dropout)."""
    assert expected[-1] < expected[0]  # it learns
    ulps = [abs(g - e) / (torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(abs(e))))
            for g, e in zip(got, expected)]
    assert max(ulps) <= 2, f"the losses differ by {ulps} float32 ulps: {got} vs {expected}"


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bert_fused_norms_train_like_unfused(p):
    unfused, fused = _models(p)
    data = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    _check(_train(fused, data), _train(unfused, data))
    unfused.eval()
    fused.eval()
    with torch.no_grad():  # no dropout: the norms' rounding alone, measured at most 3e-7 apart
        torch.testing.assert_close(fused(input_ids=data).logits, unfused(input_ids=data).logits,
                                   atol=1e-5, rtol=1e-5)


def _composed(norm, kind):
    """A fused block's DropoutAddLayerNorm replaced by its composition in
    Python: layer_norm(residual + dropout(x)), the mask drawn as the fused
    op draws it (dropout_ext's dropout of the same shape, from the same
    generator state), with the one mistake of ``kind`` (BrokenDropout's)
    or none."""
    dropout = BrokenDropout(norm.p, kind, draw=lambda x, p: dropout_ext.functional.dropout(torch.ones_like(x), p) != 0)

    def forward(x, residual=None):
        if norm.training:
            x = dropout(x)
        h = x if residual is None else residual + x
        return torch.nn.functional.layer_norm(h, (norm.hidden_size,), norm.weight, norm.bias, norm.eps)
    norm.forward = forward


@pytest.mark.parametrize("kind", (None,) + BrokenDropout.KINDS)
def test_the_check_fails_for_a_broken_fused_dropout(kind):
    """The training check with every fused block composed in Python: with
    the right dropout it passes; with each broken one it fails."""
    unfused, fused = _models(0.1)
    for m in fused.modules():
        if isinstance(m, dropout_ext.DropoutAddLayerNorm):
            _composed(m, kind)
    data = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    got, expected = _train(fused, data), _train(unfused, data)
    if kind is None:
        _check(got, expected)
    else:
        with pytest.raises(AssertionError, match="ulps"):
            _check(got, expected)
