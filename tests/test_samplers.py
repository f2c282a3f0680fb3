"""Samplers: accuracy with the analytically optimal denoiser (against closed forms), DDIM's
noise, respaced ancestral sampling, determinism, counted NFE, errors."""
import math

import pytest
import torch
from torch import nn

from diffusion_models import models
from diffusion_models import likelihood as lk
from diffusion_models.evaluate import draw_samples
from diffusion_models.models.base import ONE_SHOT, Model
from diffusion_models.models.diffusion import make_betas
from diffusion_models.samplers import ddim_sigma, solve
from helpers import one_thread  # noqa: F401  (autouse: this module runs on one thread)

SHAPE = (1, 2, 2)
MU, S = 0.3, 0.5  # data: i.i.d. N(MU, S^2) per dimension


def optimal_eps(x_t, alpha, sigma):
    """E[eps | x_t] for x_0 ~ N(MU, S^2), x_t = alpha x_0 + sigma eps (jointly Gaussian)."""
    return sigma * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def gaussian_model(name, **overrides):
    """A diffusion model whose network is replaced by the optimal denoiser of the Gaussian data."""
    m = models.build(name, shape=SHAPE, levels=256,
                     **({"T": 1000, "clip_x0": False} if name != "vdm" else {}), **overrides)
    if name == "vdm":
        def eps_hat(z, gamma):
            g = gamma.double().view(-1, 1, 1, 1)
            return optimal_eps(z.double(), torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()).float()
        m.eps_hat = eps_hat
    else:
        def output(x_t, ab, t):  # the model's `output` (its eps prediction) at alpha_bar ab
            ab = ab.double()
            return optimal_eps(x_t.double(), ab.sqrt(), (1 - ab).sqrt()).float()
        m.output = output
    return m


def trailing(T, k):
    """The 'trailing' grid T, T - T/k, ..., T/k, then 0."""
    return [round(T - i * T / k) for i in range(k)] + [0]


def exact_moments(ab, times, kind, eta=0.0):
    """Mean and variance (per dimension) of a sampler's output with the optimal denoiser of the
    Gaussian data, from x_{t_0} ~ N(0, 1) over `times` (alpha_bar `ab`, float64 [T+1]).

    The oracle's x0_hat = E[x_0 | x_t] = p x_t + q is linear in x_t, so every step is
    x_s = A x_t + B + sd z and the output is Gaussian: (m, v) -> (A m + B, A^2 v + sd^2).
    kind 'small' / 'large': Ho et al.'s posterior q(x_s | x_t, x_0 = x0_hat) of the respaced
    process (beta' = 1 - ab_t / ab_s), variance beta~' = beta' (1 - ab_s) / (1 - ab_t) or
    beta', the last step its mean; 'ddim': Song et al. eq. 12 with eq. 16's
    sigma^2 = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s)."""
    m, v = 0.0, 1.0
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        a_t, s_t, a_s = math.sqrt(ab[t]), math.sqrt(1 - ab[t]), math.sqrt(ab[s])
        p = a_t * S**2 / (a_t**2 * S**2 + s_t**2)
        q = MU * (1 - p * a_t)
        if kind == "ddim":
            var = eta**2 * (1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])
            c = math.sqrt(1 - ab[s] - var) / s_t  # times eps_hat = (x_t - a_t x0_hat) / s_t
            A, B = a_s * p + c * (1 - a_t * p), a_s * q - c * a_t * q
        else:
            beta = 1 - ab[t] / ab[s]
            c0, ct = a_s * beta / (1 - ab[t]), math.sqrt(1 - beta) * (1 - ab[s]) / (1 - ab[t])
            A, B = c0 * p + ct, c0 * q
            last = i == len(times) - 2
            var = 0.0 if last else beta * (1 - ab[s]) / (1 - ab[t]) if kind == "small" else beta
        m, v = A * m + B, A * A * v + var
    return m, v


def assert_moments(x, mean, var, z=4.0):
    """Sample mean and variance of the i.i.d. values x within z standard errors of (mean, var)."""
    x = x.double().flatten()
    n = len(x)
    assert x.mean().item() == pytest.approx(mean, abs=z * math.sqrt(var / n))
    assert x.var().item() == pytest.approx(var, abs=z * var * math.sqrt(2 / (n - 1)))


