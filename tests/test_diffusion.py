"""Discrete-time diffusion bounds: analytic Gaussian checks and parameterisation identities."""
import math

import pytest
import torch
from scipy import stats

from diffusion_models import models
from diffusion_models.models.diffusion import make_betas

SHAPE = (1, 2, 2)  # D = 4


def optimal_eps(m, mu, s):
    """E[eps | x_t] for x_0 ~ N(mu, s^2): x_t = sqrt(ab) x_0 + sqrt(1-ab) eps is jointly Gaussian,
    Cov(eps, x_t) = sqrt(1-ab), Var(x_t) = ab s^2 + 1 - ab."""
    def output(x_t, ab, t):  # the model's `output` (its eps prediction) at alpha_bar ab
        ab = ab.double()
        return (torch.sqrt(1 - ab) * (x_t.double() - ab.sqrt() * mu) / (ab * s**2 + 1 - ab)).float()
    return output


def gaussian_gap(T, n=2000, mu=0.3, s=0.5, seed=0):
    """Mean (VLB - exact NLL) in nats/dim on continuous Gaussian data, with its standard error."""
    torch.manual_seed(seed)
    # continuous, unbounded data: no clipping, and sigma_t^2 = beta_t (the true reverse variance
    # of continuous data as T grows; beta~_t at t = 1 would be a too-narrow continuous decoder)
    m = models.build("ddpm", shape=SHAPE, levels=256, T=T, clip_x0=False, variance="large")
    m.output = optimal_eps(m, mu, s)
    x0 = mu + s * torch.randn(n, *SHAPE)
    with torch.no_grad():
        terms = m._vlb_terms(x0, None, t_samples=0, chunk=1 << 16)[0]
    vlb = sum(terms.values()).double().numpy()
    exact = -stats.norm.logpdf(x0.double().numpy(), mu, s).reshape(n, -1).sum(1)
    gap = (vlb - exact) / 4
    return gap.mean(), gap.std(ddof=1) / math.sqrt(n)


def test_optimal_denoiser_bound_is_valid_and_tightens_with_T():
    gaps = {T: gaussian_gap(T, n=10_000) for T in (25, 100, 1000)}  # measured: .038, .012, .003 (se .005)
    for T, (g, se) in gaps.items():
        assert g >= -3 * se, (T, g, se)            # a valid bound: never below the exact NLL
    assert gaps[25][0] > gaps[100][0] > gaps[1000][0]
    assert gaps[25][0] - gaps[1000][0] > 3 * math.hypot(gaps[25][1], gaps[1000][1])
    assert gaps[1000][0] < 0.015                   # nats/dim: close to exact at T = 1000


def _random_eps_net(m):
    torch.manual_seed(123)
    for p in m.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.output


@pytest.mark.parametrize("target", ["ddpm_x0", "ddpm_score"])
def test_parameterisations_give_the_same_vlb(target):
    """Luo (2022) identities: x0 = (x_t - sqrt(1-ab) eps)/sqrt(ab), score = -eps/sqrt(1-ab)."""
    eps_model = models.build("ddpm", shape=(1, 8, 8), levels=17, T=50, clip_x0=False)
    f = _random_eps_net(eps_model)
    other = models.build(target, shape=(1, 8, 8), levels=17, T=50, clip_x0=False)

    def converted(x_t, ab, t):
        eps = f(x_t, ab, t)
        if target == "ddpm_x0":
            return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return -eps / (1 - ab).sqrt()

    other.output = converted
    x = torch.randint(0, 17, (16, 1, 8, 8))
    torch.manual_seed(7)
    a = eps_model.nll_terms(x, t_samples=0)
    torch.manual_seed(7)
    b = other.nll_terms(x, t_samples=0)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3), k


def test_stratified_estimator_is_unbiased():
    m = models.build("ddpm", shape=(1, 8, 8), levels=17, T=40)
    _random_eps_net(m)
    x = torch.randint(0, 17, (8, 1, 8, 8)).repeat(200, 1, 1, 1)  # 200 repeats of 8 examples
    torch.manual_seed(0)
    exact = m.nll_terms(x, t_samples=0)["diffusion"].view(200, 8).double()
    torch.manual_seed(1)
    est = m.nll_terms(x, t_samples=5)["diffusion"].view(200, 8).double()
    diff = est.mean(0) - exact.mean(0)
    se = (est.var(0) / 200 + exact.var(0) / 200).sqrt()
    assert (diff.abs() < 4 * se + 1e-6).all()


