"""build_dataloader: seeded shuffling, per-worker numpy/random seeding, worker options."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from hybridvision.data import build_dataloader


class IndexDataset(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict:
        return {"index": index}


class RandomDrawDataset(Dataset):
    """Returns draws from numpy's and python's global generators (seeded per worker)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict:
        info = torch.utils.data.get_worker_info()
        return {"np": np.random.rand(), "py": random.random(), "worker": info.id if info else -1}


class CountStream(IterableDataset):
    def __iter__(self):
        yield from range(5)


def order(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


def test_shuffle_is_seeded_and_changes_per_epoch():
    a = build_dataloader(IndexDataset(), batch_size=4, shuffle=True, seed=7)
    b = build_dataloader(IndexDataset(), batch_size=4, shuffle=True, seed=7)
    c = build_dataloader(IndexDataset(), batch_size=4, shuffle=True, seed=8)
    first = order(a)
    assert first == order(b) and sorted(first) == list(range(16))
    assert first != order(c)
    assert order(a) != first  # a new permutation for the next epoch, still reproducible
    assert order(build_dataloader(IndexDataset(), batch_size=4, shuffle=False)) == list(range(16))


def test_worker_seeding_reproducible_and_distinct_per_worker():
    def draws(seed: int) -> tuple[list[float], list[int]]:
        loader = build_dataloader(RandomDrawDataset(), batch_size=1, shuffle=False, num_workers=2, seed=seed)
        batches = list(loader)
        return [float(b["np"]) for b in batches] + [float(b["py"]) for b in batches], [
            int(b["worker"]) for b in batches
        ]

    values, workers = draws(0)
    again, _ = draws(0)
    other, _ = draws(1)
    assert values == again and values != other
    assert sorted(set(workers)) == [0, 1]
    by_worker = {w: [v for v, ww in zip(values[:8], workers) if ww == w] for w in (0, 1)}
    assert by_worker[0][0] != by_worker[1][0]  # workers do not repeat each other's numpy stream


def test_options_and_validation():
    loader = build_dataloader(
        IndexDataset(), batch_size=3, shuffle=False, persistent_workers=True, drop_last=True
    )
    assert loader.persistent_workers is False  # needs workers
    assert len(loader) == 5 and loader.worker_init_fn is None
    with_workers = build_dataloader(
        IndexDataset(), batch_size=3, shuffle=False, num_workers=1, persistent_workers=True
    )
    assert with_workers.persistent_workers is True and with_workers.worker_init_fn is not None
    stream = build_dataloader(CountStream(), batch_size=2, shuffle=True)  # shuffle ignored, no error
    assert [int(x) for batch in stream for x in batch] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        build_dataloader(IndexDataset(), batch_size=0, shuffle=False)
    collated = build_dataloader(
        IndexDataset(), batch_size=2, shuffle=False, collate_fn=lambda items: len(items)
    )
    assert next(iter(collated)) == 2
