"""The web UI's HTTP API (AUTOMATIC1111's `/sdapi/v1/*`), so that clients written for it work unmodified.

`txt2img` and `img2img` take the web UI's field names and defaults and map them onto the same `GenerateJob`s
as `POST /v1/generate` (same batcher, so the same batching, 429s and keys; the same PNG bytes as `sdpipe
generate`): `prompt`, `negative_prompt`, `seed` (-1: drawn here and reported), `steps`, `cfg_scale`, `width`,
`height`, `sampler_name` (or the older `sampler_index`) with `scheduler` (Automatic or Karras), `batch_size` x
`n_iter` images with seeds seed+i, `override_settings.CLIP_stop_at_last_layers`, and for img2img `init_images`
(one), `denoising_strength`, `mask` and `inpainting_mask_invert`.

Every other field of the web UI's request is either harmless here (saving options, the hires-fix settings while
`enable_hr` is off, script lists left empty) and accepted, or it asks for something sdpipe does not do (hires
fix, face restoration, tiling, variation seeds, styles, scripts, a blurred or "only masked" inpainting, ...): a
422 naming the field, never a silently different image. Fields the web UI does not have are refused too.
"""

from __future__ import annotations

import io
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.params import Depends
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from sdpipe import __version__, sampler_names
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.sampling import samplers_for
from sdpipe.serve.batching import AnyModel, Batcher, GenerateJob, InvalidRequest, JobResult, model_hash, sample_spec
from sdpipe.serve.common import base64_bytes, current_model, invalid_many, run_job
from sdpipe.serve.holder import ModelHolder
from sdpipe.serve.sdapi_schema import (
    DEFAULT_SAMPLER,
    FIXED_OPTIONS,
    HARMLESS_OPTIONS,
    Img2ImgRequest,
    Problems,
    Txt2ImgRequest,
    WebUIRequest,
    WebUIState,
    _bounded,
    apply_options,
    model_names,
)
from sdpipe.serve.settings import MAX_SEED, ServeSettings

# --------------------------------------------------------------------------- mapping a request


def resolve_sampler(req: WebUIRequest) -> tuple[str, Problems]:
    """sdpipe's name for `sampler_name` (or `sampler_index`) under `scheduler`: Automatic keeps the named sampler,
    Karras asks for its Karras-sigma variant ('DPM++ 2M' + Karras = 'DPM++ 2M Karras')."""
    field_name = "sampler_name" if req.sampler_name else ("sampler_index" if req.sampler_index else "sampler_name")
    given = req.sampler_name or req.sampler_index or DEFAULT_SAMPLER
    schedule = (req.scheduler or "automatic").strip().lower()
    if schedule not in ("automatic", "karras"):
        return "", [("scheduler", f"schedule type {req.scheduler!r} is not supported: use Automatic or Karras")]
    try:
        name = sampler_names.resolve(given)
    except ValueError as exc:
        if schedule != "karras":
            return "", [(field_name, str(exc))]
        try:
            name = sampler_names.resolve(f"{given} Karras")
        except ValueError:
            return "", [(field_name, str(exc))]
    if schedule == "karras" and not name.endswith("_karras"):
        if f"{name}_karras" not in sampler_names.SAMPLERS:
            karras = [s.webui for s in sampler_names.SAMPLERS.values() if s.name.endswith("_karras")]
            return "", [("scheduler", f"{given!r} has no Karras variant here; those with one: {', '.join(karras)}")]
        name = f"{name}_karras"
    return name, []


