"""timm and transformers backbones behind the encoder contract, and their released weights, offline.

Every family of the released-checkpoints table (MobileViT v1/v2, FastViT, EfficientFormer v2,
EfficientViT MIT/MSRA, MaxViT, CoAtNet, NextViT, RepViT, LeViT, ConvNeXt-V2) is built at its
smallest size: features equal timm's own ``features_only`` model, every decoder trains on the
strides it reports (2-32, 4-32, 16-64), masked pixels never reach the features, and weights saved
in timm's / transformers' hub layouts load from a directory, a file and a hub-cache snapshot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from hybridvision.models import create_encoder, create_segmenter, from_pretrained, save_pretrained  # noqa: E402
from hybridvision.models.registry import UnknownModelError  # noqa: E402
from hybridvision.models.transfer import build_encoder, build_segmenter  # noqa: E402
from tests.hub_cache import add_to_hub_cache  # noqa: E402

#: (architecture, img_size for models timm builds at a fixed size); one per family of the table
FAMILIES = [
    ("mobilevit_xxs", None),
    ("mobilevitv2_050", None),
    ("fastvit_t8", None),
    ("efficientformerv2_s0", 64),
    ("efficientvit_b0", None),
    ("efficientvit_m0", 64),
    ("maxvit_rmlp_pico_rw_256", 64),
    ("coatnet_nano_rw_224", 64),
    ("nextvit_small", None),
    ("repvit_m0_9", None),
    ("levit_128s", 64),
    ("convnextv2_atto", None),
]
IDS = [a for a, _ in FAMILIES]


def _kwargs(size: int | None) -> dict:
    return {"img_size": size} if size else {}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch,size", FAMILIES, ids=IDS)
def test_features_equal_timm_features_only(arch, size):
    torch.manual_seed(0)
    enc = create_encoder(f"timm/{arch}", **_kwargs(size)).eval()
    ref = timm.create_model(arch, features_only=True, **_kwargs(size)).eval()
    ref.load_state_dict(enc.model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = enc.forward_features(x), ref(x)
    assert len(ours) == len(theirs) == len(enc.reductions) == len(enc.out_channels)
    for f, g, c, r in zip(ours, theirs, enc.out_channels, enc.reductions):
        assert f.shape == (2, c, -(-64 // r), -(-64 // r))
        torch.testing.assert_close(f, g, atol=1e-5, rtol=0)
    assert enc.input_size == ((size, size) if size else None)


@pytest.mark.parametrize("arch,size", FAMILIES, ids=IDS)
def test_masked_pixels_never_reach_the_features(arch, size):
    """Bit-identical features when the content under the mask changes (train mode: BN batch stats)."""
    torch.manual_seed(0)
    enc = create_encoder(f"timm/{arch}", **_kwargs(size)).train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, ::2, 1::2] = 1
    mask[1, :, 3, 0] = 1
    token = torch.randn(enc.mask_token_dim)
    pixels = torch.nn.functional.interpolate(mask, size=(64, 64)).bool().expand_as(x)
    other = torch.where(pixels, torch.randn_like(x) * 5, x)
    with torch.no_grad():  # the same random draws (dropout) in both passes
        torch.manual_seed(1)
        a = enc.forward_features(x, mask, token)
        torch.manual_seed(1)
        b = enc.forward_features(other, mask, token)
        plain = enc.forward_features(x)
    for f, g in zip(a, b):
        assert torch.equal(f, g)
    assert any(not torch.equal(f, p) for f, p in zip(a, plain))  # the mask did something


@pytest.mark.parametrize("decoder", ["unet", "segformer_mlp"])
@pytest.mark.parametrize("arch,size", FAMILIES, ids=IDS)
def test_every_decoder_trains_on_the_reported_strides(arch, size, decoder):
    torch.manual_seed(0)
    seg = create_segmenter(f"timm/{arch}", num_classes=3, decoder=decoder, **_kwargs(size))
    x = torch.randn(2, 3, 56, 60)  # not a multiple of any stride
    logits = seg(x)
    assert logits.shape == (2, 3, 56, 60) and torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in seg.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]


def test_stride_16_to_64_with_every_decoder_that_takes_any_stride():
    seg = create_segmenter(
        "timm/efficientvit_m0",
        num_classes=2,
        decoder="transunet_cup",
        decoder_kwargs={"n_skip": 2},
        img_size=64,
    )
    assert seg.encoder.reductions == (16, 32, 64)
    assert seg(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)


def test_fixed_size_model_pads_smaller_inputs_and_names_the_window_for_larger():
    seg = create_segmenter("timm/levit_128s", num_classes=2, img_size=64).eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad():
        small = seg(x)
        padded = seg(torch.nn.functional.pad(x, (0, 14, 0, 24)))[..., :40, :50]
    torch.testing.assert_close(small, padded)
    with pytest.raises(ValueError, match=r"at most 64x64.*sliding window"):
        seg(torch.randn(1, 3, 96, 64))


def test_predictor_slides_windows_of_a_fixed_input_size():
    from hybridvision.inference import Predictor

    seg = create_segmenter("timm/levit_128s", num_classes=2, img_size=64).eval()
    predictor = Predictor(seg, mode="whole", num_classes=2)
    assert (predictor.mode, predictor.window) == ("slide", (64, 64))
    with torch.no_grad():
        out = predictor(torch.randn(1, 3, 100, 130))
    assert out.shape == (1, 2, 100, 130)


def test_in_chans_and_drop_path_pass_through():
    enc = create_encoder("timm/convnextv2_atto", in_chans=4, drop_path_rate=0.2)
    assert enc.model.stem_0.weight.shape[1] == 4
    rates = [m.drop_prob for m in enc.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)
    assert len(enc.forward_features(torch.randn(1, 4, 64, 64))) == 4


def test_unknown_architecture_names_close_ones():
    with pytest.raises(UnknownModelError, match="fastvit_t8"):
        create_encoder("timm/fastvit_t9")
    with pytest.raises(UnknownModelError, match="timm/<architecture>"):
        create_segmenter("fastvit_t8", num_classes=2)


def test_saved_encoder_and_segmenter_reload_without_timm_weights(tmp_path):
    seg = create_segmenter("timm/levit_128s", num_classes=2, img_size=64).eval()
    save_pretrained(seg, tmp_path / "seg")
    again = from_pretrained(tmp_path / "seg").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(seg(x), again(x), atol=0, rtol=0)
    assert again.encoder.input_size == (64, 64)


# ---------------------------------------------------------------- released weights, hub layouts


def _timm_release(tmp_path: Path, arch: str = "fastvit_t8") -> tuple[torch.nn.Module, Path]:
    """A full timm model with random weights saved as timm's push_to_hub writes it."""
    from timm.models import save_for_hf

    torch.manual_seed(1)
    full = timm.create_model(arch, num_classes=7)
    save_for_hf(full, str(tmp_path / arch), safe_serialization=True)
    return full, tmp_path / arch


