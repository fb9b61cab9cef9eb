"""NaN/Inf policy: non-finite steps are skipped and counted; a run of them rolls back with a lower LR."""

import json
import math
from pathlib import Path

import pytest
import torch

import sdpipe.train.loop as loop
from conftest import TINY
from sdpipe.config import load_config
from sdpipe.data import open_split
from sdpipe.train import train

STEPS = [*TINY, "train.steps=9", "train.checkpoint_every=2"]


def _inject(monkeypatch: pytest.MonkeyPatch, bad: dict[int, int]) -> None:
    """Make step s non-finite bad[s] times (a skipped step is retried under the same number)."""
    left = dict(bad)

    def hook(step: int) -> bool:
        if left.get(step, 0) > 0:
            left[step] -= 1
            return True
        return False

    monkeypatch.setattr(loop, "NONFINITE_HOOK", hook)


def test_nonfinite_steps_are_skipped_and_logged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _inject(monkeypatch, {3: 2})
    cfg = load_config(None, STEPS)
    result = train(cfg, open_split(cfg.data), tmp_path)
    assert [e["event"] for e in result.events] == ["nonfinite_step_skipped"] * 2
    assert [r["step"] for r in result.history] == list(range(1, 10))  # skipped steps are retried, not lost
    assert all(math.isfinite(r["loss"]) for r in result.history)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("event" in r for r in logged) == 2
    assert all(torch.isfinite(p).all() for p in result.unet.parameters())


def test_repeated_nonfinite_steps_roll_back_and_lower_lr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = load_config(None, [*STEPS, "train.max_bad_steps=3", "train.lr_schedule=constant"])
    data = open_split(cfg.data)
    clean = train(cfg, data, tmp_path / "clean")
    _inject(monkeypatch, {5: 3})
    result = train(cfg, data, tmp_path / "bad")
    kinds = [e["event"] for e in result.events]
    assert kinds == ["nonfinite_step_skipped", "nonfinite_step_skipped", "rollback"]
    assert result.events[-1]["to_step"] == 4 and result.events[-1]["lr_scale"] == 0.5
    assert [r["step"] for r in result.history] == list(range(1, 10))
    lr_clean = {r["step"]: r["lr"] for r in clean.history}
    lr_bad = {r["step"]: r["lr"] for r in result.history}
    assert lr_bad[4] == lr_clean[4] and lr_bad[5] == pytest.approx(lr_clean[5] / 2)


def test_divergence_without_checkpoint_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _inject(monkeypatch, {1: 10})
    cfg = load_config(None, [*STEPS, "train.max_bad_steps=3"])
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to"):
        train(cfg, open_split(cfg.data), tmp_path)
