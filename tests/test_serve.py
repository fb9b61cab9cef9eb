"""The HTTP API through FastAPI's test client: same images as `sdpipe generate`, batching that changes no
image, validation, backpressure, timeouts, API keys, readiness, metrics and model swaps under load."""

from __future__ import annotations

import base64
import functools
import hmac
import io
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import random_model
from sdpipe.conditioning import Conditioning
from sdpipe.models import LoadedModel, load_model
from sdpipe.sampling import SampleSpec
from sdpipe.sampling.files import generate_files
from sdpipe.sampling.generate import Row, plan
from sdpipe.serve import batching
from sdpipe.serve.app import create_app
from sdpipe.serve.batching import Batcher, GenerateJob, QueueFull, run_jobs
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.settings import ServeSettings

TINY = [
    "diffusion.formulation=ddpm",  # every sampler applies (test_edm_model_takes_only_its_samplers: the rest)
    "train.loss_weighting=uniform",
    "model.block_out_channels=[16, 32]",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
    "sample.steps=3",
    "sample.micro_batch=8",
]


def make_model(path: Path, seed: int = 0, scale: float = 1.0, micro_batch: int = 8) -> Path:
    """A tiny class-conditional model with random weights (seed), saved in the sdpipe format."""
    return random_model(path, seed, sets=[*TINY, f"sample.micro_batch={micro_batch}"], scale=scale)


@pytest.fixture(scope="module")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("serve") / "a", seed=0)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("serve") / "b", seed=1)


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.02)


@pytest.fixture
def client(model_a: Path) -> Iterator[TestClient]:
    with TestClient(create_app(lambda: model_a, ServeSettings(max_n=16, max_steps=8))) as c:
        wait_ready(c)
        yield c


def pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))))


@functools.lru_cache(maxsize=4)
def _load(model: Path) -> LoadedModel:
    return load_model(model)


def cli_images(model: Path, out: Path, label: str, n: int, seed: int, spec: SampleSpec | None = None) -> list:
    """What `sdpipe generate` writes for these settings (default: the model's own sample settings)."""
    loaded = _load(model)
    s = loaded.meta.config["sample"]
    spec = spec or SampleSpec(s["sampler"], s["steps"], s["guidance"], s["micro_batch"])
    generate_files(loaded, out, label=label, n=n, seed=seed, spec=spec, show_progress=False)
    return [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(n)]


