"""Multi-scale normalizing flow (RealNVP / Glow) with a dequantization bound on discrete images.

The flow f is a bijection from continuous images y [B,C,H,W] to eps [B,D], D = C*H*W, with
eps ~ N(0, I) under the model, so that (change of variables)

    log p(y) = log N(f(y); 0, I) + log |det df/dy|.

It is built of scales (Dinh et al. 2017, Kingma & Dhariwal 2018). At each scale: flow steps
[actnorm, invertible 1x1 convolution (where C > 1), affine coupling with a checkerboard mask]
at the scale's resolution, a squeeze (each 2x2 patch -> 4 channels), flow steps with
channel-wise masks, then (but after the last scale) half of the channels are factored out
with a learned conditional Gaussian prior N(mu(kept), sigma(kept)^2) (Glow's split), written
as the affine bijection eps = (z - mu) / sigma so that every factored part joins eps. Scales:
squeeze while H and W are even and >= 4, at most `max_scales` times (8x8: 8 -> 4 -> 2;
28x28: 28 -> 14 -> 7); a shape that cannot be squeezed gets the checkerboard steps only.
Couplings: y_b = x_b * exp(s) + t, (s, t) = net(x_a), s = scale * tanh(raw) bounded, the
net's last layer zero-initialised: the flow starts volume-preserving (the identity but for
actnorm and the 1x1 convolutions, which start as rotations). Actnorm is initialised from data
(`init_from_data`: per-channel zero mean, unit variance on a fixed subset of the training
images), kept in parameters, so it survives save/load and resumed training.

Likelihood on discrete data (uniform dequantization). Pixels x in {0..L-1} are the bin
centres c = to_unit(x) in [-1, 1] of bins of half-width h = 1/(L-1); the L bins of width 2h
tile [-1-h, 1+h] without overlap, so P(x) = int_{bin(x)} p(y) dy sums to <= 1 over the L^D
images (the mass of p outside [-1-h, 1+h] is lost, which only loosens the bound). With
y = c + u, u ~ U[-h, h]^D (density (2h)^-D on the bin):

    -log P(x) = -log E_u[p(y)] - D log(2h) <= E_u[-log p(y)] - D log(2h)       (Jensen)

and with K importance samples y_k = c + u_k (the uniform proposal, q(y) = (2h)^-D),

    -log P(x) <= -log (1/K) sum_k p(y_k) / q(y_k) = -log (1/K) sum_k p(y_k) - D log(2h),

tighter with K (Burda et al. 2016; its expectation decreases to -log P(x)). The constant
-D log(2h) = D log((L-1)/2) nats, i.e. +log2((L-1)/2) bits/dim: 3 bits/dim for L = 17 (as in
ode.py's 'uniform' at alpha = 1). It is the bin width's: RealNVP/Glow's "- log 256" (data
x/256 + U[0, 1/256) in [0, 1], bins of width 1/256: +8 bits/dim) and score_sde's 7 bits/dim
(bins of width 2/256 in [-1, 1]) are the same bound for bins of width 1/L and 2/L; here the
bins are centred on the L values of to_unit, width 2/(L-1) (L = 256: log2(127.5) = 6.994).

`loss` is the K = 1 bound (fresh noise) in nats/dim; `nll_terms` splits the bound into
"prior" (-log N(eps; 0, I)), "flow" (-log |det|) and "dequantization" (D log((L-1)/2), minus
the importance-weighting gain for K > 1). Sampling: one inverse pass from eps ~ N(0, I),
then the nearest level (`likelihood.from_unit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import likelihood as lk
from . import register
from .base import Estimator, Model

INIT_IMAGES = 512  # actnorm's data-dependent init: statistics of at most this many training images


class ActNorm(nn.Module):
    """y = (x + b) * exp(log_s) per channel; b, log_s set from the first batch when `pending`."""

    def __init__(self, c: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.log_s = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.pending = False  # init_from_data sets it for one forward pass

    def forward(self, x):
        if self.pending:  # data-dependent init on this batch
            with torch.no_grad():
                self.bias.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_s.copy_(-x.std((0, 2, 3), correction=0, keepdim=True).clamp(min=1e-3).log())
            self.pending = False
        ld = self.log_s.sum() * x.shape[2] * x.shape[3]
        return (x + self.bias) * self.log_s.exp(), ld.expand(len(x))

    def reverse(self, y):
        return y * torch.exp(-self.log_s) - self.bias


class InvConv(nn.Module):
    """Invertible 1x1 convolution W = P L (U + diag(sign * exp(log_s))) (Glow's LU form)."""

    def __init__(self, c: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(c, c))[0]  # random rotation
        p, low, up = torch.linalg.lu(w)
        s = torch.diagonal(up)
        self.register_buffer("p", p)
        self.register_buffer("sign", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(c, c), -1))
        self.lower = nn.Parameter(low)
        self.upper = nn.Parameter(torch.triu(up, 1))
        self.log_s = nn.Parameter(s.abs().log())

    def weight(self):
        eye = torch.eye(len(self.sign), device=self.sign.device, dtype=self.log_s.dtype)
        low = self.lower * self.l_mask + eye
        up = self.upper * self.l_mask.T + torch.diag(self.sign * self.log_s.exp())
        return self.p @ low @ up  # [C, C]

    def forward(self, x):
        ld = self.log_s.sum() * x.shape[2] * x.shape[3]
        return _mix(self.weight(), x), ld.expand(len(x))

    def reverse(self, y):
        return _mix(torch.linalg.inv(self.weight().double()).to(y.dtype), y)


