"""The full default demo, judged independently (minutes: marked slow, run by `make test-slow` and CI).

Also checks that a plain diffusers sampling loop over the saved folders, with no sdpipe code, gives digits
the judge recognises.
"""

import json

import diffusers
import pytest
import torch
from diffusers import UNet2DModel

from sdpipe.config import load_config
from sdpipe.data import load_dataset
from sdpipe.evaluate import Judge
from sdpipe.pipeline import DemoResult, run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    result = run_demo(load_config(), tmp_path_factory.mktemp("demo"), show_progress=False)
    d = result.metrics["evaluation"]["default"]
    print(
        json.dumps({k: d[k] for k in ("fd_ratio", "label_accuracy", "near_copy_share")}),
        f"total {result.metrics['timings_s']['total']:.0f}s",
    )
    return result


def test_default_demo_meets_label_and_copy_bars(demo: DemoResult) -> None:
    default = demo.metrics["evaluation"]["default"]
    assert default["n"] == 1000
    assert default["label_accuracy"] >= 0.95
    assert default["near_copy_share"] < 0.02
    assert default["fd_ratio"] <= 3.0  # regression guard: the default recipe measured 2.37 here (14 steps)


@pytest.mark.xfail(strict=True, reason="the foundation issue's FD-ratio bar of 2.0 is not met yet (2.24)")
def test_default_demo_meets_fd_bar(demo: DemoResult) -> None:
    assert demo.metrics["evaluation"]["default"]["fd_ratio"] <= 2.0


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
    data = load_dataset(load_config().data)
    score = Judge.fit(data.images, data.labels).score(digits, labels.numpy())
    assert score["label_accuracy"] >= 0.95
    assert score["fd_ratio"] <= 3.0
