"""Decoders and heads. Importing a module registers its decoders."""

from . import classification, segformer_head, swin_unet, unet  # noqa: F401
