"""Samplers: accuracy with the analytically optimal denoiser, determinism, NFE counts, errors."""
import pytest
import torch

from diffusion_models import models
from diffusion_models.samplers import solve

SHAPE = (1, 2, 2)
MU, S = 0.3, 0.5  # data: i.i.d. N(MU, S^2) per dimension


def optimal_eps(x_t, alpha, sigma):
    """E[eps | x_t] for x_0 ~ N(MU, S^2), x_t = alpha x_0 + sigma eps (jointly Gaussian)."""
    return sigma * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def gaussian_model(name):
    """A diffusion model whose network is replaced by the optimal denoiser of the Gaussian data."""
    m = models.build(name, shape=SHAPE, levels=256, **({"T": 1000, "clip_x0": False} if name != "vdm" else {}))
    if name == "vdm":
        def eps_hat(z, gamma):
            g = gamma.double().view(-1, 1, 1, 1)
            return optimal_eps(z.double(), torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()).float()
        m.eps_hat = eps_hat
    else:
        def denoise(x_t, t):
            ab = m.alpha_bar.double()[t].view(-1, 1, 1, 1)
            return optimal_eps(x_t.double(), ab.sqrt(), (1 - ab).sqrt()).float()
        m.denoise = denoise
    return m


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


def test_ddim_is_deterministic_given_the_seed_and_eta_adds_noise():
    m = models.build("ddpm", shape=(1, 8, 8), levels=17, T=100)
    draw = lambda seed, **kw: m.sample(16, generator=torch.Generator().manual_seed(seed), sampler="ddim", **kw)  # noqa: E731
    assert torch.equal(draw(0, steps=10), draw(0, steps=10))
    assert torch.equal(draw(0, steps=10, eta=1.0), draw(0, steps=10, eta=1.0))
    assert not torch.equal(draw(0, steps=10), draw(1, steps=10))
    with torch.no_grad():  # eta > 0 draws fresh noise at each step: a different trajectory
        assert not torch.equal(draw(0, steps=10, eta=0.0), draw(0, steps=10, eta=1.0))


@pytest.mark.parametrize("name", ["ddpm", "ddpm_x0", "iddpm", "vdm"])
@pytest.mark.parametrize("sampler, steps", [("ancestral", None), ("ddim", 7), ("dpm++2m", 5), ("dpm++2m", 1)])
def test_reported_nfe_equals_network_calls(name, sampler, steps):
    m = models.build(name, shape=(1, 8, 8), levels=17, **({"T": 40} if name != "vdm" else {}))
    if name == "vdm" and steps is None:
        steps = 40  # vdm's ancestral sampler takes any number of steps (default 1000)
    calls = []
    m.net.register_forward_hook(lambda *a: calls.append(1))
    x = m.sample(3, sampler=sampler, steps=steps)
    assert len(calls) == m.nfe(sampler=sampler, steps=steps)
    assert x.shape == (3, 1, 8, 8) and x.min() >= 0 and x.max() <= 16


def test_latent_models_report_one_decoder_pass_per_level():
    for name, expect in (("vae", 1), ("hvae", 4), ("baseline", 0)):
        assert models.build(name, shape=(1, 8, 8), levels=17).nfe() == expect


@pytest.mark.parametrize("name, kwargs, message", [
    ("vae", {"sampler": "ddim", "steps": 10}, "vae cannot honour sampler 'ddim'; it supports: ancestral"),
    ("vae", {"steps": 10}, "vae: sampler 'ancestral' takes no steps"),
    ("ddpm", {"sampler": "euler"}, "ddpm cannot honour sampler 'euler'"),
    ("ddpm", {"sampler": "ancestral", "steps": 10}, "ancestral sampling runs all T=40 steps"),
    ("ddpm", {"sampler": "ddim", "steps": 41}, "steps must be in 1..40"),
    ("ddpm", {"sampler": "ddim", "steps": 10, "spacing": "odd"}, "unknown timestep spacing 'odd'"),
    ("ddpm", {"sampler": "dpm++2m", "steps": 10, "eta": 0.5}, "dpm++2m is deterministic"),
])
def test_a_sampler_a_model_cannot_honour_is_a_clear_error(name, kwargs, message):
    m = models.build(name, shape=(1, 8, 8), levels=17, **({"T": 40} if name == "ddpm" else {}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        m.sample(2, **kwargs)
