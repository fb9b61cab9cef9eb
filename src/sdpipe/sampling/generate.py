"""The one generation path: every model kind, the CLI and the server sample through `generate_items`.

Image i of a run with seed S is drawn from its own `torch.Generator` seeded with S+i (as in EDM's
`generate.py`), so it never depends on which other images are made with it. Because a network's
floating-point results may depend on the batch's shape and on a row's position in it, the network always
runs on micro-batches of one fixed size, and the seed alone decides a sample's row (`seed % micro_batch`);
unused rows are padding. Each micro-batch is denoised by its own scheduler instance. So image bits depend
only on (model, seed, label, sampler, steps, guidance, micro_batch), never on n or on chunking.

What differs between kinds (pixel-space class models, Stable Diffusion pipelines) is behind
`sdpipe.models.parts.Parts`: the conditioning encoder, the denoiser, the decoder and a few `SamplingRules`
(the order of guidance rows, when guidance runs, how schedulers are configured). The loop, the micro-batch
plan and the noise convention are this module's, for all of them.

An optional `on_step` callback sees the model's clean-image prediction (x0) after every sampler step, for
looking inside the denoising trajectory; it only reads tensors, so it never changes a generated bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.conditioning import Conditioning
from sdpipe.config import ConfigError, SampleConfig, validate_section
from sdpipe.models.parts import Encoded, Parts, PixelClassParts
from sdpipe.sampling.schedulers import Scheduler, make_scheduler, pipeline_scheduler, samplers_for
from sdpipe.sampling.start import Start, start_batch

# on_step(step index, timestep, x0 prediction (B, C, H, W)) for `denoise`
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class SampleSpec:
    """How to sample; its defaults are `SampleConfig`'s, the one place they are set."""

    sampler: str = SampleConfig().sampler
    steps: int = SampleConfig().steps
    guidance: float = SampleConfig().guidance
    micro_batch: int = SampleConfig().micro_batch


def model_sample_spec(
    model_config: dict, scheduler_config: dict, steps: int | None, sampler: str | None, guidance: float | None
) -> SampleSpec:
    """A saved model's own sampling settings (its measured best) with a user's changes, checked like a
    config; raises ConfigError naming the setting, e.g. a sampler that does not apply to this model."""
    sample = dict(model_config.get("sample", {}))
    sample.update({k: v for k, v in (("steps", steps), ("sampler", sampler), ("guidance", guidance)) if v is not None})
    s = validate_section("sample", sample)
    usable = samplers_for(scheduler_config)
    if s.sampler not in usable:
        raise ConfigError(f"sample.sampler {s.sampler!r} does not apply to this model; use one of: {', '.join(usable)}")
    return SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)


@dataclass(frozen=True)
class Row:
    """One image to make: its seed and what it is conditioned on."""

    seed: int
    cond: Conditioning


def plan(rows: Sequence[Row], micro_batch: int) -> list[dict[int, Row]]:
    """Distinct rows into micro-batches: rows share one only if their `batch_key`s agree, and each sits in row
    `seed % micro_batch` of it; first fit, so never more micro-batches than blocks of `seed // micro_batch`."""
    batches: list[tuple[tuple, dict[int, Row]]] = []
    for row in dict.fromkeys(rows):
        key, slot = row.cond.batch_key(), row.seed % micro_batch
        free = next((b for k, b in batches if k == key and slot not in b), None)
        if free is None:
            batches.append((key, {slot: row}))
        else:
            free[slot] = row
    return [b for _, b in batches]


# a text-to-image pipeline's defaults: diffusers' (DPM-Solver++ as its docs recommend, guidance 7.5), 20 steps
PIPELINE_SAMPLE = {"sampler": "dpmpp_2m", "steps": 20, "guidance": 7.5}


def pipeline_sample_spec(
    micro_batch: int, steps: int | None, sampler: str | None, guidance: float | None
) -> SampleSpec:
    """A Stable Diffusion pipeline's sampling settings: diffusers' defaults with a user's changes, checked like a
    config (any sampler of the table applies)."""
    sample = dict(PIPELINE_SAMPLE, micro_batch=micro_batch)
    sample.update({k: v for k, v in (("steps", steps), ("sampler", sampler), ("guidance", guidance)) if v is not None})
    s = validate_section("sample", sample)
    return SampleSpec(s.sampler, s.steps, s.guidance, s.micro_batch)


def row_generators(rows: dict[int, Row], micro_batch: int) -> list[torch.Generator]:
    """Row r's `torch.Generator("cpu")`, seeded with its image's seed (diffusers' per-image CPU generator
    convention); a padding row is seeded r (its output is never used). It draws the row's noise, then its
    sampler noise."""
    return [torch.Generator("cpu").manual_seed(rows[r].seed if r in rows else r) for r in range(micro_batch)]


def new_scheduler(parts: Parts, spec: SampleSpec, seeds: list[int]) -> Scheduler:
    """A fresh scheduler for one micro-batch, built by the model kind's rule (see `SamplingRules`)."""
    if parts.rules.filtered_scheduler:
        return make_scheduler(spec.sampler, parts.scheduler_config)
    return pipeline_scheduler(spec.sampler, parts.scheduler_config, seeds)


