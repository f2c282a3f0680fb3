"""Variational Diffusion Model: continuous time, learned noise schedule, trained on the VLB.

z_t = alpha_t x + sigma_t eps, alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)),
snr(t) = exp(-gamma(t)). The bound on -log P(x) for integer x has three terms (nats):
prior KL(q(z_1|x) || N(0,I)), the T -> infinity diffusion loss
0.5 E_t[gamma'(t) ||eps - eps_hat(z_t, t)||^2], and the discrete decoder's -log p(x|z_0).

The learned schedule (sec. 5 of the paper): the diffusion loss's expectation depends on gamma
only through its endpoints, so the endpoints are trained on the VLB and the interior on the
variance of the loss's one-sample estimate. The gradient of E[L^2] is E[2 L dL/d eta], one
backward pass: the gradient reaching the schedule's shape s(t) is scaled by 2 L per example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import likelihood as lk
from ..nets import Denoiser, DenoiserConfig
from . import register
from .base import Estimator
from .family import Denoised, DiffusionFamily

SCHEDULE_INTERIOR = ("variance", "vlb", "fixed")
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t [N,C,H,W], gamma_t [N]) -> eps_hat


class NoiseSchedule(nn.Module):
    """Monotone gamma(t) on [0,1] (VDM's NoiseSchedule_NNet, positive weights via softplus),
    rescaled so that gamma(0) = gamma_min and gamma(1) = gamma_max (learnable endpoints)."""

    def __init__(self, hidden: int, gamma_min: float, gamma_max: float):
        super().__init__()
        self.gamma_min = nn.Parameter(torch.tensor(float(gamma_min)))
        self.gamma_max = nn.Parameter(torch.tensor(float(gamma_max)))
        self.w1 = nn.Parameter(torch.tensor(math.log(math.e - 1)))  # softplus(w1) = 1: linear part
        self.w2 = nn.Parameter(torch.randn(hidden))
        self.b2 = nn.Parameter(torch.zeros(hidden))
        self.w3 = nn.Parameter(torch.full((hidden,), -2.0))  # small non-linear part at init

    def _unscaled(self, t: torch.Tensor, derivative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The unrescaled schedule g(t) [N] and, if `derivative`, g'(t) [N] in closed form."""
        a1, a2, a3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        h = torch.tanh(a2 * (t[:, None] - 0.5) + self.b2)  # [N,H], increasing in t
        g = a1 * t + (h * a3).mean(1)
        return g, (a1 + ((1 - h * h) * a2 * a3).mean(1) if derivative else None)

    def shape_of(self, t: torch.Tensor, derivative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The schedule's shape s(t) = (g(t) - g(0)) / (g(1) - g(0)), increasing from 0 to 1, and
        s'(t) if `derivative`: [N] each. It depends only on the interior parameters (not on the
        endpoints), so gamma(t) = gamma_min + (gamma_max - gamma_min) s(t)."""
        g, dg = self._unscaled(torch.cat([t.reshape(-1), t.new_tensor([0.0, 1.0])]), derivative)
        span = g[-1] - g[-2]
        return (g[:-2] - g[-2]) / span, (dg[:-2] / span if derivative else None)

    def from_shape(self, s: torch.Tensor, ds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """gamma and gamma' from the shape s and s' (`shape_of`) and the endpoints."""
        span = self.gamma_max - self.gamma_min
        return self.gamma_min + span * s, (span * ds if ds is not None else None)

    def with_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma(t) [N] and gamma'(t) [N], both differentiable in the parameters: the derivative
        in closed form (no double backward through autograd.grad, so the training step traces
        for torch.compile; tests check it against autograd and finite differences)."""
        return self.from_shape(*self.shape_of(t, derivative=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.from_shape(self.shape_of(t, derivative=False)[0])[0]  # [N]; the samplers' path

    def interior(self) -> list[nn.Parameter]:
        """The parameters of the schedule's shape (all but the endpoints)."""
        return [self.w1, self.w2, self.b2, self.w3]


@register("vdm")
class VDM(DiffusionFamily):
    """Kingma, Salimans, Poole & Ho 2021, "Variational Diffusion Models" (continuous-time VLB);
    its estimators and samplers are the family's (family.py)."""

    discrete_time = False
    default_steps = 1000  # the samplers' steps on the uniform grid in t when none are given

    @dataclass
    class Config(DenoiserConfig):     # the network shared by every diffusion variant
        schedule_width: int = 32      # hidden units of the monotone gamma network
        # init of gamma(0) = log(sigma_0^2 / alpha_0^2); None: sigma_0/alpha_0 = 0.6 bin half-widths,
        # 2 log(0.6 / (L-1)) = -6.6 at L=17, -12.1 at L=256 (VDM: -13.3 with Fourier features)
        gamma_min: float | None = None
        gamma_max: float = 5.0        # init of gamma(1)
        # how the schedule's interior (its shape between the endpoints) learns. The continuous-time
        # VLB does not depend on it (Kingma et al. 2021, sec. 5: the network sees t only through
        # gamma), so the VLB's gradient on it has mean zero. 'variance': VDM's choice, the interior
        # minimises the variance of the diffusion term's one-sample estimate, E[L^2] (its mean is
        # fixed); 'vlb': the VLB's zero-mean gradient (a random walk); 'fixed': not trained.
        # The endpoints (gamma_min, gamma_max) always learn from the VLB.
        schedule_interior: str = "variance"

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        g0 = 2 * math.log(0.6 / (levels - 1)) if cfg.gamma_min is None else cfg.gamma_min
        self.gamma_range = (g0, cfg.gamma_max)  # initial endpoints: fixed scale of the time input
        if not g0 < cfg.gamma_max:
            raise ValueError(f"vdm: need gamma_min < gamma_max, got {g0}, {cfg.gamma_max}")
        if cfg.schedule_interior not in SCHEDULE_INTERIOR:
            raise ValueError(f"vdm: schedule_interior must be one of {', '.join(SCHEDULE_INTERIOR)}, "
                             f"got {cfg.schedule_interior!r}")
        self.gamma = NoiseSchedule(cfg.schedule_width, g0, cfg.gamma_max)
        if cfg.schedule_interior == "fixed":
            for p in self.gamma.interior():
                p.requires_grad_(False)
        self.net = Denoiser(self.shape, levels, cfg)
        self.register_buffer("centres", lk.to_unit(torch.arange(levels), levels))  # [L]

    # --------------------------------------------------------------- pieces of the bound
    def eps_hat(self, z: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The shared network's eps prediction at z = z_t, gamma = gamma(t) [N]; its time input is
        1000 * gamma rescaled by the *initial* endpoints."""
        lo, hi = self.gamma_range
        alpha = torch.sqrt(torch.sigmoid(-gamma)).view(-1, 1, 1, 1)
        return self.net(z, alpha, 1000.0 * (gamma - lo) / (hi - lo))  # [N,C,H,W]

    def _prior_term(self, x: torch.Tensor) -> torch.Tensor:
        """KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) summed over dims: [B]; x float [B,C,H,W]."""
        g1 = self.gamma.gamma_max
        zero = torch.zeros((), device=x.device)
        return lk.normal_kl(torch.sqrt(torch.sigmoid(-g1)) * x, F.logsigmoid(g1), zero, zero).flatten(1).sum(1)

    def _diffusion_term(self, x: torch.Tensor, t: torch.Tensor, eps_fn: EpsFn | None = None,
                        variance_grad: bool = False) -> torch.Tensor:
        """0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2: one t per example; x float [N,C,H,W], t [N] -> [N].
        `variance_grad`: the gradient that reaches the schedule's interior through this term is
        that of the mean of (term / D)^2 instead of the term's mean over D (module docstring)."""
        s, ds = self.gamma.shape_of(t, derivative=True)  # [N], [N]
        gamma, dgamma = self.gamma.from_shape(s, ds)
        g = gamma[:, None, None, None]
        eps = torch.randn_like(x)
        z = torch.sqrt(torch.sigmoid(-g)) * x + torch.sqrt(torch.sigmoid(g)) * eps  # z_t
        eps_pred = (eps_fn or self.eps_hat)(z, gamma)
        term = 0.5 * dgamma * (eps - eps_pred).pow(2).flatten(1).sum(1)
        if variance_grad and s.requires_grad:
            # d/d eta E[(L/D)^2] = E[2 (L/D) d(L/D)/d eta]: scale each example's gradient reaching
            # the shape by 2 L/D (detached); the loss is L/D per example (VDM, appendix on the
            # variance of the estimator); the endpoints and the network keep the VLB's gradient
            w = 2 * term.detach() / self.dims
            s.register_hook(lambda grad: grad * w)
            ds.register_hook(lambda grad: grad * w)
        return term

    def _decoder_logits(self, z0: torch.Tensor) -> torch.Tensor:
        """log p(x_i = k | z_0) for all L levels, normalized over k: [B,C,H,W,L]."""
        return torch.log_softmax(self._decoder_energy(z0), -1)

    def _decoder_energy(self, z0: torch.Tensor) -> torch.Tensor:
        """The decoder's unnormalised log-probabilities of the L levels: [B,C,H,W,L]."""
        g0 = self.gamma.gamma_min
        return -0.5 * (z0[..., None] / torch.sqrt(torch.sigmoid(-g0)) - self.centres) ** 2 * torch.exp(-g0)

    def _reconstruction_term(self, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z_0), z_0 ~ q(z_0|x) (one draw): [B]; x integer [B,C,H,W]."""
        g0 = self.gamma.gamma_min
        xu = lk.to_unit(x, self.levels)
        z0 = torch.sqrt(torch.sigmoid(-g0)) * xu + torch.sqrt(torch.sigmoid(g0)) * torch.randn_like(xu)
        logp = self._decoder_logits(z0).gather(-1, x.long()[..., None])[..., 0]
        return -logp.flatten(1).sum(1)

    # --------------------------------------------------------------- interface
    def loss(self, x):
        self._check_x(x)
        b = len(x)
        t = (torch.rand((), device=x.device) + torch.arange(b, device=x.device) / b) % 1.0  # antithetic
        xu = lk.to_unit(x, self.levels)
        vlb = (self._prior_term(xu) + self._reconstruction_term(x)
               + self._diffusion_term(xu, t, variance_grad=self.cfg.schedule_interior == "variance"))
        return vlb.mean() / self.dims

    def vlb_profile(self, x, t_samples: int, chunk: int):
        """The bound's terms and its profile over the K strata of t (log SNR = -gamma(t))."""
        if t_samples < 1:
            raise ValueError(f"vdm: the continuous-time VLB has no finite sum over steps (t_samples=0 means "
                             f"an exact sum over T terms); it needs a Monte Carlo t_samples >= 1, got {t_samples}")
        b, k = len(x), int(t_samples)
        xu = lk.to_unit(x, self.levels)
        # stratified times: t_jb = (j + u_jb) / K, independent u per example and stratum
        t = (torch.arange(k, device=x.device)[:, None] + torch.rand(k, b, device=x.device)) / k  # [K,B]
        per = max(1, chunk // b)  # strata per U-Net pass, so one pass holds <= chunk examples
        per_stratum = torch.cat([self._diffusion_term(xu.repeat(min(per, k - s), 1, 1, 1), t[s:s + per].reshape(-1))
                                 for s in range(0, k, per)]).view(k, b) / k  # [K,B] nats
        terms = {"prior": self._prior_term(xu), "diffusion": per_stratum.sum(0),
                 "reconstruction": self._reconstruction_term(x)}
        edges = torch.linspace(0.0, 1.0, k + 1, device=x.device)
        logsnr = (-self.gamma(edges)).double()
        profile = {"t_lo": edges[:-1].tolist(), "t_hi": edges[1:].tolist(), "logsnr_hi": logsnr[:-1].tolist(),
                   "logsnr_lo": logsnr[1:].tolist(), "nats": per_stratum}
        return terms, profile

    def vlb_estimator(self, ecfg):
        return Estimator("vlb", f"VLB-continuous ({ecfg.t_samples} t/example)",
                         {"t_samples": ecfg.t_samples, "chunk": ecfg.chunk})

    # the probability-flow ODE's view of the model (ode.ODEView): log SNR = -gamma(t)
    def ode_logsnr_span(self) -> tuple[float, float]:
        """log SNR at t = 0 (the data end, where the decoder takes over) and at t = 1."""
        g = self.gamma(torch.tensor([0.0, 1.0], device=self.device))
        return -g[0].item(), -g[1].item()


    # the solvers' view of the model (samplers.SolverView), in continuous time
    def solver_times(self, steps: int, spacing: str) -> torch.Tensor:
        """Uniform grid 1, 1 - 1/steps, ..., 0 (t = 0: gamma_min, where the decoder takes over)."""
        if spacing != "trailing":
            raise ValueError(f"vdm: timestep spacing '{spacing}' is a discrete-time spacing; vdm uses a "
                             "uniform grid in t from t = 1 ('trailing')")
        return torch.linspace(1.0, 0.0, steps + 1, device=self.device)

    def alpha_sigma(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gamma(times).double()
        return torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()

    def denoise(self, z: torch.Tensor, t: torch.Tensor | None = None, logsnr: torch.Tensor | None = None) -> Denoised:
        """The family's denoiser (`DiffusionFamily.denoise`): (x0_hat, eps_hat) at time t (0-dim:
        gamma evaluated once, or [B]) or at log SNR = -gamma `logsnr` (0-dim). One network evaluation."""
        g = (self.gamma(t.reshape(-1)) if logsnr is None else -logsnr.to(z.dtype)).expand(len(z))
        eps = self.eps_hat(z, g)
        g = g.view(-1, 1, 1, 1)
        return Denoised((z - torch.sqrt(torch.sigmoid(g)) * eps) / torch.sqrt(torch.sigmoid(-g)), eps)

    def to_images(self, z0: torch.Tensor, generator) -> torch.Tensor:
        """The state at t = 0 (gamma_min) through the discrete decoder p(x|z_0): a draw."""
        return lk.sample_categorical(self._decoder_energy(z0), generator)

    def ancestral(self, z: torch.Tensor, steps: int, spacing: str, generator) -> torch.Tensor:
        """p(z_s|z_t) = q(z_s|z_t, x=x_hat) on the uniform grid of `steps` (`solver_times`),
        from z = z_1: the state at t = 0."""
        grid = self.gamma(self.solver_times(steps, spacing))  # gamma at t_i = 1 - i/steps
        for i in range(steps):
            g_t, g_s = grid[i], grid[i + 1]
            eps = self.eps_hat(z, g_t.expand(len(z)))
            c = -torch.expm1(g_s - g_t)  # 1 - snr(t)/snr(s)
            mean = torch.sqrt(torch.sigmoid(-g_s) / torch.sigmoid(-g_t)) * (z - c * torch.sqrt(torch.sigmoid(g_t)) * eps)
            noise = torch.randn(z.shape, generator=generator, device=z.device)
            z = mean + torch.sqrt(torch.sigmoid(g_s) * c) * noise  # z_s
        return z
