"""Training data as a map-style set: `open_split(cfg, split)` -> `ImageSet`, whose `batch(indices, gen)`
reads, preprocesses and scales just those samples. For text-to-image training it also exposes each sample's
caption, stored size and pixel digest, and `pixels(i, size)`: one image fitted to an aspect-ratio bucket.

Sources other than digits are read lazily from the validated manifest (only the rows' locators are held,
in Arrow columns); each file's bytes are checked against the sha256 recorded at validation, so a file that
changed since is an error, never silently different data. Digits are held in memory. Random crops and
flips are drawn only from the `gen` passed in (one seed per sample), so a resumed run is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdpipe.config import DataConfig
from sdpipe.data.buckets import fit_to_bucket
from sdpipe.data.digits import Dataset, load_dataset, to_model_range, to_source_range
from sdpipe.data.manifest import MANIFEST, REPORT
from sdpipe.data.preprocess import FILTERS, Preprocess
from sdpipe.data.readers import array_pixels, decode_image
from sdpipe.data.sources import load_arrays, read_tar_member
from sdpipe.data.splits import stratified_test
from sdpipe.data.versioning import SourceChangedError


class ImageSet:
    """`len(s)` samples of one split; `s.batch(indices, gen)` -> (images (B, C, H, W) in [-1, 1], labels (B,)).

    Unlabelled data has `class_names` None and labels all 0. `captions` (None where a sample has none), `sizes`
    ((width, height) as stored) and `digests` (the sha256 of each sample's decoded pixels) are per sample."""

    def __init__(
        self,
        reader: Any,
        labels: np.ndarray,
        class_names: list[str] | None,
        value_range: tuple[float, float],
        dataset_id: str,
        preprocess: Preprocess,
        stored_size: tuple[int, int],
        workers: int = 1,
        in_memory: np.ndarray | None = None,
        split: str = "train",
        split_id: str | None = None,
        captions: list[str | None] | None = None,
        sizes: list[tuple[int, int]] | None = None,
        digests: list[str] | None = None,
    ) -> None:
        self._reader, self._labels = reader, labels
        self._in_memory = in_memory  # (N, C, H, W) as stored: used when preprocessing changes nothing
        self.class_names, self.value_range, self.dataset_id = class_names, value_range, dataset_id
        self.split, self.split_id = split, split_id or dataset_id  # split_id: a content hash of this split alone
        self.preprocess = preprocess
        h, w = preprocess.output_size(*stored_size)
        self.image_shape = (preprocess.channels, h, w)
        self._pool = ThreadPoolExecutor(workers) if workers > 1 else None
        n = len(labels)
        self.captions: list[str | None] = captions if captions is not None else [None] * n
        self.sizes: list[tuple[int, int]] = sizes if sizes is not None else [(stored_size[1], stored_size[0])] * n
        self.digests: list[str] = digests if digests is not None else [""] * n

    def __len__(self) -> int:
        return len(self._labels)

    def batch(
        self, indices: torch.Tensor, gen: torch.Generator, select: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `indices`, preprocessed and scaled to [-1, 1], with their labels.

        Draws one seed per sample from `gen` (only when cropping or flipping at random), then decodes only
        `indices[select]` (e.g. one process's slice) with the same draws as the whole batch would use."""
        if (
            self._in_memory is not None
            and self._in_memory.shape[1:] == self.image_shape
            and not self.preprocess.is_random
        ):
            chosen_idx = indices[select] if select is not None else indices
            x = to_model_range(self._in_memory[chosen_idx.numpy()], self.value_range)
            return x, torch.as_tensor(self._labels[chosen_idx.numpy()], dtype=torch.int64)
        idx = [int(i) for i in indices]
        seeds = torch.randint(0, 2**62, (len(idx),), generator=gen).tolist() if self.preprocess.is_random else None
        chosen = range(len(idx))[select] if select is not None else range(len(idx))
        jobs = [(idx[j], seeds[j] if seeds else None) for j in chosen]
        pixels = list(self._pool.map(self._one, jobs) if self._pool else map(self._one, jobs))
        if not pixels:
            return torch.zeros((0, *self.image_shape)), torch.zeros(0, dtype=torch.int64)
        x = to_model_range(torch.from_numpy(np.stack(pixels)), self.value_range)  # uint8 -> float in torch: fast
        y = torch.as_tensor(self._labels[[idx[j] for j in chosen]], dtype=torch.int64)
        return x, y

    def _one(self, job: tuple[int, int | None]) -> np.ndarray:
        i, seed = job
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return self.preprocess(self._reader(i), gen)

    def pixels(self, i: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Sample i decoded and channel-converted, fitted to `size` (width, height) by `fit_to_bucket` (None: as
        stored); never cropped or flipped at random. uint8 (C, H, W), 0..255 whatever the source's range."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: this {self.split} split has {len(self)} samples")
        raw = np.asarray(self._reader(i))
        hi = self.value_range[1]
        if hi != 255:  # e.g. digits (0..16): to the 8-bit range a VAE cache expects
            raw = np.round(raw.astype(np.float64) * (255.0 / hi)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(raw).convert("L" if self.preprocess.channels == 1 else "RGB")
        if size is not None:
            im = fit_to_bucket(im, (int(size[0]), int(size[1])), FILTERS[self.preprocess.resize_filter])
        out = np.asarray(im, dtype=np.uint8)
        return np.ascontiguousarray(out[None] if out.ndim == 2 else out.transpose(2, 0, 1))

    def metadata(self) -> dict[str, Any]:
        """What a model trained on this set records: data identity, range and preprocessing."""
        return {
            "dataset_id": self.dataset_id,
            "split": self.split,
            "split_id": self.split_id,
            "value_range": list(self.value_range),
            "image_shape": list(self.image_shape),
            "class_names": self.class_names,
            "preprocess": self.preprocess.as_dict(),
        }


def _preprocess(cfg: DataConfig, native_channels: int) -> Preprocess:
    channels = {"grayscale": 1, "rgb": 3}.get(cfg.channels, native_channels)
    return Preprocess(channels, cfg.resolution, cfg.resize_filter, cfg.crop, cfg.random_flip)


def open_split(cfg: DataConfig, split: str = "train") -> ImageSet:
    """The samples of `split` ("train", "validation", "test") of the configured source, ready to batch."""
    if cfg.source == "digits":
        return _digits_split(cfg, split)
    if not cfg.validated_dir:
        raise ValueError(
            f"data.source={cfg.source} is read from its validated manifest: run "
            f"`sdpipe data validate {cfg.path or 'SOURCE'} --out DIR` and set data.validated_dir=DIR"
        )
    return _manifest_split(cfg, Path(cfg.validated_dir), split)


def _digits_split(cfg: DataConfig, split: str) -> ImageSet:
    from sdpipe.data.validate import pixel_digest

    data = load_dataset(cfg)
    images = data.images[:, 0].astype(np.uint8)  # integer values 0..16
    digests = [pixel_digest(im) for im in images]
    splits = stratified_test(digests, data.labels, cfg.validation_fraction, cfg.held_out)
    keep = [i for i, s in enumerate(splits) if s == split]
    if not keep:
        raise ValueError(f"the digits have no samples in split {split!r} with these data fractions")
    images, labels = images[keep], data.labels[keep]
    pp = _preprocess(cfg, 1)
    return ImageSet(
        images.__getitem__, labels, data.class_names, data.value_range, data.dataset_id, pp, (8, 8),
        in_memory=data.images[keep] if pp.resolution is None else None,
        split=split, split_id=content_id([digests[i] for i in keep], labels), digests=[digests[i] for i in keep],
    )  # fmt: skip


def _manifest_split(cfg: DataConfig, out: Path, split: str) -> ImageSet:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not (out / REPORT).is_file() or not (out / MANIFEST).is_file():
        raise ValueError(f"{out}: no validated data (manifest.parquet, report.json); run sdpipe data validate first")
    report = json.loads((out / REPORT).read_text())
    _check_same_settings(cfg, report.get("config", {}), out)
    if report["kind"] != cfg.source or (cfg.path and Path(cfg.path).resolve() != Path(report["source"]).resolve()):
        raise ValueError(
            f"{out} holds {report['kind']} data from {report['source']}, not data.source={cfg.source} "
            f"data.path={cfg.path}; validate that source into its own folder"
        )
    wanted = ["file", "member", "sha256", "pixel_sha256", "label", "split", "width", "height", "channels", "caption"]
    table = pq.read_table(out / MANIFEST, columns=wanted)
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise ValueError(f"{out}: no samples in split {split!r} (splits: {report['split_counts']})")
    each = list(zip(table["width"].to_pylist(), table["height"].to_pylist(), strict=True))
    sizes = set(each)
    if cfg.resolution is None and len(sizes) > 1 and not cfg.buckets:
        raise ValueError(
            f"{out}: {len(sizes)} different image sizes; set data.resolution to resize them to one, or "
            "data.buckets=true (with data.resolution) to train each in its aspect-ratio bucket"
        )
    native = int(pc.max(table["channels"]).as_py())
    labels = np.asarray(table["label"].fill_null(0).to_numpy(), dtype=np.int64)
    split_id = content_id(table["sha256"].to_pylist(), labels)
    columns = table.select(["file", "member", "sha256"])
    reader = _ManifestReader(report["kind"], report["source"], columns, cfg, report.get("image_column"))
    pp = _preprocess(cfg, native)
    workers = cfg.workers or os.cpu_count() or 1
    first_w, first_h = each[0]
    return ImageSet(
        reader, labels, report["class_names"], (0.0, 255.0), report["dataset_id"], pp, (first_h, first_w), workers,
        split=split, split_id=split_id, captions=table["caption"].to_pylist(), sizes=each,
        digests=table["pixel_sha256"].to_pylist(),
    )  # fmt: skip


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether the configured source has samples in `split` (for a validated source: by its report)."""
    if cfg.source == "digits":
        return {"test": cfg.held_out, "validation": cfg.validation_fraction}.get(split, 1.0) > 0
    if not cfg.validated_dir or not (Path(cfg.validated_dir) / REPORT).is_file():
        return False
    counts = json.loads((Path(cfg.validated_dir) / REPORT).read_text()).get("split_counts", {})
    return counts.get(split, 0) > 0


def content_id(digests: list[str], labels: np.ndarray) -> str:
    """A content hash of a split: its samples' digests (in any order) with their labels."""
    h = hashlib.sha256()
    for digest, label in sorted(zip(digests, labels.tolist(), strict=True)):
        h.update(f"{digest}:{label}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


def split_arrays(cfg: DataConfig, split: str) -> Dataset:
    """A whole split in memory in the source's intensities, prepared as for training but never at random
    (centre crops, no flips): what the judge and `sdpipe evaluate` compare samples with."""
    fixed = cfg.model_copy(update={"crop": "center", "random_flip": False})
    data = open_split(fixed, split)
    x, y = data.batch(torch.arange(len(data)), torch.Generator())
    return Dataset(
        to_source_range(x, data.value_range).numpy(), y.numpy(), data.class_names or [], data.value_range, data.split_id
    )


# settings that change what validation accepts, labels or splits: training must use the validated ones
VALIDATION_KEYS = (
    "labels", "image_column", "label_column", "caption_column", "images_key", "labels_key",
    "min_size", "max_pixels", "validation_fraction", "test_fraction", "near_duplicate_bits",
)  # fmt: skip


def _check_same_settings(cfg: DataConfig, validated: dict[str, Any], out: Path) -> None:
    now = cfg.model_dump(mode="json") | {"test_fraction": cfg.held_out}  # the share, default or not
    differ = [
        f"data.{k}={now[k]!r} (validated with {validated[k]!r})"
        for k in VALIDATION_KEYS
        if k in validated and validated[k] != now[k]
    ]
    if differ:
        raise ValueError(
            f"{out} was validated with other settings: {', '.join(differ)}; validate again with these settings "
            f"(`sdpipe data validate {cfg.path or 'SOURCE'} --out {out}` with the same --config/--set), or train "
            "with --revalidate"
        )


def ensure_validated(cfg: DataConfig, revalidate: bool = False, show_progress: bool = False) -> None:
    """Before training: with `revalidate`, validate `cfg.path` into `cfg.validated_dir` again; otherwise
    refuse (`SourceChangedError`) a source that changed since it was validated. Nothing to do for digits."""
    if cfg.source == "digits":
        return
    if not cfg.validated_dir or not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path and data.validated_dir (see docs/data.md)")
    if revalidate:
        from sdpipe.data.validate import validate

        validate(cfg.path, cfg.validated_dir, cfg, kind=cfg.source, show_progress=show_progress)
        return
    from sdpipe.data.versioning import check_source_unchanged

    check_source_unchanged(cfg.validated_dir)


class _ManifestReader:
    """Sample i's pixels from the source, checked against the sha256 the manifest recorded."""

    def __init__(self, kind: str, source: str, table: Any, cfg: DataConfig, image_column: str | None) -> None:
        self.kind, self.source, self.cfg = kind, source, cfg
        self.columns = [table[c].combine_chunks() for c in ("file", "member", "sha256")]  # one chunk: fast [i]
        self.image_column = image_column or cfg.image_column
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()  # container readers (tar, Arrow) are not shared between threads

    def __call__(self, i: int) -> np.ndarray:
        file, member, sha = (column[i].as_py() for column in self.columns)
        if self.kind == "arrays":
            arr = np.ascontiguousarray(self._arrays()[int(member)])
            raw = f"{arr.dtype}{arr.shape}".encode() + arr.tobytes()
            self._verify(raw, sha, f"{file}::{member}")
            return array_pixels(arr, 1).pixels
        raw = self._bytes(file, member)
        self._verify(raw, sha, file if member is None else f"{file}::{member}")
        return decode_image(raw, 1, self.cfg.max_pixels).pixels

    def _bytes(self, file: str, member: str | None) -> bytes:
        if self.kind == "folder":
            with open(file, "rb") as f:
                return f.read()
        with self._lock:
            if self.kind == "webdataset":
                return read_tar_member(file, str(member), self._cache)
            if "tables" not in self._cache:
                from sdpipe.data.tables import TableReader

                self._cache["tables"] = TableReader(self.kind, self.source, self.image_column)
            return self._cache["tables"].read(file, str(member))

    def _arrays(self) -> np.ndarray:
        with self._lock:
            if "arrays" not in self._cache:
                self._cache["arrays"] = load_arrays(self.source, self.cfg.images_key, self.cfg.labels_key)[0]
            return self._cache["arrays"]

    def _verify(self, raw: bytes, sha: str, where: str) -> None:
        if hashlib.sha256(raw).hexdigest() != sha:
            raise SourceChangedError(
                f"{where} changed since it was validated; re-validate with: sdpipe data validate {self.source} "
                f"--out {self.cfg.validated_dir}"
            )
