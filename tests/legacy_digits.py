"""A frozen copy of the digits (pixel-class) generation code of commit 145f670, for the bit-for-bit test
`tests/test_digits_frozen.py`.

Everything today's `sdpipe generate` and the server's batcher do to turn (model, seed, label, sampler, steps,
guidance, micro_batch) into PNG bytes is copied here verbatim from `git show 145f670:<file>`:

- `src/sdpipe/sampling/schedulers.py`: `SAMPLERS`, `EDM_SAMPLERS`, `_EDM_KEYS`, `_SHARED_KEYS`, `make_scheduler`;
- `src/sdpipe/data/digits.py`: `to_source_range`;
- `src/sdpipe/sampling/generate.py`: `SampleSpec`, `_micro_batches`, `denoise`, `predicted_x0`, `generate`,
  `row_inputs`, `_per_seed`;
- `src/sdpipe/sampling/files.py`: `to_pixels`, `parse_labels`, `sample_record`, `encode_png`, `png_info`.

The only changes: `SampleSpec`'s defaults are the literal values `SampleConfig` had at 145f670 (the test always
passes all four fields), `LoadedModel` is any object with the attributes used (`path`, `unet`,
`scheduler_config`, `meta`), and `legacy_pngs` (the loop of 145f670's `generate_files`, without the files)
is new. Nothing is imported from sdpipe but `__version__`, so the copy does not move when sdpipe does.

DO NOT EDIT this module to follow the new code: its purpose is to stay what 145f670 did, so the refactor of
`sdpipe.sampling` and `sdpipe.serve.batching` can be checked to produce identical bytes. If a change to digits
images is ever intended, that is a decision to make explicitly (and to record), not a fix to this file.
"""

from __future__ import annotations

import inspect
import io
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteScheduler
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
from PIL import Image, PngImagePlugin

from sdpipe import __version__

# 145f670's `sdpipe.models.LoadedModel`, duck-typed: anything with `.path`, `.unet`, `.scheduler_config`, `.meta`
LoadedModel = Any


# ---- verbatim from 145f670:src/sdpipe/sampling/schedulers.py ----


# diffusers' schedulers share no typed base class that declares step()/set_timesteps(): typed structurally.
Scheduler = Any

# name -> (scheduler class, settings that make it that sampler)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": (UniPCMultistepScheduler, {}),
}

# Models trained with EDM preconditioning (a saved config with `sigma_data`) sample with diffusers' EDM
# schedulers, which apply the preconditioning themselves. Both DPM-Solver++ names use EDM's Karras sigmas.
EDM_SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (EDMEulerScheduler, {}),
    "dpmpp_2m": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
_EDM_KEYS = ("sigma_min", "sigma_max", "sigma_data", "prediction_type")

# Keys of a training config that every sampler shares; the rest of a saved config is sampler-specific.
_SHARED_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")


def make_scheduler(name: str, model_scheduler_config: dict[str, Any]) -> Scheduler:
    """A fresh scheduler for sampler `name`, matching the noise schedule in `model_scheduler_config`."""
    edm = "sigma_data" in model_scheduler_config
    table, keys = (EDM_SAMPLERS, _EDM_KEYS) if edm else (SAMPLERS, _SHARED_KEYS)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(table)}")
    if name not in table:
        kind = "an EDM-preconditioned model" if edm else "this model"
        raise ValueError(f"sampler {name!r} does not apply to {kind}; choose one of: {', '.join(table)}")
    cls, extra = table[name]
    shared = {k: model_scheduler_config[k] for k in keys if k in model_scheduler_config}
    return cls(**shared, **extra)


# ---- verbatim from 145f670:src/sdpipe/data/digits.py ----


