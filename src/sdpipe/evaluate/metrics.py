"""Distribution metrics between generated and real samples in a feature space, and memorization.

- FID and KID: torchmetrics' `FrechetInceptionDistance` and `KernelInceptionDistance`, fed features that
  were already extracted (so real-data features are computed once and cached, whatever the extractor);
- precision and recall on k-NN manifolds (Kynkaenniemi et al. 2019), which torchmetrics does not have;
- memorization: the share of samples that are near-copies of a training image, and the closest pairs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from sdpipe.evaluate.judge import Judge


class _Precomputed(nn.Module):
    """The 'feature extractor' handed to torchmetrics: the inputs already are features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: np.ndarray, fake: np.ndarray, *, seed: int = 0, kid_subsets: int = 100) -> dict[str, float]:
    """FID, and KID's mean and std over `kid_subsets` random subsets (size min(1000, n_real, n_fake)), between
    feature rows. The subsets are drawn from a generator seeded by `seed`, so the numbers repeat exactly."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID and KID need at least 2 real and 2 generated samples")
    r = torch.from_numpy(np.asarray(real, dtype=np.float64))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64))
    fid = FrechetInceptionDistance(feature=_Precomputed(r.shape[1]))
    fid.update(r, real=True)
    fid.update(f, real=False)
    subset = min(1000, len(r), len(f))
    with warnings.catch_warnings():  # "KID keeps all features in memory": they are in memory already
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(r.shape[1]), subsets=kid_subsets, subset_size=subset)
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng():  # torchmetrics draws KID's subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
    }


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (+1 below: a row's nearest is itself)."""
    return torch.cat([torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _share_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of `points` that lie inside at least one ball (centre, radius)."""
    inside = [
        (torch.cdist(points[i : i + chunk], centres) <= radii[None, :]).any(1) for i in range(0, len(points), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen, Aila 2019, "Improved Precision
    and Recall Metric for Assessing Generative Models", NeurIPS).

    Each set's manifold is the union of balls around its feature vectors, each with the radius to that
    vector's k-th nearest neighbour in the same set (the paper uses k = 3). Precision is the share of
    generated samples inside the real manifold (fidelity); recall is the share of real samples inside the
    generated manifold (coverage)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and generated samples")
    r = torch.from_numpy(np.asarray(real, dtype=np.float64))
    f = torch.from_numpy(np.asarray(fake, dtype=np.float64))
    return {
        "precision": _share_inside(f, r, _kth_neighbour_radius(r, k)),
        "recall": _share_inside(r, f, _kth_neighbour_radius(f, k)),
        "pr_k": k,
    }


def memorization(judge: Judge, samples: np.ndarray, pairs: int = 8) -> dict:
    """Near-copies by the judge's rule (L2 in source intensities to the nearest training image below the 1st
    percentile of the held-out images' distances to theirs), with the `pairs` closest (sample, training image)
    pairs, closest first."""
    x = samples.reshape(len(samples), -1).astype(np.float64)
    dist, idx = judge.nn.kneighbors(x, n_neighbors=1)
    dist, idx = dist[:, 0], idx[:, 0]
    order = np.argsort(dist, kind="stable")[:pairs]
    return {
        "near_copy_share": float((dist < judge.copy_threshold).mean()),
        "near_copy_threshold": judge.copy_threshold,
        "closest_pairs": [{"sample": int(i), "train_index": int(idx[i]), "distance": float(dist[i])} for i in order],
    }


def per_class_accuracy(predicted: np.ndarray, requested: np.ndarray, class_names: list[str]) -> dict:
    """Overall and per-class share of samples whose predicted class is the one requested."""
    hit = predicted == requested
    return {
        "accuracy": float(hit.mean()),
        "per_class": {class_names[int(c)]: float(hit[requested == c].mean()) for c in np.unique(requested)},
    }
