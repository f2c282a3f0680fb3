"""The README's commands run as written: every command in its ```bash blocks is either run
here (offline, on a small copy of the pipeline) or listed below with the reason it is not."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline import TINY, _copy_repo

REPO = Path(__file__).resolve().parents[1]

# commands that are run, in order, in a small copy of the repository after `dvc repro`
RUN = [
    "dvc metrics show",
    "dvc plots show",
    "dvc exp run -S '+models.vae.latent_dim=32'",
    "dvc exp show --only-changed",
    "python -m diffusion_models select vae latent_dim=8,16,32",
    "dvc exp run --queue -S train.seed=10",
    "dvc exp run --queue -S train.seeds=1 -S train.images=600000",
    "dvc queue status",
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m diffusion_models train vae",
]
# commands not run here, each with the reason
NOT_RUN = {
    "make repro": "the pipeline itself: tests/test_pipeline.py runs `dvc repro` on a small copy",
    "make test": "this test suite (CI runs it as .ci/run)",
    "make bench": "benchmarks take minutes; their JSON is in results/benchmarks/",
    ".venv/bin/pytest-benchmark compare --storage results/benchmarks 0001 0002": "needs two saved benchmark runs",
    "python -m diffusion_models fetch mnist": "downloads (network)",
    "dvc commit data.dvc": "needs the fetched real dataset",
    "python -m diffusion_models --params mnist.yaml prepare": "needs the fetched real dataset",
    "python -m diffusion_models --params mnist.yaml train-classifier": "needs the fetched real dataset",
    "dvc exp run -S data.name=mnist -S train.device=cuda -S train.images=6000000 -S train.seeds=3":
        "needs the real dataset and a GPU",
    "dvc exp run -S data.name=cifar10 -S train.device=cuda -S train.images=20000000 "
    "-S features.require_inception=true": "needs the real dataset, a GPU and the Inception weights",
    "dvc queue start --jobs 2": "starts background workers that run whole experiments (checked by hand)",
    "torchrun --standalone --nproc_per_node 4 -m diffusion_models train ddpm --device cuda": "needs 4 GPUs",
}


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuation lines joined, comments cut."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmd = " ".join(line.split("#", 1)[0].split())  # drop the comment, fold spaces
            if cmd:
                out.append(cmd)
    return out


def test_every_readme_command_is_run_here_or_listed_with_a_reason():
    commands = readme_commands()
    unlisted = [c for c in commands if c not in RUN and c not in NOT_RUN]
    assert not unlisted, f"README commands neither run by this test nor listed in NOT_RUN: {unlisted}"
    stale = [c for c in RUN + list(NOT_RUN) if c not in commands]
    assert not stale, f"listed here but no longer in the README: {stale}"


@pytest.mark.slow
def test_the_offline_readme_commands_run_as_written(tmp_path):
    _copy_repo(tmp_path)
    params = {**TINY, "models": {"baseline": {}, "vae": {"width": 8}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}

    def sh(cmd: str) -> str:
        r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    for cmd in ("git init -q", "git add -A", "git commit -qm copy", "dvc repro", "git add -A",
                "git commit -qm results"):
        sh(cmd)
    outputs = {cmd: sh(cmd) for cmd in RUN}
    assert "latent_dim" in outputs["dvc exp show --only-changed"]
    assert "Queued" in outputs["dvc queue status"] or "queued" in outputs["dvc queue status"].lower()
    assert (tmp_path / "results" / "selection" / "vae-latent_dim.csv").is_file()
