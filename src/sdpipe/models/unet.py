"""Build a diffusers `UNet2DModel` from the typed model config."""

from __future__ import annotations

from diffusers.models.unets.unet_2d import UNet2DModel

from sdpipe.config import ModelConfig


def build_unet(cfg: ModelConfig, *, sample_size: int, channels: int, num_classes: int | None) -> UNet2DModel:
    """A class-conditional UNet when `num_classes` is given: `num_class_embeds = num_classes + 1`, the
    last index being the null (unconditional) label used for classifier-free guidance."""
    levels = range(len(cfg.block_out_channels))
    down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in levels)
    up = tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(levels))
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
    )
