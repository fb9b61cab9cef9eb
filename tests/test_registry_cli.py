"""`sdpipe registry ...` through typer's CliRunner, and registrations racing each other."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import race_registry_versions
from sdpipe.registry import Registry, resolve
from sdpipe.registry.cli import app
from test_registry import make_model, url_for

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def test_register_alias_rollback_show_list_history(tmp_path: Path) -> None:
    env = {"SDPIPE_REGISTRY_URL": url_for(tmp_path), "SDPIPE_USER": "carol"}
    a = make_model(tmp_path / "run_a" / "model", 0, metrics={"fd_ratio": 2.5})
    b = make_model(tmp_path / "run_b" / "model", 1)
    first = invoke("register", str(a), "--name", "digits", env=env)
    assert first.exit_code == 0, first.output
    assert "registered digits:1" in first.stdout
    second = invoke("register", str(b), "--name", "digits", "--json", env=env)
    assert json.loads(second.stdout)["version"] == 2
    again = invoke("register", str(a), "--name", "digits", env=env)
    assert "already registered (same weights) as digits:1" in again.stdout
    assert "-> version 2" in invoke("alias", "digits", "production", "2", env=env).stdout
    assert "-> version 1 (was 2)" in invoke("alias", "digits", "production", "1", env=env).stdout
    moved = json.loads(invoke("rollback", "digits", "production", "--json", env=env).stdout)
    assert (moved["version"], moved["previous"]) == (2, 1)

    shown = json.loads(invoke("show", "digits@production", "--json", env=env).stdout)
    assert shown["version"] == 2 and shown["aliases"] == ["production"] and shown["user"] == "carol"
    assert Path(shown["path"]) == tmp_path / "reg" / "store" / "digits" / "2"
    text = invoke("show", "digits:1", env=env).stdout
    assert "fd_ratio" in text and str(a.resolve()) in text
    listed = json.loads(invoke("list", "--json", env=env).stdout)
    assert listed == [
        {
            "name": "digits",
            "versions": 2,
            "latest": 2,
            "aliases": {"production": 2},
            "kind": "pixel-class",
            "architecture": "unet2d",
        }
    ]
    log = json.loads(invoke("history", "digits", "--json", env=env).stdout)
    assert [e["action"] for e in log] == ["register", "register", "register", "alias", "alias", "rollback"]
    assert all(e["user"] == "carol" and e["time"] for e in log)
    assert "rollback" in invoke("history", env=env).stdout
    verified = invoke("verify", "digits@production", env=env)
    assert verified.exit_code == 0 and "is intact" in verified.stdout
    stored = Path(shown["path"]) / "scheduler" / "scheduler_config.json"
    stored.parent.chmod(0o755)  # as an owner could (root ignores the read-only bits anyway)
    stored.chmod(0o644)
    stored.write_text(stored.read_text().replace("}", ', "edited": true}'))
    tampered = invoke("verify", "digits@production", env=env)
    assert tampered.exit_code == 1 and "changed since registration" in tampered.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "../etc"], "invalid model name"),
        (["show", "x'; DROP TABLE versions;--"], "invalid model name"),
        (["show", "nope"], "no model named 'nope'"),
        (["show", "digits:9"], "has no version 9"),
        (["alias", "digits", "latest", "1"], "built in"),
        (["rollback", "digits", "production"], "no earlier version"),
        (["history", "faces"], "no model named 'faces'"),
        (["register", "missing_dir", "--name", "digits"], "model directory not found"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    env = {"SDPIPE_REGISTRY_URL": url_for(tmp_path)}
    reg = Registry(url_for(tmp_path))
    reg.register(make_model(tmp_path / "a" / "model", 0), "digits")
    reg.alias("digits", "production", 1)
    result = invoke(*args, env=env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_registry_url_option_beats_the_environment(tmp_path: Path) -> None:
    model = make_model(tmp_path / "a" / "model", 0)
    env_url, option_url = url_for(tmp_path / "env"), url_for(tmp_path / "opt")
    result = invoke("register", str(model), "--name", "digits", "--registry-url", option_url, env={
        "SDPIPE_REGISTRY_URL": env_url
    })  # fmt: skip
    assert result.exit_code == 0, result.output
    assert resolve("digits:1", option_url).is_dir()
    assert not (tmp_path / "env").exists()
    empty = invoke("list", env={"SDPIPE_REGISTRY_URL": env_url})
    assert "no models registered yet" in empty.stdout


def test_every_command_has_help() -> None:
    from sdpipe.cli import app as main_app

    for command in ("register", "alias", "rollback", "list", "show", "history", "verify"):
        result = runner.invoke(main_app, ["registry", command, "--help"])
        assert result.exit_code == 0 and "--registry-url" in result.stdout, command
        assert "SDPIPE_REGISTRY_URL" in result.stdout


@pytest.mark.parametrize("same_model", [False, True])
def test_threads_racing_for_one_version_number(tmp_path: Path, monkeypatch, same_model: bool) -> None:
    """Both threads read "latest is 0" before either writes (forced by a barrier), so both try version 1:
    the unique constraints let one win; the other retries as version 2 (or returns the winner's version)."""

    a, b = (make_model(tmp_path / f"m{i}" / "model", i) for i in range(2))
    url = url_for(tmp_path)
    Registry(url)
    both_read, waited = race_registry_versions(monkeypatch)
    results: dict[int, object] = {}

    def register(i: int, model: Path) -> None:
        results[i] = Registry(url).register(model, "digits")  # its own engine, like another process

    threads = [threading.Thread(target=register, args=(i, m)) for i, m in enumerate([a, a if same_model else b])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waited) == 2 and not both_read.broken  # the race really happened
    found = [results[0], results[1]]
    if same_model:
        assert [v.version for v in found] == [1, 1] and sorted(v.created for v in found) == [False, True]
    else:
        assert sorted(v.version for v in found) == [1, 2] and all(v.created for v in found)
    versions = sorted(p.name for p in (tmp_path / "reg" / "store" / "digits").iterdir())
    assert versions == (["1"] if same_model else ["1", "2"])


def test_processes_registering_at_once_get_distinct_versions(tmp_path: Path) -> None:
    """Two processes start at once on a registry that does not exist yet (the same-weights race: threads)."""
    a, b = (make_model(tmp_path / f"m{i}" / "model", i) for i in range(2))
    registry_cli = [sys.executable, "-c", "from sdpipe.registry.cli import app; app()", "register"]
    command = [*registry_cli, "--registry-url", url_for(tmp_path), "--name", "digits", "--json"]
    procs = [subprocess.Popen([*command, str(m)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in (a, b)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outputs]
    found = [json.loads(out) for out, _ in outputs]
    assert sorted(v["version"] for v in found) == [1, 2] and all(v["created"] for v in found)
    reg = Registry(url_for(tmp_path))
    assert [m.versions for m in reg.list()] == [2]
    assert {reg.show(f"digits:{v['version']}").lineage["source"] for v in found} == {str(a), str(b)}
