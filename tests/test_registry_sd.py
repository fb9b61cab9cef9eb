"""The registry with Stable Diffusion models and LoRAs: diffusers folders, single-file checkpoints and LoRA files
register as versions (kind, architecture, sha256, size; stored byte for byte, read-only); `load` gives a checked
LoadedPipeline; `resolve_lora` finds a registered LoRA and the base it was made for; `fits` refuses a base of
another architecture, naming both; databases made before these columns existed are migrated."""

from __future__ import annotations

import filecmp
import json
import shutil
import stat
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import random_model
from sd_fixtures import single_file_folders
from sdpipe.models.files import identify
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.registry import Registry, RegistryError, fits, load, lora_path, resolve, resolve_lora
from sdpipe.registry import cli as registry_cli
from sdpipe.registry.db import ADDED_COLUMNS, install_triggers
from sdpipe.registry.loras import legacy_model_hash

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
runner = CliRunner()
BASE = ["--width", "32", "--height", "32", "--steps", "3", "--sampler", "Euler a", "--guidance", "5"]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(f"sqlite:///{tmp_path / 'reg' / 'registry.db'}")


def make_lora(path: Path, architecture: str = "sd1", metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A small kohya-format LoRA: real SD key names, made for `architecture` by the width of its cross-attention
    keys (768 sd1, 2048 sdxl), rank 4; the shapes need not fit any model beyond that."""
    from safetensors.torch import save_file

    context = {"sd1": 768, "sdxl": 2048}[architecture]
    te = "lora_te_" if architecture == "sd1" else "lora_te1_"
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 320, 1, 1), (320, 4, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ((4, context), (320, 4)),
        f"{te}text_model_encoder_layers_0_self_attn_q_proj": ((4, 768), (768, 4)),
    }
    tensors = {}
    for module, (down, up) in shapes.items():
        tensors[f"{module}.lora_down.weight"] = torch.randn(down, generator=g)
        tensors[f"{module}.lora_up.weight"] = torch.randn(up, generator=g)
        tensors[f"{module}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", **(metadata or {})})
    return path


def writable(path: Path) -> None:
    """As an owner could (root ignores the read-only bits anyway): the file and its folder writable again."""
    path.parent.chmod(0o755)
    path.chmod(0o644)


def test_sd_folders_single_files_and_loras_register_as_versions(
    reg: Registry, sd1_pipeline: Path, sd1_single_file: Path, tmp_path: Path
) -> None:
    folder = reg.register(sd1_pipeline, "sd15")
    single = reg.register(sd1_single_file, "sd15")  # one family (Stable Diffusion): one name may hold both
    assert (folder.kind, folder.architecture, folder.version) == ("sd-pipeline", "sd1", 1)
    assert (single.kind, single.architecture, single.version) == ("sd-single-file", "sd1", 2)
    for version, source in ((folder, sd1_pipeline), (single, sd1_single_file)):
        found = identify(source)
        assert version.weights_hash == f"sha256:{found.sha256}" and version.size_bytes == found.size_bytes
        assert version.short_hash == found.short_hash and version.identity is not None
        assert version.lineage["source"] == str(source.resolve()) and version.base is None
        assert reg.show(version.ref).to_dict() == version.to_dict()
        assert identify(version.model_path).sha256 == found.sha256  # the stored copy is the same model
    assert folder.model_path == folder.path == reg.store / "sd15" / "1" and folder.stored_file is None
    # a single file is stored as itself, byte for byte, read-only, in its version's folder
    assert single.model_path == reg.store / "sd15" / "2" / "tiny-sd1.safetensors"
    assert filecmp.cmp(single.model_path, sd1_single_file, shallow=False)
    assert [p.name for p in single.path.iterdir()] == ["tiny-sd1.safetensors"]
    for path in [single.path, single.model_path, folder.path, *folder.path.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path
    assert resolve("sd15", reg.url) == single.model_path and resolve("sd15:1", reg.url) == folder.path
    again = reg.register(shutil.copy(sd1_single_file, tmp_path / "renamed.safetensors"), "sd15")
    assert (again.version, again.created) == (2, False)  # the same bytes under another name: the same version

    lora = reg.register(make_lora(tmp_path / "style.safetensors"), "style", base="sd15:2")
    assert (lora.kind, lora.architecture, lora.stored_file) == ("lora", "sd1", "style.safetensors")
    assert lora.weights_hash == f"sha256:{identify(tmp_path / 'style.safetensors', allow_lora=True).sha256}"
    assert lora.short_hash == identify(tmp_path / "style.safetensors", allow_lora=True).short_hash  # web UI's 12
    assert lora.base == {
        "hash": single.weights_hash.removeprefix("sha256:"),
        "hash_kind": "sha256",
        "architecture": "sd1",
        "source": "--base sd15:2",
        "name": "sd15:2",
    }
    assert reg.verify("style:1").version == reg.verify("sd15:1").version == 1
    summary = {m.name: (m.kind, m.architecture, m.versions, m.latest) for m in reg.list()}
    assert summary == {"sd15": ("sd-single-file", "sd1", 2, 2), "style": ("lora", "sd1", 1, 1)}
    assert [e.detail.get("kind") for e in reg.history("sd15")] == ["sd-pipeline", "sd-single-file", None]


def test_a_loras_base_comes_from_base_else_its_metadata_else_is_unknown(
    reg: Registry, sd1_pipeline: Path, sd1_single_file: Path, tmp_path: Path
) -> None:
    base_sha = identify(sd1_single_file).sha256
    assert base_sha is not None
    folder_base = reg.register(make_lora(tmp_path / "a.safetensors"), "a", base=sd1_pipeline)  # a path: hashed
    assert folder_base.base is not None and folder_base.base["hash"] == identify(sd1_pipeline).sha256
    assert folder_base.base["source"] == f"--base {sd1_pipeline.resolve()}"
    cases = {
        "ours": ({"sdpipe.base_hash": "sha256:" + base_sha[:16]}, base_sha[:16], "sha256", "metadata sdpipe.base_hash"),
        "kohya": (
            {"ss_new_sd_model_hash": base_sha, "ss_sd_model_hash": "0123abcd", "ss_sd_model_name": "tiny-sd1.ckpt"},
            base_sha,
            "sha256",
            "metadata ss_new_sd_model_hash",
        ),
        "old": ({"ss_sd_model_hash": "0123ABCD"}, "0123abcd", "webui-legacy", "metadata ss_sd_model_hash"),
        "folder": ({"ss_sd_model_hash": "IsADirectory"}, None, None, "unknown"),  # kohya, trained from a folder
        "none": ({}, None, None, "unknown"),
    }
    for seed, (name, (metadata, hash_, kind, source)) in enumerate(cases.items()):
        v = reg.register(make_lora(tmp_path / f"{name}.safetensors", metadata=metadata, seed=seed + 1), name)
        assert v.base is not None
        assert (v.base["hash"], v.base["hash_kind"], v.base["source"], v.base["architecture"]) == (
            hash_,
            kind,
            source,
            "sd1",
        ), name
    assert reg.show("kohya").base["name"] == "tiny-sd1.ckpt"  # type: ignore[index]
    assert "IsADirectory" in reg.show("folder").base["note"]  # type: ignore[index]
    assert reg.show("none").base["note"] == "nothing in the file records it"  # type: ignore[index]

    env = {"SDPIPE_REGISTRY_URL": reg.url}
    said = runner.invoke(registry_cli.app, ["register", str(tmp_path / "none.safetensors"), "--name", "none"], env=env)
    assert said.exit_code == 0 and "already registered (same weights) as none:1  lora sd1" in said.stdout
    assert "made for the base unknown (nothing in the file records it; made for sd1)" in said.stdout
    shown = runner.invoke(registry_cli.app, ["show", "kohya"], env=env).stdout
    assert "lora (sd1)" in shown and f"sha256:{base_sha[:16]} (sd1, from metadata ss_new_sd_model_hash" in shown
    assert "kohya keys lora_unet_*, lora_te_*" in shown
    listed = runner.invoke(registry_cli.app, ["list"], env=env).stdout
    assert "lora" in listed and "sd1" in listed
    # a version's base cannot change: the same file with another --base is refused, naming both
    args = ["register", str(tmp_path / "ours.safetensors"), "--name", "ours", "--base", str(sd1_pipeline)]
    other = runner.invoke(registry_cli.app, args, env=env)
    assert other.exit_code == 2 and "a version's base cannot change" in other.stderr, other.output


def test_what_identify_refuses_and_mixed_families_are_refused(
    reg: Registry, sd1_pipeline: Path, sdxl_pipeline: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(RegistryError, match=r"cannot register: .*model.ckpt is a pickle checkpoint"):
        reg.register(ckpt, "x")
    vae = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"decoder.conv_in.weight": torch.zeros(2), "encoder.conv_in.weight": torch.zeros(2)}, str(vae))
    with pytest.raises(RegistryError, match="is a VAE alone"):
        reg.register(vae, "x")
    with pytest.raises(RegistryError, match=r"unet is one diffusers component \(UNet2DConditionModel\), not a whole"):
        reg.register(sd1_pipeline / "unet", "x")
    with pytest.raises(RegistryError, match="--base is for LoRA files; .* is a sd-pipeline model"):
        reg.register(sd1_pipeline, "x", base="sd15")
    reg.register(sdxl_pipeline, "xl")
    with pytest.raises(RegistryError, match="--base sd-missing/ is not an existing path, nor a registry reference"):
        reg.register(make_lora(tmp_path / "l.safetensors"), "l", base="sd-missing/")
    with pytest.raises(RegistryError, match=r"LoRA for sd1 .* --base xl is a sdxl model .* does not fit that base"):
        reg.register(tmp_path / "l.safetensors", "l", base="xl")
    with pytest.raises(RegistryError, match="xl holds Stable Diffusion versions .* and this is a lora"):
        reg.register(tmp_path / "l.safetensors", "xl")
    with pytest.raises(RegistryError, match="xl holds Stable Diffusion versions .* and this is a pixel-class"):
        reg.register(random_model(tmp_path / "digits" / "model"), "xl")
    assert [m.name for m in reg.list()] == ["xl"] and list((reg.store / ".incoming").iterdir()) == []


def generate(model: str, out: Path) -> Image.Image:
    from sdpipe.cli import app

    result = runner.invoke(
        app, ["generate", "--model", model, "--out", str(out), "--quiet", "--prompt", "a cat"] + BASE
    )
    assert result.exit_code == 0, result.output
    return Image.open(out / "00000.png")


def test_load_gives_a_checked_pipeline_that_draws_as_its_folder(
    reg: Registry, sd1_pipeline: Path, sd1_single_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.register(sd1_pipeline, "sd15")
    reg.alias("sd15", "prod", 1)
    loaded = load("sd15@prod", reg.url)
    assert isinstance(loaded, LoadedPipeline) and loaded.path == reg.store / "sd15" / "1"
    assert loaded.hash == "sha256:" + str(identify(sd1_pipeline).sha256)[:16]
    monkeypatch.setenv("SDPIPE_REGISTRY_URL", reg.url)
    with generate(str(sd1_pipeline), tmp_path / "folder") as a, generate("sd15@prod", tmp_path / "registry") as b:
        assert a.size == (32, 32) and list(a.getdata()) == list(b.getdata())
    records = [json.loads((tmp_path / d / "samples.jsonl").read_text().splitlines()[0]) for d in ("folder", "registry")]
    assert records[0]["model"] == records[1]["model"] == loaded.hash

    single = reg.register(sd1_single_file, "sd15")
    config = str(single_file_folders(sd1_single_file)[1])
    from_file = load("sd15:2", config=config)  # a single file loads with its config, as load_any takes it
    assert isinstance(from_file, LoadedPipeline) and from_file.kind == "sd-single-file"
    assert from_file.path == single.model_path

    # a stored file changed since registration is refused before it is loaded, by load, verify and generate
    stored = single.model_path
    writable(stored)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    stored.write_bytes(bytes(data))
    message = r"sd15:2: the stored files at .* changed since registration \(content hash sha256:"
    with pytest.raises(RegistryError, match=message):
        load("sd15:2", config=config)
    with pytest.raises(RegistryError, match=message):
        reg.verify("sd15:2")
    tampered = runner.invoke(registry_cli.app, ["verify", "sd15:2"])
    assert tampered.exit_code == 1 and "changed since registration" in tampered.stderr
    from sdpipe.cli import app

    refused = runner.invoke(app, ["generate", "--model", "sd15:2", "--out", str(tmp_path / "t"), "--prompt", "x"])
    assert refused.exit_code == 2 and "changed since registration" in refused.output, refused.output
    assert not (tmp_path / "t").exists()
    # a changed file in a stored folder too (here its scheduler config: not weights, still refused)
    scheduler = reg.store / "sd15" / "1" / "scheduler" / "scheduler_config.json"
    writable(scheduler)
    scheduler.write_text(scheduler.read_text().replace("}", ', "edited": true}'))
    with pytest.raises(RegistryError, match="sd15:1: the stored files .* changed since registration"):
        load("sd15@prod")


def test_resolve_lora_finds_a_registered_lora_and_refuses_other_kinds(
    reg: Registry, sd1_pipeline: Path, tmp_path: Path
) -> None:
    reg.register(sd1_pipeline, "sd15")
    source = make_lora(tmp_path / "my style v2.safetensors")
    v = reg.register(source, "style", base="sd15:1")
    reg.register(make_lora(tmp_path / "other.safetensors", seed=1), "style")
    reg.alias("style", "prod", 1)
    found = resolve_lora("style@prod", reg.url)
    assert found.path == v.model_path == reg.store / "style" / "1" / "my style v2.safetensors"
    assert filecmp.cmp(found.path, source, shallow=False) and found.version.ref == "style:1"
    assert found.base_hash == reg.show("sd15:1").weights_hash and found.base_architecture == "sd1"
    assert lora_path("style@prod", reg.url) == found.path  # the --lora NAME@ALIAS hook
    assert resolve_lora("style", reg.url).version.version == 2  # latest
    assert resolve_lora("style:2", reg.url).base_hash is None
    with pytest.raises(
        RegistryError, match=r"sd15 is sd15:1, a Stable Diffusion model \(sd-pipeline, sd1\), not a LoRA"
    ):
        resolve_lora("sd15", reg.url)
    with pytest.raises(RegistryError, match=r"style:1 is a LoRA \(sd1\), not a model: .* --lora style:1"):
        load("style@prod", reg.url)
    with pytest.raises(RegistryError, match=r"style has no alias 'canary'"):
        resolve_lora("style@canary", reg.url)
    writable(found.path)
    with found.path.open("r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")
    with pytest.raises(RegistryError, match="style:1: the stored files .* changed since registration"):
        resolve_lora("style@prod", reg.url)
    assert resolve_lora("style@prod", reg.url, check=False).path == found.path


def test_fits_refuses_a_base_of_another_architecture_naming_both(
    reg: Registry, sd1_pipeline: Path, sd1_single_file: Path, tmp_path: Path
) -> None:
    base = reg.register(sd1_pipeline, "sd15")
    xl = reg.register(make_lora(tmp_path / "xl.safetensors", "sdxl"), "style-xl")  # its base unknown
    assert xl.architecture == "sdxl" and xl.base is not None and xl.base["hash"] is None
    base_hash = "sha256:" + base.weights_hash.removeprefix("sha256:")[:16]  # as LoadedPipeline.hash is
    with pytest.raises(RegistryError) as refused:
        fits(xl, base_hash, "sd1")
    message = str(refused.value)
    for part in ("LoRA style-xl:1", xl.weights_hash[:23], "made for sdxl", f"the base {base_hash} (sd1)"):
        assert part in message, (part, message)
    with pytest.raises(RegistryError, match="made for sdxl"):
        resolve_lora("style-xl", reg.url).fits(base_hash, "sd1-inpaint")
    assert fits(xl, base_hash, "sdxl") is None  # nothing recorded says otherwise

    lora = resolve_lora(reg.register(make_lora(tmp_path / "s.safetensors"), "style", base="sd15:1").ref, reg.url)
    assert lora.fits(base_hash, "sd1") is None and lora.fits(base.weights_hash, "sd1-inpaint") is None
    other = "sha256:" + str(identify(sd1_single_file).sha256)[:16]
    warning = lora.fits(other, "sd1")
    assert warning is not None and "LoRA style:1" in warning and base_hash in warning and other in warning
    assert "the architecture is the same, so it applies" in warning
    with pytest.raises(RegistryError, match=r"style:1 .* made for sd1 \(base sha256:.*\) and does not fit .*sdxl"):
        lora.fits(other, "sdxl")
    assert lora.fits(None, "sd1") is None and lora.fits("sha256:0123", "sd1") is None  # nothing to compare

    legacy = legacy_model_hash(sd1_single_file)
    old = reg.register(make_lora(tmp_path / "o.safetensors", metadata={"ss_sd_model_hash": legacy}, seed=2), "old")
    assert fits(old, other, "sd1", base_path=sd1_single_file) is None  # the old web-UI hash, of the file's bytes
    assert fits(old, other, "sd1") is None  # no file to hash: cannot tell
    assert "made for the base webui-legacy:" in str(fits(old, other, "sd1", base_path=tmp_path / "s.safetensors"))
    with pytest.raises(RegistryError, match="sd15:1 is a sd-pipeline"):
        fits(base, base_hash, "sd1")


def old_versions_table(metadata: sa.MetaData) -> sa.Table:
    """`versions` as sdpipe made it before kinds were recorded."""
    return sa.Table(
        "versions",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("weights_hash", sa.String(80), nullable=False),
        sa.Column("content_hash", sa.String(80), nullable=False),
        sa.Column("dataset_id", sa.String(200), nullable=False),
        sa.Column("lineage", sa.JSON, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("user", sa.String(200), nullable=False),
        sa.UniqueConstraint("name", "version", name="uq_versions_name_version"),
        sa.UniqueConstraint("name", "weights_hash", name="uq_versions_name_weights"),
    )


def make_old_database(url: str) -> None:
    """The tables an older sdpipe made (versions without kind, architecture, ...), with its triggers, and one
    pixel-space version in them."""
    from sdpipe.registry.db import aliases, events

    old = sa.MetaData()
    table = old_versions_table(old)
    for t in (aliases, events):
        t.to_metadata(old)
    engine = sa.create_engine(url)
    old.create_all(engine)
    install_triggers(engine)
    row = {"name": "digits", "version": 1, "weights_hash": "sha256:1", "content_hash": "sha256:2", "dataset_id": "d"}
    with engine.begin() as conn:
        conn.execute(table.insert().values(**row, lineage={}, created_at="2026-01-01T00:00:00+00:00", user="alice"))
    engine.dispose()


def columns_of(url: str) -> list[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = [c["name"] for c in sa.inspect(conn).get_columns("versions")]
    engine.dispose()
    return found


def check_migrated(url: str, store: Path, sd1_pipeline: Path) -> None:
    """Opened (by several at once), an older database gains the new columns, its rows described as the
    pixel-space models they are; opening again changes nothing; Stable Diffusion models then register."""
    assert not set(ADDED_COLUMNS) & set(columns_of(url))
    opened: list[Registry] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            opened.append(Registry(url, store))
        except BaseException as exc:  # pragma: no cover - the test fails below, saying what
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(opened) == 3
    after = columns_of(url)
    assert after[-len(ADDED_COLUMNS) :] == list(ADDED_COLUMNS)
    reg = opened[0]
    old = reg.show("digits:1")
    assert (old.kind, old.architecture, old.size_bytes, old.stored_file, old.base) == (
        "pixel-class",
        "unet2d",
        None,
        None,
        None,
    )
    with reg.engine.connect() as conn, pytest.raises(sa.exc.DatabaseError, match="registered versions are append"):
        conn.exec_driver_sql("UPDATE versions SET kind = 'lora'")
    assert reg.register(sd1_pipeline, "sd15").kind == "sd-pipeline"
    assert reg.show("sd15:1").architecture == "sd1"
    for r in opened:
        r.engine.dispose()
    again = Registry(url, store)
    assert columns_of(url) == after and again.show("digits:1").kind == "pixel-class"
    again.engine.dispose()


def test_an_older_database_gets_the_new_columns(tmp_path: Path, sd1_pipeline: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_old_database(url)
    check_migrated(url, tmp_path / "store", sd1_pipeline)
