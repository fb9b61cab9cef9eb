"""An image folder, walked recursively in a fixed (sorted) order, one `Item` per file seen.

Layout, as in Hugging Face's imagefolder: class labels are the first-level subfolder names (or, when the
first level is made of split folders `train/`, `validation/` (`val/`, `valid/`), `test/`, the second level);
captions come from a same-name `.txt` beside an image or from a `metadata.jsonl` (`file_name` plus `text` or
`caption`, optionally `label` and `split`). Hidden files, sidecars and other files are skipped with a reason;
broken symlinks, symlink loops and non-UTF-8 names are quarantined before reading. Nothing is written.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sdpipe.data.readers import IMAGE_EXTENSIONS
from sdpipe.data.sources import Item, decode_caption

SPLIT_FOLDERS = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "test": "test",
}
METADATA = "metadata.jsonl"
_UNDECODABLE = "\0undecodable"  # key of a metadata row whose line is not UTF-8: why


@dataclass
class FolderLayout:
    split_level: bool  # the first level is split folders
    class_names: list[str] | None  # None: no labels


def folder_layout(root: Path, labels: str) -> FolderLayout:
    """Decide from the top of the tree whether there are split folders and class folders."""
    first = _subfolders(root)
    split_level = bool(first) and all(name in SPLIT_FOLDERS for name in first)
    parents = [root / name for name in first] if split_level else [root]
    if labels == "none":
        return FolderLayout(split_level, None)
    names = sorted({c for p in parents for c in _subfolders(p)})
    loose = any(_has_images(p) for p in parents)
    use = labels == "folder" or (names and not loose)
    return FolderLayout(split_level, names if use else None)


def _subfolders(path: Path) -> list[str]:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))


def _has_images(path: Path) -> bool:
    try:
        return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in os.scandir(path))
    except OSError:
        return False


def walk_folder(root: Path, labels: str, caption_column: str | None) -> tuple[FolderLayout, Iterator[Item]]:
    layout = folder_layout(root, labels)
    return layout, _items(root, layout, caption_column)


def _items(root: Path, layout: FolderLayout, caption_column: str | None) -> Iterator[Item]:
    metadata: dict[str, dict] = {}  # absolute image path -> its metadata.jsonl row
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                dirnames.remove(name)
                yield Item(path=_show(here / name), skip="symlink to a folder: not followed")
        names = sorted(filenames)
        bad_lines: list[str] = []
        if METADATA in names:
            rows, bad_lines = _read_metadata(here / METADATA)
            metadata.update(rows)
        stems = {Path(n).stem for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS}
        for name in names:
            item = _item(root, here / name, layout, stems, metadata, caption_column)
            if name == METADATA and bad_lines and item.skip:
                item.caption_problem = (item.path, "; ".join(bad_lines[:5]) + _more(len(bad_lines) - 5))
            yield item


def _show(path: Path) -> str:
    """A printable path, even for names that are not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _item(
    root: Path, path: Path, layout: FolderLayout, stems: set[str], metadata: dict[str, dict], caption_col: str | None
) -> Item:
    shown = _show(path)
    rel = path.relative_to(root)
    if shown != str(path):
        return Item(path=shown, problem="file name is not valid UTF-8: rename it (manifests and reports need text)")
    if any(part.startswith(".") for part in rel.parts):
        return Item(path=shown, skip="hidden file" if rel.name.startswith(".") else "inside a hidden folder")
    suffix = path.suffix.lower()
    if path.name == METADATA:
        return Item(path=shown, skip="metadata file (captions, labels)")
    if suffix not in IMAGE_EXTENSIONS:
        if suffix == ".txt" and path.stem in stems:
            return Item(path=shown, skip="caption sidecar of an image")
        return Item(path=shown, skip=f"not an image file ({suffix or 'no extension'})")
    problem = _link_problem(path)
    if problem:
        return Item(path=shown, problem=problem)
    meta = metadata.get(str(path), {})
    split, label, skip = _place(rel, layout, meta)
    if skip:
        return Item(path=shown, skip=skip)
    caption, unread = _caption(path, meta, stems, caption_col)
    return Item(path=shown, file=str(path), label=label, caption=caption, split=split, caption_problem=unread)


def _link_problem(path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"broken symlink -> {os.readlink(path)}" if path.is_symlink() else "file vanished while reading"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot stat ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (device, pipe or socket)"
    return None


def _place(rel: Path, layout: FolderLayout, meta: dict) -> tuple[str | None, int | None, str | None]:
    """(split, label, reason to skip) of an image from its place in the tree and its metadata."""
    parts = rel.parts[:-1]
    split = None
    if layout.split_level:
        split, parts = SPLIT_FOLDERS[parts[0]], parts[1:]
    split = SPLIT_FOLDERS.get(str(meta["split"]), str(meta["split"])) if "split" in meta else split
    if layout.class_names is None:
        return split, None, None
    name = str(meta["label"]) if "label" in meta else (parts[0] if parts else None)
    if name is None:
        return split, None, "not inside a class folder (data.labels=folder)"
    if name not in layout.class_names:
        return split, None, f"label {name!r} from metadata.jsonl is not a class folder"
    return split, layout.class_names.index(name), None


def _caption(
    path: Path, meta: dict, stems: set[str], caption_col: str | None
) -> tuple[str | None, tuple[str, str] | None]:
    """(caption, None), or (None, (caption file, why)) when the caption file cannot be decoded."""
    if _UNDECODABLE in meta:
        return None, (_show(path.parent / METADATA), meta[_UNDECODABLE])
    for key in [caption_col] if caption_col else ["text", "caption"]:
        if key in meta:
            return (None if meta[key] is None else str(meta[key])), None
    sidecar = path.with_suffix(".txt")
    if path.stem in stems and sidecar.is_file():
        try:
            raw = sidecar.read_bytes()
        except OSError as exc:
            return None, (_show(sidecar), f"unreadable ({exc.strerror or exc})")
        caption, problem = decode_caption(raw)
        return caption, (_show(sidecar), problem) if problem else None
    return None, None


def _read_metadata(path: Path) -> tuple[dict[str, dict], list[str]]:
    """imagefolder's metadata.jsonl: one JSON object a line with `file_name` relative to its folder.

    Returns the rows by absolute image path and what is wrong with the lines that cannot be used. A line that
    is not UTF-8 but names its file marks that image's caption undecodable (never U+FFFD in a caption)."""
    rows: dict[str, dict] = {}
    bad: list[str] = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        return rows, [f"unreadable ({exc.strerror or exc})"]
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        text, problem = decode_caption(raw)
        try:
            row = json.loads(text if text is not None else raw.decode("utf-8", "replace"))
        except json.JSONDecodeError:
            bad.append(f"line {n}: not JSON")
            continue
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str)):
            bad.append(f"line {n}: not an object with a file_name")
            continue
        if problem:
            row[_UNDECODABLE] = f"line {n}: {problem}"
        rows[str(path.parent / row["file_name"])] = row
    return rows, bad


def _more(n: int) -> str:
    return f"; ... {n} more" if n > 0 else ""