def test_log_spaced_strata_are_unbiased_and_lower_variance_than_uniform():
    """The default estimator (lowest t summed exactly, geometric strata above) has the exact
    sum's mean and a smaller variance than equal-width strata at the same cost, on a model
    whose terms fall steeply with t (as a trained eps model's do)."""
    m = models.build("ddpm", shape=(1, 4, 4), levels=17, T=200)
    _random_eps_net(m)
    x = torch.randint(0, 17, (8, 1, 4, 4)).repeat(100, 1, 1, 1)  # 100 repeats of 8 examples
    runs = {}
    for seed, (k, spacing) in enumerate([(0, "log"), (10, "log"), (10, "uniform")]):
        torch.manual_seed(seed)
        runs[k, spacing] = m.nll_terms(x, t_samples=k, spacing=spacing)["diffusion"].view(100, 8).double()
    exact = runs[0, "log"]
    for key in [(10, "log"), (10, "uniform")]:
        diff = runs[key].mean(0) - exact.mean(0)
        se = (runs[key].var(0) / 100 + exact.var(0) / 100).sqrt()
        assert (diff.abs() < 4 * se + 1e-6).all(), key
    var_log, var_uniform = runs[10, "log"].var(0).mean(), runs[10, "uniform"].var(0).mean()
    assert var_log < 0.5 * var_uniform, (var_log, var_uniform)


def test_strata_cover_every_t_once():
    from diffusion_models.models.diffusion import t_strata

    for T, k in [(1000, 50), (40, 5), (40, 38), (40, 39), (40, 0)]:
        for spacing in ("log", "uniform"):
            e = t_strata(T, k, spacing)
            assert e[0] == 2 and e[-1] == T + 1 and (e[1:] > e[:-1]).all()
            assert len(e) - 1 == (T - 1 if k in (0,) or k >= T - 1 else k)
    log = t_strata(1000, 50, "log")
    assert (log[1:8] - log[:7] == 1).all()  # the lowest t: one term per stratum, summed exactly


def test_iddpm_hybrid_loss_is_l_simple_plus_lambda_l_vlb_in_bits_per_dim():
    """Nichol & Dhariwal (2021) eq. 16 as improved-diffusion computes it: L_simple + lambda T
    L_{t-1} with L_{t-1} the per-dimension mean KL in bits, the mean detached; computed here
    from the closed-form posterior with torch.distributions (t >= 2, no x0 clipping)."""
    from torch.distributions import Normal, kl_divergence

    T = 100
    m = models.build("iddpm", shape=(1, 4, 4), levels=17, T=T, clip_x0=False)
    for p in m.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 17, (6, 1, 4, 4))
    t = torch.tensor([2, 3, 10, 40, 77, 100])
    m.sample_t = lambda n, device: t
    torch.manual_seed(5)
    loss = m.loss(x)
    torch.manual_seed(5)
    eps = torch.randn(6, 1, 4, 4)
    betas = make_betas("cosine", T).double()
    ab = torch.cumprod(1 - betas, 0)  # ab[i] = alpha_bar_{i+1}
    ab_t, ab_s, b_t = ab[t - 1].view(-1, 1, 1, 1), ab[t - 2].view(-1, 1, 1, 1), betas[t - 1].view(-1, 1, 1, 1)
    x0 = (x.double() / 16) * 2 - 1
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps.double()
    with torch.no_grad():
        out = m.net(x_t.float(), ab_t.sqrt().float(), t.float() * 1000 / T).double()
    eps_hat, v = out[:, :1], out[:, 1:]
    l_simple = ((eps_hat - eps.double()) ** 2).flatten(1).mean(1)
    tilde = b_t * (1 - ab_s) / (1 - ab_t)
    q = Normal(ab_s.sqrt() * b_t / (1 - ab_t) * x0 + (1 - b_t).sqrt() * (1 - ab_s) / (1 - ab_t) * x_t, tilde.sqrt())
    mean_p = (x_t - b_t / (1 - ab_t).sqrt() * eps_hat) / (1 - b_t).sqrt()
    frac = (v + 1) / 2
    p = Normal(mean_p, torch.exp(0.5 * (frac * b_t.log() + (1 - frac) * tilde.log())))
    l_vlb_bits = kl_divergence(q, p).flatten(1).mean(1) / math.log(2)
    expected = (l_simple + 0.001 * T * l_vlb_bits).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_every_diffusion_model_has_the_same_network_inputs():
    """One place (nets.Denoiser) decides what a diffusion network sees: x_t plus the Fourier
    features of x_t / alpha_t; every diffusion variant in the registry uses it the same way."""
    from diffusion_models.nets import Denoiser

    inputs = {}
    for name in models.names():
        m = models.build(name, shape=(1, 8, 8), levels=17)
        if m.family != "diffusion":
            continue
        assert isinstance(m.net, Denoiser), name
        seen = []
        m.net.unet.inp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
        m.loss(torch.randint(0, 17, (4, 1, 8, 8)))
        inputs[name] = (m.net.octaves, seen[0])
    assert set(inputs) >= {"ddpm", "ddpm_x0", "ddpm_score", "iddpm", "vdm"}
    assert len(set(inputs.values())) == 1 and inputs["vdm"] == ((0,), 3), inputs


def test_schedules():
    lin = make_betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    cos = make_betas("cosine", 1000)
    ab = torch.cumprod(1 - cos, 0)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic", 10)


