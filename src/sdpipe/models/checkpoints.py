"""Single .safetensors files, told apart by their header keys: web-UI checkpoints, LoRAs, and what is refused.

A checkpoint's architecture is diffusers' own reading of its keys and shapes (`infer_diffusers_model_type`, the
function `from_single_file` uses to pick a config), run on "meta" tensors built from the header: shapes without
data, so nothing but the header is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sdpipe.models.files import (
    UNET_PREFIX,
    ComponentInfo,
    Identity,
    ModelFileError,
    TensorInfo,
    component_from,
    dtype_name,
    file_identity,
    key_prefixes,
)

# key prefix -> (component, the diffusers/transformers class it converts to); the first match wins
CHECKPOINT_FAMILIES = (
    (UNET_PREFIX, "unet", "UNet2DConditionModel"),
    ("first_stage_model.", "vae", "AutoencoderKL"),
    ("cond_stage_model.", "text_encoder", "CLIPTextModel"),
    ("conditioner.embedders.0.transformer.", "text_encoder", "CLIPTextModel"),
    ("conditioner.embedders.1.model.", "text_encoder_2", "CLIPTextModelWithProjection"),
    ("conditioner.embedders.0.model.", "text_encoder_2", "CLIPTextModelWithProjection"),  # the XL refiner's only one
)
# infer_diffusers_model_type's answer -> sdpipe's architecture name; any other answer is refused
ARCHITECTURES = {
    "v1": "sd1",
    "v2": "sd2",
    "inpainting": "sd1-inpaint",
    "inpainting_v2": "sd2-inpaint",
    "xl_base": "sdxl",
    "xl_inpaint": "sdxl-inpaint",
    "xl_refiner": "sdxl-refiner",
}
_V1_MARKER = "model.diffusion_model.output_blocks.11.0.skip_connection.weight"  # diffusers' "v1" key
EXPECTED_TEXT_ENCODERS = {"sdxl": ("text_encoder", "text_encoder_2"), "sdxl-refiner": ("text_encoder_2",)}
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.")
LYCORIS_MARKERS = (".hada_w1_a", ".lokr_w1")
LORA_DOWN_SUFFIXES = ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "lora.down.weight")
# a LoRA key prefix -> the component it adapts
LORA_FAMILIES = (
    ("lora_unet_", "unet"),
    ("unet.", "unet"),
    ("lora_te2_", "text_encoder_2"),
    ("text_encoder_2.", "text_encoder_2"),
    ("lora_te_", "text_encoder"),
    ("lora_te1_", "text_encoder"),
    ("text_encoder.", "text_encoder"),
)
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the cross-attention input of each UNet
TEXT_DIMS = {768: "sd1", 1024: "sd2"}  # the first text encoder's width
VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")


# --- web-UI checkpoints -----------------------------------------------------------------------------------------


def identify_checkpoint(
    path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str], *, with_hash: bool
) -> Identity:
    """The Identity of a single-file checkpoint (it has model.diffusion_model.* keys): sd1, sd2, sdxl, their
    inpainting variants or the XL refiner; other diffusers model types (SD3, upscaler, ...) are refused."""
    model_type = diffusers_model_type(path, tensors)
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        raise ModelFileError(
            f"{path} is a {model_type!r} checkpoint (diffusers' name for it): expected a Stable Diffusion 1.x, "
            "2.x or XL checkpoint"
        )
    notes = []
    if model_type == "v1" and _V1_MARKER not in tensors:
        notes.append("none of diffusers' architecture markers were found; sd1 assumed (its fallback)")
    prediction = _prediction_type(architecture, tensors, metadata, notes)
    components = _checkpoint_components(architecture, tensors, notes)
    return file_identity(
        path,
        "sd-single-file",
        with_hash=with_hash,
        architecture=architecture,
        prediction_type=prediction,
        components=components,
        notes=tuple(notes),
    )


def diffusers_model_type(path: Path, tensors: dict[str, TensorInfo]) -> str:
    """diffusers' `infer_diffusers_model_type` on the header's keys and shapes, as meta tensors (no data)."""
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    def meta(info: TensorInfo) -> torch.Tensor:
        return torch.empty(info.shape, dtype=getattr(torch, dtype_name(info.dtype), torch.float32), device="meta")

    checkpoint = {name: meta(info) for name, info in tensors.items()}
    try:
        return str(infer_diffusers_model_type(checkpoint))
    except Exception as exc:  # diffusers indexes keys its rules expect; odd files can miss them
        raise ModelFileError(
            f"{path}: diffusers cannot tell which model this checkpoint is ({type(exc).__name__}: {exc}); "
            "expected a Stable Diffusion 1.x, 2.x or XL checkpoint"
        ) from None


def _prediction_type(
    architecture: str, tensors: dict[str, TensorInfo], metadata: dict[str, str], notes: list[str]
) -> str:
    """epsilon, unless the file says otherwise (Stability's ModelSpec metadata: prediction_type `v`/`epsilon`, or an
    architecture id ending 768-v / v2-512; a `v_pred` key) or it is SD 2.x (assumed 768-v, as diffusers does)."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "epsilon", "eps"):
        prediction = "epsilon" if spec.startswith("eps") else "v_prediction"
        notes.append(f"prediction type {prediction} from the file's modelspec.prediction_type metadata")
        return prediction
    spec_architecture = metadata.get("modelspec.architecture", "")  # e.g. stable-diffusion-v2-768-v, -v2-512
    if "768-v" in spec_architecture or "v2-512" in spec_architecture:
        prediction = "v_prediction" if "768-v" in spec_architecture else "epsilon"
        notes.append(f"prediction type {prediction} from the file's modelspec.architecture {spec_architecture}")
        return prediction
    if "v_pred" in tensors:
        notes.append("prediction type v_prediction: the file has a v_pred key, as v-prediction fine-tunes mark it")
        return "v_prediction"
    if architecture == "sd2":
        notes.append(
            "prediction type v_prediction assumed: SD 2.x files do not record it, and diffusers maps them to the "
            "768-v model (stable-diffusion-2-1); a 512 SD 2.x base model is epsilon (--config sd2-base)"
        )
        return "v_prediction"
    return "epsilon"


