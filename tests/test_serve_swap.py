"""Model swaps: a resolver whose answer changes, POST /admin/reload, and a registry alias move, all while
requests are served; no request in flight fails and every response names the weights that made it."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdpipe.cli import app as cli_app
from sdpipe.models import load_model
from sdpipe.registry import Registry
from sdpipe.serve.app import create_app
from sdpipe.serve.holder import model_resolver
from sdpipe.serve.settings import ServeSettings
from test_serve import cli_images, make_model, pixels, wait_ready


@pytest.fixture(scope="module")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("swap") / "a", seed=0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("swap") / "b", seed=1)


def test_model_swap_fails_no_request_in_flight(model_a: Path, model_b: Path, tmp_path: Path) -> None:
    current = {"path": model_a}
    hash_a, hash_b = (load_model(p).meta.weights_hash for p in (model_a, model_b))
    app = create_app(lambda: current["path"], ServeSettings(max_wait_ms=20, poll_s=0.2))
    stop = threading.Event()
    with TestClient(app) as c:
        wait_ready(c)

        def client_loop(k: int) -> list[tuple[int, str]]:
            seen = []
            for i in range(200):  # bounded: stops by itself even if `stop` is never set
                if stop.is_set():
                    break
                r = c.post("/v1/generate", json={"n": 2, "seed": 100 * k + i, "label": "4"})
                seen.append((r.status_code, r.json().get("model", r.text)))
            return seen

        with ThreadPoolExecutor(4) as pool:
            loops = [pool.submit(client_loop, k) for k in range(4)]
            time.sleep(0.5)
            current["path"] = model_b  # the alias moves; the poller notices within poll_s
            deadline = time.monotonic() + 20
            while c.get("/readyz").json()["model"] != hash_b:
                assert time.monotonic() < deadline, "the new model was never swapped in"
                time.sleep(0.05)
            time.sleep(0.5)
            stop.set()
            seen = [s for f in loops for s in f.result(60)]
        assert {status for status, _ in seen} == {200}
        assert {model for _, model in seen} == {hash_a, hash_b}
        r = c.post("/v1/generate", json={"n": 1, "seed": 7, "label": "4"})
        assert r.json()["model"] == hash_b
        assert np.array_equal(pixels(r.json()["images"][0]["png_base64"]), cli_images(model_b, tmp_path, "4", 1, 7)[0])
        assert 'sdpipe_model_reloads_total{result="ok"} 1.0' in c.get("/metrics").text


def test_admin_reload_swaps_at_once(model_a: Path, model_b: Path, tmp_path: Path) -> None:
    current = {"path": model_a}
    hash_a, hash_b = (load_model(p).meta.weights_hash for p in (model_a, model_b))
    with TestClient(create_app(lambda: current["path"], ServeSettings(poll_s=3600))) as c:
        wait_ready(c)
        assert c.post("/admin/reload").json() == {"changed": False, "model": hash_a}
        current["path"] = model_b
        assert c.get("/readyz").json()["model"] == hash_a  # no poll for an hour
        assert c.post("/admin/reload").json() == {"changed": True, "model": hash_b}
        assert c.post("/v1/generate", json={"n": 1}).json()["model"] == hash_b
        current["path"] = tmp_path / "missing"
        r = c.post("/admin/reload")
        assert r.status_code == 503 and f"still serving {hash_b}" in r.json()["detail"]
        assert c.post("/v1/generate", json={"n": 1}).status_code == 200


def test_moving_a_registry_alias_swaps_the_served_model(model_a: Path, model_b: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    one, two = registry.register(model_a, "tiny"), registry.register(model_b, "tiny")
    registry.alias("tiny", "production", one.version)
    with TestClient(create_app(model_resolver("tiny@production", url), ServeSettings(poll_s=0.2))) as c:
        wait_ready(c)
        assert c.post("/v1/generate", json={"n": 1}).json()["model"] == one.weights_hash
        registry.alias("tiny", "production", two.version)
        deadline = time.monotonic() + 20
        while c.get("/readyz").json()["model"] != two.weights_hash:
            assert time.monotonic() < deadline, "moving the alias never swapped the model"
            time.sleep(0.05)
        assert c.post("/v1/generate", json={"n": 1}).json()["model"] == two.weights_hash


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tamper(stored: Path, other: Path) -> None:
    """Swap other weights into a stored registry version, as its owner could (root ignores read-only bits)."""
    weights = stored / "unet" / "diffusion_pytorch_model.safetensors"
    (stored / "unet").chmod(0o755)
    weights.chmod(0o644)
    shutil.copy(other / "unet" / "diffusion_pytorch_model.safetensors", weights)


@pytest.fixture
def tampered_registry(model_a: Path, model_b: Path, tmp_path: Path) -> tuple[str, str, str]:
    """A registry with tiny:1 intact and tiny:2 holding other weights than registered: (url, hash 1, hash 2)."""
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    one, two = registry.register(model_a, "tiny"), registry.register(model_b, "tiny")
    tamper(two.path, make_model(tmp_path / "other", seed=5))
    return registry.url, one.weights_hash, two.weights_hash


def test_a_tampered_registry_version_is_never_served(tampered_registry: tuple[str, str, str]) -> None:
    url, _, _ = tampered_registry
    with TestClient(create_app(model_resolver("tiny:2", url), ServeSettings())) as c:
        deadline = time.monotonic() + 20
        while "changed since registration" not in (c.get("/readyz").json().get("detail") or ""):
            assert time.monotonic() < deadline, c.get("/readyz").json()
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 503
        assert c.post("/v1/generate", json={"n": 1}).status_code == 503


def test_sdpipe_serve_refuses_a_tampered_registry_version(
    tampered_registry: tuple[str, str, str], served: list
) -> None:
    url, _, _ = tampered_registry
    args = ["serve", "--model", "tiny:2", "--registry-url", url, "--port", str(free_port())]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 2 and not served, result.output
    assert "cannot serve model 'tiny:2': tiny:2: the stored weights changed since registration" in result.output
    ok = CliRunner().invoke(cli_app, [*args[:2], "tiny:1", *args[3:]])  # the intact version starts
    assert ok.exit_code == 0 and len(served) == 1, ok.output


def test_a_swap_to_a_tampered_registry_version_is_refused(tampered_registry: tuple[str, str, str]) -> None:
    url, hash_1, _ = tampered_registry
    registry = Registry(url)
    registry.alias("tiny", "production", 1)
    with TestClient(create_app(model_resolver("tiny@production", url), ServeSettings(poll_s=3600))) as c:
        wait_ready(c)
        registry.alias("tiny", "production", 2)
        r = c.post("/admin/reload")
        assert r.status_code == 503, r.text
        assert "changed since registration" in r.json()["detail"] and f"still serving {hash_1}" in r.json()["detail"]
        assert c.get("/readyz").json()["model"] == hash_1
        assert c.post("/v1/generate", json={"n": 1}).json()["model"] == hash_1
        assert 'sdpipe_model_reloads_total{result="ok"} 0.0' in c.get("/metrics").text
