"""Objectives: MIM loss maths, masking can't be cheated, every objective trains in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from ssl_toy_encoders import make_toy

from pretrain.heads import MultiScaleDecoder, PixelShuffleDecoder, resolve_mim_decoder
from pretrain.objectives import (
    CombinedObjective,
    PretrainModel,
    PretrainOutput,
    masked_reconstruction_loss,
    patch_normalize,
    scaled_lr,
)

TOYS = ["toy_cnn", "toy_vit"]


def _batch(b: int = 4, c: int = 3, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "view0": torch.rand(b, c, size, size, generator=g),
        "view1": torch.rand(b, c, size, size, generator=g),
        "image": torch.rand(b, c, size, size, generator=g),
    }


def _model(encoder: str, objective: str, in_chans: int = 3, **kwargs) -> PretrainModel:
    torch.manual_seed(0)
    options = {"mask_patch_size": 16, "decoder_dim": 16, "projection_dim": 16} | kwargs
    if objective == "contrastive":
        options = {k: v for k, v in options.items() if k.startswith(("projection", "temperature"))}
    return PretrainModel(make_toy(encoder, in_chans=in_chans), objective, in_chans=in_chans, **options)


# --------------------------------------------------------------------------- MIM loss maths


@pytest.mark.parametrize("loss", ["l1", "mse"])
def test_mim_loss_is_mean_over_masked_pixels_and_ignores_visible(loss):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 0, :3] = 1
    mask[1, 0, 2:, 1] = 1  # 5 masked cells of 4x4 px
    value = masked_reconstruction_loss(pred, target, mask, loss)
    pixel = mask.repeat_interleave(4, 2).repeat_interleave(4, 3).bool().expand(-1, 3, -1, -1)
    diff = pred[pixel] - target[pixel]
    manual = diff.abs().sum() if loss == "l1" else diff.square().sum()
    assert value.item() == pytest.approx(manual.item() / (5 * 16 * 3), rel=1e-6)

    visible_changed = torch.where(pixel, pred, pred + 10 * torch.randn_like(pred))
    assert masked_reconstruction_loss(visible_changed, target, mask, loss).item() == value.item()
    masked_changed = torch.where(pixel, pred + 1.0, pred)
    assert masked_reconstruction_loss(masked_changed, target, mask, loss).item() != pytest.approx(
        value.item()
    )


def test_mim_loss_gradient_is_zero_on_visible_pixels():
    pred = torch.randn(2, 1, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 2, 2)
    mask[:, :, 0, 0] = 1
    masked_reconstruction_loss(pred, torch.zeros_like(pred), mask).backward()
    pixel = mask.repeat_interleave(4, 2).repeat_interleave(4, 3).bool()
    assert torch.all(pred.grad[~pixel] == 0)
    torch.testing.assert_close(pred.grad[pixel].abs(), torch.full((32,), 1 / 32))


def test_patch_normalize_round_trips_and_standardises():
    x = torch.rand(2, 3, 32, 32) * 5 + 2
    normalised, mean, std = patch_normalize(x, 16)
    torch.testing.assert_close(normalised * std + mean, x, rtol=1e-5, atol=1e-5)
    patch = normalised[0, :, :16, 16:]
    assert patch.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert patch.var().item() == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- MIM model behaviour


@pytest.mark.parametrize("encoder", TOYS)
def test_achieved_mask_ratio_equals_configured(encoder):
    model = _model(encoder, "mim", mask_ratio=0.75)
    out = model({"image": torch.rand(3, 3, 64, 64)})
    assert out.stats["mask_ratio"].item() == 0.75  # 12 of 16 blocks of 16 px, per image
    assert out.images["mask"].flatten(1).sum(1).tolist() == [12.0, 12.0, 12.0]


def assert_masked_input_cannot_leak(model: PretrainModel, x: torch.Tensor, mask: torch.Tensor) -> None:
    """Changing the input only inside masked blocks leaves the reconstruction bit-identical,
    while changing a visible block does change it (so the check can fail)."""
    model.train()  # batch statistics included
    model.objective.max_log_images = x.shape[0]
    pixel = torch.nn.functional.interpolate(mask.float(), size=x.shape[-2:], mode="nearest").bool()
    poked = torch.where(pixel, torch.rand_like(x) * 100 - 50, x)
    visible = torch.where(pixel, x, x.flip(-1) + 1.0)

    def reconstruct(image: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # same stochastic-depth / dropout draws in every call
        return model({"image": image, "mask": mask}).images["reconstruction"]

    with torch.no_grad():
        ref = reconstruct(x)
        assert torch.equal(ref, reconstruct(poked)), "masked pixels leaked into the reconstruction"
        changed = reconstruct(visible)
    assert not torch.allclose(ref, changed)


def _fixed_mask(b: int, grid: int, seed: int = 0) -> torch.Tensor:
    from pretrain.masking import BlockMaskGenerator

    return BlockMaskGenerator(grid * 16, 16, 0.5)(b, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder", ["multiscale", "pixel_shuffle"])
@pytest.mark.parametrize("encoder", TOYS)
def test_no_encoder_can_cheat(encoder, decoder):
    model = _model(encoder, "mim", decoder=decoder)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_masked_input_cannot_leak(model, x, _fixed_mask(3, 4))


def test_pixel_shuffle_degenerates_on_cnn_which_is_why_auto_is_multiscale():
    """A CNN zeroes its deepest stage under the mask: SimMIM's 1x1 head then predicts the same
    pixels for every image there; the multiscale decoder uses the visible context instead."""
    assert resolve_mim_decoder("auto") == "multiscale"
    mask = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool).expand(2, 1, 2, 2)  # blocks of 32 px
    pixel = mask.repeat_interleave(32, 2).repeat_interleave(32, 3).expand(-1, 3, -1, -1)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for decoder, degenerate in (("pixel_shuffle", True), ("multiscale", False)):
        model = _model("toy_cnn", "mim", decoder=decoder, mask_patch_size=32).eval()
        with torch.no_grad():
            recon = model({"image": x, "mask": mask}).images["reconstruction"]
        same = torch.allclose(recon[0][pixel[0]], recon[1][pixel[1]])
        assert same == degenerate, decoder


@pytest.mark.parametrize("encoder", TOYS)
def test_mask_token_is_used(encoder):
    model = _model(encoder, "mim")
    model({"image": torch.rand(2, 3, 64, 64)}).loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_inputs_not_multiple_of_size_divisor_are_padded_and_cropped():
    model = _model("toy_cnn", "mim", max_log_images=2)
    out = model({"image": torch.rand(2, 3, 48, 80)})  # size_divisor 32, mask blocks of 16
    assert out.images["reconstruction"].shape == (2, 3, 48, 80)
    assert out.stats["mask_ratio"].item() == pytest.approx(round(0.6 * 15) / 15)
    assert torch.isfinite(out.loss)


def test_norm_pix_loss_reconstruction_is_in_pixel_space():
    model = _model("toy_vit", "mim", norm_pix_loss=True, mim_loss="mse")
    x = torch.rand(2, 3, 64, 64) * 4 + 3
    out = model({"image": x})
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    # un-normalised with the per-patch statistics of the target: around the image's range
    assert 0 < out.images["reconstruction"].mean().item() < 10


def test_decoders_return_input_resolution():
    feats = [torch.rand(2, c, 64 // r, 64 // r) for c, r in zip((4, 8, 16), (4, 8, 32))]
    mask = torch.ones(2, 1, 2, 2)
    ms = MultiScaleDecoder((4, 8, 16), (4, 8, 32), out_chans=2, dim=8)
    assert ms(feats, mask).shape == (2, 2, 64, 64)
    assert PixelShuffleDecoder((4, 8, 16), (4, 8, 32), out_chans=2)(feats).shape == (2, 2, 64, 64)
    with pytest.raises(ValueError):
        MultiScaleDecoder((4, 8), (4, 6), out_chans=1)


# --------------------------------------------------------------------------- all objectives


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("objective", ["contrastive", "mim", "contrastive_mim"])
@pytest.mark.parametrize("encoder", TOYS)
def test_forward_backward(encoder, objective, autocast):
    model = _model(encoder, objective)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(_batch())
    assert isinstance(out, PretrainOutput)
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    expected_terms = {
        "contrastive": {"contrastive"},
        "mim": {"mim"},
        "contrastive_mim": {"contrastive", "mim"},
    }
    assert set(out.terms) == expected_terms[objective]
    if "contrastive" in objective:
        assert {"embedding_std", "positive_cosine", "negative_cosine", "alignment", "uniformity"} <= set(
            out.stats
        )
    assert (out.images is not None) == ("mim" in objective)


def test_combined_is_weighted_sum_of_the_two_objectives_on_the_same_batch():
    batch = _batch(seed=5)
    batch["mask"] = _fixed_mask(4, 4, seed=2)
    combined = _model("toy_vit", "contrastive_mim", contrastive_weight=0.3, mim_weight=2.0)
    assert isinstance(combined.objective, CombinedObjective)
    out = combined(batch)
    assert out.loss.item() == pytest.approx(
        0.3 * out.terms["contrastive"].item() + 2.0 * out.terms["mim"].item()
    )
    mim_only = _model("toy_vit", "mim")
    mim_only.load_state_dict(
        {k.replace("objective.mim.", "objective."): v for k, v in combined.state_dict().items()}, strict=False
    )
    assert mim_only(batch).loss.item() == pytest.approx(out.terms["mim"].item(), rel=1e-6)


def test_grayscale_and_multiband_inputs():
    for chans in (1, 4):
        model = _model("toy_cnn", "contrastive_mim", in_chans=chans)
        out = model(_batch(c=chans, size=32))
        assert out.images["reconstruction"].shape == (4, chans, 32, 32)
        out.loss.backward()


def test_missing_batch_key_names_the_keys():
    model = _model("toy_cnn", "contrastive_mim")
    with pytest.raises(KeyError, match="image"):
        model({"view0": torch.rand(2, 3, 32, 32), "view1": torch.rand(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="unknown objective"):
        PretrainModel(make_toy("toy_cnn"), "byol")


def test_no_weight_decay_names_real_parameters():
    model = _model("toy_vit", "contrastive_mim")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"encoder.pos_embed", "objective.mim.mask_token"} <= names
    assert any(n.startswith("objective.mim.decoder.mask_embeddings") for n in names)
    assert names <= set(params)


def test_scaled_lr():
    assert scaled_lr(0.3, 4096) == pytest.approx(4.8)  # SimCLR, LARS, linear rule
    assert scaled_lr(1.2, 4096, rule="sqrt") == pytest.approx(0.075 * 4096**0.5)
    assert scaled_lr(1e-4, 64, reference_batch_size=512) == pytest.approx(1.25e-5)
    with pytest.raises(ValueError):
        scaled_lr(0.1, 256, rule="cubic")


# --------------------------------------------------------------------------- zoo encoders

ZOO_NANO = [
    "mit_nano",
    "swin_nano",
    "resnet_nano",
    "transunet_nano",
    "hybrid_nano",
    "parallel_nano",
    "sequential_nano",
]


def _zoo_model(name: str, objective: str) -> PretrainModel:
    from hybridvision.models import create_encoder, list_models

    if name not in list_models("encoder"):
        pytest.skip(f"{name} is not registered yet")
    torch.manual_seed(0)
    options = {"mask_patch_size": 32, "mask_ratio": 0.5, "decoder_dim": 16, "projection_dim": 16}
    if objective == "contrastive":
        options = {"projection_dim": 16}
    return PretrainModel(create_encoder(name), objective, **options)


@pytest.mark.parametrize("name", ZOO_NANO)
def test_zoo_encoder_cannot_cheat(name):
    model = _zoo_model(name, "mim")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[[[1, 0], [0, 1]]], [[[0, 1], [1, 0]]]], dtype=torch.bool)  # (2, 1, 2, 2)
    assert_masked_input_cannot_leak(model, x, mask)


@pytest.mark.parametrize("name", ZOO_NANO)
def test_zoo_encoder_trains_with_every_objective(name):
    for objective in ("contrastive", "contrastive_mim"):
        model = _zoo_model(name, objective)
        for autocast in (False, True):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(_batch(b=2, size=64))
            assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss), (objective, autocast)
            out.loss.backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            assert all(g is None or torch.isfinite(g).all() for g in grads.values())
            no_grad = sorted(n for n, g in grads.items() if g is None or not g.abs().sum() > 0)
            if objective == "contrastive":  # side outputs of early stages feed no loss here
                assert len(no_grad) < len(grads) // 2, no_grad
            else:  # the multiscale decoder reads every stage
                assert not no_grad, no_grad


# --------------------------------------------------------------------------- the segmenter's decoder


IMAGE_SKIP = {"image_skip_channels": (8,), "decoder_channels": (64, 32, 16, 16, 8)}  # stride-1 skip
SEGMENTERS = [  # (name, decoder_kwargs): every decoder family, incl. a U-Net image skip at stride 1
    ("segformer_nano", None),
    ("swin_unet_nano", None),
    ("transunet_nano", None),
    ("unet_resnet_nano", None),
    ("unet_resnet_nano", IMAGE_SKIP),
]


def _segmenter_model(
    name: str, decoder_kwargs=None, in_chans: int = 3, objective: str = "mim"
) -> PretrainModel:
    from hybridvision.models import create_segmenter

    torch.manual_seed(0)
    seg = create_segmenter(name, num_classes=in_chans, in_chans=in_chans, decoder_kwargs=decoder_kwargs)
    options = {"mask_patch_size": 16, "mask_ratio": 0.5, "projection_dim": 16}
    return PretrainModel.from_segmenter(seg, objective, **options)


@pytest.mark.parametrize(("name", "decoder_kwargs"), SEGMENTERS)
def test_segmenter_decoder_cannot_cheat(name, decoder_kwargs):
    """Masked pixels reach neither the encoder nor the decoder's image skips."""
    model = _segmenter_model(name, decoder_kwargs)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert_masked_input_cannot_leak(model, x, _fixed_mask(2, 4))


