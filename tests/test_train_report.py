import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from diffusion_models import models, report
from diffusion_models.pipeline.common import RUN_FIELDS
from diffusion_models.config import TrainConfig
from diffusion_models.models.base import Model
from diffusion_models.train import TrainingError, batch_sizes, measure_flops, snapshot_steps, train


@pytest.mark.parametrize("images, bs", [(1000, 128), (128, 128), (5, 128), (1024, 64)])
def test_budget_is_exact(images, bs):
    sizes = batch_sizes(images, bs)
    assert sum(sizes) == images and max(sizes) <= bs


def test_snapshot_steps_are_the_first_steps_past_each_fraction():
    cfg = TrainConfig(images=1000, batch_size=128)  # steps of 128 images, the 8th of 104
    assert snapshot_steps(cfg, [0.25, 0.5, 1.0]) == {2: 0.25, 4: 0.5, 8: 1.0}  # 250 -> 256, 500 -> 512
    # 0.56 * 24000 is 13440.000000000002 in floats; exactly 13440 = 105 full batches
    assert snapshot_steps(TrainConfig(images=24000, batch_size=128), [0.56, 1.0]) == {105: 0.56, 188: 1.0}
    with pytest.raises(TrainingError, match=r"train.fractions 0.25 and 0.5 both fall on step 1 of 2"):
        snapshot_steps(TrainConfig(images=128, batch_size=64), [0.25, 0.5, 1.0])
    with pytest.raises(TrainingError, match=r"train.fractions 1.0 and 0.75 both fall on step 2 of 2"):
        snapshot_steps(TrainConfig(images=128, batch_size=64), [0.75, 1.0])


class _Linear(Model):
    """Minimal model: one Linear layer, loss = mean output; optionally NaN after a step."""
    family = "test"

    @dataclass
    class Config:
        nan_at: int = 0

    def __init__(self, shape, levels, cfg):
        super().__init__(shape, levels, cfg)
        self.lin = torch.nn.Linear(self.dims, 10)
        self.calls = 0

    def loss(self, x):
        self.calls += 1
        out = self.lin(x.flatten(1).float()).pow(2).mean()
        return out * float("nan") if self.cfg.nan_at and self.calls > self.cfg.nan_at else out


def test_flops_of_a_linear_layer_match_hand_count():
    m = _Linear((1, 4, 4), 17, _Linear.Config())
    m.name = "lin"
    x = torch.randint(0, 17, (8, 1, 4, 4))
    # forward 2*B*16*10; backward: grad wrt weight 2*B*16*10 (input needs no grad)
    assert measure_flops(m, x) == pytest.approx((2 * 8 * 16 * 10 * 2) / 8)


def test_nan_loss_stops_training_naming_model_and_step():
    m = _Linear((1, 4, 4), 17, _Linear.Config(nan_at=4))
    m.name = "lin"
    x = torch.randint(0, 17, (64, 1, 4, 4))
    # measure_flops works on a copy: the model's own loss calls are the training steps
    measure_flops(m, x[:8])
    assert m.calls == 0
    with pytest.raises(TrainingError, match=r"lin: non-finite loss nan at step 5"):
        train(m, x, TrainConfig(images=640, batch_size=8), progress=False)


def test_training_is_deterministic_given_seed():
    x = torch.randint(0, 17, (256, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        torch.manual_seed(123)  # model init
        m = models.build("vae", shape=(1, 8, 8), levels=17)
        r = train(m, x, TrainConfig(images=512, batch_size=64, seed=7), progress=False)
        outs.append((r.final_loss, [p.detach().clone() for p in m.parameters()]))
    assert outs[0][0] == outs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))


SEEDS, FRACTIONS = (0, 1, 2), (0.5, 1.0)


