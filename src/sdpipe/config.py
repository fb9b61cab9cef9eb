"""Every setting of the pipeline, typed, with its default, in one place.

One pydantic model per stage (data, model, diffusion, train, sample, evaluate) nested in `PipelineConfig`.
Configs load from YAML and take `--set dotted.key=value` overrides; anything unknown, mistyped or out of
range is rejected with `ConfigError` before any work starts, naming the key and what it accepts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdpipe import sampler_names

MAX_SEED = 2**32 - 1  # seeds are 0..2^32-1 everywhere (config, command line, server): none wraps silently


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what it accepts."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the data comes from, how it is checked and split, and how images are prepared for the model.

    `source: digits` is sklearn's embedded digits; every other source is a `path` that `sdpipe data validate`
    checked into `validated_dir` (manifest.parquet, report.json), which training reads. See docs/data.md."""

    # digits = sklearn's 1797 8x8 images; folder = images under a folder (recursively); hf = a `datasets`
    # dataset saved with save_to_disk; parquet = Parquet file(s) with an image column; webdataset = .tar
    # shards; arrays = .npz/.npy images (N,H,W[,C]) with an optional labels array
    source: Literal["digits", "folder", "hf", "parquet", "webdataset", "arrays"] = "digits"
    path: str | None = None  # the file or folder of the source (not for digits)
    validated_dir: str | None = None  # the --out folder of `sdpipe data validate` that training reads
    labels: Literal["auto", "folder", "none"] = "auto"  # folder: first-level subfolder names are classes
    image_column: str | None = None  # hf/parquet: None = the first image (or binary) column
    label_column: str | None = None  # hf/parquet: None = "label" if present
    caption_column: str | None = None  # hf/parquet/metadata.jsonl: None = "text" or "caption" if present
    images_key: str | None = None  # arrays (.npz): None = "images", "x" or the first 3-/4-D array
    labels_key: str | None = None  # arrays (.npz): None = "labels" or "y" if present
    min_size: int = Field(default=8, ge=1)  # images with a side below this are quarantined
    max_pixels: int = Field(default=64_000_000, ge=1)  # larger claimed sizes are decompression bombs
    validation_fraction: float = Field(default=0.0, ge=0, le=1)  # by content hash (sdpipe.data.splits)
    # the held-out "test" split, which training never sees and the judge compares samples with (by content
    # hash; stratified by class for the digits). None = 0.25 for the embedded digits, 0 for other sources
    test_fraction: float | None = Field(default=None, ge=0, lt=1)
    near_duplicate_bits: int = Field(default=3, ge=0, le=3)  # max Hamming distance of 64-bit perceptual hashes
    workers: int | None = Field(default=None, ge=1)  # validate's decode threads; None = one per core
    # preprocessing, recorded in the model so generated images go back to the source's range
    resolution: int | None = Field(default=None, ge=1)  # shorter side resized to this, then cropped square
    resize_filter: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bicubic"
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False  # horizontal flip with probability 1/2 (drawn from the training generator)
    channels: Literal["auto", "grayscale", "rgb"] = "auto"  # auto: grayscale if every image is, else RGB
    # captions: validation counts each caption's tokens with this tokenizer (a folder `CLIPTokenizer` /
    # `AutoTokenizer` reads; None = the CLIP BPE of SD 1.x/2.x/SDXL that sdpipe ships) and reports those
    # longer than `caption_max_tokens` (the text encoder's window, start and end tokens included)
    caption_tokenizer: str | None = None
    caption_max_tokens: int = Field(default=77, ge=3)
    # aspect-ratio buckets (text-to-image training): images keep their shape, each resized to cover the
    # bucket of nearest aspect ratio (area about resolution^2, sides multiples of bucket_step, long side at
    # most max_aspect_ratio x the short one) and centre-cropped by at most the rounding; False = square crops
    buckets: bool = False
    bucket_step: int = Field(default=64, ge=8)
    max_aspect_ratio: float = Field(default=2.0, ge=1.0, le=8.0)

    @property
    def held_out(self) -> float:
        """The test split's share: `test_fraction`, or its default for the source."""
        return self.held_out_for(self.source)

    def held_out_for(self, kind: str) -> float:
        """The test split's share for a source of `kind` (`sdpipe data validate` names the kind itself)."""
        if self.test_fraction is not None:
            return self.test_fraction
        return 0.25 if kind == "digits" else 0.0

    @model_validator(mode="after")
    def _check_fractions(self) -> DataConfig:
        if self.validation_fraction + self.held_out >= 1:
            raise ValueError("data.validation_fraction + data.test_fraction must leave a training split (sum < 1)")
        return self


