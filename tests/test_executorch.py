"""ExecuTorch target: .pte export (XNNPACK) with the ONNX metadata beside it, PT2E int8, the predictor
and CLI, the deployment report's rows, and the one-line errors for a missing runtime.

Run in this process (not in a child pytest as the OpenVINO cases are): ExecuTorch's thread pool survives
a later fork, checked by ``test_forked_dataloader_workers_still_run``."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.export import export_from_dir
from distill.export import main as export_main
from hybridvision.deploy import cli
from hybridvision.deploy.executorch_runtime import (
    ExecuTorchSegmenter,
    metadata_path,
    program_input_size,
)
from hybridvision.deploy.runtime import (
    OnnxPredictor,
    UserError,
    normalization_spec,
    normalize_image,
    read_metadata,
)
from hybridvision.export import deployment_report, peak_memory
from hybridvision.export.executorch import _folded_graph, _quantizer, fx_head_nodes
from hybridvision.inference import predict_sliding_window
from hybridvision.models import create_segmenter, save_pretrained
from tests.export_cases import DATA, export_perturbed
from tests.export_cases import images as _images

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]  # written out: no shared code
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
FAMILIES = [  # slow: the fixture exports and quantizes (~50 s for the CNN, ~130 s for attention)
    pytest.param("unet_resnet_nano", id="cnn", marks=pytest.mark.slow),  # dynamic sizes
    # window attention does not export with symbolic sizes: a fixed 32 x 32 program, slid
    pytest.param("hybrid_nano", id="attention", marks=pytest.mark.slow),
]


def _executorch_installed() -> bool:
    try:
        from executorch.extension.pybindings import _C  # noqa: F401
    except ImportError:
        return False
    return True


needs_executorch = pytest.mark.skipif(
    not _executorch_installed(), reason='executorch is not installed: pip install -e ".[executorch]"'
)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """A randomly perturbed segmenter saved, exported by distill/export.py for onnx and executorch,
    fp32 and int8 (calibrated on 4 images, agreement on 4 held-out ones)."""
    if not _executorch_installed():
        pytest.skip('executorch is not installed: pip install -e ".[executorch]"')
    return export_perturbed(request.param, tmp_path_factory.mktemp(request.param), ("onnx", "executorch"))


def test_export_writes_every_artefact_with_the_onnx_metadata(exported):
    tmp, summary = exported["tmp"], exported["summary"]
    assert summary["executorch"] == str(tmp / "m.pte") and summary["executorch_int8"] == str(
        tmp / "m.int8.pte"
    )
    for name in ("m.pte", "m.pte.json", "m.int8.pte", "m.int8.pte.json"):
        assert (tmp / name).is_file(), name
    onnx_meta, meta = read_metadata(tmp / "m.onnx"), read_metadata(tmp / "m.pte")
    assert meta == json.loads(metadata_path(tmp / "m.pte").read_text())
    program = meta.pop("executorch")
    if exported["name"] == "unet_resnet_nano":  # dynamic: any multiple of 32 up to 1024
        assert meta == onnx_meta and meta["input_size"] is None
        assert program["max_input_size"] == [1024, 1024] and program["size_multiple"] == 32
    else:  # fixed at the training crop: the only difference from the ONNX metadata
        assert {**meta, "input_size": None} == onnx_meta and meta["input_size"] == [32, 32]
    assert program["backend"] == "XNNPACK" and program["batch"] == 1
    assert program["params"] == sum(p.numel() for p in exported["model"].parameters())
    int8_meta = read_metadata(tmp / "m.int8.pte")
    assert int8_meta["precision"] == "int8" and int8_meta["executorch"] == program
    assert int8_meta["quantization"]["calibration"]["images"] == 4
    assert {**int8_meta, "precision": "fp32", "quantization": None} == {
        **meta,
        "executorch": program,
        "quantization": None,
    }
    segmenter = ExecuTorchSegmenter(tmp / "m.pte", threads=1)
    assert (segmenter.in_chans, segmenter.num_classes) == (3, 3)
    assert (tmp / "m.int8.pte").stat().st_size < 0.5 * (tmp / "m.pte").stat().st_size


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])  # (45, 70): no multiple of the divisor
def test_fp32_masks_equal_pytorch_through_the_predictor(exported, size):
    """The deployed path (metadata, normalisation, padding, windows, runtime) against PyTorch's own."""
    model = exported["model"]
    dynamic = exported["name"] == "unet_resnet_nano"
    predictor = OnnxPredictor(exported["tmp"] / "m.pte", mode="whole", threads=1)
    assert predictor.mode == ("whole" if dynamic else "slide")  # a fixed program slides windows
    rng = np.random.default_rng(1)
    for _ in range(2):
        raw = rng.random((3, *size), dtype=np.float32)
        x = torch.from_numpy(((raw - IMAGENET_MEAN) / IMAGENET_STD)[None].astype(np.float32))
        with torch.no_grad():
            if dynamic:
                logits = model(x)
            else:
                logits = predict_sliding_window(model, x, (32, 32), overlap=0.25, blend="gaussian")
        want = logits.argmax(1)[0].numpy()
        got = predictor.predict_labels(raw)
        assert got.shape == size
        assert (got == want).mean() >= 0.999
        assert len(np.unique(want)) > 1  # several classes: not a trivial match
        if dynamic:  # the logits themselves, at a size the program pads
            assert np.abs(predictor.segmenter(x.numpy()) - logits.numpy()).max() < 1e-4