def _bpd(model, estimator, seed, fraction):
    """Made-up per-run bounds: distinct for every model, estimator, seed and fraction."""
    base = {"exact": 2.4, "ELBO": 2.0, "IWAE-10": 1.9, "IWAE-2": 1.95}[estimator]
    return base + (0.0 if model == "baseline" else 0.013 * seed ** 2 + 0.2 * (1 - fraction))


def _fid(model, seed, fraction, nfe):
    return (9.0 if model == "baseline" else 3.25) + 0.5 * seed + 2 * (1 - fraction) + 1 / nfe


def _records(best=1.0):
    """train/evaluate/sample records as the stages write them: baseline (closed form, 100%
    only) and vae (seeds x fractions; validation best at fraction `best`, so selected there;
    IWAE-10 only there), samples of the selected checkpoints, a ddim grid on vae seed 0."""
    trains, evals, samples = [], [], []
    for m, fam in (("baseline", "baseline"), ("vae", "vae")):
        fr = (1.0,) if m == "baseline" else FRACTIONS
        runs = [{"seed": s, "fraction": f, "images_seen": 0 if m == "baseline" else int(100 * f),
                 "steps": 0 if m == "baseline" else int(10 * f),
                 "train_flops": 0.0 if m == "baseline" else 1e9 * f, "train_seconds": 1.0 + s,
                 "images_per_sec": 100.0, "final_loss": 1.0,
                 "val_bpd": 2.0 + abs(f - (1.0 if m == "baseline" else best)) + 0.001 * s,
                 "selected": f == (1.0 if m == "baseline" else best), "last": f == 1.0} for s in SEEDS for f in fr]
        trains.append({"model": m, "family": fam, "trains": m != "baseline", "params": 10, "dataset": "digits", "device": "cpu",
                       "seeds": list(SEEDS), "fractions": list(fr), "n_train": 1500, "n_test": 297, "levels": 17,
                       "shape": [1, 8, 8], "batch_size": 128, "versions": {"torch": "x"}, "runs": runs})
        ests = ["exact"] if m == "baseline" else ["ELBO", "IWAE-2", "IWAE-10"]
        head = (lambda r: "exact") if m == "baseline" else (lambda r: "IWAE-10" if r["selected"] else "IWAE-2")
        evals.append({"model": m, "runs": [{**{k: r[k] for k in RUN_FIELDS},
                                            "headline": head(r), "sweep_estimator": "exact" if m == "baseline" else "IWAE-2",
                                            "bounds": {e: {"kind": e.split("-")[0].lower(),
                                                           "bpd": (v := _bpd(m, e, r["seed"], r["fraction"])),
                                                           "bpd_se": 0.01 * (1 + r["seed"]),
                                                           "nats": v * 64 * math.log(2), "nats_se": 0.1,
                                                           "n_examples": 297, "terms_bpd": {"t": v}}
                                                       for e in ests if e != "IWAE-10" or r["selected"]}}
                                           for r in runs]})

        def point(r, sampler, nfe, headline):
            fid = _fid(m, r["seed"], r["fraction"], nfe)
            return {**{k: r[k] for k in RUN_FIELDS}, "sampler": sampler,
                    "steps": None if sampler == "ancestral" else nfe, "label": f"{sampler}, {nfe} steps",
                    "headline": headline, "nfe": nfe, "speed_batch": 8, "speed_repeats": 3, "sec_per_batch": 0.5,
                    "samples_per_sec": 16.0 + r["seed"], "sec_per_sample": 1 / 16, "sample_seconds": 2.0,
                    "metrics": [{"extractor": "classifier", "reference": "train", "status": "ok", "fid": fid,
                                 "kid": 0.1, "kid_std": 0.01, "precision": 0.5, "recall": 0.6, "fid_torchmetrics": fid,
                                 "fid_rel_diff": 0.0, "extractor_label": "classifier (sha256 abc)"},
                                {"extractor": "classifier", "reference": "test", "status": "ok", "fid": 2 * fid,
                                 "kid": 0.2, "kid_std": 0.01, "precision": 0.5, "recall": 0.6,
                                 "extractor_label": "classifier (sha256 abc)"}] + [
                                {"extractor": "inception-v3-compat", "reference": ref, "extractor_label":
                                 "inception-v3-compat", "status": "not available: no weights at w.pth"}
                                for ref in ("train", "test")],
                    "memorisation": {"pixel_copies": 0.01 * r["seed"], "pixel_close_frac": 0.05,
                                     "features_close_frac": 0.1 * r["seed"]}}
        samples.append({"model": m, "n_samples": 50, "references": {"train": "train split (9 images)",
                                                                    "test": "test split (4 images)"},
                        "dataset": "digits",
                        "device": "cpu", "points": [p for r in runs if r["selected"]
                                                    for p in [point(r, "ancestral", 1, True)] + (
                            [point(r, "ddim", 10, False)] if m == "vae" and r["seed"] == 0 else [])]})
    return trains, evals, samples


