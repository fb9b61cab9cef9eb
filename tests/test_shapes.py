"""The embedded captioned shapes set (rules of rendering, captions, held-out pairs, the folder) and its judge."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdpipe.data.folder import walk_folder
from sdpipe.data.shapes import (
    BORDER,
    COLOURS,
    GAP,
    HELD_OUT_PAIRS,
    NEW_PAIRS,
    NEW_SHAPE,
    RELATIONS,
    SHAPES,
    Shape,
    caption_of,
    concept_samples,
    folder_samples,
    parse_caption,
    prompts,
    relation_holds,
    relation_of,
    render,
    sample_shapes,
    write_folder,
)
from sdpipe.evaluate.shapes_judge import GROUPS, ShapesJudge, degrade

SWAP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def samples():
    return sample_shapes(600, seed=1, held_out="any")


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    return ShapesJudge.fit(seed=0, n=3000)


@pytest.fixture(scope="module")
def fresh():
    """Rendered samples the judge was not fitted on (another seed)."""
    return sample_shapes(300, seed=12345, held_out="any")


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------- rendering


def test_render_obeys_the_rules(samples):
    pure = {tuple(v) for v in COLOURS.values()}
    for s in samples:
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        covered = np.zeros((32, 32), dtype=bool)
        for shape in s.shapes:
            assert 10 <= shape.size <= 16
            alone = render([shape]).any(axis=-1)
            x0, y0, x1, y1 = _extent(alone)
            assert (x1 - x0, y1 - y0) == (shape.size, shape.size), shape  # as many px across as its size
            assert x0 >= BORDER and y0 >= BORDER and x1 <= 32 - BORDER and y1 <= 32 - BORDER  # inside the frame
            assert not (alone & covered).any(), s.caption  # not overlapping
            covered |= alone
            assert (s.image[alone] == COLOURS[shape.colour]).all()  # its pure colour, unblended
        assert not s.image[~covered].any()  # black background
        assert {tuple(p) for p in s.image[covered]} <= pure
    for a, b in (s.shapes for s in samples if s.kind == "relation"):
        al, at, ar, ab = _extent(render([a]).any(-1))
        bl, bt, br, bb = _extent(render([b]).any(-1))
        assert max(bl - ar, al - br, bt - ab, at - bb) >= GAP  # apart by a margin


def test_every_shape_and_colour_is_drawn(samples):
    assert {s.shape for x in samples for s in x.shapes} == set(SHAPES)
    assert {s.colour for x in samples for s in x.shapes} == set(COLOURS)
    assert {s.size for x in samples for s in x.shapes} == set(range(10, 17))
    assert {x.kind for x in samples} == {"single", "relation"}


def test_triangle_points_up():
    rows = render([Shape("white", "triangle", 16, 16, 12)]).any(axis=-1).sum(axis=1)
    widths = rows[rows > 0]
    assert list(widths) == sorted(widths) and widths[0] <= 2 and widths[-1] == 12


def test_diamond_is_a_turned_square():
    mask = render([Shape("white", NEW_SHAPE, 16, 16, 12)]).any(axis=-1)
    widths = mask.sum(axis=1)[mask.any(axis=1)]
    assert list(widths) == list(widths[::-1]) and max(widths) == 12 and widths[0] <= 2
    assert np.array_equal(mask, mask.T)  # symmetric about both diagonals' axes
    assert 0.4 < mask.sum() / 144 < 0.6


def test_the_new_shape_stays_out_of_the_base_set():
    assert NEW_SHAPE not in SHAPES and all(p not in HELD_OUT_PAIRS for p in NEW_PAIRS)
    base = folder_samples(300, 100, seed=4)
    assert not any(s.shape == NEW_SHAPE for _, x in base for s in x.shapes)
    new = sample_shapes(300, seed=5, held_out="new")
    assert all(any(s.shape == NEW_SHAPE for s in x.shapes) and not x.held_out for x in new)
    assert {s.colour for x in new for s in x.shapes if s.shape == NEW_SHAPE} == set(COLOURS)
    every = sample_shapes(600, seed=6, held_out="every")
    assert {s.shape for x in every for s in x.shapes} == {*SHAPES, NEW_SHAPE}
    assert all(NEW_SHAPE in c for c in prompts(50, seed=7, kind="relation", held_out=False, new=True))


def test_concept_samples_mix_new_and_old():
    rows = concept_samples(50, seed=0, new_share=0.8)
    assert len(rows) == 50 and {split for split, _ in rows} == {"train"}
    has_new = [any(s.shape == NEW_SHAPE for s in x.shapes) for _, x in rows]
    assert sum(has_new) == 40 and not any(x.held_out for _, x in rows)
    assert len({x.image.tobytes() for _, x in rows}) == 50
    assert [x.caption for _, x in rows] == [x.caption for _, x in concept_samples(50, seed=0, new_share=0.8)]


# ---------------------------------------------------------------- captions


def test_captions_round_trip(samples):
    for s in samples:
        pairs, relation = parse_caption(s.caption)
        assert pairs == [x.pair for x in s.shapes]
        assert (relation is None) == (s.kind == "single") and (relation is None or relation in RELATIONS)
        assert caption_of(pairs, relation) == s.caption
        assert re.fullmatch(r"a \w+ \w+( (left of|right of|above|below) a \w+ \w+)?", s.caption)
    assert parse_caption("A  Red circle ") == ([("red", "circle")], None)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red blob",
        "a pink circle",
        "two red circles",
        "a red circle near a blue square",
        "a red circle and",
        "so a red circle",
    ],
)
def test_parse_refuses_what_it_cannot_read(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_relation_matches_centres(samples):
    relations = [s for s in samples if s.kind == "relation"]
    assert len(relations) > 200
    for s in relations:
        a, b = s.shapes
        relation = parse_caption(s.caption)[1]
        assert relation == relation_of(a, b)
        dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
        major, minor = (dx, dy) if relation in ("left of", "right of") else (dy, dx)
        assert major >= 2 * minor and major >= minor + 6  # unambiguous
        # and as rendered: the painted pixels' extents put the first shape on the named side
        ea, eb = _extent(render([a]).any(-1)), _extent(render([b]).any(-1))
        ca = ((ea[0] + ea[2]) / 2, (ea[1] + ea[3]) / 2)
        cb = ((eb[0] + eb[2]) / 2, (eb[1] + eb[3]) / 2)
        assert relation_holds(relation, ca, cb) and not relation_holds(SWAP[relation], ca, cb)
    assert {parse_caption(s.caption)[1] for s in relations} == set(RELATIONS)


# ---------------------------------------------------------------- held-out pairs, determinism


def test_held_out_modes():
    assert len(HELD_OUT_PAIRS) == 4 and {s for _, s in HELD_OUT_PAIRS} <= set(SHAPES)
    excluded = sample_shapes(3000, seed=2, held_out="exclude")
    assert not any(s.held_out for s in excluded)
    assert not {p for s in excluded for p in parse_caption(s.caption)[0]} & HELD_OUT_PAIRS
    only = sample_shapes(500, seed=3, held_out="only")
    assert all(s.held_out and set(parse_caption(s.caption)[0]) & HELD_OUT_PAIRS for s in only)
    assert {p for s in only for p in parse_caption(s.caption)[0]} >= HELD_OUT_PAIRS
    assert 0 < sum(s.held_out for s in sample_shapes(500, seed=4, held_out="any")) < 500
    with pytest.raises(ValueError):
        sample_shapes(1, seed=0, held_out="some")


def test_prompts_follow_kind_and_held_out():
    for kind in ("single", "relation"):
        for held in (False, True):
            got = prompts(200, seed=5, kind=kind, held_out=held)
            assert len(got) == 200 and got == prompts(200, seed=5, kind=kind, held_out=held)
            parsed = [parse_caption(c) for c in got]
            assert all((r is None) == (kind == "single") for _, r in parsed)
            assert all(bool(set(p) & HELD_OUT_PAIRS) == held for p, _ in parsed)


def test_deterministic_per_seed():
    a, b, c = (sample_shapes(50, seed=s, relation_share=0.5) for s in (7, 7, 8))
    assert [x.caption for x in a] == [x.caption for x in b]
    assert all(np.array_equal(x.image, y.image) and x.shapes == y.shapes for x, y in zip(a, b, strict=True))
    assert [x.caption for x in a] != [x.caption for x in c]
    assert all(x.kind == "single" for x in sample_shapes(50, seed=7, relation_share=0.0))
    assert all(x.kind == "relation" for x in sample_shapes(50, seed=7, relation_share=1.0))


# ---------------------------------------------------------------- the folder


def test_write_folder_is_readable(tmp_path: Path):
    out = tmp_path / "shapes"
    counts = write_folder(out, n_train=60, n_test=40, seed=3)
    assert {k: counts[k] for k in ("train", "test", "test_seen", "test_held_out")} == {
        "train": 60,
        "test": 40,
        "test_seen": 20,
        "test_held_out": 20,
    }
    assert counts["single"] + counts["relation"] == 100
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    expected = folder_samples(60, 40, seed=3)
    assert len(rows) == len(expected) == 100 and len(list((out / "images").iterdir())) == 100
    hashes = set()
    for row, (split, sample) in zip(rows, expected, strict=True):
        assert set(row) == {"file_name", "text", "split", "kind", "held_out"}
        assert (row["text"], row["split"], row["kind"], row["held_out"]) == (
            sample.caption,
            split,
            sample.kind,
            sample.held_out,
        )
        with Image.open(out / row["file_name"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), sample.image)
        hashes.add(sample.image.tobytes())
        assert not (row["split"] == "train" and row["held_out"])
    assert len(hashes) == 100  # no image twice, within or across splits
    # the project's folder reader sees every image with its caption and split
    _, items = walk_folder(out, "none", None)
    images = {Path(i.path).name: i for i in items if i.file}
    assert len(images) == 100
    assert {(i.caption, i.split) for i in images.values()} == {(r["text"], r["split"]) for r in rows}


def test_write_folder_refuses_a_non_empty_folder(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        write_folder(tmp_path, 2, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    write_folder(tmp_path / "new", 2, 2)  # a missing or empty folder is fine


# ---------------------------------------------------------------- the judge


def test_judge_reads_fresh_renders(judge, fresh):
    right = [judge.correct(s.image, s.caption) for s in fresh]
    assert np.mean(right) >= 0.98
    for s in fresh[:20]:
        found = judge.read(s.image)
        assert sorted((c, k, x, y) for c, k, x, y in found) == sorted((x.colour, x.shape, x.cx, x.cy) for x in s.shapes)
    assert judge.read(np.zeros((32, 32, 3), np.uint8)) == []


def test_judge_reads_the_new_shape(judge):
    fresh_new = sample_shapes(200, seed=54321, held_out="new")
    assert np.mean([judge.correct(s.image, s.caption) for s in fresh_new]) >= 0.98
    square = render([Shape("red", "square", 16, 16, 12)])
    assert judge.correct(square, "a red square") and not judge.correct(square, "a red diamond")


def test_judge_tolerates_mild_degradation(judge, fresh):
    rng = np.random.default_rng(11)
    right = [judge.correct(degrade(s.image, rng, noise=20, blur=0.6, dim=1.0), s.caption) for s in fresh]
    assert np.mean(right) >= 0.90


def _wrong_colour(s) -> str:
    pairs, relation = parse_caption(s.caption)
    c, sh = pairs[0]
    pairs[0] = (next(x for x in COLOURS if x != c and (x, sh) not in pairs), sh)
    return caption_of(pairs, relation)


def _wrong_shape(s) -> str:
    pairs, relation = parse_caption(s.caption)
    c, sh = pairs[-1]
    pairs[-1] = (c, next(x for x in SHAPES if x != sh and (c, x) not in pairs))
    return caption_of(pairs, relation)


def test_judge_says_wrong(judge, fresh):
    relations = [s for s in fresh if s.kind == "relation"]
    singles = [s for s in fresh if s.kind == "single"]
    cases = {
        "wrong colour": [(s.image, _wrong_colour(s)) for s in fresh],
        "wrong shape": [(s.image, _wrong_shape(s)) for s in fresh],
        "swapped relation": [(s.image, caption_of(s.shapes, SWAP[parse_caption(s.caption)[1]])) for s in relations],
        "swapped order": [(s.image, caption_of(s.shapes[::-1], parse_caption(s.caption)[1])) for s in relations],
        "extra shape": [(s.image, caption_of(s.shapes[:1], None)) for s in relations],
        "same shape twice": [
            (render([a, replace(b, colour=a.colour, shape=a.shape)]), caption_of([a], None))
            for a, b in (s.shapes for s in relations)
        ],
        "missing shape": [(render([s.shapes[0]]), s.caption) for s in relations],
        "nothing drawn": [(np.zeros((32, 32, 3), np.uint8), s.caption) for s in singles],
    }
    for name, pairs in cases.items():
        said_right = np.mean([judge.correct(image, caption) for image, caption in pairs])
        assert said_right <= 0.01, name


def test_judge_relation_follows_centres(judge):
    a, b = Shape("red", "circle", 8, 16, 12), Shape("blue", "square", 24, 16, 12)
    image = render([a, b])
    assert judge.correct(image, "a red circle left of a blue square")
    assert judge.correct(image, "a blue square right of a red circle")
    assert not judge.correct(image, "a red circle right of a blue square")
    assert not judge.correct(image, "a red circle above a blue square")
    moved = render([replace(a, cx=24, cy=7.5), replace(b, cx=24, cy=24)])
    assert judge.correct(moved, "a red circle above a blue square")


def test_score_groups_and_intervals(judge):
    images, captions = [], []
    modes = [("single", "exclude"), ("single", "only"), ("relation", "exclude"), ("relation", "only"),
             ("single", "new"), ("relation", "new")]  # fmt: skip
    for i, (kind, mode) in enumerate(modes):
        for s in sample_shapes(24, seed=40 + i, relation_share=float(kind == "relation"), held_out=mode):
            images.append(s.image)
            captions.append(s.caption)
    images[:12] = [np.zeros((32, 32, 3), np.uint8)] * 12  # half of single/seen: nothing drawn
    result = judge.score(np.stack(images), captions, sets=4)
    assert set(result) == {*GROUPS, "overall"}
    for key in GROUPS:
        assert result[key]["n"] == 24
        share = result[key]["share"]
        assert len(share["values"]) == 4 and share["low"] <= share["mean"] <= share["high"]
    assert result["single/seen"]["share"]["mean"] == pytest.approx(0.5)
    assert result["single/seen"]["share"]["values"] == [0.0, 0.0, 1.0, 1.0]  # contiguous chunks
    assert result["single/seen"]["share"]["low"] < 0.5 < result["single/seen"]["share"]["high"]
    for key in GROUPS[1:]:
        assert result[key]["share"]["mean"] == 1.0
    assert result["overall"]["n"] == 144 and result["overall"]["correct"] == 132
    only = judge.score(images[24:48], captions[24:48], sets=4)
    assert set(only) == {"single/held_out", "overall"}
    with pytest.raises(ValueError):
        judge.score(images[:2], captions[:1])
