"""Typed configuration: nested dataclasses, YAML files and dotted command-line overrides.

Every stage describes its configuration as a tree of dataclasses (``TrainConfig``,
``OptimConfig``, ``DataConfig``, ``ModelConfig`` + the stage's own sections). A run's
configuration is built in three layers::

    defaults (the dataclasses) <- --config file.yaml <- key=value overrides (train.max_steps=10)

Unknown keys and badly typed values raise :class:`ConfigError`, whose message names the key
(``train.batch_size``, as typed), the value, the expected type and the closest valid keys. Stage
scripts call :func:`cli_main`, which turns every user error (bad keys or values, missing or
unreadable files, unwritable ``train.output_dir``, a NaN-loss stop) into one ``error: ...`` line
on stderr and exit status 2, without a traceback unless ``HYBRIDVISION_DEBUG=1``. ``--help``
lists every key with its default and the one-line comment written next to its field.
"""

from __future__ import annotations

from .cli import check_output_dir, cli_main, field_descriptions, help_text, parse_cli, user_error_message
from .errors import ConfigError, field_error
from .loading import apply_overrides, config_to_dict, load_config, save_config
from .sections import DataConfig, ModelConfig, OptimConfig, TrainConfig

__all__ = [
    "ConfigError",
    "TrainConfig",
    "OptimConfig",
    "DataConfig",
    "ModelConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "save_config",
    "cli_main",
    "help_text",
    "field_descriptions",
    "user_error_message",
    "check_output_dir",
    "field_error",
    "parse_cli",
]
