"""Hierarchical, parallel and sequential CNN + Transformer hybrids, fusion modules, linear attention,
classification head."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridvision.models import create_encoder, from_pretrained, save_pretrained
from hybridvision.models.decoders.classification import ClassificationHead, Classifier
from hybridvision.models.encoders.hybrid import ConvStage, ConvWindowAttnStage, HybridEncoder
from hybridvision.models.encoders.parallel import ParallelHybridEncoder
from hybridvision.models.encoders.sequential import SequentialHybridEncoder
from hybridvision.models.layers.fusion import FUSIONS, create_fusion
from hybridvision.models.layers.linear_attention import LinearAttention, linear_attention

SMALL_PRESETS = [
    "hybrid_nano",
    "hybrid_tiny",
    "parallel_nano",
    "parallel_tiny",
    "sequential_nano",
    "sequential_tiny",
]
NANO_PRESETS = ["hybrid_nano", "parallel_nano", "sequential_nano"]
#: parameter-count ranges (millions) each preset is meant to hit
PARAM_RANGES = {
    "hybrid_nano": (0.5, 3),
    "hybrid_tiny": (5, 8),
    "hybrid_small": (20, 30),
    "hybrid_base": (60, 90),
    "parallel_nano": (0.5, 4),
    "parallel_tiny": (5, 12),
    "parallel_small": (18, 35),
    "sequential_nano": (0.5, 3),
    "sequential_tiny": (4, 10),
    "sequential_small": (18, 35),
}
#: which returned features come out of convolutional parts (zeroed at masked positions)
ZEROED_FEATURES = {
    "hybrid_nano": (True, True, False, False),
    "parallel_nano": (True, True, True, True),
    "sequential_nano": (True, True, True, False),
}


def _seed() -> None:
    torch.manual_seed(0)


def _check_features(
    encoder: nn.Module, features: list[torch.Tensor], batch: int, height: int, width: int
) -> None:
    assert len(features) == len(encoder.out_channels) == len(encoder.reductions)
    hp = math.ceil(height / encoder.size_divisor) * encoder.size_divisor
    wp = math.ceil(width / encoder.size_divisor) * encoder.size_divisor
    for feat, channels, reduction in zip(features, encoder.out_channels, encoder.reductions):
        assert feat.shape == (batch, channels, hp // reduction, wp // reduction)
        assert torch.isfinite(feat).all()


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_forward_backward_every_parameter_gets_gradient(name: str) -> None:
    _seed()
    encoder = create_encoder(name)
    assert encoder.reductions == (4, 8, 16, 32) and encoder.size_divisor == 32
    x = torch.randn(2, 3, 64, 64)
    features = encoder.forward_features(x)
    _check_features(encoder, features, 2, 64, 64)
    sum(f.square().mean() for f in features).backward()
    dead = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead, f"parameters without a (finite) gradient: {dead}"
    zero = [n for n, p in encoder.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


@pytest.mark.parametrize("name", sorted(PARAM_RANGES))
def test_parameter_counts_in_stated_range(name: str) -> None:
    with torch.device("meta"):  # no memory, no init cost
        encoder = create_encoder(name)
    millions = sum(p.numel() for p in encoder.parameters()) / 1e6
    low, high = PARAM_RANGES[name]
    assert low <= millions <= high, f"{name}: {millions:.2f}M parameters, expected {low}-{high}M"


@pytest.mark.parametrize("name", NANO_PRESETS)
@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans(name: str, in_chans: int) -> None:
    _seed()
    encoder = create_encoder(name, in_chans=in_chans).eval()
    with torch.no_grad():
        features = encoder.forward_features(torch.randn(1, in_chans, 32, 64))
    _check_features(encoder, features, 1, 32, 64)


@pytest.mark.parametrize("name", NANO_PRESETS)
def test_size_not_multiple_of_32(name: str) -> None:
    _seed()
    encoder = create_encoder(name).eval()
    with torch.no_grad():
        features = encoder.forward_features(torch.randn(1, 3, 72, 100))
    _check_features(encoder, features, 1, 72, 100)
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 32), (12, 16), (6, 8), (3, 4)]


@pytest.mark.parametrize("name", NANO_PRESETS)
def test_mask_contract(name: str) -> None:
    _seed()
    encoder = create_encoder(name).eval()
    x = torch.randn(2, 3, 96, 96)
    mask = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1.0]]).expand(2, 1, 3, 3).clone()  # 32-px patch grid
    mask[1, 0, 0, 2] = 1.0
    token = torch.randn(encoder.mask_token_dim)
    pixel_mask = torch.nn.functional.interpolate(mask, size=(96, 96), mode="nearest")
    x_changed = x + 5.0 * torch.randn_like(x) * pixel_mask  # differs only inside masked patches
    assert not torch.equal(x, x_changed)
    conv_outputs = []  # outputs of every convolutional block group, captured by hooks
    for module in encoder.modules():
        if isinstance(module, (ConvStage, ConvWindowAttnStage)):
            module.register_forward_hook(lambda module, args, out: conv_outputs.append(out))
    with torch.no_grad():
        ref = encoder.forward_features(x, mask, token)
        out = encoder.forward_features(x_changed, mask, token)
        unmasked = encoder.forward_features(x)
        other_token = encoder.forward_features(x, mask, torch.randn(encoder.mask_token_dim))
    for level, (a, b) in enumerate(zip(ref, out)):
        assert torch.equal(a, b), f"feature {level} depends on masked pixels"
    for level, (feat, zeroed) in enumerate(zip(ref, ZEROED_FEATURES[name])):
        at_masked = feat * torch.nn.functional.interpolate(mask, size=feat.shape[-2:], mode="nearest")
        if zeroed:  # convolutional output: visible context must not leak into masked positions
            assert at_masked.abs().max() == 0, f"feature {level} is not zero at masked positions"
        else:  # Transformer output: masked positions carry information
            assert at_masked.abs().max() > 0
    for out in conv_outputs[: len(conv_outputs) // 4]:  # hooks fired in 4 forwards; check the first
        assert (
            out * torch.nn.functional.interpolate(mask, size=out.shape[-2:], mode="nearest")
        ).abs().max() == 0
    assert len(conv_outputs) % 4 == 0 and (len(conv_outputs) > 0) == (name != "sequential_nano")
    assert not torch.allclose(ref[-1], unmasked[-1]), "the mask had no effect"
    assert not torch.allclose(ref[-1], other_token[-1]), "the mask token had no effect"


def _naive_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Quadratic form of Katharopoulos et al. (2020), eq. 4: sum_j sim(q_i, k_j) v_j / sum_j sim(q_i, k_j)."""
    phi_q = torch.nn.functional.elu(q) + 1
    phi_k = torch.nn.functional.elu(k) + 1
    sim = phi_q @ phi_k.transpose(-1, -2)  # (B, heads, N, M)
    return (sim @ v) / sim.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    ("n", "m", "d", "e", "scale"), [(1, 1, 4, 4, 1.0), (7, 13, 8, 5, 1.0), (50, 50, 16, 16, 3.0)]
)
def test_linear_attention_matches_naive_formula(n: int, m: int, d: int, e: int, scale: float) -> None:
    _seed()
    q, k = (
        scale * torch.randn(2, 3, n, d, dtype=torch.float64),
        scale * torch.randn(2, 3, m, d, dtype=torch.float64),
    )
    v = torch.randn(2, 3, m, e, dtype=torch.float64)
    torch.testing.assert_close(linear_attention(q, k, v, eps=0.0), _naive_linear_attention(q, k, v))
    # reduced precision inputs are computed in float32 and returned in their dtype
    out = linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), eps=0.0)
    assert out.dtype == torch.bfloat16
    naive = _naive_linear_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double())
    torch.testing.assert_close(out.double(), naive, rtol=1e-2, atol=1e-2)


