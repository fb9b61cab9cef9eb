"""On-disk caches for text-to-image training: VAE latents of the (bucketed) images, and text embeddings.

- `LatentCache` keys an image's latents by (pixel sha256, preprocessing, bucket, flip, VAE hash, dtype) and
  stores the VAE posterior's mean and std, never a sample: the trainer draws `mean + std * randn(gen)` with the
  training generator, so a resumed run stays exact. They are stored in the encode dtype; a half-precision
  encode that is not finite is redone (and stored) in float32, and `get` returns float32 either way.
- `TextCache` keys a caption's embeddings by (caption, encoder hash: tokenizer, text encoder, clip skip) and
  always holds the empty caption (for caption dropout).

Both write safetensors shards through `cache_store.ShardStore` (atomic shards, a JSON index): a changed key
rebuilds only the entries it touches, and a build killed midway keeps every complete shard. Everything lives
under `default_root()` = `$SDPIPE_CACHE_DIR/train` unless a root is given; `info` and `clear` look after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdpipe.models.hashes import cache_dir
from sdpipe.train.cache_store import ShardStore, clear_folder, folder_info

KINDS = ("latents", "text")
Progress = Callable[[int, int], None]
Bucket = tuple[int, int]  # (width, height)


def default_root() -> Path:
    """Where training caches live by default: `sdpipe.models.hashes.cache_dir() / "train"`."""
    return cache_dir() / "train"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LatentKey:
    """What an image's cached latents depend on."""

    pixel_sha256: str
    preprocess: str  # a short hash of the preprocessing settings (the caller's)
    bucket: Bucket  # (width, height)
    flip: bool
    vae: str  # the VAE weights' hash
    dtype: str  # the encode dtype asked for, e.g. "float16"

    def digest(self) -> str:
        fields = asdict(self) | {"bucket": list(self.bucket)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Per row: whether every value is finite."""
    return torch.isfinite(t.flatten(1)).all(dim=1)


class LatentCache:
    """The VAE latents (posterior mean and std) of training images in their buckets, encoded once.

    Images are encoded `batch_size` at a time on the VAE's device (in `encode_dtype`: pass the VAE in that dtype,
    else a copy is cast; the VAE given is never changed), and a shard is written once it holds `shard_rows`
    entries or more (whole batches)."""

    def __init__(
        self,
        root: Path,
        vae: Any,
        vae_hash: str,
        preprocess: str,
        *,
        encode_dtype: torch.dtype = torch.float32,
        shard_rows: int = 256,
        batch_size: int = 8,
    ) -> None:
        if shard_rows < 1 or batch_size < 1:
            raise ValueError(f"shard_rows={shard_rows} and batch_size={batch_size} must both be at least 1")
        self.vae, self.vae_hash, self.preprocess = vae, vae_hash, preprocess
        self.encode_dtype, self.shard_rows, self.batch_size = encode_dtype, shard_rows, batch_size
        self.store = ShardStore(Path(root) / "latents", "latents")
        self._vaes: dict[torch.dtype, Any] = {}
        self._sha: dict[str, str] = {}  # digest -> pixel sha256, for error messages

    def key(self, pixel_sha256: str, bucket: Bucket, flip: bool) -> LatentKey:
        w, h = bucket
        return LatentKey(pixel_sha256, self.preprocess, (int(w), int(h)), bool(flip), self.vae_hash,
                         _dtype_name(self.encode_dtype))  # fmt: skip

    def ensure(
        self,
        items: Sequence[tuple[int, str, Bucket]],
        load: Callable[[int, Bucket], np.ndarray],
        flips: bool,
        progress: Progress | None = None,
    ) -> dict[str, int]:
        """Encode what is missing of `items` (image index, pixel sha256, bucket), and their mirror images too
        when `flips`; `load(i, bucket)` gives image i fitted to the bucket, uint8 (C, H, W) in 0..255.
        Returns {"built", "reused", "redone_float32"} (entries, a flipped image counting as one)."""
        todo: dict[str, tuple[int, Bucket, bool]] = {}
        wanted: set[str] = set()
        for i, sha, bucket in items:
            for flip in (False, True) if flips else (False,):
                digest = self.key(sha, bucket, flip).digest()
                wanted.add(digest)
                if not self.store.has(digest):
                    todo.setdefault(digest, (int(i), (int(bucket[0]), int(bucket[1])), flip))
                    self._sha[digest] = sha
        counts = {"built": 0, "reused": len(wanted) - len(todo), "redone_float32": 0}
        rows = sorted(todo.items(), key=lambda kv: (kv[1][1], kv[1][0], kv[1][2]))  # by bucket: batches share a shape
        pending: dict[str, dict[str, torch.Tensor]] = {}
        try:
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start : start + self.batch_size]
                pending.update(self._encode_batch(batch, load, counts))
                counts["built"] += len(batch)
                if len(pending) >= self.shard_rows:
                    self._flush(pending)
                if progress is not None:
                    progress(counts["built"], len(rows))
            if pending:
                self._flush(pending)
        finally:
            if rows:
                self.store.save_index()
        return counts

    def _flush(self, pending: dict[str, dict[str, torch.Tensor]]) -> None:
        self.store.write(pending, self.vae_hash)
        pending.clear()

    def _encode_batch(
        self, batch: list[tuple[str, tuple[int, Bucket, bool]]], load: Callable[[int, Bucket], np.ndarray],
        counts: dict[str, int],
    ) -> dict[str, dict[str, torch.Tensor]]:  # fmt: skip
        groups: dict[Bucket, list[tuple[str, tuple[int, Bucket, bool]]]] = {}
        for row in batch:
            groups.setdefault(row[1][1], []).append(row)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for bucket, group in groups.items():
            loaded: dict[int, np.ndarray] = {}  # an image and its mirror image: loaded once
            for _, (i, _, _) in group:
                if i not in loaded:
                    loaded[i] = load(i, bucket)
            x = torch.stack([_to_model_input(loaded[i], bucket, flip, i) for _, (i, _, flip) in group])
            mean, std = self._encode(x, self.encode_dtype)
            rows = [(mean[j], std[j]) for j in range(len(group))]
            bad = torch.nonzero(~(_finite(mean) & _finite(std))).flatten().tolist()
            if bad and self.encode_dtype != torch.float32:  # half precision overflowed: those again in float32
                mean32, std32 = self._encode(x[bad], torch.float32)
                for k, j in enumerate(bad):
                    rows[j] = (mean32[k], std32[k])
                counts["redone_float32"] += len(bad)
            for (digest, (i, _, flip)), (m, s) in zip(group, rows, strict=True):
                if not (torch.isfinite(m).all() and torch.isfinite(s).all()):
                    raise FloatingPointError(
                        f"image {i} (pixel sha256 {self._sha[digest]}, bucket {bucket[0]}x{bucket[1]}"
                        f"{', flipped' if flip else ''}) encodes to NaN/Inf even in float32: check the image and "
                        "the VAE weights"
                    )
                out[digest] = {"mean": m.clone(), "std": s.clone()}
        return out

    def _encode(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior (mean, std) of `x` (B, 3, H, W) in [-1, 1], encoded in `dtype`: on the CPU, in `dtype`."""
        vae = self._vae(dtype)
        param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(x.to(param.device, dtype)).latent_dist
        return dist.mean.to("cpu", dtype), dist.std.to("cpu", dtype)

    def _vae(self, dtype: torch.dtype) -> Any:
        """The VAE in `dtype`: the one given when it is in that dtype already, else a copy (never changing it)."""
        if next(self.vae.parameters()).dtype == dtype:
            return self.vae
        if dtype not in self._vaes:
            quiet = logging.getLogger("diffusers.models.modeling_utils")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its "casting with to()" warning: the cast is intended here
            try:
                self._vaes[dtype] = copy.deepcopy(self.vae).to(dtype).eval()
            finally:
                quiet.setLevel(level)
        return self._vaes[dtype]

    def get(self, keys: Sequence[LatentKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked (mean, std) of `keys` (one bucket shape), float32 on the CPU."""
        if not keys:
            raise ValueError("get() needs at least one key (LatentCache.key(...))")
        entries = self.store.read([k.digest() for k in keys])
        shapes = {tuple(e["mean"].shape) for e in entries}
        if len(shapes) > 1:
            raise ValueError(f"latents of {len(shapes)} shapes {sorted(shapes)}: get() one bucket at a time")
        return torch.stack([e["mean"] for e in entries]).float(), torch.stack([e["std"] for e in entries]).float()


def _to_model_input(pixels: np.ndarray, bucket: Bucket, flip: bool, i: int) -> torch.Tensor:
    """uint8 (C, H, W) -> float32 (3, H, W) in [-1, 1]; grayscale is repeated to RGB, `flip` mirrors it."""
    w, h = bucket
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[1:] != (h, w) or pixels.shape[0] not in (1, 3):
        raise ValueError(
            f"load({i}, {bucket}) gave {pixels.dtype} {pixels.shape}; it must give uint8 (1 or 3, {h}, {w}) "
            "(ImageSet.pixels(i, bucket))"
        )
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 127.5 - 1.0
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x
    return x.flip(-1) if flip else x


class TextCache:
    """Text-encoder outputs per caption, encoded once; "" (caption dropout's empty prompt) always included."""

    def __init__(
        self, root: Path, encode: Callable[[list[str]], dict[str, torch.Tensor]], encoder_hash: str, *,
        batch_size: int = 32,
    ) -> None:  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.encode, self.encoder_hash, self.batch_size = encode, encoder_hash, batch_size
        self.store = ShardStore(Path(root) / "text", "text")

    def digest(self, caption: str) -> str:
        return hashlib.sha256(json.dumps([self.encoder_hash, caption]).encode()).hexdigest()[:32]

    def ensure(self, captions: Sequence[str], progress: Progress | None = None) -> dict[str, int]:
        """Encode the captions (and "") not cached yet; returns {"built", "reused"} (distinct captions)."""
        distinct = list(dict.fromkeys(["", *captions]))
        todo = [c for c in distinct if not self.store.has(self.digest(c))]
        try:
            self._build(todo, progress)
        finally:
            if todo:
                self.store.save_index()
        return {"built": len(todo), "reused": len(distinct) - len(todo)}

    def _build(self, todo: list[str], progress: Progress | None) -> None:
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            out = self.encode(list(chunk))
            entries = {}
            for j, caption in enumerate(chunk):
                parts = {name: t[j].detach().cpu().clone() for name, t in out.items()}
                if not all(torch.isfinite(t).all() for t in parts.values()):
                    shown = caption if len(caption) <= 60 else caption[:57] + "..."
                    raise FloatingPointError(
                        f"caption {shown!r} encodes to NaN/Inf: check the text encoder (dtype, weights)"
                    )
                entries[self.digest(caption)] = parts
            self.store.write(entries, self.encoder_hash)
            if progress is not None:
                progress(start + len(chunk), len(todo))

    def get(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each output (e.g. "prompt_embeds", "pooled") stacked over `captions`, float32 on the CPU."""
        if not captions:
            raise ValueError("get() needs at least one caption")
        entries = self.store.read([self.digest(c) for c in captions])
        names = sorted(entries[0]) if entries else []
        if any(sorted(e) != names for e in entries):
            raise ValueError("cached captions hold different outputs: clear the text cache and ensure() again")
        return {name: torch.stack([e[name] for e in entries]).float() for name in names}


def info(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per kind ("latents", "text"): entries, shards, bytes and the distinct encoder hashes."""
    base = Path(root) if root is not None else default_root()
    return {kind: folder_info(base / kind, kind) for kind in KINDS}


def clear(root: Path | None = None, kind: str | None = None) -> dict[str, dict[str, int]]:
    """Remove one kind's cache (or both); returns, per kind, the files, shards and bytes removed."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; use one of {', '.join(KINDS)}")
    base = Path(root) if root is not None else default_root()
    return {k: clear_folder(base / k) for k in ([kind] if kind else KINDS)}
