"""The figures of the compare stage (matplotlib, Agg): the compute frontier, FID against NFE, and
where each diffusion bound's bits come from (the VLB profile over log SNR)."""
from __future__ import annotations

import textwrap
from typing import Any

import pandas as pd

from .report import PRIMARY_EXTRACTOR


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    from .runtime import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def plot_frontier(frontier: pd.DataFrame, path: str, caption: str) -> None:
    """The compute frontier: test bits/dim of the best-validation checkpoint within each FLOP
    budget (log x), mean ± std over seeds, one line per model; closed-form models as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.4))
    trained = frontier[frontier["flops"] > 0]
    colours = dict(zip(frontier["model"].unique(), plt.get_cmap("tab10").colors))
    for model, g in trained.groupby("model", sort=False):
        g = g.sort_values("flops")
        ax.errorbar(g["flops"], g["bpd"], yerr=g["bpd_std"].fillna(0), color=colours[model],
                    marker="o", capsize=3, label=f"{model} ({g['estimator'].iloc[0]})")
    for row in frontier[frontier["flops"] <= 0].itertuples():  # closed form: a reference line
        ax.axhline(row.bpd, color=colours[row.model], linestyle=":", label=f"{row.model} (closed form)")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs budget (measured FLOPs per image x images)")
    ax.set_ylabel("test bits/dim of the best-validation checkpoint")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(caption, 110), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_fid_vs_nfe(points: pd.DataFrame, path: str, caption: str) -> None:
    """FID against NFE (log x), one line per (model, sampler)."""
    plt = _pyplot()
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
    _save(fig, path)


def plot_vlb_profile(profile: pd.DataFrame, path: str, caption: str) -> None:
    """Bits/dim per unit log SNR of each diffusion bound's diffusion term against log SNR (mean
    over seeds, one line per model; the data end is on the right), and the prior and
    reconstruction terms in the legend: the area under a line plus those two is the bound."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    colours = dict(zip(profile["model"].unique(), plt.get_cmap("tab10").colors))
    if not len(profile):
        ax.text(0.5, 0.5, "no model with a profile (diffusion) in this run", ha="center", transform=ax.transAxes)
    for (model, estimator), g in profile.groupby(["model", "estimator"], sort=False):
        d = g[g["term"] == "diffusion"].sort_values("logsnr_lo")
        ends = {t: g.loc[g["term"] == t, "bpd"].sum() for t in ("prior", "reconstruction")}
        total = g["bpd"].sum()
        x = (d["logsnr_lo"] + d["logsnr_hi"]) / 2
        ax.step(x, d["bpd_per_logsnr"], where="mid", color=colours[model],
                label=f"{model}: {total:.3f} bits/dim = prior {ends['prior']:.3f} + diffusion "
                      f"{d['bpd'].sum():.3f} + reconstruction {ends['reconstruction']:.3f} ({estimator})")
    ax.set_yscale("log" if len(profile) else "linear")
    ax.set_xlabel("log SNR = log(alpha^2 / sigma^2)   (noise  ←  →  data)")
    ax.set_ylabel("bits/dim per unit log SNR")
    ax.set_title(caption, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)
