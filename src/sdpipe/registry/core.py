"""The `Registry`: immutable, numbered model versions with lineage, movable aliases, an append-only log.

Every write is one short transaction. Concurrent writers are kept apart by unique constraints, not locks:
two registrations that pick the same version number (or the same weights under one name) cannot both
commit; the loser retries with a fresh number (or returns the version the winner made). The model files
are copied before the transaction and renamed into place inside it (see `store.py`).

Besides sdpipe's own pixel-space models, a version can be a diffusers Stable Diffusion folder, a web-UI
single-file checkpoint or a LoRA file (`Version.kind`, as `sdpipe.models.files.identify` tells them); one
model name holds one of three families of them: pixel-space models, Stable Diffusion models, or LoRAs.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sdpipe.registry import loras
from sdpipe.registry import store as files
from sdpipe.registry.db import aliases, default_store, default_url, events, open_engine, versions
from sdpipe.registry.names import LATEST, Ref, RegistryError, check_alias, check_name, check_version, parse_ref
from sdpipe.registry.records import MODEL_KINDS, AliasMove, Event, ModelSummary, Version, current_user, now

if TYPE_CHECKING:
    from sdpipe.models import LoadedModel
    from sdpipe.models.files import Identity
    from sdpipe.models.kinds import AnyModel

T = TypeVar("T")
RETRIES = 30
# the families of kinds, one to a model name: its versions are interchangeable behind an alias
FAMILIES = {"pixel-class": "pixel-space", "sd-pipeline": "Stable Diffusion", "sd-single-file": "Stable Diffusion"}
FAMILIES["lora"] = "LoRA"
FAMILIES["table"] = "table"  # sdpipe.tabular's models (sdpipe.json "kind": "table")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]{0,190}\.safetensors")


class Registry:
    """A registry: a database (SQLAlchemy URL) plus a store folder for the model files."""

    def __init__(self, url: str | None = None, store: str | Path | None = None) -> None:
        self.url = url or default_url()
        self.store = Path(store) if store is not None else default_store(self.url)
        try:
            self.engine = open_engine(self.url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.DBAPIError) as exc:
            reason = getattr(exc, "orig", None) or exc  # the database's own words, without SQLAlchemy's wrapping
            raise RegistryError(f"cannot open the registry at {self.display_url}: {reason}") from None
        except ImportError as exc:  # a known database whose driver is not installed
            raise RegistryError(f"cannot open the registry at {self.display_url}: {exc} (install it)") from None

    @property
    def display_url(self) -> str:
        try:
            return make_url(self.url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return repr(self.url)

    # ----- writing -----

    def register(
        self, model_dir: str | Path, name: str, *, metrics: str | Path | None = None, base: str | Path | None = None
    ) -> Version:
        """Copy a model into the store as the next version of `name` (or return the version that already has
        these weights). An sdpipe model folder (lineage: dataset_id, config, metrics, library versions, git
        commit), a diffusers Stable Diffusion folder, a single-file .safetensors checkpoint, or a LoRA
        .safetensors file, whose `base` (a registry reference or a path) is the model it was made for (else its
        metadata says, or it is recorded as unknown; see `sdpipe.registry.loras`)."""
        check_name(name)
        model_dir = Path(model_dir)
        if model_dir.is_file() or (model_dir / "model_index.json").is_file():
            return self._register_sd(model_dir, name, metrics, base)
        if model_dir.is_dir() and (not (model_dir / "sdpipe.json").is_file() or _table_folder(model_dir)):
            return self._register_sd(model_dir, name, metrics, base)  # identify refuses it, saying what it is
        if base is not None:
            raise RegistryError(f"--base is for LoRA files; {model_dir} is not one")
        meta, weights = _checked_weights_hash(model_dir)
        existing = self._by_weights(name, weights)
        if existing is not None:
            self._log("register", name, existing.version, detail={"existing": True, "source": str(model_dir.resolve())})
            return existing
        self._check_family(name, "pixel-class")
        lineage = _lineage(model_dir, meta, metrics)
        source_hash = files.content_hash(model_dir)
        staged = files.stage_copy(model_dir, self.store)
        try:
            if files.content_hash(staged) != source_hash:
                raise RegistryError(f"{model_dir} changed while it was being copied; register it again")
            row: dict[str, Any] = {"name": name, "weights_hash": weights, "content_hash": source_hash}
            row["lineage"] = lineage
            row |= {"dataset_id": meta["dataset_id"], "kind": "pixel-class", "architecture": "unet2d"}
            row |= {"size_bytes": sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())}
            row |= {"stored_file": None, "base": None, "identity": None}
            return _retry(lambda: self._insert_version(row, staged), lambda: self._by_weights(name, weights))
        finally:
            files.remove_tree(staged)  # gone already unless the version was not recorded

    def _register_sd(self, source: Path, name: str, metrics: str | Path | None, base: str | Path | None) -> Version:
        """A diffusers folder, single-file checkpoint or LoRA, as `identify` tells them (and refuses others)."""
        from sdpipe.models.files import ModelFileError, identify, read_safetensors_header

        try:
            found = identify(source, allow_lora=True, with_hash=False)  # headers only: refusals come quickly
        except ModelFileError as exc:
            raise RegistryError(f"cannot register: {exc}") from None
        if found.kind != "lora" and base is not None:
            raise RegistryError(
                f"--base is for LoRA files; {source} is a {found.kind} model ({found.architecture}), not a LoRA"
            )
        if found.kind not in FAMILIES or found.kind == "pixel-class":
            raise RegistryError(f"cannot register {source}: a {found.kind} is not a model kind the registry holds")
        self._check_family(name, found.kind)
        architecture, base_record = found.architecture, None
        if found.kind == "lora":
            metadata = read_safetensors_header(source)[1]
            base_record = self._lora_base(source, found, base, metadata)
            if loras.family(architecture) is None:  # its keys do not say: what its base is
                architecture = loras.family(base_record.get("architecture")) or "unknown"
        stored_name = _stored_name(source) if source.is_file() else None
        # the content hash before identify hashes it, so that a change in between is seen below
        if stored_name is None:
            source_hash = files.content_hash(source)
        else:
            source_hash = files.file_content_hash(source, stored_name)
        identity = identify(source, allow_lora=True, with_hash=True)
        assert identity.sha256 is not None
        weights = "sha256:" + identity.sha256
        existing = self._by_weights(name, weights)
        if existing is not None:
            if base is not None and (existing.base or {}).get("hash") != (base_record or {}).get("hash"):
                raise RegistryError(
                    f"{source} is registered already, as {existing.ref}, with the base "
                    f"{loras.describe_base(existing.base)}; a version's base cannot change: register the LoRA "
                    f"under another name to record the base {loras.describe_base(base_record)}"
                )
            self._log("register", name, existing.version, detail={"existing": True, "source": str(source.resolve())})
            return existing
        lineage = _sd_lineage(source, metrics)
        if stored_name is None:
            staged = files.stage_copy(source, self.store)
        else:
            staged = files.stage_file(source, self.store, stored_name)
        try:
            if files.content_hash(staged) != source_hash:
                raise RegistryError(f"{source} changed while it was being copied; register it again")
            row: dict[str, Any] = {"name": name, "weights_hash": weights, "content_hash": source_hash}
            row["lineage"] = lineage
            row |= {"dataset_id": "", "kind": identity.kind, "architecture": architecture}
            row |= {"size_bytes": identity.size_bytes, "stored_file": stored_name, "base": base_record}
            row["identity"] = _identity_record(identity)
            return _retry(lambda: self._insert_version(row, staged), lambda: self._by_weights(name, weights))
        finally:
            files.remove_tree(staged)  # gone already unless the version was not recorded

    def _lora_base(
        self, source: Path, lora: Identity, base: str | Path | None, metadata: dict[str, str]
    ) -> dict[str, Any]:
        """The base record of a LoRA: from `base` (refusing one of another architecture), else its metadata."""
        if base is None:
            return loras.base_from_metadata(metadata, lora.architecture)
        record = self._base_record(str(base))
        made_for, given = loras.family(lora.architecture), loras.family(record["architecture"])
        if made_for is not None and given is not None and made_for != given:
            raise RegistryError(
                f"{source} is a LoRA for {made_for} ({lora.notes[2] if len(lora.notes) > 2 else 'by its keys'}), "
                f"and --base {base} is a {record['architecture']} model (sha256:{record['hash'][:16]}): it does not "
                "fit that base"
            )
        return record

    def _base_record(self, base: str) -> dict[str, Any]:
        """`--base`: a path to a model (hashed now), else a registry reference (its recorded sha256)."""
        from sdpipe.models.files import ModelFileError, identify

        path = Path(base)
        if path.exists():
            try:
                found = identify(path, with_hash=True)  # a LoRA is refused: it is nobody's base
            except ModelFileError as exc:
                raise RegistryError(f"--base {base}: {exc}") from None
            if found.kind not in ("sd-pipeline", "sd-single-file") or found.sha256 is None:
                raise RegistryError(f"--base {base} is a {found.kind} model, not a Stable Diffusion model")
            return loras.base_record(found.sha256, found.architecture, f"--base {path.resolve()}", path.name)
        try:
            ref = parse_ref(base)
        except RegistryError as exc:
            raise RegistryError(f"--base {base} is not an existing path, nor a registry reference: {exc}") from None
        version = self.show(ref)
        if version.kind not in ("sd-pipeline", "sd-single-file"):
            raise RegistryError(
                f"--base {base} is {version.ref}, a {version.kind} version, not a Stable Diffusion model"
            )
        return loras.base_record(version.weights_hash, version.architecture, f"--base {version.ref}", version.ref)

    def _check_family(self, name: str, kind: str, conn: sa.Connection | None = None) -> None:
        """Refuse a version of another family (pixel-space, Stable Diffusion, LoRA) than the name's others."""
        query = sa.select(versions.c.kind).where(versions.c.name == name).distinct()
        if conn is None:
            with self.engine.connect() as own:
                kinds = set(own.scalars(query))
        else:
            kinds = set(conn.scalars(query))
        others = sorted(k for k in kinds if FAMILIES.get(k) != FAMILIES[kind])
        if others:
            raise RegistryError(
                f"{name} holds {FAMILIES.get(others[0], others[0])} versions ({', '.join(others)}), and this is a "
                f"{kind}: register it under another name (one name, one family: an alias must always give the "
                "same kind of thing)"
            )

    def _insert_version(self, row: dict[str, Any], staged: Path) -> Version:
        name, placed = row["name"], None
        try:
            with self.engine.begin() as conn:
                latest = conn.scalar(sa.select(sa.func.max(versions.c.version)).where(versions.c.name == name))
                number = (latest or 0) + 1
                self._check_family(name, row["kind"], conn)  # again: another kind may have been registered since
                stamp, user = now(), current_user()
                conn.execute(versions.insert().values(**row, version=number, created_at=stamp, user=user))
                detail = {"source": row["lineage"]["source"]}
                if row["kind"] != "pixel-class":
                    detail["kind"] = row["kind"]
                self._log("register", name, number, conn=conn, detail=detail)
                final = self.store / name / str(number)
                files.remove_tree(final)  # left by a process killed before its commit; the number is ours now
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                placed = final
                files.make_readonly(final)
        except BaseException:
            if placed is not None:  # renamed, but the transaction did not commit: back to incoming
                placed.chmod(0o700)
                os.replace(placed, staged)
            raise
        return Version(path=final, version=number, created_at=stamp, user=user, **row)

    def alias(self, name: str, alias: str, version: int | str) -> AliasMove:
        """Point `NAME@ALIAS` at a version (creating the alias if needed)."""
        check_name(name)
        check_alias(alias, settable=True)
        number = check_version(version)
        return _retry(lambda: self._move_alias(name, alias, number))

    def _move_alias(self, name: str, alias: str, number: int) -> AliasMove:
        with self.engine.begin() as conn:
            self._version_row(conn, Ref(name, version=number))
            current = _alias_target(conn, name, alias)
            if current == number:
                return AliasMove(name, alias, number, current, changed=False)
            _set_alias(conn, name, alias, number, current)
            self._log("alias", name, number, alias=alias, previous=current, conn=conn)
        return AliasMove(name, alias, number, current)

    def rollback(self, name: str, alias: str) -> AliasMove:
        """Move `NAME@ALIAS` back to the version it pointed to before its current one (repeatable)."""
        check_name(name)
        check_alias(alias, settable=True)
        return _retry(lambda: self._rollback(name, alias))

    def _rollback(self, name: str, alias: str) -> AliasMove:
        with self.engine.begin() as conn:
            current = _alias_target(conn, name, alias)
            if current is None:
                raise self._unknown(conn, Ref(name, alias=alias))
            targets = _alias_stack(conn, name, alias)
            if len(targets) < 2:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to (it is at {current})")
            target = targets[-2]
            _set_alias(conn, name, alias, target, current)
            self._log("rollback", name, target, alias=alias, previous=current, conn=conn)
        return AliasMove(name, alias, target, current)

    def _log(
        self,
        action: str,
        name: str,
        version: int,
        *,
        alias: str | None = None,
        previous: int | None = None,
        detail: dict[str, Any] | None = None,
        conn: sa.Connection | None = None,
    ) -> None:
        row = {"time": now(), "user": current_user(), "action": action, "name": name, "alias": alias}
        statement = events.insert().values(**row, version=version, previous=previous, detail=detail or {})
        if conn is not None:
            conn.execute(statement)
            return
        with self.engine.begin() as own:
            own.execute(statement)

    # ----- reading -----

    def path(self, ref: str | Ref) -> Path:
        """The stored model of `NAME`, `NAME@ALIAS` or `NAME:VERSION` (one small query): its directory, or the
        file in it for a single-file checkpoint or a LoRA."""
        return self.locate(ref)[0]

    def locate(self, ref: str | Ref) -> tuple[Path, int]:
        """`path`, and the version number the reference names now."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.engine.connect() as conn:
            found = conn.execute(_locate_query(ref)).first()
            if found is None:
                raise self._unknown(conn, ref)
        number, stored_file = found[0], found[1]
        folder = self.store / ref.name / str(number)
        return self._stored(ref, number, folder if stored_file is None else folder / stored_file), number

    def _stored(self, ref: str | Ref, number: int, path: Path) -> Path:
        if not path.exists():
            raise RegistryError(
                f"{ref} is version {number}, but {path} is missing: is this the registry's store? "
                "(set SDPIPE_REGISTRY_STORE or --store to the folder its models were registered into)"
            )
        return path

    def show(self, ref: str | Ref) -> Version:
        """A version with its lineage and the aliases pointing at it."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.engine.connect() as conn:
            return self._version(conn, self._version_row(conn, ref))

    def list(self) -> list[ModelSummary]:
        """Every model name with its number of versions, latest version (and its kind) and aliases."""
        columns = (versions.c.name, versions.c.version, versions.c.kind, versions.c.architecture)
        found: dict[str, ModelSummary] = {}
        with self.engine.connect() as conn:
            for name, number, kind, architecture in conn.execute(sa.select(*columns).order_by(*columns[:2])):
                seen = found.setdefault(name, ModelSummary(name, 0, number, {}))
                seen.versions += 1
                seen.latest, seen.kind, seen.architecture = number, kind, architecture
            for name, alias, number in conn.execute(sa.select(aliases.c.name, aliases.c.alias, aliases.c.version)):
                found[name].aliases[alias] = number
        return list(found.values())

    def history(self, name: str | None = None) -> builtins.list[Event]:  # `list` is a method here
        """The log, oldest first: every register / alias / rollback of `name` (or of all models)."""
        query = sa.select(events).order_by(events.c.id)
        with self.engine.connect() as conn:
            if name is not None:
                check_name(name)
                query = query.where(events.c.name == name)
                if conn.scalar(sa.select(sa.func.count()).select_from(versions).where(versions.c.name == name)) == 0:
                    raise self._unknown(conn, Ref(name))
            return [Event(**row._asdict()) for row in conn.execute(query)]

    def verify(self, ref: str | Ref) -> Version:
        """Recompute the stored files' content hash (and a Stable Diffusion model's or LoRA's sha256);
        RegistryError if anything changed since registration."""
        version = self.show(ref)
        self._check_stored(version)
        if version.kind != "pixel-class":  # a pixel-space model's weights hash is checked by loading it
            found = "sha256:" + (
                files.file_sha256(version.model_path) if version.stored_file else _folder_sha256(version.model_path)
            )
            if found != version.weights_hash:
                raise RegistryError(
                    f"{version.ref}: the stored model's sha256 is {found}, but {version.weights_hash} was "
                    "registered; register the model again"
                )
        return version

    def _check_stored(self, version: Version) -> None:
        """The stored files' content hash, read now, against the one recorded at registration."""
        self._stored(version.ref, version.version, version.model_path)
        found = files.content_hash(version.path)
        if found != version.content_hash:
            raise RegistryError(
                f"{version.ref}: the stored files at {version.path} changed since registration "
                f"(content hash {found}, registered {version.content_hash}); register the model again"
            )

    def load(
        self, ref: str | Ref, *, device: str = "cpu", dtype: str = "float32", config: str | None = None
    ) -> AnyModel:
        """Load a stored version, checked against what was recorded at registration: a pixel-space model
        (LoadedModel) by its weights hash, once loaded; a Stable Diffusion folder or single file
        (LoadedPipeline, through `sdpipe.models.kinds.load_any` with `device`, `dtype` and a single file's
        `config`) by its stored files' content hash, read before loading. A LoRA is refused: it is no model."""
        version = self.show(ref)
        if version.kind == "pixel-class":
            _pixel_dtype(dtype)  # before loading it
            return _pixel_on(self._load_pixel(version), device, dtype)
        if version.kind not in MODEL_KINDS:
            raise RegistryError(_not_a_model(version))
        from sdpipe.models.kinds import load_any

        self._check_stored(version)
        loaded = load_any(version.model_path, device, dtype, config)  # loads take turns (models.pipelines)
        found = loaded.hash.removeprefix("sha256:")
        if not version.weights_hash.removeprefix("sha256:").startswith(found):
            raise RegistryError(
                f"{version.ref}: the stored model loaded with hash {loaded.hash}, but {version.weights_hash} was "
                "registered; register the model again"
            )
        return loaded

    def _load_pixel(self, version: Version) -> LoadedModel:
        from sdpipe.models import load_model, weights_hash

        loaded = load_model(self.path(version.ref))  # loads take turns (see sdpipe.models.format)
        found = weights_hash(loaded.unet)
        if found != version.weights_hash:
            raise RegistryError(
                f"{version.ref}: the stored weights changed since registration ({found}, registered "
                f"{version.weights_hash}); register the model again"
            )
        return loaded

    def resolve_lora(self, ref: str | Ref, *, check: bool = True) -> loras.RegisteredLora:
        """A registered LoRA's stored file and version (with the base it was made for), its stored file's
        content hash checked unless `check` is False; any other kind of version is refused, naming its kind."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        version = self.show(ref)
        if version.kind != "lora":
            family = "Stable Diffusion" if version.kind in ("sd-pipeline", "sd-single-file") else "pixel-space"
            raise RegistryError(
                f"{ref} is {version.ref}, a {family} model ({version.kind}, {version.architecture}), not a LoRA: "
                "--lora takes a LoRA file or a registered LoRA (NAME@ALIAS, NAME:VERSION); give a model with --model"
            )
        if check:
            self._check_stored(version)
        return loras.RegisteredLora(self._stored(version.ref, version.version, version.model_path), version)

    # ----- lookups -----

    def _by_weights(self, name: str, weights: str) -> Version | None:
        query = sa.select(versions).where(versions.c.name == name, versions.c.weights_hash == weights)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
            return None if row is None else self._version(conn, row, created=False)

    def _version_number(self, conn: sa.Connection, ref: Ref) -> int:
        if ref.alias is not None and ref.alias != LATEST:
            number = _alias_target(conn, ref.name, ref.alias)
        elif ref.version is not None:
            query = sa.select(versions.c.version).where(versions.c.name == ref.name, versions.c.version == ref.version)
            number = conn.scalar(query)
        else:
            number = conn.scalar(sa.select(sa.func.max(versions.c.version)).where(versions.c.name == ref.name))
        if number is None:
            raise self._unknown(conn, ref)
        return number

    def _version_row(self, conn: sa.Connection, ref: Ref) -> sa.Row[Any]:
        number = self._version_number(conn, ref)
        query = sa.select(versions).where(versions.c.name == ref.name, versions.c.version == number)
        return conn.execute(query).one()

    def _version(self, conn: sa.Connection, row: sa.Row[Any], created: bool = True) -> Version:
        query = sa.select(aliases.c.alias).where(aliases.c.name == row.name, aliases.c.version == row.version)
        data = {k: v for k, v in row._asdict().items() if k != "id"}
        path = self.store / row.name / str(row.version)
        return Version(**data, path=path, aliases=sorted(conn.scalars(query)), created=created)

    def _unknown(self, conn: sa.Connection, ref: Ref) -> RegistryError:
        """An error naming what does exist: the registry's models, or the model's aliases or versions."""
        names = list(conn.scalars(sa.select(versions.c.name).distinct().order_by(versions.c.name)))
        if ref.name not in names:
            known = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "none yet"
            return RegistryError(f"no model named {ref.name!r} in the registry {self.display_url} (models: {known})")
        if ref.alias is not None:
            query = sa.select(aliases.c.alias).where(aliases.c.name == ref.name).order_by(aliases.c.alias)
            known = ", ".join(conn.scalars(query)) or "none yet"
            return RegistryError(f"{ref.name} has no alias {ref.alias!r} (aliases: {known}, and '{LATEST}')")
        query = sa.select(versions.c.version).where(versions.c.name == ref.name).order_by(versions.c.version)
        known = ", ".join(str(v) for v in conn.scalars(query))
        return RegistryError(f"{ref.name} has no version {ref.version} (versions: {known})")


def _locate_query(ref: Ref) -> sa.Select[Any]:
    """The version number and stored file a reference names now, in one query (no row: unknown)."""
    columns = sa.select(versions.c.version, versions.c.stored_file).where(versions.c.name == ref.name)
    if ref.alias is not None and ref.alias != LATEST:
        target = sa.select(aliases.c.version).where(aliases.c.name == ref.name, aliases.c.alias == ref.alias)
        return columns.where(versions.c.version == target.scalar_subquery())
    if ref.version is not None:
        return columns.where(versions.c.version == ref.version)
    return columns.order_by(versions.c.version.desc()).limit(1)


def _pixel_dtype(dtype: str) -> None:
    if dtype != "float32":
        raise ValueError(f"--dtype {dtype}: sdpipe's pixel-space models sample in float32")


def _pixel_on(loaded: LoadedModel, device: str, dtype: str) -> LoadedModel:
    """A pixel-space model on `device` (they sample in float32 only, as `load_any` says)."""
    _pixel_dtype(dtype)
    if device != "cpu":
        import torch

        torch.nn.Module.to(loaded.unet, torch.device(device))
    return loaded


def _not_a_model(version: Version) -> str:
    return (
        f"{version.ref} is a LoRA ({version.architecture}), not a model: apply it to a base model with "
        f"--lora {version.name}:{version.version} (or {version.name}@ALIAS)"
    )


def _table_folder(folder: Path) -> bool:
    """A table model folder: registered from `identify`'s answer, as Stable Diffusion folders are."""
    return bool(json.loads((folder / "sdpipe.json").read_text()).get("kind") == "table")


