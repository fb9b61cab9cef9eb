"""What a text-to-image file records: its `samples.jsonl` line and its PNG chunks.

Two text chunks, as for the digits: `parameters` in the web UIs' own format (so their PNG-info tabs, sd-parsers
and the other metadata readers show prompt, seed and settings), and `sdpipe`, JSON of format 2, with everything
`sdpipe replay` needs to make the image again bit for bit: model hash and path, seed, the whole `Conditioning`,
sampler settings, micro-batch, device type, dtype and library versions.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from PIL import PngImagePlugin

from sdpipe import __version__
from sdpipe.conditioning import Conditioning, DataRef, LoraRef
from sdpipe.inputs import load_image
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.sampler_names import SAMPLERS
from sdpipe.sampling.generate import Row, SampleSpec
from sdpipe.sampling.infotext import webui_parameters

FORMAT = 2


def to_rgb8(x: torch.Tensor) -> np.ndarray:
    """An image in [-1, 1] (3, H, W) -> uint8 (H, W, 3), as diffusers' `numpy_to_pil` rounds."""
    v = (x.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (v * 255).round().astype(np.uint8)


def image_size(model: LoadedPipeline, cond: Conditioning) -> tuple[int, int]:
    """(width, height) an image of `cond` has."""
    h, w = model.parts.size(cond)
    return w, h


def record(model: LoadedPipeline, row: Row, spec: SampleSpec) -> dict[str, Any]:
    """The samples.jsonl record of one image (without its file name)."""
    c = row.cond
    width, height = image_size(model, c)
    return {
        "prompt": c.prompt,
        "negative_prompt": c.negative_prompt,
        "width": width,
        "height": height,
        "seed": row.seed,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "guidance": spec.guidance,
        "clip_skip": c.clip_skip,
        "image": None if c.init is None else c.init.sha256,
        "mask": None if c.mask is None else c.mask.sha256,
        "strength": c.strength,
        "loras": [{"ref": lo.ref, "weight": lo.weight, "sha256": lo.sha256} for lo in c.loras],
        "model": model.hash,
    }


def png_info(model: LoadedPipeline, row: Row, spec: SampleSpec) -> PngImagePlugin.PngInfo:
    """The `parameters` (web-UI format) and `sdpipe` (JSON, format 2) chunks of one image."""
    c = row.cond
    width, height = image_size(model, c)
    from sdpipe.models.lora import display_name

    tags = "".join(f" <lora:{display_name(lo)}:{lo.weight:g}>" for lo in c.loras)  # as the web UIs write them
    params = webui_parameters(
        prompt=(c.prompt or "") + tags,
        negative_prompt=c.negative_prompt,
        steps=spec.steps,
        sampler=SAMPLERS[spec.sampler].webui,
        cfg_scale=spec.guidance,
        seed=row.seed,
        width=width,
        height=height,
        model_hash=model.hash.removeprefix("sha256:")[:10],
        model=model.path.stem if model.path.is_file() else model.path.name,
        denoising_strength=_strength(c),
        clip_skip=c.clip_skip,
        loras=[(display_name(lo), (lo.sha256 or "")[:12]) for lo in c.loras],
        version=f"sdpipe {__version__}",
    )
    exact = {
        "format": FORMAT,
        "kind": model.kind,
        "model_hash": model.hash,
        "model_path": str(model.path.resolve()),
        "seed": row.seed,
        "conditioning": c.model_dump(mode="json"),
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "micro_batch": spec.micro_batch,
        "memory": model.memory,
        "device": model.parts.device.type,
        "dtype": str(model.parts.dtype).removeprefix("torch."),
        "versions": versions(),
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params)
    info.add_text("sdpipe", json.dumps(exact))
    return info


def _strength(c: Conditioning) -> float | None:
    """The web UIs' `Denoising strength` of an img2img/inpainting image (the pipelines' defaults: 0.8, 1.0)."""
    if c.init is None:
        return None
    return c.strength if c.strength is not None else (1.0 if c.mask is not None else 0.8)


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "sdpipe": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt, or the lines of --prompts FILE (blank lines skipped): image i takes line i mod their count."""
    from pathlib import Path

    if (prompt is None) == (prompts_file is None):
        raise ValueError("a text-to-image model takes one of --prompt TEXT or --prompts FILE")
    if prompt is not None:
        return [prompt]
    path = Path(prompts_file or "")
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    found = [line for line in lines if line]
    if not found:
        raise ValueError(f"--prompts {path}: no prompts in it (one a line)")
    return found


def prompt_conditions(
    model: LoadedPipeline,
    prompts: list[str],
    n: int,
    *,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    clip_skip: int = 1,
    init: DataRef | None = None,
    mask: DataRef | None = None,
    strength: float | None = None,
    loras: tuple[LoraRef, ...] = (),
) -> list[Conditioning]:
    """The conditioning of images 0..n-1: image i takes prompt i mod len(prompts). Sizes must be multiples of
    8 (the VAE's factor, and what the pipelines check); with an input image (img2img, inpainting) they default
    to its size, rounded down to a multiple of 8."""
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"{name} {value}: give a multiple of 8 (at least 8)")
    _check_inputs(model, init, mask, strength)
    if init is not None and (width is None or height is None):
        w, h = load_image(init).size
        width, height = width or max(8, w // 8 * 8), height or max(8, h // 8 * 8)
    conds = [
        Conditioning(
            prompt=p,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            clip_skip=clip_skip,
            init=init,
            mask=mask,
            strength=strength,
            loras=loras,
        )
        for p in prompts
    ]
    for c in conds:  # refused before any work: weighting syntax, prompts past the window
        model.parts.check_prompt(c.prompt or "")
        model.parts.check_prompt(c.negative_prompt, "negative prompt")
    return [conds[i % len(conds)] for i in range(n)]


def _check_inputs(model: LoadedPipeline, init: DataRef | None, mask: DataRef | None, strength: float | None) -> None:
    """img2img and inpainting options that go together, and what an inpainting UNet needs."""
    if mask is not None and init is None:
        raise ValueError("--mask needs --image: the mask marks which part of that image to repaint")
    if strength is not None and init is None:
        raise ValueError("--strength applies to an input image: give --image too")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ValueError(f"--strength {strength}: give a number in (0, 1] (1 = repaint fully)")
    if model.parts.in_channels == 9 and mask is None:
        raise ValueError(f"{model.path} is an inpainting model: give --image and --mask")
