"""The config: YAML + `--set` overrides, typed; every mistake is refused naming the key and what it takes."""

from pathlib import Path

import pytest

from sdpipe.config import MAX_SEED, ConfigError, PipelineConfig, load_config, parse_override, validate_section

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"


def test_a_saved_config_loads_back_to_the_same_config() -> None:
    """What a run saves (RUN/config.yaml, checkpoints, sdpipe.json) is the JSON dump; `--resume` starts from it
    and applies --set on top, leaving the saved tree as it was."""
    cfg = load_config(None, ["train.steps=7", "model.block_out_channels=[8, 16]", "model.norm_num_groups=8"])
    saved = cfg.model_dump(mode="json")
    assert load_config(base=saved) == cfg
    resumed = load_config(None, ["sample.steps=3"], base=saved)
    assert (resumed.sample.steps, resumed.train.steps, resumed.model.block_out_channels) == (3, 7, [8, 16])
    assert saved["sample"]["steps"] == cfg.sample.steps  # not changed by the override


def test_example_file_is_the_demo_default() -> None:
    """examples/digits.yaml documents the demo's settings; it must not drift from the built-in defaults."""
    assert load_config(EXAMPLE) == PipelineConfig()


def test_override_values_are_read_as_yaml_and_the_last_one_wins() -> None:
    cfg = load_config(
        None,
        [
            "diffusion.formulation=ddpm",
            "train.loss_weighting=uniform",
            "train.loss_weighting=min_snr",  # given twice: the later one counts
            "train.validate_every=null",
            "train.trackers=[tensorboard]",
            "train.learning_rate=1.5e-3",
            "data.path=a=b",  # only the first '=' separates key and value
            "sample.sampler=ddim",
        ],
    )
    assert cfg.train.loss_weighting == "min_snr"
    assert cfg.train.validate_every is None and cfg.train.trackers == ["tensorboard"]
    assert cfg.train.learning_rate == 0.0015 and cfg.data.path == "a=b" and cfg.sample.sampler == "ddim"
    assert parse_override(" train.steps = 12") == ("train.steps", 12)
    assert parse_override("data.path=") == ("data.path", "")


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stepz=5"])
    msg = str(err.value)
    assert "train.stepz" in msg and "unknown key" in msg
    assert "steps" in msg and "checkpoint_every" in msg  # the allowed keys are listed


def test_unknown_section_lists_the_sections() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trian.steps=5"])
    assert "trian: unknown key; allowed here: data, diffusion, evaluate, model, sample, train" in str(err.value)


def test_every_mistake_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.steps=many", "sample.guidance=99", "model.layers_per_block=0"])
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid configuration:"
    keys = sorted(line.split(":")[0].strip() for line in lines[1:])
    assert keys == ["model.layers_per_block", "sample.guidance", "train.steps"]


def test_out_of_range_names_key_and_bound() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: .*greater than or equal to 1"):
        load_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"train\.label_dropout: .*less than or equal to 1"):
        load_config(None, ["train.label_dropout=1.5"])


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64])
def test_seeds_outside_0_to_2_32_are_refused(seed: int) -> None:
    """torch takes seeds up to 2^64 and wraps negative ones; the config takes what the CLI and server take."""
    with pytest.raises(ConfigError, match=r"train\.seed"):
        load_config(None, [f"train.seed={seed}"])


def test_the_largest_seed_is_taken() -> None:
    assert MAX_SEED == 2**32 - 1
    assert load_config(None, [f"train.seed={MAX_SEED}"]).train.seed == MAX_SEED


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sample.sampler=plms"])
    assert "sample.sampler" in str(err.value) and "dpmpp_2m" in str(err.value) and "unipc" in str(err.value)


def test_combinations_are_checked_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"attention_levels \[5\] out of range: allowed 0\.\.1"):
        load_config(None, ["model.attention_levels=[5]"])
    with pytest.raises(ConfigError, match=r"block_out_channels \[24\] are not multiples of norm_num_groups"):
        load_config(None, ["model.block_out_channels=[32, 24]"])
    with pytest.raises(ConfigError, match="sigma_min must be below"):
        load_config(None, ["diffusion.sigma_min=100"])
    with pytest.raises(ConfigError, match="'ddim' has no EDM scheduler"):
        load_config(None, ["sample.sampler=ddim"])  # the default formulation is edm


def test_one_section_alone_names_its_keys() -> None:
    """A saved model's sample settings with a user's changes (generate --steps) are checked the same way."""
    assert validate_section("sample", {"steps": 30}).steps == 30
    with pytest.raises(ConfigError, match=r"sample\.steps: .*less than or equal to 1000"):
        validate_section("sample", {"steps": 5000})


def test_malformed_override_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.steps")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("=5")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        load_config(None, ["train.steps=3", "train.steps.x=1"])


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 11\n  batch_size: 4\n")
    cfg = load_config(f, ["train.steps=12"])
    assert (cfg.train.steps, cfg.train.batch_size) == (12, 4)
    assert cfg.train.learning_rate == PipelineConfig().train.learning_rate  # what the file leaves out: defaults
