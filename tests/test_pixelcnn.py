"""Gated PixelCNN: causality (raster-then-channel order, no blind spot), normalisation, exact
likelihood, the ancestral sampler against its sequential definition, training."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.distributions import Categorical

import diffusion_models.models.pixelcnn  # noqa: F401  (registers "pixelcnn")
from diffusion_models import models
from diffusion_models import likelihood as lk
from diffusion_models.config import TrainConfig
from diffusion_models.train import train
from helpers import one_thread, uniform  # noqa: F401  (one_thread: autouse)


def build(shape, levels, sharpen=4.0, **cfg):
    """A float64 model whose conditionals are far from uniform (output layer scaled up)."""
    m = models.build("pixelcnn", shape=shape, levels=levels, **cfg).double()
    with torch.no_grad():
        m.net.head[-1].weight.mul_(sharpen)
        m.net.head[-1].bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return m


def order(shape):
    """Sub-pixels (c, i, j) in the model's order: raster over pixels, then channels."""
    c, h, w = shape
    return [(ch, i, j) for i in range(h) for j in range(w) for ch in range(c)]


SMALL = {"layers": 2, "kernel": 3, "first_kernel": 3}  # a 3-row window: shorter than the images


def logits(m, x):
    return m.net(lk.to_unit(x, m.levels).double())  # [B,C,L,H,W]


@pytest.mark.parametrize("shape, cfg", [((1, 5, 5), {}), ((3, 4, 4), {}),
                                        ((3, 4, 4), {"width": 12, "layers": 3, "kernel": 5, "first_kernel": 3})])
def test_conditionals_depend_on_exactly_the_earlier_sub_pixels(shape, cfg):
    """Change sub-pixel e: the logits at every position d <= e stay the same; at every d > e
    (every later sub-pixel: no blind spot on these small images) they change."""
    levels = 4
    m = build(shape, levels, **cfg)
    pos = order(shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (4, *shape), generator=g)
    base = logits(m, x)
    for e, (c, i, j) in enumerate(pos):
        y = x.clone()
        y[:, c, i, j] = (y[:, c, i, j] + torch.randint(1, levels, (4,), generator=g)) % levels
        diff = (logits(m, y) - base).abs().amax(dim=(0, 2))  # [C,H,W]
        for d, (cd, id_, jd) in enumerate(pos):
            if d <= e:
                assert diff[cd, id_, jd] < 1e-12, (e, d, diff[cd, id_, jd].item())
            else:
                assert diff[cd, id_, jd] > 1e-9, (e, d)


@pytest.mark.parametrize("cfg", [SMALL, {"layers": 3, "kernel": 5, "first_kernel": 7}])
def test_row_window_is_exactly_what_a_row_depends_on(cfg):
    """The sampler runs the net on rows i - rows_seen() .. i only: the logits of row i from that
    window equal the full image's; one row fewer (the window one too short) changes them."""
    m = build((1, 12, 5), 5, **cfg)
    x = torch.randint(0, 5, (3, 1, 12, 5), generator=torch.Generator().manual_seed(0))
    full, r = logits(m, x), m.rows_seen()
    for i in range(r + 1, 12):
        assert torch.allclose(logits(m, x[:, :, i - r:i + 1])[..., -1, :], full[..., i, :], atol=1e-12)
        assert not torch.allclose(logits(m, x[:, :, i - r + 1:i + 1])[..., -1, :], full[..., i, :], atol=1e-6)


def test_probabilities_sum_to_one_and_nll_is_the_categorical_log_likelihood():
    for shape, levels in (((1, 6, 5), 17), ((3, 4, 4), 5)):
        m = build(shape, levels)
        x = uniform(6, shape, levels, seed=3)
        logp = m.log_probs(x)  # [B,C,L,H,W]
        assert torch.allclose(logp.exp().sum(2), torch.ones(6, *shape, dtype=torch.double), atol=1e-12)
        cat = Categorical(logits=logits(m, x).permute(0, 1, 3, 4, 2))  # batch [B,C,H,W], events over L
        expected = -cat.log_prob(x).flatten(1).sum(1)
        assert cat.probs.amax() > 2.0 / levels  # the sharpened conditionals are far from uniform
        assert torch.allclose(m.nll_terms(x)["nll"], expected, rtol=0, atol=1e-10)
        assert torch.allclose(m.loss(x), expected.mean() / m.dims, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="does not support"):
        m.nll_terms(x, k=3)


