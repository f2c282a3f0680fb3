"""Model registry: `names()`, `build(name, shape=, levels=, **overrides)`, `save`, `load`.

A model defined outside the package joins through its params entry, `models.<name>.class:
"package.module:Class"` (`use_plugins`): the module is imported from the repository root (or
wherever Python finds it), and the class is registered under <name> like a built-in one."""
from __future__ import annotations

import dataclasses
import importlib
import sys
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


CLASS_KEY = "class"  # models.<name>.class: a model defined outside the package


def load_class(spec: str, where: str = "models") -> type[Model]:
    """The Model subclass that 'package.module:Class' names (imported on demand)."""
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise ValueError(f"{where}: expected 'package.module:Class', got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{where}: cannot import module '{module}' of {spec!r} ({e}); run from the "
                         "repository root, or install the package that holds it") from None
    cls = getattr(mod, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise ValueError(f"{where}: {spec!r} is not a subclass of diffusion_models.models.base.Model")
    return cls


def class_spec(cls: type[Model]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def use_plugins(model_params: dict[str, dict[str, Any]]) -> None:
    """Register every model of params that names its own class (`models.<name>.class`)."""
    for name, overrides in model_params.items():
        if CLASS_KEY not in (overrides or {}):
            continue
        cls = load_class(overrides[CLASS_KEY], where=f"models.{name}.{CLASS_KEY}")
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"models.{name}.{CLASS_KEY}: '{name}' already names "
                             f"{class_spec(_REGISTRY[name])}; give the model another name")
        _REGISTRY[name] = cls


def outside_sources(name: str) -> list[tuple[str, Path]]:
    """(module, file) of each class in model `name`'s hierarchy defined outside this package:
    the code a plugin's run key hashes beside the package's own files."""
    out = []
    for c in get(name).__mro__:
        if issubclass(c, Model) and not c.__module__.startswith(__package__.split(".")[0] + "."):
            file = getattr(sys.modules.get(c.__module__), "__file__", None)
            if file is None:
                raise ValueError(f"model '{name}': the module {c.__module__} of {c.__qualname__} has no "
                                 "source file, so its runs could not be told apart from another version's")
            out.append((c.__module__, Path(file)))
    return sorted(set(out))


def make_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The model's typed config with `overrides` applied (`class` aside); unknown keys name the model."""
    overrides = {k: v for k, v in (overrides or {}).items() if k != CLASS_KEY}
    return _config.from_dict(get(name).Config, overrides, prefix=f"models.{name}")


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
        "class": class_spec(type(model)),  # what `load` imports when `name` is not registered
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
    if state["name"] not in _REGISTRY and CLASS_KEY in state:
        use_plugins({state["name"]: {CLASS_KEY: state[CLASS_KEY]}})
    model = build(state["name"], shape=tuple(state["shape"]), levels=state["levels"], **state["config"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit model '{state['name']}' as the code now "
                         f"defines it (retrain it): {e}") from None
    return model, state


# Importing the model files registers them.
# imported in the tables' order: the registry's order is the default `models:` list (config.py)
from . import baseline, vae, hvae, diffusion, vdm, pixelcnn, flow  # noqa: E402,F401,I001
