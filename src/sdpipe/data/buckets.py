"""Aspect-ratio buckets for text-to-image training: geometry only.

`make_buckets` lists (width, height) shapes of about `resolution**2` pixels, sides multiples of `step`;
`plan_buckets` gives each image the bucket nearest its aspect ratio (in log ratio), `fit_to_bucket` resizes an
image to cover its bucket and centre-crops only the rounding, and `BucketSampler` draws whole batches from one
bucket at a time, every draw from the run's generator, so a resumed run sees the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

Size = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int = 64, max_aspect_ratio: float = 2.0) -> list[Size]:
    """Bucket shapes (width, height), sorted by width: sides multiples of `step`, area at most `resolution**2`.

    For each short side s (a multiple of `step`, s*s <= area) the long side is the largest multiple of `step`
    with s*l <= area and l <= max_aspect_ratio*s; shorter sides stop at the first one whose long side the ratio
    limit cut (that one is kept, the bucket at the limit, if it is narrower than the others). The square of
    the largest short side is always one. Every bucket comes in both orientations."""
    if step < 1 or resolution < step:
        raise ValueError(f"buckets need resolution >= step >= 1 (got resolution={resolution}, step={step})")
    if max_aspect_ratio < 1:
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be at least 1 (long side / short side)")
    area = resolution * resolution
    short = math.isqrt(area) // step * step
    found: set[Size] = {(short, short)}  # square images keep a square bucket even when resolution % step != 0
    widest = 1.0
    while short >= step:
        by_area = area // short // step * step
        by_ratio = int(max_aspect_ratio * short + 1e-9) // step * step
        long = min(by_area, by_ratio)
        if long >= short and long / short > widest:
            found |= {(short, long), (long, short)}
            widest = long / short
        if by_ratio < by_area:
            break
        short -= step
    return sorted(found)


def crop_fraction(size: Size, bucket: Size) -> float:
    """The share of an image of `size` that `fit_to_bucket` crops away (0 when the aspect ratios match)."""
    w, h = _cover(size, bucket)
    return 1.0 - (bucket[0] * bucket[1]) / (w * h)


def _cover(size: Size, bucket: Size) -> Size:
    """The size an image is resized to so that it covers `bucket` with its aspect ratio kept (to the pixel)."""
    w, h = size
    scale = max(bucket[0] / w, bucket[1] / h)
    return max(bucket[0], round(w * scale)), max(bucket[1], round(h * scale))


def fit_to_bucket(
    image: Image.Image, bucket: Size, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """`image` resized to cover `bucket` (aspect ratio kept), then centre-cropped to exactly `bucket`."""
    bw, bh = bucket
    nw, nh = _cover(image.size, bucket)
    if (nw, nh) != image.size:
        image = image.resize((nw, nh), resample)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return image.crop((left, top, left + bw, top + bh)) if (nw, nh) != bucket else image


@dataclass(frozen=True)
class BucketPlan:
    """Which bucket each image of a set trains in; stored with the model (`to_json`)."""

    resolution: int
    step: int
    max_aspect_ratio: float
    buckets: tuple[Size, ...]
    assignment: tuple[int, ...]  # bucket index per image
    crop_fractions: tuple[float, ...] = field(default=())  # per image, as `crop_fraction` (empty: unknown)

    def counts(self) -> dict[str, int]:
        """Images per bucket, "WxH" -> n, for every bucket (0 for an empty one)."""
        n = [0] * len(self.buckets)
        for b in self.assignment:
            n[b] += 1
        return {f"{w}x{h}": c for (w, h), c in zip(self.buckets, n, strict=True)}

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "step": self.step,
            "max_aspect_ratio": self.max_aspect_ratio,
            "buckets": [list(b) for b in self.buckets],
            "assignment": list(self.assignment),
            "crop_fractions": list(self.crop_fractions),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BucketPlan:
        try:
            return cls(
                int(d["resolution"]),
                int(d["step"]),
                float(d["max_aspect_ratio"]),
                tuple((int(w), int(h)) for w, h in d["buckets"]),
                tuple(int(b) for b in d["assignment"]),
                tuple(float(c) for c in d.get("crop_fractions", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"not a bucket plan ({why}); expected what BucketPlan.to_json() writes") from None

    def summary(self) -> dict[str, Any]:
        """For the training report: the geometry, images per bucket and how much cropping it costs."""
        crops = self.crop_fractions
        return {
            "resolution": self.resolution,
            "step": self.step,
            "max_aspect_ratio": self.max_aspect_ratio,
            "images": len(self.assignment),
            "buckets": self.counts(),
            "cropped_share": sum(c > 1e-3 for c in crops) / len(crops) if crops else None,
            "mean_crop_fraction": sum(crops) / len(crops) if crops else None,
            "max_crop_fraction": max(crops) if crops else None,
        }


def plan_buckets(sizes: Sequence[Size], resolution: int, step: int = 64, max_aspect_ratio: float = 2.0) -> BucketPlan:
    """Each image (width, height) to the bucket nearest its aspect ratio in log ratio (ties: the first)."""
    buckets = make_buckets(resolution, step, max_aspect_ratio)
    logs = [math.log(w / h) for w, h in buckets]
    assignment = []
    for i, (w, h) in enumerate(sizes):
        if w < 1 or h < 1:
            raise ValueError(f"image {i} has size {w}x{h}; every image needs a positive width and height")
        r = math.log(w / h)
        assignment.append(min(range(len(buckets)), key=lambda b: abs(logs[b] - r)))
    crops = tuple(crop_fraction(s, buckets[b]) for s, b in zip(sizes, assignment, strict=True))
    return BucketPlan(resolution, step, max_aspect_ratio, tuple(buckets), tuple(assignment), crops)


class _Stream:
    """An endless run of one bucket's images: a fresh permutation each time the last one is used up."""

    def __init__(self, members: torch.Tensor, gen: torch.Generator) -> None:
        self.members, self.gen = members, gen
        self.order = members[torch.randperm(len(members), generator=gen)]
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k:
            if self.pos == len(self.order):
                self.order, self.pos = self.members[torch.randperm(len(self.members), generator=self.gen)], 0
            part = self.order[self.pos : self.pos + k]
            parts.append(part)
            self.pos += len(part)
            k -= len(part)
        return torch.cat(parts)


