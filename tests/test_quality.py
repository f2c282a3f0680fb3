"""Sample-quality metrics: FID/KID/PR via torch-fidelity checked against closed forms,
torchmetrics and corruption monotonicity; offline Inception weight loading; the shipped
classifier's integrity check."""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from scipy import linalg
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.utils import create_feature_extractor
from torchmetrics.image.fid import _compute_fid

from diffusion_models import data
from diffusion_models import quality as q
from diffusion_models.config import FeaturesConfig
from helpers import digits_train

CPU = torch.device("cpu")


def fid_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets, independently (scipy sqrtm)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def digits():
    return digits_train()


@pytest.fixture(scope="module")
def classifier_path(digits, tmp_path_factory):
    """A domain classifier briefly trained on digits (held-out: the validation split)."""
    labels = torch.from_numpy(data.load("digits", "train").labels).long()
    val = data.load("digits", "val")
    res = q.train_classifier(digits, labels, torch.from_numpy(val.images).long(), torch.from_numpy(val.labels).long(),
                             17, epochs=8, width=16, lr=3e-3, batch_size=64, seed=0)
    assert res.test_accuracy > 0.9, res.test_accuracy  # measured: 0.97 after 8 epochs
    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    q.save_classifier(res.model, path)
    return path


def metrics(samples, reference, path, cache, name="ref", **kw):
    kw = {"kid_subset_size": 200, "kid_subsets": 20, "prc_neighborhood": 3, "seed": 0, **kw}
    return q.fidelity_metrics(q.ImageSet(samples, 17), q.ImageSet(reference, 17), extractor=q.CLASSIFIER,
                              weights=path, cache_root=cache, cache_name=name, device=CPU,
                              write_cache=True, **kw)


def test_rgb_uint8_conversion():
    x = torch.tensor([0, 8, 16]).view(1, 1, 1, 3)
    y = q.to_rgb_uint8(x, 17)
    assert y.dtype == torch.uint8 and y.shape == (1, 3, 1, 3)
    assert y[0, :, 0].tolist() == [[0, 128, 255]] * 3
    with pytest.raises(q.QualityError, match="outside 0..16"):
        q.to_rgb_uint8(x + 1, 17)


def test_fid_closed_form_torch_fidelity_and_torchmetrics():
    g = np.random.default_rng(0)
    f1 = g.normal(size=(500, 16))
    f2 = g.normal(size=(400, 16)) @ g.normal(size=(16, 16)) * 0.3 + 0.5
    ref = fid_numpy(f1, f2)
    s1, s2 = fid_features_to_statistics(torch.from_numpy(f1)), fid_features_to_statistics(torch.from_numpy(f2))
    tf = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    assert tf == pytest.approx(ref, rel=1e-4)
    tm = _compute_fid(torch.from_numpy(s1["mu"]), torch.from_numpy(s1["sigma"]),
                      torch.from_numpy(s2["mu"]), torch.from_numpy(s2["sigma"])).item()
    assert tm == pytest.approx(ref, rel=1e-4)
    assert fid_numpy(f1, f1) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_set_against_itself_is_zero(digits, classifier_path, tmp_path):
    m = metrics(digits[:600], digits[:600], classifier_path, tmp_path)
    assert abs(m["fid"]) < 1e-6
    # KID's subsets of the two sides overlap here, so identical pairs make it <= 0, not > 0
    assert m["kid"] < 4 * m["kid_std"] / 20**0.5, m
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_torch_fidelity_and_torchmetrics_agree_on_the_classifier_features(digits, classifier_path, tmp_path):
    gen = torch.Generator().manual_seed(0)
    fake = (digits[600:1200] + torch.randint(-2, 3, digits[600:1200].shape, generator=gen)).clamp(0, 16)
    tf = metrics(fake, digits[:600], classifier_path, tmp_path)["fid"]
    tm = q.torchmetrics_fid(q.ImageSet(fake, 17), q.ImageSet(digits[:600], 17), extractor=q.CLASSIFIER,
                            weights=classifier_path, device=CPU)
    assert tf > 0.1
    assert tm == pytest.approx(tf, rel=1e-3)


def test_fid_bootstrap_replicates_against_a_resampling_written_here(digits, classifier_path, tmp_path):
    """The sample stage's FID replicates: the samples' classifier features resampled with
    replacement (the seeded draws redone here) and scored by torchmetrics' Fréchet distance
    against the reference statistics of torch-fidelity's cache; the features are the ones
    torch-fidelity's FID uses (no resampling: its FID)."""
    fake, ref = digits[600:1000], digits[:600]
    tf = metrics(fake, ref, classifier_path, tmp_path, name="boot")["fid"]
    stats = q.reference_statistics(tmp_path, "boot", q.CLASSIFIER)
    feats = q.classifier_features(classifier_path, fake, 17)
    mu, sigma = torch.from_numpy(stats["mu"]).double(), torch.from_numpy(stats["sigma"]).double()
    assert _compute_fid(feats.double().mean(0), torch.cov(feats.double().T), mu, sigma).item() == pytest.approx(
        tf, rel=1e-4)
    reps = q.fid_bootstrap(feats, stats, 5, seed=3)
    gen = torch.Generator().manual_seed(3)
    for value in reps:
        f = feats[torch.randint(0, len(feats), (len(feats),), generator=gen)].double()
        expected = _compute_fid(f.mean(0), torch.cov(f.T), mu, sigma).item()
        assert value == pytest.approx(expected, rel=1e-4)
    assert len(set(reps)) == 5 and np.mean(reps) > tf  # duplicated samples: resampled FIDs sit above
    with pytest.raises(q.QualityError, match="reference statistics missing"):
        q.reference_statistics(tmp_path, "none", q.CLASSIFIER)


