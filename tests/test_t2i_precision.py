"""bf16 autocast and gradient checkpointing on the text-to-image path: checkpointing is really on (UNet and text
encoder) and changes no weight; bf16 autocast really runs (the weights differ from float32's) and the run stays
finite, its saved weights in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdpipe.data import open_split
from sdpipe.train.t2i_run import train_text_to_image
from test_t2i_text_encoder import captioned  # noqa: F401  (the fixture)
from test_t2i_train import _config, _weights

pytestmark = pytest.mark.usefixtures("offline", "one_torch_thread")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_is_on_and_changes_nothing(
    method: str,
    captioned: tuple[Path, Path],  # noqa: F811
    sd1_pipeline: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sdpipe.train.t2i import TextToImageTask

    seen: list[bool] = []
    loss = TextToImageTask.loss

    def recording(self: TextToImageTask, objective: object, model: torch.nn.Module, batch: object) -> object:
        seen.append(bool(model.unet.is_gradient_checkpointing and model.text_encoders[0].is_gradient_checkpointing))
        return loss(self, objective, model, batch)

    monkeypatch.setattr(TextToImageTask, "loss", recording)
    runs = []
    for on in (False, True):
        cfg = _config(
            *captioned, sd1_pipeline, tmp_path / "cache", f"train.method={method}", "train.train_text_encoder=true",
            f"train.gradient_checkpointing={str(on).lower()}", "train.steps=3",
        )  # fmt: skip
        runs.append(_weights(train_text_to_image(cfg, open_split(cfg.data), tmp_path / f"gc{on}").outcome.module))
    assert seen[:3] == [False] * 3 and seen[3:] == [True] * 3
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_bf16_autocast_runs_and_saves_float32(
    captioned: tuple[Path, Path],  # noqa: F811
    sd1_pipeline: Path,
    tmp_path: Path,
) -> None:
    from accelerate.state import AcceleratorState

    results = []
    for precision in ([], ["train.mixed_precision=bf16"]):  # the default is "no"
        cfg = _config(*captioned, sd1_pipeline, tmp_path / "cache", "train.method=full", "train.steps=3", *precision)
        AcceleratorState._reset_state()  # accelerate keeps one precision per process; this test trains two
        try:
            results.append(train_text_to_image(cfg, open_split(cfg.data), tmp_path / f"p{len(precision)}"))
        finally:
            AcceleratorState._reset_state()
    plain, bf16 = (_weights(r.outcome.module) for r in results)
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert any(not torch.equal(plain[k], bf16[k]) for k in plain)  # autocast really ran in bf16
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in results[1].outcome.history)
    from sdpipe.models.pipelines import load_pipeline

    saved = load_pipeline(results[1].model_dir).pipe.unet
    assert next(saved.parameters()).dtype == torch.float32