@pytest.mark.parametrize("objective", ["mim", "contrastive_mim"])
def test_segmenter_pretraining_trains_every_weight_and_gives_the_segmenter_back(objective):
    from hybridvision.models import Segmenter

    model = _segmenter_model("unet_resnet_nano", IMAGE_SKIP, in_chans=1, objective=objective)
    out = model(_batch(b=2, c=1, size=64))
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad
    seg = model.segmenter()
    assert isinstance(seg, Segmenter) and seg.num_classes == 1
    mim = model.objective.mim if objective == "contrastive_mim" else model.objective
    assert seg.encoder is model.encoder and seg.decoder is mim.decoder.decoder
    assert seg.build_kwargs["name"] == "unet_resnet_nano"
    # the returned segmenter is the trained one: its forward on an unmasked image runs the same modules
    assert seg(torch.rand(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_segmenter_reconstruction_is_the_decoder_output_resized_to_the_image():
    """The All-MLP head predicts at stride 4; the reconstruction is its bilinear upsampling."""
    import torch.nn.functional as F

    from pretrain.heads import SegmentationDecoderHead

    model = _segmenter_model("segformer_nano").eval()  # no dropout
    head = model.objective.decoder
    assert isinstance(head, SegmentationDecoderHead)
    feats = model.encoder.forward_features(torch.rand(2, 3, 64, 64))
    low = head.decoder(feats)
    assert low.shape[-1] == 16
    expect = F.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(feats), expect)


def test_from_segmenter_rejects_a_classifier():
    from hybridvision.models import create_segmenter

    seg = create_segmenter("segformer_nano", num_classes=5, in_chans=3)
    with pytest.raises(ValueError, match="num_classes = in_chans"):
        PretrainModel.from_segmenter(seg, "mim")
    with pytest.raises(ValueError, match="MIM decoder"):
        PretrainModel.from_segmenter(create_segmenter("segformer_nano", num_classes=3), "contrastive")
    with pytest.raises(ValueError, match="encoder only"):
        _model("toy_cnn", "mim").segmenter()


def test_classifier_prefix_finds_each_decoders_output_layer():
    from hybridvision.models import create_segmenter
    from pretrain.heads import classifier_prefix

    expected = {
        "segformer_nano": "classifier",
        "swin_unet_nano": "output",
        "transunet_nano": "segmentation_head",
        "unet_resnet_nano": "segmentation_head",
    }
    for name, head in expected.items():
        for c in (1, 3):
            seg = create_segmenter(name, num_classes=c, in_chans=c)
            assert classifier_prefix(seg.decoder, c) == head, (name, c)


def test_finetune_init_drops_the_reconstruction_layer_even_when_shapes_match(tmp_path):
    """3 image channels -> 3 classes: the reconstruction layer would load silently by shape; the
    checkpoint's ``extra.reconstruction_head`` makes fine-tuning start it fresh, in strict mode."""
    from hybridvision.models import save_pretrained
    from hybridvision.models.transfer import build_segmenter

    seg = _segmenter_model("unet_resnet_nano").segmenter()
    save_pretrained(
        seg, tmp_path / "seg", extra={"stage": "pretrain", "reconstruction_head": "decoder.segmentation_head"}
    )
    model, report = build_segmenter("", num_classes=3, in_chans=3, init=str(tmp_path / "seg"), strict=True)
    src, dst = seg.state_dict(), model.state_dict()
    head = {k for k in dst if k.startswith("decoder.segmentation_head.")}
    assert head == {"decoder.segmentation_head.weight", "decoder.segmentation_head.bias"}
    assert sorted(report.missing) == sorted(head) and not report.unexpected and not report.skipped
    assert all(torch.equal(src[k], dst[k]) for k in dst if k not in head)
    assert not torch.equal(src["decoder.segmentation_head.weight"], dst["decoder.segmentation_head.weight"])
    assert "re-initialised" in report.summary()
