"""Text-to-image training: a Stable Diffusion UNet on the VAE latents of captioned images.

`TextToImageTask` is what this kind brings to the shared `Trainer`; the three methods differ only in what
trains. `scratch` builds a new `UNet2DConditionModel` (shaped by the `model` section) and takes the VAE,
text encoder(s), tokenizer(s) and noise schedule of `model.pretrained`; `full` trains every UNet weight of
`model.pretrained`; `lora` adds a peft LoRA to it and trains only that. With `train.train_text_encoder` the
text encoder(s) train too (`sdpipe.train.t2i_text`), and their outputs are not cached.

Images are fitted to aspect-ratio buckets (`sdpipe.data.buckets`), encoded once into the on-disk latent
cache (posterior mean and std) and their captions once into the text cache (`sdpipe.train.cache`). A step
then draws from the run's generator, in this order: the bucket's batch, flips, the latent sample
(mean + std x noise), caption dropout, the diffusion noise (and its offset), the timesteps. So a resumed
run draws what an uninterrupted one would, caches or not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from torch import nn

from sdpipe.config import PipelineConfig
from sdpipe.data import ImageSet
from sdpipe.data.buckets import BucketPlan, BucketSampler, plan_buckets
from sdpipe.models.unet import build_text_unet
from sdpipe.train.cache import LatentCache, TextCache, default_root
from sdpipe.train.losses import DiffusionLoss, TextCond, TokenCond, UncertaintyWeighting
from sdpipe.train.t2i_text import TextAndUNet, Tokens, prepare_text_encoders, text_encoders
from sdpipe.train.trainer import objective_and_plain, validation_split
from sdpipe.train.validation import validation_loss


class CaptionError(ValueError):
    """Training data whose captions cannot train a text-to-image model as configured."""


def module_sha256(module: nn.Module) -> str:
    """A content hash of a module's weights (names, dtypes, shapes and bytes): what caches are keyed by."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def load_base(ref: str, device: str = "cpu") -> Any:
    """The `LoadedPipeline` of `model.pretrained`: a folder, a single file or a registry reference."""
    from sdpipe.models.kinds import load_any

    path = Path(ref)
    if not path.exists():
        from sdpipe import registry

        path = registry.resolve(ref)
    loaded = load_any(path, device=device)
    if not hasattr(loaded, "pipe"):
        raise ValueError(f"model.pretrained {ref}: a {type(loaded).__name__}, not a Stable Diffusion pipeline")
    return loaded


def training_scheduler(cfg: PipelineConfig, base_config: dict[str, Any]) -> DDPMScheduler:
    """The forward process: the base's betas and prediction type (unless `diffusion.prediction_type` was set),
    with zero terminal SNR when asked."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "steps_offset")
    config = {k: base_config[k] for k in keys if k in base_config}
    config["prediction_type"] = cfg.diffusion.prediction_type or base_config.get("prediction_type", "epsilon")
    if cfg.diffusion.zero_terminal_snr:
        if config["prediction_type"] == "epsilon":
            raise ValueError("diffusion.zero_terminal_snr needs v_prediction: set diffusion.prediction_type")
        config["rescale_betas_zero_snr"] = True
    return DDPMScheduler(**config)


@dataclass(frozen=True)
class Captions:
    """Each training image's caption as training uses it."""

    texts: list[str]

    @classmethod
    def of(cls, data: ImageSet, unconditional: bool) -> Captions:
        got = [c.strip() if c else "" for c in data.captions]
        missing = sum(not c for c in got)
        if unconditional:
            return cls([""] * len(got))
        if missing == len(got):
            raise CaptionError(
                f"none of the {len(got)} training images has a caption: add .txt files or a metadata.jsonl "
                "(see docs/data.md), or set train.unconditional=true to train without text"
            )
        if missing:
            raise CaptionError(
                f"{missing} of {len(got)} training images have no caption (`sdpipe data validate` lists them in "
                "report.json's captions section): caption them, or set train.unconditional=true"
            )
        return cls(got)


