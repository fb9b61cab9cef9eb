"""The embedded captioned "shapes" set: one or two filled shapes in pure colours on black, 32x32 RGB.

Shapes (circle, square, triangle pointing up) are 10-16 px across (scaled with `size`), lie wholly inside the
frame with a 1 px black border, and are at least 2 px apart. Every bounding box sits on the pixel grid and no
anti-aliasing is done, so each pixel is black or exactly one of `COLOURS`, and a shape of size s is exactly s
pixels wide and high.

Captions are `a red circle` or `a red circle left of a blue square`: the first shape's centre relative to the
second's (image y grows downwards, so `above` means a smaller y). A relation sample is drawn only when its
relation is unambiguous: the offset along the dominant axis is at least twice the other and 6 px more
(`relation_of`). The two shapes of a relation sample never share both colour and shape.

Held-out pairs (`HELD_OUT_PAIRS`), never in a training caption, test composition: red triangle, green circle,
blue square and white triangle. Every colour and every shape still appears in training with the others.

`NEW_SHAPE` (a diamond: a square turned 45 degrees) is never in the base set: it is the concept a LoRA
fine-tune teaches the trained model (`sdpipe demo shapes-lora`), from a few images drawn with `held_out="new"`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NEW_SHAPE = "diamond"
ALL_SHAPES: tuple[str, ...] = (*SHAPES, NEW_SHAPE)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("white", "triangle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
NEW_PAIRS: tuple[tuple[str, str], ...] = tuple((c, NEW_SHAPE) for c in COLOURS)
# which pairs a sample may hold: none held out (training), one held out at least, any of the 21; one new-shape
# pair at least (the fine-tune set), or any pair of the four shapes (what the judge is fitted on)
HELD_OUT_MODES = ("exclude", "only", "any", "new", "every")

BORDER = 1  # black pixels kept free along each edge
GAP = 2  # least distance between two shapes' bounding boxes, px
SIZE_RANGE = (10, 16)  # shape sizes (px across) at image size 32
_TRIES = 10_000

_PHRASE = rf"an? ({'|'.join(COLOURS)}) ({'|'.join(ALL_SHAPES)})"
_CAPTION = re.compile(rf"^{_PHRASE}(?: ({'|'.join(RELATIONS)}) {_PHRASE})?$")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cx: float  # centre of the bounding box, px from the left edge
    cy: float  # centre of the bounding box, px from the top edge
    size: int  # width = height of the bounding box, px

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) edges of the bounding box."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class ShapeSample:
    image: np.ndarray  # (size, size, 3) uint8
    caption: str
    kind: str  # "single" | "relation"
    shapes: tuple[Shape, ...]  # in caption order
    held_out: bool  # any of its (colour, shape) pairs is held out


# ---------------------------------------------------------------- rendering


def _mask(shape: Shape, size: int) -> np.ndarray:
    """The pixels whose centres lie inside the shape."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - shape.cx, ys - shape.cy
    h = shape.size / 2
    if shape.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape.shape == "square":
        return (np.abs(dx) < h) & (np.abs(dy) < h)
    if shape.shape == "triangle":
        row = np.floor(dy + h)  # 0 at the apex row .. size-1 at the base row
        return (row >= 0) & (row < shape.size) & (np.abs(dx) <= (row + 1) / 2)
    if shape.shape == NEW_SHAPE:
        return np.abs(dx) + np.abs(dy) <= h
    raise ValueError(f"unknown shape {shape.shape!r}; known: {', '.join(ALL_SHAPES)}")


def render(shapes: Sequence[Shape], size: int = 32) -> np.ndarray:
    """The (size, size, 3) uint8 image of `shapes` filled in their pure colours on black."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for shape in shapes:
        if shape.colour not in COLOURS:
            raise ValueError(f"unknown colour {shape.colour!r}; known: {', '.join(COLOURS)}")
        image[_mask(shape, size)] = COLOURS[shape.colour]
    return image


# ---------------------------------------------------------------- captions


def relation_of(a: Shape, b: Shape, size: int = 32) -> str | None:
    """The unambiguous relation of a's centre to b's, or None when neither axis clearly dominates."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    margin = 6 * size / 32
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= abs(dy) + margin:
        return "left of" if dx > 0 else "right of"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= abs(dx) + margin:
        return "above" if dy > 0 else "below"
    return None


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether centre a is `relation` centre b, leniently: on the right side along the dominant axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx > 0) == (relation == "left of")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy > 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")


