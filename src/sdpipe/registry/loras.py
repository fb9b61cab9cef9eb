"""LoRAs in the registry: the base model a LoRA was made for, and whether a given base fits it.

A LoRA version records its base (`Version.base`) at registration, from the first of:

1. `--base REF`: a registry version or a path to a model: its sha256, as `sdpipe models inspect` prints it;
2. the file's safetensors metadata: `sdpipe.base_hash` (that same sha256, 10 to 64 hex, `sha256:` optional),
   then kohya's `ss_new_sd_model_hash` (the sha256 of the checkpoint file it trained on: the same kind of
   hash for a single-file base), then kohya's `ss_sd_model_hash` (the web UIs' *old* 8-hex model hash, of
   64 KiB at 1 MiB into the checkpoint file: another kind, comparable only with a base file's bytes);
3. else "unknown", and registration says so.

The record: `{"hash": hex or None, "hash_kind": "sha256" | "webui-legacy" | None, "architecture": sd1, sdxl, ...
or None, "source": where it came from, "name": the base's name if known, "note": why it is unknown}`.

`fits(lora, base_hash, base_architecture)` is the registry's part of refusing a base a LoRA does not fit: a
base of another architecture (an SDXL LoRA on an SD 1.x model) is refused, naming both; the same architecture
with another hash is only a warning (a LoRA made on SD 1.5 is routinely used on SD 1.5 fine-tunes and merges,
and one made on a checkpoint file has another hash than the same model as a diffusers folder).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpipe.registry.names import RegistryError
from sdpipe.registry.records import Version

HASH_KINDS = {
    "sha256": "sdpipe's sha256 of the base: a checkpoint file's bytes (as kohya's ss_new_sd_model_hash, civitai's "
    "SHA256 and, its first 10 hex, the web UIs' Model hash), a diffusers folder's from its components' files",
    "webui-legacy": "the web UIs' old 8-hex model hash (sha256 of the 64 KiB at 1 MiB into the checkpoint file), "
    "as kohya's ss_sd_model_hash records it",
}
# metadata key -> (hash kind, the hex lengths it may have), in the order they are looked at
BASE_METADATA = {
    "sdpipe.base_hash": ("sha256", range(10, 65)),
    "ss_new_sd_model_hash": ("sha256", range(64, 65)),
    "ss_sd_model_hash": ("webui-legacy", range(8, 9)),
}
MIN_COMPARED = 10  # hex digits two sha256 prefixes must share to be compared at all
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class RegisteredLora:
    """A registered LoRA, as `resolve_lora` finds it: its stored file and its version."""

    path: Path
    version: Version

    @property
    def base(self) -> dict[str, Any] | None:
        return self.version.base

    @property
    def base_hash(self) -> str | None:
        """The recorded base's hash as "sha256:<hex>" (or "webui-legacy:<8 hex>"); None when unknown."""
        base = self.version.base or {}
        if not base.get("hash"):
            return None
        return f"{base['hash_kind']}:{base['hash']}"

    @property
    def base_architecture(self) -> str | None:
        """What it was made for (sd1, sd2, sdxl, ...); None when unknown."""
        return made_for(self.version)

    def fits(
        self, base_hash: str | None, base_architecture: str | None, base_path: str | Path | None = None
    ) -> str | None:
        """`fits(self.version, ...)`: RegistryError for a base of another architecture, a warning for another base."""
        return fits(self.version, base_hash, base_architecture, base_path)


def family(architecture: str | None) -> str | None:
    """What a LoRA must have been made for to fit: an inpainting model takes its base's LoRAs."""
    if architecture in (None, "", "unknown"):
        return None
    return architecture.removesuffix("-inpaint")


def base_from_metadata(metadata: dict[str, str], architecture: str | None) -> dict[str, Any]:
    """The base record a LoRA file's own metadata gives (see the module doc), "unknown" when it gives none."""
    record: dict[str, Any] = {"hash": None, "hash_kind": None, "architecture": family(architecture)}
    record["name"] = metadata.get("ss_sd_model_name") or None
    skipped = []
    for key, (kind, lengths) in BASE_METADATA.items():
        if key not in metadata:
            continue
        value = metadata[key].strip().lower().removeprefix("sha256:")
        if _HEX.fullmatch(value) and len(value) in lengths:
            return record | {"hash": value, "hash_kind": kind, "source": f"metadata {key}"}
        skipped.append(f"its {key} is {metadata[key][:70]!r}, not a hash")  # kohya writes NOFILE, IsADirectory
    return record | {"source": "unknown", "note": "; ".join(skipped) or "nothing in the file records it"}