def test_timm_hub_directory_loads_every_encoder_tensor_and_matches_timm(tmp_path):
    _, release = _timm_release(tmp_path)
    assert json.loads((release / "config.json").read_text())["architecture"] == "fastvit_t8"
    model, report = build_segmenter("", 2, 3, init=str(release))
    assert model.build_kwargs["name"] == "timm/fastvit_t8"
    n_encoder = len(model.encoder.state_dict())
    assert len(report.loaded) == n_encoder and not [m for m in report.missing if m.startswith("encoder.")]
    assert report.unexpected and all(u.startswith(("head.", "final_conv.")) for u in report.unexpected)
    assert "tensors loaded" in report.summary() and str(release) in report.summary()
    ref = timm.create_model(
        "fastvit_t8",
        features_only=True,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(release / "model.safetensors")},
    ).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for f, g in zip(model.encoder.eval().forward_features(x), ref(x)):
            torch.testing.assert_close(f, g, atol=1e-5, rtol=0)


def test_weights_file_and_one_channel_input(tmp_path):
    full, release = _timm_release(tmp_path)
    enc = create_encoder("timm/fastvit_t8", in_chans=1, weights=str(release / "model.safetensors"))
    stem = enc.model.stem_0.conv_kxk[0].conv.weight
    torch.testing.assert_close(stem, full.stem[0].conv_kxk[0].conv.weight.sum(1, keepdim=True))


def test_timm_checkpoint_of_another_architecture_is_one_line(tmp_path):
    _, release = _timm_release(tmp_path)
    with pytest.raises(ValueError, match=r"model.safetensors.*(lacks|shape|no tensor matches)"):
        create_encoder("timm/repvit_m0_9", weights=str(release / "model.safetensors"))
    with pytest.raises(ValueError, match="conflicts with model.init"):
        build_segmenter("timm/repvit_m0_9", 2, 3, init=str(release))


