"""Any timm model as an encoder: ``create_encoder("timm/<architecture>")``.

timm builds the model with ``features_only=True`` (Wightman, "PyTorch Image Models", 2019), so
every family it can cut into stages works, whatever its stride pattern: 2–32 (MobileViT, MaxViT),
4–32 (FastViT, ConvNeXt-V2, RepViT), 16–64 (LeViT, EfficientViT-MSRA). The encoder reports
timm's ``feature_info`` as ``out_channels`` / ``reductions`` and decoders adapt to them.

Models whose input size is fixed at creation (timm marks them ``fixed_input_size``: EfficientFormer
v2, MaxViT, CoAtNet, LeViT, EfficientViT-MSRA) take ``img_size`` — the stages pass the data crop
size — and set :attr:`Encoder.input_size`: smaller inputs are padded up to it, larger ones are an
error that says to use a sliding window (the predictors slide windows of that size by themselves).

Weights come through :meth:`TimmEncoder.load_pretrained_weights`: a weights file, a directory in
the layout timm's ``push_to_hub`` / ``save_for_hf`` writes (``config.json`` + ``model.safetensors``),
or a Hugging Face hub id such as ``timm/fastvit_t8.apple_in1k`` (read from the local cache first,
so ``HF_HUB_OFFLINE=1`` works once it is cached). Checkpoint names are those of timm's full model;
they are mapped onto the feature extractor's (which flattens ``stem.0`` to ``stem_0``), the
classifier and pruned layers are reported as unexpected, and the first convolution is adapted to
``in_chans`` as timm does.

Masked image modelling keeps the zoo's guarantee: masked input pixels are zeroed, ``mask_token``
replaces masked positions after the first module of the extractor (the stem) and masked positions
are zeroed again after every later module, so masked pixels reach a loss only as targets. Models
that timm wraps with a feature getter (``forward_intermediates``, e.g. LeViT) cannot be entered
module by module: their token is applied to the masked input pixels instead (SimMIM-style, one
learnable value per channel).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..base import Encoder, apply_token_mask
from ..registry import UnknownModelError, register_namespace

__all__ = ["TimmEncoder", "LoadResult", "TIMM_NAMESPACE", "timm_fixed_input_size"]

TIMM_NAMESPACE = "timm"


class LoadResult(NamedTuple):
    """What loading external weights did (names relative to the encoder)."""

    source: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    skipped: list[str]


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a runtime dependency
        raise ImportError("timm/ encoders need timm: pip install timm") from err
    return timm


def _check_architecture(architecture: str) -> None:
    timm = _timm()
    base = architecture.split(".")[0]
    if not timm.is_model(base):
        raise UnknownModelError("timm architecture", base, timm.list_models())


def timm_fixed_input_size(architecture: str) -> tuple[int, int] | None:
    """The input size timm fixes at creation for ``architecture`` (None if any size works)."""
    timm = _timm()
    _check_architecture(architecture)
    cfg = timm.models.get_pretrained_cfg(architecture.split(".")[0]) if "." not in architecture else None
    if cfg is None:
        cfg = timm.models.get_pretrained_cfg(architecture)
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    return tuple(int(v) for v in cfg.input_size[-2:])  # type: ignore[return-value]


def _normalise(key: str) -> str:
    return key.replace(".", "_")


class TimmEncoder(Encoder):
    """A timm model cut into stages with ``features_only=True``, behind the encoder contract.

    Args:
        architecture: timm architecture, optionally with a pretrained tag (``fastvit_t8.apple_in1k``;
            the tag only selects timm's pretrained config, never downloads anything).
        in_chans: input channels.
        img_size: input size for models timm builds at a fixed size (an int or (H, W)); defaults to
            timm's pretrained size for them. Passed through to other models that take it.
        drop_path_rate: stochastic depth rate (None: timm's default).
        out_indices: which of timm's feature levels to return (None: all of them).
        **model_args: further keyword arguments for ``timm.create_model``.
    """

    def __init__(
        self,
        architecture: str,
        in_chans: int = 3,
        img_size: int | Sequence[int] | None = None,
        drop_path_rate: float | None = None,
        out_indices: Sequence[int] | None = None,
        **model_args: Any,
    ):
        super().__init__()
        timm = _timm()
        _check_architecture(architecture)
        self.architecture = architecture
        self.in_chans = in_chans
        kwargs: dict[str, Any] = {"features_only": True, "pretrained": False, "in_chans": in_chans}
        fixed = timm_fixed_input_size(architecture)
        if img_size is not None:
            size = (
                (int(img_size), int(img_size))
                if isinstance(img_size, int)
                else tuple(int(v) for v in img_size)
            )
            kwargs["img_size"] = size
        elif fixed is not None:
            size = fixed
            kwargs["img_size"] = size
        if drop_path_rate is not None:
            kwargs["drop_path_rate"] = float(drop_path_rate)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(int(i) for i in out_indices)
        try:
            self.model = timm.create_model(architecture, **kwargs, **model_args)
        except (RuntimeError, TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"timm could not build {architecture!r} as a feature extractor: {err}") from err
        info = self.model.feature_info
        self.out_channels = tuple(int(c) for c in info.channels())
        self.reductions = (
            tuple(int(r) for r in info.reductions())
            if hasattr(info, "reductions")
            else tuple(int(r) for r in info.reduction())
        )
        self.size_divisor = max(self.reductions)
        self.input_size = tuple(kwargs["img_size"]) if fixed is not None else None
        self.pretrained_cfg = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        fmt = getattr(self.model, "output_fmt", "NCHW")
        self._channels_last = str(getattr(fmt, "value", fmt)) == "NHWC"
        # FeatureDictNet / FeatureListNet run their modules one after the other: masking can enter
        # between them. A feature getter (forward_intermediates) cannot be entered.
        self._stepwise = isinstance(self.model, nn.ModuleDict) and hasattr(self.model, "return_layers")
        self._mask_token_dim: int | None = None

    # ------------------------------------------------------------------ masked image modelling

    @property
    def mask_token_dim(self) -> int:  # type: ignore[override]
        """Channels of the first module's output (the stem), found by one small forward pass."""
        if self._mask_token_dim is None:
            if not self._stepwise:
                self._mask_token_dim = self.in_chans
            else:
                first = next(iter(self.model.values()))
                size = self.input_size or (self.size_divisor, self.size_divisor)
                was_training = first.training
                first.eval()
                with torch.no_grad():
                    out = first(torch.zeros(1, self.in_chans, *size))
                first.train(was_training)
                self._mask_token_dim = int(out.shape[-1] if self._channels_last else out.shape[1])
        return self._mask_token_dim

    def _masked(self, x: Tensor, mask: Tensor, token: Tensor | None) -> Tensor:
        if x.ndim != 4:
            return x
        if self._channels_last:
            return apply_token_mask(x.permute(0, 3, 1, 2), mask, token).permute(0, 2, 3, 1)
        return apply_token_mask(x, mask, token)

    def _forward_features(self, x: Tensor, mask: Tensor | None, mask_token: Tensor | None) -> list[Tensor]:
        """Args: x (B, in_chans, H, W), padded. Returns one NCHW map per feature level."""
        if mask is None:
            feats = self.model(x)
        elif not self._stepwise:
            feats = self.model(self._masked(x, mask, mask_token))
        else:
            feats = []
            for i, (name, module) in enumerate(self.model.items()):
                x = self._masked(module(x), mask, mask_token if i == 0 else None)
                if name in self.model.return_layers:
                    feats.append(x[0] if isinstance(x, (tuple, list)) else x)
        if self._channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return list(feats)

    # ------------------------------------------------------------------ weights

    def _key_map(self) -> dict[str, str]:
        """Map each timm full-model parameter name (normalised) -> this extractor's state-dict name."""
        index: dict[str, str] = {}
        for key in self.model.state_dict():
            names = [key]
            if key.startswith("model."):  # FeatureGetterNet keeps the model under .model
                names.append(key[len("model.") :])
            for name in names:
                index[_normalise(name)] = key
        return index

    def load_pretrained_weights(self, source: str | os.PathLike, strict: bool = True) -> LoadResult:
        """Load timm weights from a file, a timm hub-layout directory or a hub id (cache first).

        Args:
            source: ``.safetensors`` / ``.pth`` / ``.bin`` file, a directory holding
                ``model.safetensors`` (or ``pytorch_model.bin``), or a hub id ``owner/name``.
            strict: missing encoder tensors and shape mismatches are errors (True) or are listed
                and keep their random init (False).

        Returns:
            What was loaded, missing, unexpected (classifier, pruned layers) and skipped.

        Raises:
            ValueError: one line naming the source and the tensors at fault.
        """
        from ..weights import fit_tensors, read_weights

        path, state = read_weights(source)
        first_convs = self.pretrained_cfg.get("first_conv") or ()
        first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)
        index = self._key_map()
        renamed = {index[_normalise(k)]: v for k, v in state.items() if _normalise(k) in index}
        unexpected = [k for k in state if _normalise(k) not in index]
        names = {index[_normalise(k)]: k for k in state if _normalise(k) in index}

        def adapt(key: str, tensor: Tensor, want: torch.Size) -> Tensor | None:
            if any(names[key] == f"{c}.weight" for c in first_convs) or tensor.shape[1] == 3:
                from timm.models import adapt_input_conv

                return adapt_input_conv(want[1], tensor)
            return None

        hint = (
            f" (its input size is {self.input_size}: weights made for another size need data.image_size "
            "set to that size)"
            if self.input_size is not None
            else ""
        )
        if not renamed:
            raise ValueError(
                f"{path}: no tensor matches timm/{self.architecture} (first checkpoint keys: "
                f"{list(state)[:4]}); is it a checkpoint of another architecture?"
            )
        mapped, skipped, missing = fit_tensors(
            self.model.state_dict(), renamed, strict, str(path), f"timm/{self.architecture}", adapt, hint
        )
        if missing and strict:
            raise ValueError(
                f"{path} lacks {len(missing)} tensors of timm/{self.architecture}, e.g. {missing[:4]}; "
                "is it a checkpoint of another architecture? (model.init_strict=false loads the rest)"
            )
        self.model.load_state_dict(mapped, strict=False)
        return LoadResult(
            str(path), [f"model.{k}" for k in mapped], [f"model.{k}" for k in missing], unexpected, skipped
        )

    def reparameterize(self) -> bool:
        """Fuse re-parameterisable branches (FastViT, RepViT, MobileOne) in place; True if any did."""
        from timm.utils.model import reparameterize_model

        before = sum(p.numel() for p in self.parameters())
        reparameterize_model(self.model, inplace=True)
        return sum(p.numel() for p in self.parameters()) != before


def _build(name: str, in_chans: int = 3, **overrides: Any) -> TimmEncoder:
    return TimmEncoder(name, in_chans=in_chans, **overrides)


register_namespace(
    TIMM_NAMESPACE,
    _build,
    "any timm architecture, e.g. timm/fastvit_t8",
    fixed_input_size=timm_fixed_input_size,
)