def test_same_images_as_sdpipe_generate(client: TestClient, model_a: Path, tmp_path: Path) -> None:
    body = {"label": "3", "n": 3, "seed": 13, "steps": 4, "sampler": "ddpm", "guidance": 2.0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == load_model(model_a).meta.weights_hash
    assert [(im["seed"], im["label"]) for im in data["images"]] == [(13, "3"), (14, "3"), (15, "3")]
    want = cli_images(model_a, tmp_path / "a", "3", 3, 13, SampleSpec("ddpm", 4, 2.0, 8))
    for im, ref in zip(data["images"], want, strict=True):
        assert np.array_equal(pixels(im["png_base64"]), ref)
    with Image.open(io.BytesIO(base64.b64decode(data["images"][0]["png_base64"]))) as png:
        assert "Steps: 4, Sampler: ddpm, CFG scale: 2.0, Seed: 13" in png.text["parameters"]
    # options left out are the model's own sample settings, as for `sdpipe generate`
    r = client.post("/v1/generate", json={"n": 10, "seed": 4})
    want = cli_images(model_a, tmp_path / "b", "all", 10, 4)
    assert [im["label"] for im in r.json()["images"]] == [str(i % 10) for i in range(10)]
    assert all(np.array_equal(pixels(im["png_base64"]), w) for im, w in zip(r.json()["images"], want, strict=True))
    assert not np.array_equal(want[0], want[1])


def test_plan_puts_each_seed_in_its_own_row() -> None:
    items = [(3, 1), (11, 2), (19, 3), (4, 0), (100, 5), (3, 2), (3, 2)]
    rows = [Row(s, Conditioning(label=str(lab))) for s, lab in items]
    batches = plan(rows, 8)
    assert sorted((r.seed, r.cond.label) for b in batches for r in b.values()) == sorted(
        set(map(lambda i: (i[0], str(i[1])), items))
    )
    assert all(r == row.seed % 8 for b in batches for r, row in b.items())
    # seeds 3, 11, 19 and the second (3, ·) share row 3: four micro-batches, not one per seed window
    assert len(batches) == 4
    # rows whose batch keys differ (here: the image size) never share a micro-batch
    sized = [
        Row(1, Conditioning(prompt="a", width=64, height=64)),
        Row(2, Conditioning(prompt="a", width=32, height=64)),
    ]
    assert len(plan(sized, 8)) == 2


def test_the_server_has_no_generation_loop_of_its_own() -> None:
    """The server and the CLI generate through `generate_items`; serve/ imports neither the loop nor the noise."""
    import ast

    serve = Path(__file__).parent.parent / "src" / "sdpipe" / "serve"
    for path in serve.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {a.name for a in node.names}
                assert not names & {"denoise", "noise_rows", "start_batch", "run", "plan", "new_scheduler"}, path


def test_merged_requests_give_the_images_they_give_alone(model_a: Path, tmp_path: Path) -> None:
    model = load_model(model_a)
    jobs = [
        GenerateJob(n=2, seed=3, label="1", steps=3, sampler="ddpm", guidance=2.0),
        GenerateJob(n=3, seed=11, label="all", steps=3, sampler="ddpm", guidance=2.0),  # rows 3,4,5: clash
        GenerateJob(n=1, seed=3, label="1", steps=3, sampler="ddpm", guidance=2.0),  # the same image again
        GenerateJob(n=1, seed=3, label="7", steps=3, sampler="ddpm", guidance=2.0),  # same seed, other label
        GenerateJob(n=2, seed=40, label="5", steps=2, sampler="dpmpp_2m", guidance=1.0),  # another spec
        GenerateJob(n=1, seed=0, label="nope"),  # fails alone, never the others
    ]
    run_jobs(model, jobs)
    with pytest.raises(ValueError, match="unknown label"):
        jobs[-1].future.result(timeout=0)
    for k, job in enumerate(jobs[:-1]):
        assert job.sampler is not None and job.steps is not None and job.guidance is not None
        spec = SampleSpec(job.sampler, job.steps, job.guidance, 8)
        want = cli_images(model_a, tmp_path / str(k), job.label, job.n, job.seed, spec)
        got = [pixels(im.png_base64) for im in job.future.result(timeout=0).images]
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)), f"request {k} differs"


def test_concurrent_requests_are_batched(model_a: Path, tmp_path: Path) -> None:
    settings = ServeSettings(max_batch=64, max_wait_ms=300)
    app = create_app(lambda: model_a, settings)
    with TestClient(app) as c:
        wait_ready(c)
        bodies = [{"label": str(i % 10), "n": 1, "seed": 1000 + 37 * i} for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda b: c.post("/v1/generate", json=b), bodies))
        assert [r.status_code for r in responses] == [200] * 8
        metrics = c.get("/metrics").text
    batches = app.state.metrics.batch_requests.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < 8, "8 concurrent requests ran in 8 batches: nothing was merged"
    assert "sdpipe_images_generated_total 8.0" in metrics
    for i, (b, r) in enumerate(zip(bodies, responses, strict=True)):
        want = cli_images(model_a, tmp_path / str(i), b["label"], 1, b["seed"])
        assert np.array_equal(pixels(r.json()["images"][0]["png_base64"]), want[0])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "n"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": "two"}, "n"),
        ({"n": 1, "steps": 9}, "steps"),
        ({"n": 1, "steps": 0}, "steps"),
        ({"n": 1, "guidance": 21}, "guidance"),
        ({"n": 1, "guidance": -1}, "guidance"),
        ({"n": 1, "sampler": "plms"}, "sampler"),
        ({"n": 1, "seed": -1}, "seed"),
        ({"n": 1, "seed": 2**40}, "seed"),
        ({"n": 1, "label": "11"}, "label"),
        ({"n": 1, "label": ""}, "label"),
        ({"n": 1, "colour": "red"}, "colour"),
    ],
)
def test_bad_requests_get_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in [e["loc"][-1] for e in r.json()["detail"]]


