"""Which kind of model a path holds, and the loader for it: one entry point, `load_any`.

The kind comes from `sdpipe.models.files.identify`, which reads only JSON and safetensors headers and refuses
what sdpipe cannot load (pickles, LoRA or VAE files given as a model, truncated files) with a message naming
what it found and what was expected. Then:

| kind | loaded with |
|---|---|
| `pixel-class` | `models.format.load_model` (sdpipe's own digits-style models) |
| `sd-pipeline` | `<model_index.json's class>.from_pretrained(local_files_only=True)` |
| `sd-single-file` | `from_single_file(config=<a shipped config folder>, local_files_only=True)`: never a download |
| `table` | not here: a table model makes rows, not images; `sdpipe.tabular.commands` loads it (`LoadedTable`) |
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdpipe.models.format import LoadedModel, load_model
from sdpipe.models.pipelines import _LOAD_LOCK, LoadedPipeline, align_weights, dtype_of, load_pipeline, pipeline_sha256

AnyModel = LoadedModel | LoadedPipeline

# a single file's architecture -> (pipeline class, shipped config folder)
SINGLE_FILE = {
    "sd1": ("StableDiffusionPipeline", "sd15"),
    "sd1-inpaint": ("StableDiffusionInpaintPipeline", "sd15-inpaint"),
    "sd2": ("StableDiffusionPipeline", "sd2-v"),  # diffusers' own choice for a v2 file; --config sd2-base else
    "sd2-inpaint": ("StableDiffusionInpaintPipeline", "sd2-inpaint"),
    "sdxl": ("StableDiffusionXLPipeline", "sdxl-base"),
    "sdxl-inpaint": ("StableDiffusionXLInpaintPipeline", "sdxl-inpaint"),
}


def load_any(path: str | Path, device: str = "cpu", dtype: str = "float32", config: str | None = None) -> AnyModel:
    """The model at `path`, whatever its kind; `config` (a shipped name such as sd2-base, or a local diffusers
    folder) overrides the config a single file is loaded with. Raises ModelFileError (a ValueError) naming what
    the path holds when it is not a model sdpipe loads."""
    from sdpipe.models.files import identify

    path = Path(path)
    from sdpipe.tabular.commands import is_table_model

    if is_table_model(path):  # rows, not images: the table commands load it (sdpipe.tabular.commands)
        raise ValueError(
            f"{path} is a table model: it makes rows (sdpipe generate --out FILE.csv, sdpipe impute, sdpipe serve), "
            "not images"
        )
    from sdpipe.models.folders import lora_run

    run_lora = lora_run(path)
    if run_lora is not None:  # a LoRA training run's model: its base, with the LoRA on every image
        from sdpipe.models.lora import lora_ref

        base, lora = run_lora
        loaded = load_any(base, device, dtype, config)
        if not isinstance(loaded, LoadedPipeline):
            raise ValueError(f"{path}: its base {base} is not a Stable Diffusion model")
        loaded.default_loras = (lora_ref(lora),)
        return loaded
    found = identify(path, with_hash=False)
    if found.kind == "pixel-class":
        if dtype != "float32":
            raise ValueError(f"--dtype {dtype}: sdpipe's pixel-space models sample in float32")
        model = load_model(path)
        torch.nn.Module.to(model.unet, torch.device(device))
        return model
    if found.kind == "sd-pipeline":
        return load_pipeline(path, device, dtype)
    if found.kind == "sd-single-file":
        return load_single_file(path, found.architecture, device, dtype, config)
    raise ValueError(f"{path} is a {found.kind}, which sdpipe cannot sample from yet")


def single_file_config(architecture: str, config: str | None) -> tuple[str, Path]:
    """The pipeline class and local config folder for a single file of `architecture`."""
    from sdpipe.models.single_file_configs import CONFIG_NAMES, config_folder

    if architecture not in SINGLE_FILE:
        raise ValueError(f"a {architecture} single file is not supported; sdpipe loads {', '.join(SINGLE_FILE)}")
    cls, name = SINGLE_FILE[architecture]
    if config is None:
        return cls, config_folder(name)
    if config in CONFIG_NAMES:
        return cls, config_folder(config)
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"--config {config}: neither a shipped config ({', '.join(CONFIG_NAMES)}) nor a diffusers folder with "
            "model_index.json"
        )
    return cls, folder


def load_single_file(
    path: Path, architecture: str, device: str = "cpu", dtype: str = "float32", config: str | None = None
) -> LoadedPipeline:
    """A web-UI `.safetensors` checkpoint through diffusers' `from_single_file`, with a local `config=` folder
    (without one diffusers downloads configs, even with `local_files_only=True`)."""
    import diffusers

    cls_name, folder = single_file_config(architecture, config)
    cls = getattr(diffusers, cls_name)
    extra = {"safety_checker": None} if "safety_checker" in cls._optional_components else {}
    try:
        with _LOAD_LOCK:
            pipe = cls.from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype_of(dtype), **extra
            )
    except ValueError as exc:
        if "expected shape" not in str(exc):
            raise
        raise ValueError(
            f"{path} looks like a {architecture} checkpoint, but its weights do not fit the config it was loaded with "
            f"({folder.name}): {str(exc).split(' If you want')[0]}; pass --config with the right one "
            "(sd15, sd2-v, sd2-base, sdxl-base, ...) or a diffusers folder of the same architecture"
        ) from None
    missing = [  # diffusers leaves weights it did not find on the meta device, with only a log line
        name
        for name, part in pipe.components.items()
        if isinstance(part, torch.nn.Module) and any(p.device.type == "meta" for p in part.parameters())
    ]
    if missing:
        raise ValueError(f"{path}: the weights of {', '.join(missing)} are not in the file (config {folder})")
    pipe.to(torch.device(device))
    align_weights(pipe)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(path, pipe, "sha256:" + pipeline_sha256(path)[:16], kind="sd-single-file")
