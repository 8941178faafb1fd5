"""Run in a child process by tests/test_openvino.py (OpenVINO's thread pools do not survive the fork of a
DataLoader worker in the same process).

OpenVINO target: IR export with the ONNX metadata, NNCF int8, the PyTorch-free predictor and CLI,
the deployment report's rows, and the one-line error when openvino is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.export import export_from_dir
from hybridvision.deploy import cli
from hybridvision.deploy.openvino_runtime import OpenVinoSegmenter, bf16_supported, read_ir
from hybridvision.deploy.runtime import (
    OnnxPredictor,
    UserError,
    labels_from_scores,
    load_segmenter,
    normalization_spec,
    normalize_image,
    read_metadata,
)
from hybridvision.export import deployment_report, peak_memory
from hybridvision.export.openvino import ir_head_nodes
from tests.export_cases import DATA, export_perturbed

pytest.importorskip("openvino")
pytest.importorskip("nncf")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = [
    pytest.param("unet_resnet_nano", id="cnn"),
    pytest.param("hybrid_nano", id="attention", marks=pytest.mark.slow),  # NNCF ModelType.TRANSFORMER
]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """A randomly perturbed segmenter saved, exported by distill/export.py for onnx and openvino,
    fp32 and int8 (calibrated on 4 images, agreement on 4 held-out ones)."""
    return export_perturbed(request.param, tmp_path_factory.mktemp(request.param), ("onnx", "openvino"))


def test_export_writes_every_artefact_with_the_onnx_metadata(exported):
    tmp, summary = exported["tmp"], exported["summary"]
    assert summary["openvino"] == str(tmp / "m.xml") and summary["openvino_int8"] == str(tmp / "m.int8.xml")
    assert summary["int8"] == str(tmp / "m.int8.onnx")
    for name in ("m.xml", "m.bin", "m.int8.xml", "m.int8.bin"):
        assert (tmp / name).is_file(), name
    onnx_meta = read_metadata(tmp / "m.onnx")
    assert read_metadata(tmp / "m.xml") == onnx_meta  # the same classes, normalisation, scale, crop
    assert onnx_meta["train_crop"] == [32, 32] and onnx_meta["normalization"]["kind"] == "mean_std"
    int8_meta = read_metadata(tmp / "m.int8.xml")
    assert int8_meta["precision"] == "int8"
    assert int8_meta["quantization"]["calibration"]["images"] == 4
    assert {**int8_meta, "precision": "fp32", "quantization": None} == {**onnx_meta, "quantization": None}
    segmenter = OpenVinoSegmenter(tmp / "m.xml", threads=1)
    assert (segmenter.in_chans, segmenter.num_classes, segmenter.metadata) == (3, 3, onnx_meta)
    # fp32 weights: save_model's default fp16 compression is off
    types = {n.get_output_element_type(0).get_type_name() for n in read_ir(tmp / "m.xml").get_ordered_ops()}
    assert "f32" in types and "f16" not in types
    assert (tmp / "m.int8.bin").stat().st_size < 0.5 * (tmp / "m.bin").stat().st_size


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])  # (45, 70): no multiple of the divisor
def test_fp32_ir_masks_equal_pytorch_through_the_predictor(exported, size):
    model = exported["model"]
    assert all(s % model.encoder.size_divisor for s in (45, 70))
    rng = np.random.default_rng(1)
    predictor = OnnxPredictor(exported["tmp"] / "m.xml", mode="whole", threads=1)
    spec = normalization_spec(DATA, 3)
    for _ in range(2):
        raw = rng.random((3, *size), dtype=np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(normalize_image(raw, spec))[None]).numpy()
        want = labels_from_scores(logits)[0]
        got = predictor.predict_labels(raw)
        assert got.shape == size
        assert (got == want).mean() >= 0.999
        assert len(np.unique(want)) > 1  # several classes: not a trivial match


def test_sliding_windows_match_onnxruntime(exported):
    """The same predictor code (scale, windows, blending, TTA) runs either runtime."""
    raw = np.random.default_rng(2).random((3, 50, 83), dtype=np.float32)
    options = {"mode": "slide", "window": (32, 40), "tta_flips": ("h",), "threads": 1}
    ov_labels = OnnxPredictor(exported["tmp"] / "m.xml", **options).predict_labels(raw)
    ort_labels = OnnxPredictor(exported["tmp"] / "m.onnx", **options).predict_labels(raw)
    assert (ov_labels == ort_labels).mean() >= 0.999


def test_fp32_is_pinned_and_bf16_is_a_separate_choice(exported):
    xml = exported["tmp"] / "m.xml"
    fp32 = load_segmenter(xml, threads=1)
    assert str(fp32.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    with pytest.raises(UserError, match="--bf16 runs PyTorch and OpenVINO"):
        load_segmenter(exported["tmp"] / "m.onnx", bf16=True)
    if not bf16_supported():
        pytest.skip("this CPU runs no bf16 in OpenVINO")
    bf16 = load_segmenter(xml, threads=1, bf16=True)
    assert str(bf16.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a, b = fp32(x), bf16(x)
    assert 0 < np.abs(a - b).max() < 0.5  # bf16 really ran, and stays close
    assert (labels_from_scores(a) == labels_from_scores(b)).mean() >= 0.95


def test_int8_agrees_with_fp32_and_keeps_the_classifier_in_float(exported):
    summary = exported["summary"]
    ov_agree, ort_agree = summary["openvino_int8_agreement"], summary["int8_agreement"]
    assert ov_agree["images"] == 4 and summary["agreement_images"] == "held-out"
    assert 0.97 <= ov_agree["pixel_agreement"] < 1.0  # random weights: close, not identical
    assert ov_agree["pixel_agreement"] >= ort_agree["pixel_agreement"] - 0.02
    model = read_ir(exported["tmp"] / "m.int8.xml")
    ops = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    assert sum(n.get_type_name() == "FakeQuantize" for n in ops.values()) >= 10
    head = [ops[name] for name in ir_head_nodes(model)]
    convs = [n for n in head if n.get_type_name() == "Convolution"]
    assert len(convs) == 1  # the classifier
    feeding = [i.get_source_output().get_node().get_type_name() for i in convs[0].inputs()]
    assert "FakeQuantize" not in feeding and feeding[1] == "Constant"  # float activations, float weights
    assert not any(n.get_type_name() == "FakeQuantize" for n in head)


def test_cli_runs_the_ir_without_torch(exported, tmp_path):
    out_ov, out_ort = tmp_path / "ov", tmp_path / "ort"
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        sys.argv = ["predict.py", "--model", {str(exported["tmp"] / "m.xml")!r},
                    "--input", {str(exported["images"])!r}, "--output", {str(out_ov)!r}, "--threads", "1"]
        try:
            runpy.run_path({str(ROOT / "finetune" / "predict.py")!r}, run_name="__main__")
        except SystemExit as exc:
            assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m])
            raise
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 8 masks" in proc.stdout
    model = ["--model", str(exported["tmp"] / "m.onnx"), "--threads", "1"]
    assert cli.main([*model, "--input", str(exported["images"]), "--output", str(out_ort)]) == 0
    masks = sorted(out_ov.glob("*_mask.png"))
    assert len(masks) == 8
    for path in masks:
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(out_ort / path.name))
        assert a.shape == (58, 77) and (a == b).mean() >= 0.999


def test_missing_openvino_is_one_line_naming_the_extra(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    args = ["--model", str(exported["tmp"] / "m.xml"), "--input", str(exported["images"])]
    assert cli.main([*args, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == 'error: OpenVINO models (.xml) need openvino: pip install -e ".[openvino]"\n'
    with pytest.raises(UserError, match=r'pip install -e "\.\[openvino\]"'):
        export_from_dir(str(exported["tmp"] / "model"), tmp_path / "x.onnx", targets=("openvino",))
    assert not (tmp_path / "x.onnx").exists()  # refused before anything was written


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
        {"name": "onnx int8", "onnx": tmp / "m.int8.onnx", "model": model},
        {"name": "openvino fp32", "openvino": tmp / "m.xml", "model": model},
        {"name": "openvino int8", "openvino": tmp / "m.int8.xml"},
    ]
    report = deployment_report(
        tmp_path, entries, eval_data, 3, train_crop=(32, 32), runs=2, warmup=1, measure_memory=False
    )
    rows = {r["name"]: r for r in report["entries"]}
    assert len({frozenset(r) for r in rows.values()}) == 1  # the same columns for every runtime
    assert [(r["runtime"], r["precision"]) for r in rows.values()] == [
        ("onnxruntime-cpu", "fp32"),
        ("onnxruntime-cpu", "int8"),
        ("openvino-cpu", "fp32"),
        ("openvino-cpu", "int8"),
    ]
    xml_mb = ((tmp / "m.xml").stat().st_size + (tmp / "m.bin").stat().st_size) / 2**20
    assert rows["openvino fp32"]["file_mb"] == pytest.approx(xml_mb)
    assert rows["openvino fp32"]["params"] == rows["onnx fp32"]["params"]  # the source model's count
    assert abs(rows["openvino int8"]["params"] / rows["onnx fp32"]["params"] - 1) < 0.2  # from the graph
    assert rows["openvino fp32"]["miou"] == pytest.approx(rows["onnx fp32"]["miou"], abs=1e-3)
    assert all(r["latency_full_image"]["median_ms"] > 0 for r in rows.values())
    assert isinstance(report["cpu_features"], list)
    markdown = (tmp_path / "report.md").read_text()
    assert "| openvino int8 | openvino-cpu | int8 |" in markdown and "CPU features:" in markdown


def test_peak_memory_of_an_ir_is_measured_in_a_fresh_process(exported):
    mem = peak_memory(exported["tmp"] / "m.xml", (1, 3, 64, 64), threads=1)
    assert mem["peak_rss_mib"] > 20 and mem["forward_mib"] >= 0
