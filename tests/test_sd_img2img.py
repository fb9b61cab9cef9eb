"""img2img and inpainting (9-channel inpainting UNets and ordinary 4-channel ones) through sdpipe's generation
path equal diffusers' own pipelines given one CPU generator per image; an image never depends on its batch."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdpipe.conditioning import Conditioning
from sdpipe.inputs import register
from sdpipe.models.pipelines import LoadedPipeline, load_pipeline
from sdpipe.sampling.generate import Row, SampleSpec, generate_items
from sdpipe.sampling.schedulers import pipeline_scheduler

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
SIZE = 32


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask_image() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:24, 4:20] = 255  # white: repaint
    return Image.fromarray(m)


def as_bytes(im: Image.Image) -> bytes:
    return png(np.asarray(im))


def ours(model: LoadedPipeline, rows: list[Row], spec: SampleSpec) -> torch.Tensor:
    images = generate_items(model.parts, rows, spec)
    return torch.stack([images[r] for r in rows]).clamp(-1, 1)


def vanilla(cls_name: str, model: LoadedPipeline, rows: list[Row], spec: SampleSpec, **kw: object) -> torch.Tensor:
    import diffusers

    pipe = getattr(diffusers, cls_name)(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    seeds = [r.seed for r in rows]
    pipe.scheduler = pipeline_scheduler(spec.sampler, model.scheduler_config, seeds)
    out = pipe(
        prompt=[r.cond.prompt for r in rows],
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pt",
        **kw,
    ).images
    return out * 2 - 1


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim"])
@pytest.mark.parametrize("strength", [0.5, 0.9])
def test_img2img_equals_vanilla(sd1_pipeline: Path, sampler: str, strength: float) -> None:
    model = load_pipeline(sd1_pipeline)
    init = register(as_bytes(picture()))
    spec = SampleSpec(sampler, 4, 4.0, 1)
    rows = [
        Row(s, Conditioning(prompt=p, init=init, strength=strength, width=SIZE, height=SIZE))
        for s, p in ((3, "a cat"), (4, "a dog"))
    ]
    want = vanilla("StableDiffusionImg2ImgPipeline", model, rows, spec, image=[picture()] * 2, strength=strength)
    torch.testing.assert_close(ours(model, rows, spec), want, atol=2e-4, rtol=0)


def test_sdxl_img2img_equals_vanilla(sdxl_pipeline: Path) -> None:
    model = load_pipeline(sdxl_pipeline)
    init = register(as_bytes(picture()))
    spec = SampleSpec("euler", 4, 4.0, 1)
    rows = [Row(9, Conditioning(prompt="a cat", init=init, strength=0.7, width=SIZE, height=SIZE))]
    want = vanilla("StableDiffusionXLImg2ImgPipeline", model, rows, spec, image=[picture()], strength=0.7)
    torch.testing.assert_close(ours(model, rows, spec), want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("strength", [1.0, 0.7])
@pytest.mark.parametrize("kind", ["nine-channel", "four-channel"])
def test_inpainting_equals_vanilla(
    sd1_inpaint_pipeline: Path,
    sd1_pipeline: Path,
    kind: str,
    strength: float,
) -> None:
    model = load_pipeline(sd1_inpaint_pipeline if kind == "nine-channel" else sd1_pipeline)
    init, mask = register(as_bytes(picture())), register(as_bytes(mask_image()))
    spec = SampleSpec("euler_a", 4, 4.0, 1)
    rows = [
        Row(s, Conditioning(prompt=p, init=init, mask=mask, strength=strength, width=SIZE, height=SIZE))
        for s, p in ((5, "a cat"), (6, "a dog"))
    ]
    want = vanilla(
        "StableDiffusionInpaintPipeline",
        model,
        rows,
        spec,
        image=[picture()] * 2,
        mask_image=[mask_image()] * 2,
        strength=strength,
        height=SIZE,
        width=SIZE,
    )
    got = ours(model, rows, spec)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-3


def test_an_input_image_row_never_depends_on_its_batch(sd1_inpaint_pipeline: Path) -> None:
    model = load_pipeline(sd1_inpaint_pipeline)
    init, mask = register(as_bytes(picture())), register(as_bytes(mask_image()))
    rows = [
        Row(s, Conditioning(prompt="a cat", init=init, mask=mask, strength=0.8, width=SIZE, height=SIZE))
        for s in range(4)
    ]
    spec = SampleSpec("euler_a", 3, 3.0, 2)
    everything = generate_items(model.parts, rows, spec)
    alone = generate_items(model.parts, [rows[2]], spec)
    assert torch.equal(everything[rows[2]], alone[rows[2]])


def test_a_strength_that_keeps_no_step_is_refused(sd1_pipeline: Path) -> None:
    model = load_pipeline(sd1_pipeline)
    cond = Conditioning(prompt="x", init=register(as_bytes(picture())), strength=0.1, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="keeps no sampling step"):
        generate_items(model.parts, [Row(0, cond)], SampleSpec("euler", 4, 3.0, 1))
