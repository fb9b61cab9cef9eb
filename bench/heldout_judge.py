"""A held-out judge of the digits demo, written from outside sdpipe: it uses only numpy, scipy, scikit-learn,
Pillow and the `sdpipe` command line, never sdpipe's own judge (src/sdpipe/evaluate).

What it does
    1. Splits sklearn's 1797 digits (8x8, values 0..16) itself: `train_test_split(test_size=0.25,
       stratify=labels, random_state=--split-seed)`, 1347 training and 450 held-out images.
    2. Writes the training part as WORK/train/<digit>/<index>.png (8-bit grayscale, pixel = round(v*255/16)).
    3. Runs, timing the training and the whole run:
           sdpipe data validate WORK/train --out WORK/validated
           sdpipe train --config examples/digits.yaml --set data.source=folder --set data.path=WORK/train \\
               --set data.validated_dir=WORK/validated --set data.test_fraction=0 [--set ...] --out WORK/run
           sdpipe generate --model WORK/run/model --label all --n 1000 --seed S --out WORK/samples/set_k
       for S = 1000000 + 1000*k, k = 0..K-1 (`--sets K`, default 4). It checks in samples.jsonl that the labels
       cycle 0..9 and reads the PNGs back into 0..16 units (v = px*16/255).
    4. Judges each sample set against the held-out part, the judge being fitted on the training part only:
       - FD ratio: Frechet distance between Gaussians fitted to PCA features (32 components, PCA fitted on the
         training part, raw pixels 0..16) of the samples and of the held-out part, divided by the same distance
         for n real training images drawn without replacement (n = the sample count, at most the training
         size; mean of 10 draws). 1.0 = as close to unseen digits as real digits are; lower is better.
       - two-sample accuracy: 5-fold stratified shuffled cross-validated accuracy of an RBF SVC (sklearn
         defaults, inputs /16) telling the first m samples (m = held-out size, 45 per class as labels cycle)
         from the m held-out images. 0.5 = indistinguishable. The same test for m random training images
         against the held-out ones is printed beside it (mean of 10 draws) for scale.
       - near-copies: the share of samples closer (L2, 0..16 units) to their nearest training image than the
         threshold, the 1st percentile of the held-out images' distances to their nearest training image,
         i.e. samples closer to the training set than 99 % of unseen real digits are.
       - label accuracy: an SVC(kernel="rbf", C=10, gamma="scale") trained on the training part classifies
         each sample; the share matching the requested label (its accuracy on the held-out part is printed
         for scale).
       Each figure: per-set values, mean and a 95 % Student-t interval of the mean over the K sets, and
       PASS/FAIL of the mean against the bar: FD ratio <= 1.2, two-sample <= 0.55, near-copies < 2 %,
       label accuracy >= 95 %. Prints a table and writes WORK/judge.json.
    5. `--references` scores reference "generators" the same way, K draws of 1000 each (labels cycling 0..9,
       images drawn per class from the training part): the training images themselves (with replacement),
       training images plus Gaussian pixel noise sigma = 1 and 1.5 (0..16 units, then clipped to 0..16 and
       rounded to the PNG's 255 levels), and a per-class Gaussian fitted to the training part (clipped and
       rounded likewise). They give the scale: copies score a low FD ratio but are all near-copies; noisy
       copies and Gaussians show what a "new but worse" generator scores.

Commands (from the repository root, with the project's virtualenv)
    .venv/bin/python bench/heldout_judge.py --work /tmp/hj --references        # references only, ~10 s
    .venv/bin/python bench/heldout_judge.py --work /tmp/hj                     # train + judge (~5 min on 2 CPUs)
    .venv/bin/python bench/heldout_judge.py --work /tmp/hj --set train.steps=200 --sets 2   # a quick try
    .venv/bin/python bench/heldout_judge.py --work /tmp/hj --model /tmp/hj/run/model --references  # re-judge

Reading the figures: the FD ratio's denominator is real digits that the model never saw compared with other
unseen ones, so a ratio near 1 means the samples are as close to new digits as real digits are; memorizing the
training set also scores near 1 here, which is what the near-copy share catches. One set of 1000 is noisy (look
at the per-set values and the interval), so compare means over sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg, stats
from scipy.spatial.distance import cdist
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
from sklearn.svm import SVC

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "digits.yaml"
N_SAMPLES = 1000
SEED_BASE = 1_000_000
SEED_STEP = 1000
MAX_VALUE = 16.0
BARS: dict[str, tuple[str, float]] = {
    "fd_ratio": ("<=", 1.2),
    "two_sample": ("<=", 0.55),
    "near_copies": ("<", 0.02),
    "label_accuracy": (">=", 0.95),
}
FIGURES = list(BARS)
Sets = list[tuple[np.ndarray, np.ndarray]]  # sample sets: (images (n, 64) in 0..16, requested labels)


@dataclass
class Split:
    x_train: np.ndarray  # (n, 64) float, 0..16
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    i_train: np.ndarray  # indices into load_digits()
    i_test: np.ndarray


def split(seed: int = 0) -> Split:
    """sklearn's digits, split 75/25 stratified by label."""
    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    i_tr, i_te = train_test_split(idx, test_size=0.25, stratify=y, random_state=seed)
    return Split(x[i_tr], y[i_tr], x[i_te], y[i_te], i_tr, i_te)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """0..16 units to 8-bit pixels: round(v*255/16), clipped."""
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0 / MAX_VALUE), 0, 255).astype(np.uint8)


