"""Saved models are hub-ready: a model card, and ``from_pretrained("owner/name")`` from the hub cache."""

from __future__ import annotations

import os
import subprocess
import sys

from hybridvision.models import create_segmenter, save_pretrained
from tests.hub_cache import add_to_hub_cache


def test_model_card_says_what_was_trained_on_what(tmp_path):
    seg = create_segmenter("unet_resnet_nano", num_classes=3)
    extra = {
        "stage": "finetune",
        "init": "runs/pretrain/encoder",
        "run_config": {
            "data": {"source": "data/roads", "split": "train", "image_size": [96, 96]},
            "train": {"max_steps": 300, "batch_size": 8},
        },
        "metrics": {"miou": 0.4321, "class_names": ["a", "b", "c"]},
    }
    save_pretrained(seg, tmp_path / "model", extra=extra)
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.startswith(
        "---\nlibrary_name: hybridvision\ntags: [hybridvision, image-segmentation, finetune]\n---"
    )
    params = sum(p.numel() for p in seg.parameters()) / 1e6
    assert f"{params:.2f} M parameters" in card and "3 output channels" in card
    assert "`data/roads`" in card and "300 steps of batch 8" in card and "`runs/pretrain/encoder`" in card
    assert "| miou | 0.4321 |" in card and "class_names" not in card
    assert "from_pretrained(" in card and "hf upload" in card


def test_our_model_loads_by_hub_id_from_the_cache_offline(tmp_path):
    seg = create_segmenter("unet_resnet_nano", num_classes=2)
    save_pretrained(seg, tmp_path / "model")
    add_to_hub_cache(
        tmp_path / "cache", "someone/roads-unet", tmp_path / "model", ("config.json", "model.safetensors")
    )
    code = (
        "import torch\nfrom hybridvision.models import from_pretrained\n"
        "m = from_pretrained('someone/roads-unet')\n"
        f"ref = from_pretrained({str(tmp_path / 'model')!r})\n"
        "print(all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values())))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"
