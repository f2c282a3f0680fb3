from pathlib import Path

import pytest

from diffusion_models import models
from diffusion_models.config import Config, ConfigError, load_params, parse

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load():
    cfg = load_params(REPO / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.name == "digits"
    assert set(cfg.models) >= {"baseline", "vae"}


def _leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_the_defaults_in_code_are_what_the_default_run_uses():
    """params.yaml resolves to `Config()` (its models aside; train.seeds: the dataset default),
    and each setting it writes is one dvc.yaml tracks by name, at its default: no hidden override."""
    import dataclasses

    import yaml

    from diffusion_models import data

    cfg, default = load_params(REPO / "params.yaml"), Config()
    assert cfg.train.seeds == data.spec(cfg.data.name).seeds
    for section in ("data", "train", "evaluate", "features", "sample", "compare"):
        got = dataclasses.asdict(getattr(cfg, section))
        want = dataclasses.asdict(getattr(default, section))
        if section == "train":
            got["seeds"] = want["seeds"]
        assert got == want, section
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc = (REPO / "dvc.yaml").read_text()
    for key, _ in _leaves({k: v for k, v in raw.items() if k != "models"}):
        assert f"- {key}\n" in dvc, f"params.yaml sets {key}, which no stage tracks by name: put it in config.py"


def test_defaults_fill_missing_keys():
    cfg = parse({"train": {"images": 1000}})
    assert cfg.train.images == 1000
    assert cfg.train.batch_size == Config().train.batch_size
    assert cfg.evaluate.iwae_k == Config().evaluate.iwae_k


@pytest.mark.parametrize("raw, key", [
    ({"trian": {}}, "trian"),
    ({"train": {"imgaes": 10}}, "train.imgaes"),
    ({"evaluate": {"iwae": 5}}, "evaluate.iwae"),
])
def test_unknown_key_named(raw, key):
    with pytest.raises(ConfigError, match=rf"unknown param key '{key}'"):
        parse(raw)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"images": "many"}}, "train.images"),
    ({"train": {"images": 1.5}}, "train.images"),
    ({"train": {"images": True}}, "train.images"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"data": {"name": 3}}, "data.name"),
    ({"models": ["vae"]}, "models"),
])
def test_wrong_type_named(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse(raw)


@pytest.mark.parametrize("key, value", [("images", -1), ("images", 0), ("batch_size", 0), ("lr", -1e-3)])
def test_non_positive_budget_refused(key, value):
    with pytest.raises(ConfigError, match=rf"train\.{key} must be > 0"):
        parse({"train": {key: value}})


def test_int_accepted_for_float():
    assert parse({"train": {"lr": 1}}).train.lr == 1.0


def test_model_override_unknown_key_names_model_and_key():
    with pytest.raises(ConfigError, match=r"unknown param key 'models\.vae\.latent'"):
        models.build("vae", shape=(1, 8, 8), levels=17, latent=3)


def test_load_params_errors_name_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  images: -5\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: train\.images must be > 0"):
        load_params(p)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)


@pytest.mark.parametrize("raw, message", [
    ({"sample": {"precision": "fp16"}}, "sample.precision must be 'fp32' or 'bf16'"),
    ({"train": {"workers": -1}}, r"train\.workers must be >= 0"),
    ({"evaluate": {"ode": {"batch_size": 0}}}, r"evaluate\.ode\.batch_size must be > 0"),
])
def test_sampling_precision_workers_and_ode_batch_checked(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)
