"""Likelihood evaluation: every estimator a model reports, on the test split, in bits/dim."""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from .config import EvalConfig
from .likelihood import LN2, bits_per_dim
from .models.base import Model


def summarize(values: torch.Tensor, dims: int) -> dict[str, float]:
    """Mean and standard error over test examples of per-example nats, in bits/dim too."""
    values = values.double()
    n = len(values)
    mean = values.mean().item()
    se = (values.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")
    return {"nats": mean, "nats_se": se, "bpd": bits_per_dim(mean, dims), "bpd_se": bits_per_dim(se, dims)}


MAX_NONFINITE = 0.001  # draw_samples fails when more than this fraction of the samples failed


@torch.no_grad()
def evaluate_bounds(model: Model, images: torch.Tensor, cfg: EvalConfig | Sequence[EvalConfig],
                    per_example: bool = False) -> dict[str, dict[str, Any]]:
    """For each estimator of `model` (`Model.estimators`): bound and its terms, mean +- SE over
    the test examples.

    images: integer [N,C,H,W] on the model's device. `cfg`: one eval config, or several (e.g.
    the frontier's `for_sweep()` and the selected checkpoint's): the estimators of each, one
    they share computed once; the batch size and seed are the first's.
    Returns {estimator label: summary}; a summary has the estimator's `kind`, `profile` (bits/dim
    of each stratum of time: where a diffusion bound's bits come from) where the model gives one,
    `nfe` (network evaluations per example, the mean over batches) for an adaptive ODE bound,
    `solver_check` where the estimator solves its first images again at tighter tolerances, and
    with `per_example` the bound of every example (bits/dim), for paired comparisons.
    """
    model.eval()
    cfgs = [cfg] if isinstance(cfg, EvalConfig) else list(cfg)
    cfg = cfgs[0]
    estimators = {e.label: e for c in cfgs for e in model.estimators(c)}
    out: dict[str, dict[str, Any]] = {}
    for label, est in estimators.items():
        kwargs = est.options
        xs = images[: est.max_examples]  # an estimator may score a fixed subset,
        batch = est.batch_size or cfg.batch_size  # in batches of its own
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {}
        strata, profile, nfe, gaps, check_seconds = [], None, [], [], 0.0
        for i in range(0, len(xs), batch):
            terms, profile = model.nll_terms_profile(xs[i: i + batch], **kwargs)
            for name, value in terms.items():
                parts.setdefault(name, []).append(value.detach().double().cpu())
            if profile is not None and "nats" in profile:
                strata.append(profile["nats"].double().sum(1).cpu())  # [K]
            if profile is not None and "nfe" in profile:
                nfe += [profile["nfe"]] * len(value)
            if profile is not None and "solver_gap" in profile:
                gaps.append(profile["solver_gap"].double().cpu())
                check_seconds += profile["solver_check_seconds"]
        terms = {k: torch.cat(v) for k, v in parts.items()}
        total = torch.stack(list(terms.values())).sum(0)
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"{model.name}: non-finite {label} bound on the test split")
        out[label] = {
            "kind": est.kind, **summarize(total, model.dims),
            "terms_bpd": {k: bits_per_dim(v.mean().item(), model.dims) for k, v in terms.items()},
            "n_examples": len(total),
            "seconds": time.perf_counter() - start - check_seconds,  # the estimator's own time
        }
        if strata:
            out[label]["profile"] = {**{k: profile[k] for k in ("t_lo", "t_hi", "logsnr_lo", "logsnr_hi")},
                                     "bpd": (torch.stack(strata).sum(0) / (len(total) * model.dims * LN2)).tolist()}
        if nfe:
            out[label]["nfe"] = statistics.fmean(nfe)
        if gaps:  # the bound minus the same draws' bound at the check's tolerances, per image
            gap = torch.cat(gaps) / (model.dims * LN2)
            out[label]["solver_check"] = {
                "tol": kwargs["ode"]["check"].rtol, "n_examples": len(gap), "gap_bpd": gap.mean().item(),
                "gap_bpd_se": gap.std().item() / math.sqrt(len(gap)) if len(gap) > 1 else math.nan,
                "max_abs_gap_bpd": gap.abs().max().item(), "seconds": check_seconds}
        if per_example:
            out[label]["per_example_bpd"] = (total / (model.dims * LN2)).tolist()
    return out


def draw_samples(model: Model, n: int, batch_size: int, generator: torch.Generator | None = None,
                 precision: str = "fp32", **sampler: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """n samples in calls of `batch_size` (without autograd), and the sampling speed at that
    batch size: the first full batch is the warm-up, the figures are the median over the other
    full batches (NaN when there are fewer than two full batches). `precision` "bf16": the
    network runs under bfloat16 autocast (the sampler's own arithmetic stays fp32).

    `nfe` is counted, not declared: the forward calls of `model.nfe_module()` (a hook, for the
    duration of sampling) per call of `model.sample`, the same for every batch (else their
    mean); `nfe_declared` is `model.nfe(**sampler)`, what the model says it runs.
    `nonfinite_samples`: the samples the model could not compute (`Model.nonfinite_samples`);
    above MAX_NONFINITE of n it is an error."""
    images, full, calls = [], [], []
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    module = model.nfe_module()
    counter = [0]
    model.nonfinite_samples = 0
    hook = None if module is None else module.register_forward_hook(
        lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        with torch.no_grad(), torch.autocast(model.device.type, torch.bfloat16, enabled=precision == "bf16"):
            start = time.perf_counter()
            for i in range(0, n, batch_size):
                b = min(batch_size, n - i)
                counter[0] = 0
                sync()
                t0 = time.perf_counter()
                images.append(model.sample(b, generator=generator, **sampler))
                sync()
                if b == batch_size:
                    full.append(time.perf_counter() - t0)
                calls.append(counter[0])
            total = time.perf_counter() - start
    finally:
        if hook is not None:
            hook.remove()
    failed = model.nonfinite_samples
    if failed > MAX_NONFINITE * n:
        raise FloatingPointError(f"{model.name or type(model).__name__}: {failed} of {n} samples were non-finite "
                                 f"(more than {MAX_NONFINITE:.1%}); their sampler diverged")
    timed = full[1:]
    med = statistics.median(timed) if timed else math.nan
    nfe = calls[0] if len(set(calls)) == 1 else statistics.fmean(calls)
    speed = {"nfe": nfe, "nfe_declared": model.nfe(**sampler), "nonfinite_samples": failed, "speed_batch": batch_size,
             "speed_repeats": len(timed), "sec_per_batch": med, "samples_per_sec": batch_size / med,
             "sec_per_sample": med / batch_size, "sample_seconds": total}
    return torch.cat(images), speed
