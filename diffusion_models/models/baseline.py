"""Independent per-pixel categorical: the "no structure" reference row of every table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import register
from .base import Estimator, Model


@register("baseline")
class PixelCategorical(Model):
    """p(x) = prod_d Cat(x_d; pi_d), fitted in closed form (smoothed counts) on the train split."""

    family = "baseline"
    trains = False             # fitted in closed form (`init_from_data`)
    precision_applies = False  # no network

    @dataclass
    class Config:
        alpha: float = 1.0  # additive (Laplace) smoothing of the per-pixel counts

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        if cfg.alpha <= 0:
            raise ValueError(f"baseline: alpha must be > 0 (a zero count would give an infinite NLL), got {cfg.alpha}")
        # uniform until fitted: log-probabilities [D, L]
        self.register_buffer("log_probs", torch.full((self.dims, levels), -torch.log(torch.tensor(float(levels)))))

    def num_params(self) -> int:
        return self.dims * (self.levels - 1)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        self._check_x(x)
        flat = x.reshape(len(x), -1).long()  # [N, D]
        cells = (flat + torch.arange(self.dims, device=x.device) * self.levels).flatten()  # pixel d, level k: d L + k
        counts = torch.bincount(cells, minlength=self.dims * self.levels).view(self.dims, self.levels)
        counts = counts.double() + self.cfg.alpha  # (a one-hot [N, D, L] would be 96 GB at Fashion-MNIST's size)
        self.log_probs.copy_((counts / counts.sum(-1, keepdim=True)).log().float())

    def _nll(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        flat = x.reshape(len(x), -1).long()  # [B, D]
        return -self.log_probs.gather(1, flat.T).T.sum(1)  # [B]

    def loss(self, x):
        return self._nll(x).mean() / self.dims

    def nll_terms(self, x, **estimator):
        self._reject(estimator, "baseline")
        return {"nll": self._nll(x)}

    def estimators(self, ecfg):
        return [Estimator("exact", "exact")]

    def headline_estimator(self, ecfg):
        return self.estimators(ecfg)[0]

    @torch.no_grad()
    def sampler_label(self, sampler="ancestral", steps=None, **options: Any) -> str:
        return "independent pixels"

    nfe_module_name = None  # no network

    def nfe(self, sampler="ancestral", steps=None, **options: Any) -> int:
        return 0  # no network: one categorical draw per pixel

    def sample(self, n, generator=None, sampler="ancestral", steps=None, **options: Any):
        self.check_sampler(sampler, steps, options)
        probs = self.log_probs.exp()  # [D, L]
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)  # [D, n]
        return idx.T.reshape(n, *self.shape)
