"""The training caches: latents (posterior mean and std) and text embeddings in safetensors shards, reused
bitwise, rebuilt only where a key changed, redone in float32 when half precision overflows, usable after a
build that died midway; `info`/`clear` and `sdpipe cache`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import noise_image
from sdpipe.data.buckets import fit_to_bucket
from sdpipe.train import cache as cache_mod
from sdpipe.train import cache_store
from sdpipe.train.cache import LatentCache, TextCache, clear, default_root, info
from sdpipe.train.cache_cli import app
from sdpipe.train.cache_store import INDEX

pytestmark = pytest.mark.usefixtures("one_torch_thread", "offline")

BUCKETS = [(16, 16), (16, 24), (24, 16)]
N = 5
ITEMS = [(i, f"sha-{i}", BUCKETS[i % 3]) for i in range(N)]


@pytest.fixture(scope="module")
def vae() -> Any:
    torch.manual_seed(0)
    vae: Any = diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=32,
    )  # fmt: skip
    return vae.eval()


def load(i: int, bucket: tuple[int, int]) -> np.ndarray:
    im = Image.fromarray(noise_image(i, (20 + 3 * i, 18 + 2 * i, 3)))
    return np.asarray(fit_to_bucket(im, bucket)).transpose(2, 0, 1).copy()


def _keys(c: LatentCache, items: list = ITEMS, flips: bool = True) -> list:
    return [c.key(sha, b, f) for _, sha, b in items for f in ((False, True) if flips else (False,))]


def _by_bucket(c: LatentCache, items: list = ITEMS) -> dict:
    """Every entry's (mean, std), read with one get() per bucket."""
    out: dict = {}
    for bucket in BUCKETS:
        keys = [k for k in _keys(c, items) if k.bucket == bucket]
        if not keys:
            continue
        mean, std = c.get(keys)
        out |= {k: (mean[j], std[j]) for j, k in enumerate(keys)}
    return out


def test_latents_are_the_posterior_and_are_reused_bitwise(tmp_path: Path, vae: Any) -> None:
    c = LatentCache(tmp_path, vae, "vae-a", "pp-1", shard_rows=4, batch_size=3)
    calls: list[tuple[int, int]] = []
    assert c.ensure(ITEMS, load, flips=True, progress=lambda d, t: calls.append((d, t))) == {
        "built": 2 * N, "reused": 0, "redone_float32": 0,
    }  # fmt: skip
    assert calls[-1] == (2 * N, 2 * N) and len(list((tmp_path / "latents").glob("*.safetensors"))) == 2  # 6 + 4
    first = _by_bucket(c)
    x = torch.from_numpy(load(1, (16, 24))).float()[None] / 127.5 - 1
    with torch.no_grad():
        dist = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    mean, std = c.get([c.key("sha-1", (16, 24), False), c.key("sha-1", (16, 24), True)])
    assert mean.shape == (2, 4, 12, 8) and mean.dtype == torch.float32 and mean.device.type == "cpu"
    torch.testing.assert_close(mean, dist.mean, rtol=1e-5, atol=1e-5)  # the mean and std, never a sample
    torch.testing.assert_close(std, dist.std, rtol=1e-5, atol=1e-5)
    again = LatentCache(tmp_path, vae, "vae-a", "pp-1")  # a new process: from the shards on disk
    assert again.ensure(ITEMS, load, flips=True) == {"built": 0, "reused": 2 * N, "redone_float32": 0}
    (tmp_path / "latents" / INDEX).unlink()  # the index is only a cache of the shards' headers
    reread = _by_bucket(LatentCache(tmp_path, vae, "vae-a", "pp-1"))
    for k, (m, s) in first.items():
        assert torch.equal(reread[k][0], m) and torch.equal(reread[k][1], s)
    with pytest.raises(ValueError, match="one bucket at a time"):
        c.get(_keys(c)[:4])
    with pytest.raises(KeyError, match="ensure"):
        c.get([c.key("sha-unknown", (16, 16), False)])


