"""LoRAs on Stable Diffusion pipelines: `--lora FILE[:WEIGHT]`, whether a LoRA fits a base, and switching the
adapters of one loaded pipeline between micro-batches.

The order of calls, from the command line or a request to an image:

1. `parse_lora_option("style.safetensors:0.8")` -> `LoraRef(ref, weight, sha256)`. `sha256` is `lora_sha256`:
   the sha256 of the file's tensor data (the bytes after the safetensors header), so the web UI's 12-hex
   "Lora hashes" value is `sha256[:12]` (`hashes.lora_hash`) and a LoRA whose metadata alone was edited keeps its
   identity. A model, a pickle or a truncated file given as a LoRA is refused here, by `identify_lora`.
2. `check_fits(base, path)`: before any tensor is read, refuse a LoRA that cannot apply to the base (another
   family, a module the base lacks, a shape the base's module does not have, a format diffusers would load
   wrongly), naming both; return, as warnings, a recorded base hash that differs from this base's.
3. `apply_loras(pipe, loras, lora_path)` before each micro-batch: load each LoRA not loaded yet, once, under the
   adapter name `adapter_name(sha256)`, then activate exactly these LoRAs at these weights; with none, the LoRA
   layers are disabled, which gives the bits of a pipeline that never had one.
4. `active_text_encoder_loras(pipe)` is what the text-embedding cache must add to its key: the active adapters
   that have text-encoder layers, with their weights.

Not thread-safe: `apply_loras` changes the pipeline's modules in place, so it must run on the thread that then
generates with the pipeline, serialised with every other use of it (the server's single worker thread).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpipe.conditioning import LoraRef
from sdpipe.models import hashes
from sdpipe.models.files import TensorInfo, identify_lora, read_safetensors_header

log = logging.getLogger("sdpipe.models")

WEIGHT_RANGE = (-4.0, 4.0)
"""Weights outside this are refused: web UIs accept any number, but past +-4 a LoRA only burns the image, and a
typo such as 08 for 0.8 should not pass silently."""
ADAPTER_PREFIX = "sdpipe_"
BASE_HASH_KEYS = ("sdpipe.base_hash", "ss_new_sd_model_hash", "ss_sd_model_hash")
"""safetensors metadata naming the base a LoRA was trained on: sdpipe's own, then kohya's (the sha256 of the
checkpoint's tensor data, and the old 8-hex model hash)."""
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_REGISTRY_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._-]*")
_STATE_ATTR = "_sdpipe_loras"  # what apply_loras loaded and activated, kept on the pipeline object

Resolve = Callable[[str], Path]


class LoraError(ValueError):
    """A LoRA option or file sdpipe refuses (a user error): the message names the option or file and why."""


# --- the --lora option ------------------------------------------------------------------------------------------


def split_lora_option(text: str) -> tuple[str, float]:
    """(reference, weight) of `FILE[:WEIGHT]` or `NAME@ALIAS[:WEIGHT]`, without touching the disk.

    The rule for paths that contain ':' (C:\\loras\\x.safetensors, a name with a colon): the text is split at its
    LAST ':' only when what follows is a plain decimal number (0.8, -1, .5, 1e-1); otherwise the whole text is
    the reference and the weight is 1. So a file whose name itself ends in ':<number>' needs an explicit weight:
    `odd:2:1.0`. A weight outside -4..4 (or nan/inf written as a number) is refused, naming the option."""
    head, sep, tail = text.rpartition(":")
    if sep and _NUMBER.fullmatch(tail.strip()):
        ref, weight = head, float(tail)
    else:
        ref, weight = text, 1.0
    if not ref.strip():
        raise LoraError(f"--lora {text!r}: no file or NAME@ALIAS before the weight")
    low, high = WEIGHT_RANGE
    if not (math.isfinite(weight) and low <= weight <= high):
        raise LoraError(f"--lora {text!r}: weight {weight:g} is outside {low:g}..{high:g}")
    return ref, weight


def is_registry_ref(ref: str) -> bool:
    """Whether `ref` reads as a registry reference NAME@ALIAS (no path separators) rather than a file name."""
    return _REGISTRY_REF.fullmatch(ref) is not None


def lora_path(ref: str | LoraRef, resolve: Resolve | None = None) -> Path:
    """The file a reference names. An existing file wins, even one named like NAME@ALIAS; otherwise NAME@ALIAS
    goes to `resolve` (the registry's lookup), and anything else must be an existing file."""
    text = ref.ref if isinstance(ref, LoraRef) else ref
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if is_registry_ref(text):
        if resolve is None:
            raise LoraError(f"--lora {text}: a registry reference (NAME@ALIAS), but no registry is configured")
        return Path(resolve(text))
    if path.is_dir():
        raise LoraError(f"--lora {text}: a folder; expected a LoRA .safetensors file")
    raise LoraError(f"--lora {text}: no such file")


