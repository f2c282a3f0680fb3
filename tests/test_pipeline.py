"""Stage entry points: clear errors on bad input, and the whole DVC pipeline end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from diffusion_models.cli import main
from helpers import copy_repo, shell_in

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"name": "digits"},
    "train": {"images": 256, "batch_size": 64, "seed": 0, "seeds": 2, "fractions": [0.5, 1.0], "device": "cpu",
              "val_every": 2},
    "evaluate": {"iwae_k": 4, "sweep_iwae_k": 2, "n_test": 200, "ode": {"rtol": 1e-2, "atol": 1e-2, "n_test": 16, "check_tol": 1e-3}},
    "features": {"inception_weights": None, "require_inception": False},
    "sample": {"n_samples": 64, "batch_size": 16, "kid_subset_size": 32, "prc_neighborhood": 3,
               "sampler": "dpm++2m", "steps": 4, "grid": {"ancestral": [40], "ddim": [2], "dpm++2m": [2]},
               "ode_tolerances": [1e-2], "precision": "bf16", "precision_check": True,  # bf16 when asked:
               "bootstrap": 20},                                                        # on every machine
    "compare": {"allow_unmatched": True},  # tiny models of different sizes
    "models": {"baseline": {}, "vae": {"width": 8}, "ddpm": {"T": 40, "width": 8}},
}


def run_cli(tmp_path, monkeypatch, capsys, params, *argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("params, argv, message", [
    ({**TINY, "trian": {}}, ["prepare"], "unknown param key 'trian'"),
    ({**TINY, "train": {"images": -3}}, ["prepare"], "train.images must be > 0"),
    ({**TINY, "train": {"images": "lots"}}, ["prepare"], "train.images: expected int"),
    (TINY, ["train", "gan"], "unknown model 'gan'"),
    ({**TINY, "models": {"vae": {"widht": 3}}}, ["evaluate", "vae"], "unknown param key 'models.vae.widht'"),
    ({**TINY, "data": {"name": "mnist"}}, ["prepare"], "missing data file"),
    (TINY, ["train", "vae"], "missing prepared data"),
])
def test_bad_input_is_a_clear_error(tmp_path, monkeypatch, capsys, params, argv, message):
    code, err = run_cli(tmp_path, monkeypatch, capsys, params, *argv)
    assert code == 2
    assert message in err


def test_required_inception_without_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    params = {**TINY, "features": {"require_inception": True, "inception_weights": str(tmp_path / "none.pth")}}
    for argv in (["features"], ["sample", "vae"]):
        code, err = run_cli(tmp_path, monkeypatch, capsys, params, *argv)
        assert code == 2 and f"Inception-v3 not available: no weights at {tmp_path / 'none.pth'}" in err


def test_model_not_listed_in_params(tmp_path, monkeypatch, capsys):
    code, err = run_cli(tmp_path, monkeypatch, capsys, {**TINY, "models": {"baseline": {}}}, "train", "vae")
    assert code == 2 and "model 'vae' is not listed under 'models'" in err


def test_finished_runs_are_kept_only_when_made_by_the_same_code(tmp_path, monkeypatch, capsys):
    # the runs in this process (workers: 1), where capsys sees what they print
    params = {**TINY, "models": {"vae": {"width": 8}}, "train": {**TINY["train"], "workers": 1}}
    for argv in (["prepare"], ["train", "vae"]):
        assert run_cli(tmp_path, monkeypatch, capsys, params, *argv)[0] == 0
    capsys.readouterr()
    out = []
    for patched in (False, True):
        if patched:  # the package's code changed since: retrain
            monkeypatch.setattr("diffusion_models.pipeline.train.code_digest", lambda *a: "another version")
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        assert main(["train", "vae"]) == 0
        out.append(capsys.readouterr().out)
    assert "vae seed 0: kept" in out[0] and "vae seed 1: kept" in out[0] and "trained vae" not in out[0]
    assert "kept" not in out[1] and "trained vae seed 0" in out[1] and "trained vae seed 1" in out[1]


@pytest.mark.slow
def test_runs_trained_side_by_side_equal_runs_trained_in_turn(tmp_path, monkeypatch, capfd):
    """On a CPU the seeds train in worker processes side by side (one thread each at this
    2-thread setting); the same runs trained one after another in the stage's process with one
    thread give bit-identical checkpoints, learning curves and DVCLive summary, and this
    process's threads are as they were."""
    out, threads = {}, torch.get_num_threads()
    for mode, train in (("side by side", {"threads": 2}), ("in turn", {"threads": 1, "workers": 1})):
        work = tmp_path / mode.replace(" ", "_")
        work.mkdir()
        params = {**TINY, "models": {"vae": {"width": 8}}, "train": {**TINY["train"], **train}}
        monkeypatch.chdir(work)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        try:
            assert main(["prepare"]) == 0 and main(["train", "vae"]) == 0
        finally:
            torch.set_num_threads(threads)  # setup_torch applies train.threads to this process
        out[mode] = capfd.readouterr().out
        out[mode + " record"] = json.loads((work / "results" / "train" / "vae.json").read_text())
    assert "vae: 2 runs side by side in 2 processes, 1 thread(s) each" in out["side by side"]
    assert "side by side" not in out["in turn"]
    assert out["side by side record"]["device"].endswith("1 thread), 2 runs side by side")
    assert out["in turn record"]["device"].endswith("1 thread)")
    a, b = tmp_path / "side_by_side" / "results", tmp_path / "in_turn" / "results"
    for seed in (0, 1):
        for pct in (50, 100):
            ca = torch.load(a / "checkpoints" / "vae" / f"seed{seed}-{pct}pct.pt", weights_only=True)
            cb = torch.load(b / "checkpoints" / "vae" / f"seed{seed}-{pct}pct.pt", weights_only=True)
            assert ca["run_key"] == cb["run_key"]
            assert all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
            untimed = lambda c: json.dumps({k: v for k, v in c["train"].items() if "sec" not in k})  # noqa: E731
            assert untimed(ca) == untimed(cb)  # steps, images, FLOPs, final loss
        for curve in ("train/loss.tsv", "val/bpd.tsv"):
            tsv = Path("live") / "vae" / "plots" / "metrics" / f"seed{seed}" / curve
            values = lambda d: [ln.split("\t")[1:] for ln in (d / tsv).read_text().splitlines()]  # noqa: E731
            assert len(values(a)) >= 2 and values(a) == values(b)  # header, points: step and value (no timestamp)
    summary = json.loads((a / "live" / "vae" / "metrics.json").read_text())
    other = json.loads((b / "live" / "vae" / "metrics.json").read_text())
    assert {k: summary[k] for k in ("seed0", "seed1")} == {k: other[k] for k in ("seed0", "seed1")}


