"""The shapes demo end to end on a tiny budget (every stage runs and writes its files; the judge's groups are
all there), its VAE trained by the shared trainer (resumes bitwise, learns), and its components folder a plain
diffusers pipeline. The demo's quality figures are measured by `sdpipe demo shapes` itself (README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdpipe.demo_shapes import ShapesBudget, run_shapes_demo, vae_config

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")
TINY = ShapesBudget(
    n_train=160, n_test=32, vae_steps=4, unet_steps=4, batch_size=8, prompts_per_group=4, sample_steps=2
)


def test_tiny_demo_writes_every_stage_and_judges_every_group(tmp_path: Path) -> None:
    metrics = run_shapes_demo(tmp_path / "demo", TINY, show_progress=False)
    for name in ("metrics.json", "report.html", "samples.png", "run/model/model_index.json", "components/vae"):
        assert (tmp_path / "demo" / name).exists(), name
    assert set(metrics["judge"]) == {"single/seen", "single/held_out", "relation/seen", "relation/held_out", "overall"}
    assert all(g["n"] == 4 for k, g in metrics["judge"].items() if k != "overall")
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["budget"]["unet_steps"] == 4
    assert "single/held_out" in (tmp_path / "demo" / "report.html").read_text()


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
    cfg = vae_config(tmp_path, budget).model_copy(deep=True)
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
