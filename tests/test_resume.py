"""Exact resume: an interrupted run, resumed, ends with the weights of an uninterrupted run; a run stopped by
SIGINT/SIGTERM checkpoints first and says how to resume; `--resume` alone takes the run's saved config."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import TINY
from sdpipe.cli import app
from sdpipe.config import load_config
from sdpipe.data import open_split
from sdpipe.train import read_metrics, train

STEPS = [*TINY, "train.steps=9", "train.checkpoint_every=2"]
WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"


class Interrupt(Exception):
    pass


def _stop_at(step_to_fail: int):  # type: ignore[no-untyped-def]
    def progress(step: int, row: dict) -> None:
        if step == step_to_fail:
            raise Interrupt

    return progress


def test_resume_after_interruption_is_bitwise_exact(tmp_path: Path) -> None:
    cfg = load_config(None, STEPS)
    data = open_split(cfg.data)
    full = train(cfg, data, tmp_path / "full")
    with pytest.raises(Interrupt):
        train(cfg, data, tmp_path / "cut", progress=_stop_at(5))  # dies after step 5: checkpoint 4 is the last
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_000000004"
    resumed = train(cfg, data, tmp_path / "cut", resume=True)
    a, b = full.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in resumed.history] == list(range(1, 10))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    cfg = load_config(None, STEPS)
    data = open_split(cfg.data)
    with pytest.raises(Interrupt):
        train(cfg, data, tmp_path, progress=_stop_at(3))
    other = load_config(None, [*STEPS, "train.learning_rate=0.01"])
    with pytest.raises(ValueError, match=r"train\.learning_rate"):
        train(other, data, tmp_path, resume=True)


def test_resume_alone_takes_the_saved_config_and_sets_on_top(tmp_path: Path) -> None:
    """`sdpipe train --out RUN --resume` needs none of the run's --set flags again (the run is not the default
    config); a --set that changes training is refused by name, one that does not is applied."""
    cfg = load_config(None, STEPS)
    with pytest.raises(Interrupt):
        train(cfg, open_split(cfg.data), tmp_path, progress=_stop_at(3))
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    runner = CliRunner()
    refused = runner.invoke(app, ["train", "--out", str(tmp_path), "--resume", "--set", "train.learning_rate=0.01"])
    assert refused.exit_code == 2 and "train.learning_rate (0.002 -> 0.01)" in refused.output, refused.output
    done = runner.invoke(app, ["train", "--out", str(tmp_path), "--resume", "--quiet", "--set", "sample.steps=3"])
    assert done.exit_code == 0, done.output
    saved = json.loads((tmp_path / "model" / "sdpipe.json").read_text())["config"]
    assert saved == load_config(None, [*STEPS, "sample.steps=3"]).model_dump(mode="json")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 10))


def _sdpipe_train(out: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in [*STEPS, "train.steps=40", "train.threads=1"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "sdpipe.cli", "train", "--out", str(out), "--quiet", *sets, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()
    return out.decode()


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, at_least: int) -> None:
    pointer = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not (pointer.exists() and pointer.read_text().strip() >= f"step_{at_least:09d}"):
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
    """The uninterrupted run's weights, trained in a subprocess beside the test that first asks for them."""
    out = tmp_path_factory.mktemp("reference")
    proc = _sdpipe_train(out)

    def weights() -> dict[str, torch.Tensor]:
        if proc.returncode is None:
            _finished(proc)
        return load_file(str(out / WEIGHTS))

    yield weights
    if proc.poll() is None:
        proc.kill()


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_gives_uninterrupted_weights(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    victim = _sdpipe_train(tmp_path / "run")
    _wait_for_checkpoint(victim, tmp_path / "run", 10)
    os.kill(victim.pid, signal.SIGKILL)  # mid-run, possibly mid-write of the next checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model").exists()

    _finished(_sdpipe_train(tmp_path / "run", "--resume"))
    assert _same_weights(reference(), load_file(str(tmp_path / "run" / WEIGHTS)))
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 40


def test_sigint_checkpoints_says_how_to_resume_and_resumes_exactly(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    victim = _sdpipe_train(run)
    _wait_for_checkpoint(victim, run, 5)
    victim.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out = victim.communicate(timeout=120)[0].decode()
    assert victim.returncode == 130, out
    stopped = [line for line in out.splitlines() if line.startswith("interrupted:")]
    assert len(stopped) == 1 and f"of 40; checkpoint {run / 'checkpoints'}" in stopped[0], out
    step = int(stopped[0].split(" at step ")[1].split()[0])
    assert 5 <= step < 40
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:09d}"  # saved at the boundary
    assert "Traceback" not in out

    command = [line.removeprefix("resume with: ") for line in out.splitlines() if line.startswith("resume with: ")]
    assert command == [f"sdpipe train --out {shlex.quote(str(run))} --resume"], out
    argv = shlex.split(command[0])
    assert argv[0] == "sdpipe"
    resumed = subprocess.run([sys.executable, "-m", "sdpipe.cli", *argv[1:]], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout.decode() + resumed.stderr.decode()
    assert _same_weights(reference(), load_file(str(run / WEIGHTS)))
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 41))


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    victim = _sdpipe_train(run)
    _wait_for_checkpoint(victim, run, 2)
    victim.send_signal(signal.SIGTERM)
    out = victim.communicate(timeout=120)[0].decode()
    assert victim.returncode == 143, out
    assert "interrupted: stopped by SIGTERM at step" in out and "--resume" in out
    step = int(out.split(" at step ")[1].split()[0])
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:09d}"