def to_source_range(x: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[-1, 1] -> source intensities, clamped to the source's range."""
    lo, hi = value_range
    return ((x.clamp(-1, 1) + 1) / 2 * (hi - lo) + lo).clamp(lo, hi)


# ---- verbatim from 145f670:src/sdpipe/sampling/generate.py ----


# on_step(step index, timestep, x0 prediction (B, C, H, W)) for `denoise`
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class SampleSpec:
    """How to sample; its defaults are `SampleConfig`'s, the one place they are set."""

    sampler: str = "dpmpp_2m"  # SampleConfig().sampler at 145f670
    steps: int = 14  # SampleConfig().steps at 145f670
    guidance: float = 1.0  # SampleConfig().guidance at 145f670
    micro_batch: int = 64  # SampleConfig().micro_batch at 145f670


def _micro_batches(seeds: list[int], micro_batch: int) -> Iterator[list[int]]:
    """Group seeds so each group shares `seed // micro_batch`: their rows `seed % micro_batch` differ."""
    group: list[int] = []
    for s in sorted(seeds):
        if group and s // micro_batch != group[0] // micro_batch:
            yield group
            group = []
        group.append(s)
    if group:
        yield group


@torch.inference_mode()
def denoise(
    unet: UNet2DModel,
    scheduler_config: dict,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    null_label: int | None,
    spec: SampleSpec,
    generators: list[torch.Generator],
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run one fixed-shape batch through the sampler: `noise` (B, C, H, W) -> images in [-1, 1].

    `on_step`, if given, receives a copy of the clean-image prediction after each step (see `predicted_x0`)."""
    sched = make_scheduler(spec.sampler, scheduler_config)
    sched.set_timesteps(spec.steps)
    if hasattr(sched, "set_begin_index"):
        # Start at step 0 even when the first timesteps repeat (Karras sigmas on a cosine schedule map
        # several of them to t=998); diffusers would otherwise start at index 1 and run off the end.
        sched.set_begin_index(0)
    guided = labels is not None and spec.guidance != 1.0
    if guided and null_label is None:
        raise ValueError("classifier-free guidance needs a class-conditional model with a null label")
    # stochastic samplers draw their noise per row from the row's own generator
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
    x = noise * sched.init_noise_sigma
    class_in = None
    if labels is not None and guided:
        assert null_label is not None  # checked above
        class_in = torch.cat([labels, torch.full_like(labels, null_label)])
    elif labels is not None:
        class_in = labels
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        if guided:
            inp = torch.cat([inp, inp])
        out = unet(inp, t, class_labels=class_in).sample
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + spec.guidance * (cond - uncond)
        step = sched.step(out, t, x, **step_kwargs)
        if on_step is not None:
            on_step(i, t, predicted_x0(step, out, inp[: len(x)], x, t, sched))
        x = step.prev_sample
    return x


def predicted_x0(
    step_output: object,
    model_output: torch.Tensor,
    model_input: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor,
    sched: Scheduler,
) -> torch.Tensor:
    """The model's clean-image prediction at timestep t, as a new tensor, called right after `sched.step`:
    the scheduler's own `pred_original_sample` where it returns one (DDPM, DDIM, Euler, Heun, EDM Euler);
    EDM's preconditioning of the (guided) model output for diffusers' EDM DPM-Solver; else computed from the
    output and the variance-preserving model input with the training schedule's alpha-bar at t (DPM-Solver,
    UniPC; their timesteps are integers)."""
    x0 = getattr(step_output, "pred_original_sample", None)
    if x0 is not None:
        return x0.detach().clone()
    if not hasattr(sched, "alphas_cumprod"):  # EDM: the step just taken was at sigmas[step_index - 1]
        return sched.precondition_outputs(sample, model_output, sched.sigmas[sched.step_index - 1]).clone()
    abar = sched.alphas_cumprod[int(round(float(t)))].to(model_input.device, model_input.dtype)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    kind = sched.config.prediction_type
    if kind == "epsilon":
        return (model_input - s * model_output) / a
    if kind == "v_prediction":
        return a * model_input - s * model_output
    return model_output.detach().clone()


def generate(
    unet: UNet2DModel,
    scheduler_config: dict,
    seeds: list[int],
    labels: list[int] | None,
    *,
    shape: tuple[int, int, int],
    null_label: int | None,
    spec: SampleSpec,
    progress: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[int, torch.Tensor]], None] | None = None,
) -> torch.Tensor:
    """Images in [-1, 1], one per seed, in the order of `seeds`. `labels[i]` conditions `seeds[i]`.

    `on_step(step index, {seed: x0 prediction (C, H, W)})` is called after every sampler step of every
    micro-batch, with that micro-batch's seeds (the denoising trajectory; it changes no image)."""
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct: one image per seed")
    label_of = dict(zip(seeds, labels, strict=True)) if labels is not None else {}
    device = next(unet.parameters()).device
    m = spec.micro_batch
    result: dict[int, torch.Tensor] = {}
    for group in _micro_batches(seeds, m):
        rows = {s % m: s for s in group}
        noise, lab, gens = row_inputs(
            {r: (s, label_of.get(s)) for r, s in rows.items()}, m, shape, null_label, labels is not None, device
        )
        step_cb: StepCallback | None = None
        if on_step is not None:
            step_cb = _per_seed(on_step, rows)
        x = denoise(unet, scheduler_config, noise, lab, null_label, spec, gens, step_cb)
        for r, s in rows.items():
            result[s] = x[r].cpu()
        if progress is not None:
            progress(len(group))
    return torch.stack([result[s] for s in seeds])


def row_inputs(
    rows: Mapping[int, tuple[int, int | None]],
    micro_batch: int,
    shape: tuple[int, int, int],
    null_label: int | None,
    conditional: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Generator]]:
    """Noise, labels (None for an unconditional model) and generators of one micro-batch whose row r holds
    the image `rows[r] = (seed, label)`. Other rows are padding: a generator of their own (seeded r) and the
    null label; their content never reaches a real row."""
    gens = [torch.Generator("cpu").manual_seed(rows[r][0] if r in rows else r) for r in range(micro_batch)]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    labels = None
    if conditional:
        pad = null_label if null_label is not None else 0
        row_labels = [rows[r][1] if r in rows else None for r in range(micro_batch)]
        labels = torch.tensor([pad if lab is None else lab for lab in row_labels], device=device)
    return noise, labels, gens


