"""What a model file or folder is, told from its name, its first bytes, its JSON and its safetensors header only.

`identify(path)` returns an `Identity` (kind, architecture, prediction type, components with dtypes and parameter
counts, size, hashes) or raises `ModelFileError` with one sentence saying what the path is and what was expected:
a pickle checkpoint (never unpickled: the message says how to convert it), a truncated or non-safetensors file, a
LoRA or a VAE given as a model, unknown keys. No tensor is ever read, so this is cheap on a 7 GB checkpoint
(hashing it is not, and is cached; `with_hash=False` skips it).

The kinds (ARCHITECTURE.md, "Design: components and conditioning" §1):
    pixel-class     sdpipe's own digits models: unet/, scheduler/, sdpipe.json without "kind"
    sd-pipeline     a diffusers Stable Diffusion (XL) pipeline folder: model_index.json + components
    sd-single-file  one web-UI .safetensors checkpoint (model.diffusion_model.* keys)
    lora            a LoRA .safetensors: an Identity from `identify_lora` or `identify(..., allow_lora=True)`,
                    refused by `identify` alone, which is asked for a model
Folders are handled in `sdpipe.models.folders`; single files, LoRAs and the refusals here.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdpipe.models import hashes

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default layout since torch 1.6 is a zip of pickles
PICKLE_MAGIC = b"\x80"  # a pickle stream of protocol 2+ (legacy torch.save) starts with PROTO
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
UNET_PREFIX = "model.diffusion_model."
# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, float]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "C64": ("complex64", 8),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip


class ModelFileError(ValueError):
    """A path that is not a model sdpipe can use, with what it is and what was expected (a user error)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it: dtype code (e.g. "F16"), shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ComponentInfo:
    """One component of a model: its name (unet, vae, text_encoder, ...), the diffusers/transformers class it is
    or converts to, its dtype(s) (e.g. "float16", or "float16+float32" most-used first), parameter count and
    weight bytes (0 and "" for components without weights: scheduler, tokenizer)."""

    name: str
    class_name: str
    dtype: str
    parameters: int
    bytes: int


@dataclass(frozen=True)
class Identity:
    """What `identify` found. `sha256` is the full content hash of the files (a folder's from its components',
    see `hashes.folder_sha256`); `short_hash` is the one the rest of sdpipe and the web UIs record for it:
    pixel-class its `weights_hash`, a single file the web UIs' 10-hex "Model hash", a LoRA their 12-hex
    LoRA hash, a pipeline folder the first 10 hex of its sha256. Without hashing (`with_hash=False`) both are
    None, except a pixel-class model's, which is read from its sdpipe.json."""

    kind: str
    path: Path
    architecture: str
    prediction_type: str | None
    components: tuple[ComponentInfo, ...]
    size_bytes: int
    sha256: str | None
    short_hash: str | None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the path as a string)."""
        return asdict(self) | {"path": str(self.path), "components": [asdict(c) for c in self.components]}

    def component(self, name: str) -> ComponentInfo | None:
        return next((c for c in self.components if c.name == name), None)


def identify(path: str | Path, *, allow_lora: bool = False, with_hash: bool = True) -> Identity:
    """What model `path` is. A LoRA is refused (it is not a model; "pass it with --lora") unless `allow_lora`,
    as `sdpipe models inspect` asks; everything that is not a model of a known kind is refused by name."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or folder")
    if path.is_dir():
        from sdpipe.models.folders import identify_folder

        return identify_folder(path, with_hash=with_hash)
    return _identify_file(path, with_hash=with_hash, allow_lora=allow_lora)


