"""The held-out judge on the digits: what real data, copies, noisy copies and a crude generator score.

Each figure's meaning is a claim: real training images score a Frechet ratio of about 1.0 and a two-sample
accuracy of about 0.5 against the held-out part, copies of training images are caught as near-copies, noisier
or cruder "generators" score worse on both; every figure comes from the judge's seed alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdpipe.config import DataConfig, EvaluateConfig
from sdpipe.data.imageset import split_arrays
from sdpipe.evaluate.intervals import apart, interval, summarize
from sdpipe.evaluate.judge import Judge, draw_training_copies
from sdpipe.evaluate.run import fit_judge


@pytest.fixture(scope="module")
def parts():
    cfg = DataConfig()
    return split_arrays(cfg, "train"), split_arrays(cfg, "test")


@pytest.fixture(scope="module")
def judge(parts) -> Judge:
    return fit_judge(*parts, EvaluateConfig())


def _copies(parts, n: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    train = parts[0]
    rng = np.random.default_rng(seed)
    pick = draw_training_copies(len(train.images), train.labels, n, rng)
    x = train.images[pick] + rng.normal(0, noise, train.images[pick].shape) if noise else train.images[pick]
    return np.clip(np.round(x * 255 / 16) * 16 / 255, 0, 16), train.labels[pick]  # as PNG pixels


def test_real_training_images_score_about_one_and_chance(judge: Judge, parts) -> None:
    fresh = [judge.score(*_copies(parts, 1000, seed)) for seed in range(3)]
    ratios = [s["fd_ratio"] for s in fresh]
    assert 0.85 < np.mean(ratios) < 1.15, ratios
    assert all(s["two_sample_accuracy"] < 0.58 for s in fresh)
    assert 0.4 < judge.real_two_sample() < 0.58
    assert all(s["label_accuracy"] > 0.99 for s in fresh)  # on training images themselves
    assert all(s["near_copy_share"] == 1.0 for s in fresh)  # copies are copies


def test_noisier_and_cruder_generators_score_worse(judge: Judge, parts) -> None:
    train = parts[0]
    noisy = judge.score(*_copies(parts, 1000, 0, noise=1.5))
    assert 1.2 < noisy["fd_ratio"] < 2.0 and noisy["near_copy_share"] < 0.5
    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10
    gauss = np.stack(
        [
            rng.multivariate_normal(
                train.images[train.labels == c].reshape(-1, 64).mean(0),
                np.cov(train.images[train.labels == c].reshape(-1, 64), rowvar=False),
            )
            for c in labels
        ]
    ).clip(0, 16)
    crude = judge.score(gauss, labels)
    assert crude["fd_ratio"] > noisy["fd_ratio"] + 0.3
    assert crude["two_sample_accuracy"] > 0.6 and crude["near_copy_share"] == 0.0


def test_near_copy_threshold_is_the_heldout_first_percentile(judge: Judge, parts) -> None:
    heldout = parts[1]
    share = judge.score(heldout.images, None)["near_copy_share"]
    assert 0.0 < share <= 0.02  # by construction about 1 % of new real images fall under it
    assert judge.copy_threshold > 0


def test_the_judge_repeats_exactly(parts) -> None:
    samples, labels = _copies(parts, 500, 7, noise=1.0)
    a = fit_judge(*parts, EvaluateConfig()).score(samples, labels)
    b = fit_judge(*parts, EvaluateConfig()).score(samples, labels)
    assert a == b


def test_unlabelled_data_gets_every_figure_but_label_accuracy(parts) -> None:
    train, heldout = parts
    j = Judge.fit(train.images, None, heldout.images, value_range=(0.0, 16.0))
    s = j.score(train.images[:300], np.zeros(300, dtype=np.int64))
    assert "label_accuracy" not in s and {"fd_ratio", "two_sample_accuracy", "near_copy_share"} <= set(s)


def test_interval_of_the_mean_and_summary() -> None:
    iv = interval([1.0, 2.0, 3.0, 4.0])
    assert iv["mean"] == 2.5 and iv["low"] == pytest.approx(2.5 - 3.182446 * np.std([1, 2, 3, 4], ddof=1) / 2)
    assert interval([2.0])["low"] == interval([2.0])["high"] == 2.0
    rows = [{"fd_ratio": v, "sampler": "euler", "n": 10} for v in (1.0, 1.2, 1.1, 1.3)]
    s = summarize(rows)
    assert s["fd_ratio"] == pytest.approx(1.15) and s["sets"] == 4 and s["sampler"] == "euler"
    assert s["intervals"]["fd_ratio"]["values"] == [1.0, 1.2, 1.1, 1.3] and "n" not in s["intervals"]
    assert apart({"low": 1, "high": 2}, {"low": 2.5, "high": 3}) and not apart(
        {"low": 1, "high": 2.6}, {"low": 2.5, "high": 3}
    )
