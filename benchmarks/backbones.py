"""The README backbone table: one released architecture per family, built with random weights.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/backbones.py            # every row -> stdout + results/backbones.md
    python benchmarks/backbones.py --models timm/convnextv2_atto --size 128 --output /tmp/table.md

One row per family of the released-checkpoints table of issue 19 (timm ``features_only`` encoders)
plus DINOv2-small through transformers' ``AutoBackbone``. Columns:

* **encoder params** — the encoder as released (fixed-size models at their pretrained size);
* **decoder** — ``unet``; where the U-Net cannot be built on the encoder's strides the row uses
  ``segformer_mlp`` instead and says why;
* **GMACs** — one (1, 3, H, W) eval forward of ``create_segmenter(name, 2, decoder=...)``
  under ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2), at ``--size`` (512²) or,
  for models timm builds at a fixed size, at that size (the cell says which) and built with
  ``img_size=--size`` (what the stages build for such a crop); the encoder's share after the
  slash. FlopCounterMode has no formula for the CPU attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``) and would count fused attention as 0;
  it is counted here with torch's own SDPA formula;
* **strides** / **input size** — ``encoder.reductions`` and ``encoder.input_size`` ("any" when free);
* **train step**, **MIM**, **ONNX** — checked for real at ``--tiny`` size (64², fixed-size models
  built at ``img_size=64``): a forward + backward + AdamW step of the segmenter (finite loss
  and gradients; parameters that get no gradient are named); the MIM pretrain objective
  (``PretrainModel(encoder, "mim", mask_patch_size=32)``) forward + backward with an explicit
  mask; ``hybridvision.export.export_onnx`` (dynamic sizes, verified against onnxruntime). A
  failure prints its one-line reason in the cell.

Nothing is downloaded; every model has random weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hybridvision.export import ExportError, cpu_name, export_onnx  # noqa: E402
from hybridvision.models import create_encoder, create_segmenter  # noqa: E402
from hybridvision.models.profile import count_params  # noqa: E402
from hybridvision.models.profile import flop_counter as count_flops  # noqa: E402

#: facebook/dinov2-small's config.json (architecture fields only)
DINOV2_SMALL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}


class Row(NamedTuple):
    """One model of the table."""

    family: str  # family name shown in the table
    name: str  # create_encoder / create_segmenter name
    encoder_kwargs: Mapping[str, Any] = MappingProxyType({})  # extra encoder arguments


ROWS = [
    Row("MobileViT v1", "timm/mobilevit_s"),
    Row("MobileViT v2", "timm/mobilevitv2_100"),
    Row("FastViT", "timm/fastvit_t8"),
    Row("EfficientFormer v2", "timm/efficientformerv2_s1"),
    Row("EfficientViT (MIT)", "timm/efficientvit_b1"),
    Row("EfficientViT (MSRA)", "timm/efficientvit_m5"),
    Row("MaxViT", "timm/maxvit_rmlp_pico_rw_256"),
    Row("CoAtNet", "timm/coatnet_nano_rw_224"),
    Row("NextViT", "timm/nextvit_small"),
    Row("RepViT", "timm/repvit_m0_9"),
    Row("LeViT", "timm/levit_128s"),
    Row("ConvNeXt-V2", "timm/convnextv2_atto"),
    Row("DINOv2 (transformers)", "transformers/dinov2", {"config": DINOV2_SMALL}),
]

#: the decoder of the table, and the one used where it cannot be built (the cell says so)
DECODER, FALLBACK_DECODER = "unet", "segformer_mlp"

COLUMNS = [
    "family",
    "model",
    "encoder params (M)",
    "decoder",
    "GMACs / encoder",
    "feature strides",
    "input size",
    "train step",
    "MIM (mask)",
    "ONNX",
]


@torch.no_grad()
def segmenter_gmacs(seg: torch.nn.Module, size: tuple[int, int]) -> tuple[float, float]:
    """(segmenter, encoder) GMACs of one (1, 3, H, W) eval forward; FLOPs / 2."""
    seg.eval()
    with count_flops() as counter:
        seg(torch.zeros(1, 3, *size))
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    decoder = sum(counts.get(f"{type(seg).__name__}.decoder", {}).values())
    return total / 2e9, (total - decoder) / 2e9


def _reason(exc: BaseException, limit: int = 160) -> str:
    """One line for a table cell: the exception type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    first = re.sub(r"\S+\.onnx(\.tmp-\d+)?:\s*", "", lines[0] if lines else "")  # temp paths
    first = first.replace("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ", "")
    first = first.split(" Status Message:")[0]  # onnxruntime's source location
    text = f"{type(exc).__name__}: {first}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_train_step(name: str, decoder: str, kwargs: dict[str, Any], size: int) -> str:
    """Forward + backward + AdamW step of the segmenter on a (2, 3, size, size) batch."""
    seg = _segmenter(name, decoder, kwargs).train()
    opt = torch.optim.AdamW(seg.parameters(), lr=1e-4)
    x = torch.randn(2, 3, size, size)
    y = torch.randint(0, 2, (2, size, size))
    loss = F.cross_entropy(seg(x), y)
    loss.backward()
    params = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None]
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    opt.step()
    if not math.isfinite(loss.item()):
        return f"✗ loss {loss.item()}"
    if bad:
        return f"✗ non-finite gradient in {bad[0]}"
    if no_grad:  # trains, but DDP needs find_unused_parameters (the engine detects it)
        return f"✓ but {len(no_grad)} tensor(s) get no gradient: {', '.join(no_grad[:2])}"
    return "✓"


