"""Aspect-ratio buckets: their geometry, the nearest-ratio plan, fitting with little cropping, the bucket sampler
(deterministic, one bucket per batch, exact resume), and ImageSet's captions/sizes/digests/pixels for them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import noise_image, png_bytes
from sdpipe.config import DataConfig
from sdpipe.data import open_split
from sdpipe.data.buckets import BucketPlan, BucketSampler, crop_fraction, fit_to_bucket, make_buckets, plan_buckets
from sdpipe.data.readers import decode_image
from sdpipe.data.validate import pixel_digest, validate

GEOMETRIES = [(512, 64, 2.0), (1024, 64, 2.0), (768, 8, 2.0), (256, 64, 2.0), (480, 64, 2.0), (512, 64, 4.0)]


@pytest.mark.parametrize(("resolution", "step", "max_ar"), GEOMETRIES)
def test_buckets_are_multiples_with_the_area_and_ratios(resolution: int, step: int, max_ar: float) -> None:
    buckets = make_buckets(resolution, step, max_ar)
    area = resolution**2
    assert buckets == sorted(set(buckets)), "sorted, no duplicates"
    assert set(buckets) == {(h, w) for w, h in buckets}, "both orientations"
    if resolution % step == 0:
        assert (resolution, resolution) in buckets
    widest = max(max(w, h) / min(w, h) for w, h in buckets)
    assert widest > max_ar * (1 - step / resolution), "the ratios reach (about) max_aspect_ratio"
    for w, h in buckets:
        assert w % step == 0 and h % step == 0 and w * h <= area
        short, long = min(w, h), max(w, h)
        assert long / short <= max_ar + 1e-9
        if short == long and resolution % step:
            continue  # the square kept for square images, smaller than the area when resolution % step != 0
        # as close to the area as the step allows: the long side cannot grow (area or ratio limit), and the
        # area is within one step of the target except at the ratio limit
        assert short * (long + step) > area or (long + step) / short > max_ar
        if short * (long + step) > area:
            assert w * h > area - step * short


def test_bucket_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="resolution >= step"):
        make_buckets(32, 64)
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        make_buckets(512, 64, 0.5)


def _sizes(n: int, max_ar: float, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    ratios = np.exp(rng.uniform(-math.log(max_ar), math.log(max_ar), n))
    areas = rng.uniform(200**2, 1500**2, n)
    return [
        (max(1, round(math.sqrt(a * r))), max(1, round(math.sqrt(a / r)))) for a, r in zip(areas, ratios, strict=True)
    ]


def test_each_image_goes_to_the_bucket_nearest_in_log_ratio() -> None:
    sizes = [*_sizes(300, 3.0), (100, 100), (1000, 200), (200, 1000)]
    plan = plan_buckets(sizes, 512, 64, 2.0)
    assert plan.buckets == tuple(make_buckets(512, 64, 2.0)) and len(plan.assignment) == len(sizes)
    for (w, h), b in zip(sizes, plan.assignment, strict=True):
        distances = [abs(math.log(w / h) - math.log(bw / bh)) for bw, bh in plan.buckets]
        assert distances[b] == min(distances)
    assert plan.buckets[plan.assignment[-3]] == (512, 512)
    assert plan.buckets[plan.assignment[-2]] == (640, 320) and plan.buckets[plan.assignment[-1]] == (320, 640)
    assert sum(plan.counts().values()) == len(sizes) and set(plan.counts()) == {f"{w}x{h}" for w, h in plan.buckets}
    again = BucketPlan.from_json(plan.to_json())
    assert again == plan
    summary = plan.summary()
    assert summary["resolution"] == 512 and summary["buckets"] == plan.counts()
    assert 0 < summary["cropped_share"] <= 1 and 0 < summary["mean_crop_fraction"] < summary["max_crop_fraction"]
    with pytest.raises(ValueError, match="not a bucket plan"):
        BucketPlan.from_json({"resolution": 512})


def _gradient(w: int, h: int) -> Image.Image:
    """R = column, G = row (0..255 across the image): what survives a crop shows in the corner pixels."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def _measured_crop(out: Image.Image) -> float:
    """The share of the image cropped away, from the gradient values at the edges; checks the crop is centred."""
    a = np.asarray(out).astype(np.float64)
    left, right = a[:, 0, 0].mean(), 255 - a[:, -1, 0].mean()
    top, bottom = a[0, :, 1].mean(), 255 - a[-1, :, 1].mean()
    assert abs(left - right) < 3 + 255 / a.shape[1] and abs(top - bottom) < 3 + 255 / a.shape[0], "centred"
    return 1 - (255 - left - right) / 255 * (255 - top - bottom) / 255