def _tables():
    return _tables_of(*_records())


def _tables_of(trains, evals, samples):
    tr, nll_runs, sampling = report.train_runs(trains), report.nll_runs(evals), report.sampling_runs(samples)
    runs = report.runs_table(tr, nll_runs, sampling)
    matched = report.check_matched(tr[tr["last"]].to_dict("records"), 100, False)
    return trains, runs, nll_runs, sampling, report.comparison_table(runs, matched)


def test_tables_report_the_declared_headline_bound_not_the_lowest():
    """A noisy estimator that happens to come out lowest (here the ELBO, made up below IWAE-10 on
    average over seeds) does not take the headline: the tables report the declared one, in every run."""
    trains, evals, samples = _records()
    vae = next(e for e in evals if e["model"] == "vae")
    for run in vae["runs"]:
        run["bounds"]["ELBO"]["bpd"] = run["bounds"]["IWAE-10" if run["fraction"] == 1.0 else "IWAE-2"]["bpd"] - (
            0.05 if run["seed"] >= 1 else -0.05)  # lower on average over seeds
    runs, comp = _tables_of(trains, evals, samples)[1], _tables_of(trains, evals, samples)[4]
    final = runs[(runs["model"] == "vae") & (runs["fraction"] == 1.0)]
    assert (final["bpd_estimator"] == "IWAE-10").all()
    assert list(final["bpd"]) == pytest.approx([_bpd("vae", "IWAE-10", s, 1.0) for s in SEEDS])
    assert (runs[runs["model"] == "vae"]["sweep_estimator"] == "IWAE-2").all()
    assert comp.set_index("model").loc["vae", "bpd_estimator"] == "IWAE-10"


def test_tables_report_the_selected_checkpoints_test_numbers():
    """Each run's validation bound is best at half the cap: the tables report the test bound, FID
    and images seen of that checkpoint, not of the last one."""
    import statistics

    comp = _tables_of(*_records(best=0.5))[4].set_index("model")
    assert comp.loc["vae", "bpd"] == pytest.approx(statistics.mean(_bpd("vae", "IWAE-10", s, 0.5) for s in SEEDS))
    assert comp.loc["vae", "fid"] == pytest.approx(statistics.mean(_fid("vae", s, 0.5, 1) for s in SEEDS))
    assert comp.loc["vae", "images_seen"] == 50 and comp.loc["vae", "train_flops"] == 0.5e9
    assert comp.loc["vae", "val_bpd"] == pytest.approx(2.0 + statistics.mean(0.001 * s for s in SEEDS))
    assert comp.loc["vae", "matched"] == "yes"  # trained to the cap, selected earlier


