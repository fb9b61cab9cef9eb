"""sdpipe's FID Inception-v3 port against torch-fidelity 0.4.0's own outputs.

tests/fixtures/inception_reference.npz holds what torch-fidelity's `FeatureExtractorInceptionV3` computed for
fixed inputs with deterministic random weights (tests/fixtures/make_inception_reference.py, run once; the real
weights file is not available offline). Here sdpipe's network gets the same weights and must give the same
features. A few seconds: 4 images at 299x299, on one thread (on a busy 2-core machine two threads can be
10x slower).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from sdpipe.evaluate import features as features_module
from sdpipe.evaluate.features import InceptionFeatures, sha256_file
from sdpipe.evaluate.inception import LOGITS_KEYS, FIDInceptionV3

FIXTURES = Path(__file__).parent / "fixtures"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_inception_reference", FIXTURES / "make_inception_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "inception_reference.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def weights_file_state(reference: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The random weights torch-fidelity used, laid out like the real weights file (fc included)."""
    shapes = [tuple(int(n) for n in s.split(",")) for s in reference["shapes"]]
    return _load_script().random_state_dict([str(k) for k in reference["keys"]], shapes)


@pytest.fixture(scope="module")
def net(weights_file_state: dict[str, torch.Tensor]) -> FIDInceptionV3:
    return FIDInceptionV3.from_state_dict(weights_file_state)


def _assert_matches(ours: np.ndarray, expected: np.ndarray) -> None:
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_keys_and_shapes_are_those_of_the_weights_file(reference: dict[str, np.ndarray]) -> None:
    ours = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items() if "num_batches_tracked" not in k}
    pairs = zip(reference["keys"], reference["shapes"], strict=True)
    theirs = {str(k): tuple(int(n) for n in s.split(",")) for k, s in pairs}
    assert theirs.pop("fc.weight") == (1008, 2048) and theirs.pop("fc.bias") == (1008,)  # logits: not needed
    assert set(LOGITS_KEYS) == {"fc.weight", "fc.bias"}
    assert ours == theirs
    assert len(ours) == 470  # 94 conv-BN layers x (conv weight + BN weight, bias, running mean, running var)


def test_stored_inputs_follow_the_recipe(reference: dict[str, np.ndarray]) -> None:
    for name, images in _load_script().reference_inputs().items():
        assert np.array_equal(reference[name], images), name


@pytest.mark.parametrize("name", ["random", "blocks"])  # 24x40 upscaled, 310x305 downscaled
def test_features_equal_torch_fidelity(net: FIDInceptionV3, reference: dict[str, np.ndarray], name: str) -> None:
    with torch.inference_mode():
        ours = net(torch.from_numpy(reference[f"{name}_rgb"])).numpy()
    assert ours.shape == (1, 2048) and ours.dtype == np.float32
    _assert_matches(ours, reference[f"features_{name}"])


def test_inception_features_of_grey_pixels_equal_torch_fidelity_of_rgb(
    weights_file_state: dict[str, torch.Tensor], reference: dict[str, np.ndarray]
) -> None:
    extractor = InceptionFeatures.from_state_dict_unchecked(weights_file_state)
    grey = reference["digits_grey"]  # (2, 8, 8): torch-fidelity got them repeated to (2, 3, 8, 8)
    feats = extractor.features(grey)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    _assert_matches(feats, reference["features_digits"])
    assert np.abs(feats[0] - feats[1]).max() > 0.1  # different digits, different features
    assert "unchecked" in extractor.name


def test_weights_file_loads_through_the_checked_path(
    tmp_path: Path, weights_file_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "weights.pth"
    torch.save(weights_file_state, path)
    # pretend this is the FID file, so InceptionFeatures' own path (sha256 check, then torch.load) runs
    monkeypatch.setattr(features_module, "INCEPTION_SHA256", sha256_file(path))
    extractor = InceptionFeatures(path)
    assert extractor.name == "inception-v3-2015-12-05-pool3"
    loaded = extractor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights_file_state.items() if k not in LOGITS_KEYS)
    assert not extractor.model.training


def test_weights_must_match_every_key(weights_file_state: dict[str, torch.Tensor]) -> None:
    with_counters = FIDInceptionV3.from_state_dict(weights_file_state).state_dict()
    assert any(k.endswith("num_batches_tracked") for k in with_counters)
    FIDInceptionV3.from_state_dict(with_counters)  # a file saved from a module, with BN counters, loads too
    missing = dict(weights_file_state)
    del missing["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        FIDInceptionV3.from_state_dict(missing)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        FIDInceptionV3.from_state_dict({**weights_file_state, "AuxLogits.fc.weight": torch.zeros(1)})
