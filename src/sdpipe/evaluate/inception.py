"""The FID Inception-v3 network up to its 2048-d pool3 features, in plain PyTorch.

Inception-v3 (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision") as frozen in
TensorFlow's 2015-12-05 graph that the original FID code (Heusel et al. 2017, TTUR) reads its `pool_3:0`
features from. The weights file is `pt_inception-2015-12-05-6726825d.pth`, that graph's constants converted to
PyTorch (the file pytorch-fid and torch-fidelity use). The forward pass reproduces torch-fidelity 0.4.0's
`FeatureExtractorInceptionV3` ("inception-v3-compat", feature "2048") exactly: uint8 images (N, 3, H, W) with
values 0..255 are resized to 299x299 with TensorFlow 1.x's bilinear resize, mapped to [-1, 1) by
(x - 128) / 128, and run through the graph's blocks, which differ from torchvision's Inception-v3 in two
places: average pools exclude the zero padding, and the last block (Mixed_7c) max-pools its pool branch.

Why a port instead of depending on torch-fidelity (or torchmetrics' `NoTrainInceptionV3`, which wraps it):
torch-fidelity imports torchvision when the package is imported, and torchvision has no CPU build for this
environment (installing it drags in CUDA torch). The network itself needs nothing beyond torch.

Ported from torch-fidelity (https://github.com/toshas/torch-fidelity, by Anton Obukhov, Apache License 2.0),
files `feature_extractor_inceptionv3.py` (itself adapted from pytorch-fid by Maximilian Seitzer, Apache-2.0)
and `interpolate_compat_tensorflow.py`; the original weights are TensorFlow's, also Apache-2.0. Module and
parameter names are kept identical so the weights file loads with `strict=True`. Equivalence with
torch-fidelity is checked in tests/test_inception.py against features it computed
(tests/fixtures/make_inception_reference.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
# The weights file also holds the 1008-way logits layer ("softmax" in the TF graph); pool3 features don't use it.
LOGITS_KEYS = ("fc.weight", "fc.bias")


def resize_bilinear_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False, no half-pixel centres) of float (N, C, H, W) images.

    Output pixel i samples input position i * in/out (not (i + 0.5) * in/out - 0.5 as torch's bilinear does),
    clamped at the last row/column; the same operations, in the same order, as torch-fidelity's "slow" method.
    """

    def grid(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    y_lo, y_hi, dy = grid(x.shape[2])
    x_lo, x_hi, dx = grid(x.shape[3])
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the average
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BasicConv2d(nn.Module):
    """Convolution without bias -> batch norm (eps 1e-3, running statistics) -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Mixed_7b, Mixed_7c).

    `max_pool`: the TF graph's Mixed_7c max-pools its pool branch where the paper (and Mixed_7b) average-pool.
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images (N, 3, H, W), any H and W -> float32 pool3 features (N, 2048), as torch-fidelity computes them.

    Build it with `from_state_dict` or `load_fid_inception`: a fresh instance has untrained weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.to(torch.float32))
        x = (x - 128) / 128  # the graph multiplies by 1/128 = 0.0078125; dividing gives the same bits
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147x147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71x71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35x35
        blocks_35 = (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d)
        blocks_17 = (self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        for block in (*blocks_35, *blocks_17, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # 35x35x288 -> 17x17x768 -> 8x8x2048
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> FIDInceptionV3:
        """The network with these weights, in eval mode and frozen; `strict`: every key must match.

        The logits layer (`fc.*`) is dropped. BatchNorm's `num_batches_tracked` may be present or absent
        (torch-fidelity's TF-to-PyTorch conversion writes none; it does not affect eval-mode outputs).
        """
        model = cls()
        # a new plain dict: no `_metadata`, so BatchNorm fills in a missing num_batches_tracked itself
        pool3 = {k: v for k, v in state_dict.items() if k not in LOGITS_KEYS}
        model.load_state_dict(pool3, strict=True)
        return model.eval().requires_grad_(False)


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The network from a weights file (tensors only: `weights_only=True` never unpickles arbitrary objects).

    This does not check which file it is; `sdpipe.evaluate.features.check_inception_file` does.
    """
    return FIDInceptionV3.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
