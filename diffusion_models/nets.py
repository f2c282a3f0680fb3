"""Network building blocks shared by the models (shape-agnostic: 8x8, 28x28, 32x32)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F


def down_sizes(h: int, w: int, min_size: int = 4) -> list[tuple[int, int]]:
    """Spatial sizes of a stride-2 (k3, p1) pyramid, from (h, w) down to <= min_size."""
    sizes = [(h, w)]
    while max(sizes[-1]) > min_size:
        sizes.append(half_size(sizes[-1]))
    return sizes


def half_size(size: tuple[int, int]) -> tuple[int, int]:
    """Output size of a stride-2, kernel-3, padding-1 conv."""
    return ((size[0] + 1) // 2, (size[1] + 1) // 2)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU())


BOTTLENECK = (4, 4)  # spatial size at the VAE's linear bottleneck, for every image size


class ConvEncoder(nn.Module):
    """[B,C,H,W] -> [B, out_features]: convs at full and half resolution, pooled to 4x4, linear.

    The same layers for every image size, so parameter counts do not depend on the dataset.
    """

    def __init__(self, shape: tuple[int, int, int], width: int, out_features: int):
        super().__init__()
        c = shape[0]
        self.body = nn.Sequential(ConvBlock(c, width), ConvBlock(width, width, stride=2), ConvBlock(width, width))
        self.head = nn.Linear(width * BOTTLENECK[0] * BOTTLENECK[1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if h.shape[-2:] != BOTTLENECK:
            h = F.adaptive_avg_pool2d(h, BOTTLENECK)
        return self.head(h.flatten(1))


class ConvDecoder(nn.Module):
    """[B, in_features] -> [B, out_channels, H, W]: linear to 4x4, then convs at half and full size."""

    def __init__(self, shape: tuple[int, int, int], width: int, in_features: int, out_channels: int):
        super().__init__()
        self.size = tuple(shape[1:])
        self.width = width
        self.stem = nn.Sequential(nn.Linear(in_features, width * BOTTLENECK[0] * BOTTLENECK[1]), nn.SiLU())
        self.at_half = ConvBlock(width, width)
        self.full = nn.Sequential(ConvBlock(width, width), ConvBlock(width, width))
        self.out = nn.Conv2d(width, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.stem(z).view(len(z), self.width, *BOTTLENECK)
        h = self.at_half(F.interpolate(h, size=half_size(self.size), mode="nearest"))
        h = self.full(F.interpolate(h, size=self.size, mode="nearest"))
        return self.out(h)


# ----------------------------------------------------------------------------- U-Net
# The one backbone every diffusion variant shares (Ho et al. 2020 style, no attention).


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(c, 8), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, 1, 1))
        self.emb = nn.Linear(emb_dim, cout)
        self.out_layers = nn.Sequential(_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class UNet(nn.Module):
    """eps/x0/score network f(x_t, t): [B,C,H,W], [B] -> [B,out_channels,H,W].

    One ResBlock per resolution on the way down and up, channel multipliers `mults`,
    stride-2 downsampling and nearest upsampling to the skip's exact size (so 28x28 works).
    """

    def __init__(self, shape: tuple[int, int, int], width: int = 32, mults: tuple[int, ...] = (1, 2),
                 out_channels: int | None = None, extra_in: int = 0):
        super().__init__()
        c = shape[0]
        self.c = c
        self.emb_dim = emb_dim = 2 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.width = width
        self.inp = nn.Conv2d(c + extra_in, width, 3, 1, 1)
        chans = [width * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = width
        for i, co in enumerate(chans):
            self.down.append(ResBlock(ch, co, emb_dim))
            ch = co
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, 2, 1))
        self.mid = ResBlock(ch, ch, emb_dim)
        self.up = nn.ModuleList()
        for co in reversed(chans):
            self.up.append(ResBlock(ch + co, co, emb_dim))
            ch = co
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels or c, 3, 1, 1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.out_channels = out_channels or c

    def forward(self, x: torch.Tensor, t: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,C,H,W], t [B]; `extra` [B,extra_in,H,W] are further input channels (e.g. Fourier)."""
        emb = self.time_mlp(timestep_embedding(t, self.width))
        h = self.inp(x if extra is None else torch.cat([x, extra], 1))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1), emb)
        return self.out(h)


def fourier_features(x: torch.Tensor, levels: int, octaves: tuple[int, ...]) -> torch.Tensor:
    """sin/cos(pi (L-1) 2^k x) for each k in `octaves`: [B,C,H,W] -> [B, 2*len(octaves)*C, H, W].

    With k = 0 the period is one bin of the L-level grid on [-1, 1], so the features expose a
    point's offset from its nearest bin centre: the fine detail a small network cannot
    otherwise resolve at low noise (Kingma et al. 2021, "Fourier features", appendix C).
    """
    freqs = torch.tensor([math.pi * (levels - 1) * 2.0**k for k in octaves], device=x.device)
    f = (x[:, None] * freqs.view(1, -1, 1, 1, 1)).flatten(1, 2)  # [B, K*C, H, W]
    return torch.cat([torch.sin(f), torch.cos(f)], 1)


# ----------------------------------------------------------------------------- diffusion network
# One place decides what every diffusion variant's network sees (matched inputs by construction).


@dataclass
class DenoiserConfig:
    """The shared diffusion network's settings; every diffusion model's Config extends this."""
    width: int = 16
    mults: list[int] = field(default_factory=lambda: [1, 2])
    fourier: list[int] = field(default_factory=lambda: [0])  # octaves of the bin-grid Fourier
                                  # features of z_t fed to the U-Net (VDM, appendix C)


class Denoiser(nn.Module):
    """The network of every diffusion variant: the U-Net on z_t, with the bin-grid Fourier
    features of z_t as extra input channels (as VDM: of z_t itself, not of z_t / alpha_t, whose
    features would oscillate ever faster in both z and the noise level as alpha_t -> 0 and make
    the probability-flow ODE's divergence rough at high noise), and a time input on [0, 1000].
    The variants differ only in what they read off its output (eps, x0, score; learned
    variances) and in how they map their time to [0, 1000]. `alpha` is the signal scale of z_t
    (kept in the interface for inputs that depend on it)."""

    def __init__(self, shape: tuple[int, int, int], levels: int, cfg: DenoiserConfig, out_channels: int | None = None):
        super().__init__()
        self.levels, self.octaves = levels, tuple(cfg.fourier)
        self.unet = UNet(shape, cfg.width, tuple(cfg.mults), out_channels=out_channels,
                         extra_in=2 * len(self.octaves) * shape[0])

    def forward(self, z: torch.Tensor, alpha: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """z [B,C,H,W]; alpha broadcastable to z (z = alpha x + sigma eps); time [B] in [0, 1000]."""
        extra = fourier_features(z, self.levels, self.octaves) if self.octaves else None
        return self.unet(z, time, extra)
