"""What the export-target tests share (tests/openvino_cases.py, tests/test_executorch.py): smooth test
images and a saved, randomly perturbed segmenter exported by ``distill/export.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from distill.export import export_from_dir
from hybridvision.models import create_segmenter, save_pretrained

#: the run config's data section recorded with the exported models
DATA = {"image_size": [32, 32], "normalize": "imagenet", "ignore_index": 255}


def images(folder: Path, count: int, seed: int) -> Path:
    """``count`` smooth RGB images (a random model's labels are not all noise on them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((77, 58), Image.BILINEAR).save(folder / f"{i:02d}.png")
    return folder


def export_perturbed(name: str, tmp: Path, targets: tuple[str, ...]) -> dict[str, Any]:
    """A randomly perturbed ``name`` segmenter saved, exported for ``targets``, fp32 and int8
    (calibrated on 4 images, agreement on 4 held-out ones)."""
    torch.manual_seed(0)
    model = create_segmenter(name, num_classes=3).eval()
    with torch.no_grad():  # as after training: no equal tensors folded together
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(model, tmp / "model", extra={"run_config": {"data": DATA}})
    folder = images(tmp / "images", 8, seed=0)
    summary = export_from_dir(
        str(tmp / "model"),
        tmp / "m.onnx",
        int8=True,
        calibration=str(folder),
        calibration_count=4,
        targets=targets,
    )
    return {"tmp": tmp, "name": name, "model": model, "summary": summary, "images": folder}
