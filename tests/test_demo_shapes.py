"""The shapes demo end to end on a tiny budget (every stage runs and writes its files; the judge's groups are
all there), its VAE trained by the shared trainer (resumes bitwise, learns), and its components folder a plain
diffusers pipeline. The demo's quality figures are measured by `sdpipe demo shapes` itself (README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdpipe.demo_shapes import ShapesBudget, run_shapes_demo, unet_config
from sdpipe.demo_shapes_lora import LoraBudget, base_model_of, compare, run_shapes_lora_demo

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
TINY = ShapesBudget(
    n_train=160, n_test=32, vae_steps=4, unet_steps=4, batch_size=8, prompts_per_group=4, sample_steps=2
)


TINY_LORA = LoraBudget(n_images=10, steps=3, batch_size=4, prompts_per_group=4, sample_steps=2, sets=2)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "demo"
    return out, run_shapes_demo(out, TINY, show_progress=False)


def test_tiny_demo_writes_every_stage_and_judges_every_group(tiny_demo: tuple[Path, dict], tmp_path: Path) -> None:
    demo, metrics = tiny_demo
    for name in ("metrics.json", "report.html", "samples.png", "run/model/model_index.json", "run/components/vae"):
        assert (demo / name).exists(), name
    assert set(metrics["judge"]) == {"single/seen", "single/held_out", "relation/seen", "relation/held_out", "overall"}
    assert all(g["n"] == 4 for k, g in metrics["judge"].items() if k != "overall")
    assert json.loads((demo / "metrics.json").read_text())["budget"]["unet_steps"] == 4
    assert "single/held_out" in (demo / "report.html").read_text()


def test_tiny_lora_demo_judges_every_group_before_and_after(tiny_demo: tuple[Path, dict], tmp_path: Path) -> None:
    demo, _ = tiny_demo
    metrics = run_shapes_lora_demo(demo, tmp_path / "lora", TINY_LORA, show_progress=False)
    run = tmp_path / "lora" / "run"
    assert (run / "lora.safetensors").is_file()
    assert json.loads((run / "model" / "sdpipe.json").read_text())["kind"] == "lora"
    assert metrics["base_model"] == str(demo / "run" / "model") and metrics["data"]["train"] == 10
    groups = ["single/seen", "single/held_out", "relation/seen", "relation/held_out", "single/new", "relation/new"]
    assert list(metrics["judge"]) == groups
    for g in metrics["judge"].values():
        assert g["n"] == 4 and len(g["change_points"]["values"]) == 2
        assert g["change_points"]["mean"] == pytest.approx(100 * (g["after"]["mean"] - g["before"]["mean"]))
    # the LoRA run's model samples with its LoRA: its images are not the base's
    base_png, lora_png = (tmp_path / "lora" / n for n in ("samples_base.png", "samples_lora.png"))
    assert base_png.read_bytes() != lora_png.read_bytes()


def test_compare_pairs_the_sets() -> None:
    import numpy as np

    class Judge:  # right when the image's single pixel is 1
        def correct(self, image: np.ndarray, caption: str) -> bool:
            return bool(image.flat[0])

    captions = ["a red circle"] * 4 + ["a red diamond"] * 4
    before = np.array([1, 1, 0, 0, 0, 0, 0, 0]).reshape(8, 1, 1, 1)
    after = np.array([1, 0, 0, 0, 1, 1, 1, 0]).reshape(8, 1, 1, 1)
    got = compare(Judge(), before, after, captions, sets=2)
    assert got["single/seen"]["before"]["values"] == [1.0, 0.0] and got["single/seen"]["after"]["values"] == [0.5, 0.0]
    assert got["single/seen"]["change_points"]["values"] == [-50.0, 0.0]
    assert got["single/new"]["change_points"]["values"] == [100.0, 50.0]


def test_lora_demo_refuses_a_base_that_is_no_demo(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sdpipe demo shapes --out"):
        base_model_of(tmp_path)


def test_demo_folder_is_refused_or_cleared_and_never_the_base(tmp_path: Path) -> None:
    """An earlier demo's outputs are refused without --overwrite and removed with it (other files and the
    content-keyed cache stay); shapes-lora refuses --out equal to --base before touching it."""
    from sdpipe.train.run_dir import RunFolderError, claim_demo_dir

    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "cache").mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="data, metrics.json: replace them with --overwrite"):
        claim_demo_dir(out, overwrite=False)
    with pytest.raises(RunFolderError, match="is the --base folder"):
        claim_demo_dir(out, overwrite=True, base=tmp_path / "." / "demo")
    assert (out / "data").exists()
    claim_demo_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["cache", "notes.txt"]
    claim_demo_dir(out, overwrite=False)  # nothing of a demo left: free


def test_vae_trains_with_the_shared_trainer_and_resumes_bitwise(tmp_path: Path) -> None:
    from sdpipe.data import open_split
    from sdpipe.data.shapes import write_folder
    from sdpipe.data.validate import validate
    from sdpipe.demo_shapes import reconstruction_error
    from sdpipe.models.components import small_vae
    from sdpipe.train.vae import train_vae

    class Interrupt(Exception):
        pass

    def stop(step: int, row: dict) -> None:
        if step == 5:
            raise Interrupt

    budget = ShapesBudget(n_train=96, n_test=8, vae_steps=8, batch_size=8)
    write_folder(tmp_path / "data", budget.n_train, budget.n_test)
    from sdpipe.train.components import vae_training_config

    cfg = vae_training_config(unet_config(tmp_path, budget))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every": 2})})
    validate(str(tmp_path / "data"), tmp_path / "validated", cfg.data)
    data = open_split(cfg.data)
    before = reconstruction_error(small_vae(), data)
    full = train_vae(cfg, small_vae(), data, tmp_path / "full")
    with pytest.raises(Interrupt):
        train_vae(cfg, small_vae(), data, tmp_path / "cut", progress=stop)
    resumed = train_vae(cfg, small_vae(), data, tmp_path / "cut", resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert reconstruction_error(full, data) < before


def test_components_folder_is_a_plain_diffusers_pipeline(tmp_path: Path) -> None:
    import diffusers

    from sdpipe.models.components import save_components, small_vae

    save_components(tmp_path / "c", small_vae())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "c", local_files_only=True)
    assert pipe.vae_scale_factor == 2 and pipe.tokenizer("a red circle").input_ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
