"""Class-conditional generation with classifier-free guidance, reproducible image by image.

Image i of a run with seed S is drawn from its own `torch.Generator` seeded with S+i (as in EDM's
`generate.py`), so it never depends on which other images are made with it. Because a network's
floating-point results may depend on the batch's shape and on a row's position in it, the network always
runs on micro-batches of one fixed size, and the seed alone decides a sample's row (`seed % micro_batch`);
unused rows are padding. Each micro-batch is denoised by its own scheduler instance. So image bits depend
only on (model, seed, label, sampler, steps, guidance, micro_batch), never on n or on chunking.

An optional `on_step` callback sees the model's clean-image prediction (x0) after every sampler step, for
looking inside the denoising trajectory; it only reads tensors, so it never changes a generated bit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.config import ConfigError, SampleConfig, validate_section
from sdpipe.sampling.schedulers import Scheduler, make_scheduler, samplers_for

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