def test_training_stops_on_patience_and_selects_the_best_validation_checkpoint():
    """A model whose validation bound is forced to fall, then rise: training saves a checkpoint
    with its bound at each grid step, stops once `patience` checkpoints have not improved, and
    the selected checkpoint is the minimum."""
    from diffusion_models.pipeline.train import checkpoint_runs, complete
    from diffusion_models.train import select_checkpoint, should_stop

    m = _Linear((1, 4, 4), 17, _Linear.Config())
    m.name = "lin"
    x = torch.randint(0, 17, (64, 1, 4, 4))
    curve = {1: 3.0, 2: 2.0, 4: 2.5, 8: 2.7, 16: 1.0}  # by step; 16 (a better bound) is never reached
    fractions = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    cfg = TrainConfig(images=128, batch_size=8, patience=2)
    steps = snapshot_steps(cfg, fractions)
    assert steps == {1: 1 / 16, 2: 1 / 8, 4: 1 / 4, 8: 1 / 2, 16: 1.0}
    done = {}

    def save(weights, result, score):
        done[steps[result.steps]] = {**result.as_dict(), "val_bpd": score}
        return should_stop([done[f]["val_bpd"] for f in sorted(done)], cfg.patience)

    result = train(m, x, cfg, progress=False, validate=lambda model: curve[model.calls],
                   snapshot=(set(steps), save))
    assert result.steps == 8 and result.images_seen == 64 and m.calls == 8  # stopped at the 4th checkpoint
    assert [done[f]["val_bpd"] for f in sorted(done)] == [3.0, 2.0, 2.5, 2.7]
    rows = checkpoint_runs("lin", 0, done)
    assert [r["selected"] for r in rows] == [False, True, False, False]
    assert [r["last"] for r in rows] == [False, False, False, True]
    assert complete(done, fractions, 2) and not complete(done, fractions, 0)  # patience 0 would go on
    assert not complete({f: done[f] for f in (1 / 16, 1 / 4)}, fractions, 2)  # a gap: not a run
    assert select_checkpoint([2.0, 1.5, 1.5, 3.0]) == 1  # the earliest of equals
    assert not should_stop([3.0, 2.0, 2.5], 2) and should_stop([3.0, 2.0, 2.5, 2.0], 2)  # equal: no gain
    assert not should_stop([3.0, 2.0, 2.5, 2.7], 0)


def test_frontier_is_the_best_validation_checkpoint_within_each_budget():
    """Against a direct computation from per-checkpoint records: one run falls then rises, one
    stops early; the frontier's validation bound never rises with the budget."""
    ckpts = {  # (model, seed) -> [(fraction, val, test)], in training order
        ("a", 0): [(0.25, 3.0, 3.1), (0.5, 2.0, 2.2), (1.0, 2.4, 2.1)],
        ("a", 1): [(0.25, 2.8, 2.9), (0.5, 2.9, 3.0)],            # stopped early at 0.5
        ("b", 0): [(0.25, 1.9, 2.0), (0.5, 1.8, 1.85), (1.0, 1.7, 1.75)],
    }
    per_image = {"a": 10.0, "b": 20.0}
    runs = pd.DataFrame([{"model": m, "seed": s, "fraction": f, "images_seen": int(f * 1000),
                          "train_flops": per_image[m] * f * 1000, "val_bpd": v, "sweep_bpd": t,
                          "sweep_estimator": "E"} for (m, s), cs in ckpts.items() for f, v, t in cs])
    got = report.frontier_runs(runs, 1000, {"a": [0.25, 0.5, 1.0], "b": [0.25, 0.5, 1.0]})
    expected = []
    for (m, s), cs in ckpts.items():
        for budget in (0.25, 0.5, 1.0):
            within = [c for c in cs if c[0] <= budget]
            f, v, t = min(within, key=lambda c: c[1])
            expected.append((m, s, budget, per_image[m] * budget * 1000, f, v, t))
    assert list(zip(got["model"], got["seed"], got["fraction"], got["flops"], got["selected_fraction"],
                    got["val_bpd"], got["bpd"])) == expected
    for _, g in got.groupby(["model", "seed"]):
        assert (g.sort_values("flops")["val_bpd"].diff().dropna() <= 0).all()
    table = report.frontier_table(got).set_index(["model", "fraction"])
    assert table.loc[("a", 1.0), "bpd"] == pytest.approx((2.2 + 2.9) / 2)  # seed 0's 0.5 and seed 1's 0.25
    assert table.loc[("a", 1.0), "images_seen"] == pytest.approx((500 + 250) / 2)