def test_sliding_windows_and_tta_match_onnxruntime(exported):
    """The same predictor code (scale, windows, blending, TTA) runs either runtime."""
    raw = np.random.default_rng(2).random((3, 50, 83), dtype=np.float32)
    window = (32, 40) if exported["name"] == "unet_resnet_nano" else (32, 32)
    options = {"mode": "slide", "window": window, "tta_flips": ("h",), "threads": 1}
    et_labels = OnnxPredictor(exported["tmp"] / "m.pte", **options).predict_labels(raw)
    ort_labels = OnnxPredictor(exported["tmp"] / "m.onnx", **options).predict_labels(raw)
    assert (et_labels == ort_labels).mean() >= 0.999


def test_int8_agrees_with_fp32(exported):
    summary = exported["summary"]
    et_agree, ort_agree = summary["executorch_int8_agreement"], summary["int8_agreement"]
    assert et_agree["images"] == 4 and summary["agreement_images"] == "held-out"
    assert 0.97 <= et_agree["pixel_agreement"] < 1.0  # random weights: close, not identical
    assert et_agree["pixel_agreement"] >= ort_agree["pixel_agreement"] - 0.02


@needs_executorch
@pytest.mark.slow  # an export (~5 s)
def test_int8_keeps_the_classifier_in_float():
    model = create_segmenter("unet_resnet_nano", num_classes=3).eval()
    metadata = {"in_chans": 3, "input_size": None, "train_crop": [64, 64]}
    metadata["executorch"] = {"size_multiple": 32, "max_input_size": [128, 128]}
    with torch.no_grad():
        graph = _folded_graph(model, metadata)
    convs = [n for n in graph.graph.nodes if str(n.target).startswith("aten.conv2d")]
    head = fx_head_nodes(graph.graph)
    assert [n for n in convs if n in head] == [convs[-1]]  # the classifier, nothing before it
    _quantizer().annotate(graph)
    annotated = [n for n in convs if n.meta.get("quantization_annotation") is not None]
    assert convs[-1] not in annotated and len(annotated) == len(convs) - 1


def test_program_input_size_pads_to_the_divisor_and_refuses_larger_inputs():
    dynamic = {"input_size": None, "executorch": {"size_multiple": 32, "max_input_size": [64, 96]}}
    assert program_input_size(dynamic, 45, 70) == (64, 96)
    assert program_input_size(dynamic, 32, 1) == (32, 32)
    with pytest.raises(UserError, match=r"at most 64x96, got 65x20: predict with sliding windows"):
        program_input_size(dynamic, 65, 20)
    fixed = {"input_size": [32, 32], "executorch": {"size_multiple": 32, "max_input_size": [32, 32]}}
    assert program_input_size(fixed, 17, 30) == (32, 32)
    with pytest.raises(UserError, match="at most 32x32"):
        program_input_size(fixed, 33, 20)


def test_cli_runs_the_pte_and_torch_only_for_executorch(exported, tmp_path):
    """What is achievable: ExecuTorch's Python runtime takes torch tensors, so torch is imported, but
    none of the project's PyTorch code is; with torch unimportable a .pte is one line saying why."""
    out_et, out_ort = tmp_path / "et", tmp_path / "ort"
    run = textwrap.dedent(
        """
        import runpy, sys
        {block}
        sys.argv = ["predict.py", "--model", {model!r}, "--input", {images!r}, "--output", {out!r},
                    "--threads", "1"]
        try:
            runpy.run_path({script!r}, run_name="__main__")
        except SystemExit:
            ours = [m for m in sys.modules if m.startswith(("hybridvision.models", "hybridvision.export",
                                                          "hybridvision.inference", "hybridvision.data"))]
            print("torch imported:", "torch" in sys.modules and sys.modules["torch"] is not None, ours)
            raise
        """
    )
    args = {
        "model": str(exported["tmp"] / "m.pte"),
        "images": str(exported["images"]),
        "script": str(ROOT / "finetune" / "predict.py"),
    }
    code = run.format(block="", out=str(out_et), **args)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 masks" in proc.stdout and "torch imported: True []" in proc.stdout
    blocked = run.format(block='sys.modules["torch"] = None', out=str(tmp_path / "x"), **args)
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == (
        "error: ExecuTorch models (.pte) run from Python on PyTorch tensors (the executorch wheel links "
        "libtorch): install torch, or run the .pte in ExecuTorch's C++ runtime"
    )
    model = ["--model", str(exported["tmp"] / "m.onnx"), "--threads", "1"]
    assert cli.main([*model, "--input", str(exported["images"]), "--output", str(out_ort)]) == 0
    masks = sorted(out_et.glob("*_mask.png"))
    assert len(masks) == 8
    for path in masks:
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(out_ort / path.name))
        assert a.shape == (58, 77) and (a == b).mean() >= 0.999


