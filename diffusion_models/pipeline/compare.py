"""The `compare` stage: every table and figure of results/ from the stages' records."""
from __future__ import annotations

import pandas as pd

from .. import plots, report, significance
from ..config import Config
from ..runtime import read_json, write_text
from .common import EVAL_RECORDS, FEATURES, RESULTS, SAMPLE_RECORDS, run_seeds, train_record

SIGNIFICANCE_METRICS = ["bpd", "fid"]


def compare(cfg: Config) -> None:
    names = list(cfg.models)
    trains = [train_record(cfg, m) for m in names]
    evals = [read_json(EVAL_RECORDS / f"{m}.json") for m in names]
    samples = [read_json(SAMPLE_RECORDS / f"{m}.json") for m in names]
    tr = report.train_runs(trains)
    matched = report.check_matched(tr[tr["fraction"] == 1.0].to_dict("records"), cfg.train.images,
                                   cfg.compare.allow_unmatched)
    nll_runs, sampling = report.nll_runs(evals), report.sampling_runs(samples)
    runs = report.runs_table(tr, nll_runs, sampling)
    final = runs[runs["fraction"] == 1.0]
    per_image = report.headline_runs(final, evals)
    sig = pd.concat([significance.pairwise_pooled(per_image, "bpd"),
                     significance.pairwise_welch(final[["model", "seed"] + SIGNIFICANCE_METRICS],
                                                 SIGNIFICANCE_METRICS),
                     significance.pairwise_paired(per_image, "bpd")],
                    ignore_index=True)
    # ties after Holm: bits/dim by the pooled paired test (same images, over seeds), FID by Welch over seeds
    tests = {"bpd": significance.POOLED_TEST, "fid": significance.WELCH_TEST}
    comp = report.comparison_table(runs, matched, {m: significance.tied_with(sig, m, tests[m])
                                                   for m in SIGNIFICANCE_METRICS})
    nll, sweep, profile = report.nll_table(nll_runs), report.sweep_table(runs), report.profile_table(evals)
    views = report.views_table(evals)
    precision = report.precision_check(sampling, comp)
    provenance = report.provenance(trains, cfg.train.images)
    n, seeds = int(sampling["n_samples"].iloc[0]), run_seeds(cfg)
    extractor = comp["fid_extractor"].iloc[0]
    over = f"mean ± standard deviation over {len(seeds)} seeds" if len(seeds) > 1 else f"one seed ({seeds[0]})"
    caption = (f"{cfg.data.name}, {cfg.train.images:,} training images per model and run, {over}: headline "
               f"bound on the test split (bits/dim, estimator per row) and FID of {n:,} samples "
               f"({extractor} features) against the training split, headline sampler with NFE per row; "
               f"{provenance[2]}.")
    versions_str = "; ".join(f"{k}={v}" for k, v in trains[0]["versions"].items())
    for df in (comp, nll, sweep, runs, sampling, sig, profile, views, precision):
        df["budget_images"], df["versions"] = cfg.train.images, versions_str
    nll["dataset"], comp["caption"] = cfg.data.name, caption
    tables = {"comparison.csv": comp, "nll.csv": nll, "budget_sweep.csv": sweep, "runs.csv": runs,
              "sampling.csv": sampling, "significance.csv": sig, "vlb_profile.csv": profile,
              "likelihood_views.csv": views, "precision_check.csv": precision}
    for fname, df in tables.items():
        write_text(RESULTS / fname, df.to_csv(index=False))
    timings = report.stage_times(trains, evals, samples, read_json(FEATURES / "features.json"))
    write_text(RESULTS / "timings.csv", timings.to_csv(index=False))
    points = report.fid_vs_nfe(sampling)
    write_text(RESULTS / "fid_vs_nfe.csv", points.to_csv(index=False))
    plots.plot_fid_vs_nfe(points, str(RESULTS / "fid_vs_nfe.png"),
                          f"{cfg.data.name}: FID ({extractor}, {n:,} samples) against NFE; "
                          f"budget {cfg.train.images:,} images, seed {seeds[0]}")
    plots.plot_budget_sweep(sweep, str(RESULTS / "budget_sweep.png"),
                            f"{cfg.data.name}: test bits/dim and FID ({n:,} samples) against training "
                            f"compute; {over}")
    plots.plot_vlb_profile(profile, str(RESULTS / "vlb_profile.png"),
                           f"{cfg.data.name}: where each diffusion bound's bits come from (test split, "
                           f"{cfg.train.images:,} training images, mean over {len(seeds)} seeds)")
    write_text(RESULTS / "comparison.tex", report.latex(comp, caption.replace("±", "$\\pm$")))
    text = report.markdown(comp, nll, sweep, sampling, provenance, timings, sig, views, precision)
    write_text(RESULTS / "comparison.md", text)
    write_text(RESULTS / "summary.md", report.summary(comp, views))
    print(text)
