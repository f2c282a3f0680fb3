"""Shared bounds of latent-variable models (VAE, HVAE): ELBO terms and the IWAE-K bound."""
from __future__ import annotations

from typing import Any

import torch

from .. import likelihood as lk
from .base import Estimator, Model


class LatentVariableModel(Model):
    """Subclasses provide `elbo_terms(x)`, `posterior(x)` (computed once per batch) and
    `log_weights(x, post, kk)`: log p(x, z) - log q(z | x) for kk fresh z per example."""

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def posterior(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def decoder_log_prob(self, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        """log p(x|z) in nats, [B]: the discretized logistic decoder shared by VAE and HVAE."""
        return lk.discretized_logistic_log_prob(x, mean, log_scale, self.levels).flatten(1).sum(1)

    def log_weights(self, x: torch.Tensor, post: Any, kk: int) -> torch.Tensor:
        """[kk*B] log importance weights, sample-major (rows j*B .. j*B+B-1 are sample j)."""
        raise NotImplementedError

    def iwae(self, x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
        """-log (1/K sum_k p(x,z_k)/q(z_k|x)), z_k ~ q(z|x) (Burda et al. 2016): batched over
        examples and samples, chunked so that one network pass holds <= `chunk` rows."""
        b = len(x)
        post = self.posterior(x)
        per = max(1, chunk // b)
        log_w = [self.log_weights(x, post, min(per, k - start)).view(-1, b) for start in range(0, k, per)]
        return lk.k_sample_bound(torch.cat(log_w))  # [B]

    @torch.no_grad()
    def nll_terms(self, x, k: int = 1, chunk: int = 2048, **estimator: Any):
        """k = 1: the ELBO's named terms; k > 1: {"iwae": IWAE-k bound}."""
        self._reject(estimator, self.name)
        self._check_x(x)
        if k < 1:
            raise ValueError(f"{self.name}: IWAE k must be >= 1, got {k}")
        return self.elbo_terms(x) if k == 1 else {"iwae": self.iwae(x, k, chunk)}

    def estimators(self, ecfg):
        out = [Estimator("elbo", "ELBO", {"k": 1})]
        if ecfg.iwae_k > 1:
            out.append(Estimator("iwae", f"IWAE-{ecfg.iwae_k}", {"k": ecfg.iwae_k, "chunk": ecfg.chunk}))
        return out

    def headline_estimator(self, ecfg):
        """IWAE at evaluate.iwae_k (the ELBO where K = 1): the tighter bound the protocol names."""
        return self.estimators(ecfg)[-1]
