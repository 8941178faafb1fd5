"""Mix Transformer (MiT), the SegFormer encoder (Xie et al., 2021, arXiv:2105.15203).

Four stages, each an overlapping patch embedding (strided conv + LayerNorm), ``depth`` blocks of
efficient self-attention (keys/values spatially reduced by ``sr_ratio``) and Mix-FFN (a 3x3
depthwise conv between the two linears supplies positional information, so there are no
position embeddings), and a per-stage LayerNorm. Features at strides 4, 8, 16, 32.

Parameter layout and maths follow the official implementation (NVlabs/SegFormer
``mix_transformer.py``) so its weights, and those of transformers' ``SegformerModel`` (see
``convert_hf.py``), load after renaming only. Presets ``mit_b0`` .. ``mit_b5`` are rows of
:data:`MIT_PRESETS`; ``mit_nano`` is a tiny variant for tests and distillation students.

Tokens are kept as (B, N, C) = NHWC in memory; every conv (patch embeddings, key/value
reduction, Mix-FFN depthwise conv) reads them through a channels-last NCHW view and writes
channels-last, so switching between the two layouts never copies. Returned feature maps are
therefore NCHW tensors in ``torch.channels_last`` memory format.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import cast

from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..layers.common import DropPath
from ..layers.sr_attention import SpatialReductionAttention
from ..registry import register_presets
from ..weights import load_state_dict_file

__all__ = ["MixTransformerConfig", "MixTransformer", "MIT_PRESETS", "MixFFN", "MiTBlock", "OverlapPatchEmbed"]


_PER_STAGE = ("depths", "num_heads", "sr_ratios", "mlp_ratios", "patch_sizes", "strides")


@dataclass(frozen=True)
class MixTransformerConfig:
    """Architecture of a Mix Transformer; one row per preset. Sequences are per stage."""

    embed_dims: tuple[int, ...]  # channels of each stage
    depths: tuple[int, ...]  # transformer blocks per stage
    num_heads: tuple[int, ...]  # attention heads per stage
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # key/value spatial reduction per stage
    mlp_ratios: tuple[float, ...] = (4, 4, 4, 4)  # Mix-FFN hidden / embed dim per stage
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)  # kernel of each overlapping patch embedding
    strides: tuple[int, ...] = (4, 2, 2, 2)  # stride of each overlapping patch embedding
    qkv_bias: bool = True  # bias on the q / kv projections
    drop_rate: float = 0.0  # dropout after attention projection and in Mix-FFN
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.1  # stochastic depth, linearly increasing over all blocks
    layer_norm_eps: float = 1e-6  # eps of block and stage norms (official 1e-6; transformers 1e-5)
    # input padding multiple; None = product of strides (32). 1 = no padding, as transformers:
    # maps are then ceil-sized, which segformer_mlp handles but size-matching decoders may not
    size_divisor: int | None = None

    def __post_init__(self) -> None:
        for name in ("embed_dims", *_PER_STAGE):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # JSON gives lists
        n = len(self.embed_dims)
        for name in _PER_STAGE:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, embed_dims has {n}")
        for dim, heads in zip(self.embed_dims, self.num_heads):
            if dim % heads:
                raise ValueError(f"embed dim {dim} is not divisible by its num_heads {heads}")
        if self.size_divisor is not None and self.size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1 or None, got {self.size_divisor}")


_B = partial(MixTransformerConfig, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))

#: official SegFormer encoders (mit_b0..b5) and a tiny one for tests / students
MIT_PRESETS: dict[str, MixTransformerConfig] = {
    "mit_nano": MixTransformerConfig(
        embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4)
    ),
    "mit_b0": MixTransformerConfig(
        embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8)
    ),
    "mit_b1": _B(depths=(2, 2, 2, 2)),
    "mit_b2": _B(depths=(3, 4, 6, 3)),
    "mit_b3": _B(depths=(3, 4, 18, 3)),
    "mit_b4": _B(depths=(3, 8, 27, 3)),
    "mit_b5": _B(depths=(3, 6, 40, 3)),
}


def _nchw_view(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, H, W) channels-last view (no copy)."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, *size)


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) map -> (B, N, C) tokens (a view when ``x`` is channels-last)."""
    return x.flatten(2).transpose(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: Conv2d(k, stride s, padding k // 2) then LayerNorm on tokens.

    Args:
        patch_size: conv kernel k.
        stride: conv stride s.
        in_chans: input channels.
        embed_dim: output channels C.
    """

    def __init__(self, patch_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Args: x (B, C_in, H, W). Returns tokens (B, h * w, C) and (h, w)."""
        x = self.proj(x)  # (B, C, h, w)
        size = (x.shape[-2], x.shape[-1])
        return self.norm(_tokens(x)), size


class MixFFN(nn.Module):
    """Mix-FFN: Linear -> 3x3 depthwise conv -> GELU -> dropout -> Linear -> dropout.

    Args:
        dim: token channels C.
        hidden_dim: hidden channels.
        drop: dropout probability.
        act_layer: activation type.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, 1, 1, groups=hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Args: x (B, N, C) tokens of an H x W map; size (H, W). Returns (B, N, C)."""
        x = self.fc1(x)  # (B, N, hidden)
        x = _tokens(self.dwconv(_nchw_view(x, size)))  # depthwise conv on (B, hidden, H, W)
        return self.drop(self.fc2(self.drop(self.act(x))))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: x + DropPath(SRAttention(LN(x))), then x + DropPath(MixFFN(LN(x))).

    Args:
        dim: token channels C.
        num_heads: attention heads.
        sr_ratio: key/value spatial reduction.
        mlp_ratio: Mix-FFN hidden / C.
        qkv_bias: bias on q / kv.
        drop: dropout after projections.
        attn_drop: attention-weight dropout.
        drop_path: stochastic depth probability.
        norm_layer: norm type, built as ``norm_layer(dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """Args: x (B, N, C); size (H, W) with N = H * W. Returns (B, N, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class MiTStage(nn.Module):
    """Overlapping patch embedding, transformer blocks, LayerNorm."""

    def __init__(self, patch_embed: OverlapPatchEmbed, blocks: list[MiTBlock], norm: nn.Module):
        super().__init__()
        self.patch_embed = patch_embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm


class MixTransformer(Encoder):
    """Mix Transformer encoder of SegFormer (Xie et al., 2021, arXiv:2105.15203).

    Args:
        config: architecture (see :data:`MIT_PRESETS`).
        in_chans: input channels.

    Masked image modelling: the mask token replaces masked positions right after the first
    patch embedding (``mask_token_dim = embed_dims[0]``). All stages are transformer stages
    (the Mix-FFN depthwise convs live inside transformer blocks), so nothing is re-masked.
    """

    def __init__(self, config: MixTransformerConfig, in_chans: int = 3):
        super().__init__()
        self.config = config
        self.out_channels = tuple(config.embed_dims)
        self.reductions = tuple(math.prod(config.strides[: i + 1]) for i in range(len(config.strides)))
        self.size_divisor = config.size_divisor or self.reductions[-1]
        self.mask_token_dim = config.embed_dims[0]
        norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate)
        stages, start, prev = [], 0, in_chans
        for i, dim in enumerate(config.embed_dims):
            blocks = [
                MiTBlock(
                    dim,
                    config.num_heads[i],
                    config.sr_ratios[i],
                    config.mlp_ratios[i],
                    config.qkv_bias,
                    config.drop_rate,
                    config.attn_drop_rate,
                    rates[start + j],
                    norm_layer,
                )
                for j in range(config.depths[i])
            ]
            embed = OverlapPatchEmbed(config.patch_sizes[i], config.strides[i], prev, dim)
            stages.append(MiTStage(embed, blocks, norm_layer(dim)))
            start, prev = start + config.depths[i], dim
        self.stages = nn.ModuleList(stages)
        self.apply(_init_weights)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        feats = []
        for i, stage in enumerate(cast("Iterable[MiTStage]", self.stages)):
            tokens, size = stage.patch_embed(x)  # (B, N, C)
            if i == 0 and mask is not None:
                tokens = _tokens(apply_token_mask(_nchw_view(tokens, size), mask, mask_token))
            for block in stage.blocks:
                tokens = block(tokens, size)
            x = _nchw_view(stage.norm(tokens), size)  # (B, C, h, w), channels-last
            feats.append(x)
        return feats

    def no_weight_decay(self) -> set[str]:
        """MiT has no position embeddings or tokens; norms and biases are 1-D (handled generically)."""
        return set()

    def load_pretrained_weights(self, path: str | os.PathLike) -> None:
        """Load an official SegFormer checkpoint (NVlabs ``mit_b*.pth``, mmseg ``backbone.*``).

        ``create_encoder("mit_b0", weights=path)`` calls this. Classification (``head.*``) and
        decode-head weights are ignored; any other key without a counterpart, or a missing one,
        is an error that names it. transformers directories go through ``from_pretrained``.
        """
        state, unknown, expected = {}, [], self.state_dict()
        for key, value in load_state_dict_file(path).items():
            key = key.removeprefix("backbone.")
            if key.startswith(("head.", "decode_head.", "auxiliary_head.")):
                continue
            new = _from_official_name(key)
            if new is None or new not in expected:
                unknown.append(key)
            else:
                state[new] = value
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise ValueError(f"{path}: keys with no MiT counterpart {unknown}; MiT keys missing {missing}")
        self.load_state_dict(state)


def _from_official_name(key: str) -> str | None:
    """``block2.0.mlp.dwconv.dwconv.weight`` -> ``stages.1.blocks.0.mlp.dwconv.weight`` (None: unknown)."""
    match = re.match(r"^(patch_embed|block|norm)(\d)\.(.+)$", key)
    if match is None:
        return None
    kind, stage, rest = match.group(1), int(match.group(2)) - 1, match.group(3)
    part = {"patch_embed": "patch_embed", "block": "blocks", "norm": "norm"}[kind]
    return f"stages.{stage}.{part}.{rest.replace('.mlp.dwconv.dwconv.', '.mlp.dwconv.')}"


def _init_weights(module: nn.Module) -> None:
    """Official SegFormer init: trunc-normal(0.02) linears, He-normal (fan-out) convs, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


register_presets(MIT_PRESETS, MixTransformer)