def identify_lora(path: str | Path, *, with_hash: bool = True) -> Identity:
    """The Identity of a LoRA file (kind "lora"), for `--lora`; anything else is refused, a model included
    (before hashing it)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder: expected a LoRA .safetensors file")
    found = identify(path, allow_lora=True, with_hash=False)
    if found.kind != "lora":
        raise ModelFileError(f"{path} is a {found.architecture} {found.kind} model, not a LoRA: expected a LoRA file")
    return identify(path, allow_lora=True, with_hash=True) if with_hash else found


# --- refusals by name and first bytes ---------------------------------------------------------------------------


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle checkpoint by its suffix, or by its first bytes under any name, without unpickling it."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(pickle_message(path, f"by its name, {path.suffix}"))
    with open(path, "rb") as f:
        head = f.read(9)
    if _plausible_safetensors(head):
        return
    if head.startswith(ZIP_MAGIC):
        raise ModelFileError(pickle_message(path, "its first bytes are a zip archive, the layout torch.save writes"))
    if head.startswith(PICKLE_MAGIC) and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise ModelFileError(pickle_message(path, "its first bytes are a pickle stream"))


def _plausible_safetensors(head: bytes) -> bool:
    """A header length then '{': a safetensors file whose length happens to begin with byte 0x80 is not a pickle."""
    return len(head) == 9 and head[8:9] == b"{"


def pickle_message(path: Path, evidence: str) -> str:
    """Why a pickle is refused, and a one-line conversion to .safetensors for a file the user trusts."""
    out = path.with_suffix(".safetensors")
    if out == path:  # a pickle under a .safetensors name: do not write over it
        out = path.with_name(f"{path.stem}.converted.safetensors")
    snippet = (
        "import torch, safetensors.torch as st; "
        f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        "st.save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"{str(out)!r})"
    )
    return (
        f"{path} is a pickle checkpoint ({evidence}): sdpipe never unpickles files, since unpickling can run any "
        f'code in them. Convert it to .safetensors once, and only if you trust the file: python -c "{snippet}"'
    )


# --- safetensors headers ----------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> TensorInfo) and `__metadata__` of a safetensors file, from its header bytes only
    (8-byte little-endian length, then that many bytes of JSON). A file cut short (the header, or a tensor's
    byte range, past its end) is refused with both sizes; so is anything that is not a safetensors file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(9)
        if not _plausible_safetensors(prefix):
            raise ModelFileError(_not_safetensors(path, size, prefix))
        length = int.from_bytes(prefix[:8], "little")
        if 8 + length > size:
            raise ModelFileError(
                f"{path} is truncated: its header says the JSON header is {length} bytes, so the file must be at "
                f"least {8 + length} bytes, but it is {size} bytes (an interrupted download or copy?)"
            )
        if length > MAX_HEADER_BYTES:
            raise ModelFileError(f"{path}: its safetensors header is {length} bytes, over the {MAX_HEADER_BYTES} limit")
        raw = prefix[8:] + f.read(length - 1)
    header = _parse_header(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path} is not a valid safetensors file: __metadata__ is not an object")
    tensors = {name: _tensor_info(path, name, entry) for name, entry in header.items()}
    _check_data_fits(path, tensors, data_start=8 + length, size=size)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _not_safetensors(path: Path, size: int, head: bytes) -> str:
    if size < 9:
        return f"{path} is {size} bytes: too short to be a safetensors file (an 8-byte length, then a JSON header)"
    return (
        f"{path} is not a safetensors file (it starts with {head[:8]!r}, not an 8-byte header length and '{{'): "
        "expected a .safetensors checkpoint or a diffusers folder"
    )


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is not a valid safetensors file: its JSON header does not parse ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a valid safetensors file: its JSON header is not an object")
    return header


def _tensor_info(path: Path, name: str, entry: Any) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, a byte range matching them."""
    bad = f"{path} is not a valid safetensors file: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelFileError(f"{bad} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ModelFileError(f"{bad} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
        raise ModelFileError(f"{bad} has data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise ModelFileError(f"{bad} has data_offsets {offsets!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelFileError(f"{bad} has dtype {dtype!r}, which sdpipe does not know")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise ModelFileError(f"{bad} takes {end - begin} bytes, but a {dtype} tensor of shape {shape} takes {expected}")
    return TensorInfo(dtype, tuple(shape), (begin, end))


def _check_data_fits(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    if not tensors:
        return
    name, last = max(tensors.items(), key=lambda item: item[1].data_offsets[1])
    needed = data_start + last.data_offsets[1]
    if needed > size:
        raise ModelFileError(
            f"{path} is truncated: its header says tensor {name!r} ends at byte {needed}, but the file is "
            f"{size} bytes (an interrupted download or copy?)"
        )


def dtype_name(code: str) -> str:
    """The torch dtype name of a safetensors dtype code ("F16" -> "float16")."""
    return DTYPES[code][0]


def component_from(name: str, class_name: str, tensors: list[TensorInfo]) -> ComponentInfo:
    """A ComponentInfo summing these tensors: parameters, bytes, and dtypes by how many parameters use each."""
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[dtype_name(t.dtype)] += t.numel
    dtype = "+".join(d for d, _ in by_dtype.most_common())
    nbytes = sum(t.data_offsets[1] - t.data_offsets[0] for t in tensors)
    return ComponentInfo(name, class_name, dtype, sum(by_dtype.values()), nbytes)


def key_prefixes(keys: list[str], depth: int = 2, limit: int = 5) -> str:
    """The first few distinct key prefixes (`depth` dotted parts), for messages: 'encoder.conv_in.*, ...'."""
    seen: dict[str, None] = {}
    for key in sorted(keys):
        seen.setdefault(".".join(key.split(".")[:depth]) + (".*" if key.count(".") >= depth else ""), None)
    shown = list(seen)[:limit]
    return ", ".join(shown) + (f" (and {len(seen) - limit} more)" if len(seen) > limit else "")


# --- single files -----------------------------------------------------------------------------------------------


def _identify_file(path: Path, *, with_hash: bool, allow_lora: bool) -> Identity:
    from sdpipe.models.checkpoints import identify_checkpoint, identify_lora_file, is_lora, refuse_non_model

    refuse_pickle(path)
    tensors, metadata = read_safetensors_header(path)
    keys = list(tensors)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return identify_checkpoint(path, tensors, metadata, with_hash=with_hash)
    if not is_lora(keys):
        raise ModelFileError(refuse_non_model(path, keys))
    lora = identify_lora_file(path, tensors, metadata, with_hash=with_hash and allow_lora)
    if not allow_lora:
        raise ModelFileError(_lora_as_model(lora))
    return lora


def _lora_as_model(lora: Identity) -> str:
    return (
        f"{lora.path} is a LoRA ({'; '.join(lora.notes[:2])}; looks made for {lora.architecture}), not a model: "
        "expected a Stable Diffusion checkpoint (model.diffusion_model.* keys) or a diffusers pipeline folder; "
        "pass it with --lora on top of such a base model"
    )


def file_identity(path: Path, kind: str, *, with_hash: bool, **fields: Any) -> Identity:
    """An Identity for a single file: its size, its sha256 and the short hash for `kind` when hashing."""
    sha = hashes.file_sha256(path) if with_hash else None
    short = None
    if with_hash:
        short = hashes.lora_hash(path) if kind == "lora" else hashes.webui_model_hash(path)
    return Identity(kind=kind, path=path, size_bytes=path.stat().st_size, sha256=sha, short_hash=short, **fields)
