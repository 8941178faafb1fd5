"""Predict segmentation masks for images with a fine-tuned model (PyTorch) or an exported one.

    python finetune/predict.py --model runs/finetune/model --input image_or_folder --output out/
    python finetune/predict.py --model runs/distill/model.onnx --input images/ --output out/
    python finetune/predict.py --model runs/distill/model.pte --input images/ --output out/

Exported models: ``.onnx`` (onnxruntime), OpenVINO ``.xml``, ExecuTorch ``.pte``.

The command of :mod:`hybridvision.deploy.cli` (``python -m hybridvision.deploy``: options, outputs,
exit status), with PyTorch model directories and hub ids added here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from hybridvision.deploy import cli  # noqa: E402
from hybridvision.deploy.cli import Backend  # noqa: E402
from hybridvision.deploy.errors import UserError  # noqa: E402
from hybridvision.deploy.runtime import normalization_spec, parse_resize  # noqa: E402


def _load_torch_model(spec: str):
    """The segmenter at ``spec`` (directory or hub id); every failure is a one-line UserError."""
    from hybridvision.models import Segmenter, from_pretrained

    path = Path(spec)
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise UserError(
            f"--model {spec} does not exist (give a model directory, a hub id owner/name or a .onnx file)"
        )
    try:
        model = from_pretrained(spec)
    except (ValueError, OSError) as exc:  # hub.py's messages already name the file and the fix
        raise UserError(str(exc).strip().splitlines()[0]) from exc
    except Exception as exc:  # anything else from safetensors / the hub client: still one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the model from {spec}: {reason}; copy or export it again") from exc
    if not isinstance(model, Segmenter):
        raise UserError(f"--model {spec} holds an encoder, not a segmentation model")
    return model


def _torch_backend(args: argparse.Namespace) -> Backend:
    """How a PyTorch model directory (or hub id) reads and predicts one image file."""
    import torch

    from hybridvision.data.io import apply_transform, read_image
    from hybridvision.data.transforms import build_seg_transforms
    from hybridvision.inference import Predictor
    from hybridvision.models.hub import read_run_config

    model = _load_torch_model(args.model)
    data = read_run_config(model, "data")
    in_chans = model.build_kwargs["in_chans"]
    ignore = data.get("ignore_index", 255)
    window = tuple(args.window or data.get("image_size") or (256, 256))
    spec = normalization_spec(data, in_chans)
    normalize = (spec["mean"], spec["std"]) if spec["kind"] == "mean_std" else spec["kind"]
    tf = build_seg_transforms(
        False, None, in_chans=in_chans, normalize=normalize, window=spec["window"], ignore_index=ignore
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device).eval()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {device}: {str(exc).splitlines()[0]}") from exc
    predictor = Predictor(
        model,
        mode=args.mode,
        num_classes=model.num_classes,
        window=window if args.mode == "slide" else None,
        overlap=args.overlap,
        blend="gaussian",
        batch_size=args.batch_size,
        tta_flips=args.tta,
        output="logits",
        resize=parse_resize(args.resize, data.get("resize")),
    )

    def read(path: Path) -> np.ndarray:
        return read_image(path, in_chans).numpy()  # (C, H, W) as displayed (EXIF orientation)

    def predict(image: np.ndarray) -> np.ndarray:
        # apply_transform wraps the image as a tv_tensors.Image: Window and PerImageNormalize only
        # transform those (a plain tensor passed through them unchanged before)
        x = apply_transform({"image": torch.from_numpy(image)}, tf)["image"]
        with (
            torch.no_grad(),
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16),
        ):
            return predictor.predict_labels(torch.as_tensor(x)[None].to(device))[0].cpu().numpy()

    return Backend(read, predict, model.num_classes, ignore)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 (all written), 1 (some images unreadable), 2 (user error)."""
    return cli.main(argv, usage=__doc__, backend=_torch_backend)


if __name__ == "__main__":
    sys.exit(main())
