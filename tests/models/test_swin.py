"""Swin Transformer encoders, window attention and the Swin-Unet decoder."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hybridvision.models import create_encoder, create_segmenter, from_pretrained, save_pretrained
from hybridvision.models.decoders.swin_unet import SwinUnetDecoder
from hybridvision.models.layers.window_attention import (
    MASK_VALUE,
    SwinBlockStack,
    SwinTransformerBlock,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

timm = pytest.importorskip("timm")

NANO = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """Affine-free LayerNorm over the channels of (B, C, H, W), as a fresh ``stage_norms`` entry."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)


def _save(state: dict[str, torch.Tensor], path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _nano_checkpoint() -> dict[str, torch.Tensor]:
    """A timm-layout swin_nano checkpoint with a classifier (cheaper to build than timm's model)."""
    state = create_encoder("swin_nano", stage_norms=False).state_dict()
    return {**state, "head.fc.weight": torch.randn(10, 128), "head.fc.bias": torch.zeros(10)}


def _timm_nano(img_size=224, **kwargs):
    return timm.models.swin_transformer.SwinTransformer(
        img_size=img_size, drop_path_rate=0.0, **NANO, **kwargs
    ).eval()


# ----------------------------------------------------------------------------- naive reference


def _naive_block(
    block: SwinTransformerBlock, x: torch.Tensor, window_size: int, shifted: bool
) -> torch.Tensor:
    """Swin block written from the paper, one window at a time, with region labels from a loop.

    Official detection-backbone semantics: norm, pad to window multiples, cyclic shift, windowed
    attention with relative bias and region mask, shift back, crop; windows no larger than the map.
    """
    b, h, w, c = x.shape
    wh, ww = min(window_size, h), min(window_size, w)
    sh = window_size // 2 if shifted and h > window_size else 0
    sw = window_size // 2 if shifted and w > window_size else 0
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    y = F.pad(block.norm1(x), (0, 0, 0, wp - w, 0, hp - h))
    y = torch.roll(y, (-sh, -sw), (1, 2))
    label = torch.zeros(hp, wp)
    for i in range(hp):
        for j in range(wp):
            ri = 0 if i < hp - wh else (1 if i < hp - sh or sh == 0 else 2)
            rj = 0 if j < wp - ww else (1 if j < wp - sw or sw == 0 else 2)
            label[i, j] = 3 * ri + rj
    attn = block.attn
    heads, d = attn.num_heads, c // attn.num_heads
    table = attn.relative_position_bias_table
    out = torch.zeros_like(y)
    for bi in range(b):
        for top in range(0, hp, wh):
            for left in range(0, wp, ww):
                tokens = y[bi, top : top + wh, left : left + ww].reshape(-1, c)
                pos = [(i, j) for i in range(wh) for j in range(ww)]
                qkv = attn.qkv(tokens).view(-1, 3, heads, d)
                result = []
                for hd in range(heads):
                    q, k, v = qkv[:, 0, hd], qkv[:, 1, hd], qkv[:, 2, hd]
                    logits = q @ k.T / d**0.5
                    for m, (i1, j1) in enumerate(pos):
                        for n, (i2, j2) in enumerate(pos):
                            row = (i1 - i2 + window_size - 1) * (2 * window_size - 1) + (
                                j1 - j2 + window_size - 1
                            )
                            logits[m, n] += table[row, hd]
                            if label[top + i1, left + j1] != label[top + i2, left + j2]:
                                logits[m, n] += MASK_VALUE
                    result.append(logits.softmax(-1) @ v)
                out[bi, top : top + wh, left : left + ww] = attn.proj(torch.cat(result, -1)).view(wh, ww, c)
    out = torch.roll(out, (sh, sw), (1, 2))[:, :h, :w]
    x = x + out
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize(
    "size, window",
    [((8, 8), 4), ((10, 13), 4), ((3, 9), 4), ((4, 4), 4)],  # exact fit, padding, clamped rows, window = map
)
@pytest.mark.parametrize("shifted", [False, True])
def test_block_matches_naive_windows(size, window, shifted):
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=8, num_heads=2, window_size=window).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(std=1.0)  # make the bias matter
    x = torch.randn(2, *size, 8)
    stack = SwinBlockStack(8, 2, 2, window)
    win, shift, mask = stack.geometry(*size, x.device)
    with torch.no_grad():
        fast = block(x, win, shift if shifted else (0, 0), mask if shifted else None)
        naive = _naive_block(block, x, window, shifted)
    assert (fast - naive).abs().max().item() < 1e-5


