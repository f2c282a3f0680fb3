"""Comparison tables (pandas) from the per-model train, evaluate and sample records."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .pipeline.common import RUN_FIELDS
from .train import select_checkpoint

COMPARISON_COLUMNS = ["model", "family", "params", "seeds", "images_seen", "images_seen_std", "train_flops",
                      "train_seconds", "train_seconds_std", "val_bpd", "bpd", "bpd_std", "bpd_se", "bpd_estimator",
                      "tied_bpd", "fid", "fid_std", "fid_ci_lo", "fid_ci_hi", "fid_test", "fid_test_std", "tied_fid",
                      "fid_extractor",
                      "fid_inception", "copies", "close_pixel", "close_features", "sampler", "n_samples", "nfe",
                      "samples_per_sec", "samples_per_sec_std", "matched", "dataset", "device"]
RUN_KEYS = ["model", "seed", "fraction"]
MEMORISATION = {"copies": "mem_pixel_copies", "close_pixel": "mem_pixel_close_frac",
                "close_features": "mem_features_close_frac"}  # comparison column -> sampling.csv column
PRIMARY_EXTRACTOR = "classifier"  # the `fid` column of the comparison: works offline, on any size
INCEPTION = "inception-v3-compat"


def train_runs(trains: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per training run checkpoint (model, seed, fraction of the cap): its compute, its
    validation bound, whether it is the run's selected checkpoint and where the run stopped."""
    rows = [{"model": t["model"], "family": t["family"], "trains": t["trains"], "params": t["params"],
             "dataset": t["dataset"],
             "device": t["device"], **{k: r[k] for k in ("seed", "fraction", "images_seen", "steps",
                                                         "train_flops", "train_seconds", "images_per_sec",
                                                         "final_loss", "val_bpd", "selected", "last")}}
            for t in trains for r in t["runs"]]
    return pd.DataFrame(rows)


def nll_runs(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, seed, fraction, estimator), with each bound's named terms as
    term_<name> (bits/dim)."""
    rows = []
    for ev in evals:
        for run in ev["runs"]:
            for label, b in run["bounds"].items():
                row = {"model": ev["model"], **{k: run[k] for k in RUN_FIELDS}, "estimator": label,
                       "headline": label == run["headline"], "sweep": label == run["sweep_estimator"],
                       "bpd": b["bpd"], "bpd_se": b["bpd_se"], "nats": b["nats"], "nats_se": b["nats_se"],
                       "n_test": b["n_examples"]}
                row.update({f"term_{k}": v for k, v in b["terms_bpd"].items()})
                rows.append(row)
    df = pd.DataFrame(rows)
    terms = sorted(c for c in df.columns if c.startswith("term_"))
    return df[[c for c in df.columns if not c.startswith("term_")] + terms]


def sampling_runs(samples: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, seed, fraction, sampler setting, extractor): NFE, speed, FID, KID,
    precision/recall, and the FID torchmetrics computes on the same features; an unavailable
    extractor says why in `status`. `sampler` is the full setting's label, `sampler_name` the
    sampler alone; `headline` marks the sampler every run is scored with."""
    rows = []
    for rec in samples:
        for p in rec["points"]:
            for m in p["metrics"]:
                rows.append({"model": rec["model"], **{k: p[k] for k in RUN_FIELDS},
                             "sampler": p["label"], "sampler_name": p["sampler"],
                             "steps": p["steps"] if p["steps"] is not None else p["nfe"], "nfe": p["nfe"],
                             "headline": p["headline"], "dtype": p.get("precision", "fp32"),  # (precision: P/R's)
                             "n_samples": rec["n_samples"],
                             "reference_set": rec["references"][m["reference"]], "dataset": rec["dataset"],
                             "device": rec["device"], "nonfinite_samples": p.get("nonfinite_samples", 0),
                             **{k: p[k] for k in ("samples_per_sec", "sec_per_sample",
                                                                           "speed_batch", "speed_repeats",
                                                                           "sample_seconds")},
                             **{k: v for k, v in m.items() if k != "fid_bootstrap"},
                             **{f"mem_{k}": v for k, v in p["memorisation"].items()}})
    return pd.DataFrame(rows)


