"""`select`: choose defaults on the validation split (never the test split). Each candidate is
one model with some overrides, trained with the params' budget and first seed, scored with
the model's estimators on validation; the table is written to results/selection/<model>-<keys>.csv.

    python -m diffusion_models select hvae kl_warmup=0,250,1000
    python -m diffusion_models select vae lr=1e-3,2e-3,4e-3      # train.* keys are training settings
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pandas as pd
import yaml

from .. import models
from ..config import Config, TrainConfig, from_dict
from ..evaluate import evaluate_bounds
from ..runtime import seed_everything, write_text
from ..train import train as fit
from .common import RESULTS, model_overrides, setup_torch, split, to_tensor

TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """['kl_warmup=0,250', 'lr=1e-3'] -> {'kl_warmup': [0, 250], 'lr': [0.001]} (YAML scalars)."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ValueError(f"select: expected KEY=V1,V2,..., got '{spec}'")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def select(cfg: Config, name: str, specs: list[str], device: str | None = None) -> pd.DataFrame:
    base = model_overrides(cfg, name)
    grid = parse_grid(specs)
    dev = setup_torch(cfg, device)
    train_ds = split(cfg, "train")
    images, val = to_tensor(train_ds, dev), to_tensor(split(cfg, "val"), dev)
    rows = []
    for values in itertools.product(*grid.values()):
        choice = dict(zip(grid, values))
        tcfg = from_dict(TrainConfig, {**dataclasses.asdict(cfg.train), **{k: v for k, v in choice.items()
                                                                          if k in TRAIN_KEYS}}, "train")
        overrides = {**base, **{k: v for k, v in choice.items() if k not in TRAIN_KEYS}}
        seed_everything(tcfg.seed)
        model = models.build(name, shape=train_ds.shape, levels=train_ds.levels, **overrides).to(dev)
        result = fit(model, images, tcfg, progress=True)
        bounds = evaluate_bounds(model, val, cfg.evaluate.for_sweep())
        for label, b in bounds.items():
            rows.append({"model": name, **choice, "estimator": label, "val_bpd": b["bpd"], "val_bpd_se": b["bpd_se"],
                         "images_seen": result.images_seen, "seed": tcfg.seed})
            print(f"select {name} {choice}: {label} {b['bpd']:.4f} ± {b['bpd_se']:.4f} bits/dim on validation",
                  flush=True)
    table = pd.DataFrame(rows)
    path = RESULTS / "selection" / f"{name}-{'-'.join(grid)}.csv"
    write_text(path, table.to_csv(index=False))
    print(f"wrote {path}")
    return table
