"""read_image / read_mask: every supported mode, channel conversion, and clear errors."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from data_helpers import save, save_with_orientation, write_corrupt, write_png16, write_truncated
from PIL import Image, ImageOps

from hybridvision.data.io import check_mask_values, read_image, read_mask
from hybridvision.deploy import reader


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


def test_gray_png_to_1_and_3_channels(tmp_path):
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    path = save(tmp_path / "g.png", gray)
    one = read_image(path, in_chans=1)
    assert one.shape == (1, 5, 7) and one.dtype == torch.float32
    torch.testing.assert_close(one[0], torch.from_numpy(gray).float() / 255)
    three = read_image(path, in_chans=3)
    assert three.shape == (3, 5, 7)
    for c in range(3):
        torch.testing.assert_close(three[c], one[0])


def test_rgb_png_and_luminance(tmp_path, rgb):
    path = save(tmp_path / "c.png", rgb)
    three = read_image(path, in_chans=3)
    torch.testing.assert_close(three, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    one = read_image(path, in_chans=1)
    expected = (rgb.astype(np.float64) / 255) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(one[0].numpy(), expected, atol=1e-6)


def test_rgba_drops_alpha_for_3_keeps_it_for_4(tmp_path, rgb):
    alpha = np.full((5, 7, 1), 10, dtype=np.uint8)
    path = save(tmp_path / "a.png", np.concatenate([rgb, alpha], axis=-1))
    three = read_image(path, in_chans=3)
    torch.testing.assert_close(three, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    four = read_image(path, in_chans=4)
    assert four.shape == (4, 5, 7)
    torch.testing.assert_close(four[3], torch.full((5, 7), 10 / 255))


def test_palette_png_gives_palette_colours(tmp_path):
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    path = save(tmp_path / "p.png", index, palette=[255, 0, 0, 0, 255, 0, 0, 0, 255])
    image = read_image(path, in_chans=3)
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 1, 0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_scaled_by_65535(tmp_path, suffix):
    values = np.array([[0, 1, 32768, 65535]], dtype=np.uint16)
    path = save(tmp_path / f"d{suffix}", values)
    assert Image.open(path).mode == "I;16"
    out = read_image(path, in_chans=1)
    np.testing.assert_allclose(out[0, 0].numpy(), values[0] / 65535.0, rtol=0, atol=1e-7)


def test_float_tiff_returned_raw(tmp_path):
    hu = np.array([[-1000.0, 0.25, 40.0, 3000.5]], dtype=np.float32)
    out = read_image(save(tmp_path / "ct.tif", hu), in_chans=1)
    assert out.tolist() == [[[-1000.0, 0.25, 40.0, 3000.5]]]


def test_rgba_tiff_and_other_formats(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=-1)
    assert read_image(save(tmp_path / "m.tiff", rgba), in_chans=4).shape == (4, 5, 7)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(read_image(save(tmp_path / "b.bmp", rgb), 3), expected)
    torch.testing.assert_close(read_image(save(tmp_path / "w.webp", rgb), 3).shape, expected.shape)
    flat = np.full((16, 16, 3), 128, np.uint8)  # flat colour survives JPEG almost exactly
    jpg = read_image(save(tmp_path / "j.JPG", flat), 3)
    assert jpg.shape == (3, 16, 16) and abs(float(jpg.mean()) - 128 / 255) < 2 / 255


def test_channel_mismatch_names_file_and_counts(tmp_path, rgb):
    path = save(tmp_path / "colour.png", rgb)
    with pytest.raises(ValueError, match=r"colour\.png has 3 channel.*in_chans=4"):
        read_image(path, in_chans=4)
    gray = save(tmp_path / "gray.png", rgb[..., 0])
    with pytest.raises(ValueError, match=r"gray\.png has 1 channel.*in_chans=2"):
        read_image(gray, in_chans=2)


def test_corrupt_and_truncated_raise_oserror(tmp_path):
    with pytest.raises(OSError):
        read_image(write_corrupt(tmp_path / "bad.png"), 3)
    with pytest.raises(OSError):
        read_image(write_truncated(tmp_path / "cut.png"), 3)


def test_tifffile_path_multiband(tmp_path, monkeypatch):
    """With tifffile present, TIFFs are read with it: planar (C, H, W) 4-band data -> (4, H, W)."""
    bands = np.arange(4 * 20 * 24, dtype=np.uint16).reshape(4, 20, 24)  # planar RGB + NIR

    class FakeTiffFile:
        def __init__(self, path):
            self.series = [types.SimpleNamespace(axes="SYX", asarray=lambda: bands)]
            self.pages = [types.SimpleNamespace(extrasamples=(0,), tags={})]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.ModuleType("tifffile")
    fake.TiffFile = FakeTiffFile
    monkeypatch.setitem(sys.modules, "tifffile", fake)
    monkeypatch.setattr(reader, "_has_tifffile", lambda: True)
    path = tmp_path / "rgbn.tif"
    path.write_bytes(b"")  # content is served by the fake module
    out = read_image(path, in_chans=4)
    torch.testing.assert_close(out, torch.from_numpy(bands.astype(np.float32) / 65535))
    with pytest.raises(ValueError, match=r"rgbn\.tif has 4 channel.*in_chans=3"):
        read_image(path, in_chans=3)


def test_real_tifffile_multiband(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    bands = np.random.default_rng(0).integers(0, 256, (9, 11, 4), dtype=np.uint8)
    expected = torch.from_numpy(bands).permute(2, 0, 1).float() / 255
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, bands, photometric="rgb", extrasamples=["unspecified"])
    torch.testing.assert_close(read_image(path, in_chans=4), expected)
    with pytest.raises(ValueError, match="in_chans=3"):  # NIR is not alpha: never dropped
        read_image(path, in_chans=3)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, bands.transpose(2, 0, 1), photometric="minisblack", planarconfig="separate")
    torch.testing.assert_close(read_image(planar, in_chans=4), expected)
    rgba = tmp_path / "rgba.tif"
    Image.fromarray(bands).save(rgba)  # PIL marks the 4th band as alpha
    torch.testing.assert_close(read_image(rgba, in_chans=3), expected[:3])


def test_read_mask_modes(tmp_path):
    values = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)
    for name, kwargs in (("l.png", {}), ("p.png", {"palette": [9, 9, 9] * 256})):
        mask = read_mask(save(tmp_path / name, values, **kwargs))
        assert mask.dtype == torch.int64 and mask.tolist() == values.tolist()
    wide = np.array([[0, 300, 1000]], dtype=np.uint16)
    assert read_mask(save(tmp_path / "i16.png", wide)).tolist() == [[0, 300, 1000]]


def test_rgb_mask_is_an_error_naming_the_file(tmp_path, rgb):
    path = save(tmp_path / "colour_mask.png", rgb)
    with pytest.raises(ValueError, match=r"colour_mask\.png has mode 'RGB'"):
        read_mask(path)


def test_check_mask_values():
    mask = torch.tensor([[0, 1, 255], [2, 7, 9]])
    with pytest.raises(ValueError, match=r"m\.png has values \[7, 9\] outside \[0, 3\)"):
        check_mask_values(mask, 3, 255, "m.png")
    counts = check_mask_values(torch.tensor([[0, 1, 255], [1, 1, 0]]), 3, 255, "ok.png")
    assert counts[:3].tolist() == [2, 3, 0] and int(counts[255]) == 1
    with pytest.raises(ValueError, match=r"values \[255\]"):
        check_mask_values(torch.tensor([[0, 255]]), 2, None, "no_ignore.png")


def test_check_mask_values_negative_ignore_index():
    mask = torch.tensor([[0, -100, 1], [-100, 1, 1]])
    counts = check_mask_values(mask, 2, -100, "neg.png")
    assert counts.tolist() == [1, 3]
    with pytest.raises(ValueError, match=r"neg\.png has values \[-1\] outside \[0, 2\) that are not"):
        check_mask_values(torch.tensor([[0, -1]]), 2, -100, "neg.png")


# --------------------------------------------------------------------------- orientation, 16-bit


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_exif_orientation_is_applied_as_pil_displays_it(tmp_path, orientation, suffix):
    """Every reader sees the picture as viewers show it: the same pixels as PIL's exif_transpose."""
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}{suffix}"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as opened:
        shown = np.array(ImageOps.exif_transpose(opened).convert("RGB"))
    expected = torch.from_numpy(shown).permute(2, 0, 1).float() / 255
    assert read_image(path, 3).shape == ((3, 5, 7) if orientation < 5 else (3, 7, 5))
    torch.testing.assert_close(read_image(path, 3), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(reader.read_image(path, 3)), expected, rtol=0, atol=0)
    if suffix != ".tif" or orientation < 5:  # bytes are decoded by PIL: see the next test
        torch.testing.assert_close(read_image(path.read_bytes(), 3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("use_tifffile", [False, True])
@pytest.mark.parametrize("orientation", [3, 6])
def test_tiff_orientation_with_and_without_tifffile(tmp_path, monkeypatch, use_tifffile, orientation):
    """TIFF orientation tags are honoured by tifffile and PIL alike; PIL scrambles single-band TIFFs
    whose tag swaps H and W, so without tifffile those are an error naming the file, not a misread."""
    if use_tifffile:
        pytest.importorskip("tifffile")
    monkeypatch.setattr(reader, "_has_tifffile", lambda: use_tifffile)
    upright = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    path = save_with_orientation(tmp_path / f"o{orientation}.tif", upright, orientation)
    if orientation == 6 and not use_tifffile:
        with pytest.raises(ValueError, match=r"o6\.tif is a TIFF with orientation tag 6.*tifffile"):
            read_image(path, 1)
        return
    assert read_image(path, 1)[0].mul(255).round().tolist() == [[0, 40, 80], [120, 160, 200]]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_orientation_numbers_and_masks_turn_with_images(tmp_path, orientation):
    """A 2 x 3 picture stored turned, with its tag: read back as the 2 x 3 picture; a mask with the
    same tag turns the same way (a mask drawn on the upright picture has no tag and stays)."""
    upright = np.array([[0, 10, 20], [30, 40, 50]], dtype=np.uint8)
    image = save_with_orientation(tmp_path / f"o{orientation}.jpg", upright * 5, orientation, quality=100)
    assert read_image(image, 1)[0].mul(255 / 5).round().tolist() == upright.tolist()
    mask = save_with_orientation(tmp_path / f"m{orientation}.png", upright // 10, orientation)
    assert read_mask(mask).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert reader.read_mask(mask).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize(("channels", "in_chans"), [(3, 3), (4, 3), (4, 4), (2, 1), (1, 1)])
def test_16_bit_pngs_keep_all_16_bits(tmp_path, channels, in_chans, interlace):
    """48-bit RGB (and 64-bit RGBA, 32-bit gray + alpha) PNGs: values / 65535, not their high byte."""
    shape = (9, 13, channels) if channels > 1 else (9, 13)
    words = np.random.default_rng(channels).integers(0, 65536, shape, dtype=np.uint16)
    words.reshape(-1)[:4] = [1, 255, 256, 1007]  # differ only in the low byte's precision
    path = write_png16(tmp_path / "deep.png", words, interlace=interlace)
    full = (words if words.ndim == 3 else words[:, :, None])[..., :in_chans]  # alpha dropped
    expected = torch.from_numpy(full.astype(np.float32) / 65535).permute(2, 0, 1)
    torch.testing.assert_close(read_image(path, in_chans), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(reader.read_image(path, in_chans)), expected, rtol=0, atol=0)
    first = read_image(path.read_bytes(), in_chans).mul(65535).round()[:, 0, 0]  # (C,) of pixel (0, 0)
    assert first.tolist() == [1, 255, 256, 1007][:channels][:in_chans]
