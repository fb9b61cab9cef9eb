"""The table diffusion model (sdpipe.tabular.model, diffusion, generate): what it generates and imputes.

A small mixed table (two correlated numbers, one with missing cells; an integer; a category that follows
the first number; a boolean) trains for a few hundred steps in each categorical mode, and each test guards
one promise of docs/table-models.md: save/load and the seed rules, the source's columns and dtypes,
learning, imputation (observed cells unchanged, missing ones filled, a spread over draws) and conditioning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sdpipe.config import load_config
from sdpipe.tabular.generate import generate_rows, impute
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import TablePreprocessor, fit_preprocessor, table_frame
from sdpipe.tabular.schema import Column, TypedTable
from sdpipe.tabular.train import TableModel, load_table_model, train_table_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TYPES = {"a": "numeric", "b": "numeric", "k": "integer", "c": "categorical", "flag": "boolean"}
FAST = [
    "train.steps=400",
    "train.batch_size=64",
    "train.warmup_steps=10",
    "train.learning_rate=3e-3",
    "train.uncertainty_weighting=false",
    "train.checkpoint_every=1000",
    "train.ema_decay=0.99",
]
SMALL = {"width": 64, "depth": 2, "time_embedding": 32, "sample_steps": 30}


def mixed_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """a ~ 50 + 10 N(0,1) with 10 % missing; b = 2 (a - 50) / 10 + noise; k uniform 0..4; c = low / mid / high
    as a is below 45, within, or above 55; flag 30 % True."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, n)
    a = np.where(rng.random(n) < 0.1, np.nan, np.round(10 * z + 50, 2))
    return pd.DataFrame(
        {
            "a": a,
            "b": np.round(2 * z + rng.normal(0, 0.5, n), 3),
            "k": pd.Series(rng.integers(0, 5, n), dtype="int64"),
            "c": pd.Series(np.where(z > 0.5, "high", np.where(z < -0.5, "low", "mid")), dtype=object),
            "flag": rng.random(n) < 0.3,
        }
    )


def typed(frame: pd.DataFrame) -> TypedTable:
    columns = [Column(name, TYPES[name], "set in the test", "") for name in frame.columns]
    values = {name: frame[name].reset_index(drop=True) for name in frame.columns}
    return TypedTable(columns, values, {k: v.isna().to_numpy() for k, v in values.items()}, len(frame))


def category_rule(a: pd.Series) -> pd.Series:
    """The category the table's rule gives a value of `a` (NaN: none)."""
    return pd.Series(np.where(a > 55, "high", np.where(a < 45, "low", "mid")), index=a.index).where(a.notna())


def train_small(run_dir: Path, categorical: str = "masked", sets: tuple[str, ...] = ()) -> TableModel:
    frame = mixed_frame()
    pre = fit_preprocessor(typed(frame))
    cfg = load_config(None, [*FAST, *sets]).train
    out = train_table_model(
        pre.encode(frame), None, pre, TableModelConfig(categorical=categorical, **SMALL), cfg, run_dir
    )
    return out.model