def parse_lora_option(text: str, resolve: Resolve | None = None) -> LoraRef:
    """One `--lora` value -> a `LoraRef` with its hash: `FILE`, `FILE:0.8`, `NAME@ALIAS:0.8`.

    The reference is kept as written (a registry reference stays NAME@ALIAS, so samples.jsonl and the PNG name
    what the user named); the file is checked to be a LoRA and hashed now, so a wrong file fails before any
    model is loaded, and the hash travels with the reference from then on."""
    ref, weight = split_lora_option(text)
    return lora_ref(lora_path(ref, resolve), weight, ref=ref)


def lora_ref(path: str | Path, weight: float = 1.0, *, ref: str | None = None) -> LoraRef:
    """A `LoraRef` for a LoRA file: `sha256` is `hashes.lora_sha256(path)` (the tensor data's sha256, whose first
    12 hex digits are the web UI's "Lora hashes" value), `ref` the path unless given. Anything that is not a LoRA
    file is refused by `identify_lora` (before it is hashed)."""
    path = Path(path)
    try:
        identify_lora(path, with_hash=False)
    except ValueError as exc:
        raise LoraError(f"--lora {ref or path}: {exc}") from None
    return LoraRef(ref=ref if ref is not None else str(path), weight=weight, sha256=hashes.lora_sha256(path))


def display_name(lora: LoraRef) -> str:
    """The LoRA's name in PNG infotext (`<lora:NAME:W>`, `Lora hashes: "NAME: hash"`): a file's stem, a registry
    reference's NAME; ':' ',' and '"' become '_' because they would break the web UIs' parsers."""
    name = lora.ref.split("@")[0] if is_registry_ref(lora.ref) else Path(lora.ref.replace("\\", "/")).stem
    return re.sub(r'[:,"\s]', "_", name) or "lora"


def infotext_hashes(loras: Iterable[LoraRef]) -> str:
    """The value of the infotext's `Lora hashes` field: `NAME: <12 hex>, NAME: <12 hex>` (the caller quotes it,
    as the web UI does, because it contains ':' and ',')."""
    return ", ".join(f"{display_name(lo)}: {lo.sha256[:12]}" for lo in loras if lo.sha256)


