"""Text-to-image training on the tiny SD1 pipeline: the three methods through one trainer, bitwise resume
(buckets and caches included), the kohya LoRA file against vanilla diffusers' `load_lora_weights`, pipeline
folders that vanilla diffusers loads, cache reuse, and runs refused for missing captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdpipe.config import PipelineConfig, load_config
from sdpipe.data import open_split
from sdpipe.data.buckets import BucketPlan
from sdpipe.data.validate import validate
from sdpipe.train.t2i import CaptionError
from sdpipe.train.t2i_run import LORA_FILE, train_text_to_image

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


class Interrupt(Exception):
    pass


def _write_images(folder: Path, captions: bool = True, wide: bool = True) -> Path:
    """Eight captioned squares on black, 32x32, and (with `wide`) four 48x32 ones for a second bucket."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(32, 32)] * 8 + ([(48, 32)] * 4 if wide else [])
    for i, (w, h) in enumerate(sizes):
        name = list(COLOURS)[i % 4]
        pixels = np.zeros((h, w, 3), np.uint8)
        x, y = rng.integers(0, w - 12), rng.integers(0, h - 12)
        pixels[y : y + 12, x : x + 12] = COLOURS[name]
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        if captions:
            (folder / f"{i:02d}.txt").write_text(f"a {name} square")
    return folder


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("captioned")
    source = _write_images(root / "images")
    validate(str(source), root / "validated", load_config(None, []).data)
    return source, root / "validated"


def _config(source: Path, validated: Path, pretrained: Path, cache: Path, *extra: str) -> PipelineConfig:
    return load_config(
        None,
        [
            "model.type=text-to-image",
            f"model.pretrained={pretrained}",
            "diffusion.formulation=ddpm",
            "train.loss_weighting=min_snr",
            "train.uncertainty_weighting=false",
            "sample.sampler=euler",
            "data.source=folder",
            f"data.path={source}",
            f"data.validated_dir={validated}",
            "data.resolution=32",
            "data.buckets=true",
            "data.bucket_step=16",
            "data.random_flip=true",
            "train.batch_size=2",
            "train.steps=6",
            "train.checkpoint_every=2",
            "train.warmup_steps=1",
            "train.learning_rate=1e-3",
            "model.block_out_channels=[32, 64]",
            "model.norm_num_groups=32",
            "model.attention_head_dim=8",
            f"train.cache_dir={cache}",
            *extra,
        ],
    )


def _stop_at(step_to_fail: int):  # type: ignore[no-untyped-def]
    def progress(step: int, row: dict) -> None:
        if step == step_to_fail:
            raise Interrupt

    return progress


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "full", "scratch"])
def test_resume_is_bitwise_for_each_method(
    method: str, captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    cfg = _config(*captioned, sd1_pipeline, tmp_path / "cache", f"train.method={method}")
    data = open_split(cfg.data)
    full = train_text_to_image(cfg, data, tmp_path / "full")
    with pytest.raises(Interrupt):
        train_text_to_image(cfg, data, tmp_path / "cut", progress=_stop_at(5))
    resumed = train_text_to_image(cfg, data, tmp_path / "cut", resume=True)
    a, b = _weights(full.outcome.module), _weights(resumed.outcome.module)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed.outcome.history] == [r["loss"] for r in full.outcome.history]
    # the second and third runs found every latent and caption in the cache the first one wrote
    assert resumed.caches["latents"]["built"] == 0 and resumed.caches["text"]["built"] == 0
    assert sorted(n for n in full.bucket_plan["buckets"].values() if n) == [4, 8]  # 32x32 and a wide one


