"""Visible-only encoding (``Encoder.forward_visible``): the same numbers as full-grid attention whose
masked keys are excluded, masked pixels unable to reach visible outputs, gradients to every weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridvision.models import create_encoder
from hybridvision.models.base import apply_token_mask, mask_to
from hybridvision.models.encoders.hybrid import ConvStage, ConvWindowAttnStage
from hybridvision.models.layers.visible_tokens import VisibleTokens, window_groups
from hybridvision.models.layers.window_attention import MASK_VALUE, SwinBlockStack, SwinTransformerBlock
from pretrain.masking import BlockMaskGenerator

VISIBLE_ONLY = ["swin_nano", "hybrid_nano", "sequential_nano"]


def _mask(b: int, size: tuple[int, int], ratio: float = 0.6, seed: int = 0) -> torch.Tensor:
    return BlockMaskGenerator(size, 32, ratio)(b, generator=torch.Generator().manual_seed(seed))


def _randomise_biases(encoder: torch.nn.Module) -> None:
    """Bias tables far from their near-zero init, so a wrong offset shows."""
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(std=1.0)


# ----------------------------------------------------------------------------- naive references


def _windows(t: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B, Hp, Wp, ...) -> (B * nW, wh * ww, ...), windows row-major."""
    b, hp, wp = t.shape[:3]
    rest = t.shape[3:]
    t = t.reshape(b, hp // wh, wh, wp // ww, ww, *rest).transpose(2, 3)
    return t.reshape(b * (hp // wh) * (wp // ww), wh * ww, *rest)


def _naive_block(
    block: SwinTransformerBlock, x: torch.Tensor, visible: torch.Tensor, window_size: int, shifted: bool
) -> torch.Tensor:
    """A Swin block on the full (B, H, W, C) grid whose attention gives masked and padding keys -inf.

    Written from the paper: norm, pad, cyclic shift, three regions per shifted dimension,
    relative position bias indexed by the offset of every query/key pair.
    """
    b, h, w, c = x.shape
    wh, ww = min(window_size, h), min(window_size, w)
    sh = window_size // 2 if shifted and h > window_size else 0
    sw = window_size // 2 if shifted and w > window_size else 0
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    y = torch.roll(F.pad(block.norm1(x), (0, 0, 0, wp - w, 0, hp - h)), (-sh, -sw), (1, 2))
    keys = torch.roll(F.pad(visible.float(), (0, wp - w, 0, hp - h)), (-sh, -sw), (1, 2)) > 0
    region_h = (torch.arange(hp) >= hp - wh).long() + ((torch.arange(hp) >= hp - sh) & (sh > 0)).long()
    region_w = (torch.arange(wp) >= wp - ww).long() + ((torch.arange(wp) >= wp - sw) & (sw > 0)).long()
    label = (region_h[:, None] * 3 + region_w[None, :]).expand(b, hp, wp)
    tokens, keys, label = _windows(y, wh, ww), _windows(keys, wh, ww), _windows(label, wh, ww)
    pos = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"), -1).view(-1, 2)
    rel = pos[:, None] - pos[None]  # (N, N, 2)
    index = (rel[..., 0] + window_size - 1) * (2 * window_size - 1) + rel[..., 1] + window_size - 1
    attn = block.attn
    heads, d = attn.num_heads, c // attn.num_heads
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (heads, N, N)
    q, k, v = attn.qkv(tokens).view(tokens.shape[0], -1, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / d**0.5 + bias
    logits = logits + MASK_VALUE * (label[:, None, :, None] != label[:, None, None, :])
    logits = logits.masked_fill(~keys[:, None, None, :], float("-inf"))
    out = logits.softmax(-1).nan_to_num(0.0) @ v  # rows without any visible key: 0
    out = attn.proj(out.transpose(1, 2).reshape(-1, wh * ww, c))
    out = out.view(b, hp // wh, wp // ww, wh, ww, c).transpose(2, 3).reshape(b, hp, wp, c)
    x = x + torch.roll(out, (sh, sw), (1, 2))[:, :h, :w]
    return x + block.mlp(block.norm2(x))


def _naive_stack(stack: SwinBlockStack, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    for j, block in enumerate(stack):
        x = _naive_block(block, x, visible, stack.window_size, shifted=j % 2 == 1)
    return x


def _naive_global(blocks: torch.nn.Module, tokens: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Global attention blocks on all (B, N, C) tokens; masked keys excluded (SDPA boolean mask)."""
    keys = visible.flatten(1)[:, None, None, :]  # (B, 1, 1, N)
    for block in blocks:
        y = block.attn(block.norm1(tokens), attn_mask=keys)
        tokens = tokens + (y if block.gamma1 is None else y * block.gamma1)
        y = block.mlp(block.norm2(tokens))
        tokens = tokens + (y if block.gamma2 is None else y * block.gamma2)
    return tokens


def _visible_at(mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return mask_to(mask, tuple(size))[:, 0] == 0  # (B, h, w)


def _naive_swin(encoder, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    y = encoder.patch_embed(x)  # masked pixels as they are: they may only reach masked tokens
    feats = []
    for i, stage in enumerate(encoder.layers):
        y = stage.downsample(y)
        visible = _visible_at(mask, y.shape[1:3])
        y = _naive_stack(stage.blocks, y, visible)
        norm = encoder.norm if i == len(encoder.layers) - 1 else encoder.stage_norms[i]
        feats.append((norm(y) * visible[..., None]).permute(0, 3, 1, 2))
    return feats


def _naive_hybrid(encoder, x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> list[torch.Tensor]:
    x = apply_token_mask(encoder.stem(apply_token_mask(x, mask, None)), mask, token)
    feats = []
    for down, stage, norm in zip(encoder.downsamples, encoder.stages, encoder.norms):
        x = down(x)
        visible = _visible_at(mask, x.shape[-2:])
        if isinstance(stage, ConvStage):
            x = stage(x, mask)
        elif isinstance(stage, ConvWindowAttnStage):
            attn = _naive_stack(stage.attn_path.blocks, x.permute(0, 2, 3, 1), visible).permute(0, 3, 1, 2)
            x = stage.fusion(stage.conv_path(x, mask), attn * visible[:, None])  # masked: no attention token
        else:
            b, c, h, w = x.shape
            tokens = (x + stage.position_conv(x)).flatten(2).transpose(1, 2)
            x = _naive_global(stage.blocks, tokens, visible).transpose(1, 2).reshape(b, c, h, w)
            x = x * visible[:, None]  # masked: no token, the next stage's convs read zeros there
        feats.append(norm(x) * visible[:, None])
    return feats


def _naive_sequential(
    encoder, x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor
) -> list[torch.Tensor]:
    feats = encoder.forward_features(x, mask, token)[:-1]
    x = apply_token_mask(encoder.stem(apply_token_mask(x, mask, None)), mask, token)
    for stage in encoder.stages:
        for block in stage:
            x = apply_token_mask(block(x), mask, None)
    b, c, h, w = x.shape
    visible = _visible_at(mask, (h, w))
    from hybridvision.models.layers.pos_embed import sincos_2d_pos_embed

    tokens = x.flatten(2).transpose(1, 2) + sincos_2d_pos_embed(c, h, w)
    tokens = encoder.refinement_norm(_naive_global(encoder.refinement, tokens, visible))
    return [*feats, tokens.transpose(1, 2).reshape(b, c, h, w) * visible[:, None]]


def _assert_features_close(fast: list[torch.Tensor], naive: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert [f.shape for f in fast] == [n.shape for n in naive]
    for i, (f, n) in enumerate(zip(fast, naive)):
        assert (f - n).abs().max().item() < atol, f"stage {i}: {(f - n).abs().max().item()}"


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("size", "window"),
    [((128, 128), 4), ((96, 96), 5), ((64, 160), 3)],  # exact fit; padding at every stage; clamped windows
)
def test_swin_visible_only_matches_full_grid_attention_with_masked_keys_excluded(size, window):
    torch.manual_seed(0)
    encoder = create_encoder("swin_nano", window_size=window).eval()
    _randomise_biases(encoder)
    x = torch.randn(3, 3, *size)
    mask = _mask(3, size)
    with torch.no_grad():
        fast = encoder.forward_visible(x, mask)
        naive = _naive_swin(encoder, x, mask)
    _assert_features_close(fast, naive)
    assert all(f.abs().sum() > 0 for f in fast)


def test_hybrid_visible_only_matches_full_grid_attention_with_masked_keys_excluded():
    torch.manual_seed(0)
    encoder = create_encoder("hybrid_nano").eval()
    _randomise_biases(encoder)
    x, mask, token = torch.randn(2, 3, 128, 96), _mask(2, (128, 96)), torch.randn(32)
    with torch.no_grad():
        _assert_features_close(
            encoder.forward_visible(x, mask, token), _naive_hybrid(encoder, x, mask, token)
        )


def test_sequential_visible_only_matches_full_grid_attention_with_masked_keys_excluded():
    torch.manual_seed(0)
    encoder = create_encoder("sequential_nano").eval()
    x, mask, token = torch.randn(2, 3, 128, 128), _mask(2, (128, 128)), torch.randn(24)
    with torch.no_grad():
        fast = encoder.forward_visible(x, mask, token)
        _assert_features_close(fast, _naive_sequential(encoder, x, mask, token))


def test_images_with_different_visible_counts_match_one_image_at_a_time():
    """Global attention groups each image's visible tokens; ragged counts take the per-image path."""
    torch.manual_seed(0)
    encoder = create_encoder("hybrid_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[[[1, 0], [0, 0]]], [[[1, 1], [0, 1]]]], dtype=torch.bool)  # 3 and 1 visible cells
    with torch.no_grad():
        both = encoder.forward_visible(x, mask)
        alone = [encoder.forward_visible(x[i : i + 1], mask[i : i + 1]) for i in range(2)]
    for stage, feat in enumerate(both):
        torch.testing.assert_close(feat, torch.cat([a[stage] for a in alone]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", VISIBLE_ONLY)
def test_masked_pixels_cannot_reach_visible_outputs(name, train):
    torch.manual_seed(0)
    encoder = create_encoder(name, drop_path_rate=0.3).train(train)
    token = torch.randn(encoder.mask_token_dim)
    x, mask = torch.randn(2, 3, 128, 128), _mask(2, (128, 128))
    pixel = mask_to(mask, (128, 128)).bool()
    poked = torch.where(pixel, torch.randn_like(x) * 50, x)
    visible_changed = torch.where(pixel, x, x + 1.0)

    def run(image: torch.Tensor) -> list[torch.Tensor]:
        torch.manual_seed(1)  # the same stochastic-depth draws in every call
        return encoder.forward_visible(image, mask, token)

    with torch.no_grad():
        ref, other, changed = run(x), run(poked), run(visible_changed)
    for i, (a, b) in enumerate(zip(ref, other)):
        assert torch.equal(a, b), f"stage {i}: masked pixels reached the output"
        assert torch.all(a * _visible_at(mask, a.shape[-2:])[:, None] == a), "non-zero at masked positions"
    assert not torch.allclose(ref[-1], changed[-1])  # the check can fail: visible pixels do count


@pytest.mark.parametrize("name", VISIBLE_ONLY)
def test_gradient_reaches_every_weight_and_no_masked_pixel(name):
    torch.manual_seed(0)
    encoder = create_encoder(name, drop_path_rate=0.1).train()
    token = torch.randn(encoder.mask_token_dim, requires_grad=True)
    x = torch.randn(2, 3, 64, 96, requires_grad=True)
    mask = _mask(2, (64, 96), ratio=0.5)
    sum(f.square().mean() for f in encoder.forward_visible(x, mask, token)).backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    pixel = mask_to(mask, (64, 96)).bool().expand_as(x)
    assert torch.all(x.grad[pixel] == 0) and x.grad[~pixel].abs().sum() > 0
    assert (token.grad is not None and token.grad.abs().sum() > 0) == encoder.visible_only_mask_token


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        encoder = create_encoder("swin_nano", window_size=4)
        encoder.set_grad_checkpointing(enable)
        mask = _mask(2, (128, 128))
        sum(f.sum() for f in encoder.forward_visible(torch.randn(2, 3, 128, 128), mask)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_window_groups_hold_only_windows_with_visible_tokens_at_their_true_slots():
    visible = torch.zeros(1, 8, 8, dtype=torch.bool)
    visible[0, :4, :4] = True  # one 4x4 block: one window unshifted, four when shifted by 2
    tokens = VisibleTokens((1, 8, 8), visible.flatten().nonzero().squeeze(1))
    plain = window_groups(tokens, (4, 4))
    assert plain.count == 1 and sorted(plain.slots.tolist()) == list(range(16))
    stack = SwinBlockStack(8, 2, 2, 4)
    window, shift, region = stack.geometry(8, 8, torch.device("cpu"))
    shifted = window_groups(tokens, window, shift, region)
    assert shifted.count == 4 and len(set(shifted.slots.tolist())) == 16
    # token (0, 0) lands at slot (2, 2) of the last window after the roll by -2: no region mask there
    assert shifted.slots[0].item() == 3 * 16 + 2 * 4 + 2


def test_merged_children_follow_patch_merging_order():
    visible = torch.zeros(1, 4, 4, dtype=torch.bool)
    visible[0, 2:, :2] = True  # the bottom-left 2x2 patch
    tokens = VisibleTokens((1, 4, 4), visible.flatten().nonzero().squeeze(1))  # rows 8, 9, 12, 13
    parent, children = tokens.merged()
    assert parent.index.tolist() == [2]  # (1, 0) of the 2x2 grid
    assert children.tolist() == [0, 2, 1, 3]  # (0,0), (1,0), (0,1), (1,1) as in PatchMerging


def test_mask_cells_smaller_than_the_deepest_stride_are_rejected():
    encoder = create_encoder("swin_nano")
    mask = BlockMaskGenerator(64, 16, 0.5)(1)  # 16 px cells, deepest stride 32
    with pytest.raises(ValueError, match="stride-32 tokens"):
        encoder.forward_visible(torch.randn(1, 3, 64, 64), mask)


def test_encoders_without_the_path_say_so():
    encoder = create_encoder("mit_nano")
    assert not encoder.encodes_visible_only
    with pytest.raises(NotImplementedError, match="visible tokens only"):
        encoder.forward_visible(torch.randn(1, 3, 64, 64), _mask(1, (64, 64)))
