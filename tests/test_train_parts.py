"""Training building blocks: loss weighting, timestep sampling, data order, determinism."""

import math
import warnings

import pytest
import torch

from sdpipe.config import load_config
from sdpipe.models import build_unet
from sdpipe.train import noise_scheduler
from sdpipe.train.loop import EpochSampler
from sdpipe.train.losses import DiffusionLoss, EDMLoss, TimestepSampler, UncertaintyWeighting


def test_min_snr_weight_for_v_prediction() -> None:
    sched = noise_scheduler(load_config())
    loss = DiffusionLoss(sched, "min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 500, 999])
    snr = loss.snr[t]
    torch.testing.assert_close(loss.weight(t), snr.clamp(max=5.0) / (snr + 1))
    assert torch.equal(DiffusionLoss(sched, "uniform").weight(t), torch.ones(3))


def test_edm_weight_for_v_prediction_is_lambda_sigma_on_the_x0_error() -> None:
    """EDM's lambda = (sigma^2 + sd^2) / (sigma sd)^2 with sigma^2 = 1/SNR, over ||x0 err||^2 = ||v err||^2/(SNR+1)."""
    sched = noise_scheduler(load_config())
    loss = DiffusionLoss(sched, "edm", sigma_data=0.5)
    t = torch.tensor([10, 500, 990])
    sigma2 = 1 / loss.snr[t]
    lam = (sigma2 + 0.25) / (sigma2 * 0.25)
    torch.testing.assert_close(loss.weight(t), lam / (loss.snr[t] + 1))


def test_lognormal_timesteps_follow_edm_sigma_distribution() -> None:
    sched = noise_scheduler(load_config())
    sampler = TimestepSampler(sched, "lognormal", mean=-1.2, std=1.2)
    t = sampler(20000, torch.Generator().manual_seed(0))
    abar = sched.alphas_cumprod[t].double()
    log_sigma = 0.5 * torch.log((1 - abar) / abar)
    assert abs(log_sigma.median().item() - (-1.2)) < 0.05
    assert abs(log_sigma.std().item() - 1.2) < 0.1
    uniform = TimestepSampler(sched, "uniform")(20000, torch.Generator().manual_seed(0))
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.float().mean().item() - 499.5) < 10


def test_uncertainty_weighting_starts_as_the_base_loss(tiny_config) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    unet = build_unet(tiny_config.model, sample_size=8, channels=1, num_classes=10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 8, 8, generator=gen), torch.randn(6, 1, 8, 8, generator=gen)
    labels, sigma = torch.arange(6), torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 50.0])
    base = EDMLoss()
    weighted, plain = UncertaintyWeighting(base)(unet, x0, labels, noise, sigma)
    torch.testing.assert_close(weighted, base(unet, x0, labels, noise, sigma))
    torch.testing.assert_close(plain, weighted.detach())  # zero-initialized: objective and plain loss agree
    sched = noise_scheduler(load_config())  # a ddpm loss feeds it ln(sigma_t) / 4 the same way
    ddpm, t = DiffusionLoss(sched, "edm"), torch.tensor([1, 500, 999])
    abar = sched.alphas_cumprod[t]
    torch.testing.assert_close(ddpm.noise_feature(t), 0.25 * 0.5 * torch.log((1 - abar) / abar))


class _LevelLoss:
    """A stand-in loss whose value at noise feature c is known: 0.05 + c^2, large at both ends as a denoiser's is."""

    def noise_feature(self, level: torch.Tensor) -> torch.Tensor:
        return level

    def per_sample(self, unet, x0, labels, noise, level):  # type: ignore[no-untyped-def]
        return 0.05 + level**2


def test_uncertainty_weighting_learns_each_noise_levels_expected_loss() -> None:
    """At its optimum exp(u(sigma)) is the expected loss at sigma (EDM2 eq. 21), so each level's share of the
    gradient, loss / exp(u), is about 1 whatever the level's difficulty."""
    weighting = UncertaintyWeighting(_LevelLoss())  # type: ignore[arg-type]
    opt = torch.optim.Adam(weighting.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1500):
        level = torch.rand(256, generator=gen) * 3 - 1.5
        loss, _ = weighting(None, None, None, None, level)  # type: ignore[arg-type]
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = torch.linspace(-1.4, 1.4, 15)
    with torch.no_grad():
        learned = weighting.log_variance(c).exp()
    torch.testing.assert_close(learned, 0.05 + c**2, rtol=0.05, atol=0.0)