def test_a_changed_key_rebuilds_only_what_it_touches(tmp_path: Path, vae: Any) -> None:
    c = LatentCache(tmp_path, vae, "vae-a", "pp-1", shard_rows=3)
    c.ensure(ITEMS, load, flips=True)
    before = _by_bucket(c)
    moved = [*ITEMS[:2], (2, "sha-2", (16, 16)), *ITEMS[3:]]  # image 2 changes bucket
    built: list[int] = []

    def counted(i: int, bucket: tuple[int, int]) -> np.ndarray:
        built.append(i)
        return load(i, bucket)

    counts = c.ensure(moved, counted, flips=True)
    assert counts == {"built": 2, "reused": 2 * N - 2, "redone_float32": 0} and built == [2]
    after = _by_bucket(c, moved)
    assert all(torch.equal(after[k][0], before[k][0]) for k in after if k.pixel_sha256 != "sha-2")
    assert c.ensure(moved, load, flips=False) == {"built": 0, "reused": N, "redone_float32": 0}
    other_vae = LatentCache(tmp_path, vae, "vae-b", "pp-1")
    assert other_vae.ensure(ITEMS[:2], load, flips=False)["built"] == 2
    other_pp = LatentCache(tmp_path, vae, "vae-a", "pp-2")
    assert other_pp.ensure(ITEMS[:1], load, flips=True)["built"] == 2
    assert info(tmp_path)["latents"]["encoders"] == ["vae-a", "vae-b"]


