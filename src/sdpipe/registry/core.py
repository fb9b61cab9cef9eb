"""The `Registry`: immutable, numbered model versions with lineage, movable aliases, an append-only log.

Every write is one short transaction. Concurrent writers are kept apart by unique constraints, not locks:
two registrations that pick the same version number (or the same weights under one name) cannot both
commit; the loser retries with a fresh number (or returns the version the winner made). The model files
are copied before the transaction and renamed into place inside it (see `store.py`).
"""

from __future__ import annotations

import builtins
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sdpipe.registry import store as files
from sdpipe.registry.db import aliases, default_store, default_url, events, open_engine, versions
from sdpipe.registry.names import LATEST, Ref, RegistryError, check_alias, check_name, check_version, parse_ref
from sdpipe.registry.records import AliasMove, Event, ModelSummary, Version, current_user, now

if TYPE_CHECKING:
    from sdpipe.models import LoadedModel

T = TypeVar("T")
RETRIES = 30


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

    def register(self, model_dir: str | Path, name: str, *, metrics: str | Path | None = None) -> Version:
        """Copy a model directory into the store as the next version of `name` (or return the version that
        already has these weights). Lineage: dataset_id, config, metrics, library versions, git commit."""
        check_name(name)
        model_dir = Path(model_dir)
        meta, weights = _checked_weights_hash(model_dir)
        existing = self._by_weights(name, weights)
        if existing is not None:
            self._log("register", name, existing.version, detail={"existing": True, "source": str(model_dir.resolve())})
            return existing
        lineage = _lineage(model_dir, meta, metrics)
        source_hash = files.content_hash(model_dir)
        staged = files.stage_copy(model_dir, self.store)
        try:
            if files.content_hash(staged) != source_hash:
                raise RegistryError(f"{model_dir} changed while it was being copied; register it again")
            row = {"name": name, "weights_hash": weights, "content_hash": source_hash, "lineage": lineage}
            row["dataset_id"] = meta["dataset_id"]
            return _retry(lambda: self._insert_version(row, staged), lambda: self._by_weights(name, weights))
        finally:
            files.remove_tree(staged)  # gone already unless the version was not recorded

    def _insert_version(self, row: dict[str, Any], staged: Path) -> Version:
        name, placed = row["name"], None
        try:
            with self.engine.begin() as conn:
                latest = conn.scalar(sa.select(sa.func.max(versions.c.version)).where(versions.c.name == name))
                number = (latest or 0) + 1
                stamp, user = now(), current_user()
                conn.execute(versions.insert().values(**row, version=number, created_at=stamp, user=user))
                self._log("register", name, number, conn=conn, detail={"source": row["lineage"]["source"]})
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
        """The stored directory of `NAME`, `NAME@ALIAS` or `NAME:VERSION` (one small query)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self.engine.connect() as conn:
            number = self._version_number(conn, ref)
        path = self.store / ref.name / str(number)
        if not path.is_dir():
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
        """Every model name with its number of versions, latest version and aliases."""
        count = sa.func.count(versions.c.version)
        top = sa.func.max(versions.c.version)
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(versions.c.name, count, top).group_by(versions.c.name).order_by("name"))
            found = {name: ModelSummary(name, n, latest, {}) for name, n, latest in rows}
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
        """Recompute the stored files' content hash; RegistryError if anything changed since registration."""
        version = self.show(ref)
        found = files.content_hash(version.path)
        if found != version.content_hash:
            raise RegistryError(
                f"{version.ref}: the stored files at {version.path} changed since registration "
                f"(content hash {found}, registered {version.content_hash}); register the model again"
            )
        return version

    def load(self, ref: str | Ref) -> LoadedModel:
        """Load a stored version, checking its weights against the hash recorded at registration."""
        from sdpipe.models import load_model, weights_hash

        version = self.show(ref)
        loaded = load_model(self.path(version.ref))  # loads take turns (see sdpipe.models.format)
        found = weights_hash(loaded.unet)
        if found != version.weights_hash:
            raise RegistryError(
                f"{version.ref}: the stored weights changed since registration ({found}, registered "
                f"{version.weights_hash}); register the model again"
            )
        return loaded

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
    if metrics is not None and not metrics_file.is_file():
        raise RegistryError(f"metrics file not found: {metrics_file}")
    try:
        metrics_data = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{metrics_file} is not valid JSON: {exc}") from None
    versions_ = meta.get("versions", {})
    return {
        "source": str(model_dir.resolve()),
        "config": meta.get("config"),
        "metrics": metrics_data,
        "metrics_file": str(metrics_file.resolve()) if metrics_data is not None else None,
        "versions": versions_,
        "git_commit": meta.get("git_commit") or versions_.get("git_commit") or versions_.get("git"),
    }
