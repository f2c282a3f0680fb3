"""Which differences between models are real: t intervals for differences of means.

- `welch`: Welch's unequal-variance t test / interval (Welch 1947; Satterthwaite 1946 degrees
  of freedom) for a metric measured over independent seeds of two models;
- `paired`: one-sample t interval on per-item differences (e.g. per-test-image bpd of model A
  minus model B on the same images), the paired t test (Student 1908);
- `pooled_paired`: a difference of bounds on the same test images pooled over seeds, with an
  interval that covers both sources of variance (which training seed, which test images);
- `bootstrap_means` / `pairwise_bootstrap`: a metric with bootstrap replicates per run (FID:
  each run's generated samples resampled with replacement) resampled again over seeds, for a
  model's mean and for the difference of two models' means (the bootstrap's variance with a
  t reference on the seeds' degrees of freedom; Efron & Tibshirani 1993, ch. 12-13);
- `holm`: Holm's step-down adjustment of p-values over a family of tests (Holm 1979);
- `pairwise_welch` / `pairwise_paired` / `pairwise_pooled`: those tests for every unordered
  pair of models, one row per pair, with `p_holm` (over all pairs of that metric and test) and
  `tied` = not significant at 5% after Holm's correction (difference not established);
- `tied_with`: for each model, the models it is tied with.

Only the t and normal distributions' quantiles/tails come from scipy; the means, variances,
degrees of freedom and intervals are computed here.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as student_t

WELCH_TEST = "Welch t over seeds"
BOOTSTRAP_TEST = "bootstrap over samples and seeds"
BOOTSTRAP_SEED = 0  # the resampling over seeds: fixed, so the tables are reproducible
POOLED_TEST = "paired over test images, pooled over seeds"
ALPHA = 0.05  # family-wise error rate of each family of pairwise tests (Holm)
COLUMNS = ["metric", "model_a", "model_b", "test", "diff", "ci_lo", "ci_hi",
           "p_value", "p_holm", "n_a", "n_b", "tied"]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _constant(x: np.ndarray) -> bool:
    """All values equal (zero sample variance, tested exactly rather than via rounding)."""
    return bool(np.all(x == x[0]))


def _t_interval(diff: float, se: float, df: float, confidence: float) -> tuple[float, float, float]:
    """(ci_lo, ci_hi, two-sided p) for estimate `diff` with standard error `se` on `df` dof."""
    half = float(student_t.ppf(0.5 + confidence / 2.0, df)) * se
    p = float(2.0 * student_t.sf(abs(diff) / se, df))
    return diff - half, diff + half, min(p, 1.0)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Welch's t interval and two-sided test for mean(a) - mean(b) (Welch 1947).

    Sample variances use ddof=1; df is the Welch-Satterthwaite approximation
    (va/na + vb/nb)^2 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1)).
    If either sample has fewer than 2 values, or both samples are constant (variance 0), `ci_lo`, `ci_hi`, `df`
    and `p_value` are NaN (no spread can be estimated); `diff` is still given (NaN if a sample
    is empty). Returns keys diff, ci_lo, ci_hi, df, p_value, n_a, n_b.
    """
    _check_confidence(confidence)
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    na, nb = int(x.size), int(y.size)
    diff = float(x.mean() - y.mean()) if na and nb else math.nan
    out = {"diff": diff, "ci_lo": math.nan, "ci_hi": math.nan, "df": math.nan,
           "p_value": math.nan, "n_a": na, "n_b": nb}
    if na < 2 or nb < 2:
        return out
    if _constant(x) and _constant(y):  # exact test: var() of equal values may be ~1e-33
        return out
    va = 0.0 if _constant(x) else x.var(ddof=1) / na  # squared standard errors of the means
    vb = 0.0 if _constant(y) else y.var(ddof=1) / nb
    se2 = va + vb
    df = float(se2 ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1)))
    lo, hi, p = _t_interval(diff, math.sqrt(se2), df, confidence)
    out.update(ci_lo=lo, ci_hi=hi, df=df, p_value=p)
    return out


