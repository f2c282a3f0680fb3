"""Independent checks of the hierarchical VAE (`hvae`): sizes, bound terms, KLs, bound validity."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_models import models
from diffusion_models.config import EvalConfig, TrainConfig
from diffusion_models.train import train
from helpers import SHAPES, digits_train, uniform

@pytest.mark.parametrize("dataset", SHAPES)
def test_builds_matched_size_and_elbo_terms_sum_to_bound(dataset):
    shape, levels = SHAPES[dataset]
    m = models.build("hvae", shape=shape, levels=levels)
    assert abs(sum(p.numel() for p in m.parameters()) / 86_000 - 1) <= 0.05
    x = uniform(3, shape, levels)
    assert torch.isfinite(m.loss(x))
    torch.manual_seed(3)
    terms = m.nll_terms(x, k=1)
    torch.manual_seed(3)
    bound = m.nll_bound(x, k=1)
    kls = [t for t in terms if t.startswith("kl_")]
    assert len(kls) >= 3 and "reconstruction" in terms
    assert all(t.shape == (3,) and torch.isfinite(t).all() for t in terms.values())
    assert all((terms[t] >= -1e-4).all() for t in kls)
    assert torch.allclose(sum(terms.values()), bound)
    s = m.sample(2, generator=torch.Generator().manual_seed(0))
    assert s.shape == (2, *shape) and s.dtype == torch.long and 0 <= s.min() and s.max() < levels


def test_kl_terms_match_torch_distributions():
    """Analytic KL(q(z_i|z_>i,x) || p(z_i|z_>i)) per layer, against torch.distributions."""
    m = models.build("hvae", shape=(1, 8, 8), levels=17)
    train(m, digits_train(), TrainConfig(images=1024, batch_size=64), progress=False)  # trained
    x = uniform(8, (1, 8, 8), 17)
    torch.manual_seed(7)
    terms = m.nll_terms(x, k=1)
    torch.manual_seed(7)  # same draws of z_>i, so the same conditional Gaussians
    layers = m.layer_params(x)
    assert len(layers) == sum(t.startswith("kl_") for t in terms)
    for i, (_, q_mu, q_lv, p_mu, p_lv) in enumerate(layers, 1):
        q, p = Normal(q_mu, torch.exp(0.5 * q_lv)), Normal(p_mu, torch.exp(0.5 * p_lv))
        expected = kl_divergence(q, p).flatten(1).sum(1)
        assert expected.abs().max() > 1e-3  # the check is not vacuous
        assert torch.allclose(terms[f"kl_{i}"], expected, rtol=1e-4, atol=1e-4), i


def test_kl_warmup_weights_only_the_training_loss():
    m = models.build("hvae", shape=(1, 8, 8), levels=17, kl_warmup=4)
    x = uniform(8, (1, 8, 8), 17)

    def parts():
        torch.manual_seed(1)
        t = m.nll_terms(x, k=1)
        return t["reconstruction"], sum(v for name, v in t.items() if name.startswith("kl_"))

    m.train()
    for step in range(1, 7):
        torch.manual_seed(1)
        loss = m.loss(x)
        recon, kl = parts()  # nll_terms: always the true ELBO terms
        beta = min(1.0, step / 4)
        assert torch.allclose(loss, (recon + beta * kl).mean() / 64, rtol=1e-5), step
    m.eval()  # evaluation loss is the un-warmed ELBO and does not advance the schedule
    m.cfg.kl_warmup = 10**6
    torch.manual_seed(1)
    assert torch.allclose(m.loss(x), sum(parts()).mean() / 64, rtol=1e-5)
    assert int(m.steps) == 6


def test_rejects_bad_input_and_options():
    m = models.build("hvae", shape=(1, 8, 8), levels=17)
    with pytest.raises(ValueError, match="integer images"):
        m.loss(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="bogus"):
        m.nll_bound(uniform(2, (1, 8, 8), 17), bogus=1)
    with pytest.raises(ValueError, match="steps"):
        m.sample(2, steps=10)
    assert [e.label for e in m.estimators(EvalConfig(iwae_k=7))] == ["ELBO", "IWAE-7"]
    assert [e.label for e in m.estimators(EvalConfig(iwae_k=1))] == ["ELBO"]


# Bounds on uniform data and IWAE monotonicity in K: registry-wide in tests/test_models.py.


def test_short_training_on_digits_is_finite():
    m = models.build("hvae", shape=(1, 8, 8), levels=17)
    res = train(m, digits_train(), TrainConfig(images=30_000), progress=False)
    assert math.isfinite(res.final_loss)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    x = digits_train()[:64]
    assert torch.isfinite(m.nll_bound(x, k=1)).all() and torch.isfinite(m.nll_bound(x, k=4)).all()
