"""Whole-image and sliding-window inference with small hand-made models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridvision.geometry import window_starts
from hybridvision.inference import (
    Predictor,
    gaussian_window,
    predict_sliding_window,
    predict_whole,
)


def _pointwise(in_chans=3, num_classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(in_chans, num_classes, 1).eval()


def _conv(in_chans=3, num_classes=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1)
    ).eval()


class CountingModel(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.model(x)


def _images(b, h, w, c=3, seed=1):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_whole_returns_softmax_probs_and_logits():
    model, x = _pointwise(), _images(2, 5, 6)
    probs = predict_whole(model, x)
    torch.testing.assert_close(probs, model(x).softmax(1))
    torch.testing.assert_close(predict_whole(model, x, output="logits").softmax(1), probs)
    binary = _pointwise(num_classes=1)
    torch.testing.assert_close(predict_whole(binary, x), binary(x).sigmoid())
    torch.testing.assert_close(predict_whole(binary, x, output="logits"), binary(x))


def test_whole_resizes_low_resolution_logits():
    model = nn.Sequential(nn.AvgPool2d(4), nn.Conv2d(3, 2, 1)).eval()
    out = predict_whole(model, _images(1, 16, 12))
    assert out.shape == (1, 2, 16, 12)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 16, 12))


def test_num_classes_is_checked():
    with pytest.raises(ValueError, match="expected num_classes=3"):
        predict_whole(_pointwise(num_classes=4), _images(1, 4, 4), num_classes=3)


@pytest.mark.parametrize("window", [(16, 16), (20, 24)])
def test_sliding_window_covering_image_equals_whole(window):
    x = _images(2, 16, 16)
    pointwise = _pointwise()
    torch.testing.assert_close(
        predict_sliding_window(pointwise, x, window), predict_whole(pointwise, x), rtol=0, atol=1e-6
    )
    conv = _conv()
    slide = predict_sliding_window(conv, x, window)
    whole = predict_whole(conv, x)
    if window == (16, 16):  # same input: identical
        torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    else:  # zero padding beyond the border changes only the border pixels, and only a little
        torch.testing.assert_close(slide, whole, rtol=0, atol=0.1)
        torch.testing.assert_close(slide[..., :-2, :-2], whole[..., :-2, :-2], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "size,window,overlap",
    [
        ((37, 53), (16, 16), 0.25),
        ((37, 53), (16, 16), 0.5),
        ((9, 7), (16, 16), 0.25),
        ((40, 17), (12, 20), 0.0),
    ],
)
@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_pointwise_model_is_reproduced_exactly(size, window, overlap, blend):
    x = _images(2, *size)
    model = _pointwise()
    for output in ("probs", "logits"):
        slide = predict_sliding_window(
            model, x, window, overlap=overlap, blend=blend, batch_size=3, output=output
        )
        assert slide.shape == (2, 4, *size)
        whole = predict_whole(model, x, output=output)
        torch.testing.assert_close(slide, whole, rtol=0, atol=1e-5)


def test_binary_model_in_sliding_window():
    x = _images(1, 21, 30)
    model = _pointwise(num_classes=1)
    slide = predict_sliding_window(model, x, (8, 8), overlap=0.5, blend="gaussian", output="logits")
    torch.testing.assert_close(slide, model(x), rtol=0, atol=1e-5)


def test_windows_are_batched_and_cover_the_image():
    model = CountingModel(_pointwise())
    predict_sliding_window(model, _images(2, 37, 53), (16, 16), overlap=0.25, batch_size=4)
    ys, xs = window_starts(37, 16, 12), window_starts(53, 16, 12)
    assert ys == [0, 10, 21] and xs == [0, 9, 18, 28, 37]  # spacing <= 12, last flush with the border
    total = 2 * len(ys) * len(xs)
    assert sum(model.calls) == total and max(model.calls) == 4 and len(model.calls) == -(-total // 4)
    assert window_starts(10, 16, 12) == [0]
    assert window_starts(16, 16, 12) == [0]


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_constant_model_gives_constant_output_without_seams(blend):
    class Constant(nn.Module):
        def forward(self, x):
            logits = torch.tensor([0.3, -1.2, 2.0])[None, :, None, None]
            return logits.expand(x.shape[0], 3, *x.shape[-2:])

    out = predict_sliding_window(Constant(), _images(1, 45, 31), (16, 12), overlap=0.4, blend=blend)
    expected = torch.tensor([0.3, -1.2, 2.0]).softmax(0)[None, :, None, None].expand_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_gaussian_window_weights():
    weights = gaussian_window((16, 12))
    assert weights.shape == (16, 12) and weights.max() == 1.0 and (weights > 0).all()
    torch.testing.assert_close(weights, weights.flip(0).flip(1))  # symmetric around the centre
    assert weights[0, 0] < weights[4, 3] < weights[7, 5]
    # odd size: the centre pixel has weight exactly 1
    assert gaussian_window((9, 9))[4, 4] == 1.0


def test_gaussian_blending_prefers_window_centres():
    # a model whose output depends on the position inside the window: centres say class 0, borders class 1
    class PositionDependent(nn.Module):
        def forward(self, x):
            h, w = x.shape[-2:]
            yy = torch.linspace(-1, 1, h)[:, None].expand(h, w)
            xx = torch.linspace(-1, 1, w)[None, :].expand(h, w)
            centre = 4 * (1 - (yy**2 + xx**2))
            logits = torch.stack([centre, -centre])[None].expand(x.shape[0], 2, h, w)
            return logits

    x = _images(1, 24, 24)
    uniform = predict_sliding_window(PositionDependent(), x, (16, 16), overlap=0.5, blend="uniform")
    gaussian = predict_sliding_window(PositionDependent(), x, (16, 16), overlap=0.5, blend="gaussian")
    # the middle pixel is a border pixel of some windows and a centre pixel of one: gaussian trusts the centre
    assert gaussian[0, 0, 12, 12] > uniform[0, 0, 12, 12]


def test_tta_with_flip_equivariant_model_equals_no_tta():
    x = _images(2, 13, 18)
    model = _pointwise()
    for flips in [("h",), ("v",), ("h", "v", "hv")]:
        torch.testing.assert_close(
            predict_whole(model, x, tta_flips=flips), predict_whole(model, x), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            predict_sliding_window(model, x, (8, 8), tta_flips=flips),
            predict_sliding_window(model, x, (8, 8)),
            rtol=0,
            atol=1e-6,
        )


def test_tta_averages_probabilities_of_flipped_views():
    x = _images(1, 10, 10)
    model = _conv()  # not flip-equivariant
    expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1).flip(-1)) / 2
    torch.testing.assert_close(predict_whole(model, x, tta_flips=("h",)), expected)
    assert not torch.allclose(expected, model(x).softmax(1), atol=1e-4)
    binary = _conv(num_classes=1)  # K = 1: logits are averaged, then the sigmoid
    averaged = (binary(x) + binary(x.flip(-2)).flip(-2)) / 2
    torch.testing.assert_close(predict_whole(binary, x, tta_flips=("v",)), averaged.sigmoid())
    with pytest.raises(ValueError, match="unknown TTA flip"):
        predict_whole(model, x, tta_flips=("d",))
    with pytest.raises(TypeError):
        predict_whole(model, x, tta_flips="h")


def test_predictor_dispatches_on_mode():
    x = _images(1, 20, 20)
    model = _conv()
    whole = Predictor(model, mode="whole", num_classes=4, tta_flips=("h",))
    torch.testing.assert_close(whole(x), predict_whole(model, x, tta_flips=("h",)))
    slide = Predictor(model, mode="slide", window=(12, 12), overlap=0.5, blend="gaussian", batch_size=2)
    torch.testing.assert_close(slide(x), predict_sliding_window(model, x, (12, 12), 0.5, "gaussian", 2))
    assert torch.equal(slide.predict_labels(x), slide(x).argmax(1))
    binary = Predictor(_pointwise(num_classes=1), output="logits")
    assert torch.equal(binary.predict_labels(x), (_pointwise(num_classes=1)(x)[:, 0] > 0).long())
    with pytest.raises(ValueError, match="needs window"):
        Predictor(model, mode="slide")
    with pytest.raises(ValueError, match="mode must be"):
        Predictor(model, mode="tiles")


# --------------------------------------------------------------------------- padding: one rule


class RecordingModel(nn.Module):
    """Records every input it is given (the windows inference builds); predicts 2 classes."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(x.shape[0], 2, *x.shape[-2:], dtype=x.dtype)


