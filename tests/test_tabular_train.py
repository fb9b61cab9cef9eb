"""Training a table model with the shared trainer (sdpipe.tabular.task, train): today's guarantees on a table
run. Each test guards one: an interrupted run resumes bitwise, non-finite steps are skipped and rolled back,
the validation loss is deterministic and early stopping keeps the best, and the EMA weights are saved."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import sdpipe.train.trainer as trainer_mod
from sdpipe.config import load_config
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import EncodedTable, TablePreprocessor, fit_preprocessor
from sdpipe.tabular.task import TableTask
from sdpipe.tabular.train import TableTrainResult, train_table_model
from test_tabular_model import SMALL, mixed_frame, typed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = [
    "train.steps=12",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.learning_rate=3e-3",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=2",
]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data() -> tuple[EncodedTable, EncodedTable, TablePreprocessor]:
    frame = mixed_frame(300)
    pre = fit_preprocessor(typed(frame), rows=range(240))
    return pre.encode(frame.iloc[:240]), pre.encode(frame.iloc[240:]), pre


def _run(
    data: tuple[EncodedTable, EncodedTable, TablePreprocessor],
    run_dir: Path,
    sets: tuple[str, ...] = (),
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    categorical: str = "masked",
) -> TableTrainResult:
    train, val, pre = data
    cfg = load_config(None, [*BASE, *sets]).train
    model_cfg = TableModelConfig(categorical=categorical, **SMALL)
    return train_table_model(train, val, pre, model_cfg, cfg, run_dir, resume=resume, progress=progress)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "denoiser" / "diffusion_pytorch_model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("categorical", ["masked", "onehot"])
def test_interrupted_then_resumed_table_run_is_bitwise_the_uninterrupted_one(
    data: Any, tmp_path: Path, categorical: str
) -> None:
    full = _run(data, tmp_path / "full", categorical=categorical)

    def stop(step: int, row: dict) -> None:
        if step == 10:
            raise Interrupt  # as kill -9 after step 10: checkpoint 8 is the last

    with pytest.raises(Interrupt):
        _run(data, tmp_path / "cut", progress=stop, categorical=categorical)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step_000000008"
    resumed = _run(data, tmp_path / "cut", resume=True, categorical=categorical)
    assert [r["step"] for r in resumed.history] == list(range(1, 13))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert [r["grad_norm"] for r in resumed.history] == [r["grad_norm"] for r in full.history]
    assert _same(_weights(resumed.path), _weights(full.path))


def test_nonfinite_steps_are_skipped_then_rolled_back(
    data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = {3: 1, 6: 3}  # one skip at 3; at 6 two skips, then a rollback to checkpoint 4

    def hook(step: int) -> bool:
        if left.get(step, 0) > 0:
            left[step] -= 1
            return True
        return False

    monkeypatch.setattr(trainer_mod, "NONFINITE_HOOK", hook)
    out = _run(data, tmp_path, ("train.max_bad_steps=3",))
    assert [(e["event"], e["step"]) for e in out.events] == [
        ("nonfinite_step_skipped", 3),
        ("nonfinite_step_skipped", 6),
        ("nonfinite_step_skipped", 6),
        ("rollback", 4),
    ]
    assert [r["step"] for r in out.history] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in out.history)
    assert all(torch.isfinite(w).all() for w in _weights(out.path).values())


def test_validation_loss_is_deterministic(data: Any) -> None:
    train, val, _ = data
    cfg = load_config(None, [*BASE, "train.validate_every=1"]).train
    model_cfg = TableModelConfig(**SMALL)
    task = TableTask(model_cfg, cfg, train, torch.Generator().manual_seed(0), val)
    check = task.validator()
    assert check is not None
    first = check(task.module)
    assert check(task.module) == first  # same weights, same number
    other = TableTask(model_cfg, cfg, train, torch.Generator().manual_seed(5), val).validator()
    assert other is not None and other(task.module) == first  # fixed by train.seed, not by the run's draws
    with torch.no_grad():
        next(task.module.parameters()).add_(0.1)
    assert check(task.module) != first
    no_split = TableTask(model_cfg, cfg, train, torch.Generator().manual_seed(0), None)
    assert no_split.validator() is None


def test_validation_repeats_and_early_stopping_keeps_the_best(
    data: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = ("train.steps=30", "train.validate_every=1", "train.early_stopping_patience=3")
    first = _run(data, tmp_path / "one", ("train.steps=6", "train.validate_every=1"))
    second = _run(data, tmp_path / "two", ("train.steps=6", "train.validate_every=1"))
    values = [e["val_loss"] for e in first.events if e["event"] == "validation"]
    assert len(values) == 6 and values == [e["val_loss"] for e in second.events if e["event"] == "validation"]

    real = TableTask.validator

    def worsening(self: TableTask) -> Callable[[torch.nn.Module], float] | None:
        check = real(self)
        calls = [0]

        def run(module: torch.nn.Module) -> float:  # the real loss, made worse after the 4th validation
            calls[0] += 1
            assert check is not None
            return check(module) + (0.0 if calls[0] <= 4 else 100.0)

        return run

    monkeypatch.setattr(TableTask, "validator", worsening)
    out = _run(data, tmp_path / "stop", sets)
    assert out.stopped_early and [r["step"] for r in out.history][-1] == out.best_step + 3
    vals = [(e["step"], e["val_loss"]) for e in out.events if e["event"] == "validation"]
    assert out.best_step == min(vals, key=lambda v: v[1])[0] <= 4
    best = tmp_path / "stop" / "checkpoints" / (tmp_path / "stop" / "checkpoints" / "best").read_text().strip()
    assert _same(_weights(out.path), load_file(str(best / "ema.safetensors")))  # the best step's EMA weights


def test_the_saved_model_holds_the_ema_weights(data: Any, tmp_path: Path) -> None:
    out = _run(data, tmp_path)
    last = tmp_path / "checkpoints" / "step_000000012"
    ema, trained = load_file(str(last / "ema.safetensors")), load_file(str(last / "model.safetensors"))
    saved = _weights(out.path)
    assert _same(saved, ema) and not _same(saved, trained)
    assert _same({n: p for n, p in out.model.denoiser.state_dict().items()}, saved)
