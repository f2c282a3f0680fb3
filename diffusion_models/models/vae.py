"""Variational auto-encoder with a discretized logistic decoder over the L pixel levels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import likelihood as lk
from ..nets import ConvDecoder, ConvEncoder
from . import register
from .latent import LatentVariableModel


@register("vae")
class VAE(LatentVariableModel):
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
        return self.decoder_log_prob(x, *self.decode(z))

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, log_var = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        zero = torch.zeros((), device=mu.device)
        kl = lk.normal_kl(mu, log_var, zero, zero).sum(1)  # analytic KL(q || N(0, I))
        return {"reconstruction": -self.log_px(x, z), "kl": kl}

    def loss(self, x):
        self._check_x(x)
        terms = self.elbo_terms(x)
        return (terms["reconstruction"] + terms["kl"]).mean() / self.dims

    def posterior(self, x):
        return self.encode(x)

    def log_weights(self, x, post, kk):
        mu, log_var = (p.repeat(kk, 1) for p in post)  # [kk*B, Z]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        zero = torch.zeros((), device=z.device)
        return (self.log_px(x.repeat(kk, 1, 1, 1), z)
                + (lk.normal_log_prob(z, zero, zero) - lk.normal_log_prob(z, mu, log_var)).sum(1))

    nfe_module_name = "decoder"

    @torch.no_grad()
    def nfe(self, sampler="ancestral", steps=None, **options: Any) -> int:
        return 1  # one decoder pass

    def sample(self, n, generator=None, sampler="ancestral", steps=None, **options: Any):
        self.check_sampler(sampler, steps, options)
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=self.device)
        mean, log_scale = self.decode(z)
        return lk.sample_discretized_logistic(mean, log_scale, self.levels, generator)
