"""A real model with fused norms: Hugging Face BERT built from a small config
(no weights), its BertSelfOutput and BertOutput blocks (Linear -> Dropout ->
LayerNorm(. + input)) rewritten by ``fuse_dropout`` into
DropoutAddLayerNorm. With dropout_ext's Dropout in the unfused copy, both
draw the same masks from the same generator state, so training losses
match step by step (to float32 rounding, p = 0 and p > 0 alike) and eval
outputs agree within float32 tolerance. Needs ``transformers``."""

import copy

import pytest
import torch

import dropout_ext

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


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


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bert_fused_norms_train_like_unfused(p):
    unfused, fused = _models(p)
    data = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    expected = _train(unfused, data)
    got = _train(fused, data)
    assert expected[-1] < expected[0]  # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    unfused.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=data).logits, unfused(input_ids=data).logits,
                                   atol=1e-5, rtol=1e-5)
