"""The `features` stage (FID feature spaces and reference statistics of the training and the
held-out test split) and the `train-classifier` command that makes the shipped classifier."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .. import quality
from ..config import Config
from ..runtime import digest as content_digest
from ..runtime import device_label, file_digest, processor, versions, write_json, write_text
from .common import FEATURES, GRIDS, METRICS, REFERENCE_CACHE, StageError, setup_torch, split, write_record

REFERENCES = ("train", "test")  # the standard reference, and held-out images beside it


def extractors(cfg: Config) -> dict[str, tuple[Path | None, str, str | None]]:
    """Per feature extractor: (weights file or None, 'ok' or why not available, SHA-256 of the
    weights). The classifier must exist and match its recorded hash; Inception is optional
    unless features.require_inception."""
    path, digest = quality.classifier_weights(cfg.data.name, cfg.features.classifier)
    out: dict[str, tuple[Path | None, str, str | None]] = {quality.CLASSIFIER: (path, "ok", digest)}
    missing = quality.inception_status(cfg.features.inception_weights)
    if missing and cfg.features.require_inception:
        raise StageError(f"Inception-v3 {missing} (features.require_inception is true; set "
                         "features.inception_weights to a torch-fidelity weights file)")
    inception = quality.inception_weights_path(cfg.features.inception_weights)
    out[quality.INCEPTION] = (None, missing, None) if missing else (inception, "ok", None)
    return out


def cache_name(images: quality.ImageSet, reference: str, digest: str | None) -> str:
    """torch-fidelity cache name of a reference set's features in one extractor's weights,
    keyed by the images' content (SHA-1 of their uint8 RGB pixels and shape) and the weights'
    SHA-256: torch-fidelity reuses a cache it finds under that name, so another split (another
    data.split_seed or val_size) or another feature space can never read stale statistics."""
    pixels = images.images.contiguous().numpy()
    content = content_digest(repr(pixels.shape).encode(), pixels.tobytes())
    return f"{reference}-{content[:16]}" + (f"-{digest[:12]}" if digest else "")


def images_of(cfg: Config, name: str) -> quality.ImageSet:
    ds = split(cfg, name)
    return quality.ImageSet(torch.from_numpy(ds.images).long(), ds.levels)


def features(cfg: Config, device: str | None = None) -> dict[str, Any]:
    """Check the shipped classifier; cache each available extractor's features and FID
    statistics of the training and the test split (torch-fidelity's cache)."""
    spaces = extractors(cfg)  # fail before any work
    dev = setup_torch(cfg, device)
    test = split(cfg, "test")
    net = quality.load_classifier(spaces[quality.CLASSIFIER][0])
    accuracy = quality.accuracy(net, quality.to_rgb_uint8(torch.from_numpy(test.images).long(), test.levels),
                                torch.from_numpy(test.labels).long())
    status = {}
    for name, (path, st, digest) in spaces.items():
        status[name] = {"status": st, "sha256": digest, "label": quality.extractor_label(name, digest)}
        if path is None:
            print(f"{name}: {st}")
            continue
        for ref in REFERENCES:
            images = images_of(cfg, ref)
            cname = cache_name(images, ref, digest)
            self_fid = quality.fidelity_metrics(  # fills the cache; one feature pass (input1 reads input2's)
                images, images, extractor=name, weights=path, cache_root=REFERENCE_CACHE, cache_name=cname,
                device=dev, kid_subset_size=cfg.sample.kid_subset_size, kid_subsets=2,
                prc_neighborhood=cfg.sample.prc_neighborhood, seed=0, write_cache=True,
                samples_cache_name=cname)["fid"]
            print(f"reference {cname} with {name}: {len(images)} images, self-FID {self_fid:.2e}")
    train = split(cfg, "train")
    quality.sample_grid(torch.from_numpy(train.images).long(), train.levels, GRIDS / "real.png")
    record = {"dataset": cfg.data.name, "references": {r: f"{r} split ({len(images_of(cfg, r))} images)"
                                                       for r in REFERENCES},
              "classifier": {"file": str(spaces[quality.CLASSIFIER][0].name), "test_accuracy": accuracy,
                             "n_test": len(test)},
              "extractors": status, "device": device_label(dev), "versions": versions()}
    write_record(FEATURES / "features.json", record)
    write_json(METRICS / "features.json", {"clf_acc": accuracy})  # the FID classifier's test accuracy
    print(f"FID classifier {status[quality.CLASSIFIER]['label']}: test accuracy {accuracy:.4f}")
    return record


def train_classifier(cfg: Config, out: str | None = None) -> dict[str, Any]:
    """Train the FID classifier on the prepared training split (fixed seed features.seed),
    report its validation accuracy, and write it with its SHA-256 record (default: the file
    shipped for data.name). Retraining reproduces the accuracy, not the bits: commit the new
    file and record to change the feature space (every FID computed before then changes)."""
    f = cfg.features
    train, val = split(cfg, "train"), split(cfg, "val")
    res = quality.train_classifier(
        torch.from_numpy(train.images).long(), torch.from_numpy(train.labels).long(),
        torch.from_numpy(val.images).long(), torch.from_numpy(val.labels).long(), train.levels,
        epochs=f.epochs, width=f.width, lr=f.lr, batch_size=f.batch_size, seed=f.seed)
    path = Path(out) if out else quality.shipped_classifier(cfg.data.name)
    quality.save_classifier(res.model, path)
    record = {"sha256": file_digest(path, "sha256"), "dataset": cfg.data.name, "val_accuracy": res.test_accuracy,
              "train_accuracy": res.train_accuracy, "n_train": len(train), "n_val": len(val),
              "config": dataclasses.asdict(f) | {"classifier": None, "inception_weights": None},
              "command": "python -m diffusion_models train-classifier", "processor": processor(),
              "versions": versions()}
    write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    print(f"FID classifier for {cfg.data.name}: validation accuracy {res.test_accuracy:.4f} "
          f"({res.seconds:.1f}s); wrote {path} (sha256 {record['sha256']})")
    return record
