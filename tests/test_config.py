"""Config loading: defaults <- YAML <- dotted overrides, with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hybridvision.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    cli_main,
    config_to_dict,
    load_config,
    parse_cli,
    save_config,
)


@dataclass
class StageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


def test_overrides_are_typed():
    cfg = parse_cli(
        StageConfig,
        [
            "train.max_steps=10",
            "optim.lr=3e-4",
            "data.image_size=[32,48]",
            "model.overrides.depth=2",
            "optim.lr_mult.decoder=10",
            "data.window=null",
            "train.mixed_precision=bf16",
            "data.val_ids=25,26",
        ],
    )
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.image_size == (32, 48)
    assert cfg.model.overrides == {"depth": 2}
    assert cfg.optim.lr_mult == {"decoder": 10.0}
    assert cfg.data.window is None
    assert cfg.data.val_ids == ["25", "26"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  batch_size: 3\noptim:\n  lr: 0.01\n")
    cfg = load_config(StageConfig, path, ["train.batch_size=5"])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.optim.lr) == (7, 5, 0.01)


def test_unknown_key_names_key_and_suggestion():
    with pytest.raises(ConfigError) as exc:
        parse_cli(StageConfig, ["train.max_stpes=3"])
    assert "train.max_stpes" in str(exc.value) and "train.max_steps" in str(exc.value)


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(StageConfig, path)
    assert str(path) in str(exc.value) and "optim.learning_rate" in str(exc.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
        (
            "train.mixed_precision=fp8",
            "train.mixed_precision: expected one of 'auto' | 'no' | 'bf16' | 'fp16'",
        ),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("train.max_steps=-1", "max_steps must be > 0"),
        ("train.max_steps.x=1", "train.max_steps is a int, it has no sub-keys"),
        ("train.max_steps", "not of the form key=value"),
    ],
)
def test_bad_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_cli(StageConfig, [override])
    assert fragment in str(exc.value)


def test_cli_main_exits_2_without_traceback(capsys):
    ran = []
    code = cli_main(StageConfig, ran.append, ["train.bogus_key=1"])
    err = capsys.readouterr().err
    assert code == 2 and not ran
    assert "bogus_key" in err and "Traceback" not in err


def test_saved_config_round_trips(tmp_path):
    cfg = parse_cli(StageConfig, ["train.max_steps=3", "data.image_size=[16,24]"])
    save_config(cfg, tmp_path / "run.yaml")
    again = load_config(StageConfig, tmp_path / "run.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_yaml_replaces_free_form_dicts_whole(tmp_path):
    """A dict-valued field in a file means exactly what the file says (no default terms left over)."""
    from finetune.config import FinetuneConfig

    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  weights: {ce: 1.0, dice: 1.0}\noptim:\n  lr_mult: {decoder: 10}\n")
    cfg = load_config(FinetuneConfig, path)
    assert cfg.loss.weights == {"ce": 1.0, "dice": 1.0}
    assert cfg.optim.lr_mult == {"decoder": 10.0}
    # sections still merge key by key: an untouched section keeps its defaults
    assert cfg.train.max_steps == FinetuneConfig().train.max_steps
    # a dotted override edits one key of the dict
    cfg = load_config(FinetuneConfig, path, ["loss.weights.focal=0.5"])
    assert cfg.loss.weights == {"ce": 1.0, "dice": 1.0, "focal": 0.5}