def from_pixels(px: np.ndarray) -> np.ndarray:
    """8-bit pixels to 0..16 units."""
    return np.asarray(px, dtype=np.float64) * MAX_VALUE / 255.0


def quantize(x: np.ndarray) -> np.ndarray:
    """What a PNG round trip does to 0..16 values: clip, then round to the 255 levels."""
    return from_pixels(to_pixels(np.clip(x, 0.0, MAX_VALUE)))


def write_folder(x: np.ndarray, y: np.ndarray, index: np.ndarray, root: Path) -> int:
    """Write root/<label>/<index>.png, one 8x8 grayscale PNG per image; return the count."""
    if root.exists():
        shutil.rmtree(root)
    for img, label, i in zip(x, y, index, strict=True):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(to_pixels(img).reshape(8, 8), mode="L").save(d / f"{int(i):04d}.png")
    return len(y)


def sdpipe_exe() -> str:
    """The `sdpipe` next to this interpreter (the virtualenv's), else the one on PATH."""
    local = Path(sys.executable).parent / "sdpipe"
    if local.exists():
        return str(local)
    found = shutil.which("sdpipe")
    if found is None:
        raise SystemExit("sdpipe not found: run with the project's virtualenv (.venv/bin/python)")
    return found


def run_cmd(args: list[str], log: Path) -> float:
    """Run a command, appending its output to log; return its wall seconds; exit with its tail on failure."""
    print("$ " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(args)}\n" + "\n".join(tail))
    return seconds


def fresh_dir(path: Path) -> Path:
    """path if it does not exist, else path-2, path-3, ... (sdpipe train is given a folder of its own)."""
    if not path.exists():
        return path
    k = 2
    while path.with_name(f"{path.name}-{k}").exists():
        k += 1
    return path.with_name(f"{path.name}-{k}")


