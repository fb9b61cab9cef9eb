"""Training recipes and run services: EDM preconditioning, validation loss, early stopping, trackers,
bf16 and gradient checkpointing switches."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import EDMDPMSolverMultistepScheduler, UNet2DModel

import sdpipe.train.loop as loop
from conftest import TINY
from sdpipe.config import ConfigError, load_config
from sdpipe.data import load_dataset, open_split
from sdpipe.models import build_unet
from sdpipe.models.unet import timestep_freq_shift
from sdpipe.pipeline import train_model
from sdpipe.sampling import edm_scheduler_config
from sdpipe.train import make_objective, noise_scheduler, train, validation_loss
from sdpipe.train.checkpoint import latest_checkpoint, load_checkpoint
from sdpipe.train.losses import DiffusionLoss, EDMLoss
from sdpipe.train.recipe import time_embedding_max_frequency
from sdpipe.train.validation import EarlyStopping

EDM = [*TINY, "diffusion.formulation=edm", "train.loss_weighting=edm"]


def _tiny_unet(cfg) -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(cfg.model, sample_size=8, channels=1, num_classes=10)


def test_edm_preconditioning_matches_diffusers_edm_scheduler() -> None:
    """The denoiser EDMLoss trains is the one diffusers' EDM scheduler reconstructs when sampling."""
    cfg = load_config(None, EDM)
    unet = _tiny_unet(cfg)
    sched = EDMDPMSolverMultistepScheduler(**edm_scheduler_config(0.002, 80.0, 0.5))
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.tensor([1, 2, 3])
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(sched.precondition_inputs(x, s), sched.precondition_noise(sigma), class_labels=labels).sample
        denoised = sched.precondition_outputs(x, out, s)
        # EDMLoss's loss is ||F - (x0 - c_skip x)/c_out||^2 = ||D - x0||^2 / c_out^2: check that identity
        c_out = s * 0.5 / (s**2 + 0.25).sqrt()
        expected = ((denoised - x0) / c_out).pow(2).mean()
        got = EDMLoss(0.5)(unet, x0, labels, noise, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_edm_config_combinations_are_checked() -> None:
    with pytest.raises(ConfigError, match="no EDM scheduler"):
        load_config(None, [*EDM, "sample.sampler=ddim"])
    with pytest.raises(ConfigError, match="loss_weighting=edm"):
        load_config(None, [*TINY, "diffusion.formulation=edm"])


def test_edm_model_trains_saves_and_samples_in_vanilla_diffusers(tmp_path: Path) -> None:
    cfg = load_config(None, [*EDM, "train.steps=4"])
    trained = train_model(cfg, tmp_path, show_progress=False)
    model_dir = trained.model.path
    sched_cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched_cfg["_class_name"] == "EDMDPMSolverMultistepScheduler"
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet")
    sched = EDMDPMSolverMultistepScheduler.from_pretrained(model_dir, subfolder="scheduler")
    sched.set_timesteps(5)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(x, t), t, class_labels=torch.tensor([3, 4])).sample
            x = sched.step(out, t, x).prev_sample
    assert torch.isfinite(x).all() and x.abs().max() < 10
    # vanilla diffusers rebuilds the edm timestep embedding (frequencies up to 1000) from config.json
    c_noise = torch.linspace(-1.5, 1.0, 7)
    built = build_unet(cfg.model, sample_size=8, channels=1, num_classes=10, max_time_frequency=1000.0)
    torch.testing.assert_close(unet.time_proj(c_noise), built.time_proj(c_noise))


def test_timestep_embedding_frequencies_suit_the_formulation() -> None:
    """diffusers' default embedding barely changes over EDM's c_noise; the edm formulation's resolves it."""
    for half in (8, 16, 64):
        for target in (10.0, 1000.0):
            shift = timestep_freq_shift(half, target)
            highest = 10000 ** ((half - 1) / (shift - half))
            assert target / 1.5 < highest < target * 1.5
    assert timestep_freq_shift(16, 1.0) == 0
    with pytest.raises(ValueError, match="at least 1"):
        timestep_freq_shift(16, 0.5)
    edm_cfg, ddpm_cfg = load_config(None, EDM), load_config(None, TINY)
    assert time_embedding_max_frequency(ddpm_cfg) == 1.0
    c_noise = 0.25 * torch.log(torch.tensor([0.4, 0.5]))  # two nearby training noise levels
    for cfg, lo, hi in ((ddpm_cfg, 0.0, 0.1), (edm_cfg, 0.9, 2.0)):
        unet = build_unet(
            cfg.model, sample_size=8, channels=1, num_classes=10, max_time_frequency=time_embedding_max_frequency(cfg)
        )
        emb = unet.time_proj(c_noise)
        assert lo < (emb[0] - emb[1]).abs().max() < hi


