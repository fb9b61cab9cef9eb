"""Small Stable Diffusion components for training from scratch where no pretrained ones fit (the shapes
demo): CLIP's tokenizer as sdpipe ships it, a small randomly initialised CLIP text encoder, a VAE the caller
trained, a placeholder UNet (`train.method: scratch` replaces it) and a scheduler, saved as an ordinary
diffusers pipeline folder that `model.pretrained` can name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def small_text_encoder(tokenizer: Any, width: int = 64, layers: int = 2, seed: int = 0) -> Any:
    """A randomly initialised `CLIPTextModel` for `tokenizer`'s vocabulary (frozen in training: its random
    features still tell the words and their order apart, and the UNet's cross-attention learns to read them)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def small_vae(channels: tuple[int, ...] = (16, 32), latent_channels: int = 4, seed: int = 0) -> Any:
    """An untrained `AutoencoderKL`; `len(channels) - 1` halvings (32x32 images -> 16x16 latents for two)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=list(channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, channels[0]),
    )


def save_components(folder: Path, vae: Any, text_width: int = 64, text_layers: int = 2, seed: int = 0) -> Path:
    """A diffusers StableDiffusionPipeline folder holding `vae`, CLIP's tokenizer, a new small text encoder,
    SD 1.5's scheduler config and a placeholder UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from sdpipe.models.single_file_configs import clip_tokenizer, config_folder

    tokenizer = clip_tokenizer("sd15")
    text_encoder = small_text_encoder(tokenizer, text_width, text_layers, seed)
    scheduler = DDPMScheduler.from_pretrained(config_folder("sd15") / "scheduler", local_files_only=True)
    unet = UNet2DConditionModel(  # a placeholder: train.method=scratch builds the real one
        sample_size=8,
        in_channels=int(vae.config.latent_channels),
        out_channels=int(vae.config.latent_channels),
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
    return folder
