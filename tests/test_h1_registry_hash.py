"""Every command that takes a registry reference checks the version's weights against the hash recorded at
registration: replay --model and evaluate refuse a tampered version as generate does."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import random_model
from sdpipe.cli import app
from sdpipe.registry import resolve

runner = CliRunner()


def test_replay_and_evaluate_refuse_a_tampered_registry_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SDPIPE_REGISTRY_URL", raising=False)
    registered = runner.invoke(
        app, ["registry", "register", str(random_model(tmp_path / "a" / "model")), "--name", "tiny"]
    )
    assert registered.exit_code == 0, registered.output
    made = runner.invoke(app, ["generate", "--model", "tiny:1", "--out", str(tmp_path / "g"), "--n", "1", "--quiet"])
    assert made.exit_code == 0, made.output
    png = tmp_path / "g" / "00000.png"

    # tamper as an owner could (root ignores the read-only bits): other weights, the same sdpipe.json
    stored = resolve("tiny:1") / "unet"
    stored.chmod(0o755)
    (stored / "diffusion_pytorch_model.safetensors").chmod(0o644)
    other = random_model(tmp_path / "b" / "model", seed=1)
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", stored / "diffusion_pytorch_model.safetensors")

    commands = {
        "generate": ["generate", "--model", "tiny:1", "--out", str(tmp_path / "out"), "--n", "1", "--quiet"],
        "replay": ["replay", str(png), "--out", str(tmp_path / "out"), "--model", "tiny:1"],
        "evaluate": ["evaluate", "--model", "tiny:1", "--out", str(tmp_path / "out"), "--n", "10", "--steps", "2"],
    }
    for name, args in commands.items():
        result = runner.invoke(app, [*args])
        assert result.exit_code == 2, (name, result.output)
        assert "stored weights changed since registration" in result.output, (name, result.output)
        assert not (tmp_path / "out").exists(), name
