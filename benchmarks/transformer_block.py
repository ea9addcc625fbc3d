"""End-to-end memory benchmark: a small transformer block trained for a few
steps with nn.Dropout, with dropout_ext swapped in (``replace_dropout``), and
with the feed-forward's bias+GELU+dropout and the residual adds fused.

Dropout sits where the seed documents put it: on the embeddings, on the
attention probabilities, after the attention projection and after the
feed-forward. Each variant runs in its own process so its peak memory is its
own: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU (which keeps no
allocator statistics) the bytes the C heap has in use, glibc's
``mallinfo2()``, sampled every millisecond by a helper thread during the
timed steps (the peak, at the start of each backward, lasts far longer).
Both are reported above the memory in use before the timed steps.
Also reported: the median step time and the bytes autograd saves for
backward in one forward (``saved_tensors_hooks``).

    python benchmarks/transformer_block.py --variant nn --device cpu
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("nn", "dropout_ext", "dropout_ext_fused")
CONFIG = {"cpu": dict(batch=8, seq=256, d=512, heads=8, ff=2048, vocab=4096, steps=6),
          "cuda": dict(batch=32, seq=512, d=1024, heads=16, ff=4096, vocab=32768, steps=20),
          "smoke": dict(batch=2, seq=16, d=32, heads=4, ff=64, vocab=64, steps=1)}
P = 0.1


class Block(nn.Module):
    def __init__(self, d, heads, ff, vocab, fused):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.emb = nn.Embedding(vocab, d)
        self.emb_drop = nn.Dropout(P)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_drop = nn.Dropout(P)
        self.proj = nn.Linear(d, d)
        self.proj_drop = nn.Dropout(P)
        self.fc1 = nn.Linear(d, ff)
        self.act = nn.GELU()
        self.ff_drop1 = nn.Dropout(P)
        self.fc2 = nn.Linear(ff, d)
        self.ff_drop2 = nn.Dropout(P)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.emb_drop(self.emb(tokens))
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads), dim=-1)
        a = (self.attn_drop(att) @ v).transpose(1, 2).reshape(b, s, d)
        h = self.ln2(x)
        if self.fused:
            from dropout_ext import functional as F

            x = F.fused_dropout(a @ self.proj.weight.t(), P, bias=self.proj.bias, residual=x, training=self.training)
            f = F.fused_dropout(h @ self.fc1.weight.t(), P, bias=self.fc1.bias, activation="gelu",
                                training=self.training)
            x = F.fused_dropout(f @ self.fc2.weight.t(), P, bias=self.fc2.bias, residual=x, training=self.training)
        else:
            x = x + self.proj_drop(self.proj(a))
            x = x + self.ff_drop2(self.fc2(self.ff_drop1(self.act(self.fc1(h)))))
        return self.head(x)


class _HeapSampler:
    """Peak of glibc's in-use heap bytes (small blocks plus mmapped ones,
    where torch puts large tensors), sampled in a background thread."""

    def __init__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        self._fn = ctypes.CDLL("libc.so.6").mallinfo2
        self._fn.restype = MallInfo2
        self.peak = 0
        self._stop = False

    def in_use(self):
        info = self._fn()
        return info.uordblks + info.hblkhd

    def __enter__(self):
        import threading

        self.peak = self.in_use()

        def loop():
            while not self._stop:
                self.peak = max(self.peak, self.in_use())
                time.sleep(0.001)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def run(variant, device, threads, smoke=False):
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    cfg = CONFIG["smoke" if smoke else device]
    model = Block(cfg["d"], cfg["heads"], cfg["ff"], cfg["vocab"], fused=variant == "dropout_ext_fused").to(device)
    swapped = 0
    if variant != "nn":
        import dropout_ext

        swapped = dropout_ext.replace_dropout(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=device)
    target = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()
        return loss

    step()  # warm-up: allocates the gradients and optimizer state
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens).sum()
    times = []

    def timed_steps():
        for _ in range(cfg["steps"]):
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed_steps()
        peak = torch.cuda.max_memory_allocated() - base
        peak_kind = "torch.cuda.max_memory_allocated above the memory allocated before the timed steps"
    else:
        with _HeapSampler() as heap:
            base = heap.in_use()
            timed_steps()
        peak = heap.peak - base
        peak_kind = "peak C-heap bytes in use (mallinfo2, sampled every 1 ms) above those before the timed steps"
    return {"variant": variant, "device": device, "config": cfg, "dropouts_swapped": swapped,
            "step_time_s": statistics.median(times), "peak_bytes": peak, "peak_kind": peak_kind,
            "saved_for_backward_bytes": sum(saved.values()), "threads": torch.get_num_threads()}


def run_all(device, threads=None, smoke=False):
    """Each variant in a fresh process, so one's peak cannot hide another's."""
    import subprocess

    import dropout_ext

    # The children measure the dropout_ext this process imported, also when
    # that is an uninstalled checkout found through the working directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(dropout_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(part for part in (root, os.environ.get("PYTHONPATH")) if part))
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.join(HERE, "transformer_block.py"), "--variant", variant, "--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        if smoke:
            cmd.append("--smoke")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"transformer_block.py --variant {variant} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, one step (no figures)")
    args = ap.parse_args()
    print(json.dumps(run(args.variant, args.device, args.threads, args.smoke)))
