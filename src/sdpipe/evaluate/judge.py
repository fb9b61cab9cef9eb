"""An independent judge of generated images, fitted on real data only: the training part of the data, and a
held-out part the model never trained on, which every figure compares the samples with.

- Frechet ratio: FD(samples, held-out) / FD(n real training images, held-out), FD being the Frechet distance
  (Heusel et al. 2017, the formula behind FID) between Gaussians fitted to PCA features (PCA fitted on the
  training part), with as many real training images (n, drawn at random, mean over 10 draws) as samples.
  1.0 = the samples are as close to unseen data as the real training images are.
- Two-sample test (classifier two-sample test, Lopez-Paz & Oquab 2017): 5-fold cross-validated accuracy of an
  RBF SVM telling m samples from the m held-out images; 0.5 = indistinguishable. The same test of m real
  training images against the held-out ones is reported beside it.
- Near-copies: a sample closer (L2, source intensities) to a training image than 99 % of the held-out images
  are to their nearest training image.
- Label accuracy: an RBF SVM trained on the training part classifies each sample; the share that matches the
  requested label.
All inputs are in the source intensity range (0..16 for digits), any shape (N, ...), flattened to (N, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors
from sklearn.svm import SVC

MAX_TWO_SAMPLE = 2000  # images a side in the two-sample test (the SVM's cost grows with the square)
REAL_DRAWS = 10  # random training subsets behind the Frechet ratio's denominator


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to rows of a and b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def two_sample_accuracy(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy of an RBF SVM telling rows of `a` from rows of `b` (equal counts, in [0, 1])."""
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return float(cross_val_score(SVC(kernel="rbf", gamma="scale"), x, y, cv=folds).mean())


def draw_training_copies(size: int, labels: np.ndarray | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n training images drawn with replacement from a set of `size`: with the set's `labels`, the
    i-th of class i % classes (labels in turn, as the evaluation requests them), else from the whole set."""
    if labels is None:
        return rng.choice(size, n)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return np.array([rng.choice(by_class[i % len(by_class)]) for i in range(n)])


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64)


@dataclass
class Judge:
    train: np.ndarray  # (N, D) training images, flattened, source intensities
    heldout: np.ndarray  # (M, D) held-out images
    value_range: tuple[float, float]
    pca: PCA
    classifier: SVC | None  # None for unlabelled data
    nn: NearestNeighbors  # over the training images
    copy_threshold: float
    seed: int
    train_features: np.ndarray = field(repr=False)
    heldout_features: np.ndarray = field(repr=False)
    _real_fd: dict[int, float] = field(default_factory=dict, repr=False)
    _real_two_sample: float | None = field(default=None, repr=False)

    @classmethod
    def fit(
        cls,
        train_images: np.ndarray,
        train_labels: np.ndarray | None,
        heldout_images: np.ndarray,
        *,
        value_range: tuple[float, float],
        pca_components: int = 32,
        seed: int = 0,
    ) -> Judge:
        """Fit on the training part (PCA, classifier, nearest neighbours); the held-out part is the reference."""
        train, heldout = _flat(train_images), _flat(heldout_images)
        if len(heldout) < 10:
            raise ValueError(f"the held-out part has {len(heldout)} images; the judge needs at least 10")
        pca = PCA(n_components=min(pca_components, len(train) - 1, train.shape[1]), random_state=seed).fit(train)
        clf = None
        if train_labels is not None and len(np.unique(train_labels)) > 1:
            clf = SVC(kernel="rbf", gamma="scale", C=10.0).fit(train, train_labels)
        nn = NearestNeighbors(n_neighbors=1).fit(train)
        heldout_nn = nn.kneighbors(heldout)[0][:, 0]
        threshold = float(np.quantile(heldout_nn, 0.01))
        return cls(
            train, heldout, value_range, pca, clf, nn, threshold, seed, pca.transform(train), pca.transform(heldout)
        )

    def _unit(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.value_range
        return (x - lo) / (hi - lo)

    def real_fd(self, n: int) -> float:
        """Mean FD of `REAL_DRAWS` random sets of n training images (without replacement) to the held-out part."""
        n = min(n, len(self.train))
        if n not in self._real_fd:
            rng = np.random.default_rng(self.seed)
            fds = [
                frechet_distance(self.train_features[rng.choice(len(self.train), n, False)], self.heldout_features)
                for _ in range(REAL_DRAWS)
            ]
            self._real_fd[n] = float(np.mean(fds))
        return self._real_fd[n]

    def _two_sample_size(self, n: int) -> int:
        return min(n, len(self.heldout), MAX_TWO_SAMPLE)

    def two_sample(self, x: np.ndarray) -> float:
        """The two-sample test of rows `x` (flattened) against the held-out images."""
        m = self._two_sample_size(len(x))
        rng = np.random.default_rng(self.seed)
        a = x[rng.choice(len(x), m, False)]
        b = self.heldout[rng.choice(len(self.heldout), m, False)]
        return two_sample_accuracy(self._unit(a), self._unit(b), self.seed)

    def real_two_sample(self) -> float:
        """For scale: the two-sample test of real training images against the held-out ones (about 0.5)."""
        if self._real_two_sample is None:
            self._real_two_sample = self.two_sample(self.train)
        return self._real_two_sample

    def score(self, samples: np.ndarray, requested: np.ndarray | None) -> dict:
        """Judge samples (N, ...) in source intensities; `requested` are the labels asked for, if any."""
        x = _flat(samples)
        fd = frechet_distance(self.pca.transform(x), self.heldout_features)
        real = self.real_fd(len(x))
        dist = self.nn.kneighbors(x)[0][:, 0]
        out: dict = {
            "n": len(x),
            "frechet_distance": fd,
            "frechet_distance_real": real,
            "fd_ratio": fd / real,
            "two_sample_accuracy": self.two_sample(x),
            "two_sample_accuracy_real": self.real_two_sample(),
            "near_copy_share": float((dist < self.copy_threshold).mean()),
            "near_copy_threshold": self.copy_threshold,
            "median_nn_distance": float(np.median(dist)),
        }
        if requested is not None and self.classifier is not None:
            hit = self.classifier.predict(x) == requested
            out["label_accuracy"] = float(hit.mean())
            out["label_accuracy_per_class"] = {
                str(int(c)): float(hit[requested == c].mean()) for c in np.unique(requested)
            }
        return out

    def heldout_accuracy(self, heldout_labels: np.ndarray | None) -> float | None:
        """The classifier's accuracy on the held-out images: its own error rate, for scale."""
        if self.classifier is None or heldout_labels is None:
            return None
        return float((self.classifier.predict(self.heldout) == heldout_labels).mean())

    def describe(self) -> dict:
        """How the judge was built, for metrics.json."""
        return {
            "training_images": len(self.train),
            "heldout_images": len(self.heldout),
            "features": f"PCA({self.pca.n_components_}) fitted on the training part",
            "fd_ratio": "FD(samples, held-out) / FD(as many real training images, held-out); 1.0 = as close to "
            "unseen data as real data is",
            "two_sample": f"5-fold CV accuracy of an RBF SVM, samples vs held-out, up to {MAX_TWO_SAMPLE} a side; "
            "0.5 = indistinguishable",
            "near_copy_rule": "L2 to the nearest training image below the 1st percentile of the held-out images' "
            f"nearest-training-image distances ({self.copy_threshold:.3g})",
            "classifier": "SVC(rbf, C=10) on the training part's pixels" if self.classifier is not None else None,
        }