def paired(d: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired t interval and two-sided test on per-item differences d (Student 1908).

    mean(d) +- t_{n-1} * sd(d, ddof=1) / sqrt(n). With fewer than 2 differences, or all
    differences exactly equal (sd 0), `ci_lo`, `ci_hi` and `p_value` are NaN.
    Returns keys diff, ci_lo, ci_hi, p_value, n.
    """
    _check_confidence(confidence)
    x = np.asarray(d, dtype=np.float64).ravel()
    n = int(x.size)
    out = {"diff": float(x.mean()) if n else math.nan, "ci_lo": math.nan, "ci_hi": math.nan,
           "p_value": math.nan, "n": n}
    if n < 2:
        return out
    sd = float(x.std(ddof=1))
    if _constant(x) or not math.isfinite(sd):
        return out
    lo, hi, p = _t_interval(out["diff"], sd / math.sqrt(n), n - 1, confidence)
    out.update(ci_lo=lo, ci_hi=hi, p_value=p)
    return out


def pooled_paired(d: np.ndarray, confidence: float = 0.95) -> dict:
    """Mean difference and its interval from per-image differences d [S seeds, n images] on the
    same test images in every seed: both seed-to-seed and image-to-image variation count.

    With D = mean of d, se^2 = var_s(seed means) / S + var_i(image means over seeds) / n (sample
    variances, ddof 1): the seed term is the training randomness, the image term the choice of
    test images. (Under a seed x image random-effects model each term also holds the interaction's
    share once, so the se is slightly conservative.) Degrees of freedom: Welch-Satterthwaite of
    the two terms (S - 1 and n - 1). One seed: the paired interval over images. Returns keys
    diff, ci_lo, ci_hi, p_value, se, df, seeds, n."""
    _check_confidence(confidence)
    x = np.asarray(d, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"pooled_paired needs differences [seeds, images >= 2], got shape {x.shape}")
    s, n = x.shape
    out = {"diff": float(x.mean()), "ci_lo": math.nan, "ci_hi": math.nan, "p_value": math.nan,
           "se": math.nan, "df": math.nan, "seeds": s, "n": n}
    vi = float(x.mean(0).var(ddof=1)) / n
    vs = float(x.mean(1).var(ddof=1)) / s if s > 1 else 0.0
    se2 = vs + vi
    if not se2 > 0:
        return out
    df = se2 ** 2 / ((vs ** 2 / (s - 1) if s > 1 else 0.0) + vi ** 2 / (n - 1))
    lo, hi, p = _t_interval(out["diff"], math.sqrt(se2), df, confidence)
    out.update(ci_lo=lo, ci_hi=hi, p_value=p, se=math.sqrt(se2), df=df)
    return out


def bootstrap_means(replicates: dict[int, Sequence[float]], draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` bootstrap replicates of a model's mean over seeds: each draws len(seeds) seeds with
    replacement and, for each drawn seed, one of its own replicates (a resample of its samples)
    at random, and averages them. `replicates`: seed -> that run's replicate values."""
    reps = np.asarray([np.asarray(replicates[s], dtype=np.float64) for s in sorted(replicates)])
    n_seeds, n_reps = reps.shape
    seeds = rng.integers(0, n_seeds, size=(draws, n_seeds))
    return reps[seeds, rng.integers(0, n_reps, size=(draws, n_seeds))].mean(axis=1)


def bootstrap_variance(draws: np.ndarray, n_seeds: int) -> float:
    """The variance of a mean over `n_seeds` seeds from its `bootstrap_means` draws, with the
    resampling's shrinkage of the seed-to-seed part ((S - 1)/S) undone: resampling 3 seeds alone
    gives an interval that covers about 75% of the time where it claims 95%."""
    v = float(np.var(draws, ddof=1))
    return v * n_seeds / (n_seeds - 1) if n_seeds > 1 else v


def bootstrap_interval(estimate: float, parts: Sequence[tuple[np.ndarray, int]],
                       confidence: float = 0.95) -> tuple[float, float, float]:
    """(ci_lo, ci_hi, two-sided p of 0) for an estimate made of independent means, each given as
    (its bootstrap draws, its number of seeds): se² = the sum of their `bootstrap_variance`s,
    centred on the estimate (the resampled FIDs' upward bias moves nothing), with Student's t on
    Welch–Satterthwaite degrees of freedom (S - 1 per mean: few seeds, few degrees of freedom).
    With a single seed on a side (no seed-to-seed spread to estimate) the normal interval of the
    sampling spread alone."""
    _check_confidence(confidence)
    var = [bootstrap_variance(d, s) for d, s in parts]
    se = math.sqrt(sum(var))
    if not se > 0:
        return math.nan, math.nan, math.nan
    if all(s > 1 for _, s in parts):
        df = sum(var) ** 2 / sum(v ** 2 / (s - 1) for v, (_, s) in zip(var, parts))
        return _t_interval(estimate, se, df, confidence)
    half = float(norm.ppf(0.5 + confidence / 2.0)) * se
    return estimate - half, estimate + half, float(min(1.0, 2.0 * norm.sf(abs(estimate) / se)))


def pairwise_bootstrap(values: dict[str, dict[int, float]], replicates: dict[str, dict[int, Sequence[float]]],
                       metric: str = "fid", draws: int = 2000, confidence: float = 0.95) -> pd.DataFrame:
    """The bootstrap test for every unordered pair of models: diff = mean(a) - mean(b) of the
    runs' values (model -> seed -> value), its interval from independent `bootstrap_means` of
    each (model -> seed -> replicates; a fixed generator), Holm over the pairs."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    models = [m for m in values if m in replicates and replicates[m]]
    boot = {m: (bootstrap_means(replicates[m], draws, rng), len(replicates[m])) for m in models}
    rows = []
    for ma, mb in itertools.combinations(models, 2):
        diff = float(np.mean(list(values[ma].values())) - np.mean(list(values[mb].values())))
        lo, hi, p = bootstrap_interval(diff, [boot[ma], boot[mb]], confidence)
        rows.append({"metric": metric, "model_a": ma, "model_b": mb, "test": BOOTSTRAP_TEST, "diff": diff,
                     "ci_lo": lo, "ci_hi": hi, "p_value": p, "n_a": len(values[ma]), "n_b": len(values[mb])})
    return _with_holm(rows)


def bootstrap_intervals(values: dict[str, dict[int, float]], replicates: dict[str, dict[int, Sequence[float]]],
                        draws: int = 2000, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """model -> the bootstrap interval of its mean over seeds (`bootstrap_interval`)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    out = {}
    for m, reps in replicates.items():
        if reps:
            mean = float(np.mean(list(values[m].values())))
            lo, hi, _ = bootstrap_interval(mean, [(bootstrap_means(reps, draws, rng), len(reps))], confidence)
            out[m] = (lo, hi)
    return out


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest of m p-values becomes
    max over j <= i of min(1, (m - j + 1) p_(j)); rejecting where the adjusted p < alpha controls
    the family-wise error rate at alpha. NaN p-values stay NaN and do not count in m."""
    x = np.asarray(p, dtype=np.float64)
    out = np.full_like(x, np.nan)
    ok = np.flatnonzero(~np.isnan(x))
    order = ok[np.argsort(x[ok], kind="stable")]
    m, running = len(order), 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * x[i]))
        out[i] = running
    return out


def _with_holm(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, with p_holm per (metric, test family) and `tied` = not significant
    at ALPHA after Holm (NaN: tied). The families: each metric's Welch tests, its pooled paired
    tests, and each seed's paired tests."""
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("p_holm", "tied")])
    df["p_holm"] = np.nan
    for _, idx in df.groupby(["metric", "test"], sort=False).groups.items():
        df.loc[idx, "p_holm"] = holm(df.loc[idx, "p_value"].to_numpy())
    df["tied"] = ~(df["p_holm"] < ALPHA)
    return df[COLUMNS]