def test_validation_loss_is_deterministic_and_tracks_the_weights() -> None:
    cfg = load_config(None, TINY)
    unet = _tiny_unet(cfg)
    loss, _ = make_objective(cfg)
    data = load_dataset(cfg.data)
    x = torch.as_tensor(data.images[:50]) / 8 - 1
    y = torch.as_tensor(data.labels[:50])
    first = validation_loss(unet, loss, x, y, seed=0)
    assert validation_loss(unet, loss, x, y, seed=0) == first  # same weights, same number
    assert validation_loss(unet, loss, x, y, seed=1) != first  # the seed fixes the noise
    with torch.no_grad():
        next(unet.parameters()).add_(0.1)
    assert validation_loss(unet, loss, x, y, seed=0) != first
    assert unet.training  # left as it was found


def test_early_stopping_counts_validations_without_a_new_best() -> None:
    stop = EarlyStopping(patience=2)
    assert stop.update(1, 1.0) and stop.update(2, 0.5)
    assert not stop.update(3, 0.6) and not stop.should_stop
    assert not stop.update(4, 0.5) and stop.should_stop  # equal is not better
    assert (stop.best, stop.best_step) == (0.5, 2)
    never = EarlyStopping(None)
    for i in range(10):
        never.update(i, 1.0)
    assert not never.should_stop


def test_early_stopping_keeps_and_returns_the_best_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Scripted validation losses: best at step 4, then two without improvement stop the run at step 8."""
    script = iter([1.0, 0.5, 0.7, 0.8, 0.1])
    monkeypatch.setattr(loop, "validation_loss", lambda *a, **k: next(script))
    cfg = load_config(
        None,
        [
            *TINY,
            "train.steps=20",
            "train.checkpoint_every=5",
            "train.keep_checkpoints=1",
            "train.validate_every=2",
            "train.early_stopping_patience=2",
            "data.validation_fraction=0.1",
        ],
    )
    data, val = open_split(cfg.data, "train"), open_split(cfg.data, "validation")
    assert 100 < len(val) < 260 and len(data) + len(val) <= 1797
    result = train(cfg, data, tmp_path, validation=val)
    assert result.stopped_early and result.best_step == 4
    assert result.history[-1]["step"] == 8
    best = latest_checkpoint(tmp_path, "best")
    assert best is not None and best.name == "step_000000004"
    assert latest_checkpoint(tmp_path).name == "step_000000008"  # type: ignore[union-attr]
    for name, value in load_checkpoint(best).ema.items():
        assert torch.equal(dict(result.unet.named_parameters())[name], value)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in logged if r.get("event") == "validation"] == [1.0, 0.5, 0.7, 0.8]


def test_trackers_write_tensorboard_and_mlflow_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [*TINY, "train.steps=3", "train.trackers=[tensorboard, mlflow]"])
    train(cfg, open_split(cfg.data), tmp_path)
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    loss_files = [p for p in (tmp_path / "mlruns").rglob("loss") if p.is_file()]
    assert loss_files and len(loss_files[0].read_text().splitlines()) == 3  # one line per step
    assert (tmp_path / "metrics.jsonl").exists()  # always written


def test_bf16_and_gradient_checkpointing_switches(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.steps=2"])
    data = open_split(cfg.data)
    plain = train(cfg, data, tmp_path / "plain")
    ckpt = train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})}),
        data,
        tmp_path / "ckpt",
    )
    # recomputing activations in backward gives the same gradients, so the same weights
    for a, b in zip(plain.unet.parameters(), ckpt.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    AcceleratorState._reset_state()  # accelerate keeps one precision per process; tests train several runs
    try:
        bf16 = train(load_config(None, [*TINY, "train.steps=2", "train.mixed_precision=bf16"]), data, tmp_path / "bf")
    finally:
        AcceleratorState._reset_state()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16.history)
    assert bf16.history[0]["loss"] != plain.history[0]["loss"]  # autocast really ran in bf16


def test_uniform_weighting_is_unweighted() -> None:
    sched = noise_scheduler(load_config())
    assert torch.equal(DiffusionLoss(sched).weight(torch.tensor([5, 50])), torch.ones(2))


def test_eval_every_logs_quality_without_changing_training(tmp_path: Path) -> None:
    base = [*TINY, "train.steps=6", "train.checkpoint_every=6"]
    plain = train_model(load_config(None, base), tmp_path / "plain", show_progress=False)
    cfg = load_config(None, [*base, "train.eval_every=3", "train.eval_samples=20"])
    watched = train_model(cfg, tmp_path / "watched", show_progress=False)
    evals = [e for e in watched.result.events if e["event"] == "evaluation"]
    assert [e["step"] for e in evals] == [3, 6]
    assert all(e["fd_ratio"] > 0 and 0 <= e["label_accuracy"] <= 1 for e in evals)
    logged = [json.loads(x) for x in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r.get("event") == "evaluation"] == [3, 6]
    # evaluating the EMA weights in between leaves training untouched, bit for bit
    assert watched.model.meta.weights_hash == plain.model.meta.weights_hash