def _stored_name(source: Path) -> str:
    """The name a single file is stored under: its own if plain ASCII ending in .safetensors (diffusers reads
    any other name as a pickle), else model.safetensors."""
    return source.name if _SAFE_FILE_NAME.fullmatch(source.name) else "model.safetensors"


def _folder_sha256(folder: Path) -> str:
    """A diffusers folder's sha256, as `identify` computes it (from the components it finds)."""
    from sdpipe.models.files import identify

    found = identify(folder, with_hash=True).sha256
    assert found is not None
    return found


def _identity_record(identity: Identity) -> dict[str, Any]:
    """What the registry keeps of `identify`'s answer besides kind, architecture, size and sha256."""
    data = identity.to_dict()
    kept = {k: data[k] for k in ("short_hash", "prediction_type", "components", "notes")}
    return dict(json.loads(json.dumps(kept)))  # as the database gives it back (lists, not tuples)


def _alias_target(conn: sa.Connection, name: str, alias: str) -> int | None:
    query = sa.select(aliases.c.version).where(aliases.c.name == name, aliases.c.alias == alias)
    return conn.scalar(query.with_for_update())  # FOR UPDATE where the database has it: movers queue up


def _set_alias(conn: sa.Connection, name: str, alias: str, number: int, current: int | None) -> None:
    if current is None:
        conn.execute(aliases.insert().values(name=name, alias=alias, version=number, updated_at=now()))
        return
    where = (aliases.c.name == name) & (aliases.c.alias == alias)
    conn.execute(aliases.update().where(where).values(version=number, updated_at=now()))


