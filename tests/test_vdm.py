"""Independent checks of the Variational Diffusion Model (continuous-time VLB, learned schedule)."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from diffusion_models import data, models
from diffusion_models.config import EvalConfig, TrainConfig
from diffusion_models.likelihood import to_unit
from diffusion_models.train import train
from helpers import SHAPES, digits_train, uniform

@pytest.mark.parametrize("shape,levels", SHAPES.values())
def test_builds_with_matched_size_and_finite_loss(shape, levels):
    m = models.build("vdm", shape=shape, levels=levels)
    assert abs(m.num_params() - 86_000) <= 0.05 * 86_000, m.num_params()
    loss = m.loss(uniform(4, shape, levels))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()  # double backward through gamma'(t) works
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.gamma.gamma_min.grad is not None and m.gamma.gamma_max.grad is not None


def test_terms_sum_to_bound_and_options_are_checked():
    m = models.build("vdm", shape=(1, 8, 8), levels=17)
    x = uniform(6)
    torch.manual_seed(3)
    terms = m.nll_terms(x, t_samples=7, chunk=10)  # chunk < B*K: several U-Net passes
    torch.manual_seed(3)
    bound = m.nll_bound(x, t_samples=7, chunk=10)
    assert set(terms) == {"prior", "diffusion", "reconstruction"}
    assert all(v.shape == (6,) and not v.requires_grad for v in terms.values())
    assert torch.allclose(sum(terms.values()), bound)
    with pytest.raises(ValueError, match="continuous-time.*t_samples >= 1"):
        m.nll_bound(x, t_samples=0)
    with pytest.raises(ValueError, match="bogus"):
        m.nll_bound(x, bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        m.sample(2, bogus=1)
    est = m.estimators(EvalConfig(t_samples=50))[0]  # the VLB (the ODE bound: test_ode.py)
    assert est.kind == "vlb" and "VLB-continuous" in est.label and "50" in est.label and est.options["t_samples"] == 50


def test_gamma_strictly_increasing_with_exact_endpoints():
    m = models.build("vdm", shape=(1, 8, 8), levels=17)
    s = m.gamma
    with torch.no_grad():  # a random, far-from-init monotone network must stay monotone
        for p in (s.w1, s.w2, s.b2, s.w3):
            p.add_(3 * torch.randn_like(p))
        s.gamma_min.fill_(-7.5)
        s.gamma_max.fill_(6.25)
        g = s(torch.linspace(0, 1, 10_001).double().float())
    assert (g.diff() > 0).all()
    assert g[0].item() == pytest.approx(-7.5, abs=1e-5) and g[-1].item() == pytest.approx(6.25, abs=1e-5)


def _curved_schedule():
    s = models.build("vdm", shape=(1, 8, 8), levels=17).gamma.double()
    with torch.no_grad():
        s.w2.mul_(4)
        s.w3.add_(2.0)  # a clearly non-linear schedule
    return s


def test_gamma_derivative_matches_finite_difference():
    s = _curved_schedule()
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.double)
    _, dgamma = s.with_derivative(t)
    h = 1e-5
    with torch.no_grad():
        fd = (s(t + h) - s(t - h)) / (2 * h)
    assert torch.allclose(dgamma, fd, rtol=1e-6, atol=1e-6)
    assert dgamma.std() > 0.05 * dgamma.mean()  # non-linear indeed


def test_gamma_derivative_and_its_parameter_gradients_match_autograd():
    """The closed-form gamma'(t) against autograd's d gamma / dt, and the gradients a loss in
    gamma'(t) sends to the schedule's parameters against double backward (create_graph)."""
    s = _curved_schedule()
    t = torch.rand(40, dtype=torch.double)
    w = torch.randn(40, dtype=torch.double)
    gamma, dgamma = s.with_derivative(t)
    tt = t.clone().requires_grad_(True)
    ref_gamma = s(tt)
    (ref_dgamma,) = torch.autograd.grad(ref_gamma.sum(), tt, create_graph=True)
    assert torch.allclose(gamma, ref_gamma) and torch.allclose(dgamma, ref_dgamma, rtol=1e-12)
    params = list(s.parameters())
    got = torch.autograd.grad((w * gamma).sum() + (dgamma**2 * w).sum(), params)
    ref = torch.autograd.grad((w * ref_gamma).sum() + (ref_dgamma**2 * w).sum(), params)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


def test_decoder_is_a_normalized_categorical_and_prior_kl_matches_torch():
    m = models.build("vdm", shape=(1, 8, 8), levels=17)
    with torch.no_grad():
        m.gamma.gamma_min.fill_(-6.0)
        g0, g1 = m.gamma.gamma_min, m.gamma.gamma_max
        z0 = torch.randn(5, 1, 8, 8)
        logp = m._decoder_logits(z0).double()  # [5,1,8,8,17]
        assert torch.allclose(torch.logsumexp(logp, -1), torch.zeros(5, 1, 8, 8, dtype=torch.double), atol=1e-5)
        # independently: Gaussian likelihood of z_0 under each bin centre, renormalised over the bins
        alpha0, sigma0 = torch.sigmoid(-g0).sqrt(), torch.sigmoid(g0).sqrt()
        centres = torch.linspace(-1, 1, 17)
        ref = Normal(alpha0 * centres, sigma0).log_prob(z0[..., None]).double()
        assert torch.allclose(logp, ref - torch.logsumexp(ref, -1, keepdim=True), atol=1e-4)

        x = uniform(8)
        xu = to_unit(x, 17)
        q = Normal(torch.sigmoid(-g1).sqrt() * xu, torch.sigmoid(g1).sqrt())
        expected = kl_divergence(q, Normal(0.0, 1.0)).flatten(1).sum(1)
        assert torch.allclose(m.nll_terms(x)["prior"], expected, rtol=1e-4, atol=1e-6)


def test_gaussian_data_optimal_predictor_gives_exact_bound():
    """Analytic check of the continuous-time diffusion loss and of the whole VLB.

    Data x ~ N(mu, s^2) per dimension; z_t = alpha x + sigma eps, so z_t ~ N(alpha mu, v) with
    v = alpha^2 s^2 + sigma^2 and Cov(eps, z_t) = sigma. The optimal predictor is
    eps*(z_t) = E[eps | z_t] = sigma (z_t - alpha mu) / v, with residual variance
    Var(eps | z_t) = 1 - sigma^2 / v = alpha^2 s^2 / v = s^2 / (s^2 + e^gamma) (divide by alpha^2;
    e^gamma = sigma^2 / alpha^2). Hence, per dimension and averaged over x,
      E[diffusion] = 0.5 int_0^1 gamma'(t) s^2/(s^2 + e^gamma(t)) dt = 0.5 int_{g0}^{g1} s^2/(s^2+e^g) dg
                   = 0.5 [log(1 + s^2 e^-g0) - log(1 + s^2 e^-g1)]          (any monotone schedule).
    With the continuous decoder N(x; z_0/alpha_0, e^g0), E[-log p(x|z_0)] = 0.5 (log 2 pi + g0 + 1),
    and E[prior] = 0.5 (sigma_1^2 + alpha_1^2 (mu^2 + s^2) - 1 - log sigma_1^2). Their sum is
    >= the entropy 0.5 log(2 pi e s^2) = E[-log N(x; mu, s^2)], with equality as g0 -> -inf and
    g1 -> +inf. The Monte Carlo estimate with the model's (non-linear) schedule and gamma' must
    match the closed form, and the gap to scipy's exact NLL of the same x must shrink to ~0.
    """
    mu, s, n = 0.3, 0.5, 16384
    m = models.build("vdm", shape=(1, 8, 8), levels=17)
    with torch.no_grad():
        m.gamma.w3.add_(2.0)  # non-linear schedule: the bound must not depend on its shape

    def eps_opt(z, gamma):
        g = gamma[:, None, None, None]
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        return sigma * (z - alpha * mu) / (alpha**2 * s**2 + sigma**2)

    gen = torch.Generator().manual_seed(0)
    x = (mu + s * torch.randn(n, 1, 8, 8, generator=gen)).double()
    exact = -norm.logpdf(x.numpy(), mu, s).reshape(n, -1).mean(1)  # nats/dim per example
    m.double()
    gaps = []
    for g0, g1 in [(-2.0, 1.0), (-6.0, 4.0), (-13.3, 5.0), (-20.0, 12.0)]:
        with torch.no_grad():
            m.gamma.gamma_min.fill_(g0)
            m.gamma.gamma_max.fill_(g1)
            t = ((torch.arange(n) + torch.rand(n, generator=gen)) / n)[torch.randperm(n, generator=gen)]
            diff = m._diffusion_term(x, t.double(), eps_opt).numpy() / 64
            prior = m._prior_term(x).numpy() / 64
        e = torch.randn(x.shape, generator=gen, dtype=torch.double)
        a0, s0 = math.sqrt(1 / (1 + math.exp(g0))), math.sqrt(1 / (1 + math.exp(-g0)))
        z0 = a0 * x + s0 * e
        recon = -norm.logpdf(x.numpy(), z0.numpy() / a0, math.exp(g0 / 2)).reshape(n, -1).mean(1)
        se = diff.std() / math.sqrt(n)
        closed = 0.5 * (math.log1p(s**2 * math.exp(-g0)) - math.log1p(s**2 * math.exp(-g1)))
        assert diff.mean() == pytest.approx(closed, abs=4 * se + 1e-4), (g0, g1)
        gap = prior + diff + recon - exact  # per example, nats/dim
        gap_se = gap.std() / math.sqrt(n)
        a1sq = 1 / (1 + math.exp(g1))
        closed_gap = (0.5 * (1 - a1sq + a1sq * (mu**2 + s**2) - 1 - math.log(1 - a1sq)) + closed
                      + 0.5 * (math.log(2 * math.pi) + g0 + 1) - 0.5 * math.log(2 * math.pi * math.e * s**2))
        assert gap.mean() >= -3 * gap_se
        assert gap.mean() == pytest.approx(closed_gap, abs=4 * gap_se + 1e-4), (g0, g1)
        gaps.append(closed_gap)
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1 and gaps[-1] < 1e-4


# The bound on uniform data (>= log2 L) is checked registry-wide in tests/test_models.py.


def test_short_digits_training_is_finite():
    ds = data.load("digits", "train")
    x = torch.from_numpy(ds.images).long()
    m = models.build("vdm", shape=ds.shape, levels=ds.levels)
    losses = []
    res = train(m, x, TrainConfig(images=20_000, log_every=10), log=lambda s, n, v: losses.append(v["train/loss"]),
                progress=False)
    assert np.isfinite(losses).all() and math.isfinite(res.final_loss)
    assert torch.isfinite(m.nll_bound(x[:16], t_samples=4)).all()
    s = m.sample(3, generator=torch.Generator().manual_seed(0), steps=20)
    assert s.shape == (3, 1, 8, 8) and s.dtype == torch.long and 0 <= s.min() and s.max() <= 16


def _diffusion_draws(m, x, reps):
    """One-sample estimates of the diffusion term per image (one uniform t each): [reps * B], nats."""
    xu = to_unit(x, m.levels)
    with torch.no_grad():
        return torch.cat([m._diffusion_term(xu, torch.rand(len(x))) for _ in range(reps)]).double()


def test_vlb_gradient_on_the_schedule_interior_has_mean_zero():
    """The continuous-time diffusion loss does not depend on the schedule's shape between its
    endpoints (the network sees t only through gamma), so under the VLB alone ('vlb') the
    interior's gradient is noise of mean zero: 400 draws, every interior coordinate within 4 SE
    of 0 while single draws are far from it. The endpoints' gradient is not zero-mean."""
    torch.manual_seed(0)
    m = models.build("vdm", shape=(1, 4, 4), levels=17, width=8, schedule_interior="vlb", schedule_width=4)
    x = uniform(32, (1, 4, 4))
    xu = to_unit(x, 17)
    grads, ends = [], []
    for _ in range(400):
        m.zero_grad()
        (m._diffusion_term(xu, torch.rand(len(x))).mean()).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.gamma.interior()]))
        ends.append(m.gamma.gamma_max.grad.clone())
    g = torch.stack(grads).double()
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    assert ((mean / se).abs() < 4).all(), mean / se
    assert (g.std(0) > 0).all()
    e = torch.stack(ends).double()
    assert (e.mean() / (e.std() / math.sqrt(len(e)))).abs() > 10  # the endpoint does move the bound


