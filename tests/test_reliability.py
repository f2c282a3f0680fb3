"""Faults: a real SIGKILL mid-training then a resume that ends bit-identical; NaN keeps the
last good state."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from diffusion_models import models
from diffusion_models.config import TrainConfig
from diffusion_models.train import Resume, TrainingError, run_key, train
from test_train_report import _Linear

REPO = Path(__file__).resolve().parents[1]
PARAMS = {
    "data": {"name": "digits"},
    "train": {"images": 64 * 1000, "batch_size": 64, "seed": 3, "seeds": 1, "fractions": [0.5, 1.0],
              "device": "cpu", "threads": 1, "log_every": 10, "checkpoint_every": 25},
    "models": {"vae": {"width": 8}},
}


def _cli(workdir: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "diffusion_models", *args], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(workdir: Path, *args: str) -> str:
    p = _cli(workdir, *args)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def _setup(workdir: Path) -> Path:
    workdir.mkdir()
    (workdir / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _run(workdir, "prepare")
    return workdir


def _interrupt_at_step(monkeypatch, step: int):
    """Make training raise KeyboardInterrupt inside training step `step` (before its update);
    returns the function that undoes it."""
    import diffusion_models.train as train_mod

    clip, calls = train_mod.clip_gradients, [0]

    def interrupt(*args):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        clip(*args)

    monkeypatch.setattr(train_mod, "clip_gradients", interrupt)
    return lambda: monkeypatch.setattr(train_mod, "clip_gradients", clip)


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_resumes_bit_identically(tmp_path):
    ref = _setup(tmp_path / "uninterrupted")
    _run(ref, "train", "vae")

    work = _setup(tmp_path / "killed")
    state = work / "results" / "resume" / "vae" / "seed3.pt"
    p = _cli(work, "train", "vae")
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # let it run past the saved state
    assert p.poll() is None, "training finished before it could be killed: raise train.images"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    final = Path("results") / "checkpoints" / "vae" / "seed3-100pct.pt"
    assert state.is_file() and not (work / final).exists()

    out = _run(work, "train", "vae")
    assert "vae: resuming from step" in out
    assert not state.exists()  # removed once training completed
    for ckpt in (final, final.with_name("seed3-50pct.pt")):  # the budget sweep's checkpoint too
        a = torch.load(ref / ckpt, weights_only=True)
        b = torch.load(work / ckpt, weights_only=True)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k in a["state_dict"]:
            assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
        assert a["train"]["final_loss"] == b["train"]["final_loss"]
    # the learning curve has each step once, as in the uninterrupted run
    loss_tsv = Path("results") / "live" / "vae" / "plots" / "metrics" / "seed3" / "train" / "loss.tsv"
    curve = lambda d: (d / loss_tsv).read_text()  # noqa: E731
    assert curve(ref) == curve(work)


@pytest.mark.slow
def test_dvc_repro_after_the_training_process_is_killed_resumes(tmp_path):
    """The stage's training process dies (SIGKILL, as the OOM killer does); DVC marks the stage
    failed, and the next `dvc repro` resumes from the saved state."""
    from helpers import copy_repo

    copy_repo(tmp_path)
    params = {**PARAMS, "train": {**PARAMS["train"], "images": 64 * 2000}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"],
                ["dvc", "repro", "prepare"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    dvc = subprocess.Popen(["dvc", "repro", "train@vae"], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = tmp_path / "results" / "resume" / "vae" / "seed3.pt"
    deadline = time.time() + 300
    while not state.is_file() and time.time() < deadline and dvc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    # DVC runs the command through $SHELL (or /bin/sh), which may or may not exec it: kill the
    # python process itself, wherever it is below dvc. Killing only a shell would leave the
    # trainer running on as an orphan.
    trainer = [c for c in psutil.Process(dvc.pid).children(recursive=True)
               if c.cmdline()[1:4] == ["-m", "diffusion_models", "train"]]
    assert len(trainer) == 1, "the training process was not found (finished already? raise train.images)"
    trainer[0].kill()
    trainer[0].wait(timeout=30)
    out, _ = dvc.communicate(timeout=120)
    assert dvc.returncode != 0 and ("exited with -9" in out or "exited with 137" in out), out
    again = subprocess.run(["dvc", "repro", "train@vae"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "vae: resuming from step" in again.stdout
    record = yaml.safe_load((tmp_path / "results" / "train" / "vae.json").read_text())
    assert [r["images_seen"] for r in record["runs"]] == [64 * 1000, 64 * 2000] and not state.exists()


def test_a_resume_state_of_another_run_is_discarded_with_its_curve(tmp_path, monkeypatch):
    """A run stopped mid-way leaves its state; then the params change (here lr): the new run
    starts from step 1, and its learning curve has each step once, all from the new run."""
    from diffusion_models.cli import main

    monkeypatch.chdir(tmp_path)
    params = {**PARAMS, "train": {**PARAMS["train"], "images": 64 * 40, "checkpoint_every": 5, "log_every": 1,
                                  "fractions": [1.0]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare"]) == 0
    restore = _interrupt_at_step(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "vae"])
    assert torch.load(tmp_path / "results" / "resume" / "vae" / "seed3.pt", weights_only=True)["step"] == 10
    restore()
    params["train"]["lr"] = 1e-4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["train", "vae"]) == 0
    tsv = tmp_path / "results" / "live" / "vae" / "plots" / "metrics" / "seed3" / "train" / "loss.tsv"
    steps = [int(line.split("\t")[0]) for line in tsv.read_text().splitlines()[1:]]
    assert steps == list(range(1, 41))


def test_nan_stops_training_and_keeps_the_last_good_state(tmp_path):
    m = _Linear((1, 4, 4), 17, _Linear.Config(nan_at=8))  # NaN from step 9 (call 9)
    m.name = "lin"
    x = torch.randint(0, 17, (64, 1, 4, 4))
    path = tmp_path / "lin.resume.pt"
    with pytest.raises(TrainingError, match=rf"lin: non-finite loss nan at step 9 .*last good state \(step 6\) "
                                            rf"is kept in {path}"):
        cfg = TrainConfig(images=64 * 20, batch_size=8, log_every=1)
        train(m, x, cfg, progress=False, resume=Resume(path, every=3, key=run_key(m, x, cfg, code="test")))
    state = torch.load(path, weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_resume_state_of_another_config_is_ignored(tmp_path):
    x = torch.randint(0, 17, (64, 1, 8, 8))
    path = tmp_path / "vae.resume.pt"

    def fit(seed, images):
        torch.manual_seed(0)
        m = models.build("vae", shape=(1, 8, 8), levels=17, width=8)
        cfg = TrainConfig(images=images, batch_size=16, seed=seed)
        return train(m, x, cfg, progress=False, resume=Resume(path, every=2, key=run_key(m, x, cfg, code="test"))), m

    torch.save({"key": {"model": "other"}}, path)  # a stale state from some other run
    r, m = fit(1, 64)
    assert r.steps == 4 and not path.exists()


def _small(name):
    """Every registered model, small: few diffusion steps, narrow nets, a short HVAE warm-up."""
    fields = models.get(name).Config.__dataclass_fields__
    kw = {k: v for k, v in {"T": 40, "width": 8, "kl_warmup": 6}.items() if k in fields}
    return models.build(name, shape=(1, 8, 8), levels=17, **kw)


@pytest.mark.parametrize("name", [n for n in models.names() if any(p.requires_grad for p in _small(n).parameters())])
def test_an_interrupted_run_resumes_bit_identically_for_every_model(name, tmp_path, monkeypatch):
    """Stop training after step 9 (a resume state was saved at step 8), resume from that state:
    the weights, optimizer state and every training counter (the HVAE's KL warm-up included)
    end bit-identical to an uninterrupted run."""

    x = torch.randint(0, 17, (96, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(images=16 * 14, batch_size=16, log_every=1, val_every=0)

    def fit(path):
        torch.manual_seed(0)
        m = _small(name)
        return train(m, x, cfg, progress=False, resume=Resume(path, every=4, key=run_key(m, x, cfg, code="t"))), m

    ref, ref_model = fit(tmp_path / "ref.pt")
    restore = _interrupt_at_step(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 8
    restore()
    res, model = fit(tmp_path / "state.pt")
    assert res.steps == ref.steps == 14 and res.final_loss == ref.final_loss
    a, b = ref_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if name == "hvae":
        assert int(model.steps) == 14  # the warm-up counter continued, not restarted
