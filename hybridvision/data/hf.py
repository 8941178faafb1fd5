"""Hugging Face ``datasets`` sources: ``save_to_disk`` folders, image folders and hub ids.

``datasets`` is imported lazily, so ``import hybridvision.data`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from hybridvision.data.io import (
    READ_ERRORS,
    Sample,
    apply_transform,
    check_mask_values,
    image_to_tensor,
    mask_to_tensor,
    read_image,
    read_mask,
    remap_mask,
)
from hybridvision.hub_access import env_offline, hub_offline_reason

if TYPE_CHECKING:
    import datasets

__all__ = ["HFSegmentationDataset", "HFStreamingDataset", "hub_offline_reason", "load_hf_dataset"]

Transform = Callable[[Sample], Any]

_MAX_DEFAULT_SHARDS = 64
_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class _RowConverter:
    """Turns one HF row into a sample dict (shared by the map-style and streaming wrappers)."""

    def __init__(
        self,
        image_column: str,
        mask_column: str | None,
        id_column: str | None,
        in_chans: int,
        num_classes: int | None,
        ignore_index: int | None,
        transform: Transform | None,
        mask_values: list[int] | None = None,
    ) -> None:
        self.image_column, self.mask_column, self.id_column = image_column, mask_column, id_column
        self.in_chans, self.num_classes, self.ignore_index = in_chans, num_classes, ignore_index
        self.transform = transform
        self.mask_values = mask_values

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.image_column, self.mask_column, self.id_column) if c is not None]

    def check_columns(self, available: list[str] | None, source: str) -> None:
        if available is None:  # streaming sources without declared features: checked per row
            return
        for column in self.columns:
            if column not in available:
                raise ValueError(f"column {column!r} not found in {source}; available columns: {available}")

    def __call__(self, row: dict[str, Any], fallback_id: str) -> Any:
        self.check_columns(list(row), "the dataset row")
        sample_id = str(row[self.id_column]) if self.id_column is not None else fallback_id
        name = f"row {sample_id!r} column {self.image_column!r}"
        try:
            sample: Sample = {"image": _to_image(row[self.image_column], self.in_chans, name)}
        except READ_ERRORS as err:
            raise ValueError(f"{name}: the image cannot be decoded: {err}") from err
        if self.mask_column is not None:
            mask_name = f"row {sample_id!r} column {self.mask_column!r}"
            try:
                mask = _to_mask(row[self.mask_column], mask_name)
            except READ_ERRORS as err:
                raise ValueError(f"{mask_name}: the mask cannot be decoded: {err}") from err
            if self.mask_values is not None:
                mask = remap_mask(mask, self.mask_values, self.ignore_index, mask_name)
            if tuple(mask.shape) != tuple(sample["image"].shape[1:]):
                raise ValueError(
                    f"{mask_name} has size {tuple(mask.shape)} (H, W) but the image is "
                    f"{tuple(sample['image'].shape[1:])}"
                )
            if self.num_classes is not None:
                check_mask_values(mask, self.num_classes, self.ignore_index, mask_name)
            sample["mask"] = mask
        sample["id"] = sample_id
        return apply_transform(sample, self.transform)


class HFSegmentationDataset(Dataset):
    """Map-style wrapper: HF ``Dataset`` rows -> sample dicts.

    Args:
        dataset: A ``datasets.Dataset``.
        converter: Row conversion settings (built by :func:`load_hf_dataset`).
    """

    def __init__(self, dataset: datasets.Dataset, converter: _RowConverter) -> None:
        converter.check_columns(dataset.column_names, "the dataset")
        self.dataset = dataset.select_columns(converter.columns)  # decode only what is used
        self.converter = converter

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.converter(self.dataset[index], fallback_id=str(index))


class HFStreamingDataset(IterableDataset):
    """Streaming wrapper: an HF ``IterableDataset`` split per process and per DataLoader worker.

    The process split is ``datasets.distributed.split_dataset_by_node(rank, world_size)``; inside
    a DataLoader worker, ``datasets`` gives each worker its own shards. Every example is thus read
    by exactly one (process, worker). Workers beyond the number of shards (of this process) get
    nothing, so give sources at least ``world_size * num_workers`` shards.

    Attributes:
        shards_itself: Always True: the engine must not wrap this dataset in a distributed sampler
            or let Accelerate split its batches again.
    """

    shards_itself = True

    def __init__(
        self, dataset: datasets.IterableDataset, converter: _RowConverter, rank: int = 0, world_size: int = 1
    ) -> None:
        from datasets.distributed import split_dataset_by_node

        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        converter.check_columns(dataset.column_names, "the dataset")
        self.rank, self.world_size = rank, world_size
        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.converter = converter

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to ``datasets`` (reshuffles shards if the source was shuffled)."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        for n, row in enumerate(self.dataset):
            yield self.converter(row, fallback_id=f"{self.rank}-{worker}-{n}")


def load_hf_dataset(
    source: str | os.PathLike,
    split: str = "train",
    image_column: str = "image",
    mask_column: str | None = None,
    *,
    in_chans: int = 3,
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    mask_values: list[int] | None = None,
    transform: Transform | None = None,
    streaming: bool = False,
    rank: int = 0,
    world_size: int = 1,
    id_column: str | None = None,
    num_shards: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> HFSegmentationDataset | HFStreamingDataset:
    """Load a Hugging Face dataset as sample dicts.

    ``source`` may be a ``save_to_disk`` folder (``datasets.load_from_disk``), any other folder of
    images (``load_dataset("imagefolder", data_dir=...)``; a ``metadata.jsonl`` with
    ``file_name`` / ``mask_file_name`` keys gives ``image`` / ``mask`` columns), or a hub id
    (``load_dataset(source)``).

    Args:
        source: Folder path or hub id.
        split: Split to load (folders saved as a ``DatasetDict`` and hub sets).
        image_column: Column with the images (PIL images, paths, or arrays (H, W[, C])).
        mask_column: Column with class-index masks, or None for unlabelled data.
        in_chans: Channels of the returned images.
        num_classes: If given, mask values are checked against [0, num_classes) ∪ {ignore_index}.
        ignore_index: Mask value of ignored pixels, or None.
        mask_values: Stored mask value of class 0, 1, ... (e.g. ``[0, 255]``); None: class ids.
        transform: Callable on the sample dict (``tv_tensors.Image`` / ``tv_tensors.Mask``).
        streaming: Return an :class:`HFStreamingDataset` (iterable, sharded per process and worker).
        rank: This process's index (streaming only; map-style sets are sharded by the engine).
        world_size: Number of processes (streaming only).
        id_column: Column holding sample ids; default ``"id"`` if present, else the row index
            (map-style) or ``"<rank>-<worker>-<n>"`` (streaming).
        num_shards: Shards of a streamed ``save_to_disk`` folder (default: min(rows, 64)).
        cache_dir: ``datasets`` cache folder for ``load_dataset``.

    Returns:
        A map-style :class:`HFSegmentationDataset` or an iterable :class:`HFStreamingDataset`.

    Raises:
        ValueError: Missing split or column (the message lists the available ones); a hub id
            while offline (``HF_HUB_OFFLINE=1`` and not cached, or no network), in one line.
    """
    dataset = _load(source, split, streaming, num_shards, cache_dir)
    columns = dataset.column_names
    dataset = _undecoded(dataset, [image_column, mask_column])
    if id_column is None and columns is not None and "id" in columns:
        id_column = "id"
    converter = _RowConverter(
        image_column, mask_column, id_column, in_chans, num_classes, ignore_index, transform, mask_values
    )
    converter.check_columns(columns, str(source))
    if streaming:
        return HFStreamingDataset(dataset, converter, rank=rank, world_size=world_size)
    return HFSegmentationDataset(dataset, converter)


def _load(
    source: str | os.PathLike,
    split: str,
    streaming: bool,
    num_shards: int | None,
    cache_dir: str | os.PathLike | None,
) -> datasets.Dataset | datasets.IterableDataset:
    import datasets

    path = Path(source)
    cache = str(cache_dir) if cache_dir is not None else None
    if path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"split {split!r} not found in {path}; available splits: {list(loaded)}")
            loaded = loaded[split]
        if streaming:
            shards = num_shards or max(1, min(len(loaded), _MAX_DEFAULT_SHARDS))
            return loaded.to_iterable_dataset(num_shards=shards)
        return loaded
    if path.is_dir():
        return _with_split_error(
            lambda: datasets.load_dataset(
                "imagefolder", data_dir=str(path), split=split, streaming=streaming, cache_dir=cache
            ),
            split,
            str(path),
        )
    if path.exists():
        raise ValueError(f"{path} is a file; expected a save_to_disk folder, an image folder or a hub id")
    offline = hub_offline_reason()
    if offline and not env_offline():
        raise ValueError(
            f"data.source={str(source)!r} is not a local folder, and as a Hugging Face hub dataset it "
            f"cannot be downloaded: {offline}. Check the path, or set HF_HUB_OFFLINE=1 to use a "
            "copy in the local datasets cache"
        )
    try:
        return _with_split_error(
            lambda: datasets.load_dataset(str(source), split=split, streaming=streaming, cache_dir=cache),
            split,
            str(source),
        )
    except (ConnectionError, OSError) as err:
        if not offline:
            raise
        raise ValueError(
            f"data.source={str(source)!r} is not a local folder and not in the local datasets cache "
            f"({offline}); check the path, or download it once with network access"
        ) from err


def _with_split_error(load: Callable[[], Any], split: str, source: str) -> Any:
    try:
        return load()
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"split {split!r} could not be loaded from {source}: {err}") from err
        raise


def _undecoded(dataset: Any, columns: list[str | None]) -> Any:
    """``dataset`` with its ``datasets.Image`` columns among ``columns`` left undecoded.

    Their files then go through the project's reader (:func:`~hybridvision.data.io.read_image`: 16-bit
    PNGs at full depth, EXIF orientation as everywhere else) rather than ``datasets``' 8-bit PIL
    decoding.
    """
    import datasets

    features = dataset.features or {}
    for column in columns:
        feature = features.get(column) if column is not None else None
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(mode=feature.mode, decode=False))
    return dataset


def _remote(value: dict) -> bool:
    """An undecoded cell whose file is neither inline nor local (a streamed hub file)."""
    return value.get("bytes") is None and not Path(str(value.get("path"))).is_file()


def _decode_remote(value: dict) -> Image.Image:
    import datasets

    return datasets.Image().decode_example(value)  # opens hub URLs; applies EXIF orientation


def _to_image(value: Any, in_chans: int, name: str) -> torch.Tensor:
    """Decode an HF image cell: PIL image, undecoded ``{"bytes", "path"}`` dict, path or array."""
    if isinstance(value, Image.Image):
        return image_to_tensor(value, in_chans, name)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return read_image(value["bytes"], in_chans, name=name)
        if _remote(value):
            return image_to_tensor(_decode_remote(value), in_chans, name)
        return read_image(value["path"], in_chans)
    if isinstance(value, str | os.PathLike):
        return read_image(value, in_chans)
    if isinstance(value, np.ndarray | list | torch.Tensor):
        return image_to_tensor(np.asarray(value), in_chans, name)
    raise ValueError(f"{name} holds {type(value).__name__} values; expected images, paths or arrays")


def _to_mask(value: Any, name: str) -> torch.Tensor:
    """Decode an HF mask cell: PIL image, undecoded dict, path or integer array (H, W)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return read_mask(value["bytes"], name=name)
        if _remote(value):
            return mask_to_tensor(_decode_remote(value), name)
        return read_mask(value["path"], name=name)
    if isinstance(value, str | os.PathLike):
        return read_mask(value, name=name)
    if isinstance(value, Image.Image | np.ndarray | list | torch.Tensor):
        return mask_to_tensor(value if isinstance(value, Image.Image) else np.asarray(value), name)
    raise ValueError(
        f"{name} holds {type(value).__name__} values, not per-pixel masks; "
        "is this a classification label column?"
    )