def base_record(sha256: str, architecture: str, source: str, name: str) -> dict[str, Any]:
    """The base record of a model given with `--base`: its sha256 (hex) and architecture."""
    return {
        "hash": sha256.lower().removeprefix("sha256:"),
        "hash_kind": "sha256",
        "architecture": architecture,
        "source": source,
        "name": name,
    }


def describe_base(base: dict[str, Any] | None) -> str:
    """One line: 'sha256:0123456789abcdef (sd1, from --base sd15:1)', or 'unknown (...)'."""
    if not base or not base.get("hash"):
        why = (base or {}).get("note") or "not recorded"
        arch = (base or {}).get("architecture")
        return f"unknown ({why}{'; made for ' + arch if arch else ''})"
    prefix = "sha256:" if base["hash_kind"] == "sha256" else "webui-legacy:"
    source, name = f"from {base['source']}", str(base.get("name") or "")
    where = ", ".join(str(x) for x in (base.get("architecture"), source, name if name not in source else None) if x)
    return f"{prefix}{base['hash'][:16]} ({where})"


def legacy_model_hash(path: str | Path) -> str:
    """The web UIs' old model hash of a checkpoint file: sha256 of the 64 KiB at 1 MiB, first 8 hex."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def made_for(lora: Version) -> str | None:
    """The architecture a LoRA version was made for: its recorded base's, else what its keys say."""
    return family((lora.base or {}).get("architecture")) or family(lora.architecture)


def fits(
    lora: Version, base_hash: str | None, base_architecture: str | None, base_path: str | Path | None = None
) -> str | None:
    """Whether a registered LoRA fits the base model it is about to be applied to.

    `base_hash` is the base's hash as sdpipe computes it (`LoadedPipeline.hash`, "sha256:<16 hex>", or longer),
    `base_architecture` its architecture (sd1, sd1-inpaint, sd2, sdxl, ...; `identify(path).architecture`),
    `base_path` its file or folder if the recorded hash is the web UIs' old kind, which only a file's bytes give.

    Raises RegistryError, naming the LoRA (name:version and hash, what it was made for) and the base (hash and
    architecture), when the architectures differ: its layers are not the base's. Returns a warning text when
    only the base differs (same architecture, another hash than the one recorded), None when it fits or
    nothing recorded says otherwise (an unknown base or architecture, a hash that cannot be compared)."""
    if lora.kind != "lora":
        raise RegistryError(f"{lora.ref} is a {lora.kind} ({lora.architecture}) version, not a LoRA")
    lora_text = f"LoRA {lora.ref} ({lora.weights_hash[:23]})"
    base_text = f"the base {base_hash or 'of unknown hash'} ({base_architecture or 'architecture unknown'})"
    wanted, given = made_for(lora), family(base_architecture)
    if wanted is not None and given is not None and wanted != given:
        raise RegistryError(
            f"{lora_text} was made for {wanted} (base {describe_base(lora.base)}) and does not fit {base_text}: "
            f"a {wanted} LoRA's layers are not a {given} model's; use a {wanted} base, or a LoRA made for {given}"
        )
    same = same_base(lora.base, base_hash, base_path)
    if same is False:
        return (
            f"{lora_text} was made for the base {describe_base(lora.base)}, not {base_text}: the architecture is "
            "the same, so it applies, but it may not give what it was trained to give"
        )
    return None


def same_base(base: dict[str, Any] | None, base_hash: str | None, base_path: str | Path | None = None) -> bool | None:
    """Whether the recorded base is the given one: True, False, or None when that cannot be told."""
    if not base or not base.get("hash"):
        return None
    recorded = str(base["hash"])
    if base.get("hash_kind") == "webui-legacy":
        if base_path is None or not Path(base_path).is_file():
            return None  # the old hash is of a file's bytes: a folder has none
        return legacy_model_hash(base_path) == recorded
    given = (base_hash or "").strip().lower().removeprefix("sha256:")
    n = min(len(given), len(recorded))
    if n < MIN_COMPARED or not _HEX.fullmatch(given):
        return None
    return given[:n] == recorded[:n]
