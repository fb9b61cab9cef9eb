"""Model folders: diffusers Stable Diffusion pipelines (model_index.json) and sdpipe's pixel-class models
(sdpipe.json without "kind"), read from their JSON files and safetensors headers only."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdpipe.models import hashes
from sdpipe.models.files import (
    PICKLE_SUFFIXES,
    ComponentInfo,
    Identity,
    ModelFileError,
    TensorInfo,
    component_from,
    pickle_message,
    read_safetensors_header,
)

PIPELINE_CLASSES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
# the components sdpipe loads; others (safety_checker, feature_extractor, image_encoder) may be missing or pickled
CORE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")  # the ones with a config.json and weights
PIXEL_PARTS = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json")
_SHARD = re.compile(r"-\d+-of-\d+$")


def identify_folder(folder: Path, *, with_hash: bool) -> Identity:
    """A diffusers pipeline folder or a pixel-class model folder; any other folder is refused by what it holds."""
    if (folder / "model_index.json").is_file():
        return identify_pipeline(folder, with_hash=with_hash)
    if (folder / "sdpipe.json").is_file():
        meta = read_json(folder / "sdpipe.json")
        if meta.get("kind") == "lora":  # a LoRA training run's model: the base's identity, with a note
            base = identify_folder(Path(meta["base"]), with_hash=with_hash) if Path(meta["base"]).is_dir() else None
            if base is not None:
                note = f"a LoRA training run: base {meta['base']} with the LoRA {meta['lora']}"
                return replace(base, path=folder, notes=(*base.notes, note))
        if meta.get("kind") == "table":
            return identify_table(folder, meta, with_hash=with_hash)
        if "kind" in meta:
            raise ModelFileError(
                f"{folder}: its sdpipe.json is of kind {meta['kind']!r}, which this sdpipe cannot read"
            )
        return identify_pixel_class(folder, meta, with_hash=with_hash)
    if (folder / "config.json").is_file():
        raise ModelFileError(_component_folder(folder, read_json(folder / "config.json")))
    raise ModelFileError(
        f"{folder} is a folder without model_index.json or sdpipe.json: expected a diffusers Stable Diffusion "
        "pipeline folder, an sdpipe model folder or a .safetensors checkpoint"
    )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a ModelFileError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{path} cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} does not hold a JSON object")
    return data


def _component_folder(folder: Path, config: dict[str, Any]) -> str:
    cls = str(config.get("_class_name", "unknown"))
    expected = "expected a diffusers Stable Diffusion pipeline folder (with model_index.json) or a checkpoint"
    if cls.startswith("Autoencoder"):
        return f"{folder} is a VAE alone (a diffusers {cls} folder), not a model: {expected}; give a VAE with --vae"
    return f"{folder} is one diffusers component ({cls}), not a whole model: {expected}, such as the folder above it"


# --- diffusers pipelines ----------------------------------------------------------------------------------------


def identify_pipeline(folder: Path, *, with_hash: bool) -> Identity:
    """A diffusers SD 1.x/2.x/XL pipeline folder: components from model_index.json, each one's dtypes and
    parameters from its safetensors headers, the architecture from the UNet's config, the prediction type
    from the scheduler's. A core component missing, or with only pickle weights, is refused by name."""
    index = read_json(folder / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ModelFileError(
            f"{folder} is a diffusers {cls} folder: expected a Stable Diffusion pipeline "
            f"({', '.join(PIPELINE_CLASSES)})"
        )
    listed = {name: str(v[1]) for name, v in index.items() if not name.startswith("_") and _names_component(v)}
    if "unet" not in listed:
        raise ModelFileError(f"{folder / 'model_index.json'} lists no unet: expected a Stable Diffusion pipeline")
    notes: list[str] = []
    order = sorted(
        listed, key=lambda n: (CORE_COMPONENTS.index(n) if n in CORE_COMPONENTS else len(CORE_COMPONENTS), n)
    )
    found = [_component(folder, name, listed[name], notes) for name in order]
    components = tuple(c for c in found if c is not None)
    present = [c.name for c in components]
    architecture = pipeline_architecture(cls, read_json(folder / "unet" / "config.json"), present, notes)
    prediction = _scheduler_prediction(folder / "scheduler" / "scheduler_config.json", notes)
    files = [folder / "model_index.json"] + [
        folder / n / rel for n in present for rel in hashes.component_files(folder / n)
    ]
    sha = hashes.folder_sha256(folder, present) if with_hash else None
    return Identity(
        kind="sd-pipeline", path=folder, architecture=architecture, prediction_type=prediction, components=components,
        size_bytes=sum(f.stat().st_size for f in files), sha256=sha, short_hash=sha[:10] if sha else None,
        notes=tuple(notes),
    )  # fmt: skip


def _names_component(value: Any) -> bool:
    """model_index.json's [library, class] pair; [null, null] marks a component left out (safety_checker)."""
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value)