def test_iddpm_variance_is_learned_between_beta_tilde_and_beta():
    m = models.build("iddpm", shape=(1, 8, 8), levels=17, T=100)
    x_t, t = torch.randn(4, 1, 8, 8), torch.tensor([2, 10, 50, 100])
    for v in (-1.0, 1.0):
        out = torch.cat([torch.zeros(4, 1, 8, 8), torch.full((4, 1, 8, 8), v)], 1)
        _, logvar = m.mean_logvar(m.denoised(out, x_t, m._bcast(m.alpha_bar, t)), x_t, t)
        ref = m.log_post_var if v < 0 else m.log_beta
        assert torch.allclose(logvar[:, 0, 0, 0], ref[t])
    assert m.cfg.schedule == "cosine" and m.cfg.hybrid_lambda == 0.001


def test_reconstruction_term_is_a_discrete_probability():
    """At t = 1 the decoder puts probability <= 1 on each integer image: term >= 0."""
    m = models.build("ddpm", shape=(1, 8, 8), levels=17, T=100)
    x = torch.randint(0, 17, (32, 1, 8, 8))
    terms = m.nll_terms(x, t_samples=10)
    assert (terms["reconstruction"] >= 0).all() and (terms["prior"] >= 0).all()
    assert (terms["diffusion"] >= 0).all()


@pytest.mark.parametrize("name", ["ddpm_x0", "ddpm_score"])
def test_matching_weights_equal_the_vlb_kl(name):
    """lambda(t) used to sample training times equals the KL term's weight on the squared
    error of this target, checked against the model's own KL (variance beta~_t)."""
    m = models.build(name, shape=(1, 8, 8), levels=17, T=100, clip_x0=False).double()  # exact arithmetic
    lam = m.vlb_weight()
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.double) * 2 - 1
    eps = torch.randn_like(x0)
    delta = 0.01
    for step in (2, 10, 60, 100):
        t = torch.full((3,), step)
        x_t = m.q_sample(x0, t, eps)
        ab = m.alpha_bar[t].view(-1, 1, 1, 1)
        exact = x0 if name == "ddpm_x0" else -eps / (1 - ab).sqrt()
        mean, logvar = m.mean_logvar(m.denoised(exact + delta, x_t, ab), x_t, t)
        kl = m.step_term(x0, x_t, t, mean, logvar)
        assert torch.allclose(kl, lam[step] * delta**2 * 64 * torch.ones(3, dtype=torch.double),
                              rtol=1e-6), (step, kl, lam[step] * delta**2 * 64)
    # t = 1: the decoder term (continuous density here) -log N(x0; x0_hat, var), whose excess
    # over the exact prediction is the same lambda(1) delta^2 per dimension
    t = torch.ones(3, dtype=torch.long)
    x_t = m.q_sample(x0, t, eps)
    exact = x0 if name == "ddpm_x0" else -eps / (1 - m.alpha_bar[1]).sqrt()
    ab = m._bcast(m.alpha_bar, t)
    nll = [m.step_term(x0, x_t, t, *m.mean_logvar(m.denoised(exact + d, x_t, ab), x_t, t)) for d in (delta, 0.0)]
    assert torch.allclose(nll[0] - nll[1], lam[1] * delta**2 * 64 * torch.ones(3, dtype=torch.double), rtol=1e-6)
    # every time the bound and the samplers use is trained, t = 1 (L_0, the last step) too
    assert m.t_probs[0] == 0 and m.t_probs[1] > 0 and (m.t_probs[1:] > 0).all()
    assert m.t_probs.sum().item() == pytest.approx(1.0)
    assert m.t_probs[1].item() == pytest.approx(m.t_probs[2].item() * (lam[1] / lam[2]).item()
                                                * (m.skip_and_scale(m.alpha_bar[1:3])[1] ** 2).div(
                                                    m.skip_and_scale(m.alpha_bar[1:3])[1][1] ** 2)[0].item(), rel=1e-4)


def test_x0_preconditioning_skip_is_the_wiener_denoiser():
    """With the U-Net output at zero, the preconditioned x0 model is the optimal (Wiener)
    denoiser of N(0, sigma_data^2) data, so its VLB equals the eps model with the analytic
    optimal eps (computed independently above) on the same noise."""
    sd = 0.5
    x0_model = models.build("ddpm_x0", shape=SHAPE, levels=256, T=100, clip_x0=False,
                            variance="large", sigma_data=sd)
    for p in x0_model.net.parameters():
        torch.nn.init.zeros_(p)
    ref = models.build("ddpm", shape=SHAPE, levels=256, T=100, clip_x0=False, variance="large")
    ref.output = optimal_eps(ref, 0.0, sd)
    x0 = sd * torch.randn(256, *SHAPE)
    with torch.no_grad():
        torch.manual_seed(3)
        a = x0_model._vlb_terms(x0, None, t_samples=0, chunk=1 << 16)[0]
        torch.manual_seed(3)
        b = ref._vlb_terms(x0, None, t_samples=0, chunk=1 << 16)[0]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3), k
