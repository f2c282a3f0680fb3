"""Comparison tables (pandas) from the per-model train and evaluate records."""
from __future__ import annotations

from typing import Any

import pandas as pd

COMPARISON_COLUMNS = ["model", "family", "params", "images_seen", "train_flops", "train_seconds",
                      "bpd", "bpd_se", "bpd_estimator", "fid", "fid_extractor", "fid_inception",
                      "sampler", "n_samples", "nfe", "samples_per_sec", "matched", "dataset", "seed", "device"]
NLL_COLUMNS = ["model", "estimator", "bpd", "bpd_se", "nats", "nats_se", "n_test"]
SAMPLING_COLUMNS = ["model", "sampler", "steps", "nfe", "samples_per_sec", "sec_per_sample", "speed_batch",
                    "fid", "kid", "kid_std", "precision", "recall", "extractor", "n_samples", "reference",
                    "fid_torchmetrics", "fid_rel_diff", "status", "default", "sampler_name", "speed_repeats",
                    "sample_seconds", "dataset", "device"]
PRIMARY_EXTRACTOR = "classifier"  # the `fid` column of the comparison: works offline, on any size


def nll_table(evals: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, estimator), with each bound's named terms as term_<name> (bits/dim)."""
    rows = []
    for ev in evals:
        for label, b in ev["bounds"].items():
            row = {"model": ev["model"], "estimator": label, "bpd": b["bpd"], "bpd_se": b["bpd_se"],
                   "nats": b["nats"], "nats_se": b["nats_se"], "n_test": b["n_examples"]}
            row.update({f"term_{k}": v for k, v in b["terms_bpd"].items()})
            rows.append(row)
    df = pd.DataFrame(rows)
    terms = sorted(c for c in df.columns if c.startswith("term_"))
    return df[NLL_COLUMNS + terms]


def sampling_table(samples: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, sampler setting, extractor): NFE, speed, FID, KID, precision/recall,
    and the FID torchmetrics computes on the same features; an unavailable extractor says why
    in `status`. `sampler` is the full setting's label, `sampler_name` the sampler alone."""
    rows = []
    for rec in samples:
        for p in rec["points"]:
            for m in p["metrics"]:
                rows.append({"model": rec["model"], "sampler": p["label"], "sampler_name": p["sampler"],
                             "steps": p["steps"] if p["steps"] is not None else p["nfe"], "nfe": p["nfe"],
                             "default": p["default"], "n_samples": rec["n_samples"],
                             "reference": rec["reference"], "dataset": rec["dataset"], "device": rec["device"],
                             **{k: p[k] for k in ("samples_per_sec", "sec_per_sample", "speed_batch",
                                                  "speed_repeats", "sample_seconds")}, **m})
    return pd.DataFrame(rows).reindex(columns=SAMPLING_COLUMNS)


def stage_times(trains: list[dict[str, Any]], evals: list[dict[str, Any]], samples: list[dict[str, Any]],
                features: dict[str, Any]) -> pd.DataFrame:
    """Wall-clock seconds of each pipeline stage run (from the records each stage writes),
    without the Python/torch start-up of each process."""
    rows = [{"stage": "features", "seconds": features.get("stage_seconds", float("nan"))}]
    for kind, recs in (("train", trains), ("evaluate", evals), ("sample", samples)):
        rows += [{"stage": f"{kind}@{r['model']}", "seconds": r.get("stage_seconds", float("nan"))} for r in recs]
    df = pd.DataFrame(rows)
    return pd.concat([df, pd.DataFrame([{"stage": "total", "seconds": df["seconds"].sum()}])], ignore_index=True)


def fid_vs_nfe(sampling: pd.DataFrame, extractor: str = PRIMARY_EXTRACTOR) -> pd.DataFrame:
    """The FID-against-NFE points of one extractor (the data of the plot)."""
    ok = sampling[(sampling["extractor"] == extractor) & (sampling["status"] == "ok")]
    return ok[["model", "sampler_name", "sampler", "nfe", "fid", "samples_per_sec"]].reset_index(drop=True)


