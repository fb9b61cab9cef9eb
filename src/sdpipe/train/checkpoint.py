"""Training checkpoints: safetensors for tensors, JSON for the rest, never pickle.

    RUN/checkpoints/step_000500/{model,ema,optimizer,rng}.safetensors + state.json
                                (+ loss_weighting.safetensors when the loss has learned weights)
    RUN/checkpoints/latest                      # name of the last complete checkpoint
    RUN/checkpoints/best                        # name of the best validation's checkpoint, if validating

A checkpoint is written under a temporary name and renamed into place, then `latest` is replaced
atomically, so a crash at any instant leaves the previous complete checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdpipe.models.format import set_modes


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[name] = value
    return tensors, scalars


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    loss_weighting: dict[str, torch.Tensor] | None = None,
    keep: int = 3,
    best: bool = False,
) -> Path:
    """Write a checkpoint atomically and point `latest` (and, with `best`, `best`) at it; keep the newest
    `keep` checkpoints plus the best one."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp_*"):  # half-written by a run that was killed; never pointed to
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
    opt_tensors, opt_rest = _flatten_optimizer(optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    if loss_weighting:
        tensors = {k: v.detach().cpu().contiguous() for k, v in loss_weighting.items()}
        save_file(tensors, str(tmp / "loss_weighting.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    set_modes(tmp, 0o777, 0o666)  # mkdtemp makes 0700; a checkpoint gets the usual modes, less the umask
    os.replace(tmp, final)
    for name in ("latest", "best") if best else ("latest",):
        pointer = root / f".{name}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / name)
    kept = {final, _pointed(root / "best")}
    older = sorted(p for p in root.glob("step_*") if p not in kept)  # zero-padded names sort by step
    for stale in older[: max(len(older) - (keep - 1), 0)]:  # keep the newest `keep`, this one included
        shutil.rmtree(stale, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # in the form of torch's Optimizer.state_dict()
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]  # the rest of state.json
    loss_weighting: dict[str, torch.Tensor]  # empty when the loss learns nothing


def _pointed(pointer: Path) -> Path | None:
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def latest_checkpoint(run_dir: Path, which: str = "latest") -> Path | None:
    """The last complete checkpoint of a run (`which="best"`: the best validation's), or None."""
    pointer = run_dir / "checkpoints" / which
    path = _pointed(pointer)
    if path is None:
        return None
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    state = json.loads((path / "state.json").read_text())
    opt_rest = state.pop("optimizer")
    weighting = path / "loss_weighting.safetensors"
    opt_state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(path / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = tensor
    for idx, entry in opt_rest["state"].items():
        opt_state.setdefault(int(idx), {}).update(entry)
    return Checkpoint(
        step=state.pop("step"),
        path=path,
        model=load_file(str(path / "model.safetensors")),
        ema=load_file(str(path / "ema.safetensors")),
        optimizer={"state": opt_state, "param_groups": opt_rest["param_groups"]},
        rng=load_file(str(path / "rng.safetensors")),
        state=state,
        loss_weighting=load_file(str(weighting)) if weighting.is_file() else {},
    )
