"""Captions in `sdpipe data validate`: missing, empty, undecodable, over-long and repeated captions are reported
for every source kind that has captions (report.json's `captions` section, the HTML and the console summary)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from conftest import noise_image, png_bytes
from sdpipe.config import ConfigError, DataConfig
from sdpipe.data import captions
from sdpipe.data.captions import caption_key, caption_section, load_tokenizer, spread, token_counts, tokens_cut
from sdpipe.data.report import print_summary
from sdpipe.data.sources import SourceError
from sdpipe.data.validate import validate

LONG = "photo " * 100  # "photo" is one CLIP token: 100 + start + end = 102 tokens, 25 past a 77-token window


def _words(texts: list[str]) -> list[int]:
    """A stand-in tokenizer for the pure tests: one token a word, plus start and end."""
    return [len(t.split()) + 2 for t in texts]


def _batches(pairs: list[tuple[str, str | None]], size: int = 3) -> captions.Batches:
    return lambda: (pairs[i : i + size] for i in range(0, len(pairs), size))


def _name(path: str) -> str:
    return path.replace("::", "/").rsplit("/", 1)[-1]


def _manifest_captions(out: Path) -> dict[str, str | None]:
    return {_name(r["path"]): r["caption"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}


# --- pure functions ------------------------------------------------------------------------------------------


def test_spread_cut_and_key() -> None:
    assert spread([]) is None
    assert spread([5, 1, 3, 2, 4]) == {"min": 1, "median": 3.0, "p95": 4.8, "max": 5}
    assert tokens_cut(77, 77) == 0 and tokens_cut(102, 77) == 25
    assert caption_key("a  red\ncar ") == caption_key("a red car") != caption_key("A red car")


def test_section_counts_lists_and_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(captions, "LISTED", 2)
    pairs = [("m1", None), ("m2", None), ("m3", None), ("e1", ""), ("e2", "  \n"), ("u", None)]
    pairs += [("d1", "a dog"), ("d2", "a  dog"), ("d3", "a dog"), ("c1", "a cat"), ("c2", "a cat"), ("x", "one")]
    pairs += [("long", "w " * 10), ("longer", "w " * 12)]
    problems = [{"path": "u.txt", "image": "u", "reason": "not UTF-8 text"}]
    c = caption_section(_batches(pairs), 8, problems, tokenizer="tok", count=_words)
    assert c is not None
    assert (c["captioned"], c["missing"], c["empty"], c["undecodable"]) == (8, 3, 2, 1)
    assert c["missing_paths"] == ["m1", "m2"] and c["empty_paths"] == ["e1", "e2"]  # capped at LISTED, counts not
    assert (c["over_long"], c["tokens_cut"]) == (2, 4 + 6)
    assert c["over_long_paths"] == [
        {"path": "longer", "tokens": 14, "cut": 6},
        {"path": "long", "tokens": 12, "cut": 4},
    ]
    assert c["tokens"] == spread([4, 4, 4, 4, 4, 3, 12, 14]) and c["words"]["max"] == 12
    assert c["distinct"] == 5 and c["sharing"] == 5 and c["sharing_paths"] == ["d1", "d2"]
    assert c["most_repeated"] == [{"caption": "a dog", "count": 3}, {"caption": "a cat", "count": 2}]
    assert c["problems"] == problems and c["tokenizer"] == "tok" and c["max_tokens"] == 8


def test_no_captions_is_none_and_loads_no_tokenizer() -> None:
    def fail(texts: list[str]) -> list[int]:
        raise AssertionError("tokenized without captions")

    assert caption_section(_batches([("a", None), ("b", None)]), 77, [], count=fail) is None
    only_empty = caption_section(_batches([("a", "")]), 77, [], count=fail)
    assert only_empty is not None and only_empty["empty"] == 1 and only_empty["tokens"] is None


def test_bad_tokenizer_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.caption_tokenizer=.*no such folder"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.caption_tokenizer=.*not a tokenizer folder"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(noise_image(0)))
    with pytest.raises(ConfigError, match=r"data\.caption_tokenizer"):
        validate(str(tmp_path / "img"), tmp_path / "out", DataConfig(caption_tokenizer=str(tmp_path / "nowhere")))
    assert not (tmp_path / "out").exists()  # it failed before reading anything


# --- every source kind ---------------------------------------------------------------------------------------


def test_folder_txt_captions(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    texts: dict[str, bytes | None] = {
        "a": b"a red car",
        "b": None,  # no sidecar: missing
        "c": b"  \n",  # empty
        "d": "café au lait".encode("latin-1"),  # not UTF-8
        "e": LONG.encode(),
        "f": b"a red car\n",
        "g": b"\xef\xbb\xbfa red car",  # UTF-8 with a BOM
    }
    for i, (stem, text) in enumerate(texts.items()):
        (src / f"{stem}.png").write_bytes(png_bytes(noise_image(i)))
        if text is not None:
            (src / f"{stem}.txt").write_bytes(text)
    report = validate(str(src), tmp_path / "out", DataConfig())
    c = report["captions"]
    assert (c["captioned"], c["missing"], c["empty"], c["undecodable"]) == (4, 1, 1, 1)
    assert [_name(p) for p in c["missing_paths"]] == ["b.png"] and [_name(p) for p in c["empty_paths"]] == ["c.png"]
    [problem] = c["problems"]
    assert _name(problem["path"]) == "d.txt" and _name(problem["image"]) == "d.png"
    assert "not UTF-8" in problem["reason"] and "0xe9" in problem["reason"]
    rows = _manifest_captions(tmp_path / "out")
    assert rows["d.png"] is None and rows["g.png"] == "a red car" and rows["c.png"] == ""
    assert not any("\ufffd" in (v or "") for v in rows.values())

    expected = len(load_tokenizer(None)(LONG, verbose=False)["input_ids"])
    assert expected == 102 and token_counts(load_tokenizer(None), ["a red car"]) == [5]
    assert (c["over_long"], c["tokens_cut"], c["max_tokens"]) == (1, expected - 77, 77)
    assert c["over_long_paths"] == [{"path": str(src / "e.png"), "tokens": expected, "cut": expected - 77}]
    assert c["tokens"] == {"min": 5, "median": 5.0, "p95": 87.4, "max": 102} and c["words"]["max"] == 100
    assert c["distinct"] == 2 and c["most_repeated"] == [{"caption": "a red car", "count": 3}]
    assert c["sharing"] == 3 and [_name(p) for p in c["sharing_paths"]] == ["a.png", "f.png", "g.png"]

    assert json.loads((tmp_path / "out" / "report.json").read_text())["captions"] == c
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Captions</h2>" in page and "d.txt" in page and "Over-long captions" in page
    buf = io.StringIO()
    print_summary(report, Console(file=buf, width=200), tmp_path / "out")
    shown = buf.getvalue()
    assert "4 captioned, 1 missing, 1 empty, 1 undecodable" in shown and "25 tokens cut" in shown
    assert "d.txt" in shown and "a red car" in shown

    short = validate(str(src), tmp_path / "out2", DataConfig(caption_max_tokens=103))["captions"]
    assert (short["over_long"], short["tokens_cut"]) == (0, 0)


def test_folder_without_captions_has_none(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes(noise_image(0)))
    report = validate(str(tmp_path / "img"), tmp_path / "out", DataConfig())
    assert report["captions"] is None
    assert json.loads((tmp_path / "out" / "report.json").read_text())["captions"] is None
    assert "none in this source" in (tmp_path / "out" / "report.html").read_text()


def test_metadata_jsonl_captions(tmp_path: Path) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(png_bytes(noise_image(i)))
    lines = [
        json.dumps({"file_name": "0.png", "text": "one"}).encode(),
        json.dumps({"file_name": "1.png", "text": None}).encode(),  # null: missing, never the text "None"
        b'{"file_name": "2.png", "text": "caf\xe9"}',  # not UTF-8
        b"{not json",
        json.dumps({"file_name": "3.png", "text": "one"}).encode(),
    ]
    (src / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    c = validate(str(src), tmp_path / "out", DataConfig())["captions"]
    assert (c["captioned"], c["missing"], c["empty"], c["undecodable"]) == (2, 2, 0, 1)
    assert sorted(_name(p) for p in c["missing_paths"]) == ["1.png", "4.png"]
    by_reason = {p["reason"].split(":")[0]: p for p in c["problems"]}
    assert set(by_reason) == {"line 3", "line 4"}
    assert _name(by_reason["line 3"]["image"]) == "2.png" and "not UTF-8" in by_reason["line 3"]["reason"]
    assert by_reason["line 4"]["image"] is None and "not JSON" in by_reason["line 4"]["reason"]
    assert all(_name(p["path"]) == "metadata.jsonl" for p in c["problems"])
    assert c["most_repeated"] == [{"caption": "one", "count": 2}]
    assert _manifest_captions(tmp_path / "out")["1.png"] is None


def test_parquet_caption_column(tmp_path: Path) -> None:
    caps = ["a dog", None, "", LONG, "a dog"]
    images = [{"bytes": png_bytes(noise_image(s)), "path": None} for s in range(len(caps))]
    pq.write_table(pa.table({"img": images, "caption": caps}), tmp_path / "a.parquet")
    c = validate(str(tmp_path / "a.parquet"), tmp_path / "out", DataConfig(source="parquet"))["captions"]
    assert (c["captioned"], c["missing"], c["empty"], c["undecodable"]) == (3, 1, 1, 0)
    assert (c["over_long"], c["tokens_cut"]) == (1, 25)
    assert c["most_repeated"] == [{"caption": "a dog", "count": 2}] and c["distinct"] == 2
    with pytest.raises(SourceError, match=r"no column 'words'.*data\.caption_column"):
        validate(str(tmp_path / "a.parquet"), tmp_path / "o2", DataConfig(source="parquet", caption_column="words"))


def test_hf_caption_column(tmp_path: Path) -> None:
    import datasets

    caps = ["a cat", "a cat", None]
    ds = datasets.Dataset.from_dict(
        {"image": [png_bytes(noise_image(s)) for s in range(3)], "text": caps},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    c = validate(str(tmp_path / "ds"), tmp_path / "out", DataConfig(source="hf"))["captions"]
    assert (c["captioned"], c["missing"], c["distinct"], c["sharing"]) == (2, 1, 1, 2)
    assert c["tokens"] == {"min": 4, "median": 4.0, "p95": 4.0, "max": 4}


def test_webdataset_txt_members(tmp_path: Path) -> None:
    import webdataset as wds

    texts = [b"a boat", b"\xff\xfea boat", LONG.encode(), None]
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for i, text in enumerate(texts):
            sample = {"__key__": f"k{i}", "png": png_bytes(noise_image(i))}
            sink.write(sample | ({"txt": text} if text is not None else {}))
    c = validate(str(tmp_path / "s.tar"), tmp_path / "out", DataConfig(source="webdataset"))["captions"]
    assert (c["captioned"], c["missing"], c["undecodable"], c["over_long"], c["tokens_cut"]) == (2, 1, 1, 1, 25)
    [problem] = c["problems"]
    assert problem["path"] == f"{tmp_path / 's.tar'}::k1.txt" and problem["image"].endswith("::k1.png")
    assert "not UTF-8 text (byte 0xff at offset 0)" in problem["reason"]
    assert _manifest_captions(tmp_path / "out")["k1.png"] is None