def test_window_partition_roundtrip_and_mask():
    x = torch.randn(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (8, 3, 4, 3)
    assert torch.equal(windows[1], x[0, 0:3, 4:8])  # row-major over the window grid
    assert torch.equal(window_reverse(windows, (3, 4), 6, 8), x)
    mask = shifted_window_mask(6, 8, (3, 4), (1, 2))
    assert mask.shape == (4, 12, 12)
    assert mask[0].abs().sum() == 0  # the top-left window holds one region
    # bottom-right window: rows split 2+1, columns 2+2 -> regions of 4, 4, 2 and 2 tokens
    same = (mask[3] == 0).sum(-1)
    assert sorted(same.tolist()) == [2] * 4 + [4] * 8
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}


# ----------------------------------------------------------------------------- timm parity


@pytest.mark.slow
def test_swin_tiny_matches_timm_224(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    path = _save(ref.state_dict(), tmp_path / "swin_tiny.safetensors")
    enc = create_encoder("swin_tiny", weights=path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, norm=True, intermediates_only=True)
        feats = enc.forward_features(x)
    for i, (ours, theirs) in enumerate(zip(feats, expected)):
        theirs = theirs if i == 3 else _layer_norm(theirs)  # fresh stage norms on stages 0-2
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-4, f"stage {i}"
    # and a size timm was not built for still runs with the right shapes
    with torch.no_grad():
        feats = enc.forward_features(torch.randn(1, 3, 256, 320))
    assert [tuple(f.shape) for f in feats] == [
        (1, 96, 64, 80),
        (1, 192, 32, 40),
        (1, 384, 16, 20),
        (1, 768, 8, 10),
    ]


@pytest.mark.parametrize("official_layout", [False, True])
def test_nano_matches_timm_and_loads_both_layouts(tmp_path, official_layout):
    torch.manual_seed(0)
    ref = _timm_nano(img_size=128, window_size=4)  # maps 32, 16, 8, 4: no padding, as timm needs
    state = ref.state_dict()
    if official_layout:  # Microsoft layout: merging at the end of the previous stage, persistent buffers
        state = {
            re.sub(r"layers\.(\d)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
            for k, v in state.items()
        }
        state = {k.replace("head.fc.", "head."): v for k, v in state.items()}
        state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 16, 16)
        state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
        assert "layers.0.downsample.reduction.weight" in state
    path = _save(state, tmp_path / "nano.safetensors")
    enc = create_encoder("swin_tiny", weights=path, **NANO, window_size=4, stage_norms=False).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, norm=True, intermediates_only=True)
        feats = enc.forward_features(x)
    for ours, theirs in zip(feats, expected):
        assert (ours - theirs).abs().max().item() < 1e-5


