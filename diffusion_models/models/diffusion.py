"""Discrete-time Gaussian diffusion: DDPM with eps / x0 / score targets, and IDDPM.

Notation (Ho et al. 2020): t in {1..T}, alpha_bar_t = prod_{s<=t} (1 - beta_s),
x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps. Arrays indexed by t hold a dummy
entry at index 0 (alpha_bar_0 = 1). Data x_0 are the bin centres of the integer pixels in
[-1, 1]; the bound is on the discrete P(x) via a discretized Gaussian decoder L_0:

    -log P(x) <= L_T + sum_{t=2}^T L_{t-1} + L_0       ("prior", "diffusion", "reconstruction")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import likelihood as lk
from .. import samplers as smp
from ..nets import Denoiser, DenoiserConfig
from . import register
from .base import Estimator
from .family import Denoised, DiffusionFamily


def make_betas(schedule: str, T: int) -> torch.Tensor:
    """beta_1..beta_T (float64) for the 'linear' (Ho et al.) or 'cosine' (Nichol & Dhariwal) schedule."""
    if schedule == "linear":
        scale = 1000.0 / T  # keeps the schedule's total noise when T != 1000
        if scale * 0.02 >= 1:
            raise ValueError(f"linear schedule needs T > 20 (beta_T = {scale * 0.02:g} >= 1 at T={T})")
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule '{schedule}'; use 'linear' or 'cosine'")


T_SPACINGS = ("log", "uniform")


def t_strata(T: int, k: int, spacing: str = "log") -> torch.Tensor:
    """Integer edges 2 = e_0 < ... < e_K = T + 1 of K strata of the times {2..T} whose terms
    L_{t-1} the discrete VLB sums (k = 0 or k >= T - 1: every t its own stratum, the exact sum).
    'uniform': equal widths; 'log': geometric widths, so the lowest times (where most of the
    bound sits) are strata of width 1, summed exactly, and the wide strata are at high noise."""
    if spacing not in T_SPACINGS:
        raise ValueError(f"unknown t spacing '{spacing}'; available: {', '.join(T_SPACINGS)}")
    lo, hi = 2, T + 1
    if k == 0 or k >= hi - lo:
        return torch.arange(lo, hi + 1)
    if spacing == "uniform":
        return torch.linspace(lo, hi, k + 1, dtype=torch.float64).floor().long()
    edges = [lo]
    for i in range(1, k + 1):  # nearest geometric point, at least 1 wide, leaving room for the rest
        target = round(lo * (hi / lo) ** (i / k))
        edges.append(min(max(edges[-1] + 1, target), hi - (k - i)))
    return torch.tensor(edges)


class GaussianDiffusion(DiffusionFamily):
    """Shared machinery of the discrete-time process; subclasses pick the network target and
    the training loss (the estimators and samplers are the family's: family.py)."""

    target: ClassVar[str] = "eps"  # what the network predicts: eps | x0 | score
    vlb_options = ("spacing",)

    @dataclass
    class Config(DenoiserConfig):
        T: int = 1000
        schedule: str = "linear"
        variance: str = "small"       # fixed reverse variance: 'small' = beta~_t, 'large' = beta_t
        learn_sigma: bool = False     # IDDPM: interpolate log-variance between beta_t and beta~_t
        hybrid_lambda: float = 0.0    # weight of L_vlb in the loss (IDDPM: 0.001)
        clip_x0: bool = True          # clip the predicted x_0 to the data range [-1, 1]

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        if cfg.variance not in ("small", "large"):
            raise ValueError(f"{type(self).__name__}: variance must be 'small' or 'large', got '{cfg.variance}'")
        if cfg.T < 2:
            raise ValueError(f"{type(self).__name__}: T must be >= 2, got {cfg.T}")
        c = shape[0]
        self.net = Denoiser(self.shape, levels, cfg, out_channels=2 * c if cfg.learn_sigma else c)
        betas = make_betas(cfg.schedule, cfg.T)
        alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])  # [T+1]
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # [T+1], index = t
        post_var = torch.zeros_like(betas)
        post_var[1:] = betas[1:] * (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:])  # beta~_t (0 at t=1)
        log_post_var = torch.log(torch.cat([post_var[2:3], post_var[2:3], post_var[2:]]))  # t=1 clipped
        log_beta = torch.log(torch.cat([betas[1:2], betas[1:]]))  # 'fixed large': sigma_t^2 = beta_t
        buffers = {
            "alpha_bar": alpha_bar,
            "post_coef_x0": torch.sqrt(torch.cat([alpha_bar[:1], alpha_bar[:-1]])) * betas / (1 - alpha_bar).clamp(min=1e-20),
            "post_coef_xt": torch.sqrt(1 - betas) * (1 - torch.cat([alpha_bar[:1], alpha_bar[:-1]])) / (1 - alpha_bar).clamp(min=1e-20),
            "log_post_var": log_post_var,
            "log_beta": log_beta,
        }
        for k, v in buffers.items():  # schedules are derived, not learned: not saved
            self.register_buffer(k, v.float(), persistent=False)

    # -------------------------------------------------------------- parameterisations

    def _bcast(self, arr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return arr[t].view(-1, 1, 1, 1)

    def output(self, x_t: torch.Tensor, ab: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction of its target (eps | x0 | score), and IDDPM's variance channels,
        at alpha_bar = ab [B,1,1,1] and (possibly fractional) time t [B]: the U-Net (time input
        scaled to 0..1000) through `precondition`. What the training loss matches."""
        return self.precondition(self.net(x_t, ab.sqrt(), t * (1000.0 / self.cfg.T)), x_t, ab)

    def precondition(self, out: torch.Tensor, x_t: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """Raw network output -> prediction in the target's units (eps: the identity)."""
        return out

    def denoised(self, out: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> Denoised:
        """`output` at alpha_bar `ab` -> (x0_hat, eps_hat, v): x0 by Luo (2022), x0 = (x_t -
        sqrt(1-ab) eps) / sqrt(ab) = (x_t + (1-ab) score) / sqrt(ab), clipped to [-1, 1] if
        `clip_x0` (the one place the clipping happens); eps re-derived from that x0."""
        c = self.shape[0]
        pred = out[:, :c]
        if self.target == "x0":
            x0 = pred
        elif self.target == "eps":
            x0 = (x - (1 - ab).sqrt() * pred) / ab.sqrt()
        else:  # score
            x0 = (x + (1 - ab) * pred) / ab.sqrt()
        x0 = x0.clamp(-1.0, 1.0) if self.cfg.clip_x0 else x0
        return Denoised(x0, (x - ab.sqrt() * x0) / (1 - ab).sqrt(), out[:, c:] if self.cfg.learn_sigma else None)

    def denoise(self, x: torch.Tensor, t: torch.Tensor | None = None, logsnr: torch.Tensor | None = None) -> Denoised:
        """The family's denoiser (`DiffusionFamily.denoise`): at integer times t (0-dim or [B]), or
        at log SNR `logsnr` (0-dim) on the continuous-time schedule of `logsnr()` (the network
        called at the fractional time of that log SNR). One network evaluation."""
        if logsnr is None:
            t = t.expand(len(x))
            ab, t = self._bcast(self.alpha_bar, t), t.float()
        else:
            t = self.time_of_logsnr(logsnr).to(x.dtype).expand(len(x))
            ab = torch.sigmoid(logsnr.to(x.dtype)).view(1, 1, 1, 1).expand(len(x), 1, 1, 1)
        return self.denoised(self.output(x, ab, t), x, ab)

    def _logvar(self, v: torch.Tensor | None, log_beta: torch.Tensor, log_post_var: torch.Tensor,
                x_t: torch.Tensor) -> torch.Tensor:
        """log-variance of the reverse step: fixed beta~ ('small') or beta ('large'), or learned:
        v in [-1, 1] interpolates their logs (Nichol & Dhariwal eq. 15)."""
        if self.cfg.learn_sigma:
            frac = (v + 1) / 2
            return frac * log_beta + (1 - frac) * log_post_var
        return (log_post_var if self.cfg.variance == "small" else log_beta).expand_as(x_t)

    def mean_logvar(self, d: Denoised, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(x_{t-1} | x_t) from the denoiser's output `d` at integer times t."""
        logvar = self._logvar(d.v, self._bcast(self.log_beta, t), self._bcast(self.log_post_var, t), x_t)
        return self.posterior_mean(d.x0, x_t, t), logvar

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self._bcast(self.post_coef_x0, t) * x0 + self._bcast(self.post_coef_xt, t) * x_t

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self._bcast(self.alpha_bar, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    # -------------------------------------------------------------- bound

    def step_term(self, x0, x_t, t, mean, logvar, x_int=None) -> torch.Tensor:
        """L_{t-1} per example [B] given x_t and the model's p(x_{t-1}|x_t): KL for t >= 2,
        -log p(x_0|x_1) at t = 1. x_int given: discretized Gaussian decoder over the L levels
        (a bound on the discrete P(x)); None: continuous density (for the analytic tests)."""
        kl = lk.normal_kl(self.posterior_mean(x0, x_t, t), self._bcast(self.log_post_var, t), mean, logvar)
        if x_int is not None:
            nll0 = -lk.discretized_gaussian_log_prob(x_int, mean, 0.5 * logvar, self.levels)
        else:
            nll0 = -lk.normal_log_prob(x0, mean, logvar)
        return torch.where(t == 1, nll0.flatten(1).sum(1), kl.flatten(1).sum(1))

    def vlb_term(self, x0: torch.Tensor, t: torch.Tensor, x_int: torch.Tensor | None = None) -> torch.Tensor:
        """One-sample estimate (over x_t ~ q(x_t|x_0)) of L_{t-1} per example [B]."""
        x_t = self.q_sample(x0, t, torch.randn_like(x0))
        return self.step_term(x0, x_t, t, *self.mean_logvar(self.denoise(x_t, t), x_t, t), x_int)

    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[-1]
        zero = torch.zeros((), device=x0.device)
        return lk.normal_kl(ab.sqrt() * x0, torch.log(1 - ab), zero, zero).flatten(1).sum(1)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """log SNR = log(alpha_bar / (1 - alpha_bar)) at (possibly fractional) times t in [1, T]:
        the continuous-time schedule of this discrete process, linear in t between integer times."""
        lam = self._logsnr_table()
        t = t.double().clamp(1, self.cfg.T)
        lo = t.floor().long().clamp(max=self.cfg.T - 1)
        w = t - lo
        return (1 - w) * lam[lo - 1] + w * lam[lo]

    def _logsnr_table(self) -> torch.Tensor:
        ab = self.alpha_bar.double()[1:]
        return torch.log(ab) - torch.log1p(-ab)  # [T], at t = 1..T, decreasing

    def time_of_logsnr(self, lam: torch.Tensor) -> torch.Tensor:
        """The inverse of `logsnr`: the (fractional) time in [1, T] of log SNR lam (float64)."""
        table = -self._logsnr_table()  # increasing in t
        v = -lam.double().clamp(-table[-1], -table[0])
        hi = torch.searchsorted(table, v.reshape(-1)).clamp(1, self.cfg.T - 1).view(v.shape)
        lo = hi - 1
        return lo + 1 + (v - table[lo]) / (table[hi] - table[lo])

    # the probability-flow ODE's view (ode.ODEView: `ode_eps` is the family's `denoise` at a log
    # SNR), on the continuous-time schedule of `logsnr`: the network is called at fractional times
    def ode_logsnr_span(self) -> tuple[float, float]:
        """log SNR at t = 1 (the lowest noise trained on: the data end) and at t = T."""
        lam = self._logsnr_table()
        return lam[0].item(), lam[-1].item()

    def _vlb_terms(self, x0: torch.Tensor, x_int: torch.Tensor | None, t_samples: int, chunk: int,
                   spacing: str = "log") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The bound's terms [B] and its profile over strata of t (`profile_of`)."""
        b = len(x0)
        edges = t_strata(self.cfg.T, t_samples, spacing).to(x0.device)  # [K+1] over {2..T}
        sizes = edges[1:] - edges[:-1]  # [K]; weight of a stratum's one uniform draw (unbiased)
        u = torch.rand(len(sizes), b, device=x0.device)
        ts = (edges[:-1, None] + (u * sizes[:, None]).long()).flatten()  # [K*B]
        values = []
        for start in range(0, len(ts), chunk):
            tt = ts[start: start + chunk]
            idx = torch.arange(start, start + len(tt), device=x0.device) % b
            values.append(self.vlb_term(x0[idx], tt, None if x_int is None else x_int[idx]))
        per_stratum = torch.cat(values).view(len(sizes), b) * sizes[:, None]  # [K,B] nats
        one = torch.ones(b, dtype=torch.long, device=x0.device)
        terms = {"prior": self.prior_term(x0), "diffusion": per_stratum.sum(0),
                 "reconstruction": self.vlb_term(x0, one, x_int)}
        e = edges.double() - 0.5  # stratum [e_k, e_k+1) of integer t covers [e_k - 1/2, e_k+1 - 1/2)
        profile = {"t_lo": edges[:-1].tolist(), "t_hi": (edges[1:] - 1).tolist(),
                   "logsnr_hi": self.logsnr(e[:-1]).tolist(), "logsnr_lo": self.logsnr(e[1:]).tolist(),
                   "nats": per_stratum}
        return terms, profile

    def vlb_profile(self, x, t_samples: int, chunk: int, spacing: str = "log"):
        """The discrete VLB's terms and profile over strata of t (`t_strata`)."""
        if t_samples < 0:
            raise ValueError(f"t_samples must be >= 0 (0 = exact sum over all T terms), got {t_samples}")
        return self._vlb_terms(lk.to_unit(x, self.levels), x, t_samples, chunk, spacing)

    def vlb_estimator(self, ecfg):
        T, k = self.cfg.T, ecfg.t_samples
        if k == 0 or k >= T - 1:
            label = f"VLB (T={T}, exact sum)"
        else:
            label = f"VLB (T={T}, {k} t, {ecfg.t_spacing} strata)"
        return Estimator("vlb", label, {"t_samples": k, "chunk": ecfg.chunk, "spacing": ecfg.t_spacing})

    # -------------------------------------------------------------- training

    def sample_t(self, n: int, device: torch.device) -> torch.Tensor:
        """Training times: uniform on {1..T} (Ho et al.)."""
        return torch.randint(1, self.cfg.T + 1, (n,), device=device)

    def matching_loss(self, out, x0, eps, x_t, t) -> torch.Tensor:
        """Per-example training target of this parameterisation, mean over dims [B]."""
        return ((out - eps) ** 2).flatten(1).mean(1)  # L_simple (Ho et al. 2020)

    def loss(self, x):
        self._check_x(x)
        x0 = lk.to_unit(x, self.levels)
        t = self.sample_t(len(x), x.device)
        eps = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, eps)
        ab = self._bcast(self.alpha_bar, t)
        out = self.output(x_t, ab, t.float())
        c = self.shape[0]
        loss = self.matching_loss(out[:, :c], x0, eps, x_t, t)
        if self.cfg.hybrid_lambda > 0:
            # L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1): L_vlb = T L_{t-1}
            # for uniform t, each term a per-dimension mean in *bits*; it trains only the
            # variance (the mean is detached). improved-diffusion: vb (bits, mean over dims) * T/1000.
            out_vlb = torch.cat([out[:, :c].detach(), out[:, c:]], 1)
            vb = self.step_term(x0, x_t, t, *self.mean_logvar(self.denoised(out_vlb, x_t, ab), x_t, t), x)  # nats
            loss = loss + self.cfg.hybrid_lambda * self.cfg.T * lk.bits_per_dim(vb, self.dims)
        return loss.mean()

    # -------------------------------------------------------------- sampling

    @property
    def default_steps(self) -> int:
        return self.cfg.T

    @property
    def max_steps(self) -> int:
        return self.cfg.T

    # the solvers' view of the model (samplers.SolverView)
    def solver_times(self, steps: int, spacing: str) -> torch.Tensor:
        """`steps` integer times from high to low noise, then 0 (the data end, alpha_bar = 1)."""
        T = self.cfg.T
        if spacing == "trailing":  # T, ..., T/steps (includes t = T; Lin et al. 2024)
            ts = torch.round(T - torch.arange(steps, dtype=torch.float64) * T / steps).long()
        elif spacing == "leading":  # (steps-1) T//steps + 1, ..., 1 (DDIM's original spacing)
            ts = torch.arange(steps - 1, -1, -1) * (T // steps) + 1
        else:
            raise ValueError(f"unknown timestep spacing '{spacing}'; available: {', '.join(smp.SPACINGS)}")
        return torch.cat([ts, torch.zeros(1, dtype=torch.long)]).to(self.device)

    def alpha_sigma(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar.double()[times]
        return ab.sqrt(), (1 - ab).sqrt()

    # ancestral sampling on a subsequence of the times (Nichol & Dhariwal 2021, sec. 4)
    def respaced(self, steps: int, spacing: str = "trailing") -> dict[str, torch.Tensor]:
        """The reverse process on the times t_0 > ... > t_{K-1} of `solver_times(steps, spacing)`
        (then 0), as improved-diffusion's respace.py: step i (i = 0 the noisiest) goes from
        t = t_i to s = t_{i+1} with beta'_i = 1 - alpha_bar_t / alpha_bar_s, and the mean
        coefficients and variance beta~'_i = beta'_i (1 - alpha_bar_s) / (1 - alpha_bar_t) of
        q(x_s | x_t, x_0) recomputed from it; at the last step, where beta~' = 0, log beta~' is
        that of the step before (improved-diffusion's posterior_log_variance_clipped). steps = T:
        the model's own process (its buffers).
        Returns 't' [K] (the integer times the network is called with) and float32 [K]
        'coef_x0', 'coef_xt', 'log_post_var' (clipped), 'log_beta'."""
        times = self.solver_times(steps, spacing).cpu()
        # float64 from the schedule the float32 buffers were made from (in float32, 1 - alpha_bar
        # keeps ~3 digits at the lowest t)
        ab = torch.cat([torch.ones(1, dtype=torch.float64),
                        torch.cumprod(1 - make_betas(self.cfg.schedule, self.cfg.T), 0)])
        if not torch.allclose(ab.float(), self.alpha_bar.cpu(), rtol=1e-5, atol=0):
            raise RuntimeError(f"{type(self).__name__}: alpha_bar is not make_betas('{self.cfg.schedule}', T)'s")
        ab_t, ab_s = ab[times[:-1]], ab[times[1:]]
        beta = 1 - ab_t / ab_s
        post_var = beta * (1 - ab_s) / (1 - ab_t)  # 0 at the last step (s = 0, alpha_bar_s = 1)
        clipped = torch.cat([post_var[:-1], post_var[-2:-1] if steps > 1 else beta[-1:]])
        sch = {"coef_x0": ab_s.sqrt() * beta / (1 - ab_t), "coef_xt": (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t),
               "log_post_var": clipped.log(), "log_beta": beta.log()}
        return {"t": times[:-1].to(self.device), **{k: v.float().to(self.device) for k, v in sch.items()}}

    def respaced_mean_logvar(self, d: Denoised, x_t: torch.Tensor, sch: dict[str, torch.Tensor],
                             i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`mean_logvar` on the respaced process `sch` (`respaced`) at its step i, from the
        denoiser's output at t_i: the posterior mean at x0_hat and the step's log-variance."""
        mean = sch["coef_x0"][i] * d.x0 + sch["coef_xt"][i] * x_t
        return mean, self._logvar(d.v, sch["log_beta"][i], sch["log_post_var"][i], x_t)

    def ancestral(self, x: torch.Tensor, steps: int | None = None, spacing: str = "trailing",
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Ho et al. Alg. 2 on the respaced process (`respaced`; steps None or T: Alg. 2 itself),
        from x at t_0 in `steps` network evaluations; the last step returns its mean. The
        continuous state at the data end [n,C,H,W]."""
        steps = self.sample_steps(steps)
        sch = self.respaced(steps, spacing)
        for i in range(steps):
            mean, logvar = self.respaced_mean_logvar(self.denoise(x, sch["t"][i]), x, sch, i)
            if i < steps - 1:
                x = mean + torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=generator, device=x.device)
            else:
                x = mean
        return x

    def to_images(self, z, generator):
        """The samplers' state at t = 0 (alpha_bar = 1) binned to the L levels."""
        return lk.from_unit(z, self.levels)

    def ode_images(self, z, generator):
        """The ODE stops at t = 1 (the lowest noise trained on): divided by alpha_1, then binned."""
        return lk.from_unit(z / self.alpha_bar[1].sqrt(), self.levels)


@register("ddpm")
class DDPM(GaussianDiffusion):
    """Ho et al. 2020: eps-prediction, linear schedule, L_simple."""

    target = "eps"


class _VLBMatching(GaussianDiffusion):
    """Luo (2022): the denoising matching term of the ELBO in this target's own units,
    L_{t-1} = lambda(t) ||target - prediction||^2 for t >= 2 (posterior variance beta~_t).

    Preconditioning (EDM, Karras et al. 2022; NCSNv2, Song & Ermon 2020): the prediction is
    skip(t) x_t + scale(t) F(x_t, t) with the U-Net output F of unit scale, so the net has an
    identity path at low noise, where the VLB weights errors most. With `precondition: false`
    the U-Net outputs the target directly (skip 0, scale 1).

    Training is the VLB matching objective, importance-sampled: t ~ p(t) ~ lambda(t) scale(t)^2
    (uniform per-t weight in F's units), per-example loss lambda(t)/p(t) ||target - pred||^2
    up to a constant, i.e. ||F* - F||^2 -- unbiased for sum_t lambda(t) E||target - pred||^2."""

    @dataclass
    class Config(GaussianDiffusion.Config):
        precondition: bool = True
        sigma_data: float = 0.5   # data std assumed by the x0 preconditioning (EDM's default)

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        if cfg.sigma_data <= 0:
            raise ValueError(f"{type(self).__name__}: sigma_data must be > 0, got {cfg.sigma_data}")
        weights = self.vlb_weight().double() * self.skip_and_scale(self.alpha_bar.double())[1] ** 2
        # t = 0 is not a time. t = 1 is trained like the others: there the bound's term is the
        # decoder L_0, a discretized Gaussian of variance exp(log_post_var[1]) around x0_hat, whose
        # Gaussian surrogate weighs x0 errors by coef_x0(1)^2 / (2 var): x0_weight()[1], finite
        weights[0] = 0.0
        self.register_buffer("t_probs", (weights / weights.sum()).float(), persistent=False)

    def skip_and_scale(self, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """skip(ab), scale(ab) of the preconditioning at alpha_bar = ab (any time, integer or not)."""
        return self.skip_scale(ab) if self.cfg.precondition else (torch.zeros_like(ab), torch.ones_like(ab))

    def precondition(self, out, x_t, ab):
        c = self.shape[0]
        skip, scale = self.skip_and_scale(ab)
        pred = skip * x_t + scale * out[:, :c]
        return torch.cat([pred, out[:, c:]], 1) if out.shape[1] > c else pred

    def x0_weight(self) -> torch.Tensor:
        """lambda(t) for x0 errors: coef_x0(t)^2 / (2 beta~_t), [T+1]."""
        post_var = torch.exp(self.log_post_var.double())
        return self.post_coef_x0.double() ** 2 / (2 * post_var)

    def sample_t(self, n, device):
        return torch.multinomial(self.t_probs, n, replacement=True).to(device)

    def matching_loss(self, out, x0, eps, x_t, t):
        scale = self.skip_and_scale(self._bcast(self.alpha_bar, t))[1]
        return ((out - self.target_of(x0, eps, t)) ** 2 / scale**2).flatten(1).mean(1)


@register("ddpm_x0")
class DDPMx0(_VLBMatching):
    """Luo 2022 (Understanding Diffusion Models), x0 interpretation: the model predicts x_0.
    Preconditioned as EDM's denoiser: skip = the Wiener (linear least-squares) estimate of x_0
    for data of std sigma_data, scale = that estimate's posterior std."""

    target = "x0"

    def vlb_weight(self):
        return self.x0_weight()

    def skip_scale(self, ab):
        sd2 = self.cfg.sigma_data ** 2
        denom = ab * sd2 + 1 - ab
        return sd2 * ab.sqrt() / denom, (sd2 * (1 - ab) / denom).sqrt()

    def target_of(self, x0, eps, t):
        return x0


@register("ddpm_score")
class DDPMScore(_VLBMatching):
    """Luo 2022, score interpretation: the model predicts grad log q(x_t) (Tweedie).
    Preconditioned as NCSNv2: score = F / sigma_t with sigma_t = sqrt(1 - alpha_bar_t)."""

    target = "score"

    def vlb_weight(self):
        # x0 - x0_hat = ((1 - ab) / sqrt(ab)) (s_hat - s): lambda_s = lambda_x0 (1 - ab)^2 / ab
        ab = self.alpha_bar.double()
        return self.x0_weight() * (1 - ab) ** 2 / ab

    def skip_scale(self, ab):
        return torch.zeros_like(ab), 1 / (1 - ab).clamp(min=1e-20).sqrt()

    def target_of(self, x0, eps, t):
        return -eps / (1 - self._bcast(self.alpha_bar, t)).sqrt()  # grad_x_t log q(x_t | x_0)


@register("iddpm")
class IDDPM(GaussianDiffusion):
    """Nichol & Dhariwal 2021: cosine schedule, learned variances, L_hybrid = L_simple + 0.001 L_vlb."""

    target = "eps"

    @dataclass
    class Config(GaussianDiffusion.Config):
        schedule: str = "cosine"
        learn_sigma: bool = True
        hybrid_lambda: float = 0.001