class ModelConfig(_Section):
    """The network that trains. `type: pixel` is a diffusers `UNet2DModel` on pixels (class-conditional or
    not); `type: text-to-image` is a Stable Diffusion pipeline whose `UNet2DConditionModel` trains on VAE
    latents of captioned images (see `train.method`). The shape fields configure a new UNet (pixel, or
    text-to-image `scratch`); attention (cross-attention for text) in the blocks listed by `attention_levels`."""

    type: Literal["pixel", "text-to-image"] = "pixel"
    # text-to-image: the base pipeline of `full` and `lora` (a diffusers folder, a single .safetensors file or
    # a registry reference); for `scratch`, where the VAE, text encoder, tokenizer and scheduler come from.
    # `scratch` without it makes its own (`sdpipe.train.components`): a VAE of `vae_channels` trained on the
    # training images for `train.vae_steps`, CLIP's tokenizer and a small random frozen CLIP text encoder
    pretrained: str | None = None
    vae_channels: list[int] = Field(default=[16, 32], min_length=1, max_length=4)  # 2^(len-1) = its downsampling
    text_width: int = Field(default=64, ge=8, le=1024)
    text_layers: int = Field(default=2, ge=1, le=12)

    block_out_channels: list[int] = Field(default=[32, 64], min_length=1, max_length=6)
    layers_per_block: int = Field(default=1, ge=1, le=4)
    attention_levels: list[int] = Field(default=[1])  # indices into block_out_channels
    attention_head_dim: int = Field(default=32, ge=1)
    norm_num_groups: int = Field(default=16, ge=1)
    # "scale_shift": the time/class embedding scales and shifts the normalised features (AdaGN, Dhariwal &
    # Nichol 2021) instead of being added to them
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "scale_shift"

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        bad = [i for i in self.attention_levels if not 0 <= i < len(self.block_out_channels)]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range: allowed 0..{len(self.block_out_channels) - 1}")
        heads = max(1, self.text_width // 32)  # the own text encoder's heads (models.components)
        if self.text_width % heads:
            raise ValueError(f"model.text_width {self.text_width} must split into {heads} attention heads of 32+")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"block_out_channels {odd} are not multiples of norm_num_groups")
        return self


class DiffusionConfig(_Section):
    """How noise is added in training; saved as the diffusers scheduler config of the model."""

    # None: v_prediction for pixel models; for text-to-image, the base's (its scheduler config). Explicit, not
    # "whether the key was given", so a run's saved config resumes with the prediction type it started with
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    num_train_timesteps: int = Field(default=1000, ge=10, le=10000)
    schedule_shift: float = Field(default=1.0, gt=0, le=64)  # SNR x shift^2 ("simple diffusion"); 1 = none
    # "ddpm": the discrete-time process above, target `prediction_type`. "edm": EDM's preconditioning and
    # sigma schedule (Karras et al. 2022): sigma in [sigma_min, sigma_max], data std sigma_data; sampled with
    # diffusers' EDM schedulers, so only the euler and dpmpp_2m(_karras) samplers apply
    formulation: Literal["ddpm", "edm"] = "edm"
    sigma_min: float = Field(default=0.002, gt=0)
    sigma_max: float = Field(default=80.0, gt=0)
    sigma_data: float = Field(default=0.5, gt=0)  # also used by the "edm" loss weighting
    # rescale the betas so the last timestep is pure noise (Lin et al. 2024, "Common Diffusion Noise Schedules
    # and Sample Steps are Flawed"); trains with v-prediction, and the model samples with trailing timesteps
    zero_terminal_snr: bool = False