@pytest.mark.parametrize(("resolution", "step", "bound"), [(512, 64, 0.13), (512, 8, 0.03)])
def test_fitting_crops_only_the_rounding(resolution: int, step: int, bound: float) -> None:
    sizes = _sizes(40, 2.0, seed=1)
    plan = plan_buckets(sizes, resolution, step, 2.0)
    for (w, h), b in zip(sizes, plan.assignment, strict=True):
        bucket = plan.buckets[b]
        out = fit_to_bucket(_gradient(w, h), bucket, Image.Resampling.BILINEAR)
        assert out.size == bucket
        predicted = crop_fraction((w, h), bucket)
        assert predicted <= bound, f"{w}x{h} -> {bucket} crops {predicted:.3f}"
        assert abs(_measured_crop(out) - predicted) < 0.02 + 4 / min(bucket)
    assert max(plan.crop_fractions) <= bound
    exact = fit_to_bucket(_gradient(1280, 640), (640, 320), Image.Resampling.BILINEAR)  # the ratio of a bucket
    assert crop_fraction((1280, 640), (640, 320)) == 0 and _measured_crop(exact) < 0.01


def _run(sampler: BucketSampler, n: int) -> list[tuple[int, list[int]]]:
    return [(b, idx.tolist()) for b, idx in (sampler.next() for _ in range(n))]


def test_sampler_batches_are_one_bucket_and_each_epoch_sees_every_image_once() -> None:
    assignment = [0] * 8 + [2] * 12 + [1] * 4  # multiples of 4
    sampler = BucketSampler(assignment, 4, torch.Generator().manual_seed(0))
    for _epoch in range(3):
        seen = []
        for bucket, idx in _run(sampler, 6):
            assert len(idx) == 4 and all(assignment[i] == bucket for i in idx)
            seen += idx
        assert sorted(seen) == list(range(24)), "every image once per epoch"
    orders = {
        tuple(b for b, _ in _run(BucketSampler(assignment, 4, torch.Generator().manual_seed(s)), 6)) for s in range(4)
    }
    assert len(orders) > 1 and (0, 0, 1, 2, 2, 2) not in orders, "the epoch's batches are shuffled"
    again = BucketSampler(assignment, 4, torch.Generator().manual_seed(0))
    other = BucketSampler(assignment, 4, torch.Generator().manual_seed(1))
    first = _run(BucketSampler(assignment, 4, torch.Generator().manual_seed(0)), 18)
    assert _run(again, 18) == first and _run(other, 18) != first


def test_short_buckets_are_topped_up_from_their_own_next_permutation() -> None:
    assignment = [0] * 5 + [1] * 2 + [2] * 9
    sampler = BucketSampler(assignment, 4, torch.Generator().manual_seed(3))
    batches = _run(sampler, 2 + 1 + 3)  # one epoch: ceil(5/4) + ceil(2/4) + ceil(9/4) batches
    assert sorted(b for b, _ in batches) == [0, 0, 1, 2, 2, 2]
    for bucket, idx in batches:
        assert len(idx) == 4 and all(assignment[i] == bucket for i in idx)
    zeros = [i for b, idx in batches if b == 0 for i in idx]
    assert set(zeros) == set(range(5)), "bucket 0's whole permutation, topped up from its next one"


