"""Deterministic-grid samplers shared by every diffusion model: DDIM and DPM-Solver++(2M).

They see a model only through its `SolverView` (one interface, many families):
    solver_times(steps, spacing) -> [steps + 1] decreasing times; the last is the data end
    alpha_sigma(times)    -> alpha [K], sigma [K]   (x_t = alpha_t x_0 + sigma_t eps)
    denoise(x, t)         -> (x0_hat, eps_hat, v)   one network evaluation at one (0-dim) time
The result is the continuous state at the last time; the model turns it into integers.

DDIM: Song, Meng & Ermon 2021 (eq. 12; eq. 16's sigma_t(eta), eta in [0, 1] interpolating
DDIM (0) and the DDPM posterior's noise (1)).
DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++", Alg. 2 (multistep, data prediction), with
a first-order final step (as diffusers does for few steps).
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import torch

SOLVERS = ("ddim", "dpm++2m")
SPACINGS = ("trailing", "leading")


class SolverView(Protocol):
    def solver_times(self, steps: int, spacing: str) -> torch.Tensor: ...
    def alpha_sigma(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> Any: ...  # t: 0-dim; .x0, .eps (models.family.Denoised)


def ddim_sigma(alpha_t: float, sigma_t: float, alpha_s: float, sigma_s: float, eta: float) -> float:
    """DDIM's noise scale sigma(eta) of a step from time t to the less noisy time s (eq. 16):
    sigma^2 = eta^2 sigma_s^2 (1 - SNR_t / SNR_s), SNR = alpha^2 / sigma^2; for a variance-
    preserving process (alpha^2 = alpha_bar, sigma^2 = 1 - alpha_bar) that is eq. 16's
    eta^2 (1 - alpha_bar_s) / (1 - alpha_bar_t) (1 - alpha_bar_t / alpha_bar_s). eta = 1: the
    std of the posterior q(x_s | x_t, x_0). eta in [0, 1] keeps sigma <= sigma_s."""
    check_eta(eta)
    snr_ratio = (alpha_t * sigma_s) ** 2 / (alpha_s * sigma_t) ** 2  # SNR_t / SNR_s, in [0, 1)
    return eta * sigma_s * math.sqrt(1 - snr_ratio)


def check_eta(eta: float) -> None:
    if not 0 <= eta <= 1:  # also rejects NaN
        raise ValueError(f"DDIM eta must be in [0, 1] (0: deterministic, 1: the DDPM posterior's noise), got eta={eta}")


def label(sampler: str, steps: int, eta: float = 0.0, spacing: str | None = "trailing") -> str:
    """Table label of a sampler setting, e.g. 'ddim, 50 steps, eta=0, trailing spacing' or
    'ancestral, 20 steps, trailing spacing'; spacing None (a grid of every time): not named."""
    parts = [sampler, f"{steps} steps"] + ([f"eta={eta:g}"] if sampler == "ddim" else [])
    return ", ".join(parts + ([f"{spacing} spacing"] if spacing else []))


def solve(view: SolverView, x: torch.Tensor, solver: str, steps: int, *, eta: float = 0.0,
          spacing: str = "trailing", generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate from x at the first time to the data end in `steps` network evaluations."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver '{solver}'; available: {', '.join(SOLVERS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing '{spacing}'; available: {', '.join(SPACINGS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "dpm++2m" and eta != 0:
        raise ValueError("dpm++2m is deterministic: eta must be 0")
    check_eta(eta)
    times = view.solver_times(steps, spacing)
    alpha, sigma = (v.double().tolist() for v in view.alpha_sigma(times))  # python floats: no per-step syncs
    x0_prev, h_prev = None, 0.0
    for i in range(steps):
        x0, eps, _ = view.denoise(x, times[i])
        a_t, s_t, a_s, s_s = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if solver == "ddim":
            # eq. 12: x_s = a_s x0 + sqrt(s_s^2 - sig^2) eps + sig z; sig <= s_s as eta <= 1
            sig = ddim_sigma(a_t, s_t, a_s, s_s, eta)
            x = a_s * x0 + math.sqrt((s_s - sig) * (s_s + sig)) * eps
            if sig > 0:
                x = x + sig * torch.randn(x.shape, generator=generator, device=x.device)
        else:
            if s_s == 0:  # lambda_s = +inf: the update is the data prediction itself
                x = x0
            else:
                h = math.log(a_s / s_s) - math.log(a_t / s_t)  # lambda_s - lambda_t > 0
                d = x0
                if x0_prev is not None and i < steps - 1:  # second order; the last step first order
                    r = h_prev / h
                    d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
                x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
                h_prev = h
            x0_prev = x0
    return x
