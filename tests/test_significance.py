"""Significance of model differences: Welch and paired t intervals checked against scipy.stats
and hand calculations; tie detection on clear and null cases; table helpers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffusion_models import significance as sig

# Made-up per-seed numbers (bits/dim etc.): equal n, unequal n, unequal variances, n=2.
WELCH_CASES = [
    ([3.12, 3.15, 3.11, 3.14, 3.13], [3.20, 3.18, 3.22, 3.19, 3.21]),
    ([1.02, 0.98, 1.05], [1.10, 0.90, 1.20, 0.85, 1.00, 1.15, 0.95]),
    ([10.0, 10.1, 9.9, 10.05], [12.0, 8.0, 11.5, 9.0, 10.5, 7.5]),
    ([2.5, 2.7], [2.4, 2.41, 2.39]),
    ([5.0, 6.0, 7.0, 8.0, 9.0, 10.0], [5.5, 6.5, 7.5]),
]


@pytest.mark.parametrize("a,b", WELCH_CASES)
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_welch_matches_scipy(a, b, confidence):
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(confidence)
    r = sig.welch(a, b, confidence)
    assert r["diff"] == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12, abs=1e-12)
    assert r["df"] == pytest.approx(ref.df, rel=1e-10)
    assert r["p_value"] == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-15)
    assert r["ci_lo"] == pytest.approx(ci.low, rel=1e-10, abs=1e-12)
    assert r["ci_hi"] == pytest.approx(ci.high, rel=1e-10, abs=1e-12)
    assert (r["n_a"], r["n_b"]) == (len(a), len(b))


def test_welch_by_hand():
    # a: mean 2, var 1 (n 3); b: mean 5, var 4 (n 5) -> se^2 = 1/3 + 4/5 = 17/15
    a, b = [1.0, 2.0, 3.0], [3.0, 3.0, 5.0, 7.0, 7.0]
    assert np.var(b, ddof=1) == pytest.approx(4.0)
    se2 = 1 / 3 + 4 / 5
    df = se2**2 / ((1 / 3) ** 2 / 2 + (4 / 5) ** 2 / 4)
    r = sig.welch(a, b)
    assert r["diff"] == pytest.approx(-3.0)
    assert r["df"] == pytest.approx(df)
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((-3.0 - half, -3.0 + half))


def test_welch_one_constant_sample_is_defined():
    # Only b varies: df = nb - 1, interval = diff +- t * sd_b / sqrt(nb).
    a, b = [1.0, 1.0, 1.0], [1.5, 2.0, 2.5, 3.0]
    r = sig.welch(a, b)
    assert r["df"] == pytest.approx(3.0)
    half = stats.t.ppf(0.975, 3) * np.std(b, ddof=1) / 2.0
    assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((-1.25 - half, -1.25 + half))


@pytest.mark.parametrize("a,b", [([3.0], [3.1, 3.2, 3.3]), ([3.0, 3.1], [2.0]),
                                 ([1.0, 1.0, 1.0], [2.0, 2.0])])
def test_welch_degenerate_gives_nan(a, b):
    r = sig.welch(a, b)
    assert r["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    for k in ("ci_lo", "ci_hi", "df", "p_value"):
        assert math.isnan(r[k]), k


@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_paired_matches_scipy(confidence):
    rng = np.random.default_rng(1)
    xa = rng.normal(3.0, 0.5, 200)
    xb = xa + rng.normal(0.05, 0.2, 200)  # same images, B slightly worse
    r = sig.paired(xa - xb, confidence)
    rel = stats.ttest_rel(xa, xb)
    one = stats.ttest_1samp(xa - xb, 0.0)
    ci = one.confidence_interval(confidence)
    assert r["n"] == 200
    assert r["diff"] == pytest.approx(np.mean(xa - xb))
    assert r["p_value"] == pytest.approx(rel.pvalue, rel=1e-8, abs=1e-300)
    assert r["p_value"] == pytest.approx(one.pvalue, rel=1e-8, abs=1e-300)
    assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-10)
    rel_ci = rel.confidence_interval(confidence)
    assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((rel_ci.low, rel_ci.high), rel=1e-10)


def test_paired_degenerate():
    assert math.isnan(sig.paired([0.3])["ci_lo"])
    r = sig.paired([0.2, 0.2, 0.2])
    assert r["diff"] == pytest.approx(0.2) and math.isnan(r["p_value"])


def _runs(values: dict[str, list[float]], metric: str = "bpd") -> pd.DataFrame:
    rows = [{"model": m, "seed": s, metric: v} for m, vs in values.items()
            for s, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_pairwise_welch_rows_and_ties():
    rng = np.random.default_rng(0)
    same = rng.normal(3.0, 0.05, 10)
    runs = _runs({"vae": list(3.6 + rng.normal(0, 0.02, 10)),
                  "hvae": list(same),
                  "ddpm": list(same)})  # identical distribution (indeed values) to hvae
    runs["fid"] = [np.nan] * 9 + [5.0] + list(range(20))  # vae has a single fid value
    t = sig.pairwise_welch(runs, ["bpd", "fid"])
    assert list(t.columns) == sig.COLUMNS
    assert len(t) == 6
    bpd = t[t.metric == "bpd"]
    assert list(zip(bpd.model_a, bpd.model_b)) == [("vae", "hvae"), ("vae", "ddpm"),
                                                   ("hvae", "ddpm")]
    assert set(t.test) == {"Welch t over seeds"}
    first = bpd.iloc[0]
    ref = stats.ttest_ind(runs.bpd[:10], runs.bpd[10:20], equal_var=False)
    assert first["diff"] == pytest.approx(runs.bpd[:10].mean() - runs.bpd[10:20].mean())
    assert first.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert first.ci_lo > 0 and not first.tied  # clearly separated: vae worse
    assert bpd.iloc[2].tied and bpd.iloc[2]["diff"] == 0.0
    fid = t[t.metric == "fid"]
    vae_rows = fid[fid.model_a == "vae"]
    assert (vae_rows.n_a == 1).all() and vae_rows.tied.all()  # NaN dropped -> n=1 -> NaN ci
    assert vae_rows.ci_lo.isna().all() and vae_rows.p_value.isna().all()
    assert fid.iloc[2].n_a == 10 and not fid.iloc[2].tied  # range(10) vs range(10, 20)


def test_pairwise_welch_same_distribution_mostly_tied():
    # Null case: all models draw from one distribution; about 5% of intervals exclude 0.
    rng = np.random.default_rng(3)
    runs = _runs({f"m{i}": list(rng.normal(3.0, 0.1, 5)) for i in range(20)})
    t = sig.pairwise_welch(runs, ["bpd"])
    assert len(t) == 190
    assert 0.85 <= t.tied.mean() <= 1.0


def test_pairwise_paired():
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.5, 300)
    per_item = {("a", 0): base, ("b", 0): base + 0.1 + rng.normal(0, 0.05, 300),
                ("c", 0): base + rng.normal(0, 0.05, 300), ("a", 1): base + 0.01,
                ("b", 1): base + 0.01}
    t = sig.pairwise_paired(per_item)
    assert list(t.columns) == sig.COLUMNS
    assert list(zip(t.model_a, t.model_b, t.test)) == [
        ("a", "b", "paired over test images, seed 0"),
        ("a", "c", "paired over test images, seed 0"),
        ("b", "c", "paired over test images, seed 0"),
        ("a", "b", "paired over test images, seed 1")]
    assert (t.metric == "bpd").all() and (t.n_a == 300).all() and (t.n_b == 300).all()
    ab = t.iloc[0]
    ref = stats.ttest_rel(per_item[("a", 0)], per_item[("b", 0)])
    assert ab.p_value == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    assert ab.ci_hi < 0 and not ab.tied
    assert t.iloc[3].tied and math.isnan(t.iloc[3].ci_lo)  # identical arrays: zero spread


def test_pairwise_paired_length_mismatch_names_models():
    per_item = {("ddpm", 0): np.zeros(10), ("vdm", 0): np.zeros(9)}
    with pytest.raises(ValueError, match=r"'ddpm'.*'vdm'"):
        sig.pairwise_paired(per_item)


def test_tied_with():
    t = pd.DataFrame({
        "metric": ["bpd"] * 3 + ["fid"] + ["bpd"],
        "model_a": ["x", "x", "y", "x", "x"],
        "model_b": ["y", "z", "z", "y", "z"],
        "test": ["Welch t over seeds"] * 4 + ["paired over test images, seed 0"],
        "tied": [True, False, True, False, True],
    })
    assert sig.tied_with(t, "bpd") == {"x": ["y"], "y": ["x", "z"], "z": ["y"]}
    assert sig.tied_with(t, "fid") == {"x": [], "y": []}
    assert sig.tied_with(t, "bpd", "paired") == {"x": ["z"], "z": ["x"]}


def test_pooled_paired_interval_against_a_direct_computation():
    """Made-up per-image differences with both sources of variance (a seed effect and an image
    effect): the interval is D +- t_df * sqrt(var(seed means)/S + var(image means)/n) with the
    Welch-Satterthwaite df, computed here by hand; it is wider than the paired interval of one
    seed (which ignores the seed-to-seed spread), and it covers the true difference about 95% of
    the time over repeated seeds and images."""
    from scipy.stats import t as student_t

    from diffusion_models.significance import paired, pooled_paired

    rng = np.random.default_rng(0)
    seed_effect, image_effect = rng.normal(0, 0.05, (3, 1)), rng.normal(0, 0.2, (1, 50))
    d = 0.1 + seed_effect + image_effect + rng.normal(0, 0.02, (3, 50))
    r = pooled_paired(d)
    vs, vi = d.mean(1).var(ddof=1) / 3, d.mean(0).var(ddof=1) / 50
    df = (vs + vi) ** 2 / (vs ** 2 / 2 + vi ** 2 / 49)
    half = student_t.ppf(0.975, df) * math.sqrt(vs + vi)
    assert r["diff"] == pytest.approx(d.mean()) and r["df"] == pytest.approx(df)
    assert (r["ci_lo"], r["ci_hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert r["p_value"] == pytest.approx(2 * student_t.sf(abs(d.mean()) / math.sqrt(vs + vi), df))
    one = paired(d[0])
    assert r["ci_hi"] - r["ci_lo"] > one["ci_hi"] - one["ci_lo"]
    covered = []
    for _ in range(400):
        dd = 0.1 + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.2, (1, 50)) + rng.normal(0, 0.02, (3, 50))
        rr = pooled_paired(dd)
        covered.append(rr["ci_lo"] <= 0.1 <= rr["ci_hi"])
    assert 0.9 <= np.mean(covered) <= 1.0, np.mean(covered)


def test_holm_against_a_hand_computation():
    from diffusion_models.significance import holm

    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4*0.005, 3*0.01, 2*0.03, 1*0.04 -> running max
    want = [0.03, 0.06, 0.06, 0.02, float("nan")]
    assert np.allclose(holm(p), want, equal_nan=True)
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1


def test_pairwise_pooled_is_holm_corrected_over_all_pairs():
    """Three models: a is clearly better than b and c; b and c differ by a little. The rows'
    p_holm is Holm's adjustment of their p-values, and `tied` follows p_holm, not p."""
    from diffusion_models.significance import holm, pairwise_pooled

    rng = np.random.default_rng(1)
    base = rng.normal(2.0, 0.3, 40)
    items = {}
    for s in range(3):
        items[("a", s)] = base + rng.normal(0, 0.01, 40)
        items[("b", s)] = base + 0.2 + rng.normal(0, 0.01, 40)
        items[("c", s)] = base + 0.2 + 0.004 * (s + 1) + rng.normal(0, 0.01, 40)
    t = pairwise_pooled(items)
    assert list(zip(t.model_a, t.model_b)) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert np.allclose(t.p_holm, holm(t.p_value))
    assert (t.tied == ~(t.p_holm < 0.05)).all()
    assert not t.iloc[0].tied and not t.iloc[1].tied and t.iloc[0].ci_hi < 0
    with pytest.raises(ValueError, match="differ in length"):
        pairwise_pooled({("a", 0): np.zeros(3), ("b", 0): np.zeros(4)})


