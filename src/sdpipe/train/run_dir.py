"""The run folder: one run per folder, its config saved beside it, and what a resume may change.

    RUN/config.yaml       the run's full config, written when it starts (`sdpipe train --resume` reads it)
    RUN/metrics.jsonl     see sdpipe.train.metrics
    RUN/checkpoints/      see sdpipe.train.checkpoint
    RUN/model/, RUN/report.html, RUN/metrics.json, RUN/logs/, RUN/mlruns/   written by the pipeline, trackers
    RUN/vae/, RUN/components/   a text-to-image scratch run's own VAE run and components (train.components)

A new run never starts in a folder holding another run's files: it is refused, naming `--resume` and
`--overwrite`, and `--overwrite` removes those files (and nothing else) first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from sdpipe.train.checkpoint import latest_checkpoint

CONFIG_FILE = "config.yaml"
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "model", "report.html", "metrics.json", "logs", "mlruns")
# written just before a run starts (a table run's whole config, sdpipe.tabular.pipeline_config): removed by
# --overwrite with the run, but not by itself a run in the folder
SIDE_FILES = ("table_config.yaml",)
# a text-to-image scratch run's own components (train.components), made before the UNet's run starts in the same
# folder: removed by --overwrite with the rest; train.components refuses to reuse them unless resuming
COMPONENT_FILES = ("components", "vae", ".components.partial")
# settings a resumed run may change: they do not touch the trained weights (sampling defaults saved with the
# model, the demo's evaluation, trackers, the in-training evaluation hook)
RESUME_MAY_CHANGE = (
    "sample", "evaluate", "train.trackers", "train.eval_every", "train.eval_samples",
    "train.validation_prompts", "train.validation_prompt_every",  # rendering never touches the training
)  # fmt: skip


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and what to do."""


def run_files(run_dir: Path) -> list[str]:
    """The names of a run's files present in `run_dir` (with a killed save's leftover `.model.*` folders)."""
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    return found + sorted(p.name for p in run_dir.glob(".model.*"))


def check_new_run(run_dir: Path, resumable: bool = True) -> None:
    """Refuse to start a run where another one's files are (`resumable`: the command takes --resume)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file, not a folder")
    found = run_files(run_dir)
    if found:
        resume = "continue it with --resume, " if resumable else ""
        raise RunFolderError(
            f"{run_dir} holds a run already ({', '.join(found)}): {resume}"
            "replace it with --overwrite, or choose another folder"
        )


def check_resumable(run_dir: Path) -> None:
    """Refuse to resume from a folder that is missing or holds no run."""
    if not run_dir.is_dir():
        raise RunFolderError(f"--resume: there is no run folder {run_dir}; check the path, or start without --resume")
    if not ((run_dir / CONFIG_FILE).is_file() or (run_dir / "checkpoints" / "latest").is_file()):
        raise RunFolderError(
            f"--resume: {run_dir} holds no run (no {CONFIG_FILE}, no checkpoints/latest); start it without --resume"
        )


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, resumable: bool = True) -> None:
    """What `sdpipe train` and `demo` check before any work: a folder to resume, or one free for a new run
    (with `overwrite`, the old run's files are removed first)."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the folder, --overwrite replaces it: give one of them")
    if resume:
        check_resumable(run_dir)
        return
    if overwrite:
        remove_run(run_dir)
    check_new_run(run_dir, resumable)


# what `sdpipe demo shapes` and `shapes-lora` write into --out (their cache/ stays: it is keyed by content)
DEMO_OUTPUTS = ("data", "validated", "run", "metrics.json", "report.html", "samples.png", "samples_base.png",
                "samples_lora.png")  # fmt: skip


def claim_demo_dir(out: Path, overwrite: bool, base: Path | None = None) -> None:
    """A text-to-image demo's --out before any work: free of an earlier demo's outputs, or (with `overwrite`)
    cleared of them, anything else left alone. `base` (shapes-lora's --base) must be another folder."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    if base is not None and out.resolve() == base.resolve():
        raise RunFolderError(f"--out {out} is the --base folder: the fine-tune would replace its base; choose another")
    found = [name for name in DEMO_OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise RunFolderError(
            f"{out} holds an earlier demo's {', '.join(found)}: replace them with --overwrite, or choose another folder"
        )
    for name in found:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def own_components(run_dir: Path) -> list[str]:
    """Those of `COMPONENT_FILES` in `run_dir` that sdpipe made: a VAE run, a components pipeline, a partial one."""
    marks = {"components": "model_index.json", "vae": CONFIG_FILE, ".components.partial": ""}
    return [name for name in COMPONENT_FILES if (run_dir / name).is_dir() and (run_dir / name / marks[name]).exists()]


def remove_run(run_dir: Path) -> None:
    """Delete a run's files from `run_dir`, leaving anything else in it."""
    side = [name for name in SIDE_FILES if (run_dir / name).exists()]
    for name in [*run_files(run_dir), *own_components(run_dir), *side]:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # other processes of the run may be removing it too
        else:
            path.unlink(missing_ok=True)


def write_run_config(run_dir: Path, config: dict[str, Any]) -> None:
    """RUN/config.yaml, replaced atomically."""
    tmp = run_dir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, run_dir / CONFIG_FILE)


def saved_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run was started with: RUN/config.yaml, else the one in its last checkpoint; None if neither."""
    path = run_dir / CONFIG_FILE
    if path.is_file():
        loaded = yaml.safe_load(path.read_text())
        return loaded if isinstance(loaded, dict) else None
    found = latest_checkpoint(run_dir)
    if found is None:
        return None
    return json.loads((found / "state.json").read_text()).get("config")


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def check_same_training(saved: dict, current: dict, where: Path) -> None:
    """Resuming with other training settings would not give the run's weights: name what differs and stop."""
    differ = [d for d in _differences(saved, current) if not _may_change(d.split(" ", 1)[0])]
    if differ:
        raise ValueError(
            f"cannot resume from {where}: settings differ: {', '.join(differ)}; "
            "resume with the run's own config or start a new run"
        )
