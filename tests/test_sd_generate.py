"""Text-to-image through sdpipe's one generation path equals a vanilla diffusers pipeline call with per-image CPU
generators, for every sampler and SD 1.x, SD 2.x (v-prediction) and SDXL shapes; and an image is bitwise the
same whatever the other images made with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from sdpipe.conditioning import Conditioning
from sdpipe.models.pipelines import LoadedPipeline, PromptError, load_pipeline
from sdpipe.sampler_names import SAMPLERS
from sdpipe.sampling.generate import Row, SampleSpec, generate_items, row_generators
from sdpipe.sampling.schedulers import pipeline_scheduler
from sdpipe.sampling.start import noise_rows

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def pipelines(sd1_pipeline: Path, sd2v_pipeline: Path, sdxl_pipeline: Path) -> dict[str, LoadedPipeline]:
    return {
        name: load_pipeline(p) for name, p in (("sd1", sd1_pipeline), ("sd2-v", sd2v_pipeline), ("sdxl", sdxl_pipeline))
    }


def ours(model: LoadedPipeline, rows: list[Row], spec: SampleSpec) -> torch.Tensor:
    images = generate_items(model.parts, rows, spec)
    return torch.stack([images[r] for r in rows])


def vanilla(model: LoadedPipeline, rows: list[Row], spec: SampleSpec) -> torch.Tensor:
    """The same images from `pipe(...)` itself, with the same scheduler and one CPU generator per image."""
    pipe = model.pipe
    seeds = [r.seed for r in rows]
    saved, pipe.scheduler = pipe.scheduler, pipeline_scheduler(spec.sampler, model.scheduler_config, seeds)
    cond = rows[0].cond
    try:
        out = pipe(
            prompt=[r.cond.prompt for r in rows],
            negative_prompt=[r.cond.negative_prompt for r in rows] if cond.negative_prompt else None,
            height=cond.height,
            width=cond.width,
            num_inference_steps=spec.steps,
            guidance_scale=spec.guidance,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pt",
            clip_skip=None if cond.clip_skip == 1 else cond.clip_skip - 1,  # web UI's 2 is diffusers' 1
        ).images
    finally:
        pipe.scheduler = saved
    return out * 2 - 1  # pipelines give [0, 1]; sdpipe's decoders [-1, 1]


@pytest.mark.parametrize("kind", ["sd1", "sd2-v", "sdxl"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_equal_to_vanilla_diffusers(pipelines: dict[str, LoadedPipeline], kind: str, sampler: str) -> None:
    model = pipelines[kind]
    spec = SampleSpec(sampler, steps=3, guidance=4.0, micro_batch=1)
    rows = [Row(7 + i, Conditioning(prompt=p, width=32, height=32)) for i, p in enumerate(PROMPTS)]
    got, want = ours(model, rows, spec).clamp(-1, 1), vanilla(model, rows, spec)
    assert got.shape == want.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-3  # two prompts and seeds, two images


def test_negative_prompt_and_no_guidance_match_vanilla(pipelines: dict[str, LoadedPipeline]) -> None:
    for kind in ("sd1", "sdxl"):
        model = pipelines[kind]
        neg = [Row(3, Conditioning(prompt="a cat", negative_prompt="blurry", width=32, height=32))]
        for spec in (SampleSpec("euler", 3, 5.0, 1), SampleSpec("euler", 3, 1.0, 1)):
            torch.testing.assert_close(
                ours(model, neg, spec).clamp(-1, 1), vanilla(model, neg, spec), atol=2e-4, rtol=0
            )


def test_clip_skip_matches_vanilla_and_changes_the_image(pipelines: dict[str, LoadedPipeline]) -> None:
    spec = SampleSpec("euler", 3, 5.0, 1)
    for kind in ("sd1", "sdxl"):
        model = pipelines[kind]
        skip = [Row(3, Conditioning(prompt="a cat", clip_skip=2, width=32, height=32))]
        plain = [Row(3, Conditioning(prompt="a cat", width=32, height=32))]
        got = ours(model, skip, spec).clamp(-1, 1)
        torch.testing.assert_close(got, vanilla(model, skip, spec), atol=2e-4, rtol=0)
        assert (got - ours(model, plain, spec).clamp(-1, 1)).abs().max() > 1e-3


def test_an_image_never_depends_on_its_batch(pipelines: dict[str, LoadedPipeline]) -> None:
    """Bitwise: the same image alone, among others, and in micro-batches of another packing."""
    model = pipelines["sdxl"]
    rows = [Row(s, Conditioning(prompt=PROMPTS[s % 2], width=32, height=32)) for s in range(5)]
    for m in (1, 2):
        spec = SampleSpec("euler_a", 3, 3.0, m)  # a stochastic sampler: step noise per row, too
        everything = generate_items(model.parts, rows, spec)
        alone = generate_items(model.parts, [rows[3]], spec)
        assert torch.equal(everything[rows[3]], alone[rows[3]])
        pair = generate_items(model.parts, [rows[4], rows[1]], spec)
        assert torch.equal(everything[rows[1]], pair[rows[1]])


def test_half_precision_noise_is_diffusers_own(pipelines: dict[str, LoadedPipeline]) -> None:
    parts = pipelines["sd1"].parts
    parts.dtype = torch.float16  # the draw, not the model, is under test
    try:
        rows = {0: Row(11, Conditioning(prompt="x", width=32, height=32))}
        shape = parts.sample_shape(rows[0].cond)
        noise = noise_rows(row_generators(rows, 1), shape, parts.dtype)  # what start_batch draws
        g = torch.Generator("cpu").manual_seed(11)
        assert torch.equal(noise, randn_tensor((1, *noise.shape[1:]), generator=[g], dtype=torch.float16))
    finally:
        parts.dtype = torch.float32


def test_prompts_it_cannot_read_as_written_are_refused(pipelines: dict[str, LoadedPipeline]) -> None:
    model = pipelines["sd1"]
    spec = SampleSpec("euler", 2, 3.0, 1)
    for prompt, message in [
        ("a (red:1.3) circle", "prompt weighting"),
        ("a [red] circle", "prompt weighting"),
        ("x" * 80, "past the text encoder's window of 77"),
        ("a cat <lora:style:0.8>", "--lora"),
    ]:
        with pytest.raises(PromptError, match=message.replace("(", r"\(")):
            generate_items(model.parts, [Row(0, Conditioning(prompt=prompt, width=32, height=32))], spec)
    escaped = generate_items(model.parts, [Row(0, Conditioning(prompt=r"a \(red\) circle", width=32, height=32))], spec)
    plain = generate_items(
        model.parts,
        [Row(0, Conditioning(prompt="a (red) circle".replace("(", "").replace(")", ""), width=32, height=32))],
        spec,
    )
    assert next(iter(escaped.values())).shape == next(iter(plain.values())).shape


def test_an_lcm_unet_takes_guidance_as_an_embedding_like_diffusers(sd1_pipeline: Path, tmp_path: Path) -> None:
    """An LCM-distilled UNet (`time_cond_proj_dim`) runs no CFG; the guidance scale reaches it as `timestep_cond`."""
    from diffusers import UNet2DConditionModel

    base = load_pipeline(sd1_pipeline)
    torch.manual_seed(0)
    base.pipe.unet = UNet2DConditionModel.from_config({**base.pipe.unet.config, "time_cond_proj_dim": 8})
    base.pipe.save_pretrained(tmp_path / "lcm", safe_serialization=True)
    model = load_pipeline(tmp_path / "lcm")
    rows = [Row(2, Conditioning(prompt="a cat", width=32, height=32))]
    a, b = SampleSpec("lcm", 3, 6.0, 1), SampleSpec("lcm", 3, 2.0, 1)
    torch.testing.assert_close(ours(model, rows, a).clamp(-1, 1), vanilla(model, rows, a), atol=2e-4, rtol=0)
    assert (ours(model, rows, a) - ours(model, rows, b)).abs().max() > 1e-4  # the scale reaches the network