def _component(folder: Path, name: str, class_name: str, notes: list[str]) -> ComponentInfo | None:
    """One component's ComponentInfo; None (with a note) for a missing or pickled component sdpipe does not use."""
    sub = folder / name
    optional = name not in CORE_COMPONENTS
    if not sub.is_dir():
        if optional:
            notes.append(f"{name} is listed in model_index.json but has no folder; sdpipe does not use it")
            return None
        raise ModelFileError(f"{folder}: the {name}/ folder is missing (model_index.json lists {name} as {class_name})")
    if name in MODEL_COMPONENTS and not (sub / "config.json").is_file():
        raise ModelFileError(f"{folder}: component {name} ({class_name}) has no config.json")
    weights = sorted(sub.glob("*.safetensors"))
    pickles = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not weights:
        message = f"component {name} has only pickle weights: " + pickle_message(pickles[0], "by its name")
        if optional:
            notes.append(f"{message}; sdpipe does not use {name}")
            return None
        raise ModelFileError(f"{folder}: {message}")
    if pickles:
        notes.append(f"{name}: pickle files beside its safetensors are ignored ({', '.join(p.name for p in pickles)})")
    if not weights:
        if (sub / "config.json").is_file():  # a model without weights (tokenizers and schedulers have none)
            raise ModelFileError(
                f"{folder}: component {name} ({class_name}) has a config.json but no .safetensors weights"
            )
        return ComponentInfo(name, class_name, "", 0, 0)
    tensors: list[TensorInfo] = []
    for path in _default_variant(name, weights, notes):
        tensors.extend(read_safetensors_header(path)[0].values())
    return component_from(name, class_name, tensors)


def _variant(filename: str) -> str | None:
    """The variant of a weights file: 'fp16' for model.fp16.safetensors or x.fp16-00001-of-00002.safetensors."""
    parts = filename.split(".")
    return _SHARD.sub("", parts[-2]) if len(parts) >= 3 else None


def _default_variant(name: str, weights: list[Path], notes: list[str]) -> list[Path]:
    """The files from_pretrained loads by default (no variant); the only variant there is, with a note; else the
    first variant by name, with a note. Variants are counted once, not added up."""
    by_variant: dict[str | None, list[Path]] = {}
    for path in weights:
        by_variant.setdefault(_variant(path.name), []).append(path)
    chosen = None if None in by_variant else sorted(by_variant, key=str)[0]
    others = sorted(str(v) for v in by_variant if v != chosen)
    if chosen is not None:
        notes.append(f"{name}: only variant {chosen!r} weights, which load with variant={chosen!r}")
    if others:
        notes.append(f"{name}: also has {', '.join(others)} variant weights, not counted")
    return by_variant[chosen]


def pipeline_architecture(cls: str, unet_config: dict[str, Any], components: list[str], notes: list[str]) -> str:
    """sd1, sd2, sdxl or sdxl-refiner (+ "-inpaint" for a 9-channel UNet) from the UNet's config: text_time
    embedding -> XL; cross-attention width 768 -> 1.x, 1024 -> 2.x. Tiny test UNets fit none of these, so then the
    pipeline class, a second text encoder, and linear projections (SD 2.x's) decide, with a note saying so."""
    dim = unet_config.get("cross_attention_dim")
    if unet_config.get("addition_embed_type") == "text_time":
        base = "sdxl-refiner" if "text_encoder" not in components and "text_encoder_2" in components else "sdxl"
    elif dim in (768, 1024):
        base = "sd1" if dim == 768 else "sd2"
    else:
        base, reason = _guess_architecture(cls, unet_config, components)
        notes.append(
            f"architecture {base} assumed from {reason}: the UNet's cross_attention_dim {dim} is neither 768 (SD 1.x) "
            "nor 1024 (SD 2.x), and it has no text_time embedding (SD XL)"
        )
    in_channels = unet_config.get("in_channels")
    if "Inpaint" in cls and in_channels != 9:
        notes.append(f"an inpainting pipeline with a {in_channels}-channel UNet: it inpaints by blending latents")
    return base + ("-inpaint" if in_channels == 9 else "")