def test_sampler_state_resumes_the_identical_sequence(tmp_path: Path) -> None:
    assignment = [3, 1, 1, 3, 0, 0, 1, 3, 3, 0, 1, 1, 0, 3, 3]
    gen = torch.Generator().manual_seed(7)
    sampler = BucketSampler(assignment, 3, gen)
    _run(sampler, 7)  # mid-epoch
    torch.save({"sampler": sampler.state_dict(), "gen": gen.get_state()}, tmp_path / "state.pt")
    expected = _run(sampler, 20)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor | int) for v in saved["sampler"].values())
    gen2 = torch.Generator().manual_seed(99)
    resumed = BucketSampler(assignment, 3, gen2)
    resumed.load_state_dict(saved["sampler"])
    gen2.set_state(saved["gen"])
    assert _run(resumed, 20) == expected
    with pytest.raises(ValueError, match="bucket plan"):
        BucketSampler([0, 1], 3, torch.Generator()).load_state_dict(saved["sampler"])


def _mixed_folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    shapes = [(24, 16, 3), (16, 32, 3), (20, 20, 3), (16, 24, 3), (30, 15, 3), (18, 18, 3)]
    for i, shape in enumerate(shapes):
        (src / f"{i}.png").write_bytes(png_bytes(noise_image(i, shape)))
        if i % 2 == 0:
            (src / f"{i}.txt").write_text(f"picture number {i}")
    return src


def test_imageset_with_buckets_reads_mixed_sizes_captions_and_fitted_pixels(tmp_path: Path) -> None:
    src = _mixed_folder(tmp_path)
    out = tmp_path / "validated"
    validate(str(src), out, DataConfig(source="folder", validation_fraction=0, test_fraction=0))
    cfg = DataConfig(source="folder", path=str(src), validated_dir=str(out), validation_fraction=0, test_fraction=0)
    with pytest.raises(ValueError, match="data.buckets"):
        open_split(cfg, "train")
    s = open_split(cfg.model_copy(update={"buckets": True}), "train")
    assert len(s) == 6
    files = {pixel_digest(decode_image(p.read_bytes(), 1, 10**6).pixels): p for p in src.glob("*.png")}
    for i in range(6):
        path = files[s.digests[i]]
        stored = decode_image(path.read_bytes(), 1, 10**6).pixels
        assert s.sizes[i] == (stored.shape[1], stored.shape[0])
        assert s.captions[i] == (f"picture number {path.stem}" if int(path.stem) % 2 == 0 else None)
        assert np.array_equal(s.pixels(i), stored.transpose(2, 0, 1))
        fitted = s.pixels(i, (16, 8))
        expected = np.asarray(fit_to_bucket(Image.fromarray(stored), (16, 8))).transpose(2, 0, 1)
        assert fitted.dtype == np.uint8 and fitted.shape == (3, 8, 16) and np.array_equal(fitted, expected)
    with pytest.raises(IndexError, match="out of range"):
        s.pixels(6)


def test_digits_expose_digests_sizes_and_8bit_pixels() -> None:
    s = open_split(DataConfig(test_fraction=0), "train")
    assert s.captions[:3] == [None] * 3 and s.sizes[0] == (8, 8) and len(s.digests) == len(s)
    x, _ = s.batch(torch.tensor([5]), torch.Generator())
    px = s.pixels(5)
    assert px.shape == (1, 8, 8) and px.dtype == np.uint8
    stored = np.round((x[0].numpy() + 1) / 2 * 16).astype(np.uint8)  # back to the digits' 0..16
    assert s.digests[5] == pixel_digest(stored[0])
    assert np.array_equal(px, np.round(stored.astype(np.float64) * 255 / 16).astype(np.uint8))
    assert s.pixels(5, (16, 16)).shape == (1, 16, 16)
