"""Typed configuration: every default lives here, params.yaml holds only what differs.

`load_params(path)` turns params.yaml into a `Config`; an unknown key, a wrong type or a
negative budget is an error that names the offending key (as pythae / StudioGAN do).
Model-specific overrides (`models.<name>`) are checked against the model's own config
class when the model is built (see `models.build`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that cannot be turned into a valid config."""


@dataclass
class DataConfig:
    name: str = "digits"          # digits | mnist | cifar10
    root: str = "data/raw"        # where the real datasets' native files live (data.dvc)
    split_seed: int = 0           # seed of the fixed train/validation split
    test_size: int = 297          # digits test split size (UCI digits: 1797 = 1500 + 297; the
                                  # test images are fixed: drawn with seed 0 whatever split_seed)
    val_size: int | None = None   # validation images carved from the training images; None: the
                                  # dataset's default (digits 300, mnist/cifar10 5000)


@dataclass
class TrainConfig:
    images: int = 50_000          # the cap: at most this many training images seen, the same for
                                  # every model (a run may stop earlier: `patience`)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0        # max global grad norm; 0 disables
    ema: float = 0.0              # decay of an exponential moving average of the weights,
                                  # evaluated instead of the raw weights; 0 disables
    seed: int = 0                 # the first seed; the runs use seed, seed+1, ..., seed+seeds-1
    seeds: int | None = None      # training runs per model; None: the dataset's default
                                  # (digits 3, mnist/cifar10 1)
    fractions: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
                                  # the checkpoint grid (log-spaced fractions of the cap `images`;
                                  # 1.0 is always included): each is scored on validation, the best
                                  # is the run's selected checkpoint, every one is evaluated on test
                                  # (the compute frontier)
    patience: int = 2             # early stopping: stop when the validation bound has not improved
                                  # for this many grid checkpoints in a row (0: train to the cap)
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 0              # torch intra-op threads; 0 = library default
    workers: int = 0              # CPU: training runs (seeds) side by side, in this many processes
                                  # sharing the threads; 0 = one per run (at most twice the
                                  # threads), 1 = in turn in the stage's process
    log_every: int = 50           # steps between DVCLive points
    val_every: int = 200          # steps between validation bounds on the learning curve (0: off)
    val_t_samples: int = 10       # diffusion: strata of t of that validation bound (cheap, unbiased)
    checkpoint_every: int = 200   # steps between saved resume states (results/resume/)


@dataclass
class ODEEvalConfig:
    """The probability-flow ODE bound of the diffusion models (ode.py), on the selected checkpoints."""
    enabled: bool = True          # compute it on every run's selected checkpoint (the grid: VLB only)
    method: str = "dopri5"        # torchdiffeq adaptive solver
    rtol: float = 1e-3            # dopri5's tolerances
    atol: float = 1e-3
    check_tol: float | None = None  # the solver check: on the first seed's selected checkpoint, the first
    check_n: int = 16             # check_n images' bound solved again at rtol = atol = check_tol with the
                                  # same draws; their difference is the solver's error (None: no check;
                                  # the reference configuration runs it at 1e-5)
    divergence: str = "hutchinson"  # hutchinson | exact | auto (exact up to D = 64, and for k > 1)
    probes: int = 1               # Hutchinson: Rademacher probes per example
    dequantization: str = "tn"    # tn (truncated normal, i-DODE) | uniform
    k: int = 1                    # dequantization (importance) samples per example (k > 1: exact
                                  # divergence only; Hutchinson noise inside the log-mean-exp biases it)
    n_test: int | None = 100      # the first n test images (a fixed subset); None: all of them
    batch_size: int = 128         # test images per adaptive solve (a batch shares its steps and NFE;
                                  # small network passes are overhead-bound on a CPU: fewer, larger
                                  # solves are faster)


