"""Predict segmentation masks for images with a fine-tuned model.

    python finetune/predict.py --model runs/finetune/model --input image_or_folder --output out/

Writes, per input image, ``<id>_mask.png`` (class indices at the image's original size; 8-bit,
or 16-bit when there are more than 255 classes) and ``<id>_overlay.png`` (coloured classes over
the image). Images of any size are handled by the sliding window (default window: the training
crop size recorded in the model's config).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from hybridvision.data.io import IMAGE_EXTENSIONS, list_files, read_image  # noqa: E402
from hybridvision.data.transforms import build_seg_transforms  # noqa: E402
from hybridvision.inference import Predictor  # noqa: E402
from hybridvision.models import Segmenter, from_pretrained  # noqa: E402
from hybridvision.visualize import overlay  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory written by finetune/run.py (or a hub id)")
    p.add_argument(
        "--input", required=True, help="an image file or a folder of images (searched recursively)"
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--mode", choices=["slide", "whole"], default="slide", help="sliding window or whole image"
    )
    p.add_argument("--window", type=int, nargs=2, default=None, help="window H W (default: training crop)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction")
    p.add_argument(
        "--tta", nargs="*", default=[], choices=["h", "v", "hv"], help="flip test-time augmentation"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = from_pretrained(args.model)
    if not isinstance(model, Segmenter):
        sys.stderr.write(f"error: {args.model} holds an encoder, not a segmentation model\n")
        return 2
    run = model.pretrained_config.get("extra", {}).get("run_config", {})
    data = run.get("data", {})
    in_chans = model.build_kwargs["in_chans"]
    num_classes = model.num_classes
    ignore = data.get("ignore_index", 255)
    window = tuple(args.window or data.get("image_size") or (256, 256))
    tf = build_seg_transforms(
        False,
        None,
        in_chans=in_chans,
        normalize=data.get("normalize", "imagenet"),
        window=tuple(data["window"]) if data.get("window") else None,
        ignore_index=ignore,
    )
    model.to(args.device).eval()
    predictor = Predictor(
        model,
        mode=args.mode,
        num_classes=num_classes,
        window=window if args.mode == "slide" else None,
        overlap=args.overlap,
        blend="gaussian",
        batch_size=args.batch_size,
        tta_flips=args.tta,
        output="logits",
    )
    src = Path(args.input)
    if src.is_dir():
        files = list_files(src, IMAGE_EXTENSIONS)
    elif src.is_file():
        files = [src]
    else:
        sys.stderr.write(f"error: --input {src} does not exist\n")
        return 2
    if not files:
        sys.stderr.write(f"error: no image found under {src}\n")
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="predict", dynamic_ncols=True):
        image = read_image(path, in_chans)  # (C, H, W) at the original size
        x = tf({"image": image})["image"] if tf is not None else image
        with (
            torch.no_grad(),
            torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16),
        ):
            labels = predictor.predict_labels(torch.as_tensor(x)[None].to(args.device))[0].cpu()
        stem = path.relative_to(src).with_suffix("") if src.is_dir() else Path(path.stem)
        target = out / stem
        target.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.uint8 if num_classes <= 255 else np.uint16
        Image.fromarray(labels.numpy().astype(dtype)).save(f"{target}_mask.png")
        vis = (overlay(image, labels, ignore_index=ignore) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(vis).save(f"{target}_overlay.png")
    print(f"wrote {len(files)} masks and overlays to {out}{os.sep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
