"""A dropout inside a model: what each dropout layer of a training run
sees and returns, and deliberately broken dropouts that a training test
must reject."""

import math

import torch

from error_bounds import gamma


# --- dropout inside a model ------------------------------------------------------
# Training runs with random masks agree with nn.Dropout's only in
# distribution, and a final loss has little power: a dropout that ignores p
# or shares one mask between rows trains almost alike. So the training tests
# also watch each dropout layer's input and output, where a wrong p, a lost
# 1/(1 - p) or a mask shared by every row shows at once.


class DropoutRecorder:
    """What the dropout layers it watches do in training mode, summed over
    every call: elements whose input is not 0 (``live``) and how many of them
    came out 0 (``dropped``); the largest relative error of a kept element's
    output against input * 1/(1 - p); and, for rows 2k and 2k + 1 of each
    call (dimension 0, disjoint pairs, so the pairs are independent), how
    many positions live in both have the same keep decision. With
    ``max_calls``, the first that many calls only (a long run's statistics
    converge long before it ends)."""

    def __init__(self, max_calls=None):
        self.max_calls = max_calls
        self.calls = self.live = self.dropped = self.agree = self.pairs = 0
        self.scale_error = 0.0
        self.p = None

    def watch(self, module: torch.nn.Module) -> torch.nn.Module:
        module.register_forward_hook(self._record)
        return module

    def attach(self, model: torch.nn.Module) -> int:
        """Watches every nn.Dropout (dropout_ext's Dropout is one) in model."""
        found = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for m in found:
            self.watch(m)
        return len(found)

    def _record(self, module, inputs, output):
        if not module.training or self.calls == self.max_calls:
            return
        assert self.p in (None, module.p), "one recorder watches layers of one p"
        self.p = module.p
        x, y = inputs[0].detach().to(torch.float64), output.detach().to(torch.float64)
        live, kept = x != 0, y != 0
        self.calls += 1
        self.live += int(live.sum())
        self.dropped += int((live & ~kept).sum())
        both = live & kept
        if bool(both.any()):
            err = (y[both] / x[both] * (1.0 - module.p) - 1).abs().max().item()
            self.scale_error = max(self.scale_error, err)
        rows = (x.shape[0] // 2) * 2 if x.dim() > 1 else 0
        if rows:
            k, lv = kept[:rows].reshape(rows // 2, 2, -1), live[:rows].reshape(rows // 2, 2, -1)
            pair = lv[:, 0] & lv[:, 1]
            self.pairs += int(pair.sum())
            self.agree += int(((k[:, 0] == k[:, 1]) & pair).sum())

    def check(self, dtype=torch.float32):
        """The statistics of a correct dropout of rate p, each within 6
        standard deviations (a false failure has probability 2e-9):
        dropped / live, a binomial fraction, within 6 sqrt(p (1 - p) / live)
        of p; the row pairs' agreement, a binomial fraction, within
        6 sqrt(a (1 - a) / pairs) of a = p^2 + (1 - p)^2 (independent
        masks); and each kept element input * scale in the math type, the
        scale 1/(1 - p) rounded to it (nn.Dropout rounds p to it first):
        within gamma(3) of input / (1 - p)."""
        p = self.p
        assert self.calls and self.live, "no dropout layer ran in training mode"
        frac = self.dropped / self.live
        assert abs(frac - p) <= 6 * math.sqrt(p * (1 - p) / self.live), \
            f"dropped fraction {frac:.5f} of {self.live} elements, not p = {p}"
        assert self.scale_error <= gamma(3, dtype), \
            f"kept values are not input * 1/(1 - p): relative error {self.scale_error:.3g}"
        assert self.pairs, "no pair of rows to compare"
        a = p * p + (1 - p) * (1 - p)
        agree = self.agree / self.pairs
        assert abs(agree - a) <= 6 * math.sqrt(a * (1 - a) / self.pairs), \
            f"rows' masks agree at {agree:.5f} of {self.pairs} positions, not {a:.5f}: the rows share masks"


class BrokenDropout(torch.nn.Dropout):
    """A dropout with one deliberate mistake, for the tests of the training
    tests' checks: "p ignored" (keeps everything), "half p" (drops at p/2),
    "no scale" (kept values not divided by 1 - p), "shared mask" (row 0's
    mask for every row of dimension 0); kind None makes none. ``draw(x, p)``
    gives the keep mask (default: torch.rand_like(x) >= p), so that a test
    can draw it as the dropout it stands in for does, and the mistake is
    the only difference."""

    KINDS = ("p ignored", "half p", "no scale", "shared mask")

    def __init__(self, p, kind, draw=None):
        super().__init__(p)
        assert kind is None or kind in self.KINDS, kind
        self.kind = kind
        self.draw = draw or (lambda x, p: torch.rand_like(x) >= p)

    def forward(self, x):
        if not self.training or self.kind == "p ignored":
            return x
        p = self.p / 2 if self.kind == "half p" else self.p
        keep = self.draw(x, p)
        if self.kind == "shared mask":
            keep = keep[:1].expand_as(keep)
        return x * keep if self.kind == "no scale" else x * keep / (1 - p)