def test_linear_attention_module_matches_naive_and_is_not_softmax() -> None:
    _seed()
    attn = LinearAttention(32, num_heads=4, eps=0.0)
    x = torch.randn(2, 20, 32)
    q, k, v = attn.qkv(x).reshape(2, 20, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = attn.proj(_naive_linear_attention(q, k, v).transpose(1, 2).reshape(2, 20, 32))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
    softmax = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(linear_attention(q, k, v), softmax, atol=1e-3)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_fusion_module_shapes_and_gradients(fusion: str) -> None:
    _seed()
    module = create_fusion(fusion, 24, 40, 32)
    cnn, transformer = (
        torch.randn(2, 24, 20, 12, requires_grad=True),
        torch.randn(2, 40, 20, 12, requires_grad=True),
    )
    out = module(cnn, transformer)
    assert out.shape == (2, 32, 20, 12) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert cnn.grad.abs().sum() > 0 and transformer.grad.abs().sum() > 0, "both inputs must reach the output"
    assert all(p.grad is not None for p in module.parameters())
    with pytest.raises(ValueError, match="same batch and spatial size"):
        module(cnn, transformer[..., :6])


def test_cross_attention_fusion_pools_keys_and_values() -> None:
    _seed()
    pooled = create_fusion("cross_attention", 16, 16, 32, kv_pool_size=4).eval()
    full = create_fusion("cross_attention", 16, 16, 32, kv_pool_size=None).eval()
    full.load_state_dict(pooled.state_dict())
    cnn, transformer = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    small_c, small_t = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(pooled(small_c, small_t), full(small_c, small_t))  # no pooling at <= 4x4
    assert not torch.allclose(pooled(cnn, transformer), full(cnn, transformer))


def test_gating_output_is_a_convex_combination() -> None:
    _seed()
    module = FUSIONS["gating"](8, 8, 8).eval()
    cnn, transformer = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)
    c, t, g = module.gate(cnn, transformer)
    assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(module(cnn, transformer), g * c + (1 - g) * t)
    low, high = torch.minimum(c, t), torch.maximum(c, t)
    out = module(cnn, transformer)
    assert ((out >= low - 1e-6) & (out <= high + 1e-6)).all()