def check_mim(name: str, kwargs: dict[str, Any], size: int) -> str:
    """MIM objective forward + backward with an explicit checkerboard mask of 32-pixel cells."""
    from pretrain.objectives import PretrainModel

    torch.manual_seed(0)
    encoder = create_encoder(name, **kwargs)
    model = PretrainModel(encoder, "mim", in_chans=3, mask_patch_size=32).train()
    cells = size // 32
    mask = torch.zeros(2, 1, cells, cells)
    mask[:, :, ::2, ::2] = 1  # every other cell masked, at least one per image
    out = model({"image": torch.randn(2, 3, size, size), "mask": mask})
    out.loss.backward()
    if not math.isfinite(out.loss.item()):
        return f"✗ loss {out.loss.item()}"
    if model.mask_token.grad is None:
        return "✗ the mask token gets no gradient"
    where = "pixel token" if encoder.mask_token_dim == 3 else "token after stem"
    return f"✓ ({where})"


def check_onnx(name: str, decoder: str, kwargs: dict[str, Any], size: int, directory: Path) -> str:
    """``export_onnx`` of the segmenter, verified against onnxruntime."""
    seg = _segmenter(name, decoder, kwargs).eval()
    crop = tuple(seg.encoder.input_size or (size, size))
    fused = ""
    reparameterize = getattr(seg.encoder, "reparameterize", None)
    if reparameterize is not None and copy.deepcopy(seg.encoder).reparameterize():
        fused = ", re-parameterised"
    try:
        path = export_onnx(seg, directory / f"{name.replace('/', '_')}.onnx", train_crop=crop)
    except ExportError as exc:  # say at which size the graph was traced
        raise ExportError(f"traced at {crop[0]}x{crop[1]}, {_reason(exc).split(': ', 1)[-1]}") from exc
    shape = f"fixed {crop[0]}x{crop[1]}" if seg.encoder.input_size else "dynamic H, W"
    return f"✓ ({shape}{fused}, {path.stat().st_size / 2**20:.1f} MB)"


def _run_check(fn: Any, *args: Any) -> str:
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failing model is a row of the table, not a crash
        return "✗ " + _reason(exc)


