"""Model names, aliases and references (`NAME`, `NAME@ALIAS`, `NAME:VERSION`), checked before any use.

A name becomes a folder in the store and a value in SQL, so only a small, boring alphabet is accepted:
lowercase ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 64 characters,
no `..`. That rules out path traversal (`../x`, `a/b`), quoting tricks (`x'; DROP TABLE`) and look-alike
Unicode (full-width `／`, Cyrillic `а`, invisible or right-to-left marks) by construction; values are also
always passed to SQL as bound parameters. Lowercase only, so that names cannot collide on case-insensitive
file systems. Aliases follow the same rule and must start with a letter, so `NAME@3` is never a version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LENGTH = 64
LATEST = "latest"  # built-in alias: the highest version; cannot be set by hand
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_ALIAS = re.compile(r"[a-z][a-z0-9._-]*")
_RULE = "lowercase letters a-z, digits, '.', '_' and '-', at most 64 characters"


class RegistryError(ValueError):
    """A user error about the registry: a bad or unknown name, alias, version or reference."""


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a model name with at most one of an alias or a version (neither = latest)."""

    name: str
    alias: str | None = None
    version: int | None = None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name if self.version is None else f"{self.name}:{self.version}"


def _check(kind: str, value: str, pattern: re.Pattern[str], first: str) -> str:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{kind} is empty: use {_RULE}")
    if len(value) > MAX_LENGTH:
        raise RegistryError(f"{kind} {value[:20]!r}... is {len(value)} characters long; at most {MAX_LENGTH}")
    if not pattern.fullmatch(value) or ".." in value or value.endswith("."):
        raise RegistryError(f"invalid {kind} {value!r}: use {_RULE}, starting with {first}, no '..'")
    return value


def check_name(name: str) -> str:
    """Return `name` if it is a valid model name, else raise RegistryError saying what is allowed."""
    return _check("model name", name, _NAME, "a letter or digit")


def check_alias(alias: str, *, settable: bool = False) -> str:
    """Return `alias` if valid; `settable` also refuses the built-in `latest`."""
    _check("alias", alias, _ALIAS, "a letter")
    if settable and alias == LATEST:
        raise RegistryError(f"'{LATEST}' is built in (always the highest version) and cannot be moved")
    return alias


def check_version(version: int | str) -> int:
    """A version number: a positive integer (given as int or as its decimal digits)."""
    text = str(version)
    if not text.isascii() or not text.isdigit() or int(text) < 1 or len(text) > 9:
        raise RegistryError(f"invalid version {text!r}: versions are numbered 1, 2, 3, ...")
    return int(text)


def parse_ref(ref: str) -> Ref:
    """`NAME`, `NAME@ALIAS` or `NAME:VERSION` -> Ref; anything else raises RegistryError."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return Ref(check_name(name), alias=check_alias(alias))
    if ":" in ref:
        name, version = ref.split(":", 1)
        return Ref(check_name(name), version=check_version(version))
    return Ref(check_name(ref))
