"""Feature extractors for FID, KID and precision/recall, and the on-disk cache of real-data features.

Two extractors, chosen per run and named in every report, because distances in one feature space say
nothing about distances in another:

- `FeatureNet` (the offline default): a small CNN classifier that sdpipe trains on the real images
  themselves, deterministically (fixed seed, fixed schedule), cached by `dataset_id`. Its penultimate layer
  gives the features and its head the class predictions used for the per-class accuracy of samples.
- `InceptionFeatures` (`--inception PATH`): the 2048-d pool3 features of the FID Inception-v3
  (`pt_inception-2015-12-05-6726825d.pth`, the file pytorch-fid and torch-fidelity use), loaded from a local
  file only, after checking its sha256; the network is `sdpipe.evaluate.inception.FIDInceptionV3`, a plain
  PyTorch port of torch-fidelity's extractor (no torch-fidelity or torchvision needed).

Every extractor takes uint8 pixels as `sdpipe.sampling.files.to_pixels` returns them: (N, H, W) or (N, H, W, C).
The cache lives in `$SDPIPE_CACHE_DIR` (default `~/.cache/sdpipe`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdpipe.models.hashes import cache_dir

FEATURE_NET_VERSION = "featnet-v1"  # bump when the architecture or the training recipe changes
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


class FeatureExtractor(Protocol):
    name: str  # identifies the feature space: numbers are comparable only under the same name
    description: str

    def features(self, pixels: np.ndarray) -> np.ndarray: ...


def source_to_pixels(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """Real images (N, C, H, W) in source intensities -> uint8 pixels laid out like `to_pixels`' output."""
    lo, hi = value_range
    px = np.round((np.clip(images, lo, hi) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    return px[:, 0] if px.shape[1] == 1 else px.transpose(0, 2, 3, 1)


def _to_nchw(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


class _ConvNet(nn.Module):
    """conv-pool(8)-conv-pool(4)-conv-pool(2) -> `dim` features -> class logits; any input size of at least 4x4."""

    def __init__(self, channels: int, n_classes: int, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(8),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 4, dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class FeatureNet:
    """The offline default extractor: a CNN trained on the real data (see the module docstring)."""

    net: _ConvNet
    dataset_id: str
    heldout_accuracy: float  # on a fixed 10% of the real images it was not trained on
    scale: float = 1.0  # features are divided by it: the RMS feature value of the real images becomes 1
    name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        self.name = f"{FEATURE_NET_VERSION}:{self.dataset_id}"
        self.description = (
            f"sdpipe feature network ({FEATURE_NET_VERSION}): a CNN classifier trained on the real data "
            f"{self.dataset_id}, penultimate layer (128-d); held-out real accuracy {self.heldout_accuracy:.1%}. "
            "Numbers are comparable only with numbers from the same feature network, never with Inception FID."
        )

    @torch.inference_mode()
    def _forward(self, pixels: np.ndarray, head: bool) -> np.ndarray:
        self.net.eval()
        out = []
        for i in range(0, len(pixels), 512):
            x = _to_nchw(pixels[i : i + 512]).float() / 255.0
            f = self.net.body(x)
            out.append((self.net.head(f) if head else f).numpy())
        return np.concatenate(out).astype(np.float64)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """Penultimate-layer features, scaled so real images have RMS 1 (KID's cubic kernel needs O(1) values)."""
        return self._forward(pixels, head=False) / self.scale

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Class indices predicted for uint8 pixels."""
        return self._forward(pixels, head=True).argmax(1)


def _heldout_mask(labels: np.ndarray, seed: int) -> np.ndarray:
    """A fixed, stratified 10% of the images (at least one per class with two or more images)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, len(idx) // 10) if len(idx) > 1 else 0
        mask[rng.choice(idx, k, replace=False)] = True
    return mask


def train_feature_net(
    pixels: np.ndarray, labels: np.ndarray, n_classes: int, dataset_id: str, *, epochs: int = 16, seed: int = 0
) -> FeatureNet:
    """Train the feature network on 90% of the real images; same data and seed give the same weights."""
    x = _to_nchw(pixels).float() / 255.0
    y = torch.from_numpy(labels.astype(np.int64))
    held = torch.from_numpy(_heldout_mask(labels, seed))
    x_train, y_train = x[~held], y[~held]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = _ConvNet(x.shape[1], n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=4e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-3, total_steps=epochs * -(-len(x_train) // 128))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights on any machine, and fastest for a net this small
    try:
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x_train), generator=gen).split(128):
                loss = nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.inference_mode():
        acc = float((net(x[held]).argmax(1) == y[held]).float().mean()) if held.any() else float("nan")
    fn = FeatureNet(net, dataset_id, acc)
    fn.scale = float(np.sqrt((fn.features(pixels) ** 2).mean()))
    return fn


def load_or_train_feature_net(
    pixels: np.ndarray, labels: np.ndarray, n_classes: int, dataset_id: str, *, seed: int = 0
) -> FeatureNet:
    """The feature network for `dataset_id` from the cache, trained and cached on first use."""
    stem = cache_dir() / "feature_nets" / f"{FEATURE_NET_VERSION}-{_safe(dataset_id)}-s{seed}"
    weights, info = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.exists() and info.exists():
        meta = json.loads(info.read_text())
        net = _ConvNet(meta["channels"], meta["n_classes"])
        net.load_state_dict(load_file(weights))
        return FeatureNet(net.eval(), dataset_id, meta["heldout_accuracy"], meta["scale"])
    fn = train_feature_net(pixels, labels, n_classes, dataset_id, seed=seed)
    stem.parent.mkdir(parents=True, exist_ok=True)
    channels = 1 if pixels.ndim == 3 else pixels.shape[-1]
    _atomic_write(weights, lambda p: save_file(fn.net.state_dict(), p))
    meta = {"channels": channels, "n_classes": n_classes, "heldout_accuracy": fn.heldout_accuracy, "scale": fn.scale}
    _atomic_write(info, lambda p: Path(p).write_text(json.dumps(meta)))
    return fn


def real_features(extractor: FeatureExtractor, pixels: np.ndarray, dataset_id: str) -> np.ndarray:
    """Features of the whole real set, computed once per (extractor, dataset) and cached on disk."""
    path = cache_dir() / "real_features" / f"{_safe(extractor.name)}--{_safe(dataset_id)}.npy"
    if path.exists():
        return np.load(path)
    feats = extractor.features(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda p: np.save(p, feats))
    return feats


class InceptionFeatures:
    """FID Inception-v3 pool3 features (2048-d) from a local weights file, checked against its sha256."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        check_inception_file(path)
        from sdpipe.evaluate.inception import load_fid_inception

        self.model = load_fid_inception(path)
        self.name = "inception-v3-2015-12-05-pool3"
        self.description = (
            f"Inception-v3 pool3 (2048-d) from {path.name} (sha256 {INCEPTION_SHA256[:12]}...): the standard FID "
            "features; images are resized to 299x299 inside the network and grey images repeated to RGB."
        )

    @classmethod
    def from_state_dict_unchecked(cls, state_dict: dict[str, torch.Tensor]) -> InceptionFeatures:
        """The same features from weights that are NOT checked to be the FID file (for tests of the feature path).

        Its `name` says so, so numbers from it are never taken for FID-Inception numbers.
        """
        from sdpipe.evaluate.inception import FIDInceptionV3

        self = cls.__new__(cls)
        self.model = FIDInceptionV3.from_state_dict(state_dict)
        self.name = "inception-v3-unchecked-weights"
        self.description = "Inception-v3 pool3 (2048-d) with unchecked weights: NOT the FID Inception features."
        return self

    @torch.inference_mode()
    def features(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), 64):
            x = _to_nchw(pixels[i : i + 64])
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            out.append(self.model(x).double().numpy())
        return np.concatenate(out)


def check_inception_file(path: Path) -> None:
    """A clear error when the Inception weights file is missing or is not the expected file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Give the path of {INCEPTION_FILE} (sha256 {INCEPTION_SHA256}), "
            "or leave out --inception to use sdpipe's own feature network (no download needed)"
        )
    digest = sha256_file(path)
    if digest != INCEPTION_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, not that of {INCEPTION_FILE} ({INCEPTION_SHA256}): "
            "FID needs exactly these weights; check the file or leave out --inception"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves a half-written cache file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    write(str(tmp))
    os.replace(tmp, path)
