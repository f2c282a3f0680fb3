"""The score-based view: the probability-flow ODE of every diffusion model (Song et al. 2021),
its likelihood on discrete data through dequantization, and the ODE as a sampler.

Every diffusion model here is variance preserving: x_lam = alpha x_0 + sigma eps with
alpha^2 = sigmoid(lam), sigma^2 = sigmoid(-lam), lam = log SNR. With lam as the time variable
the probability-flow ODE is the continuous limit of DDIM, d(x / alpha) = eps_hat d(sigma / alpha):

    dx/dlam = 1/2 sigma (sigma x - eps_hat(x, lam)),     div = 1/2 sigma (sigma D - tr d eps_hat/dx)

It is written once for all models through `ODEView`: a model gives the log-SNR span it was
trained on and its eps prediction at any log SNR in that span (discrete-time models through
the continuous-time schedule of `GaussianDiffusion.logsnr`: log SNR linear in t between the
integer times; VDM through its learned gamma). In lam the field is smooth wherever the
network is, so an adaptive solver is not held up by the schedule's own kinks.

Likelihood (instantaneous change of variables): solving from lam_data (the data end) to
lam_prior with the prior N(0, I) there,
    log p(y) = log N(x(lam_prior); 0, I) + int_{lam_data}^{lam_prior} div dlam.
The divergence is exact (D Jacobian-vector products, batched with torch.func.vmap) or
Hutchinson's unbiased estimate v^T J v with Rademacher probes v fixed along the path.

Dequantization (the bound on the discrete P(x)): pixels are the bin centres c of L bins of
half-width h = 1/(L-1) in [-1, 1]. At the data end y = alpha x_0 + sigma e, with e drawn from
q(e) supported on [-tau, tau]^D, tau = alpha h / sigma, so that y stays in the bin of x scaled
by alpha (scaled bins tile space without overlap, so their probabilities under p sum to <= 1):

    -log P(x) <= E_q[-log p(y) + log q(e)] - D log sigma                          (Jensen)
              <= -log (1/K) sum_k p(y_k) / q_y(y_k),  q_y(y) = q(e) / sigma^D       (K samples)

'uniform': q uniform on the box, log q(e) = -D log(2 tau): the bound's constant is then
-D log(alpha * 2h) = D log((L - 1) / (2 alpha)), i.e. +log2((L-1)/2) bits/dim at alpha = 1
(3 bits/dim for L = 17; score_sde's "7" is this for L = 256 with bins of width 2/256).
'tn': truncated normal, q(e) = N(e; 0, I) restricted to the box (Zheng et al. 2023, i-DODE):
y is then distributed as the model's own training input at the data end, where its density
is sharp, so one sample gives a tight bound; uniform needs many (the IWAE K).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import likelihood as lk

DIVERGENCES = ("exact", "hutchinson")
DEQUANTIZATIONS = ("tn", "uniform")
EXACT_MAX_DIMS = 64  # 'auto': the exact divergence up to this D (digits), Hutchinson above


class ODEView(Protocol):
    shape: tuple[int, int, int]

    def ode_logsnr_span(self) -> tuple[float, float]: ...       # (lam at the data end, lam at the prior end)
    def ode_eps(self, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor: ...  # lam 0-dim; one network call


@dataclass
class ODESettings:
    """How the ODE is solved: a dopri5-class adaptive solver of torchdiffeq and its tolerances."""
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5

    def label(self) -> str:
        return f"{self.method}, rtol={self.rtol:g}, atol={self.atol:g}"


def pf_velocity(x: torch.Tensor, eps: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """dx/dlam of the probability-flow ODE given the eps prediction at (x, lam)."""
    sigma = torch.sigmoid(-lam).sqrt()
    return 0.5 * sigma * (sigma * x - eps)


def divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               probes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(x) and, per example, the trace of d fn / dx for a map acting on each example on its
    own ([B, ...] -> [B, ...]). probes None: exact, one JVP per dimension (the unit vectors,
    shared by all examples), vmapped; probes [P, B, ...]: Hutchinson, the mean of v^T J v."""
    b, dims = len(x), x[0].numel()
    exact = probes is None
    if exact:
        probes = torch.eye(dims, dtype=x.dtype, device=x.device).view(dims, 1, *x.shape[1:]).expand(dims, *x.shape)

    def jvp(v):
        return torch.func.jvp(fn, (x,), (v,))

    out, jv = torch.func.vmap(jvp, out_dims=(None, 0))(probes)  # the primal is computed once
    quad = (jv * probes).flatten(2).sum(2)  # [P, B]: v^T J v per probe and example
    return out, quad.sum(0) if exact else quad.mean(0)


