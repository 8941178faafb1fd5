"""int8 quantization: logits and classifier in float, attention kept in float, calibration as deployed."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from hybridvision.deploy.runtime import (
    OnnxSegmenter,
    normalization_spec,
    normalize_image,
    read_metadata,
    rescaled_size,
    resize_image,
    window_starts,
)
from hybridvision.export import (
    deployment_inputs,
    exact_ties,
    export_onnx,
    has_attention,
    head_nodes,
    int8_agreement,
    peak_memory,
    quantize_int8,
)
from hybridvision.models import create_segmenter

QDQ = {"QuantizeLinear", "DequantizeLinear"}


def _export(tmp_path, name: str, num_classes: int = 3, **data):
    """Exported with every parameter perturbed, as after training: at initialisation equal tensors
    (zero biases, unit norm scales) are folded into one initializer that several nodes share."""
    torch.manual_seed(0)
    model = create_segmenter(name, num_classes=num_classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return export_onnx(model, tmp_path / f"{name}.onnx", train_crop=(64, 64), data_cfg=data or None)


def _calibration(count: int = 4, size: tuple[int, int] = (64, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((3, *size)).astype(np.float32) for _ in range(count)]


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def test_cnn_int8_logits_come_from_a_float_head(tmp_path):
    fp32 = _export(tmp_path, "unet_resnet_nano")
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", _calibration())
    graph = onnx.load(str(int8)).graph
    assert read_metadata(int8)["quantization"]["scheme"] == "static"
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10  # the body is quantized
    # from the output back to the classifier conv: no Quantize/Dequantize, float weights
    producer = _producers(graph)
    assert producer[graph.output[0].name].op_type != "DequantizeLinear"
    names = set(head_nodes(graph))
    path = [n for n in graph.node if n.name in names]
    assert not QDQ & {n.op_type for n in path}, sorted({n.op_type for n in path})
    convs = [n for n in path if n.op_type == "Conv"]
    assert len(convs) == 1 and convs[0].input[1] in {i.name for i in graph.initializer}
    # 8-bit logits had 163 distinct values here; float ones have one per output element
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    logits = OnnxSegmenter(int8)(x)
    assert len(np.unique(logits)) > 1000
    assert exact_ties(logits) == 0


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["auto", "static"])
def test_attention_int8_keeps_layernorm_softmax_and_activation_matmuls_in_float(tmp_path, scheme):
    fp32 = _export(tmp_path, "segformer_nano")
    assert has_attention(onnx.load(str(fp32)).graph)
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", _calibration(), scheme=scheme)
    graph = onnx.load(str(int8)).graph
    assert read_metadata(int8)["quantization"]["scheme"] == {"auto": "attention"}.get(scheme, scheme)
    producer = _producers(graph)
    weights = {i.name for i in graph.initializer}
    weights |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}

    def rounded(tensor: str) -> bool:
        """The value went through a QuantizeLinear since the last layer with weights computed it."""
        pending, seen = [tensor], set()
        while pending:
            node = producer.get(pending.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "QuantizeLinear":
                return True
            if node.op_type not in (
                "Conv",
                "MatMul",
                "MatMulInteger",
                "Gemm",
                "Shape",
                "DynamicQuantizeLinear",
            ):
                pending.extend(node.input)
        return False

    kept = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(kept) >= 4
    assert not [n.name for n in kept if any(rounded(i) for i in n.input)]
    activation_matmuls = [n for n in graph.node if n.op_type == "MatMul" and not weights & set(n.input)]
    assert activation_matmuls and not [n.name for n in activation_matmuls if any(map(rounded, n.input))]
    # the body is int8: linear layers as int8 MatMuls (attention scheme) or QDQ (static), convolutions QDQ
    if scheme == "auto":
        assert sum(n.op_type == "MatMulInteger" for n in graph.node) >= 4
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= (2 if scheme == "auto" else 10)
    logits = OnnxSegmenter(int8)(np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert len(np.unique(logits)) > 1000 and exact_ties(logits) == 0


def test_calibration_ranges_cover_every_image(tmp_path):
    """16 images (a multiple of onnxruntime's chunk of 8 made it raise; its intermediate-output cap
    silently dropped all but the last chunk): the input's range must reach the first image's 40."""
    fp32 = _export(tmp_path, "unet_resnet_nano")
    images = _calibration(16)
    images[0][0, 0, 0] = 40.0
    graph = onnx.load(str(quantize_int8(fp32, tmp_path / "m.int8.onnx", images))).graph
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    first = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    rmin = min(float(a.min()) for a in images)
    assert float(scales[first.input[1]]) == pytest.approx((40.0 - rmin) / 255, rel=1e-3)


def test_has_attention_and_exact_ties():
    from onnx import TensorProto, helper, numpy_helper

    def graph(*nodes):
        weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "y")]
        return helper.make_graph(list(nodes), "g", io[:1], io[1:], [weight])

    assert not has_attention(graph(helper.make_node("MatMul", ["x", "w"], ["y"])))  # a linear layer
    assert has_attention(graph(helper.make_node("MatMul", ["x", "x"], ["y"])))  # q @ k
    assert has_attention(graph(helper.make_node("Softmax", ["x"], ["y"])))
    # (1, 3, 1, 3): pixel 0 ties at the top (1, 1, 0); pixel 1 does not (2, 0.5, 1.9); pixel 2's
    # equal values are below its maximum (3, 1, 1)
    logits = np.array([[[[1.0, 2.0, 3.0]], [[1.0, 0.5, 1.0]], [[0.0, 1.9, 1.0]]]], np.float32)
    assert exact_ties(logits) == 1
    assert exact_ties(np.array([[[[0.0, 0.1, -0.0]]]], np.float32)) == 2  # K = 1: logit exactly 0


def test_calibration_inputs_are_what_the_runtime_predictor_feeds_the_model(tmp_path):
    """Recorded scale [40] and the training-crop window: a 50 x 70 image becomes 40 x 56 and four
    overlapping 32 x 32 windows, normalised as recorded; whole-image mode gives the rescaled image."""
    torch.manual_seed(0)
    model = create_segmenter("unet_resnet_nano", num_classes=2).eval()
    data = {"normalize": "imagenet", "resize": [40]}
    fp32 = export_onnx(model, tmp_path / "m.onnx", train_crop=(32, 32), data_cfg=data)
    raw = np.random.default_rng(0).uniform(0, 1, (3, 50, 70)).astype(np.float32)
    size = rescaled_size(50, 70, [40])
    assert size == (40, 56)
    scaled = resize_image(normalize_image(raw, normalization_spec(data, 3)), size)

    windows = deployment_inputs(fp32, [raw])
    starts = [(y, x) for y in window_starts(40, 32, 24) for x in window_starts(56, 32, 24)]
    assert [w.shape for w in windows] == [(3, 32, 32)] * len(starts) == [(3, 32, 32)] * 4
    for window, (y, x) in zip(windows, starts):
        np.testing.assert_allclose(window, scaled[:, y : y + 32, x : x + 32], atol=1e-6)

    whole = deployment_inputs(fp32, [raw], mode="whole")
    assert len(whole) == 1
    np.testing.assert_allclose(whole[0], scaled, atol=1e-6)
    # images already normalised (the training pipeline's evaluation transform) skip normalisation
    again = deployment_inputs(fp32, [normalize_image(raw, normalization_spec(data, 3))], normalized=True)
    np.testing.assert_allclose(np.stack(again), np.stack(windows), atol=1e-6)


def test_int8_agreement_counts_pixels_through_the_deployment_path(tmp_path):
    fp32 = _export(tmp_path, "unet_resnet_nano", resize=[48])
    int8 = quantize_int8(fp32, tmp_path / "m.int8.onnx", deployment_inputs(fp32, _calibration(2, (60, 80))))
    same = int8_agreement(fp32, fp32, _calibration(2, (60, 80)))
    assert same["pixel_agreement"] == 1.0 and same["pixels"] == 2 * 60 * 80 and same["images"] == 2
    result = int8_agreement(fp32, int8, _calibration(3, (60, 80)))
    assert result["pixels"] == 3 * 60 * 80
    assert 0.9 < result["pixel_agreement"] < 1.0  # random weights: close, not identical
    assert result["ties_int8"] <= result["ties_fp32"] == 0.0


def test_quantizing_prints_no_shape_inference_noise(tmp_path, capfd, caplog):
    """onnxruntime's shape inference logs 'Unable to determine if height <= 32*floor(...)' for the
    UNet's padding arithmetic; quantize_int8 drops those lines, and only those."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = _export(tmp_path, "unet_resnet_nano")
    with caplog.at_level(logging.WARNING):
        quant_pre_process(str(fp32), str(tmp_path / "pre.onnx"))  # without the filter: the noise
    assert "Unable to determine if" in caplog.text
    caplog.clear()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        quantize_int8(fp32, tmp_path / "m.int8.onnx", _calibration(2))
    captured = capfd.readouterr()
    assert "Unable to determine" not in captured.out + captured.err + caplog.text
    # the filter is gone afterwards: other code's log lines are untouched
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").warning("Unable to determine if x")
    assert "Unable to determine if x" in caplog.text