def test_fid_grows_with_corruption(digits, classifier_path, tmp_path):
    gen = torch.Generator().manual_seed(1)
    real, ref = digits[:700], digits[700:1400]
    noise = torch.randint(0, 17, real.shape, generator=gen).double()
    fids, kids = [], []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):  # mix with uniform noise images (Heusel et al. 2017)
        corrupted = ((1 - alpha) * real + alpha * noise).round().long()
        m = metrics(corrupted, ref, classifier_path, tmp_path)
        fids.append(m["fid"])
        kids.append(m["kid"])
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids


def test_reference_cache_is_required_when_not_writing(digits, classifier_path, tmp_path):
    with pytest.raises(q.QualityError, match="reference statistics missing.*run the `features` stage"):
        q.fidelity_metrics(q.ImageSet(digits[:50], 17), q.ImageSet(digits[:50], 17), extractor=q.CLASSIFIER,
                           weights=classifier_path, cache_root=tmp_path, cache_name="none", device=CPU,
                           kid_subset_size=50, kid_subsets=2, prc_neighborhood=3, seed=0)


def test_missing_or_corrupt_classifier_is_a_clear_error(tmp_path):
    with pytest.raises(q.QualityError, match="no domain classifier at .*train-classifier"):
        q.load_classifier(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(q.QualityError, match="unreadable"):
        q.load_classifier(tmp_path / "bad.pt")


def test_inception_weights_load_from_a_local_file_without_network(tmp_path, monkeypatch, digits):
    """Write a weights file in torch-fidelity's format (a state dict of its Inception-v3),
    then load it through the same path the pipeline uses with all downloads disabled."""
    with monkeypatch.context() as m:  # build an Inception without any weights to get the format
        m.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        fresh = tf_inception.FeatureExtractorInceptionV3(q.INCEPTION, ["2048"])
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in fresh.state_dict().items()}
    path = tmp_path / q.INCEPTION_FILE
    torch.save(state, path)

    def no_network(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert q.inception_status(str(path)) is None
    assert q.inception_status(None) == f"not available: no weights at {tmp_path / 'hub' / 'checkpoints' / q.INCEPTION_FILE}"
    fe = create_feature_extractor(q.INCEPTION, ["2048"], **q.fidelity_kwargs(q.INCEPTION, path, CPU))
    for k, v in fe.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        (feats,) = fe(q.to_rgb_uint8(digits[:2], 17))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_the_shipped_classifier_is_verified_and_a_tampered_file_is_refused(tmp_path, monkeypatch):
    path, digest = q.classifier_weights("digits")
    record = json.loads(path.with_suffix(".json").read_text())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
    assert q.extractor_label(q.CLASSIFIER, digest) == f"classifier (sha256 {digest[:12]})"
    monkeypatch.setattr(q, "ASSETS", tmp_path)
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(path.with_suffix(".json"), tmp_path / path.with_suffix(".json").name)
    assert q.classifier_weights("digits")[1] == digest  # an identical copy is accepted
    blob = bytearray((tmp_path / path.name).read_bytes())
    blob[-1] ^= 1  # one bit changed
    (tmp_path / path.name).write_bytes(bytes(blob))
    with pytest.raises(q.QualityError, match=r"has SHA-256 [0-9a-f]{64}, but classifier-digits.json records "
                                             f"{digest}: the file was modified or replaced"):
        q.classifier_weights("digits")
    (tmp_path / path.with_suffix(".json").name).unlink()
    with pytest.raises(q.QualityError, match="recorded SHA-256 .* is missing"):
        q.classifier_weights("digits")
    with pytest.raises(q.QualityError, match=r"no FID classifier weights at .*classifier-mnist\.pt: retrain .*"
                                             "train-classifier"):
        q.classifier_weights("mnist")


@pytest.mark.slow
def test_retraining_the_classifier_reproduces_its_accuracy_not_its_bits():
    """The documented retraining (train-classifier: the defaults of FeaturesConfig on the
    training split, accuracy on validation) gives the shipped file's validation accuracy."""
    f = FeaturesConfig()
    split = {s: data.load("digits", s) for s in ("train", "val")}
    t = {s: (torch.from_numpy(d.images).long(), torch.from_numpy(d.labels).long()) for s, d in split.items()}
    res = q.train_classifier(*t["train"], *t["val"], 17, epochs=f.epochs, width=f.width, lr=f.lr,
                             batch_size=f.batch_size, seed=f.seed)
    shipped = json.loads(q.shipped_classifier("digits").with_suffix(".json").read_text())
    assert shipped["n_train"] == len(split["train"]) and shipped["n_val"] == len(split["val"])
    assert res.test_accuracy == pytest.approx(shipped["val_accuracy"], abs=0.01)
