"""MiT / SegFormer: parameter counts, transformers parity, conversion errors, masking, decoder maths."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hybridvision.models import (
    Encoder,
    Segmenter,
    create_decoder,
    create_encoder,
    create_segmenter,
    from_pretrained,
    save_pretrained,
)
from hybridvision.models.base import pad_to_multiple
from hybridvision.models.layers.sr_attention import SpatialReductionAttention
from hybridvision.models.registry import segmenter_spec

transformers = pytest.importorskip("transformers")


def _hf_config(**kwargs):
    return transformers.SegformerConfig(**kwargs)


def _randomise_bn(bn: torch.nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_(1.0, 0.5)
        bn.bias.normal_(0.0, 0.5)


@pytest.fixture(scope="module")
def hf_b0_dir(tmp_path_factory):
    """A random-init transformers SegFormer-B0 (19 classes) saved with save_pretrained."""
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(_hf_config(num_labels=19)).eval()
    _randomise_bn(model.decode_head.batch_norm)
    path = tmp_path_factory.mktemp("hf") / "segformer_b0"
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize(
    "name, expected",
    [("segformer_b0", 3_752_694), ("segformer_b1", 13_715_798), ("segformer_b2", 27_461_974)],
)
def test_parameter_counts_match_official(name, expected):
    with torch.device("meta"):
        model = create_segmenter(name, num_classes=150)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_decoder_widths_follow_official_configs():
    widths = {
        s: segmenter_spec(f"segformer_{s}").decoder_kwargs["embed_dim"] for s in ("b0", "b1", "b2", "b5")
    }
    assert widths == {"b0": 256, "b1": 256, "b2": 768, "b5": 768}


def test_segmenter_matches_transformers(hf_b0_dir, tmp_path):
    path, ref = hf_b0_dir
    ours = from_pretrained(path).eval()
    assert isinstance(ours, Segmenter) and ours.num_classes == 19
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = F.interpolate(ref(x).logits, size=(64, 96), mode="bilinear", align_corners=False)
        got = ours(x)
    assert got.shape == (2, 19, 64, 96)
    assert expected.abs().max() > 0.1  # non-trivial logits
    assert (got - expected).abs().max().item() < 1e-4

    # our save_pretrained -> from_pretrained round-trips the converted model
    save_pretrained(ours, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_segmenter_matches_transformers_off_grid(hf_b0_dir):
    """70 x 100 is no multiple of 32.

    By contract our models pad to 32 (bottom/right) and crop, so they equal transformers run on
    the padded image. transformers run on the unpadded image computes a different function
    (ceil-sized maps, different attention sets); ``size_divisor=1`` reproduces that one exactly.
    """
    path, ref = hf_b0_dir
    ours = from_pretrained(path).eval()
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        padded = ref(pad_to_multiple(x, 32)).logits
        expected = F.interpolate(padded, size=(96, 128), mode="bilinear", align_corners=False)[..., :70, :100]
        assert (ours(x) - expected).abs().max().item() < 1e-4

        unpadded = create_segmenter(
            "segformer_b0", num_classes=19, size_divisor=1, layer_norm_eps=1e-5
        ).eval()
        unpadded.load_state_dict(ours.state_dict())
        expected = F.interpolate(ref(x).logits, size=(70, 100), mode="bilinear", align_corners=False)
        assert (unpadded(x) - expected).abs().max().item() < 1e-4
        assert (ours(x) - expected).abs().max().item() > 1e-3  # the two conventions really differ


def test_encoder_matches_transformers_hidden_states(tmp_path):
    """A non-preset, 1-channel SegformerModel converts through overrides and matches every stage."""
    torch.manual_seed(1)
    cfg = _hf_config(
        num_channels=1,
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 2, 1, 1],
        num_attention_heads=[1, 2, 3, 4],
        sr_ratios=[4, 2, 2, 1],
        mlp_ratios=[2, 4, 4, 3],
    )
    ref = transformers.SegformerModel(cfg).eval()
    ref.save_pretrained(tmp_path / "mit")
    ours = from_pretrained(tmp_path / "mit").eval()
    assert isinstance(ours, Encoder) and not isinstance(ours, Segmenter)
    assert ours.out_channels == (16, 32, 48, 64) and ours.reductions == (4, 8, 16, 32)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states
        got = ours.forward_features(x)
    assert len(expected) == len(got) == 4
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() < 1e-4

    save_pretrained(ours, tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again.forward_features(x), got))


def test_image_classification_dir_gives_encoder(tmp_path):
    torch.manual_seed(2)
    ref = transformers.SegformerForImageClassification(_hf_config(num_labels=10)).eval()
    ref.save_pretrained(tmp_path / "cls")
    ours = from_pretrained(tmp_path / "cls").eval()
    assert isinstance(ours, Encoder) and ours.build_kwargs["name"] == "mit_b0"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref.segformer(x, output_hidden_states=True).hidden_states[-1]
        assert (ours.forward_features(x)[-1] - expected).abs().max().item() < 1e-4


def test_unconverted_or_missing_keys_are_named(hf_b0_dir, tmp_path):
    path, _ = hf_b0_dir
    state = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())

    def write(folder, tensors):
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    extra = write(tmp_path / "extra", {**state, "segformer.encoder.block.0.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"segformer\.encoder\.block\.0\.0\.extra\.weight"):
        from_pretrained(extra)
    missing = write(tmp_path / "missing", {k: v for k, v in state.items() if "linear_fuse" not in k})
    with pytest.raises(ValueError, match=r"decoder\.linear_fuse\.weight"):
        from_pretrained(missing)


def test_pytorch_model_bin_is_read(hf_b0_dir, tmp_path):
    path, ref = hf_b0_dir
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(load_file(str(path / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((path / "config.json").read_text())
    ours = from_pretrained(folder).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = F.interpolate(ref(x).logits, size=(32, 32), mode="bilinear", align_corners=False)
        assert (ours(x) - expected).abs().max().item() < 1e-4


def test_mask_contract():
    torch.manual_seed(3)
    enc = create_encoder("mit_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 4, 4) < 0.5).float()  # 16 x 16-pixel patches
    token = torch.randn(enc.mask_token_dim)
    pixel_mask = F.interpolate(mask, size=(64, 64), mode="nearest")
    x_masked_changed = x + 5.0 * torch.randn_like(x) * pixel_mask
    x_visible_changed = x + 5.0 * torch.randn_like(x) * (1 - pixel_mask)
    with torch.no_grad():
        base = enc.forward_features(x, mask, token)
        same = enc.forward_features(x_masked_changed, mask, token)
        other = enc.forward_features(x_visible_changed, mask, token)
        other_token = enc.forward_features(x, mask, torch.randn(enc.mask_token_dim))
        unmasked = enc.forward_features(x)
    for a, b in zip(base, same):
        assert torch.equal(a, b)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(base, other))
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(base, other_token))  # the token is used
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(base, unmasked))


@pytest.mark.parametrize("name", ["mit_nano", "segformer_nano"])
def test_tiny_forward_backward(name):
    torch.manual_seed(4)
    model = create_segmenter(name, num_classes=3)
    x = torch.randn(2, 3, 50, 70)  # padded to 64 x 96 inside, cropped back
    logits = model(x)
    assert logits.shape == (2, 3, 50, 70)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    feats = model.encoder.forward_features(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(64 // r, 96 // r) for r in (4, 8, 16, 32)]


def test_drop_path_schedule_and_overrides():
    enc = create_encoder("mit_b0", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in enc.stages for b in s.blocks]
    assert rates == pytest.approx([0.3 * i / 7 for i in range(8)])
    with pytest.raises(ValueError, match="embed_dim"):
        create_encoder("mit_b0", embed_dim=3)


def _naive_sr_attention(attn: SpatialReductionAttention, x, size):
    b, n, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    q = attn.q(x).reshape(b, n, heads, d).transpose(1, 2)
    kv_in = x
    if attn.sr_ratio > 1:
        grid = x.transpose(1, 2).reshape(b, c, *size).contiguous()
        kv_in = attn.norm(attn.sr(grid).reshape(b, c, -1).transpose(1, 2))
    k, v = attn.kv(kv_in).split(c, dim=-1)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize(
    "sr_ratio, heads, size", [(1, 2, (5, 7)), (2, 1, (6, 8)), (4, 4, (8, 12)), (3, 2, (7, 10))]
)
def test_sr_attention_matches_naive(sr_ratio, heads, size):
    torch.manual_seed(5)
    attn = SpatialReductionAttention(16, heads, sr_ratio).eval()
    x = torch.randn(2, size[0] * size[1], 16)
    with torch.no_grad():
        assert (attn(x, size) - _naive_sr_attention(attn, x, size)).abs().max().item() < 1e-5


def _naive_head(head, feats):
    """The All-MLP decoder as written in the paper: project, upsample, concat (coarsest first), fuse."""
    size = feats[0].shape[-2:]
    outs = []
    for f, lin in zip(feats, head.linear_c):
        y = lin.proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(f.shape[0], -1, *f.shape[-2:])
        outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    x = head.linear_fuse(torch.cat(outs[::-1], dim=1))
    return head.classifier(head.dropout(head.activation(head.batch_norm(x))))


@pytest.mark.parametrize(
    "channels, reductions", [((8, 24, 40), (2, 8, 16)), ((12,), (4,)), ((5, 6, 7, 9, 11), (1, 2, 4, 8, 16))]
)
def test_mlp_decoder_any_features_matches_naive(channels, reductions):
    torch.manual_seed(6)
    head = create_decoder("segformer_mlp", channels, reductions, num_classes=4, embed_dim=16)
    _randomise_bn(head.batch_norm)
    feats = [torch.randn(2, c, 32 // r, 48 // r, requires_grad=True) for c, r in zip(channels, reductions)]
    head.train()  # batch statistics; dropout off so both paths see the same function
    head.dropout.p = 0.0
    with torch.no_grad():
        assert (head(feats) - _naive_head(head, feats)).abs().max().item() < 1e-4
    head.eval()  # running statistics: every parameter (projection biases too) has a real gradient
    grads = []
    for fn in (head, lambda f: _naive_head(head, f)):
        head.zero_grad()
        out = fn(feats)
        assert out.shape == (2, 4, 32 // reductions[0], 48 // reductions[0])
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad.clone() for p in head.parameters()] + [f.grad.clone() for f in feats])
        for f in feats:
            f.grad = None
    for a, b in zip(*grads):
        assert b.abs().max() > 0
        assert (a - b).abs().max().item() < 1e-4 * b.abs().max().item()


def test_default_decoder_for_segformer_b0_is_exactly_as_built():
    model = create_segmenter("segformer_b0", num_classes=19)
    assert model.decoder.linear_fuse.weight.shape == (256, 1024, 1, 1)
    assert isinstance(model.decoder.dropout, torch.nn.Dropout2d) and model.decoder.dropout.p == 0.1
    assert model.encoder.size_divisor == 32 and model.encoder.mask_token_dim == 32


_HF_TO_OFFICIAL = [  # transformers' on-disk names -> NVlabs/mmseg names (HF's conversion script, reversed)
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", lambda m: f"patch_embed{int(m[1]) + 1}.norm."),
    (r"^encoder\.patch_embeddings\.(\d)\.proj\.", lambda m: f"patch_embed{int(m[1]) + 1}.proj."),
    (r"^encoder\.layer_norm\.(\d)\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^encoder\.block\.(\d)\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
]
_HF_BLOCK_TO_OFFICIAL = {
    "layer_norm_1.": "norm1.",
    "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.dense2.": "mlp.fc2.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.",
}


def test_official_checkpoint_loads_via_weights(tmp_path):
    """An NVlabs/mmseg-layout checkpoint (fused ``attn.kv``) made from transformers weights."""
    import re

    torch.manual_seed(7)
    cfg = _hf_config(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_attention_heads=[1, 2, 3, 4])
    ref = transformers.SegformerModel(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    official = {"decode_head.conv_seg.weight": torch.zeros(2, 8, 1, 1)}
    for key, value in load_file(str(tmp_path / "hf" / "model.safetensors")).items():
        for pattern, repl in _HF_TO_OFFICIAL:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        for old, new in _HF_BLOCK_TO_OFFICIAL.items():
            key = re.sub(r"^(block\d\.\d+\.)" + re.escape(old), r"\g<1>" + new, key)
        official["backbone." + key] = value
    for key in [k for k in official if ".attention.self.key." in k]:
        kv = key.replace("attention.self.key.", "attn.kv.")
        official[kv] = torch.cat([official.pop(key), official.pop(key.replace(".key.", ".value."))])
    torch.save({"state_dict": official}, tmp_path / "mit.pth")

    overrides = dict(
        embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), layer_norm_eps=1e-5
    )
    ours = create_encoder("mit_b0", weights=str(tmp_path / "mit.pth"), **overrides).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x, output_hidden_states=True).hidden_states
        for e, g in zip(expected, ours.forward_features(x)):
            assert (e - g).abs().max().item() < 1e-4

    official["backbone.block1.0.attn.extra"] = torch.zeros(1)
    torch.save(official, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"block1\.0\.attn\.extra"):
        create_encoder("mit_b0", weights=str(tmp_path / "bad.pth"), **overrides)
