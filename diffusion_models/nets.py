"""Network building blocks shared by the models (shape-agnostic: 8x8, 28x28, 32x32)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def down_sizes(h: int, w: int, min_size: int = 4) -> list[tuple[int, int]]:
    """Spatial sizes of a stride-2 (k3, p1) pyramid, from (h, w) down to <= min_size."""
    sizes = [(h, w)]
    while max(sizes[-1]) > min_size:
        a, b = sizes[-1]
        sizes.append(((a + 1) // 2, (b + 1) // 2))
    return sizes


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1), nn.SiLU())


class ConvEncoder(nn.Module):
    """[B,C,H,W] -> [B, out_features]: conv pyramid down to <= 4x4, then a linear head."""

    def __init__(self, shape: tuple[int, int, int], width: int, out_features: int):
        super().__init__()
        c, h, w = shape
        self.sizes = down_sizes(h, w)
        layers: list[nn.Module] = [ConvBlock(c, width)]
        for _ in self.sizes[1:]:
            layers += [ConvBlock(width, width, stride=2), ConvBlock(width, width)]
        self.body = nn.Sequential(*layers)
        hb, wb = self.sizes[-1]
        self.head = nn.Linear(width * hb * wb, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class ConvDecoder(nn.Module):
    """[B, in_features] -> [B, out_channels, H, W]: linear stem at <= 4x4, then upsampling convs."""

    def __init__(self, shape: tuple[int, int, int], width: int, in_features: int, out_channels: int):
        super().__init__()
        _, h, w = shape
        self.sizes = down_sizes(h, w)[::-1]  # small -> full
        self.width = width
        hb, wb = self.sizes[0]
        self.stem = nn.Sequential(nn.Linear(in_features, width * hb * wb), nn.SiLU())
        self.ups = nn.ModuleList(
            nn.Sequential(ConvBlock(width, width), ConvBlock(width, width)) for _ in self.sizes[1:]
        )
        self.refine = ConvBlock(width, width)
        self.out = nn.Conv2d(width, out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hb, wb = self.sizes[0]
        h = self.stem(z).view(len(z), self.width, hb, wb)
        for size, up in zip(self.sizes[1:], self.ups):
            h = up(F.interpolate(h, size=size, mode="nearest"))
        return self.out(self.refine(h))
