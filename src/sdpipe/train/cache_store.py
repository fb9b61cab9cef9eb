"""The on-disk store under the training caches: immutable safetensors shards plus a JSON index.

A shard holds tensors named `<entry digest>.<part>` (e.g. `ab12....mean`) and, in its metadata, the kind and the
encoder hash that made it. It is written to a temporary file and renamed into place, so it is either complete or
absent: a build killed midway loses only the shard it was writing. The index (`index.json`: shard -> size,
encoder, entry digests) is only a cache of the shards' headers, replaced atomically (temporary file +
`os.replace`); a shard it does not list (written by another process, or just before a kill) is read from its
header, and a listed one that is gone is dropped. Readers never see a partial file, so they may run alongside
writers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "index.json"
SHARD_SUFFIX = ".safetensors"
INDEX_VERSION = 1
OPEN_HANDLES = 32  # shards kept open between reads


class ShardStore:
    """The shards of one kind of cache ("latents", "text") in `folder`."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.folder, self.kind = Path(folder), kind
        self.shards: dict[str, dict[str, Any]] = {}  # shard name -> {"size", "encoder", "entries"}
        self.where: dict[str, str] = {}  # entry digest -> shard name
        self._handles: OrderedDict[str, tuple[Any, dict[str, list[str]]]] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """Bring the in-memory index up to date with the shards on disk (and rewrite `index.json` if it was not)."""
        listed = _read_index(self.folder / INDEX)
        files = self.folder.glob(f"*{SHARD_SUFFIX}") if self.folder.is_dir() else []
        present = {p.name: size for p in files if (size := _size(p)) is not None}
        shards, changed = {}, set(listed) != set(present)
        for name, size in present.items():
            known = listed.get(name)
            if known is None or known.get("size") != size:
                known, changed = self._header(name, size), True
            if known is not None:
                shards[name] = known
        self.shards = shards
        self.where = {d: name for name, meta in sorted(shards.items()) for d in meta["entries"]}
        if changed and present:
            self.save_index()

    def save_index(self) -> None:
        """Write `index.json` (atomically) from the shards this store knows; never an error (a read-only cache
        still reads, and a missing index is rebuilt from the shards' headers)."""
        if self.shards:
            with contextlib.suppress(OSError):
                _write_json(self.folder / INDEX, {"version": INDEX_VERSION, "kind": self.kind, "shards": self.shards})

    def _header(self, name: str, size: int) -> dict[str, Any] | None:
        try:
            with safe_open(self.folder / name, framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except Exception:  # noqa: BLE001 - not a shard we can read: ignored (and left for `clear`)
            return None
        entries = sorted({k.split(".", 1)[0] for k in keys})
        return {"size": size, "encoder": meta.get("encoder", ""), "entries": entries}

    def has(self, digest: str) -> bool:
        return digest in self.where

    def write(self, entries: Mapping[str, Mapping[str, torch.Tensor]], encoder: str) -> str:
        """Write one shard of `entries` (digest -> part -> tensor) atomically; returns its name. The index is
        not rewritten (`save_index` does that, once per build): until then a reader finds it by its header."""
        self.folder.mkdir(parents=True, exist_ok=True)
        digests = sorted(entries)
        name = hashlib.sha256("\n".join([encoder, *digests]).encode()).hexdigest()[:24] + SHARD_SUFFIX
        tensors = {f"{d}.{part}": t.detach().cpu().contiguous() for d in digests for part, t in entries[d].items()}
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        try:
            save_file(tensors, str(tmp), metadata={"kind": self.kind, "encoder": encoder, "format": "1"})
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        self.shards[name] = {"size": (self.folder / name).stat().st_size, "encoder": encoder, "entries": digests}
        self.where.update(dict.fromkeys(digests, name))
        return name

    def read(self, digests: list[str]) -> list[dict[str, torch.Tensor]]:
        """Each entry's parts (as stored), in the order asked; each shard is opened once."""
        if any(d not in self.where for d in digests):
            self.refresh()  # another process may have written it since
        missing = [d for d in digests if d not in self.where]
        if missing:
            raise KeyError(
                f"{len(missing)} {self.kind} entries not in the cache at {self.folder} (first: {missing[0]}); "
                "run ensure() for them first"
            )
        out: dict[str, dict[str, torch.Tensor]] = {}
        by_shard: dict[str, list[str]] = {}
        for d in dict.fromkeys(digests):
            by_shard.setdefault(self.where[d], []).append(d)
        for name, wanted in by_shard.items():
            f, names = self._open(name)
            out.update({d: {part: f.get_tensor(f"{d}.{part}") for part in names[d]} for d in wanted})
        return [out[d] for d in digests]

    def _open(self, name: str) -> tuple[Any, dict[str, list[str]]]:
        """The shard's open handle and its entries' part names (digest -> parts), kept for the next reads."""
        if name in self._handles:
            self._handles.move_to_end(name)
            return self._handles[name]
        f = safe_open(self.folder / name, framework="pt")
        names: dict[str, list[str]] = {}
        for key in f.keys():  # noqa: SIM118 - a safetensors handle is not iterable
            digest, _, part = key.partition(".")
            names.setdefault(digest, []).append(part)
        handle = self._handles[name] = (f, names)
        while len(self._handles) > OPEN_HANDLES:
            self._handles.popitem(last=False)
        return handle


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed (by `clear`) since it was listed
        return None


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        return dict(data["shards"]) if data.get("version") == INDEX_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or corrupt: rebuilt from the shards' headers


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def folder_info(folder: Path, kind: str) -> dict[str, Any]:
    """Entries, shards, bytes (shards, index and leftovers) and the distinct encoder hashes of one kind."""
    store = ShardStore(folder, kind)
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return {
        "entries": len(store.where),
        "shards": len(store.shards),
        "bytes": sum(p.stat().st_size for p in files),
        "encoders": sorted({meta["encoder"] for meta in store.shards.values()}),
    }


def clear_folder(folder: Path) -> dict[str, int]:
    """Remove every file of one kind's folder (shards, index, unfinished temporary files)."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    removed = {"files": 0, "shards": 0, "bytes": 0}
    for p in files:
        size = p.stat().st_size
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed["files"] += 1
            removed["shards"] += p.name.endswith(SHARD_SUFFIX)
            removed["bytes"] += size
    with contextlib.suppress(OSError):
        folder.rmdir()
    return removed