def _overflow_in_half(monkeypatch: pytest.MonkeyPatch, rows: list[int], always: bool = False) -> None:
    """vae.encode gives +inf means for `rows` of a batch when it runs in float16 (or in every dtype)."""
    real: Any = diffusers.AutoencoderKL.encode

    def encode(self: Any, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        out = real(self, x, *args, **kwargs)
        if x.dtype == torch.float16 or always:
            for r in rows:
                if r < len(x):
                    out.latent_dist.mean[r] = float("inf")
        return out

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", encode)


def test_a_non_finite_half_encode_is_redone_in_float32(
    tmp_path: Path, vae: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _overflow_in_half(monkeypatch, [0])
    items = [(0, "sha-0", (16, 16)), (1, "sha-1", (16, 16))]
    c = LatentCache(tmp_path, vae, "vae-a", "pp-1", encode_dtype=torch.float16, batch_size=2)
    assert c.ensure(items, load, flips=False) == {"built": 2, "reused": 0, "redone_float32": 1}
    assert next(vae.parameters()).dtype == torch.float32, "the caller's VAE is never cast"
    mean, std = c.get(_keys(c, items, flips=False))
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and mean.dtype == torch.float32
    ref = LatentCache(tmp_path / "ref", vae, "vae-a", "pp-1")
    ref.ensure(items, load, flips=False)
    ref_mean, _ = ref.get(_keys(ref, items, flips=False))
    torch.testing.assert_close(mean[0], ref_mean[0], rtol=1e-5, atol=1e-5)  # image 0: in float32
    assert (mean[1] - ref_mean[1]).abs().max() > 1e-5 and torch.allclose(mean[1], ref_mean[1], atol=5e-2)  # float16
    stored = c.store.read([c.key("sha-0", (16, 16), False).digest(), c.key("sha-1", (16, 16), False).digest()])
    assert [e["mean"].dtype for e in stored] == [torch.float32, torch.float16]
    _overflow_in_half(monkeypatch, [1], always=True)
    with pytest.raises(FloatingPointError, match=r"image 3 \(pixel sha256 sha-3.*even in float32"):
        c.ensure([(2, "sha-2", (16, 16)), (3, "sha-3", (16, 16))], load, flips=False)


def test_a_build_killed_midway_keeps_its_complete_shards(tmp_path: Path, vae: Any) -> None:
    items = [(i, f"sha-{i}", (16, 16)) for i in range(7)]

    def dies_at_5(i: int, bucket: tuple[int, int]) -> np.ndarray:
        if i == 5:
            raise RuntimeError("killed")
        return load(i, bucket)

    c = LatentCache(tmp_path, vae, "vae-a", "pp-1", shard_rows=2, batch_size=1)
    with pytest.raises(RuntimeError, match="killed"):
        c.ensure(items, dies_at_5, flips=False)
    folder = tmp_path / "latents"
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".safetensors", ".safetensors"], "no temp files"
    rerun = LatentCache(tmp_path, vae, "vae-a", "pp-1", shard_rows=2, batch_size=1)
    assert rerun.ensure(items, load, flips=False) == {"built": 3, "reused": 4, "redone_float32": 0}
    mean, _ = rerun.get(_keys(rerun, items, flips=False))
    assert mean.shape == (7, 4, 8, 8) and torch.isfinite(mean).all()


def test_a_shard_that_fails_while_written_never_appears(
    tmp_path: Path, vae: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"\x00" * 100)  # part of a file, then the write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_store, "save_file", disk_full)
    c = LatentCache(tmp_path, vae, "vae-a", "pp-1")
    with pytest.raises(OSError, match="No space"):
        c.ensure(ITEMS[:2], load, flips=False)
    assert not (tmp_path / "latents").exists() or not list((tmp_path / "latents").iterdir()), "no partial shard"
    monkeypatch.undo()
    assert LatentCache(tmp_path, vae, "vae-a", "pp-1").ensure(ITEMS[:2], load, flips=False)["built"] == 2


def test_a_shard_written_elsewhere_is_found_and_a_partial_one_ignored(tmp_path: Path, vae: Any) -> None:
    reader = LatentCache(tmp_path, vae, "vae-a", "pp-1")
    writer = LatentCache(tmp_path, vae, "vae-a", "pp-1")
    writer.ensure(ITEMS[:1], load, flips=False)
    (tmp_path / "latents" / ".deadbeef.safetensors.123.tmp").write_bytes(b"partial")
    (tmp_path / "latents" / "truncated.safetensors").write_bytes(b"\x10\x00\x00")
    mean, _ = reader.get([reader.key("sha-0", (16, 16), False)])  # not in the reader's index yet
    assert mean.shape == (1, 4, 8, 8)
    assert info(tmp_path)["latents"]["entries"] == 1 and info(tmp_path)["latents"]["shards"] == 1


def fake_text(captions: list[str]) -> dict[str, torch.Tensor]:
    seeds = [sum(map(ord, c)) for c in captions]
    embeds = torch.stack([torch.randn(6, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return {"prompt_embeds": embeds.half(), "pooled": embeds.mean(1)}


def test_text_cache_holds_the_empty_caption_and_is_reused(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        seen.append(captions)
        return fake_text(captions)

    c = TextCache(tmp_path, encode, "te-a", batch_size=2)
    assert c.ensure(["a cat", "a dog", "a cat"]) == {"built": 3, "reused": 0}
    assert seen == [["", "a cat"], ["a dog"]]
    assert c.ensure(["a dog"]) == {"built": 0, "reused": 2}
    got = TextCache(tmp_path, fake_text, "te-a").get(["", "a dog", ""])
    expected = fake_text(["", "a dog", ""])
    assert set(got) == {"prompt_embeds", "pooled"} and got["prompt_embeds"].dtype == torch.float32
    assert torch.equal(got["prompt_embeds"], expected["prompt_embeds"].float())
    assert torch.equal(got["pooled"], expected["pooled"])
    assert TextCache(tmp_path, fake_text, "te-b").ensure(["a dog"])["built"] == 2
    with pytest.raises(KeyError):
        c.get(["a bird"])

    def broken(caps: list[str]) -> dict[str, torch.Tensor]:
        out = fake_text(caps)
        out["pooled"][-1, 0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="'a bird'"):
        TextCache(tmp_path, broken, "te-a").ensure(["a bird"])
    assert info(tmp_path)["text"] == {"entries": 5, "shards": 3, "bytes": info(tmp_path)["text"]["bytes"],
                                      "encoders": ["te-a", "te-b"]}  # fmt: skip


@pytest.fixture
def filled(tmp_path: Path, vae: Any) -> Iterator[Path]:
    LatentCache(tmp_path, vae, "vae-a", "pp-1").ensure(ITEMS[:2], load, flips=True)
    TextCache(tmp_path, fake_text, "te-a").ensure(["x"])
    yield tmp_path


def test_info_and_clear(filled: Path) -> None:
    found = info(filled)
    assert found["latents"]["entries"] == 4 and found["latents"]["shards"] == 1 and found["latents"]["bytes"] > 0
    assert found["text"]["entries"] == 2 and found["text"]["encoders"] == ["te-a"]
    removed = clear(filled, "text")
    assert list(removed) == ["text"] and removed["text"]["shards"] == 1 and removed["text"]["bytes"] > 0
    assert info(filled)["text"]["entries"] == 0 and info(filled)["latents"]["entries"] == 4
    assert clear(filled)["latents"]["shards"] == 1 and info(filled)["latents"] == {
        "entries": 0, "shards": 0, "bytes": 0, "encoders": [],
    }  # fmt: skip
    with pytest.raises(ValueError, match="latents, text"):
        clear(filled, "images")
    assert default_root() == cache_mod.cache_dir() / "train"


def test_cache_cli(filled: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["info", "--root", str(filled)])
    assert shown.exit_code == 0, shown.output
    assert "latents" in shown.output and "vae-a" in shown.output and "te-a" in shown.output
    kept = runner.invoke(app, ["clear", "--root", str(filled)], input="n\n")
    assert kept.exit_code == 1 and info(filled)["latents"]["entries"] == 4
    bad = runner.invoke(app, ["clear", "--root", str(filled), "--kind", "images", "--yes"])
    assert bad.exit_code == 2 and "latents" in bad.output
    gone = runner.invoke(app, ["clear", "--root", str(filled), "--kind", "latents", "--yes"])
    assert gone.exit_code == 0 and "latents: removed 1 shards" in gone.output
    assert info(filled)["latents"]["entries"] == 0 and info(filled)["text"]["entries"] == 2
