"""Per-sample seeded datasets: exact resume with any ``num_workers``.

The training dataset is wrapped so sample ``i`` of epoch ``e`` is drawn under an RNG seeded by
``(train.seed, e, i)`` (:class:`SeededDataset`); the model's own randomness (masks, dropout) uses the
per-process RNG (seeded ``seed + rank``) restored from the checkpoint. A resumed run is therefore
bit-identical to an uninterrupted one, with any ``num_workers``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


def sample_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (``numpy.random.SeedSequence`` mixing)."""
    return (
        int(
            np.random.SeedSequence([int(k) for k in key])
            .generate_state(2, dtype=np.uint32)
            .view(np.uint64)[0]
        )
        >> 1
    )


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with the CPU torch, ``random`` and NumPy global RNGs seeded by ``seed``, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only (what fork_rng(devices=[]) restores): torch.manual_seed would also
        # queue a seed for every CUDA device, which costs a stack capture per sample before CUDA starts
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochSeeded:
    """Shared part of the per-sample seeding wrappers: seed, rank and a shared-memory epoch counter."""

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        # shared memory: persistent DataLoader workers see the epoch the main process sets
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch seen by every worker (shared memory) and pass it on to the dataset."""
        self._epoch.fill_(int(epoch))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:  # forward dataset attributes (e.g. ``shards_itself``)
        if name.startswith("__") or name in ("dataset", "seed", "rank", "_epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededDataset(EpochSeeded, Dataset):
    """Map-style dataset whose sample ``i`` of epoch ``e`` is drawn under RNG seed ``(seed, e, i)``.

    Augmentations (random crops, flips, colour jitter, views) then depend only on which sample is
    read in which epoch, not on how many samples this process or worker drew before. That makes a
    run resumed mid-epoch (``skip_first_batches``) bit-identical to an uninterrupted one, with any
    ``num_workers``, and gives every rank different augmentations (ranks read different indices).
    The global RNG of the caller is left untouched.

    Args:
        dataset: the wrapped map-style dataset.
        seed: the run seed (``train.seed``).
        rank: the process index (unused for map-style keys; kept for symmetry).
    """

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded_rng(sample_seed(self.seed, int(self._epoch), int(index))):
            return self.dataset[index]


class SeededIterableDataset(EpochSeeded, IterableDataset):
    """Streaming counterpart of :class:`SeededDataset`.

    The ``k``-th sample a (rank, worker) draws in epoch ``e`` is produced under RNG seed
    ``(seed, e, rank, worker, k)``.

    A resumed stream is replayed up to the saved position (streams cannot seek); since every sample's
    randomness depends only on its position, the replayed prefix and everything after it are the
    same as in the uninterrupted run, provided the stream itself yields the same order.
    """

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self._epoch)
        with seeded_rng(sample_seed(self.seed, epoch, self.rank, worker, 2**31)):
            iterator = iter(self.dataset)
        k = 0
        while True:
            with seeded_rng(sample_seed(self.seed, epoch, self.rank, worker, k)):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
            k += 1
