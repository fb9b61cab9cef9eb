"""A captioned image folder from an emoji-datasource npm package (`npm pack emoji-datasource-twitter`, or
`-google`): real, openly licensed images with names, for training a text-to-image model on real captions.

The package holds `emoji.json` (one entry per emoji: name, sub-category, category, image file) and
`img/<set>/64/<file>.png` (64x64 RGBA). Each emoji with an image becomes OUT/<category>/<file>.png, its
transparent parts composited on `background` and resized to `size` (Lanczos), captioned in OUT/metadata.jsonl
with its name and sub-category, e.g. "grinning face, face smiling" or "egypt flag, country flag". The category
(the first-level folder, 9 of them) is the image's class label, which `sdpipe data validate` reads from the
folder layout and the judge uses (`evaluate.captioned_judge`). Skin-tone variants and the "Component" category
(bare skin-tone swatches) are left out. The graphics' licence is the set's (`LICENCES`), written to OUT/LICENCE.txt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

LICENCES = {
    "twitter": "Twemoji graphics by Twitter, Inc. and other contributors, CC-BY 4.0 "
    "(https://creativecommons.org/licenses/by/4.0/); packaged by emoji-datasource (MIT)",
    "google": "Noto Emoji graphics by Google, Apache License 2.0; packaged by emoji-datasource (MIT)",
}
SKIPPED_CATEGORIES = ("Component",)


class EmojiPackageError(ValueError):
    """A folder that is not an unpacked emoji-datasource package."""


def find_image_set(package: Path) -> tuple[str, Path]:
    """(set name, folder of its 64 px images) of an unpacked package: `package/img/<set>/64`."""
    sets = sorted(p.parent.name for p in (package / "img").glob("*/64") if p.is_dir())
    if not (package / "emoji.json").is_file() or not sets:
        raise EmojiPackageError(
            f"{package}: no emoji.json and img/<set>/64/ inside; unpack an emoji-datasource package there, e.g. "
            "`npm pack emoji-datasource-twitter && tar xzf emoji-datasource-twitter-*.tgz` (its folder is package/)"
        )
    open_sets = [s for s in LICENCES if s in sets]  # Apple's and Facebook's images are not openly licensed
    if not open_sets:
        raise EmojiPackageError(f"{package}: its image sets ({', '.join(sets)}) are not openly licensed; use "
                                f"emoji-datasource-{' or -'.join(LICENCES)}")  # fmt: skip
    return open_sets[0], package / "img" / open_sets[0] / "64"


def caption_of(entry: dict) -> str:
    """The emoji's name and sub-category in lower case: "grinning face, face smiling"."""
    name = " ".join(str(entry.get("name") or entry.get("short_name") or "").lower().split())
    sub = str(entry.get("subcategory") or "").replace("-", " ").strip()
    return f"{name}, {sub}" if sub else name


def category_folder(category: str) -> str:
    """A folder name for a category: "Smileys & Emotion" -> "smileys-emotion"."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def to_rgb(image: Image.Image, size: int, background: tuple[int, int, int]) -> Image.Image:
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def write_emoji_folder(
    package: str | Path, out: str | Path, size: int = 32, background: tuple[int, int, int] = (255, 255, 255)
) -> dict[str, int]:
    """Write the captioned folder; returns the image count per category folder. Refuses an `out` that holds
    files already."""
    package, out = Path(package), Path(out)
    if size < 8:
        raise ValueError(f"size {size}: images need at least 8 pixels a side")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose a new one (nothing was written)")
    name, images = find_image_set(package)
    entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    rows = []
    for entry in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        source = images / str(entry.get("image", ""))
        wanted = entry.get("category") not in (None, *SKIPPED_CATEGORIES) and entry.get(f"has_img_{name}", True)
        if not wanted or not source.is_file():
            continue
        folder = category_folder(str(entry["category"]))
        (out / folder).mkdir(parents=True, exist_ok=True)
        file_name = f"{folder}/{source.stem}.png"
        try:
            with Image.open(source) as im:
                to_rgb(im, size, background).save(out / file_name, format="PNG")
        except OSError as exc:
            raise EmojiPackageError(f"{source}: not a readable PNG ({exc}); re-unpack the package") from None
        rows.append({"file_name": file_name, "text": caption_of(entry)})
        counts[folder] = counts.get(folder, 0) + 1
    if not rows:
        raise EmojiPackageError(f"{package}: emoji.json names no image found under {images}")
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        meta.writelines(json.dumps(row) + "\n" for row in rows)
    (out / "LICENCE.txt").write_text(f"{LICENCES.get(name, f'see the {name} set licence in {package}')}\n")
    return counts