def test_every_model_declares_a_headline_among_its_estimators():
    from diffusion_models import models
    from diffusion_models.config import EvalConfig

    for name in models.names():
        m = models.build(name, shape=(1, 4, 4), levels=17, **({"T": 40} if name.startswith(("ddpm", "iddpm")) else {}))
        for ecfg in (EvalConfig(), EvalConfig(iwae_k=1, dequant_k=1)):
            head = m.headline_estimator(ecfg)
            assert head in m.estimators(ecfg), (name, head)
            assert head.kind != "ode" and head.max_examples is None, (name, head)  # on the whole test split


def test_tables_report_mean_and_std_over_seeds_of_the_per_seed_numbers():
    import statistics

    trains, runs, nll_runs, sampling, comp = _tables()
    assert len(runs) == 3 + 6 and len(sampling) == 4 * (3 + 3 + 1)  # 2 extractors x 2 references
    row = comp.set_index("model").loc["vae"]
    bpd = [_bpd("vae", "IWAE-10", s, 1.0) for s in SEEDS]  # the declared headline estimator at 100%
    fid = [_fid("vae", s, 1.0, 1) for s in SEEDS]         # the headline sampler, not the grid
    assert row["bpd_estimator"] == "IWAE-10" and row["seeds"] == 3
    assert row["bpd"] == pytest.approx(statistics.mean(bpd)) and row["bpd_std"] == pytest.approx(statistics.stdev(bpd))
    assert row["bpd_se"] == pytest.approx(0.02)  # mean of the runs' SEs 0.01, 0.02, 0.03
    assert row["fid"] == pytest.approx(statistics.mean(fid)) and row["fid_std"] == pytest.approx(statistics.stdev(fid))
    assert row["fid_test"] == pytest.approx(2 * statistics.mean(fid))  # the held-out reference, side by side
    assert row["fid_test_std"] == pytest.approx(2 * statistics.stdev(fid))
    assert row["copies"] == pytest.approx(0.01) and row["close_features"] == pytest.approx(0.1)
    assert row["fid_extractor"] == "classifier (sha256 abc)"
    assert row["samples_per_sec"] == pytest.approx(17.0) and row["samples_per_sec_std"] == pytest.approx(1.0)
    assert row["train_seconds_std"] == pytest.approx(1.0) and row["images_seen"] == 100
    assert row["fid_inception"] == "not available: no weights at w.pth" and row["matched"] == "yes"
    base = comp.set_index("model").loc["baseline"]
    assert base["bpd_std"] == 0 and base["matched"] == "closed form"
    # pandas' own mean/std on the raw per-seed rows of results/runs.csv agree
    final = runs[runs["fraction"] == 1.0].groupby("model", sort=False)
    assert comp.set_index("model")["bpd_std"].tolist() == pytest.approx(final["bpd"].std().tolist())
    nll = report.nll_table(nll_runs).set_index(["model", "estimator"])
    elbo = [_bpd("vae", "ELBO", s, 1) for s in SEEDS]
    assert nll.loc[("vae", "ELBO"), "bpd_std"] == pytest.approx(statistics.stdev(elbo))
    assert list(nll.index) == [("baseline", "exact"), ("vae", "ELBO"), ("vae", "IWAE-2"), ("vae", "IWAE-10")]
    # the frontier follows one estimator (IWAE-2: the tightest computed at every checkpoint)
    frontier = report.frontier_table(report.frontier_runs(runs, 100)).set_index(["model", "fraction"])
    assert (frontier.loc["vae", "estimator"] == "IWAE-2").all()
    half = [_bpd("vae", "IWAE-2", s, 0.5) for s in SEEDS]
    assert frontier.loc[("vae", 0.5), "bpd"] == pytest.approx(statistics.mean(half))
    assert frontier.loc[("vae", 0.5), "bpd_std"] == pytest.approx(statistics.stdev(half))
    assert frontier.loc[("vae", 0.5), "images_seen"] == 50 and frontier.loc[("vae", 1.0), "flops"] == 1e9
    assert list(report.fid_vs_nfe(sampling)["fid"]) == [_fid("baseline", 0, 1.0, 1), _fid("vae", 0, 1.0, 1),
                                                        _fid("vae", 0, 1.0, 10)]  # seed 0 only
    md = report.markdown(comp, report.nll_table(nll_runs), report.frontier_table(report.frontier_runs(runs, 100)),
                         sampling, report.provenance(trains, 100))
    assert "dataset: digits" in md and "budget: at most 100 training images" in md and "versions: torch x" in md
    assert "3 seeds (0, 1, 2)" in md and "checkpoints at 50%, 100% of the cap" in md
    assert f"{statistics.mean(bpd):.4f} ± {statistics.stdev(bpd):.4f}" in md
    assert "not available: no weights at w.pth" in md


