"""Training under a budget counted in images seen (as NVlabs/edm counts kimg)."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from .config import TrainConfig
from .models.base import Model
from .runtime import Progress, atomic_path, device_label, digest


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


@dataclass
class Resume:
    """Where and how often to keep the state needed to resume this run after a crash or kill,
    and the run's key (`run_key`), which a saved state must match to be resumed."""
    path: Path
    every: int               # steps between saved states
    key: dict[str, Any]


# TrainConfig fields that do not change what one run computes or reports (the device and
# threads are in the key as resolved; seeds choose which runs exist). The checkpoint grid
# (`fractions`), the validation bound that selects among them (`val_t_samples`) and `patience`
# decide where a run stops and which checkpoint is selected: they are in the key.
_NOT_IN_KEY = ("device", "threads", "workers", "checkpoint_every", "seeds", "val_every")


def run_key(model: Model, images: torch.Tensor, cfg: TrainConfig, code: str, processes: int = 1) -> dict[str, Any]:
    """What a resume state or a kept checkpoint must match: the model, its config, the
    training config (seed included), the data, `code` (a digest of the source files that
    define this model and its training, nothing else), torch's version, and where it ran
    (device with thread count, data-parallel processes), which its timings and rounding
    depend on."""
    train = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    return {"model": model.name, "config": asdict(model.cfg), "train": train,
            "data_sha1": digest(images.cpu().numpy().tobytes()),
            "code_sha1": code, "torch": str(torch.__version__),
            "device": device_label(images.device), "processes": processes}