def test_lora_file_loads_in_vanilla_diffusers_and_matches_sdpipe(
    captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    from safetensors import safe_open

    from sdpipe.models.lora import lora_ref
    from sdpipe.models.pipelines import load_pipeline
    from test_lora import ours, vanilla

    cfg = _config(*captioned, sd1_pipeline, tmp_path / "cache", "train.method=lora", "train.lora_alpha=8")
    result = train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run")
    lora = tmp_path / "run" / LORA_FILE
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
        assert f.metadata()["sdpipe.base_hash"].startswith("sha256:")
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert float(alpha) == 8.0
    meta = json.loads((tmp_path / "run" / "model" / "sdpipe.json").read_text())
    assert meta["kind"] == "lora" and Path(meta["lora"]) == lora.resolve()

    reference = load_pipeline(sd1_pipeline)
    reference.pipe.load_lora_weights(str(lora))
    want = vanilla(reference)
    model = load_pipeline(sd1_pipeline)
    model.parts  # noqa: B018
    got = ours(model, (lora_ref(lora),))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    plain = vanilla(load_pipeline(sd1_pipeline))
    assert (want - plain).abs().max() > 1e-3  # the trained LoRA changes the image
    assert result.outcome.history[-1]["step"] == 6


@pytest.mark.parametrize("method", ["full", "scratch"])
def test_full_and_scratch_save_a_pipeline_vanilla_diffusers_samples(
    method: str, captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    import diffusers

    cfg = _config(*captioned, sd1_pipeline, tmp_path / "cache", f"train.method={method}", "train.steps=2")
    result = train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(result.model_dir, local_files_only=True)
    saved = pipe.unet.state_dict()
    trained = result.outcome.module.state_dict()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    image = pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    record = json.loads((result.model_dir / "sdpipe_training.json").read_text())
    assert record["method"] == method
    assert sorted(n for n in BucketPlan.from_json(record["bucket_plan"]).counts().values() if n) == [4, 8]


def test_images_without_captions_stop_the_run_unless_unconditional(sd1_pipeline: Path, tmp_path: Path) -> None:
    source = _write_images(tmp_path / "plain", captions=False, wide=False)
    validate(str(source), tmp_path / "validated", load_config(None, []).data)
    cfg = _config(source, tmp_path / "validated", sd1_pipeline, tmp_path / "cache", "train.method=lora")
    with pytest.raises(CaptionError, match="none of the 8 training images has a caption"):
        train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run")
    cfg = _config(
        source, tmp_path / "validated", sd1_pipeline, tmp_path / "cache", "train.method=lora",
        "train.unconditional=true", "train.steps=1",
    )  # fmt: skip
    result = train_text_to_image(cfg, open_split(cfg.data), tmp_path / "run2")
    assert result.caches["text"]["built"] >= 1


def test_command_line_trains_a_lora_and_generates_with_its_run_model(
    captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    """`sdpipe train` with a LoRA config, then `sdpipe generate --model RUN/model` gives the images of the base
    with `--lora RUN/lora.safetensors`; `sdpipe cache info` lists what the run cached."""
    from typer.testing import CliRunner

    from sdpipe.cli import app

    source, validated = captioned
    runner = CliRunner()
    sets = [
        "model.type=text-to-image", f"model.pretrained={sd1_pipeline}", "diffusion.formulation=ddpm",
        "train.loss_weighting=uniform", "train.uncertainty_weighting=false", "sample.sampler=euler",
        "data.source=folder", f"data.path={source}", f"data.validated_dir={validated}", "data.resolution=32",
        "train.method=lora", "train.batch_size=2", "train.steps=3", "train.learning_rate=1e-2",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    args = ["train", "--out", str(tmp_path / "run"), "-q"] + [x for s in sets for x in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "training.json").read_text())
    assert report["method"] == "lora" and report["steps"] == 3 and report["caches"]["latents"]["built"] == 12

    common = ["--prompt", "a red square", "--n", "2", "--seed", "5", "--steps", "2", "--sampler", "euler", "-q"]
    run_model = runner.invoke(
        app, ["generate", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "a"), *common]
    )
    assert run_model.exit_code == 0, run_model.output
    lora = str(tmp_path / "run" / LORA_FILE)
    with_lora = runner.invoke(
        app, ["generate", "--model", str(sd1_pipeline), "--lora", lora, "--out", str(tmp_path / "b"), *common]
    )
    assert with_lora.exit_code == 0, with_lora.output
    plain = runner.invoke(app, ["generate", "--model", str(sd1_pipeline), "--out", str(tmp_path / "c"), *common])
    pngs = [sorted((tmp_path / d).glob("*.png")) for d in "abc"]
    assert len(pngs[0]) == 2
    for a, b, c in zip(*pngs, strict=True):
        pa, pb, pc = (np.asarray(Image.open(p)) for p in (a, b, c))
        assert np.array_equal(pa, pb)
        assert plain.exit_code == 0 and not np.array_equal(pa, pc)

    info = runner.invoke(app, ["cache", "info", "--root", str(tmp_path / "cache")])
    assert info.exit_code == 0 and "latents" in info.output, info.output


def test_recipes_zero_terminal_snr_prediction_type_and_noise_offset(
    captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path
) -> None:
    """Zero terminal SNR makes the last timestep pure noise; the base's prediction type holds unless
    diffusion.prediction_type is set; epsilon with zero terminal SNR is refused; the noise offset shifts each
    image's noise by one value per channel (drawn after the caption dropout, from the run's generator)."""
    from sdpipe.config import ConfigError
    from sdpipe.train.t2i import training_scheduler

    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    cfg = _config(*captioned, sd1_pipeline, tmp_path, "diffusion.zero_terminal_snr=true")
    with pytest.raises(ValueError, match="set diffusion.prediction_type"):  # an epsilon base must be told
        training_scheduler(cfg, {**base, "prediction_type": "epsilon"})
    cfg = _config(
        *captioned, sd1_pipeline, tmp_path, "diffusion.zero_terminal_snr=true", "diffusion.prediction_type=v_prediction"
    )
    sched = training_scheduler(cfg, {**base, "prediction_type": "epsilon"})
    assert float(sched.alphas_cumprod[-1]) < 1e-6 and sched.config["prediction_type"] == "v_prediction"
    plain = training_scheduler(_config(*captioned, sd1_pipeline, tmp_path), {**base, "prediction_type": "epsilon"})
    assert plain.config["prediction_type"] == "epsilon" and float(plain.alphas_cumprod[-1]) > 1e-3
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        _config(
            *captioned, sd1_pipeline, tmp_path, "diffusion.zero_terminal_snr=true", "diffusion.prediction_type=epsilon"
        )

    from sdpipe.train.t2i import TextToImageTask, load_base

    def noises(offset: float) -> torch.Tensor:
        c = _config(*captioned, sd1_pipeline, tmp_path / "cache", "train.method=lora", f"train.noise_offset={offset}")
        task = TextToImageTask(
            c, load_base(str(sd1_pipeline)), open_split(c.data), torch.Generator().manual_seed(0), torch.device("cpu")
        )
        return task.draw(torch.Generator().manual_seed(1), 0, 1, torch.device("cpu"))[2]

    a, b = noises(0.0), noises(0.5)
    shift = b - a  # the same draws, plus offset x one N(0, 1) per image and channel
    assert not torch.equal(a, b)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)


def test_sdxl_lora_trains_resumes_and_loads_in_vanilla_diffusers(
    captioned: tuple[Path, Path], sdxl_pipeline: Path, tmp_path: Path
) -> None:
    """SDXL: two text encoders (pooled embeddings cached too) and size conditioning; resume stays bitwise and the
    kohya file loads with vanilla diffusers."""
    import diffusers

    cfg = _config(*captioned, sdxl_pipeline, tmp_path / "cache", "train.method=lora", "train.steps=4")
    data = open_split(cfg.data)
    full = train_text_to_image(cfg, data, tmp_path / "full")
    with pytest.raises(Interrupt):
        train_text_to_image(cfg, data, tmp_path / "cut", progress=_stop_at(3))
    resumed = train_text_to_image(cfg, data, tmp_path / "cut", resume=True)
    a, b = _weights(full.outcome.module), _weights(resumed.outcome.module)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "full" / LORA_FILE))
    assert any(pipe.get_list_adapters().values())


