"""What the registry hands back: plain dataclasses with `to_dict()` for `--json` output."""

from __future__ import annotations

import dataclasses
import getpass
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def current_user() -> str:
    """`SDPIPE_USER` if set, else the login name (getpass), else 'unknown'."""
    if os.environ.get("SDPIPE_USER"):
        return os.environ["SDPIPE_USER"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry, as in some containers
        return "unknown"


class _Dict:
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


MODEL_KINDS = ("pixel-class", "sd-pipeline", "sd-single-file", "table")  # what `load` loads; a "lora" is not a model


@dataclass
class Version(_Dict):
    """One registered, immutable version and its lineage.

    `kind` is what `sdpipe.models.files.identify` calls it: pixel-class (sdpipe's own models; every version an
    older registry holds), sd-pipeline (a diffusers folder), sd-single-file (one web-UI checkpoint) or lora.
    `weights_hash` is what identifies the model: a pixel-class model's weights hash, else the sha256 that
    `sdpipe models inspect` prints (a file's bytes; a diffusers folder's from its components' files), as
    "sha256:<64 hex>". `content_hash` covers every stored file and is what loading checks. `path` is the
    stored folder; `model_path` the model in it (the file itself for single files and LoRAs). `base`, for a
    LoRA: the model it was made for (see `sdpipe.registry.loras`)."""

    name: str
    version: int
    path: Path
    weights_hash: str
    content_hash: str
    dataset_id: str
    created_at: str
    user: str
    lineage: dict[str, Any]  # config, metrics, versions, git_commit, source
    kind: str = "pixel-class"
    architecture: str = "unet2d"  # sd1, sd2, sdxl, ... (+ -inpaint); a LoRA's: what it looks made for
    size_bytes: int | None = None  # None: registered by an older sdpipe
    stored_file: str | None = None  # the file's name in `path` for single files and LoRAs
    base: dict[str, Any] | None = None  # a LoRA's base: hash, hash_kind, architecture, source, name
    identity: dict[str, Any] | None = None  # short_hash, prediction_type, components, notes (identify's)
    aliases: list[str] = field(default_factory=list)
    created: bool = True  # False when `register` found the same weights already registered

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def model_path(self) -> Path:
        """What to load: the stored folder, or the single file in it."""
        return self.path if self.stored_file is None else self.path / self.stored_file

    @property
    def short_hash(self) -> str:
        """The hash the web UIs show (a checkpoint's 10 hex, a LoRA's 12), else the weights hash."""
        found = (self.identity or {}).get("short_hash")
        return str(found) if found else self.weights_hash


@dataclass
class AliasMove(_Dict):
    """The result of `alias` or `rollback`: where the alias points now and where it pointed before."""

    name: str
    alias: str
    version: int
    previous: int | None
    changed: bool = True  # False when the alias already pointed there


@dataclass
class ModelSummary(_Dict):
    name: str
    versions: int
    latest: int
    aliases: dict[str, int]
    kind: str = "pixel-class"  # the latest version's
    architecture: str = "unet2d"  # the latest version's


@dataclass
class Event(_Dict):
    """One line of the append-only log."""

    id: int
    time: str
    user: str
    action: str  # register | alias | rollback
    name: str
    alias: str | None
    version: int
    previous: int | None
    detail: dict[str, Any]