def test_peak_memory_is_measured_in_a_fresh_process(tmp_path):
    fp32 = _export(tmp_path, "unet_resnet_nano")
    small = peak_memory(fp32, (1, 3, 64, 64))
    large = peak_memory(fp32, (1, 3, 512, 512))
    # activations of a 512 x 512 forward: tens of MiB more than at 64 x 64
    assert 0 < small["forward_mib"] < small["peak_rss_mib"]
    assert large["forward_mib"] > small["forward_mib"] + 10
    assert large["peak_rss_mib"] > 20


def test_distill_calibrates_on_training_images_through_the_evaluation_transform():
    """Not the augmented training crops (random rescale, flips): each training image as evaluation
    and deployment see it, normalised, at its own size (the predictor applies the scale)."""
    import dataclasses

    from distill.config import DistillConfig
    from distill.edge import calibration_images
    from hybridvision.data.from_config import build_labelled_datasets

    cfg = DistillConfig()
    data = dataclasses.replace(cfg.data, num_classes=3, in_chans=3, normalize="imagenet", synthetic_samples=4)
    cfg = dataclasses.replace(cfg, data=data)
    images = calibration_images(cfg, 3)
    raw, _ = build_labelled_datasets(data, None, None, seed=cfg.train.seed)
    assert len(images) == 3 and len(calibration_images(cfg, 10)) == 4
    spec = normalization_spec({"normalize": "imagenet"}, 3)
    for image, i in zip(images, range(3)):
        np.testing.assert_allclose(
            np.asarray(image), normalize_image(np.asarray(raw[i]["image"]), spec), atol=1e-6
        )