def test_two_processes_train_what_one_does(captioned: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo), the caches shared: the LoRA of 1 process, within float tolerance."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    torchrun = Path(sys.executable).parent / "torchrun"
    if shutil.which(str(torchrun)) is None:
        pytest.skip("no torchrun next to this Python")
    source, validated = captioned
    sets = [
        "model.type=text-to-image", f"model.pretrained={sd1_pipeline}", "diffusion.formulation=ddpm",
        "train.loss_weighting=uniform", "train.uncertainty_weighting=false", "sample.sampler=euler",
        "data.source=folder", f"data.path={source}", f"data.validated_dir={validated}", "data.resolution=32",
        "data.buckets=true", "data.bucket_step=16", "train.method=lora", "train.batch_size=4", "train.steps=4",
        "train.threads=1", f"train.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    args = ["-m", "sdpipe.cli", "train", "--quiet"] + [x for s in sets for x in ("--set", s)]
    for cmd, out in (
        ([sys.executable], "one"),
        ([str(torchrun), "--standalone", "--nproc_per_node", "2"], "two"),
    ):
        proc = subprocess.run([*cmd, *args, "--out", str(tmp_path / out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (load_file(str(tmp_path / d / LORA_FILE)) for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-4)
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer


def test_validation_loss_is_deterministic_and_keeps_the_best(sd1_pipeline: Path, tmp_path: Path) -> None:
    """With a validation split, the validation loss of the EMA weights is logged every N steps, is the same in
    two runs, and the run keeps the best validation's weights (early stopping after `patience`)."""
    from sdpipe.config import load_config as load

    source = _write_images(tmp_path / "images")
    data_cfg = load(None, ["data.validation_fraction=0.3"]).data
    validate(str(source), tmp_path / "validated", data_cfg)
    extra = (
        "train.method=lora", "data.validation_fraction=0.3", "train.validate_every=2", "train.steps=8",
        "train.early_stopping_patience=2", "train.learning_rate=0.05",
    )  # fmt: skip
    cfg = _config(source, tmp_path / "validated", sd1_pipeline, tmp_path / "cache", *extra)
    train_split, val_split = open_split(cfg.data, "train"), open_split(cfg.data, "validation")
    assert len(val_split) > 0
    runs = [train_text_to_image(cfg, train_split, tmp_path / f"r{i}", validation=val_split) for i in range(2)]
    values = [[e["val_loss"] for e in r.outcome.events if e.get("event") == "validation"] for r in runs]
    assert values[0] and values[0] == values[1]
    best = runs[0].outcome.best_step
    assert best is not None and best % 2 == 0
    assert (tmp_path / "r0" / "checkpoints" / "best").exists()