def _checkpoint_components(
    architecture: str, tensors: dict[str, TensorInfo], notes: list[str]
) -> tuple[ComponentInfo, ...]:
    """The key families as components, in the order unet, vae, text encoders, then any other tensors."""
    groups: dict[tuple[str, str], list[TensorInfo]] = {(n, c): [] for _, n, c in CHECKPOINT_FAMILIES}
    other: list[str] = []
    for key, info in tensors.items():
        family = next(((n, c) for prefix, n, c in CHECKPOINT_FAMILIES if key.startswith(prefix)), None)
        if family is None:
            other.append(key)
        else:
            groups[family].append(info)
    components = [component_from(n, c, ts) for (n, c), ts in groups.items() if ts]
    if other:
        components.append(component_from("other", "", [tensors[k] for k in other]))
        notes.append(f"tensors outside the model's components: {key_prefixes(other, depth=1)}")
    present = {c.name for c in components}
    for wanted in ("vae", *EXPECTED_TEXT_ENCODERS.get(architecture.removesuffix("-inpaint"), ("text_encoder",))):
        if wanted not in present:
            notes.append(f"the file has no {wanted} weights: one must be given separately to load it")
    for prefix in CLIP_PREFIXES:
        keys = [k for k in tensors if k.startswith(prefix)]
        if keys and not any(k.startswith(prefix + "text_model.") for k in keys):
            notes.append(f"its {prefix}* keys lack 'text_model.': diffusers' from_single_file will not see a CLIP")
    return tuple(components)


# --- LoRAs ------------------------------------------------------------------------------------------------------


def is_lora(keys: Iterable[str]) -> bool:
    """Whether any key is a LoRA's: kohya (lora_unet_*, lora_te*_*), diffusers/peft (lora_A/lora_B, lora.down),
    or LyCORIS (LoHa, LoKr)."""
    markers = LORA_MARKERS + LYCORIS_MARKERS
    return any(k.startswith(KOHYA_PREFIXES) or any(m in k for m in markers) for k in keys)


def identify_lora_file(
    path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str], *, with_hash: bool
) -> Identity:
    """The Identity of a LoRA file: its adapted components, key format and rank in the notes, and the
    architecture it looks made for ("unknown" when nothing in it says)."""
    keys = list(tensors)
    architecture, reason = lora_architecture(tensors, metadata)
    # format and rank first: a refusal of the LoRA as a model quotes notes[:2]
    notes = [lora_format(keys), _rank_text(lora_ranks(tensors)), f"made for {architecture}: {reason}"]
    if "ss_network_alpha" in metadata:
        notes.append(f"network alpha {metadata['ss_network_alpha']} (kohya metadata)")
    groups: dict[str, list[TensorInfo]] = {}
    for key, info in tensors.items():
        name = next((n for prefix, n in LORA_FAMILIES if key.startswith(prefix)), "unet" if "lora" in key else "other")
        groups.setdefault(name, []).append(info)
    order = ["unet", "text_encoder", "text_encoder_2", "other"]
    components = tuple(component_from(n, "LoRA", groups[n]) for n in order if n in groups)
    return file_identity(
        path, "lora", with_hash=with_hash, architecture=architecture, prediction_type=None,
        components=components, notes=tuple(notes),
    )  # fmt: skip