def _final(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's selected checkpoint (best validation bound)."""
    return df[df["selected"].astype(bool)]


def runs_table(trains: pd.DataFrame, nll: pd.DataFrame, sampling: pd.DataFrame) -> pd.DataFrame:
    """One row per run checkpoint: training compute and validation bound; `bpd` in the estimator
    the model declares as its headline (`Model.headline_estimator`, at the selected checkpoints'
    IWAE K; NaN elsewhere) and `sweep_bpd` in the one it declares at the sweep's K, computed at
    every checkpoint (the frontier); the headline sampler's quality and speed (selected only)."""
    head = _final(nll[nll["headline"].astype(bool)]).set_index(RUN_KEYS)
    sweep = nll[nll["sweep"].astype(bool)].set_index(RUN_KEYS)
    s = sampling[sampling["headline"].astype(bool)]
    at = lambda e, ref: s[(s["extractor"] == e) & (s["reference"] == ref)].set_index(RUN_KEYS)  # noqa: E731
    prim, held, inc = at(PRIMARY_EXTRACTOR, "train"), at(PRIMARY_EXTRACTOR, "test"), at(INCEPTION, "train")
    out = trains.set_index(RUN_KEYS)
    out = out.assign(
        bpd=head["bpd"], bpd_se=head["bpd_se"], bpd_estimator=head["estimator"],
        sweep_bpd=sweep["bpd"], sweep_bpd_se=sweep["bpd_se"], sweep_estimator=sweep["estimator"],
        fid=prim["fid"], kid=prim["kid"], precision=prim["precision"], recall=prim["recall"],
        fid_test=held["fid"], fid_extractor=prim["extractor_label"],
        fid_inception=inc["fid"], inception_status=inc["status"],
        sampler=prim["sampler"], n_samples=prim["n_samples"], nfe=prim["nfe"],
        samples_per_sec=prim["samples_per_sec"], **{v: prim[v] for v in MEMORISATION.values()})
    return out.reset_index()


def _mean_std(g: Any, cols: list[str]) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof=1; NaN for one seed) of `cols` per group."""
    mean, std = g[cols].mean(), g[cols].std(ddof=1)
    return mean.join(std.add_suffix("_std"))


def comparison_table(runs: pd.DataFrame, matched: dict[str, str] | None = None,
                     tied: dict[str, dict[str, list[str]]] | None = None,
                     fid_ci: dict[str, tuple[float, float]] | None = None) -> pd.DataFrame:
    """One row per model at its runs' selected checkpoints (best validation bound): mean and
    standard deviation over seeds of the headline bound, FID (training and held-out reference),
    sampling speed, training time and images seen at selection; `bpd_se` is the mean of the
    runs' standard errors over test examples; `fid_ci_lo/hi`: the FID's bootstrap interval over
    samples and seeds (`fid_ci`: model -> (lo, hi)); memorisation columns are means over seeds;
    `tied_<metric>`: the models whose difference from this one is not significant
    (`tied`: significance.tied_with per metric)."""
    final = _final(runs)
    g = final.groupby("model", sort=False)
    agg = _mean_std(g, ["bpd", "fid", "fid_test", "samples_per_sec", "train_seconds", "fid_inception",
                        "images_seen"])
    first = g.first()
    inception = [_pm(m, s, ".4f") if st == "ok" else st for m, s, st in
                 zip(agg["fid_inception"], agg["fid_inception_std"], first["inception_status"])]
    ties = {f"tied_{k}": [", ".join((tied or {}).get(k, {}).get(m, [])) for m in first.index] for k in ("bpd", "fid")}
    out = first.assign(
        seeds=g["seed"].nunique(), train_flops=g["train_flops"].mean(), val_bpd=g["val_bpd"].mean(),
        bpd_se=g["bpd_se"].mean(), fid_inception=inception, matched=[(matched or {}).get(m, "") for m in first.index],
        fid_ci_lo=[(fid_ci or {}).get(m, (np.nan, np.nan))[0] for m in first.index],
        fid_ci_hi=[(fid_ci or {}).get(m, (np.nan, np.nan))[1] for m in first.index],
        **{c: agg[c] for c in ("bpd", "bpd_std", "fid", "fid_std", "fid_test", "fid_test_std", "samples_per_sec",
                               "samples_per_sec_std", "train_seconds", "train_seconds_std", "images_seen",
                               "images_seen_std")},
        **{c: g[v].mean() for c, v in MEMORISATION.items()}, **ties)
    return out.reset_index()[COMPARISON_COLUMNS]


def headline_runs(runs: pd.DataFrame, evals: list[dict[str, Any]]) -> dict[tuple[str, int], np.ndarray]:
    """(model, seed) -> every test image's bound (bits/dim) in the run's headline estimator
    (`runs_table`'s `bpd_estimator`) at its selected checkpoint: the paired comparison's data."""
    estimator = {(m, s): e for m, s, e in zip(runs["model"], runs["seed"], runs["bpd_estimator"])}
    return {(ev["model"], run["seed"]): np.asarray(run["bounds"][estimator[ev["model"], run["seed"]]]["per_example_bpd"])
            for ev in evals for run in ev["runs"] if run["selected"]}


def fid_replicates(runs: pd.DataFrame, samples: list[dict[str, Any]]
                   ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, list[float]]]]:
    """The headline FIDs of the selected checkpoints (classifier features, training reference),
    model -> seed -> FID, and their bootstrap replicates (the sample stage's), model -> seed ->
    replicates: the bootstrap test's data."""
    fids = {m: dict(zip(g["seed"], g["fid"])) for m, g in runs.groupby("model", sort=False)}
    reps: dict[str, dict[int, list[float]]] = {}
    for rec in samples:
        for p in rec["points"]:
            if p["headline"] and p["selected"]:
                for row in p["metrics"]:
                    if "fid_bootstrap" in row:
                        reps.setdefault(rec["model"], {})[p["seed"]] = row["fid_bootstrap"]
    return fids, reps


def profile_table(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """Where each diffusion bound's bits come from, at the selected checkpoints: one row per model,
    estimator and term (prior, each stratum of time of the diffusion term, reconstruction), bits/dim
    mean and std over seeds; strata carry their times and log-SNR range and bits per unit log SNR.
    The rows of one model and estimator sum to its bound."""
    rows = []
    for ev in evals:
        for run in (r for r in ev["runs"] if r["selected"]):
            for label, b in run["bounds"].items():
                if "profile" not in b:
                    continue
                p, terms = b["profile"], b["terms_bpd"]
                base = {"model": ev["model"], "estimator": label, "seed": run["seed"]}
                rows.append({**base, "term": "prior", "stratum": -1, "bpd": terms["prior"]})
                rows += [{**base, "term": "diffusion", "stratum": k, "t_lo": p["t_lo"][k], "t_hi": p["t_hi"][k],
                          "logsnr_lo": p["logsnr_lo"][k], "logsnr_hi": p["logsnr_hi"][k], "bpd": v}
                         for k, v in enumerate(p["bpd"])]
                rows.append({**base, "term": "reconstruction", "stratum": len(p["bpd"]), "bpd": terms["reconstruction"]})
    if not rows:
        return pd.DataFrame(columns=["model", "estimator", "term", "stratum", "bpd", "bpd_std"])
    df = pd.DataFrame(rows)
    keys = ["model", "estimator", "term", "stratum"]
    g = df.groupby(keys, sort=False, dropna=False)
    out = _mean_std(g, ["bpd"]).join(g[["t_lo", "t_hi", "logsnr_lo", "logsnr_hi"]].first())
    out = out.join(g["seed"].nunique().rename("seeds")).reset_index()
    out["bpd_per_logsnr"] = out["bpd"] / (out["logsnr_hi"] - out["logsnr_lo"])
    return out[keys + ["t_lo", "t_hi", "logsnr_lo", "logsnr_hi", "bpd", "bpd_std", "bpd_per_logsnr", "seeds"]]


def views_table(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """The two views of each diffusion model's likelihood at the selected checkpoints, one row per
    model: its VLB and its probability-flow ODE bound (mean, std over seeds; mean SE), and the
    ODE minus the VLB on the same test images (the ODE's subset; paired within each run, then
    mean and std over seeds), with the ODE's NFE and seconds per image."""
    rows = []
    for ev in evals:
        for run in ev["runs"]:
            ode = [label for label, b in run["bounds"].items() if b["kind"] == "ode"]
            if not run["selected"] or not ode:
                continue
            o = run["bounds"][ode[0]]
            vlb_label = run["headline"]  # the declared bound: the VLB
            v, n = run["bounds"][vlb_label], o["n_examples"]
            diff = np.asarray(o["per_example_bpd"]) - np.asarray(v["per_example_bpd"][:n])
            rows.append({"model": ev["model"], "seed": run["seed"], "vlb_estimator": vlb_label, "vlb_bpd": v["bpd"],
                         "vlb_se": v["bpd_se"], "ode_estimator": ode[0], "ode_bpd": o["bpd"], "ode_se": o["bpd_se"],
                         "ode_n_test": n, "ode_minus_vlb": diff.mean(), "ode_minus_vlb_se": diff.std(ddof=1) / np.sqrt(n),
                         "ode_nfe": o["nfe"], "ode_sec_per_image": o["seconds"] / n,
                         **{f"solver_{k}": v for k, v in o.get("solver_check", {}).items()}})
    if not rows:
        return pd.DataFrame()
    runs = pd.DataFrame(rows)
    g = runs.groupby("model", sort=False)
    out = _mean_std(g, ["vlb_bpd", "ode_bpd", "ode_minus_vlb"]).join(
        g[["vlb_se", "ode_se", "ode_minus_vlb_se", "ode_nfe", "ode_sec_per_image"]].mean())
    out = out.join(g[["vlb_estimator", "ode_estimator", "ode_n_test"]].first()).join(g["seed"].nunique().rename("seeds"))
    check = [c for c in runs if c.startswith("solver_")]
    if check:  # the first seed's solver check (the other runs have none: first() skips their NaNs)
        out = out.join(g[check].first())
    return out.reset_index()


def nll_table(nll: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, estimator) at the selected checkpoints: mean, std over seeds, mean SE."""
    final = _final(nll)
    terms = [c for c in final.columns if c.startswith("term_")]
    g = final.groupby(["model", "estimator"], sort=False)
    out = _mean_std(g, ["bpd", "nats"]).join(g[["bpd_se", "nats_se"] + terms].mean())
    out = out.join(g["seed"].nunique().rename("seeds")).join(g["n_test"].first())
    return out.reset_index()[["model", "estimator", "seeds", "bpd", "bpd_std", "bpd_se", "nats", "nats_std",
                              "nats_se", "n_test"] + terms]


def frontier_runs(runs: pd.DataFrame, budget: int, grids: dict[str, list[float]] | None = None) -> pd.DataFrame:
    """The compute frontier of each run: for every point of its model's checkpoint grid (`grids`:
    model -> fractions of the cap, the train records'; by default the checkpoints present), the
    checkpoint the train stage would select (`select_checkpoint`) among those trained with at most
    `flops` = f x cap x the run's FLOPs per image (a run that stopped early keeps its selection
    at the later points), with that checkpoint's test bound (`bpd`, the sweep estimator) and
    images seen. Its `val_bpd` is non-increasing in `flops` by construction; `bpd` need not be."""
    rows = []
    for (model, seed), r in runs.sort_values("fraction").groupby(["model", "seed"], sort=False):
        grid = sorted((grids or {}).get(model) or set(runs.loc[runs["model"] == model, "fraction"]))
        per_image = r["train_flops"].iloc[0] / max(r["images_seen"].iloc[0], 1)
        for f in grid:
            seen = r[r["fraction"] <= f]
            best = seen.iloc[select_checkpoint(list(seen["val_bpd"]))]  # the train stage's own rule
            rows.append({"model": model, "seed": seed, "fraction": f, "flops": f * budget * per_image,
                         "images_seen": best["images_seen"], "selected_fraction": best["fraction"],
                         "val_bpd": best["val_bpd"], "bpd": best["sweep_bpd"], "estimator": best["sweep_estimator"]})
    return pd.DataFrame(rows)


def frontier_table(frontier: pd.DataFrame) -> pd.DataFrame:
    """The frontier per (model, grid point): mean/std over seeds of the selected checkpoint's
    test and validation bounds and images seen, at the mean FLOP budget."""
    g = frontier.groupby(["model", "fraction"], sort=False)
    out = g[["flops"]].mean().join(_mean_std(g, ["bpd", "val_bpd", "images_seen"])).join(g[["estimator"]].first())
    return out.join(g["seed"].nunique().rename("seeds")).reset_index()


def stage_times(trains: list[dict[str, Any]], evals: list[dict[str, Any]], samples: list[dict[str, Any]],
                features: dict[str, Any]) -> pd.DataFrame:
    """Wall-clock seconds of each pipeline stage run (from the records each stage writes),
    without the Python/torch start-up of each process."""
    rows = [{"stage": "features", "seconds": features.get("stage_seconds", float("nan"))}]
    for kind, recs in (("train", trains), ("evaluate", evals), ("sample", samples)):
        rows += [{"stage": f"{kind}@{r['model']}", "seconds": r.get("stage_seconds", float("nan"))} for r in recs]
    df = pd.DataFrame(rows)
    return pd.concat([df, pd.DataFrame([{"stage": "total", "seconds": df["seconds"].sum()}])], ignore_index=True)


def grid_rows(sampling: pd.DataFrame) -> pd.DataFrame:
    """The sampler grid: each model's rows of its first seed's selected checkpoint."""
    final = _final(sampling)
    return final[final["seed"] == final.groupby("model")["seed"].transform("min")]


def fid_vs_nfe(sampling: pd.DataFrame, extractor: str = PRIMARY_EXTRACTOR) -> pd.DataFrame:
    """The FID-against-NFE points of one extractor (the data of the plot): the sampler grid,
    run on the first seed's selected checkpoint."""
    grid = grid_rows(sampling)
    ok = grid[(grid["extractor"] == extractor) & (grid["reference"] == "train") & (grid["status"] == "ok")]
    return ok[["model", "seed", "sampler_name", "sampler", "nfe", "fid", "samples_per_sec"]].reset_index(drop=True)


PRECISION_COLUMNS = ["model", "sampler", "nfe", "headline", "fid_fp32", "fid_bf16", "fid_diff", "fid_seed_std",
                     "within_seed_spread",
                     "samples_per_sec_fp32", "samples_per_sec_bf16", "speedup"]


def precision_check(sampling: pd.DataFrame, comparison: pd.DataFrame,
                    extractor: str = PRIMARY_EXTRACTOR) -> pd.DataFrame:
    """Per model with a network: the headline setting in its precision and, on the same noise
    (first seed's selected checkpoint), in the other one; FID (against the training split) and
    samples/s of each in bf16 and fp32, which of them is the headline's (`headline`), and whether
    the FID moved by less than its spread over seeds (std of the headline FID)."""
    g = grid_rows(sampling)
    g = g[(g["extractor"] == extractor) & (g["reference"] == "train") & (g["status"] == "ok")]
    spread = comparison.set_index("model")["fid_std"]
    rows = []
    for model, m in g.groupby("model", sort=False):
        head = m[m["headline"].astype(bool)]
        if head.empty:
            continue
        h = head.iloc[0]
        other = "fp32" if h["dtype"] == "bf16" else "bf16"
        twin = m[~m["headline"].astype(bool) & (m["dtype"] == other) & (m["sampler_name"] == h["sampler_name"])
                 & (m["nfe"] == h["nfe"])]
        if twin.empty:
            continue
        b, f = (h, twin.iloc[0]) if other == "fp32" else (twin.iloc[0], h)
        diff = b["fid"] - f["fid"]
        rows.append({"model": model, "sampler": f["sampler"].removesuffix(", fp32"), "nfe": h["nfe"],
                     "headline": h["dtype"], "fid_fp32": f["fid"], "fid_bf16": b["fid"], "fid_diff": diff,
                     "fid_seed_std": spread.get(model, float("nan")),
                     "within_seed_spread": bool(abs(diff) < spread.get(model, float("nan"))),
                     "samples_per_sec_fp32": f["samples_per_sec"],
                     "samples_per_sec_bf16": b["samples_per_sec"],
                     "speedup": b["samples_per_sec"] / f["samples_per_sec"]})
    return pd.DataFrame(rows, columns=PRECISION_COLUMNS)


PARAM_TOLERANCE = 0.10  # parameter counts matched within +-10% of the trained models' median


class UnmatchedError(ValueError):
    """Runs that are not matched (budget or size) presented as a matched comparison."""


def matching(runs: list[dict[str, Any]], budget: int) -> dict[str, str]:
    """Per model: '' when matched, else why not, from the last checkpoint of each of its training
    runs (model, trains, seed, params, fraction, images_seen). Closed-form models (`trains`
    false: `Model.trains`) are exempt. Every trained run must have trained to the cap `budget` or stopped
    early on its validation bound (its last checkpoint before the grid's end, fraction < 1), and
    each model's parameter count must be within +-10% of the trained models' median."""
    trained = [r for r in runs if r["trains"]]
    median = float(pd.Series({r["model"]: r["params"] for r in trained}).median()) if trained else 0.0
    why: dict[str, list[str]] = {r["model"]: [] for r in runs}
    for r in trained:
        if r["images_seen"] != budget and r.get("fraction", 1.0) >= 1.0:
            why[r["model"]].append(f"seed {r['seed']} saw {r['images_seen']:,} images, cap {budget:,}")
        size = f"{r['params']:,} params, outside ±10% of the median {median:,.0f}"
        if abs(r["params"] - median) > PARAM_TOLERANCE * median and size not in why[r["model"]]:
            why[r["model"]].append(size)
    return {m: "; ".join(w) for m, w in why.items()}


def check_matched(runs: list[dict[str, Any]], budget: int, allow_unmatched: bool) -> dict[str, str]:
    """The per-model `matched` column; raises naming the offending models unless allowed."""
    why = matching(runs, budget)
    bad = {m: w for m, w in why.items() if w}
    if bad and not allow_unmatched:
        raise UnmatchedError("refusing to present these runs as matched: "
                             + "; ".join(f"{m} ({w})" for m, w in bad.items())
                             + " (set compare.allow_unmatched: true to write the tables with a warning column)")
    trained = {r["model"] for r in runs if r["trains"]}
    return {m: ("no: " + w if w else "yes" if m in trained else "closed form") for m, w in why.items()}


def provenance(trains: list[dict[str, Any]], budget: int) -> list[str]:
    """Caption lines: what was measured, on what, with which software."""
    first = trains[0]
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    devices = sorted({t["device"] for t in trains})
    seeds = first["seeds"]
    fractions = max((t["fractions"] for t in trains), key=len)  # closed-form models have only 100%
    patience = first.get("patience", 0)
    return [
        f"dataset: {first['dataset']} (train {first['n_train']} / validation {first.get('n_val', 0)} / test "
        f"{first['n_test']} images; defaults chosen on validation, tables on test; "
        f"{first['levels']} levels, shape {'x'.join(map(str, first['shape']))})",
        f"budget: at most {budget:,} training images seen per model and run (batch {first['batch_size']}); "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) per model; checkpoints at "
        f"{', '.join(f'{f:.1%}'.replace('.0%', '%') for f in fractions)} of the cap, each scored on the validation "
        f"split, the best one selected (the test split is opened after the selection is fixed); "
        + (f"early stopping after {patience} checkpoints without improvement" if patience else "no early stopping"),
        f"device: {'; '.join(devices)}",
        f"versions: {versions}",
    ]


def _pm(mean: Any, std: Any, spec: str) -> str:
    """'mean ± std' ('mean' alone for one seed)."""
    if pd.isna(mean):
        return ""
    return format(mean, spec) + ("" if pd.isna(std) else f" ± {format(std, spec)}")


def latex(comparison: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular (pandas' LaTeX writer) of the summary, one row per model."""
    pm = lambda c, spec: [_pm(m, s, spec).replace("±", "$\\pm$") for m, s in  # noqa: E731
                          zip(comparison[c], comparison[f"{c}_std"])]
    t = pd.DataFrame({
        "Model": comparison["model"],
        "Params": comparison["params"].map(lambda v: f"{v:,}"),
        "Bits/dim": pm("bpd", ".3f"),
        "Bound": comparison["bpd_estimator"],
        f"FID ({PRIMARY_EXTRACTOR})": pm("fid", ".2f"),
        "NFE": comparison["nfe"],
        "Samples/s": pm("samples_per_sec", ".1f"),
    })
    t = t.apply(lambda col: col.astype(str).str.replace("_", "\\_", regex=False).str.replace(
        "%", "\\%", regex=False) if col.name in ("Model", "Bound") else col)
    return t.to_latex(index=False, escape=False, caption=caption, label="tab:comparison",
                      column_format="lrrlrrr")


def _views_lines(views: pd.DataFrame | None, over: str) -> list[str]:
    if views is None or not len(views):
        return []
    v = pd.DataFrame({
        "model": views["model"],
        "VLB bits/dim": [_pm(m, s, ".4f") for m, s in zip(views["vlb_bpd"], views["vlb_bpd_std"])],
        "VLB SE": views["vlb_se"].map(lambda x: _fmt(x, ".4f")),
        "ODE bits/dim": [_pm(m, s, ".4f") for m, s in zip(views["ode_bpd"], views["ode_bpd_std"])],
        "ODE SE": views["ode_se"].map(lambda x: _fmt(x, ".4f")),
        "ODE − VLB (same images)": [_pm(m, s, ".4f") for m, s in zip(views["ode_minus_vlb"], views["ode_minus_vlb_std"])],
        "NFE": views["ode_nfe"].map(lambda x: _fmt(x, ".0f")),
        "s/image": views["ode_sec_per_image"].map(lambda x: _fmt(x, ".3f")),
    })
    if "solver_gap_bpd" in views:
        v["solver error (seed 0)"] = [
            "" if pd.isna(gap) else f"{gap:+.4f} ± {se:.4f} (max {mx:.4f}; {n:.0f} images, vs {tol:g})"
            for gap, se, mx, n, tol in zip(views["solver_gap_bpd"], views["solver_gap_bpd_se"],
                                           views["solver_max_abs_gap_bpd"], views["solver_n_examples"],
                                           views["solver_tol"])]
    return [f"## Two views of diffusion likelihood: the VLB and the probability-flow ODE ({over})", "",
            f"VLB: {views['vlb_estimator'].iloc[0]} (diffusion models' variational bound; vdm: its continuous-time "
            f"VLB), on the whole test split. ODE: {views['ode_estimator'].iloc[0]} — the same network's "
            "probability-flow ODE density, a bound on the discrete data through dequantization (README, "
            "'Two views of diffusion likelihood'). `ODE − VLB`: on the ODE's images, paired within each run; "
            "negative means the ODE view is tighter. NFE: function evaluations per image of the adaptive "
            "solver; s/image: wall-clock seconds per test image on this run's device. Solver error: on the "
            "first seed's selected checkpoint, the ODE bound of its first test images minus the same draws' bound "
            "solved at the tighter tolerance (bits/dim, mean ± SE, the largest |difference|).", "",
            v.to_markdown(index=False, disable_numparse=True), ""]


def stage_totals(timings: pd.DataFrame) -> dict[str, float]:
    """Seconds per kind of stage (train, evaluate, sample, features) and in all, from `stage_times`."""
    rows = timings[timings["stage"] != "total"]
    kinds = rows["stage"].str.split("@").str[0]
    return {**rows.groupby(kinds, sort=False)["seconds"].sum().to_dict(), "total": float(rows["seconds"].sum())}


def summary(comparison: pd.DataFrame, views: pd.DataFrame | None, timings: pd.DataFrame | None = None) -> str:
    """The compact results table the README shows (its copy there is checked against this file
    by a test): per model the headline bound and FID (mean ± std over seeds) at the selected
    checkpoints and the images seen there, the ODE view where there is one, and the headline
    sampler's NFE and speed; with `timings`, a line of the stages' wall-clock seconds."""
    ode = {} if views is None or not len(views) else dict(zip(views["model"], zip(views["ode_bpd"],
                                                                                  views["ode_bpd_std"])))
    table = pd.DataFrame({
        "model": comparison["model"],
        "bits/dim": [_pm(m, s, ".3f") for m, s in zip(comparison["bpd"], comparison["bpd_std"])],
        "bound": comparison["bpd_estimator"].str.replace(r" \(.*", "", regex=True),
        "ODE bits/dim": [_pm(*ode[m], ".3f") if m in ode else "" for m in comparison["model"]],
        "FID": [_pm(m, s, ".2f") for m, s in zip(comparison["fid"], comparison["fid_std"])],
        "k images at selection": [_pm(m / 1e3, s / 1e3, ".1f") for m, s in zip(comparison["images_seen"],
                                                                                comparison["images_seen_std"])],
        "sampler": comparison["sampler"].str.split(",").str[0],
        "NFE": comparison["nfe"].map(lambda v: _fmt(v, ".0f")),
        "samples/s": comparison["samples_per_sec"].map(lambda v: _fmt(v, ",.0f")),
    })
    text = table.to_markdown(index=False, disable_numparse=True) + "\n"
    if timings is not None:
        t = stage_totals(timings)
        text += ("\nStage wall-clock seconds on this run's machine: " + ", ".join(
            f"{k} {v:,.0f}" for k, v in t.items() if k != "total") + f"; total {t['total']:,.0f} "
            f"({t['total'] / 60:.1f} min).\n")
    return text


def _fmt(v: Any, spec: str) -> str:
    return "" if pd.isna(v) else format(v, spec)


def markdown(comparison: pd.DataFrame, nll: pd.DataFrame, frontier: pd.DataFrame, sampling: pd.DataFrame,
             caption: list[str], timings: pd.DataFrame | None = None,
             significance: pd.DataFrame | None = None, views: pd.DataFrame | None = None,
             precision: pd.DataFrame | None = None) -> str:
    seeds = int(comparison["seeds"].max())
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    fmt = pd.DataFrame({
        "model": comparison["model"], "family": comparison["family"], "params": comparison["params"],
        "images at selection": [_pm(m, s, ",.0f") for m, s in zip(comparison["images_seen"],
                                                                  comparison["images_seen_std"])],
        "train_flops": comparison["train_flops"].map(lambda v: f"{v:.3g}"),
        "train_seconds": [_pm(m, s, ".1f") for m, s in zip(comparison["train_seconds"],
                                                           comparison["train_seconds_std"])],
        "bits/dim": [_pm(m, s, ".4f") for m, s in zip(comparison["bpd"], comparison["bpd_std"])],
        "SE": comparison["bpd_se"].map(lambda v: _fmt(v, ".4f")),
        "estimator": comparison["bpd_estimator"],
        "tied (bits/dim)": comparison["tied_bpd"],
        "val bits/dim": comparison["val_bpd"].map(lambda v: _fmt(v, ".4f")),
        "FID vs train": [_pm(m, s, ".3f") for m, s in zip(comparison["fid"], comparison["fid_std"])],
        "FID 95% CI": [f"{lo:.2f}–{hi:.2f}" if not pd.isna(lo) else "" for lo, hi in
                       zip(comparison["fid_ci_lo"], comparison["fid_ci_hi"])],
        "FID vs test": [_pm(m, s, ".3f") for m, s in zip(comparison["fid_test"], comparison["fid_test_std"])],
        "tied (FID)": comparison["tied_fid"],
        "FID (Inception-v3)": comparison["fid_inception"].map(  # the reason is listed below the tables
            lambda v: "not available" if str(v).startswith("not available") else v),
        "copies": comparison["copies"].map(lambda v: _fmt(v, ".3f")),
        "closer (pixels)": comparison["close_pixel"].map(lambda v: _fmt(v, ".3f")),
        "closer (features)": comparison["close_features"].map(lambda v: _fmt(v, ".3f")),
        "sampler": comparison["sampler"], "nfe": comparison["nfe"],
        "samples/s": [_pm(m, s, ".1f") for m, s in zip(comparison["samples_per_sec"],
                                                        comparison["samples_per_sec_std"])],
        "matched": comparison["matched"],
    })
    nfmt = nll.copy()
    for c in [c for c in nfmt.columns if c.startswith("term_")] + ["bpd_se", "nats", "nats_se"]:
        nfmt[c] = nfmt[c].map(lambda v: _fmt(v, ".4f"))
    nfmt["bits/dim"] = [_pm(m, s, ".4f") for m, s in zip(nll["bpd"], nll["bpd_std"])]
    terms = [c for c in nfmt.columns if c.startswith("term_")]
    nfmt = nfmt[["model", "estimator", "seeds", "bits/dim", "bpd_se", "nats", "nats_se", "n_test"] + terms]
    wfmt = pd.DataFrame({
        "model": frontier["model"], "budget (of the cap)": frontier["fraction"].map(lambda v: f"{v:.1%}"),
        "FLOPs": frontier["flops"].map(lambda v: f"{v:.3g}"),
        "test bits/dim": [_pm(m, s, ".4f") for m, s in zip(frontier["bpd"], frontier["bpd_std"])],
        "val bits/dim": [_pm(m, s, ".4f") for m, s in zip(frontier["val_bpd"], frontier["val_bpd_std"])],
        "images at selection": [_pm(m, s, ",.0f") for m, s in zip(frontier["images_seen"],
                                                                  frontier["images_seen_std"])],
        "estimator": frontier["estimator"],
    })
    sfmt = grid_rows(sampling)
    sfmt = sfmt[(sfmt["status"] == "ok") & (sfmt["reference"] == "train")].copy()
    sfmt["KID ± std"] = [_fmt(k, ".5f") + (f" ± {s:.5f}" if not pd.isna(s) else "")
                         for k, s in zip(sfmt["kid"], sfmt["kid_std"])]
    for c, spec in (("fid", ".4f"), ("fid_torchmetrics", ".4f"), ("fid_rel_diff", ".1e"),
                    ("precision", ".3f"), ("recall", ".3f"), ("samples_per_sec", ".1f")):
        sfmt[c] = sfmt[c].map(lambda v, spec=spec: _fmt(v, spec))
    sfmt = sfmt[["model", "sampler", "nfe", "samples_per_sec", "extractor", "fid", "KID ± std", "precision",
                 "recall", "fid_torchmetrics", "fid_rel_diff"]]
    missing = sorted({f"{e}: {st}" for e, st in zip(sampling["extractor"], sampling["status"]) if st != "ok"})
    refs = dict(zip(sampling["reference"], sampling["reference_set"]))
    n = sampling["n_samples"].iloc[0]
    batch = sampling["speed_batch"].iloc[0]
    lines = ["# Model comparison", ""] + [f"- {c}" for c in caption] + [
        "",
        f"Every figure of the summary is the {over} (sample standard deviation) of the runs' "
        "selected checkpoints: each run is scored on the validation split at every checkpoint of its grid "
        "and the one with the best validation bound is reported (`images at selection`, `val bits/dim`). Bounds are upper bounds on -log P(x) of the discrete test images, "
        "in bits/dim (nats / (D ln 2)); `SE` is the mean over seeds of each run's standard error "
        "over test examples; the estimator is the one the model declares as its headline "
        "(`Model.headline_estimator`: IWAE-K, the K-sample dequantized bound, the VLB, or the exact NLL), "
        "chosen before any number is seen, not the lowest of its bounds. "
        f"Sample quality: FID, KID and precision/recall (torch-fidelity) of {n} samples per run against the "
        f"{refs['train']} (the standard reference) and, beside it, the held-out {refs['test']}, in the "
        f"features of {comparison['fid_extractor'].iloc[0]}: the FID classifier shipped with the repository "
        "(fixed weights, SHA-256 shown), so these FIDs are comparable across machines and with each other, "
        "but not with published Inception FIDs. Memorisation: `copies` is the fraction of samples identical "
        "to a training image; `closer` the fraction of samples nearer to their nearest training image (in "
        "pixels, or in the classifier's features) than 95% of the held-out test images are to theirs "
        "(about 0.05 for a model that does not memorise; near 1 for one that copies). `tied`: models whose "
        "difference from this one is not significant at 5% after Holm's correction over all pairs (bits/dim: "
        "paired over the test images and pooled over seeds; FID: bootstrap over samples and seeds; see "
        "'Which differences are real'). `FID 95% CI`: the bootstrap interval of the mean FID (each run's "
        "samples resampled, then the seeds; a t interval on the seeds' degrees of freedom). "
        f"Speed: samples/s at batch {batch} after a warm-up batch, median over the other full batches "
        "(device above); NFE = network evaluations per sample. Per-run numbers: `results/runs.csv`.",
        "",
        f"## Summary ({over})",
        "",
        fmt.to_markdown(index=False, disable_numparse=True),
        "",
        f"## Likelihood bounds by estimator ({over}; terms in bits/dim, mean over seeds)",
        "",
        nfmt.to_markdown(index=False, disable_numparse=True),
        "",
    ] + _views_lines(views, over) + [
        f"## Compute frontier ({over}; `results/frontier.png`)",
        "",
        "At each budget, a fraction of the cap, the checkpoint with the best validation bound among those "
        "trained within it, and its test bound in one estimator per model along the curve (the cheaper IWAE-K "
        "of the sweep where the headline's K is larger). Its validation bound cannot rise with the budget; "
        "its test bound may, by the validation split's noise. A curve that flattens has reached its plateau "
        "at this cap; one whose selection stops moving has started to overfit.",
        "",
        wfmt.to_markdown(index=False, disable_numparse=True),
        "",
        "## Samplers on the first seed's selected checkpoint: quality against network evaluations "
        "(fid_torchmetrics: the same FID by torchmetrics)",
        "",
        sfmt.to_markdown(index=False, disable_numparse=True),
        "",
    ] + [f"Not computed: {m}" for m in missing] + ([""] if missing else [])
    if precision is not None and len(precision):
        pc = precision[PRECISION_COLUMNS].copy()
        for c in ("fid_fp32", "fid_bf16", "fid_diff", "fid_seed_std"):
            pc[c] = pc[c].map(lambda v: _fmt(v, ".4f"))
        for c in ("samples_per_sec_fp32", "samples_per_sec_bf16"):
            pc[c] = pc[c].map(lambda v: _fmt(v, ".1f"))
        pc["speedup"] = pc["speedup"].map(lambda v: _fmt(v, ".2f"))
        lines += ["## Sampling precision: the headline sampler in bf16 against fp32 (first seed's selected "
                  "checkpoint, the same noise)", "",
                  "The tables above sample with the network in the precision of the `headline` column "
                  "(`sample.precision`, a setting: the same on every machine; fp32 by default). `fid_diff` = FID(bf16) − FID(fp32); `within_seed_spread`: |fid_diff| is "
                  "below the standard deviation of the headline FID over seeds; `speedup`: bf16 samples/s over "
                  "fp32's. Speeds as in the grid (one run, side by side).", "",
                  pc.to_markdown(index=False, disable_numparse=True), ""]
    if significance is not None and len(significance):
        sig = significance.copy()
        for c in ("diff", "ci_lo", "ci_hi"):
            sig[c] = sig[c].map(lambda v: _fmt(v, ".4f"))
        for c in ("p_value", "p_holm"):
            sig[c] = sig[c].map(lambda v: _fmt(v, ".3g"))
        lines += ["## Which differences are real (95% confidence intervals of model_a − model_b)", "",
                  "Bits/dim: the per-image differences on the same test images, pooled over seeds, with an "
                  "interval that covers both the seed-to-seed and the image-to-image variance (the headline "
                  "test); beside it the Welch t interval over seeds and the paired interval within each seed "
                  "(that one speaks of these trained networks, not of the training procedure). FID: the bootstrap "
                  "interval, each run's samples resampled with replacement and then the seeds, as a t interval on "
                  "the seeds' degrees of freedom (beside it Welch over seeds). `p_holm`: Holm's adjustment over all pairs of the same metric and test; `tied`: not "
                  "significant at 5% after it (or not computable). Intervals are the unadjusted 95% ones.", "",
                  sig[["metric", "test", "model_a", "model_b", "diff", "ci_lo", "ci_hi", "p_value", "p_holm",
                       "tied"]].to_markdown(index=False, disable_numparse=True), ""]
    if timings is not None:
        t = timings.assign(seconds=timings["seconds"].map(lambda v: _fmt(v, ".1f")))
        lines += ["## Stage wall-clock times (seconds, this run's device)", "",
                  t.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)
