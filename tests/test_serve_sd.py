"""`POST /v1/generate` and `sdpipe serve` on tiny Stable Diffusion models: PNG bytes identical to `sdpipe generate`,
only compatible requests sharing micro-batches (and no image changed by it), 422 naming the field for what the
served kind does not take, inpainting models warmed up and served, single files, hot swaps, the command's options."""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sd_fixtures import single_file_folders
from sdpipe.models.kinds import load_any
from sdpipe.models.pipelines import LoadedPipeline
from sdpipe.serve import batching
from sdpipe.serve.app import create_app
from sdpipe.serve.batching import GenerateJob, run_jobs
from sdpipe.serve.holder import ModelSource, load_path
from sdpipe.serve.metrics import ServeMetrics
from sdpipe.serve.settings import ServeSettings
from test_sdapi import b64png, cli, mask_image, picture
from test_serve import make_model, wait_ready

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
SIZE = 32


def settings(**kw: object) -> ServeSettings:
    base = {"max_n": 4, "max_steps": 6, "max_width": 64, "max_height": 64, "max_prompt_chars": 200, "threads": 1}
    return ServeSettings(**(base | kw))


@pytest.fixture(scope="module")
def client(sd1_pipeline: Path) -> Iterator[TestClient]:
    with TestClient(create_app(lambda: sd1_pipeline, settings())) as c:
        wait_ready(c)
        yield c


def png(image: dict) -> bytes:
    return base64.b64decode(image["png_base64"])


def test_same_png_bytes_as_sdpipe_generate(client: TestClient, sd1_pipeline: Path, tmp_path: Path) -> None:
    body = {"prompt": "a blue square", "negative_prompt": "red", "n": 2, "seed": 7, "steps": 2}
    body |= {"sampler": "DPM++ 2M", "guidance": 3.5, "width": SIZE, "height": 24, "clip_skip": 2}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    files = cli(
        sd1_pipeline,
        tmp_path / "cli",
        *("--prompt", "a blue square", "--negative-prompt", "red", "--n", "2", "--seed", "7", "--steps", "2"),
        *("--sampler", "dpmpp_2m", "--guidance", "3.5", "--width", str(SIZE), "--height", "24", "--clip-skip", "2"),
    )
    images = r.json()["images"]
    assert [png(im) for im in images] == [f.read_bytes() for f in files]
    assert [(im["seed"], im["prompt"], im["label"]) for im in images] == [(s, "a blue square", None) for s in (7, 8)]
    assert r.json()["model"] == load_any(sd1_pipeline).hash == client.get("/readyz").json()["model"]
    model = client.get("/v1/model").json()
    assert model["takes"] == "prompt" and model["kind"] == "sd-pipeline" and model["limits"]["max_width"] == 64
    page = client.get("/").text
    assert all(f'id="{name}"' in page for name in ("prompt", "negative_prompt", "width", "height", "sampler", "seed"))


@functools.cache
def _pipeline(path: Path) -> LoadedPipeline:
    model = load_any(path)
    assert isinstance(model, LoadedPipeline)
    return model


def test_only_compatible_requests_share_micro_batches(sd1_pipeline: Path, tmp_path: Path) -> None:
    model, metrics = _pipeline(sd1_pipeline), ServeMetrics()
    same = {"steps": 2, "sampler": "euler_a", "guidance": 4.0, "width": SIZE, "height": SIZE}

    def jobs() -> list[GenerateJob]:
        return [
            GenerateJob(n=1, seed=10, prompt="a cat", **same),  # row 0
            GenerateJob(n=1, seed=21, prompt="a dog", negative_prompt="blurry", **same),  # row 1: shares the batch
            GenerateJob(n=1, seed=31, prompt="a dog", **(same | {"width": 16})),  # another size: its own batch
            GenerateJob(n=1, seed=40, prompt="a dog", **(same | {"steps": 3})),  # another spec: its own batch
            GenerateJob(n=1, seed=50, prompt="a (dog:1.3)", **same),  # refused alone, naming the field
        ]

    merged = jobs()
    run_jobs(model, merged, metrics, micro_batch=2)
    assert "sdpipe_micro_batches_total 3.0" in metrics.render()[0].decode()
    with pytest.raises(batching.InvalidRequest) as refused:
        merged[-1].future.result(timeout=0)
    assert refused.value.field == "prompt"
    for job, alone in zip(merged[:-1], jobs()[:-1], strict=True):
        run_jobs(model, [alone], micro_batch=2)
        got, want = job.future.result(timeout=0).images, alone.future.result(timeout=0).images
        assert [im.png_base64 for im in got] == [im.png_base64 for im in want]
    files = cli(
        sd1_pipeline,
        tmp_path / "cli",
        *("--prompt", "a dog", "--negative-prompt", "blurry", "--n", "1", "--seed", "21", "--steps", "2"),
        *("--sampler", "euler_a", "--guidance", "4", "--width", str(SIZE), "--height", str(SIZE), "--micro-batch", "2"),
    )
    assert base64.b64decode(merged[1].future.result(timeout=0).images[0].png_base64) == files[0].read_bytes()


