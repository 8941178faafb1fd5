"""ResNet encoders (He et al., 2016) built from torchvision's residual blocks.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
...), which timm's ResNets share, so their ImageNet state dicts load with
:meth:`ResNetEncoder.load_pretrained_weights` (the classifier ``fc.*`` is dropped).

Features: the stem output after ReLU (stride 2) and ``layer1`` .. ``layer4``, i.e. reductions
``(2, 4, 8, 16, 32)``, the same maps as timm ``features_only=True``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..base import Encoder, apply_token_mask
from ..registry import register_presets

__all__ = ["ResNetConfig", "ResNetEncoder", "RESNET_PRESETS", "adapt_input_conv"]

_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a ResNet encoder."""

    block: str
    """Residual block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1, expansion 4)."""
    depths: tuple[int, int, int, int]
    """Blocks in ``layer1`` .. ``layer4``."""
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    """Block ``planes`` of each layer (output channels are ``planes * expansion``)."""
    stem_width: int = 64
    """Output channels of the 7x7 stride-2 stem convolution (also the mask-token dim)."""
    zero_init_residual: bool = False
    """Zero the last norm of every residual branch so each block starts as the identity."""

    def __post_init__(self) -> None:
        if self.block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
        if len(self.depths) != 4 or len(self.widths) != 4:
            raise ValueError(f"depths and widths need 4 entries, got {self.depths} and {self.widths}")
        if min(self.depths) < 1 or min(self.widths) < 1 or self.stem_width < 1:
            raise ValueError(f"depths, widths and stem_width must be positive: {self}")


RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(block="basic", depths=(2, 2, 2, 2)),
    "resnet34": ResNetConfig(block="basic", depths=(3, 4, 6, 3)),
    "resnet50": ResNetConfig(block="bottleneck", depths=(3, 4, 6, 3)),
    # tiny BasicBlock ResNet for tests and distillation students (~0.7 M parameters)
    "resnet_nano": ResNetConfig(block="basic", depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16),
}


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """Adapt a pretrained first-conv weight (O, I, kH, kW) to ``in_chans`` input channels.

    As timm's ``adapt_input_conv``: one channel sums the pretrained input channels; any other
    count repeats them cyclically and scales by ``I / in_chans`` so activations keep their scale.
    """
    out_ch, base, kh, kw = weight.shape
    if in_chans == base:
        return weight
    dtype = weight.dtype
    weight = weight.float()
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)  # (O, 1, kH, kW)
    else:
        repeat = math.ceil(in_chans / base)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (base / in_chans)  # (O, in_chans, kH, kW)
    return weight.to(dtype)


class ResNetEncoder(Encoder):
    """ResNet-v1.5 encoder (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

    Stride sits on the 3x3 convolution of the bottleneck (torchvision's v1.5). Masked image
    modelling (SparK-style): ``mask_token`` replaces masked positions after ``conv1`` + ``bn1``;
    masked positions are zeroed again after the max-pool and after every layer.

    Args:
        config: architecture.
        in_chans: input channels.
        norm_layer: normalisation after every convolution.
    """

    size_divisor = 32

    def __init__(self, config: ResNetConfig, in_chans: int = 3, norm_layer: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.config = config
        self.in_chans = in_chans
        block = _BLOCKS[config.block]
        self.conv1 = nn.Conv2d(in_chans, config.stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(config.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = config.stem_width
        layers = []
        for i, (depth, planes) in enumerate(zip(config.depths, config.widths)):
            layers.append(self._make_layer(block, inplanes, planes, depth, 1 if i == 0 else 2, norm_layer))
            inplanes = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = (config.stem_width, *(w * block.expansion for w in config.widths))
        self.reductions = (2, 4, 8, 16, 32)
        self.mask_token_dim = config.stem_width
        self._init_weights(config.zero_init_residual)

    @staticmethod
    def _make_layer(
        block: type[BasicBlock] | type[Bottleneck],
        inplanes: int,
        planes: int,
        depth: int,
        stride: int,
        norm_layer: type[nn.Module],
    ) -> nn.Sequential:
        """One stage, as torchvision's ``ResNet._make_layer`` (projection shortcut on the first block)."""
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        blocks = [block(inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        blocks += [block(planes * block.expansion, planes, norm_layer=norm_layer) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last_norm = getattr(m, "bn3" if isinstance(m, Bottleneck) else "bn2", None)
                if isinstance(m, (BasicBlock, Bottleneck)) and last_norm is not None:
                    nn.init.zeros_(last_norm.weight)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        """Args: x (B, in_chans, H, W), H and W multiples of 32. Returns 5 maps at strides 2..32."""
        x = self.bn1(self.conv1(x))  # (B, stem, H/2, W/2)
        x = self.relu(apply_token_mask(x, mask, mask_token))
        features = [x]
        x = apply_token_mask(self.maxpool(x), mask, None)  # (B, stem, H/4, W/4)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = apply_token_mask(layer(x), mask, None)
            features.append(x)
        return features

    def load_pretrained_weights(self, path: str | os.PathLike) -> None:
        """Load a timm or torchvision ResNet checkpoint (``.safetensors``, ``.pth``, ``.bin``).

        The classifier (``fc.*``) is dropped; ``conv1.weight`` is adapted to ``in_chans`` with
        :func:`adapt_input_conv`.

        Raises:
            ValueError: naming the missing and unexpected keys if the checkpoint does not match.
        """
        from ..weights import load_state_dict_file

        state = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith("fc.")}
        if "conv1.weight" in state:
            state["conv1.weight"] = adapt_input_conv(self.in_chans, state["conv1.weight"])
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} is not a matching ResNet checkpoint: missing keys {missing}, unexpected keys {unexpected}"
            )


register_presets(RESNET_PRESETS, ResNetEncoder)
