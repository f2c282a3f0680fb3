import math
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from diffusion_models import models, report
from diffusion_models.config import TrainConfig
from diffusion_models.models.base import Model
from diffusion_models.train import TrainingError, batch_sizes, measure_flops, train


@pytest.mark.parametrize("images, bs", [(1000, 128), (128, 128), (5, 128), (1024, 64)])
def test_budget_is_exact(images, bs):
    sizes = batch_sizes(images, bs)
    assert sum(sizes) == images and max(sizes) <= bs


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
    # measure_flops makes one call, so the 4th training step is call 5
    with pytest.raises(TrainingError, match=r"lin: non-finite loss nan at step 4"):
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


def _records():
    trains, evals = [], []
    for m, fam, b in (("baseline", "baseline", {"exact": 2.4}), ("vae", "vae", {"ELBO": 2.0, "IWAE-10": 1.9})):
        trains.append({"model": m, "family": fam, "params": 10, "images_seen": 100, "train_flops": 1e9,
                       "train_seconds": 1.0, "dataset": "digits", "seed": 0, "device": "cpu",
                       "n_train": 1500, "n_test": 297, "levels": 17, "shape": [1, 8, 8],
                       "batch_size": 128, "versions": {"torch": "x"}})
        evals.append({"model": m, "bounds": {
            k: {"bpd": v, "bpd_se": 0.01, "nats": v * 64 * math.log(2), "nats_se": 0.1, "n_examples": 297,
                "terms_bpd": {"t": v}} for k, v in b.items()}})
    def point(sampler, steps, nfe, fid, default):
        return {"sampler": sampler, "steps": steps, "label": f"{sampler}, {nfe} steps", "default": default,
                "nfe": nfe, "speed_batch": 8, "speed_repeats": 3, "sec_per_batch": 0.5, "samples_per_sec": 16.0,
                "sec_per_sample": 1 / 16, "sample_seconds": 2.0, "metrics": [
                    {"extractor": "classifier", "status": "ok", "fid": fid, "kid": 0.1, "kid_std": 0.01,
                     "precision": 0.5, "recall": 0.6, "fid_torchmetrics": fid, "fid_rel_diff": 0.0},
                    {"extractor": "inception-v3-compat", "status": "not available: no weights at w.pth"}]}

    samples = [{"model": m, "n_samples": 50, "reference": "train split (9 images)", "dataset": "digits",
                "device": "cpu", "points": [point("ancestral", None, 1, fid, True)]
                + ([point("ddim", 10, 10, 7.5, False)] if m == "vae" else [])}
               for m, fid in (("baseline", 9.0), ("vae", 3.25))]
    return trains, evals, samples


def test_tables_pick_the_tightest_bound_and_carry_provenance():
    trains, evals, samples = _records()
    nll = report.nll_table(evals)
    assert list(nll["estimator"]) == ["exact", "ELBO", "IWAE-10"]
    sampling = report.sampling_table(samples)
    assert len(sampling) == 6 and sampling["fid"].isna().sum() == 3
    assert list(report.fid_vs_nfe(sampling)["fid"]) == [9.0, 3.25, 7.5]
    comp = report.comparison_table(trains, nll, sampling)
    row = comp.set_index("model").loc["vae"]
    assert row["bpd"] == 1.9 and row["bpd_estimator"] == "IWAE-10"
    assert row["fid"] == 3.25 and row["fid_extractor"] == "classifier"
    assert row["fid_inception"] == "not available: no weights at w.pth"
    assert row["samples_per_sec"] == 16.0 and row["nfe"] == 1  # the default sampler's row
    md = report.markdown(comp, nll, sampling, report.provenance(trains, 100))
    assert "dataset: digits" in md and "budget: 100 training images" in md and "versions: torch x" in md
    assert "1.9000 ± 0.0100" in md and "3.2500" in md and "not available: no weights at w.pth" in md


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
    trains, _, _ = _records()
    closed = dict(trains[0], images_seen=0, train_flops=0.0)  # fitted in closed form: exempt
    big = dict(trains[1], model="big", params=12)              # median of 10, 12, 10, 100 is 11: +9%
    short = dict(trains[1], model="short", images_seen=50)
    huge = dict(trains[1], model="huge", params=100)
    recs = [closed, trains[1], big, short, huge]
    with pytest.raises(report.UnmatchedError) as e:
        report.check_matched(recs, 100, allow_unmatched=False)
    msg = str(e.value)
    assert "short (saw 50 images, budget 100)" in msg and "huge (100 params, outside ±10% of the median 11)" in msg
    assert "baseline" not in msg and "vae (" not in msg and "big (" not in msg
    col = report.check_matched(recs, 100, allow_unmatched=True)
    assert col["baseline"] == "closed form" and col["vae"] == "yes" and col["big"] == "yes"
    assert col["short"].startswith("no: saw 50 images") and col["huge"].startswith("no: 100 params")
    assert report.check_matched([closed, trains[1]], 100, allow_unmatched=False) == {
        "baseline": "closed form", "vae": "yes"}


def test_latex_table_is_a_booktabs_tabular_with_one_row_per_model():
    trains, evals, samples = _records()
    nll, sampling = report.nll_table(evals), report.sampling_table(samples)
    comp = report.comparison_table(trains, nll, sampling, report.check_matched(trains, 100, False))
    tex = report.latex(comp, "digits, 100 images: bits/dim and FID")
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex and "\\caption{digits, 100 images" in tex
    body = tex[tex.index("\\midrule") + len("\\midrule"): tex.index("\\bottomrule")].strip().splitlines()
    header = tex[tex.index("\\toprule") + len("\\toprule"): tex.index("\\midrule")].strip()
    cols = header.count("&") + 1
    assert len(body) == len(comp) == 2
    for row, model in zip(body, comp["model"]):
        cells = [c.strip() for c in row.rstrip("\\").rstrip().rstrip("\\").split("&")]
        assert len(cells) == cols and cells[0] == model
    assert "1.900 $\\pm$ 0.010" in body[1] and "IWAE-10" in body[1]
