"""The common model interface (README, "Conventions"): evaluation code relies on this and nothing else."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn


# how a sampler is driven (`Model.samplers`): the pipeline's sampler grid reads these
ONE_SHOT = "one-shot"  # no steps and no options (e.g. a VAE's ancestral pass, a flow's inverse)
STEPS = "steps"        # `steps` network evaluations (sample.steps, sample.grid's step counts)
ADAPTIVE = "adaptive"  # an adaptive solver at rtol = atol (sample.ode_tolerances); NFE is counted


@dataclass(frozen=True)
class Estimator:
    """One bound a model reports (`Model.estimators`), as `evaluate.evaluate_bounds` runs it."""
    kind: str      # what the bound is: exact | elbo | iwae | dequantized | vlb | ode (or a plugin's own)
    label: str     # its name in the tables, unique among the model's estimators
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of `nll_terms`
    max_examples: int | None = None  # score only the first N test examples (a costly bound on a fixed subset)
    batch_size: int | None = None    # test examples per `nll_terms` call; None: evaluate.batch_size

    def __post_init__(self):
        if not self.kind or not self.label:
            raise ValueError(f"an estimator needs a kind and a label, got kind={self.kind!r}, label={self.label!r}")


class Model(nn.Module):
    """A likelihood-based generative model of integer images x in {0..L-1}^[C,H,W].

    Subclasses set `family`, a `Config` dataclass (their hyper-parameters with defaults),
    and implement `loss`, `nll_terms`, `sample` and `estimators`.
    """

    family: ClassVar[str] = ""
    Config: ClassVar[type]
    # what the model can do, declared (the pipeline reads these, never guesses):
    # the samplers `sample(sampler=...)` accepts and how each is driven (ONE_SHOT | STEPS | ADAPTIVE)
    samplers: ClassVar[dict[str, str]] = {"ancestral": ONE_SHOT}
    trains: ClassVar[bool] = True     # False: fitted in closed form by `init_from_data` (no steps, one checkpoint)
    precision_applies: ClassVar[bool] = True  # False: no network runs while sampling (sample.precision moot)
    # the attribute holding the module one forward call of which is one network evaluation
    # (what `nfe` counts; evaluate.draw_samples counts its calls); None: no network
    nfe_module_name: ClassVar[str | None] = None

    def __init__(self, shape: tuple[int, int, int], levels: int, cfg: Any):
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.shape = tuple(int(s) for s in shape)
        self.levels = int(levels)
        self.cfg = cfg
        self.name = ""  # set by models.build
        # samples `sample` could not compute (non-finite output, replaced by a constant image):
        # counted here by models whose sampler can fail; evaluate.draw_samples reports them
        self.nonfinite_samples = 0

    @property
    def dims(self) -> int:
        """D = C*H*W, the number of discrete dimensions per example."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def num_params(self) -> int:
        """Number of fitted scalars (trainable parameters, plus fitted buffers if any)."""
        return sum(p.numel() for p in self.parameters())

    def init_from_data(self, x: torch.Tensor) -> None:
        """Optional data-dependent initialisation from the training split (default: none)."""

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar training loss for a batch of integer images x [B,C,H,W]."""
        raise NotImplementedError

    def nll_terms(self, x: torch.Tensor, **estimator: Any) -> dict[str, torch.Tensor]:
        """Named per-example terms (nats, each [B]) whose sum is an upper bound on -log P(x)."""
        raise NotImplementedError

    def nll_terms_profile(self, x: torch.Tensor, **estimator: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
        """`nll_terms`, and where the bound is a sum over noise levels (diffusion), its profile:
        {"logsnr_lo", "logsnr_hi", "t_lo", "t_hi": [K] per stratum of time, "nats": [K, B] the
        strata's contributions, summing to the "diffusion" term}; None for other models."""
        return self.nll_terms(x, **estimator), None

    def nll_bound(self, x: torch.Tensor, **estimator: Any) -> torch.Tensor:
        """Upper bound on -log P(x) in nats per example, [B]."""
        terms = self.nll_terms(x, **estimator)
        return torch.stack(list(terms.values())).sum(0)

    def estimators(self, ecfg: Any) -> list[Estimator]:
        """The bounds this model reports under eval config `ecfg`; the first is the cheapest (the
        validation bound of the learning curve and of checkpoint selection)."""
        raise NotImplementedError

    def headline_estimator(self, ecfg: Any) -> Estimator:
        """The bound (one of `estimators(ecfg)`) this model's tables report: declared in advance
        by the protocol, never the minimum over noisy estimators (a winner's curse)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, sampler: str = "ancestral",
               steps: int | None = None, **options: Any) -> torch.Tensor:
        """n integer images [n,C,H,W] in {0..L-1}, drawn with `sampler` (one of `samplers`)
        in `steps` network evaluations where the sampler has steps (None: its default)."""
        raise NotImplementedError

    def nfe(self, sampler: str = "ancestral", steps: int | None = None, **options: Any) -> int:
        """Network evaluations per sample (per batch call) of `sample(sampler=, steps=)`: the
        forward calls of `nfe_module()` it makes (declared; draw_samples counts them)."""
        raise NotImplementedError

    def nfe_module(self) -> nn.Module | None:
        """The module one forward call of which is one network evaluation; None: no network."""
        return None if self.nfe_module_name is None else getattr(self, self.nfe_module_name)

    def sampler_label(self, sampler: str = "ancestral", steps: int | None = None, **options: Any) -> str:
        """What `sample(sampler=..., ...)` does, for the tables (e.g. 'ddim, eta=0, trailing')."""
        return sampler

    def check_sampler(self, sampler: str, steps: int | None, options: dict[str, Any]) -> None:
        """Clear errors for a sampler, steps or option this model cannot honour."""
        name = self.name or type(self).__name__
        if sampler not in self.samplers:
            raise ValueError(f"{name} cannot honour sampler '{sampler}'; it supports: {', '.join(self.samplers)}")
        how = self.samplers[sampler]
        if how != STEPS and steps is not None:
            why = "is adaptive: it takes rtol/atol, not steps" if how == ADAPTIVE else "takes no steps"
            raise ValueError(f"{name}: sampler '{sampler}' {why} (got steps={steps})")
        self._reject(options, name)

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dtype.is_floating_point or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name}: expected integer images [B, {self.shape}], "
                             f"got {x.dtype} {tuple(x.shape)}")

    @staticmethod
    def _reject(options: dict[str, Any], name: str) -> None:
        if options:
            raise ValueError(f"{name} does not support option(s) {sorted(options)}")
