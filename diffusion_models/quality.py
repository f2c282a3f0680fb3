"""Sample quality the standard way: FID, KID and precision/recall computed by torch-fidelity,
FID cross-checked with torchmetrics on the same features (README, "Sample quality").

Two feature extractors:
- `classifier`: a small CNN trained on the training split (fixed seed), registered with
  torch-fidelity; works offline and on 8x8 images. Its weights are a fixed, versioned file
  per dataset (`assets/classifier-<dataset>.pt`, SHA-256 recorded beside it and checked on
  load), so every machine computes FIDs in the same feature space;
- `inception-v3-compat`: torch-fidelity's Inception-v3 with the standard (TF-ported) weights,
  read from a local file only; without one it is reported as not available, never replaced.

Images enter the extractors as torch-fidelity expects them: uint8 [B, 3, H, W] in 0..255.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from .runtime import QualityError  # noqa: F401  (raised here; the CLI catches it without this module)
from .runtime import file_digest

CLASSIFIER = "classifier"
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset name
EXTRACTORS = (CLASSIFIER, INCEPTION)
FID_LAYER = {CLASSIFIER: "features", INCEPTION: "2048"}  # torch-fidelity's default FID/KID/PR layers


# ----------------------------------------------------------------------------- images


def to_rgb_uint8(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Integer images [B,C,H,W] in {0..L-1} -> uint8 [B,3,H,W] in 0..255 (grey repeated)."""
    if x.dtype.is_floating_point or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise QualityError(f"expected integer images [B, 1|3, H, W], got {x.dtype} {tuple(x.shape)}")
    if int(x.min()) < 0 or int(x.max()) > levels - 1:
        raise QualityError(f"image values outside 0..{levels - 1}: [{int(x.min())}, {int(x.max())}]")
    y = torch.round(x.double() * (255.0 / (levels - 1))).to(torch.uint8)
    return y.expand(-1, 3, -1, -1).contiguous() if y.shape[1] == 1 else y


class ImageSet(Dataset):
    """uint8 RGB images as a torch Dataset, the input type torch-fidelity takes."""

    def __init__(self, images: torch.Tensor, levels: int):
        self.images = to_rgb_uint8(images.cpu(), levels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ----------------------------------------------------------------------------- domain classifier


class DomainClassifier(nn.Module):
    """Small all-convolutional classifier; `features` (the penultimate layer, globally
    pooled) is what FID/KID/PR use. Takes uint8 RGB as torch-fidelity feeds it."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 32):
        super().__init__()
        self.in_channels, self.n_classes, self.width = in_channels, n_classes, width
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(8, 4 * w), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, n_classes)

    @property
    def num_features(self) -> int:
        return 4 * self.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, : self.in_channels].float() / 127.5 - 1.0  # grey data: the repeated channel once
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # logits
        return self.head(self.features(x))


@dataclass
class ClassifierResult:
    model: DomainClassifier
    test_accuracy: float
    train_accuracy: float
    seconds: float


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                     test_y: torch.Tensor, levels: int, *, epochs: int, width: int, lr: float,
                     batch_size: int, seed: int) -> ClassifierResult:
    """Fit the domain classifier (Adam, cosine decay, random 1-pixel shifts) with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xs, xt = to_rgb_uint8(train_x, levels), to_rgb_uint8(test_x, levels)
    model = DomainClassifier(train_x.shape[1], int(train_y.max()) + 1, width)
    steps = epochs * math.ceil(len(xs) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), batch_size):
            idx = perm[i: i + batch_size]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xs[idx], shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return ClassifierResult(model, accuracy(model, xt, test_y), accuracy(model, xs, train_y),
                            time.perf_counter() - start)