def test_missing_executorch_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch", None)  # `import executorch` raises ImportError
    images = _images(tmp_path / "images", 1, seed=3)
    args = ["--model", str(tmp_path / "m.pte"), "--input", str(images)]
    assert cli.main([*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == 'error: ExecuTorch models (.pte) need executorch: pip install -e ".[executorch]"\n'
    model = create_segmenter("unet_resnet_nano", num_classes=2)
    save_pretrained(model, tmp_path / "model", extra={"run_config": {"data": DATA}})
    with pytest.raises(UserError, match=r'pip install -e "\.\[executorch\]"'):
        export_from_dir(str(tmp_path / "model"), tmp_path / "x.onnx", targets=("executorch",))
    assert not (tmp_path / "x.onnx").exists()  # refused before anything was written


@needs_executorch
@pytest.mark.slow  # one more fp32 export
def test_export_command_line_writes_the_pte(tmp_path):
    model = create_segmenter("unet_resnet_nano", num_classes=2)
    save_pretrained(model, tmp_path / "model", extra={"run_config": {"data": DATA}})
    args = [
        "--model",
        str(tmp_path / "model"),
        "--output",
        str(tmp_path / "m.onnx"),
        "--targets",
        "executorch",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export_main(args) == 0
    assert f"wrote {tmp_path / 'm.pte'} + .pte.json" in stdout.getvalue()
    assert read_metadata(tmp_path / "m.pte")["num_classes"] == 2


def test_report_compares_runtimes_side_by_side(exported, tmp_path):
    tmp, model = exported["tmp"], exported["model"]
    spec = normalization_spec(DATA, 3)
    rng = np.random.default_rng(4)
    eval_data = [
        {
            "image": normalize_image(rng.random((3, 48, 64), dtype=np.float32), spec),
            "mask": np.zeros((48, 64)),
        }
        for _ in range(2)
    ]
    entries = [
        {"name": "onnx fp32", "onnx": tmp / "m.onnx", "model": model},
        {"name": "executorch fp32", "executorch": tmp / "m.pte", "model": model},
        {"name": "executorch int8", "executorch": tmp / "m.int8.pte"},
    ]
    settings = {"train_crop": (32, 32), "runs": 2, "warmup": 1, "measure_memory": False}
    # sliding windows of the crop: what a fixed program does, so the mIoU compares like with like
    report = deployment_report(tmp_path, entries, eval_data, 3, eval_mode="slide", **settings)
    rows = {r["name"]: r for r in report["entries"]}
    assert len({frozenset(r) for r in rows.values()}) == 1  # the same columns for every runtime
    assert [(r["runtime"], r["precision"]) for r in rows.values()] == [
        ("onnxruntime-cpu", "fp32"),
        ("executorch-xnnpack", "fp32"),
        ("executorch-xnnpack", "int8"),
    ]
    assert rows["executorch fp32"]["file_mb"] == pytest.approx((tmp / "m.pte").stat().st_size / 2**20)
    assert (
        rows["executorch int8"]["params"] == rows["executorch fp32"]["params"] == rows["onnx fp32"]["params"]
    )
    assert rows["executorch fp32"]["miou"] == pytest.approx(rows["onnx fp32"]["miou"], abs=1e-3)
    # a fixed 32 x 32 program's full-image latency: windows of 32 x 32 over the 48 x 64 image
    assert all(r["latency_full_image"]["median_ms"] > 0 for r in rows.values())
    assert rows["executorch fp32"]["latency_full_image"]["size"] == [48, 64]
    assert "| executorch int8 | executorch-xnnpack | int8 |" in (tmp_path / "report.md").read_text()


def test_peak_memory_of_a_pte_is_measured_in_a_fresh_process(exported):
    mem = peak_memory(exported["tmp"] / "m.pte", (1, 3, 32, 32), threads=1)
    assert mem["peak_rss_mib"] > 20 and mem["forward_mib"] >= 0


def test_forked_dataloader_workers_still_run(exported):
    """ExecuTorch ran in this process (the fixture); DataLoader workers forked after it still work."""
    segmenter = ExecuTorchSegmenter(exported["tmp"] / "m.pte", threads=2)
    segmenter(np.zeros((1, 3, 32, 32), np.float32))
    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, multiprocessing_context="fork")
    assert sorted(float(x) for (batch,) in loader for x in batch) == [float(i) for i in range(8)]


def test_distill_config_takes_the_executorch_target():
    from distill.config import DistillConfig
    from hybridvision.config import ConfigError, load_config

    cfg = load_config(
        DistillConfig, None, ["export.targets=[onnx, executorch]", "export.executorch_max_size=512"]
    )
    assert cfg.export.targets == ["onnx", "executorch"] and cfg.export.executorch_max_size == 512
    with pytest.raises(ConfigError, match="onnx, openvino and/or executorch once each"):
        load_config(DistillConfig, None, ["export.targets=[executorch, executorch]"])
    with pytest.raises(ConfigError, match="executorch"):  # the valid values are named
        load_config(DistillConfig, None, ["export.targets=[tflite]"])