def caption_of(shapes: Sequence[Shape] | Sequence[tuple[str, str]], relation: str | None) -> str:
    """`a red circle`, or `a red circle left of a blue square` (shapes in caption order)."""
    pairs = [s.pair if isinstance(s, Shape) else tuple(s) for s in shapes]
    phrases = [f"a {c} {s}" for c, s in pairs]
    if len(phrases) == 1 and relation is None:
        return phrases[0]
    if len(phrases) == 2 and relation in RELATIONS:
        return f"{phrases[0]} {relation} {phrases[1]}"
    raise ValueError(f"a caption has one shape and no relation, or two and one of {RELATIONS}; got {pairs}, {relation}")


def parse_caption(caption: str) -> tuple[list[tuple[str, str]], str | None]:
    """([(colour, shape), ...], relation) of a caption in this set's grammar; ValueError otherwise."""
    m = _CAPTION.match(" ".join(caption.strip().lower().split()))
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a red circle left of a blue square')")
    c1, s1, relation, c2, s2 = m.groups()
    if relation is None:
        return [(c1, s1)], None
    return [(c1, s1), (c2, s2)], relation


# ---------------------------------------------------------------- sampling


def _size_range(size: int) -> tuple[int, int]:
    return round(SIZE_RANGE[0] * size / 32), round(SIZE_RANGE[1] * size / 32)


def _place(rng: np.random.Generator, pair: tuple[str, str], size: int) -> Shape:
    """One shape of a random size at a random grid-aligned place inside the frame."""
    lo, hi = _size_range(size)
    s = int(rng.integers(lo, hi + 1))
    x0, y0 = (int(v) for v in rng.integers(BORDER, size - BORDER - s + 1, size=2))
    return Shape(pair[0], pair[1], x0 + s / 2, y0 + s / 2, s)


def apart(a: Shape, b: Shape, gap: float = GAP) -> bool:
    """Whether the bounding boxes are at least `gap` px apart along some axis."""
    (al, at, ar, ab), (bl, bt, br, bb) = a.box(), b.box()
    return bl - ar >= gap or al - br >= gap or bt - ab >= gap or at - bb >= gap


def _two(
    rng: np.random.Generator, pairs: tuple[tuple[str, str], tuple[str, str]], size: int
) -> tuple[tuple[Shape, Shape], str]:
    for _ in range(_TRIES):
        a, b = _place(rng, pairs[0], size), _place(rng, pairs[1], size)
        relation = relation_of(a, b, size)
        if relation is not None and apart(a, b):
            return (a, b), relation
    raise RuntimeError(f"could not place two separated shapes in a {size}x{size} image")


def _pairs(rng: np.random.Generator, count: int, held_out: str) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs, distinct, obeying the held-out mode."""
    if held_out not in HELD_OUT_MODES:
        raise ValueError(f"held_out must be one of {HELD_OUT_MODES}, not {held_out!r}")
    pools = {"exclude": SEEN_PAIRS, "new": SEEN_PAIRS + NEW_PAIRS, "every": ALL_PAIRS + NEW_PAIRS}
    pool = pools.get(held_out, ALL_PAIRS)
    first = {"only": sorted(HELD_OUT_PAIRS), "new": list(NEW_PAIRS)}.get(held_out)
    chosen = [first[int(rng.integers(len(first)))]] if first else []
    while len(chosen) < count:
        pair = pool[int(rng.integers(len(pool)))]
        if pair not in chosen:
            chosen.append(pair)
    if first and count == 2 and rng.random() < 0.5:
        chosen.reverse()  # the held-out (or new) pair in either slot
    return chosen


def _layout(
    rng: np.random.Generator, relation_share: float, held_out: str, size: int
) -> tuple[tuple[Shape, ...], str | None]:
    """One sample's shapes (caption order) and relation (None for a single shape)."""
    if rng.random() < relation_share:
        p = _pairs(rng, 2, held_out)
        shapes, relation = _two(rng, (p[0], p[1]), size)
        return tuple(shapes), relation
    return (_place(rng, _pairs(rng, 1, held_out)[0], size),), None


def _sample(shapes: tuple[Shape, ...], relation: str | None, size: int) -> ShapeSample:
    return ShapeSample(
        image=render(shapes, size),
        caption=caption_of(shapes, relation),
        kind="single" if relation is None else "relation",
        shapes=shapes,
        held_out=any(s.pair in HELD_OUT_PAIRS for s in shapes),
    )


def _draw(rng: np.random.Generator, n: int, relation_share: float, held_out: str, size: int) -> list[ShapeSample]:
    return [_sample(*_layout(rng, relation_share, held_out, size), size) for _ in range(n)]


