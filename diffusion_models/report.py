"""Comparison tables (pandas) from the per-model train and evaluate records."""
from __future__ import annotations

from typing import Any

import pandas as pd

COMPARISON_COLUMNS = ["model", "family", "params", "images_seen", "train_flops", "train_seconds",
                      "bpd", "bpd_se", "bpd_estimator", "fid", "samples_per_sec",
                      "dataset", "seed", "device"]
NLL_COLUMNS = ["model", "estimator", "bpd", "bpd_se", "nats", "nats_se", "n_test"]


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


def comparison_table(trains: list[dict[str, Any]], nll: pd.DataFrame) -> pd.DataFrame:
    """One row per model; `bpd` is the tightest (lowest) bound the model reports."""
    best = nll.loc[nll.groupby("model", sort=False)["bpd"].idxmin()].set_index("model")
    rows = []
    for tr in trains:
        m = tr["model"]
        rows.append({
            "model": m, "family": tr["family"], "params": tr["params"],
            "images_seen": tr["images_seen"], "train_flops": tr["train_flops"],
            "train_seconds": tr["train_seconds"],
            "bpd": best.at[m, "bpd"], "bpd_se": best.at[m, "bpd_se"],
            "bpd_estimator": best.at[m, "estimator"],
            "fid": float("nan"), "samples_per_sec": float("nan"),  # filled by the sampling stages
            "dataset": tr["dataset"], "seed": tr["seed"], "device": tr["device"],
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


def markdown(comparison: pd.DataFrame, nll: pd.DataFrame, caption: list[str]) -> str:
    fmt = comparison.drop(columns=["dataset", "seed", "device"]).copy()
    fmt["train_flops"] = fmt["train_flops"].map(lambda v: f"{v:.3g}")
    fmt["train_seconds"] = fmt["train_seconds"].map(lambda v: f"{v:.1f}")
    fmt["bpd"] = [f"{b:.4f} ± {s:.4f}" for b, s in zip(fmt.pop("bpd"), fmt.pop("bpd_se"))]
    fmt = fmt[["model", "family", "params", "images_seen", "train_flops", "train_seconds",
               "bpd", "bpd_estimator", "fid", "samples_per_sec"]]
    fmt = fmt.rename(columns={"bpd": "bits/dim ± SE", "bpd_estimator": "estimator"})
    nfmt = nll.copy()
    for c in [c for c in nfmt.columns if c.startswith("term_")] + ["nats", "nats_se"]:
        nfmt[c] = nfmt[c].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    nfmt["bits/dim ± SE"] = [f"{b:.4f} ± {s:.4f}" for b, s in zip(nfmt["bpd"], nfmt["bpd_se"])]
    terms = [c for c in nfmt.columns if c.startswith("term_")]
    nfmt = nfmt[["model", "estimator", "bits/dim ± SE", "nats", "nats_se", "n_test"] + terms]
    lines = ["# Model comparison", ""] + [f"- {c}" for c in caption] + [
        "",
        "Bounds are upper bounds on -log P(x) of the discrete test images, in bits/dim "
        "(nats / (D ln 2)), mean ± standard error over test examples. "
        "Empty cells (nan) are metrics not computed by this pipeline yet.",
        "",
        "## Summary (tightest bound per model)",
        "",
        fmt.to_markdown(index=False),
        "",
        "## Likelihood bounds by estimator (terms in bits/dim)",
        "",
        nfmt.to_markdown(index=False),
        "",
    ]
    return "\n".join(lines)
