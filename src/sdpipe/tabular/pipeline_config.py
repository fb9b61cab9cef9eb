"""The config of a table training run, typed: `TablePipelineConfig` (`data`, `preprocess`, `model`, `train`).

A config is a table config when its `data.source` is `table` (after `--set` overrides); `load_train_config`
reads either kind from a YAML file and `--set key=value` overrides (the parsing of `sdpipe.config`), so
`sdpipe train` takes both. Anything unknown, mistyped or out of range is a `ConfigError` naming the key and
what is allowed there, before any row is read. See docs/table-models.md, "Commands".

RUN/config.yaml of a table run is the trainer's record (`sdpipe.tabular.train.run_config`, `kind: table`);
the full config, which `sdpipe train --out RUN --resume` continues with, is RUN/table_config.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdpipe.config import ConfigError, PipelineConfig, TrainConfig, config_tree, format_errors, validate_config
from sdpipe.tabular.config import TableDataConfig, TablePreprocessConfig
from sdpipe.tabular.model_config import TableModelConfig

TABLE_CONFIG_FILE = "table_config.yaml"  # RUN/table_config.yaml: the run's full TablePipelineConfig


class TablePipelineConfig(BaseModel):
    """Every setting of a table run: where the table is and how it was validated (`data`), how its columns
    are encoded (`preprocess`), the diffusion model (`model`) and its training (`train`, the shared trainer's
    section: the same defaults and checks as image runs)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: TableDataConfig = Field(default_factory=TableDataConfig)
    preprocess: TablePreprocessConfig = Field(default_factory=TablePreprocessConfig)
    model: TableModelConfig = Field(default_factory=TableModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def is_table_tree(tree: dict[str, Any]) -> bool:
    """Whether unchecked config sections are a table config (`data.source: table`)."""
    data = tree.get("data")
    return isinstance(data, dict) and data.get("source") == "table"


def validate_table_config(tree: dict[str, Any]) -> TablePipelineConfig:
    """`tree` as a `TablePipelineConfig`, or `ConfigError` with one `key: problem` line per error."""
    try:
        return TablePipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(
            format_errors(err, TablePipelineConfig).replace("configuration", "table configuration", 1)
        ) from None


def load_table_pipeline_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> TablePipelineConfig:
    """A table config from YAML (or `base`) and `dotted.key=value` overrides; `data.source` is `table`."""
    tree = config_tree(path, overrides, base=base)
    tree.setdefault("data", {})
    if isinstance(tree["data"], dict):
        tree["data"].setdefault("source", "table")
    return validate_table_config(tree)


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, run_dir: Path | None = None
) -> PipelineConfig | TablePipelineConfig:
    """What `sdpipe train` trains: a table config where `data.source` is `table`, else an image config
    (`sdpipe.config.load_config`). With `run_dir` (a resume without --config), the run's saved config is
    the start: a table run's RUN/table_config.yaml, an image run's RUN/config.yaml."""
    from sdpipe.train.run_dir import saved_run_config

    base = None
    if run_dir is not None and path is None:
        base = saved_run_config(run_dir)
        if base is not None and base.get("kind") == "table":
            base = saved_table_config(run_dir)
    tree = config_tree(path, overrides, base=base)
    return validate_table_config(tree) if is_table_tree(tree) else validate_config(tree)


def saved_table_config(run_dir: Path) -> dict[str, Any]:
    """RUN/table_config.yaml, unchecked; `ConfigError` when a table run's folder lacks it."""
    file = run_dir / TABLE_CONFIG_FILE
    if not file.is_file():
        raise ConfigError(f"{run_dir} is a table run without {TABLE_CONFIG_FILE}: resume it with --config FILE")
    loaded = yaml.safe_load(file.read_text())
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file}: not a mapping of sections; resume with --config FILE")
    return loaded


def write_table_config(run_dir: Path, cfg: TablePipelineConfig) -> Path:
    """RUN/table_config.yaml, replaced atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    file, tmp = run_dir / TABLE_CONFIG_FILE, run_dir / f".{TABLE_CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    os.replace(tmp, file)
    return file
