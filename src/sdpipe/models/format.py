"""The model directory: diffusers' own layout, loadable by vanilla diffusers, plus `sdpipe.json`.

    MODEL/unet/{config.json, diffusion_pytorch_model.safetensors}
    MODEL/scheduler/scheduler_config.json      # the default sampler, configured as the model was trained
    MODEL/sdpipe.json                          # what diffusers has no field for (see `ModelMeta`)

Only safetensors and JSON are written; nothing is ever unpickled. Later stages add `vae/` and
`text_encoder/` subfolders the same way diffusers pipelines do, with `ModelMeta.components` naming them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.unets.unet_2d import UNet2DModel
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save as safetensors_bytes

from sdpipe.models.parts import PixelClassParts

FORMAT_VERSION = 1
MODEL_PARTS = ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler", "sdpipe.json")
# diffusers' from_pretrained builds the model under accelerate's init_empty_weights, which patches
# torch.nn.Module for the whole process: two loads in two threads at once can leave a model on the "meta"
# device, so loads (a server swapping models, a registry checking one) take turns
_LOAD_LOCK = threading.Lock()


class ModelMeta(BaseModel):
    """Contents of `sdpipe.json`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    components: list[str] = ["unet", "scheduler"]
    class_names: list[str] | None  # None for an unconditional model
    null_label: int | None  # index of the unconditional label (= len(class_names))
    image_size: int
    channels: int
    value_range: tuple[float, float]  # pixel range of the source data; generation writes it back
    dataset_id: str
    # content ids of the splits it was trained and judged on: {"train": ..., "test": ...} (the held-out part)
    splits: dict[str, str] | None = None
    preprocess: dict[str, Any] | None = None  # how training images were prepared (resize, crop, channels)
    weights_hash: str  # content hash of the UNet weights, as in samples.jsonl
    config: dict[str, Any]  # the full PipelineConfig it was trained with
    versions: dict[str, str]  # sdpipe, torch, diffusers


@dataclass
class LoadedModel:
    path: Path
    unet: UNet2DModel
    scheduler_config: dict[str, Any]
    meta: ModelMeta
    kind: str = "pixel-class"

    @property
    def parts(self) -> PixelClassParts:
        """The model as the generation path sees it (`sdpipe.sampling.generate.generate_items`)."""
        m = self.meta
        shape = (m.channels, m.image_size, m.image_size)
        return PixelClassParts(self.unet, self.scheduler_config, m.class_names, m.null_label, shape)

    @property
    def hash(self) -> str:
        return self.meta.weights_hash


def weights_hash(unet: torch.nn.Module) -> str:
    """A content hash of the weights: the same tensors give the same hash whatever the file layout."""
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(unet.state_dict().items())}
    return "sha256:" + hashlib.sha256(safetensors_bytes(state)).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import diffusers

    from sdpipe import __version__

    return {"sdpipe": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def umask() -> int:
    """The process's umask, read from /proc where there is one (setting it to read it would race other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_modes(tree: Path, folders: int, files: int) -> None:
    """Give `tree` and every folder in it the mode `folders`, every file `files`, both less the umask; deepest
    first, so that read-only folders are fine."""
    mask = umask()
    for path in [*sorted(tree.rglob("*"), key=lambda p: len(p.parts), reverse=True), tree]:
        path.chmod((folders if path.is_dir() else files) & ~mask)


def save_model(out: str | Path, unet: UNet2DModel, scheduler: ConfigMixin, meta: ModelMeta) -> Path:
    """Write the model directory atomically: built in a temporary sibling, then renamed into place, with the
    modes new folders and files get (0755 and 0644 under a 022 umask), not mkdtemp's 0700 or safetensors' 0600."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_config(tmp / "scheduler")  # what SchedulerMixin.save_pretrained does
        (tmp / "sdpipe.json").write_text(meta.model_dump_json(indent=2) + "\n")
        set_modes(tmp, 0o777, 0o666)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_problem(path: Path) -> str | None:
    """Why `path` is not a model directory (e.g. 'sdpipe.json is missing'); None if it is one."""
    if not path.is_dir():
        return "not a directory"
    for part in MODEL_PARTS:
        if not (path / part).exists():
            return f"{part} is missing"
    return None


def load_model(path: str | Path) -> LoadedModel:
    """Load a model directory written by `save_model`; errors say which part is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    problem = model_problem(path)
    if problem is not None:
        raise FileNotFoundError(f"{path} is not an sdpipe model: {problem}")
    meta = ModelMeta.model_validate_json((path / "sdpipe.json").read_text())
    with _LOAD_LOCK:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    unet.eval().requires_grad_(False)
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return LoadedModel(path, unet, sched_cfg, meta)
