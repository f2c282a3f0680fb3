"""The `evaluate@<model>` stage: every estimator of every run's checkpoints on the test split."""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from ..config import Config
from ..evaluate import evaluate_bounds
from ..runtime import device_label, versions, write_json
from .common import (EVAL_RECORDS, METRICS, PREPARED, RUN_FIELDS, code_digest, file_sha1, load_model, setup_torch,
                     split, to_tensor, train_record, unchanged, write_record)


def evaluate(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """The K-sample bounds (IWAE, the flow's) at their sweep K on every checkpoint of the grid (the
    frontier) and at their K on each run's selected one; the other estimators everywhere but the ODE
    (selected checkpoints only). The selected checkpoints also keep every test image's bound
    (for the paired comparisons of `compare`). The selection was fixed by the train stage on
    validation before this opens the test split. Nothing is recomputed when the checkpoints,
    the test split, the settings and the scoring code are those of the record."""
    dev = setup_torch(cfg, device)
    runs = train_record(cfg, name)["runs"]
    path = EVAL_RECORDS / f"{name}.json"
    inputs = {"checkpoints": {r["checkpoint"]: file_sha1(r["checkpoint"]) for r in runs},
              "test_sha1": file_sha1(PREPARED / "test.npz"), "eval_config": dataclasses.asdict(cfg.evaluate),
              "code_sha1": code_digest(name, "evaluate"), "device": device_label(dev)}
    if unchanged(path, inputs):
        print(f"evaluate {name}: checkpoints, data, settings and code unchanged; record kept")
        return {}
    x = to_tensor(split(cfg, "test"), dev)[:cfg.evaluate.n_test]  # n_test None: every test image
    out = []
    for run in runs:
        model = load_model(cfg, name, dev, run["checkpoint"])
        final = run["selected"]
        first = final and run["seed"] == runs[0]["seed"]
        ode = dataclasses.replace(cfg.evaluate.ode, enabled=final and cfg.evaluate.ode.enabled,  # selected only;
                                  check_tol=cfg.evaluate.ode.check_tol if first else None)  # check: first seed
        ecfg = dataclasses.replace(cfg.evaluate, ode=ode)
        cfgs = [ecfg.for_sweep()] + ([ecfg] if final else [])  # the K-sample bounds: sweep K; selected: K too
        bounds = evaluate_bounds(model, x, cfgs, per_example=final)
        out.append({**{k: run[k] for k in RUN_FIELDS}, "headline": model.headline_estimator(cfgs[-1]).label,
                    "sweep_estimator": model.headline_estimator(cfgs[0]).label, "bounds": bounds})
        for label, b in bounds.items():
            print(f"{name} seed {run['seed']} at {run['fraction']:.0%}: {label} {b['bpd']:.4f} ± "
                  f"{b['bpd_se']:.4f} bits/dim ({b['seconds']:.1f}s)", flush=True)
    record = {"model": name, "family": model.family, "dataset": cfg.data.name, "n_test": len(x),
              "runs": out, "device": device_label(dev), "eval_config": dataclasses.asdict(cfg.evaluate),
              "versions": versions(), "inputs": inputs}
    write_record(path, record)
    final = [r["bounds"][r["headline"]] for r in out if r["selected"]]
    write_json(METRICS / f"{name}.json", {  # the declared headline bound, mean over seeds of the selected checkpoints
        k: statistics.fmean(b[k] for b in final) for k in ("bpd", "bpd_se")})
    return record
