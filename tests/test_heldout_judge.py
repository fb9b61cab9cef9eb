"""Fast checks of bench/heldout_judge.py's judge functions on synthetic arrays (no training, no sdpipe calls)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from heldout_judge import (  # noqa: E402
    Judge,
    frechet,
    from_pixels,
    interval,
    nearest_distance,
    passes,
    quantize,
    read_samples,
    references,
    split,
    summarize,
    to_pixels,
    two_sample_accuracy,
    write_folder,
)


def blobs(n: int, seed: int, centres: np.ndarray, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """n 64-pixel images in 0..16 around 10 class centres, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = np.clip(centres[y] + rng.normal(0, spread, (n, 64)), 0, 16)
    return x, y


@pytest.fixture(scope="module")
def centres() -> np.ndarray:
    return np.random.default_rng(123).uniform(0, 16, (10, 64))


@pytest.fixture(scope="module")
def judge(centres: np.ndarray) -> Judge:
    x_tr, y_tr = blobs(400, 1, centres)
    x_te, y_te = blobs(100, 2, centres)
    return Judge(components=8, real_draws=3).fit(x_tr, y_tr, x_te, y_te)


def test_pixels_round_trip() -> None:
    v = np.arange(17, dtype=float)
    px = to_pixels(v)
    assert px.dtype == np.uint8 and px[0] == 0 and px[-1] == 255 and px[8] == 128  # round(8*255/16) = 127.5 -> 128
    assert np.abs(from_pixels(px) - v).max() <= 0.5 * 16 / 255
    q = quantize(np.array([-3.0, 4.2, 20.0]))
    assert q[0] == 0 and q[-1] == 16 and np.allclose(q, from_pixels(to_pixels(q)))


def test_interval() -> None:
    mean, lo, hi = interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    # t(0.975, 3) = 3.182, sd = 1.291, half = 3.182 * 1.291 / 2
    assert hi - mean == pytest.approx(3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-3)
    assert mean - lo == pytest.approx(hi - mean)
    one = interval([0.7])
    assert one[0] == 0.7 and np.isnan(one[1]) and np.isnan(one[2])


def test_frechet_known_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    c = a @ a.T + np.eye(5)
    mu = rng.normal(size=5)
    assert frechet(mu, c, mu, c) == pytest.approx(0.0, abs=1e-8)
    assert frechet(mu, c, mu + 2.0, c) == pytest.approx(5 * 4.0, rel=1e-8)
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    assert frechet(np.zeros(3), np.diag(d1), np.zeros(3), np.diag(d2)) == pytest.approx(2.0, rel=1e-8)


def test_nearest_distance_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 16, (20, 64)), rng.uniform(0, 16, (30, 64))
    brute = np.array([min(np.linalg.norm(p - q) for q in b) for p in a])
    assert np.allclose(nearest_distance(a, b), brute)
    assert np.array_equal(nearest_distance(b[:5], b), np.zeros(5))


def test_two_sample_accuracy(centres: np.ndarray) -> None:
    x1, _ = blobs(100, 3, centres)
    x2, _ = blobs(100, 4, centres)
    assert two_sample_accuracy(x1, x2) < 0.65
    assert two_sample_accuracy(x1, np.clip(x2 + 4.0, 0, 16)) > 0.9


def test_judge_scores(judge: Judge, centres: np.ndarray) -> None:
    new, y = blobs(200, 5, centres)
    s = judge.score(new, y)
    # the denominator's random training subsets are not class-balanced, which weighs heavily with 10 well-separated
    # blobs, so new draws from the same blobs score below 1 here
    assert s["fd_ratio"] < 1.6
    assert s["label_accuracy"] == 1.0
    assert s["near_copies"] < 0.05
    assert s["two_sample"] < 0.65
    copies = judge.x_train[:200]
    assert judge.score(copies, judge.classifier.predict(copies))["near_copies"] == 1.0
    blurred = np.clip(new * 0.3 + 5.0, 0, 16)
    worse = judge.score(blurred, y)
    assert worse["fd_ratio"] > 3 * s["fd_ratio"] and worse["two_sample"] > 0.9
    wrong = judge.score(new, (y + 1) % 10)
    assert wrong["label_accuracy"] == 0.0
    assert judge.fd_real(10_000) == judge.fd_real(len(judge.x_train))  # capped at the training size


def test_summarize_and_bars() -> None:
    scores = [
        {"fd_ratio": r, "two_sample": 0.5, "near_copies": 0.01, "label_accuracy": 0.99, "fd": 10.0}
        for r in (1.1, 1.2, 1.3)
    ]
    s = summarize(scores)
    assert s["fd_ratio"]["mean"] == pytest.approx(1.2) and s["fd_ratio"]["pass"]
    assert s["fd_ratio"]["per_set"] == [1.1, 1.2, 1.3]
    assert s["near_copies"]["pass"] and s["label_accuracy"]["pass"] and "pass" not in s["fd"]
    assert not passes("near_copies", 0.02) and passes("label_accuracy", 0.95) and not passes("two_sample", 0.551)


def test_split_is_stratified() -> None:
    sp = split(0)
    assert len(sp.y_train) == 1347 and len(sp.y_test) == 450
    assert not set(sp.i_train) & set(sp.i_test)
    assert np.all(np.abs(np.bincount(sp.y_test) - 45) <= 2)
    assert sp.x_train.max() == 16 and sp.x_train.shape[1] == 64
    assert not np.array_equal(split(1).i_test, sp.i_test)


def test_folder_and_samples_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 17, (12, 64)).astype(float)
    y = np.arange(12) % 10
    assert write_folder(x, y, np.arange(100, 112), tmp_path / "train") == 12
    im = Image.open(tmp_path / "train" / "3" / "0103.png")
    assert im.mode == "L" and im.size == (8, 8)
    assert np.abs(from_pixels(np.asarray(im).reshape(-1)) - x[3]).max() < 0.04
    # a generate-like folder: PNGs plus samples.jsonl with string labels, as `sdpipe generate` writes it
    out = tmp_path / "gen"
    out.mkdir()
    with open(out / "samples.jsonl", "w") as f:
        for i in range(12):
            Image.fromarray(to_pixels(x[i]).reshape(8, 8), mode="L").save(out / f"{i:05d}.png")
            f.write(json.dumps({"file": f"{i:05d}.png", "label": str(y[i]), "seed": i}) + "\n")
    xs, ys = read_samples(out)
    assert np.array_equal(ys, y) and np.allclose(xs, quantize(x))


def test_references_shapes() -> None:
    sp = split(0)
    refs = references(sp, k=2, n=50)
    assert set(refs) == {"train copies", "train + noise 1.0", "train + noise 1.5", "class Gaussian"}
    for sets in refs.values():
        assert len(sets) == 2
        for x, y in sets:
            assert x.shape == (50, 64) and np.array_equal(y, np.arange(50) % 10)
            assert x.min() >= 0 and x.max() <= 16 and np.allclose(x, quantize(x))
    x, y = refs["train copies"][0]
    assert np.allclose(nearest_distance(x, sp.x_train), 0, atol=0.2)  # copies, up to the PNG rounding
    assert not np.array_equal(refs["train copies"][0][0], refs["train copies"][1][0])
