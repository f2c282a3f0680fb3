"""Command line: one subcommand per pipeline stage (diffusion_models/pipeline/), plus set-up.

    python -m diffusion_models prepare
    python -m diffusion_models train MODEL [--device auto|cpu|cuda]
    python -m diffusion_models evaluate MODEL [--device ...]
    python -m diffusion_models features [--device ...]
    python -m diffusion_models sample MODEL [--device ...]
    python -m diffusion_models compare
    python -m diffusion_models train-classifier [--out PATH]
    python -m diffusion_models select MODEL KEY=V1,V2 ... [--device ...]
    python -m diffusion_models fetch mnist|cifar10
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import yaml

from . import config as config_mod
from . import data, models
from .config import ConfigError
from .pipeline.common import StageError, start_clock
from .runtime import QualityError, retain_freed_memory
from .train import TrainingError


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
    sub.add_parser("prepare", help="write the train/val/test splits of data.name")
    device_help = "auto | cpu | cuda[:N] (default: params train.device)"
    for cmd in ("train", "evaluate", "sample"):
        s = sub.add_parser(cmd, help=f"{cmd} one model")
        s.add_argument("model")
        s.add_argument("--device", default=None, help=device_help)
    s = sub.add_parser("features", help="check the FID classifier; cache reference statistics")
    s.add_argument("--device", default=None, help=device_help)
    sub.add_parser("compare", help="write the tables and figures of results/")
    s = sub.add_parser("train-classifier", help="retrain the FID classifier of data.name (changes the feature space)")
    s.add_argument("--out", default=None, help="weights file (default: the one shipped for the dataset)")
    s = sub.add_parser("select", help="choose defaults on the validation split: train and score a grid")
    s.add_argument("model")
    s.add_argument("grid", nargs="+", help="KEY=V1,V2,... (model config or train.* keys)")
    s.add_argument("--device", default=None, help=device_help)
    f = sub.add_parser("fetch", help="download and verify a real dataset pinned in data.dvc")
    f.add_argument("dataset")
    args = p.parse_args(argv)
    start_clock()
    retain_freed_memory()
    try:
        cfg = config_mod.load_params(args.params)
        models.use_plugins(cfg.models)  # models.<name>.class: defined outside the package
        for name, overrides in cfg.models.items():  # unknown models / override keys: fail early
            models.make_config(name, overrides)
        if args.cmd == "fetch":
            fetch(args.dataset, cfg.data.root)
        elif args.cmd in ("prepare", "train-classifier"):
            from .pipeline import features, train

            train.prepare(cfg) if args.cmd == "prepare" else features.train_classifier(cfg, args.out)
        elif args.cmd == "select":
            from .pipeline.select import select

            select(cfg, args.model, args.grid, args.device)
        elif args.cmd == "compare":
            from .pipeline.compare import compare

            compare(cfg)
        elif args.cmd == "features":
            from .pipeline.features import features as features_stage

            features_stage(cfg, args.device)
        else:  # a per-model stage: its module is imported alone (pipeline/<stage>.py)
            stage = getattr(importlib.import_module(f".pipeline.{args.cmd}", __package__), args.cmd)
            stage(cfg, args.model, args.device)
    except (ConfigError, data.DataError, StageError, QualityError, TrainingError,
            KeyError, FileNotFoundError, ValueError, FloatingPointError) as e:  # (UnmatchedError: a ValueError)
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
