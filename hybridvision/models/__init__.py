"""Model zoo: hybrid Transformer-CNN encoders, decoders and segmenters behind one contract.

Public API::

    create_encoder(name, in_chans=3, weights=None, **overrides)
    create_segmenter(name, num_classes, in_chans=3, **overrides)
    list_models()
    from_pretrained(path_or_hub_id)
    save_pretrained(model, directory)
"""

from __future__ import annotations

from . import decoders as _decoders  # noqa: F401  (registers decoders)
from . import encoders as _encoders  # noqa: F401  (registers encoders and segmenters)
from .base import Encoder, Segmenter
from .factory import create_decoder, create_encoder, create_segmenter, list_models
from .hub import from_pretrained, save_pretrained
from .registry import UnknownModelError

__all__ = [
    "Encoder",
    "Segmenter",
    "UnknownModelError",
    "create_decoder",
    "create_encoder",
    "create_segmenter",
    "from_pretrained",
    "list_models",
    "save_pretrained",
]