@pytest.fixture(scope="module", params=["masked", "onehot"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[TableModel, Path]:
    from sd_fixtures import torch_threads

    run = tmp_path_factory.mktemp(f"table-{request.param}") / "run"
    with torch_threads(1):
        model = train_small(run, request.param)
    return model, run / "model"


def test_model_folder_holds_the_denoiser_preprocessor_and_kind(trained: tuple[TableModel, Path]) -> None:
    model, path = trained
    assert json.loads((path / "sdpipe.json").read_text())["kind"] == "table"
    assert (path / "denoiser" / "config.json").is_file() and (path / "preprocess" / "preprocess.json").is_file()
    saved = load_file(str(path / "denoiser" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in model.denoiser.state_dict().items())
    assert TableModelConfig.model_validate_json((path / "table_model.json").read_text()) == model.config
    with pytest.raises(ValueError, match="not a table model"):
        (path / "sdpipe.json").write_text(json.dumps({"kind": "pixel-class"}))
        try:
            load_table_model(path)
        finally:
            (path / "sdpipe.json").write_text(json.dumps({"kind": "table", "format": 1}))


def test_saved_model_generates_the_same_rows_and_seeds_are_per_row(trained: tuple[TableModel, Path]) -> None:
    model, path = trained
    loaded = load_table_model(path)
    rows = generate_rows(model, 20, seed=7, micro_batch=8)
    pd.testing.assert_frame_equal(generate_rows(loaded, 20, seed=7, micro_batch=8), rows)
    # row i comes from seed + i whatever n: 3 rows (one padded batch) and 20 rows (three batches) agree
    pd.testing.assert_frame_equal(generate_rows(loaded, 3, seed=7, micro_batch=8), rows.iloc[:3])
    shifted = generate_rows(loaded, 10, seed=17, micro_batch=8)  # its row 0 is seed 17: row 10 of `rows`
    pd.testing.assert_frame_equal(shifted.iloc[:2].reset_index(drop=True), rows.iloc[10:12].reset_index(drop=True))
    other = generate_rows(loaded, 20, seed=8, micro_batch=8)
    assert not other["b"].equals(rows["b"])


def test_generated_frame_has_the_source_columns_and_dtypes(trained: tuple[TableModel, Path]) -> None:
    model, _ = trained
    source = mixed_frame()
    rows = generate_rows(model, 50, seed=0)
    assert list(rows.columns) == list(source.columns) and len(rows) == 50
    assert rows.dtypes.to_dict() == source.dtypes.to_dict()
    assert set(rows["c"]) <= {"low", "mid", "high"} and rows["k"].between(0, 4).all()


def test_learning_recovers_the_category_that_follows_a_number(trained: tuple[TableModel, Path]) -> None:
    """c is a function of a; with independent columns (chance) about 38 % of rows would agree with it.
    Measured: ~80 % (masked), ~67 % (onehot) at seed 0; a network blind to its numeric input gets ~38 %."""
    model, _ = trained
    rows = generate_rows(model, 300, seed=0)
    known = rows["a"].notna()
    agree = (rows.loc[known, "c"] == category_rule(rows.loc[known, "a"])).mean()
    assert agree > 0.55, agree
    shares = rows["c"].value_counts(normalize=True)
    real = mixed_frame()["c"].value_counts(normalize=True)
    assert 0.5 * shares.sub(real, fill_value=0).abs().sum() < 0.15  # the marginal too (measured: <= 0.11)
    assert abs(np.corrcoef(rows.loc[known, "a"], rows.loc[known, "b"])[0, 1] - 0.97) < 0.15


def test_impute_keeps_observed_cells_and_fills_the_missing_ones(trained: tuple[TableModel, Path]) -> None:
    model, _ = trained
    frame = mixed_frame(60, seed=3)
    rng = np.random.default_rng(0)
    frame.loc[rng.random(60) < 0.3, "b"] = np.nan
    frame["c"] = frame["c"].where(rng.random(60) > 0.3, None)
    out = impute(model, frame, draws=6, seed=1)
    observed = frame.notna()
    for name in frame.columns:
        for result in (out.frame, *out.draws):
            kept = result.loc[observed[name], name]
            assert kept.equals(frame.loc[observed[name], name]), name  # unchanged, bitwise
    assert not out.frame[["a", "b", "c"]].isna().any().any()  # every missing cell filled
    assert out.frame.dtypes.to_dict() == frame.dtypes.to_dict()
    missing = int((~observed[["a", "b", "c"]]).to_numpy().sum())
    assert len(out.cells) == missing
    numbers = out.cells[out.cells["column"] != "c"]
    assert (numbers["low"] <= numbers["value"]).all() and (numbers["value"] <= numbers["high"]).all()
    assert (numbers["high"] > numbers["low"]).mean() > 0.8  # six draws spread
    shares = out.cells.loc[out.cells["column"] == "c", "shares"]
    assert all(abs(sum(s.values()) - 1) < 1e-9 and set(s) <= {"low", "mid", "high"} for s in shares)
    again = impute(model, frame, draws=6, seed=1)
    pd.testing.assert_frame_equal(again.frame, out.frame)
    # draw k of row j is seed + j * draws + k: the rows of a sub-frame are drawn differently (other j)
    assert not impute(model, frame, draws=6, seed=2).frame["b"].equals(out.frame["b"])


def test_condition_fixes_the_value_and_the_rest_follows(trained: tuple[TableModel, Path]) -> None:
    model, _ = trained
    rows = generate_rows(model, 40, seed=0, condition={"c": "high"})
    assert (rows["c"] == "high").all() and rows["c"].dtype == object
    assert (rows["a"].dropna() > 45).mean() > 0.8  # "high" rows have a above 55 in the data
    by_number = generate_rows(model, 40, seed=0, condition={"a": 30.0})
    assert (by_number["a"] == 30.0).all()
    assert (by_number["c"] == "low").mean() > 0.45  # the share of "low" in the data is ~0.31
    with pytest.raises(ValueError, match="unknown column 'nope'"):
        generate_rows(model, 2, seed=0, condition={"nope": 1})
    with pytest.raises(ValueError, match="'c'.*'huge'"):
        generate_rows(model, 2, seed=0, condition={"c": "huge"})


def test_preprocessor_round_trip_is_what_the_model_saves(trained: tuple[TableModel, Path]) -> None:
    model, path = trained
    pre = TablePreprocessor.load(path / "preprocess")
    assert pre.category_sizes == model.preprocessor.category_sizes
    assert pre.numeric_names == ["a", "b", "k"]
    frame = table_frame(typed(mixed_frame()))
    assert torch.equal(pre.encode(frame).numeric, model.preprocessor.encode(frame).numeric)
