"""The table commands (issue 18, item 5) through the CLI: `sdpipe train` with a table config (validating
first, resume, interrupt, refusals), `sdpipe generate` (same seed, same rows whatever n; CSV and Parquet;
conditions; refusals) and `sdpipe impute` (observed cells unchanged, gaps filled, the intervals file).
Each test guards one promise of docs/table-models.md, "Commands"; a tiny table and budget keep it fast."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdpipe.cli import app
from test_tabular_model import mixed_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "table.yaml"
TINY = [
    "train.steps=20",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "train.validate_every=10",
    "train.threads=1",
    "model.width=32",
    "model.depth=1",
    "model.time_embedding=16",
    "model.sample_steps=8",
]


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _train(table: Path, validated: Path, out: Path, *extra: str) -> Any:
    args = ["train", "--config", str(EXAMPLE), "--out", str(out), "--quiet"]
    args += _sets(f"data.path={table}", f"data.validated_dir={validated}", *TINY)
    return runner.invoke(app, [*args, *extra])


def _ok(result: Any) -> Any:
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sd_fixtures import torch_threads

    root = tmp_path_factory.mktemp("table-cli")
    table = root / "table.csv"
    mixed_frame(120).to_csv(table, index=False)
    with torch_threads(1):
        _ok(_train(table, root / "validated", root / "run"))
    return {"root": root, "table": table, "validated": root / "validated", "run": root / "run"}


def _weights(model: Path) -> dict[str, Any]:
    return load_file(str(model / "denoiser" / "diffusion_pytorch_model.safetensors"))


def test_train_validates_first_and_writes_a_table_model(run: dict[str, Path]) -> None:
    assert (run["validated"] / "report.json").is_file()  # validated_dir was empty: validated first
    model = run["run"] / "model"
    assert json.loads((model / "sdpipe.json").read_text())["kind"] == "table"
    saved = (run["run"] / "table_config.yaml").read_text()
    assert "source: table" in saved and str(run["table"]) in saved  # the data path made absolute
    record = json.loads((model / "sdpipe_training.json").read_text())
    assert record["rows"]["train"] > 0 and sum(record["rows"].values()) == 120
    assert record["dataset_id"] == json.loads((run["validated"] / "schema.json").read_text())["dataset_id"]


def test_same_seed_same_rows_whatever_n(run: dict[str, Path], tmp_path: Path) -> None:
    model = str(run["run"] / "model")
    for n, name in ((5, "five.csv"), (20, "twenty.csv"), (7, "seven.parquet")):
        _ok(
            runner.invoke(
                app, ["generate", "--model", model, "--n", str(n), "--seed", "3", "--out", str(tmp_path / name)]
            )
        )
    five, twenty = pd.read_csv(tmp_path / "five.csv"), pd.read_csv(tmp_path / "twenty.csv")
    assert list(five.columns) == ["a", "b", "k", "c", "flag"] and len(twenty) == 20
    pd.testing.assert_frame_equal(five, twenty.iloc[:5])
    seven = pd.read_parquet(tmp_path / "seven.parquet")
    assert pd.api.types.is_integer_dtype(seven["k"]) and pd.api.types.is_bool_dtype(seven["flag"])
    pd.testing.assert_frame_equal(seven.iloc[:5].reset_index(drop=True), five, check_dtype=False)
    other = tmp_path / "other.csv"
    _ok(runner.invoke(app, ["generate", "--model", model, "--n", "5", "--seed", "4", "--out", str(other)]))
    assert not pd.read_csv(other).equals(five)  # another seed, other rows


def test_generate_refuses_an_existing_file_unless_overwrite(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    out.write_text("keep me\n")
    args = ["generate", "--model", str(run["run"] / "model"), "--n", "3", "--out", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "exists" in refused.output and "--overwrite" in refused.output
    assert out.read_text() == "keep me\n"
    _ok(runner.invoke(app, [*args, "--overwrite"]))
    assert len(pd.read_csv(out)) == 3
    bad = runner.invoke(app, ["generate", "--model", str(run["run"] / "model"), "--out", str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and ".csv or .parquet" in bad.output


def test_image_options_are_refused_for_table_models_and_conditions_for_image_ones(
    run: dict[str, Path], tmp_path: Path
) -> None:
    model = str(run["run"] / "model")
    out = str(tmp_path / "rows.csv")
    refused = runner.invoke(app, ["generate", "--model", model, "--out", out, "--prompt", "a cat", "--steps", "5"])
    assert refused.exit_code == 2 and "table model" in refused.output
    assert "--prompt" in refused.output and "--steps" in refused.output
    image = tmp_path / "not-a-table"
    image.mkdir()
    refused = runner.invoke(
        app, ["generate", "--model", str(image), "--out", str(tmp_path / "png"), "--condition", "c=low"]
    )
    assert refused.exit_code == 2 and "--condition is for table models" in refused.output


def test_condition_fixes_the_column(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "high.csv"
    args = ["generate", "--model", str(run["run"] / "model"), "--n", "6", "--out", str(out)]
    _ok(runner.invoke(app, [*args, "--condition", "c=high", "--condition", "flag=true"]))
    rows = pd.read_csv(out)
    assert (rows["c"] == "high").all() and rows["flag"].all()
    bad = runner.invoke(app, [*args, "--overwrite", "--condition", "nope=1"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_impute_fills_gaps_keeps_observed_cells_and_writes_intervals(run: dict[str, Path], tmp_path: Path) -> None:
    frame = mixed_frame(12, seed=5)
    frame.loc[[1, 4], "b"] = np.nan
    frame.loc[[2, 4], "c"] = None
    frame.loc[3, "k"] = None
    given, out = tmp_path / "gaps.csv", tmp_path / "filled.csv"
    frame.to_csv(given, index=False)
    args = ["impute", "--model", str(run["run"] / "model"), "--input", str(given), "--out", str(out)]
    _ok(runner.invoke(app, [*args, "--draws", "4", "--seed", "1"]))
    before, after = pd.read_csv(given), pd.read_csv(out)
    for name in ("b", "c", "k"):
        assert after[name].notna().all(), name
    observed = before.notna()
    pd.testing.assert_frame_equal(after.where(observed), before.where(observed), check_dtype=False)
    cells = pd.read_csv(tmp_path / "filled.intervals.csv")
    expected = {(r + 1, c) for r, c in [(1, "b"), (4, "b"), (2, "c"), (4, "c"), (3, "k")]}
    expected |= {(r + 1, "a") for r in np.flatnonzero(before["a"].isna())}
    assert set(zip(cells["row"], cells["column"], strict=True)) == expected
    numbers = cells[cells["column"] == "b"]
    value = pd.to_numeric(numbers["value"])  # the column holds categories too
    assert (numbers["low"] <= value).all() and (value <= numbers["high"]).all()
    shares = json.loads(cells[cells["column"] == "c"]["shares"].iloc[0])
    assert abs(sum(shares.values()) - 1) < 1e-9
    again = runner.invoke(app, [*args, "--draws", "4", "--seed", "1"])
    assert again.exit_code == 2 and "exists" in again.output  # no silent overwrite
    _ok(runner.invoke(app, [*args, "--draws", "4", "--seed", "1", "--overwrite"]))
    pd.testing.assert_frame_equal(pd.read_csv(out), after)  # same seed, same fill


def test_bad_settings_are_named_before_any_work(run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _train(run["table"], run["validated"], out, "--set", "model.widht=3", "--set", "sample.steps=4")
    assert result.exit_code == 2
    assert "model.widht: unknown key" in result.output and "sample: unknown key" in result.output
    assert not out.exists()
    result = _train(run["table"], run["validated"], out, "--set", "train.steps=0")
    assert result.exit_code == 2 and "train.steps" in result.output


def test_a_changed_table_is_refused_until_revalidated(run: dict[str, Path], tmp_path: Path) -> None:
    table, validated = tmp_path / "t.csv", tmp_path / "v"
    frame = mixed_frame(60)
    frame.to_csv(table, index=False)
    _ok(runner.invoke(app, ["data", "validate", str(table), "--out", str(validated), "--quiet"]))
    frame.loc[7, "b"] = 99.0
    frame.to_csv(table, index=False)
    result = _train(table, validated, tmp_path / "run")
    assert result.exit_code == 2 and "changed since it was validated" in result.output
    assert "row 8" in result.output and "--revalidate" in result.output
    _ok(_train(table, validated, tmp_path / "run", "--revalidate", "--overwrite"))


def test_interrupted_run_says_how_to_resume_and_resumes_to_the_same_weights(
    run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdpipe.tabular.pipeline as table_pipeline

    text = table_pipeline._progress_text
    calls = {"n": 0}

    def interrupt_at_7(row: dict) -> str:
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the trainer checkpoints at the next step and stops
        return text(row)

    monkeypatch.setattr(table_pipeline, "_progress_text", interrupt_at_7)
    out = tmp_path / "run"
    stopped = _train(run["table"], run["validated"], out)
    assert stopped.exit_code == 130, stopped.output
    assert f"sdpipe train --out {out} --resume" in stopped.output
    assert not (out / "model").exists()
    monkeypatch.setattr(table_pipeline, "_progress_text", text)
    refused = _train(run["table"], run["validated"], out)
    assert refused.exit_code == 2 and "--resume" in refused.output  # a new run never starts on another's files
    _ok(runner.invoke(app, ["train", "--out", str(out), "--resume", "--quiet"]))  # the saved table config
    full, resumed = _weights(run["run"] / "model"), _weights(out / "model")
    assert full.keys() == resumed.keys() and all((full[k] == resumed[k]).all() for k in full)


def test_evaluate_judges_the_run_against_its_own_test_split_or_a_file(run: dict[str, Path], tmp_path: Path) -> None:
    """`sdpipe evaluate --model RUN/model` reads the run's test split as recorded (or --real FILE), writes
    metrics.json with every figure over --sets sets, and refuses image options."""
    model = str(run["run"] / "model")
    result = _ok(runner.invoke(app, ["evaluate", "--model", model, "--out", str(tmp_path / "own"), "--sets", "2"]))
    metrics = json.loads((tmp_path / "own" / "metrics.json").read_text())
    record = json.loads((run["run"] / "model" / "sdpipe_training.json").read_text())
    assert metrics["settings"]["heldout_rows"] == record["rows"]["test"]
    assert metrics["settings"]["train_rows"] == record["rows"]["train"]
    assert len(metrics["figures"]["detection_accuracy"]["values"]) == 2
    assert "detection_accuracy" in result.output and "imputation, sdpipe" in result.output
    real = tmp_path / "real.csv"
    mixed_frame(40, seed=9).to_csv(real, index=False)
    args = ["evaluate", "--model", model, "--real", str(real), "--out", str(tmp_path / "f"), "--sets", "2", "-q"]
    _ok(runner.invoke(app, args))
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["settings"]["heldout_rows"] == 40
    refused = runner.invoke(app, ["evaluate", "--model", model, "--prompts", str(real), "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "not --prompts" in refused.output
