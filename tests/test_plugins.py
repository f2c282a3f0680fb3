"""A model defined outside the package (examples/mixture.py) joins through one params entry,
`models.<name>.class`: it is built, trained, evaluated, sampled and reported like a built-in
model, its own source is part of its run key, and nothing in diffusion_models/ changes."""
import sys
import textwrap

import pandas as pd
import pytest
import torch
import yaml

from diffusion_models import models
from diffusion_models.pipeline import common
from helpers import copy_repo, shell_in, uniform

SPEC = "examples.mixture:MixtureOfProducts"


@pytest.fixture
def registry(monkeypatch):
    """The registry as the package defines it, restored after the test."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    return models._REGISTRY


def test_a_class_named_in_params_is_registered_and_built(registry):
    models.use_plugins({"vae": {}, "mixture": {"class": SPEC, "components": 3}})
    m = models.build("mixture", shape=(1, 8, 8), levels=17, **{"class": SPEC, "components": 3})
    assert type(m).__name__ == "MixtureOfProducts" and m.cfg.components == 3
    assert models.build("mixture", shape=(1, 8, 8), levels=17).num_params() == 80 * 64 * 17 + 80  # matched
    x = uniform(6)
    # the exact likelihood against a direct computation: log sum_k w_k prod_d pi_kd(x_d)
    log_pi, log_w = torch.log_softmax(m.logits, -1).double(), torch.log_softmax(m.mix_logits, 0).double()
    flat = x.reshape(6, -1)
    want = torch.stack([torch.logsumexp(torch.stack([log_w[k] + sum(log_pi[k, d, flat[b, d]] for d in range(64))
                                                     for k in range(3)]), 0) for b in range(6)])
    assert torch.allclose(-m.nll_terms(x)["nll"].double(), want, rtol=1e-5)
    assert m.sample(5, torch.Generator().manual_seed(0)).shape == (5, 1, 8, 8)


@pytest.mark.parametrize("spec, message", [
    ("examples.mixture", "expected 'package.module:Class'"),
    ("examples.no_such_module:Model", "cannot import module 'examples.no_such_module'"),
    ("examples.mixture:torch", "is not a subclass of diffusion_models.models.base.Model"),
])
def test_a_bad_class_is_a_clear_error(registry, spec, message):
    with pytest.raises(ValueError, match=message):
        models.use_plugins({"mine": {"class": spec}})


def test_a_plugin_cannot_take_a_built_in_name(registry):
    with pytest.raises(ValueError, match="'vae' already names diffusion_models.models.vae"):
        models.use_plugins({"vae": {"class": SPEC}})


def test_a_checkpoint_of_a_plugin_loads_in_a_process_that_never_read_params(registry, tmp_path):
    models.use_plugins({"mixture": {"class": SPEC}})
    m = models.build("mixture", shape=(1, 8, 8), levels=17, components=2)
    models.save(m, tmp_path / "m.pt")
    del registry["mixture"]
    loaded, state = models.load(tmp_path / "m.pt")
    assert state["class"] == SPEC and torch.equal(loaded.logits, m.logits)


def test_the_plugins_own_source_is_part_of_its_run_key(registry, tmp_path, monkeypatch):
    """Two versions of an outside module (same name, another line) give two code digests; the
    built-in models' digests do not move."""
    monkeypatch.syspath_prepend(str(tmp_path))
    source = textwrap.dedent('''
        from examples.mixture import MixtureOfProducts

        class Mine(MixtureOfProducts):
            family = "mine"
        ''')
    digests = []
    for version in ("", "# another version\n"):
        (tmp_path / "my_plugin.py").write_text(source + version)
        sys.modules.pop("my_plugin", None)
        registry.pop("mine", None)
        models.use_plugins({"mine": {"class": "my_plugin:Mine"}})
        assert [m for m, _ in models.outside_sources("mine")] == ["examples.mixture", "my_plugin"]
        digests.append((common.code_digest("mine", "train"), common.code_digest("vae", "train")))
    assert digests[0][0] != digests[1][0] and digests[0][1] == digests[1][1]
    sys.modules.pop("my_plugin", None)


@pytest.mark.slow
def test_an_outside_model_runs_through_the_real_pipeline(tmp_path):
    """A copy of the repository with one params entry added: dvc repro trains, evaluates and
    samples the example model and the tables carry its row; no file of diffusion_models/
    changed; an edit of the example's file reruns its runs and nobody else's."""
    from test_pipeline import TINY

    copy_repo(tmp_path)
    params = {**TINY, "models": {"baseline": {}, "mixture": {"class": SPEC, "components": 4}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh = shell_in(tmp_path)
    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    sh("dvc", "repro")
    comp = pd.read_csv(tmp_path / "results" / "comparison.csv").set_index("model")
    assert list(comp.index) == ["baseline", "mixture"] and comp.loc["mixture", "family"] == "mixture"
    row = comp.loc["mixture"]
    assert row["bpd_estimator"] == "exact" and 0 < row["bpd"] < 2 * comp.loc["baseline", "bpd"]
    assert row["fid"] > 0 and row["seeds"] == 2 and row["train_flops"] > 0
    assert row["sampler"].startswith("component, then pixels")
    assert "| mixture " in (tmp_path / "results" / "comparison.md").read_text()
    assert sh("git", "status", "--porcelain", "--", "diffusion_models") == ""  # the package untouched
    with open(tmp_path / "examples" / "mixture.py", "a") as f:
        f.write("# an edit of the outside model\n")
    out = sh("dvc", "repro")
    assert "trained mixture seed 0" in out and "baseline seed 0: kept" in out, out