def test_malformed_bodies_get_422(client: TestClient) -> None:
    for content in (b"not json", b"[1, 2]", b'{"n": NaN}', b'{"n": 1, "guidance": Infinity}'):
        r = client.post("/v1/generate", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (content, r.text)


class Hold:
    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def set(self) -> None:
        self.release.set()


@pytest.fixture
def held_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hold]:
    """Batches wait until `release` is set (`entered` says one is waiting): lets a test fill the queue."""
    hold = Hold()
    real = batching.run_jobs

    def slow_run_jobs(*args, **kwargs) -> None:
        hold.entered.set()
        hold.release.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(batching, "run_jobs", slow_run_jobs)
    yield hold
    hold.set()


def _wait_depth(app, depth: int) -> None:
    deadline = time.monotonic() + 10
    while app.state.batcher.depth() != depth:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_full_queue_gets_429_with_retry_after(model_a: Path, held_worker: Hold) -> None:
    app = create_app(lambda: model_a, ServeSettings(max_batch=1, max_wait_ms=0, queue_size=2))
    with TestClient(app) as c, ThreadPoolExecutor(3) as pool:
        wait_ready(c)
        first = pool.submit(c.post, "/v1/generate", json={"n": 1, "seed": 1})
        assert held_worker.entered.wait(10)  # the first request is with the worker, which is held
        assert c.get("/healthz").status_code == 200  # answered while a batch is running
        queued = [pool.submit(c.post, "/v1/generate", json={"n": 1, "seed": s}) for s in (2, 3)]
        _wait_depth(app, 2)
        r = c.post("/v1/generate", json={"n": 1, "seed": 4})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        held_worker.set()
        assert [f.result(30).status_code for f in [first, *queued]] == [200, 200, 200]
        assert "sdpipe_rejected_total 1.0" in c.get("/metrics").text


def test_requests_that_would_time_out_in_the_queue_get_429() -> None:
    batcher = Batcher(ServeSettings(queue_size=100, timeout_s=15), lambda: None, ServeMetrics())  # not started
    batcher._seconds_per_request = 10.0  # as measured on recent batches
    batcher.submit(GenerateJob(n=1))
    batcher.submit(GenerateJob(n=1))  # waits about 10 s: fine
    with pytest.raises(QueueFull) as full:
        batcher.submit(GenerateJob(n=1))  # would wait about 20 s, beyond the 15 s timeout
    assert full.value.retry_after_s == 20 and batcher.depth() == 2


def test_request_timeout_gets_503_and_is_dropped(model_a: Path, held_worker: Hold) -> None:
    app = create_app(lambda: model_a, ServeSettings(max_batch=1, max_wait_ms=0, timeout_s=1.0))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        wait_ready(c)
        first = pool.submit(c.post, "/v1/generate", json={"n": 1, "seed": 1})
        assert held_worker.entered.wait(10)
        r = c.post("/v1/generate", json={"n": 1, "seed": 2})
        assert r.status_code == 503 and "not answered within" in r.json()["detail"]
        assert first.result(30).status_code == 503
        held_worker.set()
        assert c.post("/v1/generate", json={"n": 1, "seed": 3}).status_code == 200
        # the first request was already running when it timed out; the second, still queued, never ran
        assert "sdpipe_images_generated_total 2.0" in c.get("/metrics").text