def test_unknown_fusion_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="channel_spatial, cross_attention, gating, multiscale"):
        create_fusion("bogus", 8, 8, 8)
    with pytest.raises(ValueError, match="valid fusions"):
        create_encoder("parallel_nano", fusion="bogus")


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_parallel_encoder_with_each_fusion(fusion: str) -> None:
    _seed()
    encoder = create_encoder("parallel_nano", fusion=fusion)
    assert all(isinstance(f, FUSIONS[fusion]) for f in encoder.fusions)
    features = encoder.forward_features(torch.randn(2, 3, 64, 64))
    _check_features(encoder, features, 2, 64, 64)
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in encoder.parameters())


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_hybrid_encoder_stage_fusion_and_linear_attention(fusion: str) -> None:
    _seed()
    stages = [
        {"kind": "conv", "depth": 1, "dim": 16, "stride": 4},
        {"kind": "conv_window_attn", "depth": 2, "dim": 32, "stride": 2, "num_heads": 2, "window_size": 4,
         "fusion": fusion},
        {"kind": "global_attn", "depth": 1, "dim": 64, "stride": 2, "num_heads": 2, "attention": "linear"},
    ]  # fmt: skip
    encoder = create_encoder("hybrid_nano", stages=stages)
    assert encoder.reductions == (4, 8, 16) and encoder.size_divisor == 16
    assert isinstance(encoder.stages[1].fusion, FUSIONS[fusion])
    assert len(encoder.no_weight_decay()) == 2  # one relative position table per window block
    features = encoder.forward_features(torch.randn(2, 3, 40, 56))
    _check_features(encoder, features, 2, 40, 56)
    sum(f.square().mean() for f in features).backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_config_validation_and_overrides() -> None:
    with pytest.raises(ValueError, match="valid fields: stages, drop_path_rate"):
        create_encoder("hybrid_nano", drop_rate=0.1)
    with pytest.raises(ValueError, match="stage kind"):
        create_encoder("hybrid_nano", stages=[{"kind": "mlp", "depth": 1, "dim": 8, "stride": 4}])
    with pytest.raises(ValueError, match="num_heads"):
        create_encoder("sequential_nano", num_heads=5)
    encoder = create_encoder("sequential_nano", attention="linear", transformer_depth=1)
    assert isinstance(encoder, SequentialHybridEncoder) and len(encoder.refinement) == 1
    assert isinstance(create_encoder("hybrid_nano"), HybridEncoder)
    assert isinstance(create_encoder("parallel_nano"), ParallelHybridEncoder)


def test_sequential_refinement_is_position_aware() -> None:
    _seed()
    encoder = create_encoder("sequential_nano").eval()
    captured = []
    encoder.stages[-1][-1].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        features = encoder.forward_features(torch.randn(1, 3, 64, 96))
        c4 = captured[0]  # (1, C4, 2, 3) CNN output before the refinement
        refined = encoder.refine(c4)
        refined_swapped = encoder.refine(c4[..., [1, 0, 2]])
    torch.testing.assert_close(refined, features[-1])
    assert features[-1].shape[-2:] == (2, 3) and not torch.allclose(refined, c4)
    # attention + MLP alone are permutation-equivariant; the sin-cos embedding breaks that
    assert not torch.allclose(refined_swapped[..., [1, 0, 2]], refined, atol=1e-4)


def test_save_and_load_round_trip_keeps_fusion_override(tmp_path) -> None:
    _seed()
    encoder = create_encoder("parallel_nano", fusion="multiscale").eval()
    save_pretrained(encoder, tmp_path / "enc")
    loaded = from_pretrained(tmp_path / "enc").eval()
    assert isinstance(loaded.fusions[0], FUSIONS["multiscale"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(encoder.forward_features(x), loaded.forward_features(x)):
            torch.testing.assert_close(a, b)


def test_classification_head() -> None:
    _seed()
    head = ClassificationHead(16, 5)
    feat = torch.randn(3, 16, 4, 6)
    expected = head.fc(head.norm(feat.mean(dim=(2, 3))))
    torch.testing.assert_close(head(feat), expected)
    torch.testing.assert_close(head([torch.randn(3, 8, 8, 8), feat]), expected)  # last feature of a list
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())
    assert head(feat[:1]).shape == (1, 5)


@pytest.mark.parametrize("name", NANO_PRESETS)
def test_classifier_forward_backward(name: str) -> None:
    _seed()
    model = Classifier(create_encoder(name), num_classes=7)
    logits = model(torch.randn(2, 3, 48, 64))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    # only the last feature feeds the head: the stem and the head are trained
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert all(p.grad is not None for p in model.encoder.stem.parameters())


def test_classifier_linear_probe_freezes_encoder() -> None:
    _seed()
    model = Classifier(create_encoder("sequential_nano"), num_classes=3, freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.head.training
    bn = next(m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    torch.testing.assert_close(bn.running_mean, stats)  # BN statistics frozen
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
