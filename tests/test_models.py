"""Registry-parametrised checks of the common model interface, plus independent checks."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_models import data, models
from diffusion_models.config import EvalConfig, TrainConfig
from diffusion_models.models.base import STEPS
from diffusion_models.likelihood import bits_per_dim, discretized_logistic_log_prob
from diffusion_models.train import train
from helpers import SHAPES, digits_train, uniform

# the example model defined outside the package takes the registry-wide checks too
EXAMPLE = {"mixture": {"class": "examples.mixture:MixtureOfProducts"}}
NAMES = models.names() + list(EXAMPLE)


@pytest.fixture(autouse=True)
def _with_example(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    models.use_plugins(EXAMPLE)


def fast(name, **kw):
    """Build with defaults, but few diffusion steps where the model has a T, few mixture
    components (at 3x32x32 with 256 levels each is a 786k-logit table): keeps tests fast."""
    fields = models.get(name).Config.__dataclass_fields__
    small = {"T": 50} if "T" in fields else {"components": 4} if "components" in fields else {}
    return models.build(name, **kw, **small)


def test_registry_names_and_unknown():
    assert {"baseline", "vae"} <= set(models.names())
    with pytest.raises(KeyError, match=r"unknown model 'gan'; registered models: .*vae"):
        models.build("gan", shape=(1, 8, 8), levels=17)


@pytest.mark.parametrize("dataset", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_interface(name, dataset, tmp_path):
    shape, levels = SHAPES[dataset]
    m = fast(name, shape=shape, levels=levels)
    x = uniform(4, shape, levels)
    m.init_from_data(x)
    loss = m.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    ecfg = EvalConfig(iwae_k=3)
    ecfg.ode.check_tol = None  # the solver check (1e-5) is checked in test_ode, and costs minutes at 32x32
    ecfg.ode.rtol = ecfg.ode.atol = 1e-2  # the diffusion models' ODE bound: loose, untrained nets
    for est in m.estimators(ecfg):
        label, kwargs = est.label, est.options
        torch.manual_seed(1)
        b = m.nll_bound(x, **kwargs)
        assert b.shape == (4,) and torch.isfinite(b).all() and (b > 0).all(), label
        terms = m.nll_terms(x, **kwargs)
        torch.manual_seed(1)
        assert torch.allclose(sum(m.nll_terms(x, **kwargs).values()), b)
        assert all(t.shape == (4,) for t in terms.values())
    # ancestral sampling at the model's default; continuous-time models: 10 steps, not 1000
    few = {} if hasattr(m.cfg, "T") or m.samplers["ancestral"] != STEPS else {"steps": 10}
    s = m.sample(3, generator=torch.Generator().manual_seed(0), **few)
    assert s.shape == (3, *shape) and not s.dtype.is_floating_point
    assert s.min() >= 0 and s.max() <= levels - 1
    # save / load round trip gives the same bound
    models.save(m, tmp_path / "m.pt")
    m2, state = models.load(tmp_path / "m.pt")
    assert state["name"] == name and m2.shape == shape
    kwargs = m.estimators(EvalConfig(iwae_k=3))[0].options
    torch.manual_seed(2)
    b1 = m.nll_bound(x, **kwargs)
    torch.manual_seed(2)
    b2 = m2.nll_bound(x, **kwargs)
    assert torch.equal(b1, b2)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_float_input_and_unknown_estimator(name):
    m = fast(name, shape=(1, 8, 8), levels=17)
    with pytest.raises(ValueError, match="integer images"):
        m.loss(torch.rand(2, 1, 8, 8))
    with pytest.raises((ValueError, TypeError)):
        m.nll_bound(uniform(2, (1, 8, 8), 17), bogus=1)


@pytest.mark.parametrize("dataset", ["digits", "mnist"])  # mnist: Fashion-MNIST's 1x28x28, 256 levels
@pytest.mark.parametrize("name", NAMES)
def test_bound_on_uniform_data_is_at_least_log2_levels(name, dataset):
    """No valid bound beats the entropy: held-out uniform data costs >= log2(L) bits/dim (4.09
    at 17 levels; 8 at 256, where a bin is 2/255 wide). The dequantization offsets themselves
    are pinned to closed forms at 256 levels in test_flow and test_ode."""
    shape, levels = SHAPES[dataset]
    m = models.build(name, shape=shape, levels=levels)
    n = 512 if dataset == "digits" else 128
    train(m, uniform(n, shape, levels, seed=0),
          TrainConfig(images=4 * n, batch_size=64, lr=3e-3), progress=False)
    held_out = uniform(n, shape, levels, seed=1)
    ecfg = EvalConfig(iwae_k=16)
    ecfg.ode.n_test = 64  # diffusion models' ODE bound: on 64 of the images
    ecfg.ode.enabled = dataset == "digits"  # at 28x28 its floor is test_ode's oracle case (minutes here)
    ecfg.ode.check_tol = None  # its solver check: test_ode
    for est in m.estimators(ecfg):
        label, n, kwargs = est.label, est.max_examples, est.options
        b = m.nll_bound(held_out[:n], **kwargs).double()
        bpd = bits_per_dim(b.mean().item(), m.dims)
        se = bits_per_dim(b.std().item() / math.sqrt(len(b)), m.dims)
        assert bpd >= math.log2(levels) - 3 * se, (label, bpd)


def test_baseline_matches_independent_count_model():
    """Closed-form per-pixel categorical on digits: numpy counts give the same NLL (~2.42 bpd)."""
    tr, te = data.load("digits", "train"), data.load("digits", "test")
    m = models.build("baseline", shape=tr.shape, levels=17)
    m.init_from_data(torch.from_numpy(tr.images).long())
    got = bits_per_dim(m.nll_bound(torch.from_numpy(te.images).long()).double().mean().item(), 64)
    flat_tr, flat_te = tr.images.reshape(len(tr), -1), te.images.reshape(len(te), -1)
    counts = np.stack([np.bincount(flat_tr[:, d], minlength=17) for d in range(64)]) + 1.0
    p = counts / counts.sum(1, keepdims=True)
    expected = -np.log2(p[np.arange(64), flat_te]).sum(1).mean() / 64
    assert got == pytest.approx(expected, rel=1e-5)
    assert 2.3 < expected < 2.5  # reference point: ~2.42 bits/dim (README, "Conventions")


def test_baseline_fits_fashion_mnist_sized_data_in_closed_form():
    """60,000 images of 1x28x28 with 256 levels (Fashion-MNIST's training split): the fitted
    probabilities are numpy's per-pixel bincounts, smoothed (the first version built a one-hot
    [N, D, L] of the data: 96 GB here)."""
    x = np.random.default_rng(0).integers(0, 256, (60_000, 1, 28, 28), dtype=np.uint8)
    m = models.build("baseline", shape=(1, 28, 28), levels=256)
    m.init_from_data(torch.from_numpy(x).long())
    flat = x.reshape(len(x), -1)
    counts = np.stack([np.bincount(flat[:, d], minlength=256) for d in range(flat.shape[1])]) + 1.0
    expected = np.log(counts / counts.sum(1, keepdims=True))
    assert np.allclose(m.log_probs.double().numpy(), expected, atol=1e-6)


def test_vae_kl_term_matches_torch_distributions():
    m = models.build("vae", shape=(1, 8, 8), levels=17)
    x = uniform(16, (1, 8, 8), 17)
    terms = m.nll_terms(x, k=1)
    mu, log_var = m.encode(x)
    q = Normal(mu, torch.exp(0.5 * log_var))
    expected = kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    assert torch.allclose(terms["kl"], expected, rtol=1e-5, atol=1e-5)


def test_vae_decoder_probabilities_sum_to_one():
    m = models.build("vae", shape=(1, 8, 8), levels=17)
    z = torch.randn(5, m.cfg.latent_dim)
    mean, log_scale = m.decode(z)
    per_level = torch.stack([discretized_logistic_log_prob(torch.full((5, 1, 8, 8), k), mean, log_scale, 17)
                             for k in range(17)])
    assert torch.allclose(torch.logsumexp(per_level.double(), 0), torch.zeros(5, 1, 8, 8, dtype=torch.double),
                          atol=1e-5)


@pytest.mark.parametrize("name", ["vae", "hvae"])
def test_iwae_does_not_loosen_with_k(name):
    shape, levels = SHAPES["digits"]
    tr = digits_train()
    m = models.build(name, shape=shape, levels=levels)
    train(m, tr, TrainConfig(images=4096, batch_size=64), progress=False)
    x = tr[:200]
    means = {}
    for k in (1, 10, 100):
        torch.manual_seed(0)
        means[k] = m.nll_bound(x, k=k).double().mean().item()
    tol = 0.05  # nats per example: Monte Carlo noise
    assert means[10] <= means[1] + tol and means[100] <= means[10] + tol
    assert means[100] < means[1]  # strictly tighter by a margin on a trained model


def test_iwae_chunking_is_exact_up_to_sample_order():
    """Chunk size only changes memory use: with K draws identical, the bound is identical."""
    m = models.build("vae", shape=(1, 8, 8), levels=17)
    x = uniform(3, (1, 8, 8), 17)
    torch.manual_seed(5)
    big = m.nll_bound(x, k=8, chunk=10_000)   # all 8 samples in one pass
    torch.manual_seed(5)
    small = m.nll_bound(x, k=8, chunk=3)      # one sample per pass
    assert torch.allclose(big, small, atol=1e-4)