def test_api_keys(model_a: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = "s3cret-key-\u00e9"  # non-ASCII must not break the constant-time comparison
    with TestClient(create_app(lambda: model_a, ServeSettings(), api_keys=["other", key])) as c:
        wait_ready(c)
        body = {"n": 1}
        assert c.post("/v1/generate", json=body).status_code == 401
        r = c.post("/v1/generate", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.post("/v1/generate", json=body, headers={"Authorization": b"Basic " + key.encode()}).status_code == 401
        ok = c.post("/v1/generate", json=body, headers={"Authorization": b"Bearer " + key.encode()})
        assert ok.status_code == 200
        assert c.post("/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert key not in caplog.text and "s3cret" not in caplog.text


def test_api_keys_are_compared_by_digest_with_every_key(model_a: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key given is compared with each key as equal-length digests, so timing leaks no length."""
    compared: list[tuple[int, int]] = []
    real_compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = ["short", "a-much-longer-key-" * 4, "k3"]
    with TestClient(create_app(lambda: model_a, ServeSettings(), api_keys=keys)) as c:
        for given, status in [("x", 401), (keys[1] + "y", 401), (keys[1][:-1], 401), ("", 401), (keys[2], 200)]:
            compared.clear()
            r = c.post("/admin/reload", headers={"Authorization": f"Bearer {given}"})
            assert r.status_code == status or (status == 200 and r.status_code == 503), (given, r.text)
            assert compared == [(32, 32)] * len(keys), given


def test_health_and_readiness_while_loading(model_a: Path) -> None:
    loading = threading.Event()

    def slow_resolver() -> Path:
        loading.wait(30)
        return model_a

    with TestClient(create_app(slow_resolver, ServeSettings())) as c:
        assert c.get("/healthz").json() == {"status": "alive"}
        assert c.get("/readyz").status_code == 503
        assert c.post("/v1/generate", json={"n": 1}).status_code == 503
        loading.set()
        wait_ready(c)
        assert c.get("/readyz").json()["model"] == load_model(model_a).meta.weights_hash


def test_a_model_that_fails_warm_up_is_never_served(tmp_path: Path) -> None:
    bad = make_model(tmp_path / "nan", scale=float("nan"))
    with TestClient(create_app(lambda: bad, ServeSettings())) as c:
        deadline = time.monotonic() + 10
        while "non-finite" not in (c.get("/readyz").json().get("detail") or ""):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/readyz").status_code == 503


def test_metrics(client: TestClient) -> None:
    assert client.post("/v1/generate", json={"n": 2, "seed": 5}).status_code == 200
    assert client.post("/v1/generate", json={"n": 0}).status_code == 422
    text = client.get("/metrics").text
    for line in (
        'sdpipe_http_requests_total{path="/v1/generate",status="200"} 1.0',
        'sdpipe_http_requests_total{path="/v1/generate",status="422"} 1.0',
        'sdpipe_http_request_seconds_count{path="/v1/generate"} 2.0',
        "sdpipe_batch_images_count 1.0",
        "sdpipe_queue_depth 0.0",
        "sdpipe_images_generated_total 2.0",
        'sdpipe_bad_images_total{kind="nonfinite"} 0.0',
        "sdpipe_ready 1.0",
    ):
        assert line in text, line


def test_bad_outputs_are_counted(model_a: Path) -> None:
    model, metrics = load_model(model_a), ServeMetrics()
    one = Conditioning(label="1")
    images = {
        Row(0, one): torch.full((1, 8, 8), float("nan")),
        Row(1, one): torch.zeros(1, 8, 8),
        Row(2, one): torch.rand(1, 8, 8),
    }
    batching._encode(model, images, SampleSpec(), metrics)
    text = metrics.render()[0].decode()
    assert 'sdpipe_bad_images_total{kind="nonfinite"} 1.0' in text
    assert 'sdpipe_bad_images_total{kind="blank"} 1.0' in text


def test_edm_model_takes_only_its_samplers(tmp_path: Path) -> None:
    edm = random_model(tmp_path / "edm", 0, sets=[t for t in TINY if "formulation" not in t and "weighting" not in t])
    with TestClient(create_app(lambda: edm, ServeSettings(max_n=4, max_steps=8))) as c:
        wait_ready(c)
        assert c.get("/v1/model").json()["samplers"] == ["euler", "dpmpp_2m", "dpmpp_2m_karras"]
        r = c.post("/v1/generate", json={"n": 1, "sampler": "ddim"})
        assert r.status_code == 422 and "sampler" in [e["loc"][-1] for e in r.json()["detail"]]
        assert c.post("/v1/generate", json={"n": 1, "sampler": "euler"}).status_code == 200
