"""Exact resume: an interrupted run, resumed, ends with the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from sdpipe.config import load_config
from sdpipe.data import open_split
from sdpipe.train import train

STEPS = [*TINY, "train.steps=9", "train.checkpoint_every=2"]


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


def _sdpipe_train(out: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in [*STEPS, "train.steps=40", "train.threads=1"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "sdpipe.cli", "train", "--out", str(out), "--quiet", *sets, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_gives_uninterrupted_weights(tmp_path: Path) -> None:
    reference = _sdpipe_train(tmp_path / "ref")
    victim = _sdpipe_train(tmp_path / "run")
    pointer = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not (pointer.exists() and pointer.read_text().strip() >= "step_000000010"):
        assert victim.poll() is None, victim.stdout.read().decode() if victim.stdout else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)  # mid-run, possibly mid-write of the next checkpoint
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model").exists()

    resumed = _sdpipe_train(tmp_path / "run", "--resume")
    for proc in (resumed, reference):
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()
    weights = "model/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "ref" / weights)), load_file(str(tmp_path / "run" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(steps) == 40