@torch.no_grad()
def accuracy(model: DomainClassifier, rgb: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """The classifier's accuracy on uint8 RGB images (`to_rgb_uint8`), in batches."""
    hits = sum((model(rgb[i: i + batch_size]).argmax(1) == labels[i: i + batch_size]).sum().item()
               for i in range(0, len(rgb), batch_size))
    return hits / len(rgb)


ASSETS = Path(__file__).resolve().parent / "assets"


def shipped_classifier(dataset: str) -> Path:
    return ASSETS / f"classifier-{dataset}.pt"


def classifier_weights(dataset: str, configured: str | None = None) -> tuple[Path, str]:
    """(weights file, SHA-256) of the FID classifier: `configured`, or the one shipped for
    `dataset`, whose SHA-256 must equal the one recorded beside it (a clear error otherwise)."""
    retrain = (f"`python -m diffusion_models train-classifier` (trains it on the prepared "
               f"training split of {dataset}; see README, 'Sample quality')")
    path = Path(configured) if configured else shipped_classifier(dataset)
    if not path.is_file():
        raise QualityError(f"no FID classifier weights at {path}: retrain them with {retrain}")
    digest = file_digest(path, "sha256")
    record = path.with_suffix(".json")
    if not configured or record.is_file():
        if not record.is_file():
            raise QualityError(f"{record} (the recorded SHA-256 of {path.name}) is missing: retrain with {retrain}")
        expected = json.loads(record.read_text())["sha256"]
        if digest != expected:
            raise QualityError(f"FID classifier {path} has SHA-256 {digest}, but {record.name} records "
                               f"{expected}: the file was modified or replaced; restore it or retrain with {retrain}")
    return path, digest


def extractor_label(extractor: str, digest: str | None) -> str:
    """How the tables name a feature space: the extractor with its weights' version."""
    return f"{extractor} (sha256 {digest[:12]})" if digest else extractor


def save_classifier(model: DomainClassifier, path: str | Path) -> None:
    from .runtime import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"in_channels": model.in_channels, "n_classes": model.n_classes,
                    "width": model.width, "state_dict": model.state_dict()}, tmp)


def load_classifier(path: str | Path) -> DomainClassifier:
    path = Path(path)
    if not path.is_file():
        raise QualityError(f"no domain classifier at {path}: run `python -m diffusion_models train-classifier`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model = DomainClassifier(blob["in_channels"], blob["n_classes"], blob["width"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise QualityError(f"domain classifier {path} is unreadable ({e}): restore it or retrain it with "
                           "`python -m diffusion_models train-classifier`") from e
    return model.eval()


@torch.no_grad()
def classifier_features(path: str | Path, images: torch.Tensor, levels: int, batch_size: int = 1024) -> torch.Tensor:
    """The classifier's FID features (its pooled penultimate layer) of integer images: [N, F]."""
    net = load_classifier(path)
    rgb = to_rgb_uint8(images.cpu(), levels)
    return torch.cat([net.features(rgb[i: i + batch_size]) for i in range(0, len(rgb), batch_size)])


class ClassifierExtractor(FeatureExtractorBase):
    """The domain classifier as a torch-fidelity feature extractor; its weights file is passed
    as `feature_extractor_weights_path` like Inception's."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise QualityError("the classifier extractor needs feature_extractor_weights_path")
        self.net = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):
        feats = self.net.features(x)
        out = {"features": feats, "logits": self.net.head(feats)}
        return tuple(out[k] for k in self.features_list)


if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER, ClassifierExtractor)


# ----------------------------------------------------------------------------- Inception weights


def inception_weights_path(configured: str | None) -> Path:
    """The configured file, or torch-fidelity's download cache (torch hub checkpoints dir)."""
    if configured:
        return Path(configured)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_status(configured: str | None) -> str | None:
    """None when the weights file exists, else the 'not available' message the tables show."""
    path = inception_weights_path(configured)
    if path.is_file():
        return None
    shown = str(path)
    home = str(Path.home())
    if shown.startswith(home + os.sep):  # results are shared: no user's home directory in them
        shown = "~" + shown[len(home):]
    return f"not available: no weights at {shown}"


# ----------------------------------------------------------------------------- metrics


def fidelity_kwargs(extractor: str, weights: Path, device: torch.device) -> dict[str, Any]:
    return {"feature_extractor": extractor, "feature_extractor_weights_path": str(weights),
            "cuda": device.type == "cuda", "save_cpu_ram": True, "verbose": False}


def reference_files(cache_root: Path, cache_name: str, extractor: str) -> list[Path]:
    """The files torch-fidelity's cache holds for the reference set (features, FID stats)."""
    layer = FID_LAYER[extractor]
    return [cache_root / f"{cache_name}-{extractor}-features-{layer}.pt",
            cache_root / f"{cache_name}-{extractor}-stat-fid-{layer}.pt"]


def reference_statistics(cache_root: Path, cache_name: str, extractor: str) -> dict[str, Any]:
    """The reference set's FID statistics (mu, sigma) from torch-fidelity's cache (the
    `features` stage writes them)."""
    path = reference_files(cache_root, cache_name, extractor)[1]
    if not path.is_file():
        raise QualityError(f"reference statistics missing ({path}): run the `features` stage")
    return torch.load(path, map_location="cpu", weights_only=False)


