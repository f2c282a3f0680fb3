"""The `sample@<model>` stage: samples of every run, their quality (FID, KID, precision/recall
against the training and the held-out test split), a memorisation check, and the sampler grid."""
from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from .. import data, models, quality
from ..config import Config
from ..evaluate import draw_samples
from ..models.base import ADAPTIVE, STEPS
from ..memorisation import memorisation, nearest
from ..runtime import device_label, versions, write_json
from .common import (GRIDS, METRICS, PREPARED, RUN_FIELDS, SAMPLE_RECORDS, REFERENCE_CACHE,
                     StageError, code_digest, file_sha1, load_model, setup_torch, split, train_record, unchanged,
                     write_record)
from .features import REFERENCES, cache_name, extractors, images_of

MEMORISATION_KEYS = ("close_frac", "heldout_close_frac", "copies", "heldout_copies", "median_ratio")


def _sampler_kwargs(cfg: Config, sampler: str, steps: int | None) -> dict[str, Any]:
    """`Model.sample` keyword arguments of one sampler setting."""
    kw: dict[str, Any] = {"sampler": sampler, "steps": steps, "spacing": cfg.sample.spacing}
    return kw | ({"eta": cfg.sample.eta} if sampler == "ddim" else {})


def _tolerance_kwargs(sampler: str, tol: float) -> dict[str, Any]:
    """An adaptive sampler (no steps) at rtol = atol = tol."""
    return {"sampler": sampler, "steps": None, "rtol": tol, "atol": tol}


