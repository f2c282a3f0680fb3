"""The normalizing flow (RealNVP / Glow): invertibility, exact log-determinant, the dequantized
bound against an exact discrete NLL, uniform data, training on digits, the interface."""
import math

import pytest
import torch
from torch import nn

import diffusion_models.models.flow as flow_mod  # noqa: F401  (registers "flow")
from diffusion_models import data, models
from diffusion_models import likelihood as lk
from diffusion_models.config import EvalConfig, TrainConfig
from diffusion_models.models.base import Estimator
from diffusion_models.train import train
from helpers import digits_train, uniform


def perturbed(shape, levels=17, dtype=torch.float32, **kw):
    """A flow far from its initial (volume-preserving) map: random zero-initialised layers,
    actnorm initialised from (uniform) data, random coupling scales."""
    m = models.build("flow", shape=shape, levels=levels, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, flow_mod.Coupling):
                nn.init.normal_(mod.net[-1].weight, std=0.1, generator=g)
                nn.init.normal_(mod.net[-1].bias, std=0.1, generator=g)
                mod.scale.uniform_(0.5, 1.5, generator=g)
            elif isinstance(mod, flow_mod.Split):
                nn.init.normal_(mod.prior.weight, std=0.1, generator=g)
    m.init_from_data(uniform(64, shape, levels))
    return m.to(dtype)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 4), (3, 8, 8)])
def test_inverse_of_forward_is_the_identity(shape):
    m = perturbed(shape)
    y = 0.7 * torch.randn(5, *shape)
    with torch.no_grad():
        eps, logdet = m.flow(y)
        back = m.flow(eps, reverse=True)
    assert eps.shape == (5, math.prod(shape)) and logdet.shape == (5,)
    assert logdet.abs().min() > 0.5  # not volume-preserving: the test is not on a trivial map
    assert (back - y).abs().max() < 1e-5
    with torch.no_grad():  # and the other way round
        assert (m.flow(m.flow(eps, reverse=True))[0] - eps).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 4, 4), (1, 8, 8)])
