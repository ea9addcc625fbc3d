"""Statistical equivalence with nn.Dropout. Seeds are fixed, so the suite is
deterministic; every bound is stated in standard deviations (5 sigma) of the
statistic under the hypothesis that the mask is i.i.d. Bernoulli(1 - p)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from dropout_ext import functional as F

SIGMA = 5.0


def drop_rate_z(mask: torch.Tensor, p: float) -> float:
    n = mask.numel()
    dropped = n - int(mask.sum())
    return abs(dropped - n * p) / math.sqrt(n * p * (1 - p))


def lag_correlation_z(mask: torch.Tensor, lag: int) -> float:
    """|corr(m[i], m[i + lag])| * sqrt(n): about N(0, 1) for independent bits."""
    m = mask.flatten().double()
    a, b = m[:-lag], m[lag:]
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return abs(r) * math.sqrt(a.numel())


def position_uniformity_z(masks: torch.Tensor, p: float) -> float:
    """Chi-square of per-position drop counts over many calls against
    Binomial(calls, p), as a z-score: (chi2 - df) / sqrt(2 df)."""
    calls, positions = masks.shape
    dropped = (~masks).sum(0).double()
    chi2 = (((dropped - calls * p) ** 2) / (calls * p * (1 - p))).sum().item()
    return abs(chi2 - positions) / math.sqrt(2 * positions)


# The tails of the threshold and its middle: other p compare the words with
# another threshold in the same way.
@pytest.mark.parametrize("p", [0.001, 0.5, 0.999])
def test_drop_rate(p):
    mask = F.dropout_mask((1 << 22,), p, seed=12345)
    assert drop_rate_z(mask, p) < SIGMA


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_per_position_frequencies_uniform(p):
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(2000, 256)
    masks = torch.stack([F.dropout(x[i], p, generator=gen) != 0 for i in range(2000)])
    assert position_uniformity_z(masks, p) < SIGMA


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 1024])
def test_no_correlation_between_neighbours_groups_and_rows(lag):
    # lag 1-3: inside a 4-element Philox group; 4: the same word of the next
    # group; 1024: the next row of a (.., 1024) tensor.
    mask = F.dropout_mask((1 << 22,), 0.5, seed=777)
    assert lag_correlation_z(mask, lag) < SIGMA


def test_no_correlation_between_successive_calls():
    torch.manual_seed(1)
    x = torch.ones(1 << 20)
    a = F.dropout(x, 0.3) != 0
    b = F.dropout(x, 0.3) != 0
    assert lag_correlation_z(torch.cat([a, b]), 1 << 20) < SIGMA


def test_per_row_kept_counts_match_nn_dropout():
    # Two-sample chi-square on the histogram of kept elements per row.
    rows, cols, p = 8192, 64, 0.3
    torch.manual_seed(2)
    x = torch.ones(rows, cols)
    ours = (F.dropout(x, p) != 0).sum(1).numpy()
    theirs = (torch.nn.functional.dropout(x, p) != 0).sum(1).numpy()
    lo, hi = int(min(ours.min(), theirs.min())), int(max(ours.max(), theirs.max()))
    edges = np.arange(lo, hi + 2)
    h1, _ = np.histogram(ours, edges)
    h2, _ = np.histogram(theirs, edges)
    keep = (h1 + h2) >= 10  # pool sparse tails for the chi-square approximation
    table = np.array([np.append(h1[keep], h1[~keep].sum()), np.append(h2[keep], h2[~keep].sum())])
    table = table[:, table.sum(0) > 0]
    _, pvalue, _, _ = stats.chi2_contingency(table)
    assert pvalue > 5.7e-7  # the two-sided 5-sigma level


# A small and a large scale, 10/9 and 10, both rounded in floating point (0.5's, 2, is exact).
@pytest.mark.parametrize("p", [0.1, 0.9])
def test_mean_and_variance(p):
    c, n = 1.5, 1 << 22
    y = F.dropout(torch.full((n,), c, dtype=torch.float64), p, seed=99)
    mean_sd = c * math.sqrt(p / (1 - p)) / math.sqrt(n)
    assert abs(y.mean().item() - c) < SIGMA * mean_sd
    var = c * c * p / (1 - p)
    # y takes the values 0 and a = c / (1 - p), so its sample variance is
    # a^2 f (1 - f) n / (n - 1) with f the kept fraction; a 5-sigma band on f
    # (sd_f = sqrt(p (1 - p) / n)) bounds it, second-order term included.
    a = c / (1 - p)
    sd_f = math.sqrt(p * (1 - p) / n)
    band = a * a * (abs(1 - 2 * p) * SIGMA * sd_f + (SIGMA * sd_f) ** 2 + 1.0 / (n - 1))
    assert abs(y.var().item() - var) < band


def test_a_broken_mask_is_caught():
    # A mask that reuses word 0 for the whole 4-element group: right drop
    # rate, but neighbours perfectly correlated. The checks above must fail.
    good = F.dropout_mask((1 << 20,), 0.5, seed=5)
    broken = good.view(-1, 4)[:, :1].expand(-1, 4).reshape(-1)
    assert drop_rate_z(broken, 0.5) < SIGMA * 4  # the rate alone cannot tell
    assert lag_correlation_z(broken, 1) > 100 * SIGMA
    # and a constant position bias shows in the uniformity statistic
    masks = torch.stack([F.dropout_mask((256,), 0.5, seed=s) for s in range(500)])
    assert position_uniformity_z(masks, 0.5) < SIGMA
    masks[:, 7] = False
    assert position_uniformity_z(masks, 0.5) > SIGMA