def test_epoch_sampler_visits_every_index_once_per_epoch() -> None:
    s = EpochSampler(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([s.next() for _ in range(5)])  # 20 indices = exactly 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))


def test_two_runs_of_one_config_give_identical_weights(tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    from sdpipe.data import open_split
    from sdpipe.train import train

    data = open_split(tiny_config.data)
    a = train(tiny_config, data, tmp_path / "a").unet.state_dict()
    b = train(tiny_config, data, tmp_path / "b").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(math.isfinite(v.abs().sum().item()) for v in a.values())


def test_checkpoints_are_complete_and_pruned(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from sdpipe.train.checkpoint import save_checkpoint

    w = {"w": torch.ones(2)}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 0.1}]}
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path,
            step,
            model=w,
            ema=w,
            optimizer=opt,
            rng={"g": torch.zeros(3, dtype=torch.uint8)},
            state={},
            keep=2,
        )
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "latest",
        "step_000000003",
        "step_000000004",
    ]
    assert (root / "latest").read_text().strip() == "step_000000004"
    assert torch.equal(load_file(str(root / "step_000000004" / "optimizer.safetensors"))["0.exp_avg"], torch.zeros(2))
    assert not list(root.glob(".tmp_*"))


def test_weight_tables_follow_the_timesteps_device() -> None:
    """The min-SNR/EDM weight table is indexed on the device of the timesteps it is given (a GPU's, there;
    here the "meta" device stands in for it, since a CPU table indexed with meta indices stays on the CPU)."""
    sched = noise_scheduler(load_config())
    t = torch.tensor([10, 500, 990], device="meta")
    for weighting in ("min_snr", "edm", "uniform"):
        assert DiffusionLoss(sched, weighting).weight(t).device == t.device, weighting
    assert DiffusionLoss(sched, "edm").noise_feature(t).device == t.device


def _state(cfg, device: str):  # type: ignore[no-untyped-def]
    """A run's training state with every tensor on `device`, as the loop builds it after accelerate's prepare."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sdpipe.train import make_objective
    from sdpipe.train.state import TrainState
    from sdpipe.train.validation import EarlyStopping

    torch.manual_seed(0)
    unet = build_unet(cfg.model, sample_size=8, channels=1, num_classes=10).to(device)
    weighting = UncertaintyWeighting(make_objective(cfg)[0]).to(device)
    params = list(unet.parameters())
    fused = True if device in ("cpu", "cuda") else None  # as the loop builds it (meta: from the checkpoint)
    optimizer = torch.optim.AdamW(params + list(weighting.parameters()), lr=1e-3, fused=fused)
    lr_sched = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=2)
    gen = torch.Generator().manual_seed(0)
    ema = EMAModel(params, foreach=True)
    return TrainState(unet, ema, optimizer, lr_sched, gen, EpochSampler(20, 4, gen), EarlyStopping(), weighting)


def test_restored_training_state_follows_the_models_device(tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    """Resume and rollback put EMA shadows, optimizer state and the learned loss weighting on the model's
    device: restored onto the "meta" device (a stand-in for a GPU), every restored tensor is there."""
    from sdpipe.train.checkpoint import load_checkpoint

    cpu = _state(tiny_config, "cpu")
    for p in cpu.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    cpu.optimizer.step()  # so there is optimizer state to restore
    path = cpu.save(tmp_path, 1, tiny_config.model_dump(mode="json"))

    meta = _state(tiny_config, "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op": as meant here
        meta.restore(load_checkpoint(path))
    assert meta.weighting is not None
    restored = {
        "model": list(meta.unet.state_dict().values()),
        "ema": meta.ema.shadow_params,
        "optimizer": [v for s in meta.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)],
        "loss weighting": list(meta.weighting.state_dict().values()),
    }
    assert restored["optimizer"]
    for part, tensors in restored.items():
        assert all(t.device.type == "meta" for t in tensors), part


def test_step_rows_log_the_plain_denoising_loss_beside_the_objective(tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    """With the learned uncertainty weighting the objective is loss / exp(u) + u (it goes negative); every step
    row, in metrics.jsonl and as given to `progress`, carries the plain loss as `denoising_loss` too."""
    import json

    from sdpipe.data import open_split
    from sdpipe.train import train

    assert tiny_config.train.uncertainty_weighting
    cfg = tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"steps": 4})})
    seen: list[dict] = []
    result = train(cfg, open_split(cfg.data), tmp_path, progress=lambda step, row: seen.append(row))
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert seen == result.history == logged
    assert all(math.isfinite(r["denoising_loss"]) and r["denoising_loss"] > 0 for r in seen)
    assert seen[0]["denoising_loss"] == pytest.approx(seen[0]["loss"])  # u starts at 0: the same
    assert seen[-1]["denoising_loss"] != pytest.approx(seen[-1]["loss"])  # once u is learned, not the same
