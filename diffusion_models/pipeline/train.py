"""The `prepare` and `train@<model>` stages: the fixed splits, then one run per seed with
checkpoints on a grid of the cap, each scored on validation (the selection: the test split is
never opened here); early stopping, kept runs, resume and the learning curves."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from .. import data, models
from ..config import Config, EvalConfig
from ..likelihood import bits_per_dim
from ..runtime import (device_label, intra_op_threads, read_json, seed_everything, versions, write_json,
                       write_text)
from ..train import Resume, run_key, select_checkpoint, should_stop, snapshot_steps
from ..train import train as fit
from .common import (CHECKPOINTS, LIVE, METRICS, PREPARED, RESUME, TRAIN_RECORDS, checkpoint_path,
                     code_digest, in_workers, model_overrides, parallel_runs, run_seeds, setup_torch, split,
                     to_tensor, write_record)


def prepare(cfg: Config) -> None:
    d = cfg.data
    sizes = {}
    for name in data.SPLITS:
        ds = data.load(d.name, name, d.root, split_seed=d.split_seed, test_size=d.test_size, val_size=d.val_size)
        data.save_prepared(ds, PREPARED / f"{name}.npz")
        sizes[name] = len(ds)
        print(f"prepared {d.name}/{name}: {len(ds)} images {ds.shape}, {ds.levels} levels")
    write_json(PREPARED / "meta.json", {"dataset": d.name, "levels": ds.levels, "shape": ds.shape,
                                        **{f"n_{k}": v for k, v in sizes.items()},
                                        "config": dataclasses.asdict(d)})


def _truncate_live(tsv_dir: Path, step: int) -> None:
    """Keep only DVCLive points logged at or before `step` (its TSVs: step, value)."""
    for tsv in tsv_dir.rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[0]) <= step]
        write_text(tsv, "\n".join(keep) + "\n")


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
    state = torch.load(resume.path, map_location="cpu", weights_only=True)
    at = state["step"]
    if state.get("key") != resume.key or any(st <= at and f not in done for st, f in steps.items()):
        resume.path.unlink()  # another run's state, or a snapshot it passed is gone
        return False
    _truncate_live(curve, at)
    return True


def complete(done: dict[float, Any], fractions: list[float], patience: int) -> bool:
    """Whether checkpoints `done` (fraction -> result with `val_bpd`) are a whole run: every grid
    point, or the first ones up to where `patience` stopped it."""
    have = sorted(done)
    if have != sorted(fractions)[: len(have)] or not have:
        return False
    return len(have) == len(fractions) or should_stop([done[f]["val_bpd"] for f in have], patience)


def checkpoint_runs(name: str, seed: int, done: dict[float, Any]) -> list[dict[str, Any]]:
    """The record's rows of one run: a row per checkpoint in training order, `selected` on the
    one with the best validation bound (what the tables report), `last` on where it stopped."""
    order = sorted(done)
    best = order[select_checkpoint([done[f]["val_bpd"] for f in order])]
    return [{"seed": seed, "fraction": f, "checkpoint": str(checkpoint_path(name, seed, f)), **done[f],
             "selected": f == best, "last": f == order[-1]} for f in order]


def _resume(cfg: Config, name: str, seed: int, key: dict[str, Any], world: int) -> Resume | None:
    return Resume(RESUME / name / f"seed{seed}.pt", cfg.train.checkpoint_every, key) if world == 1 else None


def _prepare_run(cfg: Config, name: str, seed: int, key: dict[str, Any], fractions: list[float],
                 done: dict[float, Any], world: int) -> None:
    """Before a run (re)trains, in the stage's process and before its DVCLive folder is opened:
    keep its saved state and cut its learning curve back to it when it resumes, else delete
    the curve (a worker deleting files the stage's DVCLive has already loaded made its next
    write fail)."""
    steps = snapshot_steps(dataclasses.replace(cfg.train, seed=seed), fractions)
    curve = LIVE / name / "plots" / "metrics" / f"seed{seed}"
    if not _prepare_resume(_resume(cfg, name, seed, key, world), steps, done, curve):
        shutil.rmtree(curve, ignore_errors=True)


def _init_distributed(dev: torch.device) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def validation_bound(model: models.Model, val: torch.Tensor, t_samples: int, batch: int = 512):
    """The held-out score of the learning curve and of checkpoint selection: the model's first
    (cheapest) estimator on the validation split (ELBO, a VLB with `t_samples` strata of t, ...),
    bits/dim, fixed noise."""
    options = model.estimators(EvalConfig(iwae_k=1, dequant_k=1, t_samples=t_samples))[0].options
    torch.manual_seed(0)
    nats = torch.cat([model.nll_bound(val[i: i + batch], **options) for i in range(0, len(val), batch)])
    return float(bits_per_dim(nats.double().mean().item(), model.dims))


def _clean(name: str, wanted: set[Path], seeds: list[int], metrics_dir: Path) -> None:
    """Remove what an earlier run with other seeds or fractions left behind, and writes cut
    short by a kill."""
    for old in sorted((CHECKPOINTS / name).glob("*.pt")) + sorted((CHECKPOINTS / name).glob(".*.tmp")):
        if old not in wanted:
            old.unlink()
    for old in sorted(metrics_dir.glob("*")):
        if old.name not in {f"seed{s}" for s in seeds}:
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def _log_point(live: Any, message: tuple[int, int, int, dict[str, float]]) -> None:
    """One learning-curve point of run `seed` into the model's DVCLive folder (metric names carry
    the seed: each run has its own curves)."""
    seed, step, seen, point = message
    live.step = step
    for k, v in point.items():
        live.log_metric(f"seed{seed}/{k}", v)
    live.log_metric(f"seed{seed}/train/images_seen", seen, plot=False)
    live.next_step()


def _fit_run(cfg: Config, name: str, seed: int, device: str, key: dict[str, Any], fractions: list[float],
             done: dict[float, Any], rank: int = 0, world: int = 1, *,
             send: Callable[[tuple[int, int, int, dict[str, float]]], None] | None = None,
             ) -> dict[float, Any]:
    """Train run `seed` (resumed from its saved state when there is one of this very run) and
    save its checkpoints on the grid (`train.fractions` of the cap), each with its validation
    bound, stopping early per `train.patience`; `done` holds those already on disk. In the
    stage's process or in a worker of its own (`in_workers`); the learning-curve points go to
    `send`. Returns fraction -> training result with `val_bpd`."""
    dev = torch.device(device)
    train_ds = split(cfg, "train")
    images, val = to_tensor(train_ds, dev), to_tensor(split(cfg, "val"), dev)
    tcfg = dataclasses.replace(cfg.train, seed=seed)
    seed_everything(seed)
    model = models.build(name, shape=train_ds.shape, levels=train_ds.levels, **model_overrides(cfg, name)).to(dev)
    resolved = {"data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(tcfg),
                "model": dataclasses.asdict(model.cfg)}
    steps = snapshot_steps(tcfg, fractions)
    resume = _resume(cfg, name, seed, key, world)  # its state and curve were prepared by the stage

    def save(fraction: float, weights: dict[str, torch.Tensor], result: Any, score: float) -> bool:
        """This run's checkpoint at a grid point with its validation bound (rank 0 writes it);
        whether to stop here (`train.patience`)."""
        done[fraction] = {**result.as_dict(), "val_bpd": score}
        if rank == 0:
            models.save(model, checkpoint_path(name, seed, fraction), state_dict=weights,
                        resolved=resolved, train=done[fraction], run_key=key)
        return should_stop([done[f]["val_bpd"] for f in sorted(done)], tcfg.patience)

    log = (lambda step, seen, point: send((seed, step, seen, point))) if send is not None else None
    score = functools.partial(validation_bound, val=val, t_samples=cfg.train.val_t_samples)
    result = fit(model, images, tcfg, log=log, progress=rank == 0, resume=resume, validate=score,
                 snapshot=(set(steps), lambda weights, r, v: save(steps[r.steps], weights, r, v)))
    if not done:  # fitted in closed form (no steps, no snapshot): one checkpoint, scored here
        with torch.no_grad():
            save(1.0, model.state_dict(), result, score(model))
    print(f"trained {name} seed {seed}: {result.images_seen} images in {result.train_seconds:.1f}s "
          f"({result.images_per_sec:.0f} img/s), params {model.num_params():,}", flush=True)
    return done


def train(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """Train one run per seed, keeping checkpoints on the grid with their validation bounds and
    marking the best one `selected` (what evaluate and sample report). A run whose
    checkpoints are all present from an earlier, identical run (same model, training config,
    seed, data and code) is kept, so a stage killed mid-way loses nothing already trained;
    when every run is kept and the record would not change, nothing is rewritten. On a CPU
    the runs train side by side in worker processes that share the threads (`parallel_runs`);
    every run key names the threads it trained with."""
    from dvclive import Live

    overrides = model_overrides(cfg, name)
    train_ds = split(cfg, "train")
    meta = read_json(PREPARED / "meta.json")
    dev = setup_torch(cfg, device)
    rank, world = _init_distributed(dev)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    images = to_tensor(train_ds, dev)
    seeds, code = run_seeds(cfg), code_digest(name, "train")
    probe = models.build(name, shape=train_ds.shape, levels=train_ds.levels, **overrides)
    trainable = probe.trains
    fractions = sorted(set(cfg.train.fractions) | {1.0}) if trainable else [1.0]  # closed form: one
    workers, threads = parallel_runs(cfg, len(seeds), dev, world) if trainable else (1, torch.get_num_threads())
    with intra_op_threads(threads):  # each run's threads: what its key and the record's device name
        label = device_label(dev) + (f", {workers} runs side by side" if workers > 1 else "")
        runs_done, todo = {}, []
        for seed in seeds:  # a run's key reads the model's name and config: the probe's
            key = run_key(probe, images, dataclasses.replace(cfg.train, seed=seed), code, processes=world)
            done = {f: r for f in fractions if (r := _kept_run(checkpoint_path(name, seed, f), key)) is not None}
            runs_done[seed] = done
            if world == 1 and complete(done, fractions, cfg.train.patience):
                print(f"{name} seed {seed}: kept from an earlier identical run")
            else:
                todo.append((cfg, name, seed, str(dev), key, fractions, done, rank, world))
        metrics_dir = LIVE / name / "plots" / "metrics"
        if rank == 0:
            _clean(name, {checkpoint_path(name, s, f) for s in seeds for f in fractions}, seeds, metrics_dir)
            for job in todo:
                _prepare_run(cfg, name, job[2], job[4], fractions, job[6], world)
        live_ctx = (Live(dir=str(LIVE / name), dvcyaml=None, save_dvc_exp=False, report=None, resume=True)
                    if rank == 0 else contextlib.nullcontext())
        with live_ctx as live:
            if live is not None:
                live.log_params({"model": name, "seeds": seeds, "fractions": fractions,
                                 "data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train),
                                 "model_config": dataclasses.asdict(probe.cfg)})
            if len(todo) > 1 and workers > 1:
                print(f"{name}: {len(todo)} runs side by side in {min(workers, len(todo))} processes, "
                      f"{threads} thread(s) each", flush=True)
            send = functools.partial(_log_point, live) if live is not None else None
            trained = in_workers(_fit_run, todo, min(workers, len(todo)) or 1, threads, send)
            runs_done.update({job[2]: done for job, done in zip(todo, trained)})
    if rank != 0:  # rank 0 writes the outputs
        return {}
    runs = [run for seed in seeds for run in checkpoint_runs(name, seed, runs_done[seed])]
    record = {
        "model": name, "family": probe.family, "trains": probe.trains, "params": probe.num_params(),
        "dataset": cfg.data.name, "shape": list(train_ds.shape), "levels": train_ds.levels,
        "n_train": meta["n_train"], "n_val": meta["n_val"], "n_test": meta["n_test"],
        "budget_images": cfg.train.images, "batch_size": cfg.train.batch_size, "seeds": seeds,
        "fractions": fractions, "patience": cfg.train.patience, "processes": world,
        "device": label, "versions": versions(),
        "config": {"data": dataclasses.asdict(cfg.data), "train": dataclasses.asdict(cfg.train),
                   "model": dataclasses.asdict(probe.cfg)},
        "code_sha1": code, "runs": runs,
    }
    path = TRAIN_RECORDS / f"{name}.json"
    if not todo and path.is_file():
        old = read_json(path)
        if {k: v for k, v in old.items() if k != "stage_seconds"} == json.loads(json.dumps(record)):
            print(f"{name}: every run kept, record unchanged")
            return old
    write_record(path, record)
    selected = [r for r in runs if r["selected"]]
    write_json(METRICS / f"{name}.train.json", {  # compact keys: `dvc metrics show` fits a terminal
        "tflops": statistics.fmean(r["train_flops"] for r in selected) / 1e12,  # at the selected checkpoints
        "val_bpd": statistics.fmean(r["val_bpd"] for r in selected)})
    return record
