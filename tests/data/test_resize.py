"""Scale handling for folders of varying image size: ``data.resize`` in training, evaluation, predict.

Checked against naive versions: the rescaled size by hand, the training resize against one
``F.resize`` of the whole sample, the evaluation against "interpolate, predict, interpolate back"
written out, and the PyTorch-free runtime against the PyTorch predictor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from hybridvision.config import ConfigError, DataConfig, load_config
from hybridvision.data.from_config import auto_resize, image_sizes, resolve_resize
from hybridvision.data.transforms import RandomResize, RandomScale, build_seg_transforms
from hybridvision.deploy.runtime import parse_resize, resize_image
from hybridvision.geometry import Scale, rescaled_size
from hybridvision.inference import Predictor


@pytest.mark.parametrize(
    ("hw", "resize", "expected"),
    [
        ((300, 400), [150, 0], (150, 200)),  # short side -> 150
        ((400, 300), [150, 0], (200, 150)),
        ((300, 1200), [150, 400], (100, 400)),  # the long side would be 600 > 400: long -> 400
        ((64, 64), [128, 512], (128, 128)),  # small images are enlarged
        ((1024, 1365), [128, 512], (128, 171)),
        ((7, 9), None, (7, 9)),
    ],
)
def test_rescaled_size(hw, resize, expected):
    assert rescaled_size(*hw, resize) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("native", "native"),
        ("256", [256, 0]),
        ("[256, 1024]", [256, 1024]),
        ("[96]", [96, 0]),
    ],
)
def test_config_values(value, expected):
    assert load_config(DataConfig, None, [f"resize={value}"]).resize == expected


@pytest.mark.parametrize("value", ["big", "[0]", "[512, 100]", "[1, 2, 3]"])
def test_bad_config_values_name_the_key(value):
    with pytest.raises(ConfigError, match="resize"):
        load_config(DataConfig, None, [f"resize={value}"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("native", None),
        ("256", Scale(256, 0)),
        ([256, 1024], Scale(256, 1024)),
        ((96,), Scale(96, 0)),
        (["128", "512"], Scale(128, 512)),  # --resize 128 512
        (["native"], None),  # --resize native
    ],
)
def test_scale_is_the_one_typed_form(value, expected):
    """Config, --resize and the exported metadata all read the scale through ``Scale.parse``."""
    assert Scale.parse(value) == expected
    cfg_value = "native" if value is None else value
    assert DataConfig(resize=cfg_value).resize_scale == expected
    assert parse_resize(None, list(expected) if expected else "native") == expected


@pytest.mark.parametrize("value", ["big", [0], [512, 100], [1, 2, 3], ["x"]])
def test_scale_rejects_with_the_rule(value):
    with pytest.raises(ValueError, match="SHORT|long-side"):
        Scale.parse(value)


def test_unresolved_auto_is_not_used_silently():
    with pytest.raises(RuntimeError, match="auto"):
        _ = DataConfig().resize_scale


def _sample(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = tv_tensors.Image(torch.rand(3, h, w, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 3, (h, w), generator=g))
    return {"image": image, "mask": mask, "id": "x"}


def test_random_resize_is_one_resize_to_the_scale_times_the_ratio():
    sample = _sample(300, 400)
    torch.manual_seed(3)
    out = RandomResize([150, 0], (0.5, 2.0))(sample)
    torch.manual_seed(3)
    ratio = 0.5 + float(torch.rand(())) * 1.5  # the draw RandomResize makes
    size = [round(150 * ratio), round(200 * ratio)]
    assert list(out["image"].shape[-2:]) == size and list(out["mask"].shape) == size
    expected = F.interpolate(
        sample["image"][None], size, mode="bilinear", antialias=True, align_corners=False
    )[0]
    torch.testing.assert_close(out["image"].as_subclass(torch.Tensor), expected, atol=1e-6, rtol=0)
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2}  # nearest: no new values


def test_random_scale_is_random_resize_around_the_native_size():
    sample = _sample(50, 70)
    torch.manual_seed(1)
    a = RandomScale((0.5, 2.0))(sample)
    torch.manual_seed(1)
    b = RandomResize(None, (0.5, 2.0))(sample)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def _scene(h, w):
    """One smooth scene sampled at (h, w): content scales with the resolution, as in photos."""
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    image = torch.stack([torch.sin(6 * x), torch.cos(5 * y), x * y])
    mask = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).long()
    return {"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask), "id": "s"}


def test_training_sees_one_scale_whatever_the_image_size():
    """A 480x640 and a 48x64 copy of one scene give the same training sample at resize=[64, 256]
    (ratio 1, crop = the rescaled size); at native scale they differ 10x in size."""
    tf = build_seg_transforms(
        True, (64, 85), scale=(1.0, 1.0), hflip=False, normalize="none", resize=[64, 256]
    )
    big, small = tf(_scene(480, 640)), tf(_scene(48, 64))
    assert big["image"].shape == small["image"].shape == (3, 64, 85)
    assert (big["image"] - small["image"]).abs().mean() < 0.02
    assert (big["mask"] != small["mask"]).float().mean() < 0.03


class _ShapeRecorder(torch.nn.Module):
    """A 'model' whose logits depend on position and on the input size it was given."""

    def __init__(self, k=3):
        super().__init__()
        self.k, self.seen = k, []
        self.conv = torch.nn.Conv2d(3, k, 3, padding=1)

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.conv(x)


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("k", [1, 3])
def test_predictor_resize_matches_the_naive_version(mode, k):
    torch.manual_seed(0)
    model = _ShapeRecorder(k).eval()
    images = torch.randn(2, 3, 90, 120)
    window = (32, 32) if mode == "slide" else None
    plain = Predictor(model, mode=mode, window=window, output="logits")
    resized = Predictor(model, mode=mode, window=window, output="logits", resize=[45, 0])
    out = resized(images)
    assert out.shape == (2, k, 90, 120)
    # naive: rescale, predict, resize the logits back
    small = F.interpolate(images, (45, 60), mode="bilinear", antialias=True, align_corners=False)
    expected = F.interpolate(plain(small), (90, 120), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if mode == "whole":
        assert model.seen[-1] == (45, 60)
    # at its own scale the resize is a no-op
    torch.testing.assert_close(
        Predictor(model, mode=mode, window=window, output="logits", resize=[90, 0])(images), plain(images)
    )
    probs = Predictor(model, mode=mode, window=window, output="probs", resize=[45, 0])(images)
    torch.testing.assert_close(
        probs, expected.sigmoid() if k == 1 else expected.softmax(1), atol=1e-5, rtol=0
    )


def test_runtime_resize_matches_torch_antialiased_bilinear():
    x = np.random.default_rng(0).random((3, 301, 437), dtype=np.float32)
    for size in [(128, 186), (600, 871), (77, 50)]:
        ours = resize_image(x, size)
        ref = F.interpolate(
            torch.from_numpy(x)[None], size, mode="bilinear", antialias=True, align_corners=False
        )
        np.testing.assert_allclose(ours, ref[0].numpy(), atol=5e-5)


def test_parse_resize_option_and_recorded_value():
    assert parse_resize(None, [128, 512]) == Scale(128, 512)
    assert parse_resize(None, "native") is None and parse_resize(None, None) is None
    assert parse_resize(["native"], [128, 512]) is None
    assert parse_resize(["96"], None) == Scale(96, 0) and parse_resize(["96", "400"], None) == Scale(96, 400)


def test_auto_resize_rule():
    crop = (128, 128)
    assert auto_resize([(512, 512)] * 30, crop) is None  # equal-size slices stay native
    assert auto_resize([(360, 480), (400, 500)], crop) is None  # within 1.25x: one scale
    assert auto_resize([(64, 90), (1024, 1365), (300, 400)], crop) == [128, 512]
    assert auto_resize([(48, 64), (600, 800)], (96, 160)) == [96, 640]
    assert auto_resize(None, crop) is None


def _folder(root, sizes, broken=()):
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split).mkdir(parents=True, exist_ok=True)
            img = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
            path = root / "images" / split / f"{i}.png"
            Image.fromarray(img).save(path)
            Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "masks" / split / f"{i}.png")
            if i in broken:
                path.write_bytes(b"not an image")
    return root


def test_image_sizes_reads_headers_skips_broken_files_and_held_out_ids(tmp_path):
    root = _folder(tmp_path / "d", [(40, 60), (200, 100), (30, 30), (80, 80)], broken=(3,))
    cfg = DataConfig(source=str(root), val_ids=["2"])
    assert sorted(image_sizes(cfg)) == [(40, 60), (200, 100)]


def test_resolve_resize_returns_a_resolved_copy_with_a_log_line(tmp_path):
    root = _folder(tmp_path / "d", [(40, 60), (200, 300)])
    cfg = DataConfig(source=str(root), image_size=(32, 32))
    resolved, line = resolve_resize(cfg)
    assert resolved.resize == [32, 128] and "short sides 40-200" in line and "native" in line
    assert cfg.resize == "auto"  # the given config is never changed
    same, line = resolve_resize(DataConfig(source=str(_folder(tmp_path / "e", [(50, 50), (50, 50)]))))
    assert "one scale" in line and same.resize == "native" and same.resize_scale is None
    fixed = DataConfig(source=str(root), resize=[64, 0])
    assert resolve_resize(fixed) == (fixed, "data.resize=[64, 0]") and fixed.resize_scale == Scale(64, 0)
    synthetic, _ = resolve_resize(DataConfig())
    assert synthetic.resize == "native"


def test_recorded_scale_reaches_the_export_metadata(tmp_path):
    pytest.importorskip("onnx")
    from hybridvision.export import export_onnx
    from hybridvision.models import create_segmenter

    model = create_segmenter("unet_resnet_nano", num_classes=2)
    path = export_onnx(model, tmp_path / "m.onnx", train_crop=(32, 32), data_cfg={"resize": [48, 192]})
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["hybridvision"])
    assert meta["resize"] == [48, 192]


def test_image_sizes_are_the_displayed_sizes(tmp_path):
    """data.resize=auto sees a phone photo stored sideways (EXIF orientation 6) at its upright size."""
    from data_helpers import save_with_orientation

    root = tmp_path / "d"
    save_with_orientation(root / "images" / "train" / "p.jpg", np.zeros((40, 60, 3), np.uint8), 6)
    save_with_orientation(root / "images" / "train" / "q.png", np.zeros((30, 50, 3), np.uint8), 8)
    for stem, shape in (("p", (40, 60)), ("q", (30, 50))):
        Image.fromarray(np.zeros(shape, np.uint8)).save(_mkdir(root / "masks" / "train") / f"{stem}.png")
    assert sorted(image_sizes(DataConfig(source=str(root)))) == [(30, 50), (40, 60)]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
