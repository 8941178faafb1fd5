"""Training DataLoaders and the endless, resumable stream of micro-batches the loop reads."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .seeding import EpochSeeded, SeededDataset, SeededIterableDataset
from .signals import WorkerInit, stop_signals_blocked

if TYPE_CHECKING:
    from .checkpoints import TrainerState


def build_loader(
    dataset: Dataset,
    seed: int,
    rank: int,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    persistent_workers: bool = False,
    pin_memory: bool = False,
    drop_last: bool = True,
    world_size: int = 1,
) -> DataLoader:
    """A training DataLoader: seeded shuffling, per-sample seeded augmentations, signal-safe workers.

    A map-style dataset with fewer samples than one batch on every process (a few labelled images)
    is repeated until it fills one (:class:`RepeatedDataset`): each repeat draws its own
    augmentations, and no epoch ends without a batch.

    Args:
        dataset: wrapped in :class:`SeededDataset` (or :class:`SeededIterableDataset`) unless it
            already is one.
        seed: the run seed (``train.seed``): shuffling and every sample's augmentations.
        rank: this process's index (keys a stream's samples).
        batch_size: samples per batch on this process.
        shuffle: shuffle map-style datasets (seeded by ``seed``); streams keep their order.
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs.
        pin_memory: pin host memory for faster device transfers.
        drop_last: drop the last incomplete batch.
        world_size: processes the loader is sharded over (``prepare_loader``).
    """
    needed = batch_size * world_size
    if drop_last and not isinstance(dataset, (IterableDataset, EpochSeeded)) and 0 < len(dataset) < needed:  # type: ignore[arg-type]
        dataset = RepeatedDataset(dataset, -(-needed // len(dataset)))  # type: ignore[arg-type]
    if not isinstance(dataset, EpochSeeded):
        wrapper = SeededIterableDataset if isinstance(dataset, IterableDataset) else SeededDataset
        dataset = wrapper(dataset, seed, rank)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not isinstance(dataset, IterableDataset),
        num_workers=num_workers,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=WorkerInit() if num_workers > 0 else None,
    )


class RepeatedDataset(Dataset):
    """``dataset`` ``times`` times over: index ``i`` is sample ``i % len(dataset)``."""

    def __init__(self, dataset: Dataset, times: int) -> None:
        self.dataset, self.times = dataset, times
        self.size = len(dataset)  # type: ignore[arg-type]  # map-style: has __len__

    def __len__(self) -> int:
        return self.size * self.times

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % self.size]


def prepare_loader(accelerator: Accelerator, loader: DataLoader) -> DataLoader:
    """Shard a loader across processes (datasets that shard themselves are only device-placed)."""
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, WorkerInit):
        loader.worker_init_fn = WorkerInit(loader.worker_init_fn)
    if getattr(loader.dataset, "shards_itself", False):
        from accelerate.data_loader import DataLoaderShard

        return DataLoaderShard(
            loader.dataset,
            device=accelerator.device,
            batch_size=loader.batch_size,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
            generator=loader.generator,  # worker base seeds never drawn from the global RNG
        )
    return accelerator.prepare_data_loader(loader)


#: end of an epoch's batches
_END = object()


def endless_batches(
    loader: DataLoader, state: TrainerState, accelerator: Accelerator, seeded: EpochSeeded | None
) -> Iterator[Any]:
    """Yield micro-batches forever, starting at the saved (epoch, position); advances ``state``.

    Map-style data skips the consumed batches without reading them; a stream cannot seek, so it is
    replayed up to the saved position (exact when it was built by :func:`build_loader`).

    Args:
        loader: the prepared training loader.
        state: the run's counters: ``epoch`` and ``batch_in_epoch`` are read and advanced.
        accelerator: skips consumed batches and prints the replay notice.
        seeded: the per-sample seeded dataset to move to each new epoch, if the loader has one.
    """
    iterable = isinstance(loader.dataset, IterableDataset)
    while True:
        epoch_loader = _epoch_loader(loader, state, accelerator, seeded, iterable)
        skip = state.batch_in_epoch
        produced = 0
        iterator = iter(epoch_loader)
        with stop_signals_blocked():  # workers start (first batch) with SIGINT/SIGTERM held back
            first = next(iterator, _END)
        for i, batch in enumerate(itertools.chain([first], iterator) if first is not _END else ()):
            if iterable and i < skip:
                continue
            produced += 1
            state.batch_in_epoch += 1
            yield batch
        if produced == 0 and skip == 0:
            raise ValueError(
                "the training DataLoader produced no batch: the dataset is empty or smaller than "
                "train.batch_size with drop_last (reduce train.batch_size or add data)"
            )
        state.epoch += 1
        state.batch_in_epoch = 0


def _epoch_loader(
    loader: DataLoader,
    state: TrainerState,
    accelerator: Accelerator,
    seeded: EpochSeeded | None,
    iterable: bool,
) -> Any:
    """The loader of ``state.epoch``, past its first ``state.batch_in_epoch`` batches if it can seek."""
    if seeded is not None:
        seeded.set_epoch(state.epoch)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(state.epoch)
    skip = state.batch_in_epoch
    if skip and not iterable:
        epoch_loader = accelerator.skip_first_batches(loader, skip)
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(state.epoch)
        return epoch_loader
    if skip:
        exact = "exact" if seeded is not None else "approximate: augmentations are not per-sample seeded"
        accelerator.print(f"resuming a stream: replaying {skip} batches of epoch {state.epoch} ({exact})")
    return loader
