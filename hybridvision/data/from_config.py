"""Build datasets from a :class:`~hybridvision.config.DataConfig` (``data.source``).

``data.source`` is one of

* ``synthetic`` — the built-in procedurally generated shapes set (the default everywhere);
* a folder in the layout ``images/<split>/<id>.<ext>`` (+ ``masks/<split>/<id>.png`` when labelled);
* any other folder of images (unlabelled, searched recursively) — pretraining only;
* a ``datasets`` ``save_to_disk`` folder, or a Hugging Face hub id ``owner/name``.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset, Subset

from ..config import ConfigError, DataConfig
from .folder import ImageFolderDataset, SegmentationFolderDataset, split_by_ids
from .hf import load_hf_dataset
from .synthetic import SyntheticShapesDataset

__all__ = [
    "source_kind",
    "check_streaming",
    "build_unlabelled_dataset",
    "build_labelled_datasets",
    "class_names",
    "image_sizes",
    "auto_resize",
    "resolve_resize",
    "labelled_subset",
    "SYNTHETIC_VAL_SEED_OFFSET",
]

#: ``data.resize=auto``: sizes within this ratio of each other count as one scale (kept native)
SAME_SCALE_RATIO = 1.25
#: ``data.resize=auto``: training images whose sizes are probed (evenly spaced over the split)
SIZE_PROBE_LIMIT = 1000

#: the synthetic evaluation set uses ``seed + offset`` so it never repeats training images
SYNTHETIC_VAL_SEED_OFFSET = 100_003

Transform = Callable[[dict], Any]


def source_kind(source: str) -> str:
    """``synthetic`` | ``folder`` (images/<split> layout) | ``image_folder`` | ``hf_disk`` | ``hub``.

    A string that does not exist locally is a hub id only if it has the form ``owner/name`` and
    ``owner`` is not a local folder; anything else that looks like a path (starts with ``.``,
    ``/`` or ``~``, has more or fewer than one ``/``, or a backslash) is a "no such folder" error
    at once, with the closest existing names as a hint.

    Raises:
        ConfigError: For a file, or a local-looking path that does not exist.
    """
    if source == "synthetic":
        return "synthetic"
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "images").is_dir():
            return "folder"
        if any((path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "hf_disk"
        return "image_folder"
    if path.exists():
        raise ConfigError(f"data.source={source!r} is a file; expected a folder, a hub id or 'synthetic'")
    if looks_like_hub_id(source):
        return "hub"
    raise ConfigError(f"data.source={source!r}: no such folder{missing_path_hint(path)}")


def looks_like_hub_id(text: str) -> bool:
    """True for ``owner/name`` strings that cannot be a local path (``owner`` is no local folder)."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1:
        return False
    owner, name = text.split("/")
    return bool(owner and name) and not Path(owner).exists()


