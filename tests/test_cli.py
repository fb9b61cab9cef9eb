"""The CLI end to end: a shortened demo, generate, evaluate, config, help and error messages."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY
from sdpipe.cli import app

runner = CliRunner()


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "train", "generate", "replay", "evaluate", "config", "data", "registry", "serve"):
        assert command in result.output


def test_short_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--quiet", *_sets(TINY)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    ev = metrics["evaluation"]
    for key in ("fd_ratio", "label_accuracy", "near_copy_share", "frechet_distance", "images_per_s"):
        assert key in ev["default"]
    assert [r["guidance"] for r in ev["guidance_sweep"]] == [1.0, 2.0]
    assert 0 < ev["judge"]["classifier_accuracy_on_heldout"] <= 1
    assert metrics["timings_s"]["total"] > 0
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2  # loss curve and sample grid
    assert "fd_ratio" in report and "checkpoint_every" in report and "Training events" in report
    assert metrics["train"]["events"] == []
    assert (out / "model" / "sdpipe.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000000006"
    assert "FD ratio" in result.output


def test_demo_report_shows_validation_and_quality_over_training(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    extra = ["data.validation_fraction=0.1", "train.validate_every=3", "train.eval_every=3", "train.eval_samples=20"]
    result = runner.invoke(app, ["demo", "--out", str(out), "--quiet", *_sets([*TINY, *extra])])
    assert result.exit_code == 0, result.output
    events = json.loads((out / "metrics.json").read_text())["train"]["events"]
    assert [(e["step"], e["event"]) for e in events] == [
        (3, "validation"),
        (3, "evaluation"),
        (6, "validation"),
        (6, "evaluation"),
    ]
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3  # loss with validation, quality over training, grid
    assert "Quality during training" in report

    gen = tmp_path / "gen"
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(out / "model"),
            "--label",
            "7",
            "--n",
            "3",
            "--seed",
            "5",
            "--out",
            str(gen),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    recs = [json.loads(x) for x in (gen / "samples.jsonl").read_text().splitlines()]
    assert [(r["label"], r["seed"], r["steps"], r["sampler"]) for r in recs] == [
        ("7", s, 4, "dpmpp_2m") for s in (5, 6, 7)
    ]

    ev_out = tmp_path / "eval"
    result = runner.invoke(
        app, ["evaluate", "--model", str(out / "model"), "--out", str(ev_out), "--n", "20", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((ev_out / "metrics.json").read_text())["evaluation"]["default"]["n"] == 20


def test_bad_config_fails_before_work(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "x"), "--set", "train.lr=1"])
    assert result.exit_code == 2
    assert "train.lr" in result.output and "learning_rate" in result.output
    assert not (tmp_path / "x").exists()


def test_generate_errors_name_the_problem(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "missing" in result.output and "not an existing path" in result.output
    result = runner.invoke(
        app, ["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--sampler", "plms"]
    )
    assert result.exit_code == 2 and "sample.sampler" in result.output
    result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--label", "x"])
    assert result.exit_code == 2 and "unknown label" in result.output
    result = runner.invoke(app, ["evaluate", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--n", "5"])
    assert result.exit_code == 2 and "evaluate.n_samples" in result.output


def test_config_command_prints_validated_yaml() -> None:
    result = runner.invoke(app, ["config", "--set", "train.steps=9"])
    assert result.exit_code == 0
    assert "steps: 9" in result.output


def test_models_are_taken_by_registry_reference(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """generate and replay accept NAME@ALIAS and NAME:VERSION as well as a folder, with the same images."""
    monkeypatch.setenv("SDPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDPIPE_REGISTRY_URL", raising=False)
    assert runner.invoke(app, ["registry", "register", str(tiny_model_dir), "--name", "tiny"]).exit_code == 0
    assert runner.invoke(app, ["registry", "alias", "tiny", "production", "1"]).exit_code == 0
    outs = {}
    for ref in (str(tiny_model_dir), "tiny@production", "tiny:1"):
        out = tmp_path / ref.replace("/", "_").replace(":", "_")
        result = runner.invoke(app, ["generate", "--model", ref, "--out", str(out), "--n", "2", "--quiet"])
        assert result.exit_code == 0, result.output
        outs[ref] = Image.open(out / "00001.png").tobytes()  # the pixels (the text chunks name the folder)
    assert len(set(outs.values())) == 1
    result = runner.invoke(app, ["generate", "--model", "tiny@staging", "--out", str(tmp_path / "x"), "--quiet"])
    assert result.exit_code == 2 and "staging" in result.output
    png = tmp_path / "tiny@production" / "00001.png"
    result = runner.invoke(app, ["replay", str(png), "--out", str(tmp_path / "r"), "--model", "tiny:1"])
    assert result.exit_code == 0, result.output


USER_ERRORS = {
    # each command, given something wrong by its user: exit 2 with one `error:` line, no traceback
    "demo, data for train": (["demo", "--out", "{tmp}/d", "--set", "data.source=folder"], "embedded digits"),
    "train, unvalidated data": (
        ["train", "--out", "{tmp}/t", "--set", "data.source=folder", "--set", "data.path={tmp}"]
        + ["--set", "data.validated_dir={tmp}/nowhere"],
        "validate first",
    ),
    "train, bad setting": (["train", "--out", "{tmp}/t", "--set", "train.seed=-1"], "train.seed"),
    "train --resume, no run": (["train", "--out", "{tmp}/none", "--resume"], "{tmp}/none"),
    "generate, no model": (["generate", "--model", "{tmp}/none", "--out", "{tmp}/g"], "{tmp}/none"),
    "replay, no image": (["replay", "{tmp}/none.png", "--out", "{tmp}/r"], "image not found: {tmp}/none.png"),
    "evaluate, no model": (["evaluate", "--model", "{tmp}/none", "--out", "{tmp}/e"], "{tmp}/none"),
    "evaluate, bad option": (["evaluate", "--model", "{tmp}/none", "--out", "{tmp}/e", "--steps", "x"], "--steps"),
    "config, no file": (["config", "--config", "{tmp}/none.yaml"], "config file not found"),
    "data validate, no source": (["data", "validate", "{tmp}/none", "--out", "{tmp}/v"], "{tmp}/none"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_exit_2_with_one_error_line_in_every_command(tmp_path: Path, case: str) -> None:
    args, needle = USER_ERRORS[case]
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not a traceback
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output  # e.g. no stray "error: 2" after evaluate's message
    assert needle.replace("{tmp}", str(tmp_path)) in result.output
    assert "Traceback" not in result.output