def sample_shapes(
    n: int, seed: int, *, relation_share: float = 0.5, held_out: str = "exclude", size: int = 32
) -> list[ShapeSample]:
    """`n` rendered samples, the same for the same arguments.

    `held_out`: "exclude" (no held-out pair anywhere: training), "only" (each sample holds at least one
    held-out pair), "any" (pairs drawn from all 21), "new" (each holds at least one `NEW_SHAPE` pair, its other pair
    a seen or a new-shape one) or "every" (any pair of the four shapes)."""
    return _draw(np.random.default_rng(seed), n, relation_share, held_out, size)


def prompts(n: int, seed: int, kind: str, held_out: bool, new: bool = False) -> list[str]:
    """`n` captions of one kind ("single" | "relation") to sample a model with, for `ShapesJudge.score`;
    with `held_out`, each holds a held-out pair, with `new` a `NEW_SHAPE` pair, otherwise none does."""
    if kind not in ("single", "relation"):
        raise ValueError(f"kind must be 'single' or 'relation', not {kind!r}")
    rng = np.random.default_rng(seed)
    share, mode = (1.0 if kind == "relation" else 0.0), ("new" if new else "only" if held_out else "exclude")
    return [caption_of(*_layout(rng, share, mode, 32)) for _ in range(n)]


# ---------------------------------------------------------------- the folder


def _unique(rng: np.random.Generator, n: int, held_out: str, taken: set[bytes]) -> list[ShapeSample]:
    """`n` samples whose pixels differ from each other and from every image in `taken` (updated)."""
    out: list[ShapeSample] = []
    while len(out) < n:
        sample = _draw(rng, 1, 0.5, held_out, 32)[0]
        key = hashlib.sha256(sample.image.tobytes()).digest()
        if key not in taken:
            taken.add(key)
            out.append(sample)
    return out


def folder_samples(n_train: int, n_test: int, seed: int = 0) -> list[tuple[str, ShapeSample]]:
    """(split, sample) of every image `write_folder` writes, in file order.

    The train split never holds a held-out pair; the test split is half seen samples and half held-out-pair
    ones (the seen first), so a judge can compare them. No image repeats within or across splits."""
    taken: set[bytes] = set()
    n_held = n_test // 2
    parts = [
        ("train", _unique(np.random.default_rng([seed, 0]), n_train, "exclude", taken)),
        ("test", _unique(np.random.default_rng([seed, 1]), n_test - n_held, "exclude", taken)),
        ("test", _unique(np.random.default_rng([seed, 2]), n_held, "only", taken)),
    ]
    return [(split, sample) for split, samples in parts for sample in samples]


def concept_samples(n: int, seed: int = 0, new_share: float = 0.8) -> list[tuple[str, ShapeSample]]:
    """The fine-tune set: `n` training samples, `round(n * new_share)` of them holding a `NEW_SHAPE` pair and
    the rest ordinary seen ones (so the old prompts keep being shown), all different, each a relation with
    probability 1/2."""
    taken: set[bytes] = set()
    n_new = round(n * new_share)
    new = _unique(np.random.default_rng([seed, 3]), n_new, "new", taken)
    old = _unique(np.random.default_rng([seed, 4]), n - n_new, "exclude", taken)
    return [("train", sample) for sample in new + old]


def write_folder(out: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Write `folder_samples` as `out/images/NNNNN.png` and `out/metadata.jsonl` (imagefolder layout with
    `file_name`, `text`, `split` ("train" | "test"), `kind`, `held_out`; read by `sdpipe data validate`).

    Returns the counts per split, test part and kind. Refuses an `out` that exists and is not an empty folder."""
    return write_samples(out, folder_samples(n_train, n_test, seed))


def write_samples(out: Path, rows: list[tuple[str, ShapeSample]]) -> dict:
    """Write (split, sample) rows as `write_folder` does; returns the counts."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new one (nothing was written)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0, "test_seen": 0, "test_held_out": 0, "single": 0, "relation": 0}
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i, (split, sample) in enumerate(rows):
            name = f"images/{i:05d}.png"
            Image.fromarray(sample.image, "RGB").save(out / name, format="PNG")
            row = {"file_name": name, "text": sample.caption, "split": split}
            meta.write(json.dumps(row | {"kind": sample.kind, "held_out": sample.held_out}) + "\n")
            counts[split] += 1
            counts[sample.kind] += 1
            if split == "test":
                counts["test_held_out" if sample.held_out else "test_seen"] += 1
    return counts