def test_load_reports_new_norms_and_rejects_mismatches(tmp_path):
    state = _nano_checkpoint()
    enc = create_encoder("swin_nano")
    new = enc.load_pretrained_weights(_save(state, tmp_path / "ok.safetensors"))
    assert new == [f"stage_norms.{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    assert torch.equal(enc.layers[2].blocks[1].attn.qkv.weight, state["layers.2.blocks.1.attn.qkv.weight"])

    extra = {**state, "layers.9.blocks.0.foo": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.9.blocks.0.foo'\]"):
        enc.load_pretrained_weights(_save(extra, tmp_path / "extra.safetensors"))
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\]"):
        enc.load_pretrained_weights(_save(missing, tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="relative_position_bias_table: \\(169, 1\\) vs \\(81, 1\\)"):
        create_encoder("swin_nano", window_size=5, weights=_save(state, tmp_path / "w7.safetensors"))


def test_single_channel_weights_sum_rgb_filters(tmp_path):
    torch.manual_seed(0)
    path = _save(_nano_checkpoint(), tmp_path / "nano.safetensors")
    rgb = create_encoder("swin_nano", weights=path).eval()
    gray = create_encoder("swin_nano", in_chans=1, weights=path).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(gray.forward_features(x), rgb.forward_features(x.expand(-1, 3, -1, -1))):
            assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["swin_tiny", "swin_small", "swin_base"])
def test_preset_sizes_match_timm(name):
    with torch.device("meta"):
        ours = create_encoder(name, stage_norms=False)
        ref = timm.create_model(f"{name}_patch4_window7_224", pretrained=False, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    assert ours.out_channels == tuple(i["num_chs"] for i in ref.feature_info)
    assert ours.reductions == (4, 8, 16, 32) and ours.size_divisor == 32


# ----------------------------------------------------------------------------- encoder contract


@pytest.mark.parametrize("size", [(32, 32), (50, 70)])
def test_nano_any_size_shapes_and_backward(size):
    torch.manual_seed(0)
    enc = create_encoder("swin_nano")
    x = torch.randn(2, 3, *size, requires_grad=True)
    feats = enc(x)
    hp, wp = (-(-s // 32) * 32 for s in size)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, hp // r, wp // r) for c, r in zip((16, 32, 64, 128), (4, 8, 16, 32))
    ]
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_mask_contract():
    torch.manual_seed(0)
    enc = create_encoder("swin_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 8, 8) < 0.5).float()  # 8x8 patches of 8 px on a 16x16 token grid
    token = torch.randn(16)
    noisy = x + 5 * torch.randn_like(x) * F.interpolate(mask, size=(64, 64))  # change masked pixels only
    with torch.no_grad():
        a = enc.forward_features(x, mask, token)
        b = enc.forward_features(noisy, mask, token)
        c = enc.forward_features(x, mask, torch.randn(16))
        d = enc.forward_features(x)
    for fa, fb, fc, fd in zip(a, b, c, d):
        assert (fa - fb).abs().max().item() < 1e-5  # masked pixels do not matter
        assert (fa - fc).abs().max().item() > 1e-3  # the mask token does
        assert (fa - fd).abs().max().item() > 1e-3  # and masking changes the features
    assert enc.mask_token_dim == 16


def test_no_weight_decay_names_every_bias_table():
    enc = create_encoder("swin_nano")
    names = enc.no_weight_decay()
    assert len(names) == sum(enc.config.depths)
    params = dict(enc.named_parameters())
    assert all(n in params and params[n].shape == (169, params[n].shape[1]) for n in names)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    enc = create_encoder("swin_nano")
    x = torch.randn(1, 3, 32, 32)
    sum(f.sum() for f in enc(x)).backward()
    grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    sum(f.sum() for f in enc(x)).backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, enc.parameters()))


# ----------------------------------------------------------------------------- Swin-Unet


def test_swin_unet_tiny_has_official_parameter_count():
    with torch.device("meta"):
        model = create_segmenter("swin_unet_tiny", num_classes=9)
    assert sum(p.numel() for p in model.parameters()) == 27_168_900


@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
def test_swin_unet_nano_forward_backward(size):
    torch.manual_seed(0)
    model = create_segmenter("swin_unet_nano", num_classes=3)
    x = torch.randn(2, 3, *size)
    logits = model(x)
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_swin_unet_decoder_on_other_channels():
    dec = SwinUnetDecoder((32, 64, 160, 256), (4, 8, 16, 32), num_classes=2)
    feats = [torch.randn(1, c, 64 // r, 96 // r) for c, r in zip((32, 64, 160, 256), (4, 8, 16, 32))]
    assert dec(feats).shape == (1, 2, 64, 96)
    assert [s.blocks[0].attn.num_heads for s in dec.layers_up[1:]] == [5, 2, 1]
    with pytest.raises(ValueError, match="double"):
        SwinUnetDecoder((32, 64), (4, 16), num_classes=2)


def test_swin_unet_nano_save_and_reload(tmp_path):
    torch.manual_seed(0)
    model = create_segmenter("swin_unet_nano", num_classes=2, depths=[2, 2, 2, 2]).eval()
    save_pretrained(model, tmp_path / "model")
    loaded = from_pretrained(tmp_path / "model").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
