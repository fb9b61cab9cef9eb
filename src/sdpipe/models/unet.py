"""Build a diffusers `UNet2DModel` from the typed model config."""

from __future__ import annotations

import math

from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from sdpipe.config import ModelConfig


def timestep_freq_shift(half: int, max_frequency: float) -> int:
    """The `freq_shift` of diffusers' sinusoidal timestep embedding (`half` sine/cosine pairs) whose
    frequencies run from 1 up to about `max_frequency`; 0 (diffusers' default) for `max_frequency` 1.

    The embedding's frequencies are 10000 ** (-i / (half - freq_shift)) for i < half: with the default shift
    0 they fall from 1 to 1e-4, made for integer timesteps 0..999. A shift beyond `half` turns the exponent's
    sign, so they rise from 1 to 10000 ** ((half - 1) / (freq_shift - half)). The shift is a field of the
    UNet's config.json, so vanilla diffusers builds the same embedding."""
    if max_frequency == 1.0:
        return 0
    if max_frequency < 1.0:
        raise ValueError(f"max_frequency {max_frequency} must be at least 1")
    return half + round((half - 1) * math.log(10000) / math.log(max_frequency))


def block_types(cfg: ModelConfig, attention: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """diffusers' down and up block names, with `attention` ("Attn", or "CrossAttn" for text) at the levels
    `attention_levels` lists."""
    levels = range(len(cfg.block_out_channels))
    down = tuple(f"{attention}DownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple(f"{attention}UpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
    return down, up


def build_unet(
    cfg: ModelConfig, *, sample_size: int, channels: int, num_classes: int | None, max_time_frequency: float = 1.0
) -> UNet2DModel:
    """A class-conditional UNet when `num_classes` is given: `num_class_embeds = num_classes + 1`, the
    last index being the null (unconditional) label used for classifier-free guidance. `max_time_frequency`
    is the timestep embedding's highest frequency (see `timestep_freq_shift`), set by the training recipe
    to suit the range of the timesteps the network is given."""
    down, up = block_types(cfg, "Attn")
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
        num_class_embeds=None if num_classes is None else num_classes + 1,
        freq_shift=timestep_freq_shift(cfg.block_out_channels[0] // 2, max_time_frequency),
    )


def build_text_unet(
    cfg: ModelConfig, *, sample_size: int, channels: int, cross_attention_dim: int, addition_embed: int | None = None
) -> UNet2DConditionModel:
    """A new text-conditioned UNet (`train.method: scratch`): cross-attention in the blocks `attention_levels`
    lists (and the middle block), on `channels`-channel latents of side `sample_size`. With `addition_embed`
    (the pooled text embedding's width), SDXL's added text and size conditioning."""
    down, up = block_types(cfg, "CrossAttn")
    extra: dict = {}
    if addition_embed is not None:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": addition_embed + 6 * 8,
        }
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        cross_attention_dim=cross_attention_dim,
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
        **extra,
    )
