"""Discrete-data likelihood helpers (README, "Conventions": every bound is on -log P(x) for integer x).

Pixels x in {0..L-1} are mapped to bin centres in [-1, 1]; a continuous distribution is
turned into a probability over the L bins by integrating it over each bin, with the edge
bins extended to -inf / +inf so that the L probabilities sum to exactly one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
LOG_2PI = math.log(2.0 * math.pi)


def to_unit(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer pixels {0..L-1} -> bin centres in [-1, 1]."""
    return x.float() * (2.0 / (levels - 1)) - 1.0


def from_unit(y: torch.Tensor, levels: int) -> torch.Tensor:
    """Values in [-1, 1] -> nearest integer pixel in {0..L-1} (long)."""
    return torch.round((y.clamp(-1, 1) + 1.0) * ((levels - 1) / 2.0)).long()


def _log_cdf_diff(upper: torch.Tensor, lower: torch.Tensor, log_cdf) -> torch.Tensor:
    """log(F(upper) - F(lower)) for upper > lower and a CDF F symmetric about 0.

    F(u) - F(l) == F(-l) - F(-u): evaluate on the side of zero where F is small, so
    neither value saturates to 1, then log(a - b) = log a + log(-expm1(log b - log a)).
    """
    flip = (upper + lower) > 0
    u = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_u, log_l = log_cdf(u), log_cdf(lo)
    return log_u + torch.log(-torch.expm1(log_l - log_u))


def _discretized_log_prob(x, mean, log_scale, levels, log_cdf) -> torch.Tensor:
    half_bin = 1.0 / (levels - 1)
    centred = to_unit(x, levels) - mean
    inv_s = torch.exp(-log_scale)
    upper = (centred + half_bin) * inv_s
    lower = (centred - half_bin) * inv_s
    inner = _log_cdf_diff(upper, lower, log_cdf)
    first = log_cdf(upper)   # bin 0 covers (-inf, upper]
    last = log_cdf(-lower)   # bin L-1 covers [lower, +inf)
    return torch.where(x == 0, first, torch.where(x == levels - 1, last, inner))


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  levels: int) -> torch.Tensor:
    """log P(x) per pixel for a logistic(mean, exp(log_scale)) integrated over x's bin.

    x: integer [..] in {0..L-1}; mean, log_scale: float [..] in the [-1, 1] data scale.
    """
    return _discretized_log_prob(x, mean, log_scale, levels, F.logsigmoid)


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  levels: int) -> torch.Tensor:
    """log P(x) per pixel for N(mean, exp(log_scale)^2) integrated over x's bin (DDPM's L_0)."""
    return _discretized_log_prob(x, mean, log_scale, levels, torch.special.log_ndtr)


def sample_discretized_logistic(mean: torch.Tensor, log_scale: torch.Tensor, levels: int,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw integer pixels from the discretized logistic (inverse-CDF, then binning)."""
    u = torch.rand(mean.shape, generator=generator, device=mean.device).clamp(1e-6, 1 - 1e-6)
    y = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return from_unit(y, levels)


# log-probabilities below this (relative to the row's largest) are drawn with probability 0:
# exp(-80) = 1.8e-35 is still a normal float32, so exp never takes its slow denormal path
_NEGLIGIBLE_LOG_PROB = -80.0


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from the categorical with unnormalised log-probabilities `logits`
    [..., L] (long [...]): inverse CDF with one uniform per row (torch.multinomial draws an
    exponential per category). Categories below exp(-80) of the row's largest have
    probability 0 (a total-variation change below L * 1.8e-35). The arithmetic is fp32 (or
    fp64) whatever the network ran in: in bf16 (8-bit mantissa) the cumulative sum and the
    uniform draw would lose or quantise the levels below p ~ 2^-8."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logits = logits - logits.amax(-1, keepdim=True)
    weights = torch.where(logits > _NEGLIGIBLE_LOG_PROB, logits, -math.inf).exp()
    cdf = weights.cumsum(-1)  # unnormalised; the last entry is the total
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1:]
    return torch.searchsorted(cdf, u, right=True)[..., 0].clamp(max=logits.shape[-1] - 1)


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, exp(log_var)) elementwise (continuous density)."""
    return -0.5 * (LOG_2PI + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Nats per example -> bits per dimension."""
    return nats / (dims * LN2)


def k_sample_bound(log_w: torch.Tensor) -> torch.Tensor:
    """-log (1/K) sum_k w_k from the log importance weights [K, B] of K samples per example
    (IWAE, and the flow's and the ODE's K-sample dequantized bounds): nats [B]."""
    return -(torch.logsumexp(log_w, 0) - math.log(len(log_w)))