def _refusals(req: WebUIRequest, sampler: str) -> Problems:
    """The fields set to something sdpipe does not do."""
    p: Problems = []

    def nonzero(value: float | None) -> bool:
        return value is not None and value != 0

    if req.styles:
        p.append(("styles", "prompt styles are not supported: put the text in the prompt"))
    if nonzero(req.subseed_strength):
        p.append(("subseed_strength", "variation seeds are not supported: send 0"))
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        if (getattr(req, name) or 0) > 0:
            p.append((name, "resizing the seed's noise is not supported: send -1"))
    if req.restore_faces:
        p.append(("restore_faces", "face restoration is not supported"))
    if req.tiling:
        p.append(("tiling", "tiling is not supported"))
    if nonzero(req.s_churn):
        p.append(("s_churn", "sigma churn is not supported: send 0"))
    if nonzero(req.s_min_uncond):
        p.append(("s_min_uncond", "skipping the negative prompt at low sigmas is not supported: send 0"))
    if req.s_noise not in (None, 1):
        p.append(("s_noise", "sdpipe's samplers use noise multiplier 1"))
    stochastic = sampler in ("euler_a", "dpmpp_sde_karras")
    if stochastic and req.eta not in (None, 1):
        p.append(("eta", f"{sampler_names.SAMPLERS[sampler].webui} runs with eta 1 here"))
    if sampler == "ddim" and req.eta not in (None, 0):
        p.append(("eta", "DDIM runs with eta 0 here (deterministic): send eta 0"))
    if req.refiner_checkpoint not in (None, "", "None"):
        p.append(("refiner_checkpoint", "a refiner is not supported"))
    for name in ("firstpass_image", "infotext", "script_name"):
        if getattr(req, name):
            p.append((name, "not supported by sdpipe"))
    if req.script_args:
        p.append(("script_args", "scripts are not supported"))
    if req.alwayson_scripts:
        p.append(("alwayson_scripts", f"scripts are not supported ({', '.join(req.alwayson_scripts)})"))
    if isinstance(req, Txt2ImgRequest) and req.enable_hr:
        p.append(("enable_hr", "the hires fix is not supported: ask for the final size directly"))
    if isinstance(req, Img2ImgRequest):
        p += _img2img_refusals(req)
    return p


def _img2img_refusals(req: Img2ImgRequest) -> Problems:
    p: Problems = []
    if req.resize_mode not in (None, 0):
        p.append(("resize_mode", "only 0 (just resize) is supported"))
    if req.initial_noise_multiplier not in (None, 1):
        p.append(("initial_noise_multiplier", "only 1 is supported"))
    if req.latent_mask:
        p.append(("latent_mask", "not supported"))
    if req.inpainting_mask_invert not in (None, 0, 1):
        p.append(("inpainting_mask_invert", "0 (inpaint the white part) or 1 (the black part)"))
    if req.mask is not None:  # the web UI's inpainting extras; sdpipe inpaints as diffusers does
        blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
        if any(b for b in blur):
            name = "mask_blur" if req.mask_blur is not None else "mask_blur_x"
            p.append((name, "the mask is used as sent, unblurred: send mask_blur 0"))
        if req.inpaint_full_res:
            p.append(("inpaint_full_res", "sdpipe inpaints the whole picture: send inpaint_full_res false"))
        if req.inpainting_fill not in (None, 1):
            p.append(("inpainting_fill", "sdpipe starts from the original image under the mask: send 1 (original)"))
        if req.mask_round is False:
            p.append(("mask_round", "the mask is made black and white, as diffusers does"))
    return p


def _seed(req: WebUIRequest, n: int) -> tuple[int, Problems]:
    if req.seed is None or req.seed == -1:
        return secrets.randbelow(MAX_SEED - n + 2), []
    if req.seed + n - 1 > MAX_SEED:
        return 0, [("seed", f"image i takes seed {req.seed}+i, past {MAX_SEED}: lower the seed or the count")]
    return req.seed, []