def plot_fid_vs_nfe(points: pd.DataFrame, path: str, caption: str) -> None:
    """FID against NFE (log x), one line per (model, sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .runtime import atomic_path

    fig, ax = plt.subplots(figsize=(10, 5))
    colours = dict(zip(points["model"].unique(), plt.get_cmap("tab10").colors))
    styles = {"ancestral": dict(marker="s", linestyle="none"), "ddim": dict(marker="o", linestyle="-"),
              "dpm++2m": dict(marker="^", linestyle="--")}
    hidden = points[points["nfe"] <= 0]  # no network (the baseline): no place on a log axis
    for (model, sampler), g in points[points["nfe"] > 0].groupby(["model", "sampler_name"], sort=False):
        g = g.sort_values("nfe")
        ax.plot(g["nfe"], g["fid"], color=colours[model], label=f"{model} ({sampler})",
                **styles.get(sampler, dict(marker="x", linestyle=":")))
    if len(hidden):
        caption += "\n" + "; ".join(f"{r.model}: NFE 0, FID {r.fid:.3g} (not shown)" for r in hidden.itertuples())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID ({PRIMARY_EXTRACTOR} features)")
    ax.set_title(caption, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


PARAM_TOLERANCE = 0.10  # parameter counts matched within +-10% of the trained models' median


class UnmatchedError(ValueError):
    """Runs that are not matched (budget or size) presented as a matched comparison."""


def matching(trains: list[dict[str, Any]], budget: int) -> dict[str, str]:
    """Per model: '' when matched, else why not. Closed-form models (no training) are exempt.
    Trained models must have seen exactly `budget` images and have a parameter count within
    +-10% of the trained models' median."""
    trained = [t for t in trains if t["images_seen"] > 0 or t["train_flops"] > 0]
    median = float(pd.Series([t["params"] for t in trained]).median()) if trained else 0.0
    out = {}
    for t in trains:
        why = []
        if t in trained:
            if t["images_seen"] != budget:
                why.append(f"saw {t['images_seen']:,} images, budget {budget:,}")
            if abs(t["params"] - median) > PARAM_TOLERANCE * median:
                why.append(f"{t['params']:,} params, outside ±10% of the median {median:,.0f}")
        out[t["model"]] = "; ".join(why)
    return out


def check_matched(trains: list[dict[str, Any]], budget: int, allow_unmatched: bool) -> dict[str, str]:
    """The per-model `matched` column; raises naming the offending models unless allowed."""
    why = matching(trains, budget)
    bad = {m: w for m, w in why.items() if w}
    if bad and not allow_unmatched:
        raise UnmatchedError("refusing to present these runs as matched: "
                             + "; ".join(f"{m} ({w})" for m, w in bad.items())
                             + " (set compare.allow_unmatched: true to write the tables with a warning column)")
    trained = {t["model"] for t in trains if t["images_seen"] > 0 or t["train_flops"] > 0}
    return {m: ("no: " + w if w else "yes" if m in trained else "closed form") for m, w in why.items()}


