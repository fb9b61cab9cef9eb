"""Offline tiny Stable Diffusion models with random weights, for tests of sdpipe's SD support.

Nothing here touches the network: the tokenizer is built from bytes (diffusers' own tests download
`hf-internal-testing/tiny-random-clip` instead), weights are random but fixed by the seed, and each folder loads
back with the vanilla `<Pipeline>.from_pretrained(folder, local_files_only=True)`.

- `tiny_pipeline(kind, folder)`: a diffusers folder in diffusers' dummy shapes (2-level UNet, 2-level VAE, so
  `vae_scale_factor` is 2); 2 steps at 64x64 take about 0.3 s of one CPU thread (see `torch_threads`).
- `tiny_single_file(kind, folder_or_file)`: the same kind in the real LDM layout (4-level SD UNet / 3-level SDXL
  UNet, 4-level VAE) exported to ONE web-UI `.safetensors` with LDM key names, beside its diffusers folder and a
  JSON-only config folder (what sdpipe ships in `sdpipe/models/configs/` for real checkpoints).
- pytest fixtures (session-scoped, built once): `sd1_pipeline`, `sd2v_pipeline`, `sdxl_pipeline`,
  `sd1_inpaint_pipeline`, `sdxl_inpaint_pipeline`, `sd1_single_file`, `sdxl_single_file`; and `offline`, which sets
  `HF_HUB_OFFLINE=1` and fails the test if anything opens a non-loopback socket. Each is built once per session
  even when several modules import it (pytest alone would build it again for every importing module).

Use from a test module with `from sd_fixtures import sd1_pipeline, offline  # noqa: F401` (pytest finds fixtures
imported into a module), or `pytest_plugins = ["sd_fixtures"]` in a conftest.

diffusers/transformers quirks this works around (diffusers 0.42, transformers 5.x):
- transformers 5's `CLIPTokenizer` takes `vocab=`/`merges=`; `vocab_file=`/`merges_file=` are silently ignored
  (a 2-token vocabulary, every id unknown). Without `model_max_length=77` it is 1e30 and the pipelines break.
- transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` prefix, and `from_single_file` only
  recognises CLIP under `cond_stage_model.transformer.text_model.`, so the export re-adds it.
- `from_single_file` picks the checkpoint part for each text encoder by key name *and width*: SDXL's first
  encoder is found under `conditioner.embedders.0.transformer.` only if its width differs from the second's, so
  the two tiny SDXL encoders have different widths (as the real 768 and 1280 do).
- A component that `from_single_file` does not find in the checkpoint is silently loaded from `config=`'s folder
  if that holds weights, and missing UNet/VAE keys stay on the meta device with only a log line. The round-trip
  test therefore uses the JSON-only config folder and checks for meta tensors.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from sdpipe.models.single_file_configs import bytes_to_unicode

KINDS: tuple[str, ...] = ("sd1", "sd2-v", "sdxl", "sd1-inpaint", "sdxl-inpaint")

PIPELINE_CLASSES: dict[str, str] = {
    "sd1": "StableDiffusionPipeline",
    "sd2-v": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}
"""The vanilla diffusers class that loads each kind."""

SHIPPED_CONFIG: dict[str, str] = {
    "sd1": "sd15",
    "sd2-v": "sd2-v",
    "sdxl": "sdxl-base",
    "sd1-inpaint": "sd15-inpaint",
    "sdxl-inpaint": "sdxl-inpaint",
}
"""The shipped real-model config whose scheduler each tiny kind uses (so `steps_offset`, `timestep_spacing` and
SD2's `v_prediction` are the real ones) and whose name `sdpipe` would pass for a single file of that kind."""

BYTE_VOCAB_SIZE = 514
BOS_ID, EOS_ID = 512, 513
"""The byte tokenizer's special ids; the tiny text encoders' configs carry the same ids, so CLIP's pooling (the
first eos position when `eos_token_id != 2`) picks the real end of the prompt."""
TE_VOCAB = 1000  # > 514, as in diffusers' dummy CLIPTextConfig

SD_SCALING, SDXL_SCALING = 0.18215, 0.13025


# --------------------------------------------------------------------------- tokenizer


def byte_tokenizer(folder: Path | str, pad_token: str = "<|endoftext|>") -> Any:
    """A CLIP tokenizer with no merges: every word becomes its characters, bos 512, eos 513.

    Writes `vocab.json` (256 byte characters, the same with `</w>`, `<|startoftext|>`, `<|endoftext|>`: 514 ids)
    and `merges.txt` (`#version: 0.2` only) into folder and returns a `CLIPTokenizer` built from them with
    `model_max_length=77`. `pad_token="!"` gives SD2/SDXL-`tokenizer_2`-style padding (id 0).
    """
    import transformers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    kwargs: dict[str, Any] = {"model_max_length": 77, "pad_token": pad_token}
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 ignores vocab_file=/merges_file= without a word; it wants the objects (or paths) here
        return CLIPTokenizer(vocab=vocab, merges=[], **kwargs)
    return CLIPTokenizer(str(vocab_file), str(merges_file), **kwargs)


# --------------------------------------------------------------------------- tiny components


def shipped_scheduler_config(kind: str) -> dict[str, Any]:
    """The real scheduler config (from sdpipe's shipped templates) that a tiny pipeline of `kind` uses."""
    path = resources.files("sdpipe.models") / "configs" / SHIPPED_CONFIG[kind] / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


def _unet_kwargs(kind: str, single_file: bool) -> dict[str, Any]:
    """UNet2DConditionModel arguments: diffusers' dummy shapes, or the LDM block layout when `single_file`."""
    xl = kind.startswith("sdxl")
    kw: dict[str, Any] = {"sample_size": 32, "in_channels": 9 if kind.endswith("inpaint") else 4, "out_channels": 4}
    if xl:
        te_widths = _te_widths(kind)
        kw |= {
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 size numbers x 8 + the pooled projection
            "cross_attention_dim": sum(te_widths),
        }
        if single_file:  # SDXL: 3 levels, the first without attention
            kw |= {
                "block_out_channels": (32, 64, 64),
                "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": (2, 4, 4),
                "transformer_layers_per_block": (1, 1, 2),
            }
        else:
            kw |= {
                "block_out_channels": (32, 64),
                "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": (2, 4),
                "transformer_layers_per_block": (1, 2),
            }
        return kw
    if kind == "sd2-v":
        kw |= {"use_linear_projection": True, "cross_attention_dim": 64}
        kw["attention_head_dim"] = (2, 2, 4, 4) if single_file else (2, 4)
    else:
        kw |= {"cross_attention_dim": 32}
    if single_file:  # SD 1/2: 4 levels, attention in all but the last
        kw |= {
            "block_out_channels": (32, 32, 64, 64),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        }
    else:
        kw |= {
            "block_out_channels": (32, 64),
            "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        }
    return kw


def _te_widths(kind: str) -> tuple[int, ...]:
    """Hidden sizes of the text encoders: SD1 32, SD2 64; SDXL 32 + 64 (they must differ, see the module doc)."""
    if kind.startswith("sdxl"):
        return (32, 64)
    return (64,) if kind == "sd2-v" else (32,)


def _text_config(width: int, layers: int, act: str, pad_id: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=pad_id,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        layer_norm_eps=1e-5,
        vocab_size=TE_VOCAB,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=32,
    )


def build_pipeline(kind: str, seed: int = 0, single_file: bool = False, tokenizer_dir: Path | None = None) -> Any:
    """The tiny pipeline object of `kind` (not saved). Weights depend only on seed: `torch.manual_seed(seed)` runs
    before each component, so one component's shape never shifts another's weights."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"unknown tiny kind {kind!r}; expected one of {KINDS}")
    xl = kind.startswith("sdxl")
    tokenizer_dir = tokenizer_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"sd-fixtures-tok-{os.getpid()}"

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**_unet_kwargs(kind, single_file))
    torch.manual_seed(seed)
    vae_channels = [32, 32, 64, 64] if single_file else [32, 64]
    vae = diffusers.AutoencoderKL(
        block_out_channels=vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        latent_channels=4,
        layers_per_block=2 if single_file else 1,
        sample_size=64,
        scaling_factor=SDXL_SCALING if xl else SD_SCALING,
        force_upcast=xl,
    )
    sched_cfg = shipped_scheduler_config(kind)
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)

    widths = _te_widths(kind)
    act = "gelu" if kind == "sd2-v" else "quick_gelu"
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(widths[0], 5, act, EOS_ID))
    tokenizer = byte_tokenizer(tokenizer_dir / "tokenizer", pad_token="!" if kind == "sd2-v" else "<|endoftext|>")
    parts: dict[str, Any] = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    if xl:
        torch.manual_seed(seed)
        # 10 layers: diffusers recognises an SDXL checkpoint by `...embedders.1.model.transformer.resblocks.9.*`
        parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(widths[1], 10, "gelu", 0))
        parts["tokenizer_2"] = byte_tokenizer(tokenizer_dir / "tokenizer_2", pad_token="!")
        extra: dict[str, Any] = {"add_watermarker": False}
    else:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    cls = getattr(diffusers, PIPELINE_CLASSES[kind])
    pipe = cls(scheduler=scheduler, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(kind: str, folder: Path | str, seed: int = 0, single_file: bool = False) -> Path:
    """Build the tiny pipeline of `kind` and save it as a diffusers folder (safetensors); return the folder.

    Load it with `PIPELINE_CLASSES[kind]`'s `from_pretrained(folder, local_files_only=True)`. `single_file=True`
    gives the LDM block layout that `tiny_single_file` exports.
    """
    folder = Path(folder)
    with no_network():
        pipe = build_pipeline(kind, seed, single_file, tokenizer_dir=folder.parent / f".{folder.name}.tok")
        pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder.parent / f".{folder.name}.tok", ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- diffusers -> LDM keys

_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_leaf(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_UNET_RESNET).get(head, head) + "." + tail


def unet_to_ldm(state: dict[str, Any], layers_per_block: int) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel state dict under LDM names (without the `model.diffusion_model.` prefix).

    The inverse of diffusers' `convert_ldm_unet_checkpoint`: `input_blocks.0` is conv_in; level b's layer j is
    `input_blocks.{1 + b*(L+1) + j}` (`.0` resnet, `.1` attention) and its downsampler `input_blocks.{1 + b*(L+1) +
    L}.0.op`; the middle block is resnet/attention/resnet; up level b's layer j is `output_blocks.{b*(L+1) + j}`,
    whose upsampler sits after the attention when the level has one (`.2.conv`) or after the resnet (`.1.conv`).
    """
    per = layers_per_block + 1
    up_with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        n = 1 if parts[0] in _UNET_TOP else 2  # conv_in.weight / time_embedding.linear_1.weight
        top = ".".join(parts[:n])
        if top in _UNET_TOP:
            new = _UNET_TOP[top] + "." + ".".join(parts[n:])
        elif parts[0] in ("down_blocks", "up_blocks"):
            b, sub = int(parts[1]), parts[2]
            rest = ".".join(parts[4:])
            if parts[0] == "down_blocks":
                if sub == "downsamplers":  # down_blocks.b.downsamplers.0.conv.X
                    new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{'.'.join(parts[5:])}"
                else:
                    j = int(parts[3])
                    idx = 1 + b * per + j
                    new = (
                        f"input_blocks.{idx}.0.{_resnet_leaf(rest)}"
                        if sub == "resnets"
                        else f"input_blocks.{idx}.1.{rest}"
                    )
            else:
                if sub == "upsamplers":  # up_blocks.b.upsamplers.0.conv.X
                    slot = 2 if b in up_with_attention else 1
                    new = f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{'.'.join(parts[5:])}"
                else:
                    j = int(parts[3])
                    idx = b * per + j
                    new = (
                        f"output_blocks.{idx}.0.{_resnet_leaf(rest)}"
                        if sub == "resnets"
                        else f"output_blocks.{idx}.1.{rest}"
                    )
        elif parts[0] == "mid_block":
            sub, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_resnet_leaf(rest)}" if sub == "resnets" else f"middle_block.1.{rest}"
        else:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(state: dict[str, Any], n_levels: int) -> dict[str, Any]:
    """A diffusers AutoencoderKL state dict under LDM names (without `first_stage_model.`).

    The inverse of `convert_ldm_vae_checkpoint`: `down_blocks.i.resnets.j` -> `down.i.block.j`, decoder
    `up_blocks.i` -> `up.{n-1-i}` (LDM counts up levels from the bottom), `mid_block.resnets.k` -> `mid.block_{k+1}`,
    `conv_shortcut` -> `nin_shortcut`, and the mid attention as 1x1 convolutions (`q/k/v/proj_out`, 4-D weights).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        half = parts[0]
        if half in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        rest = parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            new = key
        elif rest[0] == "conv_norm_out":
            new = f"{half}.norm_out.{rest[1]}"
        elif rest[0] in ("down_blocks", "up_blocks"):
            i = int(rest[1])
            level, word = (i, "down") if rest[0] == "down_blocks" else (n_levels - 1 - i, "up")
            if rest[2] == "resnets":
                leaf = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{half}.{word}.{level}.block.{rest[3]}.{leaf}"
            else:  # downsamplers.0.conv.X / upsamplers.0.conv.X
                new = f"{half}.{word}.{level}.{word}sample.conv.{rest[-1]}"
        elif rest[0] == "mid_block":
            if rest[1] == "resnets":
                leaf = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{half}.mid.block_{int(rest[2]) + 1}.{leaf}"
            else:  # mid_block.attentions.0.<name>[.0].<weight|bias>
                new = f"{half}.mid.attn_1.{_VAE_ATTN[rest[3]]}.{rest[-1]}"
                if rest[-1] == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        out[new] = value
    return out


def clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An OpenAI-CLIP text encoder (SD1, SDXL's first) as LDM keys: `prefix + "text_model." + key`.

    transformers >= 5.6 saves `CLIPTextModel` without `text_model.`; `from_single_file` recognises CLIP only with
    it, so it is added back when missing.
    """
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An OpenCLIP text encoder (SD2's, SDXL's second) in open_clip's own naming under prefix.

    The inverse of `convert_open_clip_checkpoint`: q/k/v projections concatenated into `attn.in_proj_*`,
    `layer_norm1/2` -> `ln_1/2`, `fc1/fc2` -> `c_fc/c_proj`, `position_embedding.weight` -> `positional_embedding`
    and `text_projection.weight` stored transposed as the bare tensor `text_projection` (open_clip computes x @ P).
    """
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, Any] = {}
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for key, value in state.items():
        if key in simple:
            out[prefix + simple[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif not key.startswith("encoder.layers."):
            raise KeyError(f"no open_clip name for text encoder key {key!r}")
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0).contiguous()
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def pipeline_to_ldm(pipe: Any) -> dict[str, Any]:
    """Every weight of an SD1/SD2/SDXL pipeline under web-UI (LDM) checkpoint names."""
    unet, vae = pipe.unet, pipe.vae
    ckpt = {
        "model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()
    }
    ckpt |= {
        "first_stage_model." + k: v for k, v in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()
    }
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        ckpt |= clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        ckpt |= open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    elif pipe.text_encoder.config.hidden_act == "gelu":  # SD2: OpenCLIP ViT-H
        ckpt |= open_clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.model.")
    else:
        ckpt |= clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
    return ckpt


def single_file_folders(file: Path | str) -> tuple[Path, Path]:
    """The two folders `tiny_single_file` keeps beside `NAME.safetensors`: `NAME.diffusers/` (the same weights
    in diffusers format, for `from_pretrained` comparisons) and `NAME.config/` (its JSON and tokenizer files only,
    no weights: pass it as `config=`, as sdpipe passes its shipped configs)."""
    file = Path(file)
    stem = file.with_suffix("")
    return stem.with_name(stem.name + ".diffusers"), stem.with_name(stem.name + ".config")


def tiny_single_file(kind: str, folder_or_file: Path | str, seed: int = 0) -> Path:
    """Export the LDM-layout tiny `kind` to one web-UI `.safetensors` and return its path.

    `folder_or_file` is either the target `.safetensors` path or a folder (then `tiny-<kind>.safetensors` in
    it). The file loads with `<Pipeline>.from_single_file(file, config=<either folder of single_file_folders>,
    local_files_only=True)` to the very weights of the diffusers folder.
    """
    from safetensors.torch import save_file

    target = Path(folder_or_file)
    file = target if target.suffix == ".safetensors" else target / f"tiny-{kind}.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    diffusers_dir, config_dir = single_file_folders(file)
    with no_network():
        pipe = build_pipeline(kind, seed, single_file=True, tokenizer_dir=file.parent / f".{file.stem}.tok")
        pipe.save_pretrained(diffusers_dir, safe_serialization=True)
        ckpt = {k: v.detach().contiguous() for k, v in pipeline_to_ldm(pipe).items()}
        save_file(ckpt, str(file), metadata={"format": "pt"})
    shutil.rmtree(file.parent / f".{file.stem}.tok", ignore_errors=True)
    shutil.rmtree(config_dir, ignore_errors=True)
    shutil.copytree(diffusers_dir, config_dir, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return file


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads, then restore the previous count.

    On a shared, loaded CPU, tiny models spend most of their time waiting for OpenMP threads that the other
    processes crowd out: the fixture tests ran 10x slower (wall) with 2 threads than with 1 on a 2-core box with
    load 5. Test modules of tiny models may wrap themselves in `torch_threads(1)`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- network guard


def _is_loopback(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def no_network(attempts: list[str] | None = None) -> Iterator[list[str]]:
    """Refuse every socket connection except Unix sockets and loopback, recording each attempt.

    Patches `socket.socket.connect`/`connect_ex`, which `socket.create_connection`, urllib3 and httpx all reach.
    The refusal is an `OSError`, which libraries may swallow (huggingface_hub retries or falls back to its cache),
    hence the returned list, which callers check afterwards.
    """
    seen = attempts if attempts is not None else []
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            seen.append(repr(address))
            raise OSError(f"sd_fixtures: network access refused (connect to {address!r})")

    def connect(sock: socket.socket, address: Any) -> None:
        guard(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        guard(sock, address)
        return original_connect_ex(sock, address)

    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
    try:
        yield seen
    finally:
        socket.socket.connect, socket.socket.connect_ex = original_connect, original_connect_ex  # type: ignore[method-assign]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """HF offline mode plus a socket guard; the test fails if anything tried a non-loopback connection.

    `HF_HUB_OFFLINE` is read once, when huggingface_hub is imported, so the already-imported constant is patched
    too. Yields the list of refused addresses (empty in a passing test).
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with no_network() as attempts:
        yield attempts
    if attempts:
        pytest.fail(f"the test tried the network: {', '.join(attempts)}")


# --------------------------------------------------------------------------- session fixtures

_BUILT: dict[str, Path] = {}
"""What the session fixtures built, by name. pytest keeps a separate cache for a fixture in every module that
imports it (`from sd_fixtures import sd1_pipeline` in two modules builds twice), so the builds are memoised here
and every importing module of the session gets the same folder."""


def _once(name: str, factory: pytest.TempPathFactory, make: Callable[[Path], Path]) -> Path:
    path = _BUILT.get(name)
    if path is None or not path.exists():
        path = _BUILT[name] = make(factory.mktemp(name))
    return path


@pytest.fixture(scope="session")
def sd1_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-shaped diffusers folder (StableDiffusionPipeline, PNDM as SD 1.5, cross-attention 32)."""
    return _once("sd1", tmp_path_factory, lambda d: tiny_pipeline("sd1", d / "pipeline"))


@pytest.fixture(scope="session")
def sd2v_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2-768-v-shaped folder (v_prediction DDIM as SD 2, linear projections, cross-attention 64)."""
    return _once("sd2v", tmp_path_factory, lambda d: tiny_pipeline("sd2-v", d / "pipeline"))


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-shaped folder (two text encoders, text_time embedding, Euler as SDXL base)."""
    return _once("sdxl", tmp_path_factory, lambda d: tiny_pipeline("sdxl", d / "pipeline"))


@pytest.fixture(scope="session")
def sd1_inpaint_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1 inpainting folder (StableDiffusionInpaintPipeline, 9-channel UNet, DDIM as SD 1.5 inpainting)."""
    return _once("sd1inpaint", tmp_path_factory, lambda d: tiny_pipeline("sd1-inpaint", d / "pipeline"))


@pytest.fixture(scope="session")
def sdxl_inpaint_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL inpainting folder (StableDiffusionXLInpaintPipeline, 9-channel UNet)."""
    return _once("sdxlinpaint", tmp_path_factory, lambda d: tiny_pipeline("sdxl-inpaint", d / "pipeline"))


@pytest.fixture(scope="session")
def sd1_single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-sd1.safetensors`, a 4-level SD1 web-UI checkpoint; `single_file_folders(path)` gives its folders."""
    return _once("sd1file", tmp_path_factory, lambda d: tiny_single_file("sd1", d))


@pytest.fixture(scope="session")
def sd2v_single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-sd2-v.safetensors`, a 4-level SD2-v web-UI checkpoint (OpenCLIP-named text encoder)."""
    return _once("sd2vfile", tmp_path_factory, lambda d: tiny_single_file("sd2-v", d))


@pytest.fixture(scope="session")
def sdxl_single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-sdxl.safetensors`, a 3-level SDXL web-UI checkpoint (open_clip-named second encoder)."""
    return _once("sdxlfile", tmp_path_factory, lambda d: tiny_single_file("sdxl", d))