def sampler_points(cfg: Config, model: models.Model) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(headline, grid): the headline sampler setting (`sample.sampler`/`steps`, or the model's
    own default when it has no such sampler), and the grid's settings the model supports, the
    headline first (kwargs for `draw_samples`: `Model.sample`'s and, for models whose sampling
    runs a network (`Model.precision_applies`), its `precision`, `sample.precision`; with
    `sample.precision_check`, the headline's twin in the other precision comes second). What
    runs is read from the model's declared samplers (`Model.samplers`): the step counts of
    `sample.grid` for each STEPS sampler, `sample.ode_tolerances` for each ADAPTIVE one. Settings
    only: nothing here measures the machine, so the same params give the same points everywhere."""
    declared = model.samplers
    known = {s for name in models.names()  # the registry's: built-in and plugin models
             for s, how in models.get(name).samplers.items() if how == STEPS}  # (ADAPTIVE: ode_tolerances)
    for where, sampler in [("sample.sampler", cfg.sample.sampler)] + [("sample.grid", g) for g in cfg.sample.grid]:
        if sampler not in known:
            raise StageError(f"{where}: unknown sampler '{sampler}'; the registered models' samplers with "
                             f"steps: {', '.join(sorted(known))}")
    headline = (_sampler_kwargs(cfg, cfg.sample.sampler, cfg.sample.steps)
                if declared.get(cfg.sample.sampler) == STEPS else {})
    grid = [headline]
    for sampler, steps in cfg.sample.grid.items():
        # a one-shot sampler takes no steps: a model's one-shot headline is its only point
        if declared.get(sampler) == STEPS:
            grid += [kw for k in steps if (kw := _sampler_kwargs(cfg, sampler, k)) != headline]
    grid += [_tolerance_kwargs(s, tol) for s, how in declared.items() if how == ADAPTIVE
             for tol in cfg.sample.ode_tolerances]
    if not model.precision_applies:  # no network: nothing runs in a precision
        return headline, grid
    # the network in `precision`, but an adaptive solver's error control in fp32
    precision = cfg.sample.precision
    grid = [{**kw, "precision": "fp32" if declared.get(kw.get("sampler")) == ADAPTIVE else precision}
            for kw in grid]
    if cfg.sample.precision_check:  # the headline in the other precision
        grid.insert(1, {**grid[0], "precision": "fp32" if precision == "bf16" else "bf16"})
    return grid[0], grid


class _Memorisation:
    """Nearest-training-image distances of samples against held-out images, in pixel space
    (images scaled to [0, 1]) and in the FID classifier's feature space."""

    def __init__(self, cfg: Config, classifier: Any):
        train, test = split(cfg, "train"), split(cfg, "test")
        self.levels, self.classifier = train.levels, classifier
        self.ref = {space: (self.vectors(torch.from_numpy(train.images).long(), space),
                            self.vectors(torch.from_numpy(test.images).long(), space))
                    for space in ("pixel", "features")}
        self.heldout_nn = {space: nearest(heldout, train)[0] for space, (train, heldout) in self.ref.items()}

    def vectors(self, images: torch.Tensor, space: str) -> torch.Tensor:
        if space == "pixel":
            return images.reshape(len(images), -1).double() / (self.levels - 1)
        return quality.classifier_features(self.classifier, images, self.levels).double()

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        out = {}
        for space, (train, heldout) in self.ref.items():
            stats = memorisation(self.vectors(images.cpu(), space), train, heldout,
                                 heldout_distances=self.heldout_nn[space])
            out.update({f"{space}_{k}": stats[k] for k in MEMORISATION_KEYS})
        return out


def sample(cfg: Config, name: str, device: str | None = None) -> dict[str, Any]:
    """For each run's selected checkpoint: n_samples from the headline sampler (timing the
    batches), then FID/KID/PR per extractor against both references, the FID's bootstrap
    replicates (classifier features, training reference) and the memorisation check; on the
    first seed's, the whole sampler grid and an image grid of the headline samples. Nothing is
    recomputed when checkpoints, references, settings and code are those of the record."""
    spaces = extractors(cfg)  # fail before sampling
    dev = setup_torch(cfg, device)
    runs = [r for r in train_record(cfg, name)["runs"] if r["selected"]]
    s = cfg.sample
    n = s.n_samples or data.spec(cfg.data.name).fid_samples
    path = SAMPLE_RECORDS / f"{name}.json"
    inputs = {"checkpoints": {r["checkpoint"]: file_sha1(r["checkpoint"]) for r in runs},
              "data_sha1": {r: file_sha1(PREPARED / f"{r}.npz") for r in REFERENCES},
              "extractors": {e: [p.name if p else None, st, d] for e, (p, st, d) in spaces.items()},
              "sample_config": dataclasses.asdict(s), "n_samples": n, "code_sha1": code_digest(name, "sample"),
              "device": device_label(dev)}
    if unchanged(path, inputs):
        print(f"sample {name}: checkpoints, references, settings and code unchanged; record kept")
        return {}
    print(f"sample {name}: the network in {s.precision} (sample.precision)", flush=True)
    refs = {r: images_of(cfg, r) for r in REFERENCES}
    memorised = _Memorisation(cfg, spaces[quality.CLASSIFIER][0])
    tm_fid = {e: quality.torchmetrics_fid_against(refs["train"], extractor=e, weights=p, device=dev)
              for e, (p, _, _) in spaces.items() if p is not None}  # reference features once
    results = []
    for run in runs:
        model = load_model(cfg, name, dev, run["checkpoint"])
        headline, grid = sampler_points(cfg, model)
        first = run["seed"] == runs[0]["seed"]
        for kw in grid if first else [headline]:
            gen = torch.Generator(device=dev).manual_seed(s.seed + run["seed"])
            images, speed = draw_samples(model, n, s.batch_size, gen, **kw)
            setting = {k: v for k, v in kw.items() if k != "precision"}
            label = model.sampler_label(**setting) + (f", {kw['precision']}" if "precision" in kw else "")
            if first and kw == headline:
                quality.sample_grid(images, model.levels, GRIDS / f"{name}.png")
            samples = quality.ImageSet(images, model.levels)
            rows = []
            for extractor, (weights, status, digest) in spaces.items():
                for ref in REFERENCES:
                    row: dict[str, Any] = {"extractor": extractor, "reference": ref, "status": status,
                                           "extractor_label": quality.extractor_label(extractor, digest)}
                    if weights is not None:
                        row.update(quality.fidelity_metrics(
                            samples, refs[ref], extractor=extractor, weights=weights, cache_root=REFERENCE_CACHE,
                            cache_name=cache_name(refs[ref], ref, digest), device=dev,
                            kid_subset_size=s.kid_subset_size, kid_subsets=s.kid_subsets,
                            prc_neighborhood=s.prc_neighborhood, seed=s.seed))
                        if ref == "train":  # the same FID by a second library
                            row["fid_torchmetrics"] = tm_fid[extractor](samples)
                            row["fid_rel_diff"] = abs(row["fid_torchmetrics"] - row["fid"]) / max(abs(row["fid"]), 1e-12)
                        if ref == "train" and extractor == quality.CLASSIFIER and kw == headline:
                            row["fid_bootstrap"] = quality.fid_bootstrap(
                                quality.classifier_features(weights, images, model.levels),
                                quality.reference_statistics(REFERENCE_CACHE, cache_name(refs[ref], ref, digest),
                                                             extractor), s.bootstrap, s.seed + run["seed"])
                    rows.append(row)
            point = {**{k: run[k] for k in RUN_FIELDS}, "sampler": kw.get("sampler", "ancestral"),
                     "steps": kw.get("steps"), "label": label, "precision": kw.get("precision", "fp32"),
                     "headline": kw == headline,
                     **speed, "metrics": rows, "memorisation": memorised(images)}
            results.append(point)
            main, held, mem = rows[0], rows[1], point["memorisation"]
            print(f"{name} seed {run['seed']} at {run['fraction']:.0%} [{point['label']}] NFE {speed['nfe']}, "
                  f"{speed['samples_per_sec']:.1f} samples/s (batch {s.batch_size}); " + (
                      f"FID {main['fid']:.4f} train / {held['fid']:.4f} test (torchmetrics "
                      f"{main['fid_torchmetrics']:.4f}), KID {main['kid']:.5f}, P {main['precision']:.3f} "
                      f"R {main['recall']:.3f}; copies {mem['pixel_copies']:.3f}, closer than 5% of held-out "
                      f"{mem['pixel_close_frac']:.3f} (pixels) {mem['features_close_frac']:.3f} (features)"
                      if main["status"] == "ok" else main["status"]), flush=True)
    record = {"model": name, "dataset": cfg.data.name, "n_samples": n,
              "references": {r: f"{r} split ({len(refs[r])} images)" for r in REFERENCES}, "points": results,
              "device": device_label(dev), "sample_config": dataclasses.asdict(s),
              "precision": s.precision,
              "versions": versions(),
              "inputs": inputs}
    write_record(path, record)
    final = [p for p in results if p["headline"]]
    fid = lambda p, ref: next(r["fid"] for r in p["metrics"] if r["reference"] == ref)  # noqa: E731
    write_json(METRICS / f"{name}.sample.json", {  # mean over seeds: headline sampler, selected checkpoints
        "fid": statistics.fmean(fid(p, "train") for p in final),
        "samples_s": statistics.fmean(p["samples_per_sec"] for p in final)})
    return record