def comparison_table(trains: list[dict[str, Any]], nll: pd.DataFrame, sampling: pd.DataFrame,
                     matched: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model; `bpd` is the tightest (lowest) bound the model reports, `fid` the
    domain-classifier FID of its default sampler, `fid_inception` the Inception-v3 FID or
    the reason it is not available."""
    best = nll.loc[nll.groupby("model", sort=False)["bpd"].idxmin()].set_index("model")
    by = sampling[sampling["default"].astype(bool)].set_index(["model", "extractor"])
    rows = []
    for tr in trains:
        m = tr["model"]
        prim, inc = by.loc[(m, PRIMARY_EXTRACTOR)], by.loc[(m, "inception-v3-compat")]
        rows.append({
            "model": m, "family": tr["family"], "params": tr["params"],
            "images_seen": tr["images_seen"], "train_flops": tr["train_flops"],
            "train_seconds": tr["train_seconds"],
            "bpd": best.at[m, "bpd"], "bpd_se": best.at[m, "bpd_se"],
            "bpd_estimator": best.at[m, "estimator"],
            "fid": prim["fid"], "fid_extractor": PRIMARY_EXTRACTOR,
            "fid_inception": f"{inc['fid']:.4f}" if inc["status"] == "ok" else inc["status"],
            "sampler": prim["sampler"], "n_samples": prim["n_samples"], "nfe": prim["nfe"],
            "samples_per_sec": prim["samples_per_sec"],
            "dataset": tr["dataset"], "seed": tr["seed"], "device": tr["device"],
            "matched": (matched or {}).get(m, ""),
        })
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def provenance(trains: list[dict[str, Any]], budget: int) -> list[str]:
    """Caption lines: what was measured, on what, with which software."""
    first = trains[0]
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    devices = sorted({t["device"] for t in trains})
    return [
        f"dataset: {first['dataset']} (train {first['n_train']} / test {first['n_test']} images, "
        f"{first['levels']} levels, shape {'x'.join(map(str, first['shape']))})",
        f"budget: {budget:,} training images seen per model (batch {first['batch_size']}); "
        f"seed {first['seed']}",
        f"device: {'; '.join(devices)}",
        f"versions: {versions}",
    ]


def latex(comparison: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular (pandas' LaTeX writer) of the summary, one row per model."""
    t = pd.DataFrame({
        "Model": comparison["model"],
        "Params": comparison["params"].map(lambda v: f"{v:,}"),
        "Bits/dim": [f"{b:.3f} $\\pm$ {s:.3f}" for b, s in zip(comparison["bpd"], comparison["bpd_se"])],
        "Bound": comparison["bpd_estimator"],
        f"FID ({PRIMARY_EXTRACTOR})": comparison["fid"].map(lambda v: _fmt(v, ".2f")),
        "NFE": comparison["nfe"],
        "Samples/s": comparison["samples_per_sec"].map(lambda v: _fmt(v, ".1f")),
    })
    t = t.apply(lambda col: col.astype(str).str.replace("_", "\\_", regex=False).str.replace(
        "%", "\\%", regex=False) if col.name in ("Model", "Bound") else col)
    return t.to_latex(index=False, escape=False, caption=caption, label="tab:comparison",
                      column_format="lrrlrrr")


def _fmt(v: Any, spec: str) -> str:
    return "" if pd.isna(v) else format(v, spec)


def markdown(comparison: pd.DataFrame, nll: pd.DataFrame, sampling: pd.DataFrame, caption: list[str],
             timings: pd.DataFrame | None = None) -> str:
    fmt = comparison.drop(columns=["dataset", "seed", "device"]).copy()
    fmt["train_flops"] = fmt["train_flops"].map(lambda v: f"{v:.3g}")
    fmt["train_seconds"] = fmt["train_seconds"].map(lambda v: f"{v:.1f}")
    fmt["bpd"] = [f"{b:.4f} ± {s:.4f}" for b, s in zip(fmt.pop("bpd"), fmt.pop("bpd_se"))]
    fmt["fid"] = fmt["fid"].map(lambda v: _fmt(v, ".4f"))
    fmt["samples_per_sec"] = fmt["samples_per_sec"].map(lambda v: _fmt(v, ".1f"))
    fmt["fid_inception"] = fmt["fid_inception"].map(  # the reason is listed below the tables
        lambda v: "not available" if str(v).startswith("not available") else v)
    fmt = fmt[["model", "family", "params", "images_seen", "train_flops", "train_seconds",
               "bpd", "bpd_estimator", "fid", "fid_inception", "sampler", "nfe", "samples_per_sec", "matched"]]
    fmt = fmt.rename(columns={"bpd": "bits/dim ± SE", "bpd_estimator": "estimator",
                              "fid": f"FID ({PRIMARY_EXTRACTOR})", "fid_inception": "FID (Inception-v3)"})
    nfmt = nll.copy()
    for c in [c for c in nfmt.columns if c.startswith("term_")] + ["nats", "nats_se"]:
        nfmt[c] = nfmt[c].map(lambda v: _fmt(v, ".4f"))
    nfmt["bits/dim ± SE"] = [f"{b:.4f} ± {s:.4f}" for b, s in zip(nfmt["bpd"], nfmt["bpd_se"])]
    terms = [c for c in nfmt.columns if c.startswith("term_")]
    nfmt = nfmt[["model", "estimator", "bits/dim ± SE", "nats", "nats_se", "n_test"] + terms]
    sfmt = sampling.copy()
    sfmt["KID ± std"] = [_fmt(k, ".5f") + (f" ± {s:.5f}" if not pd.isna(s) else "")
                         for k, s in zip(sfmt["kid"], sfmt["kid_std"])]
    for c, spec in (("fid", ".4f"), ("fid_torchmetrics", ".4f"), ("fid_rel_diff", ".1e"),
                    ("precision", ".3f"), ("recall", ".3f"), ("samples_per_sec", ".1f")):
        sfmt[c] = sfmt[c].map(lambda v, spec=spec: _fmt(v, spec))
    sfmt = sfmt[sfmt["status"] == "ok"]
    sfmt = sfmt[["model", "sampler", "nfe", "samples_per_sec", "extractor", "fid", "KID ± std", "precision",
                 "recall", "fid_torchmetrics", "fid_rel_diff"]]
    missing = sorted({f"{e}: {st}" for e, st in zip(sampling["extractor"], sampling["status"]) if st != "ok"})
    ref = sampling["reference"].iloc[0] if len(sampling) else ""
    n = sampling["n_samples"].iloc[0] if len(sampling) else ""
    batch = sampling["speed_batch"].iloc[0] if len(sampling) else ""
    lines = ["# Model comparison", ""] + [f"- {c}" for c in caption] + [
        "",
        "Bounds are upper bounds on -log P(x) of the discrete test images, in bits/dim "
        "(nats / (D ln 2)), mean ± standard error over test examples. "
        f"Sample quality: FID, KID and precision/recall (torch-fidelity) of {n} samples "
        f"per sampler setting against the {ref}, in the features of the named "
        "extractor; `classifier` is the pipeline's domain classifier (`results/features/features.json`), "
        "so its FIDs are comparable with each other but not with published Inception FIDs. "
        f"Speed: samples/s at batch {batch} after a warm-up batch, median over the other full batches "
        "(device above); NFE = network evaluations per sample.",
        "",
        "## Summary (tightest bound per model)",
        "",
        fmt.to_markdown(index=False, disable_numparse=True),
        "",
        "## Likelihood bounds by estimator (terms in bits/dim)",
        "",
        nfmt.to_markdown(index=False, disable_numparse=True),
        "",
        "## Samplers: quality against network evaluations (fid_torchmetrics: the same FID by torchmetrics)",
        "",
        sfmt.to_markdown(index=False, disable_numparse=True),
        "",
    ] + [f"Not computed: {m}" for m in missing] + ([""] if missing else [])
    if timings is not None:
        t = timings.assign(seconds=timings["seconds"].map(lambda v: _fmt(v, ".1f")))
        lines += ["## Stage wall-clock times (seconds, this run's device)", "",
                  t.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)