def _guess_architecture(cls: str, unet_config: dict[str, Any], components: list[str]) -> tuple[str, str]:
    if "XL" in cls or "text_encoder_2" in components:
        return "sdxl", f"the {cls} class" if "XL" in cls else "its second text encoder"
    if unet_config.get("use_linear_projection"):
        return "sd2", "the UNet's linear projections, which SD 2.x UNets have"
    return "sd1", f"the {cls} class with one text encoder and no linear projections"


def _scheduler_prediction(config_path: Path, notes: list[str]) -> str | None:
    if not config_path.is_file():
        notes.append("no scheduler/scheduler_config.json: prediction type unknown")
        return None
    prediction = read_json(config_path).get("prediction_type")
    if prediction is None:
        notes.append("the scheduler config has no prediction_type: epsilon, diffusers' default")
        return "epsilon"
    return str(prediction)


# --- sdpipe's pixel-class models --------------------------------------------------------------------------------


def identify_pixel_class(folder: Path, meta: dict[str, Any], *, with_hash: bool) -> Identity:
    """sdpipe's own format 1 model (unet/ + scheduler/ + sdpipe.json): its hash is sdpipe.json's weights_hash,
    as samples.jsonl and the registry record it."""
    for part in PIXEL_PARTS:
        if not (folder / part).is_file():
            raise ModelFileError(f"{folder} is not a complete sdpipe model: {part} is missing")
    unet_config = read_json(folder / "unet" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    tensors = read_safetensors_header(folder / "unet" / "diffusion_pytorch_model.safetensors")[0]
    components = (
        component_from("unet", str(unet_config.get("_class_name", "UNet2DModel")), list(tensors.values())),
        ComponentInfo("scheduler", str(scheduler.get("_class_name", "")), "", 0, 0),
    )
    notes = []
    if meta.get("class_names"):
        notes.append(f"class-conditional on {len(meta['class_names'])} labels")
    if "image_size" in meta:
        notes.append(f"{meta['image_size']}x{meta['image_size']} pixels, {meta.get('channels', '?')} channel(s)")
    parts = ["unet", "scheduler"]
    files = [folder / "sdpipe.json"] + [folder / n / rel for n in parts for rel in hashes.component_files(folder / n)]
    weights_hash = meta.get("weights_hash")
    return Identity(
        kind="pixel-class", path=folder, architecture="unet2d",
        prediction_type=str(scheduler.get("prediction_type", "epsilon")), components=components,
        size_bytes=sum(f.stat().st_size for f in files),
        sha256=hashes.folder_sha256(folder, parts) if with_hash else None,
        short_hash=str(weights_hash) if weights_hash else None, notes=tuple(notes),
    )  # fmt: skip


def identify_table(folder: Path, meta: dict[str, Any], *, with_hash: bool) -> Identity:
    """A table model (sdpipe.tabular: denoiser/, preprocess/, sdpipe.json of kind "table"): its hash is that
    of every file in the folder (`hashes.folder_sha256(folder, ["."])`, as `sdpipe.tabular.commands`)."""
    if not (folder / "denoiser" / "config.json").is_file():
        raise ModelFileError(f"{folder} is not a complete table model: denoiser/config.json is missing")
    files = [folder / rel for rel in hashes.component_files(folder)]
    sha = hashes.folder_sha256(folder, ["."]) if with_hash else None
    return Identity(
        kind="table", path=folder, architecture=f"table-mlp-{meta.get('categorical', 'masked')}",
        prediction_type=str(read_json(folder / "table_model.json").get("prediction_type", "epsilon")),
        components=(), size_bytes=sum(f.stat().st_size for f in files), sha256=sha,
        short_hash=sha[:16] if sha else None, notes=("a table model: rows, not images",),
    )  # fmt: skip


def lora_run(path: Path) -> tuple[Path, Path] | None:
    """(base, LoRA file) when `path` is the RUN/model of a LoRA training run (sdpipe.json of kind "lora")."""
    meta_file = path / "sdpipe.json"
    if not (path.is_dir() and meta_file.is_file()):
        return None
    meta = read_json(meta_file)
    if meta.get("kind") != "lora":
        return None
    base, lora = Path(meta["base"]), Path(meta["lora"])
    for what, p in (("base", base), ("LoRA", lora)):
        if not p.exists():
            raise ValueError(f"{meta_file}: its {what} {p} is not there any more; train again or restore it")
    return base, lora
