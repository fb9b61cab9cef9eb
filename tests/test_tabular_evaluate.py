"""Table evaluation (sdpipe.tabular.evaluate, issue 18 item 6): what each figure promises in docs/table-models.md.

A small mixed table with a known rule (two correlated numbers, one with missing cells; an integer; a category
that follows the first number; a boolean) is drawn afresh per seed, so "real vs real" compares two draws of
the same distribution. Broken generators (columns shuffled independently, a constant column, copies of the
training rows) must score clearly worse on the figure that should catch them. Imputation: an imputer that
returns the truth scores exactly; baselines are worse. The end-to-end test trains a tiny model for a few
steps and checks metrics.json, the report and the set counts. Figures needing sdmetrics skip without it
(`pytest.importorskip`), and one test hides sdmetrics to show the rest still works.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from sdpipe.tabular import evaluate_metrics as em
from sdpipe.tabular.evaluate import evaluate_imputation, evaluate_samples, evaluate_table_model, hide_cells

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = {"a": "numerical", "b": "numerical", "k": "numerical", "c": "categorical", "flag": "categorical"}


def table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """a ~ 50 + 10 z (10 % missing), b = 2 z + noise, k uniform 0..4, c = low/mid/high by z, flag 30 % True."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, n)
    return pd.DataFrame(
        {
            "a": np.where(rng.random(n) < 0.1, np.nan, np.round(10 * z + 50, 2)),
            "b": np.round(2 * z + rng.normal(0, 0.5, n), 3),
            "k": pd.Series(rng.integers(0, 5, n), dtype="int64"),
            "c": pd.Series(np.where(z > 0.5, "high", np.where(z < -0.5, "low", "mid")), dtype=object),
            "flag": rng.random(n) < 0.3,
        }
    )


