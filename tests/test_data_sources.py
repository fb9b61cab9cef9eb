"""Every source kind validates into the same manifest: labels, captions, hashes and sizes read back right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import noise_image, png_bytes
from sdpipe.config import DataConfig
from sdpipe.data.sources import detect_kind
from sdpipe.data.validate import validate


def _manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def _tree(src: Path | str) -> dict[str, bytes]:
    p = Path(src)
    if str(src) == "digits":
        return {}
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return {str(q): q.read_bytes() for q in files}


def _run(src: Path | str, out: Path, **cfg: object) -> tuple[dict, list[dict]]:
    before = _tree(src)
    report = validate(str(src), out, DataConfig(**cfg))
    assert _tree(src) == before, "validation changed the source"
    assert report["files_seen"] == report["accepted"] + len(report["quarantined"]) + len(report["skipped"])
    assert json.loads((out / "report.json").read_text())["dataset_id"] == report["dataset_id"]
    assert (out / "report.html").read_text().count(report["dataset_id"]) == 1
    return report, _manifest(out)


def test_folder_labels_sidecar_captions_and_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for c, cls in enumerate(["cat", "dog"]):
        (src / cls / "deeper").mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{i}.png").write_bytes(png_bytes(noise_image(10 * c + i)))
        (src / cls / "deeper" / "x.jpg").write_bytes(png_bytes(noise_image(50 + c)))  # PNG bytes under .jpg: fine
    (src / "cat" / "0.txt").write_text("a grey cat")
    (src / "dog" / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "a happy dog"}) + "\n")
    (src / "notes.md").write_text("not data")
    assert detect_kind(str(src)) == "folder"
    report, rows = _run(src, tmp_path / "out", source="folder")
    assert report["class_names"] == ["cat", "dog"]
    assert report["class_counts"] == {"cat": 4, "dog": 4}
    by = {Path(r["path"]).relative_to(src).as_posix(): r for r in rows}
    assert by["cat/0.png"]["caption"] == "a grey cat"
    assert by["dog/1.png"]["caption"] == "a happy dog"
    assert by["dog/deeper/x.jpg"]["label"] == 1 and by["dog/deeper/x.jpg"]["class_name"] == "dog"
    assert (by["cat/2.png"]["width"], by["cat/2.png"]["height"], by["cat/2.png"]["mode"]) == (16, 12, "RGB")
    import hashlib

    assert by["cat/1.png"]["sha256"] == hashlib.sha256((src / "cat" / "1.png").read_bytes()).hexdigest()
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"0.txt", "metadata.jsonl", "notes.md"}
    unlabelled, _ = _run(src, tmp_path / "out2", source="folder", labels="none")
    assert unlabelled["class_names"] is None and unlabelled["accepted"] == 8


def test_hf_saved_dataset_with_splits(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "text": datasets.Value("string"),
        }
    )

    def part(seeds: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "image": [{"bytes": png_bytes(noise_image(s)), "path": None} for s in seeds],
                "label": [s % 3 for s in seeds],
                "text": [f"sample {s}" for s in seeds],
            },
            features=features,
        )

    dd = datasets.DatasetDict({"train": part([0, 1, 2, 3]), "validation": part([4, 5])})
    dd.save_to_disk(str(tmp_path / "hf"))
    assert detect_kind(str(tmp_path / "hf")) == "hf"
    report, rows = _run(tmp_path / "hf", tmp_path / "out", source="hf")
    assert report["class_names"] == ["a", "b", "c"]
    assert report["split_counts"] == {"train": 4, "validation": 2}
    assert [(r["member"], r["label"], r["caption"]) for r in rows][4] == ("validation/0", 4 % 3, "sample 4")


def test_parquet_files_hf_style_and_plain_binary(tmp_path: Path) -> None:
    (tmp_path / "pq").mkdir()
    table = pa.table(
        {"img": [{"bytes": png_bytes(noise_image(s)), "path": None} for s in range(3)], "label": ["x", "y", "x"]}
    )
    pq.write_table(table, tmp_path / "pq" / "a.parquet")
    plain = pa.table(
        {
            "img": pa.array([png_bytes(noise_image(10 + s)) for s in range(2)] + [b"junk"], pa.binary()),
            "label": ["y", "z", "z"],
        }
    )
    pq.write_table(plain, tmp_path / "b.parquet")
    report, rows = _run(tmp_path / "pq", tmp_path / "out", source="parquet")
    assert report["accepted"] == 3 and report["class_names"] == ["x", "y"]
    assert [r["label"] for r in rows] == [0, 1, 0]
    report2, rows2 = _run(tmp_path / "b.parquet", tmp_path / "out2", source="parquet", image_column="img")
    assert report2["accepted"] == 2 and len(report2["quarantined"]) == 1
    assert report2["quarantined"][0]["path"].endswith("b.parquet::2")
    assert report2["class_names"] == ["y", "z"] and [r["label"] for r in rows2] == [0, 1]


def test_webdataset_shards_stream_with_labels_and_captions(tmp_path: Path) -> None:
    import webdataset as wds

    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"s{shard}.tar")) as sink:
            for i in range(3):
                sink.write(
                    {
                        "__key__": f"k{shard}{i}",
                        "png": png_bytes(noise_image(10 * shard + i)),
                        "cls": str(i).encode(),
                        "txt": b"hi",
                    }
                )
            sink.write({"__key__": "nolabel", "json": b"{}"})
    (tmp_path / "shards" / "broken.tar").write_bytes(b"this is not a tar file" * 40)
    assert detect_kind(str(tmp_path / "shards")) == "webdataset"
    report, rows = _run(tmp_path / "shards", tmp_path / "out", source="webdataset")
    assert report["accepted"] == 6 and report["class_names"] == ["0", "1", "2"]
    assert rows[0]["member"] == "k00.png" and rows[0]["caption"] == "hi"
    assert {Path(s["path"].split("::")[0]).name for s in report["skipped"]} == {"s0.tar", "s1.tar"}
    assert any("broken.tar" in q["path"] for q in report["quarantined"])


@pytest.mark.parametrize("fmt", ["npz", "npy"])
def test_arrays_with_and_without_labels(tmp_path: Path, fmt: str) -> None:
    images = np.stack([noise_image(i, (10, 10)) for i in range(5)])
    labels = np.array([0, 2, 1, 2, 0])
    if fmt == "npz":
        np.savez(tmp_path / "d.npz", images=images, labels=labels)
        report, rows = _run(tmp_path / "d.npz", tmp_path / "out", source="arrays")
        assert report["class_names"] == ["0", "1", "2"] and [r["label"] for r in rows] == labels.tolist()
    else:
        np.save(tmp_path / "d.npy", images.astype(np.float32) / 255)
        report, rows = _run(tmp_path / "d.npy", tmp_path / "out", source="arrays")
        assert report["class_names"] is None and report["accepted"] == 5
        assert "scaled to 8-bit" in rows[0]["converted"]
    assert rows[3]["member"] == "3" and (rows[3]["width"], rows[3]["height"]) == (10, 10)


def test_digits(tmp_path: Path) -> None:
    report, rows = _run("digits", tmp_path / "out")
    assert report["files_seen"] == 1797 and report["class_names"] == [str(i) for i in range(10)]
    assert report["accepted"] + len(report["skipped"]) == 1797 and not report["quarantined"]
    assert all(s["reason"].startswith("duplicate") for s in report["skipped"])
    assert sum(report["class_counts"].values()) == len(rows) == report["accepted"]