def test_log_determinant_is_that_of_the_numerical_jacobian(shape):
    """(1, 8, 8) has two scales, so a split with a learned prior is inside the map."""
    m = perturbed(shape, dtype=torch.float64, width=8, steps=2)
    y = 0.7 * torch.randn(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: m.flow(v.view(1, *shape))[0][0], y.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    _, logdet = m.flow(y)
    assert sign != 0 and abs(logdet.item()) > 0.5
    assert logdet.item() == pytest.approx(logabsdet.item(), abs=1e-8)


def test_dequantized_bound_against_the_exact_discrete_nll_of_a_standard_normal():
    """Untrained, the flow is volume-preserving and orthogonal (actnorm unset, couplings and
    split priors zero, 1x1 convolutions rotations): p(y) = N(y; 0, I), whose bin probabilities
    are products of normal CDF differences. Uniform dequantization, h = 1/(L-1):
    exact -log P(x) <= E[K=1000 bound] <= E[K=1 bound] = sum_d (log(2 pi)/2 + (c_d^2 + h^2/3)/2)
    - D log(2h)."""
    shape, levels = (1, 4, 4), 5
    h = 1 / (levels - 1)
    m = models.build("flow", shape=shape, levels=levels, width=8, steps=1)
    y = torch.randn(64, *shape)
    normal = torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(sum(m.log_density(y)), normal.log_prob(y).flatten(1).sum(1), atol=1e-4)

    x = uniform(2000, shape, levels, seed=3)
    c = lk.to_unit(x, levels).double().flatten(1)
    normal64 = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    exact = -torch.log(normal64.cdf(c + h) - normal64.cdf(c - h)).sum(1)  # [N]
    expect_k1 = (0.5 * math.log(2 * math.pi) + 0.5 * (c**2 + h**2 / 3)).sum(1) - c.shape[1] * math.log(2 * h)
    assert (expect_k1 > exact).all()

    k1 = m.nll_bound(x, k=1).double()
    se = (k1 - expect_k1).std().item() / math.sqrt(len(x))
    assert abs((k1 - expect_k1).mean().item()) < 4 * se  # the K=1 bound and its constant
    gap_k1 = (k1 - exact).mean().item()
    assert gap_k1 > 4 * se  # strictly above the exact NLL (the Jensen gap, ~0.08 nats here)

    sub = slice(0, 200)
    k1000 = m.nll_bound(x[sub], k=1000, chunk=20_000).double()
    diff = k1000 - exact[sub]
    assert diff.mean().item() > -3 * diff.std().item() / math.sqrt(200)  # still a bound
    assert diff.mean().item() < 0.1 * (expect_k1 - exact)[sub].mean().item()  # and much tighter


def test_dequantization_offset_at_256_levels_is_the_bin_width_of_2_over_255():
    """At Fashion-MNIST's size (1x28x28, L = 256) the bins are 2/255 wide on [-1, 1] and the
    smooth N(0, I) of the untrained flow puts a Jensen gap of only h^2 c^2 / 6 per dimension
    (about 7e-4 nats an image) between the K=1 bound and the exact NLL: the bound must sit on
    the exact NLL, within its Monte Carlo noise. score_sde's 8-bit convention (bins 2/256 wide:
    its 'offset 7' for data on [-1, 1]) would be off by D log(256/255) = 3.07 nats an image."""
    shape, levels = (1, 28, 28), 256
    h = 1 / (levels - 1)
    m = models.build("flow", shape=shape, levels=levels, width=8, steps=1)
    x = uniform(256, shape, levels, seed=3)
    c = lk.to_unit(x, levels).double().flatten(1)
    normal64 = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    exact = -torch.log(normal64.cdf(c + h) - normal64.cdf(c - h)).sum(1)  # [N], nats
    torch.manual_seed(0)
    diff = m.nll_bound(x, k=1).double() - exact
    se = diff.std().item() / math.sqrt(len(x))
    assert 0 < se < 0.05  # the dequantization noise (0.002 nats), far below 3.07 nats
    assert abs(diff.mean().item()) < 4 * se, (diff.mean().item(), se)
    assert abs(diff.mean().item() - shape[-1] ** 2 * math.log(256 / 255)) > 8 * se
    bpd = lk.bits_per_dim(m.nll_bound(x, k=1).double().mean().item(), m.dims)
    assert bpd == pytest.approx(lk.bits_per_dim(exact.mean().item(), m.dims), abs=1e-3)


def test_bound_on_uniform_data_is_at_least_log2_levels_after_training():
    shape, levels = (1, 4, 4), 17
    m = models.build("flow", shape=shape, levels=levels, width=16)
    train(m, uniform(512, shape, levels), TrainConfig(images=2048, batch_size=64, lr=3e-3), progress=False)
    held_out = uniform(512, shape, levels, seed=1)
    for k in (1, 16):
        b = m.nll_bound(held_out, k=k).double()
        bpd = lk.bits_per_dim(b.mean().item(), m.dims)
        se = lk.bits_per_dim(b.std().item() / math.sqrt(len(b)), m.dims)
        assert bpd >= math.log2(levels) - 3 * se, (k, bpd)


def test_training_on_digits_beats_uniform_and_samples_are_images():
    tr = digits_train()
    te = torch.from_numpy(data.load("digits", "test").images).long()
    m = models.build("flow", shape=(1, 8, 8), levels=17)
    untrained = lk.bits_per_dim(m.nll_bound(te).mean().item(), 64)
    train(m, tr, TrainConfig(images=64 * 200, batch_size=64), progress=False)  # 200 steps: ~2.4-2.5 bits/dim
    bpd = {k: lk.bits_per_dim(m.nll_bound(te, k=k).double().mean().item(), 64) for k in (1, 10)}
    assert math.isfinite(bpd[1]) and bpd[1] < math.log2(17) - 1 < untrained, (bpd, untrained)
    assert bpd[10] < bpd[1]
    s = m.sample(50, generator=torch.Generator().manual_seed(0))
    assert s.shape == (50, 1, 8, 8) and s.dtype == torch.long and s.min() >= 0 and s.max() <= 16
    assert torch.equal(s, m.sample(50, generator=torch.Generator().manual_seed(0)))
    assert len(torch.unique(s.flatten(1), dim=0)) == 50


def test_terms_estimators_and_errors():
    m = perturbed((1, 8, 8))
    m.name = "flow"
    x = uniform(6)
    for k in (1, 7):
        torch.manual_seed(0)
        terms = m.nll_terms(x, k=k)
        assert set(terms) == {"prior", "flow", "dequantization"}
        torch.manual_seed(0)
        assert torch.allclose(sum(terms.values()), m.nll_bound(x, k=k))
    assert torch.allclose(m.nll_terms(x)["dequantization"], torch.full((6,), 64 * math.log(8)))
    torch.manual_seed(5)
    big = m.nll_bound(x, k=8, chunk=10_000)
    torch.manual_seed(5)
    small = m.nll_bound(x, k=8, chunk=6)  # one sample per pass
    assert torch.allclose(big, small, atol=1e-4)
    assert m.estimators(EvalConfig(dequant_k=1000, iwae_k=7, chunk=512)) == [  # its own K, not IWAE's
        Estimator("dequantized", "dequantized (uniform, K=1)", {"k": 1}),
        Estimator("dequantized", "dequantized (uniform, K=1000)", {"k": 1000, "chunk": 512})]
    assert m.estimators(EvalConfig(dequant_k=1)) == [Estimator("dequantized", "dequantized (uniform, K=1)", {"k": 1})]
    with pytest.raises(ValueError, match="K must be >= 1"):
        m.nll_terms(x, k=0)
    with pytest.raises(ValueError, match="bogus"):
        m.nll_terms(x, bogus=1)
    with pytest.raises(ValueError, match="integer images"):
        m.loss(torch.rand(2, 1, 8, 8))
    assert m.nfe() == 1 and m.sampler_label() == "inverse pass" and m.nfe_module() is m.flow and m.family == "flow"


def test_default_size_and_scales():
    m = models.build("flow", shape=(1, 8, 8), levels=17)
    assert abs(m.num_params() - 86_769) <= 0.05 * 86_769  # matched to the shared U-Net
    assert m.flow.part_shapes == [(2, 4, 4), (8, 2, 2)]  # one split at 4x4, the top at 2x2
    for shape, parts in [((1, 28, 28), [(2, 14, 14), (8, 7, 7)]), ((3, 32, 32), [(6, 16, 16), (24, 8, 8)])]:
        big = models.build("flow", shape=shape, levels=256)
        assert big.flow.part_shapes == parts and abs(big.num_params() - 86_769) <= 0.1 * 86_769
    odd = models.build("flow", shape=(1, 5, 7), levels=4)  # no squeeze possible: checkerboard only
    x = uniform(3, (1, 5, 7), 4)
    odd.init_from_data(x)
    assert torch.isfinite(odd.nll_bound(x)).all() and odd.sample(2).shape == (2, 1, 5, 7)


def test_actnorm_init_is_data_dependent_once_and_saved(tmp_path):
    m = models.build("flow", shape=(1, 8, 8), levels=17)
    x = digits_train()
    state = torch.get_rng_state()
    m.init_from_data(x)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG drawn: resumes stay exact
    first = m.flow.layers[0]  # the first actnorm: dequantized data to zero mean, unit variance
    with torch.no_grad():
        out, _ = first(m._dequantize(x))
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05
    assert first.log_s.abs().item() > 0.1
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.init_from_data(uniform(32))  # already initialised: a no-op
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    models.save(m, tmp_path / "f.pt")
    m2, _ = models.load(tmp_path / "f.pt")
    assert bool(m2.initialized) and torch.equal(m2.flow.layers[0].bias, first.bias)


def test_failed_inverse_passes_are_counted_and_fail_above_the_threshold():
    """A non-finite inverse pass is not silently a valid-looking image: draw_samples counts it
    (nonfinite_samples), and more than MAX_NONFINITE of the samples failing is an error."""
    from diffusion_models.evaluate import MAX_NONFINITE, draw_samples

    m = models.build("flow", shape=(1, 4, 4), levels=17)
    inverse = m.flow

    class Failing(torch.nn.Module):  # the first sample of every call diverges
        def forward(self, z, reverse=False):
            y = inverse(z, reverse=reverse)
            return torch.cat([torch.full_like(y[:1], float("nan")), y[1:]]) if reverse else y

    m.flow = Failing()
    n = 2000
    assert 2 <= MAX_NONFINITE * n  # two failed calls of 1000: at the threshold, counted
    images, speed = draw_samples(m, n, 1000, torch.Generator().manual_seed(0))
    assert speed["nonfinite_samples"] == 2 and images.shape == (n, 1, 4, 4)
    with pytest.raises(FloatingPointError, match="1 of 8 samples were non-finite"):
        draw_samples(m, 8, 8, torch.Generator().manual_seed(0))
    m.flow = inverse
    assert draw_samples(m, 8, 8, torch.Generator().manual_seed(0))[1]["nonfinite_samples"] == 0
