"""One shortened training run, the job of test_speed.test_parallel_runs: in a module of its
own so that a spawned worker imports only this (not the benchmark module and its models)."""
import torch

from diffusion_models import models
from diffusion_models.config import TrainConfig
from diffusion_models.train import train


def fit_steps(name: str, seed: int, steps: int, send=None) -> float:
    """`steps` training steps (as `train.train` runs them) of a fresh model at the digits
    shape and the default batch, on random digits-like data; returns the training loop's
    seconds (without the process start-up and model set-up)."""
    torch.manual_seed(seed)
    m = models.build(name, shape=(1, 8, 8), levels=17)
    x = torch.randint(0, 17, (1024, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    m.init_from_data(x)
    cfg = TrainConfig(seed=seed, val_every=0)
    cfg.images = cfg.batch_size * steps
    return train(m, x, cfg, progress=False).train_seconds
