"""Evaluation building blocks on inputs with known answers: precision/recall, FID/KID, memorization, the
feature network and its cache, and the Inception weights checks."""

from pathlib import Path

import numpy as np
import pytest
import torch

from sdpipe.evaluate import Judge
from sdpipe.evaluate.features import (
    INCEPTION_FILE,
    InceptionFeatures,
    load_or_train_feature_net,
    real_features,
    train_feature_net,
)
from sdpipe.evaluate.metrics import fid_kid, memorization, per_class_accuracy, precision_recall


def _gauss(n: int, seed: int, shift: float = 0.0, scale: float = 1.0, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) * scale + shift


def test_precision_recall_separate_fidelity_from_coverage() -> None:
    real = _gauss(600, 0)
    same = precision_recall(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real, _gauss(300, 1, shift=50.0))
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # mode collapse: every sample sits in one small part of the real cloud -> faithful but no coverage
    collapsed = precision_recall(real, _gauss(300, 2, scale=0.05))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.2
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real, real[:3])


def test_fid_and_kid_rank_distributions_and_repeat_exactly() -> None:
    real = _gauss(800, 0)
    close, far = _gauss(400, 1), _gauss(400, 2, shift=1.0)
    a, b = fid_kid(real, close, seed=3), fid_kid(real, far, seed=3)
    assert a["fid"] < 0.5 < b["fid"] and a["kid_mean"] < b["kid_mean"]
    assert b["fid"] == pytest.approx(8.0, rel=0.15)  # mean shift of 1 in 8 dims: ||mu||^2 = 8
    assert fid_kid(real, far, seed=3) == b  # KID's random subsets come from the seed
    assert a["kid_subset_size"] == 400 and a["kid_std"] >= 0


def test_memorization_finds_planted_copies() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 17, size=(200, 1, 8, 8)).astype(np.float64)
    heldout = rng.integers(0, 17, size=(100, 1, 8, 8)).astype(np.float64)
    judge = Judge.fit(train, np.arange(200) % 10, heldout, value_range=(0.0, 16.0))
    samples = rng.integers(0, 17, size=(50, 1, 8, 8)).astype(np.float64) + 40  # far from every training image
    samples[[4, 9]] = train[[17, 3]]  # two exact copies
    samples[20] = train[40] + 0.01
    memo = memorization(judge, samples, pairs=3)
    assert memo["near_copy_share"] == pytest.approx(3 / 50)
    assert {(p["sample"], p["train_index"]) for p in memo["closest_pairs"]} == {(4, 17), (9, 3), (20, 40)}
    assert memo["closest_pairs"][0]["distance"] == 0.0


def test_per_class_accuracy() -> None:
    acc = per_class_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ["a", "b", "c"])
    assert acc == {"accuracy": 0.75, "per_class": {"a": 1.0, "b": 1.0, "c": 0.5}}


def _digit_pixels(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.round(d.images[:n] * 255 / 16).astype(np.uint8), d.target[:n].astype(np.int64)


def test_feature_net_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDPIPE_CACHE_DIR", str(tmp_path))
    px, labels = _digit_pixels(300)
    a = train_feature_net(px, labels, 10, "sha256:test", epochs=2)
    b = train_feature_net(px, labels, 10, "sha256:test", epochs=2)
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    f = a.features(px)
    assert f.shape == (300, 128) and np.sqrt((f**2).mean()) == pytest.approx(1.0)  # scaled to RMS 1

    first = load_or_train_feature_net(px, labels, 10, "sha256:test")
    cached = list((tmp_path / "feature_nets").glob("*.safetensors"))
    assert len(cached) == 1
    again = load_or_train_feature_net(px, labels, 10, "sha256:test")  # loaded, not retrained
    assert np.array_equal(first.features(px[:20]), again.features(px[:20]))
    assert first.name == again.name and "sha256:test" in first.name
    feats = real_features(first, px, "sha256:test")
    assert np.array_equal(real_features(first, px, "sha256:test"), feats)
    assert len(list((tmp_path / "real_features").glob("*.npy"))) == 1


def test_inception_file_absent_or_wrong_gives_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        InceptionFeatures(tmp_path / "missing.pth")
    wrong = tmp_path / INCEPTION_FILE
    wrong.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="sha256"):
        InceptionFeatures(wrong)
