"""Pipeline stage entry points: read params and files, call the pure functions, write results.

    python -m diffusion_models prepare
    python -m diffusion_models train MODEL [--device auto|cpu|cuda]
    python -m diffusion_models evaluate MODEL [--device ...]
    python -m diffusion_models compare
    python -m diffusion_models fetch mnist|cifar10
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import config as config_mod
from . import data, models, report
from .config import Config, ConfigError
from .runtime import device_label, read_json, resolve_device, seed_everything, versions, write_json, write_text

PREPARED = Path("data/prepared")
CHECKPOINTS = Path("results/checkpoints")
TRAIN_RECORDS = Path("results/train")
EVAL_RECORDS = Path("results/eval")
METRICS = Path("results/metrics")  # compact numeric summaries: what `dvc metrics show` lists
LIVE = Path("results/live")
RESULTS = Path("results")


class StageError(RuntimeError):
    """A stage cannot run with the given params/files; the message says why."""


def _model_overrides(cfg: Config, name: str) -> dict[str, Any]:
    models.get(name)  # unknown model: error naming it and the registered ones
    if name not in cfg.models:
        raise StageError(f"model '{name}' is not listed under 'models' in params.yaml "
                         f"(listed: {', '.join(cfg.models)})")
    return cfg.models[name]


def _setup_torch(cfg: Config, device: str | None) -> torch.device:
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return resolve_device(device or cfg.train.device)


def _to_tensor(ds: data.Dataset, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(ds.images.astype(np.int64)).to(dev)


def prepare(cfg: Config) -> None:
    d = cfg.data
    meta = {}
    for split in data.SPLITS:
        ds = data.load(d.name, split, d.root, split_seed=d.split_seed, test_size=d.test_size)
        data.save_prepared(ds, PREPARED / f"{split}.npz")
        meta[split] = len(ds)
        print(f"prepared {d.name}/{split}: {len(ds)} images {ds.shape}, {ds.levels} levels")
    write_json(PREPARED / "meta.json", {"dataset": d.name, "levels": ds.levels, "shape": ds.shape,
                                        "n_train": meta["train"], "n_test": meta["test"],
                                        "config": dataclasses.asdict(d)})


def train(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    from dvclive import Live

    from .train import train as fit

    overrides = _model_overrides(cfg, name)
    train_ds = data.load_prepared(PREPARED / "train.npz")
    meta = read_json(PREPARED / "meta.json")
    if train_ds.name != cfg.data.name:
        raise StageError(f"prepared data is '{train_ds.name}' but params say data.name="
                         f"'{cfg.data.name}': rerun the prepare stage")
    dev = _setup_torch(cfg, device)
    seed_everything(cfg.train.seed)
    model = models.build(name, shape=train_ds.shape, levels=train_ds.levels, **overrides).to(dev)
    resolved = {"data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train),
                "model": dataclasses.asdict(model.cfg)}
    with Live(dir=str(LIVE / name), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params({"model": name, **resolved})

        def log(step: int, seen: int, loss: float) -> None:
            live.step = step
            live.log_metric("train/loss", loss)
            live.log_metric("train/images_seen", seen, plot=False)
            live.next_step()

        result = fit(model, _to_tensor(train_ds, dev), cfg.train, log=log, progress=sys.stderr.isatty())
    record = {
        "model": name, "family": model.family, "params": model.num_params(),
        **result.as_dict(),
        "dataset": cfg.data.name, "shape": list(train_ds.shape), "levels": train_ds.levels,
        "n_train": meta["n_train"], "n_test": meta["n_test"],
        "batch_size": cfg.train.batch_size, "seed": cfg.train.seed,
        "device": device_label(dev), "versions": versions(), "config": resolved,
    }
    models.save(model, CHECKPOINTS / f"{name}.pt", resolved=resolved, train=result.as_dict())
    write_json(TRAIN_RECORDS / f"{name}.json", record)
    write_json(METRICS / f"{name}.train.json",
               {k: record[k] for k in ("params", "images_seen", "train_flops", "train_seconds",
                                       "images_per_sec")})
    print(f"trained {name}: {result.images_seen} images in {result.train_seconds:.1f}s "
          f"({result.images_per_sec:.0f} img/s), params {model.num_params():,}")
    return record


def evaluate(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    from .evaluate import evaluate_bounds

    overrides = _model_overrides(cfg, name)
    dev = _setup_torch(cfg, device)
    model, state = models.load(CHECKPOINTS / f"{name}.pt", map_location=dev)
    expected = dataclasses.asdict(models.make_config(name, overrides))
    if state["config"] != expected:
        raise StageError(f"checkpoint {CHECKPOINTS / name}.pt was trained with model config "
                         f"{state['config']}, params.yaml now gives {expected}: retrain it")
    model.to(dev)
    test_ds = data.load_prepared(PREPARED / "test.npz")
    bounds = evaluate_bounds(model, _to_tensor(test_ds, dev), cfg.evaluate)
    record = {"model": name, "family": model.family, "dataset": test_ds.name,
              "n_test": len(test_ds), "bounds": bounds, "device": device_label(dev),
              "eval_config": dataclasses.asdict(cfg.evaluate), "versions": versions()}
    write_json(EVAL_RECORDS / f"{name}.json", record)
    write_json(METRICS / f"{name}.json", {
        "bpd": {label: b["bpd"] for label, b in bounds.items()},
        "bpd_se": {label: b["bpd_se"] for label, b in bounds.items()},
    })
    for label, b in bounds.items():
        print(f"{name} {label}: {b['bpd']:.4f} ± {b['bpd_se']:.4f} bits/dim ({b['seconds']:.1f}s)")
    return record


def compare(cfg: Config) -> None:
    names = list(cfg.models)
    trains = [read_json(TRAIN_RECORDS / f"{m}.json") for m in names]
    evals = [read_json(EVAL_RECORDS / f"{m}.json") for m in names]
    nll = report.nll_table(evals)
    comp = report.comparison_table(trains, nll)
    caption = report.provenance(trains, cfg.train.images)
    versions_str = "; ".join(f"{k}={v}" for k, v in trains[0]["versions"].items())
    nll["dataset"], nll["seed"] = cfg.data.name, cfg.train.seed
    for df in (comp, nll):
        df["budget_images"], df["versions"] = cfg.train.images, versions_str
    write_text(RESULTS / "comparison.csv", comp.to_csv(index=False))
    write_text(RESULTS / "nll.csv", nll.to_csv(index=False))
    write_text(RESULTS / "comparison.md", report.markdown(comp, nll, caption))
    print(report.markdown(comp, nll, caption))


def fetch(name: str, root: str | Path) -> None:
    """Download a real dataset's native files with `dvc get-url`, then verify the pins."""
    spec = data.spec(name)
    if not spec.files:
        raise StageError(f"dataset '{name}' is embedded; nothing to fetch")
    pins = yaml.safe_load(Path("data.dvc").read_text())
    for out in pins["outs"]:
        path = Path(out["path"])
        if path.parent.name != name:
            continue
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "dvc", "get-url", out["meta"]["url"], str(path)],
                           check=True)
    data.verify(Path(root), name)
    print(f"fetched and verified {name}; run `dvc commit data.dvc` to cache the files")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="write the train/test splits of data.name")
    for cmd in ("train", "evaluate"):
        s = sub.add_parser(cmd, help=f"{cmd} one model")
        s.add_argument("model")
        s.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: params train.device)")
    sub.add_parser("compare", help="write results/comparison.{csv,md} and results/nll.csv")
    f = sub.add_parser("fetch", help="download and verify a real dataset pinned in data.dvc")
    f.add_argument("dataset")
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load_params(args.params)
        for name, overrides in cfg.models.items():  # unknown models / override keys: fail early
            models.make_config(name, overrides)
        if args.cmd == "prepare":
            prepare(cfg)
        elif args.cmd == "train":
            train(cfg, args.model, args.device)
        elif args.cmd == "evaluate":
            evaluate(cfg, args.model, args.device)
        elif args.cmd == "compare":
            compare(cfg)
        elif args.cmd == "fetch":
            fetch(args.dataset, cfg.data.root)
    except (ConfigError, data.DataError, StageError, KeyError, FileNotFoundError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