def missing_path_hint(path: Path) -> str:
    """`` (did you mean ...?)`` from the deepest existing parent of a missing ``path``, or ``''``."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return ""
    rel = path.relative_to(parent).parts if path.is_relative_to(parent) else (path.name,)
    try:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    except OSError:
        return ""
    close = difflib.get_close_matches(rel[0], names, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(str(parent / c) for c in close)}?)"
    return f" ({parent} exists but has no {rel[0]!r})"


def _synthetic_classes(cfg: DataConfig) -> int:
    return max(cfg.num_classes, 2)


def check_streaming(cfg: DataConfig, labelled: bool) -> None:
    """Refuse ``data.streaming=true`` where it cannot apply, so the setting is never ignored.

    It streams Hugging Face sources (``save_to_disk`` folders and hub ids) of unlabelled
    pretraining data. Labelled data (fine-tuning, distillation) is read map-style: evaluation
    counts every sample exactly once across processes, and distillation indexes its training set
    (unlabelled images mixed in, int8 calibration). Synthetic and file-folder sources have no
    stream (folders are read file by file already).

    Raises:
        ConfigError: One line naming ``data.streaming`` and what to set.
    """
    if not cfg.streaming:
        return
    if labelled:
        raise ConfigError(
            "data.streaming=true applies to unlabelled pretraining data only: fine-tuning and "
            "distillation read labelled data map-style (evaluation counts each sample once across "
            "processes, distillation indexes its training set); set data.streaming=false (a hub "
            "dataset is then downloaded once into the datasets cache)"
        )
    kind = source_kind(cfg.source)
    if kind not in ("hf_disk", "hub"):
        what = "the synthetic set" if kind == "synthetic" else "a folder of image files, read file by file"
        raise ConfigError(
            f"data.streaming=true streams Hugging Face datasets sources only, and data.source="
            f"{cfg.source!r} is {what}; set data.streaming=false"
        )


def build_unlabelled_dataset(
    cfg: DataConfig, transform: Transform | None, seed: int = 0, rank: int = 0, world_size: int = 1
) -> Dataset:
    """Images for self-supervised pretraining (masks, if any, are not read).

    ``data.streaming`` streams Hugging Face sources (see :func:`check_streaming`).
    """
    check_streaming(cfg, labelled=False)
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        return SyntheticShapesDataset(
            num_samples=cfg.synthetic_samples,
            image_size=cfg.image_size,
            num_classes=_synthetic_classes(cfg),
            in_chans=cfg.in_chans,
            seed=seed,
            labelled=False,
            transform=transform,
        )
    if kind == "folder":
        root = Path(cfg.source) / "images" / cfg.split
        if not root.is_dir():
            raise ConfigError(f"data.split={cfg.split!r}: folder {root} does not exist")
        return ImageFolderDataset(
            root, in_chans=cfg.in_chans, transform=transform, on_bad_file=cfg.on_bad_file
        )
    if kind == "image_folder":
        return ImageFolderDataset(
            cfg.source, in_chans=cfg.in_chans, transform=transform, on_bad_file=cfg.on_bad_file
        )
    return load_hf_dataset(
        cfg.source,
        split=cfg.split,
        image_column=cfg.image_column,
        mask_column=None,
        in_chans=cfg.in_chans,
        transform=transform,
        streaming=cfg.streaming,
        rank=rank,
        world_size=world_size,
    )


def labelled_subset(train: Dataset, cfg: DataConfig, seed: int) -> tuple[Dataset, list[str] | None]:
    """The part of the labelled training split that keeps its labels, and its sample ids.

    ``data.labelled_ids`` names the samples; ``data.label_fraction < 1`` draws
    ``max(1, round(fraction * N))`` of them without replacement under ``seed`` (a new seed, a new
    subset; the same seed, the same one), in split order. Ids are the samples' own (file stems of a
    folder) or their positions in the split. ``(train, None)`` when every sample keeps its label.

    Raises:
        ConfigError: ``data.labelled_ids`` names ids the split does not hold.
    """
    if not cfg.labelled_ids and cfg.label_fraction >= 1.0:
        return train, None
    ids = [str(i) for i in (getattr(train, "ids", None) or range(len(train)))]  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style ones have it
    if cfg.labelled_ids:
        wanted = {str(i) for i in cfg.labelled_ids}
        missing = sorted(wanted - set(ids))
        if missing:
            raise ConfigError(
                f"data.labelled_ids: {missing[:5]} not in split {cfg.split!r} of {cfg.source} "
                f"(its ids look like {ids[:3]}); give ids of that split"
            )
        chosen = [i for i, name in enumerate(ids) if name in wanted]
    else:
        count = max(1, round(cfg.label_fraction * len(ids)))
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = sorted(order[:count])
    return Subset(train, chosen), [ids[i] for i in chosen]


def build_labelled_datasets(
    cfg: DataConfig,
    train_transform: Transform | None,
    eval_transform: Transform | None,
    seed: int = 0,
    check: str = "full",
) -> tuple[Dataset, Dataset | None]:
    """(train, validation) image+mask datasets; validation is None when ``data.val_split=''``.

    Both are map-style: ``data.streaming=true`` is refused (:func:`check_streaming`).
    """
    check_streaming(cfg, labelled=True)
    kind = source_kind(cfg.source)
    ignore = cfg.ignore_index
    classes = max(cfg.num_classes, 2)
    if kind == "synthetic":
        common: dict[str, Any] = dict(
            image_size=cfg.image_size, num_classes=classes, in_chans=cfg.in_chans, labelled=True
        )
        train: Dataset = SyntheticShapesDataset(
            cfg.synthetic_samples, seed=seed, transform=train_transform, **common
        )
        val: Dataset | None = None
        if cfg.val_split and cfg.synthetic_val_samples:
            val = SyntheticShapesDataset(
                cfg.synthetic_val_samples,
                seed=seed + SYNTHETIC_VAL_SEED_OFFSET,
                transform=eval_transform,
                **common,
            )
        return train, val
    if kind == "folder":
        common = dict(
            num_classes=classes,
            ignore_index=ignore,
            in_chans=cfg.in_chans,
            check=check,
            mask_values=cfg.mask_values or None,
            on_bad_file=cfg.on_bad_file,
        )
        if cfg.val_ids:
            return split_by_ids(
                cfg.source,
                cfg.split,
                cfg.val_ids,
                train_transform=train_transform,
                holdout_transform=eval_transform,
                **common,
            )
        train = SegmentationFolderDataset(cfg.source, cfg.split, transform=train_transform, **common)
        val = None
        if cfg.val_split:
            val = SegmentationFolderDataset(cfg.source, cfg.val_split, transform=eval_transform, **common)
        return train, val
    if kind == "image_folder":
        raise ConfigError(
            f"data.source={cfg.source} has no images/ and masks/ folders: fine-tuning needs "
            "images/<split>/<id>.<ext> with masks/<split>/<id>.png"
        )
    hf: dict[str, Any] = dict(
        image_column=cfg.image_column,
        mask_column=cfg.mask_column,
        in_chans=cfg.in_chans,
        num_classes=classes,
        ignore_index=ignore,
        mask_values=cfg.mask_values or None,
    )
    train = load_hf_dataset(cfg.source, split=cfg.split, transform=train_transform, **hf)
    val = (
        load_hf_dataset(cfg.source, split=cfg.val_split, transform=eval_transform, **hf)
        if cfg.val_split
        else None
    )
    return train, val


def class_names(cfg: DataConfig) -> list[str]:
    """``data.class_names``, else the synthetic set's names, else ``class_<i>``."""
    size = max(cfg.num_classes, 2)
    if cfg.class_names:
        return list(cfg.class_names)
    if cfg.source == "synthetic":
        from .synthetic import SHAPE_CLASSES

        return ["background"] + [c.name for c in SHAPE_CLASSES[: size - 1]]
    return [f"class_{i}" for i in range(size)]


