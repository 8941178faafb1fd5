"""Datasets over image folders: unlabelled images (pretraining) and image + mask pairs."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from hybridvision.data.io import (
    IMAGE_EXTENSIONS,
    READ_ERRORS,
    Sample,
    apply_transform,
    check_mask_values,
    list_files,
    read_image,
    read_mask,
    remap_mask,
)

__all__ = ["ImageFolderDataset", "SegmentationFolderDataset", "bad_file_message", "split_by_ids"]

logger = logging.getLogger(__name__)

Transform = Callable[[Sample], Any]

# Errors that mean "this file cannot be used" for unlabelled pretraining: unreadable (READ_ERRORS)
# or an odd channel count (ValueError).
_READ_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, ValueError)


class ImageFolderDataset(Dataset):
    """Unlabelled images found recursively under a folder, for self-supervised pretraining.

    Files are listed once (sorted by path, suffix matched case-insensitively) and decoded at
    access time. A file that cannot be read (corrupt, truncated, wrong channel count) is skipped
    with one warning and counted in :attr:`num_skipped`; the next readable file is returned in
    its place, so one bad file never stops an epoch. With DataLoader workers each worker process
    keeps its own count.

    With ``on_bad_file="error"`` every file is instead decoded once at construction and the first
    unreadable one is a ``ValueError`` naming it, so a run stops before training rather than
    losing work mid-epoch.

    Samples: ``{"image": (C, H, W) float32, "id": str}`` where ``id`` is the path relative to
    ``root`` without suffix (posix separators).

    Args:
        root: Folder to search (recursively).
        in_chans: Channels of the returned images (see :func:`~hybridvision.data.io.read_image`).
        transform: Callable on the sample dict (image as ``tv_tensors.Image``).
        extensions: Accepted suffixes.
        on_bad_file: ``"skip"`` (default: skip, count and warn at access time) or ``"error"``
            (check every file now; the ``data.on_bad_file`` default of the stage scripts).

    Raises:
        FileNotFoundError: If ``root`` does not exist or holds no image file.
        ValueError: With ``on_bad_file="error"``, naming the first unreadable file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        in_chans: int = 3,
        transform: Transform | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        on_bad_file: Literal["error", "skip"] = "skip",
    ) -> None:
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.files = list_files(self.root, extensions)
        if not self.files:
            raise FileNotFoundError(
                f"image folder {self.root} contains no image files with extensions {tuple(extensions)}"
            )
        self.ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in self.files]
        self.in_chans = in_chans
        self.transform = transform
        self.on_bad_file = on_bad_file
        self._bad: set[int] = set()
        if on_bad_file == "error":
            for path in self.files:
                try:
                    read_image(path, in_chans)
                except _READ_ERRORS as err:
                    raise ValueError(bad_file_message("image", path, err)) from err

    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far (in this process)."""
        return len(self._bad)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        n = len(self.files)
        if not -n <= index < n:  # iteration (list(dataset), for x in dataset) stops here
            raise IndexError(f"index {index} out of range for {n} images")
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                image = read_image(self.files[i], self.in_chans)
            except _READ_ERRORS as err:
                self._bad.add(i)
                logger.warning("skipping unreadable image %s: %s", self.files[i], err)
                continue
            return apply_transform({"image": image, "id": self.ids[i]}, self.transform)
        raise RuntimeError(f"no readable image left in {self.root}: all {n} files failed to load")


class SegmentationFolderDataset(Dataset):
    """Image + class-index mask pairs in the layout ``images/<split>/<id>.<ext>``, ``masks/<split>/<id>.png``.

    Images and masks are matched by file stem. Construction fails loudly on an image without a
    mask. With ``check="full"`` every mask is read once at construction to verify its size
    against its image's header and its values against ``[0, num_classes) ∪ {ignore_index}``
    (and per-class pixel counts are kept in :attr:`class_pixel_counts`); with ``"lazy"`` the
    same checks run only when an item is loaded. They always run per item as well. The full check
    also decodes every image, so a truncated or 0-byte file is found before training starts.

    Unreadable files (corrupt, truncated, 0-byte images or masks) follow ``on_bad_file``:
    ``"error"`` raises a ``ValueError`` naming the file; ``"skip"`` drops the pair (at
    construction with ``check="full"``, else at access time, returning the next readable pair),
    counts it in :attr:`num_skipped` and logs a warning. Size and value errors always raise.

    Masks whose stored values are not class ids (0/255 binary masks) are mapped with
    ``mask_values``. A split whose only non-zero value is ``ignore_index`` is refused (every
    foreground pixel would silently be ignored); a class that never occurs, or more than half of
    the pixels ignored, is a warning.

    Samples: ``{"image": (C, H, W) float32, "mask": (H, W) int64, "id": str}``.

    Args:
        root: Dataset root holding ``images/`` and ``masks/``.
        split: Sub-folder name, e.g. ``"train"``.
        num_classes: Number of classes K.
        ignore_index: Mask value of ignored pixels, or None if the set has none.
        in_chans: Channels of the returned images.
        transform: Callable on the sample dict (``tv_tensors.Image`` / ``tv_tensors.Mask``).
        check: ``"full"`` (verify every mask now) or ``"lazy"`` (verify on access only).
        ids: Keep only these ids (file stems, e.g. ``["25", "26"]``), in the given order.
        mask_values: Stored mask value of class 0, 1, ... (see
            :func:`~hybridvision.data.io.remap_mask`); None: masks store class ids.
        on_bad_file: ``"error"`` or ``"skip"`` for unreadable files (see above).

    Raises:
        FileNotFoundError: Missing folders, an image without a mask, or unknown ``ids``.
        ValueError: A mask whose size differs from its image, with out-of-range values, a split
            whose only foreground value is ``ignore_index``, or (``on_bad_file="error"``) an
            unreadable file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        num_classes: int,
        ignore_index: int | None = 255,
        in_chans: int = 3,
        transform: Transform | None = None,
        check: Literal["full", "lazy"] = "full",
        ids: Sequence[str] | None = None,
        mask_values: Sequence[int] | None = None,
        on_bad_file: Literal["error", "skip"] = "error",
    ) -> None:
        if check not in ("full", "lazy"):
            raise ValueError(f"check must be 'full' or 'lazy', got {check!r}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.root = Path(root)
        self.split = split
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.in_chans = in_chans
        self.transform = transform
        self.mask_values = list(mask_values) if mask_values else None
        self.on_bad_file = on_bad_file
        self._bad: set[int] = set()
        pairs = self.list_pairs(self.root, split)
        if ids is not None:
            ids = [str(i) for i in ids]
            missing = [i for i in ids if i not in pairs]
            if missing:
                raise FileNotFoundError(
                    f"ids {missing} not found in {self.root / 'images' / split} "
                    f"(available: {_preview(list(pairs))})"
                )
            pairs = {i: pairs[i] for i in ids}
        self.ids = list(pairs)
        self.image_files = [pairs[i][0] for i in self.ids]
        self.mask_files = [pairs[i][1] for i in self.ids]
        self.class_pixel_counts: torch.Tensor | None = None
        """Pixels per class (K,) int64 over the whole split; filled by ``check="full"``."""
        self.ignored_pixel_count: int | None = None
        """Pixels equal to ``ignore_index`` over the whole split; filled by ``check="full"``."""
        if check == "full":
            self._check_all()

    @staticmethod
    def list_pairs(root: str | os.PathLike, split: str) -> dict[str, tuple[Path, Path]]:
        """Match ``images/<split>/<id>.*`` with ``masks/<split>/<id>.png``.

        Returns:
            ``{id: (image_path, mask_path)}`` sorted by id.
        """
        root = Path(root)
        image_dir, mask_dir = root / "images" / split, root / "masks" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder {image_dir} does not exist")
        if not mask_dir.is_dir():
            raise FileNotFoundError(
                f"mask folder {mask_dir} does not exist; for unlabelled images use "
                f"ImageFolderDataset({str(image_dir)!r})"
            )
        images: dict[str, Path] = {}
        for path in list_files(image_dir, IMAGE_EXTENSIONS, recursive=False):
            if path.stem in images:
                raise ValueError(f"two images share the id {path.stem!r}: {images[path.stem]} and {path}")
            images[path.stem] = path
        if not images:
            raise FileNotFoundError(f"image folder {image_dir} contains no image files")
        pairs = {}
        for stem, image_path in images.items():
            mask_path = mask_dir / f"{stem}.png"
            if not mask_path.is_file():
                raise FileNotFoundError(f"image {image_path} has no mask: expected {mask_path}")
            pairs[stem] = (image_path, mask_path)
        return pairs

    @property
    def num_skipped(self) -> int:
        """Unreadable pairs skipped so far (at construction and, in this process, at access time)."""
        return len(self._bad) + self._skipped_at_init

    _skipped_at_init = 0

    def _read_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode pair ``index``: image (C, H, W), class-id mask (H, W); ValueError names a bad file."""
        image_path, mask_path = self.image_files[index], self.mask_files[index]
        try:
            image = read_image(image_path, self.in_chans)
        except READ_ERRORS as err:
            raise _BadFile(bad_file_message("image", image_path, err)) from err
        try:
            mask = read_mask(mask_path)
        except READ_ERRORS as err:
            raise _BadFile(bad_file_message("mask", mask_path, err)) from err
        self._check_size(image_path, mask_path, (image.shape[2], image.shape[1]), mask)
        if self.mask_values is not None:
            mask = remap_mask(mask, self.mask_values, self.ignore_index, str(mask_path))
        return image, mask

    def _check_all(self) -> None:
        counts = torch.zeros(self.num_classes, dtype=torch.int64)
        total = 0
        keep: list[int] = []
        for index, mask_path in enumerate(self.mask_files):
            try:
                _, mask = self._read_pair(index)
            except _BadFile as err:
                if self.on_bad_file == "error":
                    raise ValueError(str(err)) from err.__cause__
                logger.warning("skipping %s (data.on_bad_file=skip)", err)
                continue
            per_value = check_mask_values(mask, self.num_classes, self.ignore_index, str(mask_path))
            counts += per_value[: self.num_classes]
            total += mask.numel()
            keep.append(index)
        if len(keep) < len(self.ids):
            self._skipped_at_init = len(self.ids) - len(keep)
            logger.warning(
                "%s: skipped %d unreadable of %d image/mask pairs",
                self.root / "images" / self.split,
                self._skipped_at_init,
                len(self.ids),
            )
            if not keep:
                raise ValueError(f"no readable image/mask pair left in {self.root / 'images' / self.split}")
            self.ids = [self.ids[i] for i in keep]
            self.image_files = [self.image_files[i] for i in keep]
            self.mask_files = [self.mask_files[i] for i in keep]
        self.class_pixel_counts = counts
        # After the check every pixel is a class id or ignore_index.
        self.ignored_pixel_count = total - int(counts.sum())
        self._check_label_statistics(total)

    def _check_label_statistics(self, total: int) -> None:
        """Refuse a split whose only foreground is the ignore value; warn on absent classes."""
        counts, ignored = self.class_pixel_counts, self.ignored_pixel_count
        assert counts is not None and ignored is not None  # set just before this is called
        where = self.root / "masks" / self.split
        if ignored and not int(counts[1:].sum()) and self.mask_values is None:
            raise ValueError(
                f"masks in {where} hold only the values 0 and {self.ignore_index}, and "
                f"{self.ignore_index} is data.ignore_index: every non-zero pixel would be ignored and "
                f"the metrics would be meaningless. For 0/{self.ignore_index} binary masks set "
                f"data.mask_values=[0, {self.ignore_index}]; if {self.ignore_index} is a class, set "
                "data.ignore_index to an unused value (e.g. -100)"
            )
        absent = [i for i in range(len(counts)) if int(counts[i]) == 0]
        if absent:
            logger.warning(
                "%s: class(es) %s never occur in the %d masks of split %r (check data.num_classes, "
                "data.mask_values and data.ignore_index)",
                where,
                absent,
                len(self.ids),
                self.split,
            )
        if total and ignored > total / 2:
            logger.warning(
                "%s: %.1f%% of the pixels of split %r equal data.ignore_index=%s and are ignored",
                where,
                100.0 * ignored / total,
                self.split,
                self.ignore_index,
            )

    @staticmethod
    def _check_size(
        image_path: Path, mask_path: Path, image_size: tuple[int, int], mask: torch.Tensor
    ) -> None:
        mask_size = (mask.shape[1], mask.shape[0])  # PIL convention (W, H)
        if mask_size != tuple(image_size):
            raise ValueError(
                f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} "
                f"is {image_size[0]}x{image_size[1]}" + _orientation_hint(image_path, mask_size, image_size)
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Any:
        n = len(self.ids)
        if not -n <= index < n:  # iteration (list(dataset), for x in dataset) stops here
            raise IndexError(f"index {index} out of range for {n} samples")
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                image, mask = self._read_pair(i)
            except _BadFile as err:
                if self.on_bad_file == "error":
                    raise ValueError(str(err)) from err.__cause__
                self._bad.add(i)
                logger.warning("skipping %s (data.on_bad_file=skip)", err)
                continue
            check_mask_values(mask, self.num_classes, self.ignore_index, str(self.mask_files[i]))
            sample = {"image": image, "mask": mask, "id": self.ids[i]}
            return apply_transform(sample, self.transform)
        raise ValueError(f"no readable image/mask pair left in {self.root / 'images' / self.split}")


def _orientation_hint(image_path: Path, mask_size: tuple[int, int], image_size: tuple[int, int]) -> str:
    """Why a mask may have its image's size turned by 90 degrees: the image's EXIF orientation."""
    from PIL import Image

    from hybridvision.deploy.reader import image_orientation

    if mask_size != (image_size[1], image_size[0]):
        return ""
    try:
        with Image.open(image_path) as img:
            orientation = image_orientation(img)
    except READ_ERRORS:
        return ""
    if orientation < 5:
        return ""
    return (
        f" as displayed: its EXIF orientation tag ({orientation}) turns the stored pixels by 90 "
        "degrees, and the mask matches the stored ones; turn the mask the same way (or save the "
        "image upright without the tag)"
    )


class _BadFile(Exception):
    """An unreadable image or mask (internal: turned into ValueError or a skip)."""


def bad_file_message(kind: str, path: str | os.PathLike, err: BaseException) -> str:
    """One line naming an unreadable file, why, and the two ways out."""
    size = ""
    try:
        if Path(path).stat().st_size == 0:
            size = " (0 bytes)"
    except OSError:
        pass
    reason = " ".join(str(err).split()) or type(err).__name__
    return (
        f"{kind} {path}{size} cannot be read: {reason}; replace or remove it, or set "
        "data.on_bad_file=skip to skip unreadable files"
    )


def split_by_ids(
    root: str | os.PathLike,
    split: str,
    holdout_ids: Sequence[str],
    *,
    train_transform: Transform | None = None,
    holdout_transform: Transform | None = None,
    **kwargs: Any,
) -> tuple[SegmentationFolderDataset, SegmentationFolderDataset]:
    """Split one folder split into (rest, holdout) by an explicit id list.

    Useful where a set has no validation split, e.g. ISBI 2012 EM: hold out a contiguous block of
    sections (``holdout_ids=["25", ..., "29"]``) rather than random slices.

    Args:
        root: Dataset root (see :class:`SegmentationFolderDataset`).
        split: Split to divide, e.g. ``"train"``.
        holdout_ids: Ids (file stems) of the held-out part; each must exist.
        train_transform: Transform of the remaining part.
        holdout_transform: Transform of the held-out part.
        **kwargs: Passed to both datasets (``num_classes``, ``ignore_index``, ``in_chans``, ``check``).

    Returns:
        ``(rest, holdout)`` datasets with disjoint ids.
    """
    holdout = [str(i) for i in holdout_ids]
    all_ids = list(SegmentationFolderDataset.list_pairs(root, split))
    missing = sorted(set(holdout) - set(all_ids))
    if missing:
        raise FileNotFoundError(
            f"holdout ids {missing} not found in {Path(root) / 'images' / split} "
            f"(available: {_preview(all_ids)})"
        )
    rest = [i for i in all_ids if i not in set(holdout)]
    if not rest:
        raise ValueError(f"holdout_ids cover the whole split {split!r}; nothing left to train on")
    return (
        SegmentationFolderDataset(root, split, ids=rest, transform=train_transform, **kwargs),
        SegmentationFolderDataset(root, split, ids=holdout, transform=holdout_transform, **kwargs),
    )


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