def _mix(w, x):
    """The 1x1 convolution with weight w [C,C] of x [B,C,H,W] (a matmul: cheaper than conv2d here)."""
    return torch.matmul(w, x.flatten(2)).view(x.shape)


def coupling_net(cin: int, width: int, cout: int) -> nn.Sequential:
    """conv1x1 -> ReLU -> conv3x3 -> ReLU -> conv1x1 (zero-initialised): [B,cin] -> [B,cout].
    The layers that see the flow's channels are 1x1, so the size hardly depends on C (the
    squeezes make C = 24 on 3x32x32 where it is 8 on 1x8x8)."""
    last = nn.Conv2d(width, cout, 1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(cin, width, 1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), last)


class Coupling(nn.Module):
    """Affine coupling; 'checker': x_a = pixels of one checkerboard parity (all channels),
    'channel': x_a = one half of the channels; x_b (the rest) is scaled and shifted."""

    def __init__(self, shape: tuple[int, int, int], width: int, mask: str, parity: int):
        super().__init__()
        c, h, w = shape
        self.mask_type = mask
        if mask == "checker":
            m = ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2 == parity).float()
            self.register_buffer("mask", m[None, None])  # [1,1,H,W]: 1 on x_a
            cin, cb = c + 1, c
        else:
            self.na = c // 2 if parity == 0 else c - c // 2  # channels of x_a (first na after a flip)
            self.flip = parity == 1
            cin, cb = self.na, c - self.na
        self.net = coupling_net(cin, width, 2 * cb)
        self.scale = nn.Parameter(torch.ones(1, cb, 1, 1))

    def _st(self, xa):
        raw_s, t = self.net(xa).chunk(2, 1)
        return self.scale * torch.tanh(raw_s), t

    def _checker_st(self, x):  # (s, t), zero on x_a; x_a (x * mask) is the same in x and y
        m = self.mask
        s, t = self._st(torch.cat([x * m, m.expand(len(x), 1, -1, -1)], 1))
        return s * (1 - m), t * (1 - m)

    def _split(self, x):  # (x_a, x_b)
        x = x.flip(1) if self.flip else x
        return x[:, : self.na], x[:, self.na:]

    def _join(self, xa, xb):
        return torch.cat([xa, xb], 1).flip(1) if self.flip else torch.cat([xa, xb], 1)

    def forward(self, x):
        if self.mask_type == "checker":
            s, t = self._checker_st(x)
            return x * s.exp() + t, s.flatten(1).sum(1)
        xa, xb = self._split(x)
        s, t = self._st(xa)
        return self._join(xa, xb * s.exp() + t), s.flatten(1).sum(1)

    def reverse(self, y):
        if self.mask_type == "checker":
            s, t = self._checker_st(y)
            return (y - t) * torch.exp(-s)
        ya, yb = self._split(y)
        s, t = self._st(ya)
        return self._join(ya, (yb - t) * torch.exp(-s))


