"""Model registry: `names()`, `build(name, shape=, levels=, **overrides)`, `save`, `load`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from .. import config as _config
from ..runtime import atomic_path, versions
from .base import Model

_REGISTRY: dict[str, type[Model]] = {}


def register(name: str) -> Callable[[type[Model]], type[Model]]:
    def deco(cls: type[Model]) -> type[Model]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = cls
        return cls
    return deco


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> type[Model]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered models: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The model's typed config with `overrides` applied; unknown keys name the model."""
    return _config.from_dict(get(name).Config, overrides or {}, prefix=f"models.{name}")


def build(name: str, *, shape: tuple[int, int, int], levels: int, **overrides: Any) -> Model:
    cls = get(name)
    model = cls(tuple(shape), int(levels), make_config(name, overrides))
    model.name = name
    return model


def save(model: Model, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
         **extra: Any) -> None:
    """Checkpoint: weights (the model's, or `state_dict`) plus everything needed to rebuild
    the model (atomic write)."""
    weights = model.state_dict() if state_dict is None else state_dict
    state = {
        "name": model.name,
        "shape": list(model.shape),
        "levels": model.levels,
        "config": dataclasses.asdict(model.cfg),
        "state_dict": {k: v.detach().cpu() for k, v in weights.items()},
        "versions": versions(),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Model, dict[str, Any]]:
    """Rebuild a model from a checkpoint (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing checkpoint: {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = build(state["name"], shape=tuple(state["shape"]), levels=state["levels"], **state["config"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit model '{state['name']}' as the code now "
                         f"defines it (retrain it): {e}") from None
    return model, state


# Importing the model files registers them.
from . import baseline, diffusion, flow, hvae, pixelcnn, vae, vdm  # noqa: E402,F401
