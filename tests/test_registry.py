"""Model registry: numbered immutable versions, atomic store, aliases and rollback, the log, resolve, names."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import random_model
from sdpipe.models import weights_hash
from sdpipe.registry import Registry, RegistryError, resolve
from sdpipe.registry import store as store_module

TINY_MODEL = ["model.block_out_channels=[8, 16]", "model.norm_num_groups=4", "model.attention_head_dim=4"]


def make_model(out: Path, seed: int, *, metrics: dict | None = None, git: str | None = None) -> Path:
    """A tiny model directory with random weights (different seed, different weights), in seconds."""
    git_commit = {"git_commit": git} if git else None
    path = random_model(out, seed, sets=TINY_MODEL, versions=git_commit, dataset_id="sha256:testdata")
    if metrics is not None:
        (out.parent / "metrics.json").write_text(json.dumps(metrics))
    return path


def url_for(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(url_for(tmp_path))


def test_versions_are_numbered_and_carry_lineage(reg: Registry, tmp_path: Path) -> None:
    a = make_model(tmp_path / "run_a" / "model", 0, metrics={"fd_ratio": 2.5})
    b = make_model(tmp_path / "run_b" / "model", 1, git="0123abc")
    v1, v2 = reg.register(a, "digits"), reg.register(b, "digits")
    other = reg.register(b, "faces")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.path == tmp_path / "reg" / "store" / "digits" / "1" and v1.path.is_dir()
    assert v1.created and v1.user and v1.dataset_id == "sha256:testdata"
    assert v1.weights_hash != v2.weights_hash
    assert v1.lineage["metrics"] == {"fd_ratio": 2.5} and v2.lineage["metrics"] is None
    assert v1.lineage["git_commit"] is None and v2.lineage["git_commit"] == "0123abc"
    assert v1.lineage["config"]["model"]["block_out_channels"] == [8, 16]
    assert {"sdpipe", "torch", "diffusers"} <= set(v1.lineage["versions"])
    assert v1.lineage["source"] == str(a.resolve())
    shown = reg.show("digits:1")
    assert shown.to_dict() == {**v1.to_dict(), "created": True}
    assert [(m.name, m.versions, m.latest) for m in reg.list()] == [("digits", 2, 2), ("faces", 1, 1)]


def test_same_weights_return_the_existing_version(reg: Registry, tmp_path: Path) -> None:
    a = make_model(tmp_path / "a" / "model", 0)
    reg.register(a, "digits")
    reg.register(make_model(tmp_path / "b" / "model", 1), "digits")
    moved = shutil.copytree(a, tmp_path / "elsewhere")  # same weights in another folder
    again = reg.register(moved, "digits")
    assert (again.version, again.created) == (1, False)
    assert reg.list()[0].versions == 2
    assert sorted(p.name for p in (reg.store / "digits").iterdir()) == ["1", "2"]
    assert reg.history("digits")[-1].detail["existing"] is True


def test_metrics_file_option(reg: Registry, tmp_path: Path) -> None:
    a = make_model(tmp_path / "run" / "model", 0, metrics={"beside": 1})
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"accuracy": 0.99, "note": "x'; DROP TABLE versions;--"}))
    v = reg.register(a, "digits", metrics=chosen)
    assert reg.show("digits").lineage["metrics"] == {"accuracy": 0.99, "note": "x'; DROP TABLE versions;--"}
    assert v.lineage["metrics_file"] == str(chosen.resolve())
    with pytest.raises(RegistryError, match="metrics file not found"):
        reg.register(make_model(tmp_path / "b" / "model", 1), "digits", metrics=tmp_path / "missing.json")


def test_refuses_a_model_whose_weights_do_not_match_its_hash(reg: Registry, tmp_path: Path) -> None:
    a = make_model(tmp_path / "a" / "model", 0)
    b = make_model(tmp_path / "b" / "model", 1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    shutil.copy(b / weights, a / weights)
    with pytest.raises(RegistryError, match="sdpipe.json says"):
        reg.register(a, "digits")
    with pytest.raises(RegistryError, match="not found"):
        reg.register(tmp_path / "nothing", "digits")
    assert reg.list() == []


def test_stored_versions_are_read_only_and_checked(reg: Registry, tmp_path: Path) -> None:
    v = reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    for path in [v.path, *v.path.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o555 if path.is_dir() else 0o444), path
    assert reg.verify("digits:1").version == 1
    assert weights_hash(reg.load("digits:1").unet) == v.weights_hash
    # tamper as an owner could (root ignores the read-only bits): swap in other weights
    other = make_model(tmp_path / "b" / "model", 1)
    weights = v.path / "unet" / "diffusion_pytorch_model.safetensors"
    (v.path / "unet").chmod(0o755)
    weights.chmod(0o644)
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(RegistryError, match="stored files .* changed"):
        reg.verify("digits:1")
    with pytest.raises(RegistryError, match="stored weights changed"):
        reg.load("digits:1")


def test_stored_versions_are_read_only_with_the_umask(reg: Registry, tmp_path: Path, umask: int) -> None:
    v = reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    found = {p: stat.S_IMODE(p.stat().st_mode) for p in [v.path, *v.path.rglob("*")]}
    assert found == {p: (0o555 if p.is_dir() else 0o444) & ~umask for p in found}
    assert found[v.path] == (0o555 if umask == 0o022 else 0o550)


def test_a_failure_mid_copy_leaves_no_version(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    model = make_model(tmp_path / "a" / "model", 0)
    real_copyfile, copied = shutil.copyfile, []

    def copy_then_fail(src, dst, **kwargs):
        if len(copied) == 2:
            raise OSError("disk full (simulated)")
        copied.append(src)
        return real_copyfile(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)  # what shutil.copytree -> copy2 calls
    with pytest.raises(OSError, match="disk full"):
        reg.register(model, "digits")
    assert len(copied) == 2  # it did fail half way
    assert reg.list() == [] and not (reg.store / "digits").exists()
    assert list((reg.store / ".incoming").iterdir()) == []
    monkeypatch.undo()
    assert reg.register(model, "digits").version == 1


def test_a_failure_before_commit_leaves_no_version(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    """The folder is renamed into place inside the transaction; if anything fails after, both are undone."""
    model = make_model(tmp_path / "a" / "model", 0)

    def fail(directory: Path) -> None:
        assert directory.is_dir()  # already in its final place
        raise OSError("killed (simulated)")

    monkeypatch.setattr(store_module, "make_readonly", fail)
    with pytest.raises(OSError, match="killed"):
        reg.register(model, "digits")
    assert reg.list() == [] and not (reg.store / "digits" / "1").exists()
    with pytest.raises(RegistryError, match="no model named 'digits'"):
        reg.history("digits")
    monkeypatch.undo()
    assert reg.register(model, "digits").version == 1


def test_a_folder_left_by_a_killed_registration_is_replaced(reg: Registry, tmp_path: Path) -> None:
    leftover = reg.store / "digits" / "1"
    leftover.mkdir(parents=True)
    (leftover / "half_written.safetensors").write_bytes(b"junk")
    v = reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    assert v.version == 1 and not (v.path / "half_written.safetensors").exists()
    assert reg.verify("digits:1").content_hash == v.content_hash


def test_stale_incoming_copies_are_cleaned_up(reg: Registry, tmp_path: Path) -> None:
    import os
    import time

    stale, fresh = reg.store / ".incoming" / "v-killed", reg.store / ".incoming" / "v-in-progress"
    for leftover in (stale, fresh):
        (leftover / "unet").mkdir(parents=True)
    day_ago = time.time() - store_module.STALE_S - 60
    os.utime(stale, (day_ago, day_ago))
    reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    assert not stale.exists() and fresh.exists()  # another registration may be copying into a fresh one


def test_alias_and_rollback_follow_the_alias_history(reg: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        reg.register(make_model(tmp_path / f"m{seed}" / "model", seed), "digits")
    moves = [reg.alias("digits", "production", n) for n in (1, 2, 3)]
    assert [(m.version, m.previous) for m in moves] == [(1, None), (2, 1), (3, 2)]
    reg.alias("digits", "staging", 1)
    assert not reg.alias("digits", "production", 3).changed  # already there: nothing logged
    assert reg.rollback("digits", "production").version == 2
    assert reg.rollback("digits", "production").version == 1
    with pytest.raises(RegistryError, match="no earlier version to roll back to"):
        reg.rollback("digits", "production")
    reg.alias("digits", "production", 3)
    back = reg.rollback("digits", "production")
    assert (back.version, back.previous) == (1, 3)
    assert reg.show("digits@staging").version == 1 and reg.show("digits@production").aliases == [
        "production",
        "staging",
    ]
    with pytest.raises(RegistryError, match=r"has no version 7 \(versions: 1, 2, 3\)"):
        reg.alias("digits", "production", 7)
    with pytest.raises(RegistryError, match=r"no alias 'canary' \(aliases: production, staging"):
        reg.rollback("digits", "canary")
    with pytest.raises(RegistryError, match="built in"):
        reg.alias("digits", "latest", 1)
    with pytest.raises(RegistryError, match="no model named 'faces'"):
        reg.alias("faces", "production", 1)


def test_history_is_an_append_only_log(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SDPIPE_USER", "alice")
    reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    reg.register(make_model(tmp_path / "b" / "model", 1), "digits")
    monkeypatch.setenv("SDPIPE_USER", "bob")
    reg.alias("digits", "production", 2)
    reg.alias("digits", "production", 1)
    reg.rollback("digits", "production")
    reg.register(make_model(tmp_path / "c" / "model", 2), "faces")
    log = reg.history("digits")
    assert [(e.action, e.version, e.previous, e.user) for e in log] == [
        ("register", 1, None, "alice"),
        ("register", 2, None, "alice"),
        ("alias", 2, None, "bob"),
        ("alias", 1, 2, "bob"),
        ("rollback", 2, 1, "bob"),
    ]
    assert [e.time for e in log] == sorted(e.time for e in log) and log[0].time.endswith("+00:00")
    assert len(reg.history()) == 6
    with reg.engine.connect() as conn:
        for statement in ("UPDATE events SET version = 9", "DELETE FROM events"):
            with pytest.raises(sa.exc.DatabaseError, match="append-only"):
                conn.exec_driver_sql(statement)
    assert len(reg.history()) == 6
    with pytest.raises(RegistryError, match=r"no model named 'nope' .*\(models: digits, faces\)"):
        reg.history("nope")


def test_an_older_database_gets_the_append_only_triggers(reg: Registry, tmp_path: Path) -> None:
    reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    triggers = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    with reg.engine.begin() as conn:  # as a registry made by an older sdpipe: no triggers at all
        made = sorted(conn.exec_driver_sql(triggers).scalars())
        for name in made:
            conn.exec_driver_sql(f"DROP TRIGGER {name}")
        conn.exec_driver_sql("UPDATE versions SET user = 'mallory'")  # possible, then
    reg.engine.dispose()
    for _ in range(2):  # opening installs what is missing, and opening again changes nothing
        reopened = Registry(reg.url)
        with reopened.engine.connect() as conn:
            assert sorted(conn.exec_driver_sql(triggers).scalars()) == made
            for statement in ("UPDATE versions SET weights_hash = 'sha256:0'", "DELETE FROM versions"):
                with pytest.raises(sa.exc.DatabaseError, match="registered versions are append-only"):
                    conn.exec_driver_sql(statement)
            with pytest.raises(sa.exc.DatabaseError, match="the events log is append-only"):
                conn.exec_driver_sql("DELETE FROM events")
        reopened.engine.dispose()
    assert made == ["events_no_delete", "events_no_update", "versions_no_delete", "versions_no_update"]
    assert Registry(reg.url).show("digits:1").weights_hash == reg.show("digits:1").weights_hash


def test_resolve_paths_and_references(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    a = make_model(tmp_path / "a" / "model", 0)
    reg.register(a, "digits")
    reg.register(make_model(tmp_path / "b" / "model", 1), "digits")
    reg.alias("digits", "production", 1)
    assert resolve(a, reg.url) == a and resolve(str(a), reg.url) == a  # a path is a path
    assert resolve("digits@production", reg.url) == reg.store / "digits" / "1"
    assert resolve("digits:2", reg.url) == reg.store / "digits" / "2"
    assert resolve("digits", reg.url) == resolve("digits@latest", reg.url) == reg.store / "digits" / "2"
    reg.alias("digits", "production", 2)  # another process moving the alias is seen at once
    assert resolve("digits@production", reg.url) == reg.store / "digits" / "2"
    monkeypatch.setenv("SDPIPE_REGISTRY_URL", reg.url)
    assert resolve("digits:1") == reg.store / "digits" / "1"
    for ref, message in [
        ("faces", r"'faces' is not an existing path; no model named 'faces' .*\(models: digits\)"),
        ("digits@canary", r"no alias 'canary' \(aliases: production"),
        ("digits:3", r"no version 3 \(versions: 1, 2\)"),
        ("runs/demo/modle", "is not an existing path, nor a registry reference"),
    ]:
        with pytest.raises(RegistryError, match=message):
            resolve(ref)


def test_a_folder_not_a_model_does_not_hide_a_registry_model(reg: Registry, tmp_path: Path, monkeypatch) -> None:
    from sdpipe.registry import load
    from sdpipe.serve.holder import model_resolver

    reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # e.g. a data folder that happens to share the model's name
    (tmp_path / "notes").mkdir()
    message = r"'digits' is a path here but not an sdpipe model \(unet/config.json is missing\), and the registry "
    message += r"has a model 'digits': to use that, name it digits@latest, digits@ALIAS or digits:VERSION"
    for call in (resolve, load, lambda ref, url: model_resolver(ref, url)()):
        with pytest.raises(RegistryError, match=message):
            call("digits", reg.url)
    assert resolve("digits@latest", reg.url) == reg.store / "digits" / "1"
    assert resolve("notes", reg.url) == Path("notes")  # no registry model of that name: the path, as before
    with pytest.raises(FileNotFoundError, match="notes is not an sdpipe model: unet/config.json is missing"):
        load("notes", reg.url)


def test_resolve_without_a_registry_creates_none(tmp_path: Path) -> None:
    url = url_for(tmp_path)
    with pytest.raises(RegistryError, match="no registry at"):
        resolve("digits@production", url)
    assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "a\\b",
        "x'; DROP TABLE versions;--",
        "",
        "a" * 65,
        "Digits",  # lowercase only: no collisions on case-insensitive file systems
        "ｄigits",  # full-width letter
        "digitѕ",  # Cyrillic dze, looks like an s
        "digits\u202e",  # right-to-left override
        "dig\u200bits",  # zero-width space
        "dig its",
        ".hidden",
        "a..b",
        "nul\x00",
    ],
)
def test_bad_names_are_refused(reg: Registry, tmp_path: Path, name: str) -> None:
    model = make_model(tmp_path / "a" / "model", 0)
    with pytest.raises(RegistryError, match="model name"):
        reg.register(model, name)
    with pytest.raises(RegistryError, match="model name"):
        resolve(f"{name}@production", reg.url)
    assert reg.list() == [] and not any(reg.store.glob("*/*"))
    with reg.engine.connect() as conn:  # the tables are all still there
        assert {"versions", "aliases", "events"} <= set(sa.inspect(conn).get_table_names())


@pytest.mark.parametrize(
    ("alias", "version", "message"),
    [
        ("prod/../x", 1, "invalid alias"),
        ("1", 1, "starting with a letter"),
        ("prod'--", 1, "invalid alias"),
        ("production", 0, "invalid version"),
        ("production", "-1", "invalid version"),
        ("production", "١", "invalid version"),  # an Arabic-Indic digit one
        ("production", "1e3", "invalid version"),
    ],
)
def test_bad_aliases_and_versions_are_refused(reg: Registry, alias: str, version: int | str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        reg.alias("digits", alias, version)


def test_bad_url_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="cannot open the registry"):
        Registry("nosuchdb://whatever")
    with pytest.raises(RegistryError, match="cannot open the registry") as info:
        Registry("postgresql+nosuchdriver://user:secret@localhost/db")
    assert "secret" not in str(info.value)
    with pytest.raises(RegistryError, match=r"at mysql\+mysqldb:.*No module named .*install it"):
        Registry("mysql+mysqldb://user@localhost/db")  # a known driver that is not installed