def test_ema_weights_are_the_exponential_average_of_the_trajectory():
    m = _Linear((1, 4, 4), 17, _Linear.Config())
    m.name = "lin"
    x = torch.randint(0, 17, (64, 1, 4, 4))
    snaps = []
    train(m, x, TrainConfig(images=64 * 5, batch_size=8, ema=0.7, log_every=1, lr=1e-2),
          log=lambda step, seen, loss: snaps.append(m.lin.weight.detach().clone()), progress=False)
    assert len(snaps) == 40
    expected = snaps[0]
    for w in snaps[1:]:  # AveragedModel starts from the first updated weights
        expected = 0.7 * expected + 0.3 * w
    assert torch.allclose(m.lin.weight, expected, atol=1e-6)
    assert not torch.allclose(m.lin.weight, snaps[-1])


def test_evaluated_bpd_and_standard_error_match_an_independent_count_model():
    """The numbers in results/: mean and SE over test examples, nats -> bits/dim, checked
    on the closed-form baseline against NumPy counts and scipy's standard error."""
    import numpy as np
    from scipy import stats

    from diffusion_models import data
    from diffusion_models.config import EvalConfig
    from diffusion_models.evaluate import evaluate_bounds

    tr, te = data.load("digits", "train"), data.load("digits", "test")
    m = models.build("baseline", shape=tr.shape, levels=17)
    m.init_from_data(torch.from_numpy(tr.images).long())
    (label, got), = evaluate_bounds(m, torch.from_numpy(te.images).long(), EvalConfig(batch_size=50)).items()
    flat_tr, flat_te = tr.images.reshape(len(tr), -1), te.images.reshape(len(te), -1)
    counts = np.stack([np.bincount(flat_tr[:, d], minlength=17) for d in range(64)]) + 1.0
    bits = -np.log2((counts / counts.sum(1, keepdims=True))[np.arange(64), flat_te]).sum(1) / 64  # [N]
    assert label == "exact" and got["n_examples"] == 297
    assert got["bpd"] == pytest.approx(bits.mean(), rel=1e-6)
    assert got["bpd_se"] == pytest.approx(stats.sem(bits), rel=1e-5)
    assert got["nats"] == pytest.approx(bits.mean() * 64 * math.log(2), rel=1e-6)