class TrainConfig(_Section):
    steps: int = Field(default=1500, ge=1)  # optimizer steps
    batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    # weight of each noise level in the loss: "uniform" on the target, "min_snr" (min(SNR, gamma) on the x0
    # error, Hang et al. 2023) or "edm" (Karras et al. 2022's lambda(sigma); what the "edm" formulation uses)
    loss_weighting: Literal["uniform", "min_snr", "edm"] = "edm"
    min_snr_gamma: float = Field(default=5.0, gt=0)
    # on top of that weighting, EDM2's learned per-noise-level uncertainty (Karras et al. 2024): loss / exp(u) + u
    uncertainty_weighting: bool = True
    # which noise levels are trained: "uniform" over timesteps, or EDM's ln(sigma) ~ N(mean, std^2)
    # (Karras et al. 2022) mapped to the nearest timestep of the schedule
    timestep_sampling: Literal["uniform", "lognormal"] = "uniform"
    # -0.8 rather than EDM's CIFAR-10 -1.2: 8x8 digits lose their shape at lower noise (measured, digits.yaml)
    lognormal_mean: float = -0.8
    lognormal_std: float = Field(default=1.2, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)  # upper bound of the EMA decay
    ema_warmup_power: float = Field(default=0.67, gt=0, le=1)  # decay ramps as 1 - (1 + step)^-power
    label_dropout: float = Field(default=0.1, ge=0, le=1)  # share of labels replaced by the null label
    checkpoint_every: int = Field(default=500, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(default=3, ge=1)  # the newest K are kept
    # NaN/Inf policy: a non-finite loss or gradient skips the step; after max_bad_steps in a row the run rolls
    # back to the last checkpoint and multiplies the learning rate by rollback_lr_factor, at most max_rollbacks times
    max_bad_steps: int = Field(default=5, ge=1)
    rollback_lr_factor: float = Field(default=0.5, gt=0, le=1)
    max_rollbacks: int = Field(default=3, ge=0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    threads: int | None = Field(default=None, ge=1)  # torch intra-op threads; None = all cores
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast through accelerate, where the device has it
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    # validation loss on the data's validation split every N steps (None: never); early stopping after
    # `early_stopping_patience` validations without a new best (None: never stop early). The best
    # validation's checkpoint is kept whatever keep_checkpoints says.
    validate_every: int | None = Field(default=None, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    trackers: list[Literal["tensorboard", "mlflow"]] = Field(default=[])  # besides metrics.jsonl (always)
    # a small evaluation of the EMA weights every N steps (None: never): `eval_samples` images with the
    # model's sampler, scored by the judge (FD ratio, label accuracy), for quality-over-time curves
    eval_every: int | None = Field(default=None, ge=1)
    eval_samples: int = Field(default=200, ge=10)
    # --- text-to-image (model.type: text-to-image) ---
    # scratch: a new UNet (shaped by `model`); full: every UNet weight of model.pretrained trains; lora: a peft
    # LoRA on the UNet's attention trains, the base stays frozen
    method: Literal["scratch", "full", "lora"] = "scratch"
    vae_steps: int = Field(default=600, ge=1)  # scratch without model.pretrained: the own VAE's training steps
    caption_dropout: float = Field(default=0.1, ge=0, le=1)  # captions replaced by "" (for guidance)
    unconditional: bool = False  # train on images without captions (all ""); otherwise missing captions stop it
    noise_offset: float = Field(default=0.0, ge=0, le=1)  # N(0, offset^2) per image and channel added to the noise
    lora_rank: int = Field(default=4, ge=1, le=1024)
    lora_alpha: float | None = Field(default=None, gt=0)  # None = the rank (scale 1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    # the text encoder(s) train too: a LoRA on `lora_text_targets` for method lora, every weight otherwise;
    # their outputs are then not cached (sdpipe.train.t2i_text)
    train_text_encoder: bool = False
    lora_text_targets: list[str] = Field(default=["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1)
    cache_dir: str | None = None  # latent and text-embedding caches; None = sdpipe's cache folder (SDPIPE_CACHE)
    # prompts rendered every `validation_prompt_every` steps (EMA weights, fixed seeds train.seed + k, the
    # `sample` section's sampler, steps and guidance, data.resolution) into RUN/validation: a grid per step
    # and grid.png over the steps; both settings or neither
    validation_prompts: list[str] = Field(default=[])
    validation_prompt_every: int | None = Field(default=None, ge=1)


class SampleConfig(_Section):
    sampler: str = "dpmpp_2m"  # any name of `sdpipe.sampler_names` (either name, any case), stored as sdpipe's
    steps: int = Field(default=14, ge=1, le=1000)  # measured: as good as 20 within noise, 1.4x faster
    guidance: float = Field(default=1.0, ge=0, le=20)  # classifier-free guidance scale; 1 = none
    micro_batch: int = Field(default=64, ge=1, le=4096)  # fixed network batch: images never depend on n

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, name: str) -> str:
        return sampler_names.resolve(name)


class EvaluateConfig(_Section):
    n_samples: int = Field(default=1000, ge=10)
    # independent sample sets (seeds seed, seed + n_samples, ...) behind each headline figure's mean and 95 % interval
    sample_sets: int = Field(default=4, ge=1, le=100)
    pca_components: int = Field(default=32, ge=2, le=64)
    guidance_scales: list[float] = Field(default=[1.0, 2.0])  # measured besides the default
    seed: int = Field(default=1_000_000, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _check_seeds(self) -> EvaluateConfig:
        if self.seed + self.n_samples * self.sample_sets - 1 > MAX_SEED:
            raise ValueError(f"evaluate.seed + n_samples x sample_sets - 1 must be at most {MAX_SEED}")
        return self


EDM_SAMPLERS = sampler_names.EDM_SAMPLERS  # those diffusers has EDM schedulers for


class PipelineConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> PipelineConfig:
        if self.model.type == "text-to-image":
            return self._check_text_to_image()
        if self.diffusion.prediction_type is None:
            self.diffusion.prediction_type = "v_prediction"
        if self.diffusion.formulation == "edm":
            if self.sample.sampler not in EDM_SAMPLERS:
                raise ValueError(
                    f"sample.sampler {self.sample.sampler!r} has no EDM scheduler in diffusers; "
                    f"with diffusion.formulation=edm use one of: {', '.join(EDM_SAMPLERS)}"
                )
            if self.train.loss_weighting != "edm":
                raise ValueError("diffusion.formulation=edm trains with train.loss_weighting=edm")
        elif self.sample.sampler not in sampler_names.PIXEL_SAMPLERS:
            raise ValueError(
                f"sample.sampler {self.sample.sampler!r} is for Stable Diffusion pipelines; pixel-space models "
                f"sample with one of: {', '.join(sampler_names.PIXEL_SAMPLERS)}"
            )
        if self.diffusion.sigma_min >= self.diffusion.sigma_max:
            raise ValueError("diffusion.sigma_min must be below diffusion.sigma_max")
        return self

    def _check_text_to_image(self) -> PipelineConfig:
        if self.diffusion.formulation != "ddpm":
            raise ValueError("model.type=text-to-image trains a Stable Diffusion UNet: set diffusion.formulation=ddpm")
        if self.train.loss_weighting == "edm":
            raise ValueError("model.type=text-to-image: train.loss_weighting is uniform or min_snr")
        if self.model.pretrained is None and self.train.method != "scratch":
            raise ValueError(f"train.method={self.train.method} needs model.pretrained: the base pipeline")
        if self.diffusion.zero_terminal_snr and self.diffusion.prediction_type == "epsilon":
            raise ValueError(
                "diffusion.zero_terminal_snr needs prediction_type=v_prediction (epsilon is undefined at SNR 0)"
            )
        return self


def format_errors(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """A pydantic error as the config's `key: problem` lines (unknown keys list what is allowed there)."""
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(root, [str(p) for p in e["loc"][:-1]])
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
        lines.append(f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _fields_at(root: type[BaseModel], path: list[str]) -> list[str]:
    model: Any = root
    for part in path:
        model = model.model_fields[part].annotation
    return sorted(model.model_fields)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`'train.steps=10'` -> `('train.steps', 10)`; the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.steps=500")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's sections, unchecked; ConfigError for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, e.g. 'train:'")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> PipelineConfig:
    """Read a YAML config (or start from `base`, e.g. a run's saved config, or the defaults), apply
    `dotted.key=value` overrides, validate everything."""
    return validate_config(config_tree(path, overrides, base=base))


def config_tree(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The unchecked sections `load_config` validates: the YAML file (or a copy of `base`, or nothing) with
    the `dotted.key=value` overrides applied (also what a table config is read with, sdpipe.tabular)."""
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        tree = read_config_file(path)
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    return tree


def validate_section(section: str, values: dict[str, Any]) -> Any:
    """One section alone (e.g. a saved model's sample settings with a user's changes), errors as for a config."""
    model: Any = PipelineConfig.model_fields[section].annotation
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(format_errors(err, model, prefix=f"{section}.")) from None


def validate_config(tree: dict[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(err, PipelineConfig)) from None
