"""The shared trainer's named parts, each alone, on a toy task that needs no diffusion model: a tiny MLP
regressing noisy targets of a fixed random dataset (its `draw` takes indices from an `EpochSampler` and the
targets' noise from the run's generator)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import sdpipe.train.trainer as trainer_mod
from sdpipe.config import load_config
from sdpipe.train.loop import start_run
from sdpipe.train.state import EpochSampler
from sdpipe.train.trainer import Checkpointer, NonFinitePolicy, StepRunner, Trainer, TrainOutcome

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_DATA, N_IN, N_OUT = 24, 4, 2
BASE = [
    "train.steps=7",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=2",
    "train.learning_rate=0.05",
    "train.lr_schedule=cosine",
]


class Interrupt(Exception):
    pass


class ToyTask:
    """Linear -> tanh -> Linear on a fixed random dataset. `partial`: the first layer is a frozen "base" and
    only the head trains (as a LoRA's adapters do). `val_losses`: the validator returns these values in turn
    and records the module it was given (its weights and mode)."""

    def __init__(
        self, gen: torch.Generator, batch_size: int, partial: bool = False, val_losses: list[float] | None = None
    ) -> None:
        init = torch.Generator().manual_seed(1234)  # the same network whatever the run's generator
        self.module = nn.Sequential(nn.Linear(N_IN, 8), nn.Tanh(), nn.Linear(8, N_OUT))
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(torch.randn(p.shape, generator=init) * 0.5)
        if partial:
            self.module[0].requires_grad_(False)
        self.x = torch.randn(N_DATA, N_IN, generator=init)
        self.y = self.x @ torch.randn(N_IN, N_OUT, generator=init)
        self.sampler = EpochSampler(N_DATA, batch_size, gen)
        self.weighting = None
        self.val_losses = val_losses
        self.seen: list[tuple[bool, dict[str, torch.Tensor]]] = []

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> Any:
        idx = self.sampler.next()
        noise = 0.1 * torch.randn(len(idx), N_OUT, generator=gen)
        x, y = self.x[idx], self.y[idx] + noise
        return x[rank::world].to(device), y[rank::world].to(device)

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        mse = F.mse_loss(model(x), y)
        return mse, mse.detach()

    def validator(self) -> Callable[[nn.Module], float] | None:
        if self.val_losses is None:
            return None
        values = iter(self.val_losses)

        def run(model: nn.Module) -> float:
            self.seen.append((model.training, {n: p.detach().clone() for n, p in model.named_parameters()}))
            return next(values)

        return run


def _trainer(run_dir: Path, sets: Sequence[str] = (), resume: bool = False, **task: Any) -> Trainer:
    cfg = load_config(None, [*BASE, *sets])
    acc, gen = start_run(cfg.train, run_dir, resume)
    return Trainer(
        cfg.train, cfg.model_dump(mode="json"), run_dir, ToyTask(gen, cfg.train.batch_size, **task), acc, gen
    )


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_at(step_to_fail: int) -> Callable[[int, dict], None]:
    def progress(step: int, row: dict) -> None:
        if step == step_to_fail:
            raise Interrupt

    return progress


def _inject(monkeypatch: pytest.MonkeyPatch, bad: dict[int, int]) -> None:
    """Make step s non-finite bad[s] times (a skipped step is retried under the same number)."""
    left = dict(bad)

    def hook(step: int) -> bool:
        if left.get(step, 0) > 0:
            left[step] -= 1
            return True
        return False

    monkeypatch.setattr(trainer_mod, "NONFINITE_HOOK", hook)


# --- NonFinitePolicy ---


def test_nonfinite_policy_skips_then_rolls_back_and_resets_its_count() -> None:
    policy = NonFinitePolicy(max_bad_steps=3)
    ok, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    verdicts = [
        policy.judge(nan, ok),  # 1 bad
        policy.judge(ok, inf),  # 2 bad (a non-finite gradient counts as one)
        policy.judge(ok, ok),  # resets
        policy.judge(nan, ok),  # 1
        policy.judge(nan, nan),  # 2
    ]
    assert verdicts == ["skip", "skip", "ok", "skip", "skip"] and policy.bad_in_a_row == 2
    assert policy.judge(inf, ok) == "roll_back" and policy.bad_in_a_row == 0  # the 3rd in a row; resets
    assert [policy.judge(nan, ok) for _ in range(3)] == ["skip", "skip", "roll_back"]
    assert NonFinitePolicy(max_bad_steps=1).judge(nan, ok) == "roll_back"


# --- Checkpointer.due ---


def test_checkpointer_is_due_every_n_steps_at_the_last_and_at_a_best(tmp_path: Path) -> None:
    cfg = load_config(None, [*BASE, "train.steps=10", "train.checkpoint_every=3"]).train
    ck = Checkpointer(tmp_path, cfg, state=None, config={})  # due() needs no state
    assert [s for s in range(1, 11) if ck.due(s, best=False)] == [3, 6, 9, 10]
    assert all(ck.due(s, best=True) for s in range(1, 11))


# --- StepRunner ---


def test_step_runner_returns_the_loss_and_the_unclipped_norm_and_clips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, BASE)
    acc, gen = start_run(cfg.train, tmp_path, False)
    task = ToyTask(gen, 8)
    model = acc.prepare(task.module)
    params = [p for _, p in task.trainable()]
    runner = StepRunner(task, None, model, params, acc)
    batch = task.draw(gen, 0, 1, acc.device)

    x, y = batch
    expected = F.mse_loss(task.module(x), y)
    grads = torch.autograd.grad(expected, params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    loss, plain, grad_norm = runner(batch, 1, grad_clip=1e6)
    assert loss.item() == pytest.approx(expected.item()) and plain.item() == pytest.approx(expected.item())
    assert grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
    assert all(p.grad is not None and torch.allclose(p.grad, g) for p, g in zip(params, grads, strict=True))

    for p in params:
        p.grad = None
    clip = norm.item() / 4
    _, _, grad_norm = runner(batch, 2, grad_clip=clip)
    assert grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)  # the norm before clipping
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    assert clipped.item() == pytest.approx(clip, rel=1e-4)

    asked: list[int] = []

    def hook(step: int) -> bool:
        asked.append(step)
        return step == 4

    monkeypatch.setattr(trainer_mod, "NONFINITE_HOOK", hook)
    for p in params:
        p.grad = None
    fine = runner(batch, 3, grad_clip=1.0)
    assert all(math.isfinite(v.item()) for v in fine)
    for p in params:
        p.grad = None
    loss, plain, grad_norm = runner(batch, 4, grad_clip=1.0)
    assert asked == [3, 4]
    assert math.isnan(loss.item()) and math.isnan(grad_norm.item())
    assert plain.item() == pytest.approx(expected.item())  # the plain loss is the task's, as it was


# --- Trainer.run ---


def test_run_trains_logs_every_step_and_keeps_the_newest_checkpoints(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    before = _params(trainer.task.module)
    seen: list[int] = []
    out = trainer.run(progress=lambda step, row: seen.append(step))
    assert isinstance(out, TrainOutcome)
    assert [r["step"] for r in out.history] == seen == list(range(1, 8))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in out.history)
    assert out.history[-1]["loss"] < out.history[0]["loss"]
    assert out.events == [] and out.best_step is None and not out.stopped_early and out.samples_per_second > 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == out.history
    assert (tmp_path / "config.yaml").is_file()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000000006", "step_000000007"]  # keep 2
    assert (root / "latest").read_text().strip() == "step_000000007"
    # the outcome is a copy holding the EMA weights, in eval mode; the training weights moved
    ema = dict(zip(trainer.state.trainable, trainer.ema.shadow_params, strict=True))
    assert _same(_params(out.module), ema) and not out.module.training
    assert out.module is not trainer.task.module and not _same(_params(trainer.task.module), before)
    assert not _same(ema, _params(trainer.task.module))


@pytest.mark.parametrize("partial", [False, True], ids=["all_train", "head_only"])
def test_interrupted_then_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path: Path, partial: bool) -> None:
    full_trainer = _trainer(tmp_path / "full", partial=partial)
    full = full_trainer.run()
    with pytest.raises(Interrupt):
        _trainer(tmp_path / "cut", partial=partial).run(progress=_stop_at(5))  # checkpoint 3 is the last
    root = tmp_path / "cut" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000000003"

    trainable = [n for n, _ in full_trainer.task.trainable()]
    assert trainable == (["2.weight", "2.bias"] if partial else ["0.weight", "0.bias", "2.weight", "2.bias"])
    for part in ("model", "ema"):  # a partial run's checkpoints hold just what trains
        assert sorted(load_file(str(root / "step_000000003" / f"{part}.safetensors"))) == sorted(trainable)

    resumed_trainer = _trainer(tmp_path / "cut", resume=True, partial=partial)
    base = _params(resumed_trainer.task.module)
    resumed = resumed_trainer.run(resume=True)
    assert [r["step"] for r in resumed.history] == list(range(1, 8))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    assert [r["grad_norm"] for r in resumed.history] == [r["grad_norm"] for r in full.history]
    assert _same(_params(resumed.module), _params(full.module))  # the EMA weights
    assert _same(_params(resumed_trainer.task.module), _params(full_trainer.task.module))  # the training ones
    if partial:  # the frozen base is the one the task built, untouched by restoring and training
        after = _params(resumed_trainer.task.module)
        assert all(torch.equal(after[n], base[n]) for n in ("0.weight", "0.bias"))
        assert not torch.equal(after["2.weight"], base["2.weight"])


def test_nonfinite_steps_are_skipped_then_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ["train.max_bad_steps=3", "train.checkpoint_every=2", "train.lr_schedule=constant"]
    _inject(monkeypatch, {3: 1, 6: 3})  # one skip at 3; at 6, two skips and a rollback to checkpoint 4
    trainer = _trainer(tmp_path, sets)
    restored: list[int] = []
    real_restore = trainer.state.restore

    def restore(ck: Any) -> int:
        restored.append(ck.step)
        return real_restore(ck)

    monkeypatch.setattr(trainer.state, "restore", restore)
    out = trainer.run()
    assert [(e["event"], e["step"]) for e in out.events] == [
        ("nonfinite_step_skipped", 3),
        ("nonfinite_step_skipped", 6),
        ("nonfinite_step_skipped", 6),
        ("rollback", 4),
    ]
    assert [e.get("consecutive") for e in out.events[:3]] == [1, 1, 2]
    assert out.events[-1]["to_step"] == 4 and out.events[-1]["lr_scale"] == 0.5 and restored == [4]
    assert [r["step"] for r in out.history] == list(range(1, 8))
    assert all(math.isfinite(r["loss"]) for r in out.history)
    lr = {r["step"]: r["lr"] for r in out.history}
    assert lr[5] == pytest.approx(lr[4] / 2)  # steps 5.. trained again, at the lowered rate
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in logged if "event" in r] == ["nonfinite_step_skipped"] * 3 + ["rollback"]


def test_early_stopping_returns_the_best_steps_ema_weights(tmp_path: Path) -> None:
    sets = ["train.steps=20", "train.validate_every=1", "train.early_stopping_patience=2", "train.checkpoint_every=10"]
    trainer = _trainer(tmp_path, sets, val_losses=[5.0, 4.0, 3.0, 3.5, 3.2, 1.0, 1.0])
    out = trainer.run()
    assert out.stopped_early and out.best_step == 3
    assert [r["step"] for r in out.history] == [1, 2, 3, 4, 5]  # two validations without a new best
    vals = [(e["step"], e["val_loss"], e["best"]) for e in out.events if e["event"] == "validation"]
    assert vals == [(1, 5.0, True), (2, 4.0, True), (3, 3.0, True), (4, 3.5, False), (5, 3.2, False)]
    seen = trainer.task.seen
    assert [training for training, _ in seen] == [False] * 5  # validated in eval mode
    assert all(not _same(seen[2][1], w) for _, w in seen[3:])  # the EMA moved after the best
    assert _same(_params(out.module), seen[2][1])  # the best step's EMA weights
    root = tmp_path / "checkpoints"
    assert (root / "best").read_text().strip() == "step_000000003"
    assert (root / "latest").read_text().strip() == "step_000000005"  # the early stop checkpoints too


def test_with_ema_swaps_the_ema_in_and_restores_the_training_weights(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ["train.steps=3"])
    trainer.run()
    module = trainer.task.module
    weights = _params(module)
    ema = dict(zip(trainer.state.trainable, trainer.ema.shadow_params, strict=True))
    assert not _same(weights, ema)
    seen = trainer.with_ema(lambda m: (m.training, _params(m)))
    assert seen == (False, seen[1]) and _same(seen[1], ema)
    assert module.training and _same(_params(module), weights)

    def fails(m: nn.Module) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer.with_ema(fails)
    assert module.training and _same(_params(module), weights)
