"""Model registry: immutable, numbered model versions with lineage, movable aliases and an append-only log.

    resolve("runs/demo/model")   -> that path (a path that exists is returned as is)
    resolve("digits@production") -> the stored folder of the version the alias points at
    resolve("digits:3"), resolve("digits"), resolve("digits@latest")  -> version 3; the highest version
    load("sd15@production")      -> a LoadedPipeline (Stable Diffusion) or LoadedModel (pixel-space), checked
    resolve_lora("style@prod")   -> RegisteredLora(path of the stored .safetensors, version with its base)
    fits(lora_version, base_hash, base_architecture) -> None, a warning text, or RegistryError

`Registry` (in `core.py`) does the work; `sdpipe registry ...` (in `cli.py`) is its command line; `loras.py`
is about LoRAs and their bases. Importing this package is cheap: SQLAlchemy and torch are imported when first
needed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpipe.registry.names import Ref, RegistryError, parse_ref

if TYPE_CHECKING:
    from sdpipe.models import LoadedModel
    from sdpipe.models.kinds import AnyModel
    from sdpipe.registry.core import Registry
    from sdpipe.registry.loras import RegisteredLora
    from sdpipe.registry.records import AliasMove, Event, ModelSummary, Version

__all__ = [
    "AliasMove",
    "Event",
    "ModelSummary",
    "Ref",
    "RegisteredLora",
    "Registry",
    "RegistryError",
    "Version",
    "fits",
    "load",
    "load_pixel",
    "locate",
    "lora_path",
    "parse_ref",
    "resolve",
    "resolve_lora",
]


def resolve(ref: str | Path, url: str | None = None) -> Path:
    """A model from a path or a registry reference (`NAME`, `NAME@ALIAS`, `NAME:VERSION`): its folder, or
    the file itself for a single-file checkpoint or a LoRA.

    A path that exists is returned unchanged, unless it is not an sdpipe model while the registry has a model
    of that name: that is an error saying how to name the registry's model. Otherwise `ref` is looked up in
    the registry at `url` (default: `SDPIPE_REGISTRY_URL`, else `$SDPIPE_HOME/registry/registry.db`): bare
    `NAME` and `NAME@latest` mean the highest version. Raises RegistryError, naming what exists, for anything
    unknown. Cheap enough to call on every request: the registry connection is reused, and it is one small query.
    """
    return locate(ref, url)[0]


def locate(ref: str | Path, url: str | None = None) -> tuple[Path, str | None]:
    """`resolve`, and the exact version (`NAME:VERSION`) a registry reference names now, None for a folder:
    what to `load` so that the model loaded is the one resolved, wherever its alias has moved since."""
    if Path(ref).exists():
        _refuse_shadowing(str(ref), url)
        return Path(ref), None
    parsed = _parse(str(ref))
    try:
        path, number = _registry_for(str(ref), url).locate(parsed)
    except RegistryError as exc:
        if parsed.alias is None and parsed.version is None:  # a bare word may have been meant as a folder
            raise RegistryError(f"{ref!r} is not an existing path; {exc}") from None
        raise
    return path, f"{parsed.name}:{number}"


def load(
    ref: str | Path,
    url: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    config: str | None = None,
) -> AnyModel:
    """Load a model from a path or a registry reference: a pixel-space model (LoadedModel) or a Stable
    Diffusion folder or single file (LoadedPipeline; `config` is a single file's, as `load_any` takes it).
    A registry version is checked against what was recorded at registration (see `Registry.load`)."""
    path = Path(ref)
    if path.exists():
        _refuse_shadowing(str(ref), url)
        if _sd_path(path):
            from sdpipe.models.kinds import load_any

            return load_any(path, device, dtype, config)
        from sdpipe.models import load_model
        from sdpipe.registry.core import _pixel_dtype, _pixel_on

        _pixel_dtype(dtype)
        return _pixel_on(load_model(ref), device, dtype)
    return _registry_for(str(ref), url).load(_parse(str(ref)), device=device, dtype=dtype, config=config)


def load_pixel(ref: str | Path, url: str | None = None) -> LoadedModel:
    """`load` for what takes sdpipe's pixel-space models only (evaluate): anything else is refused before
    it is loaded, naming what it is."""
    path = Path(ref)
    if path.exists() and _sd_path(path):
        raise RegistryError(f"{ref} is a Stable Diffusion model file or folder; this takes sdpipe's pixel-space models")
    if path.exists():
        loaded = load(ref, url)
    else:
        registry = _registry_for(str(ref), url)
        version = registry.show(_parse(str(ref)))
        if version.kind != "pixel-class":
            raise RegistryError(
                f"{ref} is {version.ref}, a {version.kind} ({version.architecture}); this takes sdpipe's "
                "pixel-space models"
            )
        loaded = registry.load(version.ref)  # the version just looked at, wherever an alias moves meanwhile
    from sdpipe.models import LoadedModel

    assert isinstance(loaded, LoadedModel)
    return loaded


def resolve_lora(ref: str, url: str | None = None, *, check: bool = True) -> RegisteredLora:
    """A registered LoRA (`NAME@ALIAS`, `NAME:VERSION`, `NAME`): its stored .safetensors file, its version, and
    the base it was made for (`.base_hash`, `.base_architecture`, `.fits(base_hash, base_architecture)`). Its
    stored file's content hash is checked (unless `check` is False); a version that is not a LoRA is refused,
    naming its kind."""
    return _registry_for(ref, url).resolve_lora(_parse(ref), check=check)


def lora_path(ref: str, url: str | None = None) -> Path:
    """`resolve_lora(ref).path`: the `resolve` hook of `--lora NAME@ALIAS` (checked as `resolve_lora` does)."""
    return resolve_lora(ref, url).path


def fits(
    lora: Version | RegisteredLora,
    base_hash: str | None,
    base_architecture: str | None,
    base_path: str | Path | None = None,
) -> str | None:
    """Whether a registered LoRA fits a base: RegistryError naming both when the architectures differ, a
    warning text when only the base's hash differs from the recorded one, else None (`registry.loras.fits`)."""
    from sdpipe.registry import loras

    version = lora.version if isinstance(lora, loras.RegisteredLora) else lora
    return loras.fits(version, base_hash, base_architecture, base_path)


def _sd_path(path: Path) -> bool:
    """A single file, a diffusers folder or a LoRA run's model: what `sdpipe.models.kinds.load_any` loads besides
    sdpipe's own pixel models."""
    from sdpipe.models.folders import lora_run  # reads a JSON file: no model library imported

    return path.is_file() or (path / "model_index.json").is_file() or lora_run(path) is not None


def _refuse_shadowing(ref: str, url: str | None) -> None:
    """A path that is not an sdpipe model must not hide the registry's model of that name: say how to name it."""
    from sdpipe.models import model_problem

    if _sd_path(Path(ref)):
        return
    problem = model_problem(Path(ref))
    if problem is None:
        return
    try:
        name = parse_ref(ref).name
        _registry_for(ref, url).path(Ref(name))
    except RegistryError:  # not a registry name, or no such model: loading the path says what is wrong
        return
    raise RegistryError(
        f"{ref!r} is a path here but not an sdpipe model ({problem}), and the registry has a model {name!r}: "
        f"to use that, name it {name}@latest, {name}@ALIAS or {name}:VERSION"
    )


def _parse(ref: str) -> Ref:
    try:
        return parse_ref(ref)
    except RegistryError as exc:
        raise RegistryError(f"{ref!r} is not an existing path, nor a registry reference: {exc}") from None


def _registry_for(ref: str, url: str | None) -> Registry:
    from sdpipe.registry.db import default_store, default_url, sqlite_file

    url = url or default_url()
    db_file = sqlite_file(url)
    if db_file is not None and not db_file.exists():  # never create an empty registry just to say "unknown"
        _parse(ref)
        raise RegistryError(f"there is no registry at {db_file} yet, so {ref!r} names no registered model")
    return _cached_registry(url, str(default_store(url)))


@functools.lru_cache(maxsize=16)
def _cached_registry(url: str, store: str) -> Registry:
    from sdpipe.registry.core import Registry

    return Registry(url, store)


def __getattr__(name: str) -> Any:  # the classes, imported on first use
    if name == "Registry":
        from sdpipe.registry.core import Registry

        return Registry
    if name in ("AliasMove", "Event", "ModelSummary", "Version"):
        from sdpipe.registry import records

        return getattr(records, name)
    if name == "RegisteredLora":
        from sdpipe.registry.loras import RegisteredLora

        return RegisteredLora
    raise AttributeError(f"module 'sdpipe.registry' has no attribute {name!r}")
