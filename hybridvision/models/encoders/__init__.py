"""Encoder families. Importing a family module registers its presets."""

from . import hf_backbone, hybrid, mit, parallel, resnet, sequential, swin, timm_backbone, transunet  # noqa: F401