def test_bootstrap_means_against_a_seeded_resampling_written_here():
    """Each draw: the seeds resampled with replacement, and for each drawn seed one of its own
    replicates at random (the same generator's draws, redone by hand)."""
    reps = {0: [1.0, 2.0, 3.0], 1: [10.0, 20.0, 30.0], 2: [100.0, 200.0, 300.0]}
    got = sig.bootstrap_means(reps, 50, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    seeds = rng.integers(0, 3, size=(50, 3))
    picks = rng.integers(0, 3, size=(50, 3))
    table = [reps[0], reps[1], reps[2]]
    expected = [np.mean([table[seeds[d, j]][picks[d, j]] for j in range(3)]) for d in range(50)]
    assert got == pytest.approx(expected, rel=1e-15)


def test_bootstrap_interval_is_a_t_interval_on_the_seeds_degrees_of_freedom():
    draws = np.random.default_rng(0).normal(5.0, 2.0, size=4000)  # biased draws: the centre is the estimate's
    var = np.var(draws, ddof=1) * 3 / 2  # three seeds: the resampling's (S - 1)/S shrinkage undone
    lo, hi, p = sig.bootstrap_interval(1.0, [(draws, 3)])
    t = stats.t(2)  # S - 1 degrees of freedom
    assert (lo, hi) == pytest.approx((1.0 - t.ppf(0.975) * var ** 0.5, 1.0 + t.ppf(0.975) * var ** 0.5), rel=1e-12)
    assert p == pytest.approx(2 * t.sf(1.0 / var ** 0.5), rel=1e-12)
    # a difference of two means: variances add, Welch-Satterthwaite degrees of freedom
    other = np.random.default_rng(1).normal(0.0, 1.0, size=4000)
    va, vb = var, np.var(other, ddof=1) * 4 / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    lo, hi, _ = sig.bootstrap_interval(1.0, [(draws, 3), (other, 4)])
    assert hi - lo == pytest.approx(2 * stats.t(df).ppf(0.975) * (va + vb) ** 0.5, rel=1e-12)
    # one seed: only the sampling spread, normal
    lo, hi, _ = sig.bootstrap_interval(1.0, [(other, 1)])
    assert hi - lo == pytest.approx(2 * 1.959963984540054 * np.std(other, ddof=1), rel=1e-12)
    assert all(math.isnan(v) for v in sig.bootstrap_interval(1.0, [(np.ones(10), 3)]))  # no spread: no interval


def test_bootstrap_interval_covers_the_mean_over_seeds_at_its_level():
    """Three seeds whose spread dominates the sampling noise: a plain bootstrap over seeds
    covers far less than 95% (about 75%); the corrected interval covers about 95%."""
    g = np.random.default_rng(2)
    covered, plain = 0, 0
    trials = 400
    for _ in range(trials):
        seeds = {s: 4.0 + g.normal(0, 1.0) for s in range(3)}  # the true mean over seeds: 4.0
        reps = {s: list(v + g.normal(0, 0.05, 50)) for s, v in seeds.items()}
        draws = sig.bootstrap_means(reps, 500, g)
        mean = np.mean(list(seeds.values()))
        lo, hi, _ = sig.bootstrap_interval(mean, [(draws, 3)])
        covered += lo <= 4.0 <= hi
        plain += abs(mean - 4.0) <= 1.96 * np.std(draws, ddof=1)
    assert 0.90 <= covered / trials <= 0.99 and plain / trials < 0.85, (covered, plain)


def test_pairwise_bootstrap_separates_a_real_difference_and_ties_an_absent_one():
    g = np.random.default_rng(1)
    values = {"a": {0: 4.0, 1: 4.2, 2: 3.9}, "b": {0: 4.1, 1: 3.95, 2: 4.05}, "c": {0: 9.0, 1: 9.3, 2: 8.8}}
    reps = {m: {s: list(v + g.normal(0, 0.2, 100)) for s, v in runs.items()} for m, runs in values.items()}
    table = sig.pairwise_bootstrap(values, reps, "fid").set_index(["model_a", "model_b"])
    assert list(table.index) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert (table["test"] == sig.BOOTSTRAP_TEST).all() and (table["p_holm"] >= table["p_value"]).all()
    assert table.loc[("a", "b"), "diff"] == pytest.approx(np.mean([4.0, 4.2, 3.9]) - np.mean([4.1, 3.95, 4.05]))
    assert table.loc[("a", "b"), "tied"] and not table.loc[("a", "c"), "tied"] and not table.loc[("b", "c"), "tied"]
    again = sig.pairwise_bootstrap(values, reps, "fid").set_index(["model_a", "model_b"])
    assert again.equals(table)  # a fixed generator: the same tables every run
    ci = sig.bootstrap_intervals(values, reps)
    assert ci["c"][0] < np.mean([9.0, 9.3, 8.8]) < ci["c"][1] and ci["a"][1] < ci["c"][0]
