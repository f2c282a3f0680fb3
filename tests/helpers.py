"""Small shared test data (dataset shapes, seeded integer images) and a copy of the
repository to run the real DVC pipeline in."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_models import data

SHAPES = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256)}


def uniform(n, shape=(1, 8, 8), levels=17, seed=0):
    """n images with i.i.d. uniform pixels in {0..levels-1}."""
    return torch.randint(0, levels, (n, *shape), generator=torch.Generator().manual_seed(seed))


def digits_train():
    return torch.from_numpy(data.load("digits", "train").images).long()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Imported by a test module: its tests run on one intra-op thread (tiny tensors, where
    threads only add overhead and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


REPO = Path(__file__).resolve().parents[1]


def copy_repo(dst: Path) -> None:
    """The repository's tracked and not-ignored files (the main pipeline alone: no results/,
    no reference/ or fashion_mnist/) copied to dst."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file() and not f.startswith(("results/", "reference/", "fashion_mnist/")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def shell_in(root: Path):
    """sh(*cmd) -> its output, run in root with this interpreter's tools first on PATH (a
    failed command fails the test with its output)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}

    def sh(*cmd):
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr
    return sh
