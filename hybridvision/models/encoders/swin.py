"""Swin Transformer encoders.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.

Four stages at strides 4, 8, 16 and 32: a 4x4 patch embedding + LayerNorm, then per stage an
optional 2x2 patch merging followed by alternating W-MSA / SW-MSA blocks. Parameter names follow
timm 1.0 (``patch_embed.proj``, ``layers.{i}.downsample`` at the *start* of stage i > 0,
``layers.{i}.blocks.{j}.attn.relative_position_bias_table``, final ``norm``), so timm and official
ImageNet checkpoints load with :meth:`SwinTransformer.load_pretrained_weights`.

Any input size: the base class pads to a multiple of 32; inside each stage every block pads to a
window multiple (see :mod:`hybridvision.models.layers.window_attention`).

Returned features are normalised per stage (``stage_norms.{i}`` for the first stages, ``norm`` for
the last) as in the official Swin segmentation backbone; ``stage_norms=False`` keeps timm's layout,
where only the last stage is normalised.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..layers.common import trunc_normal_init
from ..layers.visible_tokens import VisibleTokens, visible_swin_stack
from ..layers.window_attention import SwinBlockStack, drop_path_rates
from ..registry import register_presets

__all__ = ["SwinConfig", "SwinTransformer", "SWIN_PRESETS", "PatchEmbed", "PatchMerging", "SwinStage"]


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin Transformer; one row per preset. Sequences are per stage."""

    embed_dim: int  # channels of stage 0; stage i has embed_dim * 2**i
    depths: tuple[int, ...]  # Swin blocks per stage
    num_heads: tuple[int, ...]  # attention heads per stage
    window_size: int = 7  # attention window side (tokens)
    patch_size: int = 4  # side of the non-overlapping patch embedding
    mlp_ratio: float = 4.0  # MLP hidden dim / token dim
    qkv_bias: bool = True  # bias on the qkv projections
    drop_rate: float = 0.0  # dropout after attention projections and in the MLPs
    attn_drop_rate: float = 0.0  # dropout on attention weights
    drop_path_rate: float = 0.2  # stochastic depth, linearly increasing over all blocks
    stage_norms: bool = True  # LayerNorm on every returned stage (False: only the last, as timm)

    def __post_init__(self) -> None:
        for name in ("depths", "num_heads"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # JSON / YAML give lists
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths has {len(self.depths)} entries, num_heads has {len(self.num_heads)}")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if dim % heads:
                raise ValueError(f"stage {i}: dim {dim} is not divisible by num_heads {heads}")
        if self.window_size < 1 or self.patch_size < 1:
            raise ValueError(
                f"window_size and patch_size must be >= 1, got {self.window_size}, {self.patch_size}"
            )

    @property
    def dims(self) -> tuple[int, ...]:
        """Channels of each stage."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


SWIN_PRESETS: dict[str, SwinConfig] = {
    # tiny model for tests (~0.2 M parameters); two blocks per stage so every stage shifts
    "swin_nano": SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    # the official ImageNet-1k models (swin_*_patch4_window7_224), with their stochastic depth rates
    "swin_tiny": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "swin_small": SwinConfig(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3
    ),
    "swin_base": SwinConfig(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5
    ),
}


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> linear embedding (a strided conv) -> LayerNorm.

    Args:
        in_chans: input channels.
        embed_dim: output channels C.
        patch_size: patch side p.
        norm_layer: token norm.
    """

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int = 4, norm_layer: type[nn.Module] = nn.LayerNorm
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, in_chans, H, W), H and W multiples of p. Returns (B, H/p, W/p, C)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood (4C) -> LayerNorm -> Linear to ``out_dim`` (default 2C).

    The concatenation order is timm's / the official one: (0,0), (1,0), (0,1), (1,1) as (row, col).

    Args:
        dim: input channels C.
        out_dim: output channels; 2C if None.
        norm_layer: norm over the 4C concatenation.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C) with even H, W. Returns (B, H/2, W/2, out_dim)."""
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"PatchMerging needs an even map size, got {h}x{w}")
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))

    def merge_tokens(self, x: Tensor, children: Tensor) -> Tensor:
        """Merge compact tokens (the visible-only path).

        Args: x (M, C); children (M' * 4,) rows of x in merging order (``VisibleTokens.merged``).
        Returns (M', out_dim).
        """
        x = x.index_select(0, children).view(-1, 4 * x.shape[-1])  # (M', 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging (``downsample``) followed by a :class:`SwinBlockStack` (``blocks``)."""

    def __init__(
        self, in_dim: int, dim: int, depth: int, num_heads: int, downsample: bool, **block_kwargs: Any
    ):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = SwinBlockStack(dim, depth, num_heads, **block_kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, H, W, C_in). Returns (B, H/2, W/2, C) when downsampling, else (B, H, W, C)."""
        return self.blocks(self.downsample(x))


class SwinTransformer(Encoder):
    """Swin Transformer encoder (Liu et al., ICCV 2021) returning NCHW maps at strides 4..32.

    Masked image modelling (SimMIM style): the mask token replaces masked patch embeddings after
    the patch-embedding norm; transformer stages are not re-masked. :meth:`forward_visible`
    encodes the visible tokens only (MAE / GreenMIM style, see ``layers.visible_tokens``).

    Args:
        config: architecture (see :data:`SWIN_PRESETS`).
        in_chans: input channels.
        norm_layer: token norm of every block, merge and output.
    """

    def __init__(self, config: SwinConfig, in_chans: int = 3, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.config = config
        self.in_chans = in_chans
        dims = config.dims
        num_stages = len(dims)
        self.out_channels = dims
        self.reductions = tuple(config.patch_size * 2**i for i in range(num_stages))
        self.size_divisor = self.reductions[-1]
        self.mask_token_dim = config.embed_dim

        self.patch_embed = PatchEmbed(in_chans, config.embed_dim, config.patch_size, norm_layer)
        rates = drop_path_rates(config.drop_path_rate, sum(config.depths))
        self.layers = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, config.depths, config.num_heads)):
            start = sum(config.depths[:i])
            self.layers.append(
                SwinStage(
                    in_dim=dims[max(i - 1, 0)],
                    dim=dim,
                    depth=depth,
                    num_heads=heads,
                    downsample=i > 0,
                    window_size=config.window_size,
                    mlp_ratio=config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    proj_drop=config.drop_rate,
                    attn_drop=config.attn_drop_rate,
                    drop_path=rates[start : start + depth],
                    norm_layer=norm_layer,
                )
            )
        self.stage_norms = nn.ModuleList(norm_layer(d) for d in dims[:-1]) if config.stage_norms else None
        self.norm = norm_layer(dims[-1])
        self.apply(trunc_normal_init)

    def _stage_norm(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i``'s returned feature: the final ``norm`` for the last, ``stage_norms[i]`` (if any) before."""
        if i == len(self.layers) - 1:
            return self.norm(x)
        return self.stage_norms[i](x) if self.stage_norms is not None else x

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        if mask is not None:
            x = apply_token_mask(x.permute(0, 3, 1, 2), mask, mask_token).permute(0, 2, 3, 1)
        feats = []
        for i, stage in enumerate(self.layers):
            x = stage(x)  # (B, h_i, w_i, C_i)
            # (B, C_i, h_i, w_i) as a channels_last view: no copy (decoders' convs take it as is)
            feats.append(self._stage_norm(i, x).permute(0, 3, 1, 2))
        return feats

    encodes_visible_only = True

    def _forward_visible(self, x: Tensor, mask: Tensor, mask_token: Tensor | None) -> list[Tensor]:
        del mask_token  # masked tokens are never encoded: the decoder fills them
        embedded = self.patch_embed.proj(x).permute(0, 2, 3, 1)  # (B, H/4, W/4, C)
        tokens = VisibleTokens.from_mask(mask, (embedded.shape[1], embedded.shape[2]))
        y = self.patch_embed.norm(tokens.gather(embedded))  # (M, C)
        feats = []
        for i, module in enumerate(self.layers):
            stage = cast(SwinStage, module)
            if i > 0:
                tokens, children = tokens.merged()
                y = cast(PatchMerging, stage.downsample).merge_tokens(y, children)  # (M_i, C_i)
            y = visible_swin_stack(stage.blocks, y, tokens)
            # (B, C_i, h_i, w_i), 0 where masked
            feats.append(tokens.scatter(self._stage_norm(i, y)).permute(0, 3, 1, 2))
        return feats

    def no_weight_decay(self) -> set[str]:
        """Names of the relative position bias tables, excluded from weight decay."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save activation memory."""
        for stage in self.layers:
            stage.blocks.grad_checkpointing = enable  # type: ignore[union-attr]  # nn.Module.__getattr__ typing

    def load_pretrained_weights(self, path: str | os.PathLike) -> list[str]:
        """Load a timm ``swin_*`` or official Microsoft Swin checkpoint (``.safetensors`` / ``.pth``).

        Accepted layouts: timm 1.0 (patch merging at the start of stage i > 0) and the official
        one (merging at the end of stage i, converted). The classifier (``head.*``) and the
        recomputed buffers (``relative_position_index``, ``attn_mask``) are dropped;
        ``patch_embed.proj.weight`` is adapted to ``in_chans`` as timm does. The window size and
        dims must match the checkpoint (e.g. ``window_size=12`` for ``*_window12_384``).

        Returns:
            names of parameters the checkpoint cannot provide and that keep their initialisation:
            the ``stage_norms.*`` (identity-affine LayerNorms) when ``stage_norms=True``.

        Raises:
            ValueError: naming every missing, unexpected or wrongly shaped key.
        """
        from ..weights import load_state_dict_file
        from .resnet import adapt_input_conv

        state = convert_swin_checkpoint(load_state_dict_file(path))
        if "patch_embed.proj.weight" in state:
            state["patch_embed.proj.weight"] = adapt_input_conv(
                self.in_chans, state["patch_embed.proj.weight"]
            )
        own = self.state_dict()
        new = sorted(k for k in own if k.startswith("stage_norms.") and k not in state)
        missing = sorted(set(own) - set(state) - set(new))
        unexpected = sorted(set(state) - set(own))
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path} does not match this Swin encoder: missing keys {missing}, unexpected keys {unexpected}, "
                f"shape mismatches (checkpoint vs model) {wrong}"
            )
        self.load_state_dict(state, strict=False)
        return new


def convert_swin_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a timm / official Swin state dict to :class:`SwinTransformer` names.

    Drops the classifier and non-persistent buffers; moves official ``layers.{i}.downsample``
    (end of stage i) to ``layers.{i+1}.downsample`` (start of stage i + 1, timm 1.0 layout).
    """
    official = "layers.0.downsample.reduction.weight" in state
    out = {}
    for key, value in state.items():
        if key.startswith("head") or key.endswith(("relative_position_index", "attn_mask")):
            continue
        if official:
            key = re.sub(
                r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key
            )
        out[key] = value
    return out


register_presets(SWIN_PRESETS, SwinTransformer)