def pairwise_welch(runs: pd.DataFrame, metrics: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """Welch test over seeds for every metric and unordered pair of models.

    `runs`: one row per (model, seed), columns `model`, `seed` and the metric columns; NaN values
    are dropped per metric. Models are ordered by first appearance; each pair (a, b) has a
    before b and diff = mean(a) - mean(b). Columns: see `COLUMNS`.
    """
    missing = [c for c in ["model", "seed", *metrics] if c not in runs.columns]
    if missing:
        raise ValueError(f"runs lacks column(s) {missing}")
    models = list(pd.unique(runs["model"]))
    rows = []
    for metric in metrics:
        values = {m: runs.loc[runs["model"] == m, metric].dropna().to_numpy(dtype=np.float64)
                  for m in models}
        for ma, mb in itertools.combinations(models, 2):
            r = welch(values[ma], values[mb], confidence)
            rows.append({"metric": metric, "model_a": ma, "model_b": mb, "test": WELCH_TEST,
                         "diff": r["diff"], "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"],
                         "p_value": r["p_value"], "n_a": r["n_a"], "n_b": r["n_b"]})
    return _with_holm(rows)


def _differences(per_item: dict[tuple[str, int], np.ndarray], ma: str, mb: str, seed: int) -> np.ndarray:
    """Per-image values of model ma minus model mb in one seed; a ValueError naming the models if
    their arrays differ in length (they must cover the same test images, in the same order)."""
    xa, xb = (np.asarray(per_item[(m, seed)], dtype=np.float64).ravel() for m in (ma, mb))
    if xa.size != xb.size:
        raise ValueError(f"seed {seed}: per-image arrays of models {ma!r} ({xa.size}) and {mb!r} "
                         f"({xb.size}) differ in length; they must cover the same test images")
    return xa - xb


