"""Training a table diffusion model with the shared trainer, and the model folder it writes.

    out = train_table_model(train_rows, val_rows, pre, TableModelConfig(), train_cfg, "runs/t1")
    model = load_table_model("runs/t1/model")

RUN/ holds what every run does (config.yaml, metrics.jsonl, checkpoints/); RUN/model/ the finished model:
`denoiser/` (diffusers `save_pretrained`: config.json + safetensors, the EMA or best validation's weights),
`preprocess/` (the fitted `TablePreprocessor`), `table_model.json` (the `TableModelConfig`) and
`sdpipe.json` (`"kind": "table"`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdpipe.config import TrainConfig
from sdpipe.tabular.diffusion import TableDiffusion
from sdpipe.tabular.model import TableDenoiser
from sdpipe.tabular.model_config import TableModelConfig
from sdpipe.tabular.preprocess import EncodedTable, TablePreprocessor
from sdpipe.tabular.task import TableTask
from sdpipe.train.loop import start_run
from sdpipe.train.trainer import Trainer

KIND, FORMAT = "table", 1
META_FILE, CONFIG_FILE = "sdpipe.json", "table_model.json"


@dataclass
class TableModel:
    """A table model ready to generate: the denoiser (eval mode), its diffusion, the preprocessor."""

    denoiser: TableDenoiser
    config: TableModelConfig
    preprocessor: TablePreprocessor

    def __post_init__(self) -> None:
        self.diffusion = TableDiffusion(self.config, self.preprocessor.numeric_width, self.preprocessor.category_sizes)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> TableModel:
        self.denoiser.to(torch.device(device))  # type: ignore[arg-type]
        return self


@dataclass
class TableTrainResult:
    model: TableModel
    path: Path  # RUN/model
    history: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    best_step: int | None = None
    stopped_early: bool = False


def run_config(model_cfg: TableModelConfig, train_cfg: TrainConfig, train: EncodedTable) -> dict[str, Any]:
    """The run's config as checkpoints store it (and compare on resume): both sections and the layout."""
    return {
        "kind": KIND,
        "table_model": model_cfg.model_dump(mode="json"),
        "train": train_cfg.model_dump(mode="json"),
        "table": {
            "rows": train.rows,
            "numeric_width": int(train.numeric.shape[1]),
            "category_sizes": list(train.category_sizes),
        },
    }


def train_table_model(
    encoded_train: EncodedTable,
    encoded_val: EncodedTable | None,
    preprocessor: TablePreprocessor,
    model_cfg: TableModelConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
) -> TableTrainResult:
    """Train on `encoded_train` with the shared `Trainer` (bitwise resume, NaN skip and rollback, EMA, and,
    with `encoded_val` and `train.validate_every`, validation, early stopping and the best weights), then
    save RUN/model (module docstring)."""
    run_dir = Path(run_dir)
    if list(encoded_train.category_sizes) != preprocessor.category_sizes:
        raise ValueError("encoded_train was not encoded by this preprocessor (its category sizes differ)")
    accelerator, gen = start_run(train_cfg, run_dir, resume)
    task = TableTask(model_cfg, train_cfg, encoded_train, gen, encoded_val)
    trainer = Trainer(train_cfg, run_config(model_cfg, train_cfg, encoded_train), run_dir, task, accelerator, gen)
    out = trainer.run(resume, progress)
    denoiser = out.module
    assert isinstance(denoiser, TableDenoiser)
    model = TableModel(denoiser, model_cfg, preprocessor)
    path = run_dir / "model"
    if accelerator.is_main_process:
        save_table_model(model, path, {"best_step": out.best_step, "steps": len(out.history)})
    accelerator.wait_for_everyone()
    return TableTrainResult(model, path, out.history, out.events, out.seconds, out.best_step, out.stopped_early)


def save_table_model(model: TableModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a model folder (module docstring); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.denoiser.save_pretrained(path / "denoiser")
    model.preprocessor.save(path / "preprocess")
    (path / CONFIG_FILE).write_text(json.dumps(model.config.model_dump(mode="json"), indent=1) + "\n")
    meta = {"kind": KIND, "format": FORMAT, "categorical": model.config.categorical, **(extra or {})}
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_table_model(path: str | Path, device: torch.device | str = "cpu") -> TableModel:
    """The model a folder written by `save_table_model` holds, on `device`, in eval mode."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {META_FILE}; not a model folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: a model of kind {meta.get('kind')!r}, not a table model")
    cfg = TableModelConfig.model_validate_json((path / CONFIG_FILE).read_text())
    denoiser = TableDenoiser.from_pretrained(path / "denoiser")
    assert isinstance(denoiser, TableDenoiser)
    denoiser.eval().requires_grad_(False)
    return TableModel(denoiser, cfg, TablePreprocessor.load(path / "preprocess")).to(device)
