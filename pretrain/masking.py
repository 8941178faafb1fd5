"""Random block masking for masked image modelling (SimMIM).

SimMIM (Xie et al., 2022, "SimMIM: a Simple Framework for Masked Image Modeling") masks random
``mask_patch_size`` x ``mask_patch_size`` blocks of the input; with a 32 px block and a ratio of
0.6 this works for every hierarchical encoder whose deepest stage has stride 32. Every image gets
exactly ``round(mask_ratio * num_patches)`` masked blocks, which keeps the number of masked pixels
the same on every sample, micro-batch and process (this makes the per-rank MIM loss normalisation
equal to the global one, see :func:`pretrain.objectives.masked_reconstruction_loss`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BlockMaskGenerator"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class BlockMaskGenerator:
    """SimMIM random block masks, ``(B, 1, h, w)`` bool with ``True`` = masked.

    The mask is drawn on the grid of mask patches (``input_size / mask_patch_size``) and returned
    on the grid of model patches (``input_size / model_patch_size``; each mask patch becomes a
    ``scale x scale`` block, ``scale = mask_patch_size / model_patch_size``). The encoder contract
    accepts any grid that tiles the input, so the coarsest grid (the default,
    ``model_patch_size=None``) is enough and the cheapest; SimMIM's own layout is
    ``model_patch_size=4`` for a stride-4 stem.

    Args:
        input_size: image size ``S`` or ``(H, W)``; each a multiple of ``mask_patch_size``.
        mask_patch_size: side of a masked block in pixels.
        mask_ratio: fraction of blocks masked, in ``(0, 1)``; exactly
            ``round(mask_ratio * num_patches)`` per image (at least 1, at most ``num_patches - 1``).
        model_patch_size: resolution of the returned grid in pixels; must divide
            ``mask_patch_size``. ``None`` returns the mask-patch grid.

    Example:
        >>> gen = BlockMaskGenerator(64, mask_patch_size=16, mask_ratio=0.75)
        >>> gen(2, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        model_patch_size: int | None = None,
    ):
        self.input_size = _pair(input_size)
        if mask_patch_size < 1:
            raise ValueError(f"mask_patch_size must be >= 1, got {mask_patch_size}")
        if any(s % mask_patch_size for s in self.input_size):
            raise ValueError(
                f"input_size {self.input_size} must be a multiple of mask_patch_size={mask_patch_size}"
            )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        model_patch_size = mask_patch_size if model_patch_size is None else model_patch_size
        if model_patch_size < 1 or mask_patch_size % model_patch_size:
            raise ValueError(
                f"model_patch_size={model_patch_size} must divide mask_patch_size={mask_patch_size}"
            )
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid = (self.input_size[0] // mask_patch_size, self.input_size[1] // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.num_patches = self.grid[0] * self.grid[1]
        if self.num_patches < 2:
            raise ValueError(
                f"input_size {self.input_size} holds {self.num_patches} mask patch of {mask_patch_size} px; "
                "need at least 2 (lower mask_patch_size)"
            )
        self.num_masked = min(max(round(mask_ratio * self.num_patches), 1), self.num_patches - 1)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of blocks actually masked: ``num_masked / num_patches``."""
        return self.num_masked / self.num_patches

    def __call__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``batch_size`` independent masks.

        Args:
            batch_size: number of masks ``B``.
            generator: CPU random generator (for reproducible masks); the global RNG if None.
            device: device of the returned mask (drawn on the CPU, then moved).

        Returns:
            (B, 1, h, w) bool, ``h = H / model_patch_size``, ``w = W / model_patch_size``.
        """
        noise = torch.rand(batch_size, self.num_patches, generator=generator)  # (B, N)
        order = noise.argsort(dim=1)  # a uniformly random permutation per image
        mask = torch.zeros(batch_size, self.num_patches, dtype=torch.bool)
        mask.scatter_(1, order[:, : self.num_masked], True)
        mask = mask.view(batch_size, 1, *self.grid)  # (B, 1, gh, gw)
        if self.scale > 1:
            mask = mask.repeat_interleave(self.scale, dim=2).repeat_interleave(self.scale, dim=3)
        return mask.to(device) if device is not None else mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"mask_ratio={self.mask_ratio}, model_patch_size={self.model_patch_size}, "
            f"num_masked={self.num_masked}/{self.num_patches})"
        )
