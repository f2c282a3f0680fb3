"""Likelihood evaluation: every estimator a model reports, on the test split, in bits/dim."""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from .config import EvalConfig
from .likelihood import bits_per_dim
from .models.base import Model


def summarize(values: torch.Tensor, dims: int) -> dict[str, float]:
    """Mean and standard error over test examples of per-example nats, in bits/dim too."""
    values = values.double()
    n = len(values)
    mean = values.mean().item()
    se = (values.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")
    return {"nats": mean, "nats_se": se, "bpd": bits_per_dim(mean, dims), "bpd_se": bits_per_dim(se, dims)}


@torch.no_grad()
def evaluate_bounds(model: Model, images: torch.Tensor, cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """For each estimator of `model`: bound and its terms, mean +- SE over the test examples.

    images: integer [N,C,H,W] on the model's device. Returns {estimator label: summary}.
    """
    model.eval()
    out: dict[str, dict[str, Any]] = {}
    for label, kwargs in model.estimators(cfg):
        torch.manual_seed(cfg.seed)
        start = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(images), cfg.batch_size):
            terms = model.nll_terms(images[i: i + cfg.batch_size], **kwargs)
            for name, value in terms.items():
                parts.setdefault(name, []).append(value.detach().double().cpu())
        terms = {k: torch.cat(v) for k, v in parts.items()}
        total = torch.stack(list(terms.values())).sum(0)
        if not torch.isfinite(total).all():
            raise FloatingPointError(f"{model.name}: non-finite {label} bound on the test split")
        out[label] = {
            **summarize(total, model.dims),
            "terms_bpd": {k: bits_per_dim(v.mean().item(), model.dims) for k, v in terms.items()},
            "n_examples": len(total),
            "seconds": time.perf_counter() - start,
        }
    return out