def set_flags(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


def train(work: Path, config: Path, overrides: list[str], log: Path) -> tuple[Path, dict[str, float]]:
    """Validate WORK/train and train on it; return the model folder and the seconds of each step."""
    exe = sdpipe_exe()
    validated = work / "validated"
    if validated.exists():
        shutil.rmtree(validated)
    data = ["data.source=folder", f"data.path={work / 'train'}", f"data.validated_dir={validated}"]
    data += ["data.test_fraction=0", *(o for o in overrides if o.startswith("data."))]
    # validate with the same data settings: `sdpipe train` refuses a folder validated with others (plain
    # `sdpipe data validate` holds out a test split, and train then says "validated with other settings")
    cmd = [exe, "data", "validate", str(work / "train"), "--out", str(validated), "--config", str(config)]
    t_val = run_cmd(cmd + set_flags(data) + ["-q"], log)
    run = fresh_dir(work / "run")
    cmd = [exe, "train", "--config", str(config), "--out", str(run), "-q"]
    t_train = run_cmd(cmd + set_flags([*data, *(o for o in overrides if not o.startswith("data."))]), log)
    return run / "model", {"validate_s": t_val, "train_s": t_train}


def read_samples(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read OUT/samples.jsonl and its PNGs: (n, 64) values in 0..16 and the recorded labels."""
    rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    xs, ys = [], []
    for row in rows:
        with Image.open(folder / row["file"]) as im:
            if im.mode != "L":
                raise SystemExit(f"{row['file']}: expected 8-bit grayscale, got mode {im.mode}")
            xs.append(np.asarray(im, dtype=np.uint8).reshape(-1))
        ys.append(int(row["label"]))
    return from_pixels(np.stack(xs)), np.asarray(ys, dtype=np.int64)


def generate(model: Path, out: Path, n: int, seed: int, log: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """One set of n samples with labels cycling 0..9; checks the labels; returns (x, labels, seconds)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sdpipe_exe(), "generate", "--model", str(model), "--label", "all", "--n", str(n)]
    seconds = run_cmd([*cmd, "--seed", str(seed), "--out", str(out), "-q"], log)
    x, y = read_samples(out)
    expected = np.arange(n) % 10
    if len(y) != n or not np.array_equal(y, expected):
        raise SystemExit(f"{out}/samples.jsonl: labels do not cycle 0..9 (first: {y[:12].tolist()})")
    if x.shape[1] != 64:
        raise SystemExit(f"{out}: samples are not 8x8 ({x.shape[1]} pixels)")
    return x, y, seconds


def sample_sets(model: Path, work: Path, k: int, n: int, log: Path) -> tuple[Sets, float]:
    """K sets of n samples, seeds 1000000 + 1000*k; returns the sets and the total generation seconds."""
    sets, total = [], 0.0
    for j in range(k):
        x, y, s = generate(model, work / "samples" / f"set_{j}", n, SEED_BASE + SEED_STEP * j, log)
        sets.append((x, y))
        total += s
    return sets, total


def gaussian(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    """Frechet distance between N(mu1, c1) and N(mu2, c2)."""
    # tr sqrt(c1 c2) = tr sqrt(s c2 s) with s = c1^(1/2): a symmetric PSD matrix, so eigvalsh is exact and real
    w, v = linalg.eigh(c1)
    s = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
    tr_covmean = float(np.sqrt(np.maximum(linalg.eigvalsh(s @ c2 @ s), 0.0)).sum())
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * tr_covmean)


def nearest_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each row of a, the L2 distance to its nearest row of b."""
    return cdist(a, b).min(axis=1)


def two_sample_accuracy(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Cross-validated accuracy of an RBF SVC telling rows of a (0..16) from rows of b; 0.5 = indistinguishable."""
    x = np.concatenate([a, b]) / MAX_VALUE
    y = np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return float(cross_val_score(SVC(), x, y, cv=cv).mean())


@dataclass
class Judge:
    """Fitted on the training part, compares sample sets with the held-out part."""

    components: int = 32
    real_draws: int = 10
    seed: int = 0
    pca: PCA = field(init=False)
    x_train: np.ndarray = field(init=False)
    x_test: np.ndarray = field(init=False)
    test_gauss: tuple[np.ndarray, np.ndarray] = field(init=False)
    threshold: float = field(init=False)
    classifier: SVC = field(init=False)
    test_accuracy: float = field(init=False)
    real_two_sample: float = field(init=False)
    _fd_real: dict[int, float] = field(init=False, default_factory=dict)

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> Judge:
        self.x_train, self.x_test = np.asarray(x_train, float), np.asarray(x_test, float)
        self.pca = PCA(n_components=self.components, random_state=self.seed).fit(self.x_train)
        self.test_gauss = gaussian(self.pca.transform(self.x_test))
        self.threshold = float(np.percentile(nearest_distance(self.x_test, self.x_train), 1))
        self.classifier = SVC(kernel="rbf", C=10, gamma="scale").fit(self.x_train, y_train)
        self.test_accuracy = float((self.classifier.predict(self.x_test) == y_test).mean())
        rng = np.random.default_rng(self.seed)
        m = len(self.x_test)
        draws = [self.x_train[rng.choice(len(self.x_train), m, replace=False)] for _ in range(self.real_draws)]
        self.real_two_sample = float(np.mean([two_sample_accuracy(d, self.x_test, self.seed) for d in draws]))
        self._fd_real = {}
        return self

    def fd(self, x: np.ndarray) -> float:
        """Frechet distance of x's PCA features to the held-out part's."""
        return frechet(*gaussian(self.pca.transform(x)), *self.test_gauss)

    def fd_real(self, n: int) -> float:
        """Mean FD of n random training images (without replacement) to the held-out part, over real_draws."""
        n = min(n, len(self.x_train))
        if n not in self._fd_real:
            rng = np.random.default_rng(self.seed + 1)
            picks = [rng.choice(len(self.x_train), n, replace=False) for _ in range(self.real_draws)]
            self._fd_real[n] = float(np.mean([self.fd(self.x_train[i]) for i in picks]))
        return self._fd_real[n]

    def score(self, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The four figures (and the raw FD) of one sample set x (0..16) drawn for the given labels."""
        x = np.asarray(x, float)
        fd = self.fd(x)
        m = min(len(self.x_test), len(x))
        return {
            "fd_ratio": fd / self.fd_real(len(x)),
            "two_sample": two_sample_accuracy(x[:m], self.x_test[:m], self.seed),
            "near_copies": float((nearest_distance(x, self.x_train) < self.threshold).mean()),
            "label_accuracy": float((self.classifier.predict(x) == labels).mean()),
            "fd": fd,
        }


def interval(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean; (mean, nan, nan) for one value."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def bar_text(figure: str) -> str:
    op, bar = BARS[figure]
    return f"{op} {100 * bar:g}%" if figure in ("near_copies", "label_accuracy") else f"{op} {bar:g}"


def passes(figure: str, value: float) -> bool:
    op, bar = BARS[figure]
    return {"<=": value <= bar, "<": value < bar, ">=": value >= bar}[op]


def summarize(scores: list[dict[str, float]]) -> dict[str, dict]:
    """Per-set values, mean, 95 % interval and verdict of each figure over the sets."""
    out: dict[str, dict] = {}
    for fig in [*FIGURES, "fd"]:
        vals = [s[fig] for s in scores]
        mean, lo, hi = interval(vals)
        out[fig] = {"per_set": vals, "mean": mean, "ci95": [lo, hi]}
        if fig in BARS:
            out[fig]["bar"] = bar_text(fig)
            out[fig]["pass"] = passes(fig, mean)
    return out


def cycling_labels(n: int) -> np.ndarray:
    return np.arange(n) % 10


def draw_per_class(sp: Split, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each label, a training image of that class drawn at random (with replacement)."""
    out = np.empty((len(labels), sp.x_train.shape[1]))
    for c in np.unique(labels):
        pool = sp.x_train[sp.y_train == c]
        where = labels == c
        out[where] = pool[rng.integers(0, len(pool), where.sum())]
    return out


def class_gaussian(sp: Split, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each label, a draw from a Gaussian fitted to that class of the training part."""
    out = np.empty((len(labels), sp.x_train.shape[1]))
    for c in np.unique(labels):
        pool = sp.x_train[sp.y_train == c]
        where = labels == c
        out[where] = rng.multivariate_normal(pool.mean(0), np.cov(pool, rowvar=False), where.sum())
    return out


def references(sp: Split, k: int, n: int, seed: int = 0) -> dict[str, Sets]:
    """K draws of n images of each reference generator, labels cycling 0..9, values as read from PNGs."""
    labels = cycling_labels(n)
    gens: dict[str, Sets] = {
        "train copies": [],
        "train + noise 1.0": [],
        "train + noise 1.5": [],
        "class Gaussian": [],
    }
    for j in range(k):
        rng = np.random.default_rng([seed, j])
        copies = draw_per_class(sp, labels, rng)
        gens["train copies"].append((quantize(copies), labels))
        for sigma in (1.0, 1.5):
            noisy = copies + rng.normal(0.0, sigma, copies.shape)
            gens[f"train + noise {sigma}"].append((quantize(noisy), labels))
        gens["class Gaussian"].append((quantize(class_gaussian(sp, labels, rng)), labels))
    return gens


def fmt(fig: str, v: float) -> str:
    if fig in ("near_copies", "label_accuracy"):
        return f"{100 * v:.1f}%"
    return f"{v:.2f}" if fig == "fd" else f"{v:.3f}"


def table(results: dict[str, dict[str, dict]]) -> str:
    """One row per generator and figure."""
    head = f"{'generator':<20} {'figure':<15} {'mean':>7}  {'95% interval':<17} {'per set':<36} {'bar':<7} verdict"
    lines = [head, "-" * len(head)]
    for name, summary in results.items():
        for fig in [*FIGURES, "fd"]:
            s = summary[fig]
            lo, hi = s["ci95"]
            ci = f"[{fmt(fig, lo)}, {fmt(fig, hi)}]" if np.isfinite(lo) else "-"
            per = " ".join(fmt(fig, v) for v in s["per_set"])
            verdict = ("PASS" if s["pass"] else "FAIL") if "pass" in s else ""
            lines.append(
                f"{name:<20} {fig:<15} {fmt(fig, s['mean']):>7}  {ci:<17} {per:<36} {s.get('bar', ''):<7} {verdict}"
            )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "heldout_judge", help="work folder (WORK)")
    p.add_argument("--split-seed", type=int, default=0, help="random_state of the train/held-out split")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="sdpipe config (default examples/digits.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `sdpipe train --set` (repeatable), e.g. train.steps=200")  # fmt: skip
    p.add_argument("--sets", type=int, default=4, help="sample sets of 1000 (K)")
    p.add_argument("--n", type=int, default=N_SAMPLES, help="samples per set")
    p.add_argument("--model", type=Path, help="judge this saved model instead of training one")
    p.add_argument("--references", action="store_true", help="score the reference generators (alone: no training)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    work: Path = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "sdpipe.log"
    sp = split(args.split_seed)
    print(f"split (seed {args.split_seed}): {len(sp.y_train)} training, {len(sp.y_test)} held-out digits", flush=True)
    judge = Judge().fit(sp.x_train, sp.y_train, sp.x_test, sp.y_test)
    print(
        f"judge (fitted on the training part): held-out label accuracy {100 * judge.test_accuracy:.1f}%,"
        f" two-sample training vs held-out {judge.real_two_sample:.3f}, near-copy threshold {judge.threshold:.2f},"
        f" FD of {min(args.n, len(sp.y_train))} training images {judge.fd_real(args.n):.2f}",
        flush=True,
    )
    report: dict = {
        "split_seed": args.split_seed,
        "n_train": len(sp.y_train),
        "n_heldout": len(sp.y_test),
        "sets": args.sets,
        "n": args.n,
        "seeds": [SEED_BASE + SEED_STEP * j for j in range(args.sets)],
        "bars": {k: f"{op} {v}" for k, (op, v) in BARS.items()},
        "scale": {
            "heldout_label_accuracy": judge.test_accuracy,
            "two_sample_train_vs_heldout": judge.real_two_sample,
            "near_copy_threshold": judge.threshold,
            "fd_train_vs_heldout": judge.fd_real(args.n),
        },
        "results": {},
        "times_s": {},
    }
    results: dict[str, dict[str, dict]] = {}
    if args.references:
        t_ref = time.perf_counter()
        for name, sets in references(sp, args.sets, args.n, seed=args.split_seed).items():
            results[name] = summarize([judge.score(x, y) for x, y in sets])
        report["times_s"]["references_s"] = time.perf_counter() - t_ref
    if args.model is not None or not args.references:
        model = args.model
        if model is None:
            count = write_folder(sp.x_train, sp.y_train, sp.i_train, work / "train")
            print(f"wrote {count} PNGs under {work / 'train'}", flush=True)
            model, times = train(work, args.config.resolve(), args.overrides, log)
            report["times_s"].update(times)
            report["model"] = str(model)
            report["config"] = str(args.config)
            report["overrides"] = args.overrides
        sets, t_gen = sample_sets(model.resolve(), work, args.sets, args.n, log)
        report["times_s"]["generate_s"] = t_gen
        results["model"] = summarize([judge.score(x, y) for x, y in sets])
    report["results"] = results
    report["times_s"]["total_s"] = time.perf_counter() - t0
    (work / "judge.json").write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    print("times: " + ", ".join(f"{k} {v:.1f}" for k, v in report["times_s"].items()))
    print(f"wrote {work / 'judge.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
