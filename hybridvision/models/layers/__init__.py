"""Reusable layers: attention variants, MLPs, norms, fusion modules, positional embeddings."""

from .attention import Attention
from .common import ConvNormAct, DropPath, LayerNorm2d, Mlp, drop_path, trunc_normal_init
from .fusion import (
    FUSIONS,
    ChannelSpatialAttentionFusion,
    CrossAttentionFusion,
    DynamicFeatureSelector,
    MultiScaleFeatureAggregation,
    create_fusion,
)
from .linear_attention import LinearAttention, linear_attention
from .pos_embed import interpolate_pos_embed, sincos_2d_pos_embed
from .sr_attention import SpatialReductionAttention
from .visible_tokens import VisibleTokens, visible_swin_stack, visible_token_blocks, window_groups
from .window_attention import (
    SwinBlockStack,
    SwinTransformerBlock,
    WindowAttention,
    drop_path_rates,
    window_partition,
    window_reverse,
)

__all__ = [
    "FUSIONS",
    "Attention",
    "ChannelSpatialAttentionFusion",
    "ConvNormAct",
    "CrossAttentionFusion",
    "DropPath",
    "DynamicFeatureSelector",
    "LayerNorm2d",
    "LinearAttention",
    "Mlp",
    "MultiScaleFeatureAggregation",
    "SpatialReductionAttention",
    "SwinBlockStack",
    "SwinTransformerBlock",
    "VisibleTokens",
    "WindowAttention",
    "create_fusion",
    "drop_path",
    "drop_path_rates",
    "interpolate_pos_embed",
    "linear_attention",
    "sincos_2d_pos_embed",
    "trunc_normal_init",
    "visible_swin_stack",
    "visible_token_blocks",
    "window_groups",
    "window_partition",
    "window_reverse",
]
