"""Content-hash splits: deterministic, about the right share, stable when the fraction or the set changes."""

from __future__ import annotations

import hashlib

import pytest

from sdpipe.data.splits import assign_split


def _hashes(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_split_depends_only_on_the_hash_and_matches_the_fraction() -> None:
    hashes = _hashes(4000)
    first = [assign_split(h, 0.2) for h in hashes]
    assert first == [assign_split(h, 0.2) for h in hashes]
    share = first.count("validation") / len(first)
    assert 0.17 < share < 0.23
    assert assign_split("sha256:" + hashes[0], 0.2) == first[0]


def test_raising_the_fraction_only_moves_train_to_validation() -> None:
    hashes = _hashes(2000)
    low = [assign_split(h, 0.1) for h in hashes]
    high = [assign_split(h, 0.3) for h in hashes]
    assert all(b == "validation" for a, b in zip(low, high, strict=True) if a == "validation")
    assert high.count("validation") > low.count("validation")


def test_extremes_and_bad_input() -> None:
    h = _hashes(50)
    assert {assign_split(x, 0.0) for x in h} == {"train"}
    assert {assign_split(x, 1.0) for x in h} == {"validation"}
    with pytest.raises(ValueError, match="validation_fraction"):
        assign_split(h[0], 1.5)
    with pytest.raises(ValueError, match="not a hex"):
        assign_split("zz-not-hex", 0.5)


# --- splits, duplicates and leaks in a validated folder ------------------------------------------------------


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _splits_by_content(out) -> dict[str, str]:
    import pyarrow.parquet as pq

    return {r["pixel_sha256"]: r["split"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_hash_splits_are_stable_when_files_are_renamed_or_added(tmp_path) -> None:
    from sdpipe.config import DataConfig
    from sdpipe.data.validate import validate

    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"{i:03d}.png").write_bytes(_png(i))
    cfg = DataConfig(source="folder", validation_fraction=0.3)
    first = validate(str(src), tmp_path / "a", cfg)
    before = _splits_by_content(tmp_path / "a")
    assert 5 < first["split_counts"]["validation"] < 35
    for i in range(0, 60, 3):
        (src / f"{i:03d}.png").rename(src / f"renamed_{i}.png")
    for i in range(60, 90):
        (src / f"{i:03d}.png").write_bytes(_png(i))
    validate(str(src), tmp_path / "b", cfg)
    after = _splits_by_content(tmp_path / "b")
    assert len(after) == 90
    assert {h: after[h] for h in before} == before
    assert validate(str(src), tmp_path / "c", cfg)["dataset_id"] != first["dataset_id"]


def test_duplicates_kept_once_and_leaks_removed_from_validation(tmp_path) -> None:
    from sdpipe.config import DataConfig
    from sdpipe.data.validate import validate

    src = tmp_path / "src"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (src / split / cls).mkdir(parents=True)
    for i in range(4):
        (src / "train" / "a" / f"{i}.png").write_bytes(_png(i))
        (src / "val" / "b" / f"{i}.png").write_bytes(_png(100 + i))
    (src / "train" / "b" / "copy_of_a0.png").write_bytes(_png(0))  # duplicate inside train
    (src / "val" / "a" / "leaked.png").write_bytes(_png(2))  # train content in validation
    report = validate(str(src), tmp_path / "out", DataConfig(source="folder"))
    assert report["class_names"] == ["a", "b"]
    assert report["split_counts"] == {"train": 4, "validation": 4}
    assert report["duplicate_groups"] == [[str(src / "train/a/0.png"), str(src / "train/b/copy_of_a0.png")]]
    (leak,) = report["leaks"]
    assert leak["path"] == str(src / "val/a/leaked.png") and leak["split"] == "validation"
    assert leak["same_as"] == str(src / "train/a/2.png") and leak["same_as_split"] == "train"
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert reasons[leak["path"]].startswith("leak:")
    assert report["files_seen"] == 10 and report["accepted"] == 8


def test_near_duplicates_are_grouped() -> None:
    import numpy as np

    from sdpipe.data.duplicates import near_duplicate_groups

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 200, dtype=np.int64).astype(np.uint64)
    close = base[:3] ^ np.uint64(0b101)  # 2 bits away from the first three
    far = base[3:4] ^ np.uint64(0xF0F0)  # 8 bits away from the fourth
    groups, unchecked = near_duplicate_groups(np.concatenate([base, close, far]), max_bits=3)
    assert sorted(groups) == [[0, 200], [1, 201], [2, 202]] and unchecked == 0
    assert near_duplicate_groups(np.concatenate([base, close]), max_bits=1)[0] == []


def test_split_and_caption_from_metadata_jsonl(tmp_path) -> None:
    import json

    import pyarrow.parquet as pq

    from sdpipe.config import DataConfig
    from sdpipe.data.validate import validate

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.png").write_bytes(_png(i))
    rows = [{"file_name": "1.png", "split": "val", "caption": "one"}, {"file_name": "2.png", "split": "test"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    report = validate(str(src), tmp_path / "out", DataConfig(source="folder"))
    got = {
        r["path"].rsplit("/", 1)[1]: (r["split"], r["caption"])
        for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    }
    assert got == {"0.png": ("train", None), "1.png": ("validation", "one"), "2.png": ("test", None)}
    assert report["split_counts"] == {"train": 1, "validation": 1, "test": 1}


def test_many_equal_perceptual_hashes_are_one_group_quickly() -> None:
    import time

    import numpy as np

    from sdpipe.data.duplicates import near_duplicate_groups

    hashes = np.zeros(20_000, dtype=np.uint64)  # e.g. near-blank images: all the same hash
    hashes[::2] = np.uint64(1)  # one bit away
    start = time.perf_counter()
    groups, unchecked = near_duplicate_groups(hashes, max_bits=1)
    assert time.perf_counter() - start < 5
    assert len(groups) == 1 and len(groups[0]) == 20_000 and unchecked == 0


# --- the held-out test split ------------------------------------------------------------------------------------


def test_test_split_is_disjoint_stable_and_about_its_fraction() -> None:
    hashes = _hashes(4000, "t")
    splits = [assign_split(h, 0.1, 0.25) for h in hashes]
    assert 0.22 < splits.count("test") / len(splits) < 0.28
    assert 0.08 < splits.count("validation") / len(splits) < 0.12
    # the validation split is the same with or without a test split, except for nothing: they cannot overlap
    alone = [assign_split(h, 0.1) for h in hashes]
    assert all(a == "validation" for a, s in zip(alone, splits, strict=True) if s == "validation")
    more = [assign_split(h, 0.1, 0.3) for h in hashes]
    assert all(m == "test" for s, m in zip(splits, more, strict=True) if s == "test")
    with pytest.raises(ValueError, match="exceeds 1"):
        assign_split(hashes[0], 0.6, 0.5)


def test_digits_test_split_is_stratified_and_never_trained_on() -> None:
    import numpy as np

    from sdpipe.config import DataConfig
    from sdpipe.data import load_dataset
    from sdpipe.data.imageset import split_arrays

    cfg = DataConfig()
    assert cfg.held_out == 0.25  # the digits' default; other sources hold nothing out unless told
    assert DataConfig(source="folder").held_out == 0.0
    whole = load_dataset(cfg)
    train, test = split_arrays(cfg, "train"), split_arrays(cfg, "test")
    assert len(train.images) + len(test.images) == len(whole.images)
    for c in range(10):
        n_c = int((whole.labels == c).sum())
        assert int((test.labels == c).sum()) == round(0.25 * n_c)  # exactly stratified
    flat = {im.tobytes() for im in train.images.astype(np.uint8)}
    assert not any(im.tobytes() in flat for im in test.images.astype(np.uint8))  # no shared pixels
    assert train.dataset_id != test.dataset_id != whole.dataset_id  # each split has its own content id
    again = split_arrays(cfg, "test")
    assert again.dataset_id == test.dataset_id and np.array_equal(again.images, test.images)


def test_a_folder_holds_nothing_out_unless_told_and_training_agrees(tmp_path) -> None:
    """`sdpipe data validate FOLDER` ran with the digits' default 25 % test split (its config says source
    digits), and training with test_fraction=0 then refused the validated folder."""
    from sdpipe.config import DataConfig
    from sdpipe.data.imageset import has_split, open_split
    from sdpipe.data.validate import validate

    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i}.png").write_bytes(_png(i))
    report = validate(str(src), tmp_path / "v", DataConfig())
    assert report["split_counts"] == {"train": 40}
    for fraction in (None, 0.0):  # unset and 0 mean the same for a folder
        cfg = DataConfig(source="folder", path=str(src), validated_dir=str(tmp_path / "v"), test_fraction=fraction)
        assert len(open_split(cfg, "train")) == 40 and not has_split(cfg, "test")
    held = validate(str(src), tmp_path / "h", DataConfig(test_fraction=0.25))
    assert 4 <= held["split_counts"]["test"] <= 18
    cfg = DataConfig(source="folder", path=str(src), validated_dir=str(tmp_path / "h"), test_fraction=0.25)
    assert has_split(cfg, "test") and len(open_split(cfg, "test")) == held["split_counts"]["test"]
    with pytest.raises(ValueError, match="test_fraction=0.0 \\(validated with 0.25\\).*--revalidate"):
        open_split(cfg.model_copy(update={"test_fraction": 0.0}), "train")
