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
    matched = report.check_matched(tr[tr["last"]].to_dict("records"), cfg.train.images,
                                   cfg.compare.allow_unmatched)
    nll_runs, sampling = report.nll_runs(evals), report.sampling_runs(samples)
    runs = report.runs_table(tr, nll_runs, sampling)
    final = runs[runs["selected"]]
    per_image = report.headline_runs(final, evals)
    fids, fid_reps = report.fid_replicates(final, samples)
    sig = pd.concat([significance.pairwise_pooled(per_image, "bpd"),
                     significance.pairwise_bootstrap(fids, fid_reps, "fid"),
                     significance.pairwise_welch(final[["model", "seed"] + SIGNIFICANCE_METRICS],
                                                 SIGNIFICANCE_METRICS),
                     significance.pairwise_paired(per_image, "bpd")],
                    ignore_index=True)
    # ties after Holm: bits/dim by the pooled paired test (same images, over seeds), FID by the bootstrap
    tests = {"bpd": significance.POOLED_TEST, "fid": significance.BOOTSTRAP_TEST}
    comp = report.comparison_table(runs, matched, {m: significance.tied_with(sig, m, tests[m])
                                                   for m in SIGNIFICANCE_METRICS},
                                   significance.bootstrap_intervals(fids, fid_reps))
    frontier_runs = report.frontier_runs(runs, cfg.train.images, {t["model"]: t["fractions"] for t in trains})
    nll, frontier, profile = report.nll_table(nll_runs), report.frontier_table(frontier_runs), report.profile_table(evals)
    views = report.views_table(evals)
    precision = report.precision_check(sampling, comp) if cfg.sample.precision_check else None
    provenance = report.provenance(trains, cfg.train.images)
    n, seeds = int(sampling["n_samples"].iloc[0]), run_seeds(cfg)
    extractor = comp["fid_extractor"].iloc[0]
    over = f"mean ± standard deviation over {len(seeds)} seeds" if len(seeds) > 1 else f"one seed ({seeds[0]})"
    caption = (f"{cfg.data.name}, at most {cfg.train.images:,} training images per model and run, each run's "
               f"checkpoint with the best validation bound, {over}: headline "
               f"bound on the test split (bits/dim, estimator per row) and FID of {n:,} samples "
               f"({extractor} features) against the training split, headline sampler with NFE per row; "
               f"{provenance[2]}.")
    versions_str = "; ".join(f"{k}={v}" for k, v in trains[0]["versions"].items())
    tables = {"comparison.csv": comp, "nll.csv": nll, "frontier.csv": frontier, "frontier_runs.csv": frontier_runs,
              "runs.csv": runs, "sampling.csv": sampling, "significance.csv": sig, "vlb_profile.csv": profile,
              "likelihood_views.csv": views} | ({"precision_check.csv": precision} if precision is not None else {})
    for df in tables.values():
        df["budget_images"], df["versions"] = cfg.train.images, versions_str
    nll["dataset"], comp["caption"] = cfg.data.name, caption
    for fname, df in tables.items():
        write_text(RESULTS / fname, df.to_csv(index=False))
    timings = report.stage_times(trains, evals, samples, read_json(FEATURES / "features.json"))
    write_text(RESULTS / "timings.csv", timings.to_csv(index=False))
    points = report.fid_vs_nfe(sampling)
    write_text(RESULTS / "fid_vs_nfe.csv", points.to_csv(index=False))
    plots.plot_fid_vs_nfe(points, str(RESULTS / "fid_vs_nfe.png"),
                          f"{cfg.data.name}: FID ({extractor}, {n:,} samples) against NFE; "
                          f"budget {cfg.train.images:,} images, seed {seeds[0]}")
    plots.plot_frontier(frontier, str(RESULTS / "frontier.png"),
                        f"{cfg.data.name}: compute frontier, the best-validation checkpoint within each training "
                        f"FLOP budget (cap {cfg.train.images:,} images); {over}")
    plots.plot_vlb_profile(profile, str(RESULTS / "vlb_profile.png"),
                           f"{cfg.data.name}: where each diffusion bound's bits come from (test split, "
                           f"selected checkpoints, mean over {len(seeds)} seeds)")
    write_text(RESULTS / "comparison.tex", report.latex(comp, caption.replace("±", "$\\pm$")))
    text = report.markdown(comp, nll, frontier, sampling, provenance, timings, sig, views, precision)
    write_text(RESULTS / "comparison.md", text)
    write_text(RESULTS / "summary.md", report.summary(comp, views, timings))
    print(text)