def rademacher(n: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randint(0, 2, (n, *shape), generator=generator, device=device).float() * 2 - 1


class _Counted:
    def __init__(self):
        self.nfe = 0


def solve(view: ODEView, x: torch.Tensor, lam0: float, lam1: float, settings: ODESettings,
          divergence_of: Callable | None = None) -> tuple[tuple[torch.Tensor, ...], int]:
    """Integrate the ODE (with the divergence integral when `divergence_of` is given) from lam0
    to lam1; returns the final state(s) and the function evaluations used."""
    counter = _Counted()
    dims = x[0].numel()

    def field(lam, state):
        counter.nfe += 1
        lam = lam.to(x.dtype)
        if divergence_of is None:
            (z,) = state
            return (pf_velocity(z, view.ode_eps(z, lam), lam),)
        z = state[0]
        eps, tr = divergence_of(lambda u: view.ode_eps(u, lam), z)
        sigma = torch.sigmoid(-lam).sqrt()
        return pf_velocity(z, eps, lam), 0.5 * sigma * (sigma * dims - tr)

    state = (x,) if divergence_of is None else (x, torch.zeros(len(x), dtype=x.dtype, device=x.device))
    t = torch.tensor([lam0, lam1], dtype=torch.float64, device=x.device)
    from torchdiffeq import odeint  # here, not at import: it loads SciPy (0.45 s of every stage's start-up)

    with torch.no_grad():
        # step_t: the last step ends at lam1 instead of overshooting it (the network is not
        # defined beyond the span it was trained on)
        path = odeint(field, state, t, rtol=settings.rtol, atol=settings.atol, method=settings.method,
                      options={"step_t": t[1:]})
    return tuple(p[-1] for p in path), counter.nfe


def log_density(view: ODEView, y: torch.Tensor, settings: ODESettings, divergence_estimator: str = "exact",
                probes: int = 1, generator: torch.Generator | None = None,
                probe_vectors: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """The ODE's continuous log-density of y [B, ...] at the data end, in nats, split as
    {'prior': log N(x(lam_prior); 0, I), 'flow': the divergence integral} (sum = log p(y)),
    and the function evaluations used (the same for every example of the batch: one solve).
    Hutchinson draws `probes` Rademacher vectors per example, or takes `probe_vectors`
    [P, B, ...] as given (to solve the same estimate again at other tolerances)."""
    if divergence_estimator not in DIVERGENCES:
        raise ValueError(f"unknown divergence estimator '{divergence_estimator}'; available: {', '.join(DIVERGENCES)}")
    if divergence_estimator == "exact":
        vs = None
    elif probe_vectors is not None:
        vs = probe_vectors
    else:
        if probes < 1:
            raise ValueError(f"Hutchinson needs probes >= 1, got {probes}")
        vs = rademacher(probes, tuple(y.shape), generator, y.device)
    lam_data, lam_prior = view.ode_logsnr_span()
    (x_end, flow), nfe = solve(view, y, lam_data, lam_prior, settings,
                               lambda fn, z: divergence(fn, z, vs))
    prior = lk.normal_log_prob(x_end, torch.zeros_like(x_end), torch.zeros_like(x_end)).flatten(1).sum(1)
    return {"prior": prior, "flow": flow, **({"probe_vectors": vs} if vs is not None else {})}, nfe


def dequantization_noise(kind: str, n: int, shape: tuple[int, ...], tau: float,
                         generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """e [n, *shape] on the box [-tau, tau]^D and log q(e) [n] (nats), for q 'uniform' or 'tn' (float64)."""
    u = torch.rand((n, *shape), generator=generator, device=device, dtype=torch.float64)
    dims = math.prod(shape)
    if kind == "uniform":
        e = (2 * u - 1) * tau
        return e, torch.full((n,), -dims * math.log(2 * tau), dtype=torch.float64, device=device)
    if kind == "tn":  # inverse CDF of N(0, 1) restricted to [-tau, tau], in float64
        lo = torch.special.ndtr(torch.tensor(-tau, dtype=torch.float64))
        e = torch.special.ndtri(lo + u * (1 - 2 * lo)).clamp(-tau, tau)
        log_z = math.log(math.erf(tau / math.sqrt(2)))
        logq = (-0.5 * e**2 - 0.5 * lk.LOG_2PI - log_z).flatten(1).sum(1)
        return e, logq
    raise ValueError(f"unknown dequantization '{kind}'; available: {', '.join(DEQUANTIZATIONS)}")


def check_k_and_divergence(k: int, divergence_estimator: str) -> None:
    """Hutchinson's estimate is unbiased for log p(y), but the K-sample bound takes a
    log-mean-exp of p(y_k) / q(y_k): noise inside it biases the bound low (Jensen), so far that
    it can fall below -log P(x). K > 1 needs the exact divergence."""
    if k > 1 and divergence_estimator == "hutchinson":
        raise ValueError(f"the ODE bound with K = {k} dequantization samples needs the exact divergence: "
                         "Hutchinson noise inside the K-sample log-mean-exp biases the bound low (Jensen), "
                         "below -log P(x) in expectation; use K = 1 or divergence exact (auto picks exact for K > 1)")


def dequantized_nll(view: ODEView, x_int: torch.Tensor, levels: int, settings: ODESettings, *,
                    dequantization: str = "tn", k: int = 1, divergence_estimator: str = "exact",
                    probes: int = 1, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                    check: ODESettings | None = None, check_n: int = 0,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Upper bound on -log P(x) (nats, [B]) for integer images x_int from the model's ODE
    density with K dequantization samples (module docstring). Terms: 'prior' and 'flow' (minus
    the ODE log-density, mean over the K samples), 'dequantization' (the rest: log q_y and the
    importance-weighting gain); they sum to the bound. Also {'nfe': function evaluations per
    example} and, with `check` (K = 1), 'solver_gap': the first `check_n` examples' bound minus
    the same bound (the same dequantization draws and probes) solved at `check`'s tolerances,
    nats [check_n]: the solver's error. The ODE is solved in `dtype` (the model's)."""
    if k < 1:
        raise ValueError(f"dequantization samples K must be >= 1, got {k}")
    check_k_and_divergence(k, divergence_estimator)
    lam = torch.tensor(view.ode_logsnr_span()[0], dtype=torch.float64)
    alpha, sigma = torch.sigmoid(lam).sqrt().item(), torch.sigmoid(-lam).sqrt().item()
    tau = alpha / ((levels - 1) * sigma)
    b, shape, dims = len(x_int), tuple(x_int.shape[1:]), x_int[0].numel()
    x0 = lk.to_unit(x_int, levels).double().repeat(k, *([1] * len(shape)))  # [K*B], sample-major
    e, log_q = dequantization_noise(dequantization, k * b, shape, tau, generator, x_int.device)
    y = (alpha * x0 + sigma * e).to(dtype)
    log_q_y = log_q - dims * math.log(sigma)

    def bound_of(parts: dict[str, torch.Tensor], log_q_y: torch.Tensor) -> torch.Tensor:
        log_w = (parts["prior"] + parts["flow"]).double() - log_q_y  # log p(y) / q_y(y)
        return lk.k_sample_bound(log_w.view(k, -1))

    parts, nfe = log_density(view, y, settings, divergence_estimator, probes, generator)
    bound = bound_of(parts, log_q_y)
    prior, flow = (-parts[n].double().view(k, b).mean(0) for n in ("prior", "flow"))
    info: dict[str, object] = {"nfe": nfe}
    if check is not None and check_n > 0:
        if k != 1:
            raise ValueError(f"the ODE solver check compares K = 1 bounds, got K = {k}")
        n = min(check_n, b)
        vs = parts.get("probe_vectors")
        start = time.perf_counter()
        again, _ = log_density(view, y[:n], check, divergence_estimator, probes,
                               probe_vectors=None if vs is None else vs[:, :n])
        info["solver_gap"] = bound[:n] - bound_of(again, log_q_y[:n])
        info["solver_check_seconds"] = time.perf_counter() - start  # not the bound's own cost
    return {"prior": prior, "flow": flow, "dequantization": bound - prior - flow}, info


def sample(view: ODEView, x: torch.Tensor, settings: ODESettings) -> tuple[torch.Tensor, int]:
    """Solve the ODE from noise x at the prior end to the data end: the state there, and the
    function evaluations used."""
    lam_data, lam_prior = view.ode_logsnr_span()
    (x_end,), nfe = solve(view, x, lam_prior, lam_data, settings)
    return x_end, nfe


def resolve_divergence(name: str, dims: int, k: int = 1) -> str:
    """'auto': exact up to EXACT_MAX_DIMS dimensions (D JVPs per evaluation) and whenever K > 1
    (check_k_and_divergence), Hutchinson otherwise."""
    if name == "auto":
        return "exact" if dims <= EXACT_MAX_DIMS or k > 1 else "hutchinson"
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence estimator '{name}'; available: auto, {', '.join(DIVERGENCES)}")
    return name


class ProbabilityFlow:
    """What a diffusion model gains from being an `ODEView` (it supplies `ode_logsnr_span` and
    `ode_eps`): the ODE bound as an estimator (`ode_estimator`, `ode_terms`) and the ODE
    sampler (`ode_sample`, which the model's `sample` decodes like its other samplers' output)."""

    def ode_estimator(self, ocfg):
        """The ODE bound under `ocfg` (config.ODEEvalConfig) as a `models.base.Estimator`: on the
        first `n_test` test images, in solves of `batch_size`; with `ocfg.check_tol`, the solver
        check on its first `check_n` images (`dequantized_nll`)."""
        from .models.base import Estimator  # models import this module
        div = resolve_divergence(ocfg.divergence, self.dims, ocfg.k)
        check_k_and_divergence(ocfg.k, div)
        settings = ODESettings(ocfg.method, ocfg.rtol, ocfg.atol)
        probes = f", {ocfg.probes} probe{'s' if ocfg.probes > 1 else ''}" if div == "hutchinson" else ""
        subset = f", first {ocfg.n_test} test images" if ocfg.n_test is not None else ""
        label = (f"ODE ({settings.label()}, {div} divergence{probes}, {ocfg.dequantization} dequantization, "
                 f"K={ocfg.k}{subset})")
        check = {} if ocfg.check_tol is None or ocfg.k != 1 else {
            "check": ODESettings(ocfg.method, ocfg.check_tol, ocfg.check_tol), "check_n": ocfg.check_n}
        options = {"ode": {"settings": settings, "divergence_estimator": div, "probes": ocfg.probes,
                           "dequantization": ocfg.dequantization, "k": ocfg.k, **check}}
        return Estimator("ode", label, options, max_examples=ocfg.n_test, batch_size=ocfg.batch_size)

    def ode_terms(self, x: torch.Tensor, settings: ODESettings, **kw) -> tuple[dict[str, torch.Tensor], dict]:
        """The ODE bound's terms (nats [B]) and {'nfe': function evaluations per example, and
        'solver_gap' with a solver check}."""
        return dequantized_nll(self, x, self.levels, settings, **kw)

    @staticmethod
    def sampler_settings(rtol: float | None = None, atol: float | None = None) -> ODESettings:
        """The ODE sampler's solver: dopri5 at rtol/atol (None: ODESettings' defaults)."""
        d = ODESettings()
        return ODESettings(d.method, d.rtol if rtol is None else float(rtol), d.atol if atol is None else float(atol))

    def check_ode_options(self, sampler: str, steps: int | None, eta: float, rtol: float | None,
                          atol: float | None) -> None:
        name = getattr(self, "name", "") or type(self).__name__
        if sampler == "ode":  # (its steps: `Model.check_sampler`, an ADAPTIVE sampler takes none)
            if eta != 0:
                raise ValueError(f"{name}: the ODE sampler is deterministic: it takes no eta (got eta={eta})")
            for key, tol in (("rtol", rtol), ("atol", atol)):
                if tol is not None and not tol > 0:
                    raise ValueError(f"{name}: ODE sampler {key} must be > 0, got {tol}")
        elif rtol is not None or atol is not None:
            raise ValueError(f"{name}: rtol/atol are the ODE sampler's options, not '{sampler}'s")

    def ode_sampler_label(self, rtol: float | None = None, atol: float | None = None) -> str:
        return f"ode, {self.sampler_settings(rtol, atol).label()}"

    def ode_sample(self, n: int, generator: torch.Generator | None, rtol: float | None = None,
                   atol: float | None = None) -> torch.Tensor:
        """The data-end state of the ODE solved from N(0, I) noise at the prior end."""
        x = torch.randn(n, *self.shape, generator=generator, device=self.device)
        return sample(self, x, self.sampler_settings(rtol, atol))[0]
