"""The server on a real socket (127.0.0.1): `sdpipe serve` as a process, the web page in headless Chromium,
and a schemathesis run over the OpenAPI spec that must never get a 5xx."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from typer.testing import CliRunner

from sdpipe.cli import app as cli_app
from sdpipe.serve.app import create_app
from sdpipe.serve.docs import asset_folder
from sdpipe.serve.settings import ServeSettings
from test_serve import make_model

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, "the server process exited"
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout_s} s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("live") / "model", seed=3)


@pytest.fixture(scope="module")
def live_url(model_dir: Path) -> Iterator[str]:
    """uvicorn serving a tiny model in a thread of this process, stopped after the module's tests."""
    app = create_app(lambda: model_dir, ServeSettings(max_n=4, max_steps=3, timeout_s=30))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def test_sdpipe_serve_process_with_api_key(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("# one key a line\nkey-one\n")
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "sdpipe.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--api-key-file", str(tmp_path / "keys"), "--set", "max_wait_ms=5", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, proc=proc)
        body = {"label": "2", "n": 3, "seed": 70, "steps": 4, "sampler": "euler", "guidance": 1.5}
        assert httpx.post(url + "/v1/generate", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/generate", json=body, headers={"Authorization": "Bearer key-one"}, timeout=60)
        assert r.status_code == 200, r.text
        args = ["generate", "--model", str(model_dir), "--out", str(tmp_path / "cli"), "--label", "2", "--n", "3"]
        args += ["--seed", "70", "--steps", "4", "--sampler", "euler", "--guidance", "1.5", "--quiet"]
        assert CliRunner().invoke(cli_app, args).exit_code == 0
        for i, im in enumerate(r.json()["images"]):
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(im["png_base64"]))))
            assert np.array_equal(served, np.asarray(Image.open(tmp_path / "cli" / f"{i:05d}.png")))
        assert 'sdpipe_http_requests_total{path="/v1/generate",status="401"} 1.0' in httpx.get(url + "/metrics").text
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "key-one" not in out


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs Debian's chromium and chromium-driver"
)


def chrome():  # -> selenium's webdriver.Chrome, imported only where the browser tests run
    """Headless Chromium through the installed chromedriver (nothing is downloaded); it logs its network requests."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def requested_urls(driver) -> list[str]:
    """Every URL the browser has asked for so far, from its performance log."""
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]


@needs_chromium
def test_web_page_shows_generated_images(live_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chrome()
    try:
        driver.get(live_url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#label option")) == 11)  # all + 10 classes
        Select(driver.find_element(By.ID, "label")).select_by_value("7")
        Select(driver.find_element(By.ID, "sampler")).select_by_value("ddim")
        for field, value in (("n", "2"), ("seed", "5"), ("steps", "3"), ("guidance", "1.5")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#images img.generated")))
        images = driver.find_elements(By.CSS_SELECTOR, "#images img.generated")
        assert len(images) == 2
        assert [driver.execute_script("return arguments[0].naturalWidth", im) for im in images] == [8, 8]
        body = {"label": "7", "n": 2, "seed": 5, "steps": 3, "sampler": "ddim", "guidance": 1.5}
        api = httpx.post(live_url + "/v1/generate", json=body, timeout=60).json()["images"]
        assert [im.get_attribute("src") for im in images] == [f"data:image/png;base64,{a['png_base64']}" for a in api]
        # a bad value is shown as an error naming the field, not as images
        box = driver.find_element(By.ID, "n")
        box.clear()
        box.send_keys("99")
        driver.execute_script("document.getElementById('n').removeAttribute('max')")
        driver.find_element(By.ID, "generate").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "422"))
        assert "n:" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


@needs_chromium
@pytest.mark.skipif(asset_folder() is None, reason="/docs needs the fastapi-offline package (Swagger UI's files)")
def test_docs_page_renders_from_this_server_alone(live_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome()
    try:
        for page in ("/", "/docs"):
            driver.get(live_url + page)
        operations = (By.CSS_SELECTOR, ".opblock-summary-path")
        WebDriverWait(driver, 30).until(lambda d: "/v1/generate" in [e.text for e in d.find_elements(*operations)])
        urls = requested_urls(driver)
    finally:
        driver.quit()
    assert f"{live_url}/docs-assets/swagger-ui-bundle.js" in urls and f"{live_url}/openapi.json" in urls
    assert [u for u in urls if not u.startswith((live_url + "/", "data:"))] == []  # nothing from another host


def test_openapi_fuzz_never_5xx(live_url: str) -> None:
    """Every operation of the OpenAPI spec, with generated valid and invalid inputs: never a 5xx."""
    api = schemathesis.openapi.from_url(live_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/generate", "/healthz", "/readyz", "/metrics", "/admin/reload"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()


@pytest.mark.slow
def test_bench_batching_overload_and_short_soak(tmp_path: Path) -> None:
    """bench/serve.py on a tiny model with 64-row micro-batches (as the demo model): batching at least 3x the
    throughput of one request at a time with 16 clients, overload answered only with 200 and 429, flat memory."""
    model = make_model(tmp_path / "model", seed=4, micro_batch=64)
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(Path(__file__).parents[1] / "bench" / "serve.py"), "--model", str(model)]
    cmd += ["--clients", "16", "--seconds", "15", "--overload-clients", "48", "--overload-queue", "4"]
    cmd += ["--soak-seconds", "90", "--json", str(out)]
    subprocess.run(cmd, check=True, timeout=600)
    on, off, overload, soak = json.loads(out.read_text())
    assert on["requests_per_s"] >= 3 * off["requests_per_s"], (on, off)
    for run in (on, off, overload, soak):
        assert set(run["statuses"]) <= {"200", "429"}, run
    assert "429" in overload["statuses"] and overload["statuses"]["200"] > 0
    start, end = soak["rss_mib"][0], soak["rss_mib"][-1]
    assert end - start < max(0.05 * start, 25), soak["rss_mib"]
