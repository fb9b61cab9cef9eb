"""Model swaps: a resolver whose answer changes, POST /admin/reload, and a registry alias move, all while
requests are served; no request in flight fails and every response names the weights that made it."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sdpipe.models import load_model
from sdpipe.serve.app import create_app
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
    from sdpipe.registry import Registry
    from sdpipe.serve.holder import model_resolver

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