def lora_format(keys: list[str]) -> str:
    """Which LoRA key family the file uses, e.g. 'kohya keys lora_unet_*, lora_te_*'."""
    kohya = [p for p in KOHYA_PREFIXES if any(k.startswith(p) for k in keys)]
    if kohya:
        found = "kohya keys " + ", ".join(p + "*" for p in kohya)
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        found = "diffusers/peft keys *.lora_A.*, *.lora_B.*"
    elif any(".lora.down." in k or "_lora.down." in k for k in keys):
        found = "diffusers attention-processor keys *.lora.down.*, *.lora.up.*"
    else:
        found = "keys *.lora_down.*, *.lora_up.*"
    if any(m in k for k in keys for m in LYCORIS_MARKERS):
        found += " (LyCORIS LoHa/LoKr)"
    return found


def lora_ranks(tensors: dict[str, TensorInfo]) -> list[int]:
    """The distinct ranks of the LoRA's down matrices (their first dimension), smallest first."""
    return sorted({t.shape[0] for k, t in tensors.items() if k.endswith(LORA_DOWN_SUFFIXES) and t.shape})


def _rank_text(ranks: list[int]) -> str:
    if not ranks:
        return "rank unknown"
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"


def lora_architecture(tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> tuple[str, str]:
    """(architecture, why): from the width its cross-attention keys take (768 sd1, 1024 sd2, 2048 sdxl), a second
    text encoder or SGM-named UNet keys (sdxl), the text encoder's width, then the trainer's metadata."""
    downs = {k: t for k, t in tensors.items() if k.endswith(LORA_DOWN_SUFFIXES) and len(t.shape) >= 2}
    context = {t.shape[1] for k, t in downs.items() if "attn2" in k and ("to_k" in k or "to_v" in k)}
    for dim in sorted(context, reverse=True):
        if dim in CONTEXT_DIMS:
            return CONTEXT_DIMS[dim], f"its cross-attention keys take {dim}-wide text embeddings"
    keys = list(tensors)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "it has keys for a second text encoder"
    if any(k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k) for k in keys):
        return "sdxl", "its UNet keys use SGM names (input_blocks), as kohya writes them for SDXL"
    text = {t.shape[1] for k, t in downs.items() if k.startswith(("lora_te_", "text_encoder.")) and "q_proj" in k}
    for dim in sorted(text):
        if dim in TEXT_DIMS:
            return TEXT_DIMS[dim], f"its text-encoder keys are {dim} wide"
    return _architecture_from_metadata(metadata)


def _architecture_from_metadata(metadata: dict[str, str]) -> tuple[str, str]:
    for field in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field, "").lower()
        for marker, architecture in (("xl", "sdxl"), ("v2", "sd2"), ("v1", "sd1")):
            if marker in value:
                return architecture, f"its metadata says {field}={metadata[field]}"
    return "unknown", "nothing in its keys or metadata says"


# --- files refused as models ------------------------------------------------------------------------------------


def refuse_non_model(path: Path, keys: list[str]) -> str:
    """The message for a safetensors file that is neither a checkpoint nor a LoRA: what it looks like instead."""
    expected = (
        "expected a Stable Diffusion checkpoint (model.diffusion_model.* keys) or a diffusers pipeline folder "
        "(model_index.json)"
    )
    if not keys:
        return f"{path} holds no tensors: {expected}"
    if is_vae(keys):
        return (
            f"{path} is a VAE alone (AutoencoderKL keys {key_prefixes(keys, depth=1)}), not a model: {expected}; "
            "a VAE can be given with --vae beside a model"
        )
    if any(k.startswith("time_embedding.") for k in keys) and any(k.startswith("down_blocks.") for k in keys):
        return f"{path} holds a diffusers UNet's weights alone, not a whole model: {expected}"
    return f"{path} is not a model sdpipe knows: its keys start {key_prefixes(keys)}; {expected}, or a LoRA (--lora)"


def is_vae(keys: list[str]) -> bool:
    """An autoencoder's weights alone: (nearly) all keys encoder.*/decoder.*/quant_conv.*, with a decoder."""
    in_vae = sum(k.startswith(VAE_PREFIXES) for k in keys)
    has_decoder = any(k.startswith(("decoder.", "first_stage_model.decoder.")) for k in keys)
    return has_decoder and in_vae >= 0.9 * len(keys)
