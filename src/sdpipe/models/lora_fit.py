"""Does a LoRA fit a base? Read from the safetensors header alone, before any tensor is loaded: the family
(sd1, sd2, sdxl), the components and modules it targets, their shapes against the base's, formats diffusers would
load wrongly (LoHa, LoKr, DoRA), and the base hash it records (a warning when it differs). Used by `--lora`,
the server and the registry; `sdpipe.models.lora` applies what fits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpipe.models import hashes
from sdpipe.models.files import TensorInfo, identify_lora, read_safetensors_header

log = logging.getLogger("sdpipe.models")
BASE_HASH_KEYS = ("sdpipe.base_hash", "ss_new_sd_model_hash", "ss_sd_model_hash")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class LoraError(ValueError):
    """A LoRA option or file sdpipe refuses (a user error): the message names the option or file and why."""


@dataclass(frozen=True)
class Fit:
    """What `check_fits` found for a LoRA that fits: the components it adapts and warnings for the caller."""

    components: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def touches_text_encoder(self) -> bool:
        return any(c in TEXT_ENCODERS for c in self.components)


def base_architecture(pipe: Any) -> str:
    """The base's architecture as `sdpipe models inspect` names it (sd1, sd2, sdxl, sdxl-refiner, + -inpaint),
    from the loaded pipeline's UNet config and text encoders."""
    from sdpipe.models.folders import pipeline_architecture

    present = [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
    return pipeline_architecture(type(pipe).__name__, dict(pipe.unet.config), present, [])


def recorded_base_hashes(path: str | Path) -> dict[str, str]:
    """The base-model hashes the LoRA's trainer wrote into its metadata (key -> value), from the header only."""
    _, metadata = read_safetensors_header(path)
    return {k: metadata[k] for k in BASE_HASH_KEYS if metadata.get(k, "").strip()}


def touches_text_encoder(path: str | Path) -> bool:
    """Whether the LoRA file has layers for a text encoder (kohya `lora_te*_`, diffusers `text_encoder[_2].`),
    from its header: such a LoRA changes prompt embeddings, so they must not be cached without it."""
    from sdpipe.models.checkpoints import LORA_FAMILIES

    tensors, _ = read_safetensors_header(path)
    families = {next((n for p, n in LORA_FAMILIES if k.startswith(p)), None) for k in tensors}
    return any(f in TEXT_ENCODERS for f in families)


def check_fits(base: Any, path: str | Path) -> Fit:
    """Refuse (LoraError) a LoRA that cannot apply to `base`, naming the LoRA (file, the architecture it looks made
    for, the base hash its metadata records) and the base (name, architecture, hash); else say what it adapts.

    `base` is a `LoadedPipeline` (its path and hash are named) or a bare diffusers pipeline. Refused: a LoRA of
    another family (an SDXL LoRA on SD1), one that adapts a component the base lacks (text_encoder_2 on SD1) or a
    module it lacks, a LoRA matrix whose input/output width differs from the module's, keys diffusers cannot read
    (LyCORIS LoHa/LoKr), DoRA (diffusers drops its magnitudes for SD pipelines, so the image would be wrong),
    and a file diffusers would load nothing from. Only the header is read: the check runs diffusers' own key
    conversion (`lora_state_dict`, the peft renames) on shape-only "meta" tensors and compares the shapes with
    the modules diffusers would wrap.

    A recorded base hash that differs from this base's is NOT a refusal (a merge or a re-save of the same
    architecture still fits, and kohya's hashes are of a checkpoint file a diffusers folder cannot reproduce);
    it comes back in `Fit.warnings` for the caller to show and record."""
    pipe = getattr(base, "pipe", base)
    path = Path(path)
    identity = identify_lora(path, with_hash=False)
    tensors, _ = read_safetensors_header(path)
    recorded = recorded_base_hashes(path)
    arch = base_architecture(pipe)
    problems = _family_problems(identity.architecture, arch)
    components: dict[str, dict[str, Any]] = {}
    if not problems:
        problems, components = _shape_problems(pipe, tensors)
    if problems:
        raise LoraError(_refusal(path, identity.architecture, identity.notes, recorded, base, arch, problems))
    return Fit(tuple(components), tuple(_hash_warnings(path, recorded, base)))


def _family_problems(lora_arch: str, base_arch: str) -> list[str]:
    """Another family: the LoRA says sd1/sd2/sdxl (from its widths, keys or metadata) and the base is another."""
    base_family = base_arch.removesuffix("-inpaint")
    known = ("sd1", "sd2", "sdxl")
    if lora_arch in known and base_family in (*known, "sdxl-refiner") and lora_arch != base_family:
        return [f"it is an {lora_arch} LoRA and the base is {base_arch}"]
    return []


def _shape_problems(pipe: Any, tensors: Mapping[str, TensorInfo]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(problems, {component: peft-named shapes}): the LoRA as diffusers would load it into this pipeline, each
    lora_A/lora_B checked against the module it wraps."""
    keys = list(tensors)
    if any(".hada_" in k or ".lokr_" in k for k in keys):
        return ["it is a LyCORIS LoHa/LoKr file, which diffusers does not load for Stable Diffusion"], {}
    if any(k.endswith("dora_scale") for k in keys):
        return [
            "it is a DoRA (dora_scale keys), which diffusers loads into SD pipelines only by dropping its "
            "magnitudes (a different image)"
        ], {}
    try:
        parts = peft_shapes(pipe, tensors)
    except (ValueError, KeyError, IndexError) as exc:
        return [f"diffusers cannot read its keys ({str(exc).strip().splitlines()[0][:200]})"], {}
    problems: list[str] = []
    for name in sorted(set(parts) - {n for n in parts if getattr(pipe, n, None) is not None}):
        problems.append(f"it adapts {name}, which the base does not have")
    for name, shapes in parts.items():
        model = getattr(pipe, name, None)
        if model is not None:
            problems += _module_problems(name, model, shapes)
    loaded = {n: s for n, s in parts.items() if getattr(pipe, n, None) is not None}
    if not problems and not any(loaded.values()):
        problems.append(f"diffusers would load none of its keys (they start {_prefixes(keys)})")
    return problems, {n: s for n, s in loaded.items() if s}


def peft_shapes(pipe: Any, tensors: Mapping[str, TensorInfo]) -> dict[str, dict[str, Any]]:
    """{component: {peft key: meta tensor}}: the LoRA's tensors renamed as `pipe.load_lora_weights` renames them
    before peft wraps the modules (kohya -> diffusers -> peft `<module>.lora_A.weight`), as shapes only.

    Mirrors diffusers 0.42: `lora_state_dict` (SGM block names mapped only for SDXL pipelines, which pass their
    unet_config), then `load_lora_into_unet` (`convert_unet_state_dict_to_peft` unless keys are peft already)
    and `_load_lora_into_text_encoder` (`convert_state_dict_to_diffusers` + `convert_state_dict_to_peft`, the
    `text_model.` prefix dropped for transformers 5's flattened CLIPTextModel). Alphas are scalars whose values
    do not matter here, so they are placeholders, not read."""
    import torch
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    meta = {
        k: torch.tensor(1.0) if k.endswith(".alpha") else torch.empty(t.shape, device="meta")
        for k, t in tensors.items()
    }
    xl = getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__
    state, _ = pipe.lora_state_dict(meta, unet_config=pipe.unet.config if xl else None)
    out: dict[str, dict[str, Any]] = {}
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    if unet and "lora_A" not in next(iter(unet)):
        unet = convert_unet_state_dict_to_peft(unet)
    out["unet"] = unet
    for name in TEXT_ENCODERS:
        part = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
        if part:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            model = getattr(pipe, name, None)
            if model is not None and "text_model" not in dict(model.named_children()):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
            out[name] = part
    return out


def _module_problems(component: str, model: Any, shapes: Mapping[str, Any]) -> list[str]:
    """Each LoRA module of `shapes` against the module of `model` it would wrap: present, and lora_A's input
    (and kernel) / lora_B's output the module's in/out features or channels."""
    import torch

    modules = dict(model.named_modules())
    problems: list[str] = []
    for key, tensor in sorted(shapes.items()):
        name, found, kind = key.partition(".lora_A.")
        if not found:
            name, found, kind = key.partition(".lora_B.")
            kind = "B" if found else ""
        else:
            kind = "A"
        if not kind:
            continue  # lora_magnitude_vector, biases: not matrices to check
        module = modules.get(name)
        if module is None:
            if kind == "A":
                problems.append(f"{component}.{name}: no such module in the base")
            continue
        module = getattr(module, "base_layer", module)  # already wrapped by another LoRA
        shape = tuple(tensor.shape)
        if isinstance(module, torch.nn.Linear):
            have, want = (shape[1], module.in_features) if kind == "A" else (shape[0], module.out_features)
            what = "inputs" if kind == "A" else "outputs"
        elif isinstance(module, torch.nn.Conv2d):
            have, want = (shape[1], module.in_channels) if kind == "A" else (shape[0], module.out_channels)
            what = "input channels" if kind == "A" else "output channels"
            if kind == "A" and len(shape) == 4 and tuple(shape[2:]) != tuple(module.kernel_size):
                problems.append(
                    f"{component}.{name}: a {shape[2]}x{shape[3]} LoRA kernel on a "
                    f"{module.kernel_size[0]}x{module.kernel_size[1]} convolution"
                )
        else:
            continue
        if len(shape) < 2 or have != want:
            problems.append(f"{component}.{name} has {want} {what}, the LoRA's {have}")
    return problems


def _refusal(
    path: Path,
    lora_arch: str,
    notes: tuple[str, ...],
    recorded: Mapping[str, str],
    base: Any,
    base_arch: str,
    problems: list[str],
) -> str:
    made_for = next((n.removeprefix("made for ") for n in notes if n.startswith("made for ")), lora_arch)
    lora = f"LoRA {path} (made for {made_for}"
    if recorded:
        lora += "; trained on base " + ", ".join(f"{k}={v}" for k, v in recorded.items())
    shown = problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])
    return f"{lora}) does not fit base {_base_name(base)} ({base_arch}): " + "; ".join(shown)


def _base_name(base: Any) -> str:
    path, digest = getattr(base, "path", None), getattr(base, "hash", None)
    name = str(path) if path is not None else type(getattr(base, "pipe", base)).__name__
    return f"{name}, hash {digest}" if digest else name


def _hash_warnings(path: Path, recorded: Mapping[str, str], base: Any) -> list[str]:
    """A warning per recorded base hash that can be compared with this base and differs: sdpipe's own against the
    base's hash (when the base has one: a bare pipeline, as `apply_loras` passes, has none to compare); kohya's
    only when the base is a single checkpoint file (they hash a file)."""
    own = _known_hashes(base)
    warnings = []
    for key, value in recorded.items():
        comparable = (key == "sdpipe.base_hash" and own["sdpipe"]) or own.get("file")
        if comparable and not any(_same_hash(value, h) for h in own.values() if h):
            warnings.append(
                f"LoRA {path} records {key}={value}, but base {_base_name(base)} differs: it may have been trained "
                "on another model of the same architecture"
            )
    return warnings


def _known_hashes(base: Any) -> dict[str, str]:
    """The hashes a recorded base hash may be: sdpipe's model hash; for a single file also its sha256, its tensor
    data's sha256 (kohya's ss_new_sd_model_hash) and kohya's old 8-hex model hash."""
    known = {"sdpipe": str(getattr(base, "hash", "") or "")}
    path = getattr(base, "path", None)
    if path is not None and Path(path).is_file():
        known["file"] = hashes.file_sha256(path)
        known["data"] = hashes.lora_sha256(path)
        known["old"] = _kohya_old_hash(Path(path))
    return known


def _kohya_old_hash(path: Path) -> str:
    """kohya's (and the old web UI's) 8-hex model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _same_hash(a: str, b: str) -> bool:
    """Two hex hashes agree when one is a prefix of the other (8 hex digits at least), ignoring a 'sha256:'/'0x'
    prefix and case."""

    def norm(h: str) -> str:
        return h.strip().lower().removeprefix("sha256:").removeprefix("0x")

    a, b = norm(a), norm(b)
    return min(len(a), len(b)) >= 8 and (a.startswith(b) or b.startswith(a))


def _prefixes(keys: list[str]) -> str:
    from sdpipe.models.files import key_prefixes

    return key_prefixes(keys, depth=1)