def run(parts: Parts, rows: dict[int, Row], spec: SampleSpec, on_step: StepCallback | None = None) -> torch.Tensor:
    """One micro-batch of `spec.micro_batch` rows, row r holding `rows[r]`: images in [-1, 1] (m, C, H, W)."""
    m = spec.micro_batch
    gens = row_generators(rows, m)
    conds = [rows[r].cond if r in rows else None for r in range(m)]
    sched = new_scheduler(parts, spec, [rows[r].seed if r in rows else r for r in range(m)])
    sched.set_timesteps(spec.steps)
    if parts.rules.begin_at_zero and hasattr(sched, "set_begin_index"):
        # Start at step 0 even when the first timesteps repeat (Karras sigmas on a cosine schedule map
        # several of them to t=998); diffusers would otherwise start at index 1 and run off the end.
        sched.set_begin_index(0)
    parts.prepare(next(iter(rows.values())).cond)  # what the rows share: LoRAs
    start = start_batch(parts, conds, gens, sched, spec.steps)
    guided = parts.conditional() and parts.rules.guided(spec.guidance) and not parts.embeds_guidance
    encoded = parts.encode(conds, guided) | parts.guidance_inputs(spec.guidance, m)
    if start.extra:  # inputs beside the sample (9-channel inpainting), laid out as the sample is
        encoded["extra"] = {k: torch.cat([v, v]) if guided else v for k, v in start.extra.items()}
    x = denoise(parts, sched, start, encoded, spec, gens, guided, on_step)
    return parts.decode(x)


@torch.inference_mode()
def denoise(
    parts: Parts,
    sched: Scheduler,
    start: Start,
    encoded: Encoded,
    spec: SampleSpec,
    generators: list[torch.Generator],
    guided: bool,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run one fixed-shape batch through the sampler, its timesteps set: from `start.x` (B, C, H, W) at
    `start.begin` to the sampled batch.

    `on_step`, if given, receives a copy of the clean-image prediction after each step (see `predicted_x0`)."""
    # stochastic samplers draw their noise per row from the row's own generator
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
    x = start.x
    for i, t in enumerate(sched.timesteps[start.begin :]):
        inp = sched.scale_model_input(x, t)
        if guided:
            inp = torch.cat([inp, inp])
        out = parts.denoise(inp, t, encoded)
        if guided:
            first, second = out.chunk(2)
            cond, uncond = (first, second) if parts.rules.cond_first else (second, first)
            out = uncond + spec.guidance * (cond - uncond)
        step = sched.step(out, t, x, **step_kwargs)
        if on_step is not None:
            on_step(i, t, predicted_x0(step, out, inp[: len(x)], x, t, sched))
        x = step.prev_sample
        if start.constraint is not None:
            x = start.constraint(x, i)
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


def generate_items(
    parts: Parts,
    rows: Sequence[Row],
    spec: SampleSpec,
    *,
    progress: Callable[[int], None] | None = None,
    on_step: Callable[[int, dict[Row, torch.Tensor]], None] | None = None,
    on_batch: Callable[[dict[int, Row]], None] | None = None,
) -> dict[Row, torch.Tensor]:
    """Each distinct row's image in [-1, 1] (C, H, W) on the CPU: the one generation path of the CLI, replay,
    evaluation, validation grids and the server (whose requests share micro-batches through it).

    `on_step(step index, {row: x0 prediction})` follows the denoising of every micro-batch (it changes no
    image); `on_batch` sees each micro-batch's rows before it runs (the server counts them)."""
    out: dict[Row, torch.Tensor] = {}
    for batch in plan(rows, spec.micro_batch):
        if on_batch is not None:
            on_batch(batch)
        step_cb = None if on_step is None else _per_row(on_step, batch)
        x = run(parts, batch, spec, step_cb).cpu()
        for r, row in batch.items():
            out[row] = x[r]
        if progress is not None:
            progress(len(batch))
    return out


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
    """Images in [-1, 1] of a pixel-space class model, one per seed, in the order of `seeds`: `labels[i]`
    (a class index) conditions `seeds[i]`. A shorthand of `generate_items` for the digits' callers.

    `on_step(step index, {seed: x0 prediction (C, H, W)})` is called after every sampler step of every
    micro-batch, with that micro-batch's seeds (the denoising trajectory; it changes no image)."""
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(labels)} labels")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct: one image per seed")
    classes = None if labels is None else (null_label if null_label is not None else max(labels, default=0) + 1)
    names = None if classes is None else [str(i) for i in range(classes)]  # labels travel by name
    parts = PixelClassParts(unet, scheduler_config, names, null_label, shape)
    rows = [Row(s, Conditioning(label=None if labels is None else str(labels[i]))) for i, s in enumerate(seeds)]
    seed_cb = None if on_step is None else (lambda i, x0: on_step(i, {row.seed: v for row, v in x0.items()}))
    images = generate_items(parts, rows, spec, progress=progress, on_step=seed_cb)
    return torch.stack([images[row] for row in rows])


def _per_row(on_step: Callable[[int, dict[Row, torch.Tensor]], None], rows: dict[int, Row]) -> StepCallback:
    """Adapt a per-row callback to `denoise`'s per-batch one: rows of padding are left out."""

    def callback(i: int, t: torch.Tensor, x0: torch.Tensor) -> None:
        on_step(i, {row: x0[r].cpu() for r, row in rows.items()})

    return callback