class BucketSampler:
    """Batches of exactly `batch_size` images all from one bucket, like `EpochSampler` for one shape.

    An epoch holds ceil(n_b / batch_size) batches of each bucket b, in a shuffled order. Each bucket's images
    come from its own run of permutations: a bucket's last short batch is topped up from that bucket's next
    permutation (which the next epoch then continues), so with counts that are multiples of `batch_size` every
    image is seen once per epoch, and otherwise each is seen once per permutation of its bucket; a bucket
    smaller than a batch repeats images within it. All draws come from `gen`: the bucket permutations (in
    bucket order, as needed) and then the order of the epoch's batches."""

    def __init__(self, assignment: Sequence[int], batch_size: int, gen: torch.Generator) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: a batch needs at least one image")
        if not len(assignment):
            raise ValueError("no images to sample: the bucket assignment is empty")
        self.assignment = torch.as_tensor(list(assignment), dtype=torch.int64)
        self.batch_size, self.gen = batch_size, gen
        self.bucket_ids = torch.unique(self.assignment)  # sorted
        members = [torch.nonzero(self.assignment == b).flatten() for b in self.bucket_ids.tolist()]
        self.streams = [_Stream(m, gen) for m in members]
        self._new_epoch()

    def _new_epoch(self) -> None:
        batches, buckets = [], []
        for b, stream in zip(self.bucket_ids.tolist(), self.streams, strict=True):
            for _ in range(-(-len(stream.members) // self.batch_size)):
                batches.append(stream.take(self.batch_size))
                buckets.append(b)
        order = torch.randperm(len(batches), generator=self.gen)
        self.batches = torch.stack(batches)[order]
        self.batch_buckets = torch.as_tensor(buckets, dtype=torch.int64)[order]
        self.pos = 0

    def next(self) -> tuple[int, torch.Tensor]:
        """(bucket index, `batch_size` image indices from that bucket)."""
        if self.pos == len(self.batches):
            self._new_epoch()
        bucket, batch = int(self.batch_buckets[self.pos]), self.batches[self.pos].clone()
        self.pos += 1
        return bucket, batch

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (a checkpoint saves the tensors with safetensors/torch and the ints as JSON)."""
        return {
            "batches": self.batches.clone(),
            "batch_buckets": self.batch_buckets.clone(),
            "pos": self.pos,
            "stream_orders": torch.cat([s.order for s in self.streams]),
            "stream_pos": torch.as_tensor([s.pos for s in self.streams], dtype=torch.int64),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        orders, stream_pos = d["stream_orders"], d["stream_pos"]
        if len(orders) != len(self.assignment) or len(stream_pos) != len(self.streams):
            raise ValueError(
                f"sampler state holds {len(orders)} images in {len(stream_pos)} buckets, this data set "
                f"{len(self.assignment)} in {len(self.streams)}: resume with the data and bucket plan it was saved with"
            )
        start = 0
        for stream, pos in zip(self.streams, stream_pos.tolist(), strict=True):
            stream.order, stream.pos = orders[start : start + len(stream.members)].clone(), int(pos)
            start += len(stream.members)
        self.batches, self.batch_buckets = d["batches"].clone(), d["batch_buckets"].clone()
        self.pos = int(d["pos"])
