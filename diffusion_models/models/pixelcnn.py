"""Gated PixelCNN: an exact autoregressive likelihood, a categorical over the L levels per sub-pixel.

Order: raster over pixels (row i, then column j), then channels within a pixel (R, G|R, B|R,G).
Vertical stack: a (k//2+1) x k conv sees rows <= i; shifted down one row before it enters the
horizontal stack, so what it passes on sees only rows < i. Horizontal stack: a 1 x (k//2+1) conv
sees columns <= j of row i; at the current pixel itself channel-group masks (type A in the first
layer: input channels < c; type B after: hidden groups <= c) keep the order within a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import likelihood as lk
from . import register
from .base import Estimator, Model


def channel_groups(n: int, colours: int) -> torch.Tensor:
    """Colour group (0..C-1) of each of n feature channels: contiguous, as even as n allows."""
    return torch.arange(n) * colours // n  # [n]


def group_mask(g_out: torch.Tensor, g_in: torch.Tensor, kind: str) -> torch.Tensor:
    """[out, in] 0/1: type A sees colour groups < the output's, type B groups <= it."""
    return (g_in[None] < g_out[:, None]) if kind == "A" else (g_in[None] <= g_out[:, None])


class MaskedConv(nn.Conv2d):
    """Conv whose weight is multiplied by a fixed 0/1 mask [out, in, kh, kw] (None: no mask)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], mask: torch.Tensor | None):
        super().__init__(cin, cout, kernel)
        self.register_buffer("mask", None if mask is None else mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else self.weight * self.mask
        return F.conv2d(x, w, self.bias)


def pointwise(cin: int, cout: int, g_out: torch.Tensor, g_in: torch.Tensor, colours: int) -> MaskedConv:
    """1x1 conv, type-B channel-group masked (unmasked for one colour)."""
    mask = None if colours == 1 else group_mask(g_out, g_in, "B")[:, :, None, None]
    return MaskedConv(cin, cout, (1, 1), mask)


class GatedLayer(nn.Module):
    """One gated layer (van den Oord et al. 2016, fig. 2): vertical and horizontal stacks,
    tanh(W_f * x) * sigmoid(W_g * x), the vertical-to-horizontal 1x1 link, a residual on h."""

    def __init__(self, cin: int, p: int, k: int, colours: int, kind: str):
        super().__init__()
        self.k, self.residual = k, kind == "B"
        g_in = torch.arange(cin) if kind == "A" else channel_groups(cin, colours)  # the image: channel c
        g_p = channel_groups(p, colours)
        g_2p = torch.cat([g_p, g_p])  # [filter; gate] halves: tanh(f_c) * sigmoid(g_c) stays in group c
        self.v = MaskedConv(cin, 2 * p, (k // 2 + 1, k), None)  # rows i-k//2..i
        self.v_to_h = MaskedConv(2 * p, 2 * p, (1, 1), None)  # on the shifted vertical stack: no mask
        # horizontal: columns j-k//2..j; the last column (the current pixel) channel-masked
        mask = torch.ones(2 * p, cin, 1, k // 2 + 1)
        mask[:, :, 0, -1] = group_mask(g_2p, g_in, kind)
        self.h = MaskedConv(cin, 2 * p, (1, k // 2 + 1), mask)
        self.h_out = pointwise(p, p, g_p, g_p, colours)

    @staticmethod
    def gate(a: torch.Tensor) -> torch.Tensor:
        f, g = a.chunk(2, dim=1)
        return torch.tanh(f) * torch.sigmoid(g)

    def forward(self, v: torch.Tensor, h: torch.Tensor, last: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        r = self.k // 2
        v_pre = self.v(F.pad(v, (r, r, r, 0)))  # [B,2p,H,W], row i sees rows <= i
        shifted = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # row i sees rows < i
        h_pre = self.h(F.pad(h, (r, 0, 0, 0))) + self.v_to_h(shifted)  # [B,2p,H,W]
        h_new = self.h_out(self.gate(h_pre))
        v_new = None if last else self.gate(v_pre)  # the last layer's vertical output feeds nothing
        return v_new, (h + h_new if self.residual else h_new)


class GatedPixelCNN(nn.Module):
    """x in [-1, 1] [B,C,H,W] -> logits [B,C,L,H,W]; logits at sub-pixel (c,i,j) depend only on
    sub-pixels before it in raster-then-channel order. One forward call: one network evaluation."""

    def __init__(self, colours: int, levels: int, width: int, layers: int, kernel: int, first_kernel: int):
        super().__init__()
        self.colours, self.levels = colours, levels
        self.layers = nn.ModuleList(
            [GatedLayer(colours, width, first_kernel, colours, "A")]
            + [GatedLayer(width, width, kernel, colours, "B") for _ in range(layers - 1)])
        g_p, g_out = channel_groups(width, colours), channel_groups(colours * levels, colours)
        self.head = nn.Sequential(nn.ReLU(), pointwise(width, width, g_p, g_p, colours), nn.ReLU(),
                                  pointwise(width, colours * levels, g_out, g_p, colours))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = h = x.to(self.head[-1].weight.dtype)  # [B,C,H,W]
        for n, layer in enumerate(self.layers, 1):
            v, h = layer(v, h, last=n == len(self.layers))
        out = self.head(h)  # [B, C*L, H, W], channel c*L + l: level l of colour c
        return out.view(len(x), self.colours, self.levels, *x.shape[2:])


@register("pixelcnn")
class PixelCNN(Model):
    """Gated PixelCNN, van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"."""

    family = "autoregressive"
    nfe_module_name = "net"

    @dataclass
    class Config:
        # defaults: 86,927 parameters at (1,8,8), 17 levels (the shared U-Net: 86,769); the count
        # does not depend on image size, only on C and, through the output layer, on L
        width: int = 30  # p: feature maps per stack
        layers: int = 5  # gated layers, the first of mask type A
        kernel: int = 3  # k of the type-B layers: vertical (k//2+1) x k, horizontal 1 x (k//2+1)
        first_kernel: int = 11  # k of the first (type A) layer: a wide receptive field for few parameters

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        for field in ("width", "layers", "kernel", "first_kernel"):
            if getattr(cfg, field) < 1:
                raise ValueError(f"pixelcnn: {field} must be >= 1, got {getattr(cfg, field)}")
        for field in ("kernel", "first_kernel"):
            if getattr(cfg, field) % 2 == 0:
                raise ValueError(f"pixelcnn: {field} must be odd, got {getattr(cfg, field)}")
        self.net = GatedPixelCNN(self.shape[0], levels, cfg.width, cfg.layers, cfg.kernel, cfg.first_kernel)

    def rows_seen(self) -> int:
        """How many rows above its own an output row depends on: the shift into the horizontal
        stack plus each layer's vertical reach (sampling runs the net on that window alone)."""
        return 1 + self.cfg.first_kernel // 2 + (self.cfg.layers - 1) * (self.cfg.kernel // 2)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_d | x_<d) for every level: [B,C,L,H,W] (log-softmax over L)."""
        return F.log_softmax(self.net(lk.to_unit(x, self.levels)), dim=2)

    def _nll(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        logp = self.log_probs(x).gather(2, x.long().unsqueeze(2))  # [B,C,1,H,W]
        return -logp.flatten(1).sum(1)  # [B] nats

    def loss(self, x):
        return self._nll(x).mean() / self.dims

    @torch.no_grad()
    def nll_terms(self, x, **estimator):
        self._reject(estimator, self.name or "pixelcnn")
        return {"nll": self._nll(x)}

    def estimators(self, ecfg):
        return [Estimator("exact", "exact")]

    def headline_estimator(self, ecfg):
        return self.estimators(ecfg)[0]

    def sampler_label(self, sampler="ancestral", steps=None, **options: Any) -> str:
        return "autoregressive"

    def nfe(self, sampler="ancestral", steps=None, **options: Any) -> int:
        return self.dims  # one network pass per sub-pixel

    @torch.no_grad()
    def sample(self, n, generator=None, sampler="ancestral", steps=None, **options: Any):
        self.check_sampler(sampler, steps, options)
        c, h, w = self.shape
        x = torch.zeros(n, c, h, w, dtype=torch.long, device=self.device)
        for i in range(h):
            lo = max(0, i - self.rows_seen())  # row i depends on no input row above lo
            for j in range(w):
                for ch in range(c):  # raster order, then R, G, B within the pixel
                    logits = self.net(lk.to_unit(x[:, :, lo:i + 1], self.levels))[:, ch, :, -1, j]  # [n, L]
                    x[:, ch, i, j] = lk.sample_categorical(logits, generator)
        return x
