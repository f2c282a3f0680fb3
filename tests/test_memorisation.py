"""Memorisation statistics: nearest neighbours against a brute-force loop; copies, near-copies
and fresh draws from the training distribution; statistics against an independent numpy
computation; input validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_models.memorisation import memorisation, nearest


def brute_nearest(q: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.empty(len(q))
    idx = np.empty(len(q), dtype=np.int64)
    for i in range(len(q)):
        best, arg = np.inf, -1
        for j in range(len(r)):
            d = np.sqrt(np.sum((q[i].astype(np.float64) - r[j].astype(np.float64)) ** 2))
            if d < best:
                best, arg = d, j
        dist[i], idx[i] = best, arg
    return dist, idx


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_matches_brute_force(chunk, dtype):
    rng = np.random.default_rng(0)
    q, r = rng.random((23, 5)), rng.random((41, 5))
    d, i = nearest(torch.tensor(q, dtype=dtype), torch.tensor(r, dtype=dtype), chunk=chunk)
    qd = torch.tensor(q, dtype=dtype).double().numpy()  # what the function actually receives
    rd = torch.tensor(r, dtype=dtype).double().numpy()
    bd, bi = brute_nearest(qd, rd)
    assert d.dtype == torch.float64 and i.dtype == torch.int64
    assert d.shape == (23,) and i.shape == (23,)
    np.testing.assert_array_equal(i.numpy(), bi)
    np.testing.assert_allclose(d.numpy(), bd, rtol=1e-12, atol=1e-12)


def test_nearest_exact_zero_for_identical_rows():
    rng = np.random.default_rng(1)
    r = rng.random((300, 64))  # large enough for cdist's matrix-product path
    perm = rng.permutation(300)[:50]
    d, i = nearest(torch.tensor(r[perm]), torch.tensor(r))
    assert (d == 0).all()
    np.testing.assert_array_equal(i.numpy(), perm)


def _data(seed: int = 0, d: int = 6):
    rng = np.random.default_rng(seed)
    train = torch.tensor(rng.random((1500, d)))
    heldout = torch.tensor(rng.random((400, d)))
    fresh = torch.tensor(rng.random((400, d)))
    return rng, train, heldout, fresh


def test_exact_copies():
    rng, train, heldout, _ = _data()
    train = train.float()  # float32 training rows, float32 copies
    samples = train[torch.tensor(rng.integers(0, len(train), 300))].clone()
    r = memorisation(samples, train, heldout)
    assert r["copies"] == 1.0 and r["close_frac"] == 1.0
    assert r["heldout_copies"] == 0.0
    assert r["median_ratio"] == 0.0
    assert (r["n_samples"], r["n_train"], r["n_heldout"]) == (300, 1500, 400)


def test_fresh_draws_do_not_look_memorised():
    _, train, heldout, fresh = _data()
    r = memorisation(fresh, train, heldout, quantile=0.05)
    assert r["copies"] == 0.0 and r["heldout_copies"] == 0.0
    # close_frac ~ Binomial(400, ~0.05)/400 with threshold noise: sd ~ 0.015
    assert 0.01 <= r["close_frac"] <= 0.11
    assert r["heldout_close_frac"] == pytest.approx(0.05, abs=0.005)
    assert 0.85 <= r["median_ratio"] <= 1.15


def test_near_copies():
    rng, train, heldout, _ = _data()
    idx = torch.tensor(rng.integers(0, len(train), 200))
    samples = train[idx] + 1e-4 * torch.tensor(rng.standard_normal((200, train.shape[1])))
    r = memorisation(samples, train, heldout)
    assert r["copies"] == 0.0
    assert r["close_frac"] == pytest.approx(1.0)
    assert r["median_ratio"] < 0.01


def test_statistics_match_numpy():
    rng, train, heldout, _ = _data(seed=4, d=3)
    samples = torch.cat([train[:40], torch.tensor(rng.random((160, 3)))])
    r = memorisation(samples, train, heldout, quantile=0.1)
    tn = train.numpy()
    ds = brute_nearest(samples.numpy(), tn)[0]
    dh = brute_nearest(heldout.numpy(), tn)[0]
    thr = np.quantile(dh, 0.1)  # numpy default: linear interpolation
    assert r["threshold"] == pytest.approx(thr, rel=1e-12)
    assert r["close_frac"] == pytest.approx(np.mean(ds < thr))
    assert r["heldout_close_frac"] == pytest.approx(np.mean(dh < thr))
    assert r["copies"] == pytest.approx(40 / 200)
    assert r["median_ratio"] == pytest.approx(np.median(ds) / np.median(dh), rel=1e-12)


def test_heldout_distances_given_once_give_the_same_statistics():
    """The sample stage searches the held-out rows' neighbours once for all its sample sets:
    given them (the brute-force distances here), the statistics are those it computes itself."""
    rng, train, heldout, _ = _data(seed=5, d=3)
    samples = torch.cat([train[:30], torch.tensor(rng.random((170, 3)))])
    dh = torch.from_numpy(brute_nearest(heldout.numpy(), train.numpy())[0])
    assert memorisation(samples, train, heldout, heldout_distances=dh) == pytest.approx(
        memorisation(samples, train, heldout), rel=1e-12)
    with pytest.raises(ValueError, match="heldout_distances has 3 rows"):
        memorisation(samples, train, heldout, heldout_distances=dh[:3])


def test_mismatched_or_empty_inputs_raise():
    x = torch.rand(10, 4)
    with pytest.raises(ValueError, match="dimension D"):
        memorisation(torch.rand(5, 3), x, x)
    with pytest.raises(ValueError, match="dimension D"):
        memorisation(x, x, torch.rand(5, 5))
    with pytest.raises(ValueError, match="empty"):
        memorisation(torch.rand(0, 4), x, x)
    with pytest.raises(ValueError, match="empty"):
        memorisation(x, torch.rand(0, 4), x)
    with pytest.raises(ValueError, match="2-D"):
        memorisation(torch.rand(10, 2, 2), x, x)
    with pytest.raises(ValueError, match="D=3"):
        nearest(torch.rand(5, 3), x)
    with pytest.raises(ValueError, match="quantile"):
        memorisation(x, x, x, quantile=1.5)