def test_variance_objective_lowers_the_estimators_variance_and_keeps_its_mean():
    """VDM's schedule learning on a trained model: with the network and the endpoints frozen,
    training the interior on the variance objective lowers the one-sample diffusion term's
    variance well below the (fixed) schedule's it started from, and leaves the term's mean
    where it was (the invariance), within 3 SE."""
    torch.manual_seed(0)
    x = digits_train()[:512]
    m = models.build("vdm", shape=(1, 8, 8), levels=17, width=16, schedule_interior="fixed")
    train(m, x, TrainConfig(images=12_800, batch_size=128, log_every=1000), progress=False)
    torch.manual_seed(1)
    before = _diffusion_draws(m, x[:256], 16)
    for p in m.parameters():
        p.requires_grad_(False)
    for p in m.gamma.interior():
        p.requires_grad_(True)
    m.cfg.schedule_interior = "variance"
    opt = torch.optim.Adam(m.gamma.interior(), lr=2e-2)
    for step in range(150):
        batch = x[torch.randint(0, len(x), (128,))]
        opt.zero_grad()
        m.loss(batch).backward()
        opt.step()
    torch.manual_seed(1)
    after = _diffusion_draws(m, x[:256], 16)
    assert after.var() < 0.8 * before.var(), (after.var(), before.var())
    se = math.sqrt(before.var() / len(before) + after.var() / len(after))
    assert abs(after.mean() - before.mean()) < 3 * se, (after.mean(), before.mean(), se)


def test_schedule_interior_options():
    with pytest.raises(ValueError, match="schedule_interior must be one of variance, vlb, fixed"):
        models.build("vdm", shape=(1, 4, 4), levels=17, schedule_interior="learned")
    fixed = models.build("vdm", shape=(1, 4, 4), levels=17, schedule_interior="fixed")
    assert not any(p.requires_grad for p in fixed.gamma.interior()) and fixed.gamma.gamma_max.requires_grad
