"""DataLoader construction with reproducible shuffling and per-worker seeding."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

__all__ = ["build_dataloader", "collate_mixed_sizes", "iter_size_groups", "seed_worker"]

logger = logging.getLogger(__name__)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` that seeds ``random`` and ``numpy`` from the worker's torch seed.

    DataLoader gives each worker the torch seed ``base_seed + worker_id`` (``base_seed`` drawn
    from the loader's generator every epoch), so python/numpy augmentations differ per worker
    and per epoch yet repeat for a fixed loader seed.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    drop_last: bool = False,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """Build a ``torch.utils.data.DataLoader`` with a seeded generator.

    Under DDP the engine passes the result to ``accelerator.prepare``, which shards map-style
    datasets; datasets with ``shards_itself = True`` (streaming) already split themselves.

    Args:
        dataset: Map-style or iterable dataset of sample dicts.
        batch_size: Samples per batch.
        shuffle: Reshuffle every epoch (map-style only; iterable datasets order themselves and
            the flag is ignored for them).
        num_workers: Loader worker processes (0 = load in the main process).
        persistent_workers: Keep workers alive between epochs (only used when ``num_workers > 0``).
        pin_memory: Page-locked host memory for faster host-to-GPU copies.
        drop_last: Drop the last incomplete batch.
        seed: Seed of the shuffling generator and of the workers' base seeds.
        collate_fn: Batch collation (default: ``torch.utils.data.default_collate``).

    Returns:
        The DataLoader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(dataset, IterableDataset) and shuffle:
        logger.info("shuffle ignored for iterable dataset %s", type(dataset).__name__)
        shuffle = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
    )


def collate_mixed_sizes(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate sample dicts whose images may differ in size (evaluation at native resolution).

    Samples of one size are stacked as ``default_collate`` does (and when all share one size the
    result is exactly ``default_collate(samples)``). Otherwise the batch is
    ``{"groups": [batch, ...], "positions": [(n_g,) int64, ...]}``: one stacked batch per size, in
    order of first appearance, and the positions of its samples in ``samples``, so per-sample
    results can be put back in loader order (``accelerator.gather_for_metrics`` drops padding
    samples by their position at the end of the last batch).

    Args:
        samples: ``[{"image": (C, H_i, W_i), "mask": (H_i, W_i), "id": str, ...}, ...]``.
    """
    from torch.utils.data import default_collate

    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, sample in enumerate(samples):
        by_size.setdefault(tuple(sample["image"].shape), []).append(i)
    if len(by_size) == 1:
        return default_collate(samples)
    return {
        "groups": [default_collate([samples[i] for i in idx]) for idx in by_size.values()],
        "positions": [torch.tensor(idx, dtype=torch.int64) for idx in by_size.values()],
    }


def iter_size_groups(batch: dict[str, Any]) -> list[tuple[dict[str, Any], torch.Tensor | None]]:
    """``[(sub_batch, positions or None), ...]`` of a batch made by :func:`collate_mixed_sizes`."""
    if "groups" in batch:
        return list(zip(batch["groups"], batch["positions"]))
    return [(batch, None)]
