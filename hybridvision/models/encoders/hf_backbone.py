"""transformers backbones as encoders: ``create_encoder("transformers/<model_type>", config={...})``.

Built with ``AutoBackbone.from_config`` (Wolf et al., "Transformers: State-of-the-Art Natural
Language Processing", 2020), so every model type with a backbone class works: DINOv2 (Oquab et
al., 2023), ConvNeXt, Swin, ViTDet, ... The backbone's ``feature_maps`` are the features; their
strides are measured once at construction. Plain ViTs (DINOv2) return every map at the patch
stride (14): the encoder's ``size_divisor`` is the patch size, so inputs that are not multiples
of 14 are padded and the segmenter crops the prediction back.

``config`` holds the model's config fields (a released checkpoint's ``config.json``), so a saved
encoder rebuilds offline. Weights load with :meth:`TransformersEncoder.load_pretrained_weights`
from a directory written by ``save_pretrained`` (or its hub id), with or without the task
model's prefix (``dinov2.``), and the patch embedding adapted to ``in_chans``.

Masked image modelling: the model cannot be entered between its layers from outside, so masked
input pixels are replaced by a learnable value per channel (``mask_token_dim = in_chans``,
SimMIM's pixel-level variant); masked pixels still reach a loss only as targets.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..base import Encoder, apply_token_mask
from ..registry import register_namespace
from .resnet import adapt_input_conv
from .timm_backbone import LoadResult

__all__ = ["TransformersEncoder", "TRANSFORMERS_NAMESPACE", "clean_hf_config"]

TRANSFORMERS_NAMESPACE = "transformers"

#: config.json fields that describe a saved file or a task head, not the backbone architecture
_NOT_ARCHITECTURE = (
    "architectures",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
    "out_features",
    "out_indices",
    "stage_names",
    "model_type",
    "num_channels",
    "problem_type",
)


def clean_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields of a transformers ``config.json`` (file and head metadata dropped)."""
    return {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}


class TransformersEncoder(Encoder):
    """A transformers ``AutoBackbone`` behind the encoder contract.

    Args:
        model_type: transformers model type (``dinov2``, ``convnext``, ...).
        in_chans: input channels.
        config: config fields of the architecture (defaults of the model type where absent).
        out_indices: backbone stages to return (None: the last four stages of a plain ViT, every
            stage after the stem otherwise).
        drop_path_rate: stochastic depth, for configs that have ``drop_path_rate``.
    """

    def __init__(
        self,
        model_type: str,
        in_chans: int = 3,
        config: dict[str, Any] | None = None,
        out_indices: list[int] | None = None,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        try:
            from transformers import AutoBackbone, AutoConfig
        except ImportError as err:  # pragma: no cover - transformers is a runtime dependency
            raise ImportError("transformers/ encoders need transformers: pip install transformers") from err
        fields = clean_hf_config(dict(config or {}))
        if drop_path_rate is not None:
            fields["drop_path_rate"] = float(drop_path_rate)
        try:
            hf_config = AutoConfig.for_model(model_type, num_channels=in_chans, **fields)
        except ValueError as err:
            raise ValueError(f"transformers/{model_type}: {err}") from err
        stages = list(getattr(hf_config, "stage_names", []))
        if not stages:
            raise ValueError(f"transformers/{model_type} has no backbone stages (not a backbone model type)")
        if out_indices is None:
            depth = len(stages) - 1
            plain = getattr(hf_config, "num_hidden_layers", None) == depth and depth >= 4
            out_indices = [depth * (i + 1) // 4 for i in range(4)] if plain else list(range(1, depth + 1))
        hf_config.out_indices = [int(i) for i in out_indices]
        hf_config.out_features = [stages[i] for i in hf_config.out_indices]
        try:
            self.model = AutoBackbone.from_config(hf_config)
        except ValueError as err:
            raise ValueError(f"transformers/{model_type} has no AutoBackbone class: {err}") from err
        self.model_type = model_type
        self.in_chans = in_chans
        self.out_channels = tuple(int(c) for c in self.model.channels)
        patch = getattr(hf_config, "patch_size", 4)
        patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        side = max(64, 16 * patch)
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            maps = self.model(pixel_values=torch.zeros(1, in_chans, side, side)).feature_maps
            self.model.train(was)
        self.reductions = tuple(side // int(m.shape[-1]) for m in maps)
        self.size_divisor = max(self.reductions)
        self.mask_token_dim = in_chans

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        """Args: x (B, in_chans, H, W), padded. Returns the backbone's feature maps (NCHW)."""
        if mask is not None:
            x = apply_token_mask(x, mask, mask_token)
        return list(self.model(pixel_values=x).feature_maps)

    def load_pretrained_weights(self, source: str | os.PathLike, strict: bool = True) -> LoadResult:
        """Load a transformers checkpoint (a ``save_pretrained`` directory or its hub id).

        transformers reads it (the backbone class's ``from_pretrained``: its own key renames, with or
        without the task model's prefix); the tensors are then copied in, the patch embedding
        adapted to ``in_chans``.

        Raises:
            ValueError: one line naming the source and the tensors at fault.
        """
        from ..weights import fit_tensors, resolve_model_dir

        directory = resolve_model_dir(source)
        try:
            released, info = type(self.model).from_pretrained(
                str(directory), out_indices=list(self.model.config.out_indices), output_loading_info=True
            )
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{source}: transformers cannot read it as a {self.model_type} backbone: {err}"
            ) from err
        not_in_file = set(info.get("missing_keys", ()))
        own = self.model.state_dict()
        state = {k: v for k, v in released.state_dict().items() if k in own and k not in not_in_file}
        mapped, skipped, missing = fit_tensors(
            own,
            state,
            strict,
            str(source),
            f"transformers/{self.model_type}",
            lambda _key, tensor, want: adapt_input_conv(want[1], tensor),
        )
        self.model.load_state_dict(mapped, strict=False)
        unexpected = list(info.get("unexpected_keys", ()))
        return LoadResult(
            str(directory),
            [f"model.{k}" for k in mapped],
            [f"model.{k}" for k in missing],
            unexpected,
            skipped,
        )


def _build(model_type: str, in_chans: int = 3, **overrides: Any) -> TransformersEncoder:
    return TransformersEncoder(model_type, in_chans=in_chans, **overrides)


register_namespace(TRANSFORMERS_NAMESPACE, _build, "any transformers backbone, e.g. transformers/dinov2")
