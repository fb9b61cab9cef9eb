"""The judge of the shapes set: which coloured shapes an image shows, and whether its caption is right.

Fitted on rendered images only (`sdpipe.data.shapes`), lightly degraded (noise, blur, dimming) so it
tolerates generated-image fuzz. Reading an image: a pixel is foreground when its brightest channel reaches
`FOREGROUND`; its colour is the pure colour whose on-channels are those at least half its brightest;
4-connected foreground components (split by colour when no colour holds `DOMINANT` of one) of at least
`MIN_AREA` pixels are the shapes, each with its majority colour, its bounding-box centre, and a shape from a
random forest on mask features (fill, row and column profiles, a 6x6 thumbnail), fitted on all four shapes
(the base set's three and the fine-tune's `NEW_SHAPE`). A caption is right when the
image holds exactly its (colour, shape) pairs and, for a relation, the first centre is on the named side of
the second along the dominant axis (`relation_holds`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.ensemble import RandomForestClassifier

from sdpipe.data.shapes import (
    ALL_SHAPES,
    COLOURS,
    HELD_OUT_PAIRS,
    NEW_SHAPE,
    parse_caption,
    relation_holds,
    sample_shapes,
)
from sdpipe.evaluate.intervals import interval

FOREGROUND = 100  # least brightest-channel value of a shape pixel (of 255)
MIN_AREA = 20  # least pixels of a shape
DOMINANT = 0.6  # least share of its majority colour for a component to stay one shape
GROUPS = ("single/seen", "single/held_out", "relation/seen", "relation/held_out", "single/new", "relation/new")
_PATTERNS = {tuple(v > 0 for v in rgb): name for name, rgb in COLOURS.items()}
_NAMES = list(COLOURS)
_THUMB = 6

Found = tuple[str, str, float, float]  # (colour, shape, cx, cy)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index into `COLOURS` of its colour, or -1 for background."""
    img = np.asarray(image, dtype=np.float32)
    top = img.max(axis=-1)
    on = img >= 0.5 * top[..., None]
    labels = np.full(top.shape, -1, dtype=np.int64)
    for pattern, name in _PATTERNS.items():
        labels[np.all(on == np.array(pattern), axis=-1)] = _NAMES.index(name)
    labels[top < FOREGROUND] = -1
    return labels


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour index, mask) of each shape-sized component."""
    comps, n = ndimage.label(labels >= 0)
    out: list[tuple[int, np.ndarray]] = []
    for k in range(1, n + 1):
        mask = comps == k
        counts = np.bincount(labels[mask], minlength=len(_NAMES))
        if mask.sum() < MIN_AREA:
            continue
        if counts.max() >= DOMINANT * mask.sum():
            out.append((int(counts.argmax()), mask))
            continue
        for c in np.flatnonzero(counts >= MIN_AREA):
            sub, m = ndimage.label(mask & (labels == c))
            out.extend((int(c), sub == j) for j in range(1, m + 1) if (sub == j).sum() >= MIN_AREA)
    return out


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _profile(crop: np.ndarray, axis: int) -> np.ndarray:
    """The mask's extent across `axis` at five evenly spaced places along the other, as shares."""
    line = crop.sum(axis=axis) / crop.shape[axis]
    at = np.linspace(0.1, 0.9, 5) * (len(line) - 1)
    return np.interp(at, np.arange(len(line)), line)


def features(mask: np.ndarray) -> np.ndarray:
    """Scale-free features of one component's mask: what tells circle, square and triangle apart."""
    y0, y1, x0, x1 = _box(mask)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    h, w = crop.shape
    ys, xs = np.nonzero(crop)
    thumb = Image.fromarray((crop * 255).astype(np.uint8)).resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
    head = [
        crop.mean(),
        w / h,
        (ys.mean() + 0.5) / h - 0.5,
        (xs.mean() + 0.5) / w - 0.5,
        ys.std() / h,
        xs.std() / w,
    ]
    rows, cols = _profile(crop, 1), _profile(crop, 0)
    return np.concatenate([head, rows, cols, np.asarray(thumb, dtype=np.float32).ravel() / 255])


def _parts(image: np.ndarray) -> list[tuple[str, np.ndarray, float, float]]:
    """(colour, mask, cx, cy) of each shape-sized component."""
    out = []
    for c, mask in _components(colour_labels(image)):
        y0, y1, x0, x1 = _box(mask)
        out.append((_NAMES[c], mask, (x0 + x1) / 2, (y0 + y1) / 2))
    return out


