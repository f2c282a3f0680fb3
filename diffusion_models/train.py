"""Training under a budget counted in images seen (as NVlabs/edm counts kimg)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .config import TrainConfig
from .models.base import Model


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss)."""


@dataclass
class TrainResult:
    images_seen: int
    steps: int
    train_seconds: float
    images_per_sec: float
    flops_per_image: float  # measured forward+backward FLOPs of one training image
    train_flops: float      # flops_per_image * images_seen
    final_loss: float       # mean loss over the last logging window

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def batch_sizes(images: int, batch_size: int) -> list[int]:
    """Split the budget into batches so that exactly `images` images are seen."""
    full, rest = divmod(images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def measure_flops(model: Model, x: torch.Tensor) -> float:
    """FLOPs of one training step (loss forward + backward) on batch x, per image."""
    if not any(p.requires_grad for p in model.parameters()):
        return 0.0
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(x).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def train(model: Model, images: torch.Tensor, cfg: TrainConfig, *,
          log: Callable[[int, int, float], None] | None = None, progress: bool = True) -> TrainResult:
    """Fit `model` on integer images [N,C,H,W] (already on the model's device).

    `log(step, images_seen, loss)` is called every `cfg.log_every` steps (DVCLive hook).
    Models without trainable parameters are only fitted by `init_from_data`.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model.init_from_data(images)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # fitted in closed form: log its training loss once, as step 0
        loss = float(model.loss(images).item())
        if log is not None:
            log(0, 0, loss)
        return TrainResult(0, 0, 0.0, 0.0, 0.0, 0.0, loss)

    n = len(images)
    sizes = batch_sizes(cfg.images, cfg.batch_size)
    flops_per_image = measure_flops(model, images[: min(cfg.batch_size, n)])
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    model.train()
    perm, cursor = torch.randperm(n, generator=gen), 0
    window: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.images, unit="img", disable=not progress, desc=f"train {model.name}",
               mininterval=2.0)
    seen = 0
    for step, bs in enumerate(sizes, 1):
        if cursor + bs > n:  # new epoch: reshuffle
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor: cursor + bs].to(images.device)
        cursor += bs
        loss = model.loss(images[idx])
        value = loss.item()  # the step's one host sync: NaN check and the logged mean
        if not math.isfinite(value):
            raise TrainingError(f"{model.name}: non-finite loss {value} at step {step} "
                                f"({seen} images seen); no checkpoint written for this run")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        seen += bs
        window.append(value)
        bar.update(bs)
        if step % cfg.log_every == 0 or step == len(sizes):
            mean_loss = sum(window) / len(window)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if log is not None:
                log(step, seen, mean_loss)
            final_loss, window = mean_loss, []
    bar.close()
    if ema is not None:  # evaluate (and save) the averaged weights
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(seen, len(sizes), seconds, seen / seconds, flops_per_image,
                       flops_per_image * seen, final_loss)
