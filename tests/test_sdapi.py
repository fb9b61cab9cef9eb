"""The web UI's API (`/sdapi/v1/*`) on a tiny Stable Diffusion model: the unmodified `webuiapi` client from PyPI
against a real uvicorn server on 127.0.0.1 gets the very PNG bytes `sdpipe generate` writes (txt2img), the same
pixels (img2img, inpainting), the samplers, the model and the options; and through the test client, every field
sdpipe does not implement that would change the image is a 422 naming it, bounds, 429 and keys."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
import webuiapi
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from sdpipe.cli import app as cli_app
from sdpipe.serve.app import create_app
from sdpipe.serve.settings import MAX_SEED, ServeSettings
from test_serve import Hold, _wait_depth, held_worker, wait_ready  # noqa: F401  (held_worker: a fixture)
from test_serve_live import HOST, free_port
from test_serve_live import wait_ready as wait_live

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
SIZE = 32
runner = CliRunner()


def settings(**kw: object) -> ServeSettings:
    return ServeSettings(**{"max_n": 4, "max_steps": 6, "max_width": 64, "max_height": 64, "threads": 1, **kw})


@pytest.fixture(scope="module")
def api(sd1_pipeline: Path) -> Iterator[webuiapi.WebUIApi]:
    """The webuiapi client against uvicorn serving the tiny SD1 model in a thread of this process."""
    app = create_app(lambda: sd1_pipeline, settings())
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_live(f"http://{HOST}:{server.config.port}")
        yield webuiapi.WebUIApi(host=HOST, port=server.config.port)
    finally:
        server.should_exit = True
        thread.join(30)


def cli(model: Path, out: Path, *args: str) -> list[Path]:
    """`sdpipe generate` with these options: its PNG files."""
    result = runner.invoke(cli_app, ["generate", "--model", str(model), "--out", str(out), "--quiet", *args])
    assert result.exit_code == 0, result.output
    return sorted(out.glob("*.png"))


def sent_bytes(result: webuiapi.WebUIApiResult) -> list[bytes]:
    return [base64.b64decode(im) for im in result.json["images"]]


def pixels(data: bytes | Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data))


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask_image() -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:24, 4:20] = 255
    return Image.fromarray(m)


def test_webuiapi_txt2img_is_byte_identical_to_sdpipe_generate(
    api: webuiapi.WebUIApi, sd1_pipeline: Path, tmp_path: Path
) -> None:
    result = api.txt2img(
        prompt="a red circle",
        negative_prompt="blurry",
        seed=11,
        steps=2,
        cfg_scale=5,
        width=SIZE,
        height=SIZE,
        sampler_name="Euler a",
        batch_size=2,
    )
    files = cli(
        sd1_pipeline,
        tmp_path / "cli",
        *("--prompt", "a red circle", "--negative-prompt", "blurry", "--n", "2", "--seed", "11", "--steps", "2"),
        *("--guidance", "5", "--width", str(SIZE), "--height", str(SIZE), "--sampler", "Euler a"),
    )
    assert sent_bytes(result) == [f.read_bytes() for f in files]
    assert [im.size for im in result.images] == [(SIZE, SIZE)] * 2
    info = result.info
    assert (info["seed"], info["all_seeds"], info["sampler_name"], info["steps"]) == (11, [11, 12], "Euler a", 2)
    assert info["infotexts"][1] == Image.open(files[1]).text["parameters"]
    assert info["index_of_first_image"] == 0 and result.parameters["seed"] == 11
    # seed -1: one is drawn, reported, and gives the images that seed gives
    drawn = api.txt2img(prompt="a red circle", seed=-1, steps=2, width=SIZE, height=SIZE, sampler_name="Euler a")
    seed = drawn.info["seed"]
    assert 0 <= seed <= MAX_SEED and drawn.parameters["seed"] == seed and drawn.info["all_seeds"] == [seed]
    again = api.txt2img(prompt="a red circle", seed=seed, steps=2, width=SIZE, height=SIZE, sampler_name="Euler a")
    assert sent_bytes(again) == sent_bytes(drawn)


def test_webuiapi_img2img_and_inpainting_equal_sdpipe_generate(
    api: webuiapi.WebUIApi, sd1_pipeline: Path, tmp_path: Path
) -> None:
    picture().save(tmp_path / "in.png")
    mask_image().save(tmp_path / "mask.png")
    common = {"prompt": "a cat", "seed": 5, "steps": 3, "cfg_scale": 4, "width": SIZE, "height": SIZE}
    base = ["--prompt", "a cat", "--n", "1", "--seed", "5", "--steps", "3", "--guidance", "4", "--sampler", "Euler a"]
    base += ["--width", str(SIZE), "--height", str(SIZE), "--image", str(tmp_path / "in.png")]
    got = api.img2img(images=[picture()], denoising_strength=0.7, sampler_name="Euler a", **common)
    want = cli(sd1_pipeline, tmp_path / "i2i", *base, "--strength", "0.7")
    assert np.array_equal(pixels(sent_bytes(got)[0]), pixels(want[0]))
    assert got.info["denoising_strength"] == 0.7 and "Denoising strength: 0.7" in got.info["infotexts"][0]
    # inpainting: the web UI's blur, "only masked" and "fill" are refused; as diffusers inpaints, it is accepted
    with pytest.raises(RuntimeError) as refused:
        api.img2img(images=[picture()], mask_image=mask_image(), sampler_name="Euler a", **common)
    status, text = refused.value.args
    fields = {e["loc"][-1] for e in json.loads(text)["detail"]}
    assert status == 422 and fields == {"mask_blur", "inpaint_full_res", "inpainting_fill"}
    got = api.img2img(
        images=[picture()],
        mask_image=mask_image(),
        mask_blur=0,
        inpaint_full_res=False,
        inpainting_fill=1,
        denoising_strength=0.9,
        sampler_name="Euler a",
        **common,
    )
    want = cli(sd1_pipeline, tmp_path / "inpaint", *base, "--mask", str(tmp_path / "mask.png"), "--strength", "0.9")
    assert np.array_equal(pixels(sent_bytes(got)[0]), pixels(want[0]))


def test_webuiapi_samplers_models_and_options(api: webuiapi.WebUIApi) -> None:
    samplers = api.get_samplers()
    assert {"Euler a", "DPM++ 2M Karras", "DDIM"} <= {s["name"] for s in samplers}
    assert next(s for s in samplers if s["name"] == "Euler a")["aliases"] == ["euler_a"]
    (model,) = api.get_sd_models()
    assert set(model) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert model["title"] == f"{model['model_name']} [{model['hash']}]" and model["sha256"].startswith(model["hash"])
    assert api.util_get_model_names() == [model["title"]] and api.util_get_current_model() == model["title"]
    options = api.get_options()
    assert options["sd_model_checkpoint"] == model["title"] and options["CLIP_stop_at_last_layers"] == 1
    assert api.set_options(options) is None  # what GET gives is accepted back
    api.util_set_model(model["title"])
    api.set_options({"CLIP_stop_at_last_layers": 2})  # applies to later requests, as in the web UI
    try:
        result = api.txt2img(prompt="x", seed=1, steps=1, width=SIZE, height=SIZE, sampler_name="Euler")
        assert result.info["clip_skip"] == 2 and "Clip skip: 2" in result.info["infotexts"][0]
        own = api.txt2img(
            prompt="x", seed=1, steps=1, width=SIZE, height=SIZE, override_settings={"CLIP_stop_at_last_layers": 1}
        )
        assert own.info["clip_skip"] == 1
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})


# --------------------------------------------------------------------------- the test client


@pytest.fixture(scope="module")
def client(sd1_pipeline: Path) -> Iterator[TestClient]:
    with TestClient(create_app(lambda: sd1_pipeline, settings())) as c:
        wait_ready(c)
        yield c


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


OK = {"prompt": "a cat", "seed": 1, "steps": 1, "width": SIZE, "height": SIZE}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        ({"seed_resize_from_h": 64}, "seed_resize_from_h"),
        ({"styles": ["cinematic"]}, "styles"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
        ({"s_churn": 0.5}, "s_churn"),
        ({"s_noise": 0.9}, "s_noise"),
        ({"eta": 0.5, "sampler_name": "Euler a"}, "eta"),
        ({"eta": 1.0, "sampler_name": "DDIM"}, "eta"),
        ({"refiner_checkpoint": "refiner.safetensors"}, "refiner_checkpoint"),
        ({"sampler_name": "PLMS"}, "sampler_name"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
        ({"override_settings": {"sd_vae": "other.vae.safetensors"}}, "sd_vae"),
        ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, "sd_model_checkpoint"),
        ({"override_settings": {"sd_model_checkpoint": ["a list"]}}, "sd_model_checkpoint"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 13}}, "CLIP_stop_at_last_layers"),
        ({"override_settings": {"uni_pc_order": 2}}, "uni_pc_order"),
        ({"colour": "red"}, "colour"),
        ({"width": 36}, "width"),
        ({"width": 72}, "width"),
        ({"height": 0}, "height"),
        ({"steps": 7}, "steps"),
        ({"cfg_scale": 25}, "cfg_scale"),
        ({"batch_size": 5}, "batch_size"),
        ({"batch_size": 2, "n_iter": 3}, "n_iter"),
        ({"seed": -2}, "seed"),
        ({"seed": MAX_SEED, "batch_size": 2}, "seed"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "a (cat:1.2)"}, "prompt"),
        ({"prompt": "<lora:style:0.8> a cat"}, "prompt"),
        ({"prompt": "cat " * 80}, "prompt"),
        ({"negative_prompt": "[blurry]"}, "negative_prompt"),
    ],
)
def test_txt2img_refuses_what_would_change_the_image(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/sdapi/v1/txt2img", json=OK | body)
    assert r.status_code == 422, r.text
    assert field in [e["loc"][-1] for e in r.json()["detail"]], r.text


IMG = {**OK, "init_images": [b64png(picture())]}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": [b64png(picture())] * 2}, "init_images"),
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
        ({"resize_mode": 1}, "resize_mode"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"denoising_strength": 0.5, "steps": 1}, "denoising_strength"),  # keeps no step
        ({"mask": b64png(mask_image())}, "mask_blur_x"),  # the web UI blurs masks by 4 px by default
        ({"mask": b64png(mask_image()), "mask_blur": 0, "inpaint_full_res": False}, "inpainting_fill"),
        ({"mask": "%%%", "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1}, "mask"),
        ({"latent_mask": b64png(mask_image())}, "latent_mask"),
        ({"initial_noise_multiplier": 0.5}, "initial_noise_multiplier"),
    ],
)
def test_img2img_refuses_what_would_change_the_image(client: TestClient, body: dict, field: str) -> None:
    r = client.post("/sdapi/v1/img2img", json=IMG | body)
    assert r.status_code == 422, r.text
    assert field in [e["loc"][-1] for e in r.json()["detail"]], r.text


def test_input_images_are_bounded_in_pixels(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdpipe.serve import batching

    monkeypatch.setattr(batching, "MAX_INPUT_PIXELS", SIZE * SIZE - 1)
    r = client.post("/sdapi/v1/img2img", json=IMG)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images"], r.text
    assert "at most 1023" in r.json()["detail"][0]["msg"]


def test_harmless_fields_are_accepted_and_schedulers_combine(client: TestClient) -> None:
    harmless = {"send_images": True, "save_images": True, "do_not_save_grid": True, "hr_scale": 4, "eta": 1.0}
    r = client.post("/sdapi/v1/txt2img", json=OK | harmless | {"sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert r.status_code == 200, r.text
    assert "Sampler: DPM++ 2M Karras" in json.loads(r.json()["info"])["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json=OK | {"send_images": False, "sampler_index": "Heun"})
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["sampler_name"] == "Heun"
    inverted = client.post(
        "/sdapi/v1/img2img",
        json=IMG
        | {"mask": b64png(mask_image()), "mask_blur": 0, "inpaint_full_res": False, "inpainting_fill": 1}
        | {"inpainting_mask_invert": 1, "steps": 2, "denoising_strength": 1.0},
    )
    assert inverted.status_code == 200, inverted.text
    r = client.post("/sdapi/v1/options", json={"sd_vae": "None", "samples_save": True, "enable_pnginfo": False})
    assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [["body", "enable_pnginfo"]]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_keys_bearer_or_basic(sd1_pipeline: Path) -> None:
    with TestClient(create_app(lambda: sd1_pipeline, settings(), api_keys=["k3y"])) as c:
        wait_ready(c)
        assert c.post("/sdapi/v1/txt2img", json=OK).status_code == 401
        assert c.post("/sdapi/v1/txt2img", json=OK, auth=("user", "wrong")).status_code == 401
        assert c.post("/sdapi/v1/options", json={}).status_code == 401
        assert c.post("/sdapi/v1/txt2img", json=OK, auth=("anyone", "k3y")).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json=OK, headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert c.get("/sdapi/v1/samplers").status_code == 200 and c.get("/sdapi/v1/sd-models").status_code == 200
        metrics = c.get("/metrics").text
    assert 'sdpipe_http_requests_total{path="/sdapi/v1/txt2img",status="401"} 2.0' in metrics


def test_a_full_queue_gets_429_on_the_web_ui_api(sd1_pipeline: Path, held_worker: Hold) -> None:  # noqa: F811
    from concurrent.futures import ThreadPoolExecutor

    app = create_app(lambda: sd1_pipeline, settings(max_batch=1, max_wait_ms=0, queue_size=1))
    with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
        wait_ready(c)
        first = pool.submit(c.post, "/sdapi/v1/txt2img", json=OK)
        assert held_worker.entered.wait(10)
        queued = pool.submit(c.post, "/v1/generate", json={"prompt": "x", "n": 1, "steps": 1, "width": SIZE})
        _wait_depth(app, 1)
        r = c.post("/sdapi/v1/txt2img", json=OK)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        held_worker.set()
        assert first.result(60).status_code == 200 and queued.result(60).status_code == 200


def test_a_pixel_space_model_is_named_on_the_web_ui_api(tmp_path: Path) -> None:
    from test_serve import make_model

    digits = make_model(tmp_path / "digits")
    with TestClient(create_app(lambda: digits, ServeSettings())) as c:
        wait_ready(c)
        r = c.post("/sdapi/v1/txt2img", json=OK)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
        assert "Euler a" not in {s["name"] for s in c.get("/sdapi/v1/samplers").json()}
        assert c.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "digits"


def test_openapi_fuzz_of_the_web_ui_api_never_5xx(api: webuiapi.WebUIApi) -> None:
    """schemathesis over the web-UI operations of the served SD model's OpenAPI spec: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from schemathesis.checks import not_a_server_error

    url = api.baseurl.removesuffix("/sdapi/v1")
    spec = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [r.ok() for r in spec.get_all_operations() if r.ok().path.startswith(("/sdapi/", "/v1/"))]
    assert {op.path for op in operations} >= {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
