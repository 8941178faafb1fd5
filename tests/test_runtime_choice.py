"""The deployment report's choice: the fastest exported runtime within 0.01 mIoU of fp32, per model."""

from __future__ import annotations

from hybridvision.export.choice import choice_lines, choose_runtimes


def _row(name: str, runtime: str, precision: str, miou: float, full_ms: float, crop_ms: float = 1.0) -> dict:
    return {
        "name": name,
        "runtime": runtime,
        "precision": precision,
        "miou": miou,
        "latency_full_image": {"median_ms": full_ms},
        "latency_train_crop": {"median_ms": crop_ms},
    }


ROWS = [
    _row("teacher (PyTorch)", "pytorch-eager", "fp32", 0.70, 900.0),
    _row("student (PyTorch)", "pytorch-eager", "fp32", 0.650, 100.0),
    _row("student (ONNX fp32)", "onnxruntime-cpu", "fp32", 0.650, 80.0),
    _row("student (ONNX int8)", "onnxruntime-cpu", "int8", 0.6405, 50.0),  # within 0.01
    _row("student (OpenVINO int8)", "openvino-cpu", "int8", 0.630, 20.0),  # fastest, loses 0.02
    _row("student (OpenVINO bf16)", "openvino-cpu", "bf16", 0.649, 60.0),
]


def test_fastest_within_tolerance_is_chosen_and_faster_losers_are_named():
    choice = choose_runtimes(ROWS)
    assert set(choice) == {"student"}  # the teacher has no exported row
    student = choice["student"]
    assert student["chosen"] == "student (ONNX int8)" and student["reference"] == "student (PyTorch)"
    assert student["miou_drop"] == 0.0095
    assert student["speedup_vs_onnx_fp32"] == 1.6  # 80 / 50
    assert student["rejected"] == ["student (OpenVINO int8): mIoU 0.6300 < 0.6400"]
    line = choice_lines(choice)[0]
    assert "student (ONNX int8)" in line and "1.60x onnxruntime fp32" in line and "OpenVINO int8" in line


def test_a_looser_tolerance_takes_the_faster_runtime_and_ties_break_on_crop_latency():
    assert choose_runtimes(ROWS, tolerance=0.05)["student"]["chosen"] == "student (OpenVINO int8)"
    rows = [
        _row("m (PyTorch)", "pytorch-eager", "fp32", 0.5, 10.0),
        _row("m (a)", "onnxruntime-cpu", "fp32", 0.5, 5.0, crop_ms=2.0),
        _row("m (b)", "openvino-cpu", "fp32", 0.5, 5.0, crop_ms=1.0),
    ]
    assert choose_runtimes(rows)["m"]["chosen"] == "m (b)"


def test_no_runtime_keeps_the_accuracy():
    rows = [ROWS[1], {**ROWS[3], "miou": 0.5}, {**ROWS[4], "miou": 0.4}]
    choice = choose_runtimes(rows)["student"]
    assert choice["chosen"] is None and len(choice["rejected"]) == 2
    assert "no exported runtime stays within 0.01" in choice_lines({"student": choice})[0]
