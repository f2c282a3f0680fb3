"""The probability-flow ODE (ode.py) against closed forms: the Gaussian oracle's exact density,
autograd's Jacobian trace, exact discrete NLLs of independent categorical pixels."""
import math

import pytest
import torch
from torch import nn

from diffusion_models import config, likelihood as lk, models, ode
from diffusion_models.nets import UNet

SHAPE, LEVELS = (1, 4, 4), 17
TIGHT = ode.ODESettings("dopri5", 1e-6, 1e-6)


class GaussianOracle(nn.Module):
    """The optimal network of `model` for data x_0 ~ N(mu, s^2) per dimension: given z = alpha x_0
    + sigma eps it returns the raw output whose prediction (after the model's preconditioning)
    is the exact E[eps|z], E[x_0|z] or grad log p(z), by the model's target."""

    def __init__(self, model, mu: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.model, self.mu, self.s = [model], mu, s

    def forward(self, z, alpha, time):
        sig2 = 1 - alpha**2
        v = alpha**2 * self.s**2 + sig2
        x0 = self.mu + alpha * self.s**2 * (z - alpha * self.mu) / v
        eps = (z - alpha * x0) / sig2.sqrt()
        m = self.model[0]
        target = getattr(m, "target", "eps")
        out = {"eps": eps, "x0": x0, "score": -(z - alpha * self.mu) / v}[target]
        if hasattr(m, "skip_and_scale"):  # undo the preconditioning: out = (target - skip z) / scale
            skip, scale = m.skip_and_scale(alpha**2)
            out = (out - skip * z) / scale
        if getattr(m.cfg, "learn_sigma", False):
            out = torch.cat([out, torch.zeros_like(out)], 1)
        return out


class MixtureOracle(nn.Module):
    """The optimal eps network for independent categorical pixels with probabilities pi [D, L]
    on the bin centres: E[eps|z] under the per-dimension Gaussian mixture p(z)."""

    def __init__(self, probs: torch.Tensor, levels: int):
        super().__init__()
        self.logp, self.centres = probs.log(), lk.to_unit(torch.arange(levels), levels)

    def forward(self, z, alpha, time):
        sig2 = 1 - alpha**2
        logw = self.logp.view(1, *z.shape[1:], -1) - 0.5 * (z[..., None] - alpha[..., None] * self.centres) ** 2 / sig2[..., None]
        x0 = (torch.softmax(logw, -1) * self.centres).sum(-1)
        return (z - alpha * x0) / sig2.sqrt()


def with_oracle(name, oracle_fn, shape=SHAPE, levels=LEVELS, **overrides):
    m = models.build(name, shape=shape, levels=levels, **overrides).double()
    m.net = oracle_fn(m)
    return m.eval()


def gaussian_expected(m, y, mu, s):
    """log p(y) at the data end under the exact flow pushed from N(0, I) at the prior end: the
    flow of Gaussian data keeps (x - alpha mu) / sqrt(v) fixed, so it is linear."""
    lam_d, lam_p = (torch.tensor(v, dtype=torch.float64) for v in m.ode_logsnr_span())
    a0, a1 = torch.sigmoid(lam_d).sqrt(), torch.sigmoid(lam_p).sqrt()
    v0, v1 = a0**2 * s**2 + 1 - a0**2, a1**2 * s**2 + 1 - a1**2
    x_end = a1 * mu + (v1 / v0).sqrt() * (y - a0 * mu)
    return (lk.normal_log_prob(x_end, torch.zeros_like(x_end), torch.zeros_like(x_end))
            + 0.5 * torch.log(v1 / v0)).flatten(1).sum(1)


# Gaussian data are not confined to [-1, 1]: the discrete models' x0 clipping is off for them
NOCLIP = {"clip_x0": False}
GAUSS = {"ddpm": NOCLIP, "ddpm_x0": NOCLIP, "ddpm_score": NOCLIP, "ddpm_score_raw": {"precondition": False, **NOCLIP},
         "iddpm": NOCLIP, "vdm": {}}


@pytest.mark.parametrize("case", list(GAUSS))
def test_ode_log_density_equals_the_gaussian_oracles(case):
    """eps, x0 (EDM-preconditioned), score (NCSN-preconditioned and raw), the cosine schedule with
    learned variances, and the learned schedule: the ODE density equals the exact one."""
    name = case.replace("_raw", "")
    g = torch.Generator().manual_seed(1)
    mu = 0.5 * torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    s = 0.2 + torch.rand(1, *SHAPE, generator=g, dtype=torch.float64)
    m = with_oracle(name, lambda mm: GaussianOracle(mm, mu, s), **GAUSS[case])
    lam_d = torch.tensor(m.ode_logsnr_span()[0], dtype=torch.float64)
    a0 = torch.sigmoid(lam_d).sqrt()
    y = a0 * mu + (a0**2 * s**2 + 1 - a0**2).sqrt() * torch.randn(6, *SHAPE, generator=g, dtype=torch.float64)
    parts, nfe = ode.log_density(m, y, TIGHT, "exact")
    got = parts["prior"] + parts["flow"]
    want = gaussian_expected(m, y, mu, s)
    assert torch.allclose(got, want, atol=2e-4, rtol=0), (got, want)
    assert nfe > 10


def test_exact_divergence_is_autograd_jacobian_trace_and_hutchinson_is_unbiased():
    torch.manual_seed(0)
    net = UNet((1, 4, 4), width=8, mults=(1,))
    for p in net.parameters():
        nn.init.normal_(p, std=0.3)
    x, t = torch.randn(3, 1, 4, 4), torch.full((3,), 100.0)
    fn = lambda u: net(u, t)  # noqa: E731
    _, exact = ode.divergence(fn, x, None)
    jac = torch.autograd.functional.jacobian(lambda u: fn(u).sum(0), x).reshape(16, 3, 16)
    want = torch.stack([jac[:, b, :].diagonal().sum() for b in range(3)])
    assert torch.allclose(exact, want, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([ode.divergence(fn, x, ode.rademacher(1, tuple(x.shape), g, "cpu"))[1] for _ in range(400)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert ((mean - want).abs() < 4 * se).all(), (mean, want, se)
    assert (draws.std(0) > 0).all()  # a real estimate, not the trace itself


def categorical_model(name, probs, **overrides):
    return with_oracle(name, lambda mm: MixtureOracle(probs, LEVELS), **overrides)


def bounds(m, x, cases, tol=1e-5, levels=LEVELS, divergence="exact"):
    out = {}
    for deq, k in cases:
        torch.manual_seed(0)
        terms, _ = ode.dequantized_nll(m, x, levels, ode.ODESettings("dopri5", tol, tol), dequantization=deq, k=k,
                                       divergence_estimator=divergence, dtype=torch.float64)
        out[deq, k] = sum(terms.values())
    return out


def test_truncated_normal_bound_is_tight_on_exactly_fitted_categorical_pixels():
    """iddpm (cosine schedule: sigma_1 = 0.007, a ninth of a bin's half-width, so the mixture's
    bins hold their component's mass to 1e-18; alpha_T^2 ~ 1e-9, so the N(0, I) prior is the
    true marginal to first order): the bound is >= the exact discrete NLL and within 0.01 nats.
    (ddpm's linear schedule ends at alpha_T = 0.0067: its prior's first-order mismatch alone
    moves single images' bounds by +-0.02 nats.)"""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(16, LEVELS, generator=g, dtype=torch.float64), -1)
    x = torch.multinomial(probs, 8, replacement=True, generator=g).T.reshape(8, *SHAPE)
    exact = -probs.log().gather(1, x.reshape(8, 16).T).sum(0)  # nats [8]
    gap = bounds(categorical_model("iddpm", probs), x, [("tn", 1)])["tn", 1] - exact
    assert (gap > -5e-3).all() and (gap < 1e-2).all(), gap  # up to the solver tolerance (1e-5)


def test_uniform_dequantization_approaches_the_bins_probability_as_k_grows():
    """vdm with sigma_0 / alpha_0 = half a bin's half-width and a prior end where alpha^2 = 5e-5:
    the K-sample bound decreases with K towards -log P(bin of x) under the model's density at
    the data end, computed in closed form (normal CDFs of the mixture), and never below it."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(16, LEVELS, generator=g, dtype=torch.float64), -1)
    h = 1.0 / (LEVELS - 1)
    m = categorical_model("vdm", probs, gamma_min=2 * math.log(h / 2), gamma_max=10.0)
    x = torch.multinomial(probs, 8, replacement=True, generator=g).T.reshape(8, *SHAPE)
    lam = torch.tensor(m.ode_logsnr_span()[0], dtype=torch.float64)
    a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
    c = lk.to_unit(x, LEVELS).double().reshape(8, 16, 1)
    centres = lk.to_unit(torch.arange(LEVELS), LEVELS).double()
    cdf = lambda e: torch.special.ndtr((a * e - a * centres) / s)  # noqa: E731  [8, 16, L]
    p_bin = ((cdf(c + h) - cdf(c - h)) * probs).sum(-1)  # [8, 16]
    exact = -p_bin.log().sum(1)
    b = bounds(m, x, [("uniform", 1), ("uniform", 16), ("uniform", 256)])
    gap = {k: (v - exact).mean().item() for k, v in b.items()}
    assert all(g > -1e-2 for g in gap.values()), gap  # in expectation (one K-sample estimate can dip below)
    assert gap["uniform", 1] > gap["uniform", 16] > gap["uniform", 256] > 0.0, gap
    assert gap["uniform", 256] < 0.25 * gap["uniform", 1], gap


@pytest.mark.parametrize("deq", ode.DEQUANTIZATIONS)
def test_bound_on_uniform_data_is_at_least_log2_levels(deq):
    """The best model of uniform pixels (the oracle) cannot beat their entropy, log2 L bits/dim;
    an offset error (e.g. score_sde's 8-bit '7' at L = 17) would show here."""
    m = categorical_model("iddpm", torch.full((16, LEVELS), 1.0 / LEVELS, dtype=torch.float64))
    x = torch.randint(0, LEVELS, (32, *SHAPE), generator=torch.Generator().manual_seed(3))
    bpd = lk.bits_per_dim(bounds(m, x, [(deq, 4)])[deq, 4], 16)
    assert bpd.mean().item() >= math.log2(LEVELS) - 1e-3
    if deq == "tn":
        assert bpd.mean().item() < math.log2(LEVELS) + 0.01


@pytest.mark.parametrize("deq", ode.DEQUANTIZATIONS)
def test_dequantization_offset_at_256_levels_is_the_bin_width_of_2_over_255(deq):
    """Fashion-MNIST's size (1x28x28) and 256 levels, where bins are 2/255 wide on [-1, 1]: the
    uniform-pixel oracle's bound is >= 8 bits/dim, and within 0.01 of it on average with the
    truncated normal (iddpm's data end has sigma = 0.007, 1.8 half-bins at 256 levels: the
    images' bounds are 8.003-8.010; at 17 levels it is a ninth of one). score_sde's 'offset 7' (bins 2/256 wide for data on [-1, 1]) would put it at
    8 - log2(256/255) = 7.9944. The oracle's Jacobian is diagonal (independent pixels), so one
    Rademacher probe gives its trace exactly: Hutchinson here costs what exact would at D = 1."""
    shape, levels = (1, 28, 28), 256
    probs = torch.full((28 * 28, levels), 1.0 / levels, dtype=torch.float64)
    m = with_oracle("iddpm", lambda mm: MixtureOracle(probs, levels), shape=shape, levels=levels)
    x = torch.randint(0, levels, (4, *shape), generator=torch.Generator().manual_seed(3))
    b = bounds(m, x, [(deq, 1)], tol=1e-5, levels=levels, divergence="hutchinson")[deq, 1]
    bpd = lk.bits_per_dim(b, 28 * 28)
    assert bpd.min().item() >= 8 - 1e-3, bpd
    if deq == "tn":
        assert bpd.mean().item() < 8.01, bpd


@pytest.mark.parametrize("name", [n for n in models.names() if "ode" in models.get(n).samplers])
def test_every_diffusion_model_has_ode_bound_and_sampler(name):
    """Registry-wide: the ODE estimator runs (Hutchinson and exact), its bound on uniform data is
    >= log2 L for an untrained model, and the ODE sampler gives integers in range with its NFE
    counted by the network hook."""
    from diffusion_models.evaluate import draw_samples, evaluate_bounds

    m = models.build(name, shape=(1, 8, 8), levels=LEVELS)
    x = torch.randint(0, LEVELS, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    ecfg = config.EvalConfig(t_samples=4, batch_size=8)
    ecfg.ode.rtol = ecfg.ode.atol = 1e-2
    ecfg.ode.n_test = 6
    out = evaluate_bounds(m, x, ecfg)
    label = next(k for k in out if k.startswith("ODE"))
    assert "hutchinson divergence" in label and "first 6 test images" in label
    assert out[label]["n_examples"] == 6 and out[label]["nfe"] > 0
    assert out[label]["bpd"] >= math.log2(LEVELS)
    samples, speed = draw_samples(m, 6, 3, torch.Generator().manual_seed(0), sampler="ode", rtol=1e-2, atol=1e-2)
    assert samples.dtype == torch.long and samples.min() >= 0 and samples.max() < LEVELS
    assert speed["nfe"] > 0 and speed["nfe_declared"] is None
    assert m.sampler_label("ode", rtol=1e-2, atol=1e-2) == "ode, dopri5, rtol=0.01, atol=0.01"
    with pytest.raises(ValueError, match="adaptive"):
        m.sample(2, sampler="ode", steps=10)
    with pytest.raises(ValueError, match="ODE sampler's options"):
        m.sample(2, sampler="ddim", steps=2, rtol=1e-3)


def test_ode_bound_is_solved_in_its_own_batches():
    """`evaluate.ode.batch_size`, not `evaluate.batch_size`, sets the images per adaptive solve:
    the bound through evaluate_bounds equals the model's terms solved directly on those
    batches (4 + 2 of the 6 images), and differs from one solve of all 6 (the probes and
    dequantization draws fall differently), which shows the check can fail."""
    from diffusion_models.evaluate import evaluate_bounds

    m = models.build("ddpm", shape=(1, 8, 8), levels=LEVELS)
    x = torch.randint(0, LEVELS, (8, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    per_batch = {}
    for batch in (4, 8):
        ecfg = config.EvalConfig(t_samples=4, batch_size=8)
        ecfg.ode.rtol = ecfg.ode.atol = 1e-2
        ecfg.ode.n_test, ecfg.ode.batch_size, ecfg.ode.check_tol = 6, batch, None
        est = m.estimators(ecfg)[-1]
        label = est.label
        assert est.kind == "ode" and est.batch_size == batch and est.max_examples == 6
        per_batch[batch] = evaluate_bounds(m, x, ecfg, per_example=True)[label]["per_example_bpd"]
    kw = est.options
    torch.manual_seed(ecfg.seed)
    direct = torch.cat([torch.stack(list(m.nll_terms(x[i:j], **kw).values())).double().sum(0)
                        for i, j in ((0, 4), (4, 6))]) / (m.dims * math.log(2))
    assert per_batch[4] == pytest.approx(direct.tolist(), rel=1e-6)
    assert per_batch[8] != pytest.approx(direct.tolist(), rel=1e-6)


def test_ode_sampler_reproduces_the_gaussian_oracles_moments():
    g = torch.Generator().manual_seed(2)
    mu = 0.5 * torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    s = 0.2 + 0.5 * torch.rand(1, *SHAPE, generator=g, dtype=torch.float64)
    m = with_oracle("ddpm_x0", lambda mm: GaussianOracle(mm, mu, s), **NOCLIP)
    x, nfe = ode.sample(m, torch.randn(4000, *SHAPE, generator=g, dtype=torch.float64),
                        ode.ODESettings("dopri5", 1e-5, 1e-5))
    a0 = torch.sigmoid(torch.tensor(m.ode_logsnr_span()[0], dtype=torch.float64)).sqrt()
    x = x / a0  # the data-end state, in data units (its noise: sigma_1 = 0.01)
    se = s / math.sqrt(len(x))
    assert ((x.mean(0) - mu[0]).abs() < 4 * se[0]).all()
    assert torch.allclose(x.std(0), (s**2 + (1 - a0**2) / a0**2).sqrt()[0], rtol=0.1)


@pytest.mark.parametrize("name", ["ddpm", "ddpm_score", "iddpm"])
def test_continuous_schedule_interpolates_the_discrete_one(name):
    """time_of_logsnr inverts logsnr; at integer times the ODE's eps prediction is exactly the
    one the solvers use (`predict`: from the clipped x0), on a network whose output is not
    zero, and x0 clipping is active in that comparison (an ODE without it was the flow of
    another model: its samples and bound disagreed with DDIM and the VLB)."""
    torch.manual_seed(0)
    m = models.build(name, shape=(1, 8, 8), levels=LEVELS).eval()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # away from the zero-initialised output layer
    t = torch.tensor([1.0, 1.5, 17.25, 500.0, 999.9, 1000.0], dtype=torch.float64)
    assert torch.allclose(m.time_of_logsnr(m.logsnr(t)), t, atol=1e-6)
    x = 3 * torch.randn(2, 1, 8, 8)  # far out: some x0 estimates leave [-1, 1]
    clipped = 0
    with torch.no_grad():
        for ti in (1, 250, 900, 1000):
            lam = m.logsnr(torch.tensor(float(ti))).float()
            tt = torch.tensor(ti)
            want = m.denoise(x, tt).eps
            # float32: at t = 1, 1 - alpha_bar ~ 4e-5 (iddpm) amplifies rounding to ~1e-3 relative
            assert torch.allclose(m.ode_eps(x, lam), want, rtol=2e-3, atol=1e-3), ti
            m.cfg.clip_x0 = False  # the estimates before the clamp
            clipped += int((m.denoise(x, tt).x0.abs() > 1).sum())
            m.cfg.clip_x0 = True
    assert clipped > 0


def test_ode_config_errors_name_the_key():
    with pytest.raises(config.ConfigError, match="evaluate.ode.dequantization"):
        config.parse({"evaluate": {"ode": {"dequantization": "gaussian"}}})
    with pytest.raises(config.ConfigError, match="unknown param key 'evaluate.ode.tol'"):
        config.parse({"evaluate": {"ode": {"tol": 1e-3}}})
    with pytest.raises(config.ConfigError, match="sample.ode_tolerances"):
        config.parse({"sample": {"ode_tolerances": [0.0]}})


def test_k_sample_bound_with_hutchinson_is_biased_low_so_it_is_refused():
    """Hutchinson is unbiased for log p(y), but inside the K-sample log-mean-exp its noise biases
    the bound low (Jensen). A ddpm with a random U-Net (a Jacobian with off-diagonal terms: for a
    diagonal one, as the oracles', Rademacher probes are exact), K = 16, the same dequantization
    draws: the Hutchinson version's mean over 8 probe draws lies more than 3 SE below the
    exact-divergence bound, so the combination is refused (ode.py and config alike) and `auto`
    takes the exact divergence for K > 1. The solves are at 1e-3: at 1e-2 the two solves' own
    errors (different batches, so different adaptive steps) were as large as the effect and
    changed sign between processors (AMD Zen 3: -1.3 ± 0.7 nats; Intel: -5.5 ± 0.9), while at
    1e-3 it is -14.4 ± 2.7 nats (5 SE; 1e-4 agrees within the spread)."""
    torch.manual_seed(0)
    m = models.build("ddpm", shape=SHAPE, levels=LEVELS, T=40, width=8).eval()
    for p in m.net.parameters():
        nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(0)
    b, k, reps, settings = 2, 16, 8, ode.ODESettings("dopri5", 1e-3, 1e-3)
    x = torch.randint(0, LEVELS, (b, *SHAPE), generator=g)
    lam = torch.tensor(m.ode_logsnr_span()[0], dtype=torch.float64)
    alpha, sigma = torch.sigmoid(lam).sqrt().item(), torch.sigmoid(-lam).sqrt().item()
    e, log_q = ode.dequantization_noise("tn", k * b, SHAPE, alpha / ((LEVELS - 1) * sigma), g, "cpu")
    y = (alpha * lk.to_unit(x, LEVELS).double().repeat(k, 1, 1, 1) + sigma * e).float()
    log_q_y = log_q - 16 * math.log(sigma)

    def bound(parts, r):  # -log (1/K) sum_k p(y_k) / q(y_k): [r, B]
        log_w = (parts["prior"] + parts["flow"]).double().view(r, k, b) - log_q_y.view(1, k, b)
        return -(torch.logsumexp(log_w, 1) - math.log(k))

    exact = bound(ode.log_density(m, y, settings, "exact")[0], 1)[0]  # [B]
    hutch = bound(ode.log_density(m, y.repeat(reps, 1, 1, 1), settings, "hutchinson", 1, g)[0], reps)  # [reps, B]
    gap = (hutch - exact).mean(1)  # [reps]: per probe draw, the mean over images
    assert gap.mean() < -3 * gap.std() / math.sqrt(reps), gap
    with pytest.raises(ValueError, match="K = 16 dequantization samples needs the exact divergence"):
        ode.dequantized_nll(m, x, LEVELS, settings, k=16, divergence_estimator="hutchinson", dtype=torch.float64)
    with pytest.raises(config.ConfigError, match="evaluate.ode.k = 16 needs evaluate.ode.divergence exact"):
        config.parse({"evaluate": {"ode": {"k": 16, "divergence": "hutchinson"}}})
    ocfg = config.parse({"evaluate": {"ode": {"k": 16, "divergence": "auto"}}}).evaluate.ode
    est = models.build("ddpm", shape=(1, 28, 28), levels=256).ode_estimator(ocfg)
    assert est.options["ode"]["divergence_estimator"] == "exact" and "exact divergence" in est.label


def test_solver_check_is_the_same_draws_solved_at_tighter_tolerances():
    """The solver check's gap equals the bound at rtol = atol = 1e-2 minus the bound at 1e-5
    computed separately from the same generator state (same dequantization draws and probes),
    up to the tight solves' own error (the check solves only its 3 images, which take other
    adaptive steps than all 5)."""
    m = categorical_model("iddpm", torch.softmax(torch.randn(16, LEVELS, generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.float64), -1))
    x = torch.randint(0, LEVELS, (5, *SHAPE), generator=torch.Generator().manual_seed(1))
    loose, tight = ode.ODESettings("dopri5", 1e-2, 1e-2), ode.ODESettings("dopri5", 1e-5, 1e-5)
    kw = {"dequantization": "tn", "divergence_estimator": "hutchinson", "dtype": torch.float64}
    terms, info = ode.dequantized_nll(m, x, LEVELS, loose, generator=torch.Generator().manual_seed(7),
                                      check=tight, check_n=3, **kw)
    want = [sum(ode.dequantized_nll(m, x, LEVELS, st, generator=torch.Generator().manual_seed(7), **kw)[0].values())
            for st in (loose, tight)]
    assert torch.allclose(sum(terms.values()), want[0], rtol=1e-12)
    assert torch.allclose(info["solver_gap"], (want[0] - want[1])[:3], rtol=0, atol=2e-3)
    assert info["solver_gap"].abs().max() > 0  # the loose solve carries an error the check sees
    assert info["solver_check_seconds"] > 0


def test_solver_check_is_reported_by_evaluate_and_timed_apart():
    """evaluate_bounds reports the ODE estimator's solver check (its first check_n images, the
    check's tolerance and its own seconds) and keeps the check's time out of the bound's."""
    from diffusion_models.evaluate import evaluate_bounds

    m = categorical_model("iddpm", torch.softmax(torch.randn(16, LEVELS, generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.float64), -1))
    x = torch.randint(0, LEVELS, (6, *SHAPE), generator=torch.Generator().manual_seed(1))
    ecfg = config.EvalConfig(t_samples=4, batch_size=8)
    ecfg.ode.rtol = ecfg.ode.atol = 1e-2
    ecfg.ode.n_test, ecfg.ode.check_tol, ecfg.ode.check_n = 6, 1e-4, 3
    out = evaluate_bounds(m, x, ecfg, per_example=True)
    label = next(k for k in out if k.startswith("ODE"))
    check = out[label]["solver_check"]
    assert check["tol"] == 1e-4 and check["n_examples"] == 3 and check["seconds"] > 0
    assert math.isfinite(check["gap_bpd"]) and check["max_abs_gap_bpd"] >= abs(check["gap_bpd"])
    assert 0 < out[label]["seconds"]
    ecfg.ode.check_tol = None
    again = evaluate_bounds(m, x, ecfg, per_example=True)[label]
    assert "solver_check" not in again
    assert again["per_example_bpd"] == pytest.approx(out[label]["per_example_bpd"], rel=1e-6)  # same bound
