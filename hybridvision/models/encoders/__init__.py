"""Encoder families. Importing a family module registers its presets."""

from . import hybrid, mit, parallel, resnet, sequential, swin, transunet  # noqa: F401