@pytest.mark.parametrize("shape, levels", [((1, 2, 2), 3), ((3, 1, 2), 2), ((2, 2, 1), 3)])
def test_exact_likelihood_sums_to_one_over_all_images(shape, levels):
    m = build(shape, levels)
    xs = torch.tensor(list(itertools.product(range(levels), repeat=math.prod(shape)))).view(-1, *shape)
    p = (-m.nll_terms(xs)["nll"]).exp()
    assert p.max() > 5.0 / len(xs)  # far from uniform: a non-causal model would not sum to one
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)


def sequential_sample(m, n, generator):
    """The definition: x_d ~ p(x_d | x_<d) in the model's order, one categorical draw each
    (lk.sample_categorical, tested against exact probabilities in test_likelihood)."""
    x = torch.zeros(n, *m.shape, dtype=torch.long)
    for c, i, j in order(m.shape):
        logp = F.log_softmax(m.net(lk.to_unit(x, m.levels)), dim=2)[:, c, :, i, j]  # [n, L], full image
        x[:, c, i, j] = lk.sample_categorical(logp, generator)
    return x


@pytest.mark.parametrize("shape, levels, cfg", [((1, 5, 4), 17, {}), ((3, 3, 3), 6, {}),
                                                ((1, 8, 3), 5, SMALL), ((3, 6, 2), 4, SMALL)])
def test_ancestral_sampling_is_the_sequential_definition(shape, levels, cfg):
    """With SMALL the sampler's row window (3 rows above) is shorter than the image."""
    m = build(shape, levels, **cfg).float()
    assert m.nfe() == m.dims and m.sampler_label() == "autoregressive"
    got = m.sample(7, generator=torch.Generator().manual_seed(4))
    ref = sequential_sample(m, 7, torch.Generator().manual_seed(4))
    assert torch.equal(got, ref)
    assert not torch.equal(got, m.sample(7, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="takes no steps"):
        m.sample(2, steps=3)


def test_sample_frequencies_match_the_exact_likelihood():
    """(1,2,2) with 3 levels: 20k samples over the 81 images, chi-square against exp(-nll)."""
    m = build((1, 2, 2), 3, sharpen=2.0).float()
    xs = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 1, 2, 2)
    p = (-m.nll_terms(xs)["nll"].double()).exp()
    n = 20_000
    s = m.sample(n, generator=torch.Generator().manual_seed(0))
    index = (s.view(n, 4) * torch.tensor([27, 9, 3, 1])).sum(1)  # the row of xs
    counts = torch.bincount(index, minlength=81).double()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert stats.chi2.sf(chi2, df=80) > 1e-3, chi2


def test_learns_correlated_pixels_and_not_uniform_noise():
    """Constant images (one uniform level each): the ideal is log2(L) bits for the first pixel,
    zero after; a few hundred steps get well below log2(L) bits/dim. Uniform noise stays at
    >= log2(L) bits/dim on held-out data."""
    shape, levels = (1, 6, 6), 8
    small = {"width": 16, "layers": 3}
    g = torch.Generator().manual_seed(0)
    const = torch.randint(0, levels, (512, 1, 1, 1), generator=g).expand(512, *shape).contiguous()
    m = models.build("pixelcnn", shape=shape, levels=levels, **small)
    train(m, const, TrainConfig(images=300 * 32, batch_size=32, lr=3e-3), progress=False)
    held_out = torch.arange(levels).view(-1, 1, 1, 1).expand(levels, *shape)  # every constant image
    bpd = lk.bits_per_dim(m.nll_terms(held_out)["nll"].double().mean().item(), m.dims)
    assert bpd < 0.3 * math.log2(levels), bpd  # ideal: 3/36 = 0.083 bits/dim

    m = models.build("pixelcnn", shape=shape, levels=levels, **small)
    train(m, uniform(512, shape, levels, seed=0), TrainConfig(images=300 * 32, batch_size=32, lr=3e-3),
          progress=False)
    b = m.nll_terms(uniform(512, shape, levels, seed=1))["nll"].double()
    bpd, se = (lk.bits_per_dim(v, m.dims) for v in (b.mean().item(), b.std().item() / math.sqrt(len(b))))
    assert bpd >= math.log2(levels) - 3 * se, (bpd, se)


def test_parameter_count_and_config_errors():
    counts = {s: models.build("pixelcnn", shape=s, levels=17).num_params() for s in [(1, 8, 8), (1, 28, 28)]}
    assert counts[(1, 8, 8)] == counts[(1, 28, 28)]  # independent of the image size
    assert abs(counts[(1, 8, 8)] / 86_769 - 1) < 0.05  # matched to the shared U-Net
    for bad in ({"kernel": 4}, {"width": 0}, {"layers": 0}):
        with pytest.raises(ValueError, match="pixelcnn"):
            models.build("pixelcnn", shape=(1, 8, 8), levels=17, **bad)
