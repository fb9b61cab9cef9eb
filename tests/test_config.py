from pathlib import Path

import pytest

from sdpipe.config import ConfigError, PipelineConfig, load_config, parse_override

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.yaml"


def test_defaults_are_valid_and_have_required_keys() -> None:
    cfg = load_config()
    assert cfg.train.steps >= 1
    assert cfg.train.checkpoint_every >= 1


def test_example_file_is_the_demo_default() -> None:
    """examples/digits.yaml documents the demo's settings; it must not drift from the built-in defaults."""
    assert load_config(EXAMPLE) == PipelineConfig()


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config(
        None,
        [
            "train.steps=7",
            "model.block_out_channels=[8, 16]",
            "sample.sampler=ddim",
            "diffusion.formulation=ddpm",  # DDIM has no EDM scheduler
            "train.loss_weighting=uniform",
            "train.loss_weighting=min_snr",
            "model.norm_num_groups=8",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.model.block_out_channels == [8, 16]
    assert cfg.sample.sampler == "ddim"
    assert cfg.train.loss_weighting == "min_snr"


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stepz=5"])
    msg = str(err.value)
    assert "train.stepz" in msg and "unknown key" in msg
    assert "steps" in msg and "checkpoint_every" in msg  # the allowed keys are listed


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.steps=5"])


def test_wrong_type_is_rejected_with_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=many"])


def test_out_of_range_is_rejected_with_bound() -> None:
    with pytest.raises(ConfigError, match=r"train\.steps.*greater than or equal to 1"):
        load_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"train\.label_dropout"):
        load_config(None, ["train.label_dropout=1.5"])


def test_bad_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sample.sampler=plms"])
    assert "sample.sampler" in str(err.value) and "dpmpp_2m" in str(err.value) and "unipc" in str(err.value)


def test_cross_field_check() -> None:
    with pytest.raises(ConfigError, match="attention_levels"):
        load_config(None, ["model.attention_levels=[5]"])


def test_malformed_override_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("train.steps")
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
    with pytest.raises(ConfigError, match="is a value"):
        load_config(None, ["train.steps=3", "train.steps.x=1"])


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 11\n  batch_size: 4\n")
    cfg = load_config(f, ["train.steps=12"])
    assert (cfg.train.steps, cfg.train.batch_size) == (12, 4)
