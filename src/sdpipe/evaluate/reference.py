"""FID and KID of generated images against a folder of reference images, with the reference's own score as the floor.

The protocol of `sdpipe evaluate` for the digits (README, "How quality is judged"), for a folder of images with no
labels: the reference folder is split in two by content hash (files sorted by the sha256 of their bytes, every
other one held out), so the split does not depend on file names or order, and an image that appears twice is
counted once. Every sample set is compared with the **held-out half**; the other half, drawn in sets of the same
size as the generated ones, is compared with the held-out half in the same way. That self-split FID is the
**floor**: what real images of this kind score against these held-out images at this sample size (FID is biased
upwards at small n, so a figure means something only next to it). `fid_ratio` = FID / floor FID per set, the
counterpart of the judge's Frechet ratio: 1.0 = as close to the held-out images as other reference images are.

Both sides of every comparison have the same size m = min(images per set, images in the floor half): the first m
images of each set (their prompts cycle, so they stay balanced) and m floor images drawn without replacement.
Features are the ones `sdpipe evaluate` uses (`sdpipe.evaluate.features`): Inception-v3 pool3 from a local,
sha256-checked file, or CLIP image embeddings (`sdpipe.evaluate.clip.ClipFeatures`). Reference features are
cached like the digits' held-out features (`real_features`), by feature name and the part's content id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdpipe.evaluate.features import FeatureExtractor, real_features
from sdpipe.evaluate.intervals import interval
from sdpipe.evaluate.metrics import fid_kid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_IMAGES = 4  # 2 held out to compare with, 2 to score the reference itself (FID needs 2 a side)


@dataclass
class Reference:
    """The distinct images of a reference folder (uint8 RGB, any sizes), split by content hash."""

    folder: Path
    files: list[str]  # relative to the folder, one per distinct image
    images: list[np.ndarray]
    hashes: list[str]
    heldout: list[int]  # indices compared against
    floor: list[int]  # indices scored against the held-out ones, for scale
    duplicates: int  # files left out because an earlier file had the same bytes

    def part_id(self, part: list[int]) -> str:
        digest = hashlib.sha256("".join(sorted(self.hashes[i] + "\n" for i in part)).encode()).hexdigest()
        return f"reference:sha256:{digest[:16]}"

    def pixels(self, part: list[int]) -> np.ndarray:
        """The part's images as a 1-d object array (sizes may differ), for `ShapeGrouped`."""
        out = np.empty(len(part), dtype=object)
        for j, i in enumerate(part):
            out[j] = self.images[i]
        return out


def read_reference(folder: str | Path) -> Reference:
    """Every image under `folder` (subfolders too; dot-files skipped), as RGB. Raises FileNotFoundError or
    ValueError naming the folder or the file."""
    folder = Path(folder)
    what = f"--reference {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no such folder")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not paths:
        raise ValueError(f"{what}: no images in it (looked for {' '.join(IMAGE_SUFFIXES)} files, in subfolders too)")
    files, images, hashes = [], [], []
    seen: set[str] = set()
    for p in paths:
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:
            continue
        try:
            with Image.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ValueError(f"{what}: {p.relative_to(folder)} is not an image sdpipe can read ({exc})") from None
        seen.add(sha)
        files.append(p.relative_to(folder).as_posix())
        images.append(rgb)
        hashes.append(sha)
    if len(images) < MIN_IMAGES:
        raise ValueError(
            f"{what}: {len(images)} distinct image(s); FID and KID need at least {MIN_IMAGES}: half are held out to "
            "compare with, the other half scores the reference itself"
        )
    order = sorted(range(len(hashes)), key=lambda i: hashes[i])
    return Reference(folder, files, images, hashes, order[0::2], order[1::2], len(paths) - len(images))


class ShapeGrouped:
    """An extractor taking a 1-d object array of images of any sizes: images of one size go through the
    extractor together (Inception resizes inside the network, CLIP's processor resizes each image), in order."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor
        self.name = extractor.name
        self.description = extractor.description

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Features of (N, H, W, C) uint8 images, or of a 1-d object array of (H, W, C) images of any sizes."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(pixels):
            groups.setdefault(tuple(image.shape), []).append(i)
        out: list[np.ndarray | None] = [None] * len(pixels)
        for idx in groups.values():
            feats = self.extractor.features(np.stack([pixels[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return np.stack([f for f in out if f is not None])


def reference_scores(
    extractor: FeatureExtractor, ref: Reference, sets: list[np.ndarray], *, seed: int = 0
) -> tuple[dict, list[dict]]:
    """FID, KID, the floor (the reference's self-split FID/KID) and their ratio for each generated set (uint8
    (N, H, W, 3) arrays), each set's generated side and floor side of equal size; returns (summary with 95 %
    intervals over the sets, the per-set rows)."""
    grouped = ShapeGrouped(extractor)
    real = real_features(grouped, ref.pixels(ref.heldout), ref.part_id(ref.heldout))
    floor = real_features(grouped, ref.pixels(ref.floor), ref.part_id(ref.floor))
    per_set = min(len(s) for s in sets)
    m = min(per_set, len(floor))
    rows: list[dict] = []
    for k, images in enumerate(sets):
        gen = fid_kid(real, extractor.features(images[:m]), seed=seed + k)
        draw = np.random.default_rng(seed + k).choice(len(floor), m, replace=False)
        own = fid_kid(real, floor[draw], seed=seed + k)
        rows.append(
            {
                "fid": gen["fid"],
                "kid_mean": gen["kid_mean"],
                "kid_std": gen["kid_std"],
                "floor_fid": own["fid"],
                "floor_kid_mean": own["kid_mean"],
                "fid_ratio": gen["fid"] / own["fid"] if own["fid"] > 1e-12 else None,
                "kid_subset_size": gen["kid_subset_size"],
            }
        )
    summary: dict = {
        "features": {"name": extractor.name, "description": extractor.description},
        "folder": str(ref.folder),
        "images": len(ref.images),
        "duplicates_left_out": ref.duplicates,
        "heldout_images": len(ref.heldout),
        "heldout_id": ref.part_id(ref.heldout),
        "floor_images": len(ref.floor),
        "floor_id": ref.part_id(ref.floor),
        "compared_per_set": m,
        "kid_subset_size": rows[0]["kid_subset_size"],
    }
    for key in ("fid", "kid_mean", "kid_std", "floor_fid", "floor_kid_mean", "fid_ratio"):
        values = [float(r[key]) for r in rows if r[key] is not None]
        summary[key] = interval(values) if len(values) == len(rows) else None
    warnings = []
    if m < per_set:
        warnings.append(
            f"FID/KID compare {m} of the {per_set} images of each set: the reference's floor half has {len(floor)} "
            f"images and both sides must be the same size; give at least {2 * per_set} reference images to use all"
        )
    if len(sets) * m > len(floor):
        warnings.append(
            f"the floor's {len(sets)} draws of {m} share images (the floor half has {len(floor)}): its interval is "
            "narrower than independent draws would give"
        )
    if ref.duplicates:
        warnings.append(f"{ref.duplicates} reference file(s) repeat an earlier file's bytes and were counted once")
    summary["warnings"] = warnings
    return summary, rows
