import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusion_models import likelihood as lk


def all_levels_log_probs(mean, log_scale, levels):
    """log P(k) for every level k: [levels, *mean.shape]."""
    xs = torch.arange(levels).view(-1, *([1] * mean.dim())).expand(levels, *mean.shape)
    return lk.discretized_logistic_log_prob(xs, mean.expand_as(xs), log_scale.expand_as(xs), levels)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_bins_sum_to_one(levels):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2000, generator=g) * 3           # includes means far outside [-1, 1]
    log_scale = torch.rand(2000, generator=g) * 14 - 9  # scales from ~1e-4 to ~150
    lp = all_levels_log_probs(mean, log_scale, levels)
    assert torch.isfinite(lp).all()
    total = torch.logsumexp(lp.double(), 0)
    assert total.abs().max().item() < 1e-4


def test_matches_scipy_logistic_cdf():
    levels = 17
    rng = np.random.default_rng(1)
    mean = rng.uniform(-1.2, 1.2, 500)
    scale = np.exp(rng.uniform(-4, 0.5, 500))
    x = rng.integers(0, levels, 500)
    centre = 2 * x / (levels - 1) - 1
    half = 1 / (levels - 1)
    upper = np.where(x == levels - 1, 1.0, stats.logistic.cdf(centre + half, mean, scale))
    lower = np.where(x == 0, 0.0, stats.logistic.cdf(centre - half, mean, scale))
    ok = upper - lower > 1e-9  # where float64 CDF differences are accurate (tails: next test)
    assert ok.sum() > 300
    expected = np.log(upper[ok] - lower[ok])
    got = lk.discretized_logistic_log_prob(torch.tensor(x), torch.tensor(mean, dtype=torch.float32),
                                           torch.tensor(np.log(scale), dtype=torch.float32), levels)
    np.testing.assert_allclose(got.double().numpy()[ok], expected, rtol=1e-3, atol=1e-4)


def test_extreme_tails_are_finite_and_accurate():
    # mean far above the top bin with a tiny scale: nearly all mass in bin L-1, and the
    # inner bins' probabilities are tiny but representable in log space.
    levels = 17
    x = torch.arange(levels)
    lp = lk.discretized_logistic_log_prob(x, torch.full((levels,), 5.0), torch.full((levels,), -3.0), levels)
    assert torch.isfinite(lp).all()
    assert lp[-1].exp().item() == pytest.approx(1.0, abs=1e-6)
    # log P(bin L-2) = log(sigmoid(u) - sigmoid(l)) ~ l (both tiny): check against float64 formula
    s = math.exp(-3.0)
    u = (1 - 1 / 16 * 1 - 5.0) / s  # upper edge of bin L-2 is 1 - half_bin
    l_ = (1 - 3 / 16 - 5.0) / s
    ref = math.log(math.exp(u) / (1 + math.exp(u)) - math.exp(l_) / (1 + math.exp(l_)))
    assert lp[-2].item() == pytest.approx(ref, rel=1e-4)


def test_sampling_matches_probabilities():
    levels = 5
    mean, log_scale = torch.tensor(0.2), torch.tensor(-1.0)
    probs = all_levels_log_probs(mean.view(1), log_scale.view(1), levels).exp().squeeze(1)
    n = 200_000
    s = lk.sample_discretized_logistic(mean.expand(n), log_scale.expand(n), levels,
                                       torch.Generator().manual_seed(0))
    freq = torch.bincount(s, minlength=levels).double() / n
    assert torch.allclose(freq, probs.double(), atol=4e-3)


def test_unit_roundtrip_and_bits():
    x = torch.arange(17)
    assert torch.equal(lk.from_unit(lk.to_unit(x, 17), 17), x)
    assert lk.bits_per_dim(64 * math.log(17), 64) == pytest.approx(math.log2(17))


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_gaussian_bins_sum_to_one_and_match_scipy(levels):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1000, generator=g) * 2
    log_scale = torch.rand(1000, generator=g) * 10 - 7
    xs = torch.arange(levels).view(-1, 1).expand(levels, 1000)
    lp = lk.discretized_gaussian_log_prob(xs, mean.expand_as(xs), log_scale.expand_as(xs), levels)
    assert torch.isfinite(lp).all()
    assert torch.logsumexp(lp.double(), 0).abs().max().item() < 1e-4
    # independent: float64 differences of scipy's normal CDF, where they are accurate
    c = 2 * xs.numpy() / (levels - 1) - 1
    m, sd = mean.double().numpy(), np.exp(log_scale.double().numpy())
    up = np.where(xs.numpy() == levels - 1, 1.0, stats.norm.cdf(c + 1 / (levels - 1), m, sd))
    lo = np.where(xs.numpy() == 0, 0.0, stats.norm.cdf(c - 1 / (levels - 1), m, sd))
    ok = up - lo > 1e-9
    np.testing.assert_allclose(lp.double().numpy()[ok], np.log((up - lo)[ok]), rtol=1e-3, atol=1e-4)


def test_categorical_sampling_matches_probabilities():
    """sample_categorical's frequencies against the softmax of its logits (a chi-square test
    per row), with an impossible (-inf) and a negligible (below exp(-80)) category never drawn."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.01, 0.01, 0.97, 0.01], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log() + 3.0  # unnormalised
    logits[1, 3] = logits[1, 2] - 90.0  # negligible: drawn with probability 0
    expected = torch.softmax(logits.double(), -1)
    expected[1, 3] = 0.0
    n = 200_000
    g = torch.Generator().manual_seed(0)
    draws = lk.sample_categorical(logits[:, None, :].expand(3, n, 4), g)  # [3, n]
    assert draws.dtype == torch.long and draws.shape == (3, n)
    for row in range(3):
        counts = torch.bincount(draws[row], minlength=4).double()
        keep = expected[row] > 0
        assert counts[~keep].sum() == 0
        chi2 = (((counts - n * expected[row]) ** 2 / (n * expected[row]))[keep]).sum().item()
        assert stats.chi2.sf(chi2, int(keep.sum()) - 1) > 1e-4
    again = lk.sample_categorical(logits[:, None, :].expand(3, n, 4), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
