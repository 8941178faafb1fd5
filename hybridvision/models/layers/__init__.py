"""Reusable layers: attention variants, MLPs, norms, fusion modules, positional embeddings."""

from .attention import Attention
from .common import ConvNormAct, DropPath, LayerNorm2d, Mlp, drop_path, trunc_normal_init

__all__ = ["Attention", "ConvNormAct", "DropPath", "LayerNorm2d", "Mlp", "drop_path", "trunc_normal_init"]
