"""What every diffusion model shares, written once: its estimators (the VLB on the whole test
split, the probability-flow ODE bound on a subset), the bound's terms and profile over t, and
its samplers (ancestral, DDIM, DPM-Solver++, the ODE) with their labels and NFE.

A member (discrete-time `diffusion.GaussianDiffusion`, continuous-time `vdm.VDM`, or a model
of your own) supplies its process:

- `vlb_profile(x, t_samples, chunk, **options)`: the VLB's terms and profile (`Model.nll_terms_profile`),
  `vlb_estimator(ecfg)`: the VLB as an `Estimator`, `vlb_options`: the kwargs beyond t_samples/chunk;
- `default_steps`, `max_steps` (None: unbounded), `discrete_time`;
- `ancestral(x, steps, spacing, generator)`: its reverse process from noise x in `steps` steps;
- `to_images(z, generator)`: the data-end state of the samplers -> integer images, and
  `ode_images` for the ODE's (the same unless the ODE stops elsewhere);
- `denoise(x, t=None, logsnr=None)`: its one denoiser, (x0_hat, eps_hat, v) at time t or at a
  log SNR, one network evaluation: what the DDIM and DPM-Solver++ samplers (with `solver_times`,
  `alpha_sigma`: samplers.SolverView) and the ODE (`ode_eps`, with `ode_logsnr_span`:
  ode.ODEView) read (the discrete member's VLB and ancestral steps too).
"""
from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch

from .. import ode
from .. import samplers as smp
from .base import ADAPTIVE, STEPS, Estimator, Model


class Denoised(NamedTuple):
    """What the denoiser gives at one noise level, [B,C,H,W] each."""
    x0: torch.Tensor               # the data estimate (clipped to [-1, 1] where the member clips)
    eps: torch.Tensor              # the noise estimate consistent with x0: (x - alpha x0) / sigma
    v: torch.Tensor | None = None  # learned-variance channels (IDDPM), else None


class DiffusionFamily(ode.ProbabilityFlow, Model):
    family = "diffusion"
    samplers = {"ancestral": STEPS, **{s: STEPS for s in smp.SOLVERS}, "ode": ADAPTIVE}
    nfe_module_name = "net"  # one U-Net call is one network evaluation
    vlb_options: ClassVar[tuple[str, ...]] = ()
    discrete_time: ClassVar[bool] = True

    # -------------------------------------------------------------- the member's process
    @property
    def default_steps(self) -> int:
        raise NotImplementedError

    @property
    def max_steps(self) -> int | None:
        return None

    def vlb_profile(self, x: torch.Tensor, t_samples: int, chunk: int, **options: Any):
        raise NotImplementedError

    def vlb_estimator(self, ecfg) -> Estimator:
        raise NotImplementedError

    def ancestral(self, x: torch.Tensor, steps: int, spacing: str, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, t: torch.Tensor | None = None, logsnr: torch.Tensor | None = None) -> Denoised:
        """The denoiser at the member's time t (0-dim or [B]) or at log SNR `logsnr` (0-dim)."""
        raise NotImplementedError

    def ode_eps(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """ode.ODEView: the denoiser's eps at log SNR lam (0-dim), one network evaluation: the
        ODE is the flow of the same model that DDIM, DPM-Solver++ and the VLB use (where the
        member clips x0, eps is re-derived from the clipped x0: the clamp keeps the field
        Lipschitz, so the change of variables holds)."""
        return self.denoise(x, logsnr=lam).eps

    def to_images(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def ode_images(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.to_images(z, generator)

    # -------------------------------------------------------------- bounds
    @torch.no_grad()
    def nll_terms_profile(self, x, t_samples: int = 50, chunk: int = 2048, ode: dict[str, Any] | None = None,
                          **options: Any):
        """The VLB's terms and its profile over strata of t; with `ode` (`ode_estimator`), the ODE bound."""
        self._reject({k: v for k, v in options.items() if k not in self.vlb_options}, self.label_name)
        self._check_x(x)
        if ode is not None:
            return self.ode_terms(x, **ode)
        return self.vlb_profile(x, t_samples, chunk, **options)

    def nll_terms(self, x, **estimator: Any):
        return self.nll_terms_profile(x, **estimator)[0]

    def estimators(self, ecfg):
        return [self.vlb_estimator(ecfg)] + ([self.ode_estimator(ecfg.ode)] if ecfg.ode.enabled else [])

    def headline_estimator(self, ecfg):
        """The VLB on the whole test split (the ODE bound is the other view, on a subset)."""
        return self.vlb_estimator(ecfg)

    # -------------------------------------------------------------- sampling
    @property
    def label_name(self) -> str:
        return self.name or type(self).__name__

    def sampler_label(self, sampler="ancestral", steps=None, eta=0.0, spacing="trailing", rtol=None, atol=None,
                      **options: Any) -> str:
        if sampler == "ode":
            return self.ode_sampler_label(rtol, atol)
        n = self.nfe(sampler, steps)
        every_t = self.discrete_time and sampler == "ancestral" and n == self.default_steps  # no spacing to name
        return smp.label(sampler, n, eta, None if every_t else spacing)

    def nfe(self, sampler="ancestral", steps=None, **options: Any) -> int | None:
        if sampler == "ode":
            return None  # adaptive: counted, not declared
        return self.default_steps if steps is None else int(steps)

    def sample_steps(self, steps: int | None) -> int:
        """`steps` checked against the process (None: its default)."""
        steps = self.default_steps if steps is None else int(steps)
        hi = self.max_steps
        if steps < 1 or (hi is not None and steps > hi):
            bound = f"in 1..{hi}" if hi is not None else ">= 1"
            raise ValueError(f"{self.label_name}: steps must be {bound}, got {steps}")
        return steps

    @torch.no_grad()
    def sample(self, n, generator=None, sampler="ancestral", steps=None, eta=0.0, spacing="trailing",
               rtol=None, atol=None, **options: Any):
        """ancestral: the member's reverse process in `steps` steps (`ancestral`); ddim / dpm++2m:
        `steps` network evaluations on the `spacing` grid (samplers.py); ode: the
        probability-flow ODE solved adaptively to rtol/atol (ode.py). The data-end state is
        turned into integer images by `to_images` (`ode_images`)."""
        self.check_sampler(sampler, steps, options)
        self.check_ode_options(sampler, steps, eta, rtol, atol)
        if sampler == "ode":
            return self.ode_images(self.ode_sample(n, generator, rtol, atol), generator)
        steps = self.sample_steps(steps)
        if sampler == "ancestral" and eta != 0:
            raise ValueError(f"{self.label_name}: ancestral sampling takes no eta (its noise is the reverse "
                             "process's variance); eta is ddim's")
        x = torch.randn(n, *self.shape, generator=generator, device=self.device)
        if sampler == "ancestral":
            x = self.ancestral(x, steps, spacing, generator)
        else:
            x = smp.solve(self, x, sampler, steps, eta=eta, spacing=spacing, generator=generator)
        return self.to_images(x, generator)
