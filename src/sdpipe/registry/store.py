"""The store: read-only copies of registered model directories, placed so a crash never leaves half a version.

A version is copied into `STORE/.incoming/<random>/` first and renamed to `STORE/NAME/VERSION/` only inside
the database transaction that records it (see `Registry.register`), so readers, who go through the
database, only ever see complete directories. Files are then made read-only (0444, folders 0555, less the
umask) and their content hash is recorded, which `Registry.verify` recomputes. A single-file model (a web-UI
checkpoint, a LoRA) is stored the same way, as the one file in its version's folder, copied byte for byte.

The hashes here are never cached (unlike `sdpipe.models.hashes`): they are what a stored version is checked
against, so they read the bytes every time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

STALE_S = 24 * 3600  # an incoming copy this old was left by a killed process


def content_hash(directory: Path) -> str:
    """sha256 over every file's relative path, size and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_content_hash(path: Path, stored_name: str) -> str:
    """`content_hash` of a folder holding only `path`, named `stored_name` (what `stage_file` makes of it)."""
    digest = hashlib.sha256(f"{stored_name}\0{path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 (64 hex digits) of a file's bytes, read now (never from a cache)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_copy(model_dir: Path, store: Path) -> Path:
    """Copy `model_dir` into a new temporary folder under `STORE/.incoming`; the caller moves or removes it."""
    return _staged(store, lambda tmp: shutil.copytree(model_dir, tmp, dirs_exist_ok=True))  # symlinks followed


def stage_file(model_file: Path, store: Path, stored_name: str) -> Path:
    """Copy one file, byte for byte, into a new temporary folder under `STORE/.incoming` as `stored_name`."""
    return _staged(store, lambda tmp: shutil.copyfile(model_file, tmp / stored_name))


def _staged(store: Path, copy: Callable[[Path], object]) -> Path:
    incoming = store / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    for leftover in incoming.iterdir():
        if time.time() - leftover.stat().st_mtime > STALE_S:
            remove_tree(leftover)
    tmp = Path(tempfile.mkdtemp(prefix="v-", dir=incoming))
    try:
        copy(tmp)
    except BaseException:
        remove_tree(tmp)
        raise
    return tmp


def make_readonly(directory: Path) -> None:
    """Files 0444 and folders 0555 less the umask (so 0440 and 0550 under 027), deepest first (a read-only
    folder's entries can no longer be changed)."""
    from sdpipe.models.format import set_modes

    set_modes(directory, 0o555, 0o444)


def remove_tree(directory: Path) -> None:
    """Remove a folder even if it was made read-only; a missing folder is fine."""
    if not directory.exists():
        return
    for root, dirs, _ in os.walk(directory):
        for d in dirs:
            Path(root, d).chmod(stat.S_IRWXU)
    directory.chmod(stat.S_IRWXU)
    shutil.rmtree(directory)