def _alias_stack(conn: sa.Connection, name: str, alias: str) -> list[int]:
    """The alias's targets as a stack, replayed from the log: `alias` pushes, `rollback` pops."""
    query = (
        sa.select(events.c.action, events.c.version)
        .where(events.c.name == name, events.c.alias == alias, events.c.action.in_(["alias", "rollback"]))
        .order_by(events.c.id)
    )
    stack: list[int] = []
    for action, number in conn.execute(query):
        if action == "alias":
            stack.append(number)
        else:
            stack.pop()
    return stack


def _retry(attempt: Callable[[], T], existing: Callable[[], T | None] | None = None) -> T:
    """Run a write transaction again when a concurrent writer won a unique constraint (or held SQLite's lock);
    with `existing`, return what the winner wrote if it makes this write unnecessary."""
    for _ in range(RETRIES):
        try:
            return attempt()
        except (sa.exc.IntegrityError, sa.exc.OperationalError) as exc:
            if isinstance(exc, sa.exc.OperationalError) and "locked" not in str(exc):
                raise
            found = existing() if existing is not None else None
            if found is not None:
                return found
            time.sleep(random.uniform(0.01, 0.1))
    raise RegistryError(f"gave up after {RETRIES} tries: too many concurrent writers to the registry")


def _checked_weights_hash(model_dir: Path) -> tuple[dict[str, Any], str]:
    """sdpipe.json as a dict, and the weights hash, recomputed from the weights and checked against it."""
    from sdpipe.models import load_model, weights_hash

    try:
        loaded = load_model(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise RegistryError(f"cannot register {model_dir}: {exc}") from None
    found = weights_hash(loaded.unet)
    if found != loaded.meta.weights_hash:
        raise RegistryError(
            f"cannot register {model_dir}: its weights hash to {found}, but sdpipe.json says "
            f"{loaded.meta.weights_hash} (edited or damaged files?)"
        )
    return json.loads((model_dir / "sdpipe.json").read_text()), found


def _lineage(model_dir: Path, meta: dict[str, Any], metrics: str | Path | None) -> dict[str, Any]:
    """What the model was made from: config, metrics (`--metrics` or a `metrics.json` beside the model
    folder, as `sdpipe demo` writes), library versions, and the git commit if sdpipe.json records one."""
    metrics_file = Path(metrics) if metrics is not None else model_dir.parent / "metrics.json"
    versions_ = meta.get("versions", {})
    return {
        "source": str(model_dir.resolve()),
        "config": meta.get("config"),
        **_metrics(metrics_file, given=metrics is not None),
        "versions": versions_,
        "git_commit": meta.get("git_commit") or versions_.get("git_commit") or versions_.get("git"),
    }


def _sd_lineage(source: Path, metrics: str | Path | None) -> dict[str, Any]:
    """A Stable Diffusion model's or LoRA's lineage: where it was registered from, and `--metrics` if given
    (a metrics.json beside a downloaded file says nothing about it). Nothing records how it was trained."""
    found = _metrics(Path(metrics), given=True) if metrics is not None else {"metrics": None, "metrics_file": None}
    return {"source": str(source.resolve()), "config": None, **found, "versions": {}, "git_commit": None}


def _metrics(metrics_file: Path, *, given: bool) -> dict[str, Any]:
    if given and not metrics_file.is_file():
        raise RegistryError(f"metrics file not found: {metrics_file}")
    try:
        metrics_data = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{metrics_file} is not valid JSON: {exc}") from None
    return {"metrics": metrics_data, "metrics_file": str(metrics_file.resolve()) if metrics_data is not None else None}