@pytest.mark.parametrize("normalize", ["imagenet", "per_image"])
@pytest.mark.parametrize("elastic", [0.0, 30.0])
def test_training_crops_and_inference_windows_pad_with_the_same_values(normalize, elastic):
    """An 11 x 9 image under a 16 x 16 crop and a 16 x 16 window: the training crop holds the
    normalised image and 0 (the mean) around it, the masks ignore_index, and the windows of the
    PyTorch and ONNX-runtime predictors hold the same normalised image with the same 0 border
    (before the fix training padded raw pixels with 0: -2.1 after ImageNet normalisation)."""
    import numpy as np

    from hybridvision.data import apply_transform, build_seg_transforms
    from hybridvision.deploy import runtime

    torch.manual_seed(0)
    image = torch.rand(3, 11, 9, generator=torch.Generator().manual_seed(3)) * 0.4 + 0.3
    sample = {"image": image, "mask": torch.ones(11, 9, dtype=torch.int64), "id": "small"}
    train_tf = build_seg_transforms(
        True, (16, 16), scale=(1.0, 1.0), hflip=False, elastic=elastic, normalize=normalize, ignore_index=7
    )
    eval_tf = build_seg_transforms(False, None, normalize=normalize)
    normalised = apply_transform(sample, eval_tf)["image"]  # (3, 11, 9), what inference pads
    crop = apply_transform(sample, train_tf)
    assert crop["image"].shape == (3, 16, 16) and crop["mask"].shape == (16, 16)

    model = RecordingModel()
    predict_sliding_window(model, normalised[None], (16, 16))
    (window,) = model.inputs  # (1, 3, 16, 16)
    windows = []
    runtime.predict_sliding_window(
        lambda x: windows.append(x) or np.zeros((x.shape[0], 2, 16, 16), np.float32),
        normalised[None].numpy(),
        (16, 16),
    )
    torch.testing.assert_close(torch.from_numpy(windows[0]), window, rtol=0, atol=0)
    border = torch.ones(16, 16, dtype=torch.bool)
    border[:11, :9] = False
    assert window[0][:, border].abs().max() == 0  # the inference border: 0
    torch.testing.assert_close(window[0][:, :11, :9], normalised, rtol=0, atol=0)

    outside = crop["mask"] == 7  # padded (and, with elastic, brought in from outside)
    assert outside.any()
    if elastic == 0:  # the picture is copied exactly, at some offset
        assert int(outside.sum()) == 16 * 16 - 11 * 9
        rows, cols = torch.nonzero(~outside, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        torch.testing.assert_close(crop["image"][:, top : top + 11, left : left + 9], normalised)
        assert crop["image"][:, outside].abs().max() == 0  # the same border as inference
    else:  # bilinear sampling blends the picture with the border: values stay within the two
        low = min(0.0, float(normalised.min()))
        assert float(crop["image"].min()) >= low - 1e-5
