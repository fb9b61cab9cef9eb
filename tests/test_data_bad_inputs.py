"""Bad input never crashes validation, never changes the source, and every file is accounted for with a reason."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from sdpipe.cli import app
from sdpipe.config import DataConfig
from sdpipe.data.validate import validate


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _noise(seed: int, shape: tuple[int, ...] = (16, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height."""
    data = bytearray(_png(np.zeros((1, 1), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    """A 20 wide x 10 high JPEG, left half black, tagged orientation 6 (display rotated 90 degrees clockwise)."""
    arr = np.full((10, 20, 3), 255, np.uint8)
    arr[:, :10] = 0
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.fromarray(np.full((12, 12), v, np.uint8)).convert("P") for v in (0, 255, 128)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _bad_tree(root: Path) -> dict[str, str]:
    """Writes every kind of bad input; returns {file name: what the report must say about it}."""
    good = _png(_noise(0))
    jpeg = _save(Image.fromarray(_noise(1)), "JPEG")
    palette = Image.fromarray(_noise(2, (16, 16))).convert("P")
    palette.info["transparency"] = 0
    files = {
        "good.png": (good, "accepted"),
        "empty.png": (b"", "quarantined:empty file"),
        "truncated.png": (good[: len(good) // 2], "quarantined:truncated"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "quarantined:truncated"),
        "text.png": (b"this is not an image\n", "quarantined:not an image"),
        "random.jpg": (os.urandom(300), "quarantined:not an image"),
        "cmyk.jpg": (_save(Image.fromarray(_noise(3)).convert("CMYK"), "JPEG"), "converted:CMYK"),
        "sixteen.png": (_png(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "converted:16-bit"),
        "palette_alpha.png": (_save(palette, "PNG", transparency=0), "converted:palette with transparency"),
        "la.png": (_save(Image.fromarray(_noise(4, (16, 16, 2))), "PNG"), "converted:alpha"),
        "rotated.jpg": (_exif_rotated_jpeg(), "converted:EXIF orientation 6"),
        "animated.gif": (_animated_gif(), "converted:animated (3 frames)"),
        "bomb.png": (_bomb_png(100_000, 100_000), "quarantined:decompression bomb"),
        "tiny.png": (_png(_noise(5, (4, 4, 3))), "quarantined:too small"),
        "tiff.tif": (_save(Image.fromarray(_noise(6)), "TIFF"), "accepted"),
        "webp.webp": (_save(Image.fromarray(_noise(7)), "WEBP", lossless=True), "accepted"),
        "bitmap.bmp": (_save(Image.fromarray(_noise(8)), "BMP"), "accepted"),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    (root / "broken_link.png").symlink_to(root / "does_not_exist.png")
    (root / "loop_a.png").symlink_to(root / "loop_b.png")
    (root / "loop_b.png").symlink_to(root / "loop_a.png")
    os.symlink(b"good.png", os.fsencode(root) + b"/bad_name_\xff.png")
    expected = {name: what for name, (_, what) in files.items()}
    expected |= {"broken_link.png": "quarantined:broken symlink", "loop_a.png": "quarantined:symlink loop"}
    expected |= {"loop_b.png": "quarantined:symlink loop", "bad_name_\\xff.png": "quarantined:not valid UTF-8"}
    return expected


def _tree_hash(root: Path) -> str:
    """Names, link targets, modes and bytes of everything under root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(os.fsencode(root))):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(p + oct(os.lstat(p).st_mode).encode())
            if os.path.islink(p):
                h.update(os.readlink(p))
            else:
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def _by_name(report: dict) -> dict[str, tuple[str, str]]:
    out = {}
    for status in ("quarantined", "skipped"):
        for row in report[status]:
            out[Path(row["path"]).name] = (status, row["reason"])
    for row in report["converted"]:
        out[Path(row["path"]).name] = ("converted", "; ".join(row["notes"]))
    return out


def test_every_bad_input_is_quarantined_or_converted_with_its_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = _bad_tree(src)
    before = _tree_hash(src)
    report = validate(str(src), tmp_path / "out", DataConfig(source="folder"))
    assert _tree_hash(src) == before, "validation changed the source tree"
    seen = _by_name(report)
    for name, what in expected.items():
        status, _, words = what.partition(":")
        if status == "accepted":
            assert name not in seen, f"{name}: {seen.get(name)}"
            continue
        assert name in seen, f"{name} not reported"
        assert seen[name][0] == status and words in seen[name][1], f"{name}: {seen[name]}"
    assert report["files_seen"] == len(expected)
    assert report["files_seen"] == report["accepted"] + len(report["quarantined"]) + len(report["skipped"])
    converted = [n for n, w in expected.items() if w.startswith("converted")]
    accepted = [n for n, w in expected.items() if w == "accepted"]
    assert report["converted_total"] == len(converted) and report["conversions"]["CMYK converted to RGB"] == 1
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert sorted(Path(r["path"]).name for r in rows) == sorted(converted + accepted)
    modes = {Path(r["path"]).name: r["mode"] for r in rows}
    assert modes["cmyk.jpg"] == "CMYK" and modes["la.png"] == "LA" and modes["sixteen.png"].startswith("I")


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "r.jpg").write_bytes(_exif_rotated_jpeg())
    validate(str(tmp_path / "src"), tmp_path / "out", DataConfig(source="folder"))
    (row,) = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert (row["width"], row["height"]) == (10, 20)  # stored 20x10, shown rotated

    from sdpipe.data.readers import decode_image

    pixels = decode_image((tmp_path / "src" / "r.jpg").read_bytes(), 1, 10**6).pixels
    assert pixels.shape == (20, 10, 3)
    assert pixels[:5].mean() < 60 and pixels[-5:].mean() > 200  # black half on top after rotating clockwise


def _validate_as_nobody(src: Path, out: Path) -> dict:
    """Validate in a forked child that gave up root (uid 65534), so that file permissions apply."""
    import json

    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            validate(str(src), out, DataConfig(source="folder", workers=1))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "validation failed in the unprivileged child"
    return json.loads((out / "report.json").read_text())


def test_unreadable_file(tmp_path: Path) -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp"))  # outside root-only folders, so that another user can reach it
    try:
        base.chmod(0o777)
        src = base / "src"
        src.mkdir()
        src.chmod(0o755)
        (src / "ok.png").write_bytes(_png(_noise(1)))
        locked = src / "locked.png"
        locked.write_bytes(_png(_noise(0)))
        locked.chmod(0)
        if os.geteuid() == 0:  # root reads mode-000 files: check as an unprivileged user instead
            assert os.access(locked, os.R_OK)
            report = _validate_as_nobody(src, base / "out")
        else:
            report = validate(str(src), base / "out", DataConfig(source="folder"))
        assert report["quarantined"] == [{"path": str(locked), "reason": "unreadable: permission denied"}]
        assert report["accepted"] == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_strict_exits_non_zero_on_quarantine(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(_png(_noise(0)))
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "validate", str(src), "--out", str(tmp_path / "a"), "--strict", "-q"])
    assert ok.exit_code == 0, ok.output
    (src / "bad.png").write_bytes(b"nope")
    lenient = runner.invoke(app, ["data", "validate", str(src), "--out", str(tmp_path / "b"), "-q"])
    assert lenient.exit_code == 0 and "1 quarantined" in lenient.output
    strict = runner.invoke(app, ["data", "validate", str(src), "--out", str(tmp_path / "c"), "--strict", "-q"])
    assert strict.exit_code == 1


def test_out_inside_the_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(_png(_noise(0)))
    result = CliRunner().invoke(app, ["data", "validate", str(tmp_path), "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and "inside the source" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_errors_name_the_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["data", "validate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    kind = runner.invoke(app, ["data", "validate", str(tmp_path), "--out", str(tmp_path / "o"), "--kind", "zip"])
    assert kind.exit_code == 2 and "one of folder" in kind.output
    (tmp_path / "x.npz").write_bytes(b"not an npz")
    bad = runner.invoke(app, ["data", "validate", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o2"), "-q"])
    assert bad.exit_code == 2 and "cannot read arrays" in bad.output


def test_near_duplicates_work_on_numpy_1_without_bitwise_count(monkeypatch) -> None:
    """pyproject admits numpy >= 1.24; np.bitwise_count is numpy 2 only."""
    import numpy as np

    from sdpipe.data import duplicates

    hashes = np.array([0b1011, 0b1010, 0xFFFF_0000_0000_0000, 0xFFFF_0000_0000_0007], dtype=np.uint64)
    expected = duplicates.near_duplicate_groups(hashes, 3)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert duplicates.near_duplicate_groups(hashes, 3) == expected == ([[0, 1], [2, 3]], 0)
    x = np.array([0, 1, 2**64 - 1, 0x8000_0000_0000_0001], dtype=np.uint64)
    assert duplicates.popcount(x).tolist() == [0, 1, 64, 2]


def test_a_source_with_no_usable_image_is_an_error(tmp_path: Path) -> None:
    """An empty source validated with exit 0 and no warning; training on it then failed far from the cause."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["data", "validate", str(empty), "--out", str(tmp_path / "v1")])
    assert result.exit_code == 2 and "no usable images (0 files seen" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["data", "validate", str(bad), "--out", str(tmp_path / "v2")])
    assert result.exit_code == 2 and "2 files seen, 2 quarantined" in result.output
    assert (tmp_path / "v2" / "report.html").exists()  # the reasons are still written down