def _invert(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as im:
        inverted = ImageOps.invert(im.convert("L"))
    buf = io.BytesIO()
    inverted.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Mapped:
    job: GenerateJob
    seed: int
    sampler: str
    clip_skip: int


def to_job(req: WebUIRequest, model: AnyModel, names: dict[str, Any], state: WebUIState, max_n: int) -> Mapped:
    """A web-UI request as a `GenerateJob`, or InvalidRequests (raised as `Refused`) naming every bad field."""
    problems: Problems = []
    if not isinstance(model, LoadedPipeline):
        raise Refused([("prompt", "the served model is a pixel-space class model: use POST /v1/generate with a label")])
    n = req.batch_size * req.n_iter
    sampler, found = resolve_sampler(req)
    problems += found + (_refusals(req, sampler) if sampler else [])
    applied = apply_options(req.override_settings or {}, names, "override_settings")
    problems += applied.problems
    if n > max_n:
        problems.append(("n_iter", f"batch_size x n_iter = {n} images, above this server's limit of {max_n}"))
    seed, found = _seed(req, n)
    problems += found
    image = mask = None
    strength = None
    if isinstance(req, Img2ImgRequest):
        try:
            image = base64_bytes(req.init_images[0], "init_images")
            if req.mask is not None:
                mask = base64_bytes(req.mask, "mask")
                if req.inpainting_mask_invert == 1:
                    mask = _invert(mask)
        except InvalidRequest as exc:
            problems.append((exc.field, str(exc)))
        except OSError as exc:  # a mask PIL cannot read
            problems.append(("mask", f"not an image sdpipe can read ({exc})"))
        strength = req.denoising_strength
    if problems:
        raise Refused(problems)
    clip_skip = applied.clip_skip or state.clip_skip
    job = GenerateJob(
        n,
        seed,
        "all",
        req.steps,
        sampler,
        req.cfg_scale,
        prompt=req.prompt or "",
        negative_prompt=req.negative_prompt or "",
        width=req.width,
        height=req.height,
        clip_skip=clip_skip,
        image=image,
        mask=mask,
        strength=strength,
        fields=dict(
            guidance="cfg_scale",
            sampler="sampler_name",
            n="batch_size",
            image="init_images",
            strength="denoising_strength",
            clip_skip="override_settings.CLIP_stop_at_last_layers",
        ),
    )
    return Mapped(job, seed, sampler, clip_skip)


class Refused(Exception):
    def __init__(self, problems: Problems) -> None:
        super().__init__("; ".join(m for _, m in problems))
        self.problems = problems


def info_and_parameters(
    req: WebUIRequest, mapped: Mapped, result: JobResult, model: LoadedPipeline, names: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The web UI's `info` (as JSON text in the response) and `parameters` (the request, with the seed used)."""
    job, spec = mapped.job, result.spec
    assert spec is not None
    first = (result.images[0].record or {}) if result.images else {}
    width, height = first.get("width", job.width), first.get("height", job.height)
    n = len(result.images)
    strength = None
    if job.image is not None:
        strength = job.strength if job.strength is not None else (1.0 if job.mask is not None else 0.8)
    info = {
        "prompt": job.prompt,
        "all_prompts": [job.prompt] * n,
        "negative_prompt": job.negative_prompt,
        "all_negative_prompts": [job.negative_prompt] * n,
        "seed": mapped.seed,
        "all_seeds": [im.seed for im in result.images],
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler_names.SAMPLERS[spec.sampler].webui,
        "cfg_scale": spec.guidance,
        "steps": spec.steps,
        "batch_size": req.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": names["model_name"],
        "sd_model_hash": names["hash"],
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,  # no grid image comes first
        "infotexts": [im.infotext for im in result.images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": mapped.clip_skip,
        "is_using_inpainting_conditioning": model.parts.in_channels == 9,
        "version": f"sdpipe {__version__}",
        "sdpipe_model": result.model,
        "sdpipe_micro_batch": spec.micro_batch,
    }
    parameters = req.model_dump() | {"seed": mapped.seed, "sampler_name": info["sampler_name"]}
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters |= {"init_images": None, "mask": None}
    return info, parameters


# --------------------------------------------------------------------------- routes


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs, the bytes `sdpipe generate` writes")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seed, all_seeds, infotexts, ...")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


def add_routes(
    app: FastAPI,
    holder: ModelHolder,
    batcher: Batcher,
    settings: ServeSettings,
    auth: Depends,
    responses: dict[int | str, dict[str, Any]],
) -> WebUIState:
    """Add `/sdapi/v1/*` to `app`; generation and `POST options` need `auth`."""
    state = WebUIState()
    txt2img_model = _bounded(Txt2ImgRequest, settings)
    img2img_model = _bounded(Img2ImgRequest, settings)

    def names_of(model: AnyModel) -> dict[str, Any]:
        identity = holder.identity
        sha = identity.sha256 if identity is not None and identity.weights_hash == model_hash(model) else None
        return model_names(model, sha)

    async def generate(req: WebUIRequest) -> Any:
        model = current_model(holder)
        names = names_of(model)
        try:
            mapped = to_job(req, model, names, state, settings.max_n)
            assert isinstance(model, LoadedPipeline)
            _precheck(model, mapped.job, settings)
        except Refused as refused:
            return invalid_many(refused.problems)
        except InvalidRequest as exc:
            return invalid_many([(exc.field, str(exc))])
        result = await run_job(batcher, settings, mapped.job)
        if not isinstance(result, JobResult):
            return result
        served = holder.current if isinstance(holder.current, LoadedPipeline) else model
        info, parameters = info_and_parameters(req, mapped, result, served, names)
        images = [im.png_base64 for im in result.images] if req.send_images else []
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    async def txt2img(req: Txt2ImgRequest) -> Any:
        """Text to image with the web UI's fields; `info` holds the seeds and each image's infotext."""
        return await generate(req)

    async def img2img(req: Img2ImgRequest) -> Any:
        """Image to image (and inpainting with `mask`) with the web UI's fields."""
        return await generate(req)

    txt2img.__annotations__["req"] = txt2img_model
    img2img.__annotations__["req"] = img2img_model
    for path, endpoint in (("/sdapi/v1/txt2img", txt2img), ("/sdapi/v1/img2img", img2img)):
        app.post(path, response_model=GenerationResponse, dependencies=[auth], responses=responses, tags=["web UI"])(
            endpoint
        )

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], tags=["web UI"])
    async def samplers() -> list[dict[str, Any]]:
        """The samplers the served model takes, by their web-UI names (sdpipe's name as the alias)."""
        model = holder.current
        usable = list(sampler_names.SAMPLERS)
        if model is not None and not isinstance(model, LoadedPipeline):
            usable = samplers_for(model.scheduler_config)
        return [
            {
                "name": sampler_names.SAMPLERS[n].webui,
                "aliases": [n],
                "options": {"scheduler": "karras"} if n.endswith("_karras") else {},
            }
            for n in usable
        ]

    @app.get("/sdapi/v1/schedulers", tags=["web UI"])
    async def schedulers() -> list[dict[str, Any]]:
        """The schedule types `scheduler` takes."""
        return [
            {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
        ]

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], tags=["web UI"])
    async def sd_models() -> list[dict[str, Any]]:
        """The one model this server serves."""
        return [names_of(current_model(holder))]

    @app.get("/sdapi/v1/options", tags=["web UI"])
    async def get_options() -> dict[str, Any]:
        """The web-UI settings that apply here (POST them back unchanged: accepted)."""
        names = names_of(current_model(holder))
        return {
            "sd_model_checkpoint": names["title"],
            "sd_checkpoint_hash": names["sha256"] or names["hash"],
            "CLIP_stop_at_last_layers": state.clip_skip,
            "sd_vae": "Automatic",
            **FIXED_OPTIONS,
            **HARMLESS_OPTIONS,
        }

    @app.post("/sdapi/v1/options", dependencies=[auth], responses=responses, tags=["web UI"])
    async def set_options(options: dict[str, Any]) -> Any:
        """Apply `CLIP_stop_at_last_layers` (to later web-UI requests without their own); accept the served
        model's name and the fixed values GET shows; refuse the rest, naming each."""
        applied = apply_options(options, names_of(current_model(holder)), None)
        if applied.problems:
            return invalid_many(applied.problems)
        if applied.clip_skip is not None:
            state.clip_skip = applied.clip_skip
        return None

    @app.get("/sdapi/v1/scripts", tags=["web UI"])
    async def scripts() -> dict[str, list[str]]:
        """No scripts (clients read this to decide which extensions to drive)."""
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress", tags=["web UI"])
    async def progress() -> dict[str, Any]:
        """Not tracked per step: progress 0, and `state.job_count` the requests waiting."""
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {"skipped": False, "interrupted": False, "job": "", "job_count": batcher.depth(), "job_no": 0},
            "current_image": None,
            "textinfo": None,
        }

    return state


def _precheck(model: LoadedPipeline, job: GenerateJob, settings: ServeSettings) -> None:
    """The job against the served model now (the worker checks again with the model that runs it)."""
    from sdpipe.serve.batching import sd_conditions

    spec = sample_spec(model, job.steps, job.sampler, job.guidance, settings.sd_micro_batch)
    sd_conditions(model, job, spec, keep=False)