def shuffled(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each column permuted on its own: the same column shapes, no pair trends."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({c: frame[c].to_numpy()[rng.permutation(len(frame))] for c in frame.columns})


HELDOUT, TRAIN = table(400, 1), table(400, 2)


def test_real_rows_get_near_perfect_quality_and_broken_rows_lose_it() -> None:
    pytest.importorskip("sdmetrics", reason="the quality report is SDMetrics'")
    real = evaluate_samples([table(400, 10), table(400, 11)], HELDOUT, kinds=KINDS)["figures"]
    # SDMetrics' pair trends bin each table's numbers on its own range, so two real draws of 400 rows score
    # about 0.7-0.8 there (docs/table-models.md, "Evaluation"); column shapes come near 1
    assert real["column_shapes"]["mean"] > 0.93 and real["quality_score"]["mean"] > 0.8
    broken = evaluate_samples([shuffled(table(400, 10))], HELDOUT, kinds=KINDS)["figures"]
    assert broken["column_shapes"]["mean"] == pytest.approx(real["column_shapes"]["values"][0], abs=1e-9)
    assert broken["column_pair_trends"]["mean"] < real["column_pair_trends"]["mean"] - 0.2
    constant = table(400, 10).assign(b=0.0, c="mid")
    flat = evaluate_samples([constant], HELDOUT, kinds=KINDS)["figures"]
    assert flat["column_shapes"]["mean"] < real["column_shapes"]["mean"] - 0.15


def test_detection_is_chance_for_real_rows_and_high_for_broken_ones() -> None:
    real = evaluate_samples([table(400, s) for s in (10, 11, 12)], HELDOUT, kinds=KINDS)
    acc = real["figures"]["detection_accuracy"]
    assert len(acc["values"]) == 3 and acc["low"] <= acc["mean"] <= acc["high"]
    assert 0.4 < acc["mean"] < 0.6 and real["figures"]["detection_auc"]["mean"] < 0.62
    broken = evaluate_samples([shuffled(table(400, s), s) for s in (10, 11)], HELDOUT, kinds=KINDS)["figures"]
    assert broken["detection_accuracy"]["mean"] > 0.75 and broken["detection_auc"]["mean"] > 0.8


def test_efficacy_matches_real_rows_and_drops_for_broken_ones() -> None:
    got = evaluate_samples([table(400, 10)], HELDOUT, TRAIN, kinds=KINDS, target="c")
    fig = got["figures"]
    assert got["target"] == "c" and got["efficacy_task"] == "classification"
    assert fig["efficacy_real"]["mean"] > 0.9 and fig["efficacy_ratio"]["mean"] > 0.95
    broken = evaluate_samples([shuffled(table(400, 10))], HELDOUT, TRAIN, kinds=KINDS, target="c")["figures"]
    assert broken["efficacy_ratio"]["mean"] < 0.7
    assert evaluate_samples([table(400, 10)], HELDOUT, TRAIN, kinds=KINDS)["target"] == "flag"  # last category
    numeric = evaluate_samples([table(400, 10)], HELDOUT, TRAIN, kinds=KINDS, target="b")
    assert numeric["efficacy_task"] == "regression" and numeric["figures"]["efficacy_real"]["mean"] > 0.8


def test_privacy_share_is_half_for_fresh_rows_and_one_for_copies() -> None:
    pytest.importorskip("sdmetrics", reason="the distance to closest record is SDMetrics'")
    fresh = evaluate_samples([table(400, 10)], HELDOUT, TRAIN, kinds=KINDS)["figures"]
    assert 0.35 < fresh["closer_to_training_share"]["mean"] < 0.65
    copies = evaluate_samples([TRAIN.copy()], HELDOUT, TRAIN, kinds=KINDS)["figures"]
    assert copies["closer_to_training_share"]["mean"] > 0.95
    assert copies["dcr_overfitting_protection"]["mean"] < 0.1 < fresh["dcr_overfitting_protection"]["mean"]


def test_hidden_cells_are_observed_ones_at_the_share_asked() -> None:
    masked, mask = hide_cells(HELDOUT, KINDS, 0.2, seed=3)
    assert mask.shape == (len(HELDOUT), len(KINDS)) and 0.15 < mask.mean() < 0.25
    assert not (mask & HELDOUT[list(KINDS)].isna().to_numpy()).any()  # only observed cells are hidden
    assert (masked[list(KINDS)].isna().to_numpy() == (mask | HELDOUT[list(KINDS)].isna().to_numpy())).all()
    again, mask2 = hide_cells(HELDOUT, KINDS, 0.2, seed=3)
    assert (mask == mask2).all() and not (mask == hide_cells(HELDOUT, KINDS, 0.2, seed=4)[1]).all()


def test_a_perfect_imputer_scores_exactly_and_baselines_do_worse() -> None:
    truth = HELDOUT.iloc[:200].reset_index(drop=True)
    got = evaluate_imputation(None, truth, TRAIN, sets=3, imputer=lambda m, s: (truth, [truth]), kinds=KINDS)
    perfect = got["methods"]["sdpipe"]
    assert perfect["mae"]["mean"] == 0 and perfect["rmse"]["mean"] == 0 and perfect["crps"]["mean"] == 0
    assert perfect["accuracy"]["mean"] == 1 and perfect["coverage"]["mean"] == 1
    assert len(perfect["mae"]["values"]) == 3 and len(got["hidden_cells"]) == 3
    for name in ("mean_mode", "knn", "mice"):
        assert got["methods"][name]["mae"]["mean"] > 0.1, name
    # b follows a, so neighbours and chained equations beat the mean
    assert got["methods"]["mice"]["mae"]["mean"] < got["methods"]["mean_mode"]["mae"]["mean"]
    # a wrong imputer (everything shifted by one standard deviation) gets that error
    shifted = truth.assign(b=truth["b"] + TRAIN["b"].std(ddof=0))
    off = evaluate_imputation(None, truth, TRAIN, sets=1, imputer=lambda m, s: (shifted, [shifted]),
                              kinds={"b": "numerical"}, baselines=())["methods"]["sdpipe"]  # fmt: skip
    assert off["mae"]["mean"] == pytest.approx(1.0) and off["coverage"]["mean"] == 0


def test_crps_rewards_a_spread_that_covers_the_truth() -> None:
    truth = HELDOUT.iloc[:100].reset_index(drop=True)
    kinds, scale = {"b": "numerical"}, {"b": 1.0}
    mask = np.ones((len(truth), 1), dtype=bool)
    rng = np.random.default_rng(0)
    spread = [truth.assign(b=truth["b"] + rng.normal(0, 1, len(truth))) for _ in range(40)]
    wide = em.crps_and_coverage(truth, spread, mask, kinds, scale)
    point = em.crps_and_coverage(truth, [truth.assign(b=truth["b"] + 1.0)], mask, kinds, scale)
    assert wide["coverage"] > 0.85 and point["coverage"] == 0
    # X = y + N(0, 1): CRPS = E|Z| - E|Z - Z'| / 2 = 0.798 - 0.564 = 0.234; a point one unit off: 1
    assert 0.15 < wide["crps"] < 0.33 and point["crps"] == pytest.approx(1.0)


def test_without_sdmetrics_the_other_figures_are_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_sdmetrics(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sdmetrics" or name.startswith("sdmetrics."):
            raise ImportError("no sdmetrics in this test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdmetrics)
    assert em.sdmetrics_version() is None
    got = evaluate_samples([table(300, 10)], HELDOUT, TRAIN, kinds=KINDS)
    assert got["sdmetrics"] is None
    assert got["skipped"]["quality_score"].startswith("skipped: pip install sdmetrics")
    assert "closer_to_training_share" in got["skipped"] and "quality_score" not in got["figures"]
    assert {"detection_accuracy", "efficacy_synthetic", "efficacy_real"} <= set(got["figures"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_fixtures import torch_threads
    from sdpipe.config import load_config
    from sdpipe.tabular.model_config import TableModelConfig
    from sdpipe.tabular.preprocess import fit_preprocessor
    from sdpipe.tabular.schema import Column, TypedTable
    from sdpipe.tabular.train import train_table_model

    types = {"a": "numeric", "b": "numeric", "k": "integer", "c": "categorical", "flag": "boolean"}
    columns = [Column(name, types[name], "set in the test", "") for name in TRAIN.columns]
    values = {name: TRAIN[name].reset_index(drop=True) for name in TRAIN.columns}
    typed = TypedTable(columns, values, {k: v.isna().to_numpy() for k, v in values.items()}, len(TRAIN))
    pre = fit_preprocessor(typed)
    sets = ["train.steps=150", "train.batch_size=64", "train.warmup_steps=10", "train.learning_rate=3e-3",
            "train.uncertainty_weighting=false", "train.checkpoint_every=1000"]  # fmt: skip
    run = tmp_path_factory.mktemp("table-eval") / "run"
    small = TableModelConfig(width=32, depth=2, time_embedding=16, sample_steps=10)
    with torch_threads(1):
        train_table_model(pre.encode(TRAIN), None, pre, small, load_config(None, sets).train, run)
    return run / "model"


def test_evaluate_table_model_writes_metrics_with_intervals_over_sets(tiny_model: Path, tmp_path: Path) -> None:
    heldout = HELDOUT.iloc[:120].reset_index(drop=True)
    got = evaluate_table_model(tiny_model, heldout, TRAIN.iloc[:120], tmp_path / "eval", sets=2, n=120,
                               seed=5, draws=4)  # fmt: skip
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["figures"]) == set(got["figures"]) and saved["target"] == got["target"] == "flag"
    assert saved["settings"] == {"sets": 2, "n": 120, "seed": 5, "heldout_rows": 120, "train_rows": 120}
    for name in ("detection_accuracy", "efficacy_synthetic", "sample_seconds"):
        assert len(saved["figures"][name]["values"]) == 2 and saved["figures"][name]["scale"], name
    assert saved["kinds"] == KINDS and saved["sdmetrics"] == em.sdmetrics_version()
    if saved["sdmetrics"] is not None:
        assert saved["thresholds"] == {"real_correlation_threshold": 0.5, "real_association_threshold": 0.3}
        assert 0 < saved["figures"]["quality_score"]["mean"] <= 1
    methods = saved["imputation"]["methods"]
    assert set(methods) == {"sdpipe", "mean_mode", "knn", "mice"}
    assert len(methods["sdpipe"]["crps"]["values"]) == 2 and 0 <= methods["sdpipe"]["coverage"]["mean"] <= 1
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "detection_accuracy" in page and "mean_mode" in page
    # the same seed gives the same figures
    again = evaluate_table_model(tiny_model, heldout, TRAIN.iloc[:120], None, sets=2, n=120, seed=5, draws=4)
    assert again["figures"]["detection_accuracy"] == saved["figures"]["detection_accuracy"]