def test_unmatched_runs_are_refused_naming_the_models_unless_allowed():
    run = {"model": "vae", "trains": True, "seed": 0, "params": 10, "images_seen": 100, "train_flops": 1e9}
    closed = dict(run, model="baseline", trains=False, images_seen=0, train_flops=0.0)  # closed form: exempt
    big = dict(run, model="big", params=12)              # median of 10, 12, 10, 100 is 11: +9%
    short = [dict(run, model="short"), dict(run, model="short", seed=1, images_seen=50)]
    huge = dict(run, model="huge", params=100)
    recs = [closed, run, dict(run, seed=1), big, *short, huge]
    with pytest.raises(report.UnmatchedError) as e:
        report.check_matched(recs, 100, allow_unmatched=False)
    msg = str(e.value)
    assert "short (seed 1 saw 50 images, cap 100)" in msg
    assert "huge (100 params, outside ±10% of the median 11)" in msg
    assert "baseline" not in msg and "vae (" not in msg and "big (" not in msg
    col = report.check_matched(recs, 100, allow_unmatched=True)
    assert col["baseline"] == "closed form" and col["vae"] == "yes" and col["big"] == "yes"
    assert col["short"].startswith("no: seed 1 saw 50 images") and col["huge"].startswith("no: 100 params")
    assert report.check_matched([closed, run], 100, allow_unmatched=False) == {
        "baseline": "closed form", "vae": "yes"}
    # a run that stopped early on its validation bound (its last checkpoint before the grid's end)
    # is trained under the same cap: matched
    stopped = dict(run, model="stopped", images_seen=50, fraction=0.5)
    assert report.check_matched([run, stopped], 100, allow_unmatched=False)["stopped"] == "yes"


def test_latex_table_is_a_booktabs_tabular_with_one_row_per_model():
    comp = _tables()[-1]
    tex = report.latex(comp, "digits, 100 images: bits/dim and FID")
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex and "\\caption{digits, 100 images" in tex
    body = tex[tex.index("\\midrule") + len("\\midrule"): tex.index("\\bottomrule")].strip().splitlines()
    header = tex[tex.index("\\toprule") + len("\\toprule"): tex.index("\\midrule")].strip()
    cols = header.count("&") + 1
    assert len(body) == len(comp) == 2
    for row, model in zip(body, comp["model"]):
        cells = [c.strip() for c in row.rstrip("\\").rstrip().rstrip("\\").split("&")]
        assert len(cells) == cols and cells[0] == model
    import statistics

    bpd = [_bpd("vae", "IWAE-10", s, 1.0) for s in SEEDS]
    assert f"{statistics.mean(bpd):.3f} $\\pm$ {statistics.stdev(bpd):.3f}" in body[1] and "IWAE-10" in body[1]


def test_one_seed_reports_the_mean_alone():
    trains, runs, nll_runs, sampling, _ = _tables()
    one = report.comparison_table(runs[runs["seed"] == 0])
    assert one["bpd_std"].isna().all() and (one["seeds"] == 1).all()
    seed0 = runs["seed"] == 0
    md = report.markdown(one, report.nll_table(nll_runs[nll_runs["seed"] == 0]), report.frontier_table(report.frontier_runs(runs[seed0], 100)),
                         sampling, report.provenance(trains, 100))
    assert "nan" not in md and "one seed" in md
    assert "nan" not in report.latex(one, "one seed")


@pytest.mark.parametrize("headline", ["bf16", "fp32"])
def test_precision_check_pairs_the_headline_with_its_twin_in_the_other_precision(headline):
    """Whichever precision the headline ran in (`sample.precision` auto resolves per machine),
    the check reports FID(bf16) - FID(fp32) and bf16's speed over fp32's, from the headline and
    its twin on the same checkpoint."""
    trains, evals, samples = _records()
    other = "fp32" if headline == "bf16" else "bf16"
    rec = next(s for s in samples if s["model"] == "vae")
    first = [p for p in rec["points"] if p["seed"] == SEEDS[0] and p["fraction"] == 1.0]
    head = next(p for p in first if p["headline"])
    head["precision"] = headline
    twin = {**head, "headline": False, "precision": other, "samples_per_sec": 3 * head["samples_per_sec"],
            "metrics": [{**m, "fid": m.get("fid", 0.0) + 0.25} if m["status"] == "ok" else m for m in head["metrics"]]}
    rec["points"].insert(rec["points"].index(head) + 1, twin)
    _, _, _, sampling, comp = _tables_of(trains, evals, samples)
    check = report.precision_check(sampling, comp).set_index("model")
    assert list(check.index) == ["vae"]
    row = check.loc["vae"]
    h_fid = head["metrics"][0]["fid"]
    fid = {headline: h_fid, other: h_fid + 0.25}
    speed = {headline: head["samples_per_sec"], other: 3 * head["samples_per_sec"]}
    assert row["headline"] == headline
    assert row["fid_bf16"] == pytest.approx(fid["bf16"]) and row["fid_fp32"] == pytest.approx(fid["fp32"])
    assert row["fid_diff"] == pytest.approx(fid["bf16"] - fid["fp32"])
    assert row["speedup"] == pytest.approx(speed["bf16"] / speed["fp32"])
    assert row["fid_seed_std"] == pytest.approx(comp.set_index("model").loc["vae", "fid_std"])