class Squeeze(nn.Module):
    """[B,C,H,W] -> [B,4C,H/2,W/2]: each 2x2 patch to channels (volume-preserving)."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def reverse(self, y):
        b, c, h, w = y.shape
        y = y.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, c // 4, 2 * h, 2 * w)


class Split(nn.Module):
    """Factor out the last channels z2 with the conditional prior N(mu(z1), exp(log_s(z1))^2):
    eps2 = (z2 - mu) * exp(-log_s) (Glow); forward returns the kept z1 and eps2."""

    def __init__(self, c: int):
        super().__init__()
        self.keep = c - c // 2
        self.prior = nn.Conv2d(self.keep, 2 * (c // 2), 3, padding=1)  # zero init: N(0, I)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def forward(self, x):
        z1, z2 = x[:, : self.keep], x[:, self.keep:]
        mu, log_s = self.prior(z1).chunk(2, 1)
        return z1, (z2 - mu) * torch.exp(-log_s), -log_s.flatten(1).sum(1)

    def reverse(self, z1, eps2):
        mu, log_s = self.prior(z1).chunk(2, 1)
        return torch.cat([z1, eps2 * log_s.exp() + mu], 1)


class Flow(nn.Module):
    """forward(y) -> (eps [B,D], log|det df/dy| [B]); forward(eps, reverse=True) -> y [B,C,H,W]."""

    def __init__(self, shape: tuple[int, int, int], width: int, steps: int, max_scales: int, first_width: int):
        super().__init__()
        self.shape = shape
        self.layers = nn.ModuleList()
        self.part_shapes: list[tuple[int, int, int]] = []  # factored-out parts, then the top
        scales, (c, h, w) = 0, shape
        while h % 2 == 0 and w % 2 == 0 and min(h, w) >= 4 and scales < max_scales:
            scales, h, w = scales + 1, h // 2, w // 2
        c, h, w = shape

        def add_steps(mask: str, width: int = width):
            for i in range(steps):
                self.layers.append(ActNorm(c))
                if c > 1:
                    self.layers.append(InvConv(c))
                self.layers.append(Coupling((c, h, w), width, mask, i % 2))

        add_steps("checker", first_width)
        for i in range(scales):
            if i > 0:
                add_steps("checker")
            self.layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            add_steps("channel")
            if i < scales - 1:
                self.layers.append(Split(c))
                self.part_shapes.append((c // 2, h, w))
                c -= c // 2
        self.part_shapes.append((c, h, w))

    def forward(self, x, reverse: bool = False):
        if reverse:
            return self._reverse(x)
        logdet, parts = x.new_zeros(len(x)), []
        for layer in self.layers:
            if isinstance(layer, Split):
                x, eps, ld = layer(x)
                parts.append(eps.flatten(1))
            else:
                x, ld = layer(x)
            logdet = logdet + ld
        return torch.cat(parts + [x.flatten(1)], 1), logdet  # [B,D], [B]

    def _reverse(self, eps):
        b = len(eps)
        parts = list(eps.split([math.prod(s) for s in self.part_shapes], 1))
        x = parts.pop().reshape(b, *self.part_shapes[-1])
        splits = len(parts)
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                splits -= 1
                x = layer.reverse(x, parts[splits].reshape(b, *self.part_shapes[splits]))
            else:
                x = layer.reverse(x)
        return x


@register("flow")
class NormalizingFlow(Model):
    """Multi-scale affine-coupling flow: Dinh et al. 2017 (RealNVP), Kingma & Dhariwal 2018 (Glow)."""

    family = "flow"
    nfe_module_name = "flow"

    @dataclass
    class Config:
        width: int = 30        # hidden channels of the coupling nets after the first squeeze
        first_width: int = 16  # ... of the first block's (full resolution: a weight costs 4x there)
        steps: int = 3         # flow steps per block (checkerboard; channel-wise after each squeeze)
        max_scales: int = 2    # squeezes at most (each but the last followed by a split)
        # parameters: 83,683 at 1x8x8 and 1x28x28 (the shared U-Net: 86,769), 93,396 at 3x32x32

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        self.flow = Flow(self.shape, cfg.width, cfg.steps, cfg.max_scales, cfg.first_width)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def offset(self) -> float:
        """-D log(2h) = D log((L-1)/2): the bound's constant in nats (uniform bins of width 2h)."""
        return self.dims * math.log((self.levels - 1) / 2)

    def _dequantize(self, x, generator=None):
        h = 1.0 / (self.levels - 1)
        u = torch.rand(x.shape, generator=generator, device=x.device)
        return lk.to_unit(x, self.levels) + (2 * u - 1) * h  # y ~ U(bin of x), [B,C,H,W]

    def log_density(self, y):
        """log p(y) in nats [B] and its two terms, log N(eps; 0, I) and log|det|."""
        eps, logdet = self.flow(y)
        log_prior = lk.normal_log_prob(eps, eps.new_zeros(()), eps.new_zeros(())).sum(1)
        return log_prior, logdet

    @torch.no_grad()
    def init_from_data(self, x):
        """Actnorm: zero mean, unit variance per channel on (at most) INIT_IMAGES training
        images, once (a fitted or loaded model keeps its values); uses no global RNG state."""
        self._check_x(x)
        if bool(self.initialized):
            return
        g = torch.Generator(device=x.device).manual_seed(0)
        idx = torch.randperm(len(x), generator=g, device=x.device)[:INIT_IMAGES]
        for m in self.flow.modules():
            if isinstance(m, ActNorm):
                m.pending = True
        self.flow(self._dequantize(x[idx], g))
        self.initialized.fill_(True)

    def loss(self, x):
        self._check_x(x)
        log_prior, logdet = self.log_density(self._dequantize(x))
        return (self.offset - log_prior - logdet).mean() / self.dims

    @torch.no_grad()
    def nll_terms(self, x, k: int = 1, chunk: int = 2048, **estimator: Any):
        """k = 1: -log p(y) - D log(2h), one draw y; k > 1: the K-sample bound, "prior" and
        "flow" averaged over the K draws, the importance-weighting gain (<= 0) in "dequantization"."""
        self._reject(estimator, self.name)
        self._check_x(x)
        if k < 1:
            raise ValueError(f"{self.name}: the number of dequantization samples K must be >= 1, got {k}")
        b, per = len(x), max(1, chunk // len(x))
        log_p, prior, flow = [], x.new_zeros(b, dtype=torch.float), x.new_zeros(b, dtype=torch.float)
        for start in range(0, k, per):
            kk = min(per, k - start)
            lp, ld = self.log_density(self._dequantize(x.repeat(kk, 1, 1, 1)))  # [kk*B]
            log_p.append((lp + ld).view(kk, b))
            prior -= lp.view(kk, b).sum(0) / k
            flow -= ld.view(kk, b).sum(0) / k
        bound = lk.k_sample_bound(torch.cat(log_p))  # -log (1/K) sum p(y_k), [B]
        gain = bound - (prior + flow) if k > 1 else torch.zeros_like(bound)
        return {"prior": prior, "flow": flow, "dequantization": self.offset + gain}

    def estimators(self, ecfg):
        out = [Estimator("dequantized", "dequantized (uniform, K=1)", {"k": 1})]
        if ecfg.dequant_k > 1:
            out.append(Estimator("dequantized", f"dequantized (uniform, K={ecfg.dequant_k})",
                                 {"k": ecfg.dequant_k, "chunk": ecfg.chunk}))
        return out

    def headline_estimator(self, ecfg):
        """The K-sample dequantized bound at evaluate.dequant_k (K = 1 where dequant_k is 1)."""
        return self.estimators(ecfg)[-1]

    def sampler_label(self, sampler="ancestral", steps=None, **options: Any) -> str:
        return "inverse pass"

    def nfe(self, sampler="ancestral", steps=None, **options: Any) -> int:
        return 1  # one inverse pass of the flow (`self.flow(eps, reverse=True)`)

    @torch.no_grad()
    def sample(self, n, generator=None, sampler="ancestral", steps=None, **options: Any):
        self.check_sampler(sampler, steps, options)
        eps = torch.randn(n, self.dims, generator=generator, device=self.device)
        y = self.flow(eps, reverse=True)  # [n,C,H,W]
        bad = ~torch.isfinite(y).flatten(1).all(1)  # a failed inverse pass: counted, never hidden
        self.nonfinite_samples += int(bad.sum())
        return lk.from_unit(torch.where(bad.view(-1, 1, 1, 1), 0.0, y), self.levels)
