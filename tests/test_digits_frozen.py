"""Digits images stay bit for bit what commit 145f670 made (ARCHITECTURE.md, "Design: components and
conditioning", §5 step 1), through the CLI's `generate_files` and the server's `run_jobs`.

The expected bytes come from `legacy_digits`, a frozen copy of 145f670's generation code: never edit it to make
this test pass. Each model is a tiny random one, saved once per module for each formulation (ddpm, edm) and each
micro-batch (the server takes it from the model's saved `sample.micro_batch`; the CLI from `SampleSpec`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import legacy_digits as legacy
from conftest import TINY, random_model
from sdpipe.models import LoadedModel, load_model
from sdpipe.sampling import SampleSpec
from sdpipe.sampling.files import generate_files
from sdpipe.serve.batching import GenerateJob, run_jobs

STEPS = 3
GUIDANCES = (1.0, 2.0)
MICRO_BATCHES = (1, 4)
NS = (1, 5)
# the config changes (on top of TINY) that make each formulation's model
FORMULATIONS = {
    "ddpm": [],
    "edm": ["diffusion.formulation=edm", "train.loss_weighting=edm"],
}
SAMPLERS = {
    "ddpm": ["ddpm", "ddim", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"],
    "edm": ["euler", "dpmpp_2m", "dpmpp_2m_karras"],
}


@dataclass(frozen=True)
class Case:
    formulation: str
    sampler: str
    guidance: float
    micro_batch: int
    n: int
    label: str = "all"
    seed: int = 3  # not a multiple of 4: the first micro-batch of 4 is partly padding

    def __str__(self) -> str:
        return f"{self.formulation}-{self.sampler}-g{self.guidance}-mb{self.micro_batch}-n{self.n}-{self.label}"

    def spec(self, spec_type: type = SampleSpec) -> SampleSpec:
        return spec_type(sampler=self.sampler, steps=STEPS, guidance=self.guidance, micro_batch=self.micro_batch)


CASES = [
    Case(f, sampler, guidance, m, n)
    for f in FORMULATIONS
    for sampler in SAMPLERS[f]
    for guidance in GUIDANCES
    for m in MICRO_BATCHES
    for n in NS
] + [  # one fixed label
    Case("ddpm", "ddpm", 2.0, 4, 5, label="3", seed=10),
    Case("ddpm", "heun", 1.0, 1, 1, label="3", seed=10),
    Case("ddpm", "unipc", 2.0, 1, 5, label="3", seed=10),
    Case("edm", "dpmpp_2m_karras", 2.0, 4, 5, label="3", seed=10),
    Case("edm", "euler", 1.0, 4, 1, label="3", seed=10),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the module's many tiny forward passes run faster on a shared CPU. Expected and actual
    bytes are both made in this process, so the thread count cannot make them differ."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], LoadedModel]:
    """(formulation, saved sample.micro_batch) -> the loaded model; the same weights for both micro-batches."""
    root = tmp_path_factory.mktemp("frozen_models")
    return {
        (f, m): load_model(random_model(root / f"{f}_mb{m}", sets=[*TINY, *extra, f"sample.micro_batch={m}"]))
        for f, extra in FORMULATIONS.items()
        for m in MICRO_BATCHES
    }


@pytest.fixture(scope="module")
def legacy_cache() -> dict[Case, list[bytes]]:
    return {}


def expected(case: Case, models: dict, cache: dict[Case, list[bytes]]) -> list[bytes]:
    """The PNG files 145f670 wrote for this case (computed once per module)."""
    if case not in cache:
        model = models[case.formulation, case.micro_batch]
        cache[case] = legacy.legacy_pngs(model, case.label, case.n, case.seed, case.spec(legacy.SampleSpec))
    return cache[case]


def differences(got: list[bytes], want: list[bytes]) -> list[str]:
    """What differs, image by image: pixels, or which text chunks (empty: the same bytes)."""
    if len(got) != len(want):
        return [f"{len(got)} images instead of {len(want)}"]
    found = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g == w:
            continue
        with Image.open(io.BytesIO(g)) as a, Image.open(io.BytesIO(w)) as b:
            if a.tobytes() != b.tobytes():
                found.append(f"image {i}: pixels differ")
            else:
                keys = sorted(k for k in set(a.text) | set(b.text) if a.text.get(k) != b.text.get(k))
                found.append(f"image {i}: text chunks {keys} differ" if keys else f"image {i}: PNG encoding differs")
    return found


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cli_files_equal_legacy(case: Case, models: dict, legacy_cache: dict, tmp_path: Path) -> None:
    model = models[case.formulation, case.micro_batch]
    out = tmp_path / "out"
    generate_files(model, out, label=case.label, n=case.n, seed=case.seed, spec=case.spec(), show_progress=False)
    names = [f"{i:05d}.png" for i in range(case.n)]
    assert sorted(p.name for p in out.glob("*.png")) == names
    bad = differences([(out / name).read_bytes() for name in names], expected(case, models, legacy_cache))
    assert not bad, f"not the bytes 145f670 wrote: {bad}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_server_pngs_equal_legacy(case: Case, models: dict, legacy_cache: dict) -> None:
    model = models[case.formulation, case.micro_batch]  # the server's micro-batch is the model's saved one
    job = GenerateJob(
        n=case.n, seed=case.seed, label=case.label, steps=STEPS, sampler=case.sampler, guidance=case.guidance
    )
    run_jobs(model, [job])
    got = [base64.b64decode(im.png_base64) for im in job.future.result(timeout=0).images]
    bad = differences(got, expected(case, models, legacy_cache))
    assert not bad, f"not the bytes 145f670 served: {bad}"


def test_server_jobs_sharing_micro_batches_equal_legacy(models: dict, legacy_cache: dict) -> None:
    """Jobs merged into one batch (overlapping seeds, other labels, and one with other settings) each get the
    bytes they would get alone."""
    m = 4
    cases = [
        Case("ddpm", "ddpm", 2.0, m, 5, label="all", seed=3),
        Case("ddpm", "ddpm", 2.0, m, 3, label="3", seed=5),
        Case("ddpm", "ddpm", 2.0, m, 2, label="7", seed=6),
        Case("ddpm", "dpmpp_2m", 1.0, m, 2, label="all", seed=4),
    ]
    jobs = [
        GenerateJob(n=c.n, seed=c.seed, label=c.label, steps=STEPS, sampler=c.sampler, guidance=c.guidance)
        for c in cases
    ]
    run_jobs(models["ddpm", m], jobs)
    for case, job in zip(cases, jobs, strict=True):
        got = [base64.b64decode(im.png_base64) for im in job.future.result(timeout=0).images]
        bad = differences(got, expected(case, models, legacy_cache))
        assert not bad, f"{case}: not the bytes 145f670 served: {bad}"


@pytest.mark.parametrize("formulation", list(FORMULATIONS))
def test_frozen_cases_are_sensitive(formulation: str, models: dict, legacy_cache: dict) -> None:
    """The random models make images worth freezing: many grey levels, and changed by guidance for every sampler.

    Except heun's levels: on the cosine schedule its first (trapezoidal) step spans sigma 20291 -> ~1, which at
    3 steps (as at 14) leaves values of order 1e4, so its images are 0 or 255 and its cases freeze only which."""

    def pixels(case: Case) -> np.ndarray:
        with Image.open(io.BytesIO(expected(case, models, legacy_cache)[0])) as im:
            return np.asarray(im)

    for sampler in SAMPLERS[formulation]:
        plain, guided = (pixels(Case(formulation, sampler, g, 4, 5)) for g in GUIDANCES)
        levels = len(np.unique(plain))
        assert levels >= (2 if sampler == "heun" else 16), f"{sampler}: {levels} grey levels"
        assert not np.array_equal(plain, guided), f"{sampler}: guidance changes nothing"