def test_summary_table_shows_the_comparison_numbers():
    """results/summary.md (the README's table) carries the comparison table's own numbers: each
    row's bits/dim and FID are its mean ± std over seeds, rounded, and its estimator's name."""
    comp = _tables()[4].set_index("model")
    lines = report.summary(comp.reset_index(), None).splitlines()
    rows = {cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}
    assert set(rows) == set(comp.index)
    for m, row in comp.iterrows():
        cells = rows[m]
        assert cells[1] == f"{row['bpd']:.3f} ± {row['bpd_std']:.3f}"
        assert cells[2] == row["bpd_estimator"] and cells[3] == ""
        assert cells[4] == f"{row['fid']:.2f} ± {row['fid_std']:.2f}"
        assert cells[5] == f"{row['images_seen'] / 1e3:.1f} ± {row['images_seen_std'] / 1e3:.1f}"
    timings = pd.DataFrame({"stage": ["features", "train@vae", "train@ddpm", "evaluate@vae", "total"],
                            "seconds": [2.0, 100.0, 50.0, 30.0, 182.0]})
    assert report.stage_totals(timings) == {"features": 2.0, "train": 150.0, "evaluate": 30.0, "total": 182.0}
    text = report.summary(comp.reset_index(), None, timings)
    assert text.endswith("features 2, train 150, evaluate 30; total 182 (3.0 min).\n")


def test_views_table_carries_the_first_seeds_solver_check():
    """The ODE view's solver check comes from the run that has one (the first seed), column by
    column, and the markdown prints it beside the ODE row; the other seed's runs add nothing."""
    check = {"tol": 1e-5, "n_examples": 16, "gap_bpd": -0.03, "gap_bpd_se": 0.01, "max_abs_gap_bpd": 0.2,
             "seconds": 4.0}
    evals = []
    runs = []
    for seed in (0, 1):
        vlb = {"kind": "vlb", "bpd": 2.0 + seed, "bpd_se": 0.02, "per_example_bpd": [2.0 + seed] * 4}
        ode = {"kind": "ode", "bpd": 1.9 + seed, "bpd_se": 0.03, "per_example_bpd": [1.9 + seed] * 2, "n_examples": 2,
               "nfe": 100, "seconds": 2.0, **({"solver_check": check} if seed == 0 else {})}
        runs.append({"seed": seed, "fraction": 1.0, "selected": True, "headline": "VLB",
                     "bounds": {"VLB": vlb, "probability flow (x)": ode}})  # the view read from `kind`
    evals.append({"model": "ddpm", "runs": runs})
    views = report.views_table(evals).set_index("model")
    for k, v in check.items():
        assert views.loc["ddpm", f"solver_{k}"] == v
    assert views.loc["ddpm", "ode_minus_vlb"] == pytest.approx(-0.1)
    lines = report._views_lines(views.reset_index(), "2 seeds")
    assert any("-0.0300 ± 0.0100 (max 0.2000; 16 images, vs 1e-05)" in ln for ln in lines)
