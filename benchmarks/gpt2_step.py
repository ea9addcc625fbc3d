"""End-to-end: one training step (forward, backward, AdamW step) of a small
Hugging Face GPT-2 with nn.Dropout, with every dropout module swapped by
``dropout_ext.replace_dropout``, and with ``dropout_ext.fuse_dropout``
applied after the swap, paired round by round in one process.

The model: ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` with 4
layers, width 768, 12 heads and GPT-2's vocabulary, trained on a batch of 4
sequences of 256 random token ids (the labels are the inputs), every dropout
at GPT-2's p = 0.1. The three variants start from the same weights (copies
of one model built from a fixed seed), each with its own optimizer. A round
runs one step of each, in a shuffled order (``cases.paired_round``), so a
slow phase of the machine hits them alike; the report is each variant's median step and
nn.Dropout's median over it. Also reported: the dropout modules swapped and
fused, and the device ops of one step (``dropout_ext.launches``).

Hugging Face's attention applies its dropout to the attention
probabilities inside the attention function (with p read from the
module), not through the module: only the embedding, residual and MLP
dropouts are swapped.

    pytest benchmarks --benchmark-only -k test_gpt2_training_step --bench-threads=2
"""

from __future__ import annotations

import copy
from typing import List, Tuple

import torch

import cases
import dropout_ext
from dropout_ext.launches import count_launches

VARIANTS = ("nn.Dropout", "replace_dropout", "fuse_dropout")
SEED = 20261207
# GPT2Config's arguments, and the batch; "model" keeps GPT-2's vocabulary and positions.
CONFIG = {"model": dict(n_layer=4, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, batch=4, seq=256),
          "smoke": dict(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=16, batch=2, seq=16)}


def rounds_for(device: torch.device, tiny: bool) -> Tuple[int, int]:
    """(rounds, warm-up rounds), not --bench-rounds (a per-case count of
    thousands in the small run): a step takes about a second on 2 CPU cores."""
    if tiny:
        return 1, 1
    return (20, 3) if device.type == "cuda" else (5, 1)


def _models(cfg: dict, device: torch.device) -> List[dict]:
    """The variants' models, from one set of weights. A fuse_dropout that
    cannot trace the model leaves its variant without a model and the reason
    in the row."""
    import transformers

    torch.manual_seed(SEED)
    config = transformers.GPT2Config(**{k: v for k, v in cfg.items() if k not in ("batch", "seq")})
    base = transformers.GPT2LMHeadModel(config).to(device).train()
    out = []
    for variant in VARIANTS:
        model = base if variant == "nn.Dropout" else copy.deepcopy(base)
        row = {"variant": variant, "swapped": 0, "fused": 0, "note": None}
        if variant != "nn.Dropout":
            row["swapped"] = dropout_ext.replace_dropout(model)
        if variant == "fuse_dropout":
            try:
                model = dropout_ext.fuse_dropout(model)
            except Exception as exc:  # recorded in the report: fuse_dropout's tracer does not take every model
                row["note"] = f"fuse_dropout could not trace the model: {type(exc).__name__}: {exc}"
                model = None
            else:
                row["fused"] = sum(1 for name, _ in model.named_children() if name.startswith("fused_dropout_"))
        row["model"] = model
        out.append(row)
    return out


def _step_fn(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(k=0):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def run(device: torch.device, rounds: int, warmup: int, tiny: bool) -> List[dict]:
    """One row per variant: median step time (and every timed step), its
    ratio to nn.Dropout's, the dropouts swapped and fused, the device ops of
    one step."""
    cfg = CONFIG["smoke" if tiny else "model"]
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]),
                        generator=torch.Generator().manual_seed(SEED)).to(device)
    variants = _models(cfg, device)
    live = [v for v in variants if v["model"] is not None]
    steps = [_step_fn(v["model"], ids) for v in live]
    timer = cases.timer_for(device)
    samples = [[] for _ in live]
    orders = cases.round_orders(len(steps))
    for _ in range(warmup + rounds):
        cases.paired_round(steps, timer, 0, samples, next(orders))
    for v, step, times in zip(live, steps, samples):
        v["step_times_s"] = times[warmup:]
        v["step_time_s"] = cases.median(times[warmup:])
        with count_launches(device.type) as launches:
            step()
        v["launches_per_step"] = launches.count
    base = variants[0]["step_time_s"]
    rows = []
    for v in variants:
        t = v.get("step_time_s")
        rows.append({"variant": v["variant"], "device": str(device), "step_time_s": t,
                     "step_times_s": v.get("step_times_s"),
                     "speedup_vs_nn": base / t if t else None, "rounds": rounds if t else 0,
                     "launches_per_step": v.get("launches_per_step"), "dropouts_swapped": v["swapped"],
                     "fused_modules": v["fused"], "note": v["note"],
                     "config": dict(cfg, p=0.1, optimizer="AdamW", threads=torch.get_num_threads())})
    return rows
