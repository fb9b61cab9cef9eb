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


@dataclass
class Version(_Dict):
    """One registered, immutable version and its lineage."""

    name: str
    version: int
    path: Path
    weights_hash: str
    content_hash: str
    dataset_id: str
    created_at: str
    user: str
    lineage: dict[str, Any]  # config, metrics, versions, git_commit, source
    aliases: list[str] = field(default_factory=list)
    created: bool = True  # False when `register` found the same weights already registered

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


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
