"""Confusion-matrix metrics against torchmetrics, ignore_index, JSON, and a 2-process gloo reduction."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hybridvision.metrics import ConfusionMatrix, per_sample_confusion, unpadded_shard


def _torchmetrics():
    # imported lazily so that the spawned workers below do not pay for importing torchmetrics
    return pytest.importorskip("torchmetrics.classification")


IGNORE = 255


def _random(b, k, h, w, seed, ignore_fraction=0.2, max_label=None):
    gen = torch.Generator().manual_seed(seed)
    high = k if max_label is None else max_label
    preds = torch.randint(0, high, (b, h, w), generator=gen)
    target = torch.randint(0, high, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < ignore_fraction] = IGNORE
    return preds, target


CASES = [(2, 3, 5, 7, None), (3, 5, 8, 4, None), (1, 6, 6, 6, 4)]  # last: classes 4, 5 absent everywhere


@pytest.mark.parametrize("b,k,h,w,max_label", CASES)
def test_iou_matches_torchmetrics(b, k, h, w, max_label):
    preds, target = _random(b, k, h, w, seed=b * k, max_label=max_label)
    cm = ConfusionMatrix(k, IGNORE)
    cm.update(preds[:1], target[:1])
    cm.update(preds[1:], target[1:])
    metrics = cm.compute()
    tm = _torchmetrics()
    per_class = tm.MulticlassJaccardIndex(k, average=None, ignore_index=IGNORE)(preds, target)
    macro = tm.MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE)(preds, target)
    torch.testing.assert_close(
        torch.tensor(cm.compute(zero_division=0.0)["iou"], dtype=torch.float64), per_class.double()
    )
    assert metrics["miou"] == pytest.approx(macro.item(), rel=1e-6)
    if max_label is not None:  # absent classes are NaN per class and left out of the mean
        assert all(math.isnan(v) for v in metrics["iou"][max_label:])
        assert metrics["miou"] == pytest.approx(sum(metrics["iou"][:max_label]) / max_label)


@pytest.mark.parametrize("b,k,h,w,max_label", CASES)
def test_dice_matches_torchmetrics_f1(b, k, h, w, max_label):
    preds, target = _random(b, k, h, w, seed=7 + b, max_label=max_label)
    cm = ConfusionMatrix(k, IGNORE)
    cm.update(preds, target)
    tm = _torchmetrics()
    per_class = tm.MulticlassF1Score(k, average=None, ignore_index=IGNORE, multidim_average="global")(
        preds, target
    )
    macro = tm.MulticlassF1Score(k, average="macro", ignore_index=IGNORE)(preds, target)
    torch.testing.assert_close(
        torch.tensor(cm.compute(zero_division=0.0)["dice"], dtype=torch.float64), per_class.double()
    )
    assert cm.compute()["mean_dice"] == pytest.approx(macro.item(), rel=1e-6)


def test_ignore_index_inside_the_class_range_matches_torchmetrics():
    preds, target = _random(2, 4, 6, 6, seed=3)
    target[target == IGNORE] = 0  # class 0 plays "ignore"
    cm = ConfusionMatrix(4, ignore_index=0)
    cm.update(preds, target)
    macro = _torchmetrics().MulticlassJaccardIndex(4, average="macro", ignore_index=0)(preds, target)
    assert cm.compute()["miou"] == pytest.approx(macro.item(), rel=1e-6)
    assert math.isnan(cm.compute()["iou"][0])


def test_accuracies_and_matrix_against_naive_counts():
    preds, target = _random(2, 3, 4, 5, seed=11)
    cm = ConfusionMatrix(3, IGNORE)
    cm.update(preds, target)
    naive = torch.zeros(3, 3, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), preds.flatten().tolist()):
        if t != IGNORE:
            naive[t, p] += 1
    assert torch.equal(cm.matrix, naive)
    metrics = cm.compute()
    valid = target != IGNORE
    assert metrics["num_pixels"] == int(valid.sum())
    assert metrics["pixel_accuracy"] == pytest.approx(
        ((preds == target) & valid).sum().item() / valid.sum().item()
    )
    recalls = [((preds == c) & (target == c)).sum().item() / (target == c).sum().item() for c in range(3)]
    assert metrics["class_accuracy"] == pytest.approx(recalls)
    assert metrics["mean_class_accuracy"] == pytest.approx(sum(recalls) / 3)


def test_ignored_pixels_are_excluded():
    preds, target = _random(2, 4, 6, 6, seed=5, ignore_fraction=0.4)
    cm1, cm2 = ConfusionMatrix(4, IGNORE), ConfusionMatrix(4, IGNORE)
    cm1.update(preds, target)
    changed = torch.where(target == IGNORE, (preds + 1) % 4, preds)
    cm2.update(changed, target)
    assert torch.equal(cm1.matrix, cm2.matrix)
    assert cm1.matrix.sum() == (target != IGNORE).sum()
    cm3 = ConfusionMatrix(4, IGNORE)
    cm3.update(torch.where(target == IGNORE, preds, (preds + 1) % 4), target)  # change valid pixels
    assert not torch.equal(cm1.matrix, cm3.matrix)


def test_logits_are_argmaxed_and_binary_logits_thresholded_at_zero():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=gen)
    target = torch.randint(0, 4, (2, 5, 5), generator=gen)
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.matrix, b.matrix)

    binary_logits = torch.tensor([[[[-1.0, 0.5], [2.0, -0.1]]]])  # (1, 1, 2, 2) -> preds [[0, 1], [1, 0]]
    binary_target = torch.tensor([[[0, 1], [0, IGNORE]]])
    cm = ConfusionMatrix(1, IGNORE)
    cm.update(binary_logits, binary_target)
    assert cm.matrix.tolist() == [[1, 1], [0, 1]]
    metrics = cm.compute()
    assert metrics["iou"] == pytest.approx([0.5, 0.5])
    assert metrics["dice"] == pytest.approx([2 / 3, 2 / 3])


def test_labels_outside_the_range_raise():
    cm = ConfusionMatrix(3, IGNORE)
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*target values \[7\]"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, IGNORE]]]))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_per_sample_matrices_sum_to_batch_matrix():
    preds, target = _random(3, 3, 4, 4, seed=9)
    per_sample = per_sample_confusion(preds, target, 3, IGNORE)
    for i in range(3):
        single = ConfusionMatrix(3, IGNORE)
        single.update(preds[i : i + 1], target[i : i + 1])
        assert torch.equal(per_sample[i], single.matrix)


def test_to_json_uses_class_names_and_null_for_undefined():
    cm = ConfusionMatrix(3, IGNORE, class_names=["background", "road", "car"])
    cm.update(torch.tensor([[[0, 1], [1, 0]]]), torch.tensor([[[0, 1], [0, 0]]]))
    data = json.loads(cm.to_json())
    assert data["per_class"]["road"]["iou"] == pytest.approx(0.5)
    assert data["per_class"]["car"] == {"iou": None, "dice": None, "class_accuracy": None}
    assert data["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert data["confusion_matrix"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert set(json.loads(cm.to_json(["a", "b", "c"]))["per_class"]) == {"a", "b", "c"}


def test_accumulation_modes_cannot_be_mixed():
    preds, target = _random(1, 3, 2, 2, seed=1)
    cm = ConfusionMatrix(3, IGNORE)
    cm.update(preds, target)
    cm.reduce_()  # single process: a no-op that marks the matrix final
    with pytest.raises(RuntimeError, match="already reduced"):
        cm.update(preds, target)
    with pytest.raises(RuntimeError, match="already called"):
        cm.reduce_()
    cm.reset()
    assert cm.matrix.sum() == 0

    class SingleProcessAccelerator:
        num_processes = 1

        def gather_for_metrics(self, tensor):
            return tensor

    cm.gather_update(preds, target, SingleProcessAccelerator())
    with pytest.raises(RuntimeError, match="double count"):
        cm.reduce_()
    with pytest.raises(RuntimeError, match="cannot mix"):
        cm.update(preds, target)


def test_unpadded_shard_covers_each_sample_once():
    shards = [unpadded_shard(5, rank, 2) for rank in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert sorted(sum((unpadded_shard(7, r, 3) for r in range(3)), [])) == list(range(7))


# ------------------------------------------------------------------------------------ 2 processes

NUM_SAMPLES, NUM_CLASSES, WORLD = 5, 3, 2


def _dataset():
    return _random(NUM_SAMPLES, NUM_CLASSES, 4, 4, seed=123)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # starts the gloo process group
    assert accelerator.num_processes == WORLD and dist.is_initialized()
    preds, target = _dataset()
    results = {}

    # each sample evaluated once (unpadded shards), local updates, torch.distributed all_reduce
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE)
    for i in unpadded_shard(NUM_SAMPLES, rank, WORLD):
        cm.update(preds[i : i + 1], target[i : i + 1])
    results["local"] = cm.matrix.clone()
    results["unpadded_dist"] = cm.reduce_().matrix

    # same shards, reduced through the accelerator
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE)
    for i in unpadded_shard(NUM_SAMPLES, rank, WORLD):
        cm.update(preds[i : i + 1], target[i : i + 1])
    results["unpadded_accelerate"] = cm.reduce_(accelerator).matrix

    # DistributedSampler pads 5 samples to 6: sample 0 is counted twice
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE)
    for i in DistributedSampler(range(NUM_SAMPLES), num_replicas=WORLD, rank=rank, shuffle=False):
        cm.update(preds[i : i + 1], target[i : i + 1])
    results["padded_dist"] = cm.reduce_().matrix

    # an Accelerate-prepared loader (even batches: repeats samples) + gather_for_metrics dedup
    loader = accelerator.prepare(DataLoader(TensorDataset(preds, target), batch_size=2))
    cm = ConfusionMatrix(NUM_CLASSES, IGNORE)
    for batch_preds, batch_target in loader:
        cm.gather_update(batch_preds, batch_target, accelerator)
    results["gathered"] = cm.matrix
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_reduction_equals_single_process(tmp_path):
    preds, target = _dataset()
    single = ConfusionMatrix(NUM_CLASSES, IGNORE)
    single.update(preds, target)

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    assert not torch.equal(results[0]["local"], single.matrix)  # each process alone saw a part
    assert torch.equal(results[0]["local"] + results[1]["local"], single.matrix)
    for r in range(WORLD):
        assert torch.equal(results[r]["unpadded_dist"], single.matrix)
        assert torch.equal(results[r]["unpadded_accelerate"], single.matrix)
        assert torch.equal(results[r]["gathered"], single.matrix)
        # the padded sampler counts sample 0 twice: the reduced matrix is wrong by exactly that sample
        first = per_sample_confusion(preds[:1], target[:1], NUM_CLASSES, IGNORE)[0]
        assert torch.equal(results[r]["padded_dist"], single.matrix + first)