# --------------------------------------------------------------------------- DDIM and DPM-Solver++


@pytest.mark.parametrize("name", ["ddpm", "vdm"])
def test_solvers_with_the_optimal_denoiser_recover_the_data_distribution(name):
    m = gaussian_model(name)
    # the exact ODE maps the prior N(0, 1) at the first time to N(MU + (S/s_m)(0 - a MU), (S/s_m)^2),
    # s_m^2 = a^2 S^2 + s^2: the data distribution up to the prior's mismatch at that time
    a, s = (v[0].item() for v in m.alpha_sigma(m.solver_times(1, "trailing")[:1]))
    shrink = S / (a**2 * S**2 + s**2) ** 0.5
    mean, sd = MU - shrink * a * MU, shrink
    x_T = torch.randn(20_000, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {(k, n): solve(m, x_T, k, n).double() for k in ("ddim", "dpm++2m") for n in (10, 50)}
    # measured at 50 steps: ddim sd 0.471 (ddpm) / 0.480 (vdm), first order; dpm++2m 0.500 / 0.502
    for solver, sd_tol in (("ddim", 0.035), ("dpm++2m", 0.005)):
        x = out[(solver, 50)]
        assert x.mean().item() == pytest.approx(mean, abs=0.005), solver  # SE of the mean: 0.002
        assert x.std().item() == pytest.approx(sd, abs=sd_tol), solver
    err = {k: (out[(k, 10)].mean().item() - mean) ** 2 + (out[(k, 10)].std().item() - sd) ** 2
           for k in ("ddim", "dpm++2m")}
    assert err["dpm++2m"] <= err["ddim"], err


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_sigma_is_eq_16(schedule):
    """sigma_t(eta)^2 = eta^2 (1 - ab_s) / (1 - ab_t) (1 - ab_t / ab_s) (Song et al. eq. 16),
    and for adjacent times at eta = 1 the DDPM posterior variance beta~_t."""
    betas = make_betas(schedule, 1000)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)]).tolist()
    for t, s in [(1000, 999), (1000, 500), (700, 650), (300, 0), (20, 10), (2, 1), (1, 0)]:
        args = math.sqrt(ab[t]), math.sqrt(1 - ab[t]), math.sqrt(ab[s]), math.sqrt(1 - ab[s])
        for eta in (0.0, 0.3, 1.0):
            expect = eta * math.sqrt((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s]))
            assert ddim_sigma(*args, eta) == pytest.approx(expect, rel=1e-9, abs=1e-15), (t, s, eta)
        assert ddim_sigma(*args, 1.0) <= args[3]  # never more than the state's noise sigma_s
        if s == t - 1:
            post_var = betas[t - 1].item() * (1 - ab[s]) / (1 - ab[t])
            assert ddim_sigma(*args, 1.0) ** 2 == pytest.approx(post_var, rel=1e-9)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_ddim_eta_outside_0_1_is_an_error(eta):
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_sigma(0.5, 0.8, 0.9, 0.4, eta)
    m = models.build("ddpm", shape=(1, 4, 4), levels=17, T=40)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\].*eta="):
        m.sample(2, sampler="ddim", steps=5, eta=eta)


def test_ddim_with_eta_1_recovers_the_data_distribution_like_eta_0():
    """Gaussian oracle, T=1000, all 1000 steps: closed form (`exact_moments`) sd 0.4961 (eta=1)
    and 0.4985 (eta=0) against the data's 0.5, means 0.3000 / 0.2990 (the prior's mismatch);
    the sampled moments agree with the closed form to 4 SE (SE of the sd ~0.0013). The old
    variance (too large by 1/sigma_t^2, eps term dropped once it exceeded sigma_s^2) gave sd 1.7."""
    m = gaussian_model("ddpm")
    ab = m.alpha_bar.double().tolist()
    x_T = torch.randn(20_000, *SHAPE, generator=torch.Generator().manual_seed(0))
    for eta in (1.0, 0.0):
        mean, var = exact_moments(ab, trailing(1000, 1000), "ddim", eta)
        assert mean == pytest.approx(MU, abs=0.0015) and math.sqrt(var) == pytest.approx(S, abs=0.005)
        with torch.no_grad():
            x = solve(m, x_T, "ddim", 1000, eta=eta, generator=torch.Generator().manual_seed(1))
        assert_moments(x, mean, var)


