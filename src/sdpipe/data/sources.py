"""Every source kind as one stream of `Item`s, read with the library made for it.

folder (sdpipe.data.folder), hf (`datasets.load_from_disk`), parquet (`datasets` streaming Parquet reader),
webdataset (`webdataset.WebDataset`, streamed shard by shard), arrays (`.npy` memory-mapped, `.npz`), digits
(sklearn). An item is one sample (for containers: one row, tar sample or array index) with what the source
says about it; the bytes are read and checked later, by `sdpipe.data.validate`. `read_member` gets one
sample's bytes back for training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdpipe.data.readers import IMAGE_EXTENSIONS

KINDS = ("folder", "hf", "parquet", "webdataset", "arrays", "digits")
SEP = "::"  # between a container file and a member in a shown path


class SourceError(ValueError):
    """The source cannot be opened at all (missing, wrong kind); the message says what to do."""


@dataclass
class Item:
    path: str  # shown path: a file, or "container::member"
    file: str | None = None  # an on-disk file holding the sample (folder) or the container
    member: str | None = None  # the sample inside the container: row index, tar key, array index
    data: bytes | None = None  # bytes already read by the container's reader
    array: np.ndarray | None = None  # arrays and digits sources
    label: int | None = None
    caption: str | None = None
    split: str | None = None  # given by the source (split folders, DatasetDict); else from the content hash
    skip: str | None = None  # not a sample, with the reason
    problem: str | None = None  # known to be bad before reading, with the reason
    caption_problem: tuple[str, str] | None = None  # (caption file, why) when it could not be read


@dataclass
class Source:
    kind: str
    root: str
    class_names: list[str] | None
    items: Iterator[Item]
    class_names_after: Callable[[], list[str] | None] | None = None  # for sources that learn them as they go
    image_column: str | None = None  # hf/parquet: the column the images were read from


def detect_kind(path: str) -> str:
    """The source kind a path looks like (a folder of images unless it says otherwise)."""
    if path == "digits" and not Path(path).exists():  # a folder named digits is a folder (say ./digits)
        return "digits"
    p = Path(path)
    if not p.exists():
        raise SourceError(f"{path}: no such file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        kinds = {".tar": "webdataset", ".parquet": "parquet", ".npz": "arrays", ".npy": "arrays"}
        if suffix not in kinds:
            raise SourceError(f"{path}: a single file must be .tar, .parquet, .npz or .npy (or give a folder)")
        return kinds[suffix]
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        return "hf"
    names = [Path(f).suffix.lower() for _, _, files in os.walk(p) for f in files[:50]]
    if names and all(s == ".tar" for s in names):
        return "webdataset"
    if names and all(s == ".parquet" for s in names):
        return "parquet"
    return "folder"


def open_source(kind: str, path: str, cfg: Any) -> Source:
    """Open `path` as a source of `kind` (`cfg` is the DataConfig); items stream, nothing is loaded whole."""
    if kind != "digits" and not Path(path).exists():
        raise SourceError(f"{path}: no such file or folder")
    if kind == "folder":
        from sdpipe.data.folder import walk_folder

        layout, items = walk_folder(Path(path), cfg.labels, cfg.caption_column)
        return Source(kind, path, layout.class_names, items)
    if kind == "hf":
        from sdpipe.data.tables import open_hf

        return open_hf(path, cfg)
    if kind == "parquet":
        from sdpipe.data.tables import open_parquet

        return open_parquet(path, cfg)
    if kind == "webdataset":
        return _open_webdataset(path)
    if kind == "arrays":
        return _open_arrays(path, cfg)
    if kind == "digits":
        return _open_digits()
    raise SourceError(f"unknown source kind {kind!r}; one of {', '.join(KINDS)}")


def files_under(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself if it is a file, else every file under it with one of `suffixes`, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(q for q in p.rglob("*") if q.suffix.lower() in suffixes and q.is_file())


# --- webdataset ---------------------------------------------------------------------------------------------

WDS_IMAGE_KEYS = tuple(ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS))


def _open_webdataset(path: str) -> Source:
    shards = files_under(path, (".tar",))
    if not shards:
        raise SourceError(f"{path}: no .tar shards found")
    top = {"label": -1}

    def items() -> Iterator[Item]:
        for shard in shards:
            yield from _shard_items(shard, top)

    def names() -> list[str] | None:
        return [str(i) for i in range(top["label"] + 1)] if top["label"] >= 0 else None

    return Source("webdataset", path, None, items(), class_names_after=names)


def _shard_items(shard: Path, top: dict[str, int]) -> Iterator[Item]:
    import webdataset as wds

    errors: list[Exception] = []

    def keep_going(exc: Exception) -> bool:
        errors.append(exc)
        return True

    stream = wds.WebDataset(str(shard), shardshuffle=False, handler=keep_going, empty_check=False)
    try:
        for sample in stream:
            yield _wds_item(shard, sample, top)
    except Exception as exc:  # noqa: BLE001 - a broken shard is quarantined, never a crash
        errors.append(exc)
    for err in errors:
        yield Item(path=str(shard), problem=f"unreadable tar shard ({type(err).__name__}: {err})")


def _wds_item(shard: Path, sample: dict, top: dict[str, int]) -> Item:
    key = str(sample.get("__key__"))
    ext = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
    shown = f"{shard}{SEP}{key}"
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        return Item(path=shown, skip=f"tar sample without an image (members: {', '.join(found) or 'none'})")
    label = None
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode().strip())
        except ValueError:
            return Item(path=f"{shown}.{ext}", problem=f"label (.cls) is not an integer: {sample['cls'][:20]!r}")
        top["label"] = max(top["label"], label)
    caption, problem = decode_caption(sample["txt"]) if "txt" in sample else (None, None)
    return Item(
        path=f"{shown}.{ext}",
        file=str(shard),
        member=f"{key}.{ext}",
        data=sample[ext],
        label=label,
        caption=caption,
        caption_problem=(f"{shown}.txt", problem) if problem else None,
    )


def decode_caption(raw: bytes) -> tuple[str | None, str | None]:
    """(caption, None) for UTF-8 text (a leading BOM dropped, whitespace stripped), else (None, why)."""
    try:
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); re-save it as UTF-8"


def read_tar_member(shard: str, member: str, cache: dict[str, Any]) -> bytes:
    """One member's bytes from a tar shard; the shard's index is built once and kept in `cache`."""
    import tarfile

    tar = cache.get(shard)
    if tar is None:
        tar = cache[shard] = tarfile.open(shard, "r:")  # noqa: SIM115 - kept open in the cache
    for prefix in ("", "./"):
        try:
            f = tar.extractfile(prefix + member)
        except KeyError:
            continue
        if f is not None:
            return f.read()
    raise FileNotFoundError(f"{shard}: member {member} is gone; re-run sdpipe data validate")


# --- arrays and digits ---------------------------------------------------------------------------------------


def load_arrays(path: str, images_key: str | None, labels_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The images array (memory-mapped for .npy) and the labels array, if any."""
    p = Path(path)
    if p.suffix.lower() == ".npy":
        images = np.load(p, mmap_mode="r", allow_pickle=False)
        labels = np.load(labels_key, allow_pickle=False) if labels_key else None
        return images, labels
    with np.load(p, allow_pickle=False) as z:
        keys = list(z.keys())
        key = images_key or next((k for k in ("images", "x", "X") if k in keys), None)
        key = key or next((k for k in keys if z[k].ndim in (3, 4)), None)
        if key is None or key not in keys:
            raise SourceError(f"{path}: no images array (keys: {keys}); set data.images_key")
        lkey = labels_key or next((k for k in ("labels", "y", "targets") if k in keys), None)
        return z[key], (z[lkey] if lkey in keys else None)


def _open_arrays(path: str, cfg: Any) -> Source:
    try:
        images, labels = load_arrays(path, cfg.images_key, cfg.labels_key)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read arrays ({exc})") from None
    if images.ndim not in (3, 4):
        raise SourceError(f"{path}: images array has shape {images.shape}; expected (N, H, W) or (N, H, W, C)")
    if labels is not None and len(labels) != len(images):
        raise SourceError(f"{path}: {len(images)} images but {len(labels)} labels")
    names = None
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.min(initial=0) < 0:
            raise SourceError(f"{path}: labels must be integers >= 0, got {labels.dtype}")
        names = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]

    def items() -> Iterator[Item]:
        for i in range(len(images)):
            label = int(labels[i]) if labels is not None else None
            yield Item(path=f"{path}{SEP}{i}", file=path, member=str(i), array=np.asarray(images[i]), label=label)

    return Source("arrays", path, names, items())


def _open_digits() -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.astype(np.uint8)  # integer values 0..16

    def items() -> Iterator[Item]:
        for i in range(len(pixels)):
            yield Item(path=f"digits{SEP}{i}", member=str(i), array=pixels[i], label=int(bunch.target[i]))

    return Source("digits", "digits", [str(n) for n in bunch.target_names], items())
