"""Speed benchmarks (pytest-benchmark), per registered model at the digits defaults.

    make bench                                   # saves JSON under results/benchmarks/
    .venv/bin/pytest-benchmark compare --storage results/benchmarks 0001 0002
"""
import pytest
import torch

from diffusion_models import models
from diffusion_models.config import EvalConfig, TrainConfig

SHAPE, LEVELS = (1, 8, 8), 17
BATCH = TrainConfig().batch_size


def _model(name):
    torch.manual_seed(0)
    m = models.build(name, shape=SHAPE, levels=LEVELS)
    m.init_from_data(torch.randint(0, LEVELS, (256, *SHAPE)))
    return m


# models fitted in closed form (the baseline) have no training step to time
TRAINABLE = [n for n in models.names() if any(p.requires_grad for p in _model(n).parameters())]


@pytest.mark.parametrize("name", TRAINABLE)
def test_train_step(benchmark, name):
    m = _model(name)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    x = torch.randint(0, LEVELS, (BATCH, *SHAPE))

    def step():
        opt.zero_grad(set_to_none=True)
        m.loss(x).backward()
        opt.step()

    benchmark.extra_info["images_per_call"] = BATCH
    benchmark(step)


@pytest.mark.parametrize("name", models.names())
def test_bound(benchmark, name):
    m = _model(name)
    label, kwargs = m.estimators(EvalConfig(iwae_k=100))[-1]
    x = torch.randint(0, LEVELS, (64, *SHAPE))
    benchmark.extra_info.update(estimator=label, examples_per_call=64)
    benchmark(lambda: m.nll_bound(x, **kwargs))
