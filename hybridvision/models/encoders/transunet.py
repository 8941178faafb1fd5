"""TransUNet encoder: ResNet-50 (BiT-style, weight-standardised, GroupNorm) root + ViT-B/16.

Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306 (2021). The structure follows the official ``vit_seg_modeling.py`` /
``vit_seg_modeling_resnet_skip.py`` (module names kept where practical: ``root.conv``,
``body.block1.unit1.gn_proj``, ...): a 3-stage ResNet-50 v2 root (block units 3, 4, 9) gives
skips at strides 2, 4 and 8 and a 1024-channel map at stride 16, which a 1x1 convolution embeds
into tokens for 12 pre-norm Transformer layers.

One deliberate difference: the official root max-pools with ``padding=0`` (giving ``H/4 - 1``)
and zero-pads the stride-4 skip at the bottom/right; here the pool has ``padding=1`` (as BiT, where
the pretrained weights come from), which gives ``H/4`` directly. Parameters are identical.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Encoder, apply_token_mask, is_tracing
from ..layers.attention import Attention
from ..layers.common import DropPath, Mlp, trunc_normal_init
from ..layers.pos_embed import interpolate_pos_embed
from ..registry import register_presets

__all__ = ["TransUNetConfig", "TransUNetEncoder", "TRANSUNET_PRESETS", "StdConv2d", "StdBottleneck"]


@dataclass(frozen=True)
class TransUNetConfig:
    """Architecture of a TransUNet hybrid encoder."""

    block_units: tuple[int, int, int] = (3, 4, 9)
    """Bottleneck units in each of the three ResNet stages (strides 4, 8, 16)."""
    root_width: int = 64
    """Channels of the 7x7 root convolution; stage ``i`` outputs ``root_width * 4 * 2**i``."""
    norm_groups: int = 32
    """GroupNorm groups in the ResNet root and bottlenecks."""
    embed_dim: int = 768
    """Transformer hidden size (tokens, and channels of the stride-16 output)."""
    depth: int = 12
    """Transformer layers."""
    num_heads: int = 12
    """Attention heads."""
    mlp_dim: int = 3072
    """Hidden units of each Transformer MLP."""
    img_size: int | tuple[int, int] = 224
    """Input size the learned position embedding is laid out for (grid ``img_size / 16``)."""
    dropout: float = 0.1
    """Dropout on the embeddings and inside the MLPs."""
    attention_dropout: float = 0.0
    """Dropout on the attention weights and after the attention projection."""
    drop_path_rate: float = 0.0
    """Stochastic depth, linearly increasing over the Transformer layers."""

    def __post_init__(self) -> None:
        if len(self.block_units) != 3 or min(self.block_units) < 1:
            raise ValueError(f"block_units needs three positive counts, got {self.block_units}")
        if self.root_width % self.norm_groups:
            raise ValueError(
                f"root_width {self.root_width} is not divisible by norm_groups {self.norm_groups}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        size = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
        if len(size) != 2 or size[0] % 16 or size[1] % 16 or min(size) < 16:
            raise ValueError(
                f"img_size must be a positive multiple of 16 (or a pair of them), got {self.img_size}"
            )

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (rows, cols) of the position embedding."""
        size = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
        return size[0] // 16, size[1] // 16


