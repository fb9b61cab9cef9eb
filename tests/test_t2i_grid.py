"""Validation prompts rendered during text-to-image training (`train.validation_prompts`, every
`train.validation_prompt_every` steps) on the tiny SD1 pipeline: grids at the right steps, the same bytes in two
runs, training weights untouched by rendering, the training LoRA visible in the images, resume continuing the
grid list, and RUN/training.json listing the grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdpipe.config import ConfigError, PipelineConfig
from sdpipe.data import open_split
from sdpipe.data.validate import validate
from sdpipe.train.t2i_grid import GAP, IMAGES_PER_PROMPT, TrainingParts, ValidationRenderer, check_settings
from sdpipe.train.t2i_run import TextToImageResult, train_text_to_image
from test_t2i_train import Interrupt, _config, _stop_at, _weights, _write_images

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")

PROMPTS = ["a red square", "a blue square"]
SIZE = 32
Rendered = tuple[PipelineConfig, Path, TextToImageResult]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sdpipe.config import load_config

    root = tmp_path_factory.mktemp("grid_data")
    source = _write_images(root / "images", wide=False)
    validate(str(source), root / "validated", load_config(None, []).data)
    return source, root / "validated"


def _grid_config(data: tuple[Path, Path], pretrained: Path, cache: Path, *extra: str) -> PipelineConfig:
    return _config(
        *data, pretrained, cache,
        "train.method=lora", "train.learning_rate=0.05", "train.steps=6", "train.checkpoint_every=2",
        "sample.steps=3", "sample.guidance=2", f"train.validation_prompts={json.dumps(PROMPTS)}", *extra,
    )  # fmt: skip


def _run(cfg: PipelineConfig, run_dir: Path, resume: bool = False, progress: Any = None) -> TextToImageResult:
    return train_text_to_image(cfg, open_split(cfg.data), run_dir, resume=resume, progress=progress)


@pytest.fixture(scope="module")
def rendered(data: tuple[Path, Path], sd1_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    """One run rendering at steps 2, 4 and 6."""
    root = tmp_path_factory.mktemp("grid_runs")
    cfg = _grid_config(data, sd1_pipeline, root / "cache", "train.validation_prompt_every=2")
    return cfg, root, _run(cfg, root / "a")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_grids_at_every_nth_step_and_over_steps(rendered: Rendered) -> None:
    cfg, root, result = rendered
    run = root / "a"
    steps = [2, 4, 6]
    assert result.validation_grids == [{"step": s, "path": f"validation/step_{s:06d}.png"} for s in steps]
    assert sorted(p.name for p in (run / "validation").iterdir()) == [
        "grid.png", "step_000002.png", "step_000004.png", "step_000006.png",
    ]  # fmt: skip
    events = [e for e in result.outcome.events if e.get("event") == "evaluation"]
    assert [(e["step"], e["validation_grid"]) for e in events] == [
        (g["step"], g["path"]) for g in result.validation_grids
    ]
    one = _pixels(run / "validation" / "step_000002.png")  # a row per prompt, a column per seed
    assert one.shape == (2 * (SIZE + GAP) - GAP, IMAGES_PER_PROMPT * (SIZE + GAP) - GAP, 3)
    assert result.validation_grid == "validation/grid.png"
    over = _pixels(run / result.validation_grid)  # a row per (prompt, seed), a column per step
    assert over.shape == (2 * IMAGES_PER_PROMPT * (SIZE + GAP) - GAP, len(steps) * (SIZE + GAP) - GAP, 3)
    # prompt 1's seed 2 at step 4: row 1 x 4 + 2, column 1 of grid.png; row 1, column 2 of step 4's grid
    tile = over[6 * (SIZE + GAP) :][:SIZE, SIZE + GAP :][:, :SIZE]
    four = _pixels(run / "validation" / "step_000004.png")
    assert np.array_equal(tile, four[SIZE + GAP :][:SIZE, 2 * (SIZE + GAP) :][:, :SIZE])
    seeds = [_pixels(run / "validation" / "step_000006.png")[:SIZE, k * (SIZE + GAP) :][:, :SIZE] for k in range(2)]
    assert not np.array_equal(seeds[0], seeds[1])  # seeds train.seed + k give different images


def test_rendering_is_deterministic_and_leaves_the_training_alone(
    rendered: Rendered, sd1_pipeline: Path, data: tuple[Path, Path]
) -> None:
    cfg, root, result = rendered
    again = _run(cfg, root / "b")
    for g in result.validation_grids + [{"path": "validation/grid.png"}]:
        assert (root / "a" / g["path"]).read_bytes() == (root / "b" / g["path"]).read_bytes()
    plain_cfg = _grid_config(data, sd1_pipeline, root / "cache", "train.validation_prompts=[]")
    plain = _run(plain_cfg, root / "c")
    assert not (root / "c" / "validation").exists() and plain.validation_grids == []
    for other in (again, plain):
        a, b = _weights(result.outcome.module), _weights(other.outcome.module)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [r["loss"] for r in other.outcome.history] == [r["loss"] for r in result.outcome.history]


def test_the_training_lora_is_in_the_images(rendered: Rendered, sd1_pipeline: Path) -> None:
    """The grids show the LoRA in training: step 6's images differ from the base's and from step 2's. The base
    is rendered through the same path; with no LoRAs of its own, rendering left the peft adapter enabled."""
    from sdpipe.models.lora import apply_loras
    from sdpipe.models.pipelines import PipelineParts
    from sdpipe.train.t2i import load_base

    cfg, root, result = rendered
    base = load_base(str(sd1_pipeline))
    config = dict(base.pipe.scheduler.config)
    renderer = ValidationRenderer(cfg, base.pipe, root, SIZE, config)
    rng = torch.random.get_rng_state()
    base_images = np.concatenate([np.concatenate(list(p), axis=1) for p in renderer.render()])
    assert torch.equal(rng, torch.random.get_rng_state())  # the global generator is left as it was
    grid = _pixels(root / "a" / "validation" / "step_000006.png")
    trained = np.concatenate(
        [np.concatenate([grid[p * (SIZE + GAP) :][:SIZE, k * (SIZE + GAP) :][:, :SIZE] for k in range(4)], axis=1)
         for p in range(2)]
    )  # fmt: skip
    assert np.abs(trained.astype(int) - base_images.astype(int)).mean() > 1.0
    assert not np.array_equal(grid, _pixels(root / "a" / "validation" / "step_000002.png"))

    # the run's final UNet (the EMA weights, its peft adapter "default") in the base pipeline, rendered again
    base.pipe.unet = result.outcome.module
    again = ValidationRenderer(cfg, base.pipe, root, SIZE, config)
    assert isinstance(again.parts, TrainingParts)
    with_lora = np.concatenate([np.concatenate(list(p), axis=1) for p in again.render()])
    assert np.array_equal(with_lora, trained)  # step 6's images
    # what the brief asked to check: the generation path's own prepare (apply_loras with no LoRAs) leaves an
    # adapter it did not load enabled, today (TrainingParts does not rely on it)
    PipelineParts(base.pipe).prepare(again.rows[0].cond)
    apply_loras(base.pipe, ())
    layers = [m for m in base.pipe.unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    assert layers and not any(m.disable_adapters for m in layers)
    assert np.array_equal(np.concatenate([np.concatenate(list(p), axis=1) for p in again.render()]), trained)


def test_resume_continues_the_grid_list(rendered: Rendered) -> None:
    cfg, root, result = rendered
    with pytest.raises(Interrupt):
        _run(cfg, root / "cut", progress=_stop_at(5))
    assert sorted(p.name for p in (root / "cut" / "validation").iterdir()) == ["step_000002.png", "step_000004.png"]
    resumed = _run(cfg, root / "cut", resume=True)
    assert resumed.validation_grids == result.validation_grids
    for name in ("step_000002.png", "step_000004.png", "step_000006.png", "grid.png"):
        assert (root / "cut" / "validation" / name).read_bytes() == (root / "a" / "validation" / name).read_bytes()


def test_training_report_lists_the_grids(rendered: Rendered) -> None:
    from sdpipe.pipeline_t2i import write_training_report

    cfg, root, result = rendered
    report = json.loads(write_training_report(root / "a", cfg, result, {}).read_text())
    assert report["validation_grids"] == result.validation_grids and report["validation_grid"] == "validation/grid.png"


def test_both_settings_or_neither(data: tuple[Path, Path], sd1_pipeline: Path, tmp_path: Path) -> None:
    cfg = _grid_config(data, sd1_pipeline, tmp_path)
    with pytest.raises(ConfigError, match="validation_prompt_every"):
        check_settings(cfg)
    cfg = _grid_config(data, sd1_pipeline, tmp_path, "train.validation_prompts=[]", "train.validation_prompt_every=2")
    with pytest.raises(ConfigError, match="needs train.validation_prompts"):
        check_settings(cfg)
    assert not check_settings(_grid_config(data, sd1_pipeline, tmp_path, "train.validation_prompts=[]"))