def _segmenter(name: str, decoder: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter(name, num_classes=2, decoder=decoder, **kwargs)


def measure(row: Row, size: int, tiny: int, directory: Path) -> dict[str, Any]:
    """Every column of one row (with the fallback decoder where the U-Net cannot be built)."""
    start = time.perf_counter()
    result: dict[str, Any] = {"family": row.family, "model": row.name, "decoder": DECODER, "size": size}
    try:
        try:
            seg = _segmenter(row.name, DECODER, row.encoder_kwargs)
        except ValueError as exc:
            result["decoder_error"] = _reason(exc)
            result["decoder"] = FALLBACK_DECODER
            seg = _segmenter(row.name, FALLBACK_DECODER, row.encoder_kwargs)
        enc = seg.encoder
        result["params_m"] = count_params(enc) / 1e6
        result["strides"] = tuple(enc.reductions)
        result["input_size"] = tuple(enc.input_size) if enc.input_size else None
        gmacs_size = tuple(enc.input_size) if enc.input_size else (size, size)
        result["gmacs"], result["encoder_gmacs"] = segmenter_gmacs(seg, gmacs_size)
        result["gmacs_size"] = gmacs_size
        del seg, enc
        if result["input_size"] is not None and result["input_size"] != (size, size):
            try:  # what the stages build for a size-x-size crop (data.image_size -> img_size)
                seg = _segmenter(row.name, result["decoder"], {**row.encoder_kwargs, "img_size": size})
                result["gmacs_built_at_size"] = segmenter_gmacs(seg, (size, size))
                del seg
            except Exception as exc:  # noqa: BLE001
                result["gmacs_built_at_size"] = _reason(exc, 60)
    except Exception as exc:  # noqa: BLE001 - a failing model is a row of the table, not a crash
        result["build_error"] = _reason(exc)
    fixed = result.get("input_size") is not None
    tiny_kwargs = {**row.encoder_kwargs, **({"img_size": tiny} if fixed else {})}
    decoder = result["decoder"]
    result["train"] = _run_check(check_train_step, row.name, decoder, tiny_kwargs, tiny)
    result["mim"] = _run_check(check_mim, row.name, tiny_kwargs, tiny)
    result["onnx"] = _run_check(check_onnx, row.name, decoder, tiny_kwargs, tiny, directory)
    result["seconds"] = time.perf_counter() - start
    return result


def _cells(result: dict[str, Any]) -> list[str]:
    if "build_error" in result:
        built = ["✗ " + result["build_error"], "—", "—", "—", "—"]
    else:
        h, w = result["gmacs_size"]
        size_note = f"{h}²" if h == w else f"{h}x{w}"
        if result["input_size"] is not None:
            size_note += " (fixed)"
        gmacs = f"{result['gmacs']:.2f} / {result['encoder_gmacs']:.2f} @{size_note}"
        at_size = result.get("gmacs_built_at_size")
        if isinstance(at_size, tuple):
            gmacs += f"; built at img_size={result['size']}: {at_size[0]:.2f} / {at_size[1]:.2f}"
        elif at_size is not None:
            gmacs += f"; ✗ at img_size={result['size']}: {at_size}"
        built = [
            f"{result['params_m']:.2f}",
            result["decoder"] + (f" (unet ✗ {result['decoder_error']})" if "decoder_error" in result else ""),
            gmacs,
            "–".join(str(r) for r in result["strides"]),
            "x".join(str(v) for v in result["input_size"]) if result["input_size"] else "any",
        ]
    return [result["family"], f"`{result['model']}`", *built, result["train"], result["mim"], result["onnx"]]


def markdown(results: Sequence[dict[str, Any]], header: Sequence[str], notes: Sequence[str]) -> str:
    lines = [*header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join([*lines, "", *notes]) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="names to measure (default: every row); a name outside the table is built with defaults",
    )
    parser.add_argument("--size", type=int, default=512, help="side of the GMACs input for any-size models")
    parser.add_argument(
        "--tiny", type=int, default=64, help="side of the train / MIM / ONNX checks (a multiple of 32)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (0 keeps torch's default)"
    )
    parser.add_argument(
        "--output",
        default=str(_ROOT / "benchmarks" / "results" / "backbones.md"),
        help="Markdown file to write ('' writes none)",
    )
    args = parser.parse_args(argv)
    if args.tiny % 32:
        parser.error("--tiny must be a multiple of 32 (the MIM mask cell)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Measure the rows; print the table and write it to ``--output``. Returns one dict per row."""
    args = parse_args(argv)
    known = {r.name: r for r in ROWS}
    rows = ROWS if args.models is None else [known.get(n, Row("—", n)) for n in args.models]
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = []
        with tempfile.TemporaryDirectory(prefix="hv_bench_backbones_") as tmp:
            for row in rows:
                results.append(measure(row, args.size, args.tiny, Path(tmp)))
                print(f"{row.name}: {results[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    import timm
    import transformers

    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/backbones.py", *given])
    header = [
        "## Backbones: one architecture per family, random weights "
        "(segmenter with a U-Net decoder, 2 classes)",
        "",
        f"command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} {command}`  ",
        f"CPU: {cpu_name()}; torch threads {used}  ",
        f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
    ]
    notes = [
        "- GMACs: one (1, 3, H, W) eval forward under torch's FlopCounterMode, MACs = FLOPs / 2, "
        f"at {args.size}² "
        'or, for models built at a fixed input size, at that size (marked "fixed") and then at '
        f"{args.size}², built with img_size={args.size} as the stages build them for that crop; after the "
        "slash the encoder's share (the rest is the decoder). Fused CPU attention is counted with torch's "
        "SDPA formula (FlopCounterMode alone counts it as 0).",
        "- encoder params: the encoder as released (fixed-size models at their pretrained size; their "
        "attention-bias tables grow with `img_size`).",
        f"- train step / MIM / ONNX: run for real at {args.tiny}x{args.tiny} (fixed-size models built at "
        f"img_size={args.tiny}), batch 2: forward + backward + AdamW step of the segmenter, finite loss "
        "and gradients (tensors that get no gradient are named); "
        '`PretrainModel(encoder, "mim", in_chans=3, mask_patch_size=32)` '
        "forward + backward with an explicit mask (pixel token: the model cannot be entered between its "
        "modules, masked pixels are replaced by a learnable value per channel); "
        "`hybridvision.export.export_onnx` with onnxruntime verification (re-parameterisable models are "
        "fused first).",
    ]
    text = markdown(results, header, notes)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return results


if __name__ == "__main__":
    main()
