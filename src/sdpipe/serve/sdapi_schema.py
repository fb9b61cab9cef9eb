"""The web UI API's request models and options (`/sdapi/v1/*`): its field names, defaults and bounds, and the
options a client may read and set. `sdpipe.serve.sdapi` maps requests onto jobs and holds the routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from sdpipe.serve.batching import AnyModel, model_hash
from sdpipe.serve.common import base64_limit
from sdpipe.serve.settings import MAX_SEED, ServeSettings

DEFAULT_SAMPLER = "Euler"  # the web UI API's `sampler_index` default
Problems = list[tuple[str | None, str]]


# --------------------------------------------------------------------------- request models


class WebUIRequest(BaseModel):
    """The fields txt2img and img2img share, with the web UI's defaults. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: a random seed, reported in info")
    subseed: int | None = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(None, max_length=64, description="a web-UI or sdpipe sampler name")
    sampler_index: str | None = Field(None, max_length=64, description="deprecated: sampler_name")
    scheduler: str | None = Field(None, max_length=64, description="Automatic or Karras")
    batch_size: int = Field(1, ge=1, le=4096)
    n_iter: int = Field(1, ge=1, le=4096)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, ge=0, le=20, allow_inf_nan=False)
    width: int = Field(512, ge=8, le=16384, multiple_of=8)
    height: int = Field(512, ge=8, le=16384, multiple_of=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] | None = None
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(WebUIRequest):
    enable_hr: bool | None = False
    denoising_strength: float | None = None  # the hires fix's; unused while enable_hr is off
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    hr_additional_modules: list[Any] | None = None


class Img2ImgRequest(WebUIRequest):
    init_images: list[str] = Field(description="the input image, base64 (a data: URL prefix is fine); one")
    resize_mode: int | None = 0
    denoising_strength: float = Field(0.75, gt=0, le=1, allow_inf_nan=False)
    image_cfg_scale: float | None = None  # instruct-pix2pix only
    mask: str | None = None
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = None
    mask_round: bool | None = True
    inpainting_fill: int | None = 0
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = False


def _bounded(base: type[WebUIRequest], s: ServeSettings) -> type[WebUIRequest]:
    """`base` with this server's limits (422 naming the field beyond them)."""
    fields: dict[str, Any] = {
        "prompt": (str | None, Field("", max_length=s.max_prompt_chars)),
        "negative_prompt": (str | None, Field("", max_length=s.max_prompt_chars)),
        "batch_size": (int, Field(1, ge=1, le=s.max_n)),
        "n_iter": (int, Field(1, ge=1, le=s.max_n)),
        "steps": (int, Field(min(50, s.max_steps), ge=1, le=s.max_steps)),
        "cfg_scale": (
            float,
            Field(
                min(max(7.0, s.guidance_min), s.guidance_max), ge=s.guidance_min, le=s.guidance_max, allow_inf_nan=False
            ),
        ),
        "width": (int, Field(min(512, s.max_width), ge=8, le=s.max_width, multiple_of=8)),
        "height": (int, Field(min(512, s.max_height), ge=8, le=s.max_height, multiple_of=8)),
    }
    if base is Img2ImgRequest:
        chars = base64_limit(s.max_image_mib)
        fields["init_images"] = (list[str], Field(min_length=1, max_length=1, description="one input image, base64"))
        fields["mask"] = (str | None, Field(None, max_length=chars))
    model = create_model(base.__name__, __base__=base, **fields)
    return model


# --------------------------------------------------------------------------- options


# options whose only value here is the one given (a client may send it back; another value is refused)
FIXED_OPTIONS: dict[str, Any] = {
    "eta_noise_seed_delta": 0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_noise": 1.0,
    "initial_noise_multiplier": 1.0,
    "always_discard_next_to_last_sigma": False,
    "randn_source": "CPU",  # one CPU generator per image
    "samples_format": "png",
    "return_grid": False,
    "enable_pnginfo": True,
}
HARMLESS_OPTIONS: dict[str, Any] = {  # accepted and ignored: where the web UI saves files
    "samples_save": False,
    "grid_save": False,
    "save_images_add_number": True,
    "outdir_samples": "",
    "outdir_txt2img_samples": "",
    "outdir_img2img_samples": "",
}
VAE_AS_IS = ("Automatic", "None")  # both: the model's own VAE


@dataclass
class WebUIState:
    """What `POST /sdapi/v1/options` changes for later web-UI requests (as the web UI's settings do)."""

    clip_skip: int = 1


@dataclass
class Applied:
    clip_skip: int | None = None
    problems: Problems = field(default_factory=list)


def model_names(model: AnyModel, sha256: str | None) -> dict[str, Any]:
    """The web UI's names for the served model: title `name [hash]`, model_name, short hash, sha256, filename."""
    path = Path(model.path)
    name = path.name
    short = model_hash(model).removeprefix("sha256:")[:10]
    return {
        "title": f"{name} [{short}]",
        "model_name": path.stem if path.is_file() else name,
        "hash": short,
        "sha256": sha256,
        "filename": str(path.resolve()),
        "config": None,
    }


def apply_options(options: dict[str, Any], names: dict[str, Any], where: str | None) -> Applied:
    """Check web-UI options (`override_settings`, or a `POST /sdapi/v1/options` body): the model must be the
    served one, `CLIP_stop_at_last_layers` is applied, fixed options take their value only, harmless ones are
    ignored, anything else is refused (it could change the image). `where`: the field they came in."""
    out = Applied()

    def refuse(key: str, message: str) -> None:
        out.problems.append((f"{where}.{key}" if where else key, message))

    for key, value in options.items():
        if key == "sd_model_checkpoint":
            known = [names["title"], names["model_name"], Path(names["filename"]).name, names["hash"], names["sha256"]]
            if value is None or value not in known:
                refuse(key, f"{value!r} is not the served model {names['title']!r} (this server serves one model)")
        elif key == "sd_checkpoint_hash":
            if value not in (names["sha256"], names["hash"]):
                refuse(key, f"{value!r} is not the served model's hash {names['sha256'] or names['hash']}")
        elif key == "CLIP_stop_at_last_layers":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
                refuse(key, f"{value!r}: give a whole number from 1 to 12")
            else:
                out.clip_skip = value
        elif key == "sd_vae":
            if value not in VAE_AS_IS:
                refuse(key, f"{value!r}: sdpipe decodes with the model's own VAE; use one of {', '.join(VAE_AS_IS)}")
        elif key in FIXED_OPTIONS:
            if value != FIXED_OPTIONS[key]:
                refuse(key, f"{value!r}: sdpipe only has {FIXED_OPTIONS[key]!r} here")
        elif key not in HARMLESS_OPTIONS:
            refuse(key, "not an option sdpipe has; it might change the image, so it is refused")
    return out