def _evenly(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _header_size(path: Path) -> tuple[int, int] | None:
    """(H, W) of an image file as displayed (EXIF orientation applied, as the reader does).

    Read from its header where the format allows (PNG's EXIF may follow the pixels); None if unreadable.
    """
    from PIL import Image

    from ..deploy.reader import displayed_size

    try:
        with Image.open(path) as img:
            return displayed_size(img)
    except Exception:  # noqa: BLE001 - e.g. multi-band TIFFs PIL cannot open: decode them
        from .io import READ_ERRORS, read_image

        try:
            image = read_image(path, 1)
        except READ_ERRORS + (ValueError,):
            return None  # a broken file: the dataset names it (data.on_bad_file)
        return int(image.shape[-2]), int(image.shape[-1])


def image_sizes(cfg: DataConfig, limit: int = SIZE_PROBE_LIMIT) -> list[tuple[int, int]] | None:
    """(H, W) of up to ``limit`` training images (evenly spaced).

    None where sizes are not known without reading the stream (streaming sources). The synthetic set
    has one size.
    """
    kind = source_kind(cfg.source)
    if kind == "synthetic":
        return [(int(cfg.image_size[0]), int(cfg.image_size[1]))]  # every sample has this size
    if kind in ("folder", "image_folder"):
        from .io import IMAGE_EXTENSIONS, list_files

        root = Path(cfg.source) / "images" / cfg.split if kind == "folder" else Path(cfg.source)
        files = list_files(root, IMAGE_EXTENSIONS, recursive=kind == "image_folder") if root.is_dir() else []
        held_out = {str(i) for i in cfg.val_ids}
        files = [f for f in files if f.stem not in held_out]
        sizes = [s for s in map(_header_size, _evenly(files, limit)) if s is not None]
        return sizes or None
    if cfg.streaming:
        return None
    from .hf import _load, _to_image

    dataset = _load(cfg.source, cfg.split, False, None, None)
    if cfg.image_column not in dataset.column_names:
        return None  # the dataset build names the missing column
    column = dataset.select_columns([cfg.image_column])
    sizes = []
    for index in _evenly(list(range(len(column))), min(limit, 256)):  # rows are decoded: fewer
        value = column[index][cfg.image_column]
        if hasattr(value, "size") and hasattr(value, "height"):  # PIL image
            sizes.append((value.height, value.width))
        else:
            image = _to_image(value, cfg.in_chans, f"row {index}")
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
    return sizes or None


def auto_resize(sizes: list[tuple[int, int]] | None, crop: tuple[int, int]) -> list[int] | None:
    """The scale ``data.resize=auto`` picks.

    None (native) when the images share one scale (every short side and every long side within
    :data:`SAME_SCALE_RATIO` of each other, e.g. equal-size slices), else
    ``[min(crop), 4 * max(crop)]``: each image's short side becomes the crop's, so a crop sees about
    the whole image at the base scale (MMSegmentation's convention: ADE20K's ``scale=(2048, 512)``
    with 512 crops).
    """
    if not sizes:
        return None
    shorts = [min(s) for s in sizes]
    longs = [max(s) for s in sizes]
    if max(shorts) <= SAME_SCALE_RATIO * min(shorts) and max(longs) <= SAME_SCALE_RATIO * min(longs):
        return None
    return [min(crop), 4 * max(crop)]


def resolve_resize(cfg: DataConfig) -> tuple[DataConfig, str]:
    """``cfg`` with ``data.resize=auto`` replaced by the scale it stands for, and a log line.

    The one place ``auto`` is resolved: each stage calls it where it starts, before anything reads
    ``data.resize``; ``cfg`` itself is not changed. The resolved value is what the run config, the
    exported model and ``predict.py`` record, so evaluation and prediction use the training scale.
    """
    if cfg.resize != "auto":
        return cfg, f"data.resize={cfg.resize}"
    sizes = image_sizes(cfg)
    scale = auto_resize(sizes, cast("tuple[int, int]", tuple(cfg.image_size)))
    resolved = dataclasses.replace(cfg, resize=scale if scale is not None else "native")
    if sizes is None:
        return resolved, "data.resize=auto -> native (image sizes are not known up front)"
    if cfg.source == "synthetic":
        return resolved, "data.resize=auto -> native (every synthetic image has data.image_size)"
    shorts, longs = [min(s) for s in sizes], [max(s) for s in sizes]
    seen = f"short sides {min(shorts)}-{max(shorts)} px, long sides {min(longs)}-{max(longs)} px over {len(sizes)} images"
    if scale is None:
        return resolved, f"data.resize=auto -> native ({seen}: one scale)"
    return resolved, (
        f"data.resize=auto -> {scale} ({seen}): each image's short side becomes the crop's "
        f"{scale[0]} px (long side at most {scale[1]}); set data.resize=native to train at native sizes"
    )