def fid_bootstrap(features: torch.Tensor, reference: dict[str, Any], replicates: int, seed: int) -> list[float]:
    """FIDs of `replicates` resamples (with replacement, generator seeded with `seed`) of the
    generated samples' FID features [n, d] against fixed reference statistics, by
    torch-fidelity's statistics and Fréchet distance: the spread of one run's FID over draws of
    its samples."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    gen = torch.Generator().manual_seed(seed)
    features = features.to(torch.from_numpy(reference["mu"]).dtype)  # as torch-fidelity's own FID computes it
    n = len(features)
    out = []
    for _ in range(replicates):
        stats = fid_features_to_statistics(features[torch.randint(0, n, (n,), generator=gen)])
        out.append(float(fid_statistics_to_metric(stats, reference, verbose=False)[KEY_METRIC_FID]))
    return out


def fidelity_metrics(samples: Dataset, reference: Dataset, *, extractor: str, weights: Path,
                     cache_root: Path, cache_name: str, device: torch.device, kid_subset_size: int,
                     kid_subsets: int, prc_neighborhood: int, seed: int,
                     write_cache: bool = False, samples_cache_name: str | None = None) -> dict[str, float]:
    """FID, KID (mean, std over subsets) and precision/recall of `samples` against `reference`
    with torch-fidelity. The reference's features and statistics come from (or, with
    write_cache, go to) torch-fidelity's cache under `cache_root` / `cache_name`; samples are
    cached only under an explicit `samples_cache_name`."""
    if not write_cache:
        missing = [str(p) for p in reference_files(cache_root, cache_name, extractor) if not p.is_file()]
        if missing:
            raise QualityError(f"reference statistics missing ({', '.join(missing)}): run the `features` stage")
    n = min(len(samples), len(reference))
    out = torch_fidelity.calculate_metrics(
        input1=samples, input2=reference, input1_cache_name=samples_cache_name,
        input2_cache_name=cache_name, cache_root=str(cache_root),
        cache=True, fid=True, kid=True, prc=True, kid_subset_size=min(kid_subset_size, n),
        kid_subsets=kid_subsets, prc_neighborhood=prc_neighborhood, rng_seed=seed,
        **fidelity_kwargs(extractor, weights, device))
    return {"fid": out["frechet_inception_distance"], "kid": out["kernel_inception_distance_mean"],
            "kid_std": out["kernel_inception_distance_std"], "precision": out["precision"],
            "recall": out["recall"]}


class _FeatureLayer(nn.Module):
    """One layer of a torch-fidelity extractor as a plain module (torchmetrics' custom feature)."""

    def __init__(self, extractor: FeatureExtractorBase, num_features: int):
        super().__init__()
        self.extractor, self.num_features = extractor, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[0]


def torchmetrics_fid_against(reference: Dataset, *, extractor: str, weights: Path, device: torch.device,
                             batch_size: int = 500) -> Callable[[Dataset], float]:
    """FID by torchmetrics on the same extractor and layer torch-fidelity uses, as a function of
    the sample set; the reference's features are extracted once."""
    from torch_fidelity.utils import create_feature_extractor
    from torchmetrics.image.fid import FrechetInceptionDistance

    fe = create_feature_extractor(extractor, [FID_LAYER[extractor]], **fidelity_kwargs(extractor, weights, device))
    dim = fe.net.num_features if extractor == CLASSIFIER else 2048
    fid = FrechetInceptionDistance(feature=_FeatureLayer(fe, dim), normalize=False,
                                   reset_real_features=False).to(device)

    def update(data: Dataset, real: bool) -> None:
        for i in range(0, len(data), batch_size):
            fid.update(torch.stack([data[j] for j in range(i, min(i + batch_size, len(data)))]).to(device), real)

    update(reference, True)

    def score(samples: Dataset) -> float:
        fid.reset()  # keeps the reference (real) features
        update(samples, False)
        return float(fid.compute())

    return score


def torchmetrics_fid(samples: Dataset, reference: Dataset, **kwargs: Any) -> float:
    return torchmetrics_fid_against(reference, **kwargs)(samples)


def sample_grid(images: torch.Tensor, levels: int, path: str | Path, nrow: int = 10, scale: int = 4) -> None:
    """A PNG grid of the first nrow^2 images, upscaled (nearest) by `scale`."""
    from torchvision.utils import save_image

    from .runtime import atomic_path

    x = to_rgb_uint8(images[: nrow * nrow].cpu(), levels).float() / 255.0
    x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    with atomic_path(path) as tmp:
        save_image(x, tmp, nrow=nrow, padding=2, pad_value=1.0, format="png")