def test_retraining_runs_side_by_side_replaces_their_old_curves(tmp_path, monkeypatch, capfd):
    """Three seeds on two worker processes, retrained after a change: the third starts after
    the others have logged, and its old learning curve, which the stage's DVCLive has loaded,
    is replaced before DVCLive opens (a worker deleting it made the stage's next write fail)."""
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    params = {**TINY, "models": {"vae": {"width": 8}},
              "train": {**TINY["train"], "seeds": 3, "threads": 2, "workers": 2, "log_every": 1, "val_every": 1}}
    try:
        for lr in (2e-3, 1e-3):  # the second lr: every run retrains
            params["train"]["lr"] = lr
            (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
            assert main(["prepare"]) == 0 and main(["train", "vae"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "3 runs side by side in 2 processes" in capfd.readouterr().out
    for seed in (0, 1, 2):
        tsv = tmp_path / "results" / "live" / "vae" / "plots" / "metrics" / f"seed{seed}" / "train" / "loss.tsv"
        assert [int(ln.split("\t")[0]) for ln in tsv.read_text().splitlines()[1:]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    copy_repo(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    sh = shell_in(tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    sh("dvc", "repro")
    results = tmp_path / "results"
    comp = pd.read_csv(results / "comparison.csv").set_index("model")
    nll = pd.read_csv(results / "nll.csv")
    assert list(comp.index) == ["baseline", "vae", "ddpm"] and (comp["seeds"] == 2).all()
    assert comp.loc["vae", "family"] == "vae"
    assert comp.loc["vae", "train_flops"] > 0 and (comp["fid"] > 0).all() and (comp["fid_std"] > 0).all()
    shipped = json.loads((REPO / "diffusion_models" / "assets" / "classifier-digits.json").read_text())["sha256"]
    assert (comp["fid_extractor"] == f"classifier (sha256 {shipped[:12]})").all() and (comp["n_samples"] == 64).all()
    assert (comp["fid_test"] > 0).all() and comp[["copies", "close_pixel", "close_features"]].notna().all().all()
    assert comp["fid_inception"].str.startswith("not available: no weights at").all()
    assert comp.loc["ddpm", "sampler"].startswith("dpm++2m, 4 steps") and comp.loc["ddpm", "nfe"] == 4
    ckpts = sorted(p.name for p in (results / "checkpoints" / "vae").iterdir())
    assert ckpts == ["seed0-100pct.pt", "seed0-50pct.pt", "seed1-100pct.pt", "seed1-50pct.pt"]
    runs = pd.read_csv(results / "runs.csv")
    assert len(runs) == 2 + 4 + 4 and set(runs[runs["model"] == "vae"]["images_seen"]) == {128, 256}
    # each run's selected checkpoint is its best validation bound, and the tables report it
    for (m, seed), r in runs.groupby(["model", "seed"]):
        assert r["selected"].sum() == 1 and r.loc[r["selected"], "val_bpd"].iloc[0] == r["val_bpd"].min()
    chosen = runs[runs["selected"]].groupby("model", sort=False)
    assert comp.loc["vae", "images_seen"] == pytest.approx(chosen["images_seen"].mean()["vae"])
    assert comp["bpd"].to_dict() == pytest.approx(chosen["bpd"].mean().to_dict(), rel=1e-12)
    assert runs.loc[~runs["selected"], "bpd"].isna().all()  # the headline only where selected
    frontier = pd.read_csv(results / "frontier.csv")
    assert list(frontier[frontier["model"] == "ddpm"]["fraction"]) == [0.5, 1.0]
    assert (results / "frontier.png").stat().st_size > 0
    sampling = pd.read_csv(results / "sampling.csv")
    assert set(zip(sampling["model"], sampling["extractor"], sampling["reference"])) == {
        (m, e, r) for m in ("baseline", "vae", "ddpm") for e in ("classifier", "inception-v3-compat")
        for r in ("train", "test")}
    grid = sampling[(sampling["model"] == "ddpm") & (sampling["extractor"] == "classifier")
                    & (sampling["reference"] == "train") & (sampling["seed"] == 0)
                    & sampling["selected"]].set_index("sampler")
    ode_point = grid[grid["sampler_name"] == "ode"]
    assert list(ode_point.index) == ["ode, dopri5, rtol=0.01, atol=0.01, fp32"] and (ode_point["nfe"] > 0).all()
    grid = grid[grid["sampler_name"] != "ode"]
    assert sorted(grid["nfe"]) == [2, 2, 4, 4, 40] and grid["headline"].sum() == 1
    # the headline in bf16 and, beside it on the same noise, in fp32: the precision check's rows
    assert grid.loc["dpm++2m, 4 steps, trailing spacing, bf16", "headline"]
    twin = grid.loc["dpm++2m, 4 steps, trailing spacing, fp32"]
    check = pd.read_csv(results / "precision_check.csv").set_index("model")
    assert list(check.index) == ["vae", "ddpm"]  # the models with a network (not the baseline)
    assert (check["headline"] == "bf16").all()
    assert check.loc["ddpm", "fid_fp32"] == pytest.approx(twin["fid"], rel=1e-12)
    assert check.loc["ddpm", "fid_diff"] == pytest.approx(
        grid.loc["dpm++2m, 4 steps, trailing spacing, bf16", "fid"] - twin["fid"], rel=1e-9)
    assert check.loc["ddpm", "fid_seed_std"] == pytest.approx(comp.loc["ddpm", "fid_std"], rel=1e-12)
    anc = grid[grid["sampler_name"] == "ancestral"].iloc[0]
    ddim = grid[grid["sampler_name"] == "ddim"].iloc[0]
    # speed is a measurement of the pipeline (and of benchmarks/), not asserted in a test; here
    # only that each point carries a finite speed at the stated batch and its NFE
    assert anc["nfe"] == 40 and ddim["nfe"] == 2 and (grid["speed_batch"] == 16).all()
    assert (grid["samples_per_sec"] > 0).all() and grid["samples_per_sec"].notna().all()
    assert (results / "fid_vs_nfe.png").stat().st_size > 0
    assert comp.loc["baseline", "matched"] == "closed form"
    assert comp.loc[["vae", "ddpm"], "matched"].str.contains("params, outside ±10%").any()
    assert "\\begin{tabular}" in (results / "comparison.tex").read_text()
    # baseline 1; vae: headline + its fp32 twin; ddpm: those two + ancestral, ddim, dpm++ and ode
    assert len(pd.read_csv(results / "fid_vs_nfe.csv")) == 1 + 2 + 6
    ok = sampling[sampling["status"] == "ok"]
    assert ok[["kid", "precision", "recall"]].notna().all().all()
    ok = ok[ok["reference"] == "train"]  # the torchmetrics cross-check is of the standard reference
    assert ((ok["fid"] - ok["fid_torchmetrics"]).abs() <= 1e-3 * ok["fid"]).all()
    for image in ("real", "baseline", "vae", "ddpm"):
        assert (results / "samples" / f"{image}.png").stat().st_size > 0
    ode_label = ("ODE (dopri5, rtol=0.01, atol=0.01, hutchinson divergence, 1 probe, tn dequantization, K=1, "
                 "first 16 test images)")
    assert set(nll["estimator"]) == {"exact", "ELBO", "IWAE-2", "IWAE-4", "VLB (T=40, exact sum)", ode_label}
    assert (nll[nll["estimator"] == ode_label]["n_test"] == 16).all()
    assert (nll[nll["estimator"] != ode_label]["n_test"] == 200).all()  # evaluate.n_test: the first 200 of 297
    views = pd.read_csv(results / "likelihood_views.csv").set_index("model")
    assert list(views.index) == ["ddpm"] and views.loc["ddpm", "seeds"] == 2 and views.loc["ddpm", "ode_nfe"] > 0
    ode_nll = nll[nll["estimator"] == ode_label].iloc[0]
    assert views.loc["ddpm", "ode_bpd"] == pytest.approx(ode_nll["bpd"], rel=1e-12)
    assert comp.loc["ddpm", "bpd_estimator"] == "VLB (T=40, exact sum)"  # a subset never heads the table
    profile = pd.read_csv(results / "vlb_profile.csv")
    ddpm_profile = profile[profile["model"] == "ddpm"]
    assert len(ddpm_profile) == 39 + 2 and (results / "vlb_profile.png").stat().st_size > 0  # prior, 39 t, L_0
    assert ddpm_profile["bpd"].sum() == pytest.approx(comp.loc["ddpm", "bpd"], rel=1e-6)  # the terms sum to the bound (float32 terms)
    sig = pd.read_csv(results / "significance.csv")
    assert set(sig["metric"]) == {"bpd", "fid"} and len(sig[sig["test"] == "Welch t over seeds"]) == 2 * 3
    boot = sig[sig["test"] == "bootstrap over samples and seeds"]
    assert len(boot) == 3 and (boot["metric"] == "fid").all() and boot["p_holm"].notna().all()
    assert (comp["fid_ci_lo"] < comp["fid"]).all() and (comp["fid"] < comp["fid_ci_hi"]).all()
    assert len(sig[sig["test"].str.startswith("paired over test images, seed")]) == 2 * 3
    pooled = sig[sig["test"] == "paired over test images, pooled over seeds"]
    assert len(pooled) == 3 and pooled["p_holm"].notna().all() and (pooled["p_holm"] >= pooled["p_value"]).all()
    # the paired mean difference is the difference of the two runs' bounds in runs.csv (another path)
    pair = sig[sig["test"] == "paired over test images, seed 0"].set_index(["model_a", "model_b"]).loc[("vae", "ddpm")]
    seed0 = runs[(runs["seed"] == 0) & runs["selected"]].set_index("model")["bpd"]
    assert pair["diff"] == pytest.approx(seed0["vae"] - seed0["ddpm"], rel=1e-9)
    assert "## Which differences are real" in (results / "comparison.md").read_text()
    curve = results / "live" / "vae" / "plots" / "metrics" / "seed0" / "val" / "bpd.tsv"
    assert len(curve.read_text().splitlines()) == 1 + 2  # a validation bound every 2 steps of 4
    assert (nll["bpd"] > 0).all() and (nll["bpd_se"] > 0).all() and (nll["seeds"] == 2).all()
    md = (results / "comparison.md").read_text()
    assert "dataset: digits" in md and "budget: at most 256 training images" in md and "versions:" in md
    assert "mean ± std over 2 seeds" in md
    # the stages' own means over seeds (dvc metrics, compact keys) agree with compare's pandas means
    metric = lambda m, kind: json.loads((results / "metrics" / f"{m}{kind}.json").read_text())  # noqa: E731
    for m in ("vae", "ddpm"):
        assert metric(m, "")["bpd"] == pytest.approx(comp.loc[m, "bpd"], rel=1e-12)
        assert metric(m, ".sample")["fid"] == pytest.approx(comp.loc[m, "fid"], rel=1e-12)
        assert metric(m, ".sample")["samples_s"] == pytest.approx(comp.loc[m, "samples_per_sec"], rel=1e-12)
        assert metric(m, ".train")["tflops"] * 1e12 == pytest.approx(comp.loc[m, "train_flops"], rel=1e-12)
        assert metric(m, ".train")["val_bpd"] == pytest.approx(comp.loc[m, "val_bpd"], rel=1e-12)
    for seed in (0, 1):
        assert (results / "live" / "vae" / "plots" / "metrics" / f"seed{seed}" / "train" / "loss.tsv").is_file()
    shown = sh("dvc", "metrics", "show")
    assert "bpd_se" in shown and max(map(len, shown.splitlines())) <= 120, shown
    plots = json.loads(subprocess.run(["dvc", "plots", "show", "--json"], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, check=True).stdout)["data"]
    assert {"results/live/vae/plots/metrics/seed1/train/loss.tsv", "results/frontier.csv",
            "results/fid_vs_nfe.csv"} <= set(plots)
    assert comp["caption"].str.startswith("digits, at most 256 training images per model and run, each run's "
                                          "checkpoint with the best validation bound, mean ± standard "
                                          "deviation over 2 seeds").all()
    # nothing changed: everything is up to date
    assert "Data and pipelines are up to date" in sh("dvc", "repro")
    # the report's code changes: only compare is stale
    with open(tmp_path / "diffusion_models" / "report.py", "a") as f:
        f.write("# an edit of the report code\n")
    stale = [ln for ln in sh("dvc", "status").splitlines() if ln.endswith(":") and not ln.startswith("\t")
             and ln != "data.dvc:"]  # the frozen pins of the real datasets, never fetched here
    assert stale == ["compare:"], stale
    sh("dvc", "repro")
    # one model's file changes: its runs retrain and are rescored; the others' stages rerun but
    # find their records made from the same inputs and rewrite nothing
    before = {m: (results / "eval" / f"{m}.json").read_bytes() for m in ("baseline", "ddpm")}
    with open(tmp_path / "diffusion_models" / "models" / "vae.py", "a") as f:
        f.write("# an edit of the VAE's file\n")
    out = sh("dvc", "repro")
    assert "trained vae seed 0" in out and "trained vae seed 1" in out and "trained ddpm" not in out
    assert "ddpm seed 0: kept" in out and "evaluate ddpm: checkpoints, data, settings and code unchanged" in out
    assert "sample ddpm: checkpoints, references, settings and code unchanged" in out
    assert before == {m: (results / "eval" / f"{m}.json").read_bytes() for m in ("baseline", "ddpm")}
    # a helper module of the sample stage changes (one dvc.yaml lists, not one the stage's record
    # names itself): DVC reruns the sample stages and each recomputes its record, none is kept
    code_before = json.loads((results / "sample" / "ddpm.json").read_text())["inputs"]["code_sha1"]
    with open(tmp_path / "diffusion_models" / "pipeline" / "features.py", "a") as f:
        f.write("# an edit of a helper of the sample stage\n")
    out = sh("dvc", "repro")
    assert "record kept" not in out and "sample ddpm: the network in" in out, out
    assert json.loads((results / "sample" / "ddpm.json").read_text())["inputs"]["code_sha1"] != code_before
    # one model's override changes: only that model's stages (and compare) are stale
    params = {**TINY, "models": {**TINY["models"], "vae": {"width": 8, "latent_dim": 4}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh("dvc", "status")
    assert "train@vae" in status and "evaluate@vae" in status
    assert "train@baseline" not in status and "evaluate@baseline" not in status
    assert "sample@vae" in status and "sample@baseline" not in status and "features" not in status
    # one more seed: the finished seeds' checkpoints are kept, only the new seed trains
    params = {**TINY, "train": {**TINY["train"], "seeds": 3}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc", "repro", "train@vae")
    assert "vae seed 0: kept" in out and "vae seed 1: kept" in out and "trained vae seed 2" in out


def test_training_and_selection_never_read_the_test_split(tmp_path, monkeypatch, capsys):
    """The test split feeds the final tables only: with it gone, training (with its validation
    curve and the selection of each run's checkpoint on validation), choosing defaults and
    retraining the FID classifier all still run."""
    params = {**TINY, "models": {"vae": {"width": 8}}, "train": {**TINY["train"], "seeds": 1}}
    assert run_cli(tmp_path, monkeypatch, capsys, params, "prepare")[0] == 0
    (tmp_path / "data" / "prepared" / "test.npz").unlink()
    for argv in (["train", "vae"], ["select", "vae", "latent_dim=4,8"],
                 ["train-classifier", "--out", str(tmp_path / "clf.pt")]):
        code, err = run_cli(tmp_path, monkeypatch, capsys, params, *argv)
        assert code == 0, (argv, err)
    record = json.loads((tmp_path / "results" / "train" / "vae.json").read_text())
    assert sum(r["selected"] for r in record["runs"]) == 1  # the selection is fixed before test exists
    code, err = run_cli(tmp_path, monkeypatch, capsys, params, "evaluate", "vae")
    assert code == 2 and "missing prepared data" in err and "test.npz" in err
    table = pd.read_csv(tmp_path / "results" / "selection" / "vae-latent_dim.csv")
    assert sorted(set(table["latent_dim"])) == [4, 8] and (table["val_bpd"] > 0).all()


def test_fid_reference_statistics_are_keyed_by_the_reference_images(tmp_path, monkeypatch, capsys):
    """Another validation split (data.split_seed) changes the training reference's images: the
    features stage then caches (and the sample stage reads) statistics under a new name, never
    the old split's; the test reference, drawn whatever split_seed, keeps its cache."""
    from diffusion_models import quality
    from diffusion_models.pipeline.features import cache_name

    a = quality.ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.long), 17)
    b = quality.ImageSet(torch.tensor([0, 0, 0, 1]).view(4, 1, 1, 1).expand(4, 1, 8, 8).long(), 17)
    assert cache_name(a, "train", "f" * 64) == cache_name(quality.ImageSet(torch.zeros(4, 1, 8, 8).long(), 17),
                                                          "train", "f" * 64)
    assert cache_name(a, "train", "f" * 64) != cache_name(b, "train", "f" * 64)  # one pixel of one image
    assert cache_name(a, "train", "f" * 64) != cache_name(a, "train", "e" * 64)  # another feature space
    names = []
    for split_seed in (0, 1):
        params = {**TINY, "data": {"name": "digits", "split_seed": split_seed}}
        for argv in (["prepare"], ["features"]):
            assert run_cli(tmp_path, monkeypatch, capsys, params, *argv)[0] == 0
        names.append({p.name for p in (tmp_path / "results" / "features" / "reference").iterdir()})
    new = names[1] - names[0]
    assert new and all(n.split("-")[0].endswith("train") for n in new), (names, new)
    assert {n for n in names[0] if "test-" in n} <= names[1]


def test_code_digests_hash_the_code_dvc_tracks_not_the_data_files_beside_it():
    """A stage's code digest covers the package files its dvc.yaml deps list (folders: their
    .py files), not the classifiers in assets/ (records name those by their own SHA-256), so
    shipping another dataset's classifier invalidates no record."""
    from diffusion_models.pipeline.common import stage_sources

    sources = stage_sources("sample")
    assert {"quality.py", "pipeline/sample.py", "evaluate.py"} <= set(sources)
    assert all(s.endswith(".py") for s in sources) and not any(s.startswith("models/") for s in sources)
