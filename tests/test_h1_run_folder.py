"""One run per folder: training into a folder holding a run is refused (naming --resume and --overwrite),
--overwrite removes the old run's files first, and --resume refuses a folder holding no run."""

import json
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from conftest import TINY
from sdpipe.cli import app
from sdpipe.config import load_config
from sdpipe.data import open_split
from sdpipe.train import train
from sdpipe.train.run_dir import RunFolderError

runner = CliRunner()


def _train(out: Path, *sets: str, extra: tuple[str, ...] = ()) -> Result:
    args = [a for s in [*TINY, *sets] for a in ("--set", s)]
    return runner.invoke(app, ["train", "--out", str(out), "--quiet", *args, *extra])


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_second_run_in_one_folder_is_refused_then_replaced_with_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _train(run, "train.steps=3", "train.checkpoint_every=1")
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()}
    metrics = (run / "metrics.jsonl").read_bytes()

    again = _train(run, "train.steps=2", "train.checkpoint_every=2")
    assert again.exit_code == 2
    (line,) = _error_lines(again.output)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing of the old run was touched
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()} == before

    (run / "notes.txt").write_text("mine")  # not a run's file: --overwrite leaves it
    replaced = _train(run, "train.steps=2", "train.checkpoint_every=2", extra=("--overwrite",))
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000000002"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "notes.txt").read_text() == "mine"


def test_the_training_function_refuses_a_folder_holding_a_run(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.steps=1"])
    data = open_split(cfg.data)
    train(cfg, data, tmp_path)
    with pytest.raises(RunFolderError, match="--resume"):
        train(cfg, data, tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty", "other files"])
def test_resume_refuses_a_folder_without_a_run(tmp_path: Path, make: str) -> None:
    run = tmp_path / "runz"
    if make != "missing":
        run.mkdir()
    if make == "other files":
        (run / "notes.txt").write_text("x")
    # (train.steps=1: were it not refused, the run would not take long)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--quiet", "--set", "train.steps=1"])
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result.output)
    assert "--resume" in line and str(run) in line
    assert run.exists() == (make != "missing")  # nothing created
    assert not (run / "metrics.jsonl").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "give one of them" in result.output


def test_overwrite_keeps_the_old_run_when_the_config_is_bad(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--overwrite", "--set", "train.stepz=1"])
    assert result.exit_code == 2 and "train.stepz" in result.output
    assert (tmp_path / "metrics.jsonl").exists()


def test_demo_refuses_a_folder_holding_a_run(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 2 and "--overwrite" in result.output and "--resume" not in result.output