@dataclass
class EvalConfig:
    iwae_k: int = 500             # K of IWAE-K (the VAEs) on the selected checkpoints
    sweep_iwae_k: int = 100       # K of IWAE-K on every checkpoint of the grid (the frontier; the
                                  # selected one too), so that one estimator spans the curve
    dequant_k: int = 500          # K of the flow's K-sample dequantized bound on the selected checkpoints
    sweep_dequant_k: int = 100    # ... on every checkpoint of the grid (the frontier)
    t_samples: int = 50           # diffusion: stratified times per example for the Monte Carlo
                                  # estimate of the sum over t (0 = exact sum over all T terms)
    t_spacing: str = "log"        # discrete-time strata of t: 'log' (the lowest t summed exactly,
                                  # geometric widths above) | 'uniform' (equal widths)
    n_test: int | None = None     # the first n test images (a fixed subset) for every estimator;
                                  # None: all of them (digits: 297; the real datasets: 10,000)
    batch_size: int = 64          # test examples per bound evaluation batch
    chunk: int = 2048             # max (examples x samples) per network pass (its speed:
                                  # benchmarks, test_bound_chunk)
    seed: int = 0
    ode: ODEEvalConfig = field(default_factory=ODEEvalConfig)

    def for_sweep(self) -> "EvalConfig":
        """The estimators of the checkpoint grid (the frontier): the K-sample bounds at their sweep K."""
        return dataclasses.replace(self, iwae_k=self.sweep_iwae_k, dequant_k=self.sweep_dequant_k)


@dataclass
class FeaturesConfig:
    """The `features` stage (FID feature spaces, reference statistics) and `train-classifier`."""
    epochs: int = 40              # FID classifier training epochs (train-classifier)
    width: int = 32               # classifier channels (features: 4 x width after global pooling)
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    classifier: str | None = None  # FID classifier weights; None: the file shipped for the dataset
                                  # (diffusion_models/assets/classifier-<dataset>.pt, SHA-256 checked)
    inception_weights: str | None = None  # Inception-v3 weights file (torch-fidelity format);
                                  # None: torch-fidelity's download cache under the torch hub dir
    require_inception: bool = False  # missing Inception weights: an error, not "not available"


@dataclass
class SampleConfig:
    """The `sample@<model>` stage: samples of every run and their quality; the sampler grid."""
    n_samples: int | None = None  # None: the dataset's default (digits 2000, mnist/cifar10 10000)
    sampler: str = "dpm++2m"      # the headline sampler, run on every seed and sweep checkpoint;
    steps: int = 20               # a model without it uses its own default (VAE, HVAE: ancestral)
    batch_size: int = 256         # samples per sampler call; also the batch of the speed figures
                                  # (first full batch = warm-up, median over the other full ones)
    seed: int = 0                 # sample noise of training seed s: seed + s
    # sampler grid, run on the first seed's selected checkpoint: sampler -> step counts; a model is
    # run at the entries it supports (diffusion: ancestral (respaced), ddim, dpm++2m)
    grid: dict[str, list[int]] = field(default_factory=lambda: {"ddim": [10], "dpm++2m": [10]})
    ode_tolerances: list[float] = field(default_factory=list)
                                  # the adaptive samplers in the grid (diffusion: the ODE): dopri5 at
                                  # rtol = atol = each of these; NFE is what it used
    precision: str = "fp32"       # the network's precision while sampling, the same on every machine:
                                  # fp32 | bf16 (autocast; the sampler's own arithmetic stays fp32)
    precision_check: bool = False  # also run the headline setting in the other precision on the first
                                  # seed's selected checkpoint (same noise): results/precision_check.csv
    bootstrap: int = 100          # FID bootstrap replicates per run (generated samples resampled with
                                  # replacement, classifier features): compare's intervals and tests
    eta: float = 0.0              # DDIM eta (0: deterministic DDIM, 1: DDPM-like noise)
    spacing: str = "trailing"     # timestep spacing of ddim / dpm++2m: trailing | leading
    kid_subset_size: int = 1000   # KID: subset size (capped at the smaller set) and subsets
    kid_subsets: int = 20         # (torch-fidelity's default: 100)
    prc_neighborhood: int = 3     # precision/recall: k of the k-NN manifold estimate


@dataclass
class CompareConfig:
    """The `compare` stage."""
    allow_unmatched: bool = False  # write tables for unmatched runs (budget or size), with a
                                   # `matched` warning column, instead of refusing


def _registered_models() -> dict[str, dict[str, Any]]:
    """The package's own models, in the registry's order (plugins join through params)."""
    from . import models  # the registry imports this module: imported when a Config is made

    return {name: {} for name in models.names() if models.get(name).__module__.startswith(__package__ + ".")}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    # model name -> overrides of that model's own config class (checked at build time); default:
    # every built-in model (the registry, models.names(): the one list of them)
    models: dict[str, dict[str, Any]] = field(default_factory=_registered_models)


