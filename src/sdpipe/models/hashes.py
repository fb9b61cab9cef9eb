"""Content hashes of model files, streamed from disk and cached, never computed by loading tensors.

- `file_sha256`: the sha256 of a file's bytes (what `sdpipe models inspect` prints as sha256).
- `webui_model_hash`: its first 10 hex digits, the web UIs' short "Model hash" of a checkpoint.
- `lora_hash`: the sha256 of the bytes after a safetensors header, first 12 hex digits: the web UI's
  `addnet_hash_safetensors`, as written in "Lora hashes" (it does not change when only the metadata does).
- `folder_sha256`: a diffusers folder's hash, from the hashes of its components' files.

A multi-gigabyte checkpoint takes seconds to hash, so results are kept in `$SDPIPE_CACHE_DIR/hashes.json`
(default ~/.cache/sdpipe) under the file's real path, and reused only while its size, mtime_ns and inode are
unchanged. The cache is a convenience: a corrupt or unwritable one is ignored, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BLOCK = 1 << 20  # bytes read at a time
CACHE_NAME = "hashes.json"
CACHE_VERSION = 1
MIN_CACHED_BYTES = 1 << 20  # smaller files are quicker to hash again than to look up
SAFETENSORS_PREFIX = 8  # the little-endian u64 header length that starts a safetensors file
_CACHE_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where sdpipe keeps caches: $SDPIPE_CACHE_DIR, or ~/.cache/sdpipe."""
    return Path(os.environ.get("SDPIPE_CACHE_DIR", Path.home() / ".cache" / "sdpipe"))


def file_sha256(path: str | Path) -> str:
    """The sha256 (64 hex digits) of the file's bytes; cached while the file is unchanged."""
    return _cached(Path(path), "sha256", lambda p: _digest_file(p, 0))


def webui_model_hash(path: str | Path) -> str:
    """The web UIs' short "Model hash" of a checkpoint: the first 10 hex digits of its sha256."""
    return file_sha256(path)[:10]


def lora_sha256(path: str | Path) -> str:
    """The sha256 of a safetensors file's tensor data (the bytes after its 8-byte length and JSON header)."""
    return _cached(Path(path), "after_header_sha256", lambda p: _digest_file(p, _data_start(p)))


def lora_hash(path: str | Path) -> str:
    """The web UI's short LoRA hash ("Lora hashes: name: <hash>"): the first 12 hex digits of `lora_sha256`."""
    return lora_sha256(path)[:12]


def folder_sha256(folder: str | Path, components: Iterable[str]) -> str:
    """A diffusers folder's hash: the sha256 of the sorted lines `component=<component hash>`, where a component's
    hash is the sha256 of its files' lines `<relative path> <file sha256>`, sorted by path (dot-files skipped).
    Renaming, adding or changing any file of a component changes it; files outside the components do not."""
    folder = Path(folder)
    lines = sorted(f"{name}={component_sha256(folder / name)}\n" for name in components)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def component_sha256(folder: Path) -> str:
    """The sha256 of the lines `<relative path> <file sha256>` of every file under `folder`, sorted by path."""
    lines = [f"{rel} {file_sha256(folder / rel)}\n" for rel in component_files(folder)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def component_files(folder: Path) -> list[str]:
    """The files under `folder` as sorted POSIX relative paths, skipping anything whose name starts with a dot."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append(rel.as_posix())
    return sorted(found)


def _digest_file(path: Path, start: int) -> str:
    """The sha256 of the file's bytes from offset `start`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _data_start(path: Path) -> int:
    """Where a safetensors file's tensor data starts: 8 + the header length it declares."""
    with open(path, "rb") as f:
        prefix = f.read(SAFETENSORS_PREFIX)
    if len(prefix) < SAFETENSORS_PREFIX:
        raise ValueError(f"{path} is {len(prefix)} bytes: too short to be a safetensors file")
    return SAFETENSORS_PREFIX + int.from_bytes(prefix, "little")


def _fingerprint(stat: os.stat_result) -> dict[str, int]:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _cached(path: Path, field: str, compute: Callable[[Path], str]) -> str:
    """`compute(path)`, or the value cached for this file while its real path, size, mtime_ns and inode match.
    Files under 1 MiB are not cached; a file that changes while it is being hashed gets its hash, not cached."""
    real = os.path.realpath(path)
    before = _fingerprint(os.stat(real))  # FileNotFoundError for a missing file, as open would raise
    if before["size"] < MIN_CACHED_BYTES:
        return compute(Path(real))
    entry = _read_cache().get(real)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in before.items()) and field in entry:
        return str(entry[field])
    value = compute(Path(real))
    if _fingerprint(os.stat(real)) == before:
        _store(real, before, field, value)
    return value


def _cache_file() -> Path:
    return cache_dir() / CACHE_NAME


def _read_cache() -> dict[str, Any]:
    """The cached entries by real path; {} when the cache is missing, unreadable or not what this version wrote."""
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _store(real: str, fingerprint: dict[str, int], field: str, value: str) -> None:
    """Add one value to the cache: read again, merge, and replace the file atomically (best effort)."""
    with _CACHE_LOCK:
        files = _read_cache()
        entry = files.get(real)
        if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in fingerprint.items())):
            entry = dict(fingerprint)  # a changed file: its other cached hashes are stale too
        entry[field] = value
        files[real] = entry
        # a read-only or full cache folder costs a re-hash next time, nothing more
        with contextlib.suppress(OSError):
            _write_atomically(_cache_file(), json.dumps({"version": CACHE_VERSION, "files": files}, indent=1))


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