def test_the_prompt_cache_is_bounded_and_changes_no_image(sd1_pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpipe.models import pipelines

    model = _pipeline(sd1_pipeline)
    monkeypatch.setattr(pipelines, "EMBEDDING_CACHE", 1)

    def once() -> str:
        jobs = [GenerateJob(n=1, seed=3, prompt=p, steps=1, width=16, height=16) for p in ("one", "two")]
        run_jobs(model, jobs)
        return jobs[0].future.result(timeout=0).images[0].png_base64

    first = once()
    assert len(model.parts._embeddings) == 1  # two prompts, a limit of one: the older is forgotten
    assert once() == first


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 1}, "prompt"),
        ({"n": 1, "prompt": "x", "label": "3"}, "label"),
        ({"n": 1, "prompt": "a (cat:1.2)"}, "prompt"),
        ({"n": 1, "prompt": "x" * 201}, "prompt"),
        ({"n": 1, "prompt": "cat " * 40}, "prompt"),  # 160 characters, past the 77-token window
        ({"n": 1, "prompt": "x", "negative_prompt": "[blurry]"}, "negative_prompt"),
        ({"n": 1, "prompt": "x", "width": 12}, "width"),
        ({"n": 1, "prompt": "x", "height": 72}, "height"),
        ({"n": 1, "prompt": "x", "clip_skip": 0}, "clip_skip"),
        ({"n": 5, "prompt": "x"}, "n"),
        ({"n": 1, "prompt": "x", "steps": 7}, "steps"),
        ({"n": 1, "prompt": "x", "sampler": "plms"}, "sampler"),
        ({"n": 1, "prompt": "x", "image": "%%%"}, "image"),
        ({"n": 1, "prompt": "x", "image": base64.b64encode(b"GIF89a no").decode()}, "image"),
        ({"n": 1, "prompt": "x", "mask": b64png(mask_image())}, "mask"),
        ({"n": 1, "prompt": "x", "strength": 0.5}, "strength"),
        ({"n": 1, "prompt": "x", "image": b64png(picture()), "strength": 0.2, "steps": 4}, "strength"),
        ({"n": 1, "prompt": "x", "image": b64png(Image.new("RGB", (128, 16)))}, "image"),  # 128 px: above the limit
    ],
)
def test_bad_requests_get_422_naming_the_field(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in [e["loc"][-1] for e in r.json()["detail"]], r.text


def test_a_pixel_space_model_refuses_prompts_naming_them(tmp_path: Path) -> None:
    digits = make_model(tmp_path / "digits")
    with TestClient(create_app(lambda: digits, ServeSettings())) as c:
        wait_ready(c)
        for body, field in (({"prompt": "a 7"}, "prompt"), ({"width": 16}, "width"), ({"image": "AAAA"}, "image")):
            r = c.post("/v1/generate", json={"n": 1} | body)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
        assert c.get("/v1/model").json()["takes"] == "label"


def test_an_inpainting_model_is_warmed_up_and_served(sd1_inpaint_pipeline: Path, tmp_path: Path) -> None:
    with TestClient(create_app(lambda: sd1_inpaint_pipeline, settings())) as c:
        wait_ready(c)  # its warm-up ran with a grey image and a full mask
        r = c.post("/v1/generate", json={"n": 1, "prompt": "a cat", "steps": 2, "width": SIZE, "height": SIZE})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"]
        body = {"n": 1, "prompt": "a cat", "steps": 2, "seed": 4, "sampler": "euler", "guidance": 3}
        body |= {"image": b64png(picture()), "mask": b64png(mask_image())}
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
    picture().save(tmp_path / "in.png")
    mask_image().save(tmp_path / "mask.png")
    files = cli(
        sd1_inpaint_pipeline,
        tmp_path / "cli",
        *("--prompt", "a cat", "--n", "1", "--seed", "4", "--steps", "2", "--sampler", "euler", "--guidance", "3"),
        *("--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png")),
    )
    served = np.asarray(Image.open(io.BytesIO(png(r.json()["images"][0]))))
    assert np.array_equal(served, np.asarray(Image.open(files[0])))


def test_hot_swap_to_a_single_file(sd1_pipeline: Path, sd1_single_file: Path) -> None:
    from sdpipe.models.hashes import file_sha256

    _, config = single_file_folders(sd1_single_file)
    single = ModelSource(sd1_single_file, functools.partial(load_path, sd1_single_file, config=str(config)))
    current: dict[str, Path | ModelSource] = {"model": sd1_pipeline}
    with TestClient(create_app(lambda: current["model"], settings(poll_s=3600))) as c:
        wait_ready(c)
        before = c.get("/readyz").json()["model"]
        current["model"] = single
        r = c.post("/admin/reload")
        after = "sha256:" + file_sha256(sd1_single_file)[:16]
        assert r.json() == {"changed": True, "model": after} and before != after
        body = {"n": 1, "prompt": "x", "steps": 1, "width": SIZE, "height": SIZE}
        assert c.post("/v1/generate", json=body).json()["model"] == after
        (model,) = c.get("/sdapi/v1/sd-models").json()
        assert model["title"] == f"{sd1_single_file.name} [{after[7:17]}]" and model["model_name"] == "tiny-sd1"
        assert model["sha256"] == file_sha256(sd1_single_file)
        assert 'sdpipe_model_reloads_total{result="ok"} 1.0' in c.get("/metrics").text


def test_sdpipe_serve_takes_sd_models_device_and_dtype(sd1_pipeline: Path, tmp_path: Path, served: list) -> None:
    from typer.testing import CliRunner

    from sdpipe.cli import app as cli_app
    from test_serve_cli import free_port

    def serve(*args: str):
        return CliRunner().invoke(cli_app, ["serve", "--port", str(free_port()), *args])

    result = serve("--model", str(sd1_pipeline), "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0 and served[-1].config.app.state.holder.ready, result.output
    digits = make_model(tmp_path / "digits")
    result = serve("--model", str(digits), "--dtype", "float16")
    assert result.exit_code == 2 and "sample in float32" in result.output and result.output.count("\n") == 1
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    result = serve("--model", str(ckpt))
    assert result.exit_code == 2 and "pickle" in result.output and result.output.count("\n") == 1, result.output
