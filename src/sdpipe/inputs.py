"""Input images and masks (img2img, inpainting) travel by content hash: a `Conditioning` holds a `DataRef`
(sha256, and the file it came from), and the bytes wait here, so conditionings stay small, hashable and
printable (samples.jsonl, the PNG's JSON) while the server and the CLI hand the same pixels to the model.

`register(data)` keeps the bytes of an upload or a file under their sha256 (a bounded in-memory cache);
`load_image(ref)` gives them back as a PIL image, from the cache or, for a replay in a new process, from the
recorded path, whose bytes must hash to the recorded value.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sdpipe.conditioning import DataRef

MAX_CACHED = 64  # images kept; a server's requests each register theirs just before they run
_cache: OrderedDict[str, bytes] = OrderedDict()
_lock = threading.Lock()


def register(data: bytes, path: str | Path | None = None, what: str = "image") -> DataRef:
    """Keep `data` (PNG/JPEG/WebP bytes) by its sha256; raises ValueError naming `what` if it is no image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{what}: not an image sdpipe can read ({exc})") from None
    sha = hashlib.sha256(data).hexdigest()
    with _lock:
        _cache[sha] = data
        _cache.move_to_end(sha)
        while len(_cache) > MAX_CACHED:
            _cache.popitem(last=False)
    return DataRef(sha256=sha, path=None if path is None else str(Path(path).resolve()))


def register_file(path: str | Path, what: str) -> DataRef:
    """`register` a file's bytes, naming the option (`what`) when it is missing or no image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    return register(path.read_bytes(), path, f"{what} {path}")


def load_image(ref: DataRef, mode: str = "RGB") -> Image.Image:
    """The image `ref` names, converted to `mode`: from the cache, else from its recorded path (checked)."""
    with _lock:
        data = _cache.get(ref.sha256)
    if data is None:
        if ref.path is None or not Path(ref.path).is_file():
            raise FileNotFoundError(f"input image {ref.sha256[:12]} is not at hand (recorded path: {ref.path})")
        data = Path(ref.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"{ref.path} has changed since the image was made (its sha256 is not {ref.sha256[:12]})")
        register(data, ref.path)
    with Image.open(io.BytesIO(data)) as im:
        return im.convert(mode)