TRANSUNET_PRESETS: dict[str, TransUNetConfig] = {
    "transunet_r50_vit_b16": TransUNetConfig(),
    "transunet_small": TransUNetConfig(
        block_units=(2, 3, 4), embed_dim=384, depth=8, num_heads=6, mlp_dim=1536
    ),
    "transunet_nano": TransUNetConfig(
        block_units=(1, 1, 1),
        root_width=16,
        norm_groups=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_dim=128,
        img_size=64,
    ),
}


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al., 2019; used by BiT, Kolesnikov et al., 2020).

    Each output filter is normalised to zero mean and unit variance (biased, ``eps=1e-5``, as the
    official TransUNet code) before the convolution. Eagerly the statistics and the normalisation
    are one fused ``batch_norm`` kernel over the (1, C_out, C_in * kH * kW) weight, forward and
    backward (as timm's ``StdConv2d``); where no gradient is needed (a frozen teacher, evaluation)
    the standardised weight is computed once and reused until the weight changes.
    """

    eps = 1e-5

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cached: tuple[tuple, Tensor] | None = None

    def standardized_weight(self) -> Tensor:
        """The standardised weight (C_out, C_in / groups, kH, kW)."""
        w = self.weight
        if is_tracing():  # plain ops for the ONNX graph (same values)
            var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
            return (w - mean) / torch.sqrt(var + self.eps)
        frozen = not (torch.is_grad_enabled() and w.requires_grad)
        key = (w._version, w.data_ptr(), w.dtype, w.device, torch.is_inference_mode_enabled())
        if frozen and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        flat = F.batch_norm(
            w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=self.eps
        )
        weight = flat.reshape_as(w)
        if not frozen:
            self._cached = None
            return weight
        self._cached = (key, weight.detach())
        return self._cached[1]

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C_in, H, W). Returns (B, C_out, H', W')."""
        weight = self.standardized_weight()
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdBottleneck(nn.Module):
    """Bottleneck unit of the TransUNet/BiT ResNet (``PreActBottleneck`` in the official code).

    Despite the official name, normalisation follows each convolution: ``relu(gn1(conv1))``,
    ``relu(gn2(conv2))`` (stride here), ``gn3(conv3)``, added to the (projected) shortcut, then ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        mid_channels: bottleneck width.
        stride: stride of the 3x3 convolution and of the projection.
        norm_groups: GroupNorm groups (eps 1e-6; the projection uses one group per channel, eps 1e-5).
    """

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int, stride: int = 1, norm_groups: int = 32
    ):
        super().__init__()
        self.gn1 = nn.GroupNorm(norm_groups, mid_channels, eps=1e-6)
        self.conv1 = StdConv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.gn2 = nn.GroupNorm(norm_groups, mid_channels, eps=1e-6)
        self.conv2 = StdConv2d(
            mid_channels, mid_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.gn3 = nn.GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.conv3 = StdConv2d(mid_channels, out_channels, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        self.gn_proj: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = StdConv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
            self.gn_proj = nn.GroupNorm(out_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, C_in, H, W). Returns (B, C_out, H / stride, W / stride)."""
        shortcut = x if self.downsample is None or self.gn_proj is None else self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(shortcut + y)


class TransformerLayer(nn.Module):
    """Pre-norm ViT layer (Dosovitskiy et al., 2021): ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
        drop_path: float,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, qkv_bias=True, attn_drop=attention_dropout, proj_drop=attention_dropout
        )
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = Mlp(dim, mlp_dim, act_layer=nn.GELU, drop=dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, N, C). Returns (B, N, C)."""
        x = x + self.drop_path(self.attn(self.attention_norm(x)))
        return x + self.drop_path(self.ffn(self.ffn_norm(x)))


class TransUNetEncoder(Encoder):
    """TransUNet hybrid encoder (Chen et al., 2021): R50 root + ViT, features at strides 2, 4, 8, 16.

    Outputs ``[root (w), block1 (4w), block2 (8w), transformer (embed_dim)]`` with ``w = root_width``
    (64, 256, 512, 768 for the R50+ViT-B/16 preset). Inputs of another size than ``img_size`` use a
    bicubically resampled position embedding.

    Masked image modelling: ``mask_token`` (``root_width``,) replaces masked positions right after
    the root convolution; masked positions are zeroed after the max-pool and after every ResNet
    stage; the Transformer layers are not re-masked.

    Args:
        config: architecture.
        in_chans: input channels.
    """

    size_divisor = 16

    def __init__(self, config: TransUNetConfig, in_chans: int = 3):
        super().__init__()
        self.config = config
        self.in_chans = in_chans
        width, groups = config.root_width, config.norm_groups
        self.root = nn.Sequential(
            OrderedDict(
                conv=StdConv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False),
                gn=nn.GroupNorm(groups, width, eps=1e-6),
                relu=nn.ReLU(inplace=True),
            )
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = width
        for i, units in enumerate(config.block_units):
            out_ch, mid = width * 4 * 2**i, width * 2**i  # 256/64, 512/128, 1024/256 for w = 64
            blocks = [StdBottleneck(in_ch, out_ch, mid, 1 if i == 0 else 2, groups)]
            blocks += [StdBottleneck(out_ch, out_ch, mid, 1, groups) for _ in range(units - 1)]
            stages[f"block{i + 1}"] = nn.Sequential(
                OrderedDict((f"unit{j + 1}", b) for j, b in enumerate(blocks))
            )
            in_ch = out_ch
        self.body = nn.Sequential(stages)
        self.patch_embed = nn.Conv2d(in_ch, config.embed_dim, kernel_size=1)
        self.grid_size = config.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], config.embed_dim))
        self.pos_drop = nn.Dropout(config.dropout)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.layers = nn.ModuleList(
            TransformerLayer(
                config.embed_dim,
                config.num_heads,
                config.mlp_dim,
                config.dropout,
                config.attention_dropout,
                r,
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)

        self.out_channels = (width, width * 4, width * 8, config.embed_dim)
        self.reductions = (2, 4, 8, 16)
        self.mask_token_dim = width
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers.apply(trunc_normal_init)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        """Args: x (B, in_chans, H, W), H and W multiples of 16. Returns 4 maps at strides 2..16."""
        root = cast(Any, self.root)  # an nn.Sequential with named children conv, gn, relu
        x = apply_token_mask(root.conv(x), mask, mask_token)  # (B, w, H/2, W/2)
        x = root.relu(root.gn(x))
        features = [x]
        x = apply_token_mask(self.pool(x), mask, None)  # (B, w, H/4, W/4)
        for stage in self.body:
            x = apply_token_mask(stage(x), mask, None)
            features.append(x)
        skips, x = features[:-1], features[-1]  # last CNN map (B, 16w, H/16, W/16) feeds the ViT
        x = self.patch_embed(x)  # (B, C, h, w)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, C); token-major, else every layer copies
        x = self.pos_drop(x + interpolate_pos_embed(self.pos_embed, self.grid_size, (h, w)))
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        return [*skips, x]

    def no_weight_decay(self) -> set[str]:
        """The position embedding, excluded from weight decay."""
        return {"pos_embed"}


register_presets(TRANSUNET_PRESETS, TransUNetEncoder)
