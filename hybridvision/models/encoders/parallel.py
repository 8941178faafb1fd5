"""Parallel CNN + Transformer hybrid encoder (TransFuse-style two streams fused at every scale).

A shared conv stem feeds two streams that run side by side over four scales: a CNN stream of
ConvNeXt blocks (local detail) and a Transformer stream (global context; linear attention at the
high-resolution scales, softmax attention at the low-resolution ones). At each scale a fusion
module (``layers.fusion``) merges the two maps; the fused map is that scale's output feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..layers.common import LayerNorm2d, trunc_normal_init
from ..layers.fusion import FUSIONS, create_fusion
from ..registry import register_presets
from .hybrid import ConvStage, TransformerStage, conv_stem, downsample, drop_path_rates

__all__ = ["ParallelStageConfig", "ParallelConfig", "ParallelHybridEncoder", "PRESETS"]


@dataclass(frozen=True)
class ParallelStageConfig:
    """One scale of a :class:`ParallelHybridEncoder` (both streams and the fused output have ``dim``)."""

    dim: int  #: channels of both streams and of the fused output
    cnn_depth: int  #: ConvNeXt blocks in the CNN stream
    transformer_depth: int  #: attention blocks in the Transformer stream
    num_heads: int  #: attention heads
    attention: Literal["softmax", "linear", "window"] = "softmax"  #: Transformer-stream attention
    window_size: int = 8  #: window side when ``attention == "window"``
    mlp_ratio: float = 4.0  #: hidden / dim of the block MLPs

    def __post_init__(self) -> None:
        if self.dim < 1 or self.cnn_depth < 1 or self.transformer_depth < 1:
            raise ValueError(f"dim and depths must be >= 1, got {self}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must be >= 1 and divide dim {self.dim}")
        if self.attention not in ("softmax", "linear", "window"):
            raise ValueError(f"attention must be 'softmax', 'linear' or 'window', got {self.attention!r}")


@dataclass(frozen=True)
class ParallelConfig:
    """Architecture of a :class:`ParallelHybridEncoder`."""

    stages: tuple[ParallelStageConfig, ...]  #: four scales at reductions 4, 8, 16, 32 (dicts are converted)
    fusion: str = "gating"  #: ``layers.fusion.FUSIONS`` name used at every scale
    drop_path_rate: float = 0.0  #: stochastic depth, increased linearly over the blocks of each stream
    layer_scale_init: float = 1e-6  #: initial layer-scale value; 0 disables layer scale
    conv_kernel_size: int = 7  #: depthwise kernel of the ConvNeXt blocks

    def __post_init__(self) -> None:
        stages = tuple(
            s if isinstance(s, ParallelStageConfig) else ParallelStageConfig(**s) for s in self.stages
        )
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("ParallelConfig needs at least one stage")
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r}; valid fusions: {', '.join(sorted(FUSIONS))}")


class ParallelHybridEncoder(Encoder):
    """CNN and Transformer streams side by side, fused per scale.

    TransFuse (Zhang et al., 2021, arXiv:2102.08005); Conformer (Peng et al., 2021).

    Stem (stride 4) -> [CNN stage i || Transformer stage i] -> fusion i -> LayerNorm -> feature i,
    each stream downsampling by 2 between scales. Masking: the mask token replaces masked positions
    after the stem; the CNN stream is zeroed after every block and each fused output is zeroed
    (fusion modules are convolutional); the Transformer stream is not re-masked.

    Args:
        config: the architecture.
        in_chans: input channels.
    """

    def __init__(self, config: ParallelConfig, in_chans: int = 3):
        super().__init__()
        self.config = config
        stages = config.stages
        self.stem = conv_stem(in_chans, stages[0].dim, 4)
        cnn_rates = drop_path_rates(config.drop_path_rate, [s.cnn_depth for s in stages])
        transformer_rates = drop_path_rates(config.drop_path_rate, [s.transformer_depth for s in stages])
        self.cnn_downsamples, self.transformer_downsamples = nn.ModuleList(), nn.ModuleList()
        self.cnn_stages, self.transformer_stages = nn.ModuleList(), nn.ModuleList()
        self.fusions, self.norms = nn.ModuleList(), nn.ModuleList()
        prev_dim = stages[0].dim
        for i, stage in enumerate(stages):
            stride = 1 if i == 0 else 2
            self.cnn_downsamples.append(downsample(prev_dim, stage.dim, stride))
            self.transformer_downsamples.append(downsample(prev_dim, stage.dim, stride))
            self.cnn_stages.append(
                ConvStage(
                    stage.dim,
                    stage.cnn_depth,
                    stage.mlp_ratio,
                    config.conv_kernel_size,
                    cnn_rates[i],
                    config.layer_scale_init,
                )  # fmt: skip
            )
            self.transformer_stages.append(
                TransformerStage(
                    stage.dim,
                    stage.transformer_depth,
                    stage.num_heads,
                    stage.mlp_ratio,
                    stage.attention,
                    stage.window_size,
                    transformer_rates[i],
                    config.layer_scale_init,
                )  # fmt: skip
            )
            self.fusions.append(
                create_fusion(config.fusion, stage.dim, stage.dim, stage.dim, norm_layer=LayerNorm2d)
            )
            self.norms.append(LayerNorm2d(stage.dim))
            prev_dim = stage.dim
        self.out_channels = tuple(s.dim for s in stages)
        self.reductions = tuple(4 * 2**i for i in range(len(stages)))
        self.size_divisor = self.reductions[-1]
        self.mask_token_dim = stages[0].dim
        self.apply(trunc_normal_init)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        cnn = transformer = apply_token_mask(self.stem(x), mask, mask_token)  # (B, C1, H/4, W/4)
        features = []
        for i in range(len(self.cnn_stages)):
            cnn = self.cnn_stages[i](self.cnn_downsamples[i](cnn), mask)  # zeroed after every block
            transformer = self.transformer_stages[i](self.transformer_downsamples[i](transformer))
            fused = self.norms[i](self.fusions[i](cnn, transformer))  # (B, C_i, H/r_i, W/r_i)
            features.append(apply_token_mask(fused, mask, None))
        return features

    def no_weight_decay(self) -> set[str]:
        """Names of the relative position bias tables, excluded from weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}


