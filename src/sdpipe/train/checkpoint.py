"""Training checkpoints: safetensors for tensors, JSON for the rest, never pickle.

    RUN/checkpoints/step_000500/{model,ema,optimizer,rng}.safetensors + state.json
    RUN/checkpoints/latest                      # name of the last complete checkpoint

A checkpoint is written under a temporary name and renamed into place, then `latest` is replaced
atomically, so a crash at any instant leaves the previous complete checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    keep: int = 3,
) -> Path:
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp_", dir=root))
    opt_tensors, opt_rest = _flatten_optimizer(optimizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    older = sorted(p for p in root.glob("step_*") if p != final)  # zero-padded names sort by step
    for stale in older[: max(len(older) - (keep - 1), 0)]:  # keep the newest `keep`, this one included
        shutil.rmtree(stale, ignore_errors=True)
    return final
