"""Variational auto-encoder with a discretized logistic decoder over the L pixel levels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import likelihood as lk
from ..nets import ConvDecoder, ConvEncoder
from . import register
from .base import Model

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(log_var)) summed over the last axis."""
    return -0.5 * (LOG_2PI + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


@register("vae")
class VAE(Model):
    """Kingma & Welling 2014 (ELBO); bound tightened with IWAE-K (Burda et al. 2016)."""

    family = "vae"

    @dataclass
    class Config:
        latent_dim: int = 16
        width: int = 36  # ~88k parameters: matched to the shared U-Net (~86k)
        min_log_scale: float = -7.0  # floor of the decoder's logistic log-scale

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        c = shape[0]
        self.encoder = ConvEncoder(self.shape, cfg.width, 2 * cfg.latent_dim)
        self.decoder = ConvDecoder(self.shape, cfg.width, cfg.latent_dim, 2 * c)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.encoder(lk.to_unit(x, self.levels)).chunk(2, dim=1)
        return mu, log_var.clamp(-12.0, 8.0)  # [B,Z], [B,Z]

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.decoder(z).chunk(2, dim=1)
        return mean, log_scale.clamp(min=self.cfg.min_log_scale)  # [B,C,H,W] each

    def log_px(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) in nats, [B]."""
        mean, log_scale = self.decode(z)
        return lk.discretized_logistic_log_prob(x, mean, log_scale, self.levels).flatten(1).sum(1)

    def _elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, log_var = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        kl = 0.5 * (mu**2 + torch.exp(log_var) - 1.0 - log_var).sum(1)  # analytic KL(q||N(0,I))
        return {"reconstruction": -self.log_px(x, z), "kl": kl}

    def loss(self, x):
        self._check_x(x)
        terms = self._elbo_terms(x)
        return (terms["reconstruction"] + terms["kl"]).mean() / self.dims

    def _iwae(self, x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
        """-log (1/K sum_k p(x,z_k)/q(z_k|x)), z_k ~ q(z|x): batched, chunked over samples."""
        b = len(x)
        mu, log_var = self.encode(x)
        per = max(1, chunk // b)  # samples per pass, so one pass holds <= chunk examples
        log_w = []
        for start in range(0, k, per):
            kk = min(per, k - start)
            mu_r, lv_r = mu.repeat(kk, 1), log_var.repeat(kk, 1)  # [kk*B, Z]
            z = mu_r + torch.randn_like(mu_r) * torch.exp(0.5 * lv_r)
            lw = (self.log_px(x.repeat(kk, 1, 1, 1), z)
                  + _gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
                  - _gaussian_log_prob(z, mu_r, lv_r))
            log_w.append(lw.view(kk, b))
        log_w = torch.cat(log_w)  # [K, B]
        return -(torch.logsumexp(log_w, 0) - math.log(k))

    @torch.no_grad()
    def nll_terms(self, x, k: int = 1, chunk: int = 4096, **estimator: Any):
        self._reject(estimator, "vae")
        self._check_x(x)
        if k < 1:
            raise ValueError(f"vae: IWAE k must be >= 1, got {k}")
        if k == 1:
            return self._elbo_terms(x)
        return {"iwae": self._iwae(x, k, chunk)}

    def estimators(self, ecfg):
        out = [("ELBO", {"k": 1})]
        if ecfg.iwae_k > 1:
            out.append((f"IWAE-{ecfg.iwae_k}", {"k": ecfg.iwae_k, "chunk": ecfg.chunk}))
        return out

    @torch.no_grad()
    def sample(self, n, generator=None, **sampler: Any):
        self._reject(sampler, "vae")
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=self.device)
        mean, log_scale = self.decode(z)
        return lk.sample_discretized_logistic(mean, log_scale, self.levels, generator)
