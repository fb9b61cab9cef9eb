"""Model registry: immutable, numbered model versions with lineage, movable aliases and an append-only log.

    resolve("runs/demo/model")   -> that path (a path that exists is returned as is)
    resolve("digits@production") -> the stored folder of the version the alias points at
    resolve("digits:3"), resolve("digits"), resolve("digits@latest")  -> version 3; the highest version

`Registry` (in `core.py`) does the work; `sdpipe registry ...` (in `cli.py`) is its command line. Importing
this package is cheap: SQLAlchemy and torch are imported when first needed.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpipe.registry.names import Ref, RegistryError, parse_ref

if TYPE_CHECKING:
    from sdpipe.models import LoadedModel
    from sdpipe.registry.core import Registry
    from sdpipe.registry.records import AliasMove, Event, ModelSummary, Version

__all__ = [
    "AliasMove",
    "Event",
    "ModelSummary",
    "Ref",
    "Registry",
    "RegistryError",
    "Version",
    "load",
    "locate",
    "parse_ref",
    "resolve",
]


def resolve(ref: str | Path, url: str | None = None) -> Path:
    """A model folder from a path or a registry reference (`NAME`, `NAME@ALIAS`, `NAME:VERSION`).

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
        path = _registry_for(str(ref), url).path(parsed)
    except RegistryError as exc:
        if parsed.alias is None and parsed.version is None:  # a bare word may have been meant as a folder
            raise RegistryError(f"{ref!r} is not an existing path; {exc}") from None
        raise
    return path, f"{parsed.name}:{path.name}"  # the store's folders are NAME/VERSION


def load(ref: str | Path, url: str | None = None) -> LoadedModel:
    """Load a model from a path or a registry reference; a registry version's weights hash is checked."""
    if Path(ref).exists():
        _refuse_shadowing(str(ref), url)
        from sdpipe.models import load_model

        return load_model(ref)
    return _registry_for(str(ref), url).load(_parse(str(ref)))


def _refuse_shadowing(ref: str, url: str | None) -> None:
    """A path that is not an sdpipe model must not hide the registry's model of that name: say how to name it."""
    from sdpipe.models import model_problem

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
    raise AttributeError(f"module 'sdpipe.registry' has no attribute {name!r}")
