"""open_split/ImageSet: digits exactly as before, every source read back lazily, preprocessing and exact
randomness from the training generator, and refusal of data that changed since validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import noise_image, png_bytes
from sdpipe.config import DataConfig
from sdpipe.data import SourceChangedError, check_source_unchanged, load_dataset, open_split, to_model_range
from sdpipe.data.readers import decode_image
from sdpipe.data.validate import validate


def test_digits_split_is_the_demo_data_bit_for_bit() -> None:
    data = load_dataset(DataConfig())
    s = open_split(DataConfig(test_fraction=0), "train")  # nothing held out: the whole set
    assert len(s) == 1797 and s.image_shape == (1, 8, 8) and s.class_names == data.class_names
    assert s.dataset_id == data.dataset_id and s.value_range == (0.0, 16.0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(1797, generator=gen)[:64]
    state = gen.get_state()
    x, y = s.batch(idx, gen)
    assert torch.equal(gen.get_state(), state), "no random preprocessing: the generator must not be touched"
    assert torch.equal(x, to_model_range(data.images, data.value_range)[idx])
    assert torch.equal(y, torch.as_tensor(data.labels)[idx]) and y.dtype == torch.int64
    s._in_memory = None  # the decode-and-preprocess path gives the same numbers as the in-memory one
    assert torch.equal(s.batch(idx, gen)[0], x)
    rgb = open_split(DataConfig(channels="rgb", test_fraction=0), "train")
    assert rgb.image_shape == (3, 8, 8) and torch.equal(rgb.batch(idx, gen)[0], x.expand(-1, 3, -1, -1))


def test_digits_validation_split_is_disjoint_by_content() -> None:
    cfg = DataConfig(validation_fraction=0.2)
    train, val, test = open_split(cfg, "train"), open_split(cfg, "validation"), open_split(cfg, "test")
    assert len(train) + len(val) + len(test) == 1797 and 250 < len(val) < 470 and len(test) == 450
    xt, _ = train.batch(torch.arange(len(train)), torch.Generator())
    xv, _ = val.batch(torch.arange(len(val)), torch.Generator())
    seen = {row.numpy().tobytes() for row in xt}
    assert not any(row.numpy().tobytes() in seen for row in xv)


def _folder(tmp_path: Path, n: int = 6) -> Path:
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(n):
            (src / c / f"{i}.png").write_bytes(png_bytes(noise_image(100 * len(c) + i + (50 if c == "b" else 0))))
    return src


def _validated(tmp_path: Path, **cfg: object) -> DataConfig:
    src = _folder(tmp_path)
    out = tmp_path / "validated"
    validate(str(src), out, DataConfig(source="folder"))
    return DataConfig(source="folder", path=str(src), validated_dir=str(out), **cfg)


def test_folder_batches_read_back_the_files(tmp_path: Path) -> None:
    cfg = _validated(tmp_path)
    s = open_split(cfg, "train")
    assert len(s) == 12 and s.image_shape == (3, 12, 16) and s.class_names == ["a", "b"]
    x, y = s.batch(torch.tensor([7, 0]), torch.Generator())
    src = Path(cfg.path or "")
    expected = np.array(decode_image((src / "b" / "1.png").read_bytes(), 1, 10**6).pixels.transpose(2, 0, 1))
    assert torch.equal(x[0], to_model_range(expected, (0, 255)))
    assert y.tolist() == [1, 0] and x.min() >= -1 and x.max() <= 1


def test_random_crop_and_flip_come_only_from_the_generator(tmp_path: Path) -> None:
    cfg = _validated(tmp_path, resolution=8, crop="random", random_flip=True, resize_filter="bilinear")
    s = open_split(cfg, "train")
    assert s.image_shape == (3, 8, 8) and s.metadata()["preprocess"]["crop"] == "random"
    idx = torch.arange(12)
    a, _ = s.batch(idx, torch.Generator().manual_seed(1))
    b, _ = s.batch(idx, torch.Generator().manual_seed(1))
    c, _ = s.batch(idx, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    part, labels = s.batch(idx, torch.Generator().manual_seed(1), select=slice(1, None, 2))
    assert torch.equal(part, a[1::2]) and labels.tolist() == [0] * 3 + [1] * 3


def test_grayscale_and_center_crop(tmp_path: Path) -> None:
    cfg = _validated(tmp_path, resolution=10, channels="grayscale")
    s = open_split(cfg, "train")
    x, _ = s.batch(torch.arange(3), torch.Generator())
    assert x.shape == (3, 1, 10, 10)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    s.batch(torch.arange(3), gen)
    assert torch.equal(gen.get_state(), state)


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    cfg = _validated(tmp_path)
    check_source_unchanged(cfg.validated_dir or "")
    src = Path(cfg.path or "")
    (src / "a" / "0.png").write_bytes(png_bytes(noise_image(999)))
    with pytest.raises(SourceChangedError, match=r"a/0.png.*re-validate with: sdpipe data validate"):
        check_source_unchanged(cfg.validated_dir or "")
    with pytest.raises(SourceChangedError, match="changed since it was validated"):
        open_split(cfg, "train").batch(torch.tensor([0]), torch.Generator())


def test_added_removed_and_touched_files(tmp_path: Path) -> None:
    import os

    cfg = _validated(tmp_path)
    src, out = Path(cfg.path or ""), cfg.validated_dir or ""
    os.utime(src / "a" / "1.png", ns=(1, 1))  # same bytes, new time: not a change
    check_source_unchanged(out)
    (src / "a" / "new.png").write_bytes(png_bytes(noise_image(5)))
    with pytest.raises(SourceChangedError, match=r"1 added: .*new.png"):
        check_source_unchanged(out)
    (src / "a" / "new.png").unlink()
    (src / "b" / "2.png").unlink()
    with pytest.raises(SourceChangedError, match=r"1 removed: .*b/2.png"):
        check_source_unchanged(out)


def _other_sources(tmp_path: Path) -> dict[str, tuple[Path, list[np.ndarray]]]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    imgs = [noise_image(i, (10, 10, 3)) for i in range(4)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    rows = {"image": [{"bytes": png_bytes(a), "path": None} for a in imgs], "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "hf"))
    meta = [{"source": i} for i in range(4)]  # a struct column before the image column
    table = pa.table({"meta": meta, "image": pa.array([png_bytes(a) for a in imgs], pa.binary())})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i, a in enumerate(imgs):
            sink.write({"__key__": f"k{i}", "png": png_bytes(a), "cls": b"1"})
    np.savez(tmp_path / "a.npz", images=np.stack(imgs))
    return {
        k: (tmp_path / p, imgs)
        for k, p in (("hf", "hf"), ("parquet", "t.parquet"), ("webdataset", "s.tar"), ("arrays", "a.npz"))
    }


@pytest.mark.parametrize("kind", ["hf", "parquet", "webdataset", "arrays"])
def test_container_sources_read_back_lazily(tmp_path: Path, kind: str) -> None:
    path, imgs = _other_sources(tmp_path)[kind]
    out = tmp_path / "validated"
    validate(str(path), out, DataConfig(source=kind))  # type: ignore[arg-type]
    s = open_split(DataConfig(source=kind, path=str(path), validated_dir=str(out)), "train")  # type: ignore[arg-type]
    assert len(s) == 4 and s.image_shape == (3, 10, 10)
    x, _ = s.batch(torch.tensor([3, 1]), torch.Generator())
    for got, want in zip(x, (imgs[3], imgs[1]), strict=True):
        assert torch.equal(got, to_model_range(want.transpose(2, 0, 1), (0, 255)))


def test_open_split_needs_a_validated_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sdpipe data validate"):
        open_split(DataConfig(source="folder", path=str(tmp_path)), "train")


def test_training_settings_must_match_the_validated_ones(tmp_path: Path) -> None:
    cfg = _validated(tmp_path)
    other = cfg.model_copy(update={"validation_fraction": 0.5})
    with pytest.raises(ValueError, match=r"data.validation_fraction=0.5 \(validated with 0.0\)"):
        open_split(other, "train")


def test_ensure_validated_refuses_or_revalidates(tmp_path: Path) -> None:
    from sdpipe.data import ensure_validated

    cfg = _validated(tmp_path)
    ensure_validated(cfg)
    ensure_validated(DataConfig())  # digits: nothing to check
    (Path(cfg.path or "") / "b" / "new.png").write_bytes(png_bytes(noise_image(77)))
    with pytest.raises(SourceChangedError, match="added"):
        ensure_validated(cfg)
    ensure_validated(cfg, revalidate=True)
    ensure_validated(cfg)
    assert len(open_split(cfg, "train")) == 13