def pairwise_paired(per_item: dict[tuple[str, int], np.ndarray], metric: str = "bpd",
                    confidence: float = 0.95) -> pd.DataFrame:
    """Paired t test over test images for every seed and unordered pair of models with that seed.

    `per_item[(model, seed)]`: per-test-image values on the same images in the same order for
    every model. diff = mean(a - b); models ordered by first appearance among the keys, seeds
    ascending. Raises ValueError naming the models if two arrays of one seed differ in length.
    """
    models = list(dict.fromkeys(m for m, _ in per_item))
    seeds = sorted({s for _, s in per_item})
    rows = []
    for seed in seeds:
        have = [m for m in models if (m, seed) in per_item]
        for ma, mb in itertools.combinations(have, 2):
            r = paired(_differences(per_item, ma, mb, seed), confidence)
            rows.append({"metric": metric, "model_a": ma, "model_b": mb,
                         "test": f"paired over test images, seed {seed}",
                         "diff": r["diff"], "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"],
                         "p_value": r["p_value"], "n_a": r["n"], "n_b": r["n"]})
    return _with_holm(rows)


def pairwise_pooled(per_item: dict[tuple[str, int], np.ndarray], metric: str = "bpd",
                    confidence: float = 0.95) -> pd.DataFrame:
    """`pooled_paired` for every unordered pair of models, over the seeds both have: per-image
    differences on the same test images within each seed, pooled over the seeds (the interval
    covers seed-to-seed and image-to-image variation). Holm-adjusted over all pairs."""
    models = list(dict.fromkeys(m for m, _ in per_item))
    rows = []
    for ma, mb in itertools.combinations(models, 2):
        seeds = sorted({s for m, s in per_item if m == ma} & {s for m, s in per_item if m == mb})
        r = pooled_paired(np.stack([_differences(per_item, ma, mb, s) for s in seeds]), confidence)
        rows.append({"metric": metric, "model_a": ma, "model_b": mb, "test": POOLED_TEST, "diff": r["diff"],
                     "ci_lo": r["ci_lo"], "ci_hi": r["ci_hi"], "p_value": r["p_value"],
                     "n_a": r["seeds"] * r["n"], "n_b": r["seeds"] * r["n"]})
    return _with_holm(rows)


def tied_with(table: pd.DataFrame, metric: str, test_prefix: str = "Welch") -> dict[str, list[str]]:
    """For each model in the rows of `table` for `metric` whose `test` starts with `test_prefix`,
    the sorted list of the other models it is tied with (models in order of first appearance)."""
    rows = table[(table["metric"] == metric)
                 & table["test"].astype(str).str.startswith(test_prefix)]
    out: dict[str, set[str]] = {}
    for ma, mb, tied in zip(rows["model_a"], rows["model_b"], rows["tied"]):
        out.setdefault(ma, set())
        out.setdefault(mb, set())
        if bool(tied):
            out[ma].add(mb)
            out[mb].add(ma)
    return {m: sorted(others) for m, others in out.items()}
