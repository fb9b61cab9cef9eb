"""An independent judge of generated digits, fitted on real data only.

- Label accuracy: an RBF support-vector classifier trained on the real images (scikit-learn; ~99% on
  held-out real digits) classifies each sample; the share matching the requested label is reported.
- Frechet distance (Heusel et al. 2017, the formula behind FID) between Gaussians fitted to PCA features
  (PCA fitted on the real set). It is reported as a ratio to the distance of an equally large random subset
  of the real images to the whole set, averaged over several subsets: 1.0 is as close as real data gets.
- Near-copies: a sample closer (L2, source intensities) to a training image than any two distinct training
  images are to each other is a near-copy.
All inputs are in the source intensity range (0..16 for digits), flattened to (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import SVC


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to rows of a and b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def draw_training_copies(size: int, labels: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n training images drawn with replacement from a set of `size`: with the set's `labels`, the
    i-th of class i % classes (labels in turn, as the evaluation requests them), else from the whole set."""
    if labels is None:
        return rng.choice(size, n)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.array([rng.choice(by_class[i % len(by_class)]) for i in range(n)])


@dataclass
class Judge:
    classifier: SVC
    pca: PCA
    real_features: np.ndarray
    nn: NearestNeighbors
    copy_threshold: float
    baseline_fd: dict[int, float]
    seed: int

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, *, pca_components: int = 32, seed: int = 0) -> Judge:
        x = images.reshape(len(images), -1).astype(np.float64)
        clf = SVC(kernel="rbf", gamma="scale", C=10.0).fit(x, labels)
        pca = PCA(n_components=pca_components, random_state=seed).fit(x)
        nn = NearestNeighbors(n_neighbors=2).fit(x)
        dist, _ = nn.kneighbors(x)
        distinct = dist[:, 1][dist[:, 1] > 0]
        threshold = float(distinct.min()) if len(distinct) else 0.0
        return cls(clf, pca, pca.transform(x), nn, threshold, {}, seed)

    def baseline(self, n: int, repeats: int = 10) -> float:
        """Mean Frechet distance of `repeats` random real subsets of size n to the whole real set."""
        if n not in self.baseline_fd:
            rng = np.random.default_rng(self.seed)
            size = min(n, len(self.real_features))
            fds = [
                frechet_distance(
                    self.real_features[rng.choice(len(self.real_features), size, False)], self.real_features
                )
                for _ in range(repeats)
            ]
            self.baseline_fd[n] = float(np.mean(fds))
        return self.baseline_fd[n]

    @staticmethod
    def heldout_real_ratio(images: np.ndarray, *, pca_components: int = 32, seed: int = 0, repeats: int = 5) -> float:
        """For scale: the FD ratio that *new real* images get. The data is split 2:1; the judge is fitted on
        the larger part and scores the smaller part, which it has never seen. The ratio's baseline subsets
        overlap the reference set, so held-out real data scores well above 1.0 on it."""
        x = images.reshape(len(images), -1).astype(np.float64)
        rng = np.random.default_rng(seed)
        ratios = []
        for _ in range(repeats):
            order = rng.permutation(len(x))
            ref, new = x[order[: 2 * len(x) // 3]], x[order[2 * len(x) // 3 :]]
            pca = PCA(n_components=pca_components, random_state=seed).fit(ref)
            f_ref, f_new = pca.transform(ref), pca.transform(new)
            base = np.mean([frechet_distance(f_ref[rng.choice(len(ref), len(new), False)], f_ref) for _ in range(10)])
            ratios.append(frechet_distance(f_new, f_ref) / base)
        return float(np.mean(ratios))

    def copier_ratio(self, labels: np.ndarray | None, n: int, repeats: int = 20) -> dict[str, float]:
        """For scale: the FD ratio of a "generator" that returns n random training images themselves, drawn
        with replacement (requested labels cycling through the classes when `labels`, the real images'
        labels, are given, as the evaluation asks for them). Mean, min and max over `repeats` draws: the mean
        is about what perfect memorization scores, the spread how much one set of n samples swings."""
        rng = np.random.default_rng(self.seed)
        ratios = []
        for _ in range(repeats):
            pick = draw_training_copies(len(self.real_features), labels, n, rng)
            ratios.append(frechet_distance(self.real_features[pick], self.real_features) / self.baseline(n))
        return {"mean": float(np.mean(ratios)), "min": float(np.min(ratios)), "max": float(np.max(ratios))}

    def score(self, samples: np.ndarray, requested: np.ndarray | None) -> dict:
        """Judge samples (N, ...) in source intensities; `requested` are the labels asked for, if any."""
        x = samples.reshape(len(samples), -1).astype(np.float64)
        fd = frechet_distance(self.pca.transform(x), self.real_features)
        base = self.baseline(len(x))
        dist, _ = self.nn.kneighbors(x, n_neighbors=1)
        out: dict = {
            "n": len(x),
            "frechet_distance": fd,
            "frechet_distance_real_subset": base,
            "fd_ratio": fd / base,
            "near_copy_share": float((dist[:, 0] < self.copy_threshold).mean()),
            "near_copy_threshold": self.copy_threshold,
            "median_nn_distance": float(np.median(dist[:, 0])),
        }
        if requested is not None:
            pred = self.classifier.predict(x)
            hit = pred == requested
            out["label_accuracy"] = float(hit.mean())
            out["label_accuracy_per_class"] = {
                str(int(c)): float(hit[requested == c].mean()) for c in np.unique(requested)
            }
        return out
