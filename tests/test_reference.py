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
