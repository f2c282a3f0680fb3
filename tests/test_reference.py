"""The reference configuration (reference/): its pipeline is the main one rebased, its params
a valid configuration of the same models trained further."""
from pathlib import Path

import pytest
import yaml

from diffusion_models.config import load_params

REPO = Path(__file__).resolve().parents[1]


def _rebased(spec):
    """The main pipeline's stage spec as reference/dvc.yaml must hold it: package paths seen from
    reference/, everything else (its own data/ and results/) unchanged."""
    if isinstance(spec, dict):
        return {k: ([("../" + d if d.startswith(("diffusion_models", "examples")) else d) for d in v] if k == "deps"
                    else _rebased(v)) for k, v in spec.items()}
    return spec


@pytest.mark.parametrize("folder", ["reference", "fashion_mnist"])  # the named configurations
def test_reference_pipeline_is_the_main_pipeline_rebased(folder):
    main = yaml.safe_load((REPO / "dvc.yaml").read_text())
    ref = yaml.safe_load((REPO / folder / "dvc.yaml").read_text())
    assert ref == {"stages": {name: _rebased(spec) for name, spec in main["stages"].items()}}


def test_reference_params_train_the_same_models_further():
    main, ref = load_params(REPO / "params.yaml"), load_params(REPO / "reference" / "params.yaml")
    assert list(ref.models) == list(main.models) and ref.models == main.models
    assert ref.train.images >= 3 * main.train.images and ref.train.seeds >= 2
    assert len(ref.train.fractions) > len(main.train.fractions)  # the frontier spans more of the curve
    assert ref.evaluate.ode.check_tol is not None  # the ODE solver check runs here
    assert ref.data == main.data and ref.train.batch_size == main.train.batch_size


def test_ddpm_probe_beyond_the_cap_turns_at_the_reference_selection():
    """README: ddpm, still falling at the reference's 1.2M cap, turns right after it. The probe
    (reference/probes/ddpm-2.4M: the reference's params at a 2.4M cap, patience off) is a second
    run of the same seeds: up to 1.2M it must reproduce the reference's validation bounds exactly,
    and every seed's best validation bound (and test VLB) must be the reference's selection."""
    import json
    probe_dir, cap = REPO / "reference" / "probes" / "ddpm-2.4M", 1_200_000
    ref = {(r["seed"], r["images_seen"]): r for r in json.loads((REPO / "reference/results/train/ddpm.json").read_text())["runs"]}
    probe = {(r["seed"], r["images_seen"]): r for f in sorted(probe_dir.glob("train-*.json"))
             for r in json.loads(f.read_text())["runs"]}
    tests = {(r["seed"], r["images_seen"]): r["bounds"][r["sweep_estimator"]]["bpd"] for f in sorted(probe_dir.glob("eval-*.json"))
             for r in json.loads(f.read_text())["runs"]}
    seeds = sorted({s for s, _ in ref})
    assert sorted({s for s, _ in probe}) == seeds == [0, 1, 2]
    for s in seeds:
        assert [n for (t, n), r in ref.items() if t == s and r["selected"]] == [cap]  # selected at the cap
        shared = [n for (t, n) in ref if t == s]
        assert all(probe[s, n]["val_bpd"] == ref[s, n]["val_bpd"] for n in shared)  # the same run up to the cap
        beyond = sorted(n for (t, n) in probe if t == s and n > cap)
        assert len(beyond) == 2 and beyond[-1] == 2 * cap
        runs = {n: r for (t, n), r in probe.items() if t == s}
        assert min(runs, key=lambda n: runs[n]["val_bpd"]) == cap
        assert min((n for (t, n) in tests if t == s and n >= cap), key=lambda n: tests[s, n]) == cap