# --- does a LoRA fit a base -------------------------------------------------------------------------------------


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
    base's hash; kohya's only when the base is a single checkpoint file (they hash a file)."""
    own = _known_hashes(base)
    warnings = []
    for key, value in recorded.items():
        comparable = key == "sdpipe.base_hash" or own.get("file")
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


# --- applying LoRAs to a loaded pipeline -----------------------------------------------------------------------


def adapter_name(sha256: str) -> str:
    """The peft adapter name of a LoRA: stable (from its tensor data's sha256), so the same file under two paths
    or loaded twice is one adapter; no '.' (peft keys adapters in ModuleDicts)."""
    return ADAPTER_PREFIX + sha256[:16]


@dataclass
class _Loaded:
    path: Path
    text_encoder: bool


@dataclass
class _State:
    loaded: dict[str, _Loaded]  # adapter name -> what it is, in load order
    active: tuple[tuple[str, float], ...] | None = None  # None: not known (nothing set yet, or just loaded)


def _state(pipe: Any) -> _State:
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        state = _State({})
        setattr(pipe, _STATE_ATTR, state)
    return state


def apply_loras(
    pipe: Any,
    loras: tuple[LoraRef, ...],
    paths: Callable[[LoraRef], Path] = lora_path,
    *,
    max_loaded: int | None = None,
) -> None:
    """Make `loras` (at their weights) exactly the active adapters of `pipe`, loading each that is not loaded yet.

    A LoRA is loaded once, with `pipe.load_lora_weights(path, adapter_name=adapter_name(sha256))`, after
    `check_fits` (so a misfit is refused before any module is wrapped) and a check that the file still has the
    hash the LoraRef recorded. Then `pipe.enable_lora()` + `pipe.set_adapters(names, adapter_weights=weights)`
    (the same weight for the UNet and text encoders, as a web UI's <lora:NAME:W>); the enable is needed because
    diffusers' set_adapters does not undo a disable_lora. With no LoRAs, `pipe.disable_lora()`: peft's disabled
    layers call the base layer alone, so images are bitwise those of a pipeline that never had a LoRA (a weight
    of 0 need not be: it still adds 0 * B(A(x)), which turns -0.0 into 0.0 and a non-finite value into NaN).

    `paths(lora)` gives a LoRA's file (`lora_path` resolves files; pass `lambda r: lora_path(r, registry_lookup)`
    for NAME@ALIAS). `max_loaded` bounds the adapters kept loaded (a server): the oldest that this call does not
    use are deleted first. The same LoRA listed twice is refused (its weights would not add up in diffusers).
    Serialise calls with generation on the pipeline: this changes its modules in place."""
    state = _state(pipe)
    using = {adapter_name(lo.sha256) for lo in loras if lo.sha256}  # never evicted by this call
    wanted: list[tuple[str, float]] = []
    for lora in loras:
        path: Path | None = None  # paths() may be a registry lookup: only when it must be
        if lora.sha256:
            digest = lora.sha256
        else:
            path = Path(paths(lora))
            digest = hashes.lora_sha256(path)
        name = adapter_name(digest)
        if any(n == name for n, _ in wanted):
            raise LoraError(f"LoRA {lora.ref} is listed twice; give it once, with the weight wanted")
        if name not in state.loaded:
            _load(pipe, state, name, path or Path(paths(lora)), digest)
            if max_loaded is not None:
                _evict(pipe, state, keep=using | {name, *(n for n, _ in wanted)}, limit=max_loaded)
        wanted.append((name, float(lora.weight)))
    active = tuple(wanted)
    if active == state.active:
        return
    if active:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in active], adapter_weights=[w for _, w in active])
    elif state.loaded:
        pipe.disable_lora()
    state.active = active


def _load(pipe: Any, state: _State, name: str, path: Path, digest: str) -> None:
    from sdpipe.models.pipelines import _LOAD_LOCK

    found = hashes.lora_sha256(path)
    if found != digest:
        raise LoraError(f"LoRA {path} changed since it was chosen: its data hash is {found[:12]}, not {digest[:12]}")
    fit = check_fits(pipe, path)
    for warning in fit.warnings:
        log.warning("%s", warning)
    # diffusers' low_cpu_mem_usage loading patches torch.nn.Module process-wide, as model loading does
    with _LOAD_LOCK, _without_text_model_alias(pipe), warnings.catch_warnings():
        # peft warns on every adapter after the first; several adapters are what apply_loras is for
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception:
            _delete(pipe, name)  # diffusers may leave a component wrapped when a later one fails
            raise
    state.loaded[name] = _Loaded(path, fit.touches_text_encoder)
    state.active = None  # a fresh adapter is active at weight 1 in the components it wraps


class _without_text_model_alias:
    """Hide sdpipe's `text_encoder.text_model` alias (set by `pipelines._name_final_layer_norm` for clip skip)
    while diffusers loads a LoRA: diffusers drops the `text_model.` prefix of kohya text-encoder keys only when
    the encoder has no `text_model` attribute, and with the alias present it finds no module and fails with an
    IndexError in `get_peft_kwargs`."""

    def __init__(self, pipe: Any) -> None:
        self.hidden: list[Any] = [
            te
            for te in (getattr(pipe, n, None) for n in TEXT_ENCODERS)
            if te is not None and vars(te).get("text_model") is te
        ]

    def __enter__(self) -> None:
        for te in self.hidden:
            del vars(te)["text_model"]

    def __exit__(self, *exc: object) -> None:
        for te in self.hidden:
            object.__setattr__(te, "text_model", te)


def _evict(pipe: Any, state: _State, keep: set[str], limit: int) -> None:
    for name in [n for n in state.loaded if n not in keep]:
        if len(state.loaded) <= limit:
            break
        _delete(pipe, name)
        del state.loaded[name]
        state.active = None


def _delete(pipe: Any, name: str) -> None:
    """Delete one adapter from the components that have it (diffusers' `pipe.delete_adapters` tries every
    component and fails with a KeyError on one that lacks it, as after a half-finished load)."""
    from diffusers.loaders import PeftAdapterMixin
    from diffusers.utils.peft_utils import delete_adapter_layers

    for component, names in pipe.get_list_adapters().items():
        if name in names:
            model = getattr(pipe, component)
            if isinstance(model, PeftAdapterMixin):  # the UNet
                model.delete_adapters([name])
            else:
                delete_adapter_layers(model, name)


def loaded_adapters(pipe: Any) -> dict[str, Path]:
    """The LoRAs `apply_loras` has loaded into `pipe`: adapter name -> file."""
    return {n: lo.path for n, lo in _state(pipe).loaded.items()}


def active_text_encoder_loras(pipe: Any) -> tuple[tuple[str, float], ...]:
    """The active adapters (name, weight) that change prompt embeddings: those with text-encoder layers. Add this
    to the text-embedding cache's key (empty for UNet-only LoRAs, so their prompts still share the cache)."""
    state = _state(pipe)
    return tuple((n, w) for n, w in state.active or () if n in state.loaded and state.loaded[n].text_encoder)