def test_ddim_is_deterministic_given_the_seed_and_eta_adds_noise():
    m = models.build("ddpm", shape=(1, 8, 8), levels=17, T=100)
    draw = lambda seed, **kw: m.sample(16, generator=torch.Generator().manual_seed(seed), sampler="ddim", **kw)  # noqa: E731
    assert torch.equal(draw(0, steps=10), draw(0, steps=10))
    assert torch.equal(draw(0, steps=10, eta=1.0), draw(0, steps=10, eta=1.0))
    assert not torch.equal(draw(0, steps=10), draw(1, steps=10))
    with torch.no_grad():  # eta > 0 draws fresh noise at each step: a different trajectory
        assert not torch.equal(draw(0, steps=10, eta=0.0), draw(0, steps=10, eta=1.0))


# --------------------------------------------------------------------------- respaced ancestral


def algorithm_2(m, x, generator):
    """Ho et al. 2020, Alg. 2 with the model's own p(x_{t-1} | x_t): the reference full sampler."""
    for step in range(m.cfg.T, 0, -1):
        t = torch.full((len(x),), step, dtype=torch.long)
        mean, logvar = m.mean_logvar(m.denoise(x, t), x, t)
        x = mean + torch.exp(0.5 * logvar) * torch.randn(x.shape, generator=generator) if step > 1 else mean
    return x


@pytest.mark.parametrize("name, overrides", [("ddpm", {}), ("ddpm", {"variance": "large"}), ("ddpm_x0", {}),
                                             ("iddpm", {})])
def test_ancestral_at_T_steps_is_algorithm_2(name, overrides):
    m = models.build(name, shape=(1, 4, 4), levels=17, T=40, **overrides)
    with torch.no_grad():  # a network whose outputs (eps, and v for iddpm) are not all zero
        nn.init.normal_(m.net.unet.out[-1].weight, std=0.05, generator=torch.Generator().manual_seed(3))
        gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
        g = gen()
        ref = algorithm_2(m, torch.randn(5, 1, 4, 4, generator=g), g)
        for kw in ({}, {"steps": 40}, {"steps": 40, "spacing": "leading"}):
            g = gen()
            x = m.ancestral(torch.randn(5, 1, 4, 4, generator=g), generator=g, **kw)
            assert torch.allclose(x, ref, rtol=0, atol=1e-6), (kw, (x - ref).abs().max())
            assert torch.equal(m.sample(5, generator=gen(), **kw), lk.from_unit(ref, m.levels))


