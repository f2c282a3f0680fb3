"""Pipeline stage entry points: read params and files, call the pure functions, write results.

    python -m diffusion_models prepare
    python -m diffusion_models train MODEL [--device auto|cpu|cuda]
    python -m diffusion_models evaluate MODEL [--device ...]
    python -m diffusion_models features [--device ...]
    python -m diffusion_models sample MODEL [--device ...]
    python -m diffusion_models compare
    python -m diffusion_models fetch mnist|cifar10
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import config as config_mod
from . import data, models, report
from .config import Config, ConfigError
from .quality import QualityError
from .runtime import device_label, read_json, resolve_device, seed_everything, versions, write_json, write_text
from .train import Resume, TrainingError, run_key, snapshot_steps
from .train import train as fit

PREPARED = Path("data/prepared")
CHECKPOINTS = Path("results/checkpoints")
TRAIN_RECORDS = Path("results/train")
EVAL_RECORDS = Path("results/eval")
METRICS = Path("results/metrics")  # compact numeric summaries: what `dvc metrics show` lists
LIVE = Path("results/live")
RESUME = Path("results/resume")              # mid-training states (git- and DVC-ignored)
FEATURES = Path("results/features")          # domain classifier + torch-fidelity reference cache
REFERENCE_CACHE = FEATURES / "reference"
SAMPLE_RECORDS = Path("results/sample")
GRIDS = Path("results/samples")
RESULTS = Path("results")


_STAGE_START = time.perf_counter()  # reset by main(): a stage's wall time, without the imports


def _stage_seconds() -> float:
    return time.perf_counter() - _STAGE_START


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


def _truncate_live(tsv_dir: Path, step: int) -> None:
    """Keep only DVCLive points logged at or before `step` (its TSVs: step, value)."""
    for tsv in tsv_dir.rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) <= step]
        write_text(tsv, "\n".join(keep) + "\n")


def run_seeds(cfg: Config) -> list[int]:
    """The training seeds of every model: train.seed, +1, ... (train.seeds or the dataset's default)."""
    n = cfg.train.seeds or data.spec(cfg.data.name).seeds
    return [cfg.train.seed + i for i in range(n)]


def checkpoint_path(name: str, seed: int, fraction: float) -> Path:
    return CHECKPOINTS / name / f"seed{seed}-{fraction * 100:g}pct.pt"


def _kept_run(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The training result stored in checkpoint `path` if it was trained with run key `key`."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["train"] if state.get("run_key") == key else None


def _prepare_resume(resume: Resume | None, steps: dict[int, float], done: dict[float, Any], curve: Path) -> bool:
    """Whether the run continues from `resume`'s saved state: only a state of this very run
    (same key) whose passed snapshots are all on disk; any other state is deleted. When it
    continues, the learning curve is cut back to the state's step."""
    if resume is None or not resume.path.is_file():
        return False
    state = torch.load(resume.path, weights_only=True)
    at = state["step"]
    if state.get("key") != resume.key or any(st <= at and f not in done for st, f in steps.items()):
        resume.path.unlink()  # another run's state, or a snapshot it passed is gone
        return False
    _truncate_live(curve, at)
    return True


def _init_distributed(dev: torch.device) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def train(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """Train one run per seed, keeping checkpoints at the budget sweep's fractions. A run whose
    checkpoints are all present from an earlier, identical run (same model, training config,
    seed and data) is kept, so a stage killed mid-way loses nothing already trained."""
    from dvclive import Live

    overrides = _model_overrides(cfg, name)
    train_ds = data.load_prepared(PREPARED / "train.npz")
    meta = read_json(PREPARED / "meta.json")
    if train_ds.name != cfg.data.name:
        raise StageError(f"prepared data is '{train_ds.name}' but params say data.name="
                         f"'{cfg.data.name}': rerun the prepare stage")
    dev = _setup_torch(cfg, device)
    rank, world = _init_distributed(dev)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    images = _to_tensor(train_ds, dev)
    build = lambda: models.build(name, shape=train_ds.shape, levels=train_ds.levels, **overrides).to(dev)  # noqa: E731
    seeds = run_seeds(cfg)
    probe = build()
    trainable = any(p.requires_grad for p in probe.parameters())
    fractions = sorted(set(cfg.train.fractions) | {1.0}) if trainable else [1.0]  # closed form: no sweep
    wanted = {checkpoint_path(name, s, f) for s in seeds for f in fractions}
    metrics_dir = LIVE / name / "plots" / "metrics"
    if rank == 0:  # what an earlier run with other seeds or fractions left behind
        for old in sorted((CHECKPOINTS / name).glob("*.pt")) + sorted((CHECKPOINTS / name).glob(".*.tmp")):
            if old not in wanted:  # other seeds or fractions, or a write cut short by a kill
                old.unlink()
        for old in sorted(metrics_dir.glob("*")):
            if old.name not in {f"seed{s}" for s in seeds}:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    live_ctx = (Live(dir=str(LIVE / name), dvcyaml=None, save_dvc_exp=False, report=None, resume=True)
                if rank == 0 else contextlib.nullcontext())
    runs = []
    with live_ctx as live:
        if live is not None:
            live.log_params({"model": name, "seeds": seeds, "fractions": fractions,
                             "data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train),
                             "model_config": dataclasses.asdict(probe.cfg)})
        for seed in seeds:
            tcfg = dataclasses.replace(cfg.train, seed=seed)
            seed_everything(seed)
            model = build()
            key = run_key(model, images, tcfg, processes=world)
            resolved = {"data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(tcfg),
                        "model": dataclasses.asdict(model.cfg)}
            done = {f: r for f in fractions if (r := _kept_run(checkpoint_path(name, seed, f), key)) is not None}
            if world == 1 and len(done) == len(fractions):
                print(f"{name} seed {seed}: kept from an earlier identical run")
            else:
                steps = snapshot_steps(tcfg, fractions)
                resume = (Resume(RESUME / name / f"seed{seed}.pt", cfg.train.checkpoint_every, key)
                          if world == 1 else None)
                resuming = _prepare_resume(resume, steps, done, metrics_dir / f"seed{seed}")
                if rank == 0 and not resuming:
                    shutil.rmtree(metrics_dir / f"seed{seed}", ignore_errors=True)

                def log(step: int, seen: int, loss: float) -> None:
                    live.step = step
                    live.log_metric(f"seed{seed}/train/loss", loss)
                    live.log_metric(f"seed{seed}/train/images_seen", seen, plot=False)
                    live.next_step()

                def save(fraction: float, result: Any, weights: dict[str, torch.Tensor] | None = None) -> None:
                    """This run's checkpoint at a budget fraction (rank 0 writes it)."""
                    done[fraction] = result.as_dict()
                    if rank == 0:
                        models.save(model, checkpoint_path(name, seed, fraction), state_dict=weights,
                                    resolved=resolved, train=result.as_dict(), run_key=key)

                result = fit(model, images, tcfg, log=log if live is not None else None,
                             progress=sys.stderr.isatty() and rank == 0, resume=resume,
                             snapshot=(set(steps), lambda weights, r: save(steps[r.steps], r, weights)))
                save(1.0, result)
                print(f"trained {name} seed {seed}: {result.images_seen} images in {result.train_seconds:.1f}s "
                      f"({result.images_per_sec:.0f} img/s), params {model.num_params():,}")
            runs += [{"seed": seed, "fraction": f, "checkpoint": str(checkpoint_path(name, seed, f)), **done[f]}
                     for f in fractions]
    if rank != 0:  # rank 0 writes the outputs
        return {}
    record = {
        "model": name, "family": model.family, "params": model.num_params(),
        "dataset": cfg.data.name, "shape": list(train_ds.shape), "levels": train_ds.levels,
        "n_train": meta["n_train"], "n_test": meta["n_test"], "budget_images": cfg.train.images,
        "batch_size": cfg.train.batch_size, "seeds": seeds, "fractions": fractions, "processes": world,
        "device": device_label(dev), "versions": versions(),
        "config": {**resolved, "train": dataclasses.asdict(cfg.train)}, "runs": runs,
    }
    record["stage_seconds"] = _stage_seconds()
    write_json(TRAIN_RECORDS / f"{name}.json", record)
    final = [r for r in runs if r["fraction"] == 1.0]
    write_json(METRICS / f"{name}.train.json", {"params": model.num_params(), **{
        k: statistics.fmean(r[k] for r in final) for k in ("images_seen", "train_flops", "train_seconds",
                                                           "images_per_sec")}})
    return record


def _load_model(cfg: Config, name: str, dev: torch.device, path: str | Path) -> models.Model:
    """A trained checkpoint of `name`, refused if params now give a different model config."""
    overrides = _model_overrides(cfg, name)
    model, state = models.load(path, map_location=dev)
    expected = dataclasses.asdict(models.make_config(name, overrides))
    if state["config"] != expected:
        raise StageError(f"checkpoint {path} was trained with model config "
                         f"{state['config']}, params.yaml now gives {expected}: retrain it")
    return model.to(dev)


def _train_record(cfg: Config, name: str) -> dict[str, Any]:
    """What the train stage recorded for `name`, including its runs (seed, fraction,
    checkpoint, training result); refused if params now give other seeds."""
    _model_overrides(cfg, name)
    rec = read_json(TRAIN_RECORDS / f"{name}.json")
    if rec["seeds"] != run_seeds(cfg):
        raise StageError(f"{TRAIN_RECORDS / name}.json has seeds {rec['seeds']}, params give "
                         f"{run_seeds(cfg)}: rerun the train stage")
    return rec


def _run_fields(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in report.RUN_FIELDS}


def evaluate(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """Every estimator of every run's checkpoints; IWAE at `sweep_iwae_k` on all of them and at
    `iwae_k` on the final ones."""
    from .evaluate import evaluate_bounds

    dev = _setup_torch(cfg, device)
    runs = _train_record(cfg, name)["runs"]
    x = _to_tensor(data.load_prepared(PREPARED / "test.npz"), dev)
    out = []
    for run in runs:
        model = _load_model(cfg, name, dev, run["checkpoint"])
        ks = [cfg.evaluate.sweep_iwae_k] + ([cfg.evaluate.iwae_k] if run["fraction"] == 1.0 else [])
        bounds = evaluate_bounds(model, x, cfg.evaluate, iwae_ks=ks)
        out.append({**_run_fields(run), "bounds": bounds})
        for label, b in bounds.items():
            print(f"{name} seed {run['seed']} at {run['fraction']:.0%}: {label} {b['bpd']:.4f} ± "
                  f"{b['bpd_se']:.4f} bits/dim ({b['seconds']:.1f}s)")
    record = {"model": name, "family": model.family, "dataset": cfg.data.name, "n_test": len(x),
              "runs": out, "device": device_label(dev), "eval_config": dataclasses.asdict(cfg.evaluate),
              "versions": versions()}
    record["stage_seconds"] = _stage_seconds()
    write_json(EVAL_RECORDS / f"{name}.json", record)
    final = [r["bounds"] for r in out if r["fraction"] == 1.0]
    write_json(METRICS / f"{name}.json", {  # mean over seeds of the final checkpoints
        k: {label: statistics.fmean(b[label][k] for b in final) for label in final[0]} for k in ("bpd", "bpd_se")
    })
    return record


def _reference(cfg: Config) -> tuple[data.Dataset, str]:
    train_ds = data.load_prepared(PREPARED / "train.npz")
    if train_ds.name != cfg.data.name:
        raise StageError(f"prepared data is '{train_ds.name}' but params say data.name="
                         f"'{cfg.data.name}': rerun the prepare stage")
    return train_ds, f"{train_ds.name}-train"


def _extractor_weights(cfg: Config, extractor: str) -> tuple[Path | None, str]:
    """(weights file, 'ok') or (None, 'not available: ...'); require_inception makes the latter an error."""
    from . import quality

    if extractor == quality.CLASSIFIER:
        return FEATURES / "classifier.pt", "ok"
    missing = quality.inception_status(cfg.features.inception_weights)
    if missing and cfg.features.require_inception:
        raise StageError(f"Inception-v3 {missing} (features.require_inception is true; set "
                         "features.inception_weights to a torch-fidelity weights file)")
    return (None, missing) if missing else (quality.inception_weights_path(cfg.features.inception_weights), "ok")


def features(cfg: Config, device: str | None = None) -> dict[str, Any]:
    """Train the domain classifier; cache each available extractor's reference features/statistics."""
    from . import quality

    weights = {e: _extractor_weights(cfg, e) for e in quality.EXTRACTORS}  # fail before any work
    dev = _setup_torch(cfg, device)
    train_ds, ref_name = _reference(cfg)
    test_ds = data.load_prepared(PREPARED / "test.npz")
    f = cfg.features
    res = quality.train_classifier(
        torch.from_numpy(train_ds.images).long(), torch.from_numpy(train_ds.labels).long(),
        torch.from_numpy(test_ds.images).long(), torch.from_numpy(test_ds.labels).long(), train_ds.levels,
        epochs=f.epochs, width=f.width, lr=f.lr, batch_size=f.batch_size, seed=f.seed)
    quality.save_classifier(res.model, FEATURES / "classifier.pt")
    reference = quality.ImageSet(torch.from_numpy(train_ds.images).long(), train_ds.levels)
    extractors = {}
    for name, (path, status) in weights.items():
        extractors[name] = status
        if path is not None:  # fills torch-fidelity's cache; also reports the self-FID (~0)
            self_fid = quality.fidelity_metrics(
                reference, reference, extractor=name, weights=path, cache_root=REFERENCE_CACHE,
                cache_name=ref_name, device=dev, kid_subset_size=cfg.sample.kid_subset_size,
                kid_subsets=2, prc_neighborhood=cfg.sample.prc_neighborhood, seed=0, write_cache=True,
                samples_cache_name=ref_name)["fid"]  # one feature pass: input1 reads input2's cache
            print(f"reference {ref_name} with {name}: {len(reference)} images, self-FID {self_fid:.2e}")
        else:
            print(f"{name}: {status}")
    quality.sample_grid(torch.from_numpy(train_ds.images).long(), train_ds.levels, GRIDS / "real.png")
    record = {"dataset": train_ds.name, "reference": f"train split ({len(train_ds)} images)",
              "classifier": {"test_accuracy": res.test_accuracy, "train_accuracy": res.train_accuracy,
                             "n_test": len(test_ds), "seconds": res.seconds, "features": res.model.num_features,
                             "config": dataclasses.asdict(f)},
              "extractors": extractors, "device": device_label(dev), "versions": versions()}
    record["stage_seconds"] = _stage_seconds()
    write_json(FEATURES / "features.json", record)
    write_json(METRICS / "features.json", {"classifier_test_accuracy": res.test_accuracy})
    print(f"domain classifier: test accuracy {res.test_accuracy:.4f} on {len(test_ds)} images "
          f"({res.seconds:.1f}s)")
    return record


def _sampler_kwargs(cfg: Config, sampler: str, steps: int | None) -> dict[str, Any]:
    """`Model.sample` keyword arguments of one sampler setting."""
    if sampler == "ancestral":
        return {"sampler": sampler, "steps": steps}
    return {"sampler": sampler, "steps": steps, "spacing": cfg.sample.spacing,
            **({"eta": cfg.sample.eta} if sampler == "ddim" else {})}


def sampler_points(cfg: Config, model: models.Model) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(headline, grid): the headline sampler setting (`sample.sampler`/`steps`, or the model's
    own default when it has no such sampler), and the grid's settings the model supports, the
    headline first (kwargs for `Model.sample`)."""
    from .samplers import SOLVERS

    known = ("ancestral", *SOLVERS)
    for where, sampler in [("sample.sampler", cfg.sample.sampler)] + [("sample.grid", g) for g in cfg.sample.grid]:
        if sampler not in known:
            raise StageError(f"{where}: unknown sampler '{sampler}'; samplers: {', '.join(known)}")
    headline = (_sampler_kwargs(cfg, cfg.sample.sampler, cfg.sample.steps)
                if cfg.sample.sampler in model.samplers else {})
    grid = [headline]
    for sampler, steps in cfg.sample.grid.items():
        # a one-shot model's sampler takes no steps: its headline point is its only one
        if sampler in model.samplers and model.samplers != ("ancestral",):
            grid += [kw for k in steps if (kw := _sampler_kwargs(cfg, sampler, k)) != headline]
    return headline, grid


def sample(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """For each run's checkpoints: n_samples from the headline sampler (timing the batches), then
    FID/KID/PR per extractor; on the first seed's final checkpoint, the whole sampler grid and
    an image grid of the headline sampler's samples."""
    from . import quality
    from .evaluate import draw_samples

    weights = {e: _extractor_weights(cfg, e) for e in quality.EXTRACTORS}  # fail before sampling
    dev = _setup_torch(cfg, device)
    runs = _train_record(cfg, name)["runs"]
    train_ds, ref_name = _reference(cfg)
    reference = quality.ImageSet(torch.from_numpy(train_ds.images).long(), train_ds.levels)
    s = cfg.sample
    n = s.n_samples or data.spec(cfg.data.name).fid_samples
    tm_fid = {e: quality.torchmetrics_fid_against(reference, extractor=e, weights=path, device=dev)
              for e, (path, _) in weights.items() if path is not None}  # reference features once
    results = []
    for run in runs:
        model = _load_model(cfg, name, dev, run["checkpoint"])
        headline, grid = sampler_points(cfg, model)
        first = run["seed"] == runs[0]["seed"] and run["fraction"] == 1.0
        for kw in grid if first else [headline]:
            gen = torch.Generator(device=dev).manual_seed(s.seed + run["seed"])
            images, speed = draw_samples(model, n, s.batch_size, gen, **kw)
            if first and kw == headline:
                quality.sample_grid(images, model.levels, GRIDS / f"{name}.png")
            samples = quality.ImageSet(images, model.levels)
            rows = []
            for extractor, (path, status) in weights.items():
                row: dict[str, Any] = {"extractor": extractor, "status": status}
                if path is not None:
                    row.update(quality.fidelity_metrics(
                        samples, reference, extractor=extractor, weights=path, cache_root=REFERENCE_CACHE,
                        cache_name=ref_name, device=dev, kid_subset_size=s.kid_subset_size,
                        kid_subsets=s.kid_subsets, prc_neighborhood=s.prc_neighborhood, seed=s.seed))
                    row["fid_torchmetrics"] = tm_fid[extractor](samples)
                    row["fid_rel_diff"] = abs(row["fid_torchmetrics"] - row["fid"]) / max(abs(row["fid"]), 1e-12)
                rows.append(row)
            point = {**_run_fields(run), "sampler": kw.get("sampler", "ancestral"), "steps": kw.get("steps"),
                     "label": model.sampler_label(**kw), "headline": kw == headline, **speed, "metrics": rows}
            results.append(point)
            main_row = rows[0]
            print(f"{name} seed {run['seed']} at {run['fraction']:.0%} [{point['label']}] NFE {speed['nfe']}, "
                  f"{speed['samples_per_sec']:.1f} samples/s (batch {s.batch_size}); " + (
                      f"FID {main_row['fid']:.4f} (torchmetrics {main_row['fid_torchmetrics']:.4f}) "
                      f"KID {main_row['kid']:.5f} ± {main_row['kid_std']:.5f} P {main_row['precision']:.3f} "
                      f"R {main_row['recall']:.3f} [{main_row['extractor']}]"
                      if main_row["status"] == "ok" else main_row["status"]))
    record = {"model": name, "dataset": train_ds.name, "n_samples": n,
              "reference": f"train split ({len(train_ds)} images)", "points": results,
              "device": device_label(dev), "sample_config": dataclasses.asdict(s), "versions": versions()}
    record["stage_seconds"] = _stage_seconds()
    write_json(SAMPLE_RECORDS / f"{name}.json", record)
    final = [p for p in results if p["headline"] and p["fraction"] == 1.0]
    write_json(METRICS / f"{name}.sample.json", {  # mean over seeds, headline sampler, final checkpoints
        "samples_per_sec": statistics.fmean(p["samples_per_sec"] for p in final), "nfe": final[0]["nfe"],
        **{k: {r["extractor"]: statistics.fmean(q["metrics"][i][k] for q in final)
               for i, r in enumerate(final[0]["metrics"]) if r["status"] == "ok"}
           for k in ("fid", "kid", "precision", "recall")}})
    return record


def compare(cfg: Config) -> None:
    names = list(cfg.models)
    trains = [_train_record(cfg, m) for m in names]
    evals = [read_json(EVAL_RECORDS / f"{m}.json") for m in names]
    samples = [read_json(SAMPLE_RECORDS / f"{m}.json") for m in names]
    tr = report.train_runs(trains)
    matched = report.check_matched(tr[tr["fraction"] == 1.0].to_dict("records"), cfg.train.images,
                                   cfg.compare.allow_unmatched)
    nll_runs, sampling = report.nll_runs(evals), report.sampling_runs(samples)
    runs = report.runs_table(tr, nll_runs, sampling)
    comp, nll, sweep = report.comparison_table(runs, matched), report.nll_table(nll_runs), report.sweep_table(runs)
    provenance = report.provenance(trains, cfg.train.images)
    n, seeds = int(sampling["n_samples"].iloc[0]), run_seeds(cfg)
    over = f"mean ± standard deviation over {len(seeds)} seeds" if len(seeds) > 1 else f"one seed ({seeds[0]})"
    caption = (f"{cfg.data.name}, {cfg.train.images:,} training images per model and run, {over}: tightest "
               f"bound on the test split (bits/dim, estimator per row) and FID of {n:,} samples "
               f"({report.PRIMARY_EXTRACTOR} features) against the training split, headline sampler with NFE "
               "per row.")
    versions_str = "; ".join(f"{k}={v}" for k, v in trains[0]["versions"].items())
    for df in (comp, nll, sweep, runs, sampling):
        df["budget_images"], df["versions"] = cfg.train.images, versions_str
    nll["dataset"], comp["caption"] = cfg.data.name, caption
    tables = {"comparison.csv": comp, "nll.csv": nll, "budget_sweep.csv": sweep, "runs.csv": runs,
              "sampling.csv": sampling}
    for fname, df in tables.items():
        write_text(RESULTS / fname, df.to_csv(index=False))
    features = read_json(FEATURES / "features.json")
    timings = report.stage_times(trains, evals, samples, features)
    write_text(RESULTS / "timings.csv", timings.to_csv(index=False))
    points = report.fid_vs_nfe(sampling)
    write_text(RESULTS / "fid_vs_nfe.csv", points.to_csv(index=False))
    report.plot_fid_vs_nfe(points, str(RESULTS / "fid_vs_nfe.png"),
                           f"{cfg.data.name}: FID ({report.PRIMARY_EXTRACTOR}, {n:,} samples) against NFE; "
                           f"budget {cfg.train.images:,} images, seed {seeds[0]}")
    report.plot_budget_sweep(sweep, str(RESULTS / "budget_sweep.png"),
                             f"{cfg.data.name}: test bits/dim and FID ({n:,} samples) against training "
                             f"compute; {over}")
    write_text(RESULTS / "comparison.tex", report.latex(comp, caption.replace("±", "$\\pm$")))
    text = report.markdown(comp, nll, sweep, sampling, provenance, timings)
    write_text(RESULTS / "comparison.md", text)
    print(text)


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
    for cmd in ("train", "evaluate", "sample"):
        s = sub.add_parser(cmd, help=f"{cmd} one model")
        s.add_argument("model")
        s.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: params train.device)")
    s = sub.add_parser("features", help="train the FID domain classifier; cache reference statistics")
    s.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (default: params train.device)")
    sub.add_parser("compare", help="write results/comparison.{csv,md} and results/nll.csv")
    f = sub.add_parser("fetch", help="download and verify a real dataset pinned in data.dvc")
    f.add_argument("dataset")
    args = p.parse_args(argv)
    global _STAGE_START
    _STAGE_START = time.perf_counter()
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
        elif args.cmd == "features":
            features(cfg, args.device)
        elif args.cmd == "sample":
            sample(cfg, args.model, args.device)
        elif args.cmd == "compare":
            compare(cfg)
        elif args.cmd == "fetch":
            fetch(args.dataset, cfg.data.root)
    except (ConfigError, data.DataError, StageError, QualityError, TrainingError, report.UnmatchedError,
            KeyError, FileNotFoundError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