def _four_scales(
    dims: tuple[int, int, int, int],
    cnn_depths: tuple[int, int, int, int],
    transformer_depths: tuple[int, int, int, int],
    heads: tuple[int, int, int, int],
) -> tuple[ParallelStageConfig, ...]:
    """Linear attention at strides 4 and 8 (O(N) global context), softmax attention at 16 and 32."""
    attention: tuple[Literal["softmax", "linear", "window"], ...] = ("linear", "linear", "softmax", "softmax")
    return tuple(
        ParallelStageConfig(dims[i], cnn_depths[i], transformer_depths[i], heads[i], attention[i])
        for i in range(4)
    )


#: preset name -> architecture; ``fusion`` is an override: ``create_encoder("parallel_tiny", fusion="gating")``
PRESETS: dict[str, ParallelConfig] = {
    "parallel_nano": ParallelConfig(
        _four_scales((32, 64, 128, 256), (1, 1, 1, 1), (1, 1, 1, 1), (1, 2, 4, 8))
    ),
    "parallel_tiny": ParallelConfig(
        _four_scales((48, 96, 192, 384), (2, 2, 3, 2), (1, 1, 3, 1), (1, 3, 6, 12)), drop_path_rate=0.05
    ),
    "parallel_small": ParallelConfig(
        _four_scales((64, 128, 256, 512), (2, 2, 6, 2), (1, 2, 6, 2), (2, 4, 8, 16)), drop_path_rate=0.1
    ),
}


register_presets(PRESETS, ParallelHybridEncoder)