@pytest.mark.parametrize("steps", [50, 100])
def test_respaced_ancestral_with_the_optimal_denoiser_recovers_the_data_distribution(steps):
    """Gaussian oracle, T=1000: the sampled moments match the respaced process's closed form to
    4 SE (160k values: SE of the variance ~0.0009), and that closed form is the data's up to
    the sampler's own discretisation error: the 'small' (beta~') variance under- and the
    'large' (beta') variance over-disperses, bracketing S^2 = 0.25 (50 steps: 0.197 / 0.262;
    100 steps: 0.219 / 0.257), closer at more steps; the mean is MU to 1e-5."""
    ab = gaussian_model("ddpm").alpha_bar.double().tolist()
    times = trailing(1000, steps)
    x_T = torch.randn(40_000, *SHAPE, generator=torch.Generator().manual_seed(0))
    exact = {}
    for variance in ("small", "large"):
        m = gaussian_model("ddpm", variance=variance)
        exact[variance] = mean, var = exact_moments(ab, times, variance)
        assert mean == pytest.approx(MU, abs=1e-5)
        assert abs(var - S**2) <= (0.06 if steps == 50 else 0.035)
        with torch.no_grad():
            x = m.ancestral(x_T, steps, "trailing", generator=torch.Generator().manual_seed(1))
        assert_moments(x, mean, var)
    assert exact["small"][1] < S**2 < exact["large"][1]
    coarse = {k: exact_moments(ab, trailing(1000, steps // 2), k)[1] for k in exact}
    assert all(abs(exact[k][1] - S**2) < abs(coarse[k] - S**2) for k in exact)
    # DDIM at eta = 1 draws from the same posterior: the same closed form as the 'small' variance
    assert exact_moments(ab, times, "ddim", 1.0) == pytest.approx(exact["small"], rel=1e-9)


@pytest.mark.parametrize("name, variance, v, expect", [
    ("iddpm", None, -1.0, "post"), ("iddpm", None, 1.0, "beta"), ("iddpm", None, 0.0, "mid"),
    ("ddpm", "small", None, "post"), ("ddpm", "large", None, "beta")])
def test_respaced_variance_and_mean_are_those_of_the_respaced_betas(name, variance, v, expect):
    """Per step t -> s of the respaced process (T=40, 8 trailing steps): beta' = 1 - ab_t/ab_s,
    beta~' = beta' (1 - ab_s) / (1 - ab_t) (at the last step, where it is 0, the step before's,
    as improved-diffusion clips it); learned: v = -1 -> beta~', +1 -> beta', 0 -> their geometric
    mean; the mean is the posterior's (sqrt(ab_s) beta' x0 + sqrt(1 - beta') (1 - ab_s) x_t) / (1 - ab_t)."""
    m = models.build(name, shape=(1, 4, 4), levels=17, T=40, **({"variance": variance} if variance else {}))
    ab = m.alpha_bar.double()
    times = trailing(40, 8)
    sch = m.respaced(8, "trailing")
    assert sch["t"].tolist() == times[:-1]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 1, 4, 4, generator=g), 0.3 * torch.randn(3, 1, 4, 4, generator=g)
    out = torch.cat([eps, torch.full_like(eps, v)], 1) if v is not None else eps
    post = []
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        beta = 1 - ab[t] / ab[s]
        post.append(beta * (1 - ab[s]) / (1 - ab[t]) if s > 0 else post[-1])
        want = {"post": post[-1], "beta": beta, "mid": math.sqrt(post[-1] * beta)}[expect]
        d = m.denoised(out, x, m.alpha_bar[sch["t"][i]].view(1, 1, 1, 1))
        mean, logvar = m.respaced_mean_logvar(d, x, sch, i)
        assert torch.allclose(logvar.exp().double(), torch.full(x.shape, float(want), dtype=torch.float64),
                              rtol=1e-4), (i, t, s)
        x0 = ((x.double() - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
        mu = (ab[s].sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab[s]) * x) / (1 - ab[t])
        assert torch.allclose(mean.double(), mu, rtol=1e-4, atol=1e-5), (i, t, s)


@pytest.mark.parametrize("spacing, times", [("trailing", [40, 35, 30, 25, 20, 15, 10, 5]),
                                            ("leading", [36, 31, 26, 21, 16, 11, 6, 1])])
def test_respaced_ancestral_calls_the_network_at_the_original_integer_times(spacing, times):
    m = models.build("iddpm", shape=(1, 4, 4), levels=17, T=40)
    seen, output = [], m.output  # the network's time input, per call (its times: float)
    m.output = lambda x, ab, t: (seen.append(t.tolist()), output(x, ab, t))[1]
    m.sample(2, steps=8, spacing=spacing)
    assert seen == [[t, t] for t in times]


def test_sampler_labels():
    m = models.build("ddpm", shape=(1, 4, 4), levels=17, T=40)
    assert m.sampler_label() == m.sampler_label("ancestral", 40, spacing="leading") == "ancestral, 40 steps"
    assert m.sampler_label("ancestral", 20) == "ancestral, 20 steps, trailing spacing"
    assert m.sampler_label("ancestral", 20, spacing="leading") == "ancestral, 20 steps, leading spacing"
    assert m.sampler_label("ddim", 10, eta=0.5) == "ddim, 10 steps, eta=0.5, trailing spacing"
    assert m.sampler_label("dpm++2m", 10) == "dpm++2m, 10 steps, trailing spacing"
    v = models.build("vdm", shape=(1, 4, 4), levels=17)
    assert v.sampler_label() == "ancestral, 1000 steps, trailing spacing"
    assert [v.sampler_label("ancestral", k) for k in (10, 100)] == [
        "ancestral, 10 steps, trailing spacing", "ancestral, 100 steps, trailing spacing"]


# --------------------------------------------------------------------------- NFE: counted calls


def sampler_settings(name):
    """Every sampler the model supports; ancestral of the diffusion models at a few step counts."""
    cls = models.get(name)
    discrete = "T" in cls.Config.__dataclass_fields__  # T=40 below; vdm: 1000 steps by default
    settings = []
    for sampler in cls.samplers:
        if cls.samplers[sampler] == ONE_SHOT:
            settings.append({})
        elif sampler == "ancestral":
            settings += [{}, {"steps": 1}, {"steps": 10}, {"steps": 40 if discrete else 100}]
            settings += [{"steps": 7, "spacing": "leading"}] if discrete else []
        elif sampler == "ode":
            continue  # adaptive: its NFE is counted, never declared (test_ode.py)
        else:
            settings += [{"sampler": sampler, "steps": k} for k in (1, 5)]
    return settings


@pytest.mark.parametrize("name, kw", [(n, kw) for n in models.names() for kw in sampler_settings(n)])
def test_declared_nfe_is_the_counted_network_calls(name, kw):
    fields = models.get(name).Config.__dataclass_fields__
    m = models.build(name, shape=(1, 4, 4), levels=17, **({"T": 40} if "T" in fields else {}))
    x, speed = draw_samples(m, 3, 2, torch.Generator().manual_seed(0), **kw)  # batches of 2 and 1
    assert speed["nfe"] == speed["nfe_declared"] == m.nfe(**kw)
    assert x.shape == (3, 1, 4, 4) and x.min() >= 0 and x.max() <= 16
    if m.nfe_module() is not None:
        assert not m.nfe_module()._forward_hooks  # the counting hook is removed


def test_each_model_declares_its_network_module():
    built = {n: models.build(n, shape=(1, 4, 4), levels=17) for n in models.names()}
    for name, m in built.items():
        if m.family == "diffusion":
            assert m.nfe_module() is m.net, name
    assert built["vae"].nfe_module() is built["vae"].decoder
    assert built["hvae"].nfe_module() is built["hvae"].out
    assert built["baseline"].nfe_module() is None
    for name, m in built.items():  # sampling precision is declared where a network runs, and only there
        assert m.precision_applies == (m.nfe_module() is not None), name
    # closed form is declared, not guessed: the baseline alone, and it has nothing to train
    assert [n for n, m in built.items() if not m.trains] == ["baseline"]
    assert not any(p.requires_grad for p in built["baseline"].parameters())


def test_one_shot_models_report_one_network_evaluation_per_sample():
    # hvae: its whole top-down pass and decoder head are one evaluation, not one per level
    for name, expect in (("vae", 1), ("hvae", 1), ("baseline", 0)):
        assert models.build(name, shape=(1, 8, 8), levels=17).nfe() == expect


class _Uneven(Model):
    """Calls its network once more on every `sample` call; declares 5."""

    nfe_module_name = "net"

    def __init__(self):
        super().__init__((1, 2, 2), 2, None)
        self.net, self.calls = nn.Linear(1, 1), 0

    def nfe(self, sampler="ancestral", steps=None, **options):
        return 5

    def sample(self, n, generator=None, sampler="ancestral", steps=None, **options):
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("boom")
        for _ in range(self.calls):
            self.net(torch.zeros(1, 1))
        return torch.zeros(n, 1, 2, 2, dtype=torch.long)


def test_draw_samples_reports_the_mean_count_when_batches_differ():
    m = _Uneven()
    x, speed = draw_samples(m, 6, 2)
    assert len(x) == 6 and speed["nfe"] == 2.0 and speed["nfe_declared"] == 5  # calls 1, 2, 3
    assert not m.net._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        draw_samples(m, 2, 2)
    assert not m.net._forward_hooks  # removed on errors too


def test_bf16_precision_runs_the_network_under_autocast_and_nothing_else():
    """precision="bf16": the U-Net's outputs are bfloat16 (autocast), the samples the same
    integers as fp32 in almost every pixel (same noise), and the declared/counted NFE the same."""
    m = models.build("ddpm", shape=(1, 4, 4), levels=17, T=40)
    dtypes = []
    hook = m.net.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    kw = {"sampler": "dpm++2m", "steps": 5}
    x32, s32 = draw_samples(m, 64, 32, torch.Generator().manual_seed(0), **kw)
    n32 = len(dtypes)
    x16, s16 = draw_samples(m, 64, 32, torch.Generator().manual_seed(0), precision="bf16", **kw)
    hook.remove()
    assert set(dtypes[:n32]) == {torch.float32} and set(dtypes[n32:]) == {torch.bfloat16}
    assert s16["nfe"] == s32["nfe"] == 5 and x16.dtype == x32.dtype == torch.long
    assert (x16 == x32).float().mean() > 0.9  # bf16 moves a pixel across a bin edge now and then
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16', got 'fp16'"):
        draw_samples(m, 2, 2, precision="fp16", **kw)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name, kwargs, message", [
    ("vae", {"sampler": "ddim", "steps": 10}, "vae cannot honour sampler 'ddim'; it supports: ancestral"),
    ("vae", {"steps": 10}, "vae: sampler 'ancestral' takes no steps"),
    ("ddpm", {"sampler": "euler"}, "ddpm cannot honour sampler 'euler'"),
    ("ddpm", {"sampler": "ancestral", "steps": 41}, "steps must be in 1..40"),
    ("ddpm", {"sampler": "ancestral", "steps": 0}, "steps must be in 1..40"),
    ("ddpm", {"sampler": "ancestral", "steps": 10, "spacing": "odd"}, "unknown timestep spacing 'odd'"),
    ("ddpm", {"sampler": "ancestral", "eta": 0.5}, "ancestral sampling takes no eta"),
    ("ddpm", {"sampler": "ddim", "steps": 41}, "steps must be in 1..40"),
    ("ddpm", {"sampler": "ddim", "steps": 10, "spacing": "odd"}, "unknown timestep spacing 'odd'"),
    ("ddpm", {"sampler": "ddim", "steps": 10, "eta": 1.01}, "eta must be in [0, 1]"),
    ("ddpm", {"sampler": "dpm++2m", "steps": 10, "eta": 0.5}, "dpm++2m is deterministic"),
    ("vdm", {"sampler": "ancestral", "steps": 10, "spacing": "leading"}, "discrete-time spacing"),
    ("vdm", {"sampler": "ancestral", "steps": 10, "eta": 1.0}, "ancestral sampling takes no eta"),
])
def test_a_sampler_a_model_cannot_honour_is_a_clear_error(name, kwargs, message):
    m = models.build(name, shape=(1, 4, 4), levels=17, **({"T": 40} if name == "ddpm" else {}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+").replace("[", r"\[")):
        m.sample(2, **kwargs)


def test_headline_settings_are_settings_not_measurements(monkeypatch):
    """The headline sampler, steps and precision come from params alone: with every timer and
    the matmul-rate measurement made to fail, the resolved points are those params name, on
    every model, and fp32 by default (bf16 only when asked); the twin in the other precision
    is in the grid only with `sample.precision_check`."""
    from diffusion_models import runtime
    from diffusion_models.config import parse
    from diffusion_models.pipeline.sample import sampler_points

    def no_measuring(*args, **kwargs):
        raise AssertionError("a headline setting was resolved from a measurement")

    monkeypatch.setattr(runtime, "matmul_flops", no_measuring)
    monkeypatch.setattr(runtime.time, "perf_counter", no_measuring)
    for precision, check in [(None, False), (None, True), ("bf16", True)]:
        cfg = parse({"sample": {"precision_check": check, **({"precision": precision} if precision else {})}})
        for name in models.names():
            m = models.build(name, shape=(1, 4, 4), levels=17, **({"T": 40} if name.startswith(("ddpm", "iddpm")) else {}))
            headline, grid = sampler_points(cfg, m)
            assert headline == grid[0]
            if not m.precision_applies:
                assert "precision" not in headline
            else:
                assert headline["precision"] == (precision or "fp32")
                twin = {**headline, "precision": "bf16" if precision is None else "fp32"}
                assert (twin in grid) == check and (not check or grid[1] == twin)
            if "dpm++2m" in m.samplers:
                assert (headline["sampler"], headline["steps"]) == ("dpm++2m", 20)
    assert runtime.matmul_flops is no_measuring  # nothing restored it behind the test's back


def test_the_sampler_grid_reads_the_declared_samplers_of_a_model(monkeypatch):
    """A model of one's own with a stepped sampler and an adaptive one under new names, and no
    network: the grid runs the stepped one at sample.grid's counts and the adaptive one at
    sample.ode_tolerances, with no precision; grid keys no registered model steps are an error."""
    from dataclasses import dataclass

    from diffusion_models.config import parse
    from diffusion_models.models.base import ADAPTIVE, STEPS
    from diffusion_models.pipeline.common import StageError
    from diffusion_models.pipeline.sample import sampler_points

    class Capable(Model):
        samplers = {"ancestral": ONE_SHOT, "mine": STEPS, "my-ode": ADAPTIVE}
        precision_applies = False

        @dataclass
        class Config:
            pass

    monkeypatch.setitem(models._REGISTRY, "capable", Capable)
    m = Capable((1, 4, 4), 17, Capable.Config())
    cfg = parse({"sample": {"sampler": "mine", "steps": 7, "grid": {"mine": [3, 7], "ddim": [10]},
                            "ode_tolerances": [0.1]}})
    headline, grid = sampler_points(cfg, m)
    assert headline == {"sampler": "mine", "steps": 7, "spacing": "trailing"}
    assert grid == [headline, {"sampler": "mine", "steps": 3, "spacing": "trailing"},
                    {"sampler": "my-ode", "steps": None, "rtol": 0.1, "atol": 0.1}]
    vae = models.build("vae", shape=(1, 4, 4), levels=17)  # one-shot, a network: its default, in fp32
    assert sampler_points(cfg, vae) == ({"precision": "fp32"}, [{"precision": "fp32"}])
    for bad in ({"grid": {"my-ode": [3]}}, {"sampler": "nope"}):  # adaptive: no steps; unknown
        with pytest.raises(StageError, match="unknown sampler"):
            sampler_points(parse({"sample": bad}), m)
    with pytest.raises(ValueError, match="sampler 'my-ode' is adaptive: it takes rtol/atol, not steps"):
        m.check_sampler("my-ode", 5, {})
    with pytest.raises(ValueError, match="sampler 'ancestral' takes no steps"):
        m.check_sampler("ancestral", 5, {})


def test_categorical_draws_from_bf16_logits_keep_their_small_levels():
    """Logits from a bf16 network: the inverse-CDF draw runs in fp32, so a level at p = 0.002
    (below bf16's 2^-8 resolution of a cumulative sum near 1) is drawn at its rate. Chi-square
    of 10^6 draws against the exact probabilities of those bf16 logits."""
    from scipy import stats

    from diffusion_models import likelihood as lk

    p = torch.tensor([0.002, 0.003, 0.195, 0.3, 0.5], dtype=torch.float64)
    logits = p.log().to(torch.bfloat16)
    exact = torch.softmax(logits.double(), -1)
    n = 1_000_000
    draws = lk.sample_categorical(logits.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(p)).double()
    chi2 = ((counts - n * exact) ** 2 / (n * exact)).sum().item()
    assert stats.chi2.sf(chi2, len(p) - 1) > 1e-3, (counts / n, exact)
    assert abs(counts[0].item() / n - exact[0].item()) < 5 * math.sqrt(exact[0].item() / n)
