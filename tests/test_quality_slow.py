"""The full default demo and the demo's bar as an outside judge measures it (minutes: marked slow, run by
`make test-slow` and CI).

Every figure is against held-out digits the model never trained on, as the mean of 4 sample sets of 1000; the
guards sit just above what was measured (README, "Measured"), so a recipe that gets worse fails here. Also
checks that a plain diffusers sampling loop over the saved folders, with no sdpipe code, gives digits the
judge recognises.
"""

import json
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import UNet2DModel

from sdpipe.config import EvaluateConfig, load_config
from sdpipe.data.imageset import split_arrays
from sdpipe.evaluate.run import fit_judge
from sdpipe.pipeline import DemoResult, run_demo

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    result = run_demo(load_config(), tmp_path_factory.mktemp("demo"), show_progress=False)
    d = result.metrics["evaluation"]["default"]
    print(json.dumps(d["intervals"]), f"total {result.metrics['timings_s']['total']:.0f}s")
    return result


def test_default_demo_meets_its_bars(demo: DemoResult) -> None:
    d = demo.metrics["evaluation"]["default"]
    assert d["n"] == 1000 and d["sets"] == 4
    assert d["label_accuracy"] >= 0.95
    assert d["near_copy_share"] < 0.02
    assert d["two_sample_accuracy"] <= 0.55
    # regression guard at the top of what was measured: 1.26, 95 % interval 0.97-1.56 (sets 1.10-1.50); the
    # outside judge's tighter sets guard the same recipe more closely below
    assert d["fd_ratio"] <= 1.45


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """bench/heldout_judge.py: its own split, a folder of PNGs, `sdpipe data validate/train/generate`."""
    sys.path.insert(0, str(BENCH))
    import heldout_judge

    work = tmp_path_factory.mktemp("outside")
    assert heldout_judge.main(["--work", str(work), "--sets", "4"]) == 0
    return json.loads((work / "judge.json").read_text())["results"]["model"]


def test_outside_judge_bars(outside: dict) -> None:
    assert outside["two_sample"]["mean"] <= 0.55
    assert outside["near_copies"]["mean"] < 0.02
    assert outside["label_accuracy"]["mean"] >= 0.95
    assert outside["fd_ratio"]["mean"] <= 1.32  # regression guard: measured 1.21 (1.15-1.27), README


def test_vanilla_diffusers_loop_gives_recognisable_digits(demo: DemoResult) -> None:
    model_dir = demo.out / "model"
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet").eval()
    cls_name = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    sched = getattr(diffusers, cls_name).from_pretrained(model_dir, subfolder="scheduler")
    labels = torch.arange(200) % 10
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * sched.init_noise_sigma
    sched.set_timesteps(20)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t, class_labels=labels).sample, t, x).prev_sample
    digits = ((x.clamp(-1, 1) + 1) / 2 * 16).round().numpy()
    cfg = load_config().data
    score = fit_judge(split_arrays(cfg, "train"), split_arrays(cfg, "test"), EvaluateConfig()).score(
        digits, labels.numpy()
    )
    assert score["label_accuracy"] >= 0.95
    assert score["fd_ratio"] <= 1.6  # one set of 200, a plain Euler loop