class TextToImageTask:
    """A Stable Diffusion UNet trained on cached latents and text embeddings of captioned images."""

    def __init__(
        self,
        cfg: PipelineConfig,
        base: Any,
        data: ImageSet,
        gen: torch.Generator,
        device: torch.device,
        validation: ImageSet | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.cfg, self.base, self.pipe, self.data, self.validation = cfg, base, base.pipe, data, validation
        t = cfg.train
        self.captions = Captions.of(data, t.unconditional)
        self.xl = hasattr(self.pipe, "text_encoder_2")
        self.vae_factor = int(self.pipe.vae_scale_factor)
        blocks = cfg.model.block_out_channels if t.method == "scratch" else self.pipe.unet.config.block_out_channels
        self.multiple = self.vae_factor * 2 ** (len(blocks) - 1)
        self.plan = make_plan(cfg, data, self.multiple)
        self.sched = training_scheduler(cfg, dict(self.pipe.scheduler.config))
        self.loss_fn = DiffusionLoss(self.sched, t.loss_weighting, t.min_snr_gamma)
        self.weighting = UncertaintyWeighting(self.loss_fn) if t.uncertainty_weighting else None
        self.pipe.unet = unet = self._unet()
        for frozen in self._frozen():
            frozen.requires_grad_(False).eval()
        self.tokens: Tokens | None = None
        self.module: nn.Module = unet
        if t.train_text_encoder:
            if t.unconditional:
                raise ValueError("train.train_text_encoder needs captions: it cannot train with train.unconditional")
            encoders = text_encoders(self.pipe)
            prepare_text_encoders(encoders, self._lora_config(t.lora_text_targets) if t.method == "lora" else None)
            self.module, self.tokens = TextAndUNet(unet, encoders), Tokens(self.pipe)
        if t.gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        root = Path(t.cache_dir) if t.cache_dir else default_root()
        self.latents = LatentCache(root, self.pipe.vae, module_sha256(self.pipe.vae), self._preprocess_key())
        self.scaling = float(self.pipe.vae.config.scaling_factor)
        self.text = TextCache(root, self._encode_text, self._text_hash())
        self._fill_caches(data, self.plan, self.captions.texts, progress)
        self.sampler = BucketSampler(self.plan.assignment, t.batch_size, gen)
        self.module.to(device)

    # --- what trains -------------------------------------------------------------------------------------
    def _unet(self) -> Any:  # a diffusers UNet2DConditionModel
        cfg, pipe = self.cfg, self.pipe
        if cfg.train.method == "scratch":
            te = pipe.text_encoder_2 if self.xl else pipe.text_encoder
            # the prompt embeddings' width: CLIP's, or SDXL's two encoders' side by side
            width = int(pipe.text_encoder.config.hidden_size) + (int(te.config.hidden_size) if self.xl else 0)
            torch.manual_seed(cfg.train.seed)
            return build_text_unet(
                cfg.model,
                sample_size=(cfg.data.resolution or self.plan.resolution) // self.vae_factor,
                channels=int(pipe.vae.config.latent_channels),
                cross_attention_dim=width,
                addition_embed=int(te.config.projection_dim) if self.xl else None,
            )
        unet = pipe.unet
        if cfg.train.method == "lora":
            unet.requires_grad_(False)
            unet.add_adapter(self._lora_config(cfg.train.lora_targets))
        return unet

    def _lora_config(self, targets: list[str]) -> Any:
        from peft import LoraConfig

        t = self.cfg.train
        alpha = t.lora_alpha if t.lora_alpha is not None else float(t.lora_rank)
        return LoraConfig(
            r=t.lora_rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
            lora_dropout=t.lora_dropout,
            target_modules=targets,
            init_lora_weights="gaussian",
        )

    def _frozen(self) -> list[nn.Module]:
        """The VAE and the text encoders (which `prepare_text_encoders` may then make trainable)."""
        names = ["vae", "text_encoder", "text_encoder_2"]
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    def trained_unet(self, module: nn.Module) -> nn.Module:
        """The UNet of `module` (this task's module or a copy of it, as the trainer's outcome is)."""
        return module.unet if isinstance(module, TextAndUNet) else module

    def trained_text_encoders(self, module: nn.Module) -> list[nn.Module]:
        """The text encoders of `module` that trained (none unless train.train_text_encoder)."""
        return list(module.text_encoders) if isinstance(module, TextAndUNet) else []

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    # --- caches ------------------------------------------------------------------------------------------
    def _preprocess_key(self) -> str:
        d = self.cfg.data
        return f"fit-cover-centre:{d.resize_filter}:{d.channels}"

    def _text_hash(self) -> str:
        parts = [module_sha256(m) for m in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if m]
        for tok in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)):
            if tok is not None:
                parts.append(hashlib.sha256(repr(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16])
        return "sha256:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.pipe.encode_prompt(
            prompt=captions,
            device=self.pipe.text_encoder.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        encoded = {"prompt_embeds": out[0]}
        if self.xl:
            encoded["pooled"] = out[2]
        return encoded

    def _fill_caches(
        self, data: ImageSet, plan: BucketPlan, captions: list[str], progress: Callable[[str, int, int], None] | None
    ) -> None:
        items = [(i, data.digests[i], plan.buckets[b]) for i, b in enumerate(plan.assignment)]
        show = None if progress is None else (lambda done, total: progress("latents", done, total))
        self.latent_stats = self.latents.ensure(items, data.pixels, flips=self.cfg.data.random_flip, progress=show)
        if self.tokens is not None:  # the text encoders train: their outputs change every step
            self.text_stats: dict[str, Any] = {
                "skipped": "train.train_text_encoder: text-encoder outputs are not cached"
            }
            return
        show = None if progress is None else (lambda done, total: progress("captions", done, total))
        self.text_stats = self.text.ensure(sorted(set(captions)), progress=show)

    # --- one step ----------------------------------------------------------------------------------------
    def draw(self, gen: torch.Generator, rank: int, world: int, device: torch.device) -> tuple[Any, ...]:
        t = self.cfg.train
        bucket_index, idx = self.sampler.next()
        bucket = self.plan.buckets[bucket_index]
        n = len(idx)
        flips = (torch.rand(n, generator=gen) < 0.5) if self.cfg.data.random_flip else torch.zeros(n, dtype=torch.bool)
        keys = [self.latents.key(self.data.digests[int(i)], bucket, bool(f)) for i, f in zip(idx, flips, strict=True)]
        mean, std = self.latents.get(keys)
        z = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling
        dropped = torch.rand(n, generator=gen) < t.caption_dropout
        captions = ["" if d else self.captions.texts[int(i)] for i, d in zip(idx, dropped, strict=True)]
        noise = torch.randn(z.shape, generator=gen)
        if t.noise_offset:  # Guttenberg 2023: lets the model change an image's mean brightness
            noise = noise + t.noise_offset * torch.randn((n, z.shape[1], 1, 1), generator=gen)
        steps = torch.randint(0, self.sched.config["num_train_timesteps"], (n,), generator=gen)
        cond = self._cond(captions, [self.data.sizes[int(i)] for i in idx], bucket)
        part = slice(rank, None, world)
        return z[part].to(device), cond[part].to(device), noise[part].to(device), steps[part].to(device)

    def _cond(self, captions: list[str], sizes: list[tuple[int, int]], bucket: tuple[int, int]) -> TextCond | TokenCond:
        # SDXL's size conditioning: original (h, w), crop top-left, target (h, w), as diffusers' scripts give it
        w, h = bucket
        time_ids = torch.tensor([[sh, sw, 0, 0, h, w] for sw, sh in sizes], dtype=torch.float32) if self.xl else None
        if self.tokens is not None:
            return TokenCond(self.tokens(captions), time_ids)
        emb = self.text.get(captions)
        if time_ids is None:
            return TextCond(emb["prompt_embeds"])
        return TextCond(emb["prompt_embeds"], {"text_embeds": emb["pooled"], "time_ids": time_ids})

    def loss(self, objective: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return objective_and_plain(objective, self.loss_fn, model, batch)

    def validator(self) -> Callable[[nn.Module], float] | None:
        """The validation split's loss at fixed noise, per bucket, weighted by the bucket's images."""
        cfg = self.cfg
        val = validation_split(self.validation, cfg.train)
        if val is None:
            return None
        plan = make_plan(cfg, val, self.multiple)
        texts = Captions.of(val, cfg.train.unconditional).texts
        self._fill_caches(val, plan, texts, None)
        groups = []
        for b, bucket in enumerate(plan.buckets):
            members = [i for i, a in enumerate(plan.assignment) if a == b]
            if members:
                keys = [self.latents.key(val.digests[i], bucket, False) for i in members]
                mean, _ = self.latents.get(keys)
                sizes = [val.sizes[i] for i in members]
                groups.append((mean * self.scaling, self._cond([texts[i] for i in members], sizes, bucket)))

        def run(model: nn.Module) -> float:
            device = next(model.parameters()).device
            total = sum(
                validation_loss(model, self.loss_fn, z.to(device), c.to(device), seed=cfg.train.seed) * len(z)
                for z, c in groups
            )
            return total / sum(len(z) for z, _ in groups)

        return run


def make_plan(cfg: PipelineConfig, data: ImageSet, multiple: int) -> BucketPlan:
    """The bucket plan of `data`: aspect-ratio buckets, or one square bucket of `data.resolution`; sides are
    multiples of `multiple` (the VAE's times the UNet's downsampling)."""
    d = cfg.data
    resolution = d.resolution or min(min(s) for s in data.sizes)
    if resolution % multiple:
        raise ValueError(f"data.resolution {resolution} must be a multiple of {multiple}, the model's downsampling")
    if not d.buckets:
        return plan_buckets(data.sizes, resolution, resolution, 1.0)
    if d.bucket_step % multiple:
        raise ValueError(
            f"data.bucket_step {d.bucket_step} must be a multiple of {multiple} (the model's downsampling)"
        )
    return plan_buckets(data.sizes, resolution, d.bucket_step, d.max_aspect_ratio)