def _per_seed(on_step: Callable[[int, dict[int, torch.Tensor]], None], rows: dict[int, int]) -> StepCallback:
    """Adapt a per-seed callback to `denoise`'s per-batch one: rows of padding are left out."""

    def callback(i: int, t: torch.Tensor, x0: torch.Tensor) -> None:
        on_step(i, {s: x0[r].cpu() for r, s in rows.items()})

    return callback


# ---- verbatim from 145f670:src/sdpipe/sampling/files.py ----


def to_pixels(x: torch.Tensor, value_range: tuple[float, float]) -> np.ndarray:
    """Model-range images (N, C, H, W) -> uint8 (N, H, W[, C]): source value v -> round((v-lo)*255/(hi-lo))."""
    lo, hi = value_range
    v = to_source_range(x, value_range).numpy()
    px = np.round((v - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    return px[:, 0] if px.shape[1] == 1 else px.transpose(0, 2, 3, 1)


def parse_labels(label: str, n: int, class_names: list[str] | None) -> list[int] | None:
    """`'all'` cycles through every class; a class name or index repeats it; None for unconditional models."""
    if class_names is None:
        if label not in ("all", ""):
            raise ValueError("this model is unconditional: it takes no --label")
        return None
    if label == "all":
        return [i % len(class_names) for i in range(n)]
    if label in class_names:
        return [class_names.index(label)] * n
    raise ValueError(f"unknown label {label!r}: choose one of {', '.join(class_names)} or 'all'")


def sample_record(model: LoadedModel, label: int | None, seed: int, spec: SampleSpec) -> dict:
    """What one image was made with (a samples.jsonl record without its file name)."""
    names = model.meta.class_names
    return {
        "label": None if label is None or names is None else names[label],
        "seed": seed,
        "steps": spec.steps,
        "sampler": spec.sampler,
        "guidance": spec.guidance,
        "model": model.meta.weights_hash,
    }


def encode_png(pixels: np.ndarray, info: PngImagePlugin.PngInfo) -> bytes:
    """uint8 pixels (H, W[, C]) as PNG file bytes carrying the text chunks of `info` (see `png_info`)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_info(record: dict, model: LoadedModel, spec: SampleSpec) -> PngImagePlugin.PngInfo:
    """The `parameters` (web-UI style) and `sdpipe` (JSON) text chunks for one generated image."""
    size = model.meta.image_size
    params = (
        f"label: {record['label']}\n"
        f"Steps: {spec.steps}, Sampler: {spec.sampler}, CFG scale: {spec.guidance}, Seed: {record['seed']}, "
        f"Size: {size}x{size}, Model hash: {record['model']}, Model: {model.path.name}, Version: sdpipe {__version__}"
    )
    exact = {
        "model_hash": record["model"],
        "model_path": str(model.path.resolve()),
        "seed": record["seed"],
        "label": record["label"],
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance": spec.guidance,
        "micro_batch": spec.micro_batch,
        "sdpipe_version": __version__,
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params)
    info.add_text("sdpipe", json.dumps(exact))
    return info


# ---- new: 145f670's `sdpipe.sampling.files.generate_files`, returning the bytes instead of writing files ----


def legacy_pngs(model: LoadedModel, label: str, n: int, seed: int, spec: SampleSpec) -> list[bytes]:
    """The bytes of the files 00000.png, 00001.png, ... that 145f670's `generate_files(model, out, label=label,
    n=n, seed=seed, spec=spec)` writes (its loop with the default batch_size=1000, without progress bar,
    files or samples.jsonl)."""
    batch_size = 1000
    if n < 1:
        raise ValueError("--n must be at least 1")
    meta = model.meta
    labels = parse_labels(label, n, meta.class_names)
    pngs = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        chunk_labels = None if labels is None else [labels[i] for i in idx]
        x = generate(
            model.unet,
            model.scheduler_config,
            [seed + i for i in idx],
            chunk_labels,
            shape=(meta.channels, meta.image_size, meta.image_size),
            null_label=meta.null_label,
            spec=spec,
        )
        for i, px in zip(idx, to_pixels(x, meta.value_range), strict=True):
            record = sample_record(model, None if labels is None else labels[i], seed + i, spec)
            pngs.append(encode_png(px, png_info(record, model, spec)))
    return pngs