def _rng_states(gen: torch.Generator) -> dict[str, Any]:
    out = {"gen": gen.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(gen: torch.Generator, states: dict[str, Any]) -> None:
    # RNG states are CPU ByteTensors, whatever device the resume state was loaded onto
    gen.set_state(states["gen"].cpu())
    torch.set_rng_state(states["cpu"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


class _Loss(torch.nn.Module):
    """`model.loss` as a forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.loss(x)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _global_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world
    return value


def batch_sizes(images: int, batch_size: int) -> list[int]:
    """Split the budget into batches so that exactly `images` images are seen."""
    full, rest = divmod(images, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def measure_flops(model: Model, x: torch.Tensor) -> float:
    """FLOPs of one training step (loss forward + backward) on batch x, per image; measured on
    a copy of the model with the RNG states restored, so it changes nothing of the run."""
    if not model.trains:
        return 0.0
    from torch.utils.flop_counter import FlopCounterMode  # here: it imports Triton where installed (0.2 s)

    probe = copy.deepcopy(model)
    counter = FlopCounterMode(display=False)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), counter:
        probe.loss(x).backward()
    return counter.get_total_flops() / len(x)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step where the device has it (CPU, CUDA): on the CPU
    PyTorch's default is a Python loop over the parameters (benchmarks: test_train_step_settings)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Scale gradients to a global norm of at most max_norm (0: off), one multi-tensor kernel."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def snapshot_steps(cfg: TrainConfig, fractions: list[float]) -> dict[int, float]:
    """{step: fraction}: the first step at which at least fraction x the budget has been seen
    (exact arithmetic on the fraction as written). Fractions that would share a step, or a
    fraction below 1 that only the last step reaches, are an error naming them."""
    sizes = batch_sizes(cfg.images, cfg.batch_size)
    seen = torch.tensor(sizes).cumsum(0)
    out: dict[int, float] = {}
    for f in sorted(set(fractions)):
        step = int(torch.searchsorted(seen, math.ceil(Fraction(str(f)) * cfg.images))) + 1
        if step in out or (f < 1 and step == len(sizes)):
            other = out.get(step, 1.0)
            raise TrainingError(f"train.fractions {other} and {f} both fall on step {step} of {len(sizes)} "
                                f"({cfg.images} images at batch {cfg.batch_size}): use fewer or wider-spaced "
                                "fractions, or a larger budget")
        out[step] = f
    return out


def should_stop(scores: list[float], patience: int) -> bool:
    """Early stopping on the checkpoints' validation bounds so far (in training order): True
    when none of the last `patience` improved on the best before them (patience 0: never)."""
    if patience <= 0 or len(scores) <= patience:
        return False
    return min(scores[-patience:]) >= min(scores[:-patience])


def select_checkpoint(scores: list[float]) -> int:
    """The index of the checkpoint with the best (lowest) validation bound; the earliest of equals."""
    return min(range(len(scores)), key=lambda i: (scores[i], i))


def _validate(model: Model, validate: Callable[[Model], float]) -> float:
    """validate(model) in eval mode without gradients, leaving every RNG state as it was."""
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            return validate(model)
        finally:
            model.train()


def train(model: Model, images: torch.Tensor, cfg: TrainConfig, *,
          log: Callable[[int, int, dict[str, float]], None] | None = None, progress: bool = True,
          resume: Resume | None = None,
          snapshot: tuple[set[int], Callable[[dict[str, torch.Tensor], TrainResult, float], bool]] | None = None,
          validate: Callable[[Model], float] | None = None,
          ) -> TrainResult:
    """Fit `model` on integer images [N,C,H,W] (already on the model's device).

    `log(step, images_seen, {"train/loss": ..., "val/bpd": ...})` is called every
    `cfg.log_every` steps (DVCLive hook), with `validate(model)` (a bound on held-out data,
    bits/dim; run with the RNG states restored, so it changes nothing of the run) every
    `cfg.val_every` steps and at the end. `progress`: a tqdm bar, or when False and standard
    error is no terminal, a line every few seconds (runtime.Progress).
    A model that declares it does not train (`Model.trains`) is only fitted by `init_from_data`. With `resume`,
    the full training state (weights, optimizer, EMA, data order, RNG states, counters) is
    saved atomically every `resume.every` steps, and a run that finds a state of the same
    model, config and data continues from it, ending bit-identical to an uninterrupted run.
    The state file is removed when training completes. `snapshot` = (steps, save): at each of
    those steps (the last included), save(weights, result so far, validation bound), where
    `weights` are those evaluated (the averaged weights with EMA) and the bound is
    `validate(those weights)` (NaN without `validate`): the checkpoints of the selection grid.
    When save returns True training stops there (early stopping): the result is that step's.
    The learning curve's validation bound scores the same weights.
    """
    rank, world = _distributed()
    if world > 1 and resume is not None:
        raise TrainingError("resuming is single-process only; run data-parallel training without it")
    gen = torch.Generator().manual_seed(cfg.seed)  # the data order: the same on every rank
    torch.manual_seed(cfg.seed + rank)             # model noise: a different stream per rank
    model.init_from_data(images)
    params = [p for p in model.parameters() if p.requires_grad]
    if not model.trains:  # fitted in closed form: log its training loss once, as step 0
        loss = float(model.loss(images).item())
        if log is not None:
            log(0, 0, {"train/loss": loss, **({"val/bpd": _validate(model, validate)} if validate else {})})
        return TrainResult(0, 0, 0.0, 0.0, 0.0, 0.0, loss)

    n = len(images)
    sizes = batch_sizes(cfg.images, cfg.batch_size)
    flops_per_image = measure_flops(model, images[: min(cfg.batch_size, n)])
    opt = make_optimizer(params, cfg)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
           if cfg.ema > 0 else None)
    perm, cursor = torch.randperm(n, generator=gen), 0
    window: list[float] = []
    seen, done, elapsed, final_loss = 0, 0, 0.0, math.nan
    saved = None  # step of the last resume state on disk
    if resume is not None and resume.path.is_file():
        state = torch.load(resume.path, map_location=images.device, weights_only=True)
        if state.get("key") == resume.key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            _set_rng_states(gen, state["rng"])
            perm, cursor, window = state["perm"], state["cursor"], list(state["window"])
            seen, done, elapsed, final_loss = state["seen"], state["step"], state["elapsed"], state["final_loss"]
            saved = done
            print(f"{model.name}: resuming from step {done} ({seen} images seen) of {len(sizes)}")
    step_loss = model.loss
    if world > 1:  # DDP averages the gradients of the ranks' shards of each global batch
        step_loss = torch.nn.parallel.DistributedDataParallel(_Loss(model))
    model.train()
    start = time.perf_counter()
    bar = Progress(cfg.images, f"train {model.name} seed {cfg.seed}", initial=seen, unit="img", enabled=progress)
    for step in range(done + 1, len(sizes) + 1):
        bs = sizes[step - 1]
        if cursor + bs > n:  # new epoch: reshuffle
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor: cursor + bs].to(images.device)
        cursor += bs
        loss = step_loss(images[idx.tensor_split(world)[rank]] if world > 1 else images[idx])
        value = _global_mean(loss.detach(), world).item()  # one host sync: NaN check, logged mean
        if not math.isfinite(value):
            kept = (f"the last good state (step {saved}) is kept in {resume.path}" if saved is not None
                    else "no checkpoint written for this run")
            raise TrainingError(f"{model.name}: non-finite loss {value} at step {step} "
                                f"({seen} images seen); {kept}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        seen, done = seen + bs, step
        window.append(value)
        bar.update(bs)
        last = step == len(sizes)
        point = {}
        if step % cfg.log_every == 0 or last:
            mean_loss = sum(window) / len(window)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            point["train/loss"] = mean_loss
            final_loss, window = mean_loss, []
        scored = ema.module if ema is not None else model  # the weights that are evaluated
        if validate is not None and rank == 0 and cfg.val_every > 0 and (step % cfg.val_every == 0 or last):
            point["val/bpd"] = _validate(scored, validate)
        if log is not None and point:
            log(step, seen, point)
        if snapshot is not None and step in snapshot[0]:
            secs = elapsed + time.perf_counter() - start
            score = (point["val/bpd"] if "val/bpd" in point else
                     _validate(scored, validate) if validate is not None else math.nan)
            stop = snapshot[1](scored.state_dict(), TrainResult(seen, step, secs, seen / secs, flops_per_image,
                                                                flops_per_image * seen, final_loss), score)
            if stop and not last:
                print(f"{model.name} seed {cfg.seed}: stopped early at step {step} ({seen} images seen): "
                      "the validation bound has not improved for train.patience checkpoints", flush=True)
                break
        if resume is not None and step % resume.every == 0 and step < len(sizes):
            state = {"key": resume.key, "model": model.state_dict(), "opt": opt.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "rng": _rng_states(gen),
                     "perm": perm, "cursor": cursor, "window": window, "seen": seen, "step": step,
                     "elapsed": elapsed + time.perf_counter() - start, "final_loss": final_loss}
            with atomic_path(resume.path) as tmp:
                torch.save(state, tmp)
            saved = step
    bar.close()
    if ema is not None:  # evaluate (and save) the averaged weights
        model.load_state_dict(ema.module.state_dict())
    model.eval()
    seconds = elapsed + time.perf_counter() - start
    if resume is not None:
        resume.path.unlink(missing_ok=True)
    return TrainResult(seen, done, seconds, seen / seconds, flops_per_image,
                       flops_per_image * seen, final_loss)