_POSITIVE = {"train.images", "train.batch_size", "train.lr", "train.log_every", "train.checkpoint_every",
             "train.val_t_samples",
             "evaluate.iwae_k", "evaluate.sweep_iwae_k", "evaluate.dequant_k", "evaluate.sweep_dequant_k",
             "evaluate.batch_size", "evaluate.n_test", "evaluate.chunk",
             "data.test_size", "features.epochs", "features.width", "features.lr", "features.batch_size",
             "sample.steps", "sample.batch_size", "sample.kid_subset_size", "sample.kid_subsets",
             "sample.prc_neighborhood", "sample.bootstrap"}
_NON_NEGATIVE = {"train.weight_decay", "train.grad_clip", "train.threads", "train.workers", "train.ema", "train.val_every",
                 "train.patience",
                 "evaluate.t_samples", "sample.eta"}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return value converted to tp (int -> float allowed), or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (it,) = typing.get_args(tp)[:1]
        return [_check_type(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool or tp is int:
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type, raw: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(
            f"unknown param key '{prefix + '.' if prefix else ''}{unknown[0]}'{where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _check_ranges(cfg: Config) -> None:
    for key in sorted(_POSITIVE | _NON_NEGATIVE):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:  # an optional setting left unset (e.g. evaluate.n_test: all)
            continue
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value!r}")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if cfg.sample.n_samples is not None and cfg.sample.n_samples < 2:
        raise ConfigError(f"sample.n_samples must be >= 2 (or null for the dataset default), "
                          f"got {cfg.sample.n_samples!r}")
    if any(not tol > 0 for tol in cfg.sample.ode_tolerances):
        raise ConfigError(f"sample.ode_tolerances must be > 0, got {cfg.sample.ode_tolerances!r}")
    for sampler, steps in cfg.sample.grid.items():
        if not steps or any(k < 1 for k in steps):
            raise ConfigError(f"sample.grid.{sampler}: expected a non-empty list of step counts >= 1, got {steps!r}")
    if cfg.train.seeds is not None and cfg.train.seeds < 1:
        raise ConfigError(f"train.seeds must be >= 1 (or null for the dataset default), got {cfg.train.seeds!r}")
    if not all(0 < f <= 1 for f in cfg.train.fractions):
        raise ConfigError(f"train.fractions must lie in (0, 1], got {cfg.train.fractions!r}")
    o = cfg.evaluate.ode
    for key in ("rtol", "atol", "probes", "k", "batch_size", "check_n") + (("n_test",) if o.n_test is not None else ()) \
            + (("check_tol",) if o.check_tol is not None else ()):
        if not getattr(o, key) > 0:
            raise ConfigError(f"evaluate.ode.{key} must be > 0, got {getattr(o, key)!r}")
    choices = {"divergence": ("auto", "exact", "hutchinson"), "dequantization": ("tn", "uniform"),
               "method": ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")}
    for key, allowed in choices.items():
        if getattr(o, key) not in allowed:
            raise ConfigError(f"evaluate.ode.{key} must be one of {', '.join(allowed)}, got {getattr(o, key)!r}")
    if o.k > 1 and o.divergence == "hutchinson":
        raise ConfigError(f"evaluate.ode.k = {o.k} needs evaluate.ode.divergence exact (or auto): Hutchinson "
                          "noise inside the K-sample log-mean-exp biases the bound low, below -log P(x)")
    if cfg.sample.precision not in ("fp32", "bf16"):
        raise ConfigError(f"sample.precision must be 'fp32' or 'bf16', got {cfg.sample.precision!r}")
    if cfg.evaluate.t_spacing not in ("log", "uniform"):
        raise ConfigError(f"evaluate.t_spacing must be 'log' or 'uniform', got {cfg.evaluate.t_spacing!r}")
    if not 0 <= cfg.sample.eta <= 1:
        raise ConfigError(f"sample.eta must lie in [0, 1] (0: DDIM, 1: DDPM-like noise), got {cfg.sample.eta!r}")
    if cfg.train.ema >= 1:
        raise ConfigError(f"train.ema must be < 1, got {cfg.train.ema!r}")
    if not cfg.models:
        raise ConfigError("models: at least one model must be listed")


def parse(raw: dict[str, Any] | None) -> Config:
    cfg = from_dict(Config, raw)
    _check_ranges(cfg)
    return cfg


def load_params(path: str | Path = "params.yaml") -> Config:
    """Read params.yaml into a validated `Config`; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
