"""Stable Diffusion pipelines (SD 1.x, SD 2.x, SDXL) loaded from a diffusers folder, as `Parts` for the one
generation path: text encoders in, latents through the UNet, the VAE out.

The pipeline object diffusers loads is kept whole (`LoadedPipeline.pipe`), so its own `encode_prompt` and
`_get_add_time_ids` make the text and size conditioning exactly as `pipe(...)` does; what sdpipe does itself is
the loop (`sdpipe.sampling.generate.denoise`), the per-image noise and the micro-batches. Nothing is downloaded:
folders load with `local_files_only=True` and safetensors only.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor

from sdpipe.conditioning import Conditioning, LoraRef
from sdpipe.inputs import load_image
from sdpipe.models.parts import PIPELINE_RULES, Encoded

log = logging.getLogger("sdpipe.models")

# model_index.json `_class_name`s sdpipe loads, and what each takes
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd-inpaint",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl-inpaint",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDING_CACHE = 256  # prompts whose embeddings are kept (each is encoded alone: again gives the same bits)
_LOAD_LOCK = threading.Lock()  # diffusers' loading patches torch.nn.Module process-wide (see models.format)
_WEIGHTING = re.compile(r"(?<!\\)[()\[\]]")  # web-UI emphasis syntax: (word), (word:1.2), [word]


def is_pipeline_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def pipeline_class_name(path: Path) -> str:
    """The folder's pipeline class, refusing one sdpipe does not sample."""
    name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    if name not in PIPELINE_CLASSES:
        raise ValueError(
            f"{path} holds a {name or 'pipeline of no named class'}; sdpipe loads Stable Diffusion pipelines: "
            f"{', '.join(PIPELINE_CLASSES)}"
        )
    return name


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedPipeline:
    """A Stable Diffusion pipeline folder, loaded."""

    path: Path
    pipe: Any  # a diffusers StableDiffusion[XL][Inpaint]Pipeline
    hash: str
    kind: str = "sd-pipeline"
    micro_batch: int = 1  # no padding rows on a CPU; GPU users raise it
    memory: dict[str, bool] = field(default_factory=lambda: {"vae_tiling": False, "attention_slicing": False})
    default_loras: tuple[LoraRef, ...] = ()  # a LoRA run's model: its LoRA, on every image unless --lora names it
    _parts: PipelineParts | None = field(default=None, repr=False)

    def save_memory(self, vae_tiling: bool = False, attention_slicing: bool = False) -> None:
        """diffusers' memory savers for sizes that would not fit: the VAE decodes in overlapping tiles, attention
        runs in slices. Both change an image's last bits, so the PNG records them and replay sets them again."""
        if vae_tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        if attention_slicing:
            self.pipe.enable_attention_slicing()
        else:
            self.pipe.disable_attention_slicing()
        self.memory = {"vae_tiling": vae_tiling, "attention_slicing": attention_slicing}

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The scheduler config the folder was saved with (samplers are built from it, never swapped in)."""
        return self.parts.scheduler_config

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def parts(self) -> PipelineParts:
        if self._parts is None:  # keeps its cache of prompt embeddings between calls
            self._parts = PipelineParts(self.pipe)
        return self._parts

    @property
    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)


def load_pipeline(path: str | Path, device: str = "cpu", dtype: str = "float32") -> LoadedPipeline:
    """A diffusers Stable Diffusion folder, offline, safetensors only, on `device` in `dtype`."""
    import diffusers

    path = Path(path)
    cls = getattr(diffusers, pipeline_class_name(path))
    index = json.loads((path / "model_index.json").read_text())
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    with _LOAD_LOCK:
        pipe = cls.from_pretrained(
            path, local_files_only=True, use_safetensors=True, torch_dtype=dtype_of(dtype), **extra
        )
    pipe.to(torch.device(device))
    align_weights(pipe)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(path, pipe, "sha256:" + pipeline_sha256(path)[:16])


ALIGNMENT = 64  # bytes: what PyTorch's CPU allocator gives every new tensor


def align_weights(pipe: Any) -> None:
    """Copy every weight that does not start on a 64-byte boundary into a fresh tensor. A loader leaves weights
    where its file put them (at any offset), and on some CPUs (measured on an AMD EPYC) the BLAS kernels then
    round differently: the same weights from a folder and from a single file gave images 1e-5 apart. Aligned,
    they give the same bits, whatever file they came from."""
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
                tensor.data = tensor.data.clone()


def pipeline_sha256(path: Path) -> str:
    """A model's content hash (64 hex): a single file's sha256, or a diffusers folder's over the components its
    model_index.json names (streamed and cached; see models.hashes)."""
    from sdpipe.models.hashes import file_sha256, folder_sha256

    if path.is_file():
        return file_sha256(path)
    index = json.loads((path / "model_index.json").read_text())
    components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
    return folder_sha256(path, components)


class PromptError(ValueError):
    """A prompt sdpipe cannot encode as written (too long for the text encoder, weighting syntax)."""


class PipelineParts:
    """A Stable Diffusion pipeline as the generation path sees it (`sdpipe.models.parts.Parts`)."""

    rules = PIPELINE_RULES

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.resolve_lora: Callable[[str], Path] | None = None  # NAME@ALIAS -> a LoRA file (the registry's)
        self.max_loras: int | None = None  # adapters kept loaded at once (a server bounds them); None: all
        self.unet = pipe.unet
        self.scheduler_config = dict(pipe.scheduler.config)
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.xl = hasattr(pipe, "text_encoder_2")
        self._embeddings: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()  # LRU, EMBEDDING_CACHE
        _name_final_layer_norm(getattr(pipe, "text_encoder", None))

    def conditional(self) -> bool:
        return True

    @property
    def embeds_guidance(self) -> bool:
        """An LCM-distilled UNet takes the guidance scale as an embedding (`time_cond_proj_dim`), not as CFG."""
        return self.unet.config.time_cond_proj_dim is not None

    def guidance_inputs(self, guidance: float, batch: int) -> Encoded:
        """The LCM UNet's `timestep_cond`, as diffusers' pipelines make it from (guidance - 1); none otherwise."""
        if not self.embeds_guidance:
            return {}
        w = torch.tensor(guidance - 1).repeat(batch)
        dim = self.unet.config.time_cond_proj_dim
        cond = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim)
        return {"timestep_cond": cond.to(device=self.device, dtype=self.dtype)}

    def size(self, cond: Conditioning) -> tuple[int, int]:
        """(height, width) in pixels: the conditioning's, else the UNet's native size."""
        default = int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return (cond.height or default, cond.width or default)

    def sample_shape(self, cond: Conditioning) -> tuple[int, ...]:
        h, w = self.size(cond)
        f = int(self.pipe.vae_scale_factor)
        return (int(self.pipe.vae.config.latent_channels), h // f, w // f)

    def check_prompt(self, text: str, what: str = "prompt") -> None:
        """Refuse what the web UIs would read differently: emphasis syntax and prompts past the window."""
        if "<lora:" in text:
            raise PromptError(f"{what}: <lora:...> tags are not read from prompts; pass the LoRA with --lora FILE:W")
        found = _WEIGHTING.search(text)
        if found:
            raise PromptError(
                f"{what}: prompt weighting such as (word:1.2) or [word] is not supported yet (found {found.group()!r} "
                f"at character {found.start()}); write a literal bracket as \\{found.group()}"
            )
        tokenizer = self.pipe.tokenizer
        n = len(tokenizer(text).input_ids)
        if n > tokenizer.model_max_length:
            raise PromptError(
                f"{what} is {n} tokens with its start and end tokens, past the text encoder's window of "
                f"{tokenizer.model_max_length}; shorten it (long prompts are not chunked yet)"
            )

    def prepare(self, cond: Conditioning) -> None:
        """Make the micro-batch's LoRAs (shared by its rows through `batch_key`) the pipeline's active adapters."""
        from sdpipe.models.lora import apply_loras, lora_path

        apply_loras(self.pipe, cond.loras, lambda ref: lora_path(ref, self.resolve_lora), max_loaded=self.max_loras)

    def _embed(self, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        """(positive, negative[, pooled, negative pooled]) for one prompt, encoded alone (batch 1), cached,
        so an image's embeddings never depend on its batch-mates; the key holds the active text-encoder LoRAs."""
        from sdpipe.models.lora import active_text_encoder_loras

        key = (cond.prompt, cond.negative_prompt, cond.clip_skip, active_text_encoder_loras(self.pipe))
        if key not in self._embeddings:
            prompt = _literal(cond.prompt or "")
            negative = _literal(cond.negative_prompt) or None  # None: SDXL's zeros for an empty negative
            clip_skip = None if cond.clip_skip == 1 else cond.clip_skip - 1
            with torch.no_grad():  # the cache holds tensors, not autograd graphs
                out = self.pipe.encode_prompt(
                    prompt=prompt,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=True,
                    negative_prompt=negative,
                    clip_skip=clip_skip,
                )
            self._embeddings[key] = tuple(out)
            while len(self._embeddings) > EMBEDDING_CACHE:  # a server meets ever new prompts
                self._embeddings.popitem(last=False)
        self._embeddings.move_to_end(key)
        return self._embeddings[key]

    def encode(self, rows: Sequence[Conditioning | None], guided: bool) -> Encoded:
        real = next(c for c in rows if c is not None)
        for c in {c for c in rows if c is not None}:
            self.check_prompt(c.prompt or "")
            self.check_prompt(c.negative_prompt, "negative prompt")
        embeds = [self._embed(c if c is not None else real) for c in rows]  # padding rows copy a real row
        pos = torch.cat([e[0] for e in embeds])
        neg = torch.cat([e[1] for e in embeds])
        encoded: Encoded = {"encoder_hidden_states": torch.cat([neg, pos]) if guided else pos}
        if self.xl:
            pooled = torch.cat([e[2] for e in embeds])
            neg_pooled = torch.cat([e[3] for e in embeds])
            time_ids = self._time_ids(real, pooled).repeat(2 * len(rows) if guided else len(rows), 1)
            text_embeds = torch.cat([neg_pooled, pooled]) if guided else pooled
            encoded["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids.to(self.device)}
        return encoded

    def _time_ids(self, cond: Conditioning, pooled: torch.Tensor) -> torch.Tensor:
        """SDXL's size conditioning, as the pipeline computes it (original = target = the image size unless
        given)."""
        size = self.size(cond)
        s = cond.size
        original = tuple(s.original_size) if s and s.original_size else size
        target = tuple(s.target_size) if s and s.target_size else size
        crops = tuple(s.crops_coords_top_left) if s else (0, 0)
        te2 = self.pipe.text_encoder_2
        proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
        return self.pipe._get_add_time_ids(
            original, crops, target, dtype=pooled.dtype, text_encoder_projection_dim=proj
        )

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def image_tensor(self, cond: Conditioning) -> torch.Tensor:
        """The img2img/inpainting input of `cond` as the pipelines prepare it: (1, 3, H, W) float32 in [-1, 1]
        at the conditioning's size."""
        assert cond.init is not None
        h, w = self.size(cond)
        return self.pipe.image_processor.preprocess(load_image(cond.init), height=h, width=w).to(torch.float32)

    def mask_tensor(self, cond: Conditioning) -> torch.Tensor:
        """The inpainting mask as the pipelines binarize it: (1, 1, H, W), 1 = repaint, 0 = keep."""
        assert cond.mask is not None
        h, w = self.size(cond)
        processor = VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        return processor.preprocess(load_image(cond.mask, "L"), height=h, width=w)

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        f = int(self.pipe.vae_scale_factor)
        return torch.nn.functional.interpolate(mask, size=(mask.shape[2] // f, mask.shape[3] // f))

    def posterior(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A VAE posterior sample of one image (1, 3, H, W), drawn with the row's generator, times the VAE's
        scaling factor (diffusers' `retrieve_latents(vae.encode(x), generator)`)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        vae = self.pipe.vae
        with torch.inference_mode():
            latents = retrieve_latents(vae.encode(image.to(self.device, vae.dtype)), generator=generator)
        return (vae.config.scaling_factor * latents).to(self.dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        extra = encoded.get("extra")
        if extra is not None:  # a 9-channel inpainting UNet sees the mask and the masked image's latents
            x = torch.cat([x, extra["mask"], extra["masked_latents"]], dim=1)
        return self.unet(
            x,
            t,
            encoder_hidden_states=encoded["encoder_hidden_states"],
            timestep_cond=encoded.get("timestep_cond"),
            added_cond_kwargs=encoded.get("added_cond_kwargs"),
        ).sample

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], row by row (so a row never depends on its batch); a non-finite
        half-precision decode is redone in float32 and logged (the black images SD tools are known for)."""
        try:
            return torch.cat([self._decode_row(x[i : i + 1]) for i in range(len(x))])
        except torch.OutOfMemoryError:
            raise MemoryError(
                "the VAE decode ran out of device memory: pass --vae-tiling (and --attention-slicing), "
                "or a smaller --width/--height"
            ) from None

    def _decode_row(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False) and self.xl
        image = _vae_decode(vae, z, torch.float32 if upcast else vae.dtype)
        if not torch.isfinite(image).all() and vae.dtype != torch.float32:
            log.warning("VAE decode in %s gave non-finite values: redone in float32", vae.dtype)
            image = _vae_decode(vae, z, torch.float32)
        return image.float()


def _name_final_layer_norm(text_encoder: Any) -> None:
    """diffusers' SD 1/2 `encode_prompt(clip_skip=...)` reads `text_encoder.text_model.final_layer_norm`, where
    transformers 4 kept it; transformers 5's CLIPTextModel holds `final_layer_norm` itself, so clip skip fails
    with an AttributeError. Give diffusers the name it reads, as a plain attribute (no second registered module,
    so state dicts and hashes are unchanged)."""
    if text_encoder is not None and "text_model" not in dir(text_encoder) and hasattr(text_encoder, "final_layer_norm"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


def _vae_decode(vae: Any, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`vae.decode(z / scaling_factor)` in `dtype`, leaving the VAE in its own dtype afterwards."""
    own = vae.dtype
    if dtype != own:
        vae.to(dtype=dtype)
    try:
        with torch.inference_mode():
            return vae.decode((z / vae.config.scaling_factor).to(dtype), return_dict=False)[0]
    finally:
        if dtype != own:
            vae.to(dtype=own)


def _literal(text: str) -> str:
    r"""A prompt with its escaped brackets (\( \) \[ \]) made literal, as the web UIs read them."""
    return re.sub(r"\\([()\[\]])", r"\1", text)