def test_hub_id_resolves_from_the_cache_with_no_network(tmp_path):
    """A timm tag in the Hugging Face cache layout loads with HF_HUB_OFFLINE=1 (a fresh process)."""
    _, release = _timm_release(tmp_path)
    add_to_hub_cache(
        tmp_path / "cache", "timm/fastvit_t8.test_in1k", release, ("config.json", "model.safetensors")
    )
    code = (
        "from hybridvision.models.transfer import build_segmenter\n"
        "m, r = build_segmenter('', 2, 3, init='timm/fastvit_t8.test_in1k')\n"
        "print(m.build_kwargs['name'], len(r.loaded), len(m.encoder.state_dict()))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name, loaded, total = out.stdout.split()
    assert name == "timm/fastvit_t8" and loaded == total


def test_reparameterized_export_graph_matches_the_trained_model():
    seg = create_segmenter("timm/repvit_m0_9", num_classes=2).eval()
    from hybridvision.export.onnx import _fused_copy

    fused = _fused_copy(seg)
    assert fused is not seg
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in seg.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), seg(x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- transformers backbones


def _hf_release(tmp_path: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    if kind == "dinov2":
        config = transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=70
        )
        model = transformers.Dinov2Model(config)
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])
        model = transformers.ConvNextModel(config)
    model.save_pretrained(tmp_path / kind)
    return tmp_path / kind


def test_dinov2_pads_to_patch_multiples_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    release = _hf_release(tmp_path, "dinov2")
    model, report = build_segmenter("", 2, 3, init=str(release))
    enc = model.encoder.eval()
    assert model.build_kwargs["name"] == "transformers/dinov2"
    assert enc.reductions == (14, 14, 14, 14) and enc.size_divisor == 14
    assert len(report.loaded) == len(enc.state_dict())
    ref = transformers.Dinov2Backbone.from_pretrained(
        release, out_features=["stage1", "stage2", "stage3", "stage4"]
    ).eval()
    x = torch.randn(1, 3, 56, 84)  # multiples of 14: no padding
    with torch.no_grad():
        for f, g in zip(enc.forward_features(x), ref(pixel_values=x).feature_maps):
            torch.testing.assert_close(f, g, atol=1e-5, rtol=0)
        odd = model.eval()(torch.randn(2, 3, 50, 61))  # padded to 56x70 and cropped back
    assert odd.shape == (2, 2, 50, 61)


def test_convnext_backbone_from_a_transformers_directory(tmp_path):
    release = _hf_release(tmp_path, "convnext")
    enc, report = build_encoder("", 3, init=str(release))
    assert enc.reductions == (4, 8, 16, 32) and enc.out_channels == (8, 16, 24, 32)
    assert len(report.loaded) == len([k for k in enc.state_dict() if "hidden_states_norms" not in k])
    again = from_pretrained(release)
    assert type(again).__name__ == "TransformersEncoder"
    seg = create_segmenter(
        "transformers/convnext",
        num_classes=2,
        config={"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    )
    assert seg(torch.randn(1, 3, 40, 40)).shape == (1, 2, 40, 40)


def test_build_encoder_takes_the_encoder_of_our_segmenter(tmp_path):
    seg = create_segmenter("timm/convnextv2_atto", num_classes=5)
    save_pretrained(seg, tmp_path / "model")
    enc, report = build_encoder("", 3, init=str(tmp_path / "model"))
    assert len(report.loaded) == len(enc.state_dict()) and not report.missing
    for k, v in enc.state_dict().items():
        assert torch.equal(v, seg.encoder.state_dict()[k])


def test_graph_that_keeps_trace_sizes_is_exported_at_a_fixed_size(tmp_path):
    """MobileViT's unfold bakes the traced size into the graph: the export falls back to a fixed
    input size, recorded in the metadata, and the ONNX predictor slides windows of it."""
    np = pytest.importorskip("numpy")
    from hybridvision.deploy.runtime import OnnxPredictor, read_metadata
    from hybridvision.export import export_onnx

    seg = create_segmenter("timm/mobilevit_xxs", num_classes=2).eval()
    path = export_onnx(seg, tmp_path / "m.onnx", train_crop=(64, 64))
    assert read_metadata(path)["input_size"] == [64, 64]
    predictor = OnnxPredictor(path, mode="whole")
    assert (predictor.mode, predictor.window) == ("slide", (64, 64))
    image = np.random.default_rng(0).random((3, 100, 130), dtype=np.float32)
    assert predictor.predict_labels(image).shape == (100, 130)


def test_equal_strides_of_a_plain_vit_take_the_unet_decoder():
    seg = create_segmenter(
        "transformers/dinov2",
        num_classes=2,
        decoder="unet",
        config={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64},
    )
    assert seg.encoder.reductions == (14, 14, 14, 14)
    assert seg(torch.randn(2, 3, 50, 61)).shape == (2, 2, 50, 61)