def degrade(image: np.ndarray, rng: np.random.Generator, noise: float, blur: float, dim: float) -> np.ndarray:
    """The image blurred (gaussian, `blur` px), dimmed by `dim` and noised (std `noise` of 255)."""
    img: np.ndarray = image.astype(np.float64)
    if blur > 0:
        img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0))
    img = img * dim + rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _training_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and shape labels of the components of `n` rendered images, two thirds degraded."""
    rng = np.random.default_rng([seed, 7])
    x: list[np.ndarray] = []
    y: list[int] = []
    for i, sample in enumerate(sample_shapes(n, seed, held_out="every")):
        image = sample.image
        if i % 3:
            image = degrade(image, rng, rng.uniform(0, 30), rng.uniform(0, 1.0), rng.uniform(0.6, 1.0))
        parts = _parts(image)
        if len(parts) != len(sample.shapes):
            continue
        for colour, mask, cx, cy in parts:
            same = [s for s in sample.shapes if s.colour == colour]
            if not same:
                continue
            truth = min(same, key=lambda s: (s.cx - cx) ** 2 + (s.cy - cy) ** 2)
            x.append(features(mask))
            y.append(ALL_SHAPES.index(truth.shape))
    return np.stack(x), np.asarray(y)


class ShapesJudge:
    """Reads the coloured shapes of 32x32 images and checks captions against them."""

    def __init__(self, classifier: RandomForestClassifier) -> None:
        self.classifier = classifier

    @classmethod
    def fit(cls, seed: int = 0, n: int = 3000) -> ShapesJudge:
        """Fit the shape classifier on `n` rendered images (seed `seed`); a few seconds on one core."""
        x, y = _training_rows(seed, n)
        forest = RandomForestClassifier(n_estimators=60, min_samples_leaf=2, random_state=seed, n_jobs=1)
        return cls(forest.fit(x, y))

    def read(self, image: np.ndarray) -> list[Found]:
        """(colour, shape, cx, cy) of every shape found, cx, cy the bounding-box centre in px."""
        parts = _parts(np.asarray(image))
        if not parts:
            return []
        kinds = self.classifier.predict(np.stack([features(mask) for _, mask, _, _ in parts]))
        return [(c, ALL_SHAPES[int(k)], cx, cy) for (c, _, cx, cy), k in zip(parts, kinds, strict=True)]

    def correct(self, image: np.ndarray, caption: str) -> bool:
        """Whether the image shows exactly the caption's shapes (colour, shape, count) in its relation."""
        pairs, relation = parse_caption(caption)
        found = self.read(image)
        if Counter((c, s) for c, s, _, _ in found) != Counter(pairs):
            return False
        if relation is None:
            return True
        firsts = [(cx, cy) for c, s, cx, cy in found if (c, s) == pairs[0]]
        seconds = [(cx, cy) for c, s, cx, cy in found if (c, s) == pairs[1]]
        if pairs[0] == pairs[1]:
            a, b = firsts
            return relation_holds(relation, a, b) or relation_holds(relation, b, a)
        return relation_holds(relation, firsts[0], seconds[0])

    def score(self, images: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str], sets: int = 4) -> dict:
        """Share of right samples per group present (`GROUPS`) and "overall": {"n", "correct", "share"},
        share an interval (`intervals.interval`) over up to `sets` disjoint contiguous chunks of the group."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        rights: dict[str, list[bool]] = {g: [] for g in GROUPS}
        every: list[bool] = []
        for image, caption in zip(images, captions, strict=True):
            right = self.correct(np.asarray(image), caption)
            rights[group_of(caption)].append(right)
            every.append(right)
        out = {g: _summary(v, sets) for g, v in rights.items() if v}
        out["overall"] = _summary(every, sets)
        return out


def group_of(caption: str) -> str:
    """ "single/seen", "single/held_out", "relation/seen", "relation/held_out" (a held-out pair), or
    "single/new", "relation/new" (a `NEW_SHAPE` pair)."""
    pairs, relation = parse_caption(caption)
    held = any(p in HELD_OUT_PAIRS for p in pairs)
    part = "new" if any(s == NEW_SHAPE for _, s in pairs) else "held_out" if held else "seen"
    return f"{'single' if relation is None else 'relation'}/{part}"


def _summary(rights: list[bool], sets: int) -> dict:
    if not rights:
        return {"n": 0, "correct": 0, "share": None}
    chunks = np.array_split(np.asarray(rights, dtype=np.float64), min(max(sets, 1), len(rights)))
    return {"n": len(rights), "correct": int(sum(rights)), "share": interval([float(c.mean()) for c in chunks])}
