"""NaN/Inf policy: non-finite steps are skipped and counted; a run of them rolls back with a lower LR."""

import json
import math
from pathlib import Path

import pytest
import torch

import sdpipe.train.trainer as loop
from conftest import TINY
from sdpipe.config import load_config
from sdpipe.data import open_split
from sdpipe.train import read_metrics, train

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


def test_repeated_rollbacks_to_one_checkpoint_compound_the_lr_factor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A divergence that repeats after a rollback meets a lower rate each time: the k-th rollback to a
    checkpoint trains at its rate x factor^k, not at the same rate again."""
    cfg = load_config(None, [*STEPS, "train.max_bad_steps=2", "train.lr_schedule=constant"])
    data = open_split(cfg.data)
    clean = train(cfg, data, tmp_path / "clean")
    _inject(monkeypatch, {5: 4})  # two rollbacks to checkpoint 4
    result = train(cfg, data, tmp_path / "bad")
    rollbacks = [e for e in result.events if e["event"] == "rollback"]
    assert [(e["to_step"], e["rollback_to_this_step"], e["lr_scale"]) for e in rollbacks] == [(4, 1, 0.5), (4, 2, 0.25)]
    lr_clean = {r["step"]: r["lr"] for r in clean.history}
    lr_bad = {r["step"]: r["lr"] for r in result.history}
    assert lr_bad[5] == pytest.approx(lr_clean[5] / 4) and lr_bad[9] == pytest.approx(lr_clean[9] / 4)


ROLLBACK = [*STEPS, "train.max_bad_steps=3", "train.checkpoint_every=4", "train.lr_schedule=constant"]


def test_metrics_file_says_which_rows_count_after_a_rollback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _inject(monkeypatch, {7: 3})  # steps 5 and 6 were trained, then 7 diverges: back to checkpoint 4
    cfg = load_config(None, ROLLBACK)
    result = train(cfg, open_split(cfg.data), tmp_path)
    raw = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if "event" not in r] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9]  # all as it happened
    (rollback,) = [r for r in raw if r.get("event") == "rollback"]
    assert rollback["to_step"] == 4 and raw.index(rollback) == 8  # after the superseded rows 5, 6 and 2 skips
    counted = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in counted if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 10))
    assert steps == result.history and steps[4] == raw[9]  # the rows of steps 5, 6 that count are the new ones
    assert [r["event"] for r in counted if "event" in r] == ["nonfinite_step_skipped"] * 2 + ["rollback"]


def test_resume_after_a_rollback_is_bitwise_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Killed after a rollback but before the next checkpoint: resuming takes the recorded rollback's rate."""
    cfg = load_config(None, ROLLBACK)
    data = open_split(cfg.data)
    _inject(monkeypatch, {7: 3})
    full = train(cfg, data, tmp_path / "full")
    visits = {5: 0}

    def die_on_second_visit_of_5(step: int, row: dict) -> None:
        visits[5] += step == 5
        if visits[5] == 2:  # step 5 again, after the rollback to 4: the latest checkpoint is still 4
            raise KeyboardInterrupt

    _inject(monkeypatch, {7: 3})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, tmp_path / "cut", progress=die_on_second_visit_of_5)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_000000004"
    resumed = train(cfg, data, tmp_path / "cut", resume=True)
    a, b = full.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == [r | {"samples_per_s": s, "elapsed_s": e} for r, s, e in _timing(full, resumed)]
    assert resumed.events == full.events


def _timing(full, resumed):  # type: ignore[no-untyped-def]
    """Rows of the full run with the resumed run's timings (which differ) for comparing the rest."""
    return [(r, q["samples_per_s"], q["elapsed_s"]) for r, q in zip(full.history, resumed.history, strict=True)]
