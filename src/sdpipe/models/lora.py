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

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpipe.conditioning import LoraRef
from sdpipe.models import hashes
from sdpipe.models.files import identify_lora
from sdpipe.models.lora_fit import (  # noqa: F401  (what callers import from here)
    BASE_HASH_KEYS,
    TEXT_ENCODERS,
    Fit,
    LoraError,
    base_architecture,
    check_fits,
    peft_shapes,
    recorded_base_hashes,
    touches_text_encoder,
)

log = logging.getLogger("sdpipe.models")

WEIGHT_RANGE = (-4.0, 4.0)
"""Weights outside this are refused: web UIs accept any number, but past +-4 a LoRA only burns the image, and a
typo such as 08 for 0.8 should not pass silently."""
ADAPTER_PREFIX = "sdpipe_"
"""safetensors metadata naming the base a LoRA was trained on: sdpipe's own, then kohya's (the sha256 of the
checkpoint's tensor data, and the old 8-hex model hash)."""
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_REGISTRY_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9._-]*")
_STATE_ATTR = "_sdpipe_loras"  # what apply_loras loaded and activated, kept on the pipeline object

Resolve = Callable[[str], Path]


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
